"""train.py: a few CPU steps write a checkpoint set in the release layout; a second run resumes."""
import errno
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys

import numpy as np
import soundfile as sf

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import train
from conftest import ROOT, TINY, make_config, tone, write_tone
from checkpoints import checkpoint_steps, complete_steps, load_release_state_dict, newest_complete_step
from config import KEYS, differing_keys, save_config
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
    # 4 clips / batch 2 = 2 steps per epoch, 2 epochs: steps 0..3; checkpoint at 3, written again
    # at the end with the run marked finished.
    assert first.steps == 4
    assert newest_complete_step(h.checkpoint_path) == 3
    saved_config = json.load(open(os.path.join(h.checkpoint_path, "config.json")))
    assert saved_config["latent_dim"] == TINY["latent_dim"]
    do = torch.load(os.path.join(h.checkpoint_path, "do_00000003"), weights_only=False)
    # The release's entries, plus what an exact resume needs.
    assert set(do) == {"mpd", "mrd", "optim_g", "optim_d", "steps", "epoch",
                       "position", "epoch_items", "dealing", "scheduler_g", "scheduler_d", "random_states", "nonfinite_total",
                       "nonfinite_streak", "code_counts", "passed_over"}
    assert do["steps"] == 3 and do["epoch"] == 2 and do["position"] == 0 and do["epoch_items"] == 0
    assert len(do["optim_g"]["state"]) == len(list(first.encoder.parameters())) + len(list(first.decoder.parameters()))
    assert all(s["step"].item() == 4 for s in do["optim_g"]["state"].values())
    enc_sd = torch.load(os.path.join(h.checkpoint_path, "encoder_00000003"), weights_only=False)["encoder"]
    assert "latent_output_conv.weight_g" in enc_sd and "embed_logamp.weight" in enc_sd

    # The saved weights are the trained ones.
    encoder = Encoder(h)
    load_release_state_dict(encoder, enc_sd)
    for (name, a), b in zip(encoder.state_dict().items(), first.encoder.state_dict().values()):
        assert torch.equal(a, b), name

    capsys.readouterr()
    again = train.train(h, torch.device("cpu"))
    assert again.steps == 4 and "Nothing to train: the run in" in capsys.readouterr().out

    # Resume with one more epoch: epoch 2 trains steps 4 and 5.
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


def test_max_steps_stops_mid_epoch_and_raising_it_continues_as_one_run(tmp_path, capsys):
    """4 clips at batch 2, 2 epochs: steps 0..3. max_steps 3 stops after step 2, the first step
    of epoch 2; a restart trains nothing; without the limit the run goes on to the weights of
    an uninterrupted run, bit for bit."""
    settings = dict(checkpoint_interval=100, validation_interval=100)
    whole = train.train(_setup(tmp_path / "whole", **settings), torch.device("cpu"))
    h = _setup(tmp_path / "limited", max_steps=3, **settings)
    capsys.readouterr()
    first = train.train(h, torch.device("cpu"))
    assert first.steps == 3
    assert "Reached max_steps (3) after step 2" in capsys.readouterr().out
    assert checkpoint_steps(h.checkpoint_path, "do") == [2]
    do = torch.load(os.path.join(h.checkpoint_path, "do_00000002"), weights_only=False)
    assert do["steps"] == 2 and do["epoch"] == 1 and do["position"] == 1

    again = train.train(h, torch.device("cpu"))
    assert again.steps == 3 and checkpoint_steps(h.checkpoint_path, "do") == [2]
    assert "has trained 3 steps (max_steps = 3)" in capsys.readouterr().out

    rest = train.train(make_config(**dict(h, max_steps=0)), torch.device("cpu"))
    assert rest.steps == 4 and checkpoint_steps(h.checkpoint_path, "do") == [2, 3]
    for module in ("encoder", "decoder", "mpd", "mrd"):
        for (name, a), b in zip(getattr(whole, module).state_dict().items(),
                                getattr(rest, module).state_dict().values()):
            assert torch.equal(a, b), (module, name)


def test_short_and_silent_validation_clips_validate(tmp_path, capsys, monkeypatch):
    """A 28-sample clip is padded for the analysis; one that is silent but for the samples that
    validation trims off (the data check leaves silent files out) has no SNR, left out of the mean."""
    h = _setup(tmp_path, training_epochs=1)
    sf.write(tmp_path / "wavs" / "blip.wav", tone(0.01)[:28], 48000)
    silence = np.zeros(4000, np.float32)
    silence[-5:] = 0.5
    sf.write(tmp_path / "wavs" / "silence.wav", silence, 48000)
    (tmp_path / "valid.txt").write_text("wavs/clip0.wav\nwavs/blip.wav\nwavs/silence.wav\n")
    measured = []
    compute_metrics = train.compute_metrics
    monkeypatch.setattr(train, "compute_metrics", lambda *args: measured.append(compute_metrics(*args)) or measured[-1])
    train.train(h, torch.device("cpu"))
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("Validation at step 0"))
    values = {k: float(v) for k, v in (item.rsplit(" ", 1) for item in line.split(": ", 1)[1].split(", "))}
    assert all(math.isfinite(v) for v in values.values()), line
    first = measured[:3]
    assert math.isnan(first[2]["SNR"]) and all(math.isfinite(m["SNR"]) for m in first[:2])
    assert values["SNR"] == pytest.approx(np.mean([m["SNR"] for m in first[:2]]), abs=1e-3)
    assert values["LSD"] == pytest.approx(np.mean([m["LSD"] for m in first]), abs=1e-3)


def test_incomplete_checkpoint_set_is_ignored(tmp_path):
    h = _setup(tmp_path, training_epochs=1)
    train.train(h, torch.device("cpu"))
    assert newest_complete_step(h.checkpoint_path) == 1
    # An encoder file without its do_ partner (a run killed mid-save) is not a set.
    torch.save({}, os.path.join(h.checkpoint_path, "encoder_00000009"))
    assert newest_complete_step(h.checkpoint_path) == 1


def test_sets_that_all_fail_to_read_stop_the_run_instead_of_training_anew(tmp_path):
    """Training from scratch would write over them as it reaches their steps."""
    h = _setup(tmp_path, training_epochs=1)
    train.train(h, torch.device("cpu"))
    do = os.path.join(h.checkpoint_path, "do_00000001")
    with open(do, "r+b") as f:
        f.truncate(100)
    with pytest.raises(ValueError, match="none of the 1 checkpoint sets in .* reads back"):
        train.train(h, torch.device("cpu"))
    assert os.path.getsize(do) == 100


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
    h = _setup(tmp_path / "z", causal=True, kd_teacher_encoder=str(tmp_path / "teacher_enc"),
               kd_teacher_decoder=str(tmp_path / "teacher_dec"))
    with monkeypatch.context() as patch:
        patch.setattr(train, "build_loaders", lambda *a: pytest.fail("the data were checked first"))
        with pytest.raises(FileNotFoundError, match="config key 'kd_teacher_encoder': checkpoint not found"):
            train.train(h, torch.device("cpu"))


def test_gpu_random_state_is_this_process_device_s(monkeypatch):
    """Saved: the current device's generator alone, so every rank can restore rank 0's into its
    own device. Restored: that state, or from files of earlier versions (one state per visible
    device) the first device's, where the saving process ran."""
    device_states = [torch.tensor([i], dtype=torch.uint8) for i in range(3)]
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda: device_states[1])
    monkeypatch.setattr(torch.cuda, "set_rng_state", restored.append)
    states = train.random_states()
    assert torch.equal(states["cuda"], device_states[1])
    train.set_random_states(states)
    train.set_random_states(dict(states, cuda=device_states))
    assert [int(s) for s in restored] == [1, 0]


def test_the_documented_read_back_interval_is_the_one_training_uses():
    """fused_adamw's help and the README promise a read-back at least every N steps."""
    promise = f"at least every {train.READ_BACK_STEPS} steps"
    assert promise in KEYS["fused_adamw"].help
    with open(os.path.join(ROOT, "README.md")) as f:
        assert promise in f.read()


# Read each step; deferred to logging steps with fused AdamW, which skips an update on the
# device: every step, every second one (the stop then comes at step 4, with 4 in a row), or,
# with logging every 20 steps, every READ_BACK_STEPS (10).
# A finite loss with an infinite gradient (an overflow) is caught as well.
@pytest.mark.parametrize("fused, stdout_interval, last, fault", [
    (False, 1, 3, "loss"), (True, 1, 3, "loss"), (True, 2, 4, "loss"), (True, 20, 10, "loss"),
    (False, 1, 3, "gradient"), (True, 1, 3, "gradient")])
