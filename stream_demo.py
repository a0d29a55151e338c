"""Stream audio through the causal codec (APCodec-S) as it arrives, and time it.

    python stream_demo.py --config configs/apcodec_s_48k.json --input in.wav --output out.wav
    arecord -f S16_LE -r 48000 -c 1 -t raw | python stream_demo.py --config configs/apcodec_s_48k.json \\
        --input - --output out.raw

A wav (at the model's sampling rate; channels are averaged) or raw 16-bit little-endian mono
PCM on stdin (`--input -`) is read in chunks of --chunk_ms, encoded and decoded as it comes,
and the decoded audio written as it is produced: to stdout as raw PCM with `--output -`; a
file (wav, or raw PCM under any other name) is written to a temporary file and renamed into
place when the stream ends. Prints the algorithmic latency and the compute time
per latent frame against the frame's duration. --precision int8 (or bfloat16) runs the
products in reduced precision: faster, and approximate where float32 gives the offline pass
exactly. --random_weights needs no checkpoints (for timing only).
"""
import argparse
import contextlib
import os
import signal
import statistics
import sys
import time
from typing import BinaryIO, Callable, Dict, Iterator, List, Optional

import numpy as np
import soundfile as sf
import torch

from config import AttrDict, make_parser, run_cli
from codec import MAX_CHUNK_MS, STREAM_CHUNK_MS, chunk_samples, load_codec, pcm16
from dataset import AUDIO_EXTENSIONS, sound_file
from models import random_encoder_decoder
from fastpath import PRECISIONS, kernels, resolve_precision
from streaming import StreamingCodec, latency_samples, require_causal
from utils import atomic_write, check_output_file


def read_chunks(source: str, h: AttrDict, chunk: int) -> Iterator[np.ndarray]:
    """Float32 mono chunks of `chunk` samples (the last may be shorter) from a wav or from stdin.

    A wav is opened and checked here, before anything is written.
    """
    if source == "-":
        return _stdin_chunks(chunk)
    try:
        audio = sf.SoundFile(sound_file(source))
    except Exception as e:
        raise ValueError(f"cannot read audio file {source}: {e}") from None
    if audio.samplerate != h.sampling_rate:
        audio.close()
        raise ValueError(f"{source} is sampled at {audio.samplerate} Hz; the codec streams "
                         f"{h.sampling_rate} Hz (resample it first)")
    return _wav_chunks(audio, chunk)


