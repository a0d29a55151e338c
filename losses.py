"""APCodec training losses and their weights, in one place."""
from typing import Dict, List, Sequence

import torch
import torch.nn.functional as F

from config import AttrDict
from spectral import anti_wrapping, backward_difference, mel_from_spectrum, stft

# The release's loss weights (paper Eq. for L_G, L_S, L_W and the discriminator sum).
WEIGHTS = {
    "amplitude": 45.0,        # L_A
    "phase": 100.0,           # L_P = L_IP + L_GD + L_PTD
    "stft": 20.0,             # L_S
    "real_imag": 2.25,        # inside L_S: L_C + 2.25 (L_R + L_I)
    "mel": 45.0,              # L_Mel, inside L_W
    "mel_l2": 45.0,           # L_Mel2, inside L_W
    "mrd": 0.1,               # MRD share of the GAN, feature-matching and discriminator losses
    "codebook": 10.0,
    "commitment": 2.5,
}
# The generator's terms, in the release's stdout order (G and D, the totals, come first there).
TERM_NAMES = ("A", "IP", "GD", "PTD", "C", "R", "I", "Mel", "Mel_L2", "GAN", "FM", "codebook", "commitment")


def phase_losses(pha_r: torch.Tensor, pha_g: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Instantaneous phase, group delay and phase time difference losses. pha_*: (B, F, T)."""
    return {
        "IP": anti_wrapping(pha_r - pha_g).mean(),
        "GD": anti_wrapping(backward_difference(pha_r, 1) - backward_difference(pha_g, 1)).mean(),
        "PTD": anti_wrapping(backward_difference(pha_r, 2) - backward_difference(pha_g, 2)).mean(),
    }


def stft_consistency_loss(real: torch.Tensor, real_final: torch.Tensor,
                          imag: torch.Tensor, imag_final: torch.Tensor) -> torch.Tensor:
    """Mean squared distance between the predicted spectrum and the STFT of its own iSTFT."""
    return torch.mean((real - real_final) ** 2 + (imag - imag_final) ** 2)


def spectral_losses(ref: Dict[str, torch.Tensor], gen: Dict[str, torch.Tensor], h: AttrDict) -> Dict[str, torch.Tensor]:
    """Every generator loss term that needs no discriminator.

    ref: logamp, pha, real, imag (B, F, T) and mel (B, M, T) of the target;
    gen: logamp, pha, real, imag (B, F, T) from the decoder and its audio (B, 1, L).
    """
    audio = gen["audio"].squeeze(1)
    # One STFT of the output serves the consistency loss and the mel losses.
    spec = stft(audio, h.n_fft, h.hop_size, h.win_size)
    real_final, imag_final = spec.real, spec.imag
    mel_g = mel_from_spectrum(real_final, imag_final, h.sampling_rate, h.n_fft, h.num_mels_for_loss)
    terms = {"A": F.mse_loss(gen["logamp"], ref["logamp"])}
    terms.update(phase_losses(ref["pha"], gen["pha"]))
    terms["C"] = stft_consistency_loss(gen["real"], real_final, gen["imag"], imag_final)
    terms["R"] = F.l1_loss(ref["real"], gen["real"])
    terms["I"] = F.l1_loss(ref["imag"], gen["imag"])
    terms["Mel"] = F.l1_loss(ref["mel"], mel_g)
    terms["Mel_L2"] = F.mse_loss(ref["mel"], mel_g)
    return terms


def discriminator_loss(real_scores: Sequence[torch.Tensor], fake_scores: Sequence[torch.Tensor]) -> torch.Tensor:
    """Hinge loss summed over sub-discriminators."""
    return sum(torch.mean(F.relu(1 - r)) + torch.mean(F.relu(1 + g)) for r, g in zip(real_scores, fake_scores))


def both_discriminators(mpd_term: torch.Tensor, mrd_term: torch.Tensor) -> torch.Tensor:
    """A loss over both discriminators: MPD's term plus MRD's, weighted."""
    return mpd_term + WEIGHTS["mrd"] * mrd_term


def generator_adversarial_loss(fake_scores: Sequence[torch.Tensor]) -> torch.Tensor:
    """Hinge generator loss summed over sub-discriminators."""
    return sum(torch.mean(F.relu(1 - g)) for g in fake_scores)


class FeatureMatching(torch.autograd.Function):
    """Sum over pairs of feature maps (r_i, g_i) of mean |r_i - g_i|, in a few multi-tensor
    operations with one temporary per map each way: a GPU step at batch 16 waits on its host
    issuing operations, and autograd's composition issues about 8 per pair, with as many
    map-sized temporaries. Gradients equal autograd's of torch.mean(torch.abs(r - g)) bit for
    bit; the value differs by float rounding."""

    @staticmethod
    def forward(ctx, n: int, *maps: torch.Tensor) -> torch.Tensor:
        """maps: r_1 ... r_n, then g_1 ... g_n."""
        real, fake = maps[:n], maps[n:]
        for r, g in zip(real, fake):
            if r.shape != g.shape:
                raise ValueError(f"feature maps differ in shape: {tuple(r.shape)} and {tuple(g.shape)}")
        ctx.save_for_backward(*maps)
        ctx.counts = [float(g.numel()) for g in fake]
        sums = torch._foreach_norm(torch._foreach_sub(fake, real), 1)
        return torch.stack(torch._foreach_div(sums, ctx.counts)).sum()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        n, maps = len(ctx.counts), ctx.saved_tensors
        real, fake = maps[:n], maps[n:]
        # sign(g - r) * (grad / count): the per-pair mean's gradient, rounded as autograd rounds it.
        grad_fake = torch._foreach_sub(fake, real)
        torch._foreach_sign_(grad_fake)
        torch._foreach_mul_(grad_fake, torch._foreach_div([grad] * n, ctx.counts))
        grad_real = torch._foreach_neg(grad_fake) if any(ctx.needs_input_grad[1:n + 1]) else [None] * n
        return (None, *grad_real, *grad_fake)


def feature_matching_loss(real_fmaps: Sequence[List[torch.Tensor]],
                          fake_fmaps: Sequence[List[torch.Tensor]]) -> torch.Tensor:
    """Sum over sub-discriminators and layers of the mean absolute feature difference."""
    real = [r for maps in real_fmaps for r in maps]
    fake = [g for maps in fake_fmaps for g in maps]
    if len(real) != len(fake):
        raise ValueError(f"{len(real)} real feature maps but {len(fake)} generated ones")
    return FeatureMatching.apply(len(real), *real, *fake)


def generator_total(terms: Dict[str, torch.Tensor]) -> torch.Tensor:
    """L_G from the named terms (spectral_losses + GAN, FM, codebook, commitment)."""
    w = WEIGHTS
    phase = terms["IP"] + terms["GD"] + terms["PTD"]
    stft_loss = terms["C"] + w["real_imag"] * (terms["R"] + terms["I"])
    waveform = terms["GAN"] + terms["FM"] + w["mel"] * terms["Mel"] + w["mel_l2"] * terms["Mel_L2"]
    return (w["amplitude"] * terms["A"] + w["phase"] * phase + w["stft"] * stft_loss + waveform
            + w["codebook"] * terms["codebook"] + w["commitment"] * terms["commitment"])
