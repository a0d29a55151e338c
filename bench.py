"""Measure training and inference speed and memory; prints JSON lines, one per measurement.

    python bench.py [--suite step|train|inference|traffic|all] [--precisions float32,bf16,bf16+compile]
                    [--steps N] [--train_steps N] [--train_seconds S] [--clips S ...]
                    [--inference_precisions LIST] [--batch N] [--stream_chunk_ms MS ...]
                    [--profile N] [--config config.json] [--KEY VALUE ...]

--suite step (default): training steps of the config's model on a fixed synthetic batch,
for each configuration in --precisions (float32, bf16 or fp16, optionally with +compile or
+cudagraphs, +fused for fused AdamW, and +graph for the forward and backward passes
recorded as CUDA graphs): steps/s, audio-seconds/s, peak memory, and the step split
into phases (data copy, generator forward, discriminator step, generator losses and
backward, generator optimizer), timed in a second pass that waits for the device after
each phase (not for a recorded step, whose passes run no Python), and for an uncompiled
step the operations it issues (views and allocations not counted; for a recorded step those
the host still issues besides the replays: the updates and checks). Then parameter counts.

--suite train: `train.py` itself, end to end with its DataLoader, on wav files generated
in a temporary folder, for --train_steps steps per configuration: seconds per step over
the epochs after the first (which holds compilation and the step-0 validation) and the
mean of the loss terms train.py prints (every 10 steps) per 50 steps, to compare the curves
of the configurations. --train_seconds
stops each run after that long (it saves, as after Ctrl-C) and reports the steps reached.

--suite inference: first the floor, the model's FLOPs per second of audio (torch's FLOP
counter, encode + decode) over the machine's float32 rate for a 2048 x 2048 matrix product
on the threads in use. Then for each clip length in --clips and each precision, the
reference path (`codec.codec_roundtrip`, the release's computation) and the fast path
(`fastpath.FastGenerator`, what inference.py runs) on one clip and on --batch clips of
different lengths: seconds per audio-second, times real time, times the floor and the peak
memory of that measurement. --file_seconds adds whole files through `Codec.resynthesize_file`,
as inference.py runs them: a file longer than one window (31 s: the 30 s stride and its 1 s
overlap) goes through the chunked path.

--suite traffic: the fast path as a GPU runs it (whole batches, no chunks) on PyTorch's meta
device, which has shapes but no data: for one clip and a batch of --batch clips (default
100) of each length in --clips, the operations it issues, the bytes they read and write,
their FLOPs, and the real-time factor that memory traffic alone would allow at --bandwidth.
An estimate for machines without a GPU, not a timing.

--profile N adds to each step and inference measurement a torch.profiler run: how long the
device worked in it (a GPU's kernels, a CPU's operations) against its wall time, and the N
kernels or operations that took longest.

Uses random weights and synthetic audio, so it needs no data or checkpoints. Prints the
numbers; it never asserts anything about them. A causal config is timed offline as inference.py
runs it, through the reference path in float32; with one, --stream_chunk_ms
times the streaming codec on the CPU for each chunk length and each precision of
--inference_precisions (default float32 and this machine's reduced precision): compute per
latent frame against the frame's duration, and per push against the chunk's (--threads 1
for one core).
"""
import argparse
import contextlib
import json
import math
import os
import platform
import re
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Tuple

import numpy as np
import soundfile as sf
import torch
from torch.profiler import ProfilerActivity
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode

import codec
import fastpath
import stream_demo
import train
from config import AttrDict, build_config, make_parser, run_cli, save_config
from discriminators import MultiPeriodDiscriminator, MultiResolutionDiscriminator
from models import Decoder, Encoder, random_encoder_decoder
from streaming import StreamingCodec, first_code_samples, latency_samples
from utils import pick_device, synchronize

# Configuration names of --precisions: a precision, optionally "+" a torch.compile mode.
STEP_PRECISIONS = {"float32": "no", "bf16": "bf16", "fp16": "fp16"}
COMPILE_MODES = {"compile": "default", "cudagraphs": "reduce-overhead"}
CURVE_WINDOW = 50
CURVE_EVERY = 10    # train.py's stdout_interval in the train suite: each window's mean is of 5 lines


def synthetic_audio(batch: int, length: int, sr: int, seed: int = 0) -> torch.Tensor:
    """Harmonic tones with noise, (batch, length): broadband like speech, deterministic."""
    rng = np.random.default_rng(seed)
    t = np.arange(length) / sr
    rows = []
    for _ in range(batch):
        f0 = rng.uniform(90, 250)
        y = sum(np.sin(2 * np.pi * f0 * k * t + rng.uniform(0, 6.3)) / k for k in range(1, 40))
        rows.append(0.3 * y / np.abs(y).max() + 0.01 * rng.standard_normal(length))
    return torch.tensor(np.stack(rows), dtype=torch.float32)


