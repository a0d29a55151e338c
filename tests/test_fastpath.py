"""fastpath.py: the reference numbers in float32, batches equal to single clips, reduced precision close."""
import copy
import os

import numpy as np
import pytest
import soundfile as sf
import torch
import torch.nn.functional as F

import demo
import fastpath
import inference
import metrics
import train
from codec import Codec, codec_roundtrip
from config import build_config, read_config_file, save_config
from conftest import ROOT, TINY, make_config, tone, untrained_norms, write_tone
from fastpath import FastGenerator, Product
from utils import compile_problem
from models import Decoder, Encoder, remove_weight_norm
from test_inference import _save_random_codec

# Max abs audio difference allowed against the reference path in float32, on audio peaking near
# 0.1: rounding reaches 5e-7 (on one thread or two), while a LayerNorm given PyTorch's default eps
# instead of the model's moves it by 6e-5.
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def model():
    """Full-size random modules with GRN and LayerNorm given weights (see `untrained_norms`)."""
    torch.manual_seed(0)
    h = make_config()
    encoder, decoder = untrained_norms(remove_weight_norm(Encoder(h)).eval(), remove_weight_norm(Decoder(h)).eval())
    return h, encoder, decoder


def _clip(length, seed):
    return torch.from_numpy(tone((length + 1) / 48000, seed=seed, f0=110.0 + 20 * seed)[:length])


def _clips(*lengths):
    """Tones of these lengths, each of its own pitch and phase."""
    return [_clip(n, seed) for seed, n in enumerate(lengths)]


def _unlike_clips():
    """Loud white noise, a short quiet sine and a tone: clips whose GRN statistics differ widely,
    of very different lengths, so that a clip in a padded batch pooling another's statistics
    or its padding's changes them far beyond rounding."""
    noise = 0.5 * torch.randn(30011, generator=torch.Generator().manual_seed(0))
    sine = 1e-3 * torch.sin(2 * torch.pi * 440 / 48000 * torch.arange(700))
    return [noise, sine, _clip(4801, 2)]


def _assert_batched_statistics_are_each_clips(batched, alone, tolerance):
    """A padded batch's GRN sums of every encoder block (each clip's, over all its frames) are the
    clip's own alone, within `tolerance` of their norm. Sums come before the quantizer, so the
    reduced precisions' rounding alone moves them, not codes that it flips."""
    clips = _unlike_clips()
    counted = (0, max(c.numel() for c in clips))
    for b, a in zip(batched.encoder_statistics(clips, counted), alone.encoder_statistics(clips, counted)):
        assert ((b - a).norm(dim=1) < tolerance * a.norm(dim=1)).all()


@pytest.mark.parametrize("length", [1, 700, 4801, 30011])
def test_float32_equals_the_reference_path(model, length):
    """Chunks of 64 frames (several, the last one short) give codec_roundtrip's codes and audio."""
    h, encoder, decoder = model
    audio = _clip(length, 0)
    reference = codec_roundtrip(encoder, decoder, audio[None], h)
    out = FastGenerator(encoder, decoder, h, chunk_frames=64, keep_spectrum=True).roundtrip([audio])[0]
    assert torch.equal(out["codes"], reference["codes"][0])
    assert out["audio"].shape == (length,)
    assert (out["audio"] - reference["audio"][0]).abs().max() < TOLERANCE
    scale = reference["real"].abs().max()
    assert (out["real"] - reference["real"][0]).abs().max() < 1e-3 * scale
    assert (out["imag"] - reference["imag"][0]).abs().max() < 1e-3 * scale


@pytest.mark.parametrize("real, imag", [(5, 7), (7, 3)])
def test_phase_outputs_of_different_kernels_equal_the_reference_path(real, imag):
    """The phase's real and imaginary output convolutions run as one, the shorter kernel padded."""
    h = make_config(**TINY, PHA_Decoder_output_R_conv_kernel_size=real, PHA_Decoder_output_I_conv_kernel_size=imag)
    torch.manual_seed(0)
    encoder, decoder = remove_weight_norm(Encoder(h)).eval(), remove_weight_norm(Decoder(h)).eval()
    audio = _clip(4801, 1)
    reference = codec_roundtrip(encoder, decoder, audio[None], h)
    out = FastGenerator(encoder, decoder, h, chunk_frames=64).roundtrip([audio])[0]
    assert torch.equal(out["codes"], reference["codes"][0])
    assert (out["audio"] - reference["audio"][0]).abs().max() < TOLERANCE


