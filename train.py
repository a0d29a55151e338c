"""Train APCodec.

    python train.py [--config config.json] [--KEY VALUE ...]

Each step updates the discriminators (MPD + MRD) on the detached generator output, then
the encoder and decoder. Checkpoint sets, TensorBoard logs and the config used go to
`checkpoint_path`; a restarted run resumes from the newest complete set there. Runs on
CUDA when a GPU is visible, otherwise on the CPU.

Several GPUs or nodes: `torchrun --nproc_per_node N train.py ...` trains with
DistributedDataParallel; `batch_size` is per process, so the effective batch is
batch_size x N. Rank 0 alone prints, logs, validates and writes checkpoints.
"""
import datetime
import glob
import math
import os
import random
import shutil
import signal
import sys
import tempfile
import time
import warnings
from contextlib import contextmanager, nullcontext
from typing import IO, Any, Callable, ContextManager, Dict, Iterator, List, Optional, Sequence, Set, Tuple
try:
    import fcntl        # POSIX: locks checkpoint_path against a second run
except ImportError:     # Windows: runs without the lock
    fcntl = None

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from torch.utils.tensorboard import SummaryWriter

import losses
from checkpoints import (checkpoint_file, checkpoint_set_bytes, complete_steps, load_newest_set,
                         load_release_state_dict, network_record, prune_checkpoints,
                         release_parameters, release_state_dict, save_checkpoint_set, saved_config_differences,
                         steps_on_disk)
from config import RUN_NETWORK_KEYS, AttrDict, bitrate, build_config, make_parser, run_cli, save_config
from dataset import (AudioDataset, DataCheckCache, EpochSampler, check_audio_files, dealing_digest, encoder_input,
                     read_filelist, spectral_targets, trim_for_validation)
from discriminators import MultiPeriodDiscriminator, MultiResolutionDiscriminator
from distill import Distiller, load_teacher
from metrics import compute_metrics
from models import Decoder, Encoder
from utils import compile_problem, distributed, first_line, pick_device, plot_spectrogram, rank_and_world_size

# How many validation utterances get audio and figures in TensorBoard.
LOGGED_VALIDATION_ITEMS = 5
# With the non-finite checks on the device (fused AdamW), the most steps between read-backs:
# a signal or a run of non-finite losses is acted on within this many steps.
READ_BACK_STEPS = 10
# The longest the other processes of a torchrun wait for rank 0's host work (see `wait_for_rank0`).
HOST_WAIT_TIMEOUT = datetime.timedelta(hours=24)


def random_states() -> Dict[str, object]:
    """The random generators' states, for an exact resume. Training draws only from torch's
    (quantizer dropout); the crops and the epoch order have seeded generators of their own."""
    states = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        # This process's device only: under torchrun every rank restores rank 0's states into
        # its own device, so the ranks' random draws stay alike after a resume.
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def set_random_states(states: Dict[str, object]) -> None:
    """Restore `random_states()`. Files of earlier versions also hold Python's and numpy's,
    which training never draws from: those are left alone."""
    torch.set_rng_state(states["torch"].cpu())
    if "cuda" in states and torch.cuda.is_available():
        cuda = states["cuda"]
        if isinstance(cuda, list):
            # Files of earlier versions held every visible device's state; the process that
            # saved them (rank 0, or a single process) ran on the first.
            cuda = cuda[0]
        torch.cuda.set_rng_state(cuda.cpu())


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


def gradient_norm(parameters: Sequence[torch.nn.Parameter]) -> torch.Tensor:
    """L2 norm of all gradients together, as clip_grad_norm_ computes it (0-d, no host sync;
    one multi-tensor kernel, where a norm per parameter would launch hundreds)."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros((), device=parameters[0].device)
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))


def codebook_health(counts: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Usage (fraction of codes drawn at least once) and perplexity (exp of the entropy of the
    code frequencies; codebook_size when uniform, 1 when collapsed) of code counts (n_codebooks, K)."""
    p = counts / counts.sum(1, keepdim=True).clamp(min=1)
    return {"usage": (counts > 0).float().mean(1), "perplexity": torch.exp(-torch.special.xlogy(p, p).sum(1))}


def compile_available(device: torch.device) -> bool:
    """Whether torch.compile works on `device`; says in one line why not."""
    problem = compile_problem(device)
    if problem:
        say(f"compile: {problem}; training without it")
    return problem is None


def cuda_graph_available(device: torch.device) -> bool:
    """Whether a training step can be recorded as a CUDA graph here; says in one line why not."""
    reason = ("it needs a CUDA GPU" if device.type != "cuda"
              else "it runs in one process for now, not under torchrun" if distributed() else None)
    say(f"cuda_graph: {reason}; training without it" if reason else
        f"cuda_graph: steps run as usual {StepGraph.WARMUP} times, then are recorded and replayed")
    return reason is None


class StepGraph:
    """A training step's forward and backward passes recorded as two CUDA graphs, then
    replayed: a few launches a step instead of thousands, with the same kernels and numbers.

    The first graph holds `Trainer.discriminator_half`, the second `Trainer.generator_half`;
    the optimizer updates and the non-finite checks run as usual between and after them, so
    they keep every option (optimizer kernels, clipping, gradient scalers, learning rates).
    The first WARMUP steps run as usual on a side stream, where cuDNN, cuBLAS and cuFFT settle
    their algorithms, plans and workspaces (a recording cannot make them). The recordings use
    the FFT plans cached when they were made, so they are made again, after one more such
    step, when validation (whose many lengths may push those plans out of their cache) has
    run. A replay writes in place: the batch is copied into the recording's input, and its
    outputs (the terms a step returns among them) are overwritten once the next step starts.
    """
    WARMUP = 3

    def __init__(self, trainer: "Trainer"):
        self.trainer = trainer
        self.eager_steps_left = self.WARMUP
        self.graphs: Tuple[torch.cuda.CUDAGraph, ...] = ()
        self.audio: Optional[torch.Tensor] = None
        self.outputs: Tuple[Any, Any] = (None, None)

    def invalidate(self) -> None:
        """Drop the recordings: the next step runs as usual, the one after records again."""
        if self.graphs:
            self.graphs, self.outputs, self.eager_steps_left = (), (None, None), 1

    def __call__(self, audio: torch.Tensor, want_norms: bool) -> Dict[str, torch.Tensor]:
        """One step on audio (B, L), on the host or the device; returns the detached terms."""
        t = self.trainer
        if self.eager_steps_left:
            self.eager_steps_left -= 1
            side = torch.cuda.Stream(t.device)
            side.wait_stream(torch.cuda.current_stream(t.device))
            with torch.cuda.stream(side):
                terms = t.device_step(audio.to(t.device, non_blocking=True), want_norms)
            torch.cuda.current_stream(t.device).wait_stream(side)
            return terms
        if not self.graphs:
            self._record(audio)
        return t.device_step(audio, want_norms, (self._first, self._second))

    def _first(self, audio: torch.Tensor) -> Any:
        self.audio.copy_(audio, non_blocking=True)
        self.graphs[0].replay()
        return self.outputs[0]

    def _second(self, audio: torch.Tensor, ref: Dict[str, torch.Tensor], gen: Dict[str, torch.Tensor]) -> Any:
        # generator_half's signature; the recording already holds this step's inputs.
        self.graphs[1].replay()
        return self.outputs[1]

    def _record(self, audio: torch.Tensor) -> None:
        t = self.trainer
        if self.audio is None:
            self.audio = torch.empty(audio.shape, dtype=audio.dtype, device=t.device)
        # One memory pool for both: the second reads what the first leaves (activations kept
        # for the backward). A new pool each time: an earlier one is freed with the last
        # tensors made in it. thread_local: the data loader's pin-memory thread uses CUDA meanwhile.
        # The second's backward runs on the stream where the first recorded the forward.
        pool, stream = torch.cuda.graph_pool_handle(), torch.cuda.Stream(t.device)
        graphs = (torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph())
        try:
            with torch.cuda.graph(graphs[0], pool=pool, stream=stream, capture_error_mode="thread_local"):
                first = t.discriminator_half(self.audio)
            with torch.cuda.graph(graphs[1], pool=pool, stream=stream, capture_error_mode="thread_local"):
                second = t.generator_half(self.audio, *first[:2])
        except RuntimeError as e:
            # A ValueError: the run ends with this one line (the config's choice), not a traceback.
            raise ValueError(f"cuda_graph: recording the training step failed ({first_line(e)[:160]}); "
                             f"train with cuda_graph false") from e
        self.graphs, self.outputs = graphs, (first, second)


