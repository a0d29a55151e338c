"""The configuration: one table of every key, and the command line built from it.

Each key has a type, a default, a check and one line of help. The table drives the
validation of config files, every script's `--help` and the README's key table
(`python config.py` prints it). A new feature adds its keys here, with a default that
keeps the paper's behaviour.
"""
import argparse
import contextlib
import io
import json
import math
import os
import signal
import sys
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

from spectral import empty_mel_bands
from utils import atomic_write

ROOT = os.path.dirname(os.path.abspath(__file__))
# Scripts read the repository's own config.json unless told otherwise, from any folder.
DEFAULT_CONFIG = os.path.join(ROOT, "config.json")


class ConfigError(ValueError):
    """A config that cannot train or run the model; the message names the key."""


class AttrDict(dict):
    """A dict whose keys are also attributes, as HiFi-GAN-style code reads `h.key`.

    `source` (the file it was read from) is a plain attribute, not a key.
    """
    source = "config"

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "source":
            object.__setattr__(self, name, value)
        else:
            self[name] = value


# A check returns None when the value is fine, else what the value must be.
Check = Callable[[Any], Optional[str]]


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def path(v: Any) -> Optional[str]:
    return None if isinstance(v, str) and v else "a non-empty path string"


def positive_int(v: Any) -> Optional[str]:
    return None if _is_int(v) and v > 0 else "a positive integer"


def two_or_more(v: Any) -> Optional[str]:
    # A codebook of one code carries no bits.
    return None if _is_int(v) and v >= 2 else "an integer >= 2"


def non_negative_int(v: Any) -> Optional[str]:
    return None if _is_int(v) and v >= 0 else "an integer >= 0"


def odd_kernel(v: Any) -> Optional[str]:
    # Convolutions padded by (k - 1) / 2 keep their length only for odd kernels.
    return None if _is_int(v) and v > 0 and v % 2 else "an odd positive integer"


def positive_number(v: Any) -> Optional[str]:
    return None if _is_number(v) and v > 0 else "a positive number"


def decay(v: Any) -> Optional[str]:
    # A factor above 1 would grow the learning rate every epoch.
    return None if _is_number(v) and 0 < v <= 1 else "a number in (0, 1]"


def seed(v: Any) -> Optional[str]:
    # The range torch's generators take.
    return None if _is_int(v) and -2 ** 63 <= v < 2 ** 64 else "an integer from -2^63 to 2^64 - 1"


def beta(v: Any) -> Optional[str]:
    # AdamW's betas live in [0, 1); beta1 = 0 is a common GAN setting.
    return None if _is_number(v) and 0 <= v < 1 else "a number in [0, 1)"


def optional_path(v: Any) -> Optional[str]:
    return None if isinstance(v, str) else "a path string (empty for none)"


def boolean(v: Any) -> Optional[str]:
    return None if isinstance(v, bool) else "true or false"


def non_negative_number(v: Any) -> Optional[str]:
    return None if _is_number(v) and v >= 0 else "a number >= 0"


def fraction(v: Any) -> Optional[str]:
    return None if _is_number(v) and 0 <= v <= 1 else "a number in [0, 1]"


def one_of(*choices: str) -> Check:
    def check(v: Any) -> Optional[str]:
        return None if v in choices else "one of " + ", ".join(f'"{c}"' for c in choices)
    return check


def anything(v: Any) -> Optional[str]:
    return None


def int_list(length: Optional[int] = None) -> Check:
    def check(v: Any) -> Optional[str]:
        ok = isinstance(v, list) and v and all(_is_int(x) and x > 0 for x in v)
        if ok and (length is None or len(v) == length):
            return None
        return f"a list of {length or 'one or more'} positive integers"
    return check


def resolutions(v: Any) -> Optional[str]:
    ok = isinstance(v, list) and v and all(
        isinstance(r, list) and len(r) == 3 and all(_is_int(x) and x > 0 for x in r) and r[1] <= r[2] <= r[0]
        for r in v)
    # A hop longer than the window would leave samples that this discriminator never sees.
    return None if ok else "a list of [n_fft, hop, win] triples of positive integers with hop <= win <= n_fft"


