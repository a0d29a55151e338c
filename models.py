"""APCodec networks: encoder, residual VQ, decoder and the MPD / MRD discriminators (SPEC §2-§5).

Shapes: B batch, F = n_fft // 2 + 1 bins, T STFT frames, T' = ceil(T / ratio) latent frames.
"""
from functools import lru_cache
from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import weight_norm

from spectral import istft

LRELU_SLOPE = 0.1

DiscriminatorOutput = Tuple[List[torch.Tensor], List[torch.Tensor],
                            List[List[torch.Tensor]], List[List[torch.Tensor]]]


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

    def forward(self, z: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """z: (B, input_dim, T) -> (z_q, commitment (B,), codebook (B,), codes (B, T))."""
        z_e = self.in_proj(z)
        codes = self.nearest_codes(z_e)
        z_q = self.lookup(codes)
        commitment = F.mse_loss(z_e, z_q.detach(), reduction="none").mean([1, 2])
        codebook = F.mse_loss(z_q, z_e.detach(), reduction="none").mean([1, 2])
        z_q = z_e + (z_q - z_e).detach()
        return self.out_proj(z_q), commitment, codebook, codes


class ResidualVectorQuantize(nn.Module):
    """Residual VQ: each stage quantises what the previous stages left over."""

    def __init__(self, input_dim: int, n_codebooks: int, codebook_size: int, codebook_dim: int):
        super().__init__()
        self.quantizers = nn.ModuleList(
            [VectorQuantize(input_dim, codebook_size, codebook_dim) for _ in range(n_codebooks)])

    def forward(self, z: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """z: (B, D, T') -> (quantised latent (B, D, T'), codes (B, n_codebooks, T'),
        commitment loss, codebook loss), the losses summed over stages and averaged over the batch."""
        z_q = torch.zeros_like(z)
        residual = z
        commitment = codebook = z.new_zeros(())
        codes = []
        for quantizer in self.quantizers:
            z_q_i, commitment_i, codebook_i, codes_i = quantizer(residual)
            z_q = z_q + z_q_i
            residual = residual - z_q_i
            commitment = commitment + commitment_i.mean()
            codebook = codebook + codebook_i.mean()
            codes.append(codes_i)
        return z_q, torch.stack(codes, dim=1), commitment, codebook

    def from_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """codes: (B, n_codebooks, T') -> quantised latent (B, D, T')."""
        return sum(q.out_proj(q.lookup(codes[:, i])) for i, q in enumerate(self.quantizers))


# Our module names -> the release's, in the release's registration order. The release
# names every layer twice (`*_logamp`, `*_pha`); here a `Branch` is used twice instead.
# State dicts on disk and optimizer parameter positions follow the right-hand column.
_BRANCH_NAMES = (
    ("amp.embed", "embed_logamp"), ("pha.embed", "embed_pha"),
    ("amp.norm", "norm_logamp"), ("pha.norm", "norm_pha"),
    ("amp.blocks", "convnext_logamp"), ("pha.blocks", "convnext_pha"),
    ("amp.final_norm", "final_layer_norm_logamp"), ("pha.final_norm", "final_layer_norm_pha"),
    ("amp.out", "out_logamp"), ("pha.out", "out_pha"),
)
_WEIGHT_NORM_NAMES = (
    (".parametrizations.weight.original0", ".weight_g"),
    (".parametrizations.weight.original1", ".weight_v"),
)


class Encoder(nn.Module):
    """Parallel amplitude/phase encoder followed by the residual VQ."""

    release_names = _BRANCH_NAMES + (
        ("amp_down", "AMP_Encoder_downsample_output_conv"),
        ("pha_down", "PHA_Encoder_downsample_output_conv"),
        ("latent_conv", "latent_output_conv"),
        ("quantizer", "quantizer"),
    )

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

    def forward(self, logamp: torch.Tensor, pha: torch.Tensor
                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """logamp, pha: (B, F, T) -> (quantised latent (B, latent_dim, T'), commitment, codebook loss)."""
        latent, _, commitment, codebook = self.quantizer(self.continuous_latent(logamp, pha))
        return latent, commitment, codebook

    def encode(self, logamp: torch.Tensor, pha: torch.Tensor) -> torch.Tensor:
        """logamp, pha: (B, F, T) -> integer codes (B, n_codebooks, T')."""
        return self.quantizer(self.continuous_latent(logamp, pha))[1]

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, n_codebooks, T') -> quantised latent (B, latent_dim, T'), the Decoder's input."""
        return self.quantizer.from_codes(codes)


class Decoder(nn.Module):
    """Parallel amplitude/phase decoder; the waveform comes from the iSTFT of the predicted spectrum."""

    release_names = (
        ("latent_conv", "latent_input_conv"),
        ("amp_up", "AMP_Decoder_upsample_input_conv"),
        ("pha_up", "PHA_Decoder_upsample_input_conv"),
    ) + _BRANCH_NAMES + (
        ("amp_out", "AMP_Decoder_output_conv"),
        ("pha_real", "PHA_Decoder_output_R_conv"),
        ("pha_imag", "PHA_Decoder_output_I_conv"),
    )

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
        # Parallel phase estimation: atan2 of two learned components, wrapped by construction.
        pha = torch.atan2(self.pha_imag(pha_features), self.pha_real(pha_features))
        real = torch.exp(logamp) * torch.cos(pha)
        imag = torch.exp(logamp) * torch.sin(pha)
        audio = istft(real, imag, self.n_fft, self.hop_size, self.win_size)
        return logamp, pha, real, imag, audio.unsqueeze(1)


def wn_conv2d(in_channels: int, out_channels: int, kernel_size, stride, padding) -> nn.Module:
    return weight_norm(nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding))


def _score_with_features(x: torch.Tensor, convs: nn.ModuleList, conv_post: nn.Module
                         ) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    """Run a discriminator's conv stack; returns flattened scores and every layer's output."""
    fmap = []
    for conv in convs:
        x = F.leaky_relu(conv(x), LRELU_SLOPE)
        fmap.append(x)
    x = conv_post(x)
    fmap.append(x)
    return torch.flatten(x, 1, -1), fmap


class DiscriminatorP(nn.Module):
    """HiFi-GAN period discriminator on the waveform folded to (B, 1, L / period, period)."""

    def __init__(self, period: int, channels: Sequence[int] = (32, 128, 512, 1024)):
        super().__init__()
        self.period = period
        widths = [1, *channels]
        self.convs = nn.ModuleList(
            [wn_conv2d(widths[i], widths[i + 1], (5, 1), (3, 1), (2, 0)) for i in range(len(channels))]
            + [wn_conv2d(channels[-1], channels[-1], (5, 1), 1, (2, 0))])
        self.conv_post = wn_conv2d(channels[-1], 1, (3, 1), 1, (1, 0))

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """x: (B, 1, L) -> (scores (B, N), feature maps of every layer)."""
        b, c, t = x.shape
        if t % self.period:
            n_pad = self.period - t % self.period
            x = F.pad(x, (0, n_pad), "reflect")
            t += n_pad
        x = x.view(b, c, t // self.period, self.period)
        return _score_with_features(x, self.convs, self.conv_post)


@lru_cache(maxsize=None)
def _rectangular(win_size: int, device: torch.device) -> torch.Tensor:
    # torch.stft pads a win_size window to n_fft, centred: what window=None means, without its warning.
    return torch.ones(win_size, device=device)


class DiscriminatorR(nn.Module):
    """UniVNet resolution discriminator on a linear magnitude STFT (rectangular window)."""

    def __init__(self, resolution: Sequence[int], channels: int = 64):
        super().__init__()
        self.resolution = tuple(resolution)
        self.convs = nn.ModuleList([
            wn_conv2d(1, channels, (7, 5), (2, 2), (3, 2)),
            wn_conv2d(channels, channels, (5, 3), (2, 1), (2, 1)),
            wn_conv2d(channels, channels, (5, 3), (2, 2), (2, 1)),
            wn_conv2d(channels, channels, 3, (2, 1), 1),
            wn_conv2d(channels, channels, 3, (2, 2), 1),
        ])
        self.conv_post = wn_conv2d(channels, 1, 3, 1, 1)

    def spectrogram(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, L) -> magnitude (B, n_fft // 2 + 1, L // hop + 1)."""
        n_fft, hop, win = self.resolution
        return torch.stft(x, n_fft, hop_length=hop, win_length=win, window=_rectangular(win, x.device),
                          center=True, return_complex=True).abs()

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """x: (B, 1, L) -> (scores (B, N), feature maps of every layer)."""
        x = self.spectrogram(x.squeeze(1)).unsqueeze(1)
        return _score_with_features(x, self.convs, self.conv_post)


class _MultiDiscriminator(nn.Module):
    release_names = (("discriminators", "discriminators"),)

    def forward(self, y: torch.Tensor, y_hat: torch.Tensor) -> DiscriminatorOutput:
        """y, y_hat: (B, 1, L) -> (real scores, fake scores, real feature maps, fake feature maps)."""
        real_scores, fake_scores, real_fmaps, fake_fmaps = [], [], [], []
        for d in self.discriminators:
            score, fmap = d(y)
            real_scores.append(score)
            real_fmaps.append(fmap)
            score, fmap = d(y_hat)
            fake_scores.append(score)
            fake_fmaps.append(fmap)
        return real_scores, fake_scores, real_fmaps, fake_fmaps


class MultiPeriodDiscriminator(_MultiDiscriminator):
    def __init__(self, h):
        super().__init__()
        self.discriminators = nn.ModuleList([DiscriminatorP(p, h.mpd_channels) for p in h.mpd_periods])


class MultiResolutionDiscriminator(_MultiDiscriminator):
    def __init__(self, h):
        super().__init__()
        self.discriminators = nn.ModuleList(
            [DiscriminatorR(r, h.mrd_channels) for r in h.mrd_resolutions])


def _to_release_name(name: str, table) -> Tuple[str, int]:
    for ours, theirs in _WEIGHT_NORM_NAMES:
        if name.endswith(ours):
            name = name[: -len(ours)] + theirs
    for position, (ours, theirs) in enumerate(table):
        if name == ours or name.startswith(ours + "."):
            return theirs + name[len(ours):], position
    raise KeyError(f"no release name for parameter '{name}'")


def _from_release_name(name: str, table) -> str:
    for ours, theirs in table:
        if name == theirs or name.startswith(theirs + "."):
            name = ours + name[len(theirs):]
            break
    else:
        raise KeyError(name)
    for ours, theirs in _WEIGHT_NORM_NAMES:
        if name.endswith(theirs):
            name = name[: -len(theirs)] + ours
    return name


def _release_order(named: Sequence[Tuple[str, torch.Tensor]], table) -> List[Tuple[str, torch.Tensor]]:
    renamed = [(*_to_release_name(name, table), i, tensor) for i, (name, tensor) in enumerate(named)]
    renamed.sort(key=lambda item: (item[1], item[2]))
    return [(name, tensor) for name, _, _, tensor in renamed]


def release_state_dict(module: nn.Module) -> Dict[str, torch.Tensor]:
    """The module's state dict with the release's key names and order (weight_g / weight_v)."""
    return dict(_release_order(list(module.state_dict().items()), module.release_names))


def release_parameters(module: nn.Module) -> List[nn.Parameter]:
    """Parameters in the order the release's `module.parameters()` yields them.

    AdamW state is stored by position, so optimizers built from this list save and load
    `optim_g` / `optim_d` states that line up with the release's.
    """
    return [p for _, p in _release_order(list(module.named_parameters()), module.release_names)]


def load_release_state_dict(module: nn.Module, state_dict: Dict[str, torch.Tensor], source: str = "") -> None:
    """Load a state dict saved by the release (or by `release_state_dict`) into `module`."""
    where = f" in {source}" if source else ""
    converted = {}
    for name, tensor in state_dict.items():
        try:
            converted[_from_release_name(name, module.release_names)] = tensor
        except KeyError:
            raise ValueError(f"unexpected key '{name}'{where} for {type(module).__name__}") from None
    expected = module.state_dict()
    missing = [n for n in expected if n not in converted]
    if missing:
        raise ValueError(f"missing key '{_to_release_name(missing[0], module.release_names)[0]}'{where} "
                       f"for {type(module).__name__} ({len(missing)} missing)")
    for name, tensor in converted.items():
        if tensor.shape != expected[name].shape:
            raise ValueError(f"key '{_to_release_name(name, module.release_names)[0]}'{where} has shape "
                             f"{tuple(tensor.shape)}, the model expects {tuple(expected[name].shape)}: "
                             f"does the config match the checkpoint?")
    module.load_state_dict(converted)


def remove_weight_norm(module: nn.Module) -> nn.Module:
    """Fold weight norm into plain weights for faster inference (numerically the same weights)."""
    for m in module.modules():
        if parametrize.is_parametrized(m, "weight"):
            parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)
    return module