# Under torchrun, a CPU group whose collectives wait up to HOST_WAIT_TIMEOUT (set by init_distributed).
_host_group: Optional[dist.ProcessGroup] = None


def init_distributed() -> Tuple[int, int]:
    """(rank, world size). Under torchrun this joins the process group (NCCL on GPUs, gloo on
    CPUs) and picks this process's GPU; a plain `python train.py` is rank 0 of 1."""
    global _host_group
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return 0, 1
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    _host_group = dist.new_group(backend="gloo", timeout=HOST_WAIT_TIMEOUT)
    return rank_and_world_size()


def wait_for_rank0() -> None:
    """Under torchrun, every rank waits here until rank 0 comes.

    Rank 0 alone checks the data, saves and validates, and a new corpus, a long validation
    list or a slow disk can outlast NCCL's timeout (10 minutes), which would end the job:
    the others wait in a CPU group that allows HOST_WAIT_TIMEOUT instead. Rank 0 waits there
    for the others too, so a rank that hangs (one that dies ends the job at once through
    torchrun) holds the job up to that long at these points.
    """
    if distributed():
        dist.barrier(group=_host_group)


def on_rank0(work: Callable[[], Any]) -> Any:
    """work() on rank 0 alone; None on the other ranks. When it fails on bad input under
    torchrun, rank 0 prints the error line and every rank exits with status 1, where the
    others would fail in their next collective with tracebacks that hide the cause (torchrun
    may still name one of them as the first failure); a plain process raises the error."""
    result, error = None, None
    if is_main_process():
        try:
            result = work()
        except (OSError, ValueError) as e:
            if not distributed():
                raise
            error = e
    if distributed():
        if error is not None:
            # Printed before the others learn of it: torchrun stops this process once one has exited.
            print(f"error: {error}", file=sys.stderr, flush=True)
        failed = [error is not None]
        dist.broadcast_object_list(failed, src=0, group=_host_group)
        if failed[0]:
            raise SystemExit(1)
    return result


def is_main_process() -> bool:
    """Rank 0 under torchrun (the one that prints, logs and saves), or a plain process."""
    return rank_and_world_size()[0] == 0


def say(*args: object, **kwargs: Any) -> None:
    """print, on the main process only."""
    if is_main_process():
        print(*args, **kwargs)


class NonFiniteChecks:
    """Skips the updates whose loss or gradient is not finite, and counts the steps that had one.

    Checking a value at once reads it back, a wait for the GPU twice a step. Fused AdamW can
    skip an update on the device instead (its found_inf), so with it (`deferred`) the flags stay
    there and are read back on logging and checkpoint steps, and at least every
    READ_BACK_STEPS. Under fp16 the gradient scaler sets found_inf itself, so there the values
    are read back each step.
    """

    def __init__(self, deferred: bool, device: torch.device):
        self.deferred = deferred
        # Non-finite steps in a row up to the last step read back, and in the whole run.
        self.streak = self.total = 0
        # Whether `streak` and `total` include the last step trained.
        self.read = True
        self._step_finite = True
        # Deferred: this step's finite flags; the streak up to the last step and the non-finite
        # steps since the last read-back.
        self._flags: List[torch.Tensor] = []
        self._pending = torch.zeros(2, device=device)

    def allow(self, value: torch.Tensor, name: str, optimizer: torch.optim.Optimizer, step: int,
              note: str = "") -> bool:
        """Whether to step `optimizer` after `value` (its loss + gradient norm). Where it is not
        finite (on any rank) the update is skipped on every rank, so the ranks keep equal
        weights: here, with a report (ending with `note`), or with deferred checks by the fused
        kernels."""
        finite = torch.isfinite(value.detach()).float()
        if distributed():
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        if self.deferred:
            optimizer.found_inf = 1 - finite
            self._flags.append(finite)
            return True
        if finite.item():
            return True
        say(f"warning: non-finite {name} loss or gradient at step {step}; its update is skipped{note}")
        self._step_finite = False
        return False

    def start_step(self) -> None:
        """A new step: none of its updates skipped yet."""
        self._step_finite = True

    def end_step(self) -> None:
        """Count the step whose updates `allow` has decided since `start_step`."""
        if self.deferred:
            nonfinite = 1 - torch.stack(self._flags).amin()
            self._pending = torch.stack([(self._pending[0] + 1) * nonfinite, self._pending[1] + nonfinite])
            self._flags.clear()
            self.read = False
        else:
            self.streak = 0 if self._step_finite else self.streak + 1
            self.total += not self._step_finite

    def restore(self, total: int, streak: int) -> None:
        """Continue the counts of a resumed run."""
        self.total, self.streak = total, streak
        self._pending[0] = streak

    def read_back(self, step: int) -> None:
        """With deferred checks, bring the counts up to `step` (the last one trained) to the
        host, a wait for the GPU, and report any new non-finite steps."""
        if self.read:
            return
        streak, count = (int(v) for v in self._pending.tolist())
        self._pending[1] = 0
        self.streak, self.read = streak, True
        if count:
            self.total += count
            say(f"warning: {count} of the steps up to step {step} had a non-finite loss or gradient; "
                f"their updates were skipped")