def test_non_finite_losses_skip_updates_and_stop_the_run(tmp_path, monkeypatch, capsys, fused, stdout_interval,
                                                         last, fault):
    h = _setup(tmp_path, training_epochs=6, max_nonfinite_steps=3, validation_interval=100,
               checkpoint_interval=100, fused_adamw=fused, stdout_interval=stdout_interval,
               summary_interval=stdout_interval)
    trainer = train.Trainer(h, torch.device("cpu"))
    assert trainer.nonfinite.deferred == fused
    real_codec = train.Trainer.codec
    calls = {"n": 0}

    real_generator_half = train.Trainer.generator_half

    def codec(self, audio, training=False):
        calls["n"] += 1
        ref, gen = real_codec(self, audio, training)
        if calls["n"] >= 2 and fault == "loss":   # every step from the second on: a NaN amplitude loss
            gen["logamp"] = gen["logamp"] * float("nan")
        return ref, gen

    def generator_half(self, audio, ref, gen):
        terms = real_generator_half(self, audio, ref, gen)
        if calls["n"] >= 2 and fault == "gradient":   # the loss stays finite
            self.params_g[0].grad.view(-1)[0] = float("inf")
        return terms
    monkeypatch.setattr(train.Trainer, "codec", codec)
    monkeypatch.setattr(train.Trainer, "generator_half", generator_half)
    with pytest.raises(SystemExit, match=f"{last} steps in a row had a non-finite loss or gradient; stopped after "
                                         f"step {last}"):
        train.train(h, torch.device("cpu"))
    out = capsys.readouterr().out
    if fused:
        reported = re.findall(r"warning: (\d+) of the steps up to step (\d+) had a non-finite loss or gradient", out)
        assert [int(n) for n, _ in reported] == {1: [1, 1, 1], 2: [2, 2], 20: [10]}[stdout_interval]
        assert reported[-1][1] == str(last)
    else:
        assert out.count("non-finite G loss or gradient") == 3
    # The last finite state is saved: the generator was updated at step 0 only, the
    # discriminators (whose loss stayed finite) at every step.
    assert checkpoint_steps(h.checkpoint_path, "do") == [last]
    do = torch.load(os.path.join(h.checkpoint_path, f"do_{last:08d}"), weights_only=False)
    assert all(s["step"].item() == 1 for s in do["optim_g"]["state"].values())
    assert all(s["step"].item() == last + 1 for s in do["optim_d"]["state"].values())
    assert do["nonfinite_total"] == last
    encoder = torch.load(os.path.join(h.checkpoint_path, f"encoder_{last:08d}"), weights_only=False)["encoder"]
    assert all(torch.isfinite(v).all() for v in encoder.values())


def test_fp16_skips_a_non_finite_step_and_trains_on(tmp_path, monkeypatch, capsys):
    """fp16's gradient scaler has unscaled the gradients before the check; a skipped update
    must still end the scaler's step (it halves its scale), or the next step's unscale fails.
    (The scales start low enough here that no step overflows: at 2**16 a tiny model's first
    steps do, and each of those is a skipped, counted update too.)"""
    h = _setup(tmp_path, mixed_precision="fp16")
    trainer = train.Trainer(h, torch.device("cpu"))
    trainer.scaler_g = torch.amp.GradScaler("cpu", init_scale=2.0 ** 6)
    trainer.scaler_d = torch.amp.GradScaler("cpu", init_scale=2.0 ** 6)
    real_codec = train.Trainer.codec

    def codec(self, audio, training=False):
        ref, gen = real_codec(self, audio, training)
        if self.steps == 1:   # step 1 alone: a NaN amplitude loss
            gen["logamp"] = gen["logamp"] * float("nan")
        return ref, gen
    monkeypatch.setattr(train.Trainer, "codec", codec)
    for trainer.steps in range(4):
        trainer.train_step(_batch(h))
    out = capsys.readouterr().out
    assert out.count("warning: non-finite") == 1
    assert "non-finite G loss or gradient at step 1; its update is skipped (fp16: an overflow" in out
    assert trainer.nonfinite.total == 1
    # The generator was updated at steps 0, 2 and 3, the discriminators at every step; the
    # skip halved the generator's scale.
    assert [s["step"].item() for s in trainer.optim_g.state.values()] == [3] * len(trainer.params_g)
    assert [s["step"].item() for s in trainer.optim_d.state.values()] == [4] * len(trainer.params_d)
    assert trainer.scaler_g.get_scale() == 2.0 ** 5 and trainer.scaler_d.get_scale() == 2.0 ** 6


def test_fp16_counts_updates_whose_unscaled_gradients_are_not_finite(tmp_path, monkeypatch):
    """The scaler checks the gradients scaled: at a loss scale so small that unscaling
    overflows it would step NaN into every weight, and the updates it skips itself were not
    counted, so a gradient that stays NaN stalled the run without a word. Both are skipped
    and counted now, and such a run stops after max_nonfinite_steps."""
    h = _setup(tmp_path, mixed_precision="fp16", max_nonfinite_steps=3, training_epochs=50,
               validation_interval=1000, checkpoint_interval=1000)
    trainer = train.Trainer(h, torch.device("cpu"))
    trainer.train_step(_batch(h))
    trainer.scaler_g.update(2.0 ** -129)
    before = [p.detach().clone() for p in trainer.params_g]
    counted = trainer.nonfinite.total
    trainer.train_step(_batch(h))
    assert trainer.nonfinite.total == counted + 1
    assert all(torch.equal(p, q) for p, q in zip(trainer.params_g, before))

    real_generator_half = train.Trainer.generator_half

    def nan_gradient(self, audio, ref, gen):
        terms = real_generator_half(self, audio, ref, gen)
        self.params_g[0].grad.view(-1)[0] = float("nan")    # the loss stays finite
        return terms
    monkeypatch.setattr(train.Trainer, "generator_half", nan_gradient)
    with pytest.raises(SystemExit, match="3 steps in a row had a non-finite loss or gradient"):
        train.train(h, torch.device("cpu"))
    step = checkpoint_steps(h.checkpoint_path, "do")[-1]
    encoder = torch.load(os.path.join(h.checkpoint_path, f"encoder_{step:08d}"), weights_only=False)["encoder"]
    assert step < 10 and all(torch.isfinite(v).all() for v in encoder.values())


@pytest.mark.parametrize("fused", [False, True])
def test_a_resumed_run_continues_the_non_finite_streak(tmp_path, monkeypatch, fused):
    """Two non-finite steps, a save and a resume: with max_nonfinite_steps 3 the third in a
    row stops the resumed run, as it would have stopped the run without the break."""
    h = _setup(tmp_path, fused_adamw=fused, max_nonfinite_steps=3)
    os.makedirs(h.checkpoint_path)
    real_codec = train.Trainer.codec

    def nan_codec(self, audio, training=False):
        ref, gen = real_codec(self, audio, training)
        gen["logamp"] = gen["logamp"] * float("nan")
        return ref, gen
    monkeypatch.setattr(train.Trainer, "codec", nan_codec)
    first = train.Trainer(h, torch.device("cpu"))
    first.resume()
    for _ in range(2):
        first.train_step(_batch(h))
    first.save(1, 0)
    resumed = train.Trainer(h, torch.device("cpu"))
    resumed.resume()
    assert (resumed.nonfinite.streak, resumed.nonfinite.total) == (2, 2)
    resumed.train_step(_batch(h))
    resumed.steps = 3
    resumed.nonfinite.read_back(2)   # as on a logging step
    assert train.should_stop(resumed, {}) == "nonfinite"
    assert (resumed.nonfinite.streak, resumed.nonfinite.total) == (3, 3)
    monkeypatch.setattr(train.Trainer, "codec", real_codec)
    resumed.train_step(_batch(h))
    resumed.nonfinite.read_back(3)
    assert (resumed.nonfinite.streak, resumed.nonfinite.total) == (0, 3)


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


def _twin_trainers(h):
    """Two trainers with the same weights, and a batch of two segments (a tone at two levels)."""
    torch.manual_seed(0)
    trainer = train.Trainer(h, torch.device("cpu"))
    torch.manual_seed(0)
    reference = train.Trainer(h, torch.device("cpu"))
    audio = torch.from_numpy(tone(h.segment_size / h.sampling_rate))[None].repeat(2, 1)
    audio[1] *= 0.5
    return trainer, reference, audio


def test_generator_step_gradients_equal_unfrozen_discriminators(tiny_h):
    """Freezing the discriminators in the G step skips only gradients that are thrown away."""
    import losses
    trainer, reference, audio = _twin_trainers(tiny_h)

    ref, gen = trainer.codec(audio)
    trainer.generator_half(audio, ref, gen)
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


