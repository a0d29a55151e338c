"""APCodec's generator: the parallel amplitude/phase encoder, the residual VQ and the decoder.

Shapes: B batch, F = n_fft // 2 + 1 bins, T STFT frames, T' = ceil(T / ratio) latent frames.
"""
from typing import NamedTuple, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import weight_norm

from spectral import istft
from utils import full_precision


def same_padding(kernel_size: int) -> int:
    return (kernel_size - 1) // 2


class GRN(nn.Module):
    """Global response normalisation of ConvNeXt v2 on (B, T, C) inputs, pooled over time."""

    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1, 1, dim))
        self.beta = nn.Parameter(torch.zeros(1, 1, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gx = torch.norm(x, p=2, dim=1, keepdim=True)
        nx = gx / (gx.mean(dim=-1, keepdim=True) + 1e-6)
        return self.gamma * (x * nx) + self.beta + x


class ConvNeXtBlock(nn.Module):
    """ConvNeXt v2 block for 1-D sequences, without layer scale. (B, C, T) -> (B, C, T)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.dwconv = nn.Conv1d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.grn = GRN(hidden_dim)
        self.pwconv2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dwconv(x).transpose(1, 2)
        y = self.pwconv2(self.grn(self.act(self.pwconv1(self.norm(y)))))
        return x + y.transpose(1, 2)


class Branch(nn.Module):
    """One amplitude or phase path: embed conv -> LayerNorm -> ConvNeXt stack -> LayerNorm -> Linear.

    Encoder and decoder each use it twice, once per spectrum. (B, in_channels, T) -> (B, out_channels, T).
    """

    def __init__(self, in_channels: int, out_channels: int, dim: int, hidden_dim: int, num_layers: int):
        super().__init__()
        self.embed = nn.Conv1d(in_channels, dim, kernel_size=7, padding=3)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.blocks = nn.ModuleList([ConvNeXtBlock(dim, hidden_dim) for _ in range(num_layers)])
        self.final_norm = nn.LayerNorm(dim, eps=1e-6)
        # The release applies its truncated-normal init before the output Linear exists,
        # so that layer keeps PyTorch's default init.
        self.apply(_trunc_normal_init)
        self.out = nn.Linear(dim, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.embed(x).transpose(1, 2)).transpose(1, 2)
        for block in self.blocks:
            x = block(x)
        return self.out(self.final_norm(x.transpose(1, 2))).transpose(1, 2)


def _trunc_normal_init(m: nn.Module) -> None:
    if isinstance(m, (nn.Conv1d, nn.Linear)):
        nn.init.trunc_normal_(m.weight, std=0.02)
        nn.init.zeros_(m.bias)


def wn_conv1d(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1) -> nn.Module:
    """Weight-normalised Conv1d with 'same' padding for odd kernels."""
    return weight_norm(nn.Conv1d(in_channels, out_channels, kernel_size, stride,
                                 padding=same_padding(kernel_size)))


class QuantizerOutput(NamedTuple):
    """What a quantizer stage or the whole residual VQ returns."""
    latent: torch.Tensor      # quantised latent (B, D, T'), straight-through to the input
    codes: torch.Tensor       # int64 (B, T') for one stage, (B, n_codebooks, T') for the RVQ
    commitment: torch.Tensor  # mse(z_e, sg(z_q)): (B,) per stage, summed over stages and batch-averaged for the RVQ
    codebook: torch.Tensor    # mse(z_q, sg(z_e)), shaped as commitment


class VectorQuantize(nn.Module):
    """One RVQ stage: factorised projection, l2-normalised nearest-code lookup (DAC style)."""

    def __init__(self, input_dim: int, codebook_size: int, codebook_dim: int):
        super().__init__()
        self.in_proj = weight_norm(nn.Conv1d(input_dim, codebook_dim, kernel_size=1))
        self.out_proj = weight_norm(nn.Conv1d(codebook_dim, input_dim, kernel_size=1))
        self.codebook = nn.Embedding(codebook_size, codebook_dim)

    def nearest_codes(self, z_e: torch.Tensor) -> torch.Tensor:
        """Index of the code with the highest cosine similarity per frame. (B, D, T) -> (B, T)."""
        b, d, t = z_e.shape
        enc = F.normalize(z_e.transpose(1, 2).reshape(b * t, d))
        book = F.normalize(self.codebook.weight)
        # Same ranking expression as the release, so ties break identically.
        dist = enc.pow(2).sum(1, keepdim=True) - 2 * enc @ book.t() + book.pow(2).sum(1, keepdim=True).t()
        return (-dist).max(1)[1].reshape(b, t)

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """Raw (un-normalised) codebook rows. (B, T) -> (B, D, T)."""
        return F.embedding(codes, self.codebook.weight).transpose(1, 2)

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        """z: (B, input_dim, T) -> latent (B, input_dim, T), codes (B, T), per-item losses (B,)."""
        z_e = self.in_proj(z)
        codes = self.nearest_codes(z_e)
        z_q = self.lookup(codes)
        commitment = F.mse_loss(z_e, z_q.detach(), reduction="none").mean([1, 2])
        codebook = F.mse_loss(z_q, z_e.detach(), reduction="none").mean([1, 2])
        z_q = z_e + (z_q - z_e).detach()
        return QuantizerOutput(self.out_proj(z_q), codes, commitment, codebook)


class ResidualVectorQuantize(nn.Module):
    """Residual VQ: each stage quantises what the previous stages left over."""

    def __init__(self, input_dim: int, n_codebooks: int, codebook_size: int, codebook_dim: int):
        super().__init__()
        self.quantizers = nn.ModuleList(
            [VectorQuantize(input_dim, codebook_size, codebook_dim) for _ in range(n_codebooks)])

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        """z: (B, D, T') -> latent (B, D, T'), codes (B, n_codebooks, T'), and the commitment and
        codebook losses summed over stages and averaged over the batch (0-d).

        Runs in float32 under autocast: code distances and their ranking are precision-sensitive."""
        with full_precision(z):
            return self._quantize(z.float())

    def _quantize(self, z: torch.Tensor) -> QuantizerOutput:
        z_q = torch.zeros_like(z)
        residual = z
        commitment = codebook = z.new_zeros(())
        codes = []
        for quantizer in self.quantizers:
            stage = quantizer(residual)
            z_q = z_q + stage.latent
            residual = residual - stage.latent
            commitment = commitment + stage.commitment.mean()
            codebook = codebook + stage.codebook.mean()
            codes.append(stage.codes)
        return QuantizerOutput(z_q, torch.stack(codes, dim=1), commitment, codebook)

    def from_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """codes: (B, n_codebooks, T') -> quantised latent (B, D, T')."""
        return sum(q.out_proj(q.lookup(codes[:, i])) for i, q in enumerate(self.quantizers))


class Encoder(nn.Module):
    """Parallel amplitude/phase encoder followed by the residual VQ."""

    def __init__(self, h):
        super().__init__()
        n_bins = h.n_fft // 2 + 1
        size = (h.convnext_dim, h.convnext_hidden_dim, h.convnext_layers)
        self.amp = Branch(n_bins, h.AMP_Encoder_channel, *size)
        self.pha = Branch(n_bins, h.PHA_Encoder_channel, *size)
        self.amp_down = wn_conv1d(h.AMP_Encoder_channel, h.AMP_Encoder_channel // 2,
                                  h.AMP_Encoder_output_downconv_kernel_size, h.ratio)
        self.pha_down = wn_conv1d(h.PHA_Encoder_channel, h.PHA_Encoder_channel // 2,
                                  h.PHA_Encoder_output_downconv_kernel_size, h.ratio)
        self.latent_conv = wn_conv1d(h.AMP_Encoder_channel // 2 + h.PHA_Encoder_channel // 2,
                                     h.latent_dim, h.latent_output_conv_kernel_size)
        self.quantizer = ResidualVectorQuantize(h.latent_dim, h.n_codebooks, h.codebook_size, h.latent_dim)

    def continuous_latent(self, logamp: torch.Tensor, pha: torch.Tensor) -> torch.Tensor:
        """logamp, pha: (B, F, T) -> unquantised latent (B, latent_dim, T')."""
        amp = self.amp_down(self.amp(logamp))
        pha = self.pha_down(self.pha(pha))
        return self.latent_conv(torch.cat((amp, pha), dim=1))

    def forward(self, logamp: torch.Tensor, pha: torch.Tensor) -> QuantizerOutput:
        """logamp, pha: (B, F, T) -> quantised latent (B, latent_dim, T') (the Decoder's input),
        codes (B, n_codebooks, T') and the commitment and codebook losses."""
        return self.quantizer(self.continuous_latent(logamp, pha))

    def encode(self, logamp: torch.Tensor, pha: torch.Tensor) -> torch.Tensor:
        """logamp, pha: (B, F, T) -> integer codes (B, n_codebooks, T')."""
        return self(logamp, pha).codes

    def latent_from_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, n_codebooks, T') -> quantised latent (B, latent_dim, T'), the Decoder's input."""
        return self.quantizer.from_codes(codes)


class Decoder(nn.Module):
    """Parallel amplitude/phase decoder; the waveform comes from the iSTFT of the predicted spectrum."""

    def __init__(self, h):
        super().__init__()
        self.n_fft, self.hop_size, self.win_size = h.n_fft, h.hop_size, h.win_size
        n_bins = h.n_fft // 2 + 1
        mid = h.AMP_Decoder_channel // 2 + h.PHA_Decoder_channel // 2
        self.latent_conv = wn_conv1d(h.latent_dim, mid, h.latent_input_conv_kernel_size)
        # The release's init zeroes this bias (its weight-normalised weight is recomputed anyway).
        nn.init.zeros_(self.latent_conv.bias)
        self.amp_up = self._upsampler(mid, h.AMP_Decoder_channel, h.AMP_Decoder_input_upconv_kernel_size, h.ratio)
        self.pha_up = self._upsampler(mid, h.PHA_Decoder_channel, h.PHA_Decoder_input_upconv_kernel_size, h.ratio)
        size = (h.convnext_dim, h.convnext_hidden_dim, h.convnext_layers)
        self.amp = Branch(h.AMP_Decoder_channel, h.AMP_Encoder_channel, *size)
        self.pha = Branch(h.PHA_Decoder_channel, h.PHA_Encoder_channel, *size)
        self.amp_out = wn_conv1d(h.AMP_Decoder_channel, n_bins, h.AMP_Decoder_output_conv_kernel_size)
        self.pha_real = wn_conv1d(h.PHA_Decoder_channel, n_bins, h.PHA_Decoder_output_R_conv_kernel_size)
        self.pha_imag = wn_conv1d(h.PHA_Decoder_channel, n_bins, h.PHA_Decoder_output_I_conv_kernel_size)

    @staticmethod
    def _upsampler(in_channels: int, out_channels: int, kernel_size: int, ratio: int) -> nn.Module:
        # padding (k - ratio) / 2 makes the output exactly ratio x T' frames.
        return weight_norm(nn.ConvTranspose1d(in_channels, out_channels, kernel_size, ratio,
                                              padding=(kernel_size - ratio) // 2))

    def forward(self, latent: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """latent (B, latent_dim, T') -> (logamp, pha, real, imag) each (B, F, ratio*T'), audio (B, 1, L).

        L = hop_size * (ratio * T' - 1).
        """
        latent = self.latent_conv(latent)
        logamp = self.amp_out(self.amp(self.amp_up(latent)))
        pha_features = self.pha(self.pha_up(latent))
        pha_imag, pha_real = self.pha_imag(pha_features), self.pha_real(pha_features)
        # Under autocast the convolutions above may run in half precision; the spectrum is
        # always built in float32.
        with full_precision(latent):
            logamp = logamp.float()
            # Parallel phase estimation: atan2 of two learned components, wrapped by construction.
            pha = torch.atan2(pha_imag.float(), pha_real.float())
            real = torch.exp(logamp) * torch.cos(pha)
            imag = torch.exp(logamp) * torch.sin(pha)
            audio = istft(real, imag, self.n_fft, self.hop_size, self.win_size)
        return logamp, pha, real, imag, audio.unsqueeze(1)


def remove_weight_norm(module: nn.Module) -> nn.Module:
    """Fold weight norm into plain weights for faster inference (numerically the same weights)."""
    for m in module.modules():
        if parametrize.is_parametrized(m, "weight"):
            parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)
    return module