class Trainer:
    """Models, optimizers and schedulers of one run, with the release's parameter order.

    `encoder`, `decoder`, `mpd`, `mrd` are the plain modules (checkpoints, validation); the
    training step calls them through DistributedDataParallel under torchrun and through
    torch.compile when `compile` asks for it.
    """

    def __init__(self, h: AttrDict, device: torch.device, teacher: Optional[Tuple[Encoder, Decoder]] = None):
        """teacher: the distillation teacher if already loaded (else it is loaded from `h`)."""
        self.h, self.device = h, device
        self.encoder = Encoder(h).to(device)
        self.decoder = Decoder(h).to(device)
        self.mpd = MultiPeriodDiscriminator(h).to(device)
        self.mrd = MultiResolutionDiscriminator(h).to(device)
        self.step_graph = StepGraph(self) if h.cuda_graph and cuda_graph_available(device) else None
        betas = (h.adam_b1, h.adam_b2)
        self.params_g = release_parameters(self.encoder) + release_parameters(self.decoder)
        self.params_d = release_parameters(self.mrd) + release_parameters(self.mpd)
        self.optim_g = torch.optim.AdamW(self.params_g, h.learning_rate, betas=betas, **self._kernels())
        self.optim_d = torch.optim.AdamW(self.params_d, h.learning_rate, betas=betas, **self._kernels())
        self.scheduler_g = torch.optim.lr_scheduler.ExponentialLR(self.optim_g, h.lr_decay)
        self.scheduler_d = torch.optim.lr_scheduler.ExponentialLR(self.optim_d, h.lr_decay)
        self.steps, self.last_epoch = 0, -1
        self.distiller = Distiller(h, self.encoder, self.decoder, device, teacher) if h.kd_teacher_encoder else None
        # Batches of the current epoch already trained on, and how the epochs deal the files
        # (`dataset.dealing_digest`; None where no data loader was built), in this run and in
        # the resumed set.
        self.position = 0
        self.dealing: Optional[str] = None
        self.saved_dealing: Optional[str] = None
        # (files of the resumed epoch trained on, of them trained on again): a set saved with
        # another batch_size x processes may end its epoch's files in the middle of a step.
        self.resumed_items = (0, 0)
        # Steps of the checkpoint files on disk that a resume passed over (unreadable or
        # incomplete) and that no run has written again since; saved with each set, so that
        # later resumes keep knowing them.
        self.passed_over: Set[int] = set()
        self.nonfinite = NonFiniteChecks(h.fused_adamw and h.mixed_precision != "fp16", device)

        half = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}[h.mixed_precision]
        # A recorded step must cast the weights inside the recording, not reuse casts cached
        # outside it.
        self.autocast: Callable[[], ContextManager] = (
            (lambda: torch.autocast(device.type, dtype=half, cache_enabled=self.step_graph is None))
            if half else nullcontext)
        # Disabled scalers pass losses and steps through unchanged.
        self.scaler_g = torch.amp.GradScaler(device.type, enabled=half is torch.float16)
        self.scaler_d = torch.amp.GradScaler(device.type, enabled=half is torch.float16)

        compile_mode = h.compile if h.compile != "no" and compile_available(self.device) else None
        self.compiled = compile_mode is not None
        ddp = distributed()

        def prepare(module: torch.nn.Module, sync: bool) -> Callable:
            if sync and ddp:
                module = DistributedDataParallel(module, device_ids=[device] if device.type == "cuda" else None)
            return torch.compile(module, mode=compile_mode) if compile_mode else module

        self.train_encoder = prepare(self.encoder, True)
        self.train_decoder = prepare(self.decoder, True)
        self.train_mpd = prepare(self.mpd, True)
        self.train_mrd = prepare(self.mrd, True)
        # In the generator step the discriminators' gradients are not needed (see `frozen`), so
        # they run outside DDP there: DDP would wait for gradients that never come.
        self.frozen_mpd = prepare(self.mpd, False) if ddp else self.train_mpd
        self.frozen_mrd = prepare(self.mrd, False) if ddp else self.train_mrd
        # Code counts since the last summary, for codebook usage and perplexity.
        self.code_counts = torch.zeros(h.n_codebooks, h.codebook_size, device=device)
        # Called with each phase's name as it ends (bench.py times the phases with it).
        self.phase_done: Callable[[str], None] = lambda name: None

    def _kernels(self) -> Dict[str, bool]:
        """AdamW's kernel options. The multi-tensor (foreach) AdamW gives the same numbers as the
        per-tensor loop, bit for bit, in fewer kernels; it is already CUDA's default, and faster
        on CPUs too."""
        fused = self.h.fused_adamw
        return {"fused": fused, "foreach": not fused, "capturable": False}

    def _use_config_kernels(self, optimizer: torch.optim.Optimizer) -> None:
        """A loaded state dict brings back the kernel options it was saved with, and keeps the
        step counts where those options want them; this run's config decides both: fused
        kernels count on the parameter's device, foreach ones on the host."""
        kernels = self._kernels()
        for group in optimizer.param_groups:
            group.update(kernels)
            for p in group["params"]:
                state = optimizer.state.get(p, {})
                if "step" in state:
                    state["step"] = state["step"].to(p.device if kernels["fused"] else "cpu", torch.float32)

    def resume(self, dealing: Optional[str] = None) -> None:
        """Load the newest checkpoint set that reads back whole; `dealing` is how this run's
        epochs deal the training files (`dataset.dealing_digest`).

        A set written here resumes exactly: the epoch, the position in it, the schedulers and
        the random states come back, so N steps, a stop and N more equal 2N steps in one run.
        A release set (without those fields) resumes as the release does: continue at
        step + 1, restart the saved epoch, rebuild the schedulers from the epoch. `self.h`
        becomes the config in effect: the run's learning rate and betas go on.
        """
        folder = self.h.checkpoint_path
        self.dealing = dealing
        # Every rank reads the set; rank 0 alone says what it passed over.
        found = load_newest_set(folder, self.device, say)
        if distributed():
            seen: List[Optional[int]] = [None] * dist.get_world_size()
            dist.all_gather_object(seen, found[0] if found else None)
            if len(set(seen)) > 1:
                raise ValueError(f"the processes see different newest checkpoint sets in {folder} "
                                 f"(steps by rank: {seen}); every node needs the same checkpoint_path, "
                                 f"e.g. on a shared file system")
        on_disk = set(steps_on_disk(folder))
        self.passed_over = {s for s in on_disk if found is None or s > found[0]}
        if found is None:
            unreadable = complete_steps(folder)
            if unreadable:
                # Training anew here would write over these sets as it reaches their steps.
                raise ValueError(f"none of the {len(unreadable)} checkpoint sets in {folder} reads back (see the "
                                 f"warnings above); move them away to start a new run there")
            return
        step, sets = found
        # `train` checked this before the data check; a Trainer resumed on its own checks here.
        check_run_config(self.h)
        load_release_state_dict(self.encoder, sets["encoder"]["encoder"], checkpoint_file(folder, "encoder", step))
        load_release_state_dict(self.decoder, sets["decoder"]["decoder"], checkpoint_file(folder, "decoder", step))
        do_path, state = checkpoint_file(folder, "do", step), sets["do"]
        self.passed_over |= on_disk.intersection(state.get("passed_over", ()))
        load_release_state_dict(self.mpd, state["mpd"], do_path)
        load_release_state_dict(self.mrd, state["mrd"], do_path)
        self.steps = state["steps"] + 1
        for optimizer, name in ((self.optim_g, "optim_g"), (self.optim_d, "optim_d")):
            optimizer.load_state_dict(state[name])
            self._use_config_kernels(optimizer)
        for name in ("scaler_g", "scaler_d"):
            if name in state and getattr(self, name).is_enabled():
                getattr(self, name).load_state_dict(state[name])
        exact = "position" in state
        if exact:
            self.scheduler_g.load_state_dict(state["scheduler_g"])
            self.scheduler_d.load_state_dict(state["scheduler_d"])
            set_random_states(state["random_states"])
            # Sets from before the streak was saved resume with none.
            self.nonfinite.restore(state["nonfinite_total"], state.get("nonfinite_streak", 0))
            if "code_counts" in state and is_main_process():
                self.code_counts.copy_(state["code_counts"])
            self.position = self._resumed_position(state)
            self.saved_dealing = state.get("dealing")
        else:
            # As the release does: schedulers built at the saved epoch (older torch versions
            # decayed the loaded learning rate once more here; recent ones keep it).
            self.scheduler_g = torch.optim.lr_scheduler.ExponentialLR(self.optim_g, self.h.lr_decay, state["epoch"])
            self.scheduler_d = torch.optim.lr_scheduler.ExponentialLR(self.optim_d, self.h.lr_decay, state["epoch"])
        self._apply_config_schedule()
        self.last_epoch = state["epoch"]
        where = f", batch {self.position} of the epoch" if exact else " (release checkpoint: epoch restarts)"
        say(f"Resumed from {do_path}: step {self.steps}, epoch {self.last_epoch + 1}{where}")

    def _apply_config_schedule(self) -> None:
        """After a resume the learning rates and betas go on as saved; lr_decay is the config's
        from here on, as in the release, which builds its schedulers from the config. Says in
        one line which of those keys the config changes, and puts the values in effect into
        `h` (whose copy beside the checkpoints is the run's record)."""
        h, group = self.h, self.optim_g.param_groups[0]
        changed = []
        initial = group.get("initial_lr", group["lr"])
        if not math.isclose(initial, h.learning_rate):
            changed.append(f"learning_rate {h.learning_rate} (the run's {initial} goes on)")
        if tuple(group["betas"]) != (h.adam_b1, h.adam_b2):
            changed.append(f"adam_b1, adam_b2 {h.adam_b1}, {h.adam_b2} (the run's {tuple(group['betas'])} go on)")
        if self.scheduler_g.gamma != h.lr_decay:
            changed.append(f"lr_decay {h.lr_decay} (applies from now on, replacing the run's {self.scheduler_g.gamma})")
        for scheduler in (self.scheduler_g, self.scheduler_d):
            scheduler.gamma = h.lr_decay
        if changed:
            say(f"note: the config differs from the resumed run in {'; '.join(changed)}")
        self.h = build_config(dict(h, learning_rate=initial, adam_b1=group["betas"][0], adam_b2=group["betas"][1]),
                              h.source)

    def items_per_step(self) -> int:
        return self.h.batch_size * rank_and_world_size()[1]

    def _resumed_position(self, state: Dict[str, Any]) -> int:
        """The batch of the epoch to continue at. The epoch's files are dealt in one order
        whatever the batch size and process count, so a run resumed with other ones continues
        after the files already trained on, to within one step (said in a line)."""
        per_step = self.items_per_step()
        if "epoch_items" not in state:
            say("note: this checkpoint set, from an earlier version, does not record how many files of the "
                "epoch were trained on; resuming assumes the batch_size and process count it was trained with")
        done = state.get("epoch_items", state["position"] * per_step)
        self.resumed_items = (done, done % per_step)
        return done // per_step

    def save(self, step: int, epoch: int) -> None:
        """Write the set of `step` (a crash leaves no set that mixes two saves, see
        `save_checkpoint_set`), then delete the sets before the newest `keep_last_checkpoints`
        (see `prune_checkpoints`)."""
        folder = self.h.checkpoint_path
        self.nonfinite.read_back(step)
        network = network_record(self.h)
        state = {"mpd": release_state_dict(self.mpd), "mrd": release_state_dict(self.mrd),
                 "optim_g": self.optim_g.state_dict(), "optim_d": self.optim_d.state_dict(),
                 "steps": step, "epoch": epoch,
                 # Not in the release's files: what an exact resume needs beyond them.
                 "position": self.position, "epoch_items": self.position * self.items_per_step(),
                 "dealing": self.dealing,
                 "scheduler_g": self.scheduler_g.state_dict(),
                 "scheduler_d": self.scheduler_d.state_dict(), "random_states": random_states(),
                 "nonfinite_total": self.nonfinite.total, "nonfinite_streak": self.nonfinite.streak,
                 "code_counts": self.code_counts.cpu(), "passed_over": sorted(self.passed_over - {step})}
        if self.scaler_g.is_enabled():
            state.update(scaler_g=self.scaler_g.state_dict(), scaler_d=self.scaler_d.state_dict())
        save_checkpoint_set(folder, step, {"encoder": {"encoder": release_state_dict(self.encoder), "network": network},
                                           "decoder": {"decoder": release_state_dict(self.decoder), "network": network},
                                           "do": state}, own=step not in self.passed_over)
        self.passed_over.discard(step)
        prune_checkpoints(folder, self.h.keep_last_checkpoints, self.passed_over)

    def codec(self, audio: torch.Tensor, training: bool = False
              ) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
        """Targets of audio (B, L) and the codec's output for it, both as dicts of tensors.

        training: through the training wrappers (DDP, compile) and under autocast.
        """
        ref = spectral_targets(audio, self.h)
        encoder, decoder = (self.train_encoder, self.train_decoder) if training else (self.encoder, self.decoder)
        with self.autocast() if training else nullcontext():
            quantized = encoder(*encoder_input(audio, ref, self.h))
            gen = decoder(quantized.latent)._asdict()
        gen.update(commitment=quantized.commitment, codebook=quantized.codebook, codes=quantized.codes)
        return ref, gen

    def update(self, name: str, loss: torch.Tensor, want_norm: bool) -> Dict[str, torch.Tensor]:
        """Step the optimizer of 'G' or 'D' after its backward, unless `loss` or a gradient is
        not finite; clips first when `grad_clip` is set. Returns the gradient norm before
        clipping as 'grad_norm_<name>' with clipping or `want_norm`; measuring leaves the update as is."""
        optimizer, scaler, params = ((self.optim_g, self.scaler_g, self.params_g) if name == "G"
                                     else (self.optim_d, self.scaler_d, self.params_d))
        scaler.unscale_(optimizer)
        if self.h.grad_clip:
            norm = torch.nn.utils.clip_grad_norm_(params, self.h.grad_clip)
        else:
            norm = gradient_norm(params)
        # A finite loss can have a non-finite gradient (an overflow, atan2's at (0, 0)), which
        # would write NaN into every weight. Under fp16 the gradients are checked after
        # unscaling too: the scaler checks them scaled, so it would step NaN in once its scale
        # has fallen so far that unscaling overflows, and its own skips would go uncounted.
        measured = {f"grad_norm_{name}": norm} if self.h.grad_clip or want_norm else {}
        note = " (fp16: an overflow of the scaled gradients also lowers the loss scale)" if scaler.is_enabled() else ""
        if not self.nonfinite.allow(loss.detach() + norm, name, optimizer, self.steps, note):
            # The scaler has unscaled this step's gradients: its update ends the step (and
            # lowers the scale after an overflow), else the next step's unscale_ fails.
            scaler.update()
            return measured
        scaler.step(optimizer)
        scaler.update()
        return measured

    def discriminator_half(self, audio: torch.Tensor
                           ) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor], torch.Tensor]:
        """A step up to the discriminators' update: the codec on audio (B, L), then the
        discriminators' loss on its detached output, and that loss's backward.
        Returns the targets, the codec's output and the discriminators' loss."""
        ref, gen = self.codec(audio, training=True)
        if self.distiller is not None:
            gen["kd"] = self.distiller.loss(ref)
        self.count_codes(gen["codes"])
        self.phase_done("generator forward")
        y, y_g = audio.unsqueeze(1), gen["audio"].detach()
        self.optim_d.zero_grad()
        with self.autocast():
            mpd_real, mpd_fake, _, _ = self.train_mpd(y, y_g)
            mrd_real, mrd_fake, _, _ = self.train_mrd(y, y_g)
        loss = losses.both_discriminators(losses.discriminator_loss(mpd_real, mpd_fake),
                                          losses.discriminator_loss(mrd_real, mrd_fake))
        self.scaler_d.scale(loss).backward()
        return ref, gen, loss

    def generator_half(self, audio: torch.Tensor, ref: Dict[str, torch.Tensor], gen: Dict[str, torch.Tensor]
                       ) -> Dict[str, torch.Tensor]:
        """A step from the discriminators' update to the generator's: every generator loss term
        of audio (B, L) and the codec's output `gen`, the total as 'G', and its backward."""
        y = audio.unsqueeze(1)
        self.optim_g.zero_grad()
        terms = losses.spectral_losses(ref, gen, self.h)
        # The discriminators' weight gradients from this backward would be discarded by the
        # next step's zero_grad; not computing them saves time and changes nothing.
        with frozen(self.mpd, self.mrd):
            with self.autocast():
                # Together, the backward also runs through the real half: a tenth more
                # discriminator arithmetic, which a CPU pays in full, while a GPU at batch 16
                # gains from the fewer, larger kernels.
                together = self.device.type == "cuda"
                _, mpd_fake, mpd_real_fmaps, mpd_fake_fmaps = self.frozen_mpd(y, gen["audio"], together=together)
                _, mrd_fake, mrd_real_fmaps, mrd_fake_fmaps = self.frozen_mrd(y, gen["audio"], together=together)
            terms["GAN"] = losses.both_discriminators(losses.generator_adversarial_loss(mpd_fake),
                                                      losses.generator_adversarial_loss(mrd_fake))
            terms["FM"] = losses.both_discriminators(losses.feature_matching_loss(mpd_real_fmaps, mpd_fake_fmaps),
                                                     losses.feature_matching_loss(mrd_real_fmaps, mrd_fake_fmaps))
            terms["codebook"], terms["commitment"] = gen["codebook"], gen["commitment"]
            terms["G"] = losses.generator_total(terms)
            if "kd" in gen:
                terms.update(gen["kd"])
                if self.h.kd_weight:     # at 0 KD is only measured: 0 x inf would be NaN
                    terms["G"] = terms["G"] + self.h.kd_weight * terms["KD"]
            self.scaler_g.scale(terms["G"]).backward()
        return terms

    def pool_code_counts(self) -> None:
        """Sum the ranks' code counts on rank 0, which logs and saves them; the other ranks
        count on from zero, so that the next sum over ranks is still the window's count."""
        if distributed():
            dist.all_reduce(self.code_counts)
            if not is_main_process():
                self.code_counts.zero_()

    def count_codes(self, codes: torch.Tensor) -> None:
        """Add codes (B, n_codebooks, T') to `code_counts`. index_add_ rather than bincount,
        whose CUDA version reads the largest code back to the host."""
        n, size = self.code_counts.shape
        index = codes + torch.arange(n, device=codes.device).view(1, n, 1) * size
        self.code_counts.view(-1).index_add_(0, index.flatten(), torch.ones(index.numel(), device=codes.device))

    def train_step(self, audio: torch.Tensor, want_norms: bool = False) -> Dict[str, torch.Tensor]:
        """D step then G step on a batch of segments (B, L); returns the detached loss terms
        (and the gradient norms, with `want_norms` or `grad_clip`).

        With `cuda_graph` most terms are a recording's outputs: read them (or clone them) before
        the next step."""
        if self.step_graph is not None:
            terms = self.step_graph(audio, want_norms)
        else:
            terms = self.device_step(audio.to(self.device, non_blocking=True), want_norms)
        self.nonfinite.end_step()
        return terms

    def device_step(self, audio: torch.Tensor, want_norms: bool, halves: Optional[Tuple[Callable, Callable]] = None
                    ) -> Dict[str, torch.Tensor]:
        """The step's work on the device, audio (B, L) already there. `halves` replace
        `discriminator_half` and `generator_half` (a recorded step replays them); the updates
        between and after them run here, each decided by `nonfinite.allow`."""
        first, second = halves or (self.discriminator_half, self.generator_half)
        if self.compiled:
            # With CUDA graphs (compile modes reduce-overhead and max-autotune) a step holds
            # several compiled calls, and the discriminators run again after their backward;
            # marking the step's start keeps the encoder's and decoder's outputs alive until
            # the generator's backward. Without CUDA graphs this only counts steps.
            torch.compiler.cudagraph_mark_step_begin()
        self.nonfinite.start_step()
        self.phase_done("data")
        ref, gen, loss_d = first(audio)
        terms_d = {"D": loss_d, **self.update("D", loss_d, want_norms)}
        self.phase_done("discriminator step")
        terms = dict(second(audio, ref, gen))
        self.phase_done("generator backward")
        terms.update(self.update("G", terms["G"], want_norms))
        self.phase_done("optimizer")
        terms.update(terms_d)
        return {name: value.detach() for name, value in terms.items()}

    @torch.no_grad()
    def validate(self, loader: DataLoader, writer: SummaryWriter) -> Dict[str, float]:
        """Mean loss terms and metrics over whole validation utterances (batch 1).

        Each utterance is trimmed as the release trims it (`trim_for_validation`); metrics
        compare it with the output over the utterance's own samples. A metric that is
        undefined for an utterance (the SNR of silence) is left out of that metric's mean, and
        an utterance that no longer reads or does not fit in GPU memory is left out (with a line).
        """
        h = self.h
        if self.step_graph is not None:
            # Its many lengths may push the recording's FFT plans out of their cache.
            self.step_graph.invalidate()
        self.encoder.eval()
        self.decoder.eval()
        totals: Dict[str, float] = {}
        counts: Dict[str, int] = {}
        for j, audio in enumerate(loader):
            if audio.numel() == 0:
                continue  # a file that no longer reads (the dataset said which)
            length = audio.size(-1)
            audio = trim_for_validation(audio, h.hop_size, h.ratio, h.n_fft).to(self.device)
            try:
                ref, gen = self.codec(audio)
                values = {k: v.item() for k, v in losses.spectral_losses(ref, gen, h).items()}
                n = min(length, audio.size(-1))
                values.update(compute_metrics(audio[0, :n], gen["audio"][0, 0, :n], h))
            except torch.cuda.OutOfMemoryError:
                values = None
            if values is None:
                # One long utterance must not end the run (each validation would meet it again).
                # The cache is emptied once the exception, which holds the tensors, is gone.
                print(f"warning: validation leaves out {loader.dataset.files[j]}: its {length} samples do not fit "
                      f"in GPU memory", file=sys.stderr)
                torch.cuda.empty_cache()
                continue
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

    def _log_example(self, writer: SummaryWriter, j: int, audio: torch.Tensor, ref: Dict[str, torch.Tensor],
                     gen: Dict[str, torch.Tensor]) -> None:
        sr = self.h.sampling_rate
        if self.steps == 0:
            writer.add_audio(f"gt/y_{j}", audio[0:1], self.steps, sr)
            writer.add_figure(f"gt/y_logamp_{j}", plot_spectrogram(ref["logamp"][0].cpu().numpy()), self.steps)
            writer.add_figure(f"gt/y_pha_{j}", plot_spectrogram(ref["pha"][0].cpu().numpy()), self.steps)
        writer.add_audio(f"generated/y_g_{j}", gen["audio"][0], self.steps, sr)
        writer.add_figure(f"generated/y_g_logamp_{j}", plot_spectrogram(gen["logamp"][0].cpu().numpy()), self.steps)
        writer.add_figure(f"generated/y_g_pha_{j}", plot_spectrogram(gen["pha"][0].cpu().numpy()), self.steps)


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# A batch scheduler signals every process of a job, and torchrun forwards the signal it gets
# too, so each rank receives one stop twice, milliseconds apart: the same signal again this
# soon is the same request, not a second one.
REPEAT_SECONDS = 2.0


