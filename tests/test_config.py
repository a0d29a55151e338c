"""config.py: the key table, checks that name the key, command-line overrides, --help and the README table."""
import json
import os
import re
import subprocess
import sys

import pytest

from config import (KEYS, NETWORK_KEYS, RUN_NETWORK_KEYS, SCHEMA, AttrDict, ConfigError, bitrate, build_config,
                    load_config, make_parser, markdown_table, parse_command_line, run_cli)
from conftest import ROOT, default_raw
from discriminators import MultiPeriodDiscriminator, MultiResolutionDiscriminator
from models import Decoder, Encoder

SCRIPTS = ("train.py", "inference.py", "evaluate.py", "bench.py", "demo.py")


def _write(tmp_path, raw):
    path = tmp_path / "c.json"
    path.write_text(json.dumps(raw))
    return str(path)


def _parse(argv):
    return parse_command_line(make_parser("test"), argv)[0]


def test_default_config_holds_every_key_with_the_table_default():
    raw = default_raw()
    assert list(raw) == [key.name for key in SCHEMA]
    for key in SCHEMA:
        assert raw[key.name] == key.default, key.name
    h = build_config(raw)
    assert (h.batch_size, h.learning_rate, h.adam_b1, h.adam_b2, h.lr_decay) == (16, 2e-4, 0.8, 0.99, 0.999)
    assert (h.segment_size, h.n_fft, h.hop_size, h.win_size, h.ratio, h.latent_dim) == (7960, 1024, 40, 320, 8, 32)
    assert bitrate(h) == 4 * 10 * 48000 / 320 == 6000


def test_release_config_without_added_keys_gets_defaults():
    raw = {k: v for k, v in default_raw().items() if KEYS[k].release}
    assert len(raw) == 51
    h = build_config(raw)
    assert h.n_codebooks == 4 and h.codebook_size == 1024 and h.convnext_layers == 8


@pytest.mark.parametrize("change, key", [
    ({"batch_sise": 3}, "batch_sise"),
    ({"segment_size": 8000}, "segment_size"),
    ({"segment_size": 7980}, "segment_size"),
    ({"segment_size": 920}, "segment_size"),
    ({"win_size": 2048}, "win_size"),
    ({"hop_size": 320}, "hop_size"),
    ({"cuda_graph": True, "compile": "reduce-overhead"}, "cuda_graph"),
    ({"num_mels_for_loss": 64}, "num_mels_for_loss"),
    ({"AMP_Decoder_channel": 128}, "AMP_Decoder_channel"),
    ({"PHA_Decoder_input_upconv_kernel_size": 15}, "PHA_Decoder_input_upconv_kernel_size"),
    ({"latent_output_conv_kernel_size": 6}, "latent_output_conv_kernel_size"),
    ({"batch_size": 0}, "batch_size"),
    ({"batch_size": True}, "batch_size"),
    ({"mpd_channels": [32, 128]}, "mpd_channels"),
    ({"mrd_resolutions": [[512, 20, 1024]]}, "mrd_resolutions"),
    ({"mrd_resolutions": [[512, 200, 160]]}, "mrd_resolutions"),
    ({"codebook_size": 1}, "codebook_size"),
    ({"num_mels": 200, "num_mels_for_loss": 200}, "num_mels"),
    ({"adam_b1": 1.0}, "adam_b1"),
    ({"adam_b2": 1.5}, "adam_b2"),
    ({"adam_b1": -0.1}, "adam_b1"),
    ({"learning_rate": 0}, "learning_rate"),
    ({"lr_decay": 9.99}, "lr_decay"),
    ({"seed": 2 ** 64}, "seed"),
    ({"n_fft": 1023}, "n_fft"),
    ({"checkpoint_path": ""}, "checkpoint_path"),
])
def test_bad_values_name_the_key(change, key):
    raw = default_raw()
    raw.update(change)
    with pytest.raises(ConfigError, match=f"'{key}'"):
        build_config(raw)


@pytest.mark.parametrize("b1", [0.0, 0, 0.5, 0.999])
def test_betas_accept_zero_to_one_exclusive(b1):
    h = build_config(dict(default_raw(), adam_b1=b1, adam_b2=b1))
    assert h.adam_b1 == b1 and h.adam_b2 == b1


def test_missing_release_key_is_named():
    raw = default_raw()
    del raw["hop_size"]
    with pytest.raises(ConfigError, match="missing config key 'hop_size'"):
        build_config(raw)


