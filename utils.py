"""Configuration, checkpoint files and small helpers shared by the scripts."""
import argparse
import glob
import json
import math
import os
import re
import sys
import tempfile
from typing import TYPE_CHECKING, Any, BinaryIO, Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# Every key of the authors' release config.json. A config missing one of them is refused,
# so that a typo never silently falls back to something else.
RELEASE_KEYS = (
    "input_training_wav_list", "input_validation_wav_list", "test_input_wavs_dir",
    "test_wav_output_dir", "batch_size", "learning_rate", "adam_b1", "adam_b2", "lr_decay",
    "seed", "training_epochs", "stdout_interval", "checkpoint_interval", "summary_interval",
    "validation_interval", "checkpoint_path", "checkpoint_file_load_Encoder",
    "checkpoint_file_load_Decoder",
    "AMP_Encoder_channel", "AMP_Encoder_resblock_kernel_sizes",
    "AMP_Encoder_resblock_dilation_sizes", "AMP_Encoder_input_conv_kernel_size",
    "AMP_Encoder_output_downconv_kernel_size",
    "PHA_Encoder_channel", "PHA_Encoder_resblock_kernel_sizes",
    "PHA_Encoder_resblock_dilation_sizes", "PHA_Encoder_input_conv_kernel_size",
    "PHA_Encoder_output_downconv_kernel_size",
    "AMP_Decoder_channel", "AMP_Decoder_resblock_kernel_sizes",
    "AMP_Decoder_resblock_dilation_sizes", "AMP_Decoder_input_upconv_kernel_size",
    "AMP_Decoder_output_conv_kernel_size",
    "PHA_Decoder_channel", "PHA_Decoder_resblock_kernel_sizes",
    "PHA_Decoder_resblock_dilation_sizes", "PHA_Decoder_input_upconv_kernel_size",
    "PHA_Decoder_output_R_conv_kernel_size", "PHA_Decoder_output_I_conv_kernel_size",
    "latent_output_conv_kernel_size", "latent_input_conv_kernel_size",
    "ratio", "latent_dim", "segment_size", "num_mels", "n_fft", "hop_size", "win_size",
    "num_mels_for_loss", "sampling_rate", "num_workers",
)

# Keys this repository adds. The defaults are the release's hard-coded values, so a
# release config.json trains exactly the release's model.
ADDED_DEFAULTS: Dict[str, Any] = {
    "n_codebooks": 4,
    "codebook_size": 1024,
    "convnext_dim": 256,
    "convnext_hidden_dim": 512,
    "convnext_layers": 8,
    "mpd_periods": [2, 3, 5, 7, 11],
    "mpd_channels": [32, 128, 512, 1024],
    "mrd_resolutions": [[512, 20, 160], [1024, 40, 320], [2048, 80, 640]],
    "mrd_channels": 64,
}

POSITIVE_INT_KEYS = (
    "batch_size", "training_epochs", "stdout_interval", "checkpoint_interval",
    "summary_interval", "validation_interval", "ratio", "latent_dim", "segment_size",
    "num_mels", "n_fft", "hop_size", "win_size", "num_mels_for_loss", "sampling_rate",
    "AMP_Encoder_channel", "PHA_Encoder_channel", "AMP_Decoder_channel", "PHA_Decoder_channel",
    "n_codebooks", "codebook_size", "convnext_dim", "convnext_hidden_dim", "convnext_layers",
    "mrd_channels",
)

# Convolutions padded by (k - 1) / 2 keep their length only for odd kernels.
ODD_KERNEL_KEYS = (
    "AMP_Encoder_output_downconv_kernel_size", "PHA_Encoder_output_downconv_kernel_size",
    "AMP_Decoder_output_conv_kernel_size", "PHA_Decoder_output_R_conv_kernel_size",
    "PHA_Decoder_output_I_conv_kernel_size", "latent_output_conv_kernel_size",
    "latent_input_conv_kernel_size",
)


class ConfigError(ValueError):
    """A config.json that cannot train the model; the message names the key."""


