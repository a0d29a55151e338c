"""Config loading: release keys, added defaults, consistency checks and command-line overrides."""
import json
import subprocess
import sys

import pytest

from conftest import ROOT, default_raw
from utils import ADDED_DEFAULTS, RELEASE_KEYS, ConfigError, bitrate, build_config, load_config


def _write(tmp_path, raw):
    path = tmp_path / "c.json"
    path.write_text(json.dumps(raw))
    return str(path)


def test_default_config_is_release_plus_added_keys():
    raw = default_raw()
    assert set(raw) == set(RELEASE_KEYS) | set(ADDED_DEFAULTS)
    h = build_config(raw)
    assert (h.batch_size, h.learning_rate, h.adam_b1, h.adam_b2, h.lr_decay) == (16, 2e-4, 0.8, 0.99, 0.999)
    assert (h.segment_size, h.n_fft, h.hop_size, h.win_size, h.ratio, h.latent_dim) == (7960, 1024, 40, 320, 8, 32)
    for key, value in ADDED_DEFAULTS.items():
        assert h[key] == value
    assert bitrate(h) == 4 * 10 * 48000 / 320 == 6000


def test_release_config_without_added_keys_gets_defaults():
    raw = {k: v for k, v in default_raw().items() if k in RELEASE_KEYS}
    h = build_config(raw)
    assert h.n_codebooks == 4 and h.codebook_size == 1024 and h.convnext_layers == 8


@pytest.mark.parametrize("change, key", [
    ({"batch_sise": 3}, "batch_sise"),
    ({"segment_size": 8000}, "segment_size"),
    ({"segment_size": 7980}, "segment_size"),
    ({"win_size": 2048}, "win_size"),
    ({"num_mels_for_loss": 64}, "num_mels_for_loss"),
    ({"AMP_Decoder_channel": 128}, "AMP_Decoder_channel"),
    ({"PHA_Decoder_input_upconv_kernel_size": 15}, "PHA_Decoder_input_upconv_kernel_size"),
    ({"latent_output_conv_kernel_size": 6}, "latent_output_conv_kernel_size"),
    ({"batch_size": 0}, "batch_size"),
    ({"mpd_channels": [32, 128]}, "mpd_channels"),
])
def test_bad_values_name_the_key(change, key):
    raw = default_raw()
    raw.update(change)
    with pytest.raises(ConfigError, match=key):
        build_config(raw)


def test_missing_release_key_is_named():
    raw = default_raw()
    del raw["hop_size"]
    with pytest.raises(ConfigError, match="missing config key 'hop_size'"):
        build_config(raw)


def test_command_line_overrides(tmp_path):
    path = _write(tmp_path, default_raw())
    h = load_config(["--config", path, "--batch_size", "4", "--mpd_periods", "[2, 3]",
                     "--checkpoint_path", "runs/x", "--learning_rate", "1e-3"])
    assert h.batch_size == 4 and h.mpd_periods == [2, 3] and h.checkpoint_path == "runs/x"
    assert h.learning_rate == 1e-3
    with pytest.raises(ConfigError, match="unknown config key 'bogus'"):
        load_config(["--config", path, "--bogus", "1"])
    with pytest.raises(ConfigError, match="ratio"):
        load_config(["--config", path, "--ratio", "7"])


def test_train_script_reports_bad_config_in_one_line(tmp_path):
    raw = default_raw()
    raw["n_fft"] = 256
    result = subprocess.run([sys.executable, "train.py", "--config", _write(tmp_path, raw)],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert result.stderr.strip().count("\n") == 0 and "win_size" in result.stderr


def test_overrides_fill_missing_keys_and_keep_paths_as_strings(tmp_path):
    raw = default_raw()
    del raw["num_workers"]
    path = _write(tmp_path, raw)
    with pytest.raises(ConfigError, match="missing config key 'num_workers'"):
        load_config(["--config", path])
    h = load_config(["--config", path, "--num_workers", "2", "--checkpoint_path", "2024"])
    assert h.num_workers == 2 and h.checkpoint_path == "2024"
    with pytest.raises(ConfigError, match="mrd_resolutions"):
        load_config(["--config", path, "--num_workers", "2", "--mrd_resolutions", "5"])
    with pytest.raises(ConfigError, match="learning_rate"):
        load_config(["--config", path, "--num_workers", "2", "--learning_rate", "fast"])
