"""losses.py against hand-computed numbers and the release's matrix formulation (weights and formulas of the release)."""
import math

import numpy as np
import pytest
import torch

import losses
import spectral
from conftest import tone

TWO_PI = 2 * math.pi


def release_phase_losses(phase_r, phase_g):
    """The release's formulation: difference matrices applied with matmul."""
    n_bins, frames = phase_r.shape[1], phase_r.shape[2]

    def diff_matrix(n):
        ones = torch.ones(n, n, dtype=phase_r.dtype)
        return torch.triu(ones, diagonal=1) - torch.triu(ones, diagonal=2) - torch.eye(n, dtype=phase_r.dtype)

    def aw(x):
        return torch.abs(x - torch.round(x / TWO_PI) * TWO_PI)

    gd = diff_matrix(n_bins)
    ptd = diff_matrix(frames)
    gd_r, gd_g = phase_r.permute(0, 2, 1) @ gd, phase_g.permute(0, 2, 1) @ gd
    ptd_r, ptd_g = phase_r @ ptd, phase_g @ ptd
    return {"IP": aw(phase_r - phase_g).mean(), "GD": aw(gd_r - gd_g).mean(), "PTD": aw(ptd_r - ptd_g).mean()}


@pytest.mark.parametrize("shape", [(2, 513, 64), (1, 513, 300), (3, 17, 5), (1, 1, 1)])
def test_phase_losses_equal_release_matrix_form(shape):
    g = torch.Generator().manual_seed(sum(shape))
    phase_r = (torch.rand(shape, generator=g, dtype=torch.float64) * 2 - 1) * math.pi
    phase_g = (torch.rand(shape, generator=g, dtype=torch.float64) * 2 - 1) * math.pi
    ours = losses.phase_losses(phase_r, phase_g)
    ref = release_phase_losses(phase_r, phase_g)
    assert set(ours) == {"IP", "GD", "PTD"}
    for name in ref:
        assert torch.allclose(ours[name], ref[name], atol=1e-12, rtol=1e-12), name
    # float32 too, as training uses it
    ours32 = losses.phase_losses(phase_r.float(), phase_g.float())
    for name in ref:
        assert abs(ours32[name].item() - ref[name].item()) < 1e-5, name


def test_phase_losses_first_bin_and_first_frame_by_hand():
    # B=1, F=2, T=1: P = [[a], [b]], P_hat = 0. Delta_f P = [0 - a, a - b]; Delta_t P = [-a, -b].
    a, b = 3.0, -3.0
    phase_r = torch.tensor([[[a], [b]]], dtype=torch.float64)
    out = losses.phase_losses(phase_r, torch.zeros_like(phase_r))
    assert out["IP"].item() == pytest.approx((3.0 + 3.0) / 2)
    # AW(-3) = 3, AW(6) = 2 pi - 6
    assert out["GD"].item() == pytest.approx((3.0 + (TWO_PI - 6.0)) / 2)
    assert out["PTD"].item() == pytest.approx((3.0 + 3.0) / 2)

    # B=1, F=1, T=3 along time: P = [0.5, 2.0, -1.0]; Delta_t P = [-0.5, -1.5, 3.0] -> AW = [0.5, 1.5, 3.0]
    phase_r = torch.tensor([[[0.5, 2.0, -1.0]]], dtype=torch.float64)
    out = losses.phase_losses(phase_r, torch.zeros_like(phase_r))
    assert out["PTD"].item() == pytest.approx(5.0 / 3)
    # Delta_f of a single bin is -P itself: AW = [0.5, 2.0, 1.0]
    assert out["GD"].item() == pytest.approx(3.5 / 3)
    assert out["IP"].item() == pytest.approx(3.5 / 3)


def test_phase_losses_zero_for_identical_and_2pi_shifted_phase():
    g = torch.Generator().manual_seed(3)
    p = (torch.rand(2, 33, 20, generator=g, dtype=torch.float64) * 2 - 1) * math.pi
    for out in (losses.phase_losses(p, p), losses.phase_losses(p, p + TWO_PI)):
        for value in out.values():
            assert value.item() < 1e-12


REAL = [torch.tensor([0.5, 2.0, -1.0]), torch.tensor([[0.0, 1.5]])]
FAKE = [torch.tensor([-2.0, 0.5, 0.0]), torch.tensor([[1.0, -0.5]])]


