"""codec.py: codes files, bitrate choice, any rate and channel count, chunked long inputs."""
import glob
import os
import struct
import zlib

import numpy as np
import pytest
import soundfile as sf
import soxr
import torch

import codec as codec_module
import inference
from codec import (HEADER_FIELDS, Codec, CodesFile, code_bits, codec_roundtrip, decoding_weights_hash, latent_frames,
                   load_codec, pack_codes, pcm16, unpack_codes, window_spans, write_wav)
from config import SCHEMA, bitrate, build_config, read_config_file
from conftest import ROOT, TINY, default_raw, make_config, tone, write_tone
from dataset import load_audio
from models import Decoder, Encoder, remove_weight_norm
from test_inference import _save_random_codec, _train_config_beside

# Tiny sizes with the paper's 10-bit codebooks, so that bitrates are the paper's.
TINY_1024 = dict(TINY, codebook_size=1024)
HEADER_BYTES = struct.calcsize("<" + "".join(code for _, code, _ in HEADER_FIELDS))


def _codec(h, seed=0, chunk_seconds=30.0):
    torch.manual_seed(seed)
    return Codec(h, remove_weight_norm(Encoder(h)).eval(), remove_weight_norm(Decoder(h)).eval(),
                 torch.device("cpu"), chunk_seconds)


@pytest.fixture(scope="module", params=["paper", "causal"])
def codec(request):
    """The paper's codec, and the causal one (APCodec-S): codes files work the same for both."""
    return _codec(make_config(**TINY_1024, causal=request.param == "causal"))


def _snr(reference, test):
    return 10 * np.log10(np.sum(reference ** 2) / np.sum((reference - test) ** 2))


