"""APCodec's generator: the parallel amplitude/phase encoder, the residual VQ and the decoder.

Shapes: B batch, F = n_fft // 2 + 1 bins, T STFT frames, T' = ceil(T / ratio) latent frames
(floor(T / ratio) for the causal model).

With `causal: true` (APCodec-S) every layer sees only the present and the past: convolutions
are left-padded (`CausalConv1d`), the upsampler drops its right overhang
(`CausalConvTranspose1d`) and GRN pools over one frame, so `streaming` can run the same
weights over a stream in chunks and give exactly the frames of one offline pass.
"""
from typing import List, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import weight_norm

from config import AttrDict
from spectral import istft
from utils import full_precision, rank_and_world_size


def same_padding(kernel_size: int) -> int:
    return (kernel_size - 1) // 2


class CausalConv1d(nn.Conv1d):
    """Conv1d whose output frame n sees input frames <= stride * n + stride - 1 only.

    (B, C_in, T) -> (B, C_out, T // stride), T a multiple of the stride: the input is
    left-padded with kernel - stride zeros (a negative count crops).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, groups: int = 1):
        super().__init__(in_channels, out_channels, kernel_size, stride, groups=groups)
        self.left = kernel_size - stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.pad(x, (self.left, 0)))


class CausalConvTranspose1d(nn.ConvTranspose1d):
    """Transposed conv whose output frames stride * n ... stride * n + stride - 1 see input frames
    <= n only: no padding, and the right overhang is dropped. (B, C_in, T') -> (B, C_out, stride * T')."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x)[..., :x.size(-1) * self.stride[0]]


def conv1d(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, groups: int = 1,
           causal: bool = False) -> nn.Conv1d:
    """'Same'-padded Conv1d for odd kernels, or its causal counterpart."""
    if causal:
        return CausalConv1d(in_channels, out_channels, kernel_size, stride, groups)
    return nn.Conv1d(in_channels, out_channels, kernel_size, stride, padding=same_padding(kernel_size),
                     groups=groups)


