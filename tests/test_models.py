"""models.py against hand-written formulas: GRN, ConvNeXt, shapes and frame counts, init, the residual VQ."""
import math

import numpy as np
import pytest
import torch
from scipy.special import erf

import models
import spectral
from config import bitrate
from conftest import tone

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
        z = enc(la, ph).latent
        assert torch.allclose(z, z_q, atol=1e-6)
        # codes -> latent, the path inference takes
        assert torch.equal(enc.encode(la, ph), codes)
        assert torch.allclose(enc.latent_from_codes(codes), z, atol=1e-5)
        assert not torch.allclose(enc.latent_from_codes(codes.roll(1, dims=2)), z, atol=1e-3)

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
    assert bitrate(full_h) == 6000
    assert full_h.sampling_rate / (full_h.hop_size * full_h.ratio) == 150
    assert bitrate(tiny_h) == 4 * 6 * 150             # codebook of 64 -> 6 bits
    assert bitrate(dict(full_h, n_codebooks=2)) == 3000


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
# Initialisation (as the release initialises)


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
# Residual VQ


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


def test_rvq_codes_alone_are_the_forward_codes():
    """The inference path (no losses; codebook terms computed once and passed in) picks the
    forward's codes, for every number of stages, and Encoder.encode uses it."""
    torch.manual_seed(2)
    rvq = models.ResidualVectorQuantize(32, 4, 1024, 32).eval()
    z = torch.randn(3, 32, 40)
    with torch.no_grad():
        terms = [q.codebook_terms() for q in rvq.quantizers]
        for n in (None, 1, 3):
            expected = rvq(z, n).codes
            assert torch.equal(rvq.codes(z, n), expected)
            assert torch.equal(rvq.codes(z, n, terms), expected)
        book, norms = terms[0]
        assert torch.allclose(book.norm(dim=1), torch.ones(1024)) and norms.shape == (1, 1024)


def test_rvq_losses_average_items_then_sum_stages():
    torch.manual_seed(2)
    rvq = models.ResidualVectorQuantize(8, 2, 16, 8)
    z = torch.randn(2, 8, 6)
    with torch.no_grad():
        _, _, commitment, _ = rvq(z)
        per_item = torch.stack([rvq(z[b:b + 1])[2] for b in range(2)])
    assert commitment.item() == pytest.approx(per_item.mean().item(), rel=1e-5)


def test_commitment_trains_the_encoder_side_and_codebook_loss_the_codebook():
    """commitment = mse(z_e, sg(z_q)) moves only what makes z_e; codebook = mse(z_q, sg(z_e))
    moves only the rows drawn, by 2 (c_k - z_e) / (B D T) summed over the frames coded k."""
    torch.manual_seed(0)
    vq = models.VectorQuantize(8, 16, 4)
    z = torch.randn(2, 8, 5)
    in_proj = vq.in_proj.parametrizations.weight.original1
    commitment = vq(z).commitment.mean()
    commitment.backward()
    assert in_proj.grad.abs().sum() > 0
    assert vq.codebook.weight.grad is None or torch.all(vq.codebook.weight.grad == 0)
    vq.zero_grad()
    out = vq(z)
    out.codebook.mean().backward()
    assert in_proj.grad is None or torch.all(in_proj.grad == 0)
    with torch.no_grad():
        z_e = vq.in_proj(z)                                   # (B, D, T)
        rows = vq.codebook.weight[out.codes]                  # (B, T, D)
        step = 2 * (rows - z_e.transpose(1, 2)) / z_e.numel()
        expected = torch.zeros_like(vq.codebook.weight).index_add_(0, out.codes.flatten(), step.reshape(-1, 4))
    assert torch.allclose(vq.codebook.weight.grad, expected, atol=1e-7)
    assert (expected.abs().sum(1) > 0).sum() == out.codes.unique().numel()


