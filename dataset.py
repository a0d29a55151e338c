"""Audio loading, audio-file discovery, file lists and their checks, and the training / validation datasets."""
import hashlib
import json
import os
import random
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, Iterator, List, Optional, Sequence, Set, Tuple, Union

import librosa
import numpy as np
import soundfile as sf
import torch
import torch.nn.functional as F
import torch.utils.data
from tqdm import tqdm

from config import AttrDict
from spectral import amp_pha_spectrum, analysis_frames, mel_from_spectrum, min_analysis_length
from utils import atomic_write, counted, first_line

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg")
# How often a long check of the data saves what it has found, so a run stopped during its
# first start does not read those files again.
CACHE_SAVE_SECONDS = 60.0


def sound_file(path: str) -> Union[str, bytes]:
    """`path` as soundfile can open it. On POSIX soundfile encodes a str path strictly in the
    file system's encoding, which fails for a name that is not in it (Python keeps its bytes
    as surrogates), so such a name goes as its bytes. Windows opens str paths as they are."""
    if os.name == "nt":
        return path
    try:
        path.encode(sys.getfilesystemencoding())
    except UnicodeEncodeError:
        return os.fsencode(path)
    return path


def load_audio(path: str, sampling_rate: int) -> np.ndarray:
    """Mono float32 audio at `sampling_rate`: channels averaged, resampled if needed."""
    try:
        audio, sr = sf.read(sound_file(path), dtype="float32", always_2d=True)
    except Exception as e:
        raise ValueError(f"cannot read audio file {path}: {e}") from None
    if not np.isfinite(audio).all():
        raise ValueError(f"audio file {path} has NaN or infinite samples")
    audio = audio.mean(axis=1)
    if sr != sampling_rate:
        audio = librosa.resample(audio, orig_sr=sr, target_sr=sampling_rate)
    return np.ascontiguousarray(audio, dtype=np.float32)


def find_audio_files(folder: str, extensions: Sequence[str] = AUDIO_EXTENSIONS) -> List[str]:
    """Paths of the audio files (or of other `extensions`) anywhere under `folder`, sorted.

    Symbolic links to folders are followed (corpora are often put together from linked
    speaker folders). A folder already visited, through a link or not, is not walked again,
    and a link to `folder` itself or to a folder above it is not followed (with a warning):
    it would loop, or list files outside `folder`."""
    def unlisted(error: OSError) -> None:
        # A folder skipped without a word would leave its files out of the lists silently.
        raise ValueError(f"cannot list the folder {error.filename}: {error.strerror}")

    found, visited = [], set()
    top = os.path.realpath(folder)
    for root, folders, names in os.walk(folder, onerror=unlisted, followlinks=True):
        real = os.path.realpath(root)
        if root != folder and os.path.commonpath([real, top]) == real:
            print(f"warning: not following {root}: it links to {real}, which holds {folder}", file=sys.stderr)
            folders.clear()
            continue
        if real in visited:
            folders.clear()
            continue
        visited.add(real)
        folders.sort()      # which of two names of one folder is listed must not depend on the disk
        found.extend(os.path.join(root, n) for n in names if n.lower().endswith(tuple(extensions)))
    return sorted(found)


def audio_index(location: str, extensions: Sequence[str] = AUDIO_EXTENSIONS) -> Dict[str, str]:
    """Audio files (or files of other `extensions`) under a folder, or one file, keyed by
    relative path without extension.

    The key names the file's outputs (`key + ".wav"` in an output folder that mirrors the
    input tree) and pairs files across folders; two files with the same key are an error.
    """
    if os.path.isfile(location):
        return {os.path.splitext(os.path.basename(location))[0]: location}
    if not os.path.isdir(location):
        raise FileNotFoundError(f"no such file or folder: {location}")
    index: Dict[str, str] = {}
    for path in find_audio_files(location, extensions):
        key = os.path.splitext(os.path.relpath(path, location))[0].replace(os.sep, "/")
        if key in index:
            raise ValueError(f"{index[key]} and {path} have the same name without extension")
        index[key] = path
    return index