def test_discriminator_step_loss_and_gradients_by_hand(tiny_h):
    """The D half of a step: hinge losses of real and generated audio, MRD's weighted 0.1, and
    their gradients, against the discriminators called directly on a twin trainer."""
    trainer, reference, audio = _twin_trainers(tiny_h)
    _, gen, loss = trainer.discriminator_half(audio)

    def hinge(real, fake):
        return sum(torch.relu(1 - r).mean() + torch.relu(1 + f).mean() for r, f in zip(real, fake))
    y, y_g = audio[:, None], reference.codec(audio)[1]["audio"].detach()
    assert torch.equal(y_g, gen["audio"].detach())
    mpd_real, mpd_fake, _, _ = reference.mpd(y, y_g)
    mrd_real, mrd_fake, _, _ = reference.mrd(y, y_g)
    expected = hinge(mpd_real, mpd_fake) + 0.1 * hinge(mrd_real, mrd_fake)
    assert torch.allclose(loss, expected, rtol=1e-6)
    expected.backward()
    for module in ("mpd", "mrd"):
        ours = dict(getattr(trainer, module).named_parameters())
        for name, p in getattr(reference, module).named_parameters():
            assert torch.allclose(ours[name].grad, p.grad, rtol=1e-5, atol=1e-7), (module, name)