def test_fewer_codebooks_and_codes_decode_like_the_reference(model):
    h, encoder, decoder = model
    audio = _clip(9000, 1)
    fast = FastGenerator(encoder, decoder, h)
    reference = codec_roundtrip(encoder, decoder, audio[None], h, n_codebooks=2)
    out = fast.roundtrip([audio], n_codebooks=2)[0]
    assert out["codes"].shape == (2, reference["codes"].size(-1))
    assert torch.equal(out["codes"], reference["codes"][0])
    assert (out["audio"] - reference["audio"][0]).abs().max() < TOLERANCE
    codes = fast.encode([audio])
    assert torch.equal(codes[0], codec_roundtrip(encoder, decoder, audio[None], h)["codes"][0])
    # Decoding the codes looks the codebook rows up instead of the straight-through latent.
    latent = encoder.latent_from_codes(codes[0][None])
    expected = decoder(latent)[-1][0, 0]
    decoded = fast.decode(codes)[0]["audio"]
    assert decoded.shape == expected.shape and (decoded - expected).abs().max() < TOLERANCE


def test_a_batch_of_different_lengths_equals_one_clip_at_a_time(model):
    """The batched forward (a GPU's) pads, masks the padding out of every layer and of GRN's
    pooling, and trims: each clip gets what it gets alone."""
    h, encoder, decoder = model
    clips = _clips(30011, 700, 48000, 4801, 1)
    batched = FastGenerator(encoder, decoder, h, chunk_frames=None).roundtrip(clips)
    alone = FastGenerator(encoder, decoder, h).roundtrip(clips)
    for clip, b, a in zip(clips, batched, alone):
        assert b["audio"].shape == a["audio"].shape == clip.shape
        assert torch.equal(b["codes"], a["codes"])
        assert (b["audio"] - a["audio"]).abs().max() < TOLERANCE


_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("device, precision, compile", [
    ("cpu", "float32", False),
    pytest.param("cuda", "float32", False, marks=_CUDA),
    pytest.param("cuda", "bfloat16", False, marks=_CUDA),
    pytest.param("cuda", "bfloat16", True, marks=_CUDA)])
def test_padded_batches_on_each_device_equal_the_cpu_clips_alone(model, device, precision, compile):
    """What a GPU runs for a folder of clips (one padded batch; Triton's kernels when compiled)
    against the CPU's float32 path one clip at a time: float32 equal up to rounding, bfloat16
    near it. The CPU case checks the check."""
    device = torch.device(device)
    if compile:
        problem = compile_problem(device)
        if problem:
            pytest.skip(problem)
    h, encoder, decoder = model
    clips = _clips(30011, 700, 48000, 4801, 1)
    expected = FastGenerator(encoder, decoder, h).roundtrip(clips)
    on_device = [copy.deepcopy(module).to(device) for module in (encoder, decoder)]
    fast = FastGenerator(*on_device, h, precision, chunk_frames=None, compile=compile)
    assert fast.compiled == compile
    got = fast.roundtrip([clip.to(device) for clip in clips])
    for clip, g, e in zip(clips, got, expected):
        audio, codes = g["audio"].cpu(), g["codes"].cpu()
        assert audio.shape == e["audio"].shape == clip.shape and codes.shape == e["codes"].shape
        if precision == "float32":
            # Another device's kernels sum in another order: rounding, allowed 10 times the CPU's.
            assert torch.equal(codes, e["codes"]) and (audio - e["audio"]).abs().max() < 10 * TOLERANCE
        else:
            assert (audio - e["audio"]).pow(2).sum() <= 0.1 * e["audio"].pow(2).sum()
    if precision != "float32":
        same = torch.cat([(g["codes"].cpu() == e["codes"]).flatten() for g, e in zip(got, expected)])
        assert same.float().mean() >= 0.95