def read_filelist(list_path: str) -> List[str]:
    """Audio paths from a list file: one per line, blank lines and `#` comments ignored.

    A relative path is used as is when it exists from the working directory (as in the
    release), otherwise it is taken relative to the list file's folder. Whether the files
    exist and hold usable audio is `check_audio_files`' business.
    """
    try:
        # Bytes that are not UTF-8 are kept as they are: they name files whose names are not.
        # A byte order mark (lists saved by Windows editors) is not part of the first line.
        with open(list_path, encoding="utf-8-sig", errors="surrogateescape") as f:
            text = f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"file list not found: {list_path}") from None
    except OSError as e:
        raise ValueError(f"cannot read file list {list_path}: {e}") from None
    if "\0" in text:
        raise ValueError(f"file list {list_path} is not UTF-8 text (it holds NUL characters: UTF-16?)")
    base = os.path.dirname(os.path.abspath(list_path))
    paths = []
    # Lines end at "\n", "\r\n" and "\r" (universal newlines) alone: other characters that
    # str.splitlines takes for line breaks can be part of a file name.
    for line in text.split("\n"):
        line = line.strip()
        if line and not line.startswith("#"):
            paths.append(line if os.path.isabs(line) or os.path.exists(line) else os.path.join(base, line))
    if not paths:
        raise ValueError(f"file list {list_path} names no audio files")
    return paths


# The problem of a file that could not be opened or read (the reason follows in brackets).
UNREADABLE = "unreadable"
# libsndfile's frame count for a file whose header leaves the length open (its largest count).
_UNKNOWN_LENGTH = 2 ** 63 - 1
# libsndfile's report on a WAV whose data chunk is shorter than its header says.
_TRUNCATED = re.compile(r"^data : (\d+) \(should be (\d+)\)", re.MULTILINE)


def _length_left_open(data_bytes: int) -> bool:
    """Whether a WAV header's data size is a placeholder of a writer that streams (its length
    was unknown), not a length: 0, 0xFFFFFFFF, or close to 2 GiB (sox writes 0x7FFFF000,
    arecord 0x7FFFFFFF). libsndfile then reads what the file holds."""
    return data_bytes == 0 or data_bytes >= 0xFFFFFFF0 or 0x7FFF0000 <= data_bytes <= 0x7FFFFFFF


def header_problem(path: str) -> Optional[str]:
    """Why `path` is not readable audio judging by its header, or None. Reads only its last sample."""
    if not os.path.isfile(path):
        return "file not found"
    try:
        audio = sf.SoundFile(sound_file(path))
    except Exception as e:
        return f"{UNREADABLE} ({first_line(e)})"
    with audio:
        if audio.frames < 1:
            return "holds no samples"
        if audio.frames >= _UNKNOWN_LENGTH:
            return "has no length in its header (a FLAC written as a stream), which libsndfile cannot read; re-encode it"
        truncated = _TRUNCATED.search(audio.extra_info)
        if truncated and not _length_left_open(int(truncated.group(1))):
            return (f"truncated (its header promises {truncated.group(1)} bytes of audio, "
                    f"the file holds {truncated.group(2)})")
        if not audio.seekable():    # a few codecs (e.g. GSM 6.10): a full read finds a cut
            return None
        # A FLAC header states its length, which a cut-off file does not hold; seeking to the
        # last sample decodes a frame or two and finds that without reading the rest.
        try:
            audio.seek(audio.frames - 1)
            readable = len(audio.read(1, dtype="float32")) == 1
        except Exception:
            readable = False
        if not readable:
            return f"truncated (its header promises {audio.frames} samples, the last cannot be read)"
    return None


def audio_problem(path: str) -> Tuple[Optional[str], float]:
    """(why `path` cannot be trained on, or None; its duration in seconds).

    Reads the whole file once: a header alone hides NaN samples and silence.
    """
    problem = header_problem(path)
    if problem:
        return problem, 0.0
    try:
        audio, sr = sf.read(sound_file(path), dtype="float32", always_2d=True)
    except Exception as e:
        return f"{UNREADABLE} ({first_line(e)})", 0.0
    seconds = audio.shape[0] / sr
    if not np.isfinite(audio).all():
        return "has NaN or infinite samples", seconds
    if not audio.any():
        return "is silent (every sample is zero)", seconds
    return None, seconds