@pytest.mark.parametrize("config_beside", [True, False])
def test_causal_run_trains_and_its_checkpoints_load_as_causal(tmp_path, one_thread, config_beside):
    """APCodec-S trains through the same loop; inference rebuilds the causal network from the
    network keys recorded in the checkpoints, even when handed the default (non-causal)
    config and with the run's config.json gone (causal weights have the shapes of the
    non-causal model's, so only the record tells them apart)."""
    from checkpoints import load_generator
    from conftest import default_raw
    from config import build_config
    h = _setup(tmp_path, causal=True, causal_kernel_size=3, training_epochs=1)
    trainer = train.train(h, torch.device("cpu"))
    step = newest_complete_step(h.checkpoint_path)
    if not config_beside:
        os.remove(os.path.join(h.checkpoint_path, "config.json"))
    default = build_config(default_raw())
    encoder, decoder, used = load_generator(default, os.path.join(h.checkpoint_path, f"encoder_{step:08d}"),
                                            os.path.join(h.checkpoint_path, f"decoder_{step:08d}"),
                                            torch.device("cpu"))
    assert used.causal and used.causal_kernel_size == 3
    x = torch.randn(1, h.n_fft // 2 + 1, 16)
    with torch.no_grad():
        assert torch.equal(encoder(x, x).latent, trainer.encoder(x, x).latent)


@pytest.mark.parametrize("workers, dropout, validation_interval", [(0, 0.0, 100), (1, 0.0, 100), (0, 0.5, 100),
                                                                  (0, 0.5, 3)])
def test_training_2n_steps_equals_n_steps_then_resuming(tmp_path, capsys, workers, dropout, validation_interval):
    """The set saved at step 3 (the end of epoch 1) of an uninterrupted 6-step run, resumed in
    a new run, ends with the same weights and optimizer states, bit for bit (crops do not
    depend on the data workers). Quantizer dropout draws from the global generator, so the
    resumed run's new data iterator must not draw from it (interval 100), nor may validating
    after the save (interval 3)."""
    settings = dict(training_epochs=3, checkpoint_interval=3, num_workers=workers, quantizer_dropout=dropout,
                    validation_interval=validation_interval)
    h = _setup(tmp_path / "a", **settings)
    train.train(h, torch.device("cpu"))
    assert checkpoint_steps(h.checkpoint_path, "do") == [3, 5]
    resumed = tmp_path / "b" / "cp"
    resumed.mkdir(parents=True)
    for kind in ("encoder", "decoder", "do"):
        shutil.copy(os.path.join(h.checkpoint_path, f"{kind}_00000003"), resumed)
    h2 = _setup(tmp_path / "b", checkpoint_path=str(resumed), **settings)
    capsys.readouterr()
    second = train.train(h2, torch.device("cpu"))
    assert second.steps == 6
    # Epoch 2 ended with the saved step: it is closed, not announced again as an empty epoch.
    out = capsys.readouterr().out
    assert "batch 2 of the epoch" in out and "Epoch: 3" in out
    assert "Epoch: 2" not in out and "for epoch 2" not in out
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


@pytest.mark.parametrize("max_steps, position", [(3, 1), (2, 2)])
def test_a_resume_mid_epoch_says_when_the_epochs_files_are_dealt_anew(tmp_path, capsys, max_steps, position):
    """Two steps an epoch: max_steps 3 stops after the first of epoch 2's steps. Resumed with
    the same list and order, the epoch goes on silently; with another list, or reshuffled
    every epoch, the rest of the epoch comes from the new order, and a line says so. Stopped
    at epoch 1's end (max_steps 2), no file of that epoch is left to deal: no line."""
    step = max_steps - 1
    h = _setup(tmp_path / "a", max_steps=max_steps, checkpoint_interval=100, validation_interval=100)
    train.train(h, torch.device("cpu"))
    stopped = {kind: (tmp_path / "a" / "cp" / f"{kind}_{step:08d}").read_bytes() for kind in ("encoder", "decoder", "do")}
    do = torch.load(os.path.join(h.checkpoint_path, f"do_{step:08d}"), weights_only=False)
    assert do["position"] == position and do["dealing"] is not None
    reordered = tmp_path / "a" / "reordered.txt"
    names = [line for line in (tmp_path / "a" / "train.txt").read_text().splitlines() if line.startswith("wavs/")]
    reordered.write_text("\n".join(reversed(names)) + "\n")
    for i, (changes, changed) in enumerate(((dict(), False), (dict(shuffle_every_epoch=True), True),
                                            (dict(input_training_wav_list=str(reordered)), True))):
        folder = tmp_path / f"resumed{i}"
        folder.mkdir()
        for kind, data in stopped.items():
            (folder / f"{kind}_{step:08d}").write_bytes(data)
        capsys.readouterr()
        train.train(make_config(**dict(h, max_steps=0, checkpoint_path=str(folder), **changes)), torch.device("cpu"))
        noted = "some of its files may be trained on twice" in capsys.readouterr().out
        assert noted == (changed and position == 1), changes


def test_a_resume_keeps_the_runs_seed(tmp_path, capsys):
    """The seed orders an epoch's files and seeds the crops: a run stopped mid-epoch and resumed
    from a config with another seed ends as the uninterrupted run, says so, and records its seed."""
    settings = dict(training_epochs=1, batch_size=1, checkpoint_interval=100, validation_interval=100)
    whole = train.train(_setup(tmp_path / "a", **settings), torch.device("cpu"))
    h = _setup(tmp_path / "b", max_steps=2, **settings)
    train.train(h, torch.device("cpu"))
    assert "the config differs" not in capsys.readouterr().out
    resumed = train.train(make_config(**dict(h, max_steps=0, seed=h.seed + 1)), torch.device("cpu"))
    assert f"seed {h.seed + 1} (the run's {h.seed} goes on" in capsys.readouterr().out
    assert resumed.steps == whole.steps == 4
    for a, b in zip(whole.params_g, resumed.params_g):
        assert torch.equal(a, b)
    with open(os.path.join(h.checkpoint_path, "config.json")) as f:
        assert json.load(f)["seed"] == h.seed


def test_resuming_with_another_batch_size_continues_after_the_files_trained_on(tmp_path, capsys):
    """An epoch of 4 files at batch 1 saves sets at steps 1 and 2 (2 and 3 files done).
    Resumed at batch 2, the first continues with one step on files 3 and 4; the second
    has done 1.5 steps of 2 files, so it trains its third file again, and says so."""
    h = _setup(tmp_path / "a", training_epochs=1, batch_size=1, checkpoint_interval=1, validation_interval=100)
    train.train(h, torch.device("cpu"))
    do = torch.load(os.path.join(h.checkpoint_path, "do_00000001"), weights_only=False)
    assert (do["position"], do["epoch_items"]) == (2, 2)
    for step, last_step, note in ((1, 2, None), (2, 3, "the 1 after the last whole step are trained on again")):
        resumed = tmp_path / f"from{step}" / "cp"
        resumed.mkdir(parents=True)
        for kind in ("encoder", "decoder", "do"):
            shutil.copy(os.path.join(h.checkpoint_path, f"{kind}_{step:08d}"), resumed)
        run = train.train(_setup(tmp_path / f"from{step}", training_epochs=1, validation_interval=100,
                                 checkpoint_path=str(resumed)), torch.device("cpu"))
        out = capsys.readouterr().out
        assert run.steps - 1 == last_step
        assert (note in out) if note else "trained on again" not in out
    # A set saved at an epoch's last step has no batch of it left to train again: no note.
    ended = _setup(tmp_path / "ended", training_epochs=2, batch_size=1, max_steps=4, validation_interval=100)
    train.train(ended, torch.device("cpu"))
    assert torch.load(os.path.join(ended.checkpoint_path, "do_00000003"), weights_only=False)["epoch_items"] == 4
    capsys.readouterr()
    assert train.train(make_config(**dict(ended, batch_size=3, max_steps=5)), torch.device("cpu")).steps == 5
    assert "trained on again" not in capsys.readouterr().out
    # A set of an earlier version has no epoch_items: its position counts steps of the batch now.
    resumed = tmp_path / "earlier" / "cp"
    resumed.mkdir(parents=True)
    for kind in ("encoder", "decoder"):
        shutil.copy(os.path.join(h.checkpoint_path, f"{kind}_00000001"), resumed)
    del do["epoch_items"]
    torch.save(do, resumed / "do_00000001")
    run = train.train(_setup(tmp_path / "earlier", training_epochs=1, validation_interval=100,
                             checkpoint_path=str(resumed)), torch.device("cpu"))
    assert "does not record how many files" in capsys.readouterr().out and run.steps - 1 == 1


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
# A torchrun worker: trains with the config in argv[1], then each rank saves its weights.
_WORKER = """
import json, os, sys
sys.path.insert(0, {root!r})
import torch
from torch.utils._python_dispatch import TorchDispatchMode
import train
from config import load_config
h = load_config(sys.argv[1])
trainer = train.train(h, torch.device("cpu"))
state = {{name: {{k: v.detach().clone() for k, v in getattr(trainer, name).state_dict().items()}}
          for name in ("encoder", "decoder", "mpd", "mrd")}}
torch.save(state, os.path.join(h.checkpoint_path, "rank%s.pt" % os.environ["RANK"]))
"""


def _clips(tmp_path, n):
    """n clips shorter than a segment: zero-padded, so no random crop differs between runs."""
    wavs = tmp_path / "wavs"
    wavs.mkdir()
    names = []
    for i in range(n):
        write_tone(str(wavs / f"c{i}.wav"), 0.1 + 0.005 * i, f0=120 + 30 * i, seed=i)
        names.append(str(wavs / f"c{i}.wav"))
    (tmp_path / "train.txt").write_text("\n".join(names) + "\n")
    (tmp_path / "valid.txt").write_text(names[0] + "\n")
    return dict(TINY, input_training_wav_list=str(tmp_path / "train.txt"),
                input_validation_wav_list=str(tmp_path / "valid.txt"), training_epochs=2,
                checkpoint_interval=3, stdout_interval=1, summary_interval=2, validation_interval=1000)


def _printed_terms(stdout, step):
    line = next(l for l in stdout.splitlines() if l.startswith(f"Steps {step}:"))
    return {name: float(value) for name, value in (item.rsplit(" ", 1) for item in line.split(": ", 1)[1].split(", "))}


# Also with fused AdamW, whose non-finite checks stay on the device: the ranks must still
# agree on every step (they read back and decide on stopping at the same steps).
@pytest.mark.parametrize("fused", [False, True])
def test_torchrun_two_processes_equal_one_process_at_the_same_global_batch(tmp_path, capsys, fused):
    """2 gloo processes x batch 2 == 1 process x batch 4: same files per step, mean losses,
    DDP averages the gradients, quantizer dropout takes its share of the global batch (3 of 4
    items: both of rank 0's, the first of rank 1's, where each rank alone would drop 1).
    8 clips: 2 steps per epoch, 2 epochs, a checkpoint at step 3."""
    import subprocess
    import sys
    settings = dict(_clips(tmp_path, 8), quantizer_dropout=0.75, fused_adamw=fused)
    if fused:   # read back at steps 0 and 3 only: steps 1 and 2 decide nothing
        settings.update(stdout_interval=3, summary_interval=3)
    ddp = dict(settings, batch_size=2, checkpoint_path=str(tmp_path / "ddp"))
    save_config(make_config(**ddp), str(tmp_path / "ddp.json"))
    (tmp_path / "worker.py").write_text(_WORKER.format(root=os.path.dirname(os.path.dirname(__file__))))
    # gloo on the CPU, also where CUDA is visible (there train.py would pick NCCL and a GPU per rank).
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(tmp_path / "worker.py"), str(tmp_path / "ddp.json")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "2 processes x batch_size 2 = effective batch 4" in run.stdout
    assert run.stdout.count("Steps 0:") == 1  # rank 0 alone prints
    assert checkpoint_steps(ddp["checkpoint_path"], "do") == [3]

    ranks = [torch.load(tmp_path / "ddp" / f"rank{r}.pt") for r in (0, 1)]
    single = train.train(make_config(**dict(settings, batch_size=4, checkpoint_path=str(tmp_path / "one"))),
                         torch.device("cpu"))
    torch.manual_seed(single.h.seed)
    init = train.Trainer(single.h, torch.device("cpu"))
    assert torch.load(tmp_path / "ddp" / "do_00000003", weights_only=False)["steps"] == 3
    # The 4 updates agree up to float rounding, which AdamW amplifies to a whole step where a
    # gradient is near 0. In the discriminators that is so for many biases (the hinge loss's
    # gradient for a last bias is 0 exactly while the scores lie in (-1, 1)), so they are
    # compared as a whole: 4 steps that differ only in the order of a sum moved the tiny MPD's
    # update by 10%, and scaling the audio by 0.9 moved it by 20%. Other data shows in the
    # generator's updates, compared tensor by tensor, and in the losses (below).
    for name in ("encoder", "decoder", "mpd", "mrd"):
        start = getattr(init, name).state_dict()
        single_state = getattr(single, name).state_dict()
        for key in start:
            assert torch.equal(ranks[0][name][key], ranks[1][name][key]), (name, key)
            if name in ("encoder", "decoder"):
                update = (single_state[key] - start[key]).norm()
                assert update > 0 and (ranks[0][name][key] - single_state[key]).norm() < 0.02 * update, (name, key)
        if name in ("mpd", "mrd"):
            update = torch.cat([(single_state[k] - start[k]).flatten() for k in start])
            apart = torch.cat([(ranks[0][name][k] - single_state[k]).flatten() for k in start])
            assert update.norm() > 0 and apart.norm() < 0.1 * update.norm(), name
    # What rank 0 prints is the mean over ranks, i.e. the single process's losses, up to float
    # rounding (the total G is in the thousands, printed to 3 decimals).
    printed = _printed_terms(capsys.readouterr().out, 3)
    for name, value in _printed_terms(run.stdout, 3).items():
        if name != "s/b":
            assert value == pytest.approx(printed[name], rel=1e-5, abs=2e-3), name


def test_torchrun_ranks_wait_for_rank_0s_validation_beyond_the_process_group_timeout(tmp_path):
    """Rank 0 validates alone, here for 12 s, longer than the default group's timeout of 6 s (as
    NCCL's 10 minutes would be to a long validation list): the other rank waits without failing.
    (6 s leaves the ranks' other collectives, which they reach close together, clear of it.)"""
    settings = dict(_clips(tmp_path, 4), batch_size=2, training_epochs=1, checkpoint_path=str(tmp_path / "ddp"))
    save_config(make_config(**settings), str(tmp_path / "ddp.json"))
    slow = _WORKER.format(root=os.path.dirname(os.path.dirname(__file__))).replace("import train\n", """import train
import datetime, time
import torch.distributed as dist
init_process_group = dist.init_process_group
dist.init_process_group = lambda *args, **kwargs: init_process_group(
    *args, timeout=datetime.timedelta(seconds=6), **kwargs)
validate = train.Trainer.validate
def slow_validate(*args):
    time.sleep(12)
    return validate(*args)
train.Trainer.validate = slow_validate
""")
    (tmp_path / "worker.py").write_text(slow)
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(tmp_path / "worker.py"), str(tmp_path / "ddp.json")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "Validation at step 0:" in run.stdout and os.path.exists(tmp_path / "ddp" / "rank1.pt")


def test_torchrun_bad_input_is_said_once_without_tracebacks_from_the_other_ranks(tmp_path):
    """Rank 0 alone checks the data lists: a missing one is its one-line error, and the other
    rank leaves quietly rather than failing in the broadcast with a traceback of its own."""
    settings = dict(_clips(tmp_path, 4), batch_size=2, checkpoint_path=str(tmp_path / "ddp"),
                    input_training_wav_list=str(tmp_path / "missing.txt"))
    save_config(make_config(**settings), str(tmp_path / "ddp.json"))
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    script = os.path.join(os.path.dirname(os.path.dirname(__file__)), "train.py")
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          script, "--config", str(tmp_path / "ddp.json")],
                         capture_output=True, text=True, env=env, timeout=300)
    output = run.stdout + run.stderr
    assert run.returncode != 0
    assert output.count("error: file list not found: ") == 1 and "missing.txt" in output
    assert "Connection closed by peer" not in output and "broadcast" not in output, output[-3000:]
    # A bad value on the command line: every process parses it, the first one says so.
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          script, "--config", str(tmp_path / "ddp.json"), "--batch_size", "-1"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode != 0 and (run.stdout + run.stderr).count("error: --batch_size must be") == 1