class GRN(nn.Module):
    """Global response normalisation of ConvNeXt v2 on (B, T, C) inputs, pooled over time.

    Causal: each frame's response is its own (an L2 norm over a one-frame window), divided by
    its mean over channels, so no frame looks at another.
    """

    def __init__(self, dim: int, causal: bool = False):
        super().__init__()
        self.causal = causal
        self.gamma = nn.Parameter(torch.zeros(1, 1, dim))
        self.beta = nn.Parameter(torch.zeros(1, 1, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gx = x.abs() if self.causal else torch.norm(x, p=2, dim=1, keepdim=True)
        nx = gx / (gx.mean(dim=-1, keepdim=True) + 1e-6)
        return self.gamma * (x * nx) + self.beta + x


class ConvNeXtBlock(nn.Module):
    """ConvNeXt v2 block for 1-D sequences, without layer scale. (B, C, T) -> (B, C, T).

    `causal_kernel`: None for the paper's centred kernel 7, else a causal depthwise kernel.
    """

    def __init__(self, dim: int, hidden_dim: int, causal_kernel: Optional[int] = None):
        super().__init__()
        causal = causal_kernel is not None
        self.dwconv = conv1d(dim, dim, causal_kernel if causal else 7, groups=dim, causal=causal)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.grn = GRN(hidden_dim, causal)
        self.pwconv2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dwconv(x).transpose(1, 2)
        y = self.pwconv2(self.grn(self.act(self.pwconv1(self.norm(y)))))
        return x + y.transpose(1, 2)


class Branch(nn.Module):
    """One amplitude or phase path: embed conv -> LayerNorm -> ConvNeXt stack -> LayerNorm -> Linear.

    Encoder and decoder each use it twice, once per spectrum. (B, in_channels, T) -> (B, out_channels, T).
    """

    def __init__(self, in_channels: int, out_channels: int, dim: int, hidden_dim: int, num_layers: int,
                 causal_kernel: Optional[int] = None):
        super().__init__()
        self.embed = conv1d(in_channels, dim, 7, causal=causal_kernel is not None)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.blocks = nn.ModuleList([ConvNeXtBlock(dim, hidden_dim, causal_kernel) for _ in range(num_layers)])
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


def wn_conv1d(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
              causal: bool = False) -> nn.Module:
    """Weight-normalised `conv1d`."""
    return weight_norm(conv1d(in_channels, out_channels, kernel_size, stride, causal=causal))


def branch_size(h: AttrDict) -> Tuple[int, int, int, Optional[int]]:
    """Branch's size arguments after the channels: width, hidden width, blocks, causal kernel."""
    return (h.convnext_dim, h.convnext_hidden_dim, h.convnext_layers, h.causal_kernel_size if h.causal else None)


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

    def codebook_terms(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """What the code search needs of the codebook: its l2-normalised rows (K, D) and their
        squared norms (1, K)."""
        book = F.normalize(self.codebook.weight)
        return book, book.pow(2).sum(1, keepdim=True).t()

    def nearest_codes(self, z_e: torch.Tensor, terms: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
                      ) -> torch.Tensor:
        """Index of the code with the highest cosine similarity per frame. (B, D, T) -> (B, T).

        `terms`: `codebook_terms()`, where the caller keeps them between calls.
        """
        b, d, t = z_e.shape
        enc = F.normalize(z_e.transpose(1, 2).reshape(b * t, d))
        book, book_norms = self.codebook_terms() if terms is None else terms
        # Same ranking expression as the release, so ties break identically.
        dist = enc.pow(2).sum(1, keepdim=True) - 2 * enc @ book.t() + book_norms
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
        return QuantizerOutput(self._output(z_e, z_q), codes, commitment, codebook)

    def _output(self, z_e: torch.Tensor, z_q: torch.Tensor) -> torch.Tensor:
        # Straight-through: z_q forward, gradients to z_e.
        return self.out_proj(z_e + (z_q - z_e).detach())

    def codes(self, z: torch.Tensor, terms: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
              ) -> Tuple[torch.Tensor, torch.Tensor]:
        """`forward`'s codes (B, T) and latent (B, input_dim, T) alone, for inference; `terms` as
        in `nearest_codes`."""
        z_e = self.in_proj(z)
        codes = self.nearest_codes(z_e, terms)
        return codes, self._output(z_e, self.lookup(codes))


class ResidualVectorQuantize(nn.Module):
    """Residual VQ: each stage quantises what the previous stages left over.

    With `quantizer_dropout` p > 0, in training mode the first floor(p * B) items of each
    (global) batch keep only the first k stages, k drawn uniformly from 1 ... n_codebooks per item
    (as in DAC), so that the decoder learns to work from fewer codebooks.
    """

    def __init__(self, input_dim: int, n_codebooks: int, codebook_size: int, codebook_dim: int,
                 quantizer_dropout: float = 0.0):
        super().__init__()
        self.quantizers = nn.ModuleList(
            [VectorQuantize(input_dim, codebook_size, codebook_dim) for _ in range(n_codebooks)])
        self.quantizer_dropout = quantizer_dropout

    def stages_per_item(self, batch: int, device: torch.device) -> Optional[torch.Tensor]:
        """Stages each item keeps under quantizer dropout, (B,); None when all keep every stage.

        Under torch.distributed, B is this process's share of a global batch of B x N items,
        of which rank r holds items r, r + N, r + 2N, ... (as the training sampler deals them).
        Every rank draws the stages of the whole global batch (the ranks' generators are seeded
        and restored alike) and keeps its own items, so N processes drop exactly what one
        process at the global batch drops, even at B = 1.
        """
        if not (self.training and self.quantizer_dropout > 0):
            return None
        rank, world = rank_and_world_size()
        n, total = len(self.quantizers), batch * world
        keep = torch.full((total,), n, device=device)
        dropped = int(total * self.quantizer_dropout)
        keep[:dropped] = torch.randint(1, n + 1, (dropped,), device=device)
        return keep[rank::world]

    def forward(self, z: torch.Tensor, n_codebooks: Optional[int] = None) -> QuantizerOutput:
        """z: (B, D, T') -> latent (B, D, T'), codes (B, n, T'), and the commitment and codebook
        losses summed over stages and averaged over the batch (0-d).

        Only the first `n_codebooks` stages run (all by default); n = that number. Runs in
        float32 under autocast: code distances and their ranking are precision-sensitive.
        """
        with full_precision(z):
            return self._quantize(z.float(), n_codebooks)

    def _quantize(self, z: torch.Tensor, n_codebooks: Optional[int]) -> QuantizerOutput:
        z_q = torch.zeros_like(z)
        residual = z
        commitment = codebook = z.new_zeros(())
        codes = []
        keep = self.stages_per_item(z.size(0), z.device)
        for i, quantizer in enumerate(self.quantizers[:n_codebooks]):
            stage = quantizer(residual)
            residual = residual - stage.latent
            if keep is None:
                z_q = z_q + stage.latent
                commitment = commitment + stage.commitment.mean()
                codebook = codebook + stage.codebook.mean()
            else:
                used = (i < keep).to(z.dtype)
                z_q = z_q + stage.latent * used[:, None, None]
                commitment = commitment + (stage.commitment * used).mean()
                codebook = codebook + (stage.codebook * used).mean()
            codes.append(stage.codes)
        return QuantizerOutput(z_q, torch.stack(codes, dim=1), commitment, codebook)

    def codes(self, z: torch.Tensor, n_codebooks: Optional[int] = None,
              terms: Optional[List[Tuple[torch.Tensor, torch.Tensor]]] = None) -> torch.Tensor:
        """`forward`'s codes (B, n, T') without the losses, for inference. `terms`: each stage's
        `codebook_terms()`, where the caller keeps them between calls."""
        codes = []
        with full_precision(z):
            residual = z.float()
            for i, quantizer in enumerate(self.quantizers[:n_codebooks]):
                stage_codes, latent = quantizer.codes(residual, None if terms is None else terms[i])
                residual = residual - latent
                codes.append(stage_codes)
        return torch.stack(codes, dim=1)

    def from_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """codes: (B, n, T') of the first n <= n_codebooks stages -> quantised latent (B, D, T')."""
        return sum(q.out_proj(q.lookup(codes[:, i])) for i, q in enumerate(self.quantizers[:codes.size(1)]))


class Encoder(nn.Module):
    """Parallel amplitude/phase encoder followed by the residual VQ."""

    def __init__(self, h: AttrDict):
        super().__init__()
        n_bins = h.n_fft // 2 + 1
        self.amp = Branch(n_bins, h.AMP_Encoder_channel, *branch_size(h))
        self.pha = Branch(n_bins, h.PHA_Encoder_channel, *branch_size(h))
        self.amp_down = wn_conv1d(h.AMP_Encoder_channel, h.AMP_Encoder_channel // 2,
                                  h.AMP_Encoder_output_downconv_kernel_size, h.ratio, h.causal)
        self.pha_down = wn_conv1d(h.PHA_Encoder_channel, h.PHA_Encoder_channel // 2,
                                  h.PHA_Encoder_output_downconv_kernel_size, h.ratio, h.causal)
        self.latent_conv = wn_conv1d(h.AMP_Encoder_channel // 2 + h.PHA_Encoder_channel // 2,
                                     h.latent_dim, h.latent_output_conv_kernel_size, causal=h.causal)
        self.quantizer = ResidualVectorQuantize(h.latent_dim, h.n_codebooks, h.codebook_size, h.latent_dim,
                                                h.quantizer_dropout)

    def continuous_latent(self, logamp: torch.Tensor, pha: torch.Tensor) -> torch.Tensor:
        """logamp, pha: (B, F, T) -> unquantised latent (B, latent_dim, T')."""
        amp = self.amp_down(self.amp(logamp))
        pha = self.pha_down(self.pha(pha))
        return self.latent_conv(torch.cat((amp, pha), dim=1))

    def forward(self, logamp: torch.Tensor, pha: torch.Tensor, n_codebooks: Optional[int] = None
                ) -> QuantizerOutput:
        """logamp, pha: (B, F, T) -> quantised latent (B, latent_dim, T') (the Decoder's input),
        codes (B, n, T') and the commitment and codebook losses; n = n_codebooks (all by default)."""
        return self.quantizer(self.continuous_latent(logamp, pha), n_codebooks)

    def encode(self, logamp: torch.Tensor, pha: torch.Tensor, n_codebooks: Optional[int] = None) -> torch.Tensor:
        """logamp, pha: (B, F, T) -> integer codes (B, n, T') of the first n stages (all by default)."""
        return self.quantizer.codes(self.continuous_latent(logamp, pha), n_codebooks)

    def latent_from_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, n, T') of the first n stages -> quantised latent (B, latent_dim, T'), the Decoder's input."""
        return self.quantizer.from_codes(codes)


class DecoderOutput(NamedTuple):
    """The decoder's predicted spectra, each (B, F, ratio*T'), and its waveform (B, 1, L)."""
    logamp: torch.Tensor
    pha: torch.Tensor
    real: torch.Tensor
    imag: torch.Tensor
    audio: torch.Tensor


class Decoder(nn.Module):
    """Parallel amplitude/phase decoder; the waveform comes from the iSTFT of the predicted spectrum."""

    def __init__(self, h: AttrDict):
        super().__init__()
        self.n_fft, self.hop_size, self.win_size = h.n_fft, h.hop_size, h.win_size
        n_bins = h.n_fft // 2 + 1
        mid = h.AMP_Decoder_channel // 2 + h.PHA_Decoder_channel // 2
        causal = h.causal
        self.latent_conv = wn_conv1d(h.latent_dim, mid, h.latent_input_conv_kernel_size, causal=causal)
        # The release's init zeroes this bias (its weight-normalised weight is recomputed anyway).
        nn.init.zeros_(self.latent_conv.bias)
        self.amp_up = self._upsampler(mid, h.AMP_Decoder_channel, h.AMP_Decoder_input_upconv_kernel_size, h.ratio,
                                      causal)
        self.pha_up = self._upsampler(mid, h.PHA_Decoder_channel, h.PHA_Decoder_input_upconv_kernel_size, h.ratio,
                                      causal)
        # The release sizes the branches' final Linear by the encoder's key (the config requires them equal).
        self.amp = Branch(h.AMP_Decoder_channel, h.AMP_Encoder_channel, *branch_size(h))
        self.pha = Branch(h.PHA_Decoder_channel, h.PHA_Encoder_channel, *branch_size(h))
        self.amp_out = wn_conv1d(h.AMP_Decoder_channel, n_bins, h.AMP_Decoder_output_conv_kernel_size, causal=causal)
        self.pha_real = wn_conv1d(h.PHA_Decoder_channel, n_bins, h.PHA_Decoder_output_R_conv_kernel_size,
                                  causal=causal)
        self.pha_imag = wn_conv1d(h.PHA_Decoder_channel, n_bins, h.PHA_Decoder_output_I_conv_kernel_size,
                                  causal=causal)

    @staticmethod
    def _upsampler(in_channels: int, out_channels: int, kernel_size: int, ratio: int, causal: bool) -> nn.Module:
        if causal:
            return weight_norm(CausalConvTranspose1d(in_channels, out_channels, kernel_size, ratio))
        # padding (k - ratio) / 2 makes the output exactly ratio x T' frames.
        return weight_norm(nn.ConvTranspose1d(in_channels, out_channels, kernel_size, ratio,
                                              padding=(kernel_size - ratio) // 2))

    def forward(self, latent: torch.Tensor) -> DecoderOutput:
        """latent (B, latent_dim, T') -> logamp, pha, real, imag each (B, F, ratio*T'), audio (B, 1, L).

        L = hop_size * (ratio * T' - 1).
        """
        logamp, pha, real, imag = self.spectra(latent)
        with full_precision(latent):
            audio = istft(real, imag, self.n_fft, self.hop_size, self.win_size)
        return DecoderOutput(logamp, pha, real, imag, audio.unsqueeze(1))

    def spectra(self, latent: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """latent (B, latent_dim, T') -> the predicted logamp, pha, real, imag, each (B, F, ratio*T')."""
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
        return logamp, pha, real, imag


def remove_weight_norm(module: nn.Module) -> nn.Module:
    """Fold weight norm into plain weights for faster inference (numerically the same weights)."""
    for m in module.modules():
        if parametrize.is_parametrized(m, "weight"):
            parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)
    return module


def random_encoder_decoder(h: AttrDict, device: torch.device = torch.device("cpu")) -> Tuple[Encoder, Decoder]:
    """An encoder and decoder with random weights (seed `h.seed`), weight norm folded, in eval
    mode: for benchmarks and demos without checkpoints."""
    torch.manual_seed(h.seed)
    return remove_weight_norm(Encoder(h)).eval().to(device), remove_weight_norm(Decoder(h)).eval().to(device)
