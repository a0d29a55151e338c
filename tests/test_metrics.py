"""metrics.py against closed-form values and an independent numpy implementation."""
import math
import sys
import types

import librosa
import numpy as np
import pytest
import torch

from conftest import tone
import metrics

SR = 48000


def np_stft(y, n_fft, hop, win):
    """Centred reflect-padded STFT, periodic Hann of `win` centred in n_fft. -> (F, T) complex128."""
    window = np.zeros(n_fft)
    left = (n_fft - win) // 2
    window[left:left + win] = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(win) / win)
    padded = np.pad(np.asarray(y, dtype=np.float64), n_fft // 2, mode="reflect")
    frames = np.stack([padded[t * hop:t * hop + n_fft] for t in range(len(y) // hop + 1)])
    return np.fft.rfft(frames * window, axis=1).T


def np_istft(spec, n_fft, hop, win):
    """Weighted overlap-add inverse of np_stft, trimmed to hop * (T - 1) samples."""
    window = np.zeros(n_fft)
    left = (n_fft - win) // 2
    window[left:left + win] = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(win) / win)
    frames = np.fft.irfft(spec.T, n=n_fft, axis=1) * window
    total = n_fft + hop * (spec.shape[1] - 1)
    out, envelope = np.zeros(total), np.zeros(total)
    for t, frame in enumerate(frames):
        out[t * hop:t * hop + n_fft] += frame
        envelope[t * hop:t * hop + n_fft] += window ** 2
    keep = slice(n_fft // 2, total - n_fft // 2)
    return out[keep] / envelope[keep]


def np_metric_spectrum(y):
    return np_stft(y, 2048, 512, 2048)


def np_lsd(x, y):
    p = [np.log10(np.maximum(np.abs(np_metric_spectrum(s)) ** 2, 1e-8)) for s in (x, y)]
    return np.mean(np.sqrt(np.mean((p[0] - p[1]) ** 2, axis=0)))


def np_awpd(x, y):
    def aw(e):
        return np.abs(e - 2 * np.pi * np.round(e / (2 * np.pi)))
    pha_x, pha_y = np.angle(np_metric_spectrum(x)), np.angle(np_metric_spectrum(y))
    gd = np.diff(pha_x, axis=0, prepend=0) - np.diff(pha_y, axis=0, prepend=0)
    iaf = np.diff(pha_x, axis=1, prepend=0) - np.diff(pha_y, axis=1, prepend=0)
    return {
        "AWPD_IP": np.mean(np.sqrt(np.mean(aw(pha_x - pha_y) ** 2, axis=0))),
        "AWPD_GD": np.mean(np.sqrt(np.mean(aw(gd) ** 2, axis=1))),
        "AWPD_IAF": np.mean(np.sqrt(np.mean(aw(iaf) ** 2, axis=0))),
    }


def np_snr(x, y):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    return 10 * np.log10(np.sum(x ** 2) / np.sum((x - y) ** 2))


def np_mel_distance(x, y, h):
    basis = librosa.filters.mel(sr=h.sampling_rate, n_fft=h.n_fft, n_mels=h.num_mels_for_loss)

    def log_mel(s):
        magnitude = np.sqrt(np.abs(np_stft(s, h.n_fft, h.hop_size, h.win_size)) ** 2 + 1e-9)
        return np.log(np.maximum(basis @ magnitude, 1e-5))
    return np.mean(np.abs(log_mel(x) - log_mel(y)))


def low_pass(y, cutoff):
    spec = np.fft.rfft(y)
    spec[np.fft.rfftfreq(y.size, 1 / SR) > cutoff] = 0
    return np.fft.irfft(spec, n=y.size).astype(np.float32)


def with_noise(y, snr_db, seed=1):
    noise = np.random.default_rng(seed).standard_normal(y.size)
    noise *= math.sqrt(np.sum(y.astype(np.float64) ** 2) / np.sum(noise ** 2) / 10 ** (snr_db / 10))
    return (y + noise).astype(np.float32)


@pytest.fixture(scope="module")
def x():
    return tone(0.5, SR, seed=3)


def t(y):
    return torch.from_numpy(np.ascontiguousarray(y, dtype=np.float32))


def test_lsd_of_double_amplitude_is_log10_4(x):
    assert metrics.lsd(t(x), t(2 * x)).item() == pytest.approx(math.log10(4), abs=1e-5)


def test_lsd_ignores_bins_below_the_power_floor(x):
    # |S|^2 of a 1e-8-scaled signal stays far below 1e-8: both spectra sit on the floor.
    assert metrics.lsd(t(1e-8 * x), t(2e-8 * x)).item() == 0.0


def test_awpd_of_negated_signal_follows_the_boundary_rule(x):
    values = metrics.awpd(t(x), t(-x))
    n_bins, n_frames = 2048 // 2 + 1, x.size // 512 + 1
    assert values["AWPD_IP"].item() == pytest.approx(math.pi, abs=1e-5)
    # Differences cancel the constant pi offset except on the first bin / frame (differenced against 0).
    assert values["AWPD_GD"].item() == pytest.approx(math.pi / n_bins, abs=2e-6)
    assert values["AWPD_IAF"].item() == pytest.approx(math.pi / n_frames, abs=2e-6)


def test_snr_at_a_set_noise_level(x):
    assert metrics.snr(t(x), t(with_noise(x, 20.0))).item() == pytest.approx(20.0, abs=1e-4)


@pytest.fixture(scope="module")
def degraded(x):
    return with_noise(low_pass(x, 6000), 25.0)


def test_lsd_and_snr_equal_numpy(x, degraded):
    assert metrics.lsd(t(x), t(degraded)).item() == pytest.approx(np_lsd(x, degraded), rel=1e-4)
    assert metrics.snr(t(x), t(degraded)).item() == pytest.approx(np_snr(x, degraded), rel=1e-6)


def test_awpd_equals_numpy(x, degraded):
    expected = np_awpd(x, degraded)
    for name, value in metrics.awpd(t(x), t(degraded)).items():
        assert value.item() == pytest.approx(expected[name], rel=1e-3), name


def test_mel_distance_equals_numpy(x, degraded, tiny_h):
    value = metrics.mel_distance(t(x), t(degraded), tiny_h).item()
    assert value == pytest.approx(np_mel_distance(x, degraded, tiny_h), rel=1e-4)
    assert metrics.mel_distance(t(x), t(x), tiny_h).item() == 0.0


def test_stft_consistency_equals_numpy(tiny_h):
    rng = np.random.default_rng(0)
    n_bins, n_frames = tiny_h.n_fft // 2 + 1, 40
    real, imag = (rng.standard_normal((n_bins, n_frames)).astype(np.float32) for _ in range(2))
    spec = real.astype(np.float64) + 1j * imag
    resynthesised = np_stft(np_istft(spec, tiny_h.n_fft, tiny_h.hop_size, tiny_h.win_size),
                            tiny_h.n_fft, tiny_h.hop_size, tiny_h.win_size)
    expected = np.mean(np.abs(spec - resynthesised) ** 2)
    assert metrics.stft_consistency(t(real), t(imag), tiny_h).item() == pytest.approx(expected, rel=1e-4)


def test_stft_consistency_of_a_real_stft_is_zero(x, tiny_h):
    spec = torch.stft(t(x), tiny_h.n_fft, tiny_h.hop_size, tiny_h.win_size,
                      torch.hann_window(tiny_h.win_size), return_complex=True)
    assert metrics.stft_consistency(spec.real, spec.imag, tiny_h).item() < 1e-8


def test_metrics_get_worse_with_more_degradation(x, tiny_h):
    pairs = [(low_pass(x, 8000), low_pass(x, 3000)), (with_noise(x, 30.0), with_noise(x, 10.0))]
    for mild, strong in pairs:
        a, b = (metrics.compute_metrics(t(x), t(y), tiny_h) for y in (mild, strong))
        for name in ("LSD", "AWPD_IP", "AWPD_GD", "AWPD_IAF", "MelDistance"):
            assert b[name] > a[name], name
        assert b["SNR"] < a["SNR"]


def test_compute_metrics_matches_the_single_functions_and_batches(x, degraded, tiny_h):
    single = metrics.compute_metrics(t(x), t(degraded), tiny_h)
    assert single["LSD"] == pytest.approx(metrics.lsd(t(x), t(degraded)).item(), rel=1e-6)
    assert single["AWPD_GD"] == pytest.approx(metrics.awpd(t(x), t(degraded))["AWPD_GD"].item(), rel=1e-6)
    assert single["MelDistance"] == pytest.approx(metrics.mel_distance(t(x), t(degraded), tiny_h).item(), rel=1e-6)
    assert set(single) <= set(metrics.HIGHER_IS_BETTER)
    batch_ref = torch.stack([t(x), t(x)])
    batch_deg = torch.stack([t(degraded), t(2 * x)])
    per_item = metrics.lsd(batch_ref, batch_deg)
    assert per_item.shape == (2,)
    assert per_item[1].item() == pytest.approx(math.log10(4), abs=1e-5)
    batched = metrics.compute_metrics(batch_ref, batch_deg, tiny_h)
    assert batched["LSD"] == pytest.approx((single["LSD"] + math.log10(4)) / 2, rel=1e-5)


def test_short_audio_is_zero_padded_to_the_metric_frame():
    """Below n_fft / 2 samples the metric STFT's reflect padding is impossible: the clip is
    zero-padded to 1025 samples first, which is the metric of the padded pair."""
    x = torch.from_numpy(tone(0.05)[:300]).double()
    padded = torch.nn.functional.pad(x, (0, 1025 - 300))
    assert metrics.lsd(x, 0.5 * x).item() == pytest.approx(metrics.lsd(padded, 0.5 * padded).item(), abs=1e-12)
    assert 0 < metrics.lsd(x, 0.5 * x).item() < math.log10(4)   # the silent tail frames count as equal
    assert metrics.lsd(x[:1], x[:1]).item() == 0


@pytest.fixture
def no_optional_packages(monkeypatch):
    # A None entry in sys.modules makes `import name` raise ImportError, as if not installed.
    for module in ("visqol", "pesq", "pystoi"):
        monkeypatch.setitem(sys.modules, module, None)


def test_missing_optional_packages_skip_with_one_line_each(no_optional_packages, capsys):
    assert metrics.optional_metrics(speech=False) == {}
    assert capsys.readouterr().err == "ViSQOL skipped: package visqol-python not installed\n"
    assert metrics.optional_metrics(speech=True) == {}
    assert capsys.readouterr().err.splitlines() == [
        "ViSQOL skipped: package visqol-python not installed",
        "PESQ skipped: package pesq not installed",
        "STOI skipped: package pystoi not installed",
    ]


def test_installed_optional_packages_get_their_standard_rates(monkeypatch, x):
    calls = {}

    class FakeVisqol:
        def create(self, mode):
            calls["visqol_mode"] = mode

        def measure_from_arrays(self, ref, deg, sample_rate):
            calls["visqol"] = (ref.size, sample_rate)
            return types.SimpleNamespace(moslqo=4.5)

    def fake_pesq(fs, ref, deg, mode):
        calls["pesq"] = (fs, ref.size, mode)
        return 3.5

    def fake_stoi(ref, deg, fs):
        calls["stoi"] = (fs, ref.size)
        return 0.9

    for name, attrs in (("visqol", {"VisqolApi": FakeVisqol}), ("pesq", {"pesq": fake_pesq}),
                        ("pystoi", {"stoi": fake_stoi})):
        monkeypatch.setitem(sys.modules, name, types.SimpleNamespace(**attrs))
    scores = metrics.optional_metrics(speech=True)
    values = {name: score(x, x, SR) for name, score in scores.items()}
    assert values == {"ViSQOL": 4.5, "PESQ": 3.5, "STOI": 0.9}
    assert calls == {"visqol_mode": "audio", "visqol": (x.size, 48000),
                     "pesq": (16000, x.size // 3, "wb"), "stoi": (SR, x.size)}