def _children(pid):
    """The pids whose parent is `pid` (Linux's /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if entry.isdigit() and int(fields[1]) == pid:
            found.append(int(entry))
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds torchrun's workers in /proc")
def test_torchrun_under_a_scheduler_saves_when_every_process_gets_the_stop(tmp_path):
    """A batch scheduler signals every process of the job, and torchrun forwards its copy to the
    ranks: each rank gets SIGTERM twice at once. That is one request, so rank 0 still saves."""
    settings = dict(_clips(tmp_path, 4), batch_size=1, training_epochs=1000, checkpoint_path=str(tmp_path / "ddp"),
                    checkpoint_interval=1000, stdout_interval=1)
    save_config(make_config(**settings), str(tmp_path / "ddp.json"))
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1")
    launcher = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                                 "2", os.path.join(ROOT, "train.py"), "--config", str(tmp_path / "ddp.json")],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    ranks = []
    for line in launcher.stdout:
        if line.startswith("Steps 2:"):
            ranks = _children(launcher.pid)
            for pid in [launcher.pid] + ranks:
                os.kill(pid, signal.SIGTERM)
            break
    out = launcher.communicate(timeout=120)[0]
    assert len(ranks) == 2 and "again: stopping at once" not in out
    stopped = [line for line in out.splitlines() if line.startswith("Stopped by SIGTERM after step ")]
    assert len(stopped) == 1 and "checkpoint set saved" in stopped[0], out[-3000:]
    step = int(stopped[0].split("after step ")[1].split(";")[0])
    assert checkpoint_steps(settings["checkpoint_path"], "do") == [step]


def _batch(h):
    audio = torch.from_numpy(tone(h.segment_size / h.sampling_rate))[None].repeat(2, 1)
    audio[1] *= 0.5
    return audio


def _trained(h, steps, **step_options):
    torch.manual_seed(0)
    trainer = train.Trainer(h, torch.device("cpu"))
    terms = None
    for _ in range(steps):
        terms = trainer.train_step(_batch(h), **step_options)
    return trainer, terms


def test_measuring_gradient_norms_leaves_the_update_unchanged(tiny_h):
    measured, terms = _trained(tiny_h, 2, want_norms=True)
    plain, plain_terms = _trained(tiny_h, 2)
    assert "grad_norm_G" not in plain_terms
    for a, b in zip(measured.params_g + measured.params_d, plain.params_g + plain.params_d):
        assert torch.equal(a, b)
    # Gradients stay in .grad after the step: the norm is theirs.
    for name, params in (("grad_norm_G", measured.params_g), ("grad_norm_D", measured.params_d)):
        expected = math.sqrt(sum(float((p.grad.double() ** 2).sum()) for p in params))
        assert terms[name].item() == pytest.approx(expected, rel=1e-5)


def test_grad_clip_scales_the_gradients_to_the_max_norm(tiny_h):
    h = make_config(**dict(TINY, grad_clip=0.01))
    trainer, terms = _trained(h, 1)
    for name, params in (("grad_norm_G", trainer.params_g), ("grad_norm_D", trainer.params_d)):
        clipped = math.sqrt(sum(float((p.grad.double() ** 2).sum()) for p in params))
        assert terms[name].item() > 0.01 and clipped == pytest.approx(0.01, rel=1e-4), name


def test_codebook_health_golden_values():
    counts = torch.zeros(3, 4)
    counts[0] = 5            # uniform: every code, perplexity = codebook size
    counts[1, 2] = 7         # collapsed to one code
    counts[2, :2] = 1        # two codes equally often
    health = train.codebook_health(counts)
    assert health["usage"].tolist() == [1.0, 0.25, 0.5]
    assert health["perplexity"].tolist() == pytest.approx([4.0, 1.0, 2.0])


def test_code_counts_are_the_codes_drawn(tiny_h):
    trainer = train.Trainer(tiny_h, torch.device("cpu"))
    codes = torch.randint(0, tiny_h.codebook_size, (2, tiny_h.n_codebooks, 5))
    trainer.count_codes(codes)
    trainer.count_codes(codes[:1])
    for i in range(tiny_h.n_codebooks):
        expected = torch.bincount(torch.cat([codes[:, i].flatten(), codes[0, i]]), minlength=tiny_h.codebook_size)
        assert torch.equal(trainer.code_counts[i], expected.float())


@pytest.mark.parametrize("precision", ["no", "fp16"])
def test_summary_logs_codebook_health_and_gradient_norms(tmp_path, precision):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    h = _setup(tmp_path, training_epochs=1, summary_interval=1, mixed_precision=precision)
    trainer = train.train(h, torch.device("cpu"))
    events = EventAccumulator(os.path.join(h.checkpoint_path, "logs"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    expected = {f"Codebook/{kind}_{i}" for kind in ("usage", "perplexity") for i in range(h.n_codebooks)}
    assert expected | {"Training/grad_norm_G", "Training/grad_norm_D", "Training/learning_rate"} <= tags
    usage = events.Scalars("Codebook/usage_0")
    assert [e.step for e in usage] == [0, 1] and all(0 < e.value <= 1 for e in usage)
    scales = {"Training/loss_scale_G", "Training/loss_scale_D"}
    assert scales <= tags if precision == "fp16" else not scales & tags
    if precision == "fp16":
        logged = [e.value for e in events.Scalars("Training/loss_scale_G")]
        # Each skipped update halves the scale from 65536; the last value is the scaler's now.
        assert len(logged) == 2 and logged[0] <= 65536 and logged[-1] == trainer.scaler_g.get_scale()


def _pool_worker(rank, folder):
    import torch.distributed as dist
    from types import SimpleNamespace
    dist.init_process_group("gloo", init_method=f"file://{folder}/init", rank=rank, world_size=2)
    try:
        trainer = SimpleNamespace(code_counts=torch.full((2, 3), rank + 1.0))
        train.Trainer.pool_code_counts(trainer)
        first = trainer.code_counts.clone()
        trainer.code_counts += rank + 1.0       # the next steps' codes
        train.Trainer.pool_code_counts(trainer)
        torch.save((first, trainer.code_counts), f"{folder}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_code_counts_are_pooled_on_rank_0_and_counted_once(tmp_path):
    """Rank 0 holds the sum over ranks (which it logs and saves); the others count on from
    zero, so pooling again adds only what came since."""
    torch.multiprocessing.spawn(_pool_worker, args=(str(tmp_path),), nprocs=2)
    (first0, second0), (first1, second1) = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert torch.equal(first0, torch.full((2, 3), 3.0)) and not first1.any()
    assert torch.equal(second0, torch.full((2, 3), 6.0)) and not second1.any()


def test_codebook_health_after_a_resume_covers_the_whole_window(tmp_path):
    """Summaries at steps 0 and 4, a set saved at step 2: resumed from it, the summary at step
    4 counts the codes of steps 1 to 4, as in the run that was not stopped (the resumed steps
    draw the same codes, bit for bit)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    settings = dict(training_epochs=3, summary_interval=4, checkpoint_interval=2, validation_interval=100)
    whole = _setup(tmp_path / "a", **settings)
    train.train(whole, torch.device("cpu"))
    resumed = tmp_path / "b" / "cp"
    resumed.mkdir(parents=True)
    for kind in ("encoder", "decoder", "do"):
        shutil.copy(os.path.join(whole.checkpoint_path, f"{kind}_00000002"), resumed)
    assert torch.load(resumed / "do_00000002", weights_only=False)["code_counts"].sum() > 0
    train.train(_setup(tmp_path / "b", checkpoint_path=str(resumed), **settings), torch.device("cpu"))
    logged = []
    for folder in (whole.checkpoint_path, str(resumed)):
        events = EventAccumulator(os.path.join(folder, "logs"))
        events.Reload()
        logged.append({tag: [e.value for e in events.Scalars(tag) if e.step == 4]
                       for tag in events.Tags()["scalars"] if tag.startswith("Codebook/")})
    assert len(logged[0]) == 2 * whole.n_codebooks and all(len(v) == 1 for v in logged[0].values())
    assert logged[0] == logged[1]


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_keeps_spectra_quantizer_and_losses_float32(precision):
    h = make_config(**dict(TINY, mixed_precision=precision))
    trainer = train.Trainer(h, torch.device("cpu"))
    assert trainer.scaler_g.is_enabled() == (precision == "fp16")
    seen = {}

    def record(name):
        def hook(module, inputs, output):
            seen.setdefault(name, output.dtype)
        return hook
    trainer.encoder.amp.blocks[0].register_forward_hook(record("branch"))
    trainer.mpd.discriminators[0].convs[0].register_forward_hook(record("mpd"))
    ref, gen = trainer.codec(_batch(h), training=True)
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    assert seen["branch"] == half
    for name in ("logamp", "pha", "real", "imag", "audio", "commitment", "codebook"):
        assert gen[name].dtype == torch.float32, name
    terms = trainer.train_step(_batch(h))
    assert seen["mpd"] == half
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in terms.values())