def test_straight_through_gradient_reaches_encoder(tiny_h):
    torch.manual_seed(0)
    enc, dec = models.Encoder(tiny_h), models.Decoder(tiny_h)
    y = audio(3160, 2)
    la, ph, _, _ = spectral.amp_pha_spectrum(y, tiny_h.n_fft, tiny_h.hop_size, tiny_h.win_size)
    z = enc(la, ph).latent
    logamp, _, _, _, y_hat = dec(z)
    (y_hat.pow(2).mean() + logamp.mean()).backward()
    for p in (enc.amp.embed.weight, enc.pha.embed.weight, enc.latent_conv.parametrizations.weight.original1,
              enc.quantizer.quantizers[0].in_proj.parametrizations.weight.original1):
        assert p.grad is not None and p.grad.abs().sum() > 0
    for q in enc.quantizer.quantizers:
        # straight-through: the decoder's loss does not move the codebook
        assert q.codebook.weight.grad is None or torch.all(q.codebook.weight.grad == 0)
    enc.zero_grad()
    _, _, commitment, codebook = enc(la, ph)
    (codebook + commitment).backward()
    assert enc.quantizer.quantizers[0].codebook.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------
# The causal layers of APCodec-S against the library's convolutions


def test_causal_grn_normalises_each_frame_by_itself():
    grn = models.GRN(6, causal=True)
    randomise_(grn, 3)
    x = torch.randn(2, 9, 6, generator=torch.Generator().manual_seed(4)).double()
    g, b = grn.gamma.detach().double(), grn.beta.detach().double()
    nx = x.abs() / (x.abs().mean(dim=2, keepdim=True) + 1e-6)
    with torch.no_grad():
        torch.testing.assert_close(grn.double()(x), g * (x * nx) + b + x)
        # no frame looks at another
        y = x.clone()
        y[:, 5:] = 7.0
        torch.testing.assert_close(grn(y)[:, :5], grn(x)[:, :5], rtol=0, atol=0)


@pytest.mark.parametrize("kernel, stride, groups", [(7, 1, 1), (3, 1, 5), (7, 4, 1), (3, 4, 1), (1, 1, 1)])
def test_causal_conv_is_the_left_padded_convolution(kernel, stride, groups):
    torch.manual_seed(0)
    conv = models.CausalConv1d(5, 5 if groups > 1 else 7, kernel, stride, groups)
    x = torch.randn(2, 5, 12)
    with torch.no_grad():
        expected = torch.nn.functional.conv1d(torch.nn.functional.pad(x, (kernel - stride, 0)), conv.weight,
                                              conv.bias, stride, groups=groups)
        torch.testing.assert_close(conv(x), expected, rtol=1e-5, atol=1e-6)
    assert conv(x).shape[-1] == 12 // stride


def test_causal_transposed_conv_drops_the_right_overhang():
    torch.manual_seed(0)
    up = models.CausalConvTranspose1d(5, 6, 16, 8)
    x = torch.randn(2, 5, 3)
    with torch.no_grad():
        expected = torch.nn.functional.conv_transpose1d(x, up.weight, up.bias, stride=8)[..., :24]
        torch.testing.assert_close(up(x), expected, rtol=1e-5, atol=1e-6)


def test_causal_model_keeps_the_parameter_names_and_shapes(tiny_h):
    """Checkpoints of the causal model use the release's naming table unchanged."""
    causal = dict(tiny_h, causal=True)
    for part in (models.Encoder, models.Decoder):
        a = {k: v.shape for k, v in part(tiny_h).state_dict().items()}
        b = {k: v.shape for k, v in part(type(tiny_h)(causal)).state_dict().items()}
        assert a == b