def test_discriminator_hinge_by_hand():
    # D1: real relu(1 - r) = [0.5, 0, 2] -> 5/6; fake relu(1 + g) = [0, 1.5, 1] -> 5/6
    # D2: real [1, 0] -> 0.5; fake [2, 0.5] -> 1.25
    assert losses.discriminator_loss(REAL, FAKE).item() == pytest.approx(5 / 6 + 5 / 6 + 0.5 + 1.25)
    # real/fake roles are not symmetric
    assert losses.discriminator_loss(FAKE, REAL).item() == pytest.approx(
        np.mean([3.0, 0.5, 1.0]) + np.mean([1.5, 3.0, 0.0]) + np.mean([0.0, 1.5]) + np.mean([1.0, 2.5]))


def test_generator_hinge_by_hand():
    # relu(1 - g): D1 [3, 0.5, 1] -> 1.5; D2 [0, 1.5] -> 0.75
    assert losses.generator_adversarial_loss(FAKE).item() == pytest.approx(2.25)


def test_feature_matching_by_hand():
    real = [[torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([1.0, -1.0, 0.5])], [torch.tensor([[[2.0]]])]]
    fake = [[torch.tensor([[1.0, 0.0], [5.0, 4.0]]), torch.tensor([0.5, 1.0, 0.5])], [torch.tensor([[[-1.0]]])]]
    # |diff| means: [0,2,2,0] -> 1; [0.5,2,0] -> 5/6; [3] -> 3
    assert losses.feature_matching_loss(real, fake).item() == pytest.approx(1 + 5 / 6 + 3)


def test_feature_matching_gradient_equals_autograds():
    """The multi-tensor sum of mean |r - g| gives autograd's gradients of the per-pair form bit
    for bit (a tie included: its gradient is 0), and the gradient by hand: sign(g - r) / n; its
    value equals up to float rounding."""
    torch.manual_seed(0)
    shapes = [(3, 4, 17, 5), (2, 9), (3, 1, 4, 2)]
    real = [torch.randn(s, requires_grad=True) for s in shapes]
    fake = [torch.randn(s, requires_grad=True) for s in shapes]
    with torch.no_grad():
        real[0][0, 0, 0, 0] = fake[0][0, 0, 0, 0]
    fused = losses.feature_matching_loss([real[:2], real[2:]], [fake[:2], fake[2:]])
    fused_grads = torch.autograd.grad(2.5 * fused, real + fake)
    plain = sum(torch.mean(torch.abs(r - g)) for r, g in zip(real, fake))
    plain_grads = torch.autograd.grad(2.5 * plain, real + fake)
    assert fused.item() == pytest.approx(plain.item(), rel=1e-6)
    assert all(torch.equal(a, b) for a, b in zip(fused_grads, plain_grads))
    for g, r, grad in zip(fake, real, fused_grads[3:]):
        assert torch.allclose(grad, 2.5 * torch.sign(g - r) / g.numel())
    assert fused_grads[3][0, 0, 0, 0] == 0
    targets = [r.detach() for r in real]
    only_g = torch.autograd.grad(losses.feature_matching_loss([targets], [fake]), fake)
    assert all(torch.equal(a, torch.sign(g - t) / g.numel()) for a, g, t in zip(only_g, fake, targets))
    with pytest.raises(ValueError, match="feature maps differ in shape"):
        losses.feature_matching_loss([[targets[0][0]]], [[fake[0]]])
    with pytest.raises(ValueError, match="3 real feature maps but 2 generated ones"):
        losses.feature_matching_loss([targets], [fake[:2]])


TERMS = {"A": 0.1, "IP": 0.2, "GD": 0.3, "PTD": 0.5, "C": 0.7, "R": 1.1, "I": 1.3, "GAN": 1.7, "FM": 1.9,
         "Mel": 2.3, "Mel_L2": 2.9, "codebook": 3.1, "commitment": 3.7}
# d L_G / d term, by the release's weights: 45 L_A + 100 (IP+GD+PTD) + 20 (C + 2.25 (R+I)) + GAN + FM + 45 Mel + 45 Mel2
# + 10 codebook + 2.5 commitment
COEFFICIENTS = {"A": 45.0, "IP": 100.0, "GD": 100.0, "PTD": 100.0, "C": 20.0, "R": 45.0, "I": 45.0,
                "GAN": 1.0, "FM": 1.0, "Mel": 45.0, "Mel_L2": 45.0, "codebook": 10.0, "commitment": 2.5}


