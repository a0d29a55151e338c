"""APCodec-S streaming: the causal codec fed audio in chunks of any size, exactly as offline.

Timing (every number follows from the config): STFT frame t is centred on sample t * hop
and its Hann window weights samples t * hop - a ... t * hop + b - 1 (`window_extent`).
Latent frame n summarises STFT frames ratio * n ... ratio * n + ratio - 1, and the decoder
turns it back into the same frames. Output sample p is final once every frame whose window
covers it is decoded, so it needs input up to sample p + `latency_samples(h)`:
(ratio - 1) * hop + win_size - 1, 599 samples (12.5 ms) at the paper's 48 kHz settings.

`StreamingEncoder` (audio -> codes) and `StreamingDecoder` (codes -> audio) keep only what
the causal layers need between chunks: the last input frames of each convolution (see
models.begin_stream), the samples of the STFT frames not yet complete, the STFT frames of
an unfinished latent frame and the overlap-add tail. `causal_roundtrip` is the offline
pass they reproduce: the same codes, and the same audio up to float rounding.
"""
import copy
import itertools
from typing import Dict, Iterable, Iterator, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F

from models import Decoder, Encoder, begin_stream
from spectral import amp_pha_spectrum


def window_extent(h) -> Tuple[int, int]:
    """(a, b): a frame centred on sample c weights samples c - a ... c + b - 1.

    torch centres the win_size window inside the n_fft frame, which starts n_fft // 2
    samples before the centre.
    """
    offset = (h.n_fft - h.win_size) // 2
    return h.n_fft // 2 - offset, offset + h.win_size - h.n_fft // 2


def latency_samples(h) -> int:
    """Algorithmic latency: output sample p needs input samples up to p + this.

    The first output sample of a latent frame's span waits for the rest of that latent
    frame ((ratio - 1) hops) and for the window of its last STFT frame (a + b - 1 samples).
    """
    a, b = window_extent(h)
    return (h.ratio - 1) * h.hop_size + a + b - 1


def latent_frames(length: int, h) -> int:
    """Latent frames needed to decode `length` samples completely."""
    a, _ = window_extent(h)
    return (length - 1 + a) // h.hop_size // h.ratio + 1


@torch.no_grad()
def causal_roundtrip(encoder: Encoder, decoder: Decoder, audio: torch.Tensor, h,
                     n_codebooks: Optional[int] = None) -> Dict[str, torch.Tensor]:
    """Offline pass of the causal codec over audio (B, L), any L >= 1: what a stream gives.

    The signal is followed by the zeros a stream is flushed with, far enough that every
    output sample < L is final. Returns codes (B, n_codebooks, T'), real/imag (B, F, ratio*T')
    and audio (B, L).
    """
    length = audio.size(-1)
    _, b = window_extent(h)
    frames = latent_frames(length, h) * h.ratio
    padded = F.pad(audio, (0, (frames - 1) * h.hop_size + b - length))
    logamp, pha, _, _ = amp_pha_spectrum(padded, h.n_fft, h.hop_size, h.win_size, pad="zeros")
    quantized = encoder(logamp[..., :frames], pha[..., :frames], n_codebooks)
    _, _, real, imag, out = decoder(quantized.latent)
    return {"codes": quantized.codes, "real": real, "imag": imag, "audio": out.squeeze(1)[:, :length]}