class DataCheckCache:
    """Results of `audio_problem` by path, valid while the file's size and mtime are unchanged
    (a file that could not be opened is checked again next time).

    Stored as JSON (atomically) so that a restarted run does not read a large corpus again.
    """

    def __init__(self, path: Optional[str]):
        self.path = path
        self.entries: Dict[str, list] = {}
        if path and os.path.isfile(path):
            try:
                with open(path, encoding="utf-8") as f:
                    loaded = json.load(f)
            except (OSError, ValueError):
                loaded = {}
            # A damaged or foreign file costs a new read of what it holds wrongly, not the run.
            if isinstance(loaded, dict):
                self.entries = {key: entry for key, entry in loaded.items()
                                if self._well_formed(entry) and self._kept(entry[1])}

    @staticmethod
    def _well_formed(entry: Any) -> bool:
        """Whether `entry` is [[size, mtime_ns], problem or None, seconds], as `put` stores it."""
        return (isinstance(entry, list) and len(entry) == 3 and isinstance(entry[0], list)
                and isinstance(entry[1], (str, type(None))) and isinstance(entry[2], (int, float)))

    @staticmethod
    def _kept(problem: Optional[str]) -> bool:
        """Whether a result is cached: not when the file could not be opened, since the cause
        may pass (permissions, a network file system's error) without changing its size or
        mtime, and opening fails fast. (Caches of earlier versions hold such results too.)"""
        return not (problem or "").startswith(UNREADABLE)

    @staticmethod
    def _stamp(path: str) -> Optional[List[int]]:
        try:
            st = os.stat(path)
        except (OSError, ValueError):   # ValueError: a NUL in the name
            return None
        return [st.st_size, st.st_mtime_ns]

    def get(self, path: str) -> Optional[Tuple[Optional[str], float]]:
        entry = self.entries.get(os.path.abspath(path))
        stamp = self._stamp(path)
        if entry is None or stamp is None or entry[0] != stamp:
            return None
        return entry[1], entry[2]

    def put(self, path: str, result: Tuple[Optional[str], float]) -> None:
        if not self._kept(result[0]):
            return
        stamp = self._stamp(path)
        if stamp is not None:
            self.entries[os.path.abspath(path)] = [stamp, *result]

    def save(self) -> None:
        if self.path:
            text = json.dumps(self.entries)
            atomic_write(self.path, lambda f: f.write(text.encode()))


def check_audio_files(paths: List[str], list_path: str, segment_seconds: float, strict: bool,
                      cache: DataCheckCache, workers: int = 4) -> List[str]:
    """The usable files of a list, after reading each once (in parallel, cached).

    Bad files (missing, unreadable, empty, NaN/Inf, silent) are reported by path and reason
    and left out, or stop the run when `strict`. Clips shorter than a training segment are
    kept (they are zero-padded, as in the release) and counted in the report.
    """
    results: Dict[str, Tuple[Optional[str], float]] = {}
    todo = []
    for path in paths:
        cached = cache.get(path)
        if cached is None:
            todo.append(path)
        else:
            results[path] = cached
    if todo:
        saved = time.monotonic()
        pool = ThreadPoolExecutor(max(1, workers))
        try:
            for path, result in zip(todo, tqdm(pool.map(audio_problem, todo), total=len(todo),
                                               desc=f"checking {os.path.basename(list_path)}", unit="file",
                                               leave=False)):
                results[path] = result
                cache.put(path, result)
                if time.monotonic() - saved > CACHE_SAVE_SECONDS:
                    cache.save()
                    saved = time.monotonic()
        finally:
            # Also when stopped (Ctrl-C): what was checked is kept, and the files still
            # queued are not read first.
            pool.shutdown(cancel_futures=True)
            cache.save()
    bad = [(path, results[path][0]) for path in paths if results[path][0]]
    if bad and strict:
        raise ValueError(f"{list_path}: {len(bad)} unusable file(s), e.g. {bad[0][0]}: {bad[0][1]} "
                         f"(strict_data is on; set it to false to skip them)")
    for path, problem in bad:
        print(f"warning: {list_path}: skipping {path}: {problem}")
    good = [path for path in paths if not results[path][0]]
    if not good:
        raise ValueError(f"{list_path}: no usable audio file among its {len(paths)} entries")
    short = sum(results[path][1] < segment_seconds for path in good)
    seconds = sum(results[p][1] for p in good)
    amount = f"{seconds / 3600:.2f} h" if seconds >= 360 else f"{seconds / 60:.1f} min"
    print(f"{list_path}: {counted(len(good), 'usable file')} ({amount}), "
          f"{len(bad)} skipped" + (f", {short} shorter than a training segment (zero-padded)" if short else ""))
    return good


