"""File lists and their checks, audio loading, training crops and validation trimming."""
import json
import os
import random
import time

import numpy as np
import pytest
import soundfile as sf
import torch

import dataset
from conftest import TINY, make_config, tone, write_tone
from dataset import (AudioDataset, DataCheckCache, EpochSampler, audio_problem, check_audio_files, dealing_digest,
                     find_audio_files, header_problem, load_audio, read_filelist, trim_for_validation)


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
    # Missing files are listed too; check_audio_files reports and skips them.
    lst.write_text("b.wav\nmissing.wav\n")
    assert read_filelist(str(lst))[1] == str(tmp_path / "lists" / "missing.wav")
    lst.write_text("# nothing\n")
    with pytest.raises(ValueError, match="names no audio"):
        read_filelist(str(lst))


def test_audio_in_linked_folders_is_found_once_and_a_link_loop_ends(tmp_path, capsys):
    """A corpus put together from linked speaker folders is listed whole; a folder reached
    twice is listed once, and links to the corpus or above it are not followed."""
    data, corpus = tmp_path / "data", tmp_path / "corpus"
    for speaker in ("a", "b"):
        (data / speaker).mkdir(parents=True)
        write_tone(str(data / speaker / f"{speaker}.wav"), 0.01)
    (corpus / "own").mkdir(parents=True)
    write_tone(str(corpus / "own" / "c.wav"), 0.01)
    os.symlink(data / "a", corpus / "a")
    os.symlink(data / "b", corpus / "b")
    os.symlink(data / "a", corpus / "a_again")
    os.symlink(corpus, corpus / "own" / "loop")
    os.symlink(tmp_path, corpus / "up")
    found = find_audio_files(str(corpus))
    assert [os.path.relpath(p, corpus) for p in found] == ["a/a.wav", "b/b.wav", "own/c.wav"]
    warned = capsys.readouterr().err
    assert f"not following {corpus / 'own' / 'loop'}: it links to {os.path.realpath(corpus)}" in warned
    assert f"not following {corpus / 'up'}: it links to {os.path.realpath(tmp_path)}" in warned


def test_load_audio_mono_and_resampled(tmp_path):
    left = np.linspace(-0.5, 0.5, 2400, dtype=np.float32)
    sf.write(str(tmp_path / "s.wav"), np.stack([left, -0.5 * left], axis=1), 48000, subtype="FLOAT")
    assert np.allclose(load_audio(str(tmp_path / "s.wav"), 48000), 0.25 * left, atol=1e-7)
    write_tone(str(tmp_path / "r.wav"), 0.1, sr=24000)
    assert load_audio(str(tmp_path / "r.wav"), 48000).size == 4800
    (tmp_path / "bad.wav").write_text("nope")
    with pytest.raises(ValueError, match="bad.wav"):
        load_audio(str(tmp_path / "bad.wav"), 48000)


def test_epoch_sampler_keys_ranks_and_mid_epoch_start():
    sampler = EpochSampler(7, 2)
    sampler.set_epoch(3)
    # Whole batches only (the release's drop_last), in the list's order.
    assert list(sampler) == [(3, i) for i in range(6)] and len(sampler) == 6
    sampler.set_epoch(4, start_batch=2)
    assert list(sampler) == [(4, 4), (4, 5)] and len(sampler) == 2
    # Two ranks at batch 2: each global step of 4 items is split between them.
    ranks = [EpochSampler(11, 2, rank, 2) for rank in range(2)]
    assert [[i for _, i in r] for r in ranks] == [[0, 2, 4, 6], [1, 3, 5, 7]]
    shuffled = [EpochSampler(11, 2, rank, 2, shuffle=True, seed=5) for rank in range(2)]
    for r in shuffled:
        r.set_epoch(1)
    a, b = ([i for _, i in r] for r in shuffled)
    assert len(a) == len(b) == 4 and not set(a) & set(b)


