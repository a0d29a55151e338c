"""Objective evaluation of decoded audio against references.

    python evaluate.py --reference REF --decoded DEC [--output eval_out] [--speech]
    python evaluate.py --reference REF [--checkpoint_file_load_Encoder ENC] [--n_codebooks N]
                       [--checkpoint_file_load_Decoder DEC] [--output eval_out] [--speech]

Files are matched by relative path without extension (REF/a/b.flac <-> DEC/a/b.wav). The
second form (no --decoded) runs the codec of the config's checkpoints over REF first,
writes OUTPUT/decoded/ and adds STFT consistency, the nominal and measured bitrate and the
real-time factor. Audio is evaluated at the config's sampling_rate (the codec's): a
reference at another rate is resampled as the codec's input is, and a decoded file at
another rate is resampled to match. The repository's config.json is used unless --config
names another, so this works from any folder.

Writes OUTPUT/metrics.csv (per file), summary.json (mean and 95% confidence interval per
metric), report.md (the Markdown table also printed) and spectrograms.png (the worst and
best file by LSD). A metric undefined on a file (the SNR of a silent reference) is left
empty there and out of its mean, and the report names the file.
"""
import argparse
import csv
import io
import json
import math
import os
import sys
import time
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import scipy.stats
import soundfile as sf
import torch

from codec import check_n_codebooks, code_bits, codec_roundtrip, load_codec, write_wav
from config import AttrDict, bitrate, make_parser, run_cli
from dataset import audio_index, load_audio, sound_file
from inference import add_n_codebooks_option, check_inputs, check_outputs, check_outside
from metrics import (HIGHER_IS_BETTER, POWER_FLOOR, compute_metrics, log_power, metric_stft,
                     optional_metrics, stft_consistency)
from models import Decoder, Encoder
from spectral import anti_wrapping
from utils import atomic_write, counted, first_line, pick_device, synchronize

# Codecs may pad their output to whole frames; beyond this the pairing is probably wrong.
MAX_LENGTH_MISMATCH_S = 0.1
CONFIDENCE = 0.95

Pair = Tuple[str, str, str]  # (name, reference path, decoded path)


def build_parser() -> argparse.ArgumentParser:
    parser = make_parser(__doc__, replaced=("n_codebooks",))
    add_n_codebooks_option(parser, "without --decoded: resynthesise with the first N codebooks (1 ... the model's "
                                   "n_codebooks; default all), to evaluate a lower bitrate")
    parser.add_argument("--reference", required=True, help="folder of reference audio")
    parser.add_argument("--decoded", help="folder of decoded audio to compare; without it, run the codec")
    parser.add_argument("--output", default="eval_out", help="folder for the CSV, JSON, Markdown and PNG outputs")
    parser.add_argument("--speech", action="store_true", help="also compute PESQ-WB and STOI")
    return parser


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def match_files(reference: Dict[str, str], decoded: Dict[str, str]) -> Tuple[List[Pair], List[str], List[str]]:
    """(name, reference, decoded) pairs, then the names only in reference, only in decoded."""
    pairs = [(key, path, decoded[key]) for key, path in reference.items() if key in decoded]
    missing = [key for key in reference if key not in decoded]
    extra = [key for key in decoded if key not in reference]
    return pairs, missing, extra


def read_audio(path: str, sampling_rate: int) -> np.ndarray:
    """Mono audio at `sampling_rate`, with a warning when it had to be resampled."""
    audio = load_audio(path, sampling_rate)
    native = sf.info(sound_file(path)).samplerate
    if native != sampling_rate:
        warn(f"{path} is {native} Hz; resampled to {sampling_rate} Hz")
    if audio.size == 0:
        raise ValueError(f"audio file {path} holds no samples")
    return audio


