"""STFT analysis and synthesis: the one place where audio becomes spectra and back.

Dataset, losses, validation, evaluation and inference all call these functions, so the
same audio always gives the same numbers (SPEC §1).
"""
from functools import lru_cache
from typing import Optional, Tuple

import librosa
import torch


@lru_cache(maxsize=None)
def _hann(win_size: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return torch.hann_window(win_size, device=device, dtype=dtype)


@lru_cache(maxsize=None)
def _mel_basis(sampling_rate: int, n_fft: int, num_mels: int, fmin: float,
               fmax: Optional[float], device: torch.device) -> torch.Tensor:
    mel = librosa.filters.mel(sr=sampling_rate, n_fft=n_fft, n_mels=num_mels, fmin=fmin, fmax=fmax)
    return torch.from_numpy(mel).float().to(device)


def stft(y: torch.Tensor, n_fft: int, hop_size: int, win_size: int) -> torch.Tensor:
    """Centred, reflect-padded STFT with a periodic Hann window of `win_size`.

    y: (B, L) -> complex (B, n_fft // 2 + 1, L // hop_size + 1)
    """
    return torch.stft(y, n_fft, hop_length=hop_size, win_length=win_size,
                      window=_hann(win_size, y.device, y.dtype), center=True, pad_mode="reflect",
                      return_complex=True)


def istft(real: torch.Tensor, imag: torch.Tensor, n_fft: int, hop_size: int,
          win_size: int) -> torch.Tensor:
    """Inverse of `stft`. real, imag: (B, F, T) -> (B, hop_size * (T - 1))."""
    spec = torch.complex(real, imag)
    return torch.istft(spec, n_fft, hop_length=hop_size, win_length=win_size,
                       window=_hann(win_size, real.device, real.dtype), center=True)


def amp_pha_spectrum(y: torch.Tensor, n_fft: int, hop_size: int, win_size: int
                     ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log amplitude, phase, real and imaginary part, each (B, F, T), of y: (B, L)."""
    spec = stft(y, n_fft, hop_size, win_size)
    real, imag = spec.real, spec.imag
    # log(|S| + 1e-5) with |S| from real/imag, as the release computes it.
    log_amplitude = torch.log(torch.sqrt(real.pow(2) + imag.pow(2)) + 1e-5)
    phase = torch.atan2(imag, real)
    return log_amplitude, phase, real, imag


def mel_spectrogram(y: torch.Tensor, sampling_rate: int, n_fft: int, num_mels: int,
                    hop_size: int, win_size: int, fmin: float = 0.0,
                    fmax: Optional[float] = None) -> torch.Tensor:
    """Log Slaney mel spectrogram used by the mel losses. y: (B, L) -> (B, num_mels, T)."""
    spec = stft(y, n_fft, hop_size, win_size)
    # The 1e-9 keeps the sqrt differentiable at exact zeros.
    magnitude = torch.sqrt(spec.real.pow(2) + spec.imag.pow(2) + 1e-9)
    basis = _mel_basis(sampling_rate, n_fft, num_mels, fmin, fmax, y.device).to(magnitude.dtype)
    mel = torch.matmul(basis, magnitude)
    return torch.log(torch.clamp(mel, min=1e-5))
