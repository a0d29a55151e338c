"""MPD and MRD discriminators (HiFi-GAN periods, UniVNet resolutions), weight-normalised throughout."""
from typing import List, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from config import AttrDict
from spectral import stft
from utils import full_precision

LRELU_SLOPE = 0.1

DiscriminatorOutput = Tuple[List[torch.Tensor], List[torch.Tensor],
                            List[List[torch.Tensor]], List[List[torch.Tensor]]]


def wn_conv2d(in_channels: int, out_channels: int, kernel_size: Union[int, Tuple[int, int]],
              stride: Union[int, Tuple[int, int]], padding: Union[int, Tuple[int, int]]) -> nn.Module:
    return weight_norm(nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding))


def _score_with_features(x: torch.Tensor, convs: nn.ModuleList, conv_post: nn.Module
                         ) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    """Run a discriminator's conv stack; returns flattened scores and every layer's output.

    Both are float32 even when the convolutions ran under autocast, so the losses are float32.
    """
    fmap = []
    for conv in convs:
        # In place: a convolution's backward does not need its output, and one large buffer
        # fewer per layer saves the memory traffic of a fresh allocation.
        x = F.leaky_relu(conv(x), LRELU_SLOPE, inplace=True)
        fmap.append(x.float())
    x = conv_post(x)
    fmap.append(x.float())
    return torch.flatten(x.float(), 1, -1), fmap


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
        with full_precision(x):
            return stft(x.float(), n_fft, hop, win, window="rectangular").abs()

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """x: (B, 1, L) -> (scores (B, N), feature maps of every layer)."""
        x = self.spectrogram(x.squeeze(1)).unsqueeze(1)
        if x.device.type == "cpu":
            # Channels-last is the layout oneDNN runs these 64-channel convolutions in. A
            # one-channel input fits both layouts, and left as it is, each layer's backward
            # reorders its gradient into channels-last: a full copy per layer.
            x = x.contiguous(memory_format=torch.channels_last)
        return _score_with_features(x, self.convs, self.conv_post)


class _MultiDiscriminator(nn.Module):
    def forward(self, y: torch.Tensor, y_hat: torch.Tensor, together: bool = True) -> DiscriminatorOutput:
        """y (B, 1, L), y_hat (B, 1, L') -> (real scores, fake scores, real feature maps, fake feature maps).

        together: each sub-discriminator runs once on the batch of both (2B, 1, L), in fewer
        operations (where y and y_hat have one shape, as in training); else on each in turn,
        so that a backward from the fake outputs alone does not run through the real half."""
        together = together and y.shape == y_hat.shape
        real_scores, fake_scores, real_fmaps, fake_fmaps = [], [], [], []
        for d in self.discriminators:
            if together:
                score, fmap = d(torch.cat([y, y_hat]))
                (real, fake), pairs = score.chunk(2), [f.chunk(2) for f in fmap]
                real_fmap, fake_fmap = [r for r, _ in pairs], [f for _, f in pairs]
            else:
                (real, real_fmap), (fake, fake_fmap) = d(y), d(y_hat)
            real_scores.append(real)
            fake_scores.append(fake)
            real_fmaps.append(real_fmap)
            fake_fmaps.append(fake_fmap)
        return real_scores, fake_scores, real_fmaps, fake_fmaps


class MultiPeriodDiscriminator(_MultiDiscriminator):
    def __init__(self, h: AttrDict):
        super().__init__()
        self.discriminators = nn.ModuleList([DiscriminatorP(p, h.mpd_channels) for p in h.mpd_periods])


class MultiResolutionDiscriminator(_MultiDiscriminator):
    def __init__(self, h: AttrDict):
        super().__init__()
        self.discriminators = nn.ModuleList(
            [DiscriminatorR(r, h.mrd_channels) for r in h.mrd_resolutions])