def test_training_crops_and_padding(tmp_path, tiny_h):
    long_path = write_tone(str(tmp_path / "long.wav"), 0.5, seed=1)
    short_path = write_tone(str(tmp_path / "short.wav"), 0.05, seed=2)
    full = torch.from_numpy(load_audio(long_path, 48000))
    short = torch.from_numpy(load_audio(short_path, 48000))
    ds = AudioDataset([long_path, short_path], tiny_h, train=True)
    starts = []
    for epoch in range(4):
        crop = ds[(epoch, 0)]
        assert crop.shape == (tiny_h.segment_size,)
        found = [s for s in range(full.numel() - crop.numel() + 1) if torch.equal(full[s:s + crop.numel()], crop)]
        assert found, "a crop is a contiguous slice of the clip"
        starts.append(found[0])
        # The crop is a function of (seed, epoch, index): the same key gives the same crop.
        assert torch.equal(ds[(epoch, 0)], crop)
    assert len(set(starts)) > 1, "crops move from epoch to epoch"
    padded = ds[(0, 1)]
    assert padded.shape == (tiny_h.segment_size,)
    assert torch.equal(padded[:short.numel()], short) and not padded[short.numel():].any()


@pytest.mark.parametrize("name, subtype, channels, rate", [
    ("a.wav", "PCM_16", 1, 48000), ("b.wav", "FLOAT", 2, 48000), ("c.flac", "PCM_24", 2, 48000),
    ("d.flac", "PCM_16", 1, 44100), ("e.ogg", "VORBIS", 1, 48000), ("f.wav", "GSM610", 1, 48000)])
def test_a_crop_is_the_same_whether_read_alone_or_cut_from_the_whole_file(tmp_path, tiny_h, monkeypatch, name,
                                                                          subtype, channels, rate):
    """wav and flac files at the model's rate are read one crop at a time (long files would
    otherwise be read whole for each crop); others are read whole. The crops are the same."""
    import random
    path = str(tmp_path / name)
    sf.write(path, np.random.default_rng(0).uniform(-0.5, 0.5, (rate + 17, channels)), rate, subtype=subtype)
    full = torch.from_numpy(load_audio(path, 48000))
    if rate == 48000 and subtype not in ("VORBIS", "GSM610"):
        monkeypatch.setattr(dataset, "load_audio", lambda *args: pytest.fail("read the whole file for a crop"))
    ds = AudioDataset([path], tiny_h, train=True)
    for epoch in range(3):
        start = random.Random(f"{tiny_h.seed}-{epoch}-0").randint(0, full.numel() - tiny_h.segment_size)
        assert torch.equal(ds[(epoch, 0)], full[start:start + tiny_h.segment_size])


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


def test_a_file_that_no_longer_reads_gives_way_to_the_next_and_a_gone_dataset_stops(tmp_path, tiny_h, capsys):
    """Removed or damaged after the start-up check: a training item takes the next readable
    file of the list (with the crop its own key draws), a validation item is empty; each
    says which file. When SUBSTITUTES + 1 files in a row fail, the item is an error."""
    paths = [write_tone(str(tmp_path / f"{i}.wav"), 0.2, f0=200 + 50 * i, seed=i) for i in range(3)]
    items = AudioDataset(paths, tiny_h, train=True)

    def crop_of(path, epoch, index):
        return items._training_crop(path, random.Random(f"{tiny_h.seed}-{epoch}-{index}"))

    expected = {index: crop_of(paths[1], 5, index) for index in (0, 2)}
    os.remove(paths[0])
    with open(paths[2], "r+b") as f:
        f.write(b"\0" * 64)
    # Item 0 falls to file 1; item 2 to file 0, then file 1.
    for index in (0, 2):
        assert torch.equal(items[(5, index)], expected[index])
    err = capsys.readouterr().err
    assert f"no longer reads: cannot read audio file {paths[0]}" in err and f"audio file {paths[2]}" in err
    # File 0 failed for both items and again next epoch, but is named once.
    assert torch.equal(items[(6, 0)], crop_of(paths[1], 6, 0))
    assert sum(paths[0] in line for line in err.splitlines()) == 1 and capsys.readouterr().err == ""
    assert AudioDataset(paths, tiny_h, train=False)[0].numel() == 0
    assert f"validation leaves out a file that no longer reads: cannot read audio file {paths[0]}" in \
        capsys.readouterr().err
    gone = AudioDataset([str(tmp_path / f"gone{i}.wav") for i in range(dataset.SUBSTITUTES + 1)] + paths[1:2],
                        tiny_h, train=True)
    with pytest.raises(ValueError, match="11 training files in a row no longer read, the last .*gone10.wav: is the"):
        gone[(0, 0)]
    assert torch.equal(gone[(0, 1)], crop_of(paths[1], 0, 1))


