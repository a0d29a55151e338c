"""bench.py: configuration names, the phase split and operation count of a training step."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch

import bench
import fastpath
from conftest import ROOT, TINY, make_config


def test_configuration_names_set_the_speed_keys(tiny_h):
    h = bench.configuration(tiny_h, "bf16+compile")
    assert (h.mixed_precision, h.compile) == ("bf16", "default")
    h = bench.configuration(tiny_h, "float32+cudagraphs")
    assert (h.mixed_precision, h.compile) == ("no", "reduce-overhead")
    h = bench.configuration(tiny_h, "fp16+fused")
    assert (h.mixed_precision, h.compile, h.fused_adamw) == ("fp16", "no", True)
    assert not bench.configuration(tiny_h, "bf16").fused_adamw
    h = bench.configuration(tiny_h, "bf16+graph")
    assert (h.mixed_precision, h.compile, h.fused_adamw, h.cuda_graph) == ("bf16", "no", False, True)
    assert not bench.configuration(tiny_h, "bf16+fused").cuda_graph
    for bad in ("bf8", "bf16+compile+cudagraphs", "bf16+fast"):
        with pytest.raises(ValueError, match=re.escape(f"unknown configuration '{bad}'")):
            bench.configuration(tiny_h, bad)


def test_inference_names_set_precision_and_compile():
    assert bench.inference_configuration("bfloat16+compile") == ("bfloat16", True)
    assert bench.inference_configuration("tf32") == ("tf32", False)
    for bad in ("int8+fast", "float33", "bf16"):
        with pytest.raises(ValueError, match=re.escape(f"'{bad}' is not one of float32, bfloat16, int8, tf32")):
            bench.inference_configuration(bad)


@pytest.mark.parametrize("argv, message", [
    (["--threads", "0"], "--threads must be at least 1, got 0"),
    (["--batch", "-1"], "--batch must be at least 1, got -1"),
    (["--clips", "10", "0"], "--clips takes positive numbers of seconds, got 0"),
    (["--stream_chunk_ms", "nan"], "--stream_chunk_ms takes positive numbers of milliseconds, got nan"),
    (["--train_seconds", "0"], "--train_seconds must be a positive number of seconds, got 0"),
    (["--suite", "inference", "--inference_precisions", "float33"], "'float33' is not one of"),
    (["--warmup", "-3"], "--warmup must be at least 0, got -3"),
    (["--repeats", "-2"], "--repeats must be at least 0, got -2"),
    (["--profile", "-1"], "--profile must be at least 0, got -1"),
    (["--suite", "train", "--train_steps", "0"], "--train_steps must be at least 1, got 0"),
    (["--clip_seconds", "0"], "--clip_seconds must be a positive number, got 0"),
    (["--suite", "traffic", "--bandwidth", "-3"], "--bandwidth must be a positive number, got -3"),
    (["--stream_chunk_ms", "10"], "--stream_chunk_ms needs a causal config"),
    (["--file_seconds", "10"], "--file_seconds times whole files in --suite inference (or all), not --suite step"),
])
def test_bad_arguments_exit_in_one_line_before_measuring(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(argv + ["--steps", "0"])
    assert message in str(exit_info.value) and "\n" not in str(exit_info.value)
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("argv, message", [
    (["--stream_chunk_ms", "1e9"],
     "--stream_chunk_ms must be a positive number of at most 60000 (a minute), got 1e+09"),
    (["--stream_chunk_ms", "10", "--clip_seconds", "0.009"],
     "--clip_seconds 0.009 is shorter than a stream needs for its first code (9.17 ms)"),
])
def test_streams_that_could_time_nothing_exit_in_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(argv + ["--config", os.path.join(ROOT, "configs", "apcodec_s_48k.json"), "--steps", "0"])
    assert message in str(exit_info.value)
    assert capsys.readouterr().out == ""


def test_cuda_without_a_gpu_is_one_line(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="--device cuda: no CUDA GPU is available"):
        bench.main(["--device", "cuda", "--steps", "0"])


def test_training_bench_reports_every_phase():
    h = make_config(**dict(TINY, batch_size=1))
    result = bench.bench_training(h, torch.device("cpu"), steps=1, warmup=0)
    assert list(result["phases_s"]) == ["data", "generator forward", "discriminator step",
                                        "generator backward", "optimizer"]
    assert all(v >= 0 for v in result["phases_s"].values())
    assert result["audio_s_per_s"] == pytest.approx(h.segment_size / h.sampling_rate / result["s_per_step"], rel=0.02)
    # Each sub-discriminator's forward alone issues a reflection pad or an STFT and 6 convolutions.
    n_sub = len(h.mpd_periods) + len(h.mrd_resolutions)
    assert isinstance(result["operations_per_step"], int) and result["operations_per_step"] > 7 * n_sub * 3


# Stands in for train.py: prints what train.py prints, then either ends with the given status
# or trains on until a SIGTERM, which it answers as train.py does (it saves, then exits 143).
_FAKE_TRAIN = """
import signal, sys, time
def stop(*args):
    print("Stopped by SIGTERM after step 57; checkpoint set saved", flush=True)
    sys.exit(143)