def test_compile_unavailable_falls_back_with_one_line(tiny_h, monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise RuntimeError("no compiler here\nsecond line")
    monkeypatch.setattr(torch, "compile", broken)
    trainer = train.Trainer(make_config(**dict(TINY, compile="default")), torch.device("cpu"))
    out = capsys.readouterr().out
    assert out == "compile: torch.compile is unavailable here (RuntimeError: no compiler here); training without it\n"
    assert trainer.train_encoder is trainer.encoder
    trainer.train_step(_batch(tiny_h))


@pytest.mark.parametrize("mode, marks", [("no", 0), ("reduce-overhead", 2)])
def test_compiled_steps_mark_their_start_for_cuda_graphs(monkeypatch, mode, marks):
    """Each step of a compiled run starts a new CUDA-graph step; the discriminators' second
    call after their backward must not (it would free the generator's outputs)."""
    monkeypatch.setattr(torch, "compile", lambda module, mode=None: module)
    calls = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: calls.append(1))
    h = make_config(**dict(TINY, compile=mode))
    trainer = train.Trainer(h, torch.device("cpu"))
    for _ in range(2):
        trainer.train_step(_batch(h))
    assert trainer.compiled == (mode != "no") and len(calls) == marks


@pytest.mark.slow
def test_compiled_training_matches_eager(tiny_h):
    """torch.compile of the tiny model: the same losses as eager, within float tolerance."""
    eager = _trained(tiny_h, 2)[1]
    compiled = _trained(make_config(**dict(TINY, compile="default")), 2)[1]
    for name, value in eager.items():
        assert compiled[name].item() == pytest.approx(value.item(), rel=1e-3, abs=1e-4), name


def _epoch_orders(h, epochs):
    loader, _ = train.build_loaders(h)
    orders = []
    for epoch in range(epochs):
        loader.sampler.set_epoch(epoch)
        orders.append([loader.dataset.files[i] for _, i in loader.sampler])
    return orders


def test_training_order_fixed_by_default_and_reshuffled_when_asked(tmp_path):
    import random
    h = _setup(tmp_path)
    fixed = _epoch_orders(h, 3)
    expected = train.read_filelist(h.input_training_wav_list)
    random.Random(h.seed).shuffle(expected)
    assert fixed == [expected] * 3
    h = _setup(tmp_path / "b", shuffle_every_epoch=True)
    shuffled = _epoch_orders(h, 3)
    assert all(sorted(order) == sorted(shuffled[0]) for order in shuffled)
    assert shuffled[0] != shuffled[1] or shuffled[1] != shuffled[2]
    assert shuffled == _epoch_orders(h, 3)  # seeded


def test_optimizer_kernels_keep_the_numbers(tiny_h):
    """foreach AdamW (the default here) equals the per-tensor loop bit for bit; fused equals it
    up to float rounding."""
    foreach, _ = _trained(tiny_h, 2)
    assert foreach.optim_g.defaults["foreach"] and not foreach.optim_g.defaults["fused"]
    loop = _trained(tiny_h, 0)[0]
    for optimizer in (loop.optim_g, loop.optim_d):
        optimizer.defaults["foreach"] = False
        for group in optimizer.param_groups:
            group["foreach"] = False
    for _ in range(2):
        loop.train_step(_batch(tiny_h))
    fused, _ = _trained(make_config(**dict(TINY, fused_adamw=True)), 2)
    for a, b, c in zip(foreach.params_g + foreach.params_d, loop.params_g + loop.params_d,
                       fused.params_g + fused.params_d):
        assert torch.equal(a, b)
        # Two AdamW steps move a weight by about 2 lr = 4e-4; rounding differences stay far below.
        assert torch.allclose(a, c, rtol=0, atol=1e-5)


def _train_failing_at(h, monkeypatch, step):
    """Run train.py's loop on h with a step that raises when it comes to `step`; then the real step again."""
    real_step = train.Trainer.train_step

    def failing_step(self, audio, **options):
        if self.steps == step:
            raise RuntimeError("out of memory (injected)")
        return real_step(self, audio, **options)
    monkeypatch.setattr(train.Trainer, "train_step", failing_step)
    with pytest.raises(RuntimeError, match="injected"):
        train.train(h, torch.device("cpu"))
    monkeypatch.setattr(train.Trainer, "train_step", real_step)


def test_an_exception_says_where_the_last_complete_set_is(tmp_path, monkeypatch, capsys):
    h = _setup(tmp_path, training_epochs=3, checkpoint_interval=1, validation_interval=100)
    _train_failing_at(h, monkeypatch, 2)
    err = capsys.readouterr().err
    assert f"Training failed at step 2; the last complete checkpoint set is " \
           f"{os.path.join(h.checkpoint_path, 'do_00000001')}" in err
    # Resumed, the run saves set 2 and fails at step 3. Set 2 damaged, the next resume passes
    # over it, so a failure before it is written again names set 1.
    _train_failing_at(h, monkeypatch, 3)
    with open(os.path.join(h.checkpoint_path, "do_00000002"), "r+b") as f:
        f.truncate(1000)
    capsys.readouterr()
    _train_failing_at(h, monkeypatch, 2)
    out, err = capsys.readouterr()
    assert "warning: skipping checkpoint set 2" in out
    assert f"Training failed at step 2; the last complete checkpoint set is " \
           f"{os.path.join(h.checkpoint_path, 'do_00000001')}" in err


@pytest.mark.parametrize("workers", [0, 1])
def test_a_file_removed_mid_run_is_skipped_in_training_and_validation(tmp_path, monkeypatch, capfd, workers):
    """clip0 (also the validation file) is removed after step 1: the run goes on to its end,
    each skip is said (once, also by a data worker), and validation reports that no file of
    its list read."""
    h = _setup(tmp_path, training_epochs=3, checkpoint_interval=100, validation_interval=2, num_workers=workers)
    real_step = train.Trainer.train_step

    def removing_clip0(self, *args, **kwargs):
        if self.steps == 1:
            os.remove(tmp_path / "wavs" / "clip0.wav")
        return real_step(self, *args, **kwargs)
    monkeypatch.setattr(train.Trainer, "train_step", removing_clip0)
    assert train.train(h, torch.device("cpu")).steps == 6
    # capfd: data workers are other processes.
    out, err = capfd.readouterr()
    assert "Validation at step 2: no utterance gave a finite value" in out
    assert "Validation at step 4: no utterance gave a finite value" in out
    assert "training takes the next file of the list in place of one that no longer reads" in err
    assert err.count("validation leaves out a file that no longer reads") == 1 and "clip0.wav" in err
    assert newest_complete_step(h.checkpoint_path) == 5


def test_a_validation_utterance_too_long_for_gpu_memory_is_left_out(tmp_path, monkeypatch, capsys):
    h = _setup(tmp_path, training_epochs=1, validation_interval=1)
    (tmp_path / "valid.txt").write_text("wavs/clip3.wav\nwavs/clip0.wav\n")
    real_codec = train.Trainer.codec
    lengths = []

    def codec(self, audio, *args, **kwargs):
        if not self.encoder.training:
            lengths.append(audio.size(-1))
            if len(lengths) % 2:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
        return real_codec(self, audio, *args, **kwargs)
    monkeypatch.setattr(train.Trainer, "codec", codec)
    assert train.train(h, torch.device("cpu")).steps == 2
    out, err = capsys.readouterr()
    assert err.count(f"warning: validation leaves out {tmp_path / 'wavs' / 'clip3.wav'}: its 21600 samples do not "
                     f"fit in GPU memory") == 2
    assert out.count("Validation at step ") == 2 and re.search(r"Validation at step 1: \w+ \d+\.\d+, ", out)
    assert len(lengths) == 4 and lengths[0] > lengths[1]


def test_a_run_stopped_just_before_its_final_save_is_marked_finished_on_restart(tmp_path, monkeypatch, capsys):
    """The last step (3) is also an interval checkpoint: a run stopped after that save and
    before the final one has nothing left to train, and the restart still marks it finished."""
    h = _setup(tmp_path)
    real_save = train.Trainer.save

    def stopped_at_final_save(self, step, epoch):
        if epoch == h.training_epochs:
            raise KeyboardInterrupt
        real_save(self, step, epoch)
    monkeypatch.setattr(train.Trainer, "save", stopped_at_final_save)
    with pytest.raises(KeyboardInterrupt):
        train.train(h, torch.device("cpu"))
    do_path = os.path.join(h.checkpoint_path, "do_00000003")
    assert torch.load(do_path, weights_only=False)["epoch"] == 1
    monkeypatch.setattr(train.Trainer, "save", real_save)
    assert train.train(h, torch.device("cpu")).steps == 4
    do = torch.load(do_path, weights_only=False)
    assert do["epoch"] == 2 and do["position"] == 0
    assert do["optim_g"]["param_groups"][0]["lr"] == pytest.approx(h.learning_rate * h.lr_decay ** 2, rel=1e-9)
    capsys.readouterr()
    train.train(h, torch.device("cpu"))
    assert "Nothing to train: the run in" in capsys.readouterr().out