def _bad_files(folder):
    """{name: expected reason} for every kind of unusable file, written into `folder`."""
    folder.mkdir(exist_ok=True)
    full = write_tone(str(folder / "full.wav"), 0.5)
    data = open(full, "rb").read()
    (folder / "truncated.wav").write_bytes(data[:100])
    (folder / "empty.wav").write_bytes(b"")
    sf.write(folder / "no_samples.wav", np.zeros(0, np.float32), 48000)
    (folder / "text.wav").write_text("this is not audio\n")
    nan = tone(0.1)
    nan[100] = np.nan
    sf.write(folder / "nan.wav", nan, 48000, subtype="FLOAT")
    sf.write(folder / "silent.wav", np.zeros(4800, np.float32), 48000)
    return {"missing.wav": "file not found", "truncated.wav": "truncated", "empty.wav": "unreadable",
            "no_samples.wav": "holds no samples", "text.wav": "unreadable", "nan.wav": "NaN or infinite",
            "silent.wav": "silent"}


def test_every_kind_of_bad_file_is_named_with_its_reason(tmp_path):
    expected = _bad_files(tmp_path)
    for name, reason in expected.items():
        problem, _ = audio_problem(str(tmp_path / name))
        assert problem is not None and reason in problem, (name, problem)
    assert audio_problem(str(tmp_path / "full.wav")) == (None, 0.5)