signal.signal(signal.SIGTERM, stop)
for step, g in ((0, 10.0), (10, 8.0), (50, 4.0)):
    print(f"Steps {step}: G {g}, D 2.0, Mel 1.0, A 3.0, IP 1.5, s/b 0.1", flush=True)
print("Time taken for epoch 1 is 5.0 s", flush=True)
if sys.argv[1] == "train on":
    time.sleep(60)
sys.exit(int(sys.argv[1]))
"""


@pytest.mark.parametrize("ending", ["0", "1", "train on"])
def test_train_suite_reads_the_curve_and_stops_a_run_at_its_time_limit(tmp_path, monkeypatch, ending):
    fake = tmp_path / "fake_train.py"
    fake.write_text(_FAKE_TRAIN)
    popen = subprocess.Popen
    monkeypatch.setattr(subprocess, "Popen", lambda argv, **options: popen([sys.executable, str(fake), ending],
                                                                          **options))
    h, cpu = make_config(**TINY), torch.device("cpu")
    if ending == "1":
        with pytest.raises(RuntimeError, match="train.py exited with status 1"):
            bench.bench_train_script(h, str(tmp_path), steps_per_epoch=50, epochs=4, device=cpu, seconds=30)
        return
    record = bench.bench_train_script(h, str(tmp_path), steps_per_epoch=50, epochs=4, device=cpu, seconds=1.0)
    assert record["loss_means_per_50_steps"] == {
        "0-49": {"G": 9.0, "D": 2.0, "Mel": 1.0, "A": 3.0, "IP": 1.5},
        "50-99": {"G": 4.0, "D": 2.0, "Mel": 1.0, "A": 3.0, "IP": 1.5}}
    assert record["first_epoch_s"] == 5.0 and record["s_per_step_after_first_epoch"] is None
    if ending == "train on":
        assert record["stopped_after_s"] == 1.0 and record["steps_trained"] == 58
    else:
        assert "stopped_after_s" not in record


@pytest.mark.parametrize("device, hidden", [("cpu", True), ("cuda", False)])
def test_train_suite_runs_train_py_on_the_device_asked_for(tmp_path, monkeypatch, device, hidden):
    """train.py takes a GPU where it sees one: the CPU's runs hide the GPUs from it."""
    fake = tmp_path / "fake_train.py"
    fake.write_text(_FAKE_TRAIN)
    seen = {}
    popen = subprocess.Popen

    def start(argv, **options):
        seen["env"] = options.get("env")
        return popen([sys.executable, str(fake), "0"], **options)
    monkeypatch.setattr(subprocess, "Popen", start)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    bench.bench_train_script(make_config(**TINY), str(tmp_path), steps_per_epoch=50, epochs=4,
                             device=torch.device(device))
    visible = (seen["env"] or os.environ)["CUDA_VISIBLE_DEVICES"]
    assert visible == ("" if hidden else "0,1")


def test_inference_bench_times_every_precision_and_mode(tiny_h):
    records = list(bench.bench_inference(tiny_h, torch.device("cpu"), clips=[0.3], precisions=["float32", "int8"],
                                         batch=2, repeats=2))
    assert records[0]["bench"] == "inference_floor" and records[0]["floor_s_per_audio_s"] > 0
    timed = {(r["precision"], r["mode"]): r for r in records[1:]}
    assert set(timed) == {("reference", "single"), ("float32", "single"), ("float32", "batched"),
                          ("int8", "single"), ("int8", "batched")}
    for r in timed.values():
        # audio_s is rounded to 2 decimals (1% of 0.5 s) and wall_s to 4: up to about 1.3% apart.
        assert r["wall_s"] > 0 and r["s_per_audio_s"] == pytest.approx(r["wall_s"] / r["audio_s"], rel=0.02)
    # The batch holds the clip and one 5% shorter (down to 90% over a batch).
    assert timed["int8", "batched"]["audio_s"] == pytest.approx(0.3 + 0.285, abs=0.01)


def test_traffic_counter_counts_bytes_read_and_written():
    meta = torch.device("meta")
    x, row = torch.empty(10, 20, device=meta), torch.empty(20, device=meta)
    with bench.TrafficCounter() as traffic:
        y = x + 1                       # reads 800 bytes, writes 800
        y.view(200).t()                 # views move nothing
        torch.empty(5, device=meta)     # nor do allocations
        y.add_(x)                       # reads y and x, writes y
        torch.add(x, 1, out=y)          # out= is written, not read
        y.copy_(x)                      # so is copy_'s destination
        z = x + row.expand(10, 20)      # a broadcast row is read once: 80 bytes
        y.index_fill_(0, torch.tensor([1, 4], device=meta), 0)   # writes 2 rows of 80 bytes
    assert traffic.operations == 6 and z.shape == (10, 20)
    assert traffic.bytes == 1600 + 2400 + 1600 + 1600 + (800 + 80 + 800) + (16 + 160)


