"""Small helpers shared by the scripts: the compute device, distributed ranks, precision and
compile checks, output-path checks, atomic file writes, one-line errors, figures."""
import os
import tempfile
from contextlib import nullcontext
from typing import TYPE_CHECKING, Any, BinaryIO, Callable, ContextManager, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def distributed() -> bool:
    """Whether this process is one of several under torch.distributed (torchrun)."""
    return dist.is_available() and dist.is_initialized()


def rank_and_world_size() -> Tuple[int, int]:
    """(this process's rank, the process count) under torch.distributed, else (0, 1)."""
    return (dist.get_rank(), dist.get_world_size()) if distributed() else (0, 1)


def counted(n: int, noun: str) -> str:
    """'1 file', '2 files': a count with its noun in the right number."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def pick_device() -> torch.device:
    """CUDA when a GPU is visible, else the CPU (CUDA_VISIBLE_DEVICES= forces the CPU)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so that a wall-clock reading covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def full_precision(x: torch.Tensor) -> ContextManager:
    """A block where autocast is off, so that it runs in float32 inside a mixed-precision region.

    Cast its inputs with .float(): that is a no-op on float32 tensors, so full-precision
    runs are unchanged. The meta device (shapes without data) has no autocast to turn off.
    """
    if x.device.type == "meta":
        return nullcontext()
    return torch.autocast(x.device.type, enabled=False)


def first_line(error: BaseException) -> str:
    """An exception's message cut to its first line (for one-line errors), or its type's name
    when it has none."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def compile_problem(device: torch.device = torch.device("cpu")) -> Optional[str]:
    """None where torch.compile works on `device` (a C++ compiler on a CPU, Triton on a GPU),
    else why not, in one line."""
    try:
        torch.compile(lambda x: x + 1)(torch.zeros(1, device=device))
        return None
    except Exception as e:
        return f"torch.compile is unavailable here ({type(e).__name__}: {first_line(e)[:120]})"


def nearest_existing(path: str) -> str:
    """`path`, or the nearest folder above it that exists (outputs make their folders as needed)."""
    path = os.path.abspath(path)
    # A root that does not exist either (an unmapped Windows drive) is its own folder above.
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return path


def check_output_folder(folder: str, option: str) -> None:
    """A one-line ValueError naming `option` unless outputs can be written in `folder` (made as
    needed): the nearest folder at or above it that exists must be a folder, and writable.
    Checked before the work, which would otherwise be lost when an output is renamed into place."""
    above = nearest_existing(folder)
    if not os.path.exists(above):
        raise ValueError(f"{option}: {above} does not exist")
    if not os.path.isdir(above):
        raise ValueError(f"{option}: {above} is a file, where a folder of outputs goes")
    if not os.access(above, os.W_OK | os.X_OK):
        raise ValueError(f"{option}: cannot write in {above}")


def check_output_file(path: str, option: str) -> None:
    """`check_output_folder` for the folder of an output file at `path`, whose place a folder
    must not take either."""
    if os.path.isdir(path) or path.endswith(("/", os.sep)):
        raise ValueError(f"{option}: {path} is a folder, where an output file goes")
    check_output_folder(os.path.dirname(os.path.abspath(path)), option)


def atomic_write(path: str, write: Callable[[BinaryIO], Any]) -> None:
    """Call write(binary_file) on a temp file next to `path`, then rename it into place.

    A crash or a full disk leaves the previous file untouched, never a half-written one.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp_" + os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp creates the file private (0600); give it the permissions a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def plot_spectrogram(spectrogram: np.ndarray) -> "Figure":
    """A matplotlib figure of a (F, T) array, for TensorBoard."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 2.5))
    im = ax.imshow(spectrogram, aspect="auto", origin="lower", interpolation="none")
    fig.colorbar(im, ax=ax)
    fig.canvas.draw()
    plt.close(fig)
    return fig
