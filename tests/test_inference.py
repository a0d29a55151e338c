"""inference.py: every input gives a wav of exactly its length and rate; release path kept bit for bit."""
import os
import re
import shutil

import numpy as np
import pytest
import soundfile as sf
import torch

import inference
from codec import Codec, codec_roundtrip, load_codec
from config import save_config
from conftest import ROOT, TINY, make_config, tone, write_tone
from dataset import audio_index
from checkpoints import load_release_state_dict, release_state_dict
from fastpath import FastGenerator
from models import Decoder, Encoder
from spectral import amp_pha_spectrum, pad_for_analysis


def _save_random_codec(h, folder):
    torch.manual_seed(0)
    encoder, decoder = Encoder(h), Decoder(h)
    enc_path, dec_path = os.path.join(folder, "encoder_00000001"), os.path.join(folder, "decoder_00000001")
    torch.save({"encoder": release_state_dict(encoder)}, enc_path)
    torch.save({"decoder": release_state_dict(decoder)}, dec_path)
    return enc_path, dec_path


def test_inference_writes_exact_lengths(tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    write_tone(str(inputs / "a.wav"), 0.2513)                       # 48 kHz mono, odd length
    write_tone(str(inputs / "b.flac"), 0.31, sr=44100, channels=2)  # resampled, stereo
    write_tone(str(inputs / "c.ogg"), 0.27, sr=22050)               # resampled, lossy
    write_tone(str(inputs / "d.wav"), 7960 / 48000)                 # the training segment
    (inputs / "notes.txt").write_text("not audio")
    h = make_config(**TINY)
    enc_path, dec_path = _save_random_codec(h, str(tmp_path))
    h.update(test_input_wavs_dir=str(inputs), test_wav_output_dir=str(tmp_path / "out"),
             checkpoint_file_load_Encoder=enc_path, checkpoint_file_load_Decoder=dec_path)
    inference.inference(h)
    outputs = sorted(os.listdir(tmp_path / "out"))
    assert outputs == ["a.wav", "b.wav", "c.wav", "d.wav"]
    for name in ("a.wav", "b.flac", "c.ogg", "d.wav"):
        source = sf.info(str(inputs / name))
        info = sf.info(str(tmp_path / "out" / (os.path.splitext(name)[0] + ".wav")))
        assert ((info.frames, info.samplerate, info.subtype, info.channels)
                == (source.frames, source.samplerate, "PCM_16", source.channels))


def test_same_stem_is_an_error(tmp_path):
    write_tone(str(tmp_path / "x.wav"), 0.1)
    write_tone(str(tmp_path / "x.flac"), 0.1)
    with pytest.raises(ValueError, match="x.flac"):
        audio_index(str(tmp_path))


def test_roundtrip_matches_release_path_bit_for_bit(tmp_path, tiny_h):
    """For T a multiple of ratio, padding/trimming changes nothing: the output is the release's
    encoder(logamp, pha) -> decoder(latent) path with weight norm recomputed per call."""
    h = tiny_h
    enc_path, dec_path = _save_random_codec(h, str(tmp_path))
    encoder, decoder, _ = load_codec(h, enc_path, dec_path, torch.device("cpu"))
    audio = torch.from_numpy(tone(0.3)[:(8 * 30 - 1) * h.hop_size])[None]
    assert (audio.size(-1) // h.hop_size + 1) % h.ratio == 0
    out = codec_roundtrip(encoder, decoder, audio, h)

    ref_enc, ref_dec = Encoder(h).eval(), Decoder(h).eval()
    load_release_state_dict(ref_enc, torch.load(enc_path)["encoder"])
    load_release_state_dict(ref_dec, torch.load(dec_path)["decoder"])
    with torch.no_grad():
        logamp, pha, _, _ = amp_pha_spectrum(audio, h.n_fft, h.hop_size, h.win_size)
        latent = ref_enc(logamp, pha).latent
        *_, real, imag, y_g = ref_dec(latent)
    assert y_g.size(-1) == audio.size(-1)
    assert torch.equal(out["audio"], y_g[:, 0])
    assert torch.equal(out["real"], real) and torch.equal(out["imag"], imag)
    assert out["codes"].shape == (1, h.n_codebooks, 30)
    assert torch.allclose(encoder.latent_from_codes(out["codes"]), latent, atol=1e-5)


def test_roundtrip_pads_at_most_one_hop(tiny_h):
    encoder, decoder = Encoder(tiny_h).eval(), Decoder(tiny_h).eval()
    for length in (4001, 4039, 4040, 4041):
        audio = torch.from_numpy(tone(0.1, seed=length)[:length])[None]
        padded = pad_for_analysis(audio, tiny_h.n_fft, tiny_h.hop_size)
        assert padded.size(-1) % tiny_h.hop_size == 0 and 0 <= padded.size(-1) - length < tiny_h.hop_size
        assert torch.equal(padded[:, :length], audio) and not padded[:, length:].any()
        assert codec_roundtrip(encoder, decoder, audio, tiny_h)["audio"].shape == (1, length)


def test_missing_checkpoint_exits_with_one_line(tmp_path, capsys):
    write_tone(str(tmp_path / "a.wav"), 0.1)
    with pytest.raises(SystemExit) as exit_info:
        inference.main(["--test_input_wavs_dir", str(tmp_path),
                        "--checkpoint_file_load_Encoder", str(tmp_path / "nope")])
    message = str(exit_info.value)
    assert "nope" in message and "\n" not in message


def _setup_folder(tmp_path, h, files):
    """Input folder of {relative name: seconds}, random checkpoints, and h pointing at them."""
    inputs = tmp_path / "in"
    for name, seconds in files.items():
        (inputs / name).parent.mkdir(parents=True, exist_ok=True)
        write_tone(str(inputs / name), seconds)
    enc_path, dec_path = _save_random_codec(h, str(tmp_path))
    h.update(test_input_wavs_dir=str(inputs), test_wav_output_dir=str(tmp_path / "out"),
             checkpoint_file_load_Encoder=enc_path, checkpoint_file_load_Decoder=dec_path)
    return inputs


def test_file_names_that_are_not_utf8_are_coded(tmp_path, tiny_h):
    """A Latin-1 name on a UTF-8 system (Python keeps its bytes as surrogates): read, coded
    and written under the same name in every mode."""
    inputs = _setup_folder(tmp_path, tiny_h, {"a.wav": 0.05})
    name = os.fsdecode(b"caf\xe9")
    os.rename(inputs / "a.wav", inputs / f"{name}.wav")
    length = sf.info(os.fsencode(inputs / f"{name}.wav")).frames
    for mode, source, target, written in (("resynth", inputs, tmp_path / "out", ".wav"),
                                          ("encode", inputs, tmp_path / "codes", ".apc"),
                                          ("decode", tmp_path / "codes", tmp_path / "decoded", ".wav")):
        tiny_h.update(test_input_wavs_dir=str(source), test_wav_output_dir=str(target))
        assert inference.inference(tiny_h, mode=mode)["failed"] == 0, mode
        assert os.listdir(os.fsencode(target)) == [b"caf\xe9" + written.encode()], mode
    for folder in ("out", "decoded"):
        assert sf.info(os.fsencode(tmp_path / folder / f"{name}.wav")).frames == length


@pytest.mark.parametrize("length", [1, 28, 479, 480, 481, 513, 520, 521])
def test_very_short_inputs_resynthesise_to_their_length(tiny_h, length):
    encoder, decoder = Encoder(tiny_h).eval(), Decoder(tiny_h).eval()
    audio = torch.from_numpy(tone(0.02, seed=length)[:length])[None]
    out = codec_roundtrip(encoder, decoder, audio, tiny_h)
    assert out["audio"].shape == (1, length) and torch.isfinite(out["audio"]).all()
    # Padded to 520 samples (13 hops, the first whole-hop length over n_fft / 2) or 560:
    # 14 or 15 STFT frames, 2 latent frames.
    assert out["codes"].shape[-1] == 2


def test_folders_are_walked_recursively_and_mirrored(tmp_path, tiny_h):
    _setup_folder(tmp_path, tiny_h, {"a.wav": 0.05, "sub/b.wav": 0.01, "sub/deeper/c.wav": 0.001})
    inference.inference(tiny_h)
    for name, samples in (("a.wav", 2400), ("sub/b.wav", 480), ("sub/deeper/c.wav", 48)):
        info = sf.info(str(tmp_path / "out" / name))
        assert (info.frames, info.samplerate) == (samples, 48000)


def test_empty_folder_is_an_error(tmp_path, tiny_h):
    (tmp_path / "empty").mkdir()
    enc_path, dec_path = _save_random_codec(tiny_h, str(tmp_path))
    with pytest.raises(SystemExit) as exit_info:
        inference.main(["--test_input_wavs_dir", str(tmp_path / "empty"),
                        "--checkpoint_file_load_Encoder", enc_path, "--checkpoint_file_load_Decoder", dec_path])
    message = str(exit_info.value)
    assert message.startswith("error: no audio files") and "empty" in message and "\n" not in message


def test_a_file_list_given_as_the_input_is_one_clear_line(tmp_path, tiny_h, capsys):
    listed = tmp_path / "train.txt"
    listed.write_text("a.wav\nb.wav\n")
    enc_path, dec_path = _save_random_codec(tiny_h, str(tmp_path))
    with pytest.raises(SystemExit) as exit_info:
        inference.main(["--test_input_wavs_dir", str(listed), "--checkpoint_file_load_Encoder", enc_path,
                        "--checkpoint_file_load_Decoder", dec_path])
    message = str(exit_info.value)
    assert message.startswith(f"error: {listed}: unreadable") and "\n" not in message
    assert message.endswith("the input is an audio file or a folder of them")
    assert capsys.readouterr().err == ""
    damaged = tmp_path / "damaged.wav"
    damaged.write_bytes(b"RIFF....WAVEfmt nonsense")
    with pytest.raises(SystemExit) as exit_info:
        inference.main(["--test_input_wavs_dir", str(damaged), "--checkpoint_file_load_Encoder", enc_path,
                        "--checkpoint_file_load_Decoder", dec_path])
    assert str(exit_info.value).startswith(f"error: {damaged}: unreadable (") and "folder" not in str(exit_info.value)


def test_bad_inputs_are_named_the_rest_coded_and_the_run_fails(tmp_path, tiny_h, capsys):
    """Every input is checked before anything is written; bad ones are reported by path and
    reason, the good ones coded, and the exit status says that something failed."""
    inputs = _setup_folder(tmp_path, tiny_h, {"a.wav": 0.05, "c.wav": 0.05})
    (inputs / "b.wav").write_bytes(b"RIFF....WAVEfmt nonsense")
    data = open(inputs / "a.wav", "rb").read()
    (inputs / "d.wav").write_bytes(data[:100])
    with pytest.raises(ValueError, match="2 of 4 files failed"):
        inference.inference(tiny_h)
    err = capsys.readouterr().err
    assert f"failed: {inputs / 'b.wav'}: unreadable" in err and f"failed: {inputs / 'd.wav'}: truncated" in err
    assert sorted(os.listdir(tmp_path / "out")) == ["a.wav", "c.wav"]
    (inputs / "a.wav").write_bytes(b"")
    (inputs / "c.wav").unlink()
    with pytest.raises(ValueError, match="no usable audio file"):
        inference.inference(tiny_h)


@pytest.mark.parametrize("precision", ["float32", "int8"])
@pytest.mark.parametrize("mode", ["resynth", "encode"])
def test_non_finite_samples_fail_their_file_alone(tmp_path, tiny_h, capsys, monkeypatch, precision, mode):
    """A float file with a NaN or an infinity is named; its batch's other files are coded."""
    monkeypatch.setattr(inference, "pick_device", lambda: torch.device("cpu"))   # int8 runs on the CPU
    inputs = _setup_folder(tmp_path, tiny_h, {"a.wav": 0.05, "c.wav": 0.06})
    for name, bad in (("nan.wav", float("nan")), ("inf.wav", float("inf"))):
        audio = tone(0.055)
        audio[100] = bad
        sf.write(str(inputs / name), audio, 48000, subtype="FLOAT")
    with pytest.raises(ValueError, match="2 of 4 files failed"):
        inference.inference(tiny_h, mode=mode, precision=precision)
    err = capsys.readouterr().err
    for name in ("nan.wav", "inf.wav"):
        assert f"failed: {inputs / name}: audio file {inputs / name} has NaN or infinite samples" in err
    suffix = ".wav" if mode == "resynth" else ".apc"
    assert sorted(os.listdir(tmp_path / "out")) == ["a" + suffix, "c" + suffix]


def test_a_failing_batch_is_coded_file_by_file(tmp_path, tiny_h, monkeypatch):
    """A batch that fails as a whole (out of memory, say) leaves its files to be coded alone,
    with the same output (on the CPU, where a batch runs its clips one by one, bit for bit)."""
    monkeypatch.setattr(inference, "pick_device", lambda: torch.device("cpu"))
    inputs = _setup_folder(tmp_path, tiny_h, {"a.wav": 0.05, "b.wav": 0.06, "c.wav": 0.07})
    inference.inference(tiny_h)
    expected = {name: sf.read(str(tmp_path / "out" / name))[0] for name in ("a.wav", "b.wav", "c.wav")}
    shutil.rmtree(tmp_path / "out")
    roundtrip = FastGenerator.roundtrip
    batches = []

    def small_batches_only(self, clips, *args):
        batches.append(len(clips))
        if len(clips) > 1:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return roundtrip(self, clips, *args)
    monkeypatch.setattr(FastGenerator, "roundtrip", small_batches_only)
    totals = inference.inference(tiny_h)
    assert totals["failed"] == 0 and batches == [3, 1, 1, 1]
    for name, audio in expected.items():
        assert np.array_equal(sf.read(str(tmp_path / "out" / name))[0], audio), name


def _train_config_beside(tmp_path, h):
    """Random tiny checkpoints in a run folder, with the run's config.json beside them."""
    run = tmp_path / "run"
    run.mkdir()
    enc_path, dec_path = _save_random_codec(h, str(run))
    save_config(h, str(run / "config.json"))
    return enc_path, dec_path


def test_checkpoints_of_another_network_use_the_config_beside_them(tmp_path, tiny_h, capsys):
    write_tone(str(tmp_path / "a.wav"), 0.05)
    enc_path, dec_path = _train_config_beside(tmp_path, tiny_h)
    # The release's workflow: the repository's default config.json, only the paths changed.
    inference.main(["--test_input_wavs_dir", str(tmp_path / "a.wav"), "--test_wav_output_dir", str(tmp_path / "out"),
                    "--checkpoint_file_load_Encoder", enc_path, "--checkpoint_file_load_Decoder", dec_path])
    note = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note:")]
    assert len(note) == 1 and "run/config.json" in note[0] and "latent_dim" in note[0]
    assert sf.info(str(tmp_path / "out" / "a.wav")).frames == 2400


def test_checkpoints_of_another_network_without_a_config_fail_in_one_line(tmp_path, tiny_h):
    write_tone(str(tmp_path / "a.wav"), 0.05)
    enc_path, dec_path = _train_config_beside(tmp_path, tiny_h)
    os.remove(tmp_path / "run" / "config.json")
    with pytest.raises(SystemExit) as exit_info:
        inference.main(["--test_input_wavs_dir", str(tmp_path / "a.wav"),
                        "--checkpoint_file_load_Encoder", enc_path, "--checkpoint_file_load_Decoder", dec_path])
    message = str(exit_info.value)
    assert "\n" not in message and os.path.join(ROOT, "config.json") in message and "--config" in message
    assert not (tmp_path / "out").exists()


def test_stream_and_codes_files_write_the_same_files_as_offline(tmp_path, monkeypatch):
    """A causal codec trained elsewhere (its config beside the checkpoints): --stream --chunk_ms 10,
    and --mode encode then --mode decode, write the files of the offline run, each as long as
    its input."""
    # On the CPU also where CUDA is visible: there cuDNN's default TF32 convolutions would make
    # the offline pass differ from the stream's float32 products.
    monkeypatch.setattr(inference, "pick_device", lambda: torch.device("cpu"))
    inputs = tmp_path / "in"
    inputs.mkdir()
    write_tone(str(inputs / "a.wav"), 0.1013)
    write_tone(str(inputs / "b.wav"), 0.0203, sr=44100)
    h = make_config(**TINY, causal=True)
    enc_path, dec_path = _train_config_beside(tmp_path, h)
    common = ["--test_input_wavs_dir", str(inputs), "--checkpoint_file_load_Encoder", enc_path,
              "--checkpoint_file_load_Decoder", dec_path, "--num_workers", "0"]
    inference.main(common + ["--test_wav_output_dir", str(tmp_path / "offline")])
    inference.main(common + ["--test_wav_output_dir", str(tmp_path / "streamed"), "--stream", "--chunk_ms", "10"])
    inference.main(common + ["--test_wav_output_dir", str(tmp_path / "codes"), "--mode", "encode"])
    inference.main(common[2:] + ["--test_input_wavs_dir", str(tmp_path / "codes"),
                                 "--test_wav_output_dir", str(tmp_path / "decoded"), "--mode", "decode"])
    for name in ("a.wav", "b.wav"):
        offline, sr = sf.read(str(tmp_path / "offline" / name), dtype="int16")
        info = sf.info(str(inputs / name))
        assert (sr, offline.size) == (info.samplerate, info.frames)
        assert (tmp_path / "codes" / (name[:-4] + ".apc")).exists()
        for other in ("streamed", "decoded"):
            out, out_sr = sf.read(str(tmp_path / other / name), dtype="int16")
            # 16-bit rounding of values within 1e-5 of each other: at most one step apart
            assert out_sr == sr and out.shape == offline.shape and abs(offline.astype(int) - out).max() <= 1, other


def test_stream_needs_a_causal_codec(tmp_path, tiny_h):
    write_tone(str(tmp_path / "a.wav"), 0.05)
    enc_path, dec_path = _train_config_beside(tmp_path, tiny_h)
    common = ["--test_input_wavs_dir", str(tmp_path / "a.wav"), "--checkpoint_file_load_Encoder", enc_path,
              "--checkpoint_file_load_Decoder", dec_path]
    with pytest.raises(SystemExit, match="causal"):
        inference.main(common + ["--stream"])
    with pytest.raises(SystemExit, match="--chunk_ms applies only with --stream"):
        inference.main(common + ["--chunk_ms", "20"])
    assert not (tmp_path / "out").exists()


def test_options_a_causal_codec_cannot_honour_are_refused():
    """The stream decodes every codebook; a causal codec's GRN has no statistics to share."""
    h = make_config(**TINY, causal=True)
    encoder, decoder = Encoder(h).eval(), Decoder(h).eval()
    streamed = Codec(h, encoder, decoder, torch.device("cpu"), stream_ms=10)
    streamed.resynthesize(tone(0.02), 48000, n_codebooks=h.n_codebooks)
    with pytest.raises(ValueError, match="every codebook"):
        streamed.resynthesize(tone(0.02), 48000, n_codebooks=1)
    with pytest.raises(ValueError, match="--file_statistics applies to the paper's codec"):
        Codec(h, encoder, decoder, torch.device("cpu"), file_statistics=True)


def test_folders_on_two_windows_drives_are_not_inside_each_other(tmp_path, monkeypatch):
    def two_drives(paths):
        raise ValueError("Paths don't have the same drive")
    monkeypatch.setattr(os.path, "commonpath", two_drives)
    inference.check_outside(str(tmp_path / "out"), str(tmp_path), "test_wav_output_dir", "test_input_wavs_dir")


def test_an_output_whose_place_a_folder_or_file_takes_is_refused_before_anything_is_written(tmp_path, tiny_h):
    inputs = _setup_folder(tmp_path, tiny_h, {"a.wav": 0.05, "sub/b.wav": 0.06})
    out = tmp_path / "out"
    (out / "a.wav").mkdir(parents=True)
    with pytest.raises(ValueError, match=rf"test_wav_output_dir: {re.escape(str(out / 'a.wav'))} is a folder, where an "
                                         rf"output file goes"):
        inference.inference(tiny_h)
    (out / "a.wav").rmdir()
    (out / "sub").write_bytes(b"")
    with pytest.raises(ValueError, match=rf"{re.escape(str(out / 'sub'))} is a file, where a folder of outputs goes"):
        inference.inference(tiny_h)
    assert os.listdir(out) == ["sub"] and len(os.listdir(inputs)) == 2


def test_an_output_folder_that_is_the_input_folder_replaces_nothing(tmp_path, tiny_h):
    """Resynthesis into the input folder (or a folder inside it) would overwrite inputs, and
    decoding there the originals beside the codes files: both are refused before anything is
    written. Decoding into a folder of its own inside the codes folder can be run again."""
    inputs = _setup_folder(tmp_path, tiny_h, {"a.wav": 0.05, "sub/a.wav": 0.06})
    before = {name: (inputs / name).read_bytes() for name in ("a.wav", "sub/a.wav")}
    for target, message in ((inputs, "would replace an input file"), (inputs / "sub", "sub/a.wav would replace")):
        tiny_h.update(test_wav_output_dir=str(target))
        with pytest.raises(ValueError, match=message):
            inference.inference(tiny_h)
    tiny_h.update(test_wav_output_dir=str(inputs))
    inference.inference(tiny_h, mode="encode")          # codes beside the wavs replace nothing
    assert os.path.isfile(inputs / "sub" / "a.apc")
    with pytest.raises(ValueError, match=r"writing .*a\.wav would replace the audio file beside its codes file"):
        inference.inference(tiny_h, mode="decode")
    # Codes files are found whatever the case of their extension, and protect their originals so too.
    for name in ("a", "sub/a"):
        os.rename(inputs / f"{name}.apc", inputs / f"{name}.APC")
    with pytest.raises(ValueError, match=r"writing .*a\.wav would replace the audio file beside its codes file"):
        inference.inference(tiny_h, mode="decode")
    assert {name: (inputs / name).read_bytes() for name in before} == before
    tiny_h.update(test_wav_output_dir=str(inputs / "decoded"))
    for _ in range(2):
        inference.inference(tiny_h, mode="decode")
    assert os.path.isfile(inputs / "decoded" / "sub" / "a.wav")
    # Resynthesis into a folder of its own inside the inputs: its wavs would be inputs next time.
    tiny_h.update(test_wav_output_dir=str(inputs / "resynth"))
    with pytest.raises(ValueError, match=f"test_wav_output_dir: {re.escape(str(inputs / 'resynth'))} lies inside "
                                         f"test_input_wavs_dir {re.escape(str(inputs))}, so a second run"):
        inference.inference(tiny_h)
    assert not os.path.exists(inputs / "resynth")
    tiny_h.update(test_input_wavs_dir=str(inputs / "a.wav"), test_wav_output_dir=str(inputs))
    with pytest.raises(ValueError, match="would replace an input file"):
        inference.inference(tiny_h)
    # An output folder that is a file, or lies under one, is refused before the model runs.
    for target in (inputs / "a.wav", inputs / "a.wav" / "out"):
        tiny_h.update(test_wav_output_dir=str(target))
        with pytest.raises(ValueError, match=f"test_wav_output_dir: {re.escape(str(inputs / 'a.wav'))} is a file"):
            inference.inference(tiny_h)
    assert {name: (inputs / name).read_bytes() for name in before} == before


@pytest.mark.parametrize("mode, options, named", [
    ("decode", {"chunk_seconds": 5.0}, "--chunk_seconds"),
    ("decode", {"file_statistics": True}, "--file_statistics"),
    ("encode", {"keep_model_rate": True}, "--keep_model_rate"),
    ("encode", {"batch_seconds": 10.0}, "--batch_seconds"),
    ("resynth", {"batch_seconds": float("nan")}, "--batch_seconds"),
    ("resynth", {"chunk_seconds": float("inf")}, "--chunk_seconds"),
])
def test_an_option_that_does_nothing_in_the_mode_is_an_error(tmp_path, tiny_h, mode, options, named):
    _setup_folder(tmp_path, tiny_h, {"a.wav": 0.05})
    with pytest.raises(ValueError, match=named):
        inference.inference(tiny_h, mode=mode, **options)
    assert not os.path.exists(tmp_path / "out")


def test_batch_seconds_with_a_causal_codec_is_an_error(tmp_path, tiny_h):
    tiny_h.update(causal=True)
    _setup_folder(tmp_path, tiny_h, {"a.wav": 0.05})
    with pytest.raises(ValueError, match="--batch_seconds applies to the paper's codec"):
        inference.inference(tiny_h, batch_seconds=5.0)
    assert not os.path.exists(tmp_path / "out")


def test_decoding_a_folder_without_codes_files_fails_before_loading_the_model(tmp_path, tiny_h, monkeypatch, capsys):
    _setup_folder(tmp_path, tiny_h, {"a.wav": 0.05})
    monkeypatch.setattr(inference.Codec, "load", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(FileNotFoundError, match=f"no codes files \\(.apc\\) in {tmp_path / 'in'}"):
        inference.inference(tiny_h, mode="decode")
    assert capsys.readouterr().out == ""


def test_a_missing_checkpoint_names_its_config_key(tmp_path, tiny_h):
    _setup_folder(tmp_path, tiny_h, {"a.wav": 0.05})
    tiny_h.update(checkpoint_file_load_Decoder=str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="config key 'checkpoint_file_load_Decoder': checkpoint not found"):
        inference.inference(tiny_h)


def test_an_output_folder_that_cannot_be_written_in_is_refused_before_coding(tmp_path, tiny_h, monkeypatch):
    """Found before the model loads, not once every file has been coded. The folder to be made
    (ro/new) is judged by the nearest one that exists (ro)."""
    _setup_folder(tmp_path, tiny_h, {"a.wav": 0.05})
    locked = tmp_path / "ro"
    locked.mkdir()
    locked.chmod(0o555)
    if os.geteuid() == 0:   # root writes anywhere: the permission check is what is tested
        access = os.access
        monkeypatch.setattr(inference.os, "access",
                            lambda path, mode: access(path, mode) and os.path.abspath(path) != str(locked))
    monkeypatch.setattr(inference.Codec, "load", lambda *a, **k: pytest.fail("the model was loaded"))
    tiny_h.update(test_wav_output_dir=str(locked / "new"))
    try:
        with pytest.raises(ValueError, match=f"test_wav_output_dir: cannot write in {locked}$"):
            inference.inference(tiny_h)
    finally:
        locked.chmod(0o755)


@pytest.mark.parametrize("options, message", [
    (dict(n_codebooks=2), "--n_codebooks applies to encode and resynth"),
    (dict(n_codebooks=2, chunk_seconds=5.0, file_statistics=True),
     "--n_codebooks, --chunk_seconds, --file_statistics apply to encode and resynth")])
def test_decode_refuses_the_options_a_codes_file_already_records(options, message):
    settings = dict(n_codebooks=None, keep_model_rate=False, chunk_seconds=None, stream_ms=None, batch_seconds=None,
                    file_statistics=False)
    settings.update(options)
    with pytest.raises(ValueError, match=message):
        inference.check_options("decode", **settings)
    inference.check_options("resynth", **settings)


def test_an_output_on_a_drive_that_does_not_exist_is_named(monkeypatch):
    """On Windows the root of an unmapped drive does not exist: the search for the nearest
    existing folder stops there instead of looping, and the line names it."""
    from utils import check_output_file, nearest_existing
    monkeypatch.setattr(os.path, "exists", lambda path: False)
    root = os.path.abspath(os.sep)
    assert nearest_existing(os.path.join(root, "x", "y")) == root
    with pytest.raises(ValueError, match=f"^--output: {re.escape(root)} does not exist$"):
        check_output_file(os.path.join(root, "x", "out.wav"), "--output")
