"""stream_demo.py: a wav or raw PCM on stdin in, the causal codec's output written as it goes."""
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch

import stream_demo
from config import save_config
from conftest import ROOT, TINY, make_config, write_tone
from models import Decoder, Encoder, remove_weight_norm
from streaming import causal_roundtrip

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
    out = causal_roundtrip(encoder, decoder, torch.from_numpy(audio)[None], h)["audio"][0].numpy()
    return np.round(np.clip(out, -1, 1) * 32767)


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
    for argv in (["--input", str(tmp_path / "x.wav")], ["--config", config, "--input", str(tmp_path / "x.wav")]):
        with pytest.raises(SystemExit) as exit_info:
            stream_demo.main(argv + ["--output", str(tmp_path / "o.wav"), "--random_weights"])
        assert "\n" not in str(exit_info.value)
    assert not (tmp_path / "o.wav").exists()