def test_generator_total_by_hand():
    terms = {k: torch.tensor(v, dtype=torch.float64) for k, v in TERMS.items()}
    # 4.5 + 100 * 1.0 + 20 * (0.7 + 2.25 * 2.4) + 1.7 + 1.9 + 45 * 2.3 + 45 * 2.9 + 31 + 9.25
    assert losses.generator_total(terms).item() == pytest.approx(504.35, abs=1e-9)


@pytest.mark.parametrize("name", sorted(COEFFICIENTS))
def test_generator_total_weight_of_each_term(name):
    terms = {k: torch.tensor(0.0, dtype=torch.float64) for k in COEFFICIENTS}
    terms[name] = torch.tensor(1.0, dtype=torch.float64)
    assert losses.generator_total(terms).item() == pytest.approx(COEFFICIENTS[name], abs=1e-12)


def test_mrd_weight():
    assert losses.WEIGHTS["mrd"] == 0.1


def test_spectral_losses_terms(tiny_h):
    h = tiny_h
    y_ref = torch.from_numpy(np.stack([tone(0.1, seed=1), tone(0.1, f0=300.0, seed=2)]))
    y_gen = torch.from_numpy(np.stack([tone(0.1, f0=230.0, seed=3), tone(0.1, f0=310.0, seed=4)]))
    la, pha, re, im = spectral.amp_pha_spectrum(y_ref, h.n_fft, h.hop_size, h.win_size)
    mel = spectral.mel_spectrogram(y_ref, h.sampling_rate, h.n_fft, h.num_mels_for_loss, h.hop_size, h.win_size)
    ref = {"logamp": la, "pha": pha, "real": re, "imag": im, "mel": mel}
    g = torch.Generator().manual_seed(0)
    gen = {"logamp": la + 0.3 * torch.randn(la.shape, generator=g),
           "pha": pha + 0.5 * torch.randn(la.shape, generator=g),
           "real": re + 0.2 * torch.randn(la.shape, generator=g),
           "imag": im - 0.1 * torch.randn(la.shape, generator=g),
           "audio": y_gen[:, None]}
    terms = losses.spectral_losses(ref, gen, h)

    _, _, re_g, im_g = spectral.amp_pha_spectrum(y_gen, h.n_fft, h.hop_size, h.win_size)
    mel_g = spectral.mel_spectrogram(y_gen, h.sampling_rate, h.n_fft, h.num_mels_for_loss, h.hop_size, h.win_size)
    expected = {
        "A": ((gen["logamp"] - la) ** 2).mean(),
        "C": ((gen["real"] - re_g) ** 2 + (gen["imag"] - im_g) ** 2).mean(),
        "R": (gen["real"] - re).abs().mean(),
        "I": (gen["imag"] - im).abs().mean(),
        "Mel": (mel - mel_g).abs().mean(),
        "Mel_L2": ((mel - mel_g) ** 2).mean(),
    }
    expected.update(release_phase_losses(pha.double(), gen["pha"].double()))
    assert set(terms) == set(expected)
    for name, value in expected.items():
        assert terms[name].item() == pytest.approx(value.item(), rel=1e-5), name
    assert expected["C"].item() > 0.01 and expected["Mel"].item() > 0.01


def test_spectral_losses_equal_separate_analyses(tiny_h):
    """One STFT of the output serves C, Mel and Mel_L2: the same values as separate analyses."""
    import torch.nn.functional as F
    from dataset import spectral_targets
    from spectral import amp_pha_spectrum, mel_spectrogram
    h = tiny_h
    torch.manual_seed(0)
    ref = spectral_targets(torch.randn(2, h.segment_size) * 0.1, h)
    audio = torch.randn(2, h.segment_size) * 0.1
    gen = dict(spectral_targets(torch.randn(2, h.segment_size) * 0.1, h), audio=audio[:, None])
    terms = losses.spectral_losses(ref, gen, h)
    _, _, real_final, imag_final = amp_pha_spectrum(audio, h.n_fft, h.hop_size, h.win_size)
    mel_g = mel_spectrogram(audio, h.sampling_rate, h.n_fft, h.num_mels_for_loss, h.hop_size, h.win_size)
    assert torch.equal(terms["C"], losses.stft_consistency_loss(gen["real"], real_final, gen["imag"], imag_final))
    assert torch.equal(terms["Mel"], F.l1_loss(ref["mel"], mel_g))
    assert torch.equal(terms["Mel_L2"], F.mse_loss(ref["mel"], mel_g))
