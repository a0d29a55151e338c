"""Knowledge distillation: the causal student (APCodec-S) learns from a trained non-causal teacher.

L_KD is the mean, over the distilled points, of the mean squared difference between the
student's and the frozen teacher's outputs for the same audio. The student's own losses are
unchanged; train.py adds kd_weight x L_KD to the generator loss.
"""
from typing import Dict, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from checkpoints import load_generator
from config import AttrDict
from models import Decoder, Encoder

# (logged name, part, module): the module's output is compared. Each branch's output before
# the encoder's downsampling, the latent before quantisation, each decoder branch's output
# (after its final norm and Linear), and the decoded log amplitude and pseudo real / imaginary parts.
KD_POINTS: Tuple[Tuple[str, str, str], ...] = (
    ("KD_enc_amp", "encoder", "amp"),
    ("KD_enc_pha", "encoder", "pha"),
    ("KD_latent", "encoder", "latent_conv"),
    ("KD_dec_amp", "decoder", "amp"),
    ("KD_dec_pha", "decoder", "pha"),
    ("KD_logamp", "decoder", "amp_out"),
    ("KD_R", "decoder", "pha_real"),
    ("KD_I", "decoder", "pha_imag"),
)


class FeatureTap:
    """Keeps the latest output of each distilled module of an encoder and decoder."""

    def __init__(self, encoder: nn.Module, decoder: nn.Module):
        self.features: Dict[str, torch.Tensor] = {}
        parts = {"encoder": encoder, "decoder": decoder}
        for name, part, module in KD_POINTS:
            getattr(parts[part], module).register_forward_hook(self._keeper(name))

    def _keeper(self, name: str):
        def keep(module: nn.Module, inputs, output: torch.Tensor) -> None:
            self.features[name] = output
        return keep


class Distiller:
    """The frozen teacher named by kd_teacher_encoder / kd_teacher_decoder, and the KD loss."""

    def __init__(self, h: AttrDict, encoder: Encoder, decoder: Decoder, device: torch.device):
        teacher_h = AttrDict(h, causal=False)
        teacher_h.source = h.source
        self.teacher_encoder, self.teacher_decoder, _ = load_generator(
            teacher_h, h.kd_teacher_encoder, h.kd_teacher_decoder, device)
        for module in (self.teacher_encoder, self.teacher_decoder):
            module.eval().requires_grad_(False)
        self.teacher = FeatureTap(self.teacher_encoder, self.teacher_decoder)
        self.student = FeatureTap(encoder, decoder)

    def loss(self, ref: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Call after the student's forward pass; ref: the batch's targets (logamp, pha (B, F, T)),
        which are the teacher's input as it was trained. Returns each point's MSE and their mean, 'KD'."""
        with torch.no_grad():
            quantized = self.teacher_encoder(ref["logamp"], ref["pha"])
            self.teacher_decoder(quantized.latent)
        terms = {}
        for name, _, _ in KD_POINTS:
            student, teacher = self.student.features[name], self.teacher.features[name]
            if student.shape[:-1] != teacher.shape[:-1]:
                raise ValueError(f"distillation point {name}: the student's shape {tuple(student.shape)} does "
                                 f"not match the teacher's {tuple(teacher.shape)}; the teacher must have the "
                                 f"student's sizes")
            # A clip that is not whole latent frames gives the causal model fewer frames.
            frames = min(student.size(-1), teacher.size(-1))
            terms[name] = F.mse_loss(student[..., :frames], teacher[..., :frames])
        terms["KD"] = sum(terms.values()) / len(terms)
        # Kept features would hold on to this step's autograd graph into the next step.
        self.student.features.clear()
        self.teacher.features.clear()
        return terms