def test_unreadable_config_files_are_named_in_one_line(tmp_path):
    files = {"missing.json": None, "latin1.json": b'{"seed": "\xe9"}', "text.json": b"seed = 1",
             "list.json": b"[1, 2]", "folder.json": "folder"}
    expected = {"missing.json": "config file not found: ", "latin1.json": ": not valid JSON (",
                "text.json": ": not valid JSON (", "list.json": ": must hold a JSON object",
                "folder.json": "cannot read config file "}
    for name, content in files.items():
        path = tmp_path / name
        if content == "folder":
            path.mkdir()
        elif content is not None:
            path.write_bytes(content)
        with pytest.raises(ConfigError) as error:
            load_config(str(path))
        message = str(error.value)
        assert str(path) in message and expected[name] in message and "\n" not in message, (name, message)


def test_command_line_overrides(tmp_path):
    path = _write(tmp_path, default_raw())
    h = _parse(["--config", path, "--batch_size", "4", "--mpd_periods", "[2, 3]",
                "--checkpoint_path", "runs/x", "--learning_rate", "1e-3", "--adam_b1", "0.0"])
    assert h.batch_size == 4 and h.mpd_periods == [2, 3] and h.checkpoint_path == "runs/x"
    assert h.learning_rate == 1e-3 and h.adam_b1 == 0.0
    assert h.source == path and "source" not in h
    # A combination that no longer holds names the file and the key to change.
    with pytest.raises(ConfigError, match=f"^{re.escape(path)}: config key '.*ratio"):
        _parse(["--config", path, "--ratio", "7"])
    with pytest.raises(ConfigError, match="^--adam_b2 must be"):
        _parse(["--config", path, "--adam_b2", "1.5"])
    # A bad value from the file is named as the file's key.
    with pytest.raises(ConfigError, match=f"^{re.escape(path)}: config key 'adam_b2' must be"):
        _parse(["--config", _write(tmp_path, dict(default_raw(), adam_b2=1.5))])


def test_unknown_option_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        _parse(["--config", _write(tmp_path, default_raw()), "--bogus", "1"])
    assert "--bogus" in capsys.readouterr().err


def test_overrides_fill_missing_keys_and_keep_paths_as_strings(tmp_path):
    raw = default_raw()
    del raw["num_workers"]
    path = _write(tmp_path, raw)
    with pytest.raises(ConfigError, match="missing config key 'num_workers'"):
        load_config(path)
    h = _parse(["--config", path, "--num_workers", "2", "--checkpoint_path", "2024", "--kd_teacher_encoder", "2024",
                "--kd_teacher_decoder", "null"])
    assert h.num_workers == 2 and h.checkpoint_path == "2024"
    assert h.kd_teacher_encoder == "2024" and h.kd_teacher_decoder == "null"
    with pytest.raises(ConfigError, match="mrd_resolutions"):
        _parse(["--config", path, "--num_workers", "2", "--mrd_resolutions", "5"])
    with pytest.raises(ConfigError, match="learning_rate"):
        _parse(["--config", path, "--num_workers", "2", "--learning_rate", "fast"])


def test_network_keys_are_the_generator_shape_keys():
    assert {"n_fft", "hop_size", "ratio", "latent_dim", "n_codebooks", "codebook_size", "sampling_rate",
            "convnext_dim", "AMP_Encoder_channel"} <= set(NETWORK_KEYS)
    assert not {"batch_size", "learning_rate", "mpd_periods", "checkpoint_path"} & set(NETWORK_KEYS)


class _ReadKeys(AttrDict):
    """A config that records which keys are read."""

    def __getitem__(self, name):
        self.__dict__.setdefault("read", set()).add(name)
        return super().__getitem__(name)


@pytest.mark.parametrize("causal", [False, True])
def test_every_key_the_networks_read_is_kept_by_checkpoints_and_resumes(causal):
    """A key that the generator's or the discriminators' constructors read but that is not marked
    network / discriminator would let a checkpoint load into another network without a word."""
    h = _ReadKeys(build_config(dict(default_raw(), causal=causal)))
    Encoder(h), Decoder(h)
    generator = h.__dict__.pop("read")
    MultiPeriodDiscriminator(h), MultiResolutionDiscriminator(h)
    discriminators = h.__dict__.pop("read")
    # Dropout of quantizer stages acts in training only: inference runs every stage asked for.
    generator -= {"quantizer_dropout"}
    assert generator <= set(NETWORK_KEYS), generator - set(NETWORK_KEYS)
    assert discriminators <= set(RUN_NETWORK_KEYS), discriminators - set(RUN_NETWORK_KEYS)
    assert {"mpd_periods", "mrd_resolutions"} <= discriminators


