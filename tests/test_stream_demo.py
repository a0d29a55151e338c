"""stream_demo.py: a wav or raw PCM on stdin in, the causal codec's output written as it goes."""
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch

import stream_demo
from checkpoints import release_state_dict
from codec import codec_roundtrip, pcm16
from config import save_config
from conftest import ROOT, TINY, make_config, write_tone
from models import Decoder, Encoder, random_encoder_decoder, remove_weight_norm
from streaming import StreamingCodec

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def causal_config(tmp_path):
    h = make_config(**TINY, causal=True)
    path = str(tmp_path / "causal.json")
    save_config(h, path)
    return h, path


def offline_pcm16(h, audio):
    torch.manual_seed(h.seed)
    encoder, decoder = remove_weight_norm(Encoder(h)).eval(), remove_weight_norm(Decoder(h)).eval()
    out = codec_roundtrip(encoder, decoder, torch.from_numpy(audio)[None], h)["audio"][0].numpy()
    return pcm16(out).astype(int)


def test_wav_in_wav_out_equals_the_offline_codec(tmp_path, causal_config, capsys):
    h, config = causal_config
    write_tone(str(tmp_path / "in.wav"), 0.1234)
    stream_demo.main(["--config", config, "--input", str(tmp_path / "in.wav"), "--output", str(tmp_path / "out.wav"),
                      "--random_weights", "--chunk_ms", "7"])
    printed = capsys.readouterr().out
    assert "Algorithmic latency 599 samples = 12.48 ms" in printed and "Compute per latent frame" in printed
    streamed, sr = sf.read(str(tmp_path / "out.wav"), dtype="int16")
    audio, _ = sf.read(str(tmp_path / "in.wav"), dtype="float32")
    assert sr == 48000 and streamed.size == audio.size
    assert np.abs(streamed - offline_pcm16(h, audio)).max() <= 1