def test_tensorboard_shows_each_step_once_after_a_crash_and_resume(tmp_path, monkeypatch):
    """Steps 4 and 5 come after the last checkpoint (3): logged by the crashed run, trained
    and logged again by the resumed one, which hides the first run's from step 4 on."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    h = _setup(tmp_path, training_epochs=4, validation_interval=100)
    _train_failing_at(h, monkeypatch, 6)
    train.train(h, torch.device("cpu"))
    events = EventAccumulator(os.path.join(h.checkpoint_path, "logs"))
    events.Reload()
    assert [e.step for e in events.Scalars("Training/G")] == list(range(8))


def test_a_signal_stops_one_process_at_once_with_device_checks(tmp_path):
    """Deferred (fused AdamW) checks wait for a read-back; a single process reads back when a
    signal came, so it stops after the step in progress, as without them."""
    h = _setup(tmp_path, fused_adamw=True)
    trainer = train.Trainer(h, torch.device("cpu"))
    trainer.resume()
    trainer.train_step(_batch(h))
    assert not trainer.nonfinite.read and train.should_stop(trainer, {}) is None and not trainer.nonfinite.read
    assert train.should_stop(trainer, {"signal": signal.SIGTERM}) == "signal" and trainer.nonfinite.read


# Operations that make the host wait for the device (the host needs their result) or bring
# host data into a step: none may be recorded in a CUDA graph.
HOST_READS = {"aten._local_scalar_dense", "aten.equal", "aten.is_nonzero", "aten.allclose", "aten.nonzero",
              "aten.masked_select", "aten._unique2", "aten.unique_dim", "aten.unique_consecutive", "aten.bincount",
              "aten.lift_fresh"}


class HostReads(TorchDispatchMode):
    """Names of the HOST_READS operations run inside the block."""

    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func.overloadpacket) in HOST_READS:
            self.names.add(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("overrides", [{}, {"fused_adamw": True, "mixed_precision": "bf16", "quantizer_dropout": 0.5},
                                       {"mixed_precision": "fp16", "grad_clip": 1.0}])
def test_the_recorded_halves_of_a_step_read_nothing_back(overrides):
    """What `cuda_graph` records, the forward and backward passes, never waits for the device;
    with fused AdamW's device-side checks the updates do not either. The detector sees the
    default updates' checks and torch.istft's own check."""
    h = make_config(**dict(TINY, **overrides))
    trainer = train.Trainer(h, torch.device("cpu"))
    audio = _batch(h)
    # As after the warm-up steps: the optimizers' state exists.
    trainer.train_step(audio)
    with HostReads() as reads:
        ref, gen, loss_d = trainer.discriminator_half(audio)
        terms = trainer.generator_half(audio, ref, gen)
    assert reads.names == set() and torch.isfinite(loss_d) and torch.isfinite(terms["G"])
    with HostReads() as reads:
        trainer.update("G", terms["G"], want_norm=True)
    assert ("aten._local_scalar_dense" in reads.names) != h.fused_adamw
    with HostReads() as reads:
        torch.istft(torch.ones(1, 513, 3, dtype=torch.complex64), 1024, 40, 320, torch.hann_window(320))
    assert reads.names


def test_a_failed_recording_ends_the_run_with_one_line(monkeypatch):
    """Recording can fail where eager steps run (an operation that may not be captured): the
    run stops with one line that names the way out, not a traceback."""
    trainer = train.Trainer(make_config(**TINY), torch.device("cpu"))

    def refuse(*args, **kwargs):
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing\nmore detail")
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)
    monkeypatch.setattr(torch.cuda, "Stream", lambda device: None)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: None)
    monkeypatch.setattr(torch.cuda, "graph", refuse)
    monkeypatch.setattr(train, "train", lambda h: train.StepGraph(trainer)._record(_batch(h)))
    with pytest.raises(SystemExit) as stop:
        train.main(["--config", os.path.join(ROOT, "config_demo.json")])
    assert str(stop.value) == ("error: cuda_graph: recording the training step failed (CUDA error: operation not "
                               "permitted when stream is capturing); train with cuda_graph false")


def test_cuda_graph_without_a_gpu_trains_without_it_and_says_so(capsys):
    trainer = train.Trainer(make_config(**dict(TINY, fused_adamw=True, cuda_graph=True)), torch.device("cpu"))
    assert trainer.step_graph is None
    assert "cuda_graph: it needs a CUDA GPU; training without it" in capsys.readouterr().out
    assert not any(group["capturable"] for group in trainer.optim_g.param_groups + trainer.optim_d.param_groups)


def test_resumed_optimizers_use_this_runs_kernels(tmp_path):
    """A checkpoint's optimizer state carries the kernel options it was saved with; the config of
    the run that resumes it decides them."""
    h = _setup(tmp_path, fused_adamw=True, training_epochs=1)
    train.train(h, torch.device("cpu"))
    trainer = train.Trainer(make_config(**dict(h, fused_adamw=False)), torch.device("cpu"))
    trainer.resume()
    assert trainer.steps > 0
    for optimizer in (trainer.optim_g, trainer.optim_d):
        for group in optimizer.param_groups:
            assert group["foreach"] and not group["fused"] and not group["capturable"]
            # foreach AdamW counts steps on the host, as a fresh one would.
            assert all(optimizer.state[p]["step"].device.type == "cpu" for p in group["params"])


def test_only_a_set_the_run_resumed_from_or_wrote_is_rewritten_in_place(tmp_path, monkeypatch):
    """Sets 2, 4 and 5 (the final one); set 5's encoder_ is cut, so the resume takes set 4.
    Saving step 5 again replaces a set of other weights (its do_ goes first); saving 4 or 5
    after that rewrites the run's own set."""
    h = _setup(tmp_path, training_epochs=3, checkpoint_interval=2, validation_interval=100)
    train.train(h, torch.device("cpu"))
    assert checkpoint_steps(h.checkpoint_path, "do") == [2, 4, 5]
    with open(os.path.join(h.checkpoint_path, "encoder_00000005"), "r+b") as f:
        f.truncate(100)
    calls = []
    real = train.save_checkpoint_set

    def save_checkpoint_set(folder, step, parts, own=False):
        calls.append((step, own))
        real(folder, step, parts, own)
    monkeypatch.setattr(train, "save_checkpoint_set", save_checkpoint_set)
    trainer = train.Trainer(h, torch.device("cpu"))
    trainer.resume()
    assert trainer.steps == 5 and trainer.passed_over == {5}
    trainer.save(5, 2)
    assert trainer.passed_over == set()
    trainer.save(5, 3)
    trainer.save(4, 2)
    assert calls == [(5, False), (5, True), (4, True)]
    assert newest_complete_step(h.checkpoint_path) == 5


def test_keep_last_checkpoints_counts_good_sets_only(tmp_path):
    """Sets every 2 steps, keeping 4: 2, 4 and 5 (the final one). Set 5 then reads back cut.
    A longer run resumed from 4 saves 6 and 7 and keeps 2 beside them: the cut set never
    counts among the kept. Nor does it in a third run, resumed from 7 past it (each set
    records the steps passed over): that one keeps 4 good sets, and leaves the cut one."""
    h = _setup(tmp_path, training_epochs=3, checkpoint_interval=2, validation_interval=100, keep_last_checkpoints=4)
    train.train(h, torch.device("cpu"))
    assert complete_steps(h.checkpoint_path) == [2, 4, 5]
    with open(os.path.join(h.checkpoint_path, "encoder_00000005"), "r+b") as f:
        f.truncate(100)
    real = train.prune_checkpoints
    for epochs, expected in ((4, [[2, 4, 5, 6], [2, 4, 5, 6, 7]]), (5, [[4, 5, 6, 7, 8], [5, 6, 7, 8, 9]])):
        kept = []

        def prune(folder, keep, passed_over):
            real(folder, keep, passed_over)
            kept.append(complete_steps(folder))
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(train, "prune_checkpoints", prune)
            train.train(make_config(**dict(h, training_epochs=epochs)), torch.device("cpu"))
        assert kept == expected, epochs


def test_a_resume_that_fails_leaves_the_run_config_as_it_was(tmp_path):
    """The config beside the checkpoints describes them: a restart with another network is an
    error, and the file keeps the network that inference must build."""
    h = _setup(tmp_path, training_epochs=1)
    train.train(h, torch.device("cpu"))
    path = os.path.join(h.checkpoint_path, "config.json")
    before = open(path).read()
    with pytest.raises(ValueError, match=re.escape(f"another network than this config (latent_dim {h.latent_dim} -> "
                                                   f"{2 * h.latent_dim})")):
        train.train(make_config(**dict(h, latent_dim=h.latent_dim * 2)), torch.device("cpu"))
    assert open(path).read() == before


