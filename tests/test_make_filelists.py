"""make_filelists.py: speaker split of the paper's VCTK setup, random split, list format."""
import os
import signal

import pytest

from conftest import write_tone
from dataset import read_filelist
import make_filelists
from make_filelists import VCTK_TEST_SPEAKERS, main
from utils import atomic_write


def test_speaker_split_holds_out_the_vctk_test_speakers(tmp_path):
    audio = tmp_path / "wav48"
    for speaker in ("p225", "p360", "p376", "s5", "p300"):
        (audio / speaker).mkdir(parents=True)
        for mic in ("mic1", "mic2"):
            write_tone(str(audio / speaker / f"{speaker}_001_{mic}.flac"), 0.01)
    (audio / "p225" / "readme.txt").write_text("not audio")
    main([str(audio), "--output_dir", str(tmp_path / "lists"), "--split", "speakers", "--mic", "mic1"])
    train = read_filelist(str(tmp_path / "lists" / "train.txt"))
    valid = read_filelist(str(tmp_path / "lists" / "valid.txt"))
    speakers = lambda files: sorted(os.path.basename(f).split("_")[0] for f in files)
    assert speakers(train) == ["p225", "p300"]
    assert speakers(valid) == ["p360", "p376", "s5"]
    assert all(f.endswith("_mic1.flac") for f in train + valid)
    assert set(speakers(valid)) <= set(VCTK_TEST_SPEAKERS)


def test_random_split_is_seeded_and_disjoint(tmp_path):
    for i in range(20):
        write_tone(str(tmp_path / f"c{i:02d}.wav"), 0.01)
    lists = []
    for run in range(2):
        out = tmp_path / f"lists{run}"
        main([str(tmp_path), "--output_dir", str(out), "--valid_fraction", "0.1"])
        lists.append((read_filelist(str(out / "train.txt")), read_filelist(str(out / "valid.txt"))))
    (train, valid), again = lists
    assert len(valid) == 2 and len(train) == 18 and not set(train) & set(valid)
    assert lists[0] == again


@pytest.mark.parametrize("args, message", [(["{tmp}/nowhere"], "no such folder"),
                                           (["{tmp}/a.wav"], "a.wav is a file, not a folder of audio files"),
                                           (["{tmp}", "--valid_fraction", "1.5"], "--valid_fraction"),
                                           (["{tmp}", "--mic", "mic9"], "with 'mic9' in their names (--mic)"),
                                           (["{tmp}", "--output_dir", "{tmp}/a.wav"], "is a file, not a folder")])
def test_bad_arguments_exit_in_one_line(tmp_path, args, message):
    write_tone(str(tmp_path / "a.wav"), 0.05)
    with pytest.raises(SystemExit) as exit_info:
        main(["--output_dir", str(tmp_path / "lists")] + [a.format(tmp=tmp_path) for a in args])
    assert message in str(exit_info.value) and "\n" not in str(exit_info.value)
    assert not (tmp_path / "lists").exists()


def test_names_that_are_not_utf8_round_trip_through_the_lists(tmp_path):
    audio = tmp_path / "audio"
    audio.mkdir()
    names = [os.fsdecode(b"caf\xe9.wav"), "plain.wav"]
    for name in names:
        write_tone(os.fsencode(audio / name), 0.01)
    main([str(audio), "--output_dir", str(tmp_path / "lists"), "--valid_fraction", "0.5"])
    listed = [read_filelist(str(tmp_path / "lists" / f"{part}.txt")) for part in ("train", "valid")]
    assert sorted(listed[0] + listed[1]) == sorted(str(audio / name) for name in names)
    assert all(os.path.isfile(path) for path in listed[0] + listed[1])


@pytest.mark.parametrize("stop, code, said", [(lambda: signal.raise_signal(signal.SIGTERM), 143, "terminated"),
                                              (lambda: (_ for _ in ()).throw(KeyboardInterrupt), 130, "interrupted")])
def test_a_stop_while_writing_ends_in_one_line_and_leaves_no_partial_list(tmp_path, monkeypatch, capsys,
                                                                          stop, code, said):
    write_tone(str(tmp_path / "a.wav"), 0.1)
    write_tone(str(tmp_path / "b.wav"), 0.1)

    def stopped_while_writing(f):
        f.write(b"partial")
        stop()
    monkeypatch.setattr(make_filelists, "write_list",
                        lambda path, files, note: atomic_write(path, stopped_while_writing))
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path), "--output_dir", str(tmp_path / "lists"), "--valid_fraction", "0.5"])
    assert exit_info.value.code == code and capsys.readouterr().err.strip().endswith(said)
    assert os.listdir(tmp_path / "lists") == []
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_a_name_with_a_line_break_is_refused(tmp_path):
    write_tone(str(tmp_path / "a.wav"), 0.1)
    write_tone(str(tmp_path / "b\nc.wav"), 0.1)
    with pytest.raises(SystemExit, match="a file name with a line break cannot go in a file list"):
        main([str(tmp_path), "--output_dir", str(tmp_path / "lists")])
    assert not (tmp_path / "lists").exists()
