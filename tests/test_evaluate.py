"""evaluate.py end to end: file matching, alignment, the three reports agreeing, codec mode."""
import contextlib
import csv
import io
import json
import math
import os
import subprocess
import sys
import types
import warnings

import numpy as np
import pytest
import soundfile as sf
import torch

from conftest import ROOT, TINY, make_config, tone, write_tone
import evaluate
from codec import codec_roundtrip, load_codec
from metrics import compute_metrics, stft_consistency
from checkpoints import release_state_dict
from config import bitrate
from models import Decoder, Encoder

SR = 48000
CONFIG = os.path.join(ROOT, "config.json")


def run_main(argv, monkeypatch_modules=None, error=None):
    """main(argv) with stdout and stderr captured; `monkeypatch_modules` replaces sys.modules
    entries; `error`: a pattern of the one-line error that main must exit with."""
    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        for name, module in (monkeypatch_modules or {}).items():
            mp.setitem(sys.modules, name, module)
        with pytest.raises(SystemExit, match=error) if error else contextlib.nullcontext():
            evaluate.main(argv)
    return out.getvalue(), err.getvalue()


def markdown_table(text):
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines() if line.startswith("|")]
    return rows[0], rows[2]


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("folders")
    ref, dec, out = root / "ref", root / "dec", root / "out"
    (ref / "sub").mkdir(parents=True)
    (dec / "sub").mkdir(parents=True)
    half = tone(0.5, SR, seed=1)
    sf.write(ref / "half.wav", half, SR, subtype="FLOAT")
    sf.write(dec / "half.wav", 0.5 * half, SR, subtype="FLOAT")
    # Matched across extensions and a subfolder, 5 samples longer: aligned with a warning.
    write_tone(str(ref / "sub" / "longer.flac"), 0.5, SR, seed=2)
    sf.write(dec / "sub" / "longer.wav", np.r_[tone(0.5, SR, seed=2), np.zeros(5, np.float32)], SR)
    write_tone(str(ref / "rate.wav"), 0.5, SR, seed=4)
    write_tone(str(dec / "rate.wav"), 0.5, 24000, seed=4)
    write_tone(str(ref / "only_ref.wav"), 0.5, SR, seed=5)
    write_tone(str(dec / "only_dec.wav"), 0.5, SR, seed=6)
    # The outputs cover the files that have a match, and the run says it was incomplete.
    stdout, stderr = run_main(["--reference", str(ref), "--decoded", str(dec), "--output", str(out),
                               "--config", CONFIG], {"visqol": None},
                              error=r"^error: 1 reference file\(s\) have no decoded file \(listed above\)")
    return {"out": out, "stdout": stdout, "stderr": stderr}


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_outputs_exist_and_png_is_an_image(folder_run):
    names = sorted(os.listdir(folder_run["out"]))
    assert names == ["metrics.csv", "report.md", "spectrograms.png", "summary.json"]
    with open(folder_run["out"] / "spectrograms.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_csv_json_and_markdown_agree(folder_run):
    rows = read_csv(folder_run["out"] / "metrics.csv")
    with open(folder_run["out"] / "summary.json") as f:
        summary = json.load(f)
    with open(folder_run["out"] / "report.md") as f:
        report = f.read()
    assert report in folder_run["stdout"]
    header, means = markdown_table(report)
    assert header == ["LSD", "AWPD_IP", "AWPD_GD", "AWPD_IAF", "SNR", "MelDistance"]
    assert list(rows[0]) == ["file"] + header
    assert list(summary["metrics"]) == header
    for name, shown in zip(header, means):
        values = [float(row[name]) for row in rows if row[name] != ""]   # empty: undefined there
        stats = summary["metrics"][name]
        assert len(rows) == 3 and stats["n"] == len(values)
        if not np.isfinite(values).all():
            # An infinite value (a metric of a file equal to its reference up to a scale) has
            # a null mean and no interval.
            assert stats["mean"] is None and stats["ci95"] is None
            continue
        assert stats["mean"] == pytest.approx(np.mean(values), rel=1e-9)
        assert float(shown) == pytest.approx(stats["mean"], rel=1e-4)
        low, high = stats["ci95"]
        assert low < stats["mean"] < high


def test_confidence_interval_uses_the_t_distribution():
    # t(0.975, 2 dof) = 4.302653; values 1, 2, 3 have standard deviation 1.
    stats = evaluate.mean_and_ci([1.0, 2.0, 3.0])
    assert stats["ci95"] == pytest.approx([2 - 4.302653 / math.sqrt(3), 2 + 4.302653 / math.sqrt(3)], rel=1e-6)
    assert evaluate.mean_and_ci([5.0]) == {"mean": 5.0, "ci95": None, "n": 1}


def test_files_are_matched_by_relative_name(folder_run):
    rows = {row["file"]: row for row in read_csv(folder_run["out"] / "metrics.csv")}
    assert sorted(rows) == ["half", "rate", "sub/longer"]
    # Exact closed forms on the float wavs: half amplitude.
    assert float(rows["half"]["LSD"]) == pytest.approx(math.log10(4), abs=1e-5)
    assert float(rows["half"]["SNR"]) == pytest.approx(10 * math.log10(4), abs=1e-4)
    with open(folder_run["out"] / "summary.json") as f:
        files = json.load(f)["files"]
    assert files == {"evaluated": 3, "failed": 0, "missing": ["only_ref"], "extra": ["only_dec"]}
    assert "only_ref" in folder_run["stdout"] and "only_dec" in folder_run["stdout"]


def test_length_and_rate_mismatches_are_warned(folder_run):
    assert "sub/longer: reference has 24000 samples, decoded 24005; trimmed to the shorter" in folder_run["stderr"]
    assert "rate.wav is 24000 Hz; resampled to 48000 Hz" in folder_run["stderr"]
    # Trimmed at the end, where the extra samples are (trimming the start would misalign them),
    # and resampled to the reference's rate (a 24 kHz tone is near its 48 kHz original).
    rows = {row["file"]: row for row in read_csv(folder_run["out"] / "metrics.csv")}
    assert float(rows["sub/longer"]["SNR"]) > 60 and float(rows["rate"]["SNR"]) > 15


def test_missing_optional_package_drops_its_column(folder_run):
    assert "ViSQOL skipped: package visqol-python not installed" in folder_run["stderr"]
    assert "ViSQOL" not in read_csv(folder_run["out"] / "metrics.csv")[0]


@pytest.fixture
def folders(tmp_path):
    for folder, name in (("ref", "a.wav"), ("other", "b.wav")):
        (tmp_path / folder).mkdir()
        write_tone(str(tmp_path / folder / name), 0.1)
    return tmp_path


@pytest.mark.parametrize("ref, dec, message", [
    ("nowhere", "other", "no such file or folder: {tmp}/nowhere"),
    ("ref", "nowhere", "no such file or folder: {tmp}/nowhere"),
    ("ref", "other", "no file of {tmp}/ref has a match in {tmp}/other"),
])
def test_bad_input_exits_with_one_line_naming_the_path(folders, ref, dec, message):
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(["--reference", str(folders / ref), "--decoded", str(folders / dec),
                       "--output", str(folders / "out"), "--config", CONFIG])
    assert str(exit_info.value) == "error: " + message.format(tmp=folders)


def test_lengths_far_apart_are_refused(tmp_path):
    write_tone(str(tmp_path / "a.wav"), 0.5)
    (tmp_path / "dec").mkdir()
    write_tone(str(tmp_path / "dec" / "a.wav"), 0.2)
    with pytest.raises(SystemExit, match="too different to align"):
        evaluate.main(["--reference", str(tmp_path), "--decoded", str(tmp_path / "dec"),
                       "--output", str(tmp_path / "out"), "--config", CONFIG])


def tiny_codec(tmp_path, causal=False):
    """A tiny config file and random encoder / decoder checkpoints in tmp_path."""
    h = make_config(**TINY, causal=causal)
    torch.manual_seed(0)
    for name, module in (("encoder", Encoder(h)), ("decoder", Decoder(h))):
        torch.save({name: release_state_dict(module)}, tmp_path / name)
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(h))
    return h, config


