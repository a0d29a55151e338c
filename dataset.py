"""Audio loading, audio-file discovery, file lists and the training / validation datasets."""
import os
import random
from typing import Dict, List

import librosa
import numpy as np
import soundfile as sf
import torch
import torch.nn.functional as F
import torch.utils.data

from spectral import amp_pha_spectrum, mel_from_spectrum, min_analysis_length

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg")


def load_audio(path: str, sampling_rate: int) -> np.ndarray:
    """Mono float32 audio at `sampling_rate`: channels averaged, resampled if needed."""
    try:
        audio, sr = sf.read(path, dtype="float32", always_2d=True)
    except Exception as e:
        raise ValueError(f"cannot read audio file {path}: {e}") from None
    audio = audio.mean(axis=1)
    if sr != sampling_rate:
        audio = librosa.resample(audio, orig_sr=sr, target_sr=sampling_rate)
    return np.ascontiguousarray(audio, dtype=np.float32)


def find_audio_files(folder: str) -> List[str]:
    """Paths of the audio files anywhere under `folder`, sorted."""
    found = []
    for root, _, names in os.walk(folder):
        found.extend(os.path.join(root, n) for n in names if n.lower().endswith(AUDIO_EXTENSIONS))
    return sorted(found)


def audio_index(location: str) -> Dict[str, str]:
    """Audio files under a folder (or one file), keyed by relative path without extension.

    The key names the file's outputs (`key + ".wav"` in an output folder that mirrors the
    input tree) and pairs files across folders; two files with the same key are an error.
    """
    if os.path.isfile(location):
        return {os.path.splitext(os.path.basename(location))[0]: location}
    if not os.path.isdir(location):
        raise FileNotFoundError(f"no such file or folder: {location}")
    index: Dict[str, str] = {}
    for path in find_audio_files(location):
        key = os.path.splitext(os.path.relpath(path, location))[0].replace(os.sep, "/")
        if key in index:
            raise ValueError(f"{index[key]} and {path} have the same name without extension")
        index[key] = path
    return index


def read_filelist(list_path: str) -> List[str]:
    """Audio paths from a list file: one per line, blank lines and `#` comments ignored.

    A relative path is used as is when it exists from the working directory (as in the
    release), otherwise it is taken relative to the list file's folder.
    """
    try:
        with open(list_path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        raise FileNotFoundError(f"file list not found: {list_path}") from None
    base = os.path.dirname(os.path.abspath(list_path))
    paths = []
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        path = line if os.path.isabs(line) or os.path.exists(line) else os.path.join(base, line)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{list_path}:{number}: audio file not found: {line}")
        paths.append(path)
    if not paths:
        raise ValueError(f"file list {list_path} names no audio files")
    return paths


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
    frames = -(-max(audio.size(-1), shortest) // hop_size) + 1
    frames = -(-frames // ratio) * ratio
    return F.pad(audio, (0, (frames - 1) * hop_size - audio.size(-1)))


def spectral_targets(audio: torch.Tensor, h) -> Dict[str, torch.Tensor]:
    """Training targets of audio (B, L): logamp, pha, real, imag (B, F, T) and mel (B, M, T)."""
    logamp, pha, real, imag = amp_pha_spectrum(audio, h.n_fft, h.hop_size, h.win_size)
    mel = mel_from_spectrum(real, imag, h.sampling_rate, h.n_fft, h.num_mels_for_loss)
    return {"logamp": logamp, "pha": pha, "real": real, "imag": imag, "mel": mel}


class AudioDataset(torch.utils.data.Dataset):
    """Waveforms (L,) from a file list: random `segment_size` crops for training (short clips
    zero-padded at the end), or whole utterances for validation.

    Features are computed from the batch on the training device (`spectral_targets`), with
    the same functions the release applies per item.
    """

    def __init__(self, files: List[str], h, train: bool):
        self.files = files
        self.h = h
        self.train = train

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> torch.Tensor:
        h = self.h
        audio = torch.from_numpy(load_audio(self.files[index], h.sampling_rate))
        if not self.train:
            return audio
        if audio.numel() >= h.segment_size:
            start = random.randint(0, audio.numel() - h.segment_size)
            return audio[start:start + h.segment_size]
        return F.pad(audio, (0, h.segment_size - audio.numel()))
