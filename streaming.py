"""APCodec-S streaming: the causal codec fed audio in chunks of any size, exactly as offline.

Timing (every number follows from the config): STFT frame t is centred on sample t * hop
and its Hann window weights samples t * hop - a ... t * hop + b - 1 (`window_extent`).
Latent frame n summarises STFT frames ratio * n ... ratio * n + ratio - 1, and the decoder
turns it back into the same frames. Output sample p is final once every frame whose window
covers it is decoded, so it needs input up to sample p + `latency_samples(h)`:
(ratio - 1) * hop + win_size - 1, 599 samples (12.5 ms) at the paper's 48 kHz settings.

`StreamingEncoder` (audio -> codes) and `StreamingDecoder` (codes -> audio) keep only what
the causal layers need between chunks: the last input frames of each convolution, the
samples of the STFT frames not yet complete and the overlap-add tail. `codec.codec_roundtrip`
is the offline pass they reproduce: in float32 the same codes, and the same audio up to float
rounding. A stream keeps rearranged copies of the model's weights, made when it is made:
after changing the weights, make a new stream.

They run the trained weights rearranged for a few frames at a time (the layers below):
activations are (group, batch, time, channels) rows, and the amplitude and phase paths run
side by side as two groups, so each layer is one batched matrix product. "bfloat16" runs
the products in bfloat16, "int8" in PyTorch's dynamic int8 quantisation (see `Products`):
faster, approximate.
"""
import itertools
import numbers
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from config import AttrDict
from fastpath import (channel_scales, check_precision, folded_grn_bias, folded_norm_linear, normalise, polar_spectrum,
                      product_dtype, vnni)
from models import Branch, CausalConv1d, ConvNeXtBlock, Decoder, Encoder
from spectral import amp_pha_spectrum, overlap_add, window_envelope


def require_causal(h: AttrDict, *modules: nn.Module, what: str = "streaming") -> None:
    """A one-line ValueError, saying that `what` needs it, unless `h`, and each Encoder /
    Decoder in `modules`, is causal: a stream of the paper's non-causal model would run
    without error and decode wrongly."""
    if not h.causal:
        raise ValueError(f"{what} needs a causal codec ('causal': true, as in configs/apcodec_s_48k.json); "
                         f"{h.source} describes the paper's non-causal model")
    for module in modules:
        if not isinstance(module.latent_conv, CausalConv1d):
            raise ValueError(f"streaming needs a causal codec: {h.source} says 'causal': true, but the "
                             f"{type(module).__name__.lower()} given was built non-causal")


def window_extent(h: AttrDict) -> Tuple[int, int]:
    """(a, b): a frame centred on sample c weights samples c - a ... c + b - 1.

    torch centres the win_size window inside the n_fft frame, which starts n_fft // 2
    samples before the centre.
    """
    offset = (h.n_fft - h.win_size) // 2
    return h.n_fft // 2 - offset, offset + h.win_size - h.n_fft // 2


def latency_samples(h: AttrDict) -> int:
    """Algorithmic latency: output sample p needs input samples up to p + this.

    The first output sample of a latent frame's span waits for the rest of that latent
    frame ((ratio - 1) hops) and for the window of its last STFT frame (a + b - 1 samples).
    """
    a, b = window_extent(h)
    return (h.ratio - 1) * h.hop_size + a + b - 1


def first_code_samples(h: AttrDict) -> int:
    """Samples a stream takes before it gives its first code: the latent frame's STFT frames,
    the last one's window included."""
    _, b = window_extent(h)
    return (h.ratio - 1) * h.hop_size + b


def causal_latent_frames(length: int, h: AttrDict) -> int:
    """Latent frames needed to decode `length` samples completely."""
    a, _ = window_extent(h)
    return (length - 1 + a) // h.hop_size // h.ratio + 1


def causal_analysis(audio: torch.Tensor, h: AttrDict) -> Tuple[torch.Tensor, torch.Tensor]:
    """The encoder's inputs for audio (B, L), any L >= 1, as a stream sees them: log amplitude and
    phase (B, F, ratio * T'), T' = `causal_latent_frames(L)`.

    The signal is followed by the zeros a stream is flushed with, far enough that every output
    sample < L is final.
    """
    length = audio.size(-1)
    _, b = window_extent(h)
    frames = causal_latent_frames(length, h) * h.ratio
    padded = F.pad(audio, (0, (frames - 1) * h.hop_size + b - length))
    logamp, pha, _, _ = amp_pha_spectrum(padded, h.n_fft, h.hop_size, h.win_size, pad="zeros")
    return logamp[..., :frames], pha[..., :frames]