@dataclass(frozen=True)
class Key:
    name: str
    default: Any
    check: Check
    help: str
    release: bool = True    # in the authors' config.json (a config must name it)
    network: bool = False   # shapes the generator: checkpoints are only valid with the same value
    discriminator: bool = False     # shapes a discriminator: a training run resumes only with the same value


_RESBLOCK_KERNELS = [3, 7, 11]
_RESBLOCK_DILATIONS = [[1, 3, 5], [1, 3, 5], [1, 3, 5]]


def _branch_keys(part: str) -> List[Key]:
    """The release's per-branch keys that its code reads nowhere, accepted for compatibility."""
    keys = [Key(f"{part}_resblock_kernel_sizes", _RESBLOCK_KERNELS, anything, "unused (as in the release)"),
            Key(f"{part}_resblock_dilation_sizes", _RESBLOCK_DILATIONS, anything, "unused (as in the release)")]
    if part.endswith("Encoder"):
        keys.append(Key(f"{part}_input_conv_kernel_size", 7, anything,
                        "unused (as in the release): the embed kernel is fixed at 7"))
    return keys


SCHEMA: Tuple[Key, ...] = (
    Key("input_training_wav_list", "filelists/train.txt", path, "training file list, one audio path per line"),
    Key("input_validation_wav_list", "filelists/valid.txt", path, "validation file list"),
    Key("test_input_wavs_dir", "test_wavs", path, "inference input folder"),
    Key("test_wav_output_dir", "output_wav", path, "inference output folder"),
    Key("batch_size", 16, positive_int, "training batch"),
    Key("learning_rate", 0.0002, positive_number, "AdamW learning rate (weight decay: PyTorch default 0.01)"),
    Key("adam_b1", 0.8, beta, "AdamW beta1, in [0, 1)"),
    Key("adam_b2", 0.99, beta, "AdamW beta2, in [0, 1)"),
    Key("lr_decay", 0.999, decay, "ExponentialLR gamma, stepped once per epoch"),
    Key("seed", 1234, seed, "torch / python seeds and the one-time shuffle of the training list"),
    Key("training_epochs", 3100, positive_int, "epochs (the paper trains about 1M steps)"),
    Key("max_steps", 0, non_negative_int, "stop after this many steps, e.g. 1000000 as in the paper "
        "(0: train for training_epochs); the last checkpoint set is numbered max_steps - 1", release=False),
    Key("stdout_interval", 5, positive_int, "steps between stdout lines"),
    Key("checkpoint_interval", 5000, positive_int, "steps between checkpoint sets"),
    Key("summary_interval", 100, positive_int, "steps between TensorBoard scalars"),
    Key("validation_interval", 5000, positive_int, "steps between validations (step 0 included)"),
    Key("checkpoint_path", "cp_Encoder_Decoder", path, "checkpoints, TensorBoard logs and the config used"),
    Key("checkpoint_file_load_Encoder", "cp_Encoder_Decoder/encoder_01000000", path, "encoder checkpoint for inference"),
    Key("checkpoint_file_load_Decoder", "cp_Encoder_Decoder/decoder_01000000", path, "decoder checkpoint for inference"),

    Key("AMP_Encoder_channel", 256, positive_int, "amplitude branch output width; the downsampling conv halves it",
        network=True),
    *_branch_keys("AMP_Encoder"),
    Key("AMP_Encoder_output_downconv_kernel_size", 7, odd_kernel, "amplitude downsampling conv kernel (stride ratio)",
        network=True),
    Key("PHA_Encoder_channel", 256, positive_int, "phase branch output width; the downsampling conv halves it",
        network=True),
    *_branch_keys("PHA_Encoder"),
    Key("PHA_Encoder_output_downconv_kernel_size", 7, odd_kernel, "phase downsampling conv kernel (stride ratio)",
        network=True),
    Key("AMP_Decoder_channel", 256, positive_int, "decoder amplitude branch width (must equal the encoder's)",
        network=True),
    *_branch_keys("AMP_Decoder"),
    Key("AMP_Decoder_input_upconv_kernel_size", 16, positive_int,
        "amplitude transposed conv kernel (stride ratio, padding (k - ratio) / 2)", network=True),
    Key("AMP_Decoder_output_conv_kernel_size", 7, odd_kernel, "log-amplitude output conv kernel", network=True),
    Key("PHA_Decoder_channel", 256, positive_int, "decoder phase branch width (must equal the encoder's)",
        network=True),
    *_branch_keys("PHA_Decoder"),
    Key("PHA_Decoder_input_upconv_kernel_size", 16, positive_int,
        "phase transposed conv kernel (stride ratio, padding (k - ratio) / 2)", network=True),
    Key("PHA_Decoder_output_R_conv_kernel_size", 7, odd_kernel, "phase real-part output conv kernel", network=True),
    Key("PHA_Decoder_output_I_conv_kernel_size", 7, odd_kernel, "phase imaginary-part output conv kernel",
        network=True),
    Key("latent_output_conv_kernel_size", 7, odd_kernel, "encoder output conv kernel", network=True),
    Key("latent_input_conv_kernel_size", 7, odd_kernel, "decoder input conv kernel", network=True),
    Key("ratio", 8, positive_int, "STFT frames per latent frame", network=True),
    Key("latent_dim", 32, positive_int, "latent and codebook dimension", network=True),
    Key("n_codebooks", 4, positive_int, "residual VQ stages", release=False, network=True),
    Key("codebook_size", 1024, two_or_more, "codes per stage", release=False, network=True),
    Key("convnext_dim", 256, positive_int, "ConvNeXt v2 width of every branch", release=False, network=True),
    Key("convnext_hidden_dim", 512, positive_int, "ConvNeXt v2 hidden width", release=False, network=True),
    Key("convnext_layers", 8, positive_int, "ConvNeXt v2 blocks per branch", release=False, network=True),
    Key("mpd_periods", [2, 3, 5, 7, 11], int_list(), "MPD periods", release=False, discriminator=True),
    Key("mpd_channels", [32, 128, 512, 1024], int_list(4), "MPD conv widths", release=False, discriminator=True),
    Key("mrd_resolutions", [[512, 20, 160], [1024, 40, 320], [2048, 80, 640]], resolutions,
        "MRD (n_fft, hop, win) triples", release=False, discriminator=True),
    Key("mrd_channels", 64, positive_int, "MRD width", release=False, discriminator=True),
    Key("segment_size", 7960, positive_int, "training crop in samples: a multiple of hop_size with "
        "segment_size / hop_size + 1 a multiple of ratio"),
    Key("num_mels", 80, positive_int,
        "the release's mel band count (the losses read num_mels_for_loss, which must equal it)"),
    Key("n_fft", 1024, positive_int, "STFT size", network=True),
    Key("hop_size", 40, positive_int, "STFT hop", network=True),
    Key("win_size", 320, positive_int, "STFT Hann window length (<= n_fft)", network=True),
    Key("num_mels_for_loss", 80, positive_int, "mel bands of the mel losses (must equal num_mels)"),
    Key("sampling_rate", 48000, positive_int, "audio is resampled to this rate", network=True),
    Key("num_workers", 4, non_negative_int, "DataLoader workers"),
    Key("causal", False, boolean, "APCodec-S: causal encoder and decoder that stream (false: the paper's model)",
        release=False, network=True),
    Key("causal_kernel_size", 7, positive_int, "causal ConvNeXt depthwise kernel (1: pure feed-forward); "
        "used when causal", release=False, network=True),
    Key("kd_teacher_encoder", "", optional_path, "knowledge distillation: the frozen non-causal teacher's "
        "encoder checkpoint (empty: no distillation)", release=False),
    Key("kd_teacher_decoder", "", optional_path, "the teacher's decoder checkpoint (set with kd_teacher_encoder)",
        release=False),
    Key("kd_weight", 1.0, non_negative_number, "weight of the distillation loss added to the generator loss "
        "(0: the 'w/o KD' ablation)", release=False),

    Key("strict_data", False, boolean, "stop at start-up on any unusable file in a list, instead of "
        "reporting and skipping it", release=False),
    Key("keep_last_checkpoints", 0, non_negative_int, "checkpoint sets to keep; older ones are deleted once "
        "a new set is complete (0 keeps all, as the release does)", release=False),
    Key("max_nonfinite_steps", 50, positive_int, "consecutive steps with a non-finite loss (each skipped) "
        "after which training stops", release=False),
    Key("quantizer_dropout", 0.0, fraction, "fraction of each training batch coded with a random number "
        "of codebooks (DAC style), so that fewer codebooks decode well; 0 = the paper", release=False),
    Key("shuffle_every_epoch", False, boolean, "reshuffle the training list every epoch (seeded); "
        "false keeps the release's one-time shuffle", release=False),
    Key("mixed_precision", "no", one_of("no", "bf16", "fp16"), "autocast of the conv stacks in training "
        "(fp16 adds gradient scalers); STFTs, phase, quantizer and losses stay float32", release=False),
    Key("compile", "no", one_of("no", "default", "reduce-overhead", "max-autotune"),
        "torch.compile mode for the generator and discriminators in training (reduce-overhead: CUDA graphs)",
        release=False),
    Key("grad_clip", 0, non_negative_number, "max gradient norm of G and of D (0: no clipping; "
        "the norms are logged either way)", release=False),
    Key("fused_adamw", False, boolean, "fused AdamW kernels: faster, equal to the default up to float rounding; "
        "a non-finite loss's update is skipped on the device, its count read back on logging and "
        "checkpoint steps and at least every 10 steps",
        release=False),
    Key("cuda_graph", False, boolean, "record a training step's forward and backward passes as CUDA graphs "
        "and replay them (a few launches a step instead of thousands; the same kernels and numbers); one GPU",
        release=False),
)