class AttrDict(dict):
    """A dict whose keys are also attributes, as HiFi-GAN-style code reads `h.key`."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.__dict__ = self


# Paths stay strings even when they look like JSON numbers on the command line.
STRING_KEYS = (
    "input_training_wav_list", "input_validation_wav_list", "test_input_wavs_dir",
    "test_wav_output_dir", "checkpoint_path", "checkpoint_file_load_Encoder",
    "checkpoint_file_load_Decoder",
)
LIST_KEYS = ("mpd_periods", "mpd_channels", "mrd_resolutions")


def _check_config(h: Dict[str, Any]) -> None:
    for key in STRING_KEYS:
        if not isinstance(h[key], str) or not h[key]:
            raise ConfigError(f"config key '{key}' must be a non-empty path string, got {h[key]!r}")
    for key in LIST_KEYS:
        if not isinstance(h[key], list):
            raise ConfigError(f"config key '{key}' must be a list, got {h[key]!r}")
    for key in ("learning_rate", "adam_b1", "adam_b2", "lr_decay"):
        if isinstance(h[key], bool) or not isinstance(h[key], (int, float)) or h[key] <= 0:
            raise ConfigError(f"config key '{key}' must be a positive number, got {h[key]!r}")
    if not isinstance(h["seed"], int):
        raise ConfigError(f"config key 'seed' must be an integer, got {h['seed']!r}")
    for key in POSITIVE_INT_KEYS:
        if not isinstance(h[key], int) or isinstance(h[key], bool) or h[key] <= 0:
            raise ConfigError(f"config key '{key}' must be a positive integer, got {h[key]!r}")
    if not isinstance(h["num_workers"], int) or h["num_workers"] < 0:
        raise ConfigError(f"config key 'num_workers' must be an integer >= 0, got {h['num_workers']!r}")
    for key in ODD_KERNEL_KEYS:
        if not isinstance(h[key], int) or h[key] < 1 or h[key] % 2 == 0:
            raise ConfigError(f"config key '{key}' must be an odd positive integer, got {h[key]!r}")
    if h["win_size"] > h["n_fft"]:
        raise ConfigError(f"config key 'win_size' ({h['win_size']}) must be <= n_fft ({h['n_fft']})")
    if h["num_mels"] != h["num_mels_for_loss"]:
        raise ConfigError(f"config key 'num_mels_for_loss' ({h['num_mels_for_loss']}) must equal "
                          f"num_mels ({h['num_mels']})")
    if h["segment_size"] % h["hop_size"] != 0:
        raise ConfigError(f"config key 'segment_size' ({h['segment_size']}) must be a multiple of "
                          f"hop_size ({h['hop_size']})")
    if (h["segment_size"] // h["hop_size"] + 1) % h["ratio"] != 0:
        raise ConfigError(f"config key 'segment_size' ({h['segment_size']}): segment_size/hop_size + 1 "
                          f"must be a multiple of ratio ({h['ratio']}), e.g. 7960 for hop 40, ratio 8")
    for branch in ("AMP", "PHA"):
        enc, dec = h[f"{branch}_Encoder_channel"], h[f"{branch}_Decoder_channel"]
        if enc != dec:
            raise ConfigError(f"config key '{branch}_Decoder_channel' ({dec}) must equal "
                              f"{branch}_Encoder_channel ({enc}): the release sizes the decoder's "
                              f"Linear layers with the encoder key")
        if enc % 2:
            raise ConfigError(f"config key '{branch}_Encoder_channel' must be even, got {enc}")
        key = f"{branch}_Decoder_input_upconv_kernel_size"
        k = h[key]
        if not isinstance(k, int) or k < h["ratio"] or (k - h["ratio"]) % 2:
            raise ConfigError(f"config key '{key}' ({k!r}) must be >= ratio ({h['ratio']}) and differ "
                              f"from it by an even number, so that the decoder upsamples exactly")
    if not h["mpd_periods"] or not all(isinstance(p, int) and p > 0 for p in h["mpd_periods"]):
        raise ConfigError(f"config key 'mpd_periods' must be a list of positive integers, got {h['mpd_periods']!r}")
    if len(h["mpd_channels"]) != 4 or not all(isinstance(c, int) and c > 0 for c in h["mpd_channels"]):
        raise ConfigError(f"config key 'mpd_channels' must be 4 positive integers, got {h['mpd_channels']!r}")
    for res in h["mrd_resolutions"]:
        if (not isinstance(res, list) or len(res) != 3 or not all(isinstance(v, int) and v > 0 for v in res) or res[2] > res[0]):
            raise ConfigError(f"config key 'mrd_resolutions' entries must be [n_fft, hop, win] with "
                              f"win <= n_fft, got {res!r}")


def build_config(raw: Dict[str, Any], source: str = "config") -> AttrDict:
    """Validate a config dict, fill in the added keys' defaults and return it as an AttrDict."""
    known = set(RELEASE_KEYS) | set(ADDED_DEFAULTS)
    for key in raw:
        if key not in known:
            raise ConfigError(f"{source}: unknown config key '{key}'")
    for key in RELEASE_KEYS:
        if key not in raw:
            raise ConfigError(f"{source}: missing config key '{key}'")
    h = dict(ADDED_DEFAULTS)
    h.update(raw)
    _check_config(h)
    return AttrDict(h)


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def load_config(argv: Optional[Sequence[str]] = None, description: str = "",
                extra_args: Sequence[str] = ()) -> AttrDict:
    """Read `--config` (default config.json) and apply `--KEY VALUE` overrides.

    VALUE is parsed as JSON when it can be (numbers, lists), else taken as a string.
    `extra_args` names flags that the calling script handles itself; their values are
    stored on the returned config under the same name.
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", default="config.json", help="path to the JSON config")
    for name in extra_args:
        parser.add_argument(f"--{name}")
    args, rest = parser.parse_known_args(argv)
    try:
        with open(args.config) as f:
            raw = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {args.config}") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{args.config}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{args.config}: must hold a JSON object of config keys")
    i = 0
    while i < len(rest):
        flag = rest[i]
        if not flag.startswith("--") or i + 1 >= len(rest):
            raise ConfigError(f"command line: expected '--KEY VALUE', got '{flag}'")
        key = flag[2:]
        if key not in RELEASE_KEYS and key not in ADDED_DEFAULTS:
            raise ConfigError(f"command line: unknown config key '{key}'")
        raw[key] = rest[i + 1] if key in STRING_KEYS else _parse_value(rest[i + 1])
        i += 2
    h = build_config(raw, args.config)
    for name in extra_args:
        h[name] = getattr(args, name)
    return h


def run_cli(job: Callable[[AttrDict], Any], argv: Optional[Sequence[str]], description: str) -> None:
    """Read the config from the command line and run job(h); bad input exits with one line."""
    try:
        job(load_config(argv, description=description))
    except (OSError, ValueError) as e:
        sys.exit(f"error: {e}")


def save_config(h: Dict[str, Any], path: str, extra_args: Sequence[str] = ()) -> None:
    """Write the config actually used (overrides applied), atomically."""
    data = {k: v for k, v in h.items() if k not in extra_args}
    atomic_write(path, lambda f: f.write(json.dumps(data, indent=4).encode()))


def atomic_write(path: str, write: Callable[[BinaryIO], Any]) -> None:
    """Call write(binary_file) on a temp file next to `path`, then rename it into place.

    A crash or a full disk leaves the previous file untouched, never a half-written one.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp_" + os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp creates the file private (0600); give it the permissions a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_checkpoint(path: str, obj: Dict[str, Any]) -> None:
    atomic_write(path, lambda f: torch.save(obj, f))
    print(f"Saved checkpoint {path}")


