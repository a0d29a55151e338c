"""streaming.py: the causal codec is causal, streams exactly in any chunking, and runs the latency it reports."""
import os

import numpy as np
import pytest
import soundfile as sf
import torch

import demo
import fastpath
import metrics
import streaming
import train
from codec import codec_roundtrip, load_codec
from config import build_config, read_config_file
from conftest import ROOT, TINY, make_config, tone, untrained_norms
from models import CausalConv1d, CausalConvTranspose1d, Decoder, Encoder


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def codec():
    h = make_config(**TINY, causal=True, causal_kernel_size=3)
    torch.manual_seed(0)
    return (h, *untrained_norms(Encoder(h).eval(), Decoder(h).eval()))


def signal(seconds, seed=0):
    return torch.from_numpy(tone(seconds, seed=seed))[None]


def test_latency_of_the_paper_settings(codec):
    h = make_config(causal=True)
    assert streaming.window_extent(h) == (160, 160)
    # one latent frame but its first hop (7 x 40) plus the window (320) less one sample
    assert streaming.latency_samples(h) == 599
    assert streaming.latency_samples(h) / h.sampling_rate <= 0.015


@pytest.mark.parametrize("seed", range(4))
def test_changing_the_future_leaves_the_past_bit_exact(codec, seed):
    h, encoder, decoder = codec
    rng = np.random.default_rng(seed)
    x = signal(0.25, seed)
    s = int(rng.integers(streaming.latency_samples(h) + 1, x.size(-1) - 1))
    y = x.clone()
    y[:, s:] = torch.from_numpy(rng.standard_normal(x.size(-1) - s).astype(np.float32))
    a = codec_roundtrip(encoder, decoder, x, h)
    b = codec_roundtrip(encoder, decoder, y, h)
    keep = s - streaming.latency_samples(h)
    assert torch.equal(a["audio"][:, :keep], b["audio"][:, :keep])
    assert not torch.equal(a["audio"][:, keep:], b["audio"][:, keep:])
    # latent frame n reads samples up to (ratio n + ratio - 1) hop + b - 1
    _, right = streaming.window_extent(h)
    last_read = (np.arange(a["codes"].size(-1)) * h.ratio + h.ratio - 1) * h.hop_size + right - 1
    settled = int((last_read < s).sum())
    assert settled > 0
    assert torch.equal(a["codes"][..., :settled], b["codes"][..., :settled])
    assert not torch.equal(a["codes"], b["codes"])


def chunkings(length, seed):
    rng = np.random.default_rng(seed)
    return [1, 7, 41, 333, length, list(rng.integers(1, 700, 50)), list(rng.integers(1, 60, 50))]


@pytest.mark.parametrize("length", [9600, 1, 250, 4321])
def test_streamed_output_equals_the_offline_pass(codec, length):
    h, encoder, decoder = codec
    x = signal(length / 48000 + 0.01, seed=length)[:, :length]
    offline = codec_roundtrip(encoder, decoder, x, h)
    assert offline["audio"].shape == (1, length)
    for chunks in chunkings(length, length):
        streamed = streaming.stream_roundtrip(encoder, decoder, x, h, chunks)
        assert torch.equal(streamed["codes"], offline["codes"]), chunks
        assert streamed["audio"].shape == (1, length)
        assert (streamed["audio"] - offline["audio"]).abs().max() <= 1e-5, chunks


