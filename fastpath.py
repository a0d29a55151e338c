"""The generator's inference forward, arranged for speed: the same computation as `models.Encoder`
and `models.Decoder` (non-causal), to float rounding, at a cost that grows linearly with length.

* Activations are (B, T, C), so every pointwise layer and every convolution (as one product
  per tap; the strided downsampling one as one product, the transposed upsampling one as one
  per block of ratio output rows) is a matrix product over contiguous rows, with no
  transposes between layers.
* Time runs in chunks of `chunk_frames`, so a layer's output is still in cache when the next
  one reads it; each ConvNeXt stack updates one residual buffer in place.
* Without chunks (`chunk_frames` None, as on a GPU) a whole batch runs each layer at once,
  where memory traffic and kernel launches bound the time, not arithmetic: convolutions run
  as single kernels on the rows seen as a channels-last image, GRN's statistics as one norm,
  and its second product as one batched product, per-clip weights and all.
* With `compile`, each block's first half (`expand`: depthwise convolution, LayerNorm, first
  product, GELU, GRN's sums of squares) runs through torch.compile, which fuses the work
  around the product into a few kernels, chunked or whole.
* GRN pools over the whole sequence: a first pass over the chunks gathers its statistics, a
  second applies it and the block's second pointwise layer.
* LayerNorm's scale and shift are folded into the following layer, weight norm into the
  weights, and the two phase output convolutions share one product: all once, at build time.
* Clips of different lengths run as one batch: the frames past a clip's end are zero wherever
  a convolution reads them and are left out of GRN's statistics, so each clip gets what it
  gets alone.

Precision: "float32" (default) is the reference computation. "bfloat16" runs the products and
activations in bfloat16. "int8" runs the products on oneDNN's unsigned x signed 8-bit kernels:
weights quantised per output channel once, activations per chunk as they come. Between a
block's two passes a long input's hidden activations are kept quantised, with GRN folded into
the second product's weights per clip; a short input's are kept in float32 and scaled by GRN,
which saves packing new weights. The STFT, the quantizer and the iSTFT always run in float32.
"""
import contextlib
import functools
import platform
import re
import sys
import warnings
from typing import Any, Callable, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from config import AttrDict
from models import Branch, ConvNeXtBlock, Decoder, Encoder
from spectral import OverlapAdd, analysis_frames, centred, log_amplitude_and_phase, pad_for_analysis, stft_rows
from utils import compile_problem

PRECISIONS = ("float32", "bfloat16", "int8")
CHUNK_FRAMES = 1024         # rows per chunk on the CPU: a chunk's activations stay in cache
SCALED_FRAMES = 4096        # int8 applies GRN to the activations of inputs up to this many frames


@functools.lru_cache(maxsize=None)
def cpuinfo(field: str) -> str:
    """The first CPU's `field` in Linux's /proc/cpuinfo ("flags", "model name"), "" where unknown."""
    try:
        with open("/proc/cpuinfo") as f:
            match = re.search(rf"^{re.escape(field)}\s*:(.*)$", f.read(), re.MULTILINE)
    except OSError:
        return ""
    return match.group(1).strip() if match else ""


@functools.lru_cache(maxsize=None)
def cpu_flags() -> frozenset:
    """The CPU's feature flags, empty where unknown (read once: a stream's int8 products ask on every call)."""
    return frozenset(cpuinfo("flags").split())


def onednn_int8() -> bool:
    """Whether this CPU runs the fast path's int8 products: oneDNN's x86 kernels in torch."""
    return (platform.machine().lower() in ("x86_64", "amd64") and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.onednn, "qlinear_pointwise"))


def reduced_precision(device: torch.device) -> str:
    """The reduced precision this machine runs fastest: bfloat16 on GPUs, on x86 CPUs with AMX
    tiles and on other CPUs (ARM), else int8. (AVX512-BF16 alone doubles the float32 product
    rate at best, while int8 with VNNI, or even AVX2, gains more.)"""
    if device.type == "cuda" or "amx_bf16" in cpu_flags() or not onednn_int8():
        return "bfloat16"
    return "int8"


def product_dtype(precision: str) -> torch.dtype:
    """The dtype of the float operands of `precision`'s products (int8 quantises float32 ones)."""
    return torch.bfloat16 if precision == "bfloat16" else torch.float32


def folded_grn_bias(block: ConvNeXtBlock) -> torch.Tensor:
    """The second pointwise layer's bias with GRN's shift folded in: GRN adds beta to that
    layer's input, which the layer turns into W @ beta. (C,), float32."""
    weight = block.pwconv2.weight.detach().float()
    return block.pwconv2.bias.detach().float() + weight @ block.grn.beta.detach().flatten().float()


def resolve_precision(precision: str, device: torch.device) -> str:
    """`precision` with "auto" replaced by this machine's `reduced_precision`."""
    return reduced_precision(device) if precision == "auto" else precision


def check_precision(precision: str, device: torch.device) -> None:
    """A one-line ValueError unless `precision` is one of PRECISIONS and runs on `device`."""
    if precision not in PRECISIONS:
        raise ValueError(f"--precision must be one of {', '.join(PRECISIONS)}, got '{precision}'")
    if precision == "int8" and device.type != "cpu":
        raise ValueError("--precision int8 runs on the CPU; use bfloat16 on a GPU")


def kernels(precision: str, device: torch.device, stream: bool = False) -> str:
    """One line naming the kernels that `precision` uses on `device`, in the fast path or (`stream`)
    in a causal stream (`streaming`)."""
    if device.type == "cuda":
        return f"{precision} products on {torch.cuda.get_device_name(device)} (cuBLAS)"
    isa = torch.backends.cpu.get_cpu_capability()
    hardware = sorted({"amx_bf16", "amx_int8", "avx512_bf16", "avx512_vnni", "avx_vnni"} & cpu_flags())
    int8 = "fbgemm dynamically quantised int8 GEMM" if stream else "oneDNN int8 GEMM"
    bits = 8 if vnni(fbgemm=stream) else 7
    library = {"float32": "oneDNN/MKL float32 GEMM", "bfloat16": "oneDNN bfloat16 GEMM",
               "int8": f"{int8} ({bits}-bit activations, 8-bit weights)"}[precision]
    return f"{precision}: {library}, torch CPU capability {isa}, CPU flags {' '.join(hardware) or 'none of AMX/BF16/VNNI'}"


