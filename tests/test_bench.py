"""bench.py: configuration names and the phase split of a training step."""
import re

import pytest
import torch

import bench
from conftest import TINY, make_config


def test_configuration_names_set_the_speed_keys(tiny_h):
    h = bench.configuration(tiny_h, "bf16+compile")
    assert (h.mixed_precision, h.compile) == ("bf16", "default")
    h = bench.configuration(tiny_h, "float32+cudagraphs")
    assert (h.mixed_precision, h.compile) == ("no", "reduce-overhead")
    h = bench.configuration(tiny_h, "fp16+fused")
    assert (h.mixed_precision, h.compile, h.fused_adamw) == ("fp16", "no", True)
    assert not bench.configuration(tiny_h, "bf16").fused_adamw
    for bad in ("bf8", "bf16+compile+cudagraphs", "bf16+fast"):
        with pytest.raises(ValueError, match=re.escape(f"unknown configuration '{bad}'")):
            bench.configuration(tiny_h, bad)


def test_training_bench_reports_every_phase():
    h = make_config(**dict(TINY, batch_size=1))
    result = bench.bench_training(h, torch.device("cpu"), steps=1, warmup=0)
    assert list(result["phases_s"]) == ["data", "generator forward", "discriminator step",
                                        "generator backward", "optimizer"]
    assert all(v >= 0 for v in result["phases_s"].values())
    assert result["audio_s_per_s"] == pytest.approx(h.segment_size / h.sampling_rate / result["s_per_step"], rel=0.02)