def test_a_cut_off_flac_is_truncated_and_streamed_or_whole_files_are_not(tmp_path):
    audio = tone(0.5)
    for fmt in ("FLAC", "OGG", "WAV"):
        sf.write(tmp_path / f"whole.{fmt.lower()}", audio, 48000, format=fmt)
        assert header_problem(str(tmp_path / f"whole.{fmt.lower()}")) is None, fmt
    sf.write(tmp_path / "gsm.wav", audio, 8000, subtype="GSM610")   # a codec that cannot seek
    assert header_problem(str(tmp_path / "gsm.wav")) is None
    # A FLAC header states the length; a copy cut in half still promises all 24000 samples.
    data = (tmp_path / "whole.flac").read_bytes()
    (tmp_path / "cut.flac").write_bytes(data[:len(data) // 2])
    assert sf.info(str(tmp_path / "cut.flac")).frames == 24000
    problem = header_problem(str(tmp_path / "cut.flac"))
    assert problem.startswith("truncated") and "24000 samples" in problem and "\n" not in problem
    assert audio_problem(str(tmp_path / "cut.flac"))[0] == problem
    # A FLAC written as a stream may leave its length (36 bits of STREAMINFO) at 0, "unknown".
    streamed = bytearray(data)
    streamed[21] &= 0xF0
    streamed[22:26] = bytes(4)
    (tmp_path / "open.flac").write_bytes(bytes(streamed))
    assert header_problem(str(tmp_path / "open.flac")).startswith("has no length in its header")
    # A WAV written as a stream says "size unknown" (0xFFFFFFFF) and holds every sample.
    wav = bytearray((tmp_path / "whole.wav").read_bytes())
    assert wav[36:40] == b"data"
    wav[4:8] = wav[40:44] = b"\xff\xff\xff\xff"
    (tmp_path / "streamed.wav").write_bytes(bytes(wav))
    assert header_problem(str(tmp_path / "streamed.wav")) is None
    assert audio_problem(str(tmp_path / "streamed.wav")) == (None, 0.5)


def test_a_damaged_cache_file_only_costs_a_new_read(tmp_path):
    paths = [write_tone(str(tmp_path / f"{name}.wav"), 0.1) for name in "ab"]
    cache_path = tmp_path / "cache.json"
    check_audio_files(paths, "list.txt", 0.05, False, DataCheckCache(str(cache_path)))
    entries = json.loads(cache_path.read_text())
    assert DataCheckCache(str(cache_path)).get(paths[1]) == (None, 0.1)
    entries[os.path.abspath(paths[0])] = 5
    entries[os.path.abspath(paths[1])][0] = "stamp"
    for damaged in (entries, [1, 2], "text", None):
        cache_path.write_text(json.dumps(damaged))
        cache = DataCheckCache(str(cache_path))
        assert cache.get(paths[0]) is None and cache.get(paths[1]) is None
        assert check_audio_files(paths, "list.txt", 0.05, False, cache) == paths
    cache_path.write_bytes(b"\xff\xfe not json")
    assert DataCheckCache(str(cache_path)).entries == {}


def test_check_skips_bad_files_reports_them_and_caches(tmp_path, capsys):
    expected = _bad_files(tmp_path / "w")
    paths = [str(tmp_path / "w" / n) for n in ["full.wav", *expected]]
    cache_path = str(tmp_path / "cache.json")
    good = check_audio_files(paths, "list.txt", 0.2, False, DataCheckCache(cache_path))
    assert good == [paths[0]]
    out = capsys.readouterr().out
    for name, reason in expected.items():
        assert f"skipping {tmp_path / 'w' / name}: " in out and reason in out.split(name + ": ")[1].split("\n")[0]
    # A second check reads only the files that could not be opened (the cause may have passed,
    # e.g. permissions); every other result comes from the cache (size and mtime unchanged).
    cache = DataCheckCache(cache_path)
    reopened = {str(tmp_path / "w" / name) for name, reason in expected.items() if reason == "unreadable"}
    assert reopened and all((cache.get(p) is None) == (p in reopened) for p in paths if os.path.exists(p))
    # So does a cache of an earlier version, which kept them.
    with open(cache_path, "w") as f:
        json.dump({**cache.entries, **{p: [DataCheckCache._stamp(p), "unreadable (Permission denied)", 0.0]
                                       for p in reopened}}, f)
    assert all(DataCheckCache(cache_path).get(p) is None for p in reopened)
    original = dataset.audio_problem

    def read_only_missing(path):
        assert not os.path.exists(path) or path in reopened, f"re-read {path}"
        return original(path)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(dataset, "audio_problem", read_only_missing)
        assert check_audio_files(paths[:3], "list.txt", 0.2, False, cache) == [paths[0]]
    # A changed file is read again, and what it now holds decides.
    sf.write(paths[0], np.zeros(4800, np.float32), 48000)
    os.utime(paths[0], ns=(1, 1))
    assert cache.get(paths[0]) is None
    read = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(dataset, "audio_problem", lambda path: read.append(path) or original(path))
        with pytest.raises(ValueError, match="no usable audio file"):
            check_audio_files(paths[:1], "list.txt", 0.2, False, cache)
    assert read == [paths[0]]


def test_a_check_stopped_part_way_keeps_what_it_found(tmp_path, monkeypatch):
    """A run stopped (Ctrl-C) during its first data check keeps what the check found so far,
    long before the check's next periodic save: the next start does not read those files again."""
    paths = []
    for i in range(4):
        paths.append(str(tmp_path / f"{i}.wav"))
        write_tone(paths[-1], 0.1, seed=i)
    original = dataset.audio_problem

    def stopped_at_the_third(path):
        if path == paths[2]:
            raise KeyboardInterrupt
        return original(path)
    monkeypatch.setattr(dataset, "audio_problem", stopped_at_the_third)
    cache_path = str(tmp_path / "cache.json")
    with pytest.raises(KeyboardInterrupt):
        check_audio_files(paths, "list.txt", 0.2, False, DataCheckCache(cache_path), workers=1)
    cache = DataCheckCache(cache_path)
    assert [cache.get(p) is not None for p in paths] == [True, True, False, False]


def test_a_check_stopped_part_way_reads_no_more_files(tmp_path, monkeypatch):
    """Ctrl-C while the check waits for a result: the files still queued are dropped, not read
    before the run stops."""
    paths = []
    for i in range(12):
        paths.append(str(tmp_path / f"{i}.wav"))
        write_tone(paths[-1], 0.05, seed=i)
    original, read = dataset.audio_problem, []

    def slow(path):
        read.append(path)
        time.sleep(0.1)
        return original(path)

    def stopped_at_the_third(results, **kwargs):
        for i, result in enumerate(results):
            if i == 2:
                raise KeyboardInterrupt
            yield result
    monkeypatch.setattr(dataset, "audio_problem", slow)
    monkeypatch.setattr(dataset, "tqdm", stopped_at_the_third)
    with pytest.raises(KeyboardInterrupt):
        check_audio_files(paths, "list.txt", 0.2, False, DataCheckCache(str(tmp_path / "cache.json")), workers=1)
    assert len(read) <= 6


def test_strict_mode_and_lists_without_usable_files_fail(tmp_path):
    expected = _bad_files(tmp_path)
    paths = [str(tmp_path / n) for n in ["full.wav", "silent.wav"]]
    with pytest.raises(ValueError, match="silent.wav: is silent.*strict_data is on"):
        check_audio_files(paths, "list.txt", 0.2, True, DataCheckCache(None))
    with pytest.raises(ValueError, match="list.txt: no usable audio file among its 2 entries"):
        check_audio_files([str(tmp_path / n) for n in list(expected)[:2]], "list.txt", 0.2, False,
                          DataCheckCache(None))


@pytest.mark.parametrize("read_alone", [True, False])
def test_crops_start_anywhere_in_the_clip(tmp_path, tiny_h, monkeypatch, read_alone):
    """A clip one sample longer than a segment has two crops, and the epochs draw both: at 0 and
    at 1 (read alone from the wav, and cut from the whole file as resampled or Ogg files are)."""
    if not read_alone:
        monkeypatch.setattr(AudioDataset, "_read_crop", lambda self, path, draw: None)
    audio = np.random.default_rng(0).uniform(-0.5, 0.5, tiny_h.segment_size + 1).astype(np.float32)
    sf.write(tmp_path / "a.wav", audio, tiny_h.sampling_rate, subtype="FLOAT")
    ds = AudioDataset([str(tmp_path / "a.wav")], tiny_h, train=True)
    starts = set()
    for epoch in range(40):
        crop = ds[(epoch, 0)].numpy()
        start = [s for s in (0, 1) if np.array_equal(crop, audio[s:s + tiny_h.segment_size])]
        assert len(start) == 1
        starts.add(start[0])
    assert starts == {0, 1}


def test_training_targets_and_encoder_inputs_are_the_analyses_of_the_audio(tiny_h):
    """The targets are the reflect-padded spectra and the loss mel (both checked against numpy
    and librosa elsewhere); the paper's encoder reads those spectra, the causal one the
    zero-padded analysis that a stream sees."""
    from spectral import amp_pha_spectrum, mel_spectrogram
    h = tiny_h
    torch.manual_seed(0)
    audio = torch.randn(2, h.segment_size) * 0.1
    ref = dataset.spectral_targets(audio, h)
    for name, expected in zip(("logamp", "pha", "real", "imag"), amp_pha_spectrum(audio, h.n_fft, h.hop_size,
                                                                                   h.win_size)):
        assert torch.equal(ref[name], expected), name
    mel = mel_spectrogram(audio, h.sampling_rate, h.n_fft, h.num_mels_for_loss, h.hop_size, h.win_size)
    assert ref["mel"].shape == mel.shape and torch.allclose(ref["mel"], mel, rtol=1e-5, atol=1e-5)
    assert all(a is b for a, b in zip(dataset.encoder_input(audio, ref, h), (ref["logamp"], ref["pha"])))
    causal = make_config(**dict(TINY, causal=True))
    streamed = amp_pha_spectrum(audio, h.n_fft, h.hop_size, h.win_size, pad="zeros")[:2]
    for got, expected, reflected in zip(dataset.encoder_input(audio, ref, causal), streamed, (ref["logamp"], ref["pha"])):
        assert torch.equal(got, expected) and not torch.allclose(got[..., 0], reflected[..., 0])


def test_the_dealing_digest_follows_order_and_shuffling_not_where_the_dataset_lies(monkeypatch):
    files = ["/data/a/x.wav", "/data/a/y.wav", "/data/b/z.wav"]
    digest = dealing_digest(files, False)
    assert dealing_digest([f.replace("/data", "/mnt/copy") for f in files], False) == digest
    assert dealing_digest(files[::-1], False) != digest
    assert dealing_digest(files[:2], False) != digest
    assert dealing_digest(files, True) != digest

    def two_drives(paths):
        raise ValueError("Paths don't have the same drive")
    monkeypatch.setattr(dataset.os.path, "commonpath", two_drives)
    assert dealing_digest(files, False) != dealing_digest(files[::-1], False)


def test_lists_from_windows_editors_and_names_with_unusual_line_characters(tmp_path):
    """A UTF-8 byte order mark is not part of the first path; a UTF-16 list (NUL bytes) is one
    line naming it; characters that str.splitlines would break at stay in their names."""
    odd = str(tmp_path / "a\u2028b\x1cc.wav")
    plain = write_tone(str(tmp_path / "plain.wav"), 0.1)
    write_tone(odd, 0.1)
    listed = tmp_path / "bom.txt"
    listed.write_bytes(b"\xef\xbb\xbf" + f"{plain}\r\n{odd}\r\n".encode())
    assert dataset.read_filelist(str(listed)) == [plain, odd]
    wide = tmp_path / "wide.txt"
    wide.write_bytes(f"{plain}\n".encode("utf-16"))
    with pytest.raises(ValueError, match=f"^file list {wide} is not UTF-8 text"):
        dataset.read_filelist(str(wide))


def test_a_wav_whose_length_a_streaming_writer_left_open_is_not_truncated(tmp_path):
    """sox (0x7FFFF000) and arecord (0x7FFFFFFF) write a placeholder data size when the length
    is unknown; libsndfile reads what the file holds. A smaller size that the file does not
    hold is a truncation."""
    path = str(tmp_path / "stream.wav")
    sf.write(path, tone(0.2), 48000, subtype="PCM_16")
    data = bytearray(open(path, "rb").read())
    assert data[36:40] == b"data"
    for size, problem in ((0x7FFFF000, None), (0x7FFFFFFF, None), (len(data) - 44 + 2, "truncated")):
        data[40:44] = size.to_bytes(4, "little")
        data[4:8] = min(size + 36, 0xFFFFFFFF).to_bytes(4, "little")
        open(path, "wb").write(bytes(data))
        found = dataset.header_problem(path)
        assert (found or "").startswith(problem or ""), (hex(size), found)
        assert (found is None) == (problem is None)


def test_a_folder_that_cannot_be_listed_is_named(tmp_path, monkeypatch):
    """os.walk passes over a folder it cannot list unless told otherwise: its files would be
    left out of the lists without a word."""
    (tmp_path / "locked").mkdir()
    write_tone(str(tmp_path / "locked" / "a.wav"), 0.1)
    listing = os.scandir

    def denied(path="."):
        if os.path.basename(str(path)) == "locked":
            raise PermissionError(13, "Permission denied", str(path))
        return listing(path)
    monkeypatch.setattr(os, "scandir", denied)
    with pytest.raises(ValueError, match=f"^cannot list the folder {tmp_path / 'locked'}: Permission denied$"):
        dataset.find_audio_files(str(tmp_path))
