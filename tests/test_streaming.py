"""streaming.py: the causal codec is causal, streams exactly in any chunking, and runs the latency it reports."""
import numpy as np
import pytest
import torch

import streaming
from conftest import TINY, make_config, tone
from models import Decoder, Encoder


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def codec():
    h = make_config(**TINY, causal=True, causal_kernel_size=3)
    torch.manual_seed(0)
    return h, Encoder(h).eval(), Decoder(h).eval()


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
    a = streaming.causal_roundtrip(encoder, decoder, x, h)
    b = streaming.causal_roundtrip(encoder, decoder, y, h)
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
    offline = streaming.causal_roundtrip(encoder, decoder, x, h)
    assert offline["audio"].shape == (1, length)
    for chunks in chunkings(length, length):
        streamed = streaming.stream_roundtrip(encoder, decoder, x, h, chunks)
        assert torch.equal(streamed["codes"], offline["codes"]), chunks
        assert streamed["audio"].shape == (1, length)
        assert (streamed["audio"] - offline["audio"]).abs().max() <= 1e-5, chunks


def test_batch_streams_each_item_as_alone(codec):
    h, encoder, decoder = codec
    x = torch.cat([signal(0.1, 1), signal(0.1, 2)])
    both = streaming.stream_roundtrip(encoder, decoder, x, h, 97)
    for i in range(2):
        alone = streaming.causal_roundtrip(encoder, decoder, x[i:i + 1], h)
        assert torch.equal(both["codes"][i:i + 1], alone["codes"])
        assert (both["audio"][i:i + 1] - alone["audio"]).abs().max() <= 1e-5


def state_size(codec):
    tensors = [codec.encoder.samples, codec.encoder.logamp, codec.encoder.pha, codec.decoder.sums,
               codec.decoder.weights]
    tensors += [m.context for part in (codec.encoder.encoder, codec.decoder.decoder) for m in part.modules()
                if getattr(m, "context", None) is not None]
    return sum(t.numel() for t in tensors)


def test_state_size_is_constant_in_stream_length(codec):
    h, encoder, decoder = codec
    stream = streaming.StreamingCodec(encoder, decoder, h)
    frame = h.ratio * h.hop_size
    sizes = []
    x = signal(1.0)
    for i in range(x.size(-1) // frame):
        stream.push(x[:, i * frame:(i + 1) * frame])
        sizes.append(state_size(stream))
    assert len(set(sizes[2:])) == 1
    assert sizes[-1] < 4 * h.n_fft * (1 + h.n_fft // 2 + 1) + 100 * h.convnext_dim * h.convnext_layers


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
    silent = streaming.causal_roundtrip(encoder, decoder, torch.zeros(1, length), h)["audio"]
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