def test_a_stream_ends_at_flush_and_chunk_sizes_must_advance(codec):
    h, encoder, decoder = codec
    stream = streaming.StreamingCodec(encoder, decoder, h)
    for wrong in (signal(0.02)[0], signal(0.02).repeat(2, 1)):
        with pytest.raises(ValueError, match=r"^a stream of batch 1 takes audio \(batch, samples\) = \(1, n\)"):
            stream.push(wrong)
    # PCM integers would be coded 32768 times too loud; a numpy array is not a tensor.
    for wrong, named in (((signal(0.02) * 32767).short(), "torch.int16 samples"), (signal(0.02).numpy(), "a ndarray")):
        with pytest.raises(ValueError, match=f"^a stream takes a floating point torch tensor in \\[-1, 1\\], got {named}"):
            stream.push(wrong)
    for batch in (0, 1.5):
        with pytest.raises(ValueError, match="batch must be a whole number of at least 1"):
            streaming.StreamingCodec(encoder, decoder, h, batch=batch)
    # float64 audio is taken as the stream's float32; numpy's integers are chunk sizes too.
    doubled = streaming.StreamingCodec(encoder, decoder, h)
    pushed = [streaming.StreamingCodec(encoder, decoder, h).push(signal(0.02)), doubled.push(signal(0.02).double())]
    assert doubled.encoder.samples.dtype == torch.float32
    assert torch.equal(pushed[0][0], pushed[1][0]) and torch.equal(pushed[0][1], pushed[1][1])
    chunked = [streaming.stream_roundtrip(encoder, decoder, signal(0.01), h, size) for size in (100, np.int64(100))]
    assert torch.equal(chunked[0]["audio"], chunked[1]["audio"])
    stream.push(signal(0.02))
    stream.flush()
    for again in (lambda: stream.push(signal(0.01)), stream.flush):
        with pytest.raises(ValueError, match="this stream has ended"):
            again()
    codes, audio = streaming.StreamingCodec(encoder, decoder, h).flush()
    assert codes.shape == (1, h.n_codebooks, 0) and audio.shape == (1, 0)
    for sizes in (0, [0, 0], -5, [3, -1]):
        with pytest.raises(ValueError, match="chunk sizes"):
            streaming.stream_roundtrip(encoder, decoder, signal(0.01), h, sizes)
    for part in (lambda: streaming.StreamingEncoder(encoder, h, precision="int-8"),
                 lambda: streaming.StreamingDecoder(encoder, decoder, h, precision="auto")):
        with pytest.raises(ValueError):
            part()
    # The paper's non-causal model would stream without error and decode wrongly.
    offline_h = make_config(**TINY)
    offline = (Encoder(offline_h), Decoder(offline_h))
    with pytest.raises(ValueError, match=r"^streaming needs a causal codec \('causal': true, as in .*\); config describes"):
        streaming.StreamingCodec(*offline, offline_h)
    for pair, built in ((offline, "encoder"), ((encoder, offline[1]), "decoder")):
        with pytest.raises(ValueError, match=f"says 'causal': true, but the {built} given was built non-causal"):
            streaming.StreamingCodec(*pair, h)


def test_paths_of_different_sizes_stream_exactly():
    """The amplitude and phase paths run side by side as one grouped layer only where their
    shapes match; a config with different widths and kernels streams exactly too, and so do
    phase outputs whose real and imaginary kernels differ (one merged layer)."""
    sizes = dict(TINY, PHA_Encoder_channel=24, PHA_Decoder_channel=24, PHA_Encoder_output_downconv_kernel_size=5,
                 AMP_Decoder_input_upconv_kernel_size=12, PHA_Decoder_output_R_conv_kernel_size=5,
                 PHA_Decoder_output_I_conv_kernel_size=9)
    h = make_config(**sizes, causal=True, causal_kernel_size=3)
    torch.manual_seed(0)
    encoder, decoder = Encoder(h).eval(), Decoder(h).eval()
    x = signal(0.1)
    offline = codec_roundtrip(encoder, decoder, x, h)
    streamed = streaming.stream_roundtrip(encoder, decoder, x, h, 333)
    assert torch.equal(streamed["codes"], offline["codes"])
    assert (streamed["audio"] - offline["audio"]).abs().max() <= 1e-5


def test_batch_streams_each_item_as_alone(codec):
    h, encoder, decoder = codec
    x = torch.cat([signal(0.1, 1), signal(0.1, 2)])
    both = streaming.stream_roundtrip(encoder, decoder, x, h, 97)
    for i in range(2):
        alone = codec_roundtrip(encoder, decoder, x[i:i + 1], h)
        assert torch.equal(both["codes"][i:i + 1], alone["codes"])
        assert (both["audio"][i:i + 1] - alone["audio"]).abs().max() <= 1e-5