def _stdin_chunks(chunk: int) -> Iterator[np.ndarray]:
    while True:
        data = sys.stdin.buffer.read(2 * chunk)
        if not data:
            return
        yield np.frombuffer(data[:len(data) // 2 * 2], dtype="<i2").astype(np.float32) / 32768


def _wav_chunks(audio: sf.SoundFile, chunk: int) -> Iterator[np.ndarray]:
    with audio:
        for block in audio.blocks(chunk, dtype="float32", always_2d=True):
            yield block.mean(axis=1)


def stream(h: AttrDict, codec: StreamingCodec, chunks: Iterator[np.ndarray], sink: BinaryIO, wav: bool) -> List[dict]:
    """Push every chunk through the codec, writing decoded audio as it comes; per-push timings."""
    if wav:
        with sf.SoundFile(sink, "w", h.sampling_rate, 1, "PCM_16", format="WAV") as out:
            return timed_stream(codec, chunks, lambda samples: out.write(pcm16(samples)), live=True)

    def write_raw(samples: np.ndarray) -> None:
        sink.write(pcm16(samples).astype("<i2").tobytes())
        sink.flush()
    return timed_stream(codec, chunks, write_raw, live=True)


class StopReading(Exception):
    """A stop signal (Ctrl-C, SIGTERM) while a live stream waits for its next chunk."""


def timed_stream(codec: StreamingCodec, chunks: Iterator[np.ndarray], write: Callable[[np.ndarray], None],
                 live: bool = False) -> List[dict]:
    """Push each chunk (L,) and write what comes out, then flush; returns per push the latent
    frames completed and the wall and CPU (this thread) seconds it took. `live`: Ctrl-C or
    SIGTERM ends the stream and keeps what was coded (else they stop the process as usual)."""
    timings = []
    stop: List[int] = []
    reading = False

    def request_stop(signum: int, frame: object) -> None:
        if stop:   # a second signal stops at once
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            print("terminated", file=sys.stderr)
            raise SystemExit(128 + signum)
        stop.append(signum)
        if reading:
            raise StopReading          # the next chunk may never come (a source that waits)

    # Ctrl-C (or SIGTERM, from `timeout`, `kill` or a service manager) is how a live stream
    # ends: the push under way finishes (the encoder may have taken its chunk already), or the
    # wait for the next chunk ends (what it had read of that chunk is dropped); then the
    # stream is flushed and everything coded is written.
    previous = {signum: signal.signal(signum, request_stop)
                for signum in ((signal.SIGINT, signal.SIGTERM) if live else ())}
    chunks = iter(chunks)
    try:
        with torch.inference_mode():
            try:
                while True:
                    reading = True
                    chunk = None if stop else next(chunks, None)
                    reading = False
                    if chunk is None:
                        break
                    wall, cpu = time.perf_counter(), time.thread_time()
                    codes, audio = codec.push(torch.from_numpy(chunk)[None])
                    timings.append({"frames": codes.size(-1), "wall": time.perf_counter() - wall,
                                    "cpu": time.thread_time() - cpu})
                    write(audio[0].numpy())
            except StopReading:
                pass
            if stop:
                print(f"{signal.Signals(stop[0]).name}: the stream ends here, and what was coded so far is written",
                      file=sys.stderr)
            write(codec.flush()[1][0].numpy())
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return timings


def summarise(timings: List[dict], h: AttrDict, chunk: int, clock: str = "cpu") -> Optional[Dict[str, float]]:
    """The compute of a stream against the audio it coded, from `timed_stream`'s timings ('wall'
    or 'cpu' clock), leaving out the pushes up to and including the first that completed a
    latent frame (warm-up) where later ones did too:

    * frame_ms: compute per latent frame, all pushes' time over all frames; the stream keeps
      up when it is below the frame's duration;
    * push_median_ms, push_p95_ms, push_max_ms: each push's time, against the chunk's duration
      (`chunk_ms`): how far a single push can fall behind.

    None when no push completed a frame.
    """
    first = next((i for i, t in enumerate(timings) if t["frames"]), None)
    if first is None:
        return None
    counted = timings[first + 1:] if any(t["frames"] for t in timings[first + 1:]) else timings[first:]
    pushes = sorted(1000 * t[clock] for t in counted)
    return {"frame_ms": sum(pushes) / sum(t["frames"] for t in counted),
            "duration_ms": 1000 * h.ratio * h.hop_size / h.sampling_rate,
            "chunk_ms": 1000 * chunk / h.sampling_rate,
            "push_median_ms": statistics.median(pushes),
            "push_p95_ms": pushes[min(len(pushes) - 1, int(0.95 * len(pushes)))],
            "push_max_ms": pushes[-1]}


def report(h: AttrDict, timings: List[dict], chunk: int) -> None:
    threads = f"{torch.get_num_threads()} thread{'s' if torch.get_num_threads() > 1 else ''}"
    for clock in ("wall", "cpu"):
        s = summarise(timings, h, chunk, clock)
        if s is None:
            print("The input was shorter than one latent frame: nothing to time.")
            return
        pace = "faster than" if s["frame_ms"] < s["duration_ms"] else "SLOWER than"
        print(f"Compute per latent frame ({clock} clock, {threads}): {s['frame_ms']:.2f} ms against "
              f"{s['duration_ms']:.2f} ms of audio, {pace} real time; per {s['chunk_ms']:.2f} ms chunk: median "
              f"{s['push_median_ms']:.2f} ms, 95th percentile {s['push_p95_ms']:.2f} ms, max {s['push_max_ms']:.2f} ms")


def demo(h: AttrDict, args: argparse.Namespace) -> None:
    if args.output != "-":
        _demo(h, args, None)
        return
    # Raw audio goes to stdout, so every message goes to stderr, notes while loading included.
    pcm = sys.stdout.buffer
    with contextlib.redirect_stdout(sys.stderr):
        _demo(h, args, pcm)


def check_output(input_path: str, output_path: str) -> None:
    """A one-line ValueError for an --output that would replace --input, that names an audio
    format other than wav (anything else is written as raw PCM), or where no file can be written."""
    if output_path == "-":
        return
    check_output_file(output_path, "--output")
    if (input_path != "-" and os.path.exists(input_path) and os.path.exists(output_path)
            and os.path.samefile(input_path, output_path)):
        raise ValueError(f"--output {output_path} would replace --input; write elsewhere")
    extension = os.path.splitext(output_path)[1].lower()
    if extension in AUDIO_EXTENSIONS and extension != ".wav":
        raise ValueError(f"--output {output_path}: this writes .wav or raw PCM (any other name), not {extension}")


def _demo(h: AttrDict, args: argparse.Namespace, pcm: Optional[BinaryIO]) -> None:
    """`demo`, writing raw PCM to `pcm` when given, else to the --output file."""
    check_output(args.input, args.output)
    if args.threads < 1:
        raise ValueError(f"--threads must be at least 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    if args.random_weights:
        encoder, decoder = random_encoder_decoder(h)
    else:
        # The config beside the checkpoints, where training wrote one, describes their network.
        encoder, decoder, h = load_codec(h, None, None, torch.device("cpu"))
    require_causal(h)
    chunk = chunk_samples(args.chunk_ms, h.sampling_rate)
    chunks = read_chunks(args.input, h, chunk)
    latency = latency_samples(h)
    print(f"Algorithmic latency {latency} samples = {1000 * latency / h.sampling_rate:.2f} ms; latent frame "
          f"{h.ratio * h.hop_size} samples = {1000 * h.ratio * h.hop_size / h.sampling_rate:.2f} ms; chunks of "
          f"{chunk} samples")
    precision = resolve_precision(args.precision, torch.device("cpu"))
    print(f"precision {kernels(precision, torch.device('cpu'), stream=True)}")
    codec = StreamingCodec(encoder, decoder, h, precision=precision)
    if pcm is not None:
        timings = stream(h, codec, chunks, pcm, wav=False)
    else:
        timings = []
        raw = not args.output.lower().endswith(".wav")
        atomic_write(args.output, lambda f: timings.extend(stream(h, codec, chunks, f, wav=not raw)))
    report(h, timings, chunk)


def main(argv: Optional[List[str]] = None) -> None:
    parser = make_parser(__doc__)
    parser.add_argument("--input", required=True, help="wav file, or - for raw 16-bit mono PCM on stdin")
    parser.add_argument("--output", required=True, help="wav file (.wav), raw PCM file, or - for stdout")
    parser.add_argument("--chunk_ms", type=float, default=STREAM_CHUNK_MS,
                        help=f"chunk length in milliseconds (default {STREAM_CHUNK_MS:g}, at most {MAX_CHUNK_MS:g})")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--precision", choices=PRECISIONS + ("auto",), default="float32",
                        help="products in float32 (default: the offline pass exactly), bfloat16 or int8 "
                             "(faster, approximate), or auto (the faster of those on this CPU)")
    parser.add_argument("--random_weights", action="store_true", help="random weights instead of checkpoints")
    run_cli(demo, parser, argv)


if __name__ == "__main__":
    main()