@torch.no_grad()
def causal_decode(encoder: Encoder, decoder: Decoder, codes: torch.Tensor, length: int) -> torch.Tensor:
    """Codes (B, n, T') of the encoder run on `causal_analysis` -> audio (B, length), `length`
    the coded signal's."""
    return decoder(encoder.latent_from_codes(codes)).audio.squeeze(1)[:, :length]


class Products:
    """G products of one shape side by side: x (G, N, K) -> x[g] @ W_g.T + b_g, (G, N, M) float32.

    Float32 and bfloat16 run one batched product. int8 runs one product each with PyTorch's
    dynamic quantisation (fbgemm): on a stream's few rows per call it costs less than the
    oneDNN kernels that `fastpath` uses for long chunks.
    """

    def __init__(self, weights: Sequence[torch.Tensor], biases: Sequence[Optional[torch.Tensor]], precision: str):
        """weights (M, K) and biases (M,) (or all None), in float32."""
        self.int8 = precision == "int8"
        if self.int8:
            self.packed = []
            for w, b in zip(weights, biases):
                scale = channel_scales(w.float()).double()
                q = torch.quantize_per_channel(w.float(), scale, torch.zeros_like(scale, dtype=torch.long), 0,
                                               torch.qint8)
                self.packed.append(torch.ops.quantized.linear_prepack(q, b))
        else:
            self.dtype = product_dtype(precision)
            self.weight_t = torch.stack([w.t() for w in weights]).to(self.dtype)
            self.bias = None if biases[0] is None else torch.stack(list(biases))[:, None].to(self.dtype)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x (G, N, K) -> (G, N, M) float32."""
        if self.int8:
            # 7-bit activations where fbgemm's 8-bit products could saturate (without AVX512-VNNI).
            reduce_range = not vnni(fbgemm=True)
            return torch.stack([torch.ops.quantized.linear_dynamic(x[g].float(), packed, reduce_range)
                                for g, packed in enumerate(self.packed)])
        x = x.to(self.dtype)
        y = torch.bmm(x, self.weight_t) if self.bias is None else torch.baddbmm(self.bias, x, self.weight_t)
        return y.float()


class CausalConvolution:
    """G causal convolutions of one shape (stride s, kernel k; `models.CausalConv1d`) over rows
    (G, B, n, C_in) that arrive a few at a time.

    Output frame j reads input frames s * j + s - k ... s * j + s - 1. The rows that a later
    output still reads stay in `rows`; frames before 0 are zeros, and where s > k the frames
    no output reads are skipped as they come.
    """

    def __init__(self, convs: Sequence[nn.Conv1d], batch: int, precision: str, merge: bool = False):
        """`merge`: the convolutions read the same input, so they run as one with their output
        channels concatenated (G = 1)."""
        weights = [c.weight.detach().float() for c in convs]  # (C_out, C_in, k)
        biases = [c.bias.detach().float() for c in convs]
        if merge:
            # A shorter kernel is zero-padded on the left (its oldest taps) to the longest one's size.
            k = max(w.size(2) for w in weights)
            weights = [torch.cat([F.pad(w, (k - w.size(2), 0)) for w in weights])]
            biases = [torch.cat(biases)]
        self.out_channels, self.in_channels, self.kernel = weights[0].shape
        self.stride = convs[0].stride[0]
        self.product = Products([w.reshape(w.size(0), -1) for w in weights], biases, precision)
        self.rows = weights[0].new_zeros(len(weights), batch, max(self.kernel - self.stride, 0), self.in_channels)
        self.skip = max(self.stride - self.kernel, 0)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x (G, B, n, C_in) -> the output frames (G, B, m, C_out) that x completes."""
        skipped = min(self.skip, x.size(2))
        self.skip -= skipped
        rows = torch.cat((self.rows, x[:, :, skipped:]), dim=2)
        g, b = rows.shape[:2]
        m = max(0, (rows.size(2) - self.kernel) // self.stride + 1)
        y = rows.new_empty(g, b, m, self.out_channels)
        if m:
            # (G, B, m, C_in, k): the flattening order of the (C_out, C_in, k) weights.
            windows = rows.unfold(2, self.kernel, self.stride)[:, :, :m]
            y = self.product(windows.reshape(g, b * m, -1)).view_as(y)
        consumed = m * self.stride
        self.skip += max(0, consumed - rows.size(2))
        self.rows = rows[:, :, consumed:]
        return y

    def state(self) -> List[torch.Tensor]:
        return [self.rows]


class CausalUpsampler:
    """G `models.CausalConvTranspose1d` of one shape reading the same rows: (B, n, C_in) ->
    (G, B, stride * n, C_out), one product for all G; the last inputs whose kernels reach into
    later frames are kept."""

    def __init__(self, convs: Sequence[nn.ConvTranspose1d], batch: int, precision: str):
        weights = [c.weight.detach().float() for c in convs]  # (C_in, C_out, k)
        self.in_channels, self.out_channels, self.kernel = weights[0].shape
        self.stride, self.groups = convs[0].stride[0], len(convs)
        self.product = Products([torch.cat([w.reshape(self.in_channels, -1) for w in weights], 1).t()], [None],
                                precision)
        self.bias = torch.stack([c.bias.detach().float() for c in convs])[:, None, :, None]
        self.keep = -(-self.kernel // self.stride) - 1
        self.rows = weights[0].new_zeros(batch, self.keep, self.in_channels)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, n, C_in) -> the output frames (G, B, stride * n, C_out) that x completes."""
        b, n = x.shape[:2]
        rows = torch.cat((self.rows, x), dim=1)
        self.rows = rows[:, rows.size(1) - self.keep:]
        length = rows.size(1)
        # (B * L, G * C_out * k) -> (G * B, C_out * k, L), as fold takes its columns.
        columns = self.product(rows.reshape(1, b * length, -1)).view(b, length, self.groups, -1)
        columns = columns.permute(2, 0, 3, 1).reshape(self.groups * b, -1, length)
        y = F.fold(columns, (1, (length - 1) * self.stride + self.kernel), (1, self.kernel),
                   stride=(1, self.stride)).view(self.groups, b, self.out_channels, -1)
        skip = self.keep * self.stride
        return (y[..., skip:skip + n * self.stride] + self.bias).transpose(2, 3)

    def state(self) -> List[torch.Tensor]:
        return [self.rows]


class CausalBlocks:
    """G causal ConvNeXt blocks of one shape over rows (G, B, n, C), GRN per frame, each
    updating its residual rows in place."""

    def __init__(self, blocks: Sequence[ConvNeXtBlock], batch: int, precision: str):
        dw = torch.stack([b.dwconv.weight.detach()[:, 0] for b in blocks])      # (G, C, k)
        self.kernel = dw.size(2)
        self.dw_weight = dw[:, None, None]                                       # (G, 1, 1, C, k)
        self.dw_bias = torch.stack([b.dwconv.bias.detach() for b in blocks])[:, None, None]
        self.eps = blocks[0].norm.eps
        self.pw1 = Products(*zip(*(folded_norm_linear(b.norm, b.pwconv1) for b in blocks)), precision)
        self.pw2 = Products([b.pwconv2.weight.detach() for b in blocks], [folded_grn_bias(b) for b in blocks],
                            precision)
        self.gamma = torch.stack([b.grn.gamma.detach().flatten() for b in blocks])[:, None]
        channels = dw.size(1)
        self.rows = dw.new_zeros(len(blocks), batch, self.kernel - 1, channels)

    def __call__(self, x: torch.Tensor) -> None:
        """x (G, B, n, C), n >= 1, updated in place."""
        g, b, n, c = x.shape
        rows = torch.cat((self.rows, x), dim=2)
        self.rows = rows[:, :, n:]
        # The depthwise convolution: each frame's window of k frames against the kernel.
        y = (rows.unfold(2, self.kernel, 1) * self.dw_weight).sum(-1)
        y = normalise(y.add_(self.dw_bias), self.eps).view(g, b * n, c)
        hidden = torch.ops.aten.gelu_(self.pw1(y))
        # Causal GRN: hidden + gamma * hidden * |hidden| / mean |hidden|, each frame alone.
        scale = hidden.abs()
        mean = scale.mean(dim=-1, keepdim=True).add_(1e-6)
        hidden.addcdiv_(scale.mul_(hidden).mul_(self.gamma), mean)
        x += self.pw2(hidden).view(g, b, n, c)


class CausalBranches:
    """G `models.Branch` of one shape, of a causal codec, over rows fed in chunks:
    (G, B, n, C_in) -> (G, B, n, C_out)."""

    def __init__(self, branches: Sequence[Branch], batch: int, precision: str):
        self.embed = CausalConvolution([b.embed for b in branches], batch, precision)
        self.norm_eps = branches[0].norm.eps
        self.norm_affine = [torch.stack([getattr(b.norm, p).detach() for b in branches])[:, None, None]
                            for p in ("weight", "bias")]
        self.blocks = [CausalBlocks(blocks, batch, precision) for blocks in zip(*(b.blocks for b in branches))]
        self.final_norm_eps = branches[0].final_norm.eps
        self.out = Products(*zip(*(folded_norm_linear(b.final_norm, b.out) for b in branches)), precision)
        self.out_channels = branches[0].out.out_features

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x (G, B, n, C_in) -> (G, B, n, C_out)."""
        g, b, n = x.shape[:3]
        if n == 0:
            return x.new_zeros(g, b, 0, self.out_channels)
        weight, bias = self.norm_affine
        y = torch.addcmul(bias, normalise(self.embed(x), self.norm_eps), weight)
        for block in self.blocks:
            block(y)
        return self.out(normalise(y, self.final_norm_eps).view(g, b * n, -1)).view(g, b, n, -1)

    def state(self) -> List[torch.Tensor]:
        return [self.embed.rows] + [block.rows for block in self.blocks]


class SideBySide:
    """One layer of the amplitude path and of the phase path: a single layer of two groups
    when the two have the same shapes (the paper's sizes), else one layer each.
    `build(parts)` makes a grouped layer of the given parts."""

    def __init__(self, build: Callable[[Sequence[nn.Module]], Any], parts: Sequence[nn.Module]):
        amp, pha = ([p.shape for p in part.parameters()] for part in parts)
        self.layers = [build(parts)] if amp == pha else [build((part,)) for part in parts]

    def __call__(self, pair: Sequence[torch.Tensor]) -> Sequence[torch.Tensor]:
        """Each path's rows (B, n, C) -> each path's output rows. A grouped layer takes and gives
        the pair as one (2, B, n, C) tensor, so grouped layers in a row pass it on as it is."""
        if len(self.layers) == 1:
            return self.layers[0](pair if torch.is_tensor(pair) else torch.stack(tuple(pair)))
        return tuple(layer(x[None])[0] for layer, x in zip(self.layers, pair))

    def shared(self, x: torch.Tensor) -> Sequence[torch.Tensor]:
        """Rows (B, n, C) that both paths read -> each path's output rows, as `__call__` gives them."""
        if len(self.layers) == 1:
            return self.layers[0](x)
        return tuple(layer(x)[0] for layer in self.layers)

    def state(self) -> List[torch.Tensor]:
        return [t for layer in self.layers for t in layer.state()]


class StreamingEncoder:
    """Audio (B, n) chunks in, codes (B, n_codebooks, m) out as soon as each latent frame is complete.

    Each STFT frame goes through the branches as soon as its window is in; the downsampling
    convolution waits for a latent frame's last STFT frame. `precision` as in `fastpath`.
    """

    def __init__(self, encoder: Encoder, h: AttrDict, batch: int = 1, precision: str = "float32"):
        require_causal(h, encoder)
        check_precision(precision, next(encoder.parameters()).device)
        self.h = h
        self.quantizer = encoder.quantizer
        with torch.no_grad():
            self.codebooks = [q.codebook_terms() for q in encoder.quantizer.quantizers]
        self.half = h.n_fft // 2
        _, self.b = window_extent(h)
        # The signal as the offline STFT sees it (n_fft // 2 zeros before sample 0), from the
        # first sample of the next frame on.
        self.samples = next(encoder.parameters()).new_zeros(batch, self.half)
        with torch.no_grad():
            self.branches = SideBySide(lambda parts: CausalBranches(parts, batch, precision),
                                       (encoder.amp, encoder.pha))
            self.down = SideBySide(lambda parts: CausalConvolution(parts, batch, precision),
                                   (encoder.amp_down, encoder.pha_down))
            self.latent_conv = CausalConvolution((encoder.latent_conv,), batch, precision)

    @torch.no_grad()
    def push(self, audio: torch.Tensor) -> torch.Tensor:
        """audio (B, n), n >= 0 -> the codes (B, n_codebooks, m) completed by it (m may be 0)."""
        h = self.h
        self.samples = torch.cat((self.samples, audio), dim=-1)
        # Frame k (counted from the buffer's start) is complete once sample k * hop + half + b - 1 is in.
        ready = max(0, (self.samples.size(-1) - self.half - self.b) // h.hop_size + 1)
        logamp = pha = self.samples.new_zeros(self.samples.size(0), h.n_fft // 2 + 1, 0)
        if ready:
            # The samples beyond a frame's window are weighted by zero: the ones not here yet are zeros.
            needed = (ready - 1) * h.hop_size + h.n_fft
            frames = F.pad(self.samples[..., :needed], (0, max(0, needed - self.samples.size(-1))))
            logamp, pha, _, _ = amp_pha_spectrum(frames, h.n_fft, h.hop_size, h.win_size, pad="none")
            self.samples = self.samples[..., ready * h.hop_size:].clone()
        down = self.down(self.branches((logamp.transpose(1, 2), pha.transpose(1, 2))))
        latent = self.latent_conv(torch.cat(tuple(down), dim=-1)[None])[0].transpose(1, 2)
        if latent.size(-1) == 0:
            return torch.zeros(latent.size(0), h.n_codebooks, 0, dtype=torch.long, device=latent.device)
        return self.quantizer.codes(latent, terms=self.codebooks)

    def state(self) -> List[torch.Tensor]:
        """Every tensor the stream keeps between pushes."""
        return [self.samples] + self.branches.state() + self.down.state() + self.latent_conv.state()


class StreamingDecoder:
    """Codes (B, n_codebooks, m) in, audio (B, n) out: every sample that no later frame will change."""

    def __init__(self, encoder: Encoder, decoder: Decoder, h: AttrDict, batch: int = 1, precision: str = "float32"):
        require_causal(h, encoder, decoder)
        check_precision(precision, next(decoder.parameters()).device)
        self.h = h
        self.quantizer = encoder.quantizer
        with torch.no_grad():
            self.latent_conv = CausalConvolution((decoder.latent_conv,), batch, precision)
            self.up = SideBySide(lambda parts: CausalUpsampler(parts, batch, precision),
                                 (decoder.amp_up, decoder.pha_up))
            self.branches = SideBySide(lambda parts: CausalBranches(parts, batch, precision),
                                       (decoder.amp, decoder.pha))
            self.amp_out = CausalConvolution((decoder.amp_out,), batch, precision)
            self.pha_out = CausalConvolution((decoder.pha_imag, decoder.pha_real), batch, precision, merge=True)
        p = next(decoder.parameters())
        a, _ = window_extent(h)
        self.offset = (h.n_fft - h.win_size) // 2
        self.window = torch.hann_window(h.win_size, device=p.device, dtype=torch.float32)
        tail = h.win_size - h.hop_size
        # Overlap-add sums and window-square sums of the samples from `self.position` on,
        # which later frames still add to.
        self.sums = p.new_zeros(batch, tail)
        self.weights = p.new_zeros(tail)
        self.position = -a  # sample index of sums[..., 0]; output before sample 0 is dropped

    @torch.no_grad()
    def push(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, n_codebooks, m), m >= 0 -> audio (B, n) that is final now (n = m * ratio *
        hop_size once the stream is past its first samples)."""
        h = self.h
        if codes.size(-1) == 0:
            return self.sums.new_zeros(self.sums.size(0), 0)
        latent = self.latent_conv(self.quantizer.from_codes(codes).transpose(1, 2)[None])
        amp, pha = self.branches(self.up.shared(latent[0]))
        bins = h.n_fft // 2 + 1
        pha = self.pha_out(pha[None])[0]
        spec = polar_spectrum(self.amp_out(amp[None])[0], pha[..., :bins], pha[..., bins:])   # (B, T, F)
        frames = torch.fft.irfft(spec, n=h.n_fft, dim=-1).transpose(1, 2)
        window = self.window[:, None]
        sums = overlap_add(frames[:, self.offset:self.offset + h.win_size] * window, h.hop_size)
        count = frames.size(-1)
        weights = window_envelope(count, h.n_fft, h.win_size, h.hop_size, frames.device)[
            self.offset:self.offset + h.win_size + h.hop_size * (count - 1)].clone()
        tail = self.sums.size(-1)
        sums[:, :tail] += self.sums
        weights[:tail] += self.weights
        # The next frame starts m hops on: everything before it is final.
        done = count * h.hop_size
        out = sums[:, :done] / weights[:done]
        self.sums, self.weights = sums[:, done:].clone(), weights[done:].clone()
        skip = min(max(0, -self.position), done)
        self.position += done
        return out[:, skip:]

    def state(self) -> List[torch.Tensor]:
        """Every tensor the stream keeps between pushes."""
        layers = (self.latent_conv, self.up, self.branches, self.amp_out, self.pha_out)
        return [self.sums, self.weights] + [t for layer in layers for t in layer.state()]


class StreamingCodec:
    """Encoder and decoder streams back to back: audio chunks in, decoded audio out.

    The output runs `latency_samples(h)` behind the input; `flush` ends the stream with
    silence so that the output catches up with every sample pushed. A new stream needs a new
    StreamingCodec.
    """

    def __init__(self, encoder: Encoder, decoder: Decoder, h: AttrDict, batch: int = 1, precision: str = "float32"):
        if not isinstance(batch, numbers.Integral) or batch < 1:
            raise ValueError(f"a stream's batch must be a whole number of at least 1, got {batch!r}")
        self.h = h
        self.encoder = StreamingEncoder(encoder, h, batch, precision)
        self.decoder = StreamingDecoder(encoder, decoder, h, batch, precision)
        self.samples_in = self.samples_out = self.frames_out = 0
        self.ended = False

    def state_size(self) -> int:
        """Numbers the stream keeps between pushes: bounded, however long the stream (it varies a
        little with the position in the current latent frame)."""
        return sum(t.numel() for t in self.encoder.state() + self.decoder.state())

    def push(self, audio: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """audio (B, n) -> (codes (B, n_codebooks, m), decoded audio (B, n')) completed by it."""
        if self.ended:
            raise ValueError("this stream has ended (flush was called); start a new StreamingCodec")
        if not isinstance(audio, torch.Tensor) or not audio.is_floating_point():
            got = f"{audio.dtype} samples" if isinstance(audio, torch.Tensor) else f"a {type(audio).__name__}"
            raise ValueError(f"a stream takes a floating point torch tensor in [-1, 1], got {got} "
                             f"(16-bit PCM: torch.from_numpy(pcm).float() / 32768)")
        batch = self.encoder.samples.size(0)
        if audio.dim() != 2 or audio.size(0) != batch:
            raise ValueError(f"a stream of batch {batch} takes audio (batch, samples) = ({batch}, n), "
                             f"got shape {tuple(audio.shape)}")
        # The stream's own dtype and device: float64 samples would turn its state float64.
        audio = audio.to(self.encoder.samples)
        self.samples_in += audio.size(-1)
        codes = self.encoder.push(audio)
        out = self.decoder.push(codes)
        self.samples_out += out.size(-1)
        self.frames_out += codes.size(-1)
        return codes, out

    def flush(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """End the stream with the silence that completes the output; returns the last codes
        and audio, so that the stream's codes are the offline pass's and its audio ends with the
        last sample pushed (an empty stream gives none)."""
        pushed = self.samples_in
        frames = causal_latent_frames(pushed, self.h) - self.frames_out if pushed else 0
        codes, out = self.push(self.encoder.samples.new_zeros(self.encoder.samples.size(0),
                                                              latency_samples(self.h)))
        # The stream now holds that silence: audio pushed after it would be coded behind it.
        self.ended = True
        return codes[..., :frames], out[:, :out.size(-1) - (self.samples_out - pushed)]


def chunk_sizes(sizes: Union[int, Iterable[int]]) -> Iterator[int]:
    """An endless sequence of chunk sizes: one size repeated, or a list of sizes cycled."""
    sizes = [sizes] if isinstance(sizes, numbers.Integral) else list(sizes)
    if min(sizes, default=-1) < 0 or sum(sizes) == 0:
        raise ValueError(f"chunk sizes must be at least 0 samples, and not all 0; got {sizes}")
    return itertools.cycle(sizes)


def stream_roundtrip(encoder: Encoder, decoder: Decoder, audio: torch.Tensor, h: AttrDict,
                     chunks: Union[int, Iterable[int]], precision: str = "float32") -> Dict[str, torch.Tensor]:
    """Stream audio (B, L) through the codec in chunks of `chunks` samples.

    Returns codes (B, n_codebooks, T') and audio (B, L), as `codec.codec_roundtrip` does.
    """
    codec = StreamingCodec(encoder, decoder, h, audio.size(0), precision)
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
    return {"codes": torch.cat(codes, dim=-1), "audio": torch.cat(outs, dim=-1)}