def parameter_count(module: torch.nn.Module) -> int:
    """Parameters of `module`, every tensor's elements summed."""
    return sum(p.numel() for p in module.parameters())


def configuration(h: AttrDict, name: str) -> AttrDict:
    """h with the keys of a configuration name such as "bf16+compile" or "bf16+cudagraphs+fused"."""
    precision, *options = name.split("+")
    modes = [COMPILE_MODES[o] for o in options if o in COMPILE_MODES]
    if (precision not in STEP_PRECISIONS or len(modes) > 1
            or any(o not in COMPILE_MODES and o not in ("fused", "graph") for o in options)):
        raise ValueError(f"unknown configuration '{name}': use one of {', '.join(STEP_PRECISIONS)}, optionally "
                         f"followed by +{' or +'.join(COMPILE_MODES)}, by +fused (fused AdamW) and by +graph "
                         f"(the passes as CUDA graphs)")
    return build_config(dict(h, mixed_precision=STEP_PRECISIONS[precision], compile=modes[0] if modes else "no",
                             fused_adamw=h.fused_adamw or "fused" in options,
                             cuda_graph=h.cuda_graph or "graph" in options), h.source)


def bench_training(h: AttrDict, device: torch.device, steps: int, warmup: int, profile_top: int = 0) -> dict:
    """Time `steps` training steps after `warmup`, then the same number again split into phases;
    with `profile_top`, profile one more step (see `profile`)."""
    torch.manual_seed(h.seed)
    # As train.py runs: cuDNN picks its fastest convolution algorithms. And each configuration
    # compiles from scratch: torch.compile keeps 8 versions of a function at most, and a later
    # configuration would otherwise run uncompiled once earlier ones had used them up.
    torch.backends.cudnn.benchmark = True
    torch._dynamo.reset()
    trainer = train.Trainer(h, device)
    audio = synthetic_audio(h.batch_size, h.segment_size, h.sampling_rate)
    if device.type == "cuda":
        audio = audio.pin_memory()
    recorded = trainer.step_graph is not None
    # A recorded step is recorded after its warm-up steps, and then timed.
    for _ in range(max(warmup, train.StepGraph.WARMUP + 1) if recorded else warmup):
        trainer.train_step(audio)
    synchronize(device)
    reset_peak_memory(device)
    start = time.perf_counter()
    for _ in range(steps):
        terms = trainer.train_step(audio)
    values = {name: round(value.item(), 4) for name, value in terms.items()}
    synchronize(device)
    seconds = (time.perf_counter() - start) / steps

    phases: Dict[str, float] = defaultdict(float)
    last = [0.0]

    def phase_done(name: str) -> None:
        synchronize(device)
        now = time.perf_counter()
        phases[name] += (now - last[0]) / steps
        last[0] = now

    trainer.phase_done = phase_done
    # Replayed passes run no Python, so they have no phases to time.
    for _ in range(0 if recorded else steps):
        last[0] = time.perf_counter()
        trainer.train_step(audio)
    trainer.phase_done = lambda name: None
    # What the host issues per step, which is what an eager GPU step at this size waits on. A
    # compiled step issues other operations, and counting them would break its CUDA graphs.
    # (Counting a recorded step's replays is safe: they are not operations.)
    operations = {}
    if not trainer.compiled:
        counter = TrafficCounter()
        with counter:
            trainer.train_step(audio)
        operations = {"operations_per_step": counter.operations}
    if profile_top:
        operations["profile"] = profile(lambda: trainer.train_step(audio), device, profile_top)
    return {"compiled": trainer.compiled, "cuda_graph": recorded, "batch_size": h.batch_size, **operations,
            "s_per_step": round(seconds, 4), "steps_per_s": round(1 / seconds, 3),
            "audio_s_per_s": round(h.batch_size * h.segment_size / h.sampling_rate / seconds, 4),
            **peak_memory(device), "phases_s": {k: round(v, 4) for k, v in phases.items()},
            "G": values["G"], "Mel": values["Mel"]}


def cpu_model() -> str:
    """The CPU's model name (Linux), else the platform's processor string."""
    return fastpath.cpuinfo("model name") or platform.processor() or "unknown"


def matmul_gflops(device: torch.device, size: int = 2048, repeats: int = 5) -> float:
    """The best float32 GFLOP/s of a size x size matrix product on `device` (the CPU: the threads in use)."""
    a, b = torch.randn(size, size, device=device), torch.randn(size, size, device=device)
    best = float("inf")
    for _ in range(repeats + 1):
        synchronize(device)
        start = time.perf_counter()
        a @ b
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size ** 3 / best / 1e9