def test_state_size_is_bounded_in_stream_length(codec):
    """Constant after each whole latent frame; with chunks of any size it depends on the
    position in the latent frame, so the second half of a stream holds no more than the first."""
    h, encoder, decoder = codec
    stream = streaming.StreamingCodec(encoder, decoder, h)
    frame = h.ratio * h.hop_size
    sizes = []
    x = signal(1.0)
    for i in range(x.size(-1) // frame):
        stream.push(x[:, i * frame:(i + 1) * frame])
        sizes.append(stream.state_size())
    assert len(set(sizes[2:])) == 1
    assert sizes[-1] < 4 * h.n_fft * (1 + h.n_fft // 2 + 1) + 100 * h.convnext_dim * h.convnext_layers
    stream = streaming.StreamingCodec(encoder, decoder, h)
    sizes, start = [], 0
    for size in np.random.default_rng(0).integers(0, 700, 150):
        stream.push(x[:, start:start + size])
        start += size
        sizes.append((start, stream.state_size()))
    first = max(n for at, n in sizes if at < x.size(-1) // 2)
    assert max(n for at, n in sizes if at >= x.size(-1) // 2) <= first


def test_the_first_code_comes_after_first_code_samples(codec):
    h, encoder, decoder = codec
    stream = streaming.StreamingEncoder(encoder, h)
    x = signal(0.05)
    n = streaming.first_code_samples(h)
    assert stream.push(x[:, :n - 1]).size(-1) == 0
    assert stream.push(x[:, n - 1:n]).size(-1) == 1


def test_impulse_delay_through_the_stream_is_the_latency(codec):
    """Push an impulse sample by sample; the output sample at the impulse's own time comes out
    `latency` samples later at the worst place in a latent frame (where it also carries the
    impulse: the codes there change), and sooner elsewhere."""
    h, encoder, decoder = codec
    latency = streaming.latency_samples(h)
    a, _ = streaming.window_extent(h)
    frame = h.ratio * h.hop_size
    length = 4 * frame + latency + 10
    delays = {}
    silent = codec_roundtrip(encoder, decoder, torch.zeros(1, length), h)["audio"]
    for s in (2 * frame - a, 2 * frame - a + 1, 2 * frame - a + frame // 2, 3 * frame - a - 1):
        x = torch.zeros(1, length)
        x[0, s] = 100.0  # loud enough to change the codes of its latent frame
        stream = streaming.StreamingCodec(encoder, decoder, h)
        out = []
        for i in range(length):
            out.append(stream.push(x[:, i:i + 1])[1])
            if sum(o.size(-1) for o in out) > s:
                delays[s] = i - s
                break
        if s == 2 * frame - a:
            assert torch.cat(out, dim=-1)[0, s] != silent[0, s]
    # the first sample of a latent frame's span waits the whole latency; later ones less
    assert delays[2 * frame - a] == latency
    assert max(delays.values()) == latency
    assert delays[2 * frame - a + 1] == latency - 1
    assert delays[3 * frame - a - 1] == latency - frame + 1


def random_chunks(total, rng):
    """Chunk sizes (0 included) that add up to `total`."""
    sizes = []
    while sum(sizes) < total:
        sizes.append(int(min(rng.integers(0, 5), total - sum(sizes))))
    return sizes


@pytest.mark.parametrize("kernel, stride", [(7, 1), (3, 1), (7, 8), (3, 2), (8, 8), (12, 4), (1, 1)])
def test_streamed_convolution_equals_the_causal_convolution(kernel, stride):
    """Two convolutions side by side, fed rows in random chunks (some empty), give the frames of
    CausalConv1d over the whole input, whether stride exceeds the kernel (frames skipped) or not."""
    torch.manual_seed(kernel * 10 + stride)
    rng = np.random.default_rng(kernel)
    convs = [CausalConv1d(5, 6, kernel, stride) for _ in range(2)]
    x = torch.randn(2, 3, 5, 8 * stride)               # (G, B, C_in, T)
    stream = streaming.CausalConvolution(convs, 3, "float32")
    with torch.no_grad():
        offline = torch.stack([conv(part) for conv, part in zip(convs, x)]).transpose(2, 3)
        rows, start, outs = x.transpose(2, 3), 0, []
        for size in random_chunks(rows.size(2), rng):
            outs.append(stream(rows[:, :, start:start + size]))
            start += size
    assert offline.shape == (2, 3, 8, 6)
    assert torch.allclose(torch.cat(outs, dim=2), offline, atol=1e-6)


@pytest.mark.parametrize("kernel, stride", [(16, 8), (8, 8), (5, 2)])
def test_streamed_upsampler_equals_the_causal_transposed_convolution(kernel, stride):
    torch.manual_seed(kernel)
    rng = np.random.default_rng(kernel)
    convs = [CausalConvTranspose1d(5, 4, kernel, stride) for _ in range(2)]
    x = torch.randn(3, 5, 9)                           # (B, C_in, T')
    stream = streaming.CausalUpsampler(convs, 3, "float32")
    with torch.no_grad():
        offline = torch.stack([conv(x) for conv in convs]).transpose(2, 3)
        rows, start, outs = x.transpose(1, 2), 0, []
        for size in random_chunks(rows.size(1), rng):
            outs.append(stream(rows[:, start:start + size]))
            start += size
    assert offline.shape == (2, 3, 9 * stride, 4)
    assert torch.allclose(torch.cat(outs, dim=2), offline, atol=1e-6)


@pytest.mark.parametrize("precision, bound", [("bfloat16", 0.05), ("int8", 0.1)])
def test_reduced_precision_streams_close_to_float32(codec, precision, bound):
    """Reduced precision changes the numbers a little, not the stream's shape or timing: same
    lengths, most codes equal, audio near the float32 stream's (error energy measured at 2e-4
    of the signal's in bfloat16, 0.04 in int8; a code flipped at a near-tie adds a few
    percent; the demo checkpoint's quality is checked in a slow test)."""
    h, encoder, decoder = codec
    x = signal(0.3)
    exact = streaming.stream_roundtrip(encoder, decoder, x, h, 480)
    approx = streaming.stream_roundtrip(encoder, decoder, x, h, 480, precision)
    assert approx["codes"].shape == exact["codes"].shape and approx["audio"].shape == exact["audio"].shape
    assert (approx["codes"] == exact["codes"]).float().mean() >= 0.9
    error = (approx["audio"] - exact["audio"]).pow(2).sum() / exact["audio"].pow(2).sum()
    assert 0 < error < bound


def test_stream_int8_keeps_seven_bits_where_fbgemm_could_saturate(monkeypatch):
    """fbgemm sums 8-bit products without saturating only with AVX512-VNNI; elsewhere (AVX-VNNI
    alone included, where the fast path's oneDNN kernels take 8 bits) the stream takes 7."""
    torch.manual_seed(0)
    weight, x = torch.randn(16, 64), torch.rand(1, 8, 64) * 3
    for flags, seven in (({"avx512_vnni", "avx512f"}, False), ({"avx_vnni", "avx2"}, True), ({"avx2"}, True)):
        monkeypatch.setattr(fastpath, "cpu_flags", lambda flags=flags: flags)
        products = streaming.Products([weight], [None], "int8")
        expected = torch.ops.quantized.linear_dynamic(x[0], products.packed[0], seven)
        assert not torch.equal(expected, torch.ops.quantized.linear_dynamic(x[0], products.packed[0], not seven))
        assert torch.equal(products(x)[0], expected)
        assert f"{7 if seven else 8}-bit activations" in fastpath.kernels("int8", torch.device("cpu"), stream=True)


@pytest.mark.slow
def test_reduced_precision_streams_keep_quality_on_a_trained_causal_model(tmp_path, monkeypatch):
    """Train the demo's model made causal, then stream its test clips in 10 ms chunks in each
    reduced precision: LSD and mel distance within 2% of the float32 offline pass's, and at
    least 99% of the codes identical."""
    monkeypatch.chdir(tmp_path)
    h = build_config(dict(read_config_file(os.path.join(ROOT, "config_demo.json")), causal=True))
    demo.make_demo_data(h)
    train.train(h)
    step = max(int(name.split("_")[1]) for name in os.listdir(h.checkpoint_path) if name.startswith("encoder_"))
    encoder, decoder, h = load_codec(h, os.path.join(h.checkpoint_path, f"encoder_{step:08d}"),
                                     os.path.join(h.checkpoint_path, f"decoder_{step:08d}"), torch.device("cpu"))
    clips = [torch.from_numpy(sf.read(os.path.join(h.test_input_wavs_dir, name), dtype="float32")[0])[None]
             for name in sorted(os.listdir(h.test_input_wavs_dir))]

    def scores(outputs):
        return {"lsd": np.mean([metrics.lsd(c, o["audio"]).item() for c, o in zip(clips, outputs)]),
                "mel": np.mean([metrics.mel_distance(c, o["audio"], h).item() for c, o in zip(clips, outputs)])}

    reference = [codec_roundtrip(encoder, decoder, clip, h) for clip in clips]
    base = scores(reference)
    for precision in ("bfloat16", "int8"):
        outputs = [streaming.stream_roundtrip(encoder, decoder, clip, h, 480, precision) for clip in clips]
        for name, value in scores(outputs).items():
            assert abs(value / base[name] - 1) <= 0.02, (precision, name, value, base[name])
        same = sum((o["codes"] == r["codes"]).sum().item() for o, r in zip(outputs, reference))
        assert same >= 0.99 * sum(r["codes"].numel() for r in reference), precision
