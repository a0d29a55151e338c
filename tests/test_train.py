"""train.py: a few CPU steps write a checkpoint set in the release layout; a second run resumes."""
import json
import math
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import soundfile as sf

import pytest
import torch

import train
from conftest import ROOT, TINY, make_config, tone, write_tone
from checkpoints import checkpoint_steps, load_release_state_dict, newest_complete_step
from models import Encoder


def _setup(tmp_path, **overrides):
    wavs = tmp_path / "wavs"
    wavs.mkdir(parents=True)
    names = []
    for i in range(4):
        write_tone(str(wavs / f"clip{i}.wav"), 0.3 + 0.05 * i, f0=150 + 40 * i, seed=i)
        names.append(f"wavs/clip{i}.wav")
    (tmp_path / "train.txt").write_text("# training clips\n" + "\n".join(names) + "\n\n")
    (tmp_path / "valid.txt").write_text(names[0] + "\n")
    settings = dict(TINY, input_training_wav_list=str(tmp_path / "train.txt"),
                    input_validation_wav_list=str(tmp_path / "valid.txt"),
                    checkpoint_path=str(tmp_path / "cp"), training_epochs=2, checkpoint_interval=3,
                    stdout_interval=1, summary_interval=1, validation_interval=3)
    settings.update(overrides)
    return make_config(**settings)


def test_train_writes_checkpoints_and_resumes(tmp_path, capsys):
    h = _setup(tmp_path)
    first = train.train(h, torch.device("cpu"))
    # 4 clips / batch 2 = 2 steps per epoch, 2 epochs: steps 0..3; checkpoint at 3.
    assert first.steps == 4
    assert newest_complete_step(h.checkpoint_path) == 3
    saved_config = json.load(open(os.path.join(h.checkpoint_path, "config.json")))
    assert saved_config["latent_dim"] == TINY["latent_dim"]
    do = torch.load(os.path.join(h.checkpoint_path, "do_00000003"), weights_only=False)
    # The release's entries, plus what an exact resume needs.
    assert set(do) == {"mpd", "mrd", "optim_g", "optim_d", "steps", "epoch",
                       "position", "scheduler_g", "scheduler_d", "random_states", "nonfinite_total"}
    assert do["steps"] == 3 and do["epoch"] == 1 and do["position"] == 2
    assert len(do["optim_g"]["state"]) == len(list(first.encoder.parameters())) + len(list(first.decoder.parameters()))
    assert all(s["step"].item() == 4 for s in do["optim_g"]["state"].values())
    enc_sd = torch.load(os.path.join(h.checkpoint_path, "encoder_00000003"), weights_only=False)["encoder"]
    assert "latent_output_conv.weight_g" in enc_sd and "embed_logamp.weight" in enc_sd

    # The saved weights are the trained ones.
    encoder = Encoder(h)
    load_release_state_dict(encoder, enc_sd)
    for (name, a), b in zip(encoder.state_dict().items(), first.encoder.state_dict().values()):
        assert torch.equal(a, b), name

    # Resume with one more epoch: the set was saved after the last batch of epoch index 1,
    # so that epoch has nothing left, and epoch 2 trains steps 4 and 5.
    h2 = _setup(tmp_path / "again", checkpoint_path=h.checkpoint_path, training_epochs=3)
    second = train.train(h2, torch.device("cpu"))
    assert second.steps == 6
    assert checkpoint_steps(h.checkpoint_path, "do") == [3, 5]
    do = torch.load(os.path.join(h.checkpoint_path, "do_00000005"), weights_only=False)
    # The final set stores the number of finished epochs, so a restart has nothing left to do.
    assert do["steps"] == 5 and do["epoch"] == 3 and do["position"] == 0
    assert all(s["step"].item() == 6 for s in do["optim_g"]["state"].values())
    assert all(s["step"].item() == 6 for s in do["optim_d"]["state"].values())
    # The lr decayed once per finished epoch (0, 1 and 2), as in an uninterrupted run.
    lr = do["optim_g"]["param_groups"][0]["lr"]
    assert lr == pytest.approx(h.learning_rate * h.lr_decay ** 3, rel=1e-9)

    third = train.train(h2, torch.device("cpu"))
    assert third.steps == 6 and checkpoint_steps(h.checkpoint_path, "do") == [3, 5]
    assert "Nothing to train: the run in" in capsys.readouterr().out


