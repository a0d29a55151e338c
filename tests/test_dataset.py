"""File lists, audio loading, training crops and validation trimming."""

import numpy as np
import pytest
import soundfile as sf
import torch

from conftest import write_tone
from dataset import AudioDataset, load_audio, read_filelist, trim_for_validation


def test_filelist_format(tmp_path, monkeypatch):
    (tmp_path / "lists").mkdir()
    (tmp_path / "data").mkdir()
    a = write_tone(str(tmp_path / "data" / "a.wav"), 0.05)
    write_tone(str(tmp_path / "lists" / "b.wav"), 0.05)
    lst = tmp_path / "lists" / "train.txt"
    lst.write_text(f"# a comment\n\n{a}\n  b.wav  \n\n")
    monkeypatch.chdir(tmp_path)
    assert read_filelist(str(lst)) == [a, str(tmp_path / "lists" / "b.wav")]
    # A path that exists from the working directory is used as is (the release's behaviour).
    lst.write_text("data/a.wav\n")
    assert read_filelist(str(lst)) == ["data/a.wav"]
    lst.write_text("b.wav\nmissing.wav\n")
    with pytest.raises(FileNotFoundError, match=r"train.txt:2: .*missing.wav"):
        read_filelist(str(lst))
    lst.write_text("# nothing\n")
    with pytest.raises(ValueError, match="names no audio"):
        read_filelist(str(lst))


def test_load_audio_mono_and_resampled(tmp_path):
    left = np.linspace(-0.5, 0.5, 2400, dtype=np.float32)
    sf.write(str(tmp_path / "s.wav"), np.stack([left, -0.5 * left], axis=1), 48000, subtype="FLOAT")
    assert np.allclose(load_audio(str(tmp_path / "s.wav"), 48000), 0.25 * left, atol=1e-7)
    write_tone(str(tmp_path / "r.wav"), 0.1, sr=24000)
    assert load_audio(str(tmp_path / "r.wav"), 48000).size == 4800
    (tmp_path / "bad.wav").write_text("nope")
    with pytest.raises(ValueError, match="bad.wav"):
        load_audio(str(tmp_path / "bad.wav"), 48000)


def test_training_crops_and_padding(tmp_path, tiny_h):
    long_path = write_tone(str(tmp_path / "long.wav"), 0.5, seed=1)
    short_path = write_tone(str(tmp_path / "short.wav"), 0.05, seed=2)
    full = torch.from_numpy(load_audio(long_path, 48000))
    short = torch.from_numpy(load_audio(short_path, 48000))
    ds = AudioDataset([long_path, short_path], tiny_h, train=True)
    for _ in range(3):
        crop = ds[0]
        assert crop.shape == (tiny_h.segment_size,)
        starts = [s for s in range(full.numel() - crop.numel() + 1) if torch.equal(full[s:s + crop.numel()], crop)]
        assert starts, "a crop is a contiguous slice of the clip"
    padded = ds[1]
    assert padded.shape == (tiny_h.segment_size,)
    assert torch.equal(padded[:short.numel()], short) and not padded[short.numel():].any()


@pytest.mark.parametrize("length, expected", [(7960, 7960), (7973, 7960), (8000, 7960), (8319, 8280),
                                              (8320, 8280), (48000, 47960)])
def test_validation_trim(length, expected):
    out = trim_for_validation(torch.zeros(length), 40, 8, 1024)
    assert out.numel() == expected
    assert out.numel() % 40 == 0 and (out.numel() // 40 + 1) % 8 == 0


@pytest.mark.parametrize("length", [1, 28, 480, 599, 639])
def test_short_validation_clip_is_zero_padded_to_the_shortest_valid_length(length):
    """Trimming would leave nothing analysable (n_fft / 2 = 512 samples are needed), so the
    clip is padded instead: to 600 = (2 * 8 - 1) * 40 samples, the first length >= 520 with
    T = L / 40 + 1 a multiple of 8. 639 samples trim to 600 as the release trims."""
    audio = torch.arange(1, length + 1, dtype=torch.float32)
    out = trim_for_validation(audio, 40, 8, 1024)
    assert out.numel() == 600
    kept = min(length, 600)
    assert torch.equal(out[:kept], audio[:kept]) and not out[kept:].any()


def test_validation_dataset_returns_whole_clips(tmp_path, tiny_h):
    path = write_tone(str(tmp_path / "tiny.wav"), 0.01)
    assert AudioDataset([path], tiny_h, train=False)[0].shape == (480,)
