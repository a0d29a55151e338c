"""Code audio with a trained APCodec: resynthesise, encode to codes files, or decode them.

    python inference.py [--mode resynth|encode|decode] [--config config.json] [--KEY VALUE ...]

Inputs come from `test_input_wavs_dir` (a folder, walked recursively, or a single file),
outputs go to `test_wav_output_dir` with the same relative path and name:

  resynth  (default, the release's job) wav, flac, ogg -> 16-bit PCM wav, encoded and decoded in memory
  encode   wav, flac, ogg -> .apc codes files
  decode   .apc codes files -> 16-bit PCM wav

Any sample rate and channel count: audio is resampled to the model's rate, each channel is
coded on its own, and the output returns to the input's rate (unless --keep_model_rate)
with exactly the input's length. Inputs longer than --chunk_seconds + 1 s are coded in
overlapping windows with a crossfade, so memory stays bounded (--file_statistics makes
their codes, but for rare near-ties, those of one pass over the whole input, at the cost
of one more encoder pass). All inputs are checked before anything is written. When the checkpoints were
trained with another network than the config describes, the network keys that training
recorded in them are used (for checkpoints without a record, the config.json beside them).

Resynthesis batches the files that fit one window, sorted by length, padded and masked so
that each gets exactly its own output: on a GPU each batch is one forward pass.

--precision float32 (default) computes the reference numbers; bfloat16 and int8 are faster
and approximate (LSD and mel distance within about 1% of float32's, about 99% of the codes
identical), and auto picks the one for this machine: bfloat16 on a GPU, a CPU with AMX (as
fast as int8 there, with more codes kept) or a non-x86 CPU, else int8 (faster). The line it
prints names the kernels in use. --compile fuses the work around the first product of each
ConvNeXt block in float32 and bfloat16 with torch.compile (a C++ compiler on a CPU, Triton
on a GPU): the first files wait while it compiles, and the outputs differ from the
uncompiled ones by float rounding.

With --stream (resynth mode, causal codecs: `causal: true`), each file goes through the
streaming encoder and decoder in chunks of --chunk_ms milliseconds, as a live stream
would, and gives the offline pass's files to within one 16-bit step (in float32;
--precision applies to a causal codec only when it streams).
"""
import argparse
import os
import sys
import time
from typing import Dict, List, Optional, Tuple, Union

import torch
from tqdm import tqdm

from codec import (BATCH_SECONDS, CHUNK_SECONDS, CODES_EXTENSION, FILE_ERRORS, MAX_CHUNK_MS, STREAM_CHUNK_MS, Codec,
                   CodesFile)
from config import AttrDict, make_parser, run_cli
from dataset import AUDIO_EXTENSIONS, audio_index, header_problem
from fastpath import PRECISIONS, kernels
from utils import check_output_file, check_output_folder, counted, pick_device

MODES = ("resynth", "encode", "decode")


def check_inputs(files: Dict[str, str], location: str, failed: Optional[List[str]] = None) -> Dict[str, str]:
    """The inputs whose headers read as audio with at least one sample, checked before anything
    is written; each other one is reported by path and reason (on stderr, and added to `failed`
    when given). No usable input is an error."""
    if not files:
        raise FileNotFoundError(f"no audio files ({', '.join(AUDIO_EXTENSIONS)}) in {location}")
    if os.path.isfile(location) and (problem := header_problem(location)):
        # One file given, perhaps a file list by mistake.
        hint = "" if location.lower().endswith(AUDIO_EXTENSIONS) else "; the input is an audio file or a folder of them"
        raise ValueError(f"{location}: {problem}{hint}")
    usable = {}
    for key, path in files.items():
        problem = header_problem(path)
        if problem:
            print(f"failed: {path}: {problem}", file=sys.stderr)
            if failed is not None:
                failed.append(f"{path}: {problem}")
        else:
            usable[key] = path
    if not usable:
        raise ValueError(f"no usable audio file in {location} ({len(files)} failed, listed above)")
    return usable


