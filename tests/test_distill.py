"""distill.py and train.py's KD term: a tiny teacher, then a causal student that learns from it."""
import math
import os

import pytest
import torch

import distill
import train
from checkpoints import release_state_dict
from config import ConfigError
from conftest import TINY, make_config, tone, write_tone
from distill import KD_POINTS

pytestmark = pytest.mark.usefixtures("one_thread")


def _config(tmp_path, folder, **overrides):
    files = tmp_path / "list.txt"
    if not files.exists():
        names = [write_tone(str(tmp_path / f"clip{i}.wav"), 0.3, f0=150 + 40 * i, seed=i) for i in range(2)]
        files.write_text("\n".join(names) + "\n")
    settings = dict(TINY, input_training_wav_list=str(files), input_validation_wav_list=str(files),
                    checkpoint_path=str(tmp_path / folder), training_epochs=3, checkpoint_interval=1000,
                    stdout_interval=1, summary_interval=1, validation_interval=1000, segment_size=3160)
    settings.update(overrides)
    return make_config(**settings)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A tiny non-causal codec trained for 3 steps: paths of its encoder and decoder checkpoints."""
    tmp_path = tmp_path_factory.mktemp("kd")
    h = _config(tmp_path, "teacher")
    train.train(h, torch.device("cpu"))
    return tmp_path, os.path.join(h.checkpoint_path, "encoder_00000002"), os.path.join(h.checkpoint_path,
                                                                                     "decoder_00000002")


def _student(teacher, folder, kd_weight):
    tmp_path, enc, dec = teacher
    h = _config(tmp_path, folder, causal=True, kd_teacher_encoder=enc, kd_teacher_decoder=dec,
                kd_weight=kd_weight, learning_rate=0.002)
    torch.manual_seed(h.seed)
    trainer = train.Trainer(h, torch.device("cpu"))
    trainer.resume()
    clip = torch.from_numpy(tone(h.segment_size / h.sampling_rate + 0.01)[:h.segment_size])[None]
    history = [trainer.train_step(clip) for _ in range(12)]
    return trainer, [terms["KD"].item() for terms in history], history[-1]


def test_student_learns_from_a_frozen_teacher(teacher):
    _, enc, dec = teacher
    saved = {"encoder": torch.load(enc, weights_only=False)["encoder"],
             "decoder": torch.load(dec, weights_only=False)["decoder"]}
    # KD weighted up so that it dominates the student's own losses in so few steps
    trainer, kd, terms = _student(teacher, "student", 1000.0)
    parts = [name for name, _, _ in KD_POINTS]
    assert terms["KD"].item() == pytest.approx(sum(terms[p].item() for p in parts) / len(parts), rel=1e-5)
    assert sum(kd[-3:]) < 0.85 * sum(kd[:3]), kd
    # The fall is the KD term's doing: without it (the 'w/o KD' ablation) the distance grows.
    _, ablation, _ = _student(teacher, "ablation", 0.0)
    assert ablation[0] == pytest.approx(kd[0])
    assert sum(ablation[-3:]) > sum(kd[-3:]) * 1.2, ablation
    # The teacher is frozen: no gradients, and its weights are still the checkpoint's.
    teacher_modules = {"encoder": trainer.distiller.teacher_encoder, "decoder": trainer.distiller.teacher_decoder}
    for part, module in teacher_modules.items():
        assert not any(p.requires_grad for p in module.parameters())
        for name, tensor in release_state_dict(module).items():
            assert torch.equal(tensor, saved[part][name]), name


def test_kd_weight_0_measures_kd_and_trains_without_it(teacher, monkeypatch):
    """The 'w/o KD' ablation with a teacher named logs KD; even an infinite one leaves the
    generator loss, and so the update, the student's own."""
    real = distill.Distiller.loss
    monkeypatch.setattr(distill.Distiller, "loss", lambda self, ref: dict(real(self, ref), KD=torch.tensor(math.inf)))
    trainer, kd, terms = _student(teacher, "measured", 0.0)
    assert kd == [math.inf] * len(kd) and math.isfinite(terms["G"].item()) and trainer.nonfinite.total == 0


def test_a_training_run_loads_its_teacher_once(teacher, monkeypatch):
    tmp_path, enc, dec = teacher
    loaded = []
    load = distill.load_generator
    monkeypatch.setattr(distill, "load_generator", lambda h, *paths, **kw: loaded.append(paths) or load(h, *paths, **kw))
    h = _config(tmp_path, "once", causal=True, kd_teacher_encoder=enc, kd_teacher_decoder=dec, training_epochs=1)
    assert train.train(h, torch.device("cpu")).steps == 1
    assert loaded == [(enc, dec, torch.device("cpu"))]