def test_short_and_silent_validation_clips_validate(tmp_path, capsys):
    """A 28-sample clip is padded for the analysis; a silent one has no SNR, left out of the mean."""
    h = _setup(tmp_path, training_epochs=1)
    sf.write(tmp_path / "wavs" / "blip.wav", tone(0.01)[:28], 48000)
    sf.write(tmp_path / "wavs" / "silence.wav", np.zeros(4000, np.float32), 48000)
    (tmp_path / "valid.txt").write_text("wavs/clip0.wav\nwavs/blip.wav\nwavs/silence.wav\n")
    train.train(h, torch.device("cpu"))
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("Validation at step 0"))
    values = dict(item.rsplit(" ", 1) for item in line.split(": ", 1)[1].split(", "))
    assert all(math.isfinite(float(v)) for v in values.values()), line


def test_incomplete_checkpoint_set_is_ignored(tmp_path):
    h = _setup(tmp_path, training_epochs=1)
    train.train(h, torch.device("cpu"))
    assert newest_complete_step(h.checkpoint_path) == 1
    # An encoder file without its do_ partner (a run killed mid-save) is not a set.
    torch.save({}, os.path.join(h.checkpoint_path, "encoder_00000009"))
    assert newest_complete_step(h.checkpoint_path) == 1


def test_list_without_usable_files_fails_before_any_model_is_built(tmp_path, monkeypatch):
    h = _setup(tmp_path)
    (tmp_path / "train.txt").write_text("wavs/missing.wav\n")
    monkeypatch.setattr(train, "Trainer", lambda *a: pytest.fail("a model was built"))
    with pytest.raises(ValueError, match="train.txt: no usable audio file"):
        train.train(h, torch.device("cpu"))


def test_bad_files_are_reported_and_skipped_and_strict_mode_fails(tmp_path, capsys):
    h = _setup(tmp_path, training_epochs=1, validation_interval=100)
    (tmp_path / "wavs" / "empty.wav").write_bytes(b"")
    data = open(tmp_path / "wavs" / "clip0.wav", "rb").read()
    (tmp_path / "wavs" / "truncated.wav").write_bytes(data[:100])
    (tmp_path / "wavs" / "notes.wav").write_text("not audio")
    nan = tone(0.3)
    nan[5] = np.inf
    sf.write(tmp_path / "wavs" / "inf.wav", nan, 48000, subtype="FLOAT")
    sf.write(tmp_path / "wavs" / "silent.wav", np.zeros(9000, np.float32), 48000)
    bad = ["missing.wav", "empty.wav", "truncated.wav", "notes.wav", "inf.wav", "silent.wav"]
    good = [f"wavs/clip{i}.wav" for i in range(4)]
    (tmp_path / "train.txt").write_text("\n".join(good[:2] + [f"wavs/{n}" for n in bad] + good[2:]) + "\n")
    trainer = train.train(h, torch.device("cpu"))
    assert trainer.steps == 2
    out = capsys.readouterr().out
    for name in bad:
        assert f"skipping {tmp_path / 'wavs' / name}: " in out, name
    assert "4 usable files" in out and "6 skipped" in out
    h.strict_data = True
    with pytest.raises(ValueError, match="6 unusable file.*strict_data is on"):
        train.train(h, torch.device("cpu"))


def test_left_out_files_are_named(tmp_path, capsys):
    h = _setup(tmp_path, batch_size=3, training_epochs=1, validation_interval=100)
    train.train(h, torch.device("cpu"))
    assert "1 file(s) are left out of every epoch" in capsys.readouterr().out


def test_config_errors_come_before_any_model(tmp_path, monkeypatch):
    monkeypatch.setattr(train, "Trainer", lambda *a: pytest.fail("a model was built"))
    (tmp_path / "a_file").write_text("")
    h = _setup(tmp_path, checkpoint_path=str(tmp_path / "a_file" / "cp"))
    with pytest.raises(ValueError, match="config key 'checkpoint_path': cannot write to"):
        train.train(h, torch.device("cpu"))
    h = _setup(tmp_path / "x")
    usage = shutil.disk_usage(tmp_path)._replace(free=1000)
    with monkeypatch.context() as patch:
        patch.setattr(train.shutil, "disk_usage", lambda path: usage)
        with pytest.raises(ValueError, match="config key 'checkpoint_path': .* 0.00 GB free, one checkpoint set"):
            train.train(h, torch.device("cpu"))
    h = _setup(tmp_path / "y", input_validation_wav_list=str(tmp_path / "nowhere.txt"))
    with pytest.raises(FileNotFoundError, match="file list not found: .*nowhere.txt"):
        train.train(h, torch.device("cpu"))


