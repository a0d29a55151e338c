"""Checkpoint files in the authors' release format: naming, atomic save and load, discovery.

A checkpoint set of step N in `checkpoint_path` is three files, as the release writes them:
`encoder_%08d` = {"encoder": state_dict}, `decoder_%08d` = {"decoder": state_dict} and
`do_%08d` = {"mpd", "mrd", "optim_g", "optim_d", "steps", "epoch"}, to which training here
adds what an exact resume needs (see `train.Trainer.save`). State dicts on disk use the
release's key names and order, with weight norm in the old `weight_g` / `weight_v` form.
"""
import errno
import glob
import os
import pickle
import re
from contextlib import nullcontext
from typing import Any, Callable, Collection, ContextManager, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from config import KEYS, NETWORK_KEYS, AttrDict, build_config, differing_keys, read_config_file
from discriminators import MultiPeriodDiscriminator, MultiResolutionDiscriminator
from models import Decoder, Encoder
from utils import atomic_write, first_line

# Our module names -> the release's, in the release's registration order. The release
# names every layer twice (`*_logamp`, `*_pha`); here one `Branch` class is used twice.
# State dicts on disk and optimizer parameter positions follow the right-hand column.
_BRANCH_NAMES = (
    ("amp.embed", "embed_logamp"), ("pha.embed", "embed_pha"),
    ("amp.norm", "norm_logamp"), ("pha.norm", "norm_pha"),
    ("amp.blocks", "convnext_logamp"), ("pha.blocks", "convnext_pha"),
    ("amp.final_norm", "final_layer_norm_logamp"), ("pha.final_norm", "final_layer_norm_pha"),
    ("amp.out", "out_logamp"), ("pha.out", "out_pha"),
)
RELEASE_NAMES: Dict[type, Tuple[Tuple[str, str], ...]] = {
    Encoder: _BRANCH_NAMES + (
        ("amp_down", "AMP_Encoder_downsample_output_conv"),
        ("pha_down", "PHA_Encoder_downsample_output_conv"),
        ("latent_conv", "latent_output_conv"),
        ("quantizer", "quantizer"),
    ),
    Decoder: (
        ("latent_conv", "latent_input_conv"),
        ("amp_up", "AMP_Decoder_upsample_input_conv"),
        ("pha_up", "PHA_Decoder_upsample_input_conv"),
    ) + _BRANCH_NAMES + (
        ("amp_out", "AMP_Decoder_output_conv"),
        ("pha_real", "PHA_Decoder_output_R_conv"),
        ("pha_imag", "PHA_Decoder_output_I_conv"),
    ),
    MultiPeriodDiscriminator: (("discriminators", "discriminators"),),
    MultiResolutionDiscriminator: (("discriminators", "discriminators"),),
}
_WEIGHT_NORM_NAMES = (
    (".parametrizations.weight.original0", ".weight_g"),
    (".parametrizations.weight.original1", ".weight_v"),
)
# The entries every `do_` file has, the release's.
TRAINING_STATE_KEYS = ("mpd", "mrd", "optim_g", "optim_d", "steps", "epoch")
# The files of one checkpoint set: `<kind>_<8-digit step>`.
KINDS = ("encoder", "decoder", "do")


def _to_release_name(name: str, table: Sequence[Tuple[str, str]]) -> Tuple[str, int]:
    for ours, theirs in _WEIGHT_NORM_NAMES:
        if name.endswith(ours):
            name = name[: -len(ours)] + theirs
    for position, (ours, theirs) in enumerate(table):
        if name == ours or name.startswith(ours + "."):
            return theirs + name[len(ours):], position
    raise KeyError(f"no release name for parameter '{name}'")


def _from_release_name(name: str, table: Sequence[Tuple[str, str]]) -> str:
    for ours, theirs in table:
        if name == theirs or name.startswith(theirs + "."):
            name = ours + name[len(theirs):]
            break
    else:
        raise KeyError(name)
    for ours, theirs in _WEIGHT_NORM_NAMES:
        if name.endswith(theirs):
            name = name[: -len(theirs)] + ours
    return name


def _release_order(module: nn.Module, named: Sequence[Tuple[str, torch.Tensor]]) -> List[Tuple[str, torch.Tensor]]:
    table = RELEASE_NAMES[type(module)]
    renamed = [(*_to_release_name(name, table), i, tensor) for i, (name, tensor) in enumerate(named)]
    renamed.sort(key=lambda item: (item[1], item[2]))
    return [(name, tensor) for name, _, _, tensor in renamed]


def release_state_dict(module: nn.Module) -> Dict[str, torch.Tensor]:
    """The module's state dict with the release's key names and order (weight_g / weight_v)."""
    return dict(_release_order(module, list(module.state_dict().items())))