def _ignore_stop_signals(worker_id: int) -> None:
    # Ctrl-C and a cluster's SIGTERM reach the whole process group; the main process saves
    # and stops, so data workers must not die first under it.
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


@contextmanager
def stop_requests() -> Iterator[Dict[str, int]]:
    """Catch SIGINT / SIGTERM as a request, {"signal": number}, that the loop acts on between
    steps; a second signal stops at once, unless it repeats the first within `REPEAT_SECONDS`."""
    request: Dict[str, int] = {}
    first: List[float] = []

    def handle(signum: int, frame) -> None:
        if request:
            if signum == request["signal"] and time.monotonic() - first[0] < REPEAT_SECONDS:
                return
            name = signal.Signals(signum).name
            print(f"{name} again: stopping at once, without saving", file=sys.stderr)
            raise SystemExit(128 + signum)
        request["signal"] = signum
        first.append(time.monotonic())

    previous = {signum: signal.signal(signum, handle) for signum in STOP_SIGNALS}
    try:
        yield request
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def run_config_differences(h: AttrDict, keys: Sequence[str]) -> Tuple[Optional[AttrDict], List[str]]:
    """The config.json of the run in checkpoint_path and those of `keys` that `h` changes;
    (None, []) when there is no run to resume (no checkpoint set, or no config.json)."""
    path = os.path.join(h.checkpoint_path, "config.json")
    if not complete_steps(h.checkpoint_path) or not os.path.isfile(path):
        return None, []
    return saved_config_differences(h, path, keys)