def test_kd_weight_scales_the_generator_loss(teacher):
    """G with KD = G of the student's own terms + kd_weight x KD, KD_latent is the MSE of the two
    latents, and the stdout line shows KD."""
    tmp_path, enc, dec = teacher
    h = _config(tmp_path, "weighted", causal=True, kd_teacher_encoder=enc, kd_teacher_decoder=dec, kd_weight=3.5)
    trainer = train.Trainer(h, torch.device("cpu"))
    trainer.resume()
    latents = []
    for model in (trainer.encoder, trainer.distiller.teacher_encoder):
        model.latent_conv.register_forward_hook(lambda module, inputs, output: latents.append(output.detach()))
    terms = trainer.train_step(torch.randn(2, h.segment_size) * 0.1)
    student, teacher = latents
    frames = min(student.size(-1), teacher.size(-1))
    by_hand = (student[..., :frames] - teacher[..., :frames]).pow(2).mean()
    assert terms["KD_latent"].item() == pytest.approx(by_hand.item(), rel=1e-5) and by_hand > 0
    own = train.losses.generator_total({k: v for k, v in terms.items() if not k.startswith("KD")})
    assert terms["G"].item() == pytest.approx(own.item() + 3.5 * terms["KD"].item(), rel=1e-5)
    assert "KD " in train.format_terms({k: v.item() for k, v in terms.items()})


def test_teacher_paths_come_together():
    with pytest.raises(ConfigError, match="kd_teacher"):
        make_config(kd_teacher_encoder="cp/encoder_00000001")


@pytest.mark.parametrize("change, refused", [
    ({"causal": True}, "is a causal model"),
    ({"win_size": 160}, r"differs from the student in win_size 160 \(student 320\)"),
    ({"convnext_layers": 2, "convnext_dim": 8}, None),
])
def test_a_teacher_that_cannot_teach_the_student_is_refused_before_the_data_check(tmp_path, change, refused):
    """Distillation compares the two models' outputs frame by frame on the student's spectra:
    a causal teacher, or one with another STFT, rate, frame rate or output width, is an error
    (causal weights and another window change no shape, so only the recorded network shows
    them); other sizes may differ."""
    from checkpoints import network_record, save_checkpoint
    from models import Decoder, Encoder
    teacher_h = make_config(**dict(TINY, **change))
    enc, dec = str(tmp_path / "encoder"), str(tmp_path / "decoder")
    save_checkpoint(enc, {"encoder": release_state_dict(Encoder(teacher_h)), "network": network_record(teacher_h)})
    save_checkpoint(dec, {"decoder": release_state_dict(Decoder(teacher_h)), "network": network_record(teacher_h)})
    h = _config(tmp_path, "student", causal=True, kd_teacher_encoder=enc, kd_teacher_decoder=dec,
                input_training_wav_list=str(tmp_path / "no_such_list.txt"))
    # The missing list shows that the teacher is checked first.
    with pytest.raises(ValueError if refused else FileNotFoundError,
                       match=f"config key 'kd_teacher_encoder': .*{refused}" if refused else "no_such_list"):
        train.train(h, torch.device("cpu"))


def test_a_teacher_of_another_size_without_its_config_is_named_with_the_remedy(tmp_path):
    """Release-style teacher checkpoints (no network record) of another depth do not fit the
    student's config: the error names the teacher's key and asks for the teacher's own config
    beside its checkpoints (not a new --config, which would change the student)."""
    from checkpoints import save_checkpoint
    from models import Decoder, Encoder
    teacher_h = make_config(**dict(TINY, convnext_layers=2))
    enc, dec = str(tmp_path / "encoder"), str(tmp_path / "decoder")
    save_checkpoint(enc, {"encoder": release_state_dict(Encoder(teacher_h))})
    save_checkpoint(dec, {"decoder": release_state_dict(Decoder(teacher_h))})
    h = _config(tmp_path, "student", causal=True, kd_teacher_encoder=enc, kd_teacher_decoder=dec)
    with pytest.raises(ValueError, match=r"^config key 'kd_teacher_encoder': .*put the config.json the teacher "
                                         r"was trained with beside its checkpoints$"):
        train.train(h, torch.device("cpu"))
