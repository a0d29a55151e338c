"""Train APCodec.

    python train.py [--config config.json] [--KEY VALUE ...]

Each step updates the discriminators (MPD + MRD) on the detached generator output, then
the encoder and decoder. Checkpoint sets, TensorBoard logs and the config used go to
`checkpoint_path`; a restarted run resumes from the newest complete set there. Runs on
CUDA when a GPU is visible, otherwise on the CPU.
"""
import math
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from contextlib import contextmanager
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader
from torch.utils.tensorboard import SummaryWriter

import losses
from checkpoints import (checkpoint_file, checkpoint_set_bytes, load_newest_set, load_release_state_dict,
                         newest_complete_step, prune_checkpoints, release_parameters, release_state_dict, save_checkpoint)
from config import AttrDict, bitrate, make_parser, run_cli, save_config
from dataset import (AudioDataset, DataCheckCache, EpochSampler, check_audio_files, encoder_input, read_filelist,
                     spectral_targets, trim_for_validation)
from discriminators import MultiPeriodDiscriminator, MultiResolutionDiscriminator
from distill import Distiller
from metrics import compute_metrics
from models import Decoder, Encoder
from utils import pick_device, plot_spectrogram

# Names of the terms printed and logged, in the release's stdout order.
TERM_NAMES = ("A", "IP", "GD", "PTD", "C", "R", "I", "Mel", "Mel_L2", "GAN", "FM", "codebook", "commitment")
# How many validation utterances get audio and figures in TensorBoard.
LOGGED_VALIDATION_ITEMS = 5


def random_states() -> Dict[str, object]:
    """The random generators' states, for an exact resume."""
    states = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_random_states(states: Dict[str, object]) -> None:
    torch.set_rng_state(states["torch"].cpu())
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in states["cuda"]])


@contextmanager
def frozen(*modules: torch.nn.Module) -> Iterator[None]:
    """Parameters of `modules` need no gradient inside the block."""
    params = [p for m in modules for p in m.parameters()]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


