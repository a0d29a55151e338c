"""spectral.py against an independent numpy STFT, hand values of the phase arithmetic, analysis padding."""
import math

import librosa
import numpy as np
import pytest
import torch

import spectral
from conftest import tone

SR, N_FFT, HOP, WIN, MELS = 48000, 1024, 40, 320, 80
TWO_PI = 2 * math.pi


def hann_periodic(win):
    n = np.arange(win)
    return 0.5 - 0.5 * np.cos(2 * np.pi * n / win)


def hann_symmetric(win):
    n = np.arange(win)
    return 0.5 - 0.5 * np.cos(2 * np.pi * n / (win - 1))


def numpy_stft(y, n_fft=N_FFT, hop=HOP, win=WIN, window_fn=hann_periodic, centre_window=True):
    """rfft of reflect-padded frames; the win-sample window sits centred in n_fft zeros. y: (L,) -> (F, T)."""
    window = np.zeros(n_fft)
    left = (n_fft - win) // 2 if centre_window else 0
    window[left:left + win] = window_fn(win)
    padded = np.pad(np.asarray(y, dtype=np.float64), n_fft // 2, mode="reflect")
    frames = len(y) // hop + 1
    cols = [padded[t * hop:t * hop + n_fft] * window for t in range(frames)]
    return np.fft.rfft(np.stack(cols, axis=1), axis=0)


def batch(length, seeds=(0, 1)):
    ys = [tone(length / SR + 0.01, f0=190.0 + 37 * s, seed=s)[:length] for s in seeds]
    return np.stack(ys)


def wrapped(x):
    return np.abs(np.angle(np.exp(1j * x)))


@pytest.mark.parametrize("length", [4800, 4813, 4839, 7960])
def test_frame_count_and_shapes(length):
    y = torch.from_numpy(batch(length))
    outs = spectral.amp_pha_spectrum(y, N_FFT, HOP, WIN)
    frames = length // HOP + 1
    for out in outs:
        assert out.shape == (2, N_FFT // 2 + 1, frames)
    mel = spectral.mel_spectrogram(y, SR, N_FFT, MELS, HOP, WIN)
    assert mel.shape == (2, MELS, frames)


@pytest.mark.parametrize("length", [4800, 4813])
def test_amp_pha_real_imag_match_numpy(length):
    y = batch(length)
    logamp, pha, real, imag = [t.double().numpy() for t in
                               spectral.amp_pha_spectrum(torch.from_numpy(y), N_FFT, HOP, WIN)]
    for b in range(2):
        ref = numpy_stft(y[b])
        scale = np.abs(ref).max()
        np.testing.assert_allclose(real[b], ref.real, atol=2e-6 * scale, rtol=0)
        np.testing.assert_allclose(imag[b], ref.imag, atol=2e-6 * scale, rtol=0)
        # log(|S| + 1e-5): compare where the log is well conditioned, and |S| + 1e-5 everywhere.
        mag = np.abs(ref)
        np.testing.assert_allclose(np.exp(logamp[b]), mag + 1e-5, atol=2e-6 * scale, rtol=0)
        loud = mag > 1e-3 * scale
        assert loud.mean() > 0.5
        np.testing.assert_allclose(logamp[b][loud], np.log(mag + 1e-5)[loud], atol=1e-4, rtol=0)
        # phase: atan2(Im, Re) in [-pi, pi], equal up to wrapping where the bin is not silent.
        assert np.all(np.abs(pha[b]) <= np.pi + 1e-6)
        ref_phase = np.arctan2(ref.imag, ref.real)
        assert wrapped(pha[b] - ref_phase)[loud].max() < 1e-3


def test_numpy_reference_is_sensitive_to_window_details():
    """The tolerances above would catch a symmetric Hann or an uncentred window."""
    y = batch(4800)[0]
    _, _, real, imag = spectral.amp_pha_spectrum(torch.from_numpy(y)[None], N_FFT, HOP, WIN)
    ours = real[0].double().numpy() + 1j * imag[0].double().numpy()
    scale = np.abs(ours).max()
    for wrong in (numpy_stft(y, window_fn=hann_symmetric), numpy_stft(y, centre_window=False)):
        assert np.abs(ours - wrong).max() > 100 * 2e-6 * scale


def test_silence_log_amplitude_floor():
    logamp, pha, real, imag = spectral.amp_pha_spectrum(torch.zeros(1, 800), N_FFT, HOP, WIN)
    assert torch.allclose(logamp, torch.full_like(logamp, np.log(1e-5)), atol=1e-6)
    assert torch.all(real == 0) and torch.all(imag == 0)
    # atan2 of signed zeros, as in the release: 0 or +-pi, depending on the FFT backend's zeros.
    assert torch.all((pha == 0) | (pha.abs() == torch.pi))


@pytest.mark.parametrize("length", [4800, 7960])
def test_istft_round_trip_exact(length):
    y = torch.from_numpy(batch(length))
    _, _, real, imag = spectral.amp_pha_spectrum(y, N_FFT, HOP, WIN)
    out = spectral.istft(real, imag, N_FFT, HOP, WIN)
    assert out.shape == (2, HOP * (real.shape[-1] - 1)) == (2, length)
    # Edges included: with center=True and a Hann window at hop 40 the overlap-add is exact.
    assert (out - y).abs().max() < 2e-5


def test_istft_round_trip_length_not_whole_hops():
    length = 4837
    y = torch.from_numpy(batch(length))
    _, _, real, imag = spectral.amp_pha_spectrum(y, N_FFT, HOP, WIN)
    out = spectral.istft(real, imag, N_FFT, HOP, WIN)
    assert out.shape == (2, length // HOP * HOP)
    assert (out - y[:, :out.shape[1]]).abs().max() < 2e-5


def test_istft_of_a_changed_spectrum_differs():
    """The round trip test can fail: a perturbed spectrum does not give the input back."""
    y = torch.from_numpy(batch(4800))
    _, _, real, imag = spectral.amp_pha_spectrum(y, N_FFT, HOP, WIN)
    out = spectral.istft(real * 1.01, imag, N_FFT, HOP, WIN)
    assert (out - y).abs().max() > 1e-3


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"))])
@pytest.mark.parametrize("n_fft, win, frames, dtype", [(N_FFT, WIN, 200, torch.float32), (N_FFT, N_FFT, 7, torch.float32),
                                                     (320, 160, 300, torch.float64), (N_FFT, WIN, 2, torch.float32)])
def test_istft_equals_torch_istft_bit_for_bit(n_fft, win, frames, dtype, device):
    """Without torch.istft's device read-back, values and gradients stay exactly torch.istft's."""
    gen = torch.Generator().manual_seed(frames)
    real, imag = (torch.randn(2, n_fft // 2 + 1, frames, generator=gen, dtype=dtype).to(device).requires_grad_()
                  for _ in range(2))
    ours = spectral.istft(real, imag, n_fft, HOP, win)
    theirs = torch.istft(torch.complex(real, imag), n_fft, hop_length=HOP, win_length=win,
                         window=torch.hann_window(win, dtype=dtype, device=device), center=True)
    assert ours.shape == theirs.shape == (2, HOP * (frames - 1)) and torch.equal(ours, theirs)
    # Against torch.istft of the one item: on some CPUs (an Intel Xeon with AMX) torch's own FFT
    # of one item differs from its batched result in the last bit.
    one = torch.istft(torch.complex(real[1], imag[1]), n_fft, hop_length=HOP, win_length=win,
                      window=torch.hann_window(win, dtype=dtype, device=device), center=True)
    assert torch.equal(spectral.istft(real[1], imag[1], n_fft, HOP, win), one)
    weights = torch.randn(ours.shape, generator=gen, dtype=dtype).to(device)
    for a, b in zip(torch.autograd.grad(ours, (real, imag), weights), torch.autograd.grad(theirs, (real, imag), weights)):
        assert torch.equal(a, b) and a.abs().max() > 0


@pytest.mark.parametrize("length", [4800, 4813])
def test_mel_spectrogram_matches_librosa_filterbank(length):
    y = batch(length)
    mel = spectral.mel_spectrogram(torch.from_numpy(y), SR, N_FFT, MELS, HOP, WIN).double().numpy()
    basis = librosa.filters.mel(sr=SR, n_fft=N_FFT, n_mels=MELS).astype(np.float64)  # Slaney, fmax sr/2
    for b in range(2):
        ref = numpy_stft(y[b])
        magnitude = np.sqrt(ref.real ** 2 + ref.imag ** 2 + 1e-9)
        expected = np.log(np.maximum(basis @ magnitude, 1e-5))
        np.testing.assert_allclose(mel[b], expected, atol=1e-4, rtol=0)


def test_mel_is_slaney_not_htk_or_unnormalised():
    y = batch(4800)[:1]
    mel = spectral.mel_spectrogram(torch.from_numpy(y), SR, N_FFT, MELS, HOP, WIN)[0].double().numpy()
    magnitude = np.abs(numpy_stft(y[0]))
    for kwargs in ({"htk": True}, {"norm": None}):
        other = np.log(np.maximum(librosa.filters.mel(sr=SR, n_fft=N_FFT, n_mels=MELS, **kwargs) @ magnitude, 1e-5))
        assert np.abs(mel - other).max() > 0.1


def test_mel_of_silence():
    """sqrt(0 + 1e-9) per bin, then the 1e-5 floor of the log."""
    mel = spectral.mel_spectrogram(torch.zeros(1, 800), SR, N_FFT, MELS, HOP, WIN)[0].double().numpy()
    basis = librosa.filters.mel(sr=SR, n_fft=N_FFT, n_mels=MELS).astype(np.float64)
    expected = np.log(np.maximum(basis.sum(axis=1) * np.sqrt(1e-9), 1e-5))
    np.testing.assert_allclose(mel, np.repeat(expected[:, None], mel.shape[1], axis=1), atol=1e-5)


def test_float64_input_matches_numpy_tightly():
    """In double precision the only differences left are rounding: any window or padding slip shows."""
    y = batch(4813)
    logamp, pha, real, imag = spectral.amp_pha_spectrum(torch.from_numpy(y).double(), N_FFT, HOP, WIN)
    assert real.dtype == torch.float64
    for b in range(2):
        ref = numpy_stft(y[b])
        scale = np.abs(ref).max()
        np.testing.assert_allclose(real[b].numpy(), ref.real, atol=1e-12 * scale, rtol=0)
        np.testing.assert_allclose(imag[b].numpy(), ref.imag, atol=1e-12 * scale, rtol=0)
        np.testing.assert_allclose(logamp[b].numpy(), np.log(np.abs(ref) + 1e-5), atol=1e-8, rtol=0)
    out = spectral.istft(real, imag, N_FFT, HOP, WIN)
    assert out.dtype == torch.float64
    assert (out - torch.from_numpy(y[:, :out.shape[1]]).double()).abs().max() < 1e-12


def test_anti_wrapping_identity_inside_pi():
    x = torch.linspace(-3.1, 3.1, 101, dtype=torch.float64)
    assert torch.allclose(spectral.anti_wrapping(x), x.abs(), atol=1e-12)


def test_anti_wrapping_is_2pi_periodic():
    x = torch.linspace(-10.0, 10.0, 257, dtype=torch.float64)
    base = spectral.anti_wrapping(x)
    for k in (-3, -1, 1, 2, 5):
        assert torch.allclose(spectral.anti_wrapping(x + k * TWO_PI), base, atol=1e-9)
    assert torch.all(base <= math.pi + 1e-12) and torch.all(base >= 0)


def test_anti_wrapping_hand_values():
    x = torch.tensor([4.0, -4.0, 7.0, TWO_PI, -0.25, 10.0], dtype=torch.float64)
    expected = torch.tensor([TWO_PI - 4.0, TWO_PI - 4.0, 7.0 - TWO_PI, 0.0, 0.25, 2 * TWO_PI - 10.0],
                            dtype=torch.float64)
    assert torch.allclose(spectral.anti_wrapping(x), expected, atol=1e-12)


def test_backward_difference_by_hand():
    x = torch.tensor([[1.0, 4.0, 9.0], [2.0, 3.0, 5.0]])
    assert torch.equal(spectral.backward_difference(x, 1), torch.tensor([[-1.0, -3.0, -5.0], [-2.0, -1.0, -2.0]]))
    assert torch.equal(spectral.backward_difference(x, 0), torch.tensor([[-1.0, -4.0, -9.0], [-1.0, 1.0, 4.0]]))
    x3 = torch.arange(12.0).reshape(1, 3, 4) ** 2  # rows [0,1,4,9], [16,25,36,49], [64,81,100,121]
    assert torch.equal(spectral.backward_difference(x3, 2),
                       torch.tensor([[[0.0, -1.0, -3.0, -5.0], [-16.0, -9.0, -11.0, -13.0],
                                      [-64.0, -17.0, -19.0, -21.0]]]))
    assert torch.equal(spectral.backward_difference(x3, 1),
                       torch.tensor([[[0.0, -1.0, -4.0, -9.0], [-16.0, -24.0, -32.0, -40.0],
                                      [-48.0, -56.0, -64.0, -72.0]]]))


@pytest.mark.parametrize("win_size", [1024, 800])
def test_frames_first_stft_equals_stft_in_any_chunks(win_size):
    """stft_rows over chunks of frames gives stft's columns, transposed; OverlapAdd fed the
    same chunks (in any order) gives istft of a (different) spectrum."""
    y = torch.from_numpy(tone(0.3))[:14400]
    reference = spectral.stft(y[None], 1024, 40, win_size)[0]
    padded = spectral.centred(y, 1024)
    frames = reference.size(1)
    chunks = [(0, 7), (7, 100), (107, frames - 107)]
    rows = torch.cat([spectral.stft_rows(padded, s, n, 1024, 40, win_size) for s, n in chunks])
    assert rows.shape == (frames, 513)
    assert (rows - reference.t()).abs().max() < 1e-4 * reference.abs().max()
    spec = reference * torch.exp(1j * torch.linspace(0, 3, frames))      # not an STFT of any signal
    expected = spectral.istft(spec.real[None], spec.imag[None], 1024, 40, win_size)[0]
    synthesis = spectral.OverlapAdd(frames, 1024, 40, win_size, y.device)
    for s, n in reversed(chunks):
        synthesis.add(s, spec.t()[s:s + n])
    audio = synthesis.audio()
    assert audio.shape == expected.shape == (40 * (frames - 1),)
    assert (audio - expected).abs().max() < 1e-5


def test_log_amplitude_and_phase_by_hand():
    logamp, phase = spectral.log_amplitude_and_phase(torch.tensor([3.0, 0.0, -1.0]), torch.tensor([4.0, 0.0, 0.0]))
    assert torch.allclose(logamp, torch.log(torch.tensor([5.0, 0.0, 1.0]) + 1e-5))
    assert torch.allclose(phase, torch.tensor([math.atan2(4, 3), 0.0, math.pi]))


def test_empty_mel_bands_counts_the_filters_that_cover_no_bin():
    """Counted against the filters' own rows; at n_fft 1024 and 48 kHz the release's 80 bands all
    cover a bin, and more bands leave more of the narrow low ones empty."""
    assert spectral.empty_mel_bands(48000, 1024, 80) == 0
    basis = librosa.filters.mel(sr=48000, n_fft=1024, n_mels=200)
    assert spectral.empty_mel_bands(48000, 1024, 200) == int((basis.sum(axis=1) == 0).sum()) > 0
    assert spectral.empty_mel_bands(48000, 1024, 1000) > spectral.empty_mel_bands(48000, 1024, 200)


@pytest.mark.parametrize("n_fft, hop", [(1024, 40), (64, 16), (320, 40)])
def test_analysis_frames_counts_the_stft_frames_of_the_padded_clip(n_fft, hop):
    for length in list(range(1, 400, 3)) + [4321]:
        padded = spectral.pad_for_analysis(torch.zeros(1, length), n_fft, hop)
        frames = spectral.stft(padded, n_fft, hop, n_fft).size(-1)
        assert spectral.analysis_frames(length, n_fft, hop) == frames, length