def model_gflop_per_second(encoder: Encoder, decoder: Decoder, h: AttrDict, seconds: float = 10.0) -> float:
    """GFLOP per second of audio of encoding and decoding, by torch's FLOP counter."""
    audio = synthetic_audio(1, int(seconds * h.sampling_rate), h.sampling_rate).to(next(encoder.parameters()).device)
    with FlopCounterMode(display=False) as counter:
        codec.codec_roundtrip(encoder, decoder, audio, h)
    return counter.get_total_flops() / seconds / 1e9


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak-memory window: CUDA's allocator peak, or the process's peak RSS (Linux)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_memory(device: torch.device) -> Dict[str, float]:
    """Peak memory since `reset_peak_memory` (GiB): CUDA allocations, or the process's RSS."""
    if device.type == "cuda":
        return {"peak_memory_GiB": round(torch.cuda.max_memory_allocated(device) / 2 ** 30, 3)}
    try:
        with open("/proc/self/status") as f:
            kib = int(re.search(r"^VmHWM:\s*(\d+)", f.read(), re.MULTILINE).group(1))
    except (OSError, AttributeError):
        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss   # the whole run's peak
    return {"peak_host_rss_GiB": round(kib / 2 ** 20, 3)}


def profile(run: Callable[[], object], device: torch.device, top: int) -> dict:
    """One run of `run` under torch.profiler: its wall time, the time the device worked (on a
    GPU the kernels' summed times, so busy_share well below 1 means the GPU waited, mostly on
    its host issuing work; on a CPU the operations' own times), the number of kernels or
    operations, and the `top` kernels (GPU) or operations (CPU) by time as [name, calls, ms]."""
    gpu = device.type == "cuda"
    synchronize(device)
    with torch.profiler.profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])) as prof:
        start = time.perf_counter()
        run()
        synchronize(device)
        wall = time.perf_counter() - start
    if gpu:   # the kernels and copies themselves; the host-side operations that launched them hold the same time
        rows = [(e.key, e.count, e.self_device_time_total) for e in prof.key_averages()
                if e.device_type != torch.autograd.DeviceType.CPU]
    else:
        rows = [(e.key, e.count, e.self_cpu_time_total) for e in prof.key_averages()]
    rows.sort(key=lambda row: -row[2])
    busy = sum(row[2] for row in rows) / 1e6
    return {"wall_s": round(wall, 4), "busy_s": round(busy, 4), "busy_share": round(busy / wall, 3),
            "kernels" if gpu else "operations": sum(row[1] for row in rows),
            "top": [[name[:100], calls, round(us / 1e3, 2)] for name, calls, us in rows[:top]]}


def _timed_together(runs: Dict[Tuple[str, str], Callable[[], object]], device: torch.device,
                    repeats: int) -> Dict[Tuple[str, str], Tuple[float, Dict[str, float]]]:
    """Best wall time of each run over `repeats` rounds, and its peak memory over one run.

    Each run first goes once untimed (with its peak memory measured); then every round times
    each run in turn, so that a machine whose speed drifts (a shared VM) slows them alike and
    their ratios hold.
    """
    memory = {}
    for key, run in runs.items():
        reset_peak_memory(device)
        run()
        memory[key] = peak_memory(device)
    best = {key: float("inf") for key in runs}
    for _ in range(max(1, repeats)):
        for key, run in runs.items():
            synchronize(device)
            start = time.perf_counter()
            run()
            synchronize(device)
            best[key] = min(best[key], time.perf_counter() - start)
    return {key: (best[key], memory[key]) for key in runs}


def inference_configuration(name: str) -> Tuple[str, bool]:
    """The precision of an --inference_precisions name such as "bfloat16+compile", and whether
    it compiles."""
    precision, _, option = name.partition("+")
    if precision not in fastpath.PRECISIONS + ("tf32",) or option not in ("", "compile"):
        raise ValueError(f"--inference_precisions: {name!r} is not one of {', '.join(fastpath.PRECISIONS)}, tf32, "
                         f"optionally +compile")
    return precision, option == "compile"