class StreamingEncoder:
    """Audio (B, n) chunks in, codes (B, n_codebooks, m) out as soon as each latent frame is complete."""

    def __init__(self, encoder: Encoder, h, batch: int = 1):
        self.h = h
        self.encoder = copy.deepcopy(encoder)
        begin_stream(self.encoder, batch)
        self.half = h.n_fft // 2
        _, self.b = window_extent(h)
        p = next(encoder.parameters())
        n_bins = h.n_fft // 2 + 1
        # The signal as the offline STFT sees it (n_fft // 2 zeros before sample 0), from the
        # first sample of the next frame on.
        self.samples = p.new_zeros(batch, self.half)
        # STFT frames of the latent frame not yet complete (fewer than ratio).
        self.logamp = p.new_zeros(batch, n_bins, 0)
        self.pha = p.new_zeros(batch, n_bins, 0)

    @torch.no_grad()
    def push(self, audio: torch.Tensor) -> torch.Tensor:
        """audio (B, n), n >= 0 -> the codes (B, n_codebooks, m) completed by it (m may be 0)."""
        h = self.h
        self.samples = torch.cat((self.samples, audio), dim=-1)
        # Frame k (counted from the buffer's start) is complete once sample k * hop + half + b - 1 is in.
        ready = max(0, (self.samples.size(-1) - self.half - self.b) // h.hop_size + 1)
        if ready:
            # The samples beyond a frame's window are weighted by zero: the ones not here yet are zeros.
            needed = (ready - 1) * h.hop_size + h.n_fft
            frames = F.pad(self.samples[..., :needed], (0, max(0, needed - self.samples.size(-1))))
            logamp, pha, _, _ = amp_pha_spectrum(frames, h.n_fft, h.hop_size, h.win_size, pad="none")
            self.samples = self.samples[..., ready * h.hop_size:].clone()
            self.logamp = torch.cat((self.logamp, logamp), dim=-1)
            self.pha = torch.cat((self.pha, pha), dim=-1)
        whole = self.logamp.size(-1) // h.ratio * h.ratio
        codes = self.encoder.encode(self.logamp[..., :whole], self.pha[..., :whole]) if whole else \
            torch.zeros(self.samples.size(0), h.n_codebooks, 0, dtype=torch.long, device=self.samples.device)
        self.logamp, self.pha = self.logamp[..., whole:].clone(), self.pha[..., whole:].clone()
        return codes


class StreamingDecoder:
    """Codes (B, n_codebooks, m) in, audio (B, n) out: every sample that no later frame will change."""

    def __init__(self, encoder: Encoder, decoder: Decoder, h, batch: int = 1):
        self.h = h
        self.quantizer = encoder.quantizer
        self.decoder = copy.deepcopy(decoder)
        begin_stream(self.decoder, batch)
        p = next(decoder.parameters())
        a, _ = window_extent(h)
        self.offset = (h.n_fft - h.win_size) // 2
        self.window = torch.hann_window(h.win_size, device=p.device, dtype=p.dtype)
        tail = h.win_size - h.hop_size
        # Overlap-add sums and window-square sums of the samples from `self.position` on,
        # which later frames still add to.
        self.sums = p.new_zeros(batch, tail)
        self.weights = p.new_zeros(tail)
        self.position = -a  # sample index of sums[..., 0]; output before sample 0 is dropped

    def _overlap_add(self, frames: torch.Tensor) -> torch.Tensor:
        """(B, win_size, m) windowed frames -> their overlap-added sum (B, (m - 1) * hop + win_size)."""
        m = frames.size(-1)
        length = (m - 1) * self.h.hop_size + self.h.win_size
        return F.fold(frames, (1, length), (1, self.h.win_size), stride=(1, self.h.hop_size)).flatten(1)

    @torch.no_grad()
    def push(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, n_codebooks, m), m >= 0 -> audio (B, n) that is final now (n = m * hop_size
        once the stream is past its first samples)."""
        h = self.h
        m = codes.size(-1)
        if m == 0:
            return self.sums.new_zeros(self.sums.size(0), 0)
        _, _, real, imag = self.decoder.spectra(self.quantizer.from_codes(codes))
        frames = torch.fft.irfft(torch.complex(real, imag), n=h.n_fft, dim=1)
        window = self.window[:, None]
        sums = self._overlap_add(frames[:, self.offset:self.offset + h.win_size] * window)
        weights = self._overlap_add((window ** 2).expand(-1, frames.size(-1))[None])[0]
        tail = self.sums.size(-1)
        sums[:, :tail] += self.sums
        weights[:tail] += self.weights
        # The next frame starts m hops on: everything before it is final.
        done = frames.size(-1) * h.hop_size
        out = sums[:, :done] / weights[:done]
        self.sums, self.weights = sums[:, done:].clone(), weights[done:].clone()
        skip = min(max(0, -self.position), done)
        self.position += done
        return out[:, skip:]


class StreamingCodec:
    """Encoder and decoder streams back to back: audio chunks in, decoded audio out.

    The output runs `latency_samples(h)` behind the input; `flush` ends the stream with
    silence so that the output catches up with every sample pushed.
    """

    def __init__(self, encoder: Encoder, decoder: Decoder, h, batch: int = 1):
        self.h = h
        self.encoder = StreamingEncoder(encoder, h, batch)
        self.decoder = StreamingDecoder(encoder, decoder, h, batch)
        self.samples_in = self.samples_out = 0

    def push(self, audio: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """audio (B, n) -> (codes (B, n_codebooks, m), decoded audio (B, n')) completed by it."""
        self.samples_in += audio.size(-1)
        codes = self.encoder.push(audio)
        out = self.decoder.push(codes)
        self.samples_out += out.size(-1)
        return codes, out

    def flush(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """End the stream with the silence that completes the output; returns its codes and the
        last audio, which ends with the last sample pushed before."""
        pushed = self.samples_in
        codes, out = self.push(self.encoder.samples.new_zeros(self.encoder.samples.size(0),
                                                              latency_samples(self.h)))
        return codes, out[:, :out.size(-1) - (self.samples_out - pushed)]


def chunk_sizes(sizes: Union[int, Iterable[int]]) -> Iterator[int]:
    """An endless sequence of chunk sizes: one size repeated, or a list of sizes cycled."""
    return itertools.repeat(sizes) if isinstance(sizes, int) else itertools.cycle(list(sizes))


def stream_roundtrip(encoder: Encoder, decoder: Decoder, audio: torch.Tensor, h,
                     chunks: Union[int, Iterable[int]]) -> Dict[str, torch.Tensor]:
    """Stream audio (B, L) through the codec in chunks of `chunks` samples.

    Returns codes (B, n_codebooks, T') and audio (B, L), as `causal_roundtrip` does.
    """
    codec = StreamingCodec(encoder, decoder, h, audio.size(0))
    codes: List[torch.Tensor] = []
    outs: List[torch.Tensor] = []
    start = 0
    sizes = chunk_sizes(chunks)
    while start < audio.size(-1):
        size = next(sizes)
        c, out = codec.push(audio[:, start:start + size])
        codes.append(c)
        outs.append(out)
        start += size
    c, out = codec.flush()
    codes.append(c)
    outs.append(out)
    return {"codes": torch.cat(codes, dim=-1)[..., :latent_frames(audio.size(-1), h)],
            "audio": torch.cat(outs, dim=-1)}