def test_raw_pcm_from_stdin_to_stdout(tmp_path, causal_config):
    h, config = causal_config
    pcm = (np.random.default_rng(0).standard_normal(3000) * 3000).astype("<i2")
    result = subprocess.run([sys.executable, "stream_demo.py", "--config", config, "--input", "-", "--output", "-",
                             "--random_weights"], input=pcm.tobytes(), capture_output=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr.decode()
    assert b"Algorithmic latency" in result.stderr
    out = np.frombuffer(result.stdout, dtype="<i2")
    assert out.size == pcm.size
    assert np.abs(out - offline_pcm16(h, pcm.astype(np.float32) / 32768)).max() <= 1


def test_non_causal_config_and_missing_input_exit_in_one_line(tmp_path, causal_config):
    _, config = causal_config
    write_tone(str(tmp_path / "in.wav"), 0.05)
    for argv, message in ((["--input", str(tmp_path / "in.wav")], "causal"),
                          (["--config", config, "--input", str(tmp_path / "x.wav")], "x.wav")):
        with pytest.raises(SystemExit) as exit_info:
            stream_demo.main(argv + ["--output", str(tmp_path / "o.wav"), "--random_weights"])
        assert message in str(exit_info.value) and "\n" not in str(exit_info.value)
    assert not (tmp_path / "o.wav").exists()


def test_output_that_replaces_the_input_is_not_wav_or_cannot_be_a_file_is_refused(tmp_path, causal_config):
    _, config = causal_config
    source = write_tone(str(tmp_path / "in.wav"), 0.05)
    before = (tmp_path / "in.wav").read_bytes()
    (tmp_path / "folder").mkdir()
    for output, problem in ((source, "would replace --input"), (str(tmp_path / "o.flac"), "not .flac"),
                            (str(tmp_path / "o.OGG"), "not .ogg"),
                            (str(tmp_path / "folder"), "folder is a folder, where an output file goes"),
                            (str(tmp_path / "new") + os.sep, "new/ is a folder, where an output file goes"),
                            (os.path.join(source, "o.wav"), "in.wav is a file, where a folder of outputs goes")):
        with pytest.raises(SystemExit) as exit_info:
            stream_demo.main(["--config", config, "--input", source, "--output", output, "--random_weights"])
        assert problem in str(exit_info.value) and "\n" not in str(exit_info.value)
    assert (tmp_path / "in.wav").read_bytes() == before
    assert not [name for name in os.listdir(tmp_path) if name.startswith("o.")]


def test_an_interrupted_stream_keeps_what_it_coded(tmp_path, causal_config, monkeypatch, capsys):
    """Ctrl-C or SIGTERM is how a live stream ends: the push under way finishes, or the wait for
    the next chunk ends, and the output is that of a stream of the chunks read so far."""
    _, config = causal_config
    chunk = 7 * 48000 // 1000
    rng = np.random.default_rng(1)
    chunks = [(rng.standard_normal(chunk) * 0.1).astype(np.float32) for _ in range(8)]
    argv = ["--config", config, "--input", "-", "--random_weights", "--chunk_ms", "7", "--output"]

    def streamed(source, name):
        """The samples written and stderr of a stream of `source`'s chunks."""
        monkeypatch.setattr(stream_demo, "read_chunks", lambda path, h, size: source)
        capsys.readouterr()
        stream_demo.main(argv + [str(tmp_path / name)])
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        return sf.read(str(tmp_path / name), dtype="int16")[0], capsys.readouterr().err

    class TerminatedOnTheFifthPush(StreamingCodec):
        pushes = 0

        def push(self, audio):
            TerminatedOnTheFifthPush.pushes += 1
            if TerminatedOnTheFifthPush.pushes == 5:
                signal.raise_signal(signal.SIGTERM)
            return super().push(audio)

    def source_that_waits():
        # Ctrl-C while waiting for input that may never come
        yield from chunks[:3]
        signal.raise_signal(signal.SIGINT)
        yield from chunks[3:]

    five, _ = streamed(iter(chunks[:5]), "five.wav")
    three, _ = streamed(iter(chunks[:3]), "three.wav")
    waiting, err = streamed(source_that_waits(), "waiting.wav")
    assert "SIGINT: the stream ends here" in err and waiting.size == 3 * chunk and np.array_equal(waiting, three)
    monkeypatch.setattr(stream_demo, "StreamingCodec", TerminatedOnTheFifthPush)
    live, err = streamed(iter(chunks), "live.wav")
    assert "SIGTERM: the stream ends here" in err and live.size == 5 * chunk and np.array_equal(live, five)


def test_causal_checkpoints_stream_with_the_config_beside_them(tmp_path, causal_config):
    """A training run's folder holds its config: the default (non-causal) --config does not stop
    it, and the note saying so goes to stderr when raw audio goes to stdout."""
    h, _ = causal_config
    torch.manual_seed(0)
    run = tmp_path / "run"
    run.mkdir()
    for name, module in (("encoder", Encoder(h)), ("decoder", Decoder(h))):
        torch.save({name: release_state_dict(module)}, run / name)
    save_config(h, str(run / "config.json"))
    write_tone(str(tmp_path / "in.wav"), 0.05)
    checkpoints = ["--checkpoint_file_load_Encoder", str(run / "encoder"),
                   "--checkpoint_file_load_Decoder", str(run / "decoder")]
    stream_demo.main(["--input", str(tmp_path / "in.wav"), "--output", str(tmp_path / "out.wav")] + checkpoints)
    assert sf.info(str(tmp_path / "out.wav")).frames == sf.info(str(tmp_path / "in.wav")).frames
    pcm = (np.random.default_rng(0).standard_normal(3000) * 3000).astype("<i2")
    result = subprocess.run([sys.executable, "stream_demo.py", "--input", "-", "--output", "-"] + checkpoints,
                            input=pcm.tobytes(), capture_output=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr.decode()
    assert b"note: " in result.stderr and len(result.stdout) == pcm.nbytes


@pytest.mark.parametrize("option, value", [("--chunk_ms", "inf"), ("--chunk_ms", "nan"), ("--chunk_ms", "0"),
                                           ("--chunk_ms", "1e9"), ("--threads", "0")])
def test_bad_numbers_exit_in_one_line_naming_the_option(tmp_path, causal_config, option, value):
    _, config = causal_config
    write_tone(str(tmp_path / "in.wav"), 0.05)
    with pytest.raises(SystemExit) as exit_info:
        stream_demo.main(["--config", config, "--input", str(tmp_path / "in.wav"), "--output",
                          str(tmp_path / "o.wav"), "--random_weights", option, value])
    assert option in str(exit_info.value) and "\n" not in str(exit_info.value)


def test_a_stream_that_is_not_live_leaves_the_signals_to_the_process():
    """bench.py times streams with live=False: a SIGTERM then ends the process as usual, not
    only the stream under way (whose cut-short timing would be reported)."""
    h = make_config(**TINY, causal=True)
    encoder, decoder = random_encoder_decoder(h)

    class Stopped(Exception):
        pass

    def handler(signum, frame):
        raise Stopped
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        class TerminatedOnThePush(StreamingCodec):
            def push(self, audio):
                signal.raise_signal(signal.SIGTERM)
                return super().push(audio)
        with pytest.raises(Stopped):
            stream_demo.timed_stream(TerminatedOnThePush(encoder, decoder, h), iter([np.zeros(480, np.float32)]),
                                     lambda samples: None)
        assert signal.getsignal(signal.SIGTERM) is handler
    finally:
        signal.signal(signal.SIGTERM, previous)