# PyTorch marks its quantized tensor type deprecated; int8 uses it to quantise activations in
# one pass (and the stream's int8 products, in `streaming`, to hold their weights).
warnings.filterwarnings("ignore", message=r"torch\.quantize_per_tensor, torch\.quantize_per_channel",
                        category=UserWarning)


class Quantized(NamedTuple):
    """Activations as uint8 `values` with one scale and zero point: x ~ scale * (values - zero_point)."""
    values: torch.Tensor
    scale: float
    zero_point: int

    def rows(self, start: int, stop: int) -> "Quantized":
        """Rows start ... stop - 1 of (B, T, C) values, as (B * rows, C)."""
        return self._replace(values=self.values[:, start:stop].reshape(-1, self.values.size(-1)))

    def __getitem__(self, i: int) -> "Quantized":
        """Item i of (B, ...) values, as a tensor's [i] is."""
        return self._replace(values=self.values[i])


def quantize(x: torch.Tensor) -> Quantized:
    """x (any shape, float) quantised over its range (which always includes 0). Without VNNI the
    8-bit products sum pairs in 16 bits, which can saturate, so activations keep 7 bits there."""
    x = x.float().contiguous()
    # One pass for the range and one to quantise (the dynamic quantiser reads x three times).
    low, high = (v.item() for v in torch.aminmax(x))
    low, high = min(low, 0.0), max(high, 0.0)
    steps = 255 if vnni() else 127
    # A range too narrow for a normal float scale quantises everything to the zero point.
    scale = (high - low) / steps if high - low > 1e-30 else 1.0
    q = torch.quantize_per_tensor(x, scale, min(steps, round(-low / scale)), torch.quint8)
    # The same bytes as a plain uint8 tensor: int_repr() would copy them, and a dtype view
    # stays a quantized tensor.
    values = torch.empty(0, dtype=torch.uint8, device=x.device).set_(q.untyped_storage(), 0, q.shape)
    return Quantized(values, q.q_scale(), q.q_zero_point())


def vnni(fbgemm: bool = False) -> bool:
    """Whether the int8 kernels sum unsigned x signed 8-bit products without 16-bit saturation:
    oneDNN's (the fast path's) with any VNNI, fbgemm's (the stream's) only with AVX512-VNNI."""
    flags = cpu_flags()
    return "avx512_vnni" in flags if fbgemm else bool({"avx512_vnni", "avx_vnni", "amx_int8"} & flags)


def channel_scales(weight: torch.Tensor) -> torch.Tensor:
    """Symmetric int8 scales of a weight (M, K), one per output channel: (M,)."""
    return weight.abs().amax(dim=1).clamp_min(1e-12) / 127


Activations = Union[torch.Tensor, Quantized]


class Product:
    """x (N, K) -> x @ W.T (+ b) (N, M) in one precision, then GELU with `gelu`; W (M, K) and b
    (M,) or None given in float32.

    int8 takes x as float (quantised on the way in) or already `Quantized`."""

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor], precision: str, gelu: bool = False):
        self.int8, self.gelu = precision == "int8", gelu
        self.dtype = product_dtype(precision)
        if self.int8:
            self.scale = channel_scales(weight)
            integers = torch.round(weight / self.scale[:, None]).to(torch.int8).contiguous()
            self.packed = torch.ops.onednn.qlinear_prepack(integers, None)
            self.zero = torch.zeros(weight.size(0), dtype=torch.long)
            self.bias = None if bias is None else bias.float().contiguous()
        else:
            self.weight_t = weight.t().contiguous().to(self.dtype)
            self.bias = None if bias is None else bias.to(self.dtype)

    def __call__(self, x: Activations, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The product, written into `out` (contiguous (N, M)) when given."""
        if self.int8:
            q = x if isinstance(x, Quantized) else quantize(x)
            # The "none" algorithm of oneDNN's GELU is the exact (erf) form, as nn.GELU's default.
            post_op, algorithm = ("gelu", "none") if self.gelu else ("none", "")
            y = torch.ops.onednn.qlinear_pointwise(q.values, q.scale, q.zero_point, self.packed, self.scale, self.zero,
                                                   self.bias, 1.0, 0, torch.float32, post_op, [], algorithm)
            return y if out is None else out.copy_(y)
        if self.bias is None:
            y = torch.mm(x.to(self.dtype), self.weight_t, out=out)
        else:
            y = torch.addmm(self.bias, x.to(self.dtype), self.weight_t, out=out)
        return torch.ops.aten.gelu_(y) if self.gelu else y

    def accumulate(self, x: Activations, out: torch.Tensor) -> None:
        """out (N, M) += the product, in place (no GELU)."""
        if self.int8 and out.is_contiguous() and out.dtype == torch.float32:
            q = x if isinstance(x, Quantized) else quantize(x)
            torch.ops.onednn.qlinear_pointwise.binary(q.values, q.scale, q.zero_point, self.packed, self.scale,
                                                      self.zero, out, self.bias, 1.0, 0, torch.float32, 1.0, 0,
                                                      "sum", 1.0, "none", [], "")
            return
        if self.int8 or out.dtype != self.dtype:
            out += self(x)
            return
        out.addmm_(x.to(self.dtype), self.weight_t)
        if self.bias is not None:
            out.add_(self.bias)


class Convolution:
    """A stride-1 'same' convolution over the rows of (B, T, C_in).

    Chunked, it runs as k shifted products, one per tap, summed in place: no unfolded copy of
    the input, and each product's operands stay in cache. `dense` (whole sequences, as on a
    GPU) runs one convolution over the whole buffer instead: there each tap would read the
    input from memory again, and a batch's shifted rows are not one matrix."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, precision: str, dense: bool = False):
        """weight (C_out, C_in, k), bias (C_out,) as nn.Conv1d holds them (k odd)."""
        weight = weight.detach().float()
        self.kernel, self.out_channels = weight.size(2), weight.size(0)
        self.dense = dense and precision != "int8"
        if self.dense:
            dtype = product_dtype(precision)
            self.weight, self.bias = image_weight(weight, dtype), bias.detach().to(dtype)
        else:
            self.taps = [Product(weight[:, :, k], bias.detach().float() if k == 0 else None, precision)
                         for k in range(self.kernel)]

    def __call__(self, x: torch.Tensor, margin: int, start: int, rows: int) -> torch.Tensor:
        """Output rows start ... start + rows - 1 of x (B, margin + T + margin, C_in) with zero
        margins -> (B, rows, C_out)."""
        first = margin - self.kernel // 2 + start
        if self.dense:
            return image_convolution(x.to(self.weight.dtype), self.weight, self.bias)[:, first:first + rows]
        window = x[:, first:first + rows + self.kernel - 1]
        if self.taps[0].int8:
            # One quantisation for all taps: they read shifted rows of one window.
            q = quantize(window)
            taps = [q.rows(k, k + rows) for k in range(self.kernel)]
        else:
            # One cast of the window for all taps (each tap would otherwise cast its own rows).
            window = window.to(self.taps[0].dtype)
            taps = [window[:, k:k + rows].reshape(-1, x.size(2)) for k in range(self.kernel)]
        y = self.taps[0](taps[0])
        for product, tap in zip(self.taps[1:], taps[1:]):
            product.accumulate(tap, y)
        return y.view(x.size(0), rows, self.out_channels)


