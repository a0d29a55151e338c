"""STFT analysis and synthesis and phase arithmetic: the one place where audio becomes spectra and back.

Dataset, losses, validation, evaluation and inference all call these functions, so the
same audio always gives the same numbers.
"""
import math
from functools import lru_cache
from typing import Optional, Tuple

import librosa
import torch
import torch.nn.functional as F


@lru_cache(maxsize=None)
def _hann(win_size: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return torch.hann_window(win_size, device=device, dtype=dtype)


@lru_cache(maxsize=None)
def _mel_basis(sampling_rate: int, n_fft: int, num_mels: int, fmin: float,
               fmax: Optional[float], device: torch.device) -> torch.Tensor:
    mel = librosa.filters.mel(sr=sampling_rate, n_fft=n_fft, n_mels=num_mels, fmin=fmin, fmax=fmax)
    return torch.from_numpy(mel).float().to(device)


# How `stft` pads the signal's ends by n_fft // 2: mirrored (the release), with zeros (the
# causal codec: the past before the signal is silence and nothing after the signal is
# reflected back into it), or not at all (the caller brings the padding, as a stream does).
PADDINGS = {"reflect": (True, "reflect"), "zeros": (True, "constant"), "none": (False, "constant")}


def stft(y: torch.Tensor, n_fft: int, hop_size: int, win_size: int, pad: str = "reflect") -> torch.Tensor:
    """STFT with a periodic Hann window of `win_size`; frame t is centred on sample t * hop_size.

    y: (B, L) -> complex (B, n_fft // 2 + 1, L // hop_size + 1), or
    (B, n_fft // 2 + 1, (L - n_fft) // hop_size + 1) with pad "none".
    """
    center, pad_mode = PADDINGS[pad]
    return torch.stft(y, n_fft, hop_length=hop_size, win_length=win_size,
                      window=_hann(win_size, y.device, y.dtype), center=center, pad_mode=pad_mode,
                      return_complex=True)


def istft(real: torch.Tensor, imag: torch.Tensor, n_fft: int, hop_size: int,
          win_size: int) -> torch.Tensor:
    """Inverse of `stft`. real, imag: (B, F, T) -> (B, hop_size * (T - 1))."""
    spec = torch.complex(real, imag)
    return torch.istft(spec, n_fft, hop_length=hop_size, win_length=win_size,
                       window=_hann(win_size, real.device, real.dtype), center=True)


def amp_pha_spectrum(y: torch.Tensor, n_fft: int, hop_size: int, win_size: int, pad: str = "reflect"
                     ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log amplitude, phase, real and imaginary part, each (B, F, T), of y: (B, L); `pad` as in `stft`."""
    spec = stft(y, n_fft, hop_size, win_size, pad)
    real, imag = spec.real, spec.imag
    # log(|S| + 1e-5) with |S| from real/imag, as the release computes it.
    log_amplitude = torch.log(torch.sqrt(real.pow(2) + imag.pow(2)) + 1e-5)
    # atan2 as the release uses it, also for exactly silent bins: there the phase is 0 or
    # +-pi depending on the signs of the FFT's zeros, which differ between backends and
    # versions. Such bins carry no energy, and the anti-wrapped losses see +-pi as one value.
    phase = torch.atan2(imag, real)
    return log_amplitude, phase, real, imag


def mel_spectrogram(y: torch.Tensor, sampling_rate: int, n_fft: int, num_mels: int,
                    hop_size: int, win_size: int, fmin: float = 0.0,
                    fmax: Optional[float] = None) -> torch.Tensor:
    """Log Slaney mel spectrogram used by the mel losses. y: (B, L) -> (B, num_mels, T)."""
    spec = stft(y, n_fft, hop_size, win_size)
    return mel_from_spectrum(spec.real, spec.imag, sampling_rate, n_fft, num_mels, fmin, fmax)


def mel_from_spectrum(real: torch.Tensor, imag: torch.Tensor, sampling_rate: int, n_fft: int, num_mels: int,
                      fmin: float = 0.0, fmax: Optional[float] = None) -> torch.Tensor:
    """`mel_spectrogram` from an STFT already computed (real, imag: (B, F, T)) -> (B, num_mels, T).

    Training takes the mel and the other features from one STFT instead of two.
    """
    # The 1e-9 keeps the sqrt differentiable at exact zeros.
    magnitude = torch.sqrt(real.pow(2) + imag.pow(2) + 1e-9)
    basis = _mel_basis(sampling_rate, n_fft, num_mels, fmin, fmax, real.device).to(magnitude.dtype)
    mel = torch.matmul(basis, magnitude)
    return torch.log(torch.clamp(mel, min=1e-5))


def pad_short(y: torch.Tensor, n_fft: int) -> torch.Tensor:
    """Zero-pad (..., L) at the end to n_fft // 2 + 1 samples when shorter; the reflect padding
    of a centred STFT needs more than n_fft / 2. Longer signals are returned as they are."""
    return F.pad(y, (0, max(0, n_fft // 2 + 1 - y.size(-1))))


def min_analysis_length(n_fft: int, hop_size: int) -> int:
    """Shortest length, in whole hops, that the reflect-padded STFT accepts (more than n_fft / 2)."""
    return (n_fft // 2 // hop_size + 1) * hop_size


def pad_for_analysis(audio: torch.Tensor, n_fft: int, hop_size: int) -> torch.Tensor:
    """Zero-pad (..., L) at the end to whole hops, and to `min_analysis_length` for very short clips.

    Clips of at least n_fft / 2 samples get at most hop_size - 1 zeros; the codec's output
    is trimmed back to L.
    """
    length = audio.size(-1)
    target = max(-(-length // hop_size) * hop_size, min_analysis_length(n_fft, hop_size))
    return F.pad(audio, (0, target - length))


def anti_wrapping(x: torch.Tensor) -> torch.Tensor:
    """|x - 2 pi round(x / 2 pi)|: the distance of a phase error to the nearest multiple of 2 pi."""
    return torch.abs(x - torch.round(x / (2 * math.pi)) * 2 * math.pi)


def backward_difference(x: torch.Tensor, dim: int) -> torch.Tensor:
    """x[k-1] - x[k] along `dim`, with x[-1] taken as 0 (the release's matrix formulation, in O(n))."""
    previous = torch.cat([torch.zeros_like(x.narrow(dim, 0, 1)), x.narrow(dim, 0, x.size(dim) - 1)], dim)
    return previous - x