def check_outputs(files: Dict[str, str], target: str, extension: str, option: str = "test_wav_output_dir") -> None:
    """A one-line error, naming the output folder's `option`, when the folder (or the nearest
    folder above it that exists) is a file or cannot be written in, when an output's place is
    taken by a folder (or a file stands where its folder goes), or when an output would
    replace an input or, decoding codes files, the audio file beside a codes file (presumably
    its original): what an output folder that is, or lies inside, the input folder can do."""
    check_output_folder(target, option)

    def identity(path: str) -> Optional[Tuple[int, int]]:
        # The file itself, whatever the name's case (on file systems that ignore it) or links.
        try:
            stat = os.stat(path)
        except OSError:
            return None
        return stat.st_dev, stat.st_ino

    inputs = {identity(path) for path in files.values()}
    originals = {identity(os.path.splitext(path)[0] + audio)
                 for path in files.values() if path.lower().endswith(CODES_EXTENSION) for audio in AUDIO_EXTENSIONS}
    protected = inputs | originals
    for key in files:
        out = os.path.join(target, key + extension)
        check_output_file(out, option)
        replaced = identity(out)
        if replaced is not None and replaced in protected:
            what = ("an input file" if replaced in inputs else
                    "the audio file beside its codes file (its original, or an earlier decode's output)")
            raise ValueError(f"{option}: writing {out} would replace {what}; choose another output folder")


def check_outside(target: str, source: str, option: str, source_option: str) -> None:
    """A one-line error when the output folder `target` is, or lies inside, the input folder
    `source` and its outputs are audio: a second run would take them for inputs."""
    inner, outer = os.path.realpath(target), os.path.realpath(source)
    try:
        inside = os.path.isdir(source) and os.path.commonpath([inner, outer]) == outer
    except ValueError:      # Windows: paths on two drives
        inside = False
    if inside:
        raise ValueError(f"{option}: {target} lies inside {source_option} {source}, so a second run would take "
                         f"the wavs written there for inputs; choose a folder outside it")


def _check_codes_files(files: Dict[str, str], codec: Codec) -> None:
    """Read every codes file and check it against the model before anything is written; one
    line names the first bad one. (Each is read again when decoded: a folder of long files
    need not fit in memory.)"""
    for path in files.values():
        codec.check_compatible(CodesFile.load(path))