def check_run_config(h: AttrDict) -> None:
    """A one-line error when the run in checkpoint_path describes another network than `h`:
    keys such as causal, ratio or the discriminators' periods change no tensor's shape, so the
    weights would load, train on as another model, and the saved config.json would then
    describe the checkpoints wrongly."""
    saved, changed = run_config_differences(h, RUN_NETWORK_KEYS)
    if changed:
        listed = "; ".join(f"{key} {saved[key]} -> {h[key]}" for key in changed)
        raise ValueError(f"{saved.source} describes another network than this config ({listed}): resume with "
                         f"the run's own values, or give a new checkpoint_path")


LIST_KEYS = ("input_training_wav_list", "input_validation_wav_list")


def check_before_writing(h: AttrDict) -> List[List[str]]:
    """What can be found wrong without writing anything, nor reading the data: a missing file
    list, or a run in checkpoint_path of another network. Returns the lists' paths."""
    listed = [read_filelist(h[key]) for key in LIST_KEYS]
    check_run_config(h)
    return listed


def check_run_setup(h: AttrDict) -> Optional[IO]:
    """What can fail about `checkpoint_path` before the data check, which can take long: it must be
    writable, used by no other training run and have room for one checkpoint set. Returns the
    open lock file: keep it for the whole run."""
    folder = h.checkpoint_path
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise ValueError(f"config key 'checkpoint_path': cannot write to {folder} ({e.strerror})") from None
    lock = None
    if fcntl is not None:
        # Two runs in one folder would overwrite each other's checkpoint sets without a word (a
        # requeued job while the old one still saves, a command started twice).
        lock = open(os.path.join(folder, ".lock"), "w")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            raise ValueError(f"config key 'checkpoint_path': another training run is using {folder}") from None
        except OSError as e:
            # E.g. a network file system without locks: train, but unguarded.
            lock.close()
            lock = None
            say(f"warning: cannot lock {folder} ({e.strerror}); a second training run there would not be noticed")
    if lock is not None:
        # With the lock held no write is under way: these are a killed run's unfinished ones.
        for stale in glob.glob(os.path.join(folder, ".tmp_*")):
            os.remove(stale)
    needed, free = checkpoint_set_bytes(h), shutil.disk_usage(folder).free
    if free < needed:
        raise ValueError(f"config key 'checkpoint_path': {folder} has {free / 1e9:.2f} GB free, one "
                         f"checkpoint set needs about {needed / 1e9:.2f} GB")
    return lock


