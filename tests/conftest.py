"""Shared fixtures: configs built from the default config.json, and small audio files."""
import json
import os
import sys

import numpy as np
import pytest
import soundfile as sf
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from config import build_config  # noqa: E402

# Small sizes for tests that train or save: same architecture, far fewer channels.
TINY = {
    "AMP_Encoder_channel": 16, "PHA_Encoder_channel": 16,
    "AMP_Decoder_channel": 16, "PHA_Decoder_channel": 16,
    "latent_dim": 8, "codebook_size": 64,
    "convnext_dim": 16, "convnext_hidden_dim": 32, "convnext_layers": 1,
    "mpd_channels": [4, 8, 8, 8], "mrd_channels": 4,
    "batch_size": 2, "num_workers": 0,
}


def default_raw():
    with open(os.path.join(ROOT, "config.json")) as f:
        return json.load(f)


def make_config(**overrides):
    raw = default_raw()
    raw.update(overrides)
    return build_config(raw)


@pytest.fixture
def full_h():
    """The default (paper) configuration."""
    return make_config()


@pytest.fixture
def tiny_h():
    """The default configuration with tiny size keys."""
    return make_config(**TINY)


def tone(seconds, sr=48000, f0=220.0, seed=0):
    """A harmonic tone with a little noise: broadband, deterministic."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    y = sum(np.sin(2 * np.pi * f0 * k * t + rng.uniform(0, 2 * np.pi)) / k for k in range(1, 20))
    y = 0.3 * y / np.max(np.abs(y)) + 0.01 * rng.standard_normal(t.size)
    return y.astype(np.float32)


def write_tone(path, seconds, sr=48000, channels=1, f0=220.0, seed=0):
    y = tone(seconds, sr, f0, seed)
    if channels > 1:
        y = np.stack([y] * channels, axis=1)
    sf.write(path, y, sr)
    return path


@pytest.fixture(scope="module")
def full():
    """Freshly initialised full-size (default config) modules, shared read-only by a test file."""
    import torch
    from discriminators import MultiPeriodDiscriminator, MultiResolutionDiscriminator
    from models import Decoder, Encoder
    torch.manual_seed(0)
    h = make_config()
    return {"h": h, "encoder": Encoder(h), "decoder": Decoder(h),
            "mpd": MultiPeriodDiscriminator(h), "mrd": MultiResolutionDiscriminator(h)}


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a test file of many small ops: on a shared machine, thread
    hand-offs cost more than such work."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def untrained_norms(*modules):
    """Give every GRN and LayerNorm random scales and shifts, in place. At initialisation GRN is
    the identity and LayerNorm has scale 1 and shift 0, so code that folds or pools them would
    go untested. Returns the modules."""
    from models import GRN
    with torch.no_grad():
        for m in (m for module in modules for m in module.modules()):
            if isinstance(m, GRN):
                m.gamma.normal_(0, 0.5)
                m.beta.normal_(0, 0.1)
            elif isinstance(m, torch.nn.LayerNorm):
                m.weight.normal_(1, 0.2)
                m.bias.normal_(0, 0.2)
    return modules