def test_traffic_suite_counts_the_gpu_forward(tiny_h):
    records = list(bench.bench_traffic(tiny_h, clips=[0.3], precisions=["float32", "bfloat16", "int8"], batch=3,
                                       bandwidth=1e12))
    assert [r["precision"] for r in records if "error" in r] == ["int8"]    # a CPU precision
    counted = {(r["precision"], r["mode"]): r for r in records if "error" not in r}
    for precision in ("float32", "bfloat16"):
        single, batched = counted[precision, "single"], counted[precision, "batched"]
        assert batched["clips"] == 3 and batched["audio_s"] == pytest.approx(0.3 + 0.29 + 0.28, abs=0.01)
        assert 0 < single["GB_moved"] < batched["GB_moved"] and 0 < single["operations"] < batched["operations"]
        # One whole batch, as a GPU runs it: clip by clip would take three times the operations.
        assert batched["operations"] < 2 * single["operations"]
        assert single["GFLOP"] == pytest.approx(counted["float32", "single"]["GFLOP"], rel=0.01)
        assert single["x_real_time_memory_bound"] == pytest.approx(
            single["audio_s"] / (single["GB_moved"] * 1e9 / 1e12), rel=0.01)


def test_tf32_run_switches_tf32_for_its_call_alone():
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    if not hasattr(matmul, "fp32_precision"):
        pytest.skip("torch before 2.9 has the allow_tf32 flags alone")
    before = (matmul.fp32_precision, conv.fp32_precision)
    inside = lambda: (fastpath.tf32_products(), conv.fp32_precision)   # noqa: E731
    assert bench.tf32_run("tf32", inside)() == (True, "tf32")
    assert bench.tf32_run("float32", inside)() == (False, "ieee")
    assert (matmul.fp32_precision, conv.fp32_precision) == before


def test_stdout_holds_the_json_lines_alone(tmp_path, capsys):
    """What the measured code prints (here train.py's line that cuda_graph needs a GPU) goes
    to stderr, so that stdout can be piped to a JSON reader."""
    from config import save_config
    config = str(tmp_path / "tiny.json")
    save_config(make_config(**dict(TINY, batch_size=1)), config)
    bench.main(["--config", config, "--device", "cpu", "--steps", "1", "--warmup", "0",
                "--precisions", "float32+graph"])
    out, err = capsys.readouterr()
    records = [json.loads(line) for line in out.splitlines()]
    assert [r["bench"] for r in records] == ["train_step", "params"] and "error" not in records[0]
    assert "cuda_graph: it needs a CUDA GPU" in err


def test_profile_names_the_operations_that_took_the_time():
    a = torch.randn(1024, 1024)    # tens of milliseconds, so that rounding to 0.1 ms stays small
    result = bench.profile(lambda: [torch.relu(a @ a @ a) for _ in range(2)], torch.device("cpu"), top=3)
    name, calls, ms = result["top"][0]
    assert (name, calls) == ("aten::mm", 4) and ms > 0
    assert [row[2] for row in result["top"]] == sorted((row[2] for row in result["top"]), reverse=True)
    # The operations' own times add up to no more than the run took (busy_s is rounded to 0.1 ms).
    assert sum(row[2] for row in result["top"]) / 1e3 <= result["busy_s"] + 1e-4
    assert result["busy_s"] <= result["wall_s"]
    assert result["busy_share"] == pytest.approx(result["busy_s"] / result["wall_s"], abs=0.01)
    assert result["operations"] >= 6


def test_profile_option_adds_a_profile_to_steps_and_inference(tiny_h):
    step = bench.bench_training(make_config(**dict(TINY, batch_size=1)), torch.device("cpu"), steps=1, warmup=0,
                                profile_top=4)
    assert len(step["profile"]["top"]) == 4 and "aten::convolution_backward" in [r[0] for r in step["profile"]["top"]]
    records = list(bench.bench_inference(tiny_h, torch.device("cpu"), clips=[0.3], precisions=["float32"], batch=2,
                                         repeats=1, profile_top=2))
    assert all(len(r["profile"]["top"]) == 2 for r in records[1:]) and len(records) == 4
    assert "profile" not in bench.bench_training(make_config(**dict(TINY, batch_size=1)), torch.device("cpu"),
                                                 steps=1, warmup=0)


def test_a_causal_config_times_what_inference_runs_for_it(tmp_path, capsys):
    """Offline, inference.py runs a causal codec through the reference path in float32: the
    inference suite times that (clips and whole files) and no fast-path error records."""
    from config import save_config
    config = str(tmp_path / "causal.json")
    save_config(make_config(**TINY, causal=True), config)
    bench.main(["--config", config, "--device", "cpu", "--suite", "inference", "--clips", "0.2", "--repeats", "1",
                "--file_seconds", "0.3", "--inference_precisions", "float32,int8"])
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["bench"], r.get("precision")) for r in records] == [
        ("inference_floor", None), ("inference", "reference"), ("inference_file", "float32")]