class Downsampler:
    """The encoder's strided 'same' Conv1d over rows: each output frame's k input rows side by
    side (a view where k <= stride), times the weight, as one float32 product. (A channels-last
    image convolution would do the same, but torch 2.13's oneDNN one returns garbage or crashes
    on the CPU where the stride exceeds the kernel, as here: kernel 7, stride 8.)"""

    def __init__(self, conv: nn.Conv1d):
        weight = conv.weight.detach().float()
        self.kernel, self.stride, self.padding = weight.size(2), conv.stride[0], conv.padding[0]
        self.needed_margin = self.padding     # the first window starts this many rows before a clip
        self.product = Product(weight.permute(0, 2, 1).flatten(1), conv.bias.detach().float(), "float32")

    def __call__(self, x: torch.Tensor, margin: int, frames: int) -> torch.Tensor:
        """x (B, margin + T + margin, C_in) with contiguous rows, zero outside each clip (margin
        >= `needed_margin`, the conv's padding) -> (B, T', C_out) with T' as the Conv1d gives."""
        b, _, c = x.shape
        assert x.stride(2) == 1 and x.stride(1) == c, "the windows are read as strides of whole rows"
        out_frames = (frames + 2 * self.padding - self.kernel) // self.stride + 1
        windows = x.as_strided((b, out_frames, self.kernel, c), (x.stride(0), self.stride * c, c, 1),
                               x.storage_offset() + (margin - self.padding) * c)
        return self.product(windows.reshape(b * out_frames, -1)).view(b, out_frames, -1)


