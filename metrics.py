"""Objective codec metrics: LSD, anti-wrapped phase distances, SNR, mel distance, STFT consistency.

Training validation and evaluate.py both call these functions, so training curves and
final evaluation report the same numbers. Audio is (L,) or batched (B, L); every metric
returns one value per item: a 0-d tensor for (L,), (B,) for (B, L).
"""
import math
import sys
from typing import Callable, Dict

import librosa
import numpy as np
import torch

from config import AttrDict
from spectral import anti_wrapping, backward_difference, istft, mel_spectrogram, pad_short, stft

# The metric STFT of the group's published evaluations, fixed so that numbers compare
# across configs and papers.
METRIC_N_FFT = 2048
METRIC_HOP_SIZE = 512
METRIC_WIN_SIZE = 2048
# Power floor of LSD: bins quieter than this count as equal.
POWER_FLOOR = 1e-8

VISQOL_RATE = 48000  # ViSQOL's audio mode is defined at 48 kHz
PESQ_RATE = 16000    # PESQ-WB is defined at 16 kHz

# Whether a larger value is better, per metric name (evaluate.py's report marks it).
HIGHER_IS_BETTER = {
    "LSD": False, "AWPD_IP": False, "AWPD_GD": False, "AWPD_IAF": False, "SNR": True,
    "MelDistance": False, "STFT_consistency": False, "ViSQOL": True, "PESQ": True, "STOI": True,
}


def metric_stft(y: torch.Tensor) -> torch.Tensor:
    """The STFT every spectral metric uses. y: (L,) or (B, L) -> complex (..., 1025, L' // 512 + 1).

    Clips of up to n_fft / 2 = 1024 samples are zero-padded to L' = 1025 first (`pad_short`).
    """
    return stft(pad_short(y.float(), METRIC_N_FFT), METRIC_N_FFT, METRIC_HOP_SIZE, METRIC_WIN_SIZE)


def log_power(spec: torch.Tensor) -> torch.Tensor:
    """log10(max(|S|^2, 1e-8)), no factor 10. spec: complex (..., F, T) -> (..., F, T)."""
    return torch.log10(torch.clamp(spec.real ** 2 + spec.imag ** 2, min=POWER_FLOOR))


def _rms_then_mean(x: torch.Tensor, rms_dim: int) -> torch.Tensor:
    """Root mean square of x (..., F, T) along rms_dim, then the mean along the other axis."""
    return torch.sqrt(torch.mean(x ** 2, dim=rms_dim)).mean(dim=-1)


def lsd_from_spectra(spec_ref: torch.Tensor, spec_deg: torch.Tensor) -> torch.Tensor:
    """LSD of two metric spectra (..., F, T) -> (...)."""
    return _rms_then_mean(log_power(spec_ref) - log_power(spec_deg), rms_dim=-2)


def awpd_from_spectra(spec_ref: torch.Tensor, spec_deg: torch.Tensor) -> Dict[str, torch.Tensor]:
    """AWPD_IP, AWPD_GD, AWPD_IAF of two metric spectra (..., F, T), each (...)."""
    pha_ref, pha_deg = torch.angle(spec_ref), torch.angle(spec_deg)
    # The same backward difference as the training loss: the first bin / frame against 0.
    gd_error = backward_difference(pha_ref, -2) - backward_difference(pha_deg, -2)
    iaf_error = backward_difference(pha_ref, -1) - backward_difference(pha_deg, -1)
    return {
        "AWPD_IP": _rms_then_mean(anti_wrapping(pha_ref - pha_deg), rms_dim=-2),
        "AWPD_GD": _rms_then_mean(anti_wrapping(gd_error), rms_dim=-1),
        "AWPD_IAF": _rms_then_mean(anti_wrapping(iaf_error), rms_dim=-2),
    }


def lsd(ref: torch.Tensor, deg: torch.Tensor) -> torch.Tensor:
    """Log-spectral distance. ref, deg: (L,) or (B, L) -> () or (B,)."""
    return lsd_from_spectra(metric_stft(ref), metric_stft(deg))


