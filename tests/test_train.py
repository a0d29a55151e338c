"""train.py: a few CPU steps write a checkpoint set in the release layout; a second run resumes."""
import json
import math
import os

import numpy as np
import soundfile as sf

import pytest
import torch

import train
from conftest import TINY, make_config, tone, write_tone
from checkpoints import checkpoint_steps, load_release_state_dict, newest_complete_step
from config import save_config
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
    assert set(do) == {"mpd", "mrd", "optim_g", "optim_d", "steps", "epoch"}
    assert do["steps"] == 3 and do["epoch"] == 1
    assert len(do["optim_g"]["state"]) == len(list(first.encoder.parameters())) + len(list(first.decoder.parameters()))
    assert all(s["step"].item() == 4 for s in do["optim_g"]["state"].values())
    enc_sd = torch.load(os.path.join(h.checkpoint_path, "encoder_00000003"), weights_only=False)["encoder"]
    assert "latent_output_conv.weight_g" in enc_sd and "embed_logamp.weight" in enc_sd

    # The saved weights are the trained ones.
    encoder = Encoder(h)
    load_release_state_dict(encoder, enc_sd)
    for (name, a), b in zip(encoder.state_dict().items(), first.encoder.state_dict().values()):
        assert torch.equal(a, b), name

    # Resume with two more epochs: the release restarts the saved epoch (index 1), so
    # steps continue at 4 and the optimizer keeps counting from its saved state.
    h2 = _setup(tmp_path / "again", checkpoint_path=h.checkpoint_path, training_epochs=3)
    second = train.train(h2, torch.device("cpu"))
    assert second.steps == 8
    assert checkpoint_steps(h.checkpoint_path, "do") == [3, 6, 7]
    do = torch.load(os.path.join(h.checkpoint_path, "do_00000007"), weights_only=False)
    # The final set stores the number of finished epochs, so a restart has nothing left to do.
    assert do["steps"] == 7 and do["epoch"] == 3
    assert all(s["step"].item() == 8 for s in do["optim_g"]["state"].values())
    assert all(s["step"].item() == 8 for s in do["optim_d"]["state"].values())
    # ExponentialLR rebuilt from the saved epoch: the lr decayed once per finished epoch
    # (0, 1 and 2), exactly as in an uninterrupted run.
    lr = do["optim_g"]["param_groups"][0]["lr"]
    assert lr == pytest.approx(h.learning_rate * h.lr_decay ** 3, rel=1e-9)

    third = train.train(h2, torch.device("cpu"))
    assert third.steps == 8 and checkpoint_steps(h.checkpoint_path, "do") == [3, 6, 7]
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


def test_train_rejects_bad_list(tmp_path):
    h = _setup(tmp_path)
    (tmp_path / "train.txt").write_text("wavs/missing.wav\n")
    with pytest.raises(FileNotFoundError, match="missing.wav"):
        train.train(h, torch.device("cpu"))


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


# A torchrun worker: trains with the config in argv[1], then each rank saves its weights.
_WORKER = """
import json, os, sys
sys.path.insert(0, {root!r})
import torch
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


def test_torchrun_two_processes_equal_one_process_at_the_same_global_batch(tmp_path, capsys):
    """2 gloo processes x batch 2 == 1 process x batch 4: same files per step, mean losses,
    DDP averages the gradients. 8 clips: 2 steps per epoch, 2 epochs, a checkpoint at step 3."""
    import subprocess
    import sys
    settings = _clips(tmp_path, 8)
    ddp = dict(settings, batch_size=2, checkpoint_path=str(tmp_path / "ddp"))
    save_config(make_config(**ddp), str(tmp_path / "ddp.json"))
    (tmp_path / "worker.py").write_text(_WORKER.format(root=os.path.dirname(os.path.dirname(__file__))))
    env = dict(os.environ, OMP_NUM_THREADS="1")
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
    assert torch.load(tmp_path / "ddp" / "do_00000003", weights_only=False)["steps"] == 3
    for name in ("encoder", "decoder", "mpd", "mrd"):
        for key, value in getattr(single, name).state_dict().items():
            assert torch.equal(ranks[0][name][key], ranks[1][name][key]), (name, key)
            # Float-rounding noise, a tenth of one AdamW step (lr 2e-4); other data or a missing
            # gradient average moves weights by whole steps.
            assert torch.allclose(ranks[0][name][key], value, rtol=0, atol=2e-5), (name, key)
    # What rank 0 prints is the mean over ranks, i.e. the single process's losses.
    printed = _printed_terms(capsys.readouterr().out, 3)
    for name, value in _printed_terms(run.stdout, 3).items():
        if name != "s/b":
            assert value == pytest.approx(printed[name], abs=2e-3), name