def release_parameters(module: nn.Module) -> List[nn.Parameter]:
    """Parameters in the order the release's `module.parameters()` yields them.

    AdamW state is stored by position, so optimizers built from this list save and load
    `optim_g` / `optim_d` states that line up with the release's.
    """
    return [p for _, p in _release_order(module, list(module.named_parameters()))]


def load_release_state_dict(module: nn.Module, state_dict: Dict[str, torch.Tensor], source: str = "") -> None:
    """Load a state dict saved by the release (or by `release_state_dict`) into `module`."""
    table = RELEASE_NAMES[type(module)]
    where = f" in {source}" if source else ""
    converted = {}
    for name, tensor in state_dict.items():
        try:
            converted[_from_release_name(name, table)] = tensor
        except KeyError:
            raise ValueError(f"unexpected key '{name}'{where} for {type(module).__name__}") from None
    expected = module.state_dict()
    extra = [n for n in converted if n not in expected]
    if extra:
        raise ValueError(f"unexpected key '{_to_release_name(extra[0], table)[0]}'{where} "
                         f"for {type(module).__name__} ({len(extra)} unexpected): the checkpoint has more "
                         f"codebooks, blocks or periods than the config")
    missing = [n for n in expected if n not in converted]
    if missing:
        raise ValueError(f"missing key '{_to_release_name(missing[0], table)[0]}'{where} "
                         f"for {type(module).__name__} ({len(missing)} missing)")
    for name, tensor in converted.items():
        if tensor.shape != expected[name].shape:
            raise ValueError(f"key '{_to_release_name(name, table)[0]}'{where} has shape "
                             f"{tuple(tensor.shape)}, the model expects {tuple(expected[name].shape)}")
    module.load_state_dict(converted)


def save_checkpoint(path: str, obj: Dict[str, Any]) -> None:
    """torch.save to a temp file renamed into place: a crash never leaves half a file."""
    atomic_write(path, lambda f: torch.save(obj, f))
    print(f"Saved checkpoint {path}")


def save_checkpoint_set(folder: str, step: int, parts: Dict[str, Dict[str, Any]], own: bool = False) -> None:
    """Write the set of `step` (parts: "encoder", "decoder" and "do" to their contents):
    encoder_, decoder_ then do_, each atomically. A set is complete once do_ exists.

    own: any files of this step on disk are of the set the run resumed from or wrote itself
    (the same weights): it keeps its do_ while it is written again, so it stays whole
    throughout. Otherwise they are of a set that a resume passed over, with other weights,
    and its do_ goes first: a crash could leave it beside the new encoder_ as a complete
    set of two saves.
    """
    if not own and os.path.exists(checkpoint_file(folder, "do", step)):
        os.remove(checkpoint_file(folder, "do", step))
    for kind in KINDS:
        save_checkpoint(checkpoint_file(folder, kind, step), parts[kind])
    # The renames reach the disk before anything else happens in the folder (pruning deletes
    # older sets next), also across a power cut. Where a folder cannot be opened or flushed
    # (Windows, some network and FUSE file systems) that is left to the system.
    try:
        handle = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(handle)
        finally:
            os.close(handle)
    except OSError:
        pass


# Training files of earlier versions hold numpy's random state: arrays, which are plain data.
# numpy 1 pickles them under numpy.core, numpy 2 under numpy._core.
_RECONSTRUCT = np.zeros(0).__reduce__()[0]
_NUMPY_ARRAY_GLOBALS = [_RECONSTRUCT, (_RECONSTRUCT, "numpy.core.multiarray._reconstruct"),
                        (_RECONSTRUCT, "numpy._core.multiarray._reconstruct"),
                        np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def _numpy_arrays_allowed() -> ContextManager:
    """A block where torch's weights-only loader also builds numpy arrays (torch 2.5 on;
    older versions read the files that hold no numpy state)."""
    allow = getattr(torch.serialization, "safe_globals", None)
    return allow(_NUMPY_ARRAY_GLOBALS) if allow else nullcontext()


# Errors of the file system (permissions, a failing disk, a lost network mount), not of the
# file read: the file may well be whole.
FILE_SYSTEM_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.EIO, errno.ESTALE, errno.ENOTCONN,
                                errno.ETIMEDOUT, errno.EHOSTDOWN, errno.EHOSTUNREACH})