def test_train_script_reports_bad_config_in_one_line(tmp_path):
    raw = default_raw()
    raw["n_fft"] = 256
    result = subprocess.run([sys.executable, "train.py", "--config", _write(tmp_path, raw)],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert result.stderr.strip().count("\n") == 0 and "win_size" in result.stderr


def test_ctrl_c_exits_with_one_line_and_the_signal_status(tmp_path, capsys):
    """Ctrl-C where a script does not handle it itself (a long data check, a folder being coded)."""
    def job(h, args):
        raise KeyboardInterrupt
    with pytest.raises(SystemExit) as stopped:
        run_cli(job, make_parser("test"), ["--config", _write(tmp_path, default_raw())])
    assert stopped.value.code == 130 and capsys.readouterr().err == "interrupted\n"


@pytest.mark.parametrize("local_rank, says", [("0", True), ("1", False)])
def test_under_torchrun_only_local_rank_0_says_what_is_wrong_with_the_command_line(tmp_path, capsys, monkeypatch,
                                                                                   local_rank, says):
    """torchrun gives every process of a machine the same command line: argparse's own error
    (an unknown option) and a bad value are each said by local rank 0 alone."""
    monkeypatch.setenv("LOCAL_RANK", local_rank)
    config = _write(tmp_path, default_raw())
    for argv, message in ((["--no_such_option", "1"], "unrecognized arguments: --no_such_option"),
                          (["--batch_size", "-1"], "error: --batch_size must be")):
        with pytest.raises(SystemExit) as stopped:
            run_cli(lambda h, args: None, make_parser("test"), ["--config", config] + argv)
        assert stopped.value.code != 0
        err = capsys.readouterr().err + str(stopped.value.code)
        assert (message in err) == says, err


_TERMINATED_MID_WRITE = """
import os, signal, sys
sys.path.insert(0, {root!r})
from config import make_parser, run_cli
from utils import atomic_write

def write(f):
    f.write(b"x" * 1000)
    os.kill(os.getpid(), signal.SIGTERM)
    f.write(b"y")

run_cli(lambda h, args: atomic_write(os.path.join(sys.argv[1], "out.wav"), write), make_parser("test"), [])
"""


def test_sigterm_exits_with_one_line_and_leaves_no_half_written_file(tmp_path):
    """SIGTERM (kill, timeout, a scheduler) in the middle of writing a file: the temp file is
    removed, as after Ctrl-C, where by default the process would die and leave it."""
    script = tmp_path / "job.py"
    script.write_text(_TERMINATED_MID_WRITE.format(root=ROOT))
    out = tmp_path / "out"
    out.mkdir()
    result = subprocess.run([sys.executable, str(script), str(out)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 143 and result.stderr == "terminated\n"
    assert os.listdir(out) == []


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_lists_every_key_and_keeps_the_docstring_lines(script, tmp_path):
    # From another folder: every script finds the repository's own config.json.
    result = subprocess.run([sys.executable, os.path.join(ROOT, script), "--help"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    text = result.stdout
    for key in SCHEMA:
        # A script may replace a key's option with its own (inference.py's --n_codebooks N and
        # its --compile switch).
        own_switch = script == "inference.py" and key.name == "compile"
        assert re.search(rf"--{key.name}( VALUE| N)", text) or own_switch and "--compile  " in text, key.name
    usage_line = next(line for line in text.splitlines() if line.strip().startswith(f"python {script}"))
    assert usage_line.startswith("    python"), usage_line
    assert "SPEC" not in text and "EVALUATION" not in text


def test_readme_key_table_is_generated_from_the_schema():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    assert markdown_table() in readme, "README's key table is out of date: paste `python config.py`'s output over it"


def test_repository_cites_no_document_outside_it():
    for folder, _, names in os.walk(ROOT):
        if any(part.startswith(".") for part in os.path.relpath(folder, ROOT).split(os.sep)):
            continue
        for name in names:
            if name.endswith((".py", ".md", ".json", ".txt")):
                with open(os.path.join(folder, name), encoding="utf-8") as f:
                    text = f.read()
                # Spelled in pieces so that this file does not match itself.
                for word in ("SPEC" + " §", "SPEC" + ".md", "EVALUATION" + ".md", "STREAMING" + ".md", "../" + "shared"):
                    assert word not in text, (name, word)
