"""Measure parameter counts, training step time and memory, and inference speed.

    python bench.py [--device cuda|cpu] [--steps N] [--clip_seconds S] [--threads N]
                    [--stream_chunk_ms MS ...] [--config config.json] [--KEY VALUE ...]

Uses random weights and synthetic audio, so it needs no data or checkpoints. Prints the
numbers; it never asserts anything about them. With a causal config, --stream_chunk_ms
times the streaming codec on the CPU per latent frame for each chunk length, against the
frame's duration (--threads 1 for one core).
"""
import statistics
import argparse
import time
from typing import List, Optional

import numpy as np
import torch

import codec
import stream_demo
import train
from config import AttrDict, make_parser, run_cli
from models import Decoder, Encoder, remove_weight_norm
from streaming import StreamingCodec, latency_samples
from utils import pick_device, synchronize


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


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def bench_training(h, device: torch.device, steps: int, warmup: int) -> dict:
    trainer = train.Trainer(h, device)
    audio = synthetic_audio(h.batch_size, h.segment_size, h.sampling_rate).to(device)
    for _ in range(warmup):
        trainer.train_step(audio)
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(steps):
        terms = trainer.train_step(audio)
    terms["G"].item()
    synchronize(device)
    seconds = (time.perf_counter() - start) / steps
    result = {
        "params_encoder": count(trainer.encoder), "params_decoder": count(trainer.decoder),
        "params_mpd": count(trainer.mpd), "params_mrd": count(trainer.mrd),
        "train_batch_size": h.batch_size, "train_s_per_step": round(seconds, 4),
        "train_segments_per_s": round(h.batch_size / seconds, 2),
    }
    if device.type == "cuda":
        result["train_peak_memory_GiB"] = round(torch.cuda.max_memory_allocated(device) / 2 ** 30, 2)
    return result


def bench_inference(h, device: torch.device, clip_seconds: float, repeats: int) -> dict:
    encoder = remove_weight_norm(Encoder(h).to(device)).eval()
    decoder = remove_weight_norm(Decoder(h).to(device)).eval()
    audio = synthetic_audio(1, int(clip_seconds * h.sampling_rate), h.sampling_rate).to(device)
    codec.codec_roundtrip(encoder, decoder, audio, h)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        codec.codec_roundtrip(encoder, decoder, audio, h)
    synchronize(device)
    seconds = (time.perf_counter() - start) / repeats
    return {"infer_clip_s": clip_seconds, "infer_wall_s": round(seconds, 4), "infer_rtf": round(seconds / clip_seconds, 5)}


def bench_streaming(h, clip_seconds: float, chunk_ms: List[float], repeats: int) -> dict:
    """Median compute per latent frame (wall and this thread's CPU time) for each chunk length,
    each the median of `repeats` streams of the clip; on the CPU."""
    encoder = remove_weight_norm(Encoder(h)).eval()
    decoder = remove_weight_norm(Decoder(h)).eval()
    audio = synthetic_audio(1, int(clip_seconds * h.sampling_rate), h.sampling_rate)[0].numpy()
    frame_ms = 1000 * h.ratio * h.hop_size / h.sampling_rate
    result = {"stream_latency_ms": round(1000 * latency_samples(h) / h.sampling_rate, 2),
              "stream_frame_ms": round(frame_ms, 2)}
    for ms in chunk_ms:
        chunk = max(1, round(ms * h.sampling_rate / 1000))
        medians = {"wall": [], "cpu": []}
        for _ in range(max(1, repeats)):
            chunks = (audio[i:i + chunk] for i in range(0, audio.size, chunk))
            timings = stream_demo.timed_stream(StreamingCodec(encoder, decoder, h), chunks, lambda samples: None)
            for clock in medians:
                medians[clock].append(statistics.median(stream_demo.per_frame_ms(timings, clock)))
        for clock, values in medians.items():
            result[f"stream_{chunk}_{clock}_ms"] = (f"{statistics.median(values):.2f} per frame (runs: "
                                                    f"{', '.join(f'{v:.2f}' for v in values)})")
    return result


def run(h: AttrDict, args: argparse.Namespace) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(h.seed)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    results = {"device": name, "torch": torch.__version__}
    if args.steps:
        results.update(bench_training(h, device, args.steps, args.warmup))
    if args.repeats:
        results.update(bench_inference(h, device, args.clip_seconds, args.repeats))
    if args.stream_chunk_ms:
        if not h.causal:
            raise ValueError(f"--stream_chunk_ms needs a causal config ('causal': true), not {h.source}")
        results.update(bench_streaming(h, args.clip_seconds, args.stream_chunk_ms, args.repeats))
    for key, value in results.items():
        print(f"{key:24s} {value}")


def main(argv: Optional[List[str]] = None) -> None:
    parser = make_parser(__doc__)
    parser.add_argument("--device", default=pick_device().type, help="cuda or cpu")
    parser.add_argument("--steps", type=int, default=5, help="timed training steps (batch: the config's batch_size)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed training steps first")
    parser.add_argument("--clip_seconds", type=float, default=10.0, help="length of the inference clip")
    parser.add_argument("--repeats", type=int, default=3, help="timed inference runs")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--stream_chunk_ms", type=float, nargs="*", default=[],
                        help="time the causal codec streaming on the CPU in chunks of these lengths (ms)")
    run_cli(run, parser, argv)


if __name__ == "__main__":
    main()