def test_non_finite_losses_skip_updates_and_stop_the_run(tmp_path, monkeypatch, capsys):
    h = _setup(tmp_path, training_epochs=3, max_nonfinite_steps=3, validation_interval=100,
               checkpoint_interval=100)
    real_codec = train.Trainer.codec
    calls = {"n": 0}

    def codec(self, audio):
        calls["n"] += 1
        ref, gen = real_codec(self, audio)
        if calls["n"] >= 2:            # every step from the second on has a NaN amplitude loss
            gen["logamp"] = gen["logamp"] * float("nan")
        return ref, gen
    monkeypatch.setattr(train.Trainer, "codec", codec)
    with pytest.raises(SystemExit, match="3 steps in a row had a non-finite loss; stopped after step 3"):
        train.train(h, torch.device("cpu"))
    assert capsys.readouterr().out.count("non-finite G loss") == 3
    # The last finite state is saved: the generator was updated at step 0 only, the
    # discriminators (whose loss stayed finite) at every step.
    assert checkpoint_steps(h.checkpoint_path, "do") == [3]
    do = torch.load(os.path.join(h.checkpoint_path, "do_00000003"), weights_only=False)
    assert all(s["step"].item() == 1 for s in do["optim_g"]["state"].values())
    assert all(s["step"].item() == 4 for s in do["optim_d"]["state"].values())
    encoder = torch.load(os.path.join(h.checkpoint_path, "encoder_00000003"), weights_only=False)["encoder"]
    assert all(torch.isfinite(v).all() for v in encoder.values())


def _tiny_run_config(tmp_path, **overrides):
    h = _setup(tmp_path, **overrides)
    path = tmp_path / "run.json"
    path.write_text(json.dumps(h))
    return h, str(path)