def load_checkpoint(path: str, device: torch.device, keys: Sequence[str] = ()) -> Dict[str, Any]:
    """A checkpoint dict; each of `keys` must be in it."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        checkpoint = torch.load(path, map_location=device, weights_only=False)
    except Exception as e:
        raise ValueError(f"cannot read checkpoint {path}: {e}") from None
    for key in keys:
        if not isinstance(checkpoint, dict) or key not in checkpoint:
            raise ValueError(f"checkpoint {path} has no '{key}' entry")
    return checkpoint


def load_weights(module: torch.nn.Module, path: str, key: str, device: torch.device) -> None:
    """Load entry `key` of the release-format checkpoint at `path` into `module`."""
    from models import load_release_state_dict
    load_release_state_dict(module, load_checkpoint(path, device, [key])[key], path)


def checkpoint_file(folder: str, kind: str, step: int) -> str:
    """Path of the `kind` ('encoder', 'decoder' or 'do') checkpoint of `step`, named as the release names it."""
    return os.path.join(folder, f"{kind}_{step:08d}")


def checkpoint_steps(folder: str, prefix: str) -> List[int]:
    """Step numbers of the `{prefix}NNNNNNNN` files in `folder`, ascending."""
    steps = []
    for path in glob.glob(os.path.join(glob.escape(folder), prefix + "?" * 8)):
        match = re.fullmatch(re.escape(prefix) + r"(\d{8})", os.path.basename(path))
        if match:
            steps.append(int(match.group(1)))
    return sorted(steps)


def newest_complete_step(folder: str) -> Optional[int]:
    """The newest step for which encoder_, decoder_ and do_ checkpoints all exist."""
    sets = [set(checkpoint_steps(folder, p)) for p in ("encoder_", "decoder_", "do_")]
    complete = set.intersection(*sets)
    return max(complete) if complete else None


def bitrate(h: Dict[str, Any]) -> float:
    """Nominal bits per second: codebooks x bits per code x latent frames per second."""
    return (h["n_codebooks"] * math.log2(h["codebook_size"]) * h["sampling_rate"]
            / (h["hop_size"] * h["ratio"]))


def plot_spectrogram(spectrogram: np.ndarray) -> "Figure":
    """A matplotlib figure of a (F, T) array, for TensorBoard."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 2.5))
    im = ax.imshow(spectrogram, aspect="auto", origin="lower", interpolation="none")
    fig.colorbar(im, ax=ax)
    fig.canvas.draw()
    plt.close(fig)
    return fig