def test_pack_unpack_round_trip_and_bit_layout():
    rng = np.random.default_rng(0)
    for bits in (1, 6, 10, 13):
        codes = rng.integers(0, 2 ** bits, size=(3, 4, 17))
        data = pack_codes(codes, bits)
        assert len(data) == -(-codes.size * bits // 8)
        assert np.array_equal(unpack_codes(data, bits, codes.size).reshape(codes.shape), codes)
    # By hand: 10-bit codes 1 and 1023 -> 0000000001 1111111111 (+ 4 zero bits).
    assert pack_codes(np.array([1, 1023]), 10) == bytes([0b00000000, 0b01111111, 0b11110000])
    assert code_bits(1024) == 10 and code_bits(1000) == 10 and code_bits(64) == 6


def test_codes_file_round_trip_equals_in_memory_codes_and_audio(codec, tmp_path):
    audio = tone(0.5)
    codes = codec.encode(audio, 48000)
    direct = codec_roundtrip(codec.encoder, codec.decoder, torch.from_numpy(audio)[None], codec.h)
    assert torch.equal(codes.codes[0], direct["codes"][0])
    codes.save(str(tmp_path / "a.apc"))
    loaded = CodesFile.load(str(tmp_path / "a.apc"))
    assert torch.equal(loaded.codes, codes.codes) and loaded.model_hash == codec.model_hash
    decoded, rate = codec.decode(loaded)
    resynth, _ = codec.resynthesize(audio, 48000)
    assert rate == 48000 and decoded.shape == (1, audio.size)
    # The same audio up to float rounding: codebook rows instead of the straight-through latent.
    assert np.abs(decoded - resynth).max() < 1e-4 and np.abs(decoded[0] - direct["audio"][0].numpy()).max() < 1e-4


def test_file_size_per_second_is_the_nominal_bitrate(codec):
    h = codec.h
    assert bitrate(h) == 6000
    codes = codec.encode(tone(10.0), 48000)
    size = len(codes.to_bytes())
    frames = latent_frames(480000, h)
    assert frames == 1501     # 12001 STFT frames / ratio 8, rounded up
    assert HEADER_BYTES == 100 and size == HEADER_BYTES + -(-frames * 4 * 10 // 8)
    assert abs(size * 8 / 10.0 / 6000 - 1) < 0.02


def test_fewer_codebooks_give_smaller_files_and_prefix_codes(codec):
    audio = tone(1.0)
    full = codec.encode(audio, 48000)
    payload = len(full.to_bytes()) - HEADER_BYTES
    for n in (1, 2, 3):
        fewer = codec.encode(audio, 48000, n_codebooks=n)
        assert fewer.n_codebooks == n
        # Residual VQ: the first n stages do not depend on the later ones.
        assert torch.equal(fewer.codes, full.codes[:, :n])
        assert len(fewer.to_bytes()) - HEADER_BYTES == -(-full.codes.size(-1) * n * 10 // 8)
        assert codec.decode(fewer)[0].shape == (1, audio.size)
    assert payload == -(-full.codes.size(-1) * 4 * 10 // 8)
    with pytest.raises(ValueError, match="n_codebooks"):
        codec.encode(audio, 48000, n_codebooks=5)


def test_bad_files_are_one_line_errors_naming_the_file(codec, tmp_path):
    good = codec.encode(tone(0.3), 48000)
    data = good.to_bytes()
    cases = {
        "truncated.apc": (data[:-7], "truncated"),
        "header_only.apc": (data[:40], "truncated"),
        "corrupted.apc": (data[:100] + bytes([data[100] ^ 0x10]) + data[101:], "corrupted"),
        "trailing.apc": (data + b"\0", "corrupted"),
        "foreign.apc": (b"RIFF" + bytes(200), "not an APCodec codes file"),
        "empty.apc": (b"", "not an APCodec codes file"),
    }
    for name, (content, problem) in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(ValueError) as info:
            CodesFile.load(str(path))
        message = str(info.value)
        assert str(path) in message and problem in message and "\n" not in message
    # Well-formed files (valid checksums) that hold nothing to decode.
    for field, bad in (("codebooks", CodesFile(**{**good.__dict__, "codes": good.codes[:, :0]})),
                       ("channels", CodesFile(**{**good.__dict__, "codes": good.codes[:0]})),
                       ("samples", CodesFile(**{**good.__dict__, "original_length": 0}))):
        path = tmp_path / f"no_{field}.apc"
        bad.save(str(path))
        for decode in (codec.decode, lambda c: codec.decode_to_file(c, str(tmp_path / "out.wav"))):
            with pytest.raises(ValueError, match=f"{path}: corrupted codes file .*0 {field}"):
                decode(CodesFile.load(str(path)))
        assert not (tmp_path / "out.wav").exists()
    other = _codec(codec.h, seed=1)
    good.name = "speech.apc"
    with pytest.raises(ValueError, match="speech.apc: encoded by another model"):
        other.decode(good)


def test_header_records_the_window_and_causality_and_version_1_files_still_decode(codec):
    """Weights of a causal model fit the non-causal network, and win_size changes no weight:
    the header (version 2) records both, by hand at bytes 18-21 and 26-27. A version 1 file
    (the same header without them) decodes as before, and is written back as version 1."""
    h = codec.h
    codes = codec.encode(tone(0.3), 48000)
    data = codes.to_bytes()
    assert struct.unpack_from("<4sHIIIIIH", data) == (b"APCD", 2, 48000, h.n_fft, h.hop_size, h.win_size, h.ratio,
                                                      int(h.causal))
    body = data[:4] + struct.pack("<H", 1) + data[6:18] + data[22:26] + data[28:96]
    old = body + struct.pack("<I", zlib.crc32(data[100:], zlib.crc32(body))) + data[100:]
    earlier = CodesFile.from_bytes(old)
    assert earlier.win_size is None and earlier.causal is None and torch.equal(earlier.codes, codes.codes)
    assert np.array_equal(codec.decode(earlier)[0], codec.decode(codes)[0])
    assert earlier.to_bytes() == old
    assert CodesFile.from_bytes(data).causal is h.causal


def test_a_mismatch_is_named_by_what_differs(codec):
    """Each field that decoding needs, when it differs from the model's, is named with both
    values (the same weights decode a file of another window or causality wrongly)."""
    h = codec.h
    codes = codec.encode(tone(0.3), 48000)
    codes.name = "a.apc"
    for key, value in (("win_size", h.win_size // 2), ("causal", not h.causal), ("sampling_rate", 44100),
                       ("hop_size", h.hop_size * 2), ("codebook_size", 512)):
        changed = CodesFile(**{**codes.__dict__, key: value})
        with pytest.raises(ValueError, match=rf"^a.apc: encoded by a model with {key} {value}, this one has "
                                             rf"{h[key]}; decode it with the config and checkpoints"):
            codec.check_compatible(changed)
    more = CodesFile(**{**codes.__dict__, "codes": codes.codes.repeat(1, 2, 1)})
    with pytest.raises(ValueError, match=f"^a.apc: encoded with {2 * h.n_codebooks} codebooks, this model has "
                                         f"{h.n_codebooks}"):
        codec.check_compatible(more)
    for field, value, problem in (("original_sample_rate", 0, "samples at 0 Hz"),
                                  ("model_length", codes.model_length + 1, f"but {codes.model_length + 1} at the "
                                                                           f"model's rate where they make")):
        with pytest.raises(ValueError, match=f"^a.apc: corrupted codes file .*{problem}"):
            codec.check_compatible(CodesFile(**{**codes.__dict__, field: value}))
    for wrong in (2.0, True, 0):
        with pytest.raises(ValueError, match="--n_codebooks must be a whole number in 1"):
            codec.encode(tone(0.1), 48000, n_codebooks=wrong)
    with pytest.raises(ValueError, match=r"sample_rate must be a positive whole number of Hz below 2\*\*32"):
        codec.encode(tone(0.1), 2 ** 32)


def test_codes_decode_on_machines_that_fold_weight_norm_to_other_last_bits(tmp_path, monkeypatch):
    """`load_codec` hashes the weights as stored. Another machine's kernels may fold weight norm
    into weights that differ in the last bits (here: every folded weight moved one step); its
    codec still decodes the file, to the same audio up to float rounding. Files of earlier
    versions, which carry the folded weights' hash, decode too."""
    h = make_config(**TINY_1024)
    enc_path, dec_path = _save_random_codec(h, str(tmp_path))
    here = Codec.load(h, enc_path, dec_path, torch.device("cpu"))
    codes = here.encode(tone(0.3), 48000)
    built = Codec(h, *load_codec(h, enc_path, dec_path, torch.device("cpu"))[:2], torch.device("cpu"), chunk_seconds=5)
    assert built.model_hash == here.model_hash
    built.check_compatible(codes)

    def fold_elsewhere(module):
        module = remove_weight_norm(module)
        with torch.no_grad():
            for p in module.parameters():
                p.copy_(torch.nextafter(p, torch.full_like(p, float("inf"))))
        return module
    monkeypatch.setattr(codec_module, "remove_weight_norm", fold_elsewhere)
    there = Codec.load(h, enc_path, dec_path, torch.device("cpu"))
    assert not torch.equal(there.decoder.amp_out.weight, here.decoder.amp_out.weight)
    assert there.model_hash == here.model_hash
    assert np.abs(there.decode(codes)[0] - here.decode(codes)[0]).max() < 1e-4
    earlier = CodesFile.from_bytes(codes.to_bytes())
    earlier.model_hash = decoding_weights_hash(here.encoder, here.decoder)
    assert earlier.model_hash != here.model_hash
    here.check_compatible(earlier)
    with pytest.raises(ValueError, match="encoded by another model"):
        there.check_compatible(earlier)


def test_resampled_inputs_come_back_at_their_rate_and_length(codec):
    """Resampled by soxr here, coded at the model's rate, resampled back: as the codec does it."""
    def near(out, expected):
        n = min(out.shape[-1], expected.shape[-1])
        return np.linalg.norm(out[0, :n] - expected[:n]) <= 1e-4 * np.linalg.norm(expected[:n])

    for rate, length in ((44100, 13001), (16000, 4001), (22050, 77)):
        audio = tone(length / rate + 0.01, sr=rate)[:length]
        out, out_rate = codec.resynthesize(audio, rate)
        assert out.shape == (1, length) and out_rate == rate and np.isfinite(out).all()
        codes = codec.encode(audio, rate)
        assert codes.original_sample_rate == rate and codes.original_length == length
        assert codec.decode(codes)[0].shape == (1, length)
        kept, kept_rate = codec.decode(codes, keep_model_rate=True)
        assert kept_rate == 48000 and kept.shape == (1, -(-length * 48000 // rate))
        if length > 1000:
            at_model_rate = codec.resynthesize(soxr.resample(audio, rate, 48000, "HQ"), 48000)[0][0]
            assert near(kept, at_model_rate) and near(codec.resynthesize(audio, rate, keep_model_rate=True)[0],
                                                      at_model_rate)
            assert near(out, soxr.resample(at_model_rate, 48000, rate, "HQ"))


def test_channels_are_coded_separately_and_keep_their_order(codec):
    left, right = tone(0.2, f0=150, seed=1), tone(0.2, f0=600, seed=2) * 0.5
    stereo, _ = codec.resynthesize(np.stack([left, right]), 48000)
    for channel, mono in enumerate((left, right)):
        alone, _ = codec.resynthesize(mono, 48000)
        assert np.abs(stereo[channel] - alone[0]).max() < 1e-5
    assert not np.allclose(stereo[0], stereo[1])
    # Through bytes: the stored layout of several channels and codebooks reads back as written.
    swapped, _ = codec.decode(CodesFile.from_bytes(codec.encode(np.stack([right, left, right]), 48000).to_bytes()))
    assert swapped.shape == (3, left.size) and np.abs(swapped[1] - stereo[0]).max() < 1e-4


@pytest.mark.parametrize("length", [1, 100, 519, 4801])
def test_silence_and_very_short_clips(codec, length):
    for audio in (np.zeros(length, np.float32), tone(0.2)[:length]):
        out, _ = codec.resynthesize(audio, 48000)
        assert out.shape == (1, length) and np.isfinite(out).all()
        assert codec.decode(CodesFile.from_bytes(codec.encode(audio, 48000).to_bytes()))[0].shape == (1, length)


@pytest.mark.parametrize("audio, rate, message", [
    ((tone(0.1) * 32767).astype(np.int16), 48000, "audio must be floating point in \\[-1, 1\\], got int16 samples"),
    (np.stack([tone(0.1)] * 2, axis=1), 48000, r"audio of shape \(4800, 2\) would be 4800 channels of 2 samples"),
    (tone(0.1), 44100.5, "sample_rate must be a positive whole number of Hz below 2\\*\\*32, got 44100.5"),
    (tone(0.1), 0, "sample_rate must be a positive whole number of Hz below 2\\*\\*32, got 0"),
])
def test_audio_that_would_code_wrong_is_refused_in_one_line(codec, audio, rate, message):
    for code in (codec.resynthesize, codec.encode):
        with pytest.raises(ValueError, match=f"^{message}"):
            code(audio, rate)


def test_a_whole_float_sample_rate_and_more_channels_than_samples_are_taken(codec):
    assert codec.resynthesize(np.stack([tone(0.1)[:1]] * 6), 48000)[0].shape == (6, 1)
    audio = tone(0.1)
    assert np.array_equal(codec.resynthesize(audio, np.float32(48000))[0], codec.resynthesize(audio, 48000)[0])
    assert codec.encode(audio, 44100.0).original_sample_rate == 44100


def test_non_finite_audio_is_refused(codec):
    audio = tone(0.1)
    audio[7] = float("nan")
    for code in (codec.resynthesize, codec.encode):
        with pytest.raises(ValueError, match="NaN or infinite samples"):
            code(audio, 48000)


def test_audio_of_more_than_two_dimensions_is_refused(codec):
    for code in (codec.resynthesize, codec.encode):
        with pytest.raises(ValueError, match=r"audio must be \(samples,\) or \(channels, samples\), got shape \(1, 2, "):
            code(np.stack([tone(0.1), tone(0.1)])[None], 48000)


def test_resynthesize_files_checks_n_codebooks(tmp_path):
    codec = _codec(make_config(**TINY_1024))
    write_tone(tmp_path / "a.wav", 0.3)
    for n in (0, -1, codec.h.n_codebooks + 1):
        with pytest.raises(ValueError, match=f"--n_codebooks must be a whole number in 1 ... {codec.h.n_codebooks}.*got {n}"):
            list(codec.resynthesize_files([(str(tmp_path / "a.wav"), str(tmp_path / "b.wav"))], n_codebooks=n))
    assert not (tmp_path / "b.wav").exists()


def test_window_spans_cover_the_input():
    assert window_spans(100, 0, 0) == [(0, 100)]
    assert window_spans(150, 100, 50) == [(0, 150)]
    assert window_spans(151, 100, 50) == [(0, 150), (100, 51)]
    spans = window_spans(1234, 100, 40)
    assert spans[0][0] == 0 and spans[-1][0] + spans[-1][1] == 1234
    assert all(b[0] - a[0] == 100 and a[1] == 140 for a, b in zip(spans, spans[1:]))
    assert spans[-1][1] > 40


def test_chunked_output_matches_whole_file_output_on_a_long_signal():
    """Seams: chunked vs whole-input output of the same model, >= 40 dB SNR; a chunked codes
    file decodes to the chunked resynthesis. (At initialisation GRN is the identity, so this
    measures the windowing and crossfade alone; see docs/benchmarks.md for trained models.)"""
    h = make_config(**TINY_1024)
    whole, chunked = _codec(h, chunk_seconds=60), _codec(h, chunk_seconds=2)
    rng = np.random.default_rng(0)
    # Five 1.2 s notes of different pitch and loudness: not stationary across windows.
    audio = np.concatenate([tone(1.2, f0=f0, seed=i) * rng.uniform(0.2, 1.0)
                            for i, f0 in enumerate(rng.uniform(100, 400, 5))])
    reference, _ = whole.resynthesize(audio, 48000)
    out, _ = chunked.resynthesize(audio, 48000)
    assert len(chunked.windows(audio.size)) == 3 and out.shape == reference.shape == (1, audio.size)
    assert _snr(reference, out) >= 40
    codes = CodesFile.from_bytes(chunked.encode(audio, 48000).to_bytes())
    assert codes.chunk_length == 96000 and codes.chunk_overlap == 48000
    decoded, _ = chunked.decode(codes)
    assert np.abs(decoded - out).max() < 1e-4


@pytest.mark.parametrize("blocks", [1, 3])
def test_file_statistics_make_chunked_codes_those_of_one_pass(blocks):
    """GRN pools over the whole input: with strong encoder GRN weights (trained ones grow so) and
    an input whose halves differ, each window's own statistics change the latents enough to flip
    codes; the whole input's statistics, gathered in one pass over the windows, give one pass's
    codes and output (exactly for the first block, nearly for later ones)."""
    h = make_config(**dict(TINY_1024, convnext_layers=blocks))
    torch.manual_seed(0)
    encoder, decoder = remove_weight_norm(Encoder(h)).eval(), remove_weight_norm(Decoder(h)).eval()
    with torch.no_grad():
        for block in list(encoder.amp.blocks) + list(encoder.pha.blocks):
            block.grn.gamma.normal_(0, 5.0)
            block.grn.beta.normal_(0, 0.5)
    rng = np.random.default_rng(0)
    audio = np.concatenate([tone(3.0, f0=150, seed=1), 0.3 * rng.standard_normal(3 * 48000).astype(np.float32)])
    one_pass = Codec(h, encoder, decoder, torch.device("cpu"), chunk_seconds=60)
    reference, _ = one_pass.resynthesize(audio, 48000)
    first_window = one_pass.encode(audio, 48000).codes[..., :2 * 150]
    results = {}
    for file_statistics in (False, True):
        chunked = Codec(h, encoder, decoder, torch.device("cpu"), chunk_seconds=2, file_statistics=file_statistics)
        out, _ = chunked.resynthesize(audio, 48000)
        codes = chunked.encode(audio, 48000)
        assert len(chunked.windows(audio.size)) == 3 and codes.chunk_length == 96000
        flipped = (codes.codes[..., :2 * 150] != first_window).sum().item()
        results[file_statistics] = (_snr(reference, out), flipped)
    assert results[False][0] < 30 and results[False][1] > 0
    assert results[True][0] >= 80 and results[True][1] == 0


def test_chunked_files_stream_to_exact_length(codec, tmp_path):
    h = codec.h
    chunked = Codec(h, codec.encoder, codec.decoder, torch.device("cpu"), chunk_seconds=1.0)
    source = write_tone(str(tmp_path / "in.flac"), 2.3, sr=44100, channels=2)
    out_path = str(tmp_path / "out.wav")
    seconds = chunked.resynthesize_file(source, out_path)
    info = sf.info(out_path)
    assert (info.frames, info.samplerate, info.channels) == (sf.info(source).frames, 44100, 2)
    assert abs(seconds - info.frames / 44100) < 1e-9
    codes = chunked.encode_file(source)
    assert codes.chunk_length and codes.name == source
    chunked.decode_to_file(codes, str(tmp_path / "decoded.wav"))
    resynth, decoded = sf.read(out_path), sf.read(str(tmp_path / "decoded.wav"))
    assert resynth[0].shape == decoded[0].shape and np.abs(resynth[0] - decoded[0]).max() <= 2 / 32768


def test_default_resynthesis_is_the_whole_file_roundtrip(codec, tmp_path):
    """A 48 kHz mono file shorter than a chunk gives codec_roundtrip's samples (the reference path),
    to float rounding: at most one 16-bit step apart."""
    path = write_tone(str(tmp_path / "a.wav"), 0.77)
    codec.resynthesize_file(path, str(tmp_path / "out.wav"))
    audio = torch.from_numpy(load_audio(path, 48000))[None]
    expected = codec_roundtrip(codec.encoder, codec.decoder, audio, codec.h)["audio"][0].numpy()
    sf.write(str(tmp_path / "expected.wav"), expected, 48000, subtype="PCM_16")
    got = sf.read(str(tmp_path / "out.wav"), dtype="int16")[0].astype(int)
    assert np.abs(got - sf.read(str(tmp_path / "expected.wav"), dtype="int16")[0]).max() <= 1


@pytest.mark.parametrize("subtype", ["PCM_16", "PCM_24", "PCM_32", "FLOAT"])
def test_int_and_float_inputs(codec, tmp_path, subtype):
    """Each sample format is read as its float values: the file's output is that of the
    samples soundfile reads, to one 16-bit step."""
    path = str(tmp_path / "a.wav")
    sf.write(path, tone(0.1), 48000, subtype=subtype)
    codec.resynthesize_file(path, str(tmp_path / "out.wav"))
    out, rate = sf.read(str(tmp_path / "out.wav"), dtype="int16")
    expected = codec.resynthesize(sf.read(path, dtype="float32")[0], 48000)[0][0]
    assert rate == 48000 and out.shape == (4800,)
    assert np.abs(out.astype(int) - pcm16(expected)).max() <= 1


def test_wavs_are_rounded_to_the_nearest_16_bit_step(tmp_path):
    """libsndfile's float to 16-bit conversion rounds down (half a step low on average, a DC
    offset in every output); `write_wav` rounds to the nearest step. By hand: 0.6, -0.4, 1.4,
    -0.6 steps are written as 1, 0, 1, -1, and full scale is clipped."""
    path = str(tmp_path / "a.wav")
    steps = np.array([0.6, -0.4, 1.4, -0.6, 40000.0, -40000.0], np.float32)
    write_wav(path, [steps / 32768], 48000, 1)
    assert sf.read(path, dtype="int16")[0].tolist() == [1, 0, 1, -1, 32767, -32768]
    x = np.random.default_rng(0).uniform(-0.9, 0.9, 48000).astype(np.float32)
    write_wav(path, [x], 48000, 1)
    error = sf.read(path, dtype="float64")[0] - x
    assert np.abs(error).max() <= 0.5 / 32768 + 1e-9 and abs(error.mean()) < 0.02 / 32768


def test_inference_encode_and_decode_modes_mirror_the_tree(tmp_path, tiny_h):
    inputs = tmp_path / "in"
    for name, seconds in (("a.wav", 0.2), ("sub/b.wav", 0.1), ("sub/deeper/c.flac", 0.05)):
        (inputs / name).parent.mkdir(parents=True, exist_ok=True)
        write_tone(str(inputs / name), seconds, sr=44100 if name.endswith("flac") else 48000)
    enc_path, dec_path = _train_config_beside(tmp_path, tiny_h)
    common = ["--checkpoint_file_load_Encoder", enc_path, "--checkpoint_file_load_Decoder", dec_path]
    inference.main(["--mode", "encode", "--n_codebooks", "2", "--test_input_wavs_dir", str(inputs),
                    "--test_wav_output_dir", str(tmp_path / "codes")] + common)
    found = sorted(os.path.relpath(p, tmp_path / "codes") for p in glob.glob(str(tmp_path / "codes/**/*.apc"),
                                                                              recursive=True))
    assert found == ["a.apc", "sub/b.apc", "sub/deeper/c.apc"]
    assert CodesFile.load(str(tmp_path / "codes/a.apc")).n_codebooks == 2
    inference.main(["--mode", "decode", "--test_input_wavs_dir", str(tmp_path / "codes"),
                    "--test_wav_output_dir", str(tmp_path / "decoded")] + common)
    for name, frames, rate in (("a.wav", 9600, 48000), ("sub/b.wav", 4800, 48000), ("sub/deeper/c.wav", 2205, 44100)):
        info = sf.info(str(tmp_path / "decoded" / name))
        assert (info.frames, info.samplerate) == (frames, rate)
    # A single codes file works too.
    inference.main(["--mode", "decode", "--test_input_wavs_dir", str(tmp_path / "codes/a.apc"),
                    "--test_wav_output_dir", str(tmp_path / "single"), "--keep_model_rate"] + common)
    assert sf.info(str(tmp_path / "single/a.wav")).frames == 9600


def test_inference_decode_checks_every_file_before_writing(tmp_path, tiny_h, capsys):
    write_tone(str(tmp_path / "a.wav"), 0.1)
    enc_path, dec_path = _train_config_beside(tmp_path, tiny_h)
    common = ["--checkpoint_file_load_Encoder", enc_path, "--checkpoint_file_load_Decoder", dec_path]
    inference.main(["--mode", "encode", "--test_input_wavs_dir", str(tmp_path / "a.wav"),
                    "--test_wav_output_dir", str(tmp_path / "codes")] + common)
    assert "encode: 1 file done, 0 failed" in capsys.readouterr().out
    (tmp_path / "codes" / "z.apc").write_bytes((tmp_path / "codes" / "a.apc").read_bytes()[:-3])
    with pytest.raises(SystemExit) as info:
        inference.main(["--mode", "decode", "--test_input_wavs_dir", str(tmp_path / "codes"),
                        "--test_wav_output_dir", str(tmp_path / "decoded")] + common)
    message = str(info.value)
    assert "z.apc" in message and "truncated" in message and "\n" not in message
    assert not (tmp_path / "decoded").exists()
    with pytest.raises(SystemExit, match="n_codebooks must be a whole number in 1 ... 4"):
        inference.main(["--mode", "encode", "--n_codebooks", "9", "--test_input_wavs_dir", str(tmp_path / "a.wav"),
                        "--test_wav_output_dir", str(tmp_path / "more")] + common)
    assert not (tmp_path / "more").exists()


PRESETS = {"apcodec_48k_6kbps": 6000, "apcodec_48k_12kbps": 12000,
           "apcodec_16k_2kbps": 2000, "apcodec_16k_4kbps": 4000, "apcodec_s_48k": 6000}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_build_and_have_their_bitrate(name):
    path = os.path.join(ROOT, "configs", name + ".json")
    h = build_config(read_config_file(path), path)
    assert bitrate(h) == PRESETS[name]
    encoder, decoder = Encoder(h).eval(), Decoder(h).eval()
    audio = torch.from_numpy(tone(0.1, sr=h.sampling_rate))[None]
    out = codec_roundtrip(encoder, decoder, audio, h)
    assert out["audio"].shape == audio.shape and out["codes"].shape[1] == h.n_codebooks
    # A preset names every key, in the schema's order, so that it reads as config.json does.
    assert list(read_config_file(path)) == [key.name for key in SCHEMA]
    if name == "apcodec_48k_6kbps":
        assert read_config_file(path) == default_raw()
    assert sorted(glob.glob(os.path.join(ROOT, "configs", "*.json"))) == sorted(
        os.path.join(ROOT, "configs", n + ".json") for n in PRESETS)