def read_pair(name: str, ref_path: str, dec_path: str, sampling_rate: int) -> Tuple[np.ndarray, np.ndarray]:
    """Reference and decoded audio of one file, trimmed to the shorter if they differ a little."""
    ref, dec = read_audio(ref_path, sampling_rate), read_audio(dec_path, sampling_rate)
    if ref.size != dec.size:
        if abs(ref.size - dec.size) > MAX_LENGTH_MISMATCH_S * sampling_rate:
            raise ValueError(f"{name}: reference {ref_path} has {ref.size} samples, decoded {dec_path} "
                             f"{dec.size}: too different to align")
        warn(f"{name}: reference has {ref.size} samples, decoded {dec.size}; trimmed to the shorter")
        length = min(ref.size, dec.size)
        ref, dec = ref[:length], dec[:length]
    return ref, dec


OutputHook = Callable[[str, Dict[str, torch.Tensor]], None]


def resynthesize(h: AttrDict, encoder: Encoder, decoder: Decoder, files: Dict[str, str], output_dir: str,
                 device: torch.device, on_output: OutputHook, failed: List[str], n_codebooks: Optional[int] = None
                 ) -> Dict[str, float]:
    """Resynthesise each file of {key: path}, mono at the model's rate, into output_dir/key.wav,
    with the first `n_codebooks` codebooks (all by default).

    `on_output(key, codec_roundtrip result)` sees every result, predicted spectra included.
    A file that cannot be read is reported on stderr, added to `failed` and left out. Returns the totals: files,
    audio seconds and the real-time factor of encode + decode (file I/O excluded; the first
    file gets one untimed pass, which pays for allocations and kernel selection).
    """
    audio_seconds = codec_seconds = 0.0
    done = 0
    for key, path in files.items():
        try:
            audio = torch.from_numpy(load_audio(path, h.sampling_rate)).to(device).unsqueeze(0)
        except ValueError as e:
            print(f"failed: {e}", file=sys.stderr)
            failed.append(str(e))
            continue
        if done == 0:
            codec_roundtrip(encoder, decoder, audio, h, n_codebooks)
        synchronize(device)
        start = time.perf_counter()
        out = codec_roundtrip(encoder, decoder, audio, h, n_codebooks)
        synchronize(device)
        codec_seconds += time.perf_counter() - start
        audio_seconds += audio.size(-1) / h.sampling_rate
        decoded = out["audio"][0].cpu().numpy()
        write_wav(os.path.join(output_dir, key + ".wav"), [decoded], h.sampling_rate, 1)
        on_output(key, out)
        done += 1
    if not done:
        raise ValueError(f"none of the {len(files)} reference files could be read (listed above)")
    totals = {"files": done, "audio_seconds": audio_seconds, "rtf": codec_seconds / audio_seconds}
    print(f"Resynthesised {done} files ({audio_seconds:.1f} s of audio) into "
          f"{os.path.abspath(output_dir)}: RTF {totals['rtf']:.4f} on {device.type} "
          f"with {torch.get_num_threads()} threads")
    return totals


def run_codec(h: AttrDict, reference: Dict[str, str], decoded_dir: str, device: torch.device, failed: List[str],
              n_codebooks: Optional[int] = None) -> Tuple[Dict[str, float], Dict[str, object], AttrDict]:
    """Resynthesise every reference file (checked by `inference.check_inputs`) into `decoded_dir`
    with the config's checkpoints and the first `n_codebooks` codebooks (all by default);
    those that cannot be read are added to `failed`.

    Returns the STFT consistency of each file's predicted spectrum (its keys: the files
    resynthesised), the codec facts
    (nominal bitrate, bits of the codes actually produced per second of audio, real-time
    factor of encode + decode) for the summary, and the config of the checkpoints (that of
    their training run when it differs from `h`, see `load_codec`), which the metrics use.
    """
    encoder, decoder, h = load_codec(h, None, None, device)
    used = check_n_codebooks(n_codebooks, h.n_codebooks)
    consistency: Dict[str, float] = {}
    bits_drawn = 0
    bits_per_code = code_bits(h.codebook_size)

    def measure(key: str, out: Dict[str, torch.Tensor]) -> None:
        nonlocal bits_drawn
        bits_drawn += out["codes"].numel() * bits_per_code
        consistency[key] = stft_consistency(out["real"][0], out["imag"][0], h).item()

    totals = resynthesize(h, encoder, decoder, reference, decoded_dir, device, measure, failed, used)
    # Measured from the codes, padding frames included; a codes-file container adds its header.
    codec = {"bitrate_bps": bitrate(dict(h, n_codebooks=used)),
             "bitrate_measured_bps": bits_drawn / totals["audio_seconds"], "rtf": totals["rtf"],
             "rtf_device": device.type, "rtf_threads": torch.get_num_threads()}
    return consistency, codec, h