def test_sigterm_saves_a_complete_set_and_the_next_run_continues(tmp_path):
    h, config = _tiny_run_config(tmp_path, training_epochs=1000, num_workers=1, checkpoint_interval=1000,
                                 validation_interval=1000)
    process = subprocess.Popen([sys.executable, "-u", os.path.join(ROOT, "train.py"), "--config", config],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []
    for line in process.stdout:
        lines.append(line)
        if line.startswith("Steps 3:"):
            process.send_signal(signal.SIGTERM)
            break
    out, err = process.communicate(timeout=120)
    lines += out.splitlines()
    assert process.returncode == 128 + signal.SIGTERM, err
    last = [line for line in lines if line.strip()][-1]
    assert last.startswith("Stopped by SIGTERM after step ") and "checkpoint set saved" in last, last
    step = int(last.split("after step ")[1].split(";")[0])
    assert step >= 3 and checkpoint_steps(h.checkpoint_path, "do") == [step]
    assert "Traceback" not in err
    resumed = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--config", config,
                              "--training_epochs", str(step // 2 + 2), "--num_workers", "0"],
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"step {step + 1}," in resumed.stdout and f"Steps {step + 1}:" in resumed.stdout


def _overfit_mel(h, steps):
    torch.manual_seed(0)
    audio = torch.from_numpy(tone(h.segment_size / h.sampling_rate, f0=180.0))[None]
    trainer = train.Trainer(h, torch.device("cpu"))
    return [trainer.train_step(audio)["Mel"].item() for _ in range(steps)]


def test_overfit_one_clip_mel_loss_falls():
    """Training on one short clip makes the mel loss fall clearly (seeded; here about 1.7 -> 0.5)."""
    width = 64
    h = make_config(**dict(TINY, convnext_dim=width, convnext_hidden_dim=2 * width, convnext_layers=2,
                           AMP_Encoder_channel=width, PHA_Encoder_channel=width,
                           AMP_Decoder_channel=width, PHA_Decoder_channel=width, batch_size=1))
    mel = _overfit_mel(h, 20)
    assert mel[-1] < 0.5 * mel[0], mel


@pytest.mark.slow
def test_overfit_full_model():
    """The paper-size model at batch 1: the mel loss falls from about 1.5 to about 0.4 in 15 steps."""
    mel = _overfit_mel(make_config(batch_size=1), 15)
    assert mel[-1] < 0.5 * mel[0], mel


def test_generator_step_gradients_equal_unfrozen_discriminators(tiny_h):
    """Freezing the discriminators in the G step skips only gradients that are thrown away."""
    import losses
    torch.manual_seed(0)
    trainer = train.Trainer(tiny_h, torch.device("cpu"))
    torch.manual_seed(0)
    reference = train.Trainer(tiny_h, torch.device("cpu"))
    audio = torch.from_numpy(tone(tiny_h.segment_size / tiny_h.sampling_rate))[None].repeat(2, 1)
    audio[1] *= 0.5

    ref, gen = trainer.codec(audio)
    trainer.generator_step(audio[:, None], ref, gen)
    assert all(p.grad is None and p.requires_grad for p in trainer.mpd.parameters())

    ref, gen = reference.codec(audio)
    y = audio[:, None]
    terms = losses.spectral_losses(ref, gen, tiny_h)
    _, mpd_fake, mpd_r, mpd_g = reference.mpd(y, gen["audio"])
    _, mrd_fake, mrd_r, mrd_g = reference.mrd(y, gen["audio"])
    terms["GAN"] = losses.generator_adversarial_loss(mpd_fake) + 0.1 * losses.generator_adversarial_loss(mrd_fake)
    terms["FM"] = losses.feature_matching_loss(mpd_r, mpd_g) + 0.1 * losses.feature_matching_loss(mrd_r, mrd_g)
    terms["codebook"], terms["commitment"] = gen["codebook"], gen["commitment"]
    losses.generator_total(terms).backward()
    assert all(p.grad is not None for p in reference.mpd.parameters())
    for module in ("encoder", "decoder"):
        ours = dict(getattr(trainer, module).named_parameters())
        for name, p in getattr(reference, module).named_parameters():
            assert torch.allclose(ours[name].grad, p.grad, rtol=1e-5, atol=1e-7), (module, name)


def test_causal_run_trains_and_its_checkpoints_load_as_causal(tmp_path, one_thread):
    """APCodec-S trains through the same loop; inference rebuilds the causal network from the
    config beside the checkpoints, even when handed the default (non-causal) config."""
    from checkpoints import load_generator
    from conftest import default_raw
    from config import build_config
    h = _setup(tmp_path, causal=True, causal_kernel_size=3, training_epochs=1)
    trainer = train.train(h, torch.device("cpu"))
    step = newest_complete_step(h.checkpoint_path)
    default = build_config(default_raw())
    encoder, decoder, used = load_generator(default, os.path.join(h.checkpoint_path, f"encoder_{step:08d}"),
                                            os.path.join(h.checkpoint_path, f"decoder_{step:08d}"),
                                            torch.device("cpu"))
    assert used.causal and used.causal_kernel_size == 3
    x = torch.randn(1, h.n_fft // 2 + 1, 16)
    with torch.no_grad():
        assert torch.equal(encoder(x, x).latent, trainer.encoder(x, x).latent)
def test_training_2n_steps_equals_n_steps_then_resuming(tmp_path):
    """The set saved mid-epoch at step 3 of an uninterrupted 6-step run, resumed in a new run,
    ends with the same weights and optimizer states, bit for bit."""
    h = _setup(tmp_path / "a", training_epochs=3, checkpoint_interval=3, validation_interval=100)
    train.train(h, torch.device("cpu"))
    assert checkpoint_steps(h.checkpoint_path, "do") == [3, 5]
    resumed = tmp_path / "b" / "cp"
    resumed.mkdir(parents=True)
    for kind in ("encoder", "decoder", "do"):
        shutil.copy(os.path.join(h.checkpoint_path, f"{kind}_00000003"), resumed)
    h2 = _setup(tmp_path / "b", training_epochs=3, checkpoint_interval=3, validation_interval=100,
                checkpoint_path=str(resumed))
    second = train.train(h2, torch.device("cpu"))
    assert second.steps == 6
    for kind in ("encoder", "decoder", "do"):
        a = torch.load(os.path.join(h.checkpoint_path, f"{kind}_00000005"), weights_only=False)
        b = torch.load(os.path.join(resumed, f"{kind}_00000005"), weights_only=False)
        for name in ("encoder", "decoder", "mpd", "mrd"):
            if name in a:
                for key, tensor in a[name].items():
                    assert torch.equal(tensor, b[name][key]), (kind, name, key)
        for name in ("optim_g", "optim_d"):
            if name in a:
                for index, slot in a[name]["state"].items():
                    for key, tensor in slot.items():
                        assert torch.equal(tensor, b[name]["state"][index][key]), (name, index, key)
                assert a[name]["param_groups"][0]["lr"] == b[name]["param_groups"][0]["lr"]


def test_release_checkpoints_resume_with_release_semantics(tmp_path, capsys):
    """A do_ file without the exact-resume fields restarts the saved epoch, as the release does."""
    h = _setup(tmp_path, training_epochs=1, validation_interval=100)
    train.train(h, torch.device("cpu"))
    path = os.path.join(h.checkpoint_path, "do_00000001")
    do = torch.load(path, weights_only=False)
    release = {k: do[k] for k in ("mpd", "mrd", "optim_g", "optim_d", "steps", "epoch")}
    release["epoch"] = 0
    torch.save(release, path)
    h.training_epochs = 2
    trainer = train.train(h, torch.device("cpu"))
    assert "release checkpoint: epoch restarts" in capsys.readouterr().out
    # Epochs 0 (restarted) and 1 are trained: 2 + 2 steps after step 1.
    assert trainer.steps == 6