KEYS: Dict[str, Key] = {key.name: key for key in SCHEMA}
NETWORK_KEYS = tuple(key.name for key in SCHEMA if key.network)
# What a resumed training run must keep: its generator's and its discriminators' keys.
RUN_NETWORK_KEYS = NETWORK_KEYS + tuple(key.name for key in SCHEMA if key.discriminator)


def differing_keys(a: Dict[str, Any], b: Dict[str, Any], keys: Iterable[str]) -> List[str]:
    """Those of `keys` (present in both) whose values differ between configs `a` and `b`,
    leaving out causal_kernel_size where neither is causal: it shapes no layer of the paper's model."""
    causal = a.get("causal", False) or b.get("causal", False)
    return [k for k in keys if k in a and k in b and a[k] != b[k] and (causal or k != "causal_kernel_size")]


def _check_consistency(h: Dict[str, Any]) -> None:
    """Checks that relate several keys; each message names the key to change."""
    def fail(key: str, message: str) -> None:
        raise ConfigError(f"config key '{key}' ({h[key]!r}) {message}")

    if h["n_fft"] % 2:
        fail("n_fft", "must be even: the decoder predicts n_fft / 2 + 1 frequency bins")
    if h["win_size"] > h["n_fft"]:
        fail("win_size", f"must be <= n_fft ({h['n_fft']})")
    if h["hop_size"] >= h["win_size"]:
        fail("hop_size", f"must be < win_size ({h['win_size']}): the inverse STFT needs overlapping windows")
    if h["num_mels"] != h["num_mels_for_loss"]:
        fail("num_mels_for_loss", f"must equal num_mels ({h['num_mels']})")
    empty = empty_mel_bands(h["sampling_rate"], h["n_fft"], h["num_mels"])
    if empty:
        fail("num_mels", f"leaves {empty} mel band(s) empty: at n_fft {h['n_fft']} and sampling_rate "
                         f"{h['sampling_rate']} the lowest bands are narrower than a frequency bin; use fewer bands "
                         f"or a larger n_fft")
    if h["segment_size"] % h["hop_size"]:
        fail("segment_size", f"must be a multiple of hop_size ({h['hop_size']})")
    if (h["segment_size"] // h["hop_size"] + 1) % h["ratio"]:
        fail("segment_size", f"must make segment_size / hop_size + 1 a multiple of ratio ({h['ratio']}), "
                             f"e.g. 7960 for hop 40, ratio 8")
    widest = max([h["n_fft"]] + [resolution[0] for resolution in h["mrd_resolutions"]])
    if h["segment_size"] <= widest // 2:
        fail("segment_size", f"must be more than half the widest STFT ({widest} points, n_fft or mrd_resolutions): "
                             f"the STFTs reflect-pad the crop by that much")
    if bool(h["kd_teacher_encoder"]) != bool(h["kd_teacher_decoder"]):
        fail("kd_teacher_decoder", "and kd_teacher_encoder must be set together (or both left empty)")
    if h["cuda_graph"] and h["compile"] not in ("no", "default"):
        fail("cuda_graph", f"records the step itself: use it with compile no or default, not {h['compile']!r}")
    for branch in ("AMP", "PHA"):
        if h[f"{branch}_Decoder_channel"] != h[f"{branch}_Encoder_channel"]:
            fail(f"{branch}_Decoder_channel", f"must equal {branch}_Encoder_channel "
                 f"({h[f'{branch}_Encoder_channel']}): the release sizes the decoder's Linear layers with it")
        if h[f"{branch}_Encoder_channel"] % 2:
            fail(f"{branch}_Encoder_channel", "must be even")
        key = f"{branch}_Decoder_input_upconv_kernel_size"
        if h[key] < h["ratio"] or (h[key] - h["ratio"]) % 2:
            fail(key, f"must be >= ratio ({h['ratio']}) and differ from it by an even number, "
                      f"so that the decoder upsamples exactly")


def build_config(raw: Dict[str, Any], source: str = "config") -> AttrDict:
    """Check a dict of config values and return it with every key filled in.

    Release keys must be present (a typo never falls back silently); added keys get their
    defaults, so a release config.json works unchanged.
    """
    for name in raw:
        if name not in KEYS:
            raise ConfigError(f"{source}: unknown config key '{name}'")
    h = {}
    for key in SCHEMA:
        if key.name not in raw and key.release:
            raise ConfigError(f"{source}: missing config key '{key.name}'")
        h[key.name] = raw.get(key.name, key.default)
        problem = key.check(h[key.name])
        if problem:
            raise ConfigError(f"{source}: config key '{key.name}' must be {problem}, got {h[key.name]!r}")
    try:
        _check_consistency(h)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    config = AttrDict(h)
    config.source = source
    return config


def read_config_file(path: str) -> Dict[str, Any]:
    """The JSON object in `path`, with a one-line error for a missing or malformed file."""
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror or e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: must hold a JSON object of config keys")
    return raw


def load_config(path: str, overrides: Optional[Dict[str, Any]] = None) -> AttrDict:
    """The config in `path` with `overrides` (command-line options) applied, checked; a bad
    override is named as its option."""
    raw = read_config_file(path)
    for name, value in (overrides or {}).items():
        problem = KEYS[name].check(value) if name in KEYS else None
        if problem:
            raise ConfigError(f"--{name} must be {problem}, got {value!r}")
    raw.update(overrides or {})
    return build_config(raw, path)


def save_config(h: Dict[str, Any], path: str) -> None:
    """Write the config actually used (overrides applied), atomically."""
    data = {key.name: h[key.name] for key in SCHEMA}
    atomic_write(path, lambda f: f.write((json.dumps(data, indent=4) + "\n").encode()))


def _parse_value(name: str, text: str) -> Any:
    # Paths stay strings even when they look like JSON numbers ("2024").
    if KEYS[name].check in (path, optional_path):
        return text
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def make_parser(description: str, default_config: str = DEFAULT_CONFIG,
                replaced: Sequence[str] = ()) -> argparse.ArgumentParser:
    """An argument parser with `--config` and `--KEY VALUE` for every config key but `replaced`.

    Scripts add their own options to it (those named in `replaced` among them) before
    calling `parse_command_line`.
    """
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     usage="%(prog)s [options] [--config FILE] [--KEY VALUE ...]",
                                     allow_abbrev=False)
    parser.add_argument("--config", default=default_config, metavar="FILE",
                        help=f"JSON config file (default {default_config})")
    keys = parser.add_argument_group(
        "config keys", "Each overrides the config file's value. VALUE is read as JSON when it parses "
                       "(numbers, lists), else as a string. The defaults shown are the repository's "
                       "config.json's; the config file in use may set others.")
    for key in SCHEMA:
        if key.name in replaced:
            continue
        default = json.dumps(key.default)
        keys.add_argument(f"--{key.name}", metavar="VALUE", default=argparse.SUPPRESS,
                          help=f"{key.help} (default {default})".replace("%", "%%"))
    return parser