def mean_and_ci(values: List[float]) -> Dict[str, object]:
    """Mean and the t-distribution confidence interval over files (none for a single file)."""
    x = np.asarray(values, dtype=np.float64)
    mean = float(x.mean()) if x.size else math.nan
    # An infinite value (the SNR of a file identical to its reference) leaves no interval.
    if x.size < 2 or not np.isfinite(x).all():
        return {"mean": mean, "ci95": None, "n": int(x.size)}
    half = scipy.stats.t.ppf(0.5 + CONFIDENCE / 2, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size)
    return {"mean": mean, "ci95": [mean - half, mean + half], "n": int(x.size)}


def _number(value: float) -> str:
    return f"{value:.5g}"


def markdown_report(names: List[str], stats: Dict[str, Dict], notes: List[str]) -> str:
    """The table (means, then CI half-widths, then which way is better) and notes below it."""
    def row(cells: List[str]) -> str:
        return "| " + " | ".join(cells) + " |"

    def half_width(ci: Optional[List[float]]) -> str:
        return "n/a" if ci is None else "±" + _number((ci[1] - ci[0]) / 2)
    lines = [row(names), row(["---:"] * len(names)),
             row([_number(stats[n]["mean"]) for n in names]),
             row([half_width(stats[n]["ci95"]) for n in names]),
             row(["higher" if HIGHER_IS_BETTER[n] else "lower" for n in names])]
    legend = (f"Rows: mean over files, {CONFIDENCE:.0%} confidence half-width (t-distribution over "
              f"files), which way is better.")
    return "\n".join(lines + ["", legend] + notes) + "\n"