def test_causal_frame_counts(tiny_h):
    h = type(tiny_h)(tiny_h, causal=True)
    encoder, decoder = models.Encoder(h), models.Decoder(h)
    la = torch.randn(1, h.n_fft // 2 + 1, 4 * h.ratio + 3)
    with torch.no_grad():
        latent = encoder(la, la).latent
        assert latent.shape[-1] == 4
        logamp, _, _, _, audio = decoder(latent)
    assert logamp.shape[-1] == 4 * h.ratio and audio.shape[-1] == h.hop_size * (4 * h.ratio - 1)
def _rvq_by_hand(rvq, z, keep=None):
    """Residual VQ from its definition, stage by stage; `keep` (B,) stages per item (all by default)."""
    keep = torch.full((z.size(0),), len(rvq.quantizers)) if keep is None else keep
    z_q, residual, commitment, codebook = torch.zeros_like(z), z, 0.0, 0.0
    for i, q in enumerate(rvq.quantizers):
        z_e = q.in_proj(residual)
        codes = q.nearest_codes(z_e)
        stage = q.out_proj(q.lookup(codes))
        used = (i < keep).float()
        z_q = z_q + stage * used[:, None, None]
        residual = residual - stage
        commitment = commitment + ((z_e - q.lookup(codes)) ** 2).mean([1, 2]).mul(used).mean()
        codebook = codebook + ((z_e - q.lookup(codes)) ** 2).mean([1, 2]).mul(used).mean()
    return z_q, commitment, codebook


def test_quantizer_dropout_default_leaves_training_unchanged():
    """quantizer_dropout = 0 (the paper): the training forward is the definition, and it draws
    no random numbers, so seeded training runs are unchanged."""
    torch.manual_seed(0)
    rvq = models.ResidualVectorQuantize(8, 4, 16, 8).train()
    z = torch.randn(6, 8, 11)
    state = torch.get_rng_state()
    out = rvq(z)
    assert torch.equal(torch.get_rng_state(), state)
    z_q, commitment, codebook = _rvq_by_hand(rvq, z)
    assert torch.allclose(out.latent, z_q, atol=1e-6)
    assert torch.allclose(out.commitment, commitment) and torch.allclose(out.codebook, codebook)


def test_quantizer_dropout_uses_fewer_codebooks_on_its_fraction_of_the_batch():
    torch.manual_seed(0)
    rvq = models.ResidualVectorQuantize(8, 4, 16, 8, quantizer_dropout=0.5).train()
    z = torch.randn(64, 8, 5)
    torch.manual_seed(1)
    keep = rvq.stages_per_item(64, z.device)
    torch.manual_seed(1)
    out = rvq(z)
    # The first floor(0.5 * 64) items draw 1 ... 4 stages uniformly; the rest keep all 4.
    assert torch.all(keep[32:] == 4) and keep[:32].min() >= 1 and keep[:32].max() <= 4
    assert 16 <= int((keep[:32] < 4).sum()) <= 32          # expected 24 of 32
    for b in range(64):
        expected = rvq.from_codes(out.codes[b:b + 1, :int(keep[b])])
        assert torch.allclose(out.latent[b:b + 1], expected, atol=1e-5), b
    z_q, commitment, codebook = _rvq_by_hand(rvq, z, keep)
    assert torch.allclose(out.latent, z_q, atol=1e-5)
    assert torch.allclose(out.commitment, commitment) and torch.allclose(out.codebook, codebook)
    # Inference ignores dropout.
    assert torch.allclose(rvq.eval()(z).latent, _rvq_by_hand(rvq, z)[0], atol=1e-5)


def test_encoding_with_fewer_codebooks(tiny_h):
    encoder = models.Encoder(tiny_h).eval()
    audio = torch.from_numpy(tone(0.1))[None]
    logamp, pha, _, _ = spectral.amp_pha_spectrum(audio, tiny_h.n_fft, tiny_h.hop_size, tiny_h.win_size)
    with torch.no_grad():
        full = encoder(logamp, pha)
        assert torch.equal(encoder.encode(logamp, pha), full.codes)
        for n in (1, 2, 3):
            fewer = encoder(logamp, pha, n)
            assert torch.equal(fewer.codes, full.codes[:, :n])
            assert torch.equal(encoder.encode(logamp, pha, n), fewer.codes)
            assert torch.allclose(fewer.latent, encoder.latent_from_codes(full.codes[:, :n]), atol=1e-5)