def test_a_resume_takes_lr_decay_from_the_config_and_names_the_keys_it_does_not_take(tmp_path, capsys):
    h = _setup(tmp_path, training_epochs=1)
    first = train.train(h, torch.device("cpu"))
    lr = first.optim_g.param_groups[0]["lr"]
    assert "the config differs" not in capsys.readouterr().out
    resumed = train.Trainer(make_config(**dict(h, lr_decay=0.5, learning_rate=1e-3)), torch.device("cpu"))
    resumed.resume()
    out = capsys.readouterr().out
    assert "note: the config differs from the resumed run in learning_rate 0.001" in out and "lr_decay 0.5" in out
    assert resumed.scheduler_g.gamma == resumed.scheduler_d.gamma == 0.5
    assert resumed.optim_g.param_groups[0]["lr"] == lr
    resumed.scheduler_g.step()
    assert resumed.optim_g.param_groups[0]["lr"] == pytest.approx(lr * 0.5)
    # The run's record beside the checkpoints holds the values in effect.
    train.train(make_config(**dict(h, training_epochs=2, lr_decay=0.5, learning_rate=1e-3, adam_b1=0.5)),
                torch.device("cpu"))
    with open(os.path.join(h.checkpoint_path, "config.json")) as f:
        saved = json.load(f)
    assert (saved["learning_rate"], saved["adam_b1"], saved["adam_b2"], saved["lr_decay"]) == (
        h.learning_rate, h.adam_b1, h.adam_b2, 0.5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("overrides", [{}, {"mixed_precision": "fp16", "grad_clip": 1.0, "quantizer_dropout": 0.5},
                                       {"fused_adamw": True, "mixed_precision": "bf16"}])
def test_recorded_steps_equal_eager_steps_on_a_gpu(tmp_path, overrides):
    """cuda_graph replays the kernels an eager step runs: the same losses and weights over warm-up,
    recording, replays, a learning-rate change and a re-recording after an invalidation."""
    device = torch.device("cuda")
    h = make_config(**dict(TINY, **overrides))
    batches = [torch.from_numpy(tone(h.segment_size / h.sampling_rate, seed=i))[None].repeat(2, 1).pin_memory()
               for i in range(9)]
    runs = []
    for graph in (False, True):
        torch.manual_seed(0)
        trainer = train.Trainer(make_config(**dict(TINY, cuda_graph=graph, checkpoint_path=str(tmp_path / str(graph)),
                                                   **overrides)), device)
        # Builds the schedulers; the folder is empty.
        trainer.resume()
        losses = []
        # The same convolution algorithms in both runs.
        with torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True):
            for i, audio in enumerate(batches):
                if i == 5:
                    trainer.scheduler_g.step()
                    trainer.scheduler_d.step()
                if i == 7 and graph:
                    trainer.step_graph.invalidate()
                losses.append({k: v.item() for k, v in trainer.train_step(audio, want_norms=True).items()})
        assert (trainer.step_graph is not None) == graph
        runs.append((losses, trainer))
    (eager, a), (recorded, b) = runs
    assert len(b.step_graph.graphs) == 2
    for x, y in zip(eager, recorded):
        # fp16's first steps overflow: their gradient norms are not numbers in both runs.
        assert x.keys() == y.keys() and all(math.isclose(x[k], y[k], rel_tol=1e-5, abs_tol=1e-6)
                                            or math.isnan(x[k]) and math.isnan(y[k]) for k in x)
    for p, q in zip(a.params_g + a.params_d, b.params_g + b.params_d):
        assert torch.allclose(p, q, rtol=0, atol=1e-5)


def test_a_second_run_on_the_same_checkpoint_path_is_refused(tmp_path):
    h = _setup(tmp_path, training_epochs=1)
    lock = train.check_run_setup(h)
    try:
        with pytest.raises(ValueError, match=f"another training run is using {h.checkpoint_path}"):
            train.train(h, torch.device("cpu"))
    finally:
        lock.close()
    assert not checkpoint_steps(h.checkpoint_path, "do")
    train.train(h, torch.device("cpu"))        # the lock is free again, and released at the end
    train.check_run_setup(h).close()


@pytest.mark.skipif(train.fcntl is None, reason="file locks are POSIX")
def test_a_folder_that_cannot_be_locked_trains_unguarded_with_a_warning(tmp_path, monkeypatch, capsys):
    """A file system without locks (some network mounts): the run goes on, and leaves the
    temporary files alone, which another run may be writing."""
    h = _setup(tmp_path)
    os.makedirs(h.checkpoint_path)
    (tmp_path / "cp" / ".tmp_do_00000003x").write_bytes(b"partial")

    def no_locks(*args):
        raise OSError(errno.ENOLCK, "No locks available")
    monkeypatch.setattr(train.fcntl, "flock", no_locks)
    assert train.check_run_setup(h) is None
    assert f"warning: cannot lock {h.checkpoint_path} (No locks available)" in capsys.readouterr().out
    assert (tmp_path / "cp" / ".tmp_do_00000003x").exists()


def test_a_stop_signal_repeated_at_once_is_one_request(capsys):
    """Under a batch scheduler with torchrun, a rank gets the scheduler's signal and torchrun's
    copy at once; another signal still stops at once."""
    with pytest.raises(SystemExit) as stop:
        with train.stop_requests() as request:
            for _ in range(2):
                os.kill(os.getpid(), signal.SIGTERM)
            assert request == {"signal": signal.SIGTERM}
            assert capsys.readouterr().err == ""
            os.kill(os.getpid(), signal.SIGINT)
    assert stop.value.code == 128 + signal.SIGINT
    assert "SIGINT again: stopping at once, without saving" in capsys.readouterr().err


def test_a_second_stop_signal_stops_at_once_with_its_status(capsys, monkeypatch):
    monkeypatch.setattr(train, "REPEAT_SECONDS", 0.0)
    with pytest.raises(SystemExit) as stop:
        with train.stop_requests() as request:
            os.kill(os.getpid(), signal.SIGTERM)
            assert request == {"signal": signal.SIGTERM}
            os.kill(os.getpid(), signal.SIGTERM)
    assert stop.value.code == 128 + signal.SIGTERM
    assert "SIGTERM again: stopping at once, without saving" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_a_killed_runs_unfinished_checkpoint_writes_are_removed(tmp_path):
    h = _setup(tmp_path)
    os.makedirs(h.checkpoint_path)
    stale = os.path.join(h.checkpoint_path, ".tmp_do_00000004abcd")
    with open(stale, "wb") as f:
        f.write(bytes(1000))
    train.check_run_setup(h).close()
    assert not os.path.exists(stale)


def test_a_missing_list_or_another_network_is_refused_before_anything_is_written_or_read(tmp_path, monkeypatch):
    """A missing file list leaves no checkpoint folder behind; a run resumed with another
    network is refused before the data check, which can take long on a new list."""
    h = _setup(tmp_path, training_epochs=1, checkpoint_interval=100, validation_interval=100)
    for key in ("input_training_wav_list", "input_validation_wav_list"):
        missing = make_config(**dict(h, **{key: str(tmp_path / "nope.txt")}, checkpoint_path=str(tmp_path / "new")))
        with pytest.raises(FileNotFoundError, match="file list not found: .*nope.txt"):
            train.train(missing, torch.device("cpu"))
        assert not (tmp_path / "new").exists()
    train.train(h, torch.device("cpu"))

    def data_check(*args, **kwargs):
        raise AssertionError("the data were checked")
    monkeypatch.setattr(train, "check_audio_files", data_check)
    with pytest.raises(ValueError, match=re.escape("describes another network than this config (n_codebooks 4 -> 2)")):
        train.train(make_config(**dict(h, n_codebooks=2)), torch.device("cpu"))


def test_resuming_with_another_network_is_refused(tmp_path):
    """Keys that change no tensor's shape (causal, the discriminators' periods) must still
    match the run's: its config.json is left as it was."""
    h = _setup(tmp_path, training_epochs=1, checkpoint_interval=100, validation_interval=100)
    train.train(h, torch.device("cpu"))
    saved = (tmp_path / "cp" / "config.json").read_text()
    for key, value in (("causal", True), ("mpd_periods", [2, 3, 5, 7, 13])):
        with pytest.raises(ValueError, match=re.escape(f"describes another network than this config ({key} ")):
            train.train(make_config(**dict(h, **{key: value})), torch.device("cpu"))
    assert (tmp_path / "cp" / "config.json").read_text() == saved
    # causal_kernel_size shapes no layer of a non-causal network: the finished run is found.
    assert train.train(make_config(**dict(h, causal_kernel_size=3)), torch.device("cpu")).last_epoch == 1
    assert differing_keys(dict(causal=False, causal_kernel_size=7), dict(causal=True, causal_kernel_size=3),
                                 ["causal_kernel_size"]) == ["causal_kernel_size"]