def _json_safe(value):
    """NaN and infinity (e.g. the SNR of identical files) as null, so the JSON stays standard."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def csv_text(rows: List[Dict[str, object]], names: List[str]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["file"] + names, lineterminator="\n")
    writer.writeheader()
    # An undefined value (NaN) is an empty cell.
    writer.writerows({k: "" if isinstance(v, float) and math.isnan(v) else v for k, v in row.items()}
                     for row in rows)
    return buffer.getvalue()


def plot_extremes(extremes: Dict[str, Tuple[str, float, np.ndarray, np.ndarray]], sampling_rate: int, f) -> None:
    """Reference vs decoded log power and phase, and their differences, for each picked file."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    picks = [(label, *extremes[label]) for label in ("worst", "best")]
    if picks[0][1] == picks[1][1]:
        picks = picks[:1]
    fig, axes = plt.subplots(2 * len(picks), 3, figsize=(15, 5 * len(picks)), squeeze=False)
    for i, (label, name, value, ref, dec) in enumerate(picks):
        spec_ref, spec_dec = (metric_stft(torch.from_numpy(y)) for y in (ref, dec))
        power_ref, power_dec = log_power(spec_ref), log_power(spec_dec)
        pha_ref, pha_dec = torch.angle(spec_ref), torch.angle(spec_dec)
        # Shared colour limits, so that the reference and decoded panels compare by eye.
        power_limits = (math.log10(POWER_FLOOR), max(power_ref.max().item(), power_dec.max().item()))
        spread = (power_ref - power_dec).abs().max().item() or 1.0
        panels = [
            (power_ref, "reference log10 power", "magma", power_limits),
            (power_dec, "decoded log10 power", "magma", power_limits),
            (power_ref - power_dec, "log10 power difference", "coolwarm", (-spread, spread)),
            (pha_ref, "reference phase", "twilight", (-math.pi, math.pi)),
            (pha_dec, "decoded phase", "twilight", (-math.pi, math.pi)),
            (anti_wrapping(pha_ref - pha_dec), "anti-wrapped phase difference", "viridis", (0, math.pi)),
        ]
        extent = [0, ref.size / sampling_rate, 0, sampling_rate / 2000]
        for ax, (image, title, cmap, (low, high)) in zip(axes[2 * i:2 * i + 2].flat, panels):
            im = ax.imshow(image.numpy(), origin="lower", aspect="auto", cmap=cmap, extent=extent,
                           vmin=low, vmax=high, interpolation="none")
            ax.set_title(f"{label} by LSD: {name} (LSD {value:.3f})\n{title}", fontsize=9)
            ax.set_xlabel("time (s)")
            ax.set_ylabel("kHz")
            fig.colorbar(im, ax=ax)
    # Fixed spacing: an automatic layout costs seconds for twelve colour-barred panels.
    fig.subplots_adjust(hspace=0.6, wspace=0.25, left=0.05, right=0.98, top=0.94, bottom=0.06)
    fig.savefig(f, format="png", dpi=80)
    plt.close(fig)


def _track_extremes(extremes: Dict, name: str, value: float, ref: np.ndarray, dec: np.ndarray) -> None:
    # Keeping only two pairs in memory lets the figure be drawn without reading files again.
    if "worst" not in extremes or value > extremes["worst"][1]:
        extremes["worst"] = (name, value, ref, dec)
    if "best" not in extremes or value < extremes["best"][1]:
        extremes["best"] = (name, value, ref, dec)


def evaluate(pairs: List[Pair], h: AttrDict, speech: bool, device: torch.device
             ) -> Tuple[List[Dict[str, object]], Dict[str, Tuple], List[str]]:
    """Per-file metric rows, the worst and best file by LSD with their audio, and the files
    that could not be read (each reported on stderr and left out). An optional metric that
    fails on a file is reported on stderr and left empty in its row."""
    scorers = optional_metrics(speech)
    rows, extremes, failed = [], {}, []
    for name, ref_path, dec_path in pairs:
        try:
            ref, dec = read_pair(name, ref_path, dec_path, h.sampling_rate)
        except ValueError as e:
            print(f"failed: {e}", file=sys.stderr)
            failed.append(str(e))
            continue
        row = {"file": name}
        row.update(compute_metrics(torch.from_numpy(ref).to(device), torch.from_numpy(dec).to(device), h))
        for metric, score in scorers.items():
            try:
                row[metric] = score(ref, dec, h.sampling_rate)
            except Exception as e:   # a third-party metric's own limits (e.g. a clip too short for it)
                row[metric] = math.nan
                print(f"{metric} skipped for {name}: {first_line(e)}", file=sys.stderr)
        rows.append(row)
        _track_extremes(extremes, name, row["LSD"], ref, dec)
    if not rows:
        raise ValueError(f"no file could be evaluated: {failed[0]}")
    return rows, extremes, failed


def write_outputs(output: str, rows: List[Dict[str, object]], summary: Dict[str, object], report: str,
                  extremes: Dict, sampling_rate: int) -> None:
    names = list(summary["metrics"])
    atomic_write(os.path.join(output, "metrics.csv"), lambda f: f.write(csv_text(rows, names).encode()))
    text = json.dumps(_json_safe(summary), indent=2, allow_nan=False) + "\n"
    atomic_write(os.path.join(output, "summary.json"), lambda f: f.write(text.encode()))
    atomic_write(os.path.join(output, "report.md"), lambda f: f.write(report.encode()))
    atomic_write(os.path.join(output, "spectrograms.png"), lambda f: plot_extremes(extremes, sampling_rate, f))