def check_options(mode: str, n_codebooks: Optional[int], keep_model_rate: bool, chunk_seconds: Optional[float],
                  stream_ms: Optional[float], batch_seconds: Optional[float], file_statistics: bool) -> None:
    """A one-line error for an option that does nothing in `mode` (None: not given)."""
    if mode not in MODES:
        raise ValueError(f"--mode must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "decode":
        given = [name for name, value in (("--n_codebooks", n_codebooks), ("--chunk_seconds", chunk_seconds))
                 if value is not None] + (["--file_statistics"] if file_statistics else [])
        if given:
            verb = "applies" if len(given) == 1 else "apply"
            raise ValueError(f"{', '.join(given)} {verb} to encode and resynth; a codes file records what decoding "
                             f"needs")
    if mode == "encode" and keep_model_rate:
        raise ValueError("--keep_model_rate applies when decoding (and to resynth): a codes file records the "
                         "input's rate, and --mode decode --keep_model_rate writes the model's")
    if batch_seconds is not None and (mode != "resynth" or not batch_seconds > 0):
        raise ValueError(f"--batch_seconds applies to resynth, which batches files, and must be positive "
                         f"(got {batch_seconds} with --mode {mode})")
    if stream_ms is not None and (mode != "resynth" or n_codebooks is not None):
        raise ValueError(f"--stream resynthesises with every codebook: it needs --mode resynth (got {mode}) "
                         f"and no --n_codebooks")


def inference(h: AttrDict, mode: str = "resynth", n_codebooks: Optional[int] = None,
              keep_model_rate: bool = False, chunk_seconds: Optional[float] = None,
              stream_ms: Optional[float] = None, precision: str = "float32",
              batch_seconds: Optional[float] = None, file_statistics: bool = False, compile: bool = False
              ) -> Dict[str, float]:
    """Code every input of `test_input_wavs_dir` into `test_wav_output_dir` (see the module docstring).

    `chunk_seconds`: window stride of long inputs (default CHUNK_SECONDS);
    `stream_ms`: resynthesise through the streaming codec in chunks of that many milliseconds;
    `precision`: float32, bfloat16, int8 or auto; `batch_seconds`: padded audio per resynthesis
    batch (default BATCH_SECONDS); `file_statistics`, `compile`: see `codec.Codec`. An option that does
    nothing in `mode` is an error.
    Returns the totals: files, failed, audio_seconds, wall_seconds and rtf (wall time over audio time).
    """
    check_options(mode, n_codebooks, keep_model_rate, chunk_seconds, stream_ms, batch_seconds, file_statistics)
    source, target = h.test_input_wavs_dir, h.test_wav_output_dir
    files = audio_index(source, (CODES_EXTENSION,) if mode == "decode" else AUDIO_EXTENSIONS)
    listed = len(files)
    if mode != "decode":
        files = check_inputs(files, source)
    elif not files:
        raise FileNotFoundError(f"no codes files ({CODES_EXTENSION}) in {source}")
    check_outputs(files, target, CODES_EXTENSION if mode == "encode" else ".wav")
    if mode == "resynth":
        check_outside(target, source, "test_wav_output_dir", "test_input_wavs_dir")
    start = time.perf_counter()
    codec = Codec.load(h, device=pick_device(),
                       chunk_seconds=CHUNK_SECONDS if chunk_seconds is None else chunk_seconds, precision=precision,
                       stream_ms=stream_ms, file_statistics=file_statistics, compile=compile)
    if codec.fast is not None or stream_ms is not None:
        note = "; ConvNeXt blocks compiled by torch.compile" if codec.fast is not None and codec.fast.compiled else ""
        print(f"precision {kernels(codec.precision, codec.device, stream=stream_ms is not None)}{note}")
    codec.check_n_codebooks(n_codebooks)   # before any file is coded
    if batch_seconds is not None and codec.fast is None:
        raise ValueError("--batch_seconds applies to the paper's codec, which resynthesises files in batches; a "
                         "causal codec codes them one by one")
    if mode == "decode":
        _check_codes_files(files, codec)

    def code(key: str, path: str) -> Union[float, Exception]:
        try:
            if mode == "encode":
                one = codec.encode_file(path, n_codebooks)
                one.save(os.path.join(target, key + CODES_EXTENSION))
                return one.seconds()
            return codec.decode_to_file(CodesFile.load(path), os.path.join(target, key + ".wav"), keep_model_rate)
        except FILE_ERRORS as e:
            return e

    if mode == "resynth":
        jobs = [(path, os.path.join(target, key + ".wav")) for key, path in files.items()]
        results = codec.resynthesize_files(jobs, keep_model_rate, n_codebooks,
                                           BATCH_SECONDS if batch_seconds is None else batch_seconds)
    else:
        results = ((path, code(key, path)) for key, path in files.items())
    audio_seconds, failed = 0.0, listed - len(files)
    for path, result in tqdm(results, total=len(files), desc=mode, unit="file", disable=len(files) == 1):
        if isinstance(result, Exception):
            failed += 1
            tqdm.write(f"failed: {path}: {result}", file=sys.stderr)
        else:
            audio_seconds += result
    wall = time.perf_counter() - start
    totals = {"files": listed - failed, "failed": failed, "audio_seconds": audio_seconds,
              "wall_seconds": wall, "rtf": wall / audio_seconds if audio_seconds else float("nan")}
    print(f"{mode}: {counted(totals['files'], 'file')} done, {failed} failed, {audio_seconds:.1f} s of audio, "
          f"{wall:.1f} s wall, RTF {totals['rtf']:.4f} ({codec.device.type}, {torch.get_num_threads()} threads) "
          f"-> {os.path.abspath(target)}")
    if failed:
        raise ValueError(f"{failed} of {listed} files failed (listed above)")
    return totals


def stream_chunk_ms(args: argparse.Namespace) -> Optional[float]:
    """The stream's chunk length with --stream, else None; --chunk_ms without --stream is an error."""
    if not args.stream:
        if args.chunk_ms is not None:
            raise ValueError("--chunk_ms applies only with --stream")
        return None
    return STREAM_CHUNK_MS if args.chunk_ms is None else args.chunk_ms


def add_n_codebooks_option(parser: argparse.ArgumentParser, help: str) -> None:
    """--n_codebooks N (as `args.use_codebooks`, None when not given): how many of the model's
    codebooks to code with, in place of the config key, which sizes the network."""
    parser.add_argument("--n_codebooks", type=int, default=None, metavar="N", dest="use_codebooks", help=help)


def main(argv: Optional[List[str]] = None) -> None:
    # --compile is inference's own switch; the config's compile key sets training's mode.
    parser = make_parser(__doc__, replaced=("n_codebooks", "compile"))
    add_n_codebooks_option(parser, "encode / resynth with the first N codebooks (1 ... the model's n_codebooks; "
                                   "default all): N x 1.5 kbit/s at the default settings")
    parser.add_argument("--mode", choices=MODES, default="resynth", help="what to do (default resynth)")
    parser.add_argument("--keep_model_rate", action="store_true",
                        help="write outputs at the model's sampling rate, not the input's")
    parser.add_argument("--chunk_seconds", type=float, metavar="S",
                        help="inputs longer than S seconds (+ 1 s) are coded in windows of S + 1 seconds, one "
                             f"every S seconds, crossfaded over the 1 s overlap; bounds memory (default "
                             f"{CHUNK_SECONDS:g})")
    parser.add_argument("--file_statistics", action="store_true",
                        help="inputs coded in windows: the encoder's GRN layers pool over the whole input, as "
                             "one pass would (one more pass over the encoder, about 45%% more time), so the "
                             "codes match one pass's but for rare near-ties; the paper's codec only")
    parser.add_argument("--precision", choices=PRECISIONS + ("auto",), default="float32",
                        help="float32 (default): the reference numbers; bfloat16 / int8: faster, approximate; "
                             "auto: the faster of those on this machine (a causal codec: with --stream only)")
    parser.add_argument("--compile", action="store_true", dest="compiled",
                        help="float32 / bfloat16: run each ConvNeXt block's first half (depthwise conv, "
                             "LayerNorm, first product, GELU, GRN statistics) fused by torch.compile (compiles "
                             "for about 10 s first; outputs change by float rounding)")
    parser.add_argument("--batch_seconds", type=float, metavar="S",
                        help=f"resynthesis batches hold up to S seconds of padded audio (default {BATCH_SECONDS:g})")
    parser.add_argument("--stream", action="store_true",
                        help="resynthesise through the streaming codec (causal codecs only)")
    parser.add_argument("--chunk_ms", type=float, metavar="MS",
                        help=f"stream chunk in milliseconds, with --stream (default {STREAM_CHUNK_MS:g}, at most "
                             f"{MAX_CHUNK_MS:g})")
    run_cli(lambda h, args: inference(h, args.mode, n_codebooks=args.use_codebooks,
                                      keep_model_rate=args.keep_model_rate, chunk_seconds=args.chunk_seconds,
                                      stream_ms=stream_chunk_ms(args), precision=args.precision,
                                      batch_seconds=args.batch_seconds, file_statistics=args.file_statistics,
                                      compile=args.compiled),
            parser, argv)


if __name__ == "__main__":
    main()