@pytest.mark.parametrize("chunk_frames", [fastpath.CHUNK_FRAMES, None])
def test_no_clips_give_no_outputs(model, chunk_frames):
    h, encoder, decoder = model
    fast = FastGenerator(encoder, decoder, h, chunk_frames=chunk_frames)
    assert fast.roundtrip([]) == fast.encode([]) == fast.decode([]) == []


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_dense_convolutions_equal_the_chunked_ones(precision):
    """Without chunks the convolutions run as single kernels on a batch; they equal the
    per-tap products and the depthwise sum of the chunked path, in the same margins."""
    torch.manual_seed(0)
    margin, start, rows = 4, 3, 40
    x = F.pad(torch.randn(3, 50, 24), (0, 0, margin, margin))
    conv = torch.nn.Conv1d(24, 10, 7)
    dense = fastpath.Convolution(conv.weight, conv.bias, precision, dense=True)
    chunked = fastpath.Convolution(conv.weight, conv.bias, precision)
    expected = conv(x.transpose(1, 2)).transpose(1, 2)[:, margin - 3 + start:][:, :rows]
    for got in (dense(x, margin, start, rows), chunked(x, margin, start, rows)):
        assert got.shape == (3, rows, 10)
        assert (got.float() - expected).abs().max() < (1e-5 if precision == "float32" else 0.05)
    block = remove_weight_norm(Encoder(make_config(**TINY))).amp.blocks[0]
    torch.nn.init.normal_(block.dwconv.bias)
    k = block.dwconv.kernel_size[0]
    frames = torch.randn(2, 30, block.dwconv.in_channels)
    stream = F.pad(frames, (0, 0, k // 2, k // 2))
    depthwise = block.dwconv(frames.transpose(1, 2)).transpose(1, 2)   # zero 'same' padding
    for dense in (True, False):
        got = fastpath.FastBlock(block, precision, dense).depthwise(stream, 0, 30)
        assert (got - depthwise).abs().max() < 1e-5




@pytest.fixture
def precision_settings():
    """torch's fp32_precision settings as they were, after the test (monkeypatch cannot: from
    pytest 9.2 it deletes an attribute that is not in the object's __dict__)."""
    if not hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        pytest.skip("torch before 2.9 has the allow_tf32 flags alone")
    switches = (torch.backends.cuda.matmul, torch.backends.cudnn.conv, torch.backends)
    initial = [switch.fp32_precision for switch in switches]
    products = torch.get_float32_matmul_precision()
    yield
    torch.set_float32_matmul_precision(products)    # what the older flags change
    for switch, value in zip(switches, initial):
        fastpath.restore_setting(switch, "fp32_precision", value)


@pytest.mark.parametrize("setting", ["default", "matmul_tf32", "global_tf32", "conv_ieee", "legacy_tf32"])
def test_float32_convolutions_use_tf32_exactly_when_products_do(setting, precision_settings, monkeypatch):
    """PyTorch lets cuDNN's convolutions use TF32 by default and products not: in the fast
    path every convolution (the dense ones and the modules') follows the products' setting,
    however it was made (torch's fp32_precision settings or the older flags, which may not
    be mixed with them), and the settings come back afterwards."""
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    if setting == "matmul_tf32":
        matmul.fp32_precision = "tf32"
    elif setting == "global_tf32":
        torch.backends.fp32_precision = "tf32"
    elif setting == "conv_ieee":
        conv.fp32_precision = "ieee"
    elif setting == "legacy_tf32":
        torch.backends.cuda.matmul.allow_tf32 = True
    tf32 = setting in ("matmul_tf32", "global_tf32", "legacy_tf32")
    seen, conv1d, conv2d = [], F.conv1d, F.conv2d
    monkeypatch.setattr(F, "conv1d", lambda *a, **k: seen.append(conv.fp32_precision) or conv1d(*a, **k))
    monkeypatch.setattr(F, "conv2d", lambda *a, **k: seen.append(conv.fp32_precision) or conv2d(*a, **k))
    before = (matmul.fp32_precision, conv.fp32_precision, torch.backends.fp32_precision)
    h = make_config(**TINY)
    fast = FastGenerator(remove_weight_norm(Encoder(h)).eval(), remove_weight_norm(Decoder(h)).eval(), h,
                         chunk_frames=None)
    fast.roundtrip([_clip(4000, 0), _clip(3000, 1)])
    assert len(seen) > 10 and set(seen) == {"tf32" if tf32 else "ieee"}
    assert fastpath.tf32_products() == tf32
    assert (matmul.fp32_precision, conv.fp32_precision, torch.backends.fp32_precision) == before
    if setting == "global_tf32":
        # The products' setting still follows the global one: the call did not pin what it inherited.
        torch.backends.fp32_precision = "ieee"
        assert not fastpath.tf32_products()


def test_padding_zeroes_the_rows_past_each_clip_end():
    padding = fastpath.Padding([5, 2, 7], frames=7)
    x = torch.ones(3, 11, 4)
    padding.zero(x, offset=2, count=3)
    kept = torch.ones(3, 11, dtype=torch.bool)
    kept[0, 7:9] = kept[1, 4:7] = False           # frames 5-6 (T ends it) and 2-4, after 2 rows
    assert torch.equal(x, kept[..., None].float().expand(3, 11, 4))
    padding.zero(x, offset=2)                     # every frame past the end, up to T = 7
    kept[1, 4:9] = False
    assert torch.equal(x, kept[..., None].float().expand(3, 11, 4))


@pytest.mark.parametrize("extra_margin", [0, 2])
@pytest.mark.parametrize("kernel, stride", [(7, 8), (9, 4), (1, 2), (3, 3)])
def test_downsampler_equals_the_strided_convolution(kernel, stride, extra_margin):
    """Kernels shorter than, longer than and equal to the stride, on a batch of two, with the
    least margin it needs and more."""
    torch.manual_seed(kernel)
    conv = torch.nn.Conv1d(6, 5, kernel, stride, padding=kernel // 2)
    x = torch.randn(2, 6, 37)
    margin = kernel // 2 + extra_margin
    rows = fastpath.margined(2, 37, 6, margin, torch.device("cpu"))
    rows[:, margin:margin + 37] = x.transpose(1, 2)
    with torch.no_grad():
        got, expected = fastpath.Downsampler(conv)(rows, margin, 37), conv(x).transpose(1, 2)
    assert got.shape == expected.shape == (2, -(-37 // stride), 5)
    assert (got - expected).abs().max() < 1e-5


@pytest.mark.parametrize("extra_margin", [0, 2])
@pytest.mark.parametrize("kernel, stride", [(16, 8), (10, 8), (8, 8), (6, 2), (5, 3)])
def test_upsampler_equals_the_transposed_convolution(kernel, stride, extra_margin):
    """Kernels of whole and partial blocks of the stride, into rows with zero margins (the
    least it needs and more), over a buffer whose old contents are NaN."""
    torch.manual_seed(kernel)
    conv = torch.nn.ConvTranspose1d(6, 5, kernel, stride, padding=(kernel - stride) // 2)
    x = torch.randn(2, 6, 9)
    upsampler = fastpath.Upsampler(conv)
    margin = upsampler.needed_margin + extra_margin
    with torch.no_grad():
        expected = F.pad(conv(x), (margin, margin)).transpose(1, 2)
        empty = torch.empty
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(torch, "empty", lambda *args, **kwargs: empty(*args, **kwargs).fill_(float("nan")))
            got = upsampler(x, margin)
    assert got.shape == expected.shape == (2, 9 * stride + 2 * margin, 5)
    assert (got - expected).abs().max() < 1e-5


@pytest.mark.parametrize("chunk_frames, compile", [(fastpath.CHUNK_FRAMES, False), (None, False), (None, True)])
def test_bfloat16_codec_stays_near_float32_alone_and_batched(model, chunk_frames, compile):
    """bfloat16, chunked one clip at a time (a CPU's way) and as one dense batch (a GPU's),
    also compiled, near float32: the codes nearly all those of float32 (a near-tie may flip),
    and the audio near float32's decoding of the same codes (error energy measured at 1-3e-4
    of the signal's). The batch's GRN statistics are each clip's own as bfloat16
    gathers them alone, within 2%: rounding moves them by 0.4%, a mix-up of clips by 19% or more."""
    if compile:
        _compiler_or_skip()
    h, encoder, decoder = model
    clips = _clips(30011, 700, 4801)
    exact = FastGenerator(encoder, decoder, h).roundtrip(clips)
    fast = FastGenerator(encoder, decoder, h, "bfloat16", chunk_frames=chunk_frames, compile=compile)
    approx = fast.roundtrip(clips)
    decoded = FastGenerator(encoder, decoder, h).decode([a["codes"] for a in approx])
    for a, e, d in zip(approx, exact, decoded):
        assert a["audio"].shape == e["audio"].shape and a["codes"].shape == e["codes"].shape
        assert (a["codes"] == e["codes"]).float().mean() >= 0.97
        same_codes = d["audio"][:a["audio"].numel()]
        assert (a["audio"] - same_codes).pow(2).sum() < 5e-3 * same_codes.pow(2).sum()
    if chunk_frames is None:
        _assert_batched_statistics_are_each_clips(fast, FastGenerator(encoder, decoder, h, "bfloat16"), 0.02)


def test_dense_batches_gather_grn_statistics_like_clips_alone(model):
    """The GPU's whole batches gather each clip's GRN sums over its counted samples, as a clip
    alone in chunks does (a long file's windows on a GPU rely on them)."""
    h, encoder, decoder = model
    clips = _clips(30011, 4801, 12000)
    counted = (1000, 9000)
    batched = FastGenerator(encoder, decoder, h, chunk_frames=None).encoder_statistics(clips, counted)
    chunked = FastGenerator(encoder, decoder, h).encoder_statistics(clips, counted)
    assert len(batched) == len(chunked) == 2 * h.convnext_layers
    for b, c in zip(batched, chunked):
        assert b.shape == c.shape == (3, h.convnext_hidden_dim) and c.min() > 0
        assert torch.allclose(b, c, rtol=1e-4)

@pytest.mark.parametrize("bits", [8, 7])
@pytest.mark.parametrize("scaled_frames", [fastpath.SCALED_FRAMES, 0])
def test_int8_codec_stays_near_float32_alone_and_batched(model, scaled_frames, bits, monkeypatch):
    """int8 on the full-size model (random weights, so loose bounds; the slow test checks a
    trained one): near the float32 output for each clip, chunked one at a time and as one
    padded batch, where each clip's GRN statistics and scale must stay its own. Both ways of
    applying GRN run: to the activations (these short clips) and folded into the weights;
    with 8-bit activations and with the 7 bits of CPUs without VNNI. The batch's GRN statistics
    stay within 5% (8 bits) or 8% (7 bits) of each clip's alone in int8: the activations'
    rounding, quantised over the batch, moves them by 1.3% or 2.8%, a mix-up of clips by 19% or more."""
    if bits == 7:
        monkeypatch.setattr(fastpath, "vnni", lambda fbgemm=False: False)
    elif not fastpath.vnni():
        pytest.skip("8-bit activations need VNNI")
    monkeypatch.setattr(fastpath, "SCALED_FRAMES", scaled_frames)
    h, encoder, decoder = model
    clips = _clips(30011, 700, 4801)
    exact = FastGenerator(encoder, decoder, h).roundtrip(clips)
    error, agreement, statistics = (0.2, 0.95, 0.05) if bits == 8 else (0.4, 0.9, 0.08)
    alone, batched = (FastGenerator(encoder, decoder, h, "int8", chunk_frames=n)
                      for n in (fastpath.CHUNK_FRAMES, None))
    for fast in (alone, batched):
        approx = fast.roundtrip(clips)
        for a, e in zip(approx, exact):
            assert a["audio"].shape == e["audio"].shape and a["codes"].shape == e["codes"].shape
            assert (a["audio"] - e["audio"]).pow(2).sum() < error * e["audio"].pow(2).sum()
        # Over all frames: one flipped frame of the 16 of the shortest clip is 6% of its codes.
        same = torch.cat([(a["codes"] == e["codes"]).flatten() for a, e in zip(approx, exact)])
        assert same.float().mean() >= agreement
    _assert_batched_statistics_are_each_clips(batched, alone, statistics)


@pytest.mark.parametrize("scaled_frames", [fastpath.SCALED_FRAMES, 0])
def test_int8_gathers_and_takes_grn_statistics_like_float32(model, scaled_frames, monkeypatch):
    """The windows of a long file are coded with the file's GRN statistics: int8 gathers sums
    over the counted samples near float32's, and codes with the statistics it is given."""
    monkeypatch.setattr(fastpath, "SCALED_FRAMES", scaled_frames)
    h, encoder, decoder = model
    clip, other = _clip(30011, 0), _clip(30011, 5)
    exact, approx = FastGenerator(encoder, decoder, h), FastGenerator(encoder, decoder, h, "int8")
    # Sums over samples [0, 5000) and [5000, end) add up to the whole clip's.
    whole, first, rest = (exact.encoder_statistics([clip], span) for span in ((0, 30011), (0, 5000), (5000, 30011)))
    for w, f, r in zip(whole, first, rest):
        assert torch.allclose(f + r, w, rtol=1e-4) and (f < 0.5 * w).all()
    counted = (5000, 20000)
    for a, e in zip(approx.encoder_statistics([clip], counted), exact.encoder_statistics([clip], counted)):
        assert (a - e).norm() < 0.05 * e.norm()
    foreign = exact.encoder_statistics([other], (0, other.numel()))
    given = exact.encode([clip], statistics=foreign)[0]
    own = exact.encode([clip])[0]
    got = approx.encode([clip], statistics=foreign)[0]
    assert (given != own).float().mean() > 0.05     # the statistics matter here (9% of codes)
    assert (got == given).float().mean() >= 0.95 and (got == given).sum() > (got == own).sum()


@pytest.mark.parametrize("precision,tolerance", [("bfloat16", 0.02), ("int8", 0.03)])
@pytest.mark.parametrize("transposed", [False, True])
def test_products_in_reduced_precision_are_close(precision, tolerance, transposed):
    torch.manual_seed(0)
    weight, bias, x = torch.randn(96, 160) / 12, torch.randn(96), torch.randn(300, 160)
    if transposed:   # the same values, held column-major
        weight = weight.t().contiguous().t()
    exact = x @ weight.t() + bias
    product = Product(weight, bias, precision)
    got = product(x).float()
    assert (got - exact).norm() < tolerance * exact.norm()
    out = torch.ones(2, 300, 96)
    product.accumulate(x, out[1])
    assert torch.equal(out[0], torch.ones(300, 96))
    assert (out[1] - 1 - exact).norm() < tolerance * exact.norm()
    strided = torch.ones(96, 300).t()
    product.accumulate(x, strided)
    assert (strided - 1 - exact).norm() < tolerance * exact.norm()
    activated = Product(weight, bias, precision, gelu=True)(x).float()
    assert (activated - F.gelu(exact)).norm() < tolerance * F.gelu(exact).norm()


def test_int8_takes_activations_quantised_once():
    torch.manual_seed(0)
    x = torch.randn(2, 50, 40) * 3
    q = fastpath.quantize(x)
    assert q.values.dtype == torch.uint8 and not q.values.is_quantized and q.values.shape == x.shape
    assert (q.scale * (q.values.float() - q.zero_point) - x).abs().max() <= q.scale / 2 + 1e-6
    weight = torch.randn(24, 40) / 6
    product = Product(weight, None, "int8")
    exact = x[:, 5:15].reshape(-1, 40) @ weight.t()
    assert (product(q.rows(5, 15)) - exact).norm() < 0.03 * exact.norm()


def test_int8_keeps_seven_bits_without_vnni(monkeypatch):
    monkeypatch.setattr(fastpath, "vnni", lambda fbgemm=False: False)
    x = torch.linspace(-4, 9, 1000)
    q = fastpath.quantize(x)
    assert q.values.max() <= 127 and q.values.max() >= 126
    assert (q.scale * (q.values.float() - q.zero_point) - x).abs().max() <= q.scale / 2 + 1e-6
    assert "7-bit activations" in fastpath.kernels("int8", torch.device("cpu"))
    torch.manual_seed(0)
    weight, inputs = torch.randn(32, 64) / 8, torch.randn(100, 64)
    exact = inputs @ weight.t()
    assert (Product(weight, None, "int8")(inputs) - exact).norm() < 0.03 * exact.norm()


def test_float32_product_is_exact():
    torch.manual_seed(0)
    weight, bias, x = torch.randn(8, 5), torch.randn(8), torch.randn(7, 5)
    product = Product(weight, bias, "float32")
    assert torch.allclose(product(x), x @ weight.t() + bias, atol=1e-6)
    out = torch.randn(7, 8)
    expected = out + x @ weight.t() + bias
    product.accumulate(x, out)
    assert torch.allclose(out, expected, atol=1e-6)


def test_auto_precision_follows_the_hardware(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(fastpath, "cpu_flags", lambda: {"avx512f", "amx_bf16", "avx512_bf16"})
    assert fastpath.resolve_precision("auto", cpu) == "bfloat16"
    monkeypatch.setattr(fastpath, "cpu_flags", lambda: {"avx512f", "avx512_bf16", "avx512_vnni"})
    assert fastpath.resolve_precision("auto", cpu) == "int8"
    monkeypatch.setattr(fastpath, "cpu_flags", lambda: {"avx2"})
    assert fastpath.resolve_precision("auto", cpu) == "int8"
    assert fastpath.resolve_precision("float32", cpu) == "float32"
    assert fastpath.reduced_precision(torch.device("cuda")) == "bfloat16"
    line = fastpath.kernels("int8", cpu)
    assert "int8" in line and "oneDNN" in line and "avx2" not in line
    streamed = fastpath.kernels("int8", cpu, stream=True)   # a stream's few rows run on fbgemm
    assert "fbgemm" in streamed and "oneDNN" not in streamed
    monkeypatch.setattr(fastpath.platform, "machine", lambda: "arm64")   # no oneDNN int8 kernels there
    assert fastpath.resolve_precision("auto", cpu) == "bfloat16"


def test_bad_precision_and_causal_models_are_refused(model, monkeypatch):
    h, encoder, decoder = model
    with pytest.raises(ValueError, match="--precision must be one of float32, bfloat16, int8, got 'fp8'"):
        FastGenerator(encoder, decoder, h, "fp8")
    with pytest.raises(ValueError, match="--compile runs float32 and bfloat16"):
        FastGenerator(encoder, decoder, h, "int8", compile=True)
    monkeypatch.setattr(fastpath.platform, "machine", lambda: "arm64")
    with pytest.raises(ValueError, match="int8 needs PyTorch's oneDNN int8 kernels"):
        FastGenerator(encoder, decoder, h, "int8")
    causal = make_config(**TINY, causal=True)
    with pytest.raises(ValueError, match="non-causal"):
        FastGenerator(Encoder(causal), Decoder(causal), causal)
    with pytest.raises(ValueError, match="--compile applies to the paper's codec"):
        Codec(causal, Encoder(causal), Decoder(causal), torch.device("cpu"), compile=True)
    monkeypatch.setattr(fastpath, "reduced_precision", lambda device: "int8")
    with pytest.raises(ValueError, match="--precision auto chose int8 on this CPU"):
        Codec(h, encoder, decoder, torch.device("cpu"), precision="auto", compile=True)


def _compiler_or_skip():
    problem = compile_problem()
    if problem:
        pytest.skip(problem)


@pytest.mark.parametrize("chunk_frames", [64, None])
def test_compiled_blocks_give_the_uncompiled_outputs(model, chunk_frames):
    """--compile, float32: one clip at a time in chunks (a CPU's way, several chunks per clip)
    and as one padded batch (a GPU's) give the uncompiled path's codes and, to float rounding,
    its audio; the compiled code really ran."""
    _compiler_or_skip()
    h, encoder, decoder = model
    clips = _clips(30011, 700, 4801)
    exact = FastGenerator(encoder, decoder, h, chunk_frames=chunk_frames).roundtrip(clips)
    fast = FastGenerator(encoder, decoder, h, chunk_frames=chunk_frames, compile=True)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    compiled = fast.roundtrip(clips)
    assert fast.compiled and torch._dynamo.utils.counters["stats"]["unique_graphs"] > graphs
    for c, e in zip(compiled, exact):
        assert torch.equal(c["codes"], e["codes"])
        assert c["audio"].shape == e["audio"].shape
        assert (c["audio"] - e["audio"]).abs().max() < TOLERANCE


def test_compiled_expand_keeps_more_versions_than_torch_compiles_default(monkeypatch):
    """Precisions, masks, TF32 and batch sizes each compile a version of `expand`; past
    torch.compile's default limit of 8 it would silently run uncompiled."""
    seen = []
    monkeypatch.setattr(torch, "compile", lambda fn: lambda *args: seen.append(torch._dynamo.config.recompile_limit))
    fastpath.compiled_expand.cache_clear()
    try:
        fastpath.compiled_expand()(None)
    finally:
        fastpath.compiled_expand.cache_clear()
    assert seen == [fastpath.EXPAND_VERSIONS] and fastpath.EXPAND_VERSIONS > 8 >= torch._dynamo.config.recompile_limit


def test_compile_unavailable_runs_without_it_with_one_line(model, monkeypatch, capsys):
    h, encoder, decoder = model
    monkeypatch.setattr(fastpath, "compile_problem", lambda device: "torch.compile is unavailable here (RuntimeError: x)")
    fast = FastGenerator(encoder, decoder, h, compile=True)
    assert not fast.compiled and all(block.expand is fastpath.expand for block in fast.enc_amp.blocks)
    assert capsys.readouterr().err == "compile: torch.compile is unavailable here (RuntimeError: x); running without it\n"


def _folder(tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    write_tone(str(inputs / "a.wav"), 0.31, seed=1)
    write_tone(str(inputs / "b.wav"), 0.12, sr=44100, channels=2, seed=2)
    write_tone(str(inputs / "c.wav"), 0.05, sr=16000, seed=3)
    write_tone(str(inputs / "d.wav"), 0.2, seed=4)
    (inputs / "e.wav").write_bytes(b"RIFF....WAVEfmt nonsense")
    return inputs


def test_folder_batches_give_each_file_its_own_output(tmp_path):
    """Codec.resynthesize_files in the GPU's batched mode writes what resynthesize_file writes
    file by file (to a 16-bit step), reports the bad file and goes on."""
    inputs = _folder(tmp_path)
    torch.manual_seed(0)
    h = make_config(**TINY)
    codec = Codec(h, remove_weight_norm(Encoder(h)).eval(), remove_weight_norm(Decoder(h)).eval(),
                  torch.device("cpu"))
    codec.fast.chunk_frames = None
    names = sorted(os.listdir(inputs))
    jobs = [(str(inputs / n), str(tmp_path / f"batched_{n}")) for n in names]
    results = dict(codec.resynthesize_files(jobs, batch_seconds=0.5))
    assert set(results) == {path for path, _ in jobs}
    assert isinstance(results[str(inputs / "e.wav")], ValueError)
    for name in names[:-1]:
        assert results[str(inputs / name)] == pytest.approx(sf.info(str(inputs / name)).duration)
        codec.resynthesize_file(str(inputs / name), str(tmp_path / f"alone_{name}"))
        batched, rate = sf.read(str(tmp_path / f"batched_{name}"), dtype="int16")
        alone, _ = sf.read(str(tmp_path / f"alone_{name}"), dtype="int16")
        assert rate == sf.info(str(inputs / name)).samplerate and batched.shape == alone.shape
        assert np.abs(batched.astype(int) - alone).max() <= 1


def test_inference_precision_option_prints_its_kernels(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(inference, "pick_device", lambda: torch.device("cpu"))   # int8 runs on the CPU
    inputs = _folder(tmp_path)
    (inputs / "e.wav").unlink()
    h = make_config(**TINY)
    enc_path, dec_path = _save_random_codec(h, str(tmp_path))
    for precision in ("int8", "bfloat16"):
        h.update(test_input_wavs_dir=str(inputs), test_wav_output_dir=str(tmp_path / precision),
                 checkpoint_file_load_Encoder=enc_path, checkpoint_file_load_Decoder=dec_path)
        totals = inference.inference(h, precision=precision)
        assert totals["files"] == 4 and totals["failed"] == 0
        assert f"precision {precision}: " in capsys.readouterr().out
        for name in os.listdir(inputs):
            assert sf.info(str(tmp_path / precision / name)).frames == sf.info(str(inputs / name)).frames


def test_inference_compile_option_writes_the_uncompiled_files(tmp_path, monkeypatch, capsys):
    """inference.py --compile (its own switch, not the config's training key) writes the files
    of a run without it, to a bit of rounding."""
    _compiler_or_skip()
    monkeypatch.setattr(inference, "pick_device", lambda: torch.device("cpu"))
    inputs = _folder(tmp_path)
    (inputs / "e.wav").unlink()
    h = make_config(**TINY, compile="default")    # training's key: no part in inference
    save_config(h, str(tmp_path / "tiny.json"))
    enc_path, dec_path = _save_random_codec(h, str(tmp_path))
    common = ["--config", str(tmp_path / "tiny.json"), "--test_input_wavs_dir", str(inputs),
              "--checkpoint_file_load_Encoder", enc_path, "--checkpoint_file_load_Decoder", dec_path]
    inference.main(common + ["--test_wav_output_dir", str(tmp_path / "eager")])
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    inference.main(common + ["--test_wav_output_dir", str(tmp_path / "compiled"), "--compile"])
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > graphs
    assert "; ConvNeXt blocks compiled by torch.compile\n" in capsys.readouterr().out
    for name in os.listdir(inputs):
        eager, rate = sf.read(str(tmp_path / "eager" / name), dtype="int16")
        compiled, compiled_rate = sf.read(str(tmp_path / "compiled" / name), dtype="int16")
        assert rate == compiled_rate and eager.shape == compiled.shape
        assert np.abs(eager.astype(int) - compiled).max() <= 1
    with pytest.raises(SystemExit, match="--compile runs float32 and bfloat16"):
        inference.main(common + ["--test_wav_output_dir", str(tmp_path / "int8"), "--compile", "--precision", "int8"])


@pytest.mark.slow
def test_reduced_precision_keeps_quality_on_the_demo_checkpoint(tmp_path, monkeypatch):
    """Train the demo's model, then code its test clips in each precision (and bfloat16
    compiled, where torch.compile works): LSD and mel distance within 2% of float32's, and at
    least 99% of the codes identical."""
    monkeypatch.chdir(tmp_path)
    h = build_config(read_config_file(os.path.join(ROOT, "config_demo.json")))
    demo.make_demo_data(h)
    # The checkpoint depends on the thread count: trained on 1 thread it ends on a loss spike,
    # where more codes are nearly tied and flip (int8 keeps 98.5% there; see docs/inference.md).
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        train.train(h)
    finally:
        torch.set_num_threads(threads)
    step = max(int(name.split("_")[1]) for name in os.listdir(h.checkpoint_path) if name.startswith("encoder_"))
    codec = Codec.load(h, os.path.join(h.checkpoint_path, f"encoder_{step:08d}"),
                       os.path.join(h.checkpoint_path, f"decoder_{step:08d}"), torch.device("cpu"))
    clips = [torch.from_numpy(sf.read(os.path.join(h.test_input_wavs_dir, name), dtype="float32")[0])
             for name in sorted(os.listdir(h.test_input_wavs_dir))]

    def scores(outputs):
        return {"lsd": np.mean([metrics.lsd(c[None], o["audio"][None]).item() for c, o in zip(clips, outputs)]),
                "mel": np.mean([metrics.mel_distance(c[None], o["audio"][None], codec.h).item()
                                for c, o in zip(clips, outputs)])}

    reference = codec.fast.roundtrip(clips)
    base = scores(reference)
    compiled = compile_problem() is None
    for precision, compile in [("bfloat16", False), ("int8", False)] + [("bfloat16", True)] * compiled:
        outputs = FastGenerator(codec.encoder, codec.decoder, codec.h, precision,
                                compile=compile).roundtrip(clips)
        for name, value in scores(outputs).items():
            assert abs(value / base[name] - 1) <= 0.02, (precision, compile, name, value, base[name])
        same = sum((o["codes"] == r["codes"]).sum().item() for o, r in zip(outputs, reference))
        assert same >= 0.99 * sum(r["codes"].numel() for r in reference), (precision, compile)
