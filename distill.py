"""Knowledge distillation: the causal student (APCodec-S) learns from a trained non-causal teacher.

L_KD is the mean, over the distilled points, of the mean squared difference between the
student's and the frozen teacher's outputs for the same audio. The student's own losses are
unchanged; train.py adds kd_weight x L_KD to the generator loss.
"""
import os
from typing import Dict, Optional, Tuple

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


# What the distilled points hold, frame by frame, and the input both models see (the
# student's spectra): the teacher must share these keys. Its ConvNeXt stacks and quantizer may differ.
ALIGNED_KEYS = ("sampling_rate", "n_fft", "hop_size", "win_size", "ratio", "latent_dim", "AMP_Encoder_channel",
                "PHA_Encoder_channel")


def load_teacher(h: AttrDict, device: torch.device) -> Tuple[Encoder, Decoder]:
    """The frozen teacher of `h`'s student (kd_teacher_encoder / kd_teacher_decoder), with a
    one-line error when it cannot teach it: a causal model, or one that differs in ALIGNED_KEYS."""
    for key in ("kd_teacher_encoder", "kd_teacher_decoder"):
        if not os.path.isfile(h[key]):
            raise FileNotFoundError(f"config key '{key}': checkpoint not found: {h[key]} (set kd_teacher_encoder "
                                    f"and kd_teacher_decoder to \"\" to train without distillation)")
    teacher_h = AttrDict(h, causal=False)
    teacher_h.source = h.source
    try:
        # The student's config is not the teacher's: the advice is to put the teacher's beside it.
        encoder, decoder, used = load_generator(teacher_h, h.kd_teacher_encoder, h.kd_teacher_decoder, device,
                                                advice="put the config.json the teacher was trained with "
                                                       "beside its checkpoints")
    except ValueError as e:
        raise ValueError(f"config key 'kd_teacher_encoder': {e}") from None
    if used.causal:
        raise ValueError(f"config key 'kd_teacher_encoder': {h.kd_teacher_encoder} is a causal model; the teacher "
                         f"is a trained non-causal codec")
    differ = [f"{key} {used[key]} (student {h[key]})" for key in ALIGNED_KEYS if used[key] != h[key]]
    if differ:
        raise ValueError(f"config key 'kd_teacher_encoder': the teacher {h.kd_teacher_encoder} differs from the "
                         f"student in {', '.join(differ)}; distillation compares their outputs frame by frame")
    for module in (encoder, decoder):
        module.eval().requires_grad_(False)
    return encoder, decoder


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

    def __init__(self, h: AttrDict, encoder: Encoder, decoder: Decoder, device: torch.device,
                 teacher: Optional[Tuple[Encoder, Decoder]] = None):
        """teacher: `load_teacher(h, ...)`'s result if already loaded, on any device."""
        teacher = teacher or load_teacher(h, device)
        self.teacher_encoder, self.teacher_decoder = (module.to(device) for module in teacher)
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
            # A clip that is not whole latent frames gives the causal model fewer frames.
            frames = min(student.size(-1), teacher.size(-1))
            terms[name] = F.mse_loss(student[..., :frames], teacher[..., :frames])
        terms["KD"] = sum(terms.values()) / len(terms)
        # Kept features would hold on to this step's autograd graph into the next step.
        self.student.features.clear()
        self.teacher.features.clear()
        return terms