def batch_lengths(length: int, batch: int) -> List[int]:
    """The lengths of a batched measurement: from `length` down to 90% of it, as in a batch of
    a folder sorted by length."""
    return [length - i * length // (10 * batch) for i in range(batch)]


def bench_inference(h: AttrDict, device: torch.device, clips: List[float], precisions: List[str], batch: int,
                    repeats: int, profile_top: int = 0) -> Iterator[dict]:
    """Inference speed of the reference path and the fast path in each precision, one clip
    (single) and `batch` clips of decreasing length down to 90% of it (batched, as a folder
    sorted by length runs: its batches hold clips of similar lengths),
    against the floor: the model's FLOPs at the machine's float32 matrix-product rate. With
    `profile_top`, each measurement also profiles one run (see `profile`)."""
    encoder, decoder = random_encoder_decoder(h, device)
    gflop = model_gflop_per_second(encoder, decoder, h)
    rate = matmul_gflops(device)
    floor = gflop / rate
    yield {"bench": "inference_floor", "model_GFLOP_per_audio_s": round(gflop, 2),
           "float32_matmul_GFLOP_per_s": round(rate, 1), "floor_s_per_audio_s": round(floor, 4),
           "cpu": cpu_model(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
           "cpu_flags": " ".join(sorted({"amx_bf16", "avx2", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni"}
                                        & fastpath.cpu_flags()))}
    for seconds in clips:
        length = int(seconds * h.sampling_rate)
        one = synthetic_audio(1, length, h.sampling_rate).to(device)
        # Rotations of one clip: generating each of 100 clips would take far longer than a run.
        many = [one[0].roll(997 * i)[:n].contiguous() for i, n in enumerate(batch_lengths(length, batch))]
        runs: Dict[Tuple[str, str], Callable[[], object]] = {}
        errors = []
        for precision in ["reference"] + precisions:
            if precision == "reference":
                runs[precision, "single"] = tf32_run("float32", lambda: codec.codec_roundtrip(encoder, decoder, one, h))
                continue
            try:
                base, compiled = inference_configuration(precision)
                fast = fastpath.FastGenerator(encoder, decoder, h, "float32" if base == "tf32" else base,
                                              None if device.type == "cuda" else fastpath.CHUNK_FRAMES, compiled)
            except Exception as e:  # e.g. int8 on a GPU: report it and go on
                errors.append({"bench": "inference", "precision": precision, "clip_s": seconds,
                               "error": f"{type(e).__name__}: {e}"[:300]})
                continue
            # The untimed first runs compile: one clip's shapes, then the batch's (dynamic).
            runs[precision, "single"] = tf32_run(base, lambda fast=fast: fast.roundtrip([one[0]]))
            runs[precision, "batched"] = tf32_run(base, lambda fast=fast: fast.roundtrip(many))
        yield from errors
        for (precision, mode), (wall, memory) in _timed_together(runs, device, repeats).items():
            audio_seconds = seconds if mode == "single" else sum(c.numel() for c in many) / h.sampling_rate
            yield {"bench": "inference", "precision": precision, "mode": mode, "clip_s": seconds,
                   "clips": 1 if mode == "single" else batch, "audio_s": round(audio_seconds, 2),
                   "wall_s": round(wall, 4), "s_per_audio_s": round(wall / audio_seconds, 4),
                   "x_real_time": round(audio_seconds / wall, 1), "x_floor": round(wall / audio_seconds / floor, 2),
                   **memory, **({"profile": profile(runs[precision, mode], device, profile_top)} if profile_top else {})}


def tf32_run(precision: str, run: Callable[[], object]) -> Callable[[], object]:
    """`run` with TF32 matrix products and convolutions on (precision "tf32") or off; the
    settings before it come back after it."""
    def switched() -> object:
        with fastpath.tf32(precision == "tf32", precision == "tf32"):
            return run()
    return switched


def bench_files(h: AttrDict, device: torch.device, seconds: List[float], precisions: List[str]) -> Iterator[dict]:
    """`Codec.resynthesize_file` (what inference.py runs) on generated wav files of each length:
    files longer than a window go through the chunked path. One run each, peak memory included."""
    encoder, decoder = random_encoder_decoder(h, device)
    base = synthetic_audio(1, 10 * h.sampling_rate, h.sampling_rate)[0].numpy()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as folder:
        for length in seconds:
            path = os.path.join(folder, f"{length:g}s.wav")
            with sf.SoundFile(path, "w", h.sampling_rate, 1, subtype="PCM_16") as f:
                left = int(length * h.sampling_rate)
                while left > 0:   # the 10 s clip, circularly shifted, block after block
                    block = np.roll(base, int(rng.integers(base.size)))[:left]
                    f.write(block)
                    left -= block.size
            for precision in precisions:
                name, compiled = inference_configuration(precision)
                codec_ = codec.Codec(h, encoder, decoder, device, precision="float32" if name == "tf32" else name,
                                     compile=compiled)
                with fastpath.tf32(name == "tf32", name == "tf32"):
                    # Warm-up, untimed: two lengths, so that a compiled path has its dynamic shapes.
                    for part in (1, 2):
                        codec_.resynthesize(base[:h.sampling_rate // part], h.sampling_rate)
                    reset_peak_memory(device)
                    start = time.perf_counter()
                    codec_.resynthesize_file(path, os.path.join(folder, "out.wav"))
                    wall = time.perf_counter() - start
                yield {"bench": "inference_file", "precision": precision, "file_s": length,
                       "windows": len(codec_.windows(int(length * h.sampling_rate))), "wall_s": round(wall, 2),
                       "s_per_audio_s": round(wall / length, 4), **peak_memory(device)}


def write_dataset(folder: str, n_files: int, seconds: float, sr: int) -> None:
    """n_files wavs (circular shifts of a few synthetic clips) and train.txt / valid.txt in `folder`."""
    length = int(seconds * sr)
    clips = synthetic_audio(16, length, sr).numpy()
    rng = np.random.default_rng(0)
    names = []
    for i in range(n_files):
        name = os.path.join(folder, f"clip{i:05d}.wav")
        sf.write(name, np.roll(clips[i % len(clips)], int(rng.integers(length))), sr)
        names.append(name)
    with open(os.path.join(folder, "train.txt"), "w") as f:
        f.write("\n".join(names) + "\n")
    with open(os.path.join(folder, "valid.txt"), "w") as f:
        f.write("\n".join(names[:2]) + "\n")


def echoed(lines: Iterable[str]) -> Iterator[str]:
    """The lines, each also printed (indented) to stderr as it comes."""
    for line in lines:
        print("  " + line.rstrip(), file=sys.stderr, flush=True)
        yield line


def parse_train_log(lines: Iterable[str]) -> Tuple[Dict[int, Dict[str, float]], List[float], Optional[int]]:
    """train.py's stdout -> the loss terms of each logged step, each epoch's seconds, and the
    step after which a signal stopped it (None if none did)."""
    logged: Dict[int, Dict[str, float]] = {}
    epoch_seconds: List[float] = []
    last_step = None
    for line in lines:
        if line.startswith("Steps "):
            step, rest = line[len("Steps "):].split(": ", 1)
            logged[int(step)] = {k: float(v) for k, v in (item.rsplit(" ", 1) for item in rest.split(", "))
                                 if k != "s/b"}
        match = re.match(r"Time taken for epoch \d+ is ([\d.]+) s", line)
        if match:
            epoch_seconds.append(float(match.group(1)))
        match = re.match(r"Stopped by \w+ after step (\d+)", line)
        if match:
            last_step = int(match.group(1))
    return logged, epoch_seconds, last_step


def loss_curve(logged: Dict[int, Dict[str, float]], steps: int) -> Dict[str, Dict[str, float]]:
    """The mean of a few loss terms over each CURVE_WINDOW steps of `steps`, from the logged ones."""
    curve = {}
    for start in range(0, steps, CURVE_WINDOW):
        window = [logged[s] for s in logged if start <= s < start + CURVE_WINDOW]
        if window:
            curve[f"{start}-{start + CURVE_WINDOW - 1}"] = {
                name: round(float(np.mean([w[name] for w in window])), 4) for name in ("G", "D", "Mel", "A", "IP")}
    return curve


def bench_train_script(h: AttrDict, folder: str, steps_per_epoch: int, epochs: int, device: torch.device,
                       seconds: Optional[float] = None) -> dict:
    """Run `python train.py` on the dataset in `folder`, on `device` (train.py takes a GPU where
    it sees one, so the CPU's runs hide it); s/step after the first epoch and loss curves.
    After `seconds`, train.py is stopped as a user would (SIGTERM: it saves and exits), and
    the record covers the steps it reached."""
    run_folder = tempfile.mkdtemp(dir=folder)
    settings = dict(h, input_training_wav_list=os.path.join(folder, "train.txt"),
                    input_validation_wav_list=os.path.join(folder, "valid.txt"),
                    checkpoint_path=os.path.join(run_folder, "cp"), training_epochs=epochs,
                    stdout_interval=CURVE_EVERY, summary_interval=100, checkpoint_interval=10 ** 9,
                    validation_interval=10 ** 9)
    config_path = os.path.join(run_folder, "config.json")
    save_config(build_config(settings), config_path)
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train.py")
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="") if device.type == "cpu" else None
    process = subprocess.Popen([sys.executable, script, "--config", config_path],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    fired = threading.Event()

    def stop_run() -> None:
        fired.set()
        process.terminate()
    timer = threading.Timer(seconds, stop_run) if seconds else None
    if timer is not None:
        timer.daemon = True
        timer.start()
    logged, epoch_seconds, last_step = parse_train_log(echoed(process.stdout))
    status = process.wait()
    if timer is not None:
        timer.cancel()
    stopped = fired.is_set() and status == 128 + signal.SIGTERM
    if status and not stopped:
        raise RuntimeError(f"train.py exited with status {status}")
    later = epoch_seconds[1:]
    reached = {}
    if stopped:
        reached = {"stopped_after_s": seconds, "steps_trained": None if last_step is None else last_step + 1}
    return {"batch_size": h.batch_size, "steps": steps_per_epoch * epochs, **reached,
            "first_epoch_s": round(epoch_seconds[0], 1) if epoch_seconds else None,
            "s_per_step_after_first_epoch": round(sum(later) / (len(later) * steps_per_epoch), 4) if later else None,
            "loss_means_per_50_steps": loss_curve(logged, steps_per_epoch * epochs)}


class TrafficCounter(TorchDispatchMode):
    """Counts the operations run and the bytes each reads and writes: a tensor's bytes are
    those of its distinct elements (a broadcast one is read once); views, allocations and scalar
    constants move none; in-place operations read and write their tensor, except those that
    only write it (copy_, fill_, zero_)."""

    FREE = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "scalar_tensor", "lift_fresh"}
    WRITE_ONLY = {"copy_", "fill_", "zero_"}

    def __init__(self):
        super().__init__()
        self.operations = self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        if func.is_view or name in self.FREE:
            return out
        self.operations += 1
        if func.overloadpacket is torch.ops.aten.index_fill_:
            x, index = args[0], args[2]     # it writes the indexed rows alone
            self.bytes += index.nbytes + index.numel() * x[0].nbytes
            return out
        read = tree_leaves((args[1:] if name in self.WRITE_ONLY else args,
                            {k: v for k, v in kwargs.items() if k != "out"}))
        written = tree_leaves(out)
        self.bytes += sum(distinct_bytes(t) for t in read + written if isinstance(t, torch.Tensor))
        return out


def distinct_bytes(t: torch.Tensor) -> int:
    """The bytes of a tensor's distinct elements: a broadcast (stride 0) dimension adds none."""
    return int(np.prod([size for size, stride in zip(t.shape, t.stride()) if stride])) * t.element_size()


def accumulated_product_flops(_, a, b, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of addmm_ / baddbmm_ (out += a @ b), which torch's FLOP counter leaves out; shapes in."""
    return 2 * int(np.prod(a)) * b[-1]


def bench_traffic(h: AttrDict, clips: List[float], precisions: List[str], batch: int, bandwidth: float
                  ) -> Iterator[dict]:
    """The fast path as a GPU runs it, on the meta device: per clip length and precision, one
    clip and a batch, its operations, bytes moved and FLOPs, and the real-time factor that
    moving those bytes at `bandwidth` (bytes/s) would allow."""
    meta = torch.device("meta")
    in_place_products = {torch.ops.aten.addmm_: accumulated_product_flops,
                         torch.ops.aten.baddbmm_: accumulated_product_flops}
    encoder, decoder = random_encoder_decoder(h, meta)
    for seconds in clips:
        length = int(seconds * h.sampling_rate)
        inputs = {"single": [length], "batched": batch_lengths(length, batch)}
        for precision in precisions:
            try:
                fast = fastpath.FastGenerator(encoder, decoder, h, precision, chunk_frames=None)
            except ValueError as e:   # int8 runs on the CPU alone
                yield {"bench": "traffic", "precision": precision, "clip_s": seconds, "error": str(e)[:300]}
                continue
            for mode, lengths in inputs.items():
                with FlopCounterMode(display=False, custom_mapping=in_place_products) as flops, \
                        TrafficCounter() as traffic:
                    fast.roundtrip([torch.empty(n, device=meta) for n in lengths])
                audio_seconds = sum(lengths) / h.sampling_rate
                yield {"bench": "traffic", "precision": precision, "mode": mode, "clip_s": seconds,
                       "clips": len(lengths), "audio_s": round(audio_seconds, 2), "operations": traffic.operations,
                       "GB_moved": round(traffic.bytes / 1e9, 3), "GFLOP": round(flops.get_total_flops() / 1e9, 1),
                       "GB_per_audio_s": round(traffic.bytes / 1e9 / audio_seconds, 4),
                       "bandwidth_TB_per_s": bandwidth / 1e12,
                       "x_real_time_memory_bound": round(audio_seconds * bandwidth / traffic.bytes, 1)}


def bench_streaming(h: AttrDict, clip_seconds: float, chunk_ms: List[float], precisions: List[str], repeats: int
                    ) -> Iterator[dict]:
    """One record per precision and chunk length: compute per latent frame and per push on the CPU
    (this thread's CPU time), the median of `repeats` streams of the clip."""
    encoder, decoder = random_encoder_decoder(h)
    audio = synthetic_audio(1, int(clip_seconds * h.sampling_rate), h.sampling_rate)[0].numpy()
    for precision in precisions:
        for ms in chunk_ms:
            chunk = codec.chunk_samples(ms, h.sampling_rate)
            runs = []
            for _ in range(max(1, repeats)):
                chunks = (audio[i:i + chunk] for i in range(0, audio.size, chunk))
                streamer = StreamingCodec(encoder, decoder, h, precision=precision)
                runs.append(stream_demo.summarise(stream_demo.timed_stream(streamer, chunks, lambda samples: None),
                                                  h, chunk))
            record = {key: round(statistics.median(run[key] for run in runs), 3) for key in runs[0]}
            yield {"bench": "stream", "precision": precision,
                   "kernels": fastpath.kernels(precision, torch.device("cpu"), stream=True),
                   "threads": torch.get_num_threads(),
                   "latency_ms": round(1000 * latency_samples(h) / h.sampling_rate, 2),
                   **record, "real_time": record["frame_ms"] < record["duration_ms"],
                   "frame_ms_runs": [round(run["frame_ms"], 3) for run in runs]}


def check_arguments(h: AttrDict, args: argparse.Namespace) -> None:
    """One-line errors for values that would otherwise fail deep inside a measurement, or
    after the other measurements have run."""
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA GPU is available to this torch build")
    for option, least in (("threads", 1), ("batch", 1), ("steps", 0), ("train_steps", 1), ("warmup", 0),
                          ("repeats", 0), ("profile", 0)):
        value = getattr(args, option)
        if value is not None and value < least:
            raise ValueError(f"--{option} must be at least {least}, got {value}")
    for option in ("clip_seconds", "bandwidth"):
        value = getattr(args, option)
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"--{option} must be a positive number, got {value:g}")
    if args.train_seconds is not None and not (math.isfinite(args.train_seconds) and args.train_seconds > 0):
        raise ValueError(f"--train_seconds must be a positive number of seconds, got {args.train_seconds:g}")
    for option, unit in (("clips", "seconds"), ("file_seconds", "seconds"), ("stream_chunk_ms", "milliseconds")):
        bad = [v for v in getattr(args, option) if not (math.isfinite(v) and v > 0)]
        if bad:
            raise ValueError(f"--{option} takes positive numbers of {unit}, got {bad[0]:g}")
    if args.file_seconds and args.suite not in ("inference", "all"):
        raise ValueError(f"--file_seconds times whole files in --suite inference (or all), not --suite {args.suite}")
    if args.stream_chunk_ms and not h.causal:
        raise ValueError(f"--stream_chunk_ms needs a causal config ('causal': true), not {h.source}")
    for ms in args.stream_chunk_ms:
        codec.chunk_samples(ms, h.sampling_rate, "--stream_chunk_ms")
    if args.stream_chunk_ms and args.clip_seconds * h.sampling_rate < first_code_samples(h):
        # No push would complete a latent frame: there would be nothing to time.
        raise ValueError(f"--clip_seconds {args.clip_seconds:g} is shorter than a stream needs for its first "
                         f"code ({1000 * first_code_samples(h) / h.sampling_rate:.2f} ms)")


def run(h: AttrDict, args: argparse.Namespace) -> None:
    check_arguments(h, args)
    # stdout carries the JSON lines alone: what the measured code prints goes to stderr.
    out = sys.stdout
    with contextlib.redirect_stdout(sys.stderr):
        measure(h, args, emit=lambda record: print(json.dumps(record), file=out, flush=True))


def default_inference_precisions(device: torch.device) -> str:
    """float32 and what this device runs faster: TF32 and bfloat16 on a GPU, else the CPU's
    reduced precision."""
    return "float32,tf32,bfloat16" if device.type == "cuda" else "float32," + fastpath.reduced_precision(device)


def measure(h: AttrDict, args: argparse.Namespace, emit: Callable[[dict], None]) -> None:
    """Run the measurements that `args` asks for, giving each record to `emit`."""
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    common = {"device": name, "torch": torch.__version__}
    configs = [(c, configuration(h, c)) for c in args.precisions.split(",")]
    if args.suite in ("step", "all") and args.steps:
        for label, hc in configs:
            try:
                emit({"bench": "train_step", "config": label, **common,
                      **bench_training(hc, device, args.steps, args.warmup, args.profile)})
            except Exception as e:  # one failing configuration (e.g. compile) must not stop the rest
                emit({"bench": "train_step", "config": label, **common, "error": f"{type(e).__name__}: {e}"[:300]})
        torch.manual_seed(h.seed)
        emit({"bench": "params", **{part: parameter_count(cls(h)) for part, cls in (
            ("encoder", Encoder), ("decoder", Decoder), ("mpd", MultiPeriodDiscriminator),
            ("mrd", MultiResolutionDiscriminator))}})
    if args.suite in ("inference", "all") and args.repeats:
        precisions = args.inference_precisions or default_inference_precisions(device)
        for name in precisions.split(","):
            inference_configuration(name)    # a misspelt name stops the run before any timing
        # inference.py runs a causal codec offline through the reference path, in float32 (the
        # fast path is the paper's model); its reduced precisions are the stream's.
        offline = ["float32"] if h.causal else precisions.split(",")
        for record in bench_inference(h, device, args.clips, [] if h.causal else offline,
                                      args.batch or (100 if device.type == "cuda" else 4), args.repeats,
                                      args.profile):
            emit({**record, **common})
        if args.file_seconds:
            for record in bench_files(h, device, args.file_seconds, offline):
                emit({**record, **common})
    if args.suite in ("traffic", "all"):
        # The meta device has no data to compile for: +compile names count as their precision.
        precisions = args.inference_precisions or "float32,bfloat16"
        names = dict.fromkeys(inference_configuration(name)[0] for name in precisions.split(","))
        for record in bench_traffic(h, args.clips, list(names), args.batch or 100,
                                    args.bandwidth * 1e12):
            emit({**record, "device": "meta (counted, not timed)", "torch": torch.__version__})
    if args.suite in ("train", "all"):
        # At least two epochs: the first holds compilation and the step-0 validation.
        steps_per_epoch = min(50, max(1, args.train_steps // 2))
        epochs = max(1, -(-args.train_steps // steps_per_epoch))
        with tempfile.TemporaryDirectory() as folder:
            write_dataset(folder, steps_per_epoch * h.batch_size, 1.0, h.sampling_rate)
            for label, hc in configs:
                print(f"train.py with {label}, {steps_per_epoch * epochs} steps:", file=sys.stderr, flush=True)
                try:
                    emit({"bench": "train.py", "config": label, **common,
                          **bench_train_script(hc, folder, steps_per_epoch, epochs, device, args.train_seconds)})
                except Exception as e:
                    emit({"bench": "train.py", "config": label, **common, "error": f"{type(e).__name__}: {e}"[:300]})
    if args.stream_chunk_ms:
        precisions = (args.inference_precisions or default_inference_precisions(torch.device("cpu"))).split(",")
        for record in bench_streaming(h, args.clip_seconds, args.stream_chunk_ms, precisions, args.repeats):
            emit({**record, **common})


def main(argv: Optional[List[str]] = None) -> None:
    parser = make_parser(__doc__)
    parser.add_argument("--suite", choices=("step", "train", "inference", "traffic", "all"), default="step",
                        help="what to measure (default step)")
    parser.add_argument("--precisions", default="float32,bf16,bf16+compile",
                        help="comma-separated configurations: float32|bf16|fp16, optionally +compile or "
                             "+cudagraphs, +fused and +graph (the passes as CUDA graphs) (default "
                             "float32,bf16,bf16+compile)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=pick_device().type,
                        help="cpu or cuda (default: cuda where available)")
    parser.add_argument("--steps", type=int, default=5, help="timed training steps (batch: the config's batch_size) "
                                                                  "(default 5)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed training steps first (compilation happens here) "
                                                                   "(default 2)")
    parser.add_argument("--train_steps", type=int, default=300, help="train.py steps per configuration (--suite train) "
                                                                          "(default 300)")
    parser.add_argument("--train_seconds", type=float, help="stop each configuration's train.py after this many "
                                                            "seconds, as Ctrl-C would, and report the steps it "
                                                            "reached (--suite train) (default: no limit)")
    parser.add_argument("--clip_seconds", type=float, default=10.0, help="length of the streamed clip (default 10)")
    parser.add_argument("--clips", type=float, nargs="+", default=[1.0, 10.0, 60.0],
                        help="inference clip lengths in seconds (--suite inference) (default 1 10 60)")
    parser.add_argument("--file_seconds", type=float, nargs="*", default=[],
                        help="also resynthesise generated wav files of these lengths (s) as inference.py does, "
                             "long ones through the chunked path (--suite inference)")
    parser.add_argument("--inference_precisions", metavar="LIST",
                        help="comma-separated: float32, bfloat16, int8, tf32 (GPU), the first two and tf32 "
                             "optionally +compile (default: float32 and the reduced precision of this machine; "
                             "on a GPU float32,tf32,bfloat16)")
    parser.add_argument("--batch", type=int, help="clips of the batched measurement (default 100 on a GPU and for "
                                                  "--suite traffic, 4 on the CPU)")
    parser.add_argument("--bandwidth", type=float, default=3.35, metavar="TB_PER_S",
                        help="memory bandwidth for --suite traffic's bound (default 3.35, an H100 SXM's)")
    parser.add_argument("--repeats", type=int, default=3, help="timed inference runs (0: none) (default 3)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="--suite step and inference: profile one more run of each measurement and add, as "
                             "'profile', its wall time, the time the device worked (a GPU's kernels; a CPU's "
                             "operations) and the N kernels or operations that took longest (default 0: off)")
    parser.add_argument("--stream_chunk_ms", type=float, nargs="*", default=[],
                        help="time the causal codec streaming on the CPU in chunks of these lengths (ms)")
    run_cli(run, parser, argv)


if __name__ == "__main__":
    main()