def run(h: AttrDict, args: argparse.Namespace) -> None:
    device = pick_device()
    # Every reference that could not be read, at any stage: reported, and left out of the means.
    failed: List[str] = []
    listed = audio_index(args.reference)
    reference = check_inputs(listed, args.reference, failed)
    consistency, codec = {}, {}
    decoded_dir = args.decoded
    if decoded_dir is not None and args.use_codebooks is not None:
        raise ValueError("--n_codebooks applies when evaluate.py runs the codec (without --decoded)")
    if decoded_dir is None:
        decoded_dir = os.path.join(args.output, "decoded")
        check_outputs(reference, decoded_dir, ".wav", "--output")
        check_outside(decoded_dir, args.reference, "--output", "--reference")
        consistency, codec, h = run_codec(h, reference, decoded_dir, device, failed, args.use_codebooks)
        reference = {key: path for key, path in reference.items() if key in consistency}
    pairs, missing, extra = match_files(reference, audio_index(decoded_dir))
    # A decoded file whose reference failed is not extra.
    extra = [key for key in extra if key not in listed]
    if not pairs:
        raise FileNotFoundError(f"no file of {args.reference} has a match in {decoded_dir}")
    rows, extremes, unread = evaluate(pairs, h, args.speech, device)
    failed += unread
    notes = [f"Evaluated {counted(len(rows), 'file')} of {args.reference} against {decoded_dir}."]
    if missing:
        notes.append(f"Missing from {decoded_dir} ({len(missing)}): {', '.join(missing)}")
    if extra:
        notes.append(f"Only in {decoded_dir} ({len(extra)}): {', '.join(extra)}")
    if failed:
        notes.append(f"Failed ({len(failed)}), left out: " + "; ".join(failed))
    for row in rows:
        if row["file"] in consistency:
            row["STFT_consistency"] = consistency[row["file"]]
    names = [n for n in rows[0] if n != "file"]
    stats = {n: mean_and_ci([row[n] for row in rows if not math.isnan(row[n])]) for n in names}
    # A metric undefined on a file (the SNR of a silent reference) is named with the files.
    for name in names:
        undefined = [row["file"] for row in rows if math.isnan(row[name])]
        if undefined:
            notes.append(f"{name} is undefined for {counted(len(undefined), 'file')}, left out of its mean: "
                         f"{', '.join(undefined)}")
    if codec:
        notes.append(f"Nominal bitrate {codec['bitrate_bps']:.0f} bit/s, measured from the codes "
                     f"{codec['bitrate_measured_bps']:.0f} bit/s; RTF (encode + decode) "
                     f"{codec['rtf']:.4f} on {codec['rtf_device']} with {codec['rtf_threads']} threads.")
    summary = {"metrics": stats, "files": {"evaluated": len(rows), "failed": len(failed), "missing": missing,
                                           "extra": extra},
               "reference": args.reference, "decoded": decoded_dir, **codec}
    report = markdown_report(names, stats, notes)
    write_outputs(args.output, rows, summary, report, extremes, h.sampling_rate)
    print(report, end="")
    print(f"Wrote metrics.csv, summary.json, report.md and spectrograms.png to {args.output}")
    problems = [f"{len(failed)} file(s) could not be evaluated"] if failed else []
    if missing and not codec:
        problems.append(f"{len(missing)} reference file(s) have no decoded file")
    if problems:
        raise ValueError("; ".join(problems) + " (listed above); the means are over the rest")


def main(argv: Optional[List[str]] = None) -> None:
    run_cli(run, build_parser(), argv)


if __name__ == "__main__":
    main()