def load_checkpoint(path: str, device: torch.device, keys: Sequence[str] = ()) -> Dict[str, Any]:
    """A checkpoint dict; each of `keys` must be in it.

    Only tensors and plain data are unpickled (torch's weights_only loader): a checkpoint
    from elsewhere cannot run code when it is read."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        with _numpy_arrays_allowed():
            checkpoint = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(f"cannot read checkpoint {path}: {_unpickling_problem(str(e))}") from None
    except Exception as e:
        if isinstance(e, OSError) and e.errno in FILE_SYSTEM_ERRNOS:
            raise OSError(f"cannot read checkpoint {path}: {first_line(e)}") from None
        # Other OSErrors come from the file too (a truncated zip seeks before its start: EINVAL).
        raise ValueError(f"cannot read checkpoint {path}: {first_line(e)}") from None
    for key in keys:
        if not isinstance(checkpoint, dict) or key not in checkpoint:
            raise ValueError(f"checkpoint {path} has no '{key}' entry")
    return checkpoint


def _unpickling_problem(message: str) -> str:
    """What torch's weights_only loader refused, in a few words (its message runs to a page)."""
    found = re.search(r"GLOBAL (\S+)|but got <class '([^']+)'>", message)
    if found:
        return (f"it holds {found.group(1) or found.group(2)}, which could run code when unpickled; "
                f"checkpoints hold tensors and plain data only")
    detail = re.search(r"WeightsUnpickler error:\s*(.+)", message)
    return f"not a checkpoint, or a damaged one ({detail.group(1).strip() if detail else 'unreadable'})"


def checkpoint_file(folder: str, kind: str, step: int) -> str:
    """Path of the `kind` ('encoder', 'decoder' or 'do') checkpoint of `step`, named as the release names it."""
    return os.path.join(folder, f"{kind}_{step:08d}")


def checkpoint_steps(folder: str, kind: str) -> List[int]:
    """Step numbers of the `{kind}_NNNNNNNN` files in `folder`, ascending."""
    steps = []
    for found in glob.glob(os.path.join(glob.escape(folder), kind + "_" + "?" * 8)):
        match = re.fullmatch(re.escape(kind) + r"_(\d{8})", os.path.basename(found))
        if match:
            steps.append(int(match.group(1)))
    return sorted(steps)


def steps_on_disk(folder: str) -> List[int]:
    """Steps of which any checkpoint file (encoder_, decoder_ or do_) exists, ascending."""
    return sorted({s for kind in KINDS for s in checkpoint_steps(folder, kind)})


def complete_steps(folder: str, up_to: Optional[int] = None) -> List[int]:
    """Steps (up to `up_to`, if given) for which encoder_, decoder_ and do_ checkpoints all
    exist, ascending."""
    steps = set.intersection(*(set(checkpoint_steps(folder, kind)) for kind in KINDS))
    return sorted(s for s in steps if up_to is None or s <= up_to)


def newest_complete_step(folder: str, up_to: Optional[int] = None) -> Optional[int]:
    """The newest step (up to `up_to`, if given) for which encoder_, decoder_ and do_
    checkpoints all exist."""
    steps = complete_steps(folder, up_to)
    return steps[-1] if steps else None


def load_newest_set(folder: str, device: torch.device, warn: Callable[[str], None] = print
                    ) -> Optional[Tuple[int, Dict[str, Dict[str, Any]]]]:
    """(step, {"encoder", "decoder", "do": checkpoint dict}) of the newest set that reads back whole.

    Newer sets with a member missing or unreadable (a run killed mid-save, a truncated
    file) are passed over with a one-line warning each, given to `warn`. None when no set
    is usable. A file-system error (`FILE_SYSTEM_ERRNOS`) stops instead: that set may well
    be whole, and a run resumed from an older one would write over it.
    """
    complete = complete_steps(folder)
    newest_any = max(steps_on_disk(folder), default=None)
    if newest_any is not None and (not complete or newest_any > complete[-1]):
        fallback = "resuming from an older one" if complete else "no complete one is older, so training starts anew"
        warn(f"warning: checkpoint set {newest_any} in {folder} is incomplete; {fallback}")
    keys = {"encoder": ["encoder"], "decoder": ["decoder"], "do": TRAINING_STATE_KEYS}
    for step in reversed(complete):
        try:
            return step, {kind: load_checkpoint(checkpoint_file(folder, kind, step), device, keys[kind])
                          for kind in KINDS}
        except ValueError as e:
            warn(f"warning: skipping checkpoint set {step}: {e}")
        except OSError as e:
            raise OSError(f"{e}; the set is not passed over as damaged: run again once it reads, or move "
                          f"it away to resume from an older one") from None
    return None


def prune_checkpoints(folder: str, keep: int, passed_over: Collection[int] = ()) -> None:
    """Delete every checkpoint file older than the newest `keep` complete sets (0 keeps all).

    passed_over: steps of the sets that a resume passed over as unreadable or incomplete
    (and that were not written again since): they cannot count among the ones kept, and
    are left alone for the user to look at."""
    complete = [step for step in complete_steps(folder) if step not in passed_over]
    if keep <= 0 or len(complete) <= keep:
        return
    oldest_kept = complete[-keep]
    for kind in KINDS:
        for step in checkpoint_steps(folder, kind):
            if step < oldest_kept and step not in passed_over:
                os.remove(checkpoint_file(folder, kind, step))