@pytest.mark.parametrize("causal", [False, True])
def test_checkpoint_mode_runs_the_codec(tmp_path, causal):
    h, config = tiny_codec(tmp_path, causal)
    ref = tmp_path / "ref"
    ref.mkdir()
    for seed in (1, 2):
        write_tone(str(ref / f"t{seed}.wav"), 0.25, SR, seed=seed)
    out = tmp_path / "out"
    fake_visqol = types.SimpleNamespace(VisqolApi=lambda: types.SimpleNamespace(
        create=lambda mode: None,
        measure_from_arrays=lambda r, d, sample_rate: types.SimpleNamespace(moslqo=4.0)))
    stdout, _ = run_main(["--reference", str(ref), "--checkpoint_file_load_Encoder", str(tmp_path / "encoder"),
                          "--checkpoint_file_load_Decoder", str(tmp_path / "decoder"),
                          "--config", str(config), "--output", str(out)], {"visqol": fake_visqol})

    decoded, _ = sf.read(out / "decoded" / "t1.wav")
    assert decoded.size == 12000
    with open(out / "summary.json") as f:
        summary = json.load(f)
    assert summary["bitrate_bps"] == bitrate(h)
    # Whole latent frames are coded, so the measured rate is at or a little above nominal.
    assert bitrate(h) <= summary["bitrate_measured_bps"] < 1.2 * bitrate(h)
    assert summary["rtf"] > 0 and summary["rtf_device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    rows = {row["file"]: row for row in read_csv(out / "metrics.csv")}
    assert float(rows["t1"]["ViSQOL"]) == 4.0
    header, _ = markdown_table(stdout)
    assert header[-2:] == ["ViSQOL", "STFT_consistency"]
    encoder, decoder, _ = load_codec(h, str(tmp_path / "encoder"), str(tmp_path / "decoder"), torch.device("cpu"))
    audio = torch.from_numpy(sf.read(ref / "t1.wav", dtype="float32")[0]).unsqueeze(0)
    result = codec_roundtrip(encoder, decoder, audio, h)
    expected = stft_consistency(result["real"][0], result["imag"][0], h).item()
    # Recomputed on the CPU; evaluate.py may have run on a GPU.
    assert float(rows["t1"]["STFT_consistency"]) == pytest.approx(expected, rel=1e-3)


def test_codec_mode_evaluates_fewer_codebooks(tmp_path):
    """--n_codebooks N: the decoded files are the codec's with N codebooks, at N / n_codebooks
    of the bitrate; it needs the codec mode and a count the model has."""
    h, config = tiny_codec(tmp_path)
    ref = tmp_path / "ref"
    ref.mkdir()
    write_tone(str(ref / "t.wav"), 0.25, SR)
    common = ["--reference", str(ref), "--checkpoint_file_load_Encoder", str(tmp_path / "encoder"),
              "--checkpoint_file_load_Decoder", str(tmp_path / "decoder"), "--config", str(config)]
    run_main(common + ["--output", str(tmp_path / "out"), "--n_codebooks", "1"])
    with open(tmp_path / "out" / "summary.json") as f:
        assert json.load(f)["bitrate_bps"] == bitrate(h) / h.n_codebooks
    encoder, decoder, _ = load_codec(h, str(tmp_path / "encoder"), str(tmp_path / "decoder"), torch.device("cpu"))
    audio = torch.from_numpy(sf.read(ref / "t.wav", dtype="float32")[0]).unsqueeze(0)
    expected = codec_roundtrip(encoder, decoder, audio, h, 1)["audio"][0].numpy()
    assert np.abs(sf.read(tmp_path / "out" / "decoded" / "t.wav")[0] - expected).max() <= 1 / 32768
    for extra, message in ((["--n_codebooks", "9"], "--n_codebooks must be a whole number in 1 ... 4"),
                           (["--n_codebooks", "1", "--decoded", str(ref)], "--n_codebooks applies when")):
        with pytest.raises(SystemExit, match=message):
            evaluate.main(common + ["--output", str(tmp_path / "out2")] + extra)


def write_pairs(tmp_path, pairs):
    """ref/NAME.wav and dec/NAME.wav float wavs from {NAME: (reference, decoded)}."""
    for folder in ("ref", "dec"):
        (tmp_path / folder).mkdir()
    for name, (ref, dec) in pairs.items():
        sf.write(tmp_path / "ref" / f"{name}.wav", ref, SR, subtype="FLOAT")
        sf.write(tmp_path / "dec" / f"{name}.wav", dec, SR, subtype="FLOAT")


def test_folder_mode_works_from_any_folder(tmp_path):
    """No --config: the repository's own config.json is found from another working folder."""
    x = tone(0.3, SR, seed=7)
    write_pairs(tmp_path, {"a": (x, 0.5 * x)})
    result = subprocess.run([sys.executable, os.path.join(ROOT, "evaluate.py"), "--reference", "ref",
                             "--decoded", "dec", "--output", "out"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    rows = read_csv(tmp_path / "out" / "metrics.csv")
    assert float(rows[0]["SNR"]) == pytest.approx(10 * math.log10(4), abs=1e-4)


def test_silent_reference_has_no_snr_and_is_left_out_of_the_mean(tmp_path):
    x = tone(0.3, SR, seed=8)
    write_pairs(tmp_path, {"loud": (x, 0.5 * x), "quiet": (np.zeros_like(x), 0.01 * x)})
    stdout, _ = run_main(["--reference", str(tmp_path / "ref"), "--decoded", str(tmp_path / "dec"),
                          "--output", str(tmp_path / "out"), "--config", CONFIG], {"visqol": None})
    rows = {row["file"]: row for row in read_csv(tmp_path / "out" / "metrics.csv")}
    assert rows["quiet"]["SNR"] == ""
    with open(tmp_path / "out" / "summary.json") as f:
        snr = json.load(f)["metrics"]["SNR"]
    assert snr["n"] == 1 and snr["mean"] == pytest.approx(10 * math.log10(4), abs=1e-4)
    assert "SNR is undefined for 1 file, left out of its mean: quiet" in stdout


def test_codec_mode_keeps_the_length_of_very_short_clips(tmp_path):
    _, config = tiny_codec(tmp_path)
    (tmp_path / "ref").mkdir()
    sf.write(tmp_path / "ref" / "blip.wav", tone(0.01, SR)[:28], SR)
    run_main(["--reference", str(tmp_path / "ref"), "--checkpoint_file_load_Encoder", str(tmp_path / "encoder"),
              "--checkpoint_file_load_Decoder", str(tmp_path / "decoder"), "--config", str(config),
              "--output", str(tmp_path / "out")], {"visqol": None})
    assert sf.info(str(tmp_path / "out" / "decoded" / "blip.wav")).frames == 28
    assert len(read_csv(tmp_path / "out" / "metrics.csv")) == 1


def test_unreadable_files_are_reported_the_rest_evaluated_and_the_run_fails(tmp_path, capsys):
    x = tone(0.3, SR, seed=9)
    write_pairs(tmp_path, {"good": (x, 0.5 * x), "bad": (x, x), "cut": (x, x)})
    (tmp_path / "dec" / "bad.wav").write_bytes(b"not audio at all")
    # A truncated reference reads as a shorter clip; its header says what is missing.
    whole = (tmp_path / "ref" / "cut.wav").read_bytes()
    (tmp_path / "ref" / "cut.wav").write_bytes(whole[:-1000])
    with pytest.raises(SystemExit, match="2 file\\(s\\) could not be evaluated"):
        evaluate.main(["--reference", str(tmp_path / "ref"), "--decoded", str(tmp_path / "dec"),
                       "--output", str(tmp_path / "out"), "--config", CONFIG])
    out, err = capsys.readouterr()
    assert "bad.wav" in err and f"failed: {tmp_path / 'ref' / 'cut.wav'}: truncated" in err
    assert "Evaluated 1 file of" in out
    rows = read_csv(tmp_path / "out" / "metrics.csv")
    assert [row["file"] for row in rows] == ["good"]
    with open(tmp_path / "out" / "summary.json") as f:
        files = json.load(f)["files"]
    assert files == {"evaluated": 1, "failed": 2, "missing": [], "extra": []}
    report = (tmp_path / "out" / "report.md").read_text()
    assert "Failed (2), left out: " in report and "cut.wav: truncated" in report and "bad.wav" in report


def test_identical_files_have_infinite_snr_and_no_interval(tmp_path):
    x = tone(0.3, SR, seed=10)
    write_pairs(tmp_path, {"a": (x, x), "b": (0.5 * x, 0.5 * x)})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run_main(["--reference", str(tmp_path / "ref"), "--decoded", str(tmp_path / "dec"),
                  "--output", str(tmp_path / "out"), "--config", CONFIG], {"visqol": None})
    with open(tmp_path / "out" / "summary.json") as f:
        snr = json.load(f)["metrics"]["SNR"]
    assert snr["mean"] is None and snr["ci95"] is None and snr["n"] == 2


def test_codec_mode_never_replaces_the_references(tmp_path):
    _, config = tiny_codec(tmp_path)
    decoded = tmp_path / "out" / "decoded"
    decoded.mkdir(parents=True)
    write_tone(str(decoded / "a.wav"), 0.25, SR, seed=4)
    before = (decoded / "a.wav").read_bytes()
    with pytest.raises(SystemExit, match=f"--output: writing {decoded / 'a.wav'} would replace an input file"):
        evaluate.main(["--reference", str(decoded), "--checkpoint_file_load_Encoder", str(tmp_path / "encoder"),
                       "--checkpoint_file_load_Decoder", str(tmp_path / "decoder"), "--config", str(config),
                       "--output", str(tmp_path / "out")])
    assert (decoded / "a.wav").read_bytes() == before
    # An output folder inside the references: the decoded files would be references next time.
    with pytest.raises(SystemExit, match=f"--output: {decoded / 'eval' / 'decoded'} lies inside --reference "
                                         f"{decoded}, so a second run would take the wavs"):
        evaluate.main(["--reference", str(decoded), "--checkpoint_file_load_Encoder", str(tmp_path / "encoder"),
                       "--checkpoint_file_load_Decoder", str(tmp_path / "decoder"), "--config", str(config),
                       "--output", str(decoded / "eval")])
    assert os.listdir(decoded) == ["a.wav"]


def test_codec_mode_measures_at_the_rate_of_the_checkpoints_own_config(tmp_path):
    """Checkpoints with their training config beside them (here a 24 kHz model) are decoded and
    measured at that config's rate, whatever --config says."""
    h = make_config(**TINY, sampling_rate=24000)
    torch.manual_seed(0)
    run = tmp_path / "run"
    run.mkdir()
    for name, module in (("encoder", Encoder(h)), ("decoder", Decoder(h))):
        torch.save({name: release_state_dict(module)}, run / name)
    (run / "config.json").write_text(json.dumps(h))
    (tmp_path / "ref").mkdir()
    write_tone(str(tmp_path / "ref" / "a.wav"), 0.3, 24000, seed=3)
    _, err = run_main(["--reference", str(tmp_path / "ref"), "--checkpoint_file_load_Encoder", str(run / "encoder"),
                       "--checkpoint_file_load_Decoder", str(run / "decoder"), "--config", CONFIG,
                       "--output", str(tmp_path / "out")], {"visqol": None})
    assert "resampled" not in err
    decoded, rate = sf.read(tmp_path / "out" / "decoded" / "a.wav", dtype="float32")
    reference, _ = sf.read(tmp_path / "ref" / "a.wav", dtype="float32")
    assert rate == 24000
    expected = compute_metrics(torch.from_numpy(reference), torch.from_numpy(decoded), h)["LSD"]
    assert float(read_csv(tmp_path / "out" / "metrics.csv")[0]["LSD"]) == pytest.approx(expected, rel=1e-4)


def test_codec_mode_reports_unreadable_references_and_codes_the_rest(tmp_path, capsys):
    _, config = tiny_codec(tmp_path)
    (tmp_path / "ref").mkdir()
    write_tone(str(tmp_path / "ref" / "good.wav"), 0.25, SR, seed=4)
    (tmp_path / "ref" / "broken.wav").write_bytes(b"RIFF not really")
    bad = tone(0.25, SR, seed=5)
    bad[100] = np.nan
    sf.write(tmp_path / "ref" / "nan.wav", bad, SR, subtype="FLOAT")
    with pytest.raises(SystemExit, match="2 file\\(s\\) could not be evaluated"):
        evaluate.main(["--reference", str(tmp_path / "ref"), "--checkpoint_file_load_Encoder",
                       str(tmp_path / "encoder"), "--checkpoint_file_load_Decoder", str(tmp_path / "decoder"),
                       "--config", str(config), "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert "broken.wav" in err and "nan.wav has NaN or infinite samples" in err
    assert [row["file"] for row in read_csv(tmp_path / "out" / "metrics.csv")] == ["good"]
    with open(tmp_path / "out" / "summary.json") as f:
        assert json.load(f)["files"] == {"evaluated": 1, "failed": 2, "missing": [], "extra": []}
    report = (tmp_path / "out" / "report.md").read_text()
    assert "Failed (2), left out: " in report and "broken.wav" in report and "nan.wav has NaN" in report


def test_an_optional_metric_that_fails_on_a_file_is_left_empty_there(tmp_path, capsys):
    """ViSQOL refuses clips shorter than its patch: that file's ViSQOL is empty and named, the
    rest of the run goes on."""
    def measure(r, d, sample_rate):
        if r.size < 0.5 * sample_rate:
            raise ValueError("Reference spectrum size (22) smaller than minimum patch size (45).")
        return types.SimpleNamespace(moslqo=4.0)
    fake_visqol = types.SimpleNamespace(VisqolApi=lambda: types.SimpleNamespace(
        create=lambda mode: None, measure_from_arrays=measure))
    short, long = tone(0.3, SR, seed=10), tone(0.8, SR, seed=11)
    write_pairs(tmp_path, {"short": (short, 0.5 * short), "long": (long, 0.5 * long)})
    _, err = run_main(["--reference", str(tmp_path / "ref"), "--decoded", str(tmp_path / "dec"),
                       "--output", str(tmp_path / "out"), "--config", CONFIG], {"visqol": fake_visqol})
    assert "ViSQOL skipped for short: Reference spectrum size (22)" in err
    rows = {row["file"]: row for row in read_csv(tmp_path / "out" / "metrics.csv")}
    assert rows["short"]["ViSQOL"] == "" and float(rows["long"]["ViSQOL"]) == 4.0