class Trainer:
    """Models, optimizers and schedulers of one run, with the release's parameter order."""

    def __init__(self, h, device: torch.device):
        self.h, self.device = h, device
        self.encoder = Encoder(h).to(device)
        self.decoder = Decoder(h).to(device)
        self.mpd = MultiPeriodDiscriminator(h).to(device)
        self.mrd = MultiResolutionDiscriminator(h).to(device)
        betas = (h.adam_b1, h.adam_b2)
        self.optim_g = torch.optim.AdamW(
            release_parameters(self.encoder) + release_parameters(self.decoder), h.learning_rate, betas=betas)
        self.optim_d = torch.optim.AdamW(
            release_parameters(self.mrd) + release_parameters(self.mpd), h.learning_rate, betas=betas)
        self.steps, self.last_epoch = 0, -1
        self.distiller = Distiller(h, self.encoder, self.decoder, device) if h.kd_teacher_encoder else None
        # Batches of the current epoch already trained on.
        self.position = 0
        # Consecutive and total steps whose loss was not finite (their updates were skipped).
        self.nonfinite_streak = self.nonfinite_total = 0
        self.step_finite = True

    def resume(self) -> None:
        """Load the newest checkpoint set that reads back whole.

        A set written here resumes exactly: the epoch, the position in it, the schedulers and
        the random states come back, so N steps, a stop and N more equal 2N steps in one run.
        A release set (without those fields) resumes as the release does: continue at
        step + 1, restart the saved epoch, rebuild the schedulers from the epoch.
        """
        folder = self.h.checkpoint_path
        found = load_newest_set(folder, self.device)
        state = None
        if found is not None:
            step, sets = found
            load_release_state_dict(self.encoder, sets["encoder"]["encoder"], checkpoint_file(folder, "encoder", step))
            load_release_state_dict(self.decoder, sets["decoder"]["decoder"], checkpoint_file(folder, "decoder", step))
            do_path, state = checkpoint_file(folder, "do", step), sets["do"]
            load_release_state_dict(self.mpd, state["mpd"], do_path)
            load_release_state_dict(self.mrd, state["mrd"], do_path)
            self.steps = state["steps"] + 1
        exact = state is not None and "position" in state
        # Built at epoch -1 for an exact resume: that leaves the loaded lr as it is.
        last_epoch = -1 if exact or state is None else state["epoch"]
        if state is not None:
            self.optim_g.load_state_dict(state["optim_g"])
            self.optim_d.load_state_dict(state["optim_d"])
        self.scheduler_g = torch.optim.lr_scheduler.ExponentialLR(self.optim_g, self.h.lr_decay, last_epoch)
        self.scheduler_d = torch.optim.lr_scheduler.ExponentialLR(self.optim_d, self.h.lr_decay, last_epoch)
        if exact:
            self.scheduler_g.load_state_dict(state["scheduler_g"])
            self.scheduler_d.load_state_dict(state["scheduler_d"])
            set_random_states(state["random_states"])
            self.position, self.nonfinite_total = state["position"], state["nonfinite_total"]
        if state is not None:
            self.last_epoch = state["epoch"]
            where = f", batch {self.position} of the epoch" if exact else " (release checkpoint: epoch restarts)"
            print(f"Resumed from {do_path}: step {self.steps}, epoch {self.last_epoch + 1}{where}")

    def save(self, step: int, epoch: int) -> None:
        """Write encoder_, decoder_ then do_ (each atomically): a set is complete once do_ exists."""
        folder = self.h.checkpoint_path
        save_checkpoint(checkpoint_file(folder, "encoder", step), {"encoder": release_state_dict(self.encoder)})
        save_checkpoint(checkpoint_file(folder, "decoder", step), {"decoder": release_state_dict(self.decoder)})
        save_checkpoint(checkpoint_file(folder, "do", step), {
            "mpd": release_state_dict(self.mpd), "mrd": release_state_dict(self.mrd),
            "optim_g": self.optim_g.state_dict(), "optim_d": self.optim_d.state_dict(),
            "steps": step, "epoch": epoch,
            # Not in the release's files: what an exact resume needs beyond them.
            "position": self.position, "scheduler_g": self.scheduler_g.state_dict(),
            "scheduler_d": self.scheduler_d.state_dict(), "random_states": random_states(),
            "nonfinite_total": self.nonfinite_total})
        prune_checkpoints(folder, self.h.keep_last_checkpoints)

    def codec(self, audio: torch.Tensor) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
        """Targets of audio (B, L) and the codec's output for it, both as dicts of tensors."""
        ref = spectral_targets(audio, self.h)
        quantized = self.encoder(*encoder_input(audio, ref, self.h))
        logamp, pha, real, imag, y_g = self.decoder(quantized.latent)
        gen = {"logamp": logamp, "pha": pha, "real": real, "imag": imag, "audio": y_g,
               "commitment": quantized.commitment, "codebook": quantized.codebook}
        return ref, gen

    def discriminator_step(self, y: torch.Tensor, y_g: torch.Tensor) -> torch.Tensor:
        """One discriminator update on the detached generator output. y, y_g: (B, 1, L)."""
        self.optim_d.zero_grad()
        mpd_real, mpd_fake, _, _ = self.mpd(y, y_g.detach())
        mrd_real, mrd_fake, _, _ = self.mrd(y, y_g.detach())
        loss = (losses.discriminator_loss(mpd_real, mpd_fake)
                + losses.WEIGHTS["mrd"] * losses.discriminator_loss(mrd_real, mrd_fake))
        loss.backward()
        if self._finite(loss, "D"):
            self.optim_d.step()
        return loss

    def generator_step(self, y: torch.Tensor, ref: Dict[str, torch.Tensor],
                       gen: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """One encoder + decoder update; returns every loss term and the total as 'G'."""
        self.optim_g.zero_grad()
        terms = losses.spectral_losses(ref, gen, self.h)
        # The discriminators' weight gradients from this backward would be discarded by the
        # next discriminator_step's zero_grad; not computing them saves time and changes nothing.
        with frozen(self.mpd, self.mrd):
            _, mpd_fake, mpd_real_fmaps, mpd_fake_fmaps = self.mpd(y, gen["audio"])
            _, mrd_fake, mrd_real_fmaps, mrd_fake_fmaps = self.mrd(y, gen["audio"])
            w = losses.WEIGHTS["mrd"]
            terms["GAN"] = (losses.generator_adversarial_loss(mpd_fake)
                            + w * losses.generator_adversarial_loss(mrd_fake))
            terms["FM"] = (losses.feature_matching_loss(mpd_real_fmaps, mpd_fake_fmaps)
                           + w * losses.feature_matching_loss(mrd_real_fmaps, mrd_fake_fmaps))
            terms["codebook"], terms["commitment"] = gen["codebook"], gen["commitment"]
            terms["G"] = losses.generator_total(terms)
            if "kd" in gen:
                terms.update(gen["kd"])
                terms["G"] = terms["G"] + self.h.kd_weight * terms["KD"]
            terms["G"].backward()
        if self._finite(terms["G"], "G"):
            self.optim_g.step()
        return terms

    def _finite(self, loss: torch.Tensor, name: str) -> bool:
        """Whether `loss` is finite; a non-finite one is reported, and its update is skipped."""
        if torch.isfinite(loss).item():
            return True
        print(f"warning: non-finite {name} loss at step {self.steps}; its update is skipped")
        self.step_finite = False
        return False

    def train_step(self, audio: torch.Tensor) -> Dict[str, torch.Tensor]:
        """D step then G step on a batch of segments (B, L); returns the detached loss terms."""
        audio = audio.to(self.device, non_blocking=True)
        self.step_finite = True
        ref, gen = self.codec(audio)
        if self.distiller is not None:
            gen["kd"] = self.distiller.loss(ref)
        y = audio.unsqueeze(1)
        loss_d = self.discriminator_step(y, gen["audio"])
        terms = self.generator_step(y, ref, gen)
        terms["D"] = loss_d
        self.nonfinite_streak = 0 if self.step_finite else self.nonfinite_streak + 1
        self.nonfinite_total += not self.step_finite
        return {name: value.detach() for name, value in terms.items()}

    @torch.no_grad()
    def validate(self, loader: DataLoader, writer: SummaryWriter) -> Dict[str, float]:
        """Mean loss terms and metrics over whole validation utterances (batch 1).

        Each utterance is trimmed as the release trims it (`trim_for_validation`); metrics
        compare it with the output over the utterance's own samples. A metric that is
        undefined for an utterance (the SNR of silence) is left out of that metric's mean.
        """
        h = self.h
        self.encoder.eval()
        self.decoder.eval()
        totals: Dict[str, float] = {}
        counts: Dict[str, int] = {}
        for j, audio in enumerate(loader):
            length = audio.size(-1)
            audio = trim_for_validation(audio, h.hop_size, h.ratio, h.n_fft).to(self.device)
            ref, gen = self.codec(audio)
            values = {k: v.item() for k, v in losses.spectral_losses(ref, gen, h).items()}
            n = min(length, audio.size(-1))
            values.update(compute_metrics(audio[0, :n], gen["audio"][0, 0, :n], h))
            for name, value in values.items():
                if math.isfinite(value):
                    totals[name] = totals.get(name, 0.0) + value
                    counts[name] = counts.get(name, 0) + 1
            if j < LOGGED_VALIDATION_ITEMS:
                self._log_example(writer, j, audio, ref, gen)
        self.encoder.train()
        self.decoder.train()
        means = {name: total / counts[name] for name, total in totals.items()}
        for name, value in means.items():
            writer.add_scalar(f"Validation/{name}", value, self.steps)
        return means

    def _log_example(self, writer: SummaryWriter, j: int, audio, ref, gen) -> None:
        sr = self.h.sampling_rate
        if self.steps == 0:
            writer.add_audio(f"gt/y_{j}", audio[0:1], self.steps, sr)
            writer.add_figure(f"gt/y_logamp_{j}", plot_spectrogram(ref["logamp"][0].cpu().numpy()), self.steps)
            writer.add_figure(f"gt/y_pha_{j}", plot_spectrogram(ref["pha"][0].cpu().numpy()), self.steps)
        writer.add_audio(f"generated/y_g_{j}", gen["audio"][0], self.steps, sr)
        writer.add_figure(f"generated/y_g_logamp_{j}", plot_spectrogram(gen["logamp"][0].cpu().numpy()), self.steps)
        writer.add_figure(f"generated/y_g_pha_{j}", plot_spectrogram(gen["pha"][0].cpu().numpy()), self.steps)


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _ignore_stop_signals(worker_id: int) -> None:
    # Ctrl-C and a cluster's SIGTERM reach the whole process group; the main process saves
    # and stops, so data workers must not die first under it.
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


@contextmanager
def stop_requests() -> Iterator[Dict[str, int]]:
    """Catch SIGINT / SIGTERM as a request, {"signal": number}, that the loop acts on between
    steps; a second signal stops at once."""
    request: Dict[str, int] = {}

    def handle(signum: int, frame) -> None:
        if request:
            raise KeyboardInterrupt
        request["signal"] = signum

    previous = {signum: signal.signal(signum, handle) for signum in STOP_SIGNALS}
    try:
        yield request
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def check_run_folder(h: AttrDict) -> None:
    """`checkpoint_path` must be writable and have room for one checkpoint set."""
    folder = h.checkpoint_path
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise ValueError(f"config key 'checkpoint_path': cannot write to {folder} ({e.strerror})") from None
    needed, free = checkpoint_set_bytes(h), shutil.disk_usage(folder).free
    if free < needed:
        raise ValueError(f"config key 'checkpoint_path': {folder} has {free / 1e9:.2f} GB free, one "
                         f"checkpoint set needs about {needed / 1e9:.2f} GB")


def build_loaders(h) -> Tuple[DataLoader, DataLoader]:
    """Loaders of the usable files of both lists (each file read once at start-up, cached)."""
    cache = DataCheckCache(os.path.join(h.checkpoint_path, "data_check.json"))
    segment_seconds = h.segment_size / h.sampling_rate
    lists = {}
    for key in ("input_training_wav_list", "input_validation_wav_list"):
        lists[key] = check_audio_files(read_filelist(h[key]), h[key], segment_seconds, h.strict_data, cache,
                                       workers=max(1, h.num_workers))
    train_files, valid_files = lists["input_training_wav_list"], lists["input_validation_wav_list"]
    if len(train_files) < h.batch_size:
        raise ValueError(f"{h.input_training_wav_list} has {len(train_files)} usable files, fewer than "
                         f"batch_size ({h.batch_size}): no full batch can be drawn")
    # Shuffled once with the seed and kept in that order every epoch, as in the release.
    random.Random(h.seed).shuffle(train_files)
    left_out = train_files[len(train_files) - len(train_files) % h.batch_size:]
    if left_out:
        shown = ", ".join(left_out[:5]) + (", ..." if len(left_out) > 5 else "")
        print(f"note: the last incomplete batch is dropped, so in this fixed order {len(left_out)} file(s) "
              f"are left out of every epoch: {shown}")
    pin = torch.cuda.is_available()
    train_loader = DataLoader(AudioDataset(train_files, h, train=True), batch_size=h.batch_size,
                              sampler=EpochSampler(len(train_files), h.batch_size),
                              num_workers=h.num_workers, pin_memory=pin, drop_last=True,
                              persistent_workers=h.num_workers > 0, worker_init_fn=_ignore_stop_signals)
    valid_loader = DataLoader(AudioDataset(valid_files, h, train=False), batch_size=1,
                              shuffle=False, num_workers=min(1, h.num_workers), pin_memory=pin,
                              worker_init_fn=_ignore_stop_signals)
    return train_loader, valid_loader


def format_terms(values: Dict[str, float]) -> str:
    """The stdout line's loss terms, in a fixed order."""
    names = ("G", "D") + TERM_NAMES + (("KD",) if "KD" in values else ())
    return ", ".join(f"{name} {values[name]:.3f}" for name in names)


def log_and_checkpoint(trainer: Trainer, terms: Dict[str, torch.Tensor], epoch: int, step_start: float,
                       writer: SummaryWriter, valid_loader: DataLoader) -> bool:
    """The interval work after a step: stdout, checkpoint, TensorBoard, validation.

    Returns whether a checkpoint set was written.
    """
    h, steps = trainer.h, trainer.steps
    # .item() waits for the GPU, so values are read only on logging steps.
    if steps % h.stdout_interval == 0:
        values = {name: value.item() for name, value in terms.items()}
        print(f"Steps {steps:d}: {format_terms(values)}, s/b {time.time() - step_start:.3f}")
    saved = steps % h.checkpoint_interval == 0 and steps != 0
    if saved:
        trainer.save(steps, epoch)
    if steps % h.summary_interval == 0:
        for name, value in terms.items():
            writer.add_scalar(f"Training/{name}", value.item(), steps)
        writer.add_scalar("Training/learning_rate", trainer.optim_g.param_groups[0]["lr"], steps)
        writer.add_scalar("Training/nonfinite_steps", trainer.nonfinite_total, steps)
    if steps % h.validation_interval == 0:
        means = trainer.validate(valid_loader, writer)
        print(f"Validation at step {steps}: " + ", ".join(f"{k} {v:.3f}" for k, v in means.items()))
    return saved


def train(h: AttrDict, device: Optional[torch.device] = None) -> Trainer:
    """Train (or resume) the run of config `h` to `training_epochs`; returns the trainer."""
    device = device or pick_device()
    torch.manual_seed(h.seed)
    random.seed(h.seed)
    torch.backends.cudnn.benchmark = True
    check_run_folder(h)
    train_loader, valid_loader = build_loaders(h)
    save_config(h, os.path.join(h.checkpoint_path, "config.json"))

    trainer = Trainer(h, device)
    trainer.resume()
    print(f"Training on {device.type}: {bitrate(h):.0f} bit/s codec, checkpoints and logs in "
          f"{os.path.abspath(h.checkpoint_path)}")
    for module in (trainer.encoder, trainer.decoder, trainer.mpd, trainer.mrd):
        module.train()
    start_epoch = max(0, trainer.last_epoch)
    if start_epoch >= h.training_epochs:
        print(f"Nothing to train: the run in {h.checkpoint_path} has finished {start_epoch} epochs "
              f"(training_epochs = {h.training_epochs}); raise training_epochs to continue")
        return trainer
    with SummaryWriter(os.path.join(h.checkpoint_path, "logs")) as writer, stop_requests() as request:
        try:
            run_epochs(trainer, start_epoch, train_loader, valid_loader, writer, request)
        except Exception:
            last = newest_complete_step(h.checkpoint_path)
            where = checkpoint_file(h.checkpoint_path, "do", last) if last is not None else "none yet"
            print(f"Training failed at step {trainer.steps}; the last complete checkpoint set is {where}",
                  file=sys.stderr)
            raise
    return trainer


def run_epochs(trainer: Trainer, start_epoch: int, train_loader: DataLoader, valid_loader: DataLoader,
               writer: SummaryWriter, request: Dict[str, int]) -> None:
    """The loop over epochs and steps. A stop request or too many non-finite losses in a row
    save a set at the last finished step and end the process with one line."""
    h = trainer.h
    last_saved = trainer.steps - 1
    for epoch in range(start_epoch, h.training_epochs):
        epoch_start = time.time()
        print(f"Epoch: {epoch + 1}")
        train_loader.sampler.set_epoch(epoch, trainer.position)
        for audio in train_loader:
            step_start = time.time()
            terms = trainer.train_step(audio)
            trainer.position += 1
            if log_and_checkpoint(trainer, terms, epoch, step_start, writer, valid_loader):
                last_saved = trainer.steps
            trainer.steps += 1
            if request or trainer.nonfinite_streak >= h.max_nonfinite_steps:
                step = trainer.steps - 1
                if step > last_saved:
                    trainer.save(step, epoch)
                where = checkpoint_file(h.checkpoint_path, "do", step)
                if request:
                    name = signal.Signals(request["signal"]).name
                    print(f"Stopped by {name} after step {step}; checkpoint set saved ({where}). "
                          f"Run the same command to resume.")
                    raise SystemExit(128 + request["signal"])
                raise SystemExit(f"error: {trainer.nonfinite_streak} steps in a row had a non-finite loss; "
                                 f"stopped after step {step}, the last finite state is saved ({where})")
        trainer.scheduler_g.step()
        trainer.scheduler_d.step()
        trainer.position = 0
        print(f"Time taken for epoch {epoch + 1} is {time.time() - epoch_start:.1f} s")
    # Keep the final weights even when the run ends between checkpoint intervals. The epoch
    # stored is the number of finished epochs, so restarting a finished run trains nothing
    # and raising training_epochs continues with the next epoch.
    if trainer.steps - 1 > last_saved:
        trainer.save(trainer.steps - 1, h.training_epochs)


def main(argv: Optional[List[str]] = None) -> None:
    run_cli(lambda h, args: train(h), make_parser(__doc__), argv)


if __name__ == "__main__":
    main()