def with_run_seed(h: AttrDict) -> AttrDict:
    """`h` with the seed of the run it resumes, said in one line when the config's differs: the
    seed deals the files of every epoch and seeds the crops, so another one in the middle of an
    epoch would train some files twice and skip others."""
    saved, changed = run_config_differences(h, ("seed",))
    if not changed:
        return h
    say(f"note: the config differs from the resumed run in seed {h.seed} (the run's {saved.seed} goes on: it orders "
        f"the files of every epoch and seeds the crops; a new seed needs a new checkpoint_path)")
    return build_config(dict(h, seed=saved.seed), h.source)


def build_loaders(h: AttrDict, rank: int = 0, world_size: int = 1, listed: Optional[List[List[str]]] = None
                  ) -> Tuple[DataLoader, Optional[DataLoader]]:
    """Training loader (this rank's share) and validation loader (rank 0 only, else None).

    Rank 0 reads every listed file once at start-up (cached) and keeps the usable ones.
    `listed`: the lists' paths where `check_before_writing` has read them already.
    """
    def check_lists() -> List[List[str]]:
        cache = DataCheckCache(os.path.join(h.checkpoint_path, "data_check.json"))
        segment_seconds = h.segment_size / h.sampling_rate
        paths = listed or [read_filelist(h[key]) for key in LIST_KEYS]
        return [check_audio_files(files, h[key], segment_seconds, h.strict_data, cache, workers=max(1, h.num_workers))
                for files, key in zip(paths, LIST_KEYS)]
    lists: List[Optional[List[str]]] = on_rank0(check_lists) or [None, None]
    if world_size > 1:
        # The other ranks wait here while rank 0 reads the lists (see `wait_for_rank0`);
        # torchrun stops every rank if rank 0 fails meanwhile.
        dist.broadcast_object_list(lists, src=0, group=_host_group)
    train_files, valid_files = lists
    if len(train_files) < h.batch_size * world_size:
        raise ValueError(f"{h.input_training_wav_list} has {len(train_files)} usable files, fewer than "
                         f"batch_size x processes ({h.batch_size} x {world_size}): no full batch can be drawn")
    # Shuffled once with the seed, as in the release; with shuffle_every_epoch the sampler
    # reshuffles it every epoch (seed + epoch), the same permutation on every rank.
    random.Random(h.seed).shuffle(train_files)
    per_step = h.batch_size * world_size
    left_out = train_files[len(train_files) - len(train_files) % per_step:]
    if left_out and rank == 0 and not h.shuffle_every_epoch:
        shown = ", ".join(left_out[:5]) + (", ..." if len(left_out) > 5 else "")
        print(f"note: the last incomplete batch is dropped, so in this fixed order {len(left_out)} file(s) "
              f"are left out of every epoch: {shown} (shuffle_every_epoch: true avoids that)")
    sampler = EpochSampler(len(train_files), h.batch_size, rank, world_size, h.shuffle_every_epoch, h.seed)
    pin = torch.cuda.is_available()
    # Each new iterator draws its workers' seed from `generator`; the global one would be
    # drawn a different number of times by a resumed run and by rank 0's validation, and
    # training draws from it (quantizer dropout). The crops have their own seeds.
    train_loader = DataLoader(AudioDataset(train_files, h, train=True), batch_size=h.batch_size, sampler=sampler,
                              num_workers=h.num_workers, pin_memory=pin, drop_last=True,
                              persistent_workers=h.num_workers > 0, worker_init_fn=_ignore_stop_signals,
                              generator=torch.Generator().manual_seed(h.seed))
    if rank != 0:
        return train_loader, None
    # Its worker persists too, so that a file that stopped reading is warned about once.
    valid_loader = DataLoader(AudioDataset(valid_files, h, train=False), batch_size=1,
                              shuffle=False, num_workers=min(1, h.num_workers), pin_memory=pin,
                              persistent_workers=h.num_workers > 0, worker_init_fn=_ignore_stop_signals,
                              generator=torch.Generator().manual_seed(h.seed))
    return train_loader, valid_loader


