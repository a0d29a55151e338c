"""Write train / validation file lists from a folder of audio.

    python make_filelists.py AUDIO_DIR [--output_dir filelists] [--split speakers|random]
                             [--valid_fraction 0.05] [--mic mic1]

`--split speakers` holds out the test speakers of the paper's VCTK 48 kHz setup (p360,
p361, p362, p363, p364, p374, p376, s5) as the validation list and trains on every other
speaker; the speaker is the file name up to its first underscore (p225_001_mic1.flac -> p225).
`--split random` holds out a seeded random fraction of the files instead.
"""
import argparse
import os
import random
from typing import List, Optional, Sequence, Tuple

from config import one_line_exits
from dataset import AUDIO_EXTENSIONS, find_audio_files
from utils import atomic_write

VCTK_TEST_SPEAKERS = ("p360", "p361", "p362", "p363", "p364", "p374", "p376", "s5")


def find_audio(folder: str, mic: str = "") -> List[str]:
    """Absolute paths of the audio files under `folder`, sorted; with `mic`, only names containing it."""
    return [os.path.abspath(p) for p in find_audio_files(folder) if mic in os.path.basename(p)]


def speaker_of(path: str) -> str:
    return os.path.basename(path).split("_")[0]


def split_files(files: Sequence[str], how: str, valid_fraction: float = 0.05,
                valid_speakers: Sequence[str] = VCTK_TEST_SPEAKERS, seed: int = 1234) -> Tuple[List[str], List[str]]:
    """(train, valid) lists, each sorted."""
    if how == "speakers":
        held_out = set(valid_speakers)
        valid = [f for f in files if speaker_of(f) in held_out]
    else:
        count = max(1, round(len(files) * valid_fraction))
        valid = sorted(random.Random(seed).sample(list(files), count))
    chosen = set(valid)
    return [f for f in files if f not in chosen], valid


def write_list(path: str, files: Sequence[str], note: str) -> None:
    """One path per line after a `# note` line, written atomically."""
    text = f"# {note}\n" + "".join(p + "\n" for p in files)
    # A name that is not UTF-8 is written as its bytes, as read_filelist reads it back.
    atomic_write(path, lambda f: f.write(text.encode("utf-8", "surrogateescape")))


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("audio_dir", help="folder searched recursively (linked folders too) for wav, flac and ogg files")
    parser.add_argument("--output_dir", default="filelists",
                        help="where train.txt and valid.txt are written (default filelists)")
    parser.add_argument("--split", choices=("speakers", "random"), default="random",
                        help="random (default): a seeded random fraction of the files is validation; "
                             "speakers: the VCTK test speakers are validation, every other speaker trains")
    parser.add_argument("--valid_fraction", type=float, default=0.05,
                        help="with --split random, the fraction of files held out (default 0.05)")
    parser.add_argument("--mic", default="", help="keep only files whose name contains this, e.g. mic1")
    args = parser.parse_args(argv)
    with one_line_exits():
        if not os.path.isdir(args.audio_dir):
            raise ValueError(f"{args.audio_dir} is a file, not a folder of audio files"
                             if os.path.exists(args.audio_dir) else f"no such folder: {args.audio_dir}")
        if os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
            raise ValueError(f"--output_dir {args.output_dir} is a file, not a folder")
        if not 0 < args.valid_fraction < 1:
            raise ValueError(f"--valid_fraction must be between 0 and 1, got {args.valid_fraction}")
        files = find_audio(args.audio_dir, args.mic)
        if not files:
            mic = f" with '{args.mic}' in their names (--mic)" if args.mic else ""
            raise ValueError(f"no audio files ({', '.join(AUDIO_EXTENSIONS)}){mic} found under {args.audio_dir}")
        broken = next((f for f in files if "\n" in f or "\r" in f), None)
        if broken is not None:
            # A list holds one path per line: this name would come back as two wrong paths.
            raise ValueError(f"{broken!r}: a file name with a line break cannot go in a file list; rename it")
        train, valid = split_files(files, args.split, args.valid_fraction)
        if not train or not valid:
            raise ValueError(f"the {args.split} split of {args.audio_dir} leaves an empty "
                             f"{'training' if not train else 'validation'} list")
        for name, subset in (("train.txt", train), ("valid.txt", valid)):
            path = os.path.join(args.output_dir, name)
            try:
                write_list(path, subset, f"written by make_filelists.py from {os.path.abspath(args.audio_dir)}")
            except OSError as e:
                raise ValueError(f"cannot write {path}: {e.strerror}") from None
            print(f"{path}: {len(subset)} files")


if __name__ == "__main__":
    main()