def checkpoint_set_bytes(h: AttrDict) -> int:
    """About how many bytes one checkpoint set of config `h` takes on disk.

    Every parameter is stored as float32 with its two AdamW moments; the modules are built
    on the meta device, so nothing is allocated.
    """
    with torch.device("meta"):
        modules = (Encoder(h), Decoder(h), MultiPeriodDiscriminator(h), MultiResolutionDiscriminator(h))
    return 3 * 4 * sum(p.numel() for m in modules for p in m.parameters())


def saved_config_differences(h: AttrDict, path: str, keys: Sequence[str]) -> Tuple[AttrDict, List[str]]:
    """The config saved at `path` (a run's config.json) and those of `keys` whose values differ from `h`'s."""
    saved = build_config(read_config_file(path), path)
    return saved, differing_keys(saved, h, keys)


def network_record(h: AttrDict) -> Dict[str, Any]:
    """The network keys of `h`, which training stores in each encoder_ and decoder_ file: keys
    such as `causal` or `win_size` change no weight's shape, so the weights alone cannot tell
    which network they belong to."""
    return {key: h[key] for key in NETWORK_KEYS}


def _recorded_network(path: str, checkpoint: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """The network keys that a checkpoint records (of those known here), or None without a record."""
    record = checkpoint.get("network")
    if record is None:
        return None
    if not isinstance(record, dict):
        raise ValueError(f"checkpoint {path}: its 'network' entry is not a table of config keys")
    record = {k: v for k, v in record.items() if k in NETWORK_KEYS}
    for key, value in record.items():
        problem = KEYS[key].check(value)
        if problem:
            raise ValueError(f"checkpoint {path}: its recorded '{key}' must be {problem}, got {value!r}")
    return record


def _network_beside(h: AttrDict, checkpoint: str) -> Optional[Tuple[Dict[str, Any], str]]:
    """The network keys of the config.json that training wrote beside `checkpoint`, and its
    path; None when there is none (or it is `h`'s own file)."""
    path = os.path.join(os.path.dirname(os.path.abspath(checkpoint)), "config.json")
    if not os.path.isfile(path) or os.path.abspath(path) == os.path.abspath(h.source):
        return None
    beside = build_config(read_config_file(path), path)
    return {key: beside[key] for key in NETWORK_KEYS}, path


def _with_network(h: AttrDict, network: Dict[str, Any], origin: str, source: str, checkpoint: str) -> AttrDict:
    """`h` with the keys of `network` (`origin`, e.g. "of <path>"); says in one line which
    of them change `h`, whose `source` then becomes `source`."""
    changed = differing_keys(h, network, network)
    if not changed:
        return h
    print(f"note: {h.source} does not describe the network of {checkpoint}; using the network keys "
          f"{origin} ({', '.join(changed)})")
    merged = AttrDict(h, **network)
    merged.source = source
    return merged


def load_generator(h: AttrDict, encoder_path: str, decoder_path: str, device: torch.device,
                   advice: str = "pass the config they were trained with as --config"
                   ) -> Tuple[Encoder, Decoder, AttrDict]:
    """Encoder and decoder with the weights of two release-format checkpoints.

    Training records its config's network keys in the checkpoints and writes the config
    beside them. When those keys differ from `h`'s, the network is built from them (said in
    one line): from the record, else (checkpoints of earlier versions) from the config
    beside; the returned config is the one that matches the weights. When the weights fit
    no network known, the error ends with `advice`.
    """
    encoder_file = load_checkpoint(encoder_path, device, ["encoder"])
    decoder_file = load_checkpoint(decoder_path, device, ["decoder"])
    recorded = [(record, path) for record, path in ((_recorded_network(encoder_path, encoder_file), encoder_path),
                                                    (_recorded_network(decoder_path, decoder_file), decoder_path))
                if record is not None]
    if len(recorded) == 2 and recorded[0][0] != recorded[1][0]:
        (a, _), (b, _) = recorded
        differ = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        raise ValueError(f"{encoder_path} and {decoder_path} are of different networks ({', '.join(differ)})")
    if recorded:
        record, path = recorded[0]
        h = _with_network(h, record, f"recorded in {path}", path, encoder_path)
    else:
        beside = _network_beside(h, encoder_path)
        if beside is not None:
            network, path = beside
            h = _with_network(h, network, f"of {path}", path, encoder_path)
    encoder, decoder = Encoder(h).to(device), Decoder(h).to(device)
    try:
        load_release_state_dict(encoder, encoder_file["encoder"], encoder_path)
        load_release_state_dict(decoder, decoder_file["decoder"], decoder_path)
    except ValueError as e:
        raise ValueError(f"{e}: the network of {h.source} does not match these checkpoints; {advice}") from None
    return encoder, decoder, h
