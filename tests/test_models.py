"""models.py against hand-written formulas, SPEC §2-§5 shapes and init, and the release's checkpoint format."""
import contextlib
import copy
import io
import math
import os
import re
import warnings

import numpy as np
import pytest
import torch
from scipy.special import erf

import models
import spectral
import utils
from conftest import make_config, tone

TSV = os.path.join(os.path.dirname(os.path.abspath(__file__)), "reference_state_dict.tsv")


def read_tsv():
    rows = []
    with open(TSV) as f:
        for line in f:
            if not line.strip() or line.startswith("#"):
                continue
            module, key, shape = line.rstrip("\n").split("\t")
            rows.append((module, key, tuple(int(s) for s in shape.strip("()").split(",") if s.strip())))
    return rows


ROWS = read_tsv()  # global row index = position in this list


def rows_of(name):
    return [(i, key, shape) for i, (module, key, shape) in enumerate(ROWS) if module == name]


_NOISE = (torch.arange(1000).float() / 1000).repeat(max(math.prod(s) for _, _, s in ROWS) // 1000 + 1)
_DISTINCT = {}


def distinct_state_dict(name):
    """Release-named tensors of the TSV's shapes; tensor of global row r holds r + (k mod 1000) / 1000,
    so every tensor differs from every other and floor(value) gives back its row.
    (Cached; callers get a new dict and must not modify the tensors in place.)"""
    if name not in _DISTINCT:
        _DISTINCT[name] = {key: (_NOISE[:math.prod(shape)] + r).reshape(shape) for r, key, shape in rows_of(name)}
    return dict(_DISTINCT[name])


@pytest.fixture(scope="module")
def full():
    """Freshly initialised full-size (default config) modules, shared read-only by this file."""
    torch.manual_seed(0)
    h = make_config()
    return {"h": h, "encoder": models.Encoder(h), "decoder": models.Decoder(h),
            "mpd": models.MultiPeriodDiscriminator(h), "mrd": models.MultiResolutionDiscriminator(h)}


def fresh(full, name):
    return copy.deepcopy(full[name])


@pytest.fixture(scope="module")
def loaded(full):
    """Copies of the full modules with the TSV's distinct-valued state dicts loaded (release names)."""
    out = {}
    for name in ("encoder", "decoder", "mpd", "mrd"):
        module = fresh(full, name)
        models.load_release_state_dict(module, distinct_state_dict(name))
        out[name] = module
    return out


def audio(length, batch=1, seed=0):
    return torch.from_numpy(np.stack([tone(length / 48000 + 0.01, f0=200.0 + 30 * b, seed=seed + b)[:length]
                                      for b in range(batch)]))


# ---------------------------------------------------------------------------------------------
# GRN and ConvNeXt block against hand-written formulas


def randomise_(module, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5 + 0.1)


def grn_numpy(x, gamma, beta):
    gx = np.sqrt((x ** 2).sum(axis=1, keepdims=True))          # L2 over time, (B, 1, C)
    nx = gx / (gx.mean(axis=2, keepdims=True) + 1e-6)          # divided by its channel mean
    return gamma * (x * nx) + beta + x


def test_grn_formula():
    grn = models.GRN(6)
    assert grn.gamma.shape == grn.beta.shape == (1, 1, 6)
    randomise_(grn, 1)
    x = torch.randn(2, 9, 6, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = grn(x).double().numpy()
    expected = grn_numpy(x.double().numpy(), grn.gamma.detach().double().numpy(), grn.beta.detach().double().numpy())
    np.testing.assert_allclose(out, expected, atol=1e-5, rtol=1e-5)
    # pooling over time (axis 1), not channels, matters
    wrong = grn_numpy(x.double().numpy().transpose(0, 2, 1), 1.0, 0.0)
    assert np.abs(out - wrong.transpose(0, 2, 1)).max() > 1e-2


def test_grn_zero_init_is_identity():
    grn = models.GRN(5)
    assert torch.all(grn.gamma == 0) and torch.all(grn.beta == 0)
    x = torch.randn(2, 4, 5)
    assert torch.equal(grn(x), x)


def convnext_numpy(block, x):
    p = {k: v.detach().double().numpy() for k, v in block.named_parameters()}
    b, c, t = x.shape
    xp = np.pad(x, ((0, 0), (0, 0), (3, 3)))
    dw = np.zeros_like(x)
    for k in range(7):
        dw += p["dwconv.weight"][None, :, 0, k, None] * xp[:, :, k:k + t]
    dw += p["dwconv.bias"][None, :, None]
    y = dw.transpose(0, 2, 1)                                    # (B, T, C)
    mu = y.mean(-1, keepdims=True)
    var = ((y - mu) ** 2).mean(-1, keepdims=True)
    y = (y - mu) / np.sqrt(var + 1e-6) * p["norm.weight"] + p["norm.bias"]
    y = y @ p["pwconv1.weight"].T + p["pwconv1.bias"]
    y = 0.5 * y * (1 + erf(y / np.sqrt(2)))                      # exact GELU
    y = grn_numpy(y, p["grn.gamma"], p["grn.beta"])
    y = y @ p["pwconv2.weight"].T + p["pwconv2.bias"]
    return x + y.transpose(0, 2, 1)


def test_convnext_block_formula():
    block = models.ConvNeXtBlock(6, 10)
    randomise_(block, 3)
    x = torch.randn(2, 6, 11, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        out = block(x).double().numpy()
    np.testing.assert_allclose(out, convnext_numpy(block, x.double().numpy()), atol=1e-4, rtol=1e-4)
    # a quiet input, where the LayerNorm's eps (1e-6) matters
    with torch.no_grad():
        block.dwconv.bias.zero_()
        quiet = x * 1e-3
        out = block(quiet).double().numpy() - quiet.double().numpy()
    expected = convnext_numpy(block, quiet.double().numpy()) - quiet.double().numpy()
    np.testing.assert_allclose(out, expected, atol=1e-3 * np.abs(expected).max(), rtol=0)


def test_layer_norm_eps(tiny_h):
    enc, dec = models.Encoder(tiny_h), models.Decoder(tiny_h)
    norms = [m for m in list(enc.modules()) + list(dec.modules()) if isinstance(m, torch.nn.LayerNorm)]
    assert len(norms) == 2 * 2 * (2 + tiny_h.convnext_layers)
    assert all(m.eps == 1e-6 for m in norms)


# ---------------------------------------------------------------------------------------------
# Shapes and frame bookkeeping at the default (paper) sizes


@pytest.mark.parametrize("length, batch", [(7960, 2), (8239, 1)])
def test_stage_shapes_full_config(full, length, batch):
    h, enc, dec = full["h"], full["encoder"], full["decoder"]
    frames = length // h.hop_size + 1
    latent_frames = math.ceil(frames / h.ratio)
    n_bins = h.n_fft // 2 + 1
    y = audio(length, batch)
    with torch.no_grad():
        la, ph, _, _ = spectral.amp_pha_spectrum(y, h.n_fft, h.hop_size, h.win_size)
        assert la.shape == ph.shape == (batch, n_bins, frames)
        amp, pha = enc.amp(la), enc.pha(ph)
        assert amp.shape == pha.shape == (batch, 256, frames)
        amp_d, pha_d = enc.amp_down(amp), enc.pha_down(pha)
        assert amp_d.shape == pha_d.shape == (batch, 128, latent_frames)
        latent = enc.latent_conv(torch.cat([amp_d, pha_d], 1))
        assert latent.shape == (batch, 32, latent_frames)
        assert torch.allclose(enc.continuous_latent(la, ph), latent, atol=1e-6)
        z_q, codes, commitment, codebook = enc.quantizer(latent)
        assert z_q.shape == (batch, 32, latent_frames)
        assert codes.shape == (batch, 4, latent_frames) and codes.dtype == torch.int64
        assert codes.min() >= 0 and codes.max() < 1024
        assert commitment.shape == codebook.shape == ()
        z, _, _ = enc(la, ph)
        assert torch.allclose(z, z_q, atol=1e-6)
        # codes -> latent, the path inference takes
        assert torch.equal(enc.encode(la, ph), codes)
        assert torch.allclose(enc.decode(codes), z, atol=1e-5)
        assert not torch.allclose(enc.decode(codes.roll(1, dims=2)), z, atol=1e-3)

        x = dec.latent_conv(z)
        assert x.shape == (batch, 256, latent_frames)
        assert dec.amp_up(x).shape == dec.pha_up(x).shape == (batch, 256, h.ratio * latent_frames)
        logamp, pha_hat, real, imag, y_hat = dec(z)
        out_frames = h.ratio * latent_frames
        for t in (logamp, pha_hat, real, imag):
            assert t.shape == (batch, n_bins, out_frames)
        assert y_hat.shape == (batch, 1, h.hop_size * (out_frames - 1))
        assert y_hat.shape[-1] >= length // h.hop_size * h.hop_size
    if length == 7960:
        assert (frames, latent_frames, out_frames, y_hat.shape[-1]) == (200, 25, 200, 7960)


@pytest.mark.parametrize("frames", [193, 199, 200, 201, 207, 208, 209])
def test_latent_frames_ceil(frames, tiny_h):
    torch.manual_seed(0)
    enc = models.Encoder(tiny_h)
    x = torch.randn(1, 513, frames)
    with torch.no_grad():
        assert enc.continuous_latent(x, x).shape[-1] == math.ceil(frames / 8)


def test_bitrate(full_h, tiny_h):
    assert utils.bitrate(full_h) == 6000
    assert full_h.sampling_rate / (full_h.hop_size * full_h.ratio) == 150
    assert utils.bitrate(tiny_h) == 4 * 6 * 150             # codebook of 64 -> 6 bits
    assert utils.bitrate(dict(full_h, n_codebooks=2)) == 3000


def test_amplitude_half_comes_first(tiny_h):
    torch.manual_seed(0)
    enc = models.Encoder(tiny_h)
    half = tiny_h.AMP_Encoder_channel // 2
    with torch.no_grad():
        enc.latent_conv.parametrizations.weight.original1[:, half:] = 0   # keep only the first half
    la, ph = torch.randn(1, 513, 24), torch.randn(1, 513, 24)
    with torch.no_grad():
        base = enc.continuous_latent(la, ph)
        assert torch.allclose(enc.continuous_latent(la, ph + 1.0), base)
        assert not torch.allclose(enc.continuous_latent(la + 1.0, ph), base, atol=1e-3)


def test_decoder_parallel_phase_and_istft(tiny_h):
    torch.manual_seed(0)
    dec = models.Decoder(tiny_h)
    captured = {}
    dec.pha_real.register_forward_hook(lambda m, a, out: captured.__setitem__("R", out))
    dec.pha_imag.register_forward_hook(lambda m, a, out: captured.__setitem__("I", out))
    dec.amp_out.register_forward_hook(lambda m, a, out: captured.__setitem__("A", out))
    with torch.no_grad():
        logamp, pha, real, imag, y = dec(torch.randn(2, tiny_h.latent_dim, 5))
    assert torch.equal(logamp, captured["A"])
    assert torch.allclose(pha, torch.atan2(captured["I"], captured["R"]), atol=1e-6)
    assert torch.allclose(real, torch.exp(logamp) * torch.cos(pha), atol=1e-5, rtol=1e-5)
    assert torch.allclose(imag, torch.exp(logamp) * torch.sin(pha), atol=1e-5, rtol=1e-5)
    expected = spectral.istft(real, imag, tiny_h.n_fft, tiny_h.hop_size, tiny_h.win_size)
    assert torch.allclose(y[:, 0], expected, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Initialisation (SPEC §2)


def trunc_normal_layers(branch):
    yield "embed", branch.embed
    for block in branch.blocks:
        yield "dwconv", block.dwconv
        yield "pwconv1", block.pwconv1
        yield "pwconv2", block.pwconv2


@pytest.mark.parametrize("where", ["encoder.amp", "encoder.pha", "decoder.amp", "decoder.pha"])
def test_branch_init(full, where):
    module, branch_name = where.split(".")
    branch = getattr(full[module], branch_name)
    pooled = {}
    for kind, layer in trunc_normal_layers(branch):
        assert torch.all(layer.bias == 0), kind
        pooled.setdefault(kind, []).append(layer.weight.detach().flatten())
    for kind, weights in pooled.items():
        w = torch.cat(weights)
        assert abs(w.std().item() - 0.02) < 0.001, kind            # default init would be far off
        assert abs(w.mean().item()) < 0.001, kind
    for block in branch.blocks:
        assert torch.all(block.grn.gamma == 0) and torch.all(block.grn.beta == 0)
        assert torch.all(block.norm.weight == 1) and torch.all(block.norm.bias == 0)
    # the output Linear keeps PyTorch's default: uniform(+-1/sqrt(fan_in)) weights and bias
    out = branch.out
    bound = 1 / math.sqrt(out.in_features)
    assert out.weight.abs().max() <= bound
    assert abs(out.weight.std().item() - bound / math.sqrt(3)) < 0.03 * bound
    assert out.bias.abs().max() <= bound and (out.bias != 0).float().mean() > 0.9


def test_other_layers_keep_default_init(full):
    enc, dec = full["encoder"], full["decoder"]
    assert torch.all(dec.latent_conv.bias == 0)
    for layer in (enc.amp_down, enc.pha_down, enc.latent_conv, dec.amp_up, dec.pha_up,
                  dec.amp_out, dec.pha_real, dec.pha_imag):
        assert (layer.bias != 0).float().mean() > 0.9
        # weight norm starts with g = ||v||, so the weight equals v
        assert torch.allclose(layer.weight, layer.parametrizations.weight.original1, atol=1e-6)
    for q in enc.quantizer.quantizers:
        assert abs(q.codebook.weight.std().item() - 1.0) < 0.03      # nn.Embedding default N(0, 1)


# ---------------------------------------------------------------------------------------------
# Residual VQ (SPEC §3)


def test_rvq_codes_are_cosine_nearest_and_losses():
    torch.manual_seed(1)
    rvq = models.ResidualVectorQuantize(32, 4, 1024, 32)
    z = torch.randn(3, 32, 40)
    with torch.no_grad():
        z_q, codes, commitment, codebook = rvq(z)
        residual = z
        expected_latent = torch.zeros_like(z)
        expected_loss = 0.0
        mismatches = euclid_differs = 0
        for i, q in enumerate(rvq.quantizers):
            z_e = q.in_proj(residual)
            frames = z_e.transpose(1, 2).reshape(-1, 32).double()
            book = q.codebook.weight.double()
            cos = (frames / frames.norm(dim=1, keepdim=True)) @ (book / book.norm(dim=1, keepdim=True)).T
            best = cos.argmax(1)
            chosen = codes[:, i].reshape(-1)
            rows = torch.arange(len(best))
            differ = best != chosen
            mismatches += int(differ.sum())
            assert torch.all((cos[rows, best] - cos[rows, chosen])[differ].abs() < 1e-5), i
            euclid_differs += int((torch.cdist(frames, book).argmin(1) != best).sum())
            z_code = q.codebook.weight[codes[:, i]].transpose(1, 2)     # raw rows (B, D, T)
            expected_loss += ((z_e - z_code) ** 2).mean(dim=(1, 2)).mean().item()
            stage_out = q.out_proj(z_code)
            expected_latent += stage_out
            residual = residual - stage_out
    assert mismatches <= 3
    assert euclid_differs > 0.5 * 4 * 120          # cosine ranking is not raw-L2 ranking
    assert torch.allclose(z_q, expected_latent, atol=1e-5)
    assert commitment.item() == pytest.approx(codebook.item(), rel=1e-6)
    assert commitment.item() == pytest.approx(expected_loss, rel=1e-5)


def test_rvq_losses_average_items_then_sum_stages():
    torch.manual_seed(2)
    rvq = models.ResidualVectorQuantize(8, 2, 16, 8)
    z = torch.randn(2, 8, 6)
    with torch.no_grad():
        _, _, commitment, _ = rvq(z)
        per_item = torch.stack([rvq(z[b:b + 1])[2] for b in range(2)])
    assert commitment.item() == pytest.approx(per_item.mean().item(), rel=1e-5)


def test_straight_through_gradient_reaches_encoder(tiny_h):
    torch.manual_seed(0)
    enc, dec = models.Encoder(tiny_h), models.Decoder(tiny_h)
    y = audio(3160, 2)
    la, ph, _, _ = spectral.amp_pha_spectrum(y, tiny_h.n_fft, tiny_h.hop_size, tiny_h.win_size)
    z, commitment, codebook = enc(la, ph)
    logamp, _, _, _, y_hat = dec(z)
    (y_hat.pow(2).mean() + logamp.mean()).backward()
    for p in (enc.amp.embed.weight, enc.pha.embed.weight, enc.latent_conv.parametrizations.weight.original1,
              enc.quantizer.quantizers[0].in_proj.parametrizations.weight.original1):
        assert p.grad is not None and p.grad.abs().sum() > 0
    for q in enc.quantizer.quantizers:
        # straight-through: the decoder's loss does not move the codebook
        assert q.codebook.weight.grad is None or torch.all(q.codebook.weight.grad == 0)
    enc.zero_grad()
    _, commitment, codebook = enc(la, ph)
    (codebook + commitment).backward()
    assert enc.quantizer.quantizers[0].codebook.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------
# Discriminators (SPEC §5)


def conv_out(n, k, s, p):
    return (n + 2 * p - k) // s + 1


def test_mpd_shapes_and_fold(full):
    mpd = full["mpd"]
    assert [d.period for d in mpd.discriminators] == [2, 3, 5, 7, 11]
    length, batch = 600, 2
    y = torch.randn(batch, 1, length, generator=torch.Generator().manual_seed(0))
    for d in mpd.discriminators:
        p = d.period
        seen = []
        handle = d.convs[0].register_forward_pre_hook(lambda m, args: seen.append(args[0]))
        with torch.no_grad():
            score, fmaps = d(y)
        handle.remove()
        padded_len = -(-length // p) * p
        folded = np.pad(y.numpy(), ((0, 0), (0, 0), (0, padded_len - length)), mode="reflect")
        folded = folded.reshape(batch, 1, padded_len // p, p)
        assert seen[0].shape == folded.shape
        np.testing.assert_array_equal(seen[0].numpy(), folded)
        heights = [padded_len // p]
        for _ in range(4):
            heights.append(conv_out(heights[-1], 5, 3, 2))
        expected = [(batch, c, hgt, p) for c, hgt in zip([32, 128, 512, 1024], heights[1:])]
        expected += [(batch, 1024, heights[4], p), (batch, 1, heights[4], p)]
        assert [tuple(f.shape) for f in fmaps] == expected, p
        assert score.shape == (batch, heights[4] * p)
        assert torch.equal(score, fmaps[-1].flatten(1))


def test_mrd_shapes_and_input(full):
    mrd = full["mrd"]
    length, batch = 2400, 2
    y = torch.randn(batch, 1, length, generator=torch.Generator().manual_seed(1))
    for d, (n_fft, hop, win) in zip(mrd.discriminators, [(512, 20, 160), (1024, 40, 320), (2048, 80, 640)]):
        assert d.resolution == (n_fft, hop, win)
        seen = []
        handle = d.convs[0].register_forward_pre_hook(lambda m, args: seen.append(args[0]))
        with torch.no_grad():
            score, fmaps = d(y)
        handle.remove()
        bins, frames = n_fft // 2 + 1, length // hop + 1
        assert seen[0].shape == (batch, 1, bins, frames)
        with no_warnings():
            ref = torch.stft(y[:, 0], n_fft, hop_length=hop, win_length=win, window=None, center=True,
                             return_complex=True).abs()
        assert torch.allclose(seen[0][:, 0], ref, atol=1e-4, rtol=1e-5)
        shapes = [(bins, frames)]
        for k, s, p in [((7, 5), (2, 2), (3, 2)), ((5, 3), (2, 1), (2, 1)), ((5, 3), (2, 2), (2, 1)),
                        ((3, 3), (2, 1), (1, 1)), ((3, 3), (2, 2), (1, 1))]:
            f, t = shapes[-1]
            shapes.append((conv_out(f, k[0], s[0], p[0]), conv_out(t, k[1], s[1], p[1])))
        expected = [(batch, 64, f, t) for f, t in shapes[1:]] + [(batch, 1, *shapes[-1])]
        assert [tuple(f.shape) for f in fmaps] == expected
        assert score.shape == (batch, shapes[-1][0] * shapes[-1][1])


@contextlib.contextmanager
def no_warnings():
    """torch.stft warns about window=None; the warning is irrelevant here."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@pytest.mark.parametrize("resolution", [(512, 20, 160), (1024, 40, 320), (2048, 80, 640)])
def test_mrd_spectrogram_rectangular_window(resolution):
    n_fft, hop, win = resolution
    d = models.DiscriminatorR(resolution, 2)
    x = torch.from_numpy(np.stack([tone(0.06, seed=0), tone(0.06, f0=440.0, seed=1)]))
    with no_warnings():
        none_window = torch.stft(x, n_fft, hop_length=hop, win_length=win, window=None, center=True,
                                 return_complex=True).abs()
    ones_n_fft = torch.stft(x, n_fft, hop_length=hop, window=torch.ones(n_fft), center=True,
                            return_complex=True).abs()
    ours = d.spectrogram(x)
    assert torch.allclose(ours, none_window, atol=1e-4, rtol=1e-5)
    assert (ours - ones_n_fft).abs().max() > 1.0


def test_multi_discriminators_real_and_fake(tiny_h):
    torch.manual_seed(0)
    y = torch.randn(2, 1, 2400)
    y_hat = torch.randn(2, 1, 2400)
    for cls, count in ((models.MultiPeriodDiscriminator, 5), (models.MultiResolutionDiscriminator, 3)):
        md = cls(tiny_h)
        with torch.no_grad():
            real, fake, real_f, fake_f = md(y, y_hat)
            assert len(real) == len(fake) == len(real_f) == len(fake_f) == count
            for i, d in enumerate(md.discriminators):
                assert torch.equal(real[i], d(y)[0]) and torch.equal(fake[i], d(y_hat)[0])
                assert len(real_f[i]) == len(fake_f[i]) == 6
                assert torch.equal(fake_f[i][2], d(y_hat)[1][2])


# ---------------------------------------------------------------------------------------------
# Checkpoint compatibility with the release (SPEC §7)


def test_tsv_is_complete():
    counts = {m: len(rows_of(m)) for m in ("encoder", "decoder", "mpd", "mrd")}
    assert counts == {"encoder": 213, "decoder": 194, "mpd": 90, "mrd": 54}
    keys = [(m, k) for m, k, _ in ROWS]
    assert len(set(keys)) == len(keys)


@pytest.mark.parametrize("name", ["encoder", "decoder", "mpd", "mrd"])
def test_release_state_dict_round_trip(loaded, name):
    sd = distinct_state_dict(name)
    out = models.release_state_dict(loaded[name])
    assert list(out) == list(sd)
    for key, tensor in sd.items():
        assert torch.equal(out[key], tensor), key


def effective_weight(g, v):
    norm = v.flatten(1).norm(dim=1).reshape(-1, *([1] * (v.dim() - 1)))
    return g * v / norm


def test_release_keys_land_in_the_right_modules(loaded):
    enc, dec, mpd, mrd = (loaded[n] for n in ("encoder", "decoder", "mpd", "mrd"))
    sds = {n: distinct_state_dict(n) for n in ("encoder", "decoder", "mpd", "mrd")}
    e, d = sds["encoder"], sds["decoder"]
    checks = [
        (enc.amp.embed.weight, e["embed_logamp.weight"]),
        (enc.pha.embed.weight, e["embed_pha.weight"]),
        (enc.pha.norm.bias, e["norm_pha.bias"]),
        (enc.amp.blocks[5].grn.gamma, e["convnext_logamp.5.grn.gamma"]),
        (enc.pha.blocks[7].pwconv2.bias, e["convnext_pha.7.pwconv2.bias"]),
        (enc.amp.final_norm.weight, e["final_layer_norm_logamp.weight"]),
        (enc.pha.out.weight, e["out_pha.weight"]),
        (enc.pha_down.bias, e["PHA_Encoder_downsample_output_conv.bias"]),
        (enc.amp_down.parametrizations.weight.original0, e["AMP_Encoder_downsample_output_conv.weight_g"]),
        (enc.latent_conv.parametrizations.weight.original1, e["latent_output_conv.weight_v"]),
        (enc.quantizer.quantizers[2].codebook.weight, e["quantizer.quantizers.2.codebook.weight"]),
        (enc.quantizer.quantizers[1].out_proj.parametrizations.weight.original1,
         e["quantizer.quantizers.1.out_proj.weight_v"]),
        (dec.pha.blocks[3].pwconv1.weight, d["convnext_pha.3.pwconv1.weight"]),
        (dec.amp.blocks[0].dwconv.weight, d["convnext_logamp.0.dwconv.weight"]),
        (dec.pha_real.parametrizations.weight.original1, d["PHA_Decoder_output_R_conv.weight_v"]),
        (dec.pha_real.parametrizations.weight.original0, d["PHA_Decoder_output_R_conv.weight_g"]),
        (dec.pha_imag.bias, d["PHA_Decoder_output_I_conv.bias"]),
        (dec.amp_out.bias, d["AMP_Decoder_output_conv.bias"]),
        (dec.pha_up.parametrizations.weight.original1, d["PHA_Decoder_upsample_input_conv.weight_v"]),
        (dec.latent_conv.bias, d["latent_input_conv.bias"]),
        (mpd.discriminators[4].convs[3].parametrizations.weight.original1, sds["mpd"]["discriminators.4.convs.3.weight_v"]),
        (mpd.discriminators[0].conv_post.bias, sds["mpd"]["discriminators.0.conv_post.bias"]),
        (mrd.discriminators[2].convs[0].parametrizations.weight.original0, sds["mrd"]["discriminators.2.convs.0.weight_g"]),
    ]
    for ours, theirs in checks:
        assert torch.equal(ours.detach(), theirs)
    assert mpd.discriminators[4].period == 11 and mrd.discriminators[2].resolution == (2048, 80, 640)
    # weight_g / weight_v keep their meaning: weight = g * v / ||v|| per output row (dim 0)
    for layer, key in ((dec.pha_real, "PHA_Decoder_output_R_conv"), (dec.amp_up, "AMP_Decoder_upsample_input_conv")):
        expected = effective_weight(d[key + ".weight_g"], d[key + ".weight_v"])
        assert torch.allclose(layer.weight, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["encoder", "decoder", "mpd", "mrd"])
def test_saved_state_dict_has_release_keys_in_order(full, name):
    buf = io.BytesIO()
    torch.save({name: models.release_state_dict(full[name])}, buf)
    buf.seek(0)
    saved = torch.load(buf)[name]
    assert [(k, tuple(v.shape)) for k, v in saved.items()] == [(k, s) for _, k, s in rows_of(name)]
    # no constant buffers (windows, filterbanks) in the module's own state dict either
    assert len(full[name].state_dict()) == len(rows_of(name))


def optimizer_positions(full, loaded, names):
    """Give each parameter of the loaded modules a gradient equal to its release position (found from its
    values, not from our ordering), step AdamW over release_parameters and return its state dict."""
    h = full["h"]
    row_list = [row for name in names for row in rows_of(name)]
    position_of_row = {r: pos for pos, (r, _, _) in enumerate(row_list)}
    params = [p for name in names for p in models.release_parameters(loaded[name])]
    assert len(params) == len(row_list)
    for p in params:
        p.grad = torch.full_like(p, float(position_of_row[int(p.detach().flatten()[0])]))
    # lr 0 leaves the shared `loaded` modules unchanged; the moments do not depend on lr.
    optim = torch.optim.AdamW(params, 0.0, betas=(h.adam_b1, h.adam_b2))
    optim.step()
    for p in params:
        p.grad = None
    # AdamW state is saved by position: the state dict is what `optim_g` / `optim_d` hold on disk.
    return optim.state_dict(), row_list


def check_positions(state, row_list, h):
    assert state["param_groups"][0]["params"] == list(range(len(row_list)))
    for pos, (_, key, shape) in enumerate(row_list):
        s = state["state"][pos]
        assert tuple(s["exp_avg"].shape) == shape, key
        assert s["exp_avg"].flatten()[0].item() == pytest.approx((1 - h.adam_b1) * pos, rel=1e-5, abs=1e-7), key
        assert torch.all(s["exp_avg"] == s["exp_avg"].flatten()[0]), key
        assert s["exp_avg_sq"].flatten()[0].item() == pytest.approx((1 - h.adam_b2) * pos ** 2, rel=1e-5), key


def test_optimizer_positions_generator(full, loaded):
    state, rows = optimizer_positions(full, loaded, ["encoder", "decoder"])
    check_positions(state, rows, full["h"])


def test_optimizer_positions_discriminators(full, loaded):
    state, rows = optimizer_positions(full, loaded, ["mrd", "mpd"])
    assert rows[0][1] == "discriminators.0.convs.0.bias" and len(rows) == 54 + 90
    check_positions(state, rows, full["h"])


def test_load_errors_name_the_key(full):
    dec = fresh(full, "decoder")
    sd = distinct_state_dict("decoder")
    del sd["PHA_Decoder_output_I_conv.weight_g"]
    with pytest.raises(ValueError, match=re.escape("PHA_Decoder_output_I_conv.weight_g")):
        models.load_release_state_dict(dec, sd)

    sd = distinct_state_dict("decoder")
    sd["convnext_logamp.2.pwconv1.weight"] = torch.zeros(512, 255)
    with pytest.raises(ValueError, match=re.escape("convnext_logamp.2.pwconv1.weight")):
        models.load_release_state_dict(dec, sd)

    sd = distinct_state_dict("decoder")
    sd["PHA_Decoder_output_X_conv.bias"] = torch.zeros(513)
    with pytest.raises(ValueError, match=re.escape("PHA_Decoder_output_X_conv.bias")):
        models.load_release_state_dict(dec, sd)

    # nothing was half-loaded by the failed attempts
    assert torch.equal(dec.amp_out.bias, full["decoder"].amp_out.bias)


def test_load_error_for_wrong_config(tiny_h, full):
    """A full-size checkpoint into tiny modules fails with a shape error naming a key."""
    torch.manual_seed(0)
    with pytest.raises(ValueError, match=r"key '[\w.]+'.*shape"):
        models.load_release_state_dict(models.Encoder(tiny_h), distinct_state_dict("encoder"))


def test_save_load_round_trip_reproduces_outputs(tiny_h, tmp_path):
    """Models saved in the release layout and loaded into fresh modules give identical outputs."""
    torch.manual_seed(3)
    built = [models.Encoder(tiny_h), models.Decoder(tiny_h),
             models.MultiPeriodDiscriminator(tiny_h), models.MultiResolutionDiscriminator(tiny_h)]
    for module in built:
        # Non-zero GRN parameters, so every tensor matters for the outputs.
        for name, p in module.named_parameters():
            if name.endswith(("gamma", "beta")):
                torch.nn.init.normal_(p, std=0.1)
    path = str(tmp_path / "set")
    utils.save_checkpoint(path, {f"m{i}": models.release_state_dict(m) for i, m in enumerate(built)})
    torch.manual_seed(4)
    fresh = [models.Encoder(tiny_h), models.Decoder(tiny_h),
             models.MultiPeriodDiscriminator(tiny_h), models.MultiResolutionDiscriminator(tiny_h)]
    saved = utils.load_checkpoint(path, torch.device("cpu"))
    for i, module in enumerate(fresh):
        models.load_release_state_dict(module, saved[f"m{i}"])

    audio = torch.from_numpy(tone(0.2))[None]
    logamp, pha, _, _ = spectral.amp_pha_spectrum(audio, tiny_h.n_fft, tiny_h.hop_size, tiny_h.win_size)
    with torch.no_grad():
        outputs = []
        for enc, dec, mpd, mrd in (built, fresh):
            latent, commitment, _ = enc(logamp, pha)
            decoded = dec(latent)
            y = audio[:, None]
            outputs.append([latent, commitment, *decoded,
                            *mpd(y, decoded[-1])[1], *mrd(y, decoded[-1])[1]])
    assert not torch.equal(outputs[0][0], torch.zeros_like(outputs[0][0]))
    for a, b in zip(*outputs):
        assert torch.equal(a, b)