def parse_command_line(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]] = None
                       ) -> Tuple[AttrDict, argparse.Namespace]:
    """(config with overrides applied, the script's own options)."""
    args = parser.parse_args(argv)
    overrides = {name: _parse_value(name, getattr(args, name)) for name in KEYS if hasattr(args, name)}
    for name in overrides:
        delattr(args, name)
    return load_config(args.config, overrides), args


def _terminated(signum: int, frame: Any) -> None:
    print("terminated", file=sys.stderr)
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def one_line_exits() -> Iterator[None]:
    """Bad input (OSError, ValueError), Ctrl-C and SIGTERM inside end the process with one line
    (exit 1, 130, 143), through the cleanup of what was being written."""
    # SIGTERM (kill, timeout, a batch scheduler) ends the job as Ctrl-C does, through its
    # cleanup: by default it would kill the process in the middle of writing a file.
    previous = signal.getsignal(signal.SIGTERM)
    if previous is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _terminated)
    try:
        yield
    except (OSError, ValueError) as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(128 + signal.SIGINT)
    finally:
        if previous is signal.SIG_DFL:
            signal.signal(signal.SIGTERM, previous)


def run_cli(job: Callable[..., Any], parser: argparse.ArgumentParser,
            argv: Optional[Sequence[str]] = None) -> None:
    """Parse the command line and run job(h, args); bad input, Ctrl-C and SIGTERM exit with one line."""
    # File names that are not UTF-8 are printed with escapes rather than ending the run.
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="backslashreplace")
    # torchrun starts every process of a machine with the same command line: the first one's
    # word on it is enough, argparse's own errors (an unknown option) included.
    quiet = os.environ.get("LOCAL_RANK", "0") != "0"
    with one_line_exits():
        try:
            with contextlib.redirect_stderr(io.StringIO()) if quiet else contextlib.nullcontext():
                h, args = parse_command_line(parser, argv)
        except (OSError, ValueError):
            if quiet:
                sys.exit(1)
            raise
        job(h, args)


def bitrate(h: Dict[str, Any]) -> float:
    """Nominal bits per second: codebooks x bits per code x latent frames per second."""
    return (h["n_codebooks"] * math.log2(h["codebook_size"]) * h["sampling_rate"]
            / (h["hop_size"] * h["ratio"]))


def markdown_table() -> str:
    """README's table of every key, generated from SCHEMA."""
    lines = ["| key | default | meaning |", "|---|---|---|"]
    for key in SCHEMA:
        added = "" if key.release else " *(added)*"
        lines.append(f"| `{key.name}`{added} | `{json.dumps(key.default)}` | {key.help} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(markdown_table(), end="")
