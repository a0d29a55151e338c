"""Measure parameter counts, training step time and memory, and inference speed.

    python bench.py [--config config.json] [--device cuda|cpu] [--batch_size N] [--steps N]
                    [--clip_seconds S] [--threads N]

Uses random weights and synthetic audio, so it needs no data or checkpoints. Prints the
numbers; it never asserts anything about them.
"""
import argparse
import json
import time

import numpy as np
import torch

import inference
import train
from models import Decoder, Encoder, remove_weight_norm
from utils import build_config


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


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def bench_training(h, device: torch.device, steps: int, warmup: int) -> dict:
    trainer = train.Trainer(h, device)
    audio = synthetic_audio(h.batch_size, h.segment_size, h.sampling_rate).to(device)
    for _ in range(warmup):
        trainer.train_step(audio)
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(steps):
        terms = trainer.train_step(audio)
    terms["G"].item()
    sync(device)
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
    inference.codec_roundtrip(encoder, decoder, audio, h)
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        inference.codec_roundtrip(encoder, decoder, audio, h)
    sync(device)
    seconds = (time.perf_counter() - start) / repeats
    return {"infer_clip_s": clip_seconds, "infer_wall_s": round(seconds, 4), "infer_rtf": round(seconds / clip_seconds, 5)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="config.json")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch_size", type=int, help="training batch (default: the config's)")
    parser.add_argument("--steps", type=int, default=5, help="timed training steps")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--clip_seconds", type=float, default=10.0)
    parser.add_argument("--repeats", type=int, default=3, help="timed inference runs")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    with open(args.config) as f:
        h = build_config(json.load(f), args.config)
    if args.batch_size:
        h.batch_size = args.batch_size
    device = torch.device(args.device)
    torch.manual_seed(h.seed)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    results = {"device": name, "torch": torch.__version__}
    if args.steps:
        results.update(bench_training(h, device, args.steps, args.warmup))
    if args.repeats:
        results.update(bench_inference(h, device, args.clip_seconds, args.repeats))
    for key, value in results.items():
        print(f"{key:24s} {value}")


if __name__ == "__main__":
    main()