class Upsampler:
    """The decoder's ConvTranspose1d (stride s, padding p, output s * T') written into rows: a
    frame's k output rows are ceil(k / s) blocks of s rows, block a of frame i landing on
    output block i + a; each block index is one batched product for all frames, summed in
    place into the output buffer."""

    def __init__(self, conv: nn.ConvTranspose1d):
        weight = conv.weight.detach().float()
        self.stride, self.padding = conv.stride[0], conv.padding[0]
        self.block_count = -(-weight.size(2) // self.stride)
        # Zero taps up to whole blocks: the rows they add to lie past the output.
        weight = F.pad(weight, (0, self.block_count * self.stride - weight.size(2)))
        # (blocks, C_in, s * C_out): block a maps a frame to its output rows a*s ... a*s + s - 1.
        blocks = weight.permute(0, 2, 1).reshape(weight.size(0), self.block_count, -1)
        self.weights = blocks.transpose(0, 1).contiguous()
        self.bias = conv.bias.detach().float()
        self.out_channels = self.bias.numel()
        # The blocks start p rows before the output and the last one ends (count - 1) * s - p after it.
        self.needed_margin = max(self.padding, (self.block_count - 1) * self.stride - self.padding)

    def __call__(self, latent: torch.Tensor, margin: int) -> torch.Tensor:
        """latent (B, C_in, T') -> (B, margin + s * T' + margin, C_out) with zero margins
        (margin >= `needed_margin`)."""
        b, _, n = latent.shape
        s, c, count = self.stride, self.out_channels, self.block_count
        x = latent.transpose(1, 2).contiguous()
        out = torch.empty(b, n * s + 2 * margin, c, device=latent.device)
        first = margin - self.padding
        out_blocks = out[:, first:first + (n + count - 1) * s].view(b, n + count - 1, s * c)
        # beta 0: the buffer's old contents are ignored, NaN included.
        out_blocks[:, :n].baddbmm_(x, self.weights[0].expand(b, -1, -1), beta=0)
        out_blocks[:, n:] = 0
        for block in range(1, count):
            out_blocks[:, block:block + n].baddbmm_(x, self.weights[block].expand(b, -1, -1))
        out[:, margin:margin + n * s] += self.bias
        out[:, :margin] = 0
        out[:, margin + n * s:] = 0
        return out


def folded_norm_linear(norm: nn.LayerNorm, linear: nn.Linear) -> Tuple[torch.Tensor, torch.Tensor]:
    """linear(norm(x)) = linear'(normalised x): the LayerNorm's scale and shift moved into the Linear."""
    w, b = linear.weight.detach().float(), linear.bias.detach().float()
    return w * norm.weight.detach().float(), b + w @ norm.bias.detach().float()


def margined(batch: int, frames: int, channels: int, margin: int, device: torch.device) -> torch.Tensor:
    """An uninitialised (B, margin + frames + margin, C) buffer with zero margins: every row
    inside gets written, and filling the whole of a long buffer costs a pass over memory."""
    x = torch.empty(batch, frames + 2 * margin, channels, device=device)
    x[:, :margin] = 0
    x[:, margin + frames:] = 0
    return x


def image_convolution(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """A 'valid' convolution over the rows of x (B, T, C_in) with weight (C_out, C_in / groups, k, 1)
    -> (B, T - k + 1, C_out). The rows are a channels-last image (B, C, T, 1) in the same memory,
    so cuDNN and oneDNN run it as one kernel without a transposed copy."""
    y = F.conv2d(x.unsqueeze(2).permute(0, 3, 1, 2), weight, bias, groups=groups)
    return y.permute(0, 2, 3, 1).flatten(2)


def image_weight(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A Conv1d weight (C_out, C_in, k) for `image_convolution`, channels-last as its input."""
    return weight.detach()[..., None].to(dtype).contiguous(memory_format=torch.channels_last)


def normalise(x: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm over the last dimension without its affine (folded into the next layer)."""
    return F.layer_norm(x, x.shape[-1:], eps=eps)


def depthwise(window: torch.Tensor, taps: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """A 'valid' depthwise convolution over rows: window (B, rows + k - 1, C), taps (k, C),
    bias (C,) -> (B, rows, C), as one multiply-add per tap into one output."""
    rows = window.size(1) - taps.size(0) + 1
    y = torch.addcmul(bias, window[:, :rows], taps[0])
    for k in range(1, taps.size(0)):
        y.addcmul_(window[:, k:k + rows], taps[k])
    return y


def expand(window: torch.Tensor, taps: torch.Tensor, bias: torch.Tensor, eps: float, weight_t: torch.Tensor,
           product_bias: torch.Tensor, inside: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """A ConvNeXt block's first half as one function of tensors, for torch.compile to fuse into
    few kernels: window (B, rows + k - 1, C) -> GELU(LayerNorm(depthwise(window)) @ W.T + b)
    (B, rows, hidden width) in weight_t's precision (W.T given as weight_t (C, hidden width), the
    norm's scale and shift folded in), zero where inside (B, rows, 1) is False, and its float32
    sums of squares over the rows (B, hidden width). The weights are arguments, not constants,
    so that every block runs the same compiled code."""
    y = normalise(depthwise(window, taps, bias), eps)
    hidden_rows = F.gelu(torch.addmm(product_bias, y.flatten(0, 1).to(weight_t.dtype), weight_t))
    hidden_rows = hidden_rows.view(*y.shape[:2], -1)
    if inside is not None:
        hidden_rows = torch.where(inside, hidden_rows, 0)
    # A reduced precision's float32 copy is squared in place: one new buffer of this size, not two.
    squares = hidden_rows.square() if hidden_rows.dtype == torch.float32 else hidden_rows.float().square_()
    return hidden_rows, squares.sum(1)


EXPAND_VERSIONS = 64    # compiled versions of `expand` kept (torch.compile's default limit is 8)


@functools.lru_cache(maxsize=None)
def compiled_expand() -> Callable:
    """`expand` through torch.compile, shared by every block. Each precision, padding mask or
    not, TF32 setting and batch of one or more compiles its own version, static at first and
    dynamic once a second length comes: a run of several precisions can pass torch.compile's
    default limit of 8 versions, after which it would silently run `expand` uncompiled."""
    compiled = torch.compile(expand)

    def run(*args: Any) -> Tuple[torch.Tensor, torch.Tensor]:
        with torch._dynamo.config.patch(recompile_limit=EXPAND_VERSIONS):
            return compiled(*args)
    return run


def polar_spectrum(logamp: torch.Tensor, imag: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """The decoder's spectrum from its outputs, any shape: exp(logamp) * e^(i atan2(imag, real)).

    Computed without the trigonometry, as the component pair scaled to the amplitude;
    atan2(0, 0) = 0 gives the direction (1, 0).
    """
    norm = torch.hypot(real, imag)
    directed = norm > 0
    magnitude = torch.exp(logamp)
    scale = torch.where(directed, magnitude / norm, magnitude)
    return torch.complex(torch.where(directed, real, 1) * scale, imag * scale)


class Padding:
    """Where each clip of a batch ends. Clips of different lengths run padded to the longest,
    and the frames past a clip's end must be as the clip alone would have them: zero where a
    convolution reads them, and out of GRN's statistics."""

    def __init__(self, lengths: Sequence[int], frames: int):
        self.ends = torch.tensor(lengths)[:, None]
        self.frames = frames
        self._rows: Dict[Tuple[int, int, Optional[int], torch.device], torch.Tensor] = {}
        self._inside: Dict[torch.device, torch.Tensor] = {}

    def zero(self, x: torch.Tensor, offset: int = 0, count: Optional[int] = None) -> None:
        """Zero the rows of x (B, rows per item, C), in place, that hold frame offset + t of a
        clip for t from its end on: `count` of them, or all up to T. One kernel that writes
        those rows alone (a mask would read and write every row)."""
        key = (x.size(1), offset, count, x.device)
        if key not in self._rows:
            t = torch.arange(self.frames)[None]
            past = (t >= self.ends) & (t < self.ends + (self.frames if count is None else count))
            item, frame = past.nonzero(as_tuple=True)
            self._rows[key] = (item * x.size(1) + offset + frame).to(x.device)
        x.view(-1, x.size(2)).index_fill_(0, self._rows[key], 0)

    def inside(self, device: torch.device) -> torch.Tensor:
        """(B, frames, 1) bool, True at each clip's frames."""
        if device not in self._inside:
            self._inside[device] = (torch.arange(self.frames)[None] < self.ends)[..., None].to(device)
        return self._inside[device]


class FastBlock:
    """ConvNeXtBlock applied in place to the rows of a residual buffer."""

    def __init__(self, block: ConvNeXtBlock, precision: str, dense: bool = False, compiled: bool = False):
        """`dense`: the depthwise convolution and the second product over the whole sequence and
        batch at once (see `Convolution`). `compiled` (float32 and bfloat16): the first half runs
        as `compiled_expand`.

        The first half (up to GRN's statistics) of float32 and bfloat16 runs as `expand`, but for
        dense uncompiled blocks: on a GPU each of its k multiply-adds would read the whole batch
        from memory, so they run one convolution kernel and write into a workspace instead."""
        self.precision = precision
        self.dense = dense and precision != "int8"
        self.expand: Optional[Callable] = None
        if precision != "int8" and (compiled or not self.dense):
            self.expand = compiled_expand() if compiled else expand
        if self.expand is None and self.dense:
            self.dw_image = image_weight(block.dwconv.weight, torch.float32)
        else:
            self.dw_weight = block.dwconv.weight.detach()[:, 0].t().contiguous()   # (k, C)
        self.dw_bias = block.dwconv.bias.detach()
        self.kernel = block.dwconv.kernel_size[0]
        self.eps = block.norm.eps
        self.pw1 = Product(*folded_norm_linear(block.norm, block.pwconv1), precision, gelu=True)
        self.pw2_weight = block.pwconv2.weight.detach().float()
        self.pw2_bias = folded_grn_bias(block)
        self.gamma = block.grn.gamma.detach().flatten().float()
        self.hidden = block.pwconv1.out_features
        self.pw2 = Product(self.pw2_weight, self.pw2_bias, precision) if precision == "int8" else None

    @property
    def workspace(self) -> bool:
        """Whether the block writes its hidden activations into the caller's workspace."""
        return self.dense and self.expand is None

    def depthwise(self, x: torch.Tensor, start: int, rows: int) -> torch.Tensor:
        """The depthwise convolution of rows start ... of a buffer with kernel // 2 rows of margin."""
        if self.dense:
            return image_convolution(x, self.dw_image, self.dw_bias, groups=x.size(2))[:, start:start + rows]
        return depthwise(x[:, start:start + rows + self.kernel - 1], self.dw_weight, self.dw_bias)

    def __call__(self, x: torch.Tensor, margin: int, spans: List[Tuple[int, int]],
                 padding: Optional[Padding], hidden: Optional[torch.Tensor],
                 statistics: Optional[torch.Tensor] = None, frame_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: (B, margin + T + margin, C), updated in place; rows past a clip's end (`padding`)
        must be zero, and dense blocks leave them otherwise (see `_dense_second_product`).
        hidden: (B, T, hidden width) workspace where `workspace` is set, else None (each span's
        hidden activations are kept as they come). With several spans (chunks), B must be 1;
        `dense` and `padding` take one.

        GRN pools the sums of squares (B, hidden width) of its input over time: `statistics`
        replaces them (a long input's, gathered over its windows). Returns this input's sums
        over the frames where `frame_mask` (T,) is 1 (all frames by default).
        """
        b = x.size(0)
        # int8 keeps a short input's hidden activations in float32 (in L3) and scales them by
        # GRN before quantising them for the second product. A long input's are quantised at
        # once, and GRN is folded into per-item weights instead: packing those for the int8
        # kernels costs time per block, which only pays over many chunks.
        scaled = self.pw2 is not None and b * (x.size(1) - 2 * margin) <= SCALED_FRAMES
        if self.dense and padding is not None:
            # The rows past each clip's end that the depthwise convolution reads.
            padding.zero(x, margin, self.kernel // 2)
        kept, sumsq, measured = self._first_half(x, margin, spans, padding, hidden, scaled, frame_mask)
        if statistics is not None:
            sumsq = statistics
        gx = sumsq.sqrt()
        nx = gx / (gx.mean(dim=-1, keepdim=True) + 1e-6)
        scales = self.gamma * nx + 1     # GRN's per-channel scale with its residual, (B, hidden width)
        if self.dense:
            self._dense_second_product(x, margin, hidden if self.expand is None else kept[0], scales)
            return measured
        if scaled:
            for (start, rows), hidden_rows in zip(spans, kept):
                q = quantize(hidden_rows.mul_(scales[:, None]))
                for i in range(b):
                    self.pw2.accumulate(q[i], x[i, margin + start:margin + start + rows])
        else:
            for i in range(b):
                pw2 = Product(self.pw2_weight * scales[i], self.pw2_bias, self.precision)
                for j, (start, rows) in enumerate(spans):
                    pw2.accumulate(kept[j][i], x[i, margin + start:margin + start + rows])
        if padding is not None:
            padding.zero(x, margin)
        return measured

    def _first_half(self, x: torch.Tensor, margin: int, spans: List[Tuple[int, int]], padding: Optional[Padding],
                    hidden: Optional[torch.Tensor], scaled: bool, frame_mask: Optional[torch.Tensor]
                    ) -> Tuple[List[Activations], torch.Tensor, torch.Tensor]:
        """Depthwise convolution, LayerNorm and the first product (with GELU) of every span.

        Returns the hidden activations kept for the second product (none where they went into
        the `hidden` workspace), their sums of squares over time (B, hidden width), and those
        sums over the frames of `frame_mask` (the same tensor without one).
        """
        b, _, c = x.shape
        sumsq = torch.zeros(b, self.hidden, device=x.device)
        measured = sumsq if frame_mask is None else torch.zeros_like(sumsq)
        offset = margin - self.kernel // 2
        kept: List[Activations] = []
        for start, rows in spans:
            if self.expand is not None:
                window = x[:, offset + start:offset + start + rows + self.kernel - 1]
                hidden_rows, squares = self.expand(window, self.dw_weight, self.dw_bias, self.eps,
                                                   self.pw1.weight_t, self.pw1.bias,
                                                   None if padding is None else padding.inside(x.device))
                kept.append(hidden_rows)
                sumsq += squares
                if frame_mask is not None:
                    measured += (hidden_rows.float().square() * frame_mask[start:start + rows, None]).sum(1)
                continue
            y = normalise(self.depthwise(x, offset + start, rows), self.eps)
            out = None if hidden is None else hidden[:, start:start + rows].view(-1, self.hidden)
            hidden_rows = self.pw1(y.view(-1, c), out=out).view(b, rows, self.hidden)
            if padding is not None:
                padding.zero(hidden_rows)
            if self.dense:
                if frame_mask is None:
                    # One read of the activations from memory, where squaring a float32 copy
                    # and summing it takes three.
                    sumsq += torch.linalg.vector_norm(hidden_rows, dim=1, dtype=torch.float32).square()
                    continue
                squares = hidden_rows.float().square()
            elif scaled:
                kept.append(hidden_rows)
                squares = hidden_rows.square()
            else:
                kept.append(quantize(hidden_rows))
                squares = hidden_rows.square_()
            sumsq += squares.sum(1)
            if frame_mask is not None:
                measured += (squares * frame_mask[start:start + rows, None]).sum(1)
        return kept, sumsq, measured

    def _dense_second_product(self, x: torch.Tensor, margin: int, hidden: torch.Tensor, scales: torch.Tensor
                              ) -> None:
        """x[:, margin:-margin] (B, T, C) += (hidden * scales) @ W.T + bias, as one batched
        product with GRN's scales folded into per-item weights (B, hidden width, C).

        Past a clip's end the rows keep what they held plus the bias: the next block zeroes the
        rows its convolution reads, and the branch's output is zeroed there; zeroing them all
        here would cost a pass over every row."""
        t = x.size(1) - 2 * margin
        rows = x[:, margin:margin + t]
        weights = (self.pw2_weight[None] * scales[:, None]).transpose(1, 2).to(hidden.dtype)
        if hidden.dtype == x.dtype:
            rows.baddbmm_(hidden[:, :t], weights)
            rows += self.pw2_bias
        else:
            rows += torch.baddbmm(self.pw2_bias.to(hidden.dtype), hidden[:, :t], weights)


class FastBranch:
    """Branch: embed conv -> LayerNorm -> ConvNeXt blocks -> LayerNorm -> Linear, (B, T, C) in and out."""

    def __init__(self, branch: Branch, precision: str, dense: bool = False, compiled: bool = False):
        self.precision = precision
        self.embed = Convolution(branch.embed.weight, branch.embed.bias, precision, dense)
        self.norm_eps, self.final_norm_eps = branch.norm.eps, branch.final_norm.eps
        self.norm_affine = (branch.norm.weight.detach(), branch.norm.bias.detach())
        self.blocks = [FastBlock(block, precision, dense, compiled) for block in branch.blocks]
        self.out = Product(*folded_norm_linear(branch.final_norm, branch.out), precision)
        self.width, self.out_width = branch.out.in_features, branch.out.out_features
        self.margin = max([self.embed.kernel // 2] + [block.kernel // 2 for block in self.blocks])

    def __call__(self, x: torch.Tensor, margin: int, spans: List[Tuple[int, int]],
                 padding: Optional[Padding], out: torch.Tensor, statistics: Optional[List[torch.Tensor]] = None,
                 frame_mask: Optional[torch.Tensor] = None) -> List[torch.Tensor]:
        """x: (B, margin + T + margin, C_in) with zero margins -> out (B, T, C_out), written in place.

        `statistics` and `frame_mask` as in `FastBlock`, one per block; returns each block's sums."""
        b, t = x.size(0), x.size(1) - 2 * margin
        m = self.margin
        residual = margined(b, t, self.width, m, x.device)
        # Dense uncompiled blocks share one workspace, allocated once so that its pages are
        # faulted in once, in the products' precision; the others keep each span's own.
        hidden = x.new_empty(b, t, self.blocks[0].hidden,
                             dtype=product_dtype(self.precision)) if self.blocks and self.blocks[0].workspace else None
        weight, bias = self.norm_affine
        for start, rows in spans:
            y = self.embed(x, margin, start, rows).float()
            residual[:, m + start:m + start + rows] = F.layer_norm(y, (self.width,), weight, bias, self.norm_eps)
        if padding is not None:
            padding.zero(residual, m)
        sums = [block(residual, m, spans, padding, hidden, None if statistics is None else statistics[i], frame_mask)
                for i, block in enumerate(self.blocks)]
        for start, rows in spans:
            y = normalise(residual[:, m + start:m + start + rows], self.final_norm_eps)
            out[:, start:start + rows] = self.out(y.reshape(-1, self.width)).view(b, rows, self.out_width).float()
        return sums


def tf32_products() -> bool:
    """Whether PyTorch lets float32 matrix products run in TF32 (its newer or older setting)."""
    matmul = torch.backends.cuda.matmul
    return matmul.fp32_precision == "tf32" if hasattr(matmul, "fp32_precision") else matmul.allow_tf32


def restore_setting(switch: object, name: str, value: object) -> None:
    """Put a precision setting back. An fp32_precision that is "none" reads as the value it
    inherits, so "none" is tried first: writing that value would pin it against later changes
    above it. (The conv setting's built-in default can only come back as its value, "tf32".)"""
    if name == "fp32_precision":
        setattr(switch, name, "none")
        if getattr(switch, name) == value:
            return
    setattr(switch, name, value)


@contextlib.contextmanager
def tf32(products: bool, convolutions: bool) -> Iterator[None]:
    """Float32 matrix products and cuDNN convolutions in TF32 or not inside the block, PyTorch's
    settings as they were after it. Uses the fp32_precision settings where torch has them
    (2.9 on): mixing them with the older allow_tf32 flags is an error. Only the settings that
    differ are written."""
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    if hasattr(matmul, "fp32_precision"):
        wanted = [(matmul, "fp32_precision", "tf32" if products else "ieee"),
                  (cudnn.conv, "fp32_precision", "tf32" if convolutions else "ieee")]
    else:
        wanted = [(matmul, "allow_tf32", products), (cudnn, "allow_tf32", convolutions)]
    changed = [(switch, name, getattr(switch, name), value) for switch, name, value in wanted
               if getattr(switch, name) != value]
    for switch, name, _, value in changed:
        setattr(switch, name, value)
    try:
        yield
    finally:
        for switch, name, before, _ in reversed(changed):
            restore_setting(switch, name, before)


def inference(method: Callable) -> Callable:
    """`method` without autograd, its float32 convolutions in TF32 exactly when its matrix
    products are: PyTorch allows TF32 for cuDNN's convolutions by default and not for
    products, and float32 should mean float32 throughout."""
    @functools.wraps(method)
    def run(*args, **kwargs):
        products = tf32_products()
        with torch.no_grad(), tf32(products, products):
            return method(*args, **kwargs)
    return run


class FastGenerator:
    """Encoder and decoder (weight norm folded, eval mode) run by the fast forward.

    `chunk_frames` None runs each layer over the whole sequence at once (best on a GPU).
    `compile`: run each ConvNeXt block's first half through torch.compile (`compiled_expand`),
    float32 or bfloat16 only; where torch.compile is unavailable, says so on stderr and runs
    without it. Its outputs differ from the uncompiled path's by float rounding.
    `keep_spectrum`: decoding also returns each clip's predicted spectrum (real, imag), as
    `codec.codec_roundtrip` does (the path that evaluation and training use).
    """

    def __init__(self, encoder: Encoder, decoder: Decoder, h: AttrDict, precision: str = "float32",
                 chunk_frames: Optional[int] = CHUNK_FRAMES, compile: bool = False, keep_spectrum: bool = False):
        if h.causal:
            raise ValueError("the fast forward runs the paper's non-causal codec; a causal one streams instead")
        self.h, self.encoder, self.decoder = h, encoder, decoder
        self.device = next(decoder.parameters()).device
        check_precision(precision, self.device)
        if precision == "int8" and not onednn_int8():
            raise ValueError("--precision int8 needs PyTorch's oneDNN int8 kernels (an x86 build of torch); "
                             "use float32")
        if compile and precision == "int8":
            raise ValueError("--compile runs float32 and bfloat16; int8's products are oneDNN's own kernels")
        problem = compile_problem(self.device) if compile else None
        if problem:
            print(f"compile: {problem}; running without it", file=sys.stderr)
        self.compiled = compile and problem is None
        self.chunk_frames = chunk_frames
        self.keep_spectrum = keep_spectrum
        with torch.no_grad():
            branches = (encoder.amp, encoder.pha, decoder.amp, decoder.pha)
            self.enc_amp, self.enc_pha, self.dec_amp, self.dec_pha = (
                FastBranch(branch, precision, chunk_frames is None, self.compiled) for branch in branches)
            self.amp_out = Convolution(decoder.amp_out.weight, decoder.amp_out.bias, precision, chunk_frames is None)
            # The phase's imaginary and real outputs as one convolution: a shorter (odd, 'same')
            # kernel is zero-padded on both sides to the longer one's size.
            imag, real = decoder.pha_imag.weight, decoder.pha_real.weight
            k = max(imag.size(2), real.size(2))
            imag, real = (F.pad(w, ((k - w.size(2)) // 2,) * 2) for w in (imag, real))
            self.pha_out = Convolution(torch.cat((imag, real)),
                                       torch.cat((decoder.pha_imag.bias, decoder.pha_real.bias)), precision,
                                       chunk_frames is None)
            self.amp_down, self.pha_down = Downsampler(encoder.amp_down), Downsampler(encoder.pha_down)
            self.amp_up, self.pha_up = Upsampler(decoder.amp_up), Upsampler(decoder.pha_up)
        convolutions = [b.embed for b in (self.enc_amp, self.enc_pha, self.dec_amp, self.dec_pha)]
        self.margin = max([c.kernel // 2 for c in convolutions + [self.amp_out, self.pha_out]]
                          + [sampler.needed_margin for sampler in (self.amp_down, self.pha_down, self.amp_up, self.pha_up)])

    def _spans(self, frames: int) -> List[Tuple[int, int]]:
        """(start, rows) of the chunks: at most chunk_frames rows each, of near-equal sizes (a
        short last chunk would run its products at a poor rate)."""
        if frames == 0:
            return []
        count = -(-frames // (self.chunk_frames or frames))
        bounds = [frames * k // count for k in range(count + 1)]
        return [(start, stop - start) for start, stop in zip(bounds, bounds[1:])]

    def _batches(self, items: Sequence) -> List[Sequence]:
        """Chunked runs take one clip at a time (a batch's chunks would not be contiguous rows)."""
        return [[item] for item in items] if self.chunk_frames else [items] if items else []

    def _run_branch(self, branch: FastBranch, x: torch.Tensor, lengths: Sequence[int], frames: int,
                    statistics: Optional[List[torch.Tensor]] = None, frame_mask: Optional[torch.Tensor] = None
                    ) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """x (B, margin + T + margin, C_in) -> (B, margin + T + margin, C_out), zero outside each clip,
        and the branch's GRN sums (see `FastBranch`)."""
        m = self.margin
        out = margined(x.size(0), frames, branch.out_width, m, x.device)
        padding = None if all(n == frames for n in lengths) else Padding(lengths, frames)
        if padding is not None:
            # An upsampler's output runs past a shorter clip's frames; alone, that clip has none there.
            padding.zero(x, m)
        sums = branch(x, m, self._spans(frames), padding, out[:, m:m + frames], statistics, frame_mask)
        if padding is not None:
            padding.zero(out, m)
        return out, sums

    def _branches(self, audio: Sequence[torch.Tensor], statistics: Optional[List[torch.Tensor]] = None,
                  counted: Optional[Tuple[int, int]] = None
                  ) -> Tuple[torch.Tensor, torch.Tensor, List[int], List[torch.Tensor]]:
        """Clips (L_i,) -> the encoder branches' outputs (B, margin + T + margin, C) (amplitude,
        phase), each clip's T_i, and the GRN sums of every encoder block (amplitude's, then
        phase's). `statistics`: those sums to use instead (see `encoder_statistics`); `counted`:
        the samples [start, end) whose frames count toward the returned sums."""
        h, m = self.h, self.margin
        padded = [centred(pad_for_analysis(a.float(), h.n_fft, h.hop_size), h.n_fft) for a in audio]
        lengths = [analysis_frames(a.numel(), h.n_fft, h.hop_size) for a in audio]
        frames = max(lengths)
        logamp = margined(len(audio), frames, h.n_fft // 2 + 1, m, self.device)
        phase = margined(len(audio), frames, h.n_fft // 2 + 1, m, self.device)
        for i, (signal, n) in enumerate(zip(padded, lengths)):
            logamp[i, m + n:] = 0
            phase[i, m + n:] = 0
            for start, rows in self._spans(n):
                spec = stft_rows(signal, start, rows, h.n_fft, h.hop_size, h.win_size)
                # Contiguous parts: on the complex tensor's strided views atan2 runs a scalar loop,
                # several times slower than the vectorised one (which differs by at most 1 ulp).
                logamp[i, m + start:m + start + rows], phase[i, m + start:m + start + rows] = \
                    log_amplitude_and_phase(spec.real.contiguous(), spec.imag.contiguous())
        frame_mask = None
        if counted is not None:
            centres = torch.arange(frames, device=self.device) * h.hop_size
            frame_mask = ((centres >= counted[0]) & (centres < counted[1])).float()
        split = len(self.enc_amp.blocks)
        amp, amp_sums = self._run_branch(self.enc_amp, logamp, lengths, frames,
                                         None if statistics is None else statistics[:split], frame_mask)
        pha, pha_sums = self._run_branch(self.enc_pha, phase, lengths, frames,
                                         None if statistics is None else statistics[split:], frame_mask)
        return amp, pha, lengths, amp_sums + pha_sums

    def _encode(self, audio: Sequence[torch.Tensor], n_codebooks: Optional[int],
                statistics: Optional[List[torch.Tensor]] = None) -> Tuple[torch.Tensor, torch.Tensor, List[int]]:
        """Clips (L_i,) -> quantised latent (B, D, T'), codes (B, n, T') and each clip's T'_i."""
        h, m = self.h, self.margin
        amp, pha, lengths, _ = self._branches(audio, statistics)
        frames = max(lengths)
        down = torch.cat((self.amp_down(amp, m, frames), self.pha_down(pha, m, frames)), 2).transpose(1, 2)
        latent_lengths = [-(-n // h.ratio) for n in lengths]
        latent = self.encoder.latent_conv(self._masked(down, latent_lengths))
        quantized = self.encoder.quantizer(latent, n_codebooks)
        return quantized.latent, quantized.codes, latent_lengths

    def _masked(self, x: torch.Tensor, lengths: Sequence[int]) -> torch.Tensor:
        """(B, C, T) with frames past each item's length zeroed."""
        if all(n == x.size(-1) for n in lengths):
            return x
        return x * Padding(lengths, x.size(-1)).inside(x.device).transpose(1, 2)

    def _decode(self, latent: torch.Tensor, latent_lengths: Sequence[int]) -> List[Dict[str, torch.Tensor]]:
        """Quantised latent (B, D, T') -> per clip its audio (hop * (ratio * T'_i - 1),) (and spectrum)."""
        h, dec = self.h, self.decoder
        latent = self._masked(dec.latent_conv(self._masked(latent.float(), latent_lengths)), latent_lengths)
        lengths = [n * h.ratio for n in latent_lengths]
        frames = latent.size(-1) * h.ratio
        amp, _ = self._run_branch(self.dec_amp, self.amp_up(latent, self.margin), lengths, frames)
        pha, _ = self._run_branch(self.dec_pha, self.pha_up(latent, self.margin), lengths, frames)
        return self._synthesis(amp, pha, lengths, frames)

    def _synthesis(self, amp: torch.Tensor, pha: torch.Tensor, lengths: Sequence[int], frames: int
                   ) -> List[Dict[str, torch.Tensor]]:
        """Branch outputs (B, margin + T + margin, C) -> per clip the spectrum (as Decoder.spectra)
        and its iSTFT, chunk by chunk; the spectrum is kept only when `keep_spectrum` is set."""
        h, m = self.h, self.margin
        bins = h.n_fft // 2 + 1
        synthesis = [OverlapAdd(n, h.n_fft, h.hop_size, h.win_size, self.device) for n in lengths]
        kept: List[List[torch.Tensor]] = [[] for _ in lengths]
        for start, rows in self._spans(frames):
            logamp = self.amp_out(amp, m, start, rows).float()
            pha_ir = self.pha_out(pha, m, start, rows).float()
            spec = polar_spectrum(logamp, pha_ir[..., :bins], pha_ir[..., bins:])
            for i, n in enumerate(lengths):
                if start < n:
                    synthesis[i].add(start, spec[i, :n - start])
                    if self.keep_spectrum:
                        kept[i].append(spec[i, :n - start])
        outputs = []
        for ola, chunks in zip(synthesis, kept):
            out = {"audio": ola.audio()}
            if chunks:
                spectrum = torch.cat(chunks).t()
                out.update(real=spectrum.real, imag=spectrum.imag)
            outputs.append(out)
        return outputs

    def _with_statistics(self, items: Sequence, statistics: Optional[List[torch.Tensor]]
                         ) -> Iterator[Tuple[Sequence, Optional[List[torch.Tensor]]]]:
        """Each batch of items with its rows of `statistics` (None stays None)."""
        start = 0
        for batch in self._batches(items):
            yield batch, None if statistics is None else [s[start:start + len(batch)] for s in statistics]
            start += len(batch)

    @inference
    def encoder_statistics(self, audio: Sequence[torch.Tensor], counted: Tuple[int, int]) -> List[torch.Tensor]:
        """Clips (L_i,) -> the GRN sums of squares of every encoder block, (B, hidden width) each,
        over the frames centred on samples counted[0] ... counted[1] - 1.

        GRN pools over the whole input, so a long input coded in windows differs slightly from
        one pass over it, and a code that is nearly tied between two entries can flip. Summed
        over the windows (each counting the samples it alone owns), these sums stand in for the
        encoder's statistics over the whole input, to pass to `encode` or `roundtrip` for each
        window. They are exact for each branch's first block; a later block's input was computed
        with the window's own statistics for the blocks before it (in tests within 0.3% of one
        pass's sums, and no code flipped).
        """
        parts = [self._branches(batch, counted=counted)[3] for batch in self._batches(audio)]
        return [torch.cat(block) for block in zip(*parts)]

    @inference
    def encode(self, audio: Sequence[torch.Tensor], n_codebooks: Optional[int] = None,
               statistics: Optional[List[torch.Tensor]] = None) -> List[torch.Tensor]:
        """Clips (L_i,) -> their codes (n, T'_i), the first `n_codebooks` stages (all by default);
        `statistics`: the encoder's GRN statistics (see `encoder_statistics`) instead of the clips' own."""
        codes = []
        for batch, stats in self._with_statistics(audio, statistics):
            _, batch_codes, lengths = self._encode(batch, n_codebooks, stats)
            codes += [c[:, :n] for c, n in zip(batch_codes, lengths)]
        return codes

    @inference
    def decode(self, codes: Sequence[torch.Tensor]) -> List[Dict[str, torch.Tensor]]:
        """Codes (n, T'_i) -> per clip its audio (hop * (ratio * T'_i - 1),) and, with
        `keep_spectrum`, the predicted spectrum real, imag (F, ratio * T'_i)."""
        outputs = []
        for batch in self._batches(codes):
            lengths = [c.size(-1) for c in batch]
            padded = torch.stack([F.pad(c, (0, max(lengths) - n)) for c, n in zip(batch, lengths)])
            outputs += self._decode(self.encoder.latent_from_codes(padded.to(self.device)), lengths)
        return outputs

    @inference
    def roundtrip(self, audio: Sequence[torch.Tensor], n_codebooks: Optional[int] = None,
                  statistics: Optional[List[torch.Tensor]] = None) -> List[Dict[str, torch.Tensor]]:
        """Clips (L_i,) -> per clip its codes (n, T'_i) and audio (L_i,) (and with `keep_spectrum`
        the predicted spectrum real/imag (F, T_i)), as `codec.codec_roundtrip` gives each alone;
        `statistics` as in `encode`."""
        outputs = []
        for batch, stats in self._with_statistics(audio, statistics):
            latent, codes, lengths = self._encode(batch, n_codebooks, stats)
            for out, clip, c, n in zip(self._decode(latent, lengths), batch, codes, lengths):
                outputs.append(dict(out, codes=c[:, :n], audio=out["audio"][:clip.numel()]))
        return outputs
