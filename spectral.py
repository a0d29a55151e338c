"""STFT analysis and synthesis and phase arithmetic: the one place where audio becomes spectra and back.

Dataset, losses, validation, evaluation and inference all call these functions, so the
same audio always gives the same numbers.
"""
import math
import warnings
from functools import lru_cache
from typing import Tuple

import librosa
import numpy as np
import torch
import torch.nn.functional as F


@lru_cache(maxsize=None)
def _hann(win_size: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return torch.hann_window(win_size, device=device, dtype=dtype)


@lru_cache(maxsize=None)
def _rectangular(win_size: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    # What torch.stft's window=None means, without its warning.
    return torch.ones(win_size, device=device, dtype=dtype)


@lru_cache(maxsize=None)
def _mel_filters(sampling_rate: int, n_fft: int, num_mels: int) -> np.ndarray:
    """Slaney mel filters from 0 Hz to the Nyquist rate, (num_mels, n_fft // 2 + 1)."""
    with warnings.catch_warnings():
        # librosa warns of empty filters; `empty_mel_bands` lets the config check name them instead.
        warnings.filterwarnings("ignore", "Empty filters detected", UserWarning)
        return librosa.filters.mel(sr=sampling_rate, n_fft=n_fft, n_mels=num_mels)


@lru_cache(maxsize=None)
def _mel_basis(sampling_rate: int, n_fft: int, num_mels: int, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(_mel_filters(sampling_rate, n_fft, num_mels)).float().to(device)


def empty_mel_bands(sampling_rate: int, n_fft: int, num_mels: int) -> int:
    """How many mel filters cover no frequency bin: the low bands are narrower than a bin when
    num_mels is large for n_fft."""
    return int((_mel_filters(sampling_rate, n_fft, num_mels).max(axis=1) == 0).sum())


@lru_cache(maxsize=None)
def _frame_window(n_fft: int, win_size: int, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The Hann window centred in an n_fft frame, as torch.stft and torch.istft place it."""
    left = (n_fft - win_size) // 2
    return F.pad(_hann(win_size, device, dtype), (left, n_fft - win_size - left))


# How `stft` pads the signal's ends by n_fft // 2: mirrored (the release), with zeros (the
# causal codec: the past before the signal is silence and nothing after the signal is
# reflected back into it), or not at all (the caller brings the padding, as a stream does).
PADDINGS = {"reflect": (True, "reflect"), "zeros": (True, "constant"), "none": (False, "constant")}
WINDOWS = {"hann": _hann, "rectangular": _rectangular}


def stft(y: torch.Tensor, n_fft: int, hop_size: int, win_size: int, pad: str = "reflect",
         window: str = "hann") -> torch.Tensor:
    """STFT with a periodic Hann window of `win_size` (or a "rectangular" one, the resolution
    discriminator's), centred in the n_fft frame; frame t is centred on sample t * hop_size.

    y: (B, L) -> complex (B, n_fft // 2 + 1, L // hop_size + 1), or
    (B, n_fft // 2 + 1, (L - n_fft) // hop_size + 1) with pad "none".
    """
    center, pad_mode = PADDINGS[pad]
    return torch.stft(y, n_fft, hop_length=hop_size, win_length=win_size,
                      window=WINDOWS[window](win_size, y.device, y.dtype), center=center, pad_mode=pad_mode,
                      return_complex=True)


def istft(real: torch.Tensor, imag: torch.Tensor, n_fft: int, hop_size: int,
          win_size: int) -> torch.Tensor:
    """Inverse of `stft`. real, imag: (B, F, T) -> (B, hop_size * (T - 1)), or (F, T) -> (hop_size * (T - 1),).

    torch.istft's own steps with its own operations, so values and gradients equal it bit for
    bit, less its per-call check that the windows' overlap-add is nonzero: that check reads a
    value back from the device, a wait for the GPU in every training step and no CUDA graph.
    The config requires hop_size < win_size instead, which makes the Hann windows overlap.
    """
    if real.dim() == 2:
        return istft(real[None], imag[None], n_fft, hop_size, win_size)[0]
    count = real.size(-1)
    window = _frame_window(n_fft, win_size, real.device, real.dtype)
    frames = torch.fft.irfft(torch.complex(real, imag).transpose(1, 2), n_fft, dim=-1) * window
    signal = overlap_add(frames.transpose(1, 2), hop_size)
    envelope = window_envelope(count, n_fft, win_size, hop_size, real.device, real.dtype)
    trim = slice(n_fft // 2, n_fft // 2 + hop_size * (count - 1))
    return signal[:, trim] / envelope[trim]


def amp_pha_spectrum(y: torch.Tensor, n_fft: int, hop_size: int, win_size: int, pad: str = "reflect"
                     ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log amplitude, phase, real and imaginary part, each (B, F, T), of y: (B, L); `pad` as in `stft`."""
    spec = stft(y, n_fft, hop_size, win_size, pad)
    real, imag = spec.real, spec.imag
    return (*log_amplitude_and_phase(real, imag), real, imag)


def log_amplitude_and_phase(real: torch.Tensor, imag: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """The encoder's inputs from a spectrum's parts, any shape: log(|S| + 1e-5) and atan2(imag, real)."""
    # |S| from real/imag, as the release computes it.
    log_amplitude = torch.log(torch.sqrt(real.pow(2) + imag.pow(2)) + 1e-5)
    # atan2 as the release uses it, also for exactly silent bins: there the phase is 0 or
    # +-pi depending on the signs of the FFT's zeros, which differ between backends and
    # versions. Such bins carry no energy, and the anti-wrapped losses see +-pi as one value.
    return log_amplitude, torch.atan2(imag, real)


# Frames-first STFT for inference: `stft` and `istft` of one signal computed a few frames at
# a time, so that memory and cache traffic stay bounded however long the signal. Equal to
# them up to float rounding.

def centred(y: torch.Tensor, n_fft: int) -> torch.Tensor:
    """One signal y (L,), L > n_fft / 2, reflect-padded by n_fft // 2 at both ends as `stft` pads it."""
    return F.pad(y[None, None], (n_fft // 2, n_fft // 2), mode="reflect")[0, 0]


def stft_rows(padded: torch.Tensor, start: int, count: int, n_fft: int, hop_size: int,
              win_size: int) -> torch.Tensor:
    """Frames start ... start + count - 1 of the STFT of a `centred` signal: complex (count, F),
    the transpose of those columns of `stft`."""
    frames = padded[start * hop_size:(start + count - 1) * hop_size + n_fft].unfold(0, n_fft, hop_size)
    return torch.fft.rfft(frames * _frame_window(n_fft, win_size, padded.device), dim=-1)


def overlap_add(frames: torch.Tensor, hop_size: int) -> torch.Tensor:
    """Frames as columns (B, size, count) -> their overlap-add (B, size + hop_size * (count - 1)),
    frame k starting at sample k * hop_size. unfold_backward is the overlap-add torch.istft
    uses, so `istft` equals it bit for bit (F.fold sums in another order)."""
    batch, size, count = frames.shape
    return torch.ops.aten.unfold_backward(frames.transpose(1, 2), [batch, size + hop_size * (count - 1)], 1, size,
                                          hop_size)


@lru_cache(maxsize=16)
def window_envelope(count: int, n_fft: int, win_size: int, hop_size: int, device: torch.device,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The overlap-add of `count` squared frame windows, (n_fft + hop_size * (count - 1),): the
    same for every chunk of that many frames, so computed once (callers must not change it)."""
    squared = _frame_window(n_fft, win_size, device, dtype).square()
    return overlap_add(squared[None, :, None].expand(1, -1, count), hop_size)[0]


class OverlapAdd:
    """`istft` of one spectrum fed a few frames at a time, frames first: `add(start, rows)` with
    rows complex (count, F) for frames start ..., then `audio()` gives (hop_size * (T - 1),)."""

    def __init__(self, frames: int, n_fft: int, hop_size: int, win_size: int, device: torch.device):
        self.n_fft, self.hop_size, self.win_size = n_fft, hop_size, win_size
        self.window = _frame_window(n_fft, win_size, device)
        self.frames = frames
        self.signal = torch.zeros(n_fft + hop_size * (frames - 1), device=device)
        self.envelope = torch.zeros_like(self.signal)

    def add(self, start: int, rows: torch.Tensor) -> None:
        frames = torch.fft.irfft(rows, n=self.n_fft, dim=-1) * self.window
        at = start * self.hop_size
        span = slice(at, at + self.n_fft + self.hop_size * (rows.size(0) - 1))
        self.signal[span] += overlap_add(frames.t()[None], self.hop_size)[0]
        self.envelope[span] += window_envelope(rows.size(0), self.n_fft, self.win_size, self.hop_size,
                                               self.window.device)

    def audio(self) -> torch.Tensor:
        inside = slice(self.n_fft // 2, self.n_fft // 2 + self.hop_size * (self.frames - 1))
        return self.signal[inside] / self.envelope[inside]


def mel_spectrogram(y: torch.Tensor, sampling_rate: int, n_fft: int, num_mels: int,
                    hop_size: int, win_size: int) -> torch.Tensor:
    """Log Slaney mel spectrogram used by the mel losses. y: (B, L) -> (B, num_mels, T)."""
    spec = stft(y, n_fft, hop_size, win_size)
    return mel_from_spectrum(spec.real, spec.imag, sampling_rate, n_fft, num_mels)


def mel_from_spectrum(real: torch.Tensor, imag: torch.Tensor, sampling_rate: int, n_fft: int, num_mels: int
                      ) -> torch.Tensor:
    """`mel_spectrogram` from an STFT already computed (real, imag: (B, F, T)) -> (B, num_mels, T).

    Training takes the mel and the other features from one STFT instead of two.
    """
    # The 1e-9 keeps the sqrt differentiable at exact zeros.
    magnitude = torch.sqrt(real.pow(2) + imag.pow(2) + 1e-9)
    basis = _mel_basis(sampling_rate, n_fft, num_mels, real.device).to(magnitude.dtype)
    mel = torch.matmul(basis, magnitude)
    return torch.log(torch.clamp(mel, min=1e-5))


def pad_short(y: torch.Tensor, n_fft: int) -> torch.Tensor:
    """Zero-pad (..., L) at the end to n_fft // 2 + 1 samples when shorter; the reflect padding
    of a centred STFT needs more than n_fft / 2. Longer signals are returned as they are."""
    return F.pad(y, (0, max(0, n_fft // 2 + 1 - y.size(-1))))


def min_analysis_length(n_fft: int, hop_size: int) -> int:
    """Shortest length, in whole hops, that the reflect-padded STFT accepts (more than n_fft / 2)."""
    return (n_fft // 2 // hop_size + 1) * hop_size


def analysis_length(length: int, n_fft: int, hop_size: int) -> int:
    """The length `pad_for_analysis` pads `length` samples to."""
    return max(-(-length // hop_size) * hop_size, min_analysis_length(n_fft, hop_size))


def analysis_frames(length: int, n_fft: int, hop_size: int) -> int:
    """Frames T of `stft` of `length` samples once `pad_for_analysis` has padded them."""
    return analysis_length(length, n_fft, hop_size) // hop_size + 1


def pad_for_analysis(audio: torch.Tensor, n_fft: int, hop_size: int) -> torch.Tensor:
    """Zero-pad (..., L) at the end to whole hops, and to `min_analysis_length` for very short clips.

    Clips of more than n_fft / 2 samples get at most hop_size - 1 zeros; the codec's output
    is trimmed back to L.
    """
    length = audio.size(-1)
    return F.pad(audio, (0, analysis_length(length, n_fft, hop_size) - length))


def anti_wrapping(x: torch.Tensor) -> torch.Tensor:
    """|x - 2 pi round(x / 2 pi)|: the distance of a phase error to the nearest multiple of 2 pi."""
    return torch.abs(x - torch.round(x / (2 * math.pi)) * 2 * math.pi)


def backward_difference(x: torch.Tensor, dim: int) -> torch.Tensor:
    """x[k-1] - x[k] along `dim`, with x[-1] taken as 0 (the release's matrix formulation, in O(n))."""
    previous = torch.cat([torch.zeros_like(x.narrow(dim, 0, 1)), x.narrow(dim, 0, x.size(dim) - 1)], dim)
    return previous - x