def awpd(ref: torch.Tensor, deg: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Anti-wrapped phase distances. ref, deg: (L,) or (B, L) -> each () or (B,)."""
    return awpd_from_spectra(metric_stft(ref), metric_stft(deg))


def snr(ref: torch.Tensor, deg: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio in dB. ref, deg: (L,) or (B, L) -> () or (B,).

    NaN (undefined) for a silent reference, whose ratio would only measure the decoded noise.
    """
    ref, deg = ref.double(), deg.double()
    signal = ref.pow(2).sum(-1)
    value = 10 * torch.log10(signal / (ref - deg).pow(2).sum(-1))
    return torch.where(signal > 0, value, torch.full_like(value, math.nan))


def mel_distance(ref: torch.Tensor, deg: torch.Tensor, h: AttrDict) -> torch.Tensor:
    """Mean L1 distance of the training loss's log-mel spectra. ref, deg: (L,) or (B, L) -> () or (B,).

    Clips of up to n_fft / 2 samples are zero-padded first, as in `metric_stft`.
    """
    def mel(y: torch.Tensor) -> torch.Tensor:
        return mel_spectrogram(pad_short(y.float(), h.n_fft), h.sampling_rate, h.n_fft, h.num_mels_for_loss, h.hop_size, h.win_size)
    return torch.abs(mel(ref) - mel(deg)).mean(dim=(-2, -1))


def stft_consistency(real: torch.Tensor, imag: torch.Tensor, h: AttrDict) -> torch.Tensor:
    """mean |S - STFT(iSTFT(S))|^2 of a predicted spectrum, training STFT settings.

    real, imag: (F, T) or (B, F, T) -> () or (B,).
    """
    resynthesised = stft(istft(real, imag, h.n_fft, h.hop_size, h.win_size), h.n_fft, h.hop_size, h.win_size)
    return torch.abs(torch.complex(real, imag) - resynthesised).pow(2).mean(dim=(-2, -1))


@torch.no_grad()
def compute_metrics(ref: torch.Tensor, deg: torch.Tensor, h: AttrDict) -> Dict[str, float]:
    """LSD, AWPD_*, SNR and MelDistance of ref vs deg (L,) or (B, L), averaged over the batch."""
    spec_ref, spec_deg = metric_stft(ref), metric_stft(deg)
    values = {"LSD": lsd_from_spectra(spec_ref, spec_deg)}
    values.update(awpd_from_spectra(spec_ref, spec_deg))
    values["SNR"] = snr(ref, deg)
    values["MelDistance"] = mel_distance(ref, deg, h)
    return {name: value.mean().item() for name, value in values.items()}


# Optional perceptual metrics on numpy audio (L,) at `sampling_rate`.
ScoreFn = Callable[[np.ndarray, np.ndarray, int], float]


def _resample(y: np.ndarray, sampling_rate: int, target: int) -> np.ndarray:
    return y if sampling_rate == target else librosa.resample(y, orig_sr=sampling_rate, target_sr=target)


def _visqol() -> ScoreFn:
    from visqol import VisqolApi
    api = VisqolApi()
    api.create(mode="audio")

    def score(ref: np.ndarray, deg: np.ndarray, sampling_rate: int) -> float:
        ref, deg = (_resample(y, sampling_rate, VISQOL_RATE).astype(np.float64) for y in (ref, deg))
        return float(api.measure_from_arrays(ref, deg, sample_rate=VISQOL_RATE).moslqo)
    return score


def _pesq() -> ScoreFn:
    from pesq import pesq

    def score(ref: np.ndarray, deg: np.ndarray, sampling_rate: int) -> float:
        return float(pesq(PESQ_RATE, _resample(ref, sampling_rate, PESQ_RATE),
                          _resample(deg, sampling_rate, PESQ_RATE), "wb"))
    return score


def _stoi() -> ScoreFn:
    from pystoi import stoi

    def score(ref: np.ndarray, deg: np.ndarray, sampling_rate: int) -> float:
        return float(stoi(ref, deg, sampling_rate))
    return score


# name -> (PyPI package, loader, speech only)
OPTIONAL_METRICS = {
    "ViSQOL": ("visqol-python", _visqol, False),
    "PESQ": ("pesq", _pesq, True),
    "STOI": ("pystoi", _stoi, True),
}


def optional_metrics(speech: bool) -> Dict[str, ScoreFn]:
    """The optional metrics whose packages import; one printed line for each one skipped.

    PESQ and STOI are speech measures, so they are loaded only when `speech` is set.
    """
    loaded = {}
    for name, (package, loader, speech_only) in OPTIONAL_METRICS.items():
        if speech_only and not speech:
            continue
        try:
            loaded[name] = loader()
        except ImportError:
            print(f"{name} skipped: package {package} not installed", file=sys.stderr)
    return loaded