def format_terms(values: Dict[str, float]) -> str:
    """The stdout line's loss terms, in a fixed order."""
    names = ("G", "D") + losses.TERM_NAMES + (("KD",) if "KD" in values else ())
    return ", ".join(f"{name} {values[name]:.3f}" for name in names)


def mean_over_ranks(values: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Each 0-d tensor averaged over all processes (every rank must call this)."""
    stacked = torch.stack([v.float() for v in values.values()])
    dist.all_reduce(stacked)
    return dict(zip(values, stacked / dist.get_world_size()))


def log_summary(writer: SummaryWriter, trainer: Trainer, terms: Dict[str, torch.Tensor],
                health: Dict[str, torch.Tensor]) -> None:
    """TensorBoard's scalars of a summary step: the loss terms, the learning rate, the skipped
    updates, fp16's loss scales and each codebook's health."""
    steps = trainer.steps
    for name, value in terms.items():
        writer.add_scalar(f"Training/{name}", value.item(), steps)
    writer.add_scalar("Training/learning_rate", trainer.optim_g.param_groups[0]["lr"], steps)
    writer.add_scalar("Training/nonfinite_steps", trainer.nonfinite.total, steps)
    if trainer.scaler_g.is_enabled():
        # fp16's scalers skip the updates whose gradients overflow, and halve the scale then:
        # a falling scale shows skipped updates, which nonfinite_steps does not count.
        writer.add_scalar("Training/loss_scale_G", trainer.scaler_g.get_scale(), steps)
        writer.add_scalar("Training/loss_scale_D", trainer.scaler_d.get_scale(), steps)
    for name, per_codebook in health.items():
        for i, value in enumerate(per_codebook.tolist()):
            writer.add_scalar(f"Codebook/{name}_{i}", value, steps)


def log_and_checkpoint(trainer: Trainer, terms: Dict[str, torch.Tensor], epoch: int, step_start: float,
                       writer: Optional[SummaryWriter], valid_loader: Optional[DataLoader]) -> bool:
    """The interval work after a step: stdout, checkpoint, TensorBoard, validation.

    Every rank calls it: logged values are averaged over ranks, and rank 0 (the one with a
    writer) prints, logs, saves and validates while the others wait. Returns whether a
    checkpoint set was written.
    """
    h, steps = trainer.h, trainer.steps
    printing, summary = steps % h.stdout_interval == 0, steps % h.summary_interval == 0
    if (printing or summary) and distributed():
        terms = mean_over_ranks(terms)
    saved = steps % h.checkpoint_interval == 0 and steps != 0
    if summary or saved:
        trainer.pool_code_counts()
    health = codebook_health(trainer.code_counts) if summary and writer is not None else None
    if summary:
        trainer.code_counts.zero_()
    # Every rank reads back on the same steps, so that they agree in `should_stop` together.
    if printing or summary or saved or steps % READ_BACK_STEPS == 0:
        trainer.nonfinite.read_back(steps)
    validating = steps % h.validation_interval == 0
    if writer is not None:
        # .item() waits for the GPU, so values are read only on logging steps.
        if printing:
            values = {name: value.item() for name, value in terms.items()}
            print(f"Steps {steps:d}: {format_terms(values)}, s/b {time.time() - step_start:.3f}")
        if saved:
            trainer.save(steps, epoch)
        if health is not None:
            log_summary(writer, trainer, terms, health)
        if validating:
            means = trainer.validate(valid_loader, writer)
            print(f"Validation at step {steps}: "
                  + (", ".join(f"{k} {v:.3f}" for k, v in means.items()) or "no utterance gave a finite value"))
    if saved or validating:
        wait_for_rank0()
    return saved


def train(h: AttrDict, device: Optional[torch.device] = None) -> Trainer:
    """Train (or resume) the run of config `h` to `training_epochs` (or `max_steps`); returns the trainer.

    Under torchrun every process calls this; it joins the process group and leaves it at the end.
    """
    global _host_group
    rank, world_size = init_distributed()
    lock = None
    try:
        # Refused before checkpoint_path is made or locked, and before the data check: a teacher
        # that cannot teach, a missing file list, another network than the run's.
        teacher = load_teacher(h, torch.device("cpu")) if h.kd_teacher_encoder else None
        listed = on_rank0(lambda: check_before_writing(h))
        lock = on_rank0(lambda: check_run_setup(h))
        return _train(h, device, rank, world_size, teacher, listed)
    finally:
        if lock is not None:
            lock.close()
        if distributed():
            dist.destroy_process_group()
            _host_group = None


def _train(h: AttrDict, device: Optional[torch.device], rank: int, world_size: int,
           teacher: Optional[Tuple[Encoder, Decoder]], listed: Optional[List[List[str]]]) -> Trainer:
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else pick_device()
    h = with_run_seed(h)
    torch.manual_seed(h.seed)
    torch.backends.cudnn.benchmark = True
    train_loader, valid_loader = build_loaders(h, rank, world_size, listed)
    trainer = Trainer(h, device, teacher)
    trainer.resume(dealing_digest(train_loader.dataset.files, h.shuffle_every_epoch))
    h = trainer.h   # with the resumed run's learning rate and betas
    # Written once the checkpoints have loaded into this config's network: the config beside
    # them must keep describing them (inference builds the network of checkpoints that do not
    # record it from this file).
    if is_main_process():
        save_config(trainer.h, os.path.join(h.checkpoint_path, "config.json"))
    say(f"Training on {device.type}: {bitrate(h):.0f} bit/s codec, checkpoints and logs in "
        f"{os.path.abspath(h.checkpoint_path)}")
    if world_size > 1:
        say(f"{world_size} processes x batch_size {h.batch_size} = effective batch {world_size * h.batch_size}")
    for module in (trainer.encoder, trainer.decoder, trainer.mpd, trainer.mrd):
        module.train()
    start_epoch = max(0, trainer.last_epoch)
    if start_epoch >= h.training_epochs:
        say(f"Nothing to train: the run in {h.checkpoint_path} has finished {start_epoch} epochs "
            f"(training_epochs = {h.training_epochs}); raise training_epochs to continue")
        return trainer
    if h.max_steps and trainer.steps >= h.max_steps:
        say(f"Nothing to train: the run in {h.checkpoint_path} has trained {trainer.steps} steps "
            f"(max_steps = {h.max_steps}); raise max_steps to continue")
        return trainer
    train_loader.sampler.set_epoch(start_epoch, trainer.position)
    # Notes on the rest of the resumed epoch, where a batch of it is left.
    done, again = trainer.resumed_items
    if again and len(train_loader.sampler):
        say(f"note: {done} files of the epoch were trained on, not a whole number of steps of "
            f"{trainer.items_per_step()} (batch_size x processes); the {again} after the last whole step "
            f"are trained on again")
    if (trainer.position and len(train_loader.sampler)
            and trainer.saved_dealing not in (None, trainer.dealing)):
        say(f"note: the training list or shuffle_every_epoch changed since this set was saved: the rest of "
            f"epoch {start_epoch + 1} is dealt in the new order, so some of its files may be trained on twice "
            f"or not at all in this epoch")
    # TensorBoard hides what an earlier process logged from this step on: the steps that a
    # stopped or crashed run took after its last checkpoint are trained, and logged, again.
    writing = (SummaryWriter(os.path.join(h.checkpoint_path, "logs"), purge_step=trainer.steps)
               if is_main_process() else nullcontext())
    with writing as writer, stop_requests() as request:
        try:
            run_epochs(trainer, start_epoch, train_loader, valid_loader, writer, request)
        except Exception:
            # Not a set that the resume passed over as unreadable.
            last = max(set(complete_steps(h.checkpoint_path, up_to=trainer.steps)) - trainer.passed_over, default=None)
            where = checkpoint_file(h.checkpoint_path, "do", last) if last is not None else "none yet"
            say(f"Training failed at step {trainer.steps}; the last complete checkpoint set is {where}",
                file=sys.stderr)
            raise
    return trainer


def should_stop(trainer: Trainer, request: Dict[str, int]) -> Optional[str]:
    """'signal' after SIGINT / SIGTERM, 'nonfinite' after `max_nonfinite_steps` non-finite steps
    in a row, 'max_steps' once `max_steps` steps are trained, else None. Under torchrun the ranks
    agree (a signal may reach only some of them). With deferred checks the ranks of a torchrun
    wait for their next read-back (see `log_and_checkpoint`); one process reads back at once
    when a signal came."""
    reached = "max_steps" if trainer.h.max_steps and trainer.steps >= trainer.h.max_steps else None
    if not trainer.nonfinite.read:
        if distributed() or not request:
            return reached
        trainer.nonfinite.read_back(trainer.steps - 1)
    flags = [bool(request), trainer.nonfinite.streak >= trainer.h.max_nonfinite_steps]
    if distributed():
        agreed = torch.tensor(flags, dtype=torch.float32, device=trainer.device)
        dist.all_reduce(agreed, op=dist.ReduceOp.MAX)
        flags = [bool(v) for v in agreed.tolist()]
    return "signal" if flags[0] else "nonfinite" if flags[1] else reached


def run_epochs(trainer: Trainer, start_epoch: int, train_loader: DataLoader, valid_loader: Optional[DataLoader],
               writer: Optional[SummaryWriter], request: Dict[str, int]) -> None:
    """The loop over epochs and steps. A stop request or too many non-finite losses in a row
    save a set at the last finished step and end the process with one line; so does reaching
    `max_steps`, which returns instead."""
    h = trainer.h
    last_saved = trainer.steps - 1
    for epoch in range(start_epoch, h.training_epochs):
        epoch_start = time.time()
        train_loader.sampler.set_epoch(epoch, trainer.position)
        # A set saved at an epoch's last step resumes with none of its batches left: the epoch
        # is only closed below (the learning rate decays), not announced as an empty one.
        announced = len(train_loader.sampler) > 0
        if announced:
            say(f"Epoch: {epoch + 1}")
        for audio in train_loader:
            step_start = time.time()
            terms = trainer.train_step(audio, want_norms=trainer.steps % h.summary_interval == 0)
            trainer.position += 1
            if log_and_checkpoint(trainer, terms, epoch, step_start, writer, valid_loader):
                last_saved = trainer.steps
            trainer.steps += 1
            reason = should_stop(trainer, request)
            if reason:
                step = trainer.steps - 1
                if step > last_saved:
                    trainer.pool_code_counts()
                    if is_main_process():
                        trainer.save(step, epoch)
                wait_for_rank0()
                where = checkpoint_file(h.checkpoint_path, "do", step)
                if reason == "max_steps":
                    say(f"Reached max_steps ({h.max_steps}) after step {step}; checkpoint set saved ({where}). "
                        f"Raise max_steps to continue.")
                    return
                if reason == "signal":
                    signum = request.get("signal", signal.SIGTERM)
                    say(f"Stopped by {signal.Signals(signum).name} after step {step}; checkpoint set saved "
                        f"({where}). Run the same command to resume.")
                    raise SystemExit(128 + signum)
                raise SystemExit(f"error: {trainer.nonfinite.streak} steps in a row had a non-finite loss or "
                                 f"gradient; stopped after step {step}, the last finite state is saved ({where})")
        with warnings.catch_warnings():
            # torch warns when no optimizer step came before, which is right here: a resumed
            # epoch with no batch left, or fp16's scaler skipping every update of the epoch.
            warnings.filterwarnings("ignore", r"Detected call of `lr_scheduler.step\(\)` before", UserWarning)
            trainer.scheduler_g.step()
            trainer.scheduler_d.step()
        trainer.position = 0
        if announced:
            say(f"Time taken for epoch {epoch + 1} is {time.time() - epoch_start:.1f} s")
    # Keep the final weights even when the run ends between checkpoint intervals, and mark the
    # run finished even when its last step was just saved (that set is written again), also
    # when a run stopped between that save and this one has had no step left to train: the
    # epoch stored is the number of finished epochs, so restarting a finished run trains
    # nothing and raising training_epochs continues with the next epoch.
    trainer.pool_code_counts()
    if is_main_process():
        trainer.save(trainer.steps - 1, h.training_epochs)
    # No rank leaves (and tears down the group) while rank 0 still writes.
    wait_for_rank0()


def main(argv: Optional[List[str]] = None) -> None:
    run_cli(lambda h, args: train(h), make_parser(__doc__), argv)


if __name__ == "__main__":
    main()