def trim_for_validation(audio: torch.Tensor, hop_size: int, ratio: int, n_fft: int) -> torch.Tensor:
    """Trim (..., L) to a whole number of hops with T = L / hop + 1 a multiple of `ratio`.

    The decoder then returns exactly L samples, as in the release's validation. A clip too
    short for that trim to leave an analysable signal is zero-padded instead, to the
    shortest such length.
    """
    length = audio.size(-1) // hop_size * hop_size
    frames = length // hop_size + 1
    if frames % ratio:
        length = (frames // ratio * ratio - 1) * hop_size
    shortest = min_analysis_length(n_fft, hop_size)
    if length >= shortest:
        return audio[..., :length]
    frames = -(-analysis_frames(audio.size(-1), n_fft, hop_size) // ratio) * ratio
    return F.pad(audio, (0, (frames - 1) * hop_size - audio.size(-1)))


def spectral_targets(audio: torch.Tensor, h: AttrDict) -> Dict[str, torch.Tensor]:
    """Training targets of audio (B, L): logamp, pha, real, imag (B, F, T) and mel (B, M, T)."""
    logamp, pha, real, imag = amp_pha_spectrum(audio, h.n_fft, h.hop_size, h.win_size)
    mel = mel_from_spectrum(real, imag, h.sampling_rate, h.n_fft, h.num_mels_for_loss)
    return {"logamp": logamp, "pha": pha, "real": real, "imag": imag, "mel": mel}


def encoder_input(audio: torch.Tensor, ref: Dict[str, torch.Tensor], h: AttrDict) -> Tuple[torch.Tensor, torch.Tensor]:
    """The encoder's logamp and pha (B, F, T) for audio (B, L) whose targets are `ref`.

    The paper's model reads the targets themselves. The causal model's analysis pads with
    zeros: reflect padding would fold later samples into the first frames.
    """
    if not h.causal:
        return ref["logamp"], ref["pha"]
    logamp, pha, _, _ = amp_pha_spectrum(audio, h.n_fft, h.hop_size, h.win_size, pad="zeros")
    return logamp, pha


class EpochSampler(torch.utils.data.Sampler):
    """Training keys (epoch, index) of one epoch for one rank, from a given batch on.

    The order is the list's own (the release's fixed order), or with `shuffle` a permutation
    seeded by seed + epoch, the same on every rank. Whole steps of batch_size x world_size
    items are kept, and rank r takes every world_size-th of them, so that one step of all
    ranks covers the items of one single-process step at the global batch. The epoch
    travels with each index to the data workers (which keep their own copy of the dataset),
    and starting at any batch lets a resumed run continue mid-epoch exactly.
    """

    def __init__(self, size: int, batch_size: int, rank: int = 0, world_size: int = 1, shuffle: bool = False,
                 seed: int = 0):
        self.size, self.batch_size, self.rank, self.world_size = size, batch_size, rank, world_size
        self.shuffle, self.seed = shuffle, seed
        self.epoch = self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def indices(self) -> List[int]:
        """This rank's list indices of the epoch, in order (all batches, from the first)."""
        order = list(range(self.size))
        if self.shuffle:
            random.Random(self.seed + self.epoch).shuffle(order)
        steps = self.size // (self.batch_size * self.world_size)
        return order[:steps * self.batch_size * self.world_size][self.rank::self.world_size]

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        return ((self.epoch, i) for i in self.indices()[self.start_batch * self.batch_size:])

    def __len__(self) -> int:
        return max(0, len(self.indices()) - self.start_batch * self.batch_size)


def dealing_digest(files: List[str], shuffle: bool) -> str:
    """A fingerprint of how `EpochSampler` deals `files` (in this order, reshuffled every epoch
    or not): a run resumed mid-epoch continues the epoch's dealing only while it matches.
    Paths count from their common folder, so a dataset moved whole (another mount) matches."""
    absolute = [os.path.abspath(f) for f in files]
    try:
        root = os.path.commonpath([os.path.dirname(f) for f in absolute])
        named = [os.path.relpath(f, root) for f in absolute]
    except ValueError:  # files on two Windows drives
        named = absolute
    return hashlib.sha256(json.dumps([shuffle, named]).encode()).hexdigest()[:16]


# How many files after one that no longer reads a training item tries: a few damaged files
# are skipped, but a dataset that has gone (an unmounted disk) stops the run.
SUBSTITUTES = 10


class AudioDataset(torch.utils.data.Dataset):
    """Waveforms (L,) from a file list: random `segment_size` crops for training (short clips
    zero-padded at the end), or whole utterances for validation.

    Training items are looked up by (epoch, index) keys (`EpochSampler`): the crop position
    is drawn from a generator seeded by the seed, epoch and index, so it does not depend on
    which worker reads the file or on where a run was resumed. Features are computed from
    the batch on the training device (`spectral_targets`), with the same functions the
    release applies per item.
    """

    def __init__(self, files: List[str], h: AttrDict, train: bool):
        self.files = files
        self.h = h
        self.train = train
        # Paths already warned about: a bad file comes up every epoch, and one line is enough.
        self.warned: Set[str] = set()

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, key: Union[Tuple[int, int], int]) -> torch.Tensor:
        """A training crop (segment_size,), or a whole validation utterance (L,).

        The start-up check read every file, but one can be removed or damaged later in the
        run: a training item then takes the next readable file of the list, and a validation
        item is empty (left out); each says so in a line, once per file (and data worker).
        """
        if not self.train:
            try:
                return torch.from_numpy(load_audio(self.files[key], self.h.sampling_rate))
            except ValueError as e:
                self._warn(self.files[key], f"validation leaves out a file that no longer reads: {e}")
                return torch.zeros(0)
        epoch, index = key
        for offset in range(SUBSTITUTES + 1):
            path = self.files[(index + offset) % len(self.files)]
            try:
                return self._training_crop(path, random.Random(f"{self.h.seed}-{epoch}-{index}"))
            except ValueError as e:
                self._warn(path, f"training takes the next file of the list in place of one that no longer reads: "
                                 f"{e}")
        raise ValueError(f"{SUBSTITUTES + 1} training files in a row no longer read, the last {path}: "
                         f"is the dataset still where it was at start-up?")

    def _warn(self, path: str, message: str) -> None:
        if path not in self.warned:
            self.warned.add(path)
            print(f"warning: {message} (said once for this file)", file=sys.stderr)

    def _training_crop(self, path: str, draw: random.Random) -> torch.Tensor:
        """A random `segment_size` crop of `path` (zero-padded when shorter)."""
        h = self.h
        crop = self._read_crop(path, draw)
        if crop is not None:
            return crop
        audio = torch.from_numpy(load_audio(path, h.sampling_rate))
        if audio.numel() >= h.segment_size:
            start = draw.randint(0, audio.numel() - h.segment_size)
            return audio[start:start + h.segment_size]
        return F.pad(audio, (0, h.segment_size - audio.numel()))

    def _read_crop(self, path: str, draw: random.Random) -> Optional[torch.Tensor]:
        """The training crop read alone from a wav or flac file at the model's rate and at least
        a segment long: the samples that reading the whole file would give there. None, with
        nothing drawn from `draw`, for other files, which are read whole (resampling needs the
        whole signal, Ogg seeks approximately, and some wav codecs, such as GSM 6.10, cannot
        seek)."""
        segment = self.h.segment_size
        try:
            with sf.SoundFile(sound_file(path)) as f:
                if (f.format not in ("WAV", "WAVEX", "FLAC") or not f.seekable()
                        or f.samplerate != self.h.sampling_rate or f.frames < segment):
                    return None
                f.seek(draw.randint(0, f.frames - segment))
                block = f.read(segment, dtype="float32", always_2d=True)
        except Exception as e:
            raise ValueError(f"cannot read audio file {path}: {e}") from None
        if block.shape[0] != segment or not np.isfinite(block).all():
            raise ValueError(f"audio file {path}: cannot read {segment} samples from its middle, or they are "
                             f"not finite")
        return torch.from_numpy(np.ascontiguousarray(block.mean(axis=1), dtype=np.float32))
