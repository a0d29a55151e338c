"""checkpoints.py: release key names, order and shapes, optimizer positions, atomic save / load."""
import copy
import errno
import io
import math
import os
import re
import stat
import zipfile

import numpy as np
import pytest
import torch

import checkpoints
import models
import spectral
from config import AttrDict, save_config
from conftest import tone
from discriminators import MultiPeriodDiscriminator, MultiResolutionDiscriminator

TSV = os.path.join(os.path.dirname(os.path.abspath(__file__)), "reference_state_dict.tsv")


def read_tsv():
    rows = []
    with open(TSV) as f:
        for line in f:
            if not line.strip() or line.startswith("#"):
                continue
            module, key, shape = line.rstrip("\n").split("\t")
            rows.append((module, key, tuple(int(s) for s in shape.strip("()").split(",") if s.strip())))
    return rows


ROWS = read_tsv()  # global row index = position in this list


def rows_of(name):
    return [(i, key, shape) for i, (module, key, shape) in enumerate(ROWS) if module == name]


_NOISE = (torch.arange(1000).float() / 1000).repeat(max(math.prod(s) for _, _, s in ROWS) // 1000 + 1)
_DISTINCT = {}


def distinct_state_dict(name):
    """Release-named tensors of the TSV's shapes; tensor of global row r holds r + (k mod 1000) / 1000,
    so every tensor differs from every other and floor(value) gives back its row.
    (Cached; callers get a new dict and must not modify the tensors in place.)"""
    if name not in _DISTINCT:
        _DISTINCT[name] = {key: (_NOISE[:math.prod(shape)] + r).reshape(shape) for r, key, shape in rows_of(name)}
    return dict(_DISTINCT[name])


def fresh(full, name):
    return copy.deepcopy(full[name])


@pytest.fixture(scope="module")
def loaded(full):
    """Copies of the full modules with the TSV's distinct-valued state dicts loaded (release names)."""
    out = {}
    for name in ("encoder", "decoder", "mpd", "mrd"):
        module = fresh(full, name)
        checkpoints.load_release_state_dict(module, distinct_state_dict(name))
        out[name] = module
    return out


# ---------------------------------------------------------------------------------------------
# Compatibility with the release's key names, order and optimizer positions


def test_tsv_is_complete():
    counts = {m: len(rows_of(m)) for m in ("encoder", "decoder", "mpd", "mrd")}
    assert counts == {"encoder": 213, "decoder": 194, "mpd": 90, "mrd": 54}
    keys = [(m, k) for m, k, _ in ROWS]
    assert len(set(keys)) == len(keys)


@pytest.mark.parametrize("name", ["encoder", "decoder", "mpd", "mrd"])
def test_release_state_dict_round_trip(loaded, name):
    sd = distinct_state_dict(name)
    out = checkpoints.release_state_dict(loaded[name])
    assert list(out) == list(sd)
    for key, tensor in sd.items():
        assert torch.equal(out[key], tensor), key


def effective_weight(g, v):
    norm = v.flatten(1).norm(dim=1).reshape(-1, *([1] * (v.dim() - 1)))
    return g * v / norm


def test_release_keys_land_in_the_right_modules(loaded):
    enc, dec, mpd, mrd = (loaded[n] for n in ("encoder", "decoder", "mpd", "mrd"))
    sds = {n: distinct_state_dict(n) for n in ("encoder", "decoder", "mpd", "mrd")}
    e, d = sds["encoder"], sds["decoder"]
    checks = [
        (enc.amp.embed.weight, e["embed_logamp.weight"]),
        (enc.pha.embed.weight, e["embed_pha.weight"]),
        (enc.pha.norm.bias, e["norm_pha.bias"]),
        (enc.amp.blocks[5].grn.gamma, e["convnext_logamp.5.grn.gamma"]),
        (enc.pha.blocks[7].pwconv2.bias, e["convnext_pha.7.pwconv2.bias"]),
        (enc.amp.final_norm.weight, e["final_layer_norm_logamp.weight"]),
        (enc.pha.out.weight, e["out_pha.weight"]),
        (enc.pha_down.bias, e["PHA_Encoder_downsample_output_conv.bias"]),
        (enc.amp_down.parametrizations.weight.original0, e["AMP_Encoder_downsample_output_conv.weight_g"]),
        (enc.latent_conv.parametrizations.weight.original1, e["latent_output_conv.weight_v"]),
        (enc.quantizer.quantizers[2].codebook.weight, e["quantizer.quantizers.2.codebook.weight"]),
        (enc.quantizer.quantizers[1].out_proj.parametrizations.weight.original1,
         e["quantizer.quantizers.1.out_proj.weight_v"]),
        (dec.pha.blocks[3].pwconv1.weight, d["convnext_pha.3.pwconv1.weight"]),
        (dec.amp.blocks[0].dwconv.weight, d["convnext_logamp.0.dwconv.weight"]),
        (dec.pha_real.parametrizations.weight.original1, d["PHA_Decoder_output_R_conv.weight_v"]),
        (dec.pha_real.parametrizations.weight.original0, d["PHA_Decoder_output_R_conv.weight_g"]),
        (dec.pha_imag.bias, d["PHA_Decoder_output_I_conv.bias"]),
        (dec.amp_out.bias, d["AMP_Decoder_output_conv.bias"]),
        (dec.pha_up.parametrizations.weight.original1, d["PHA_Decoder_upsample_input_conv.weight_v"]),
        (dec.latent_conv.bias, d["latent_input_conv.bias"]),
        (mpd.discriminators[4].convs[3].parametrizations.weight.original1, sds["mpd"]["discriminators.4.convs.3.weight_v"]),
        (mpd.discriminators[0].conv_post.bias, sds["mpd"]["discriminators.0.conv_post.bias"]),
        (mrd.discriminators[2].convs[0].parametrizations.weight.original0, sds["mrd"]["discriminators.2.convs.0.weight_g"]),
    ]
    for ours, theirs in checks:
        assert torch.equal(ours.detach(), theirs)
    assert mpd.discriminators[4].period == 11 and mrd.discriminators[2].resolution == (2048, 80, 640)
    # weight_g / weight_v keep their meaning: weight = g * v / ||v|| per output row (dim 0)
    for layer, key in ((dec.pha_real, "PHA_Decoder_output_R_conv"), (dec.amp_up, "AMP_Decoder_upsample_input_conv")):
        expected = effective_weight(d[key + ".weight_g"], d[key + ".weight_v"])
        assert torch.allclose(layer.weight, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["encoder", "decoder", "mpd", "mrd"])
def test_saved_state_dict_has_release_keys_in_order(full, name):
    buf = io.BytesIO()
    torch.save({name: checkpoints.release_state_dict(full[name])}, buf)
    buf.seek(0)
    saved = torch.load(buf)[name]
    assert [(k, tuple(v.shape)) for k, v in saved.items()] == [(k, s) for _, k, s in rows_of(name)]
    # no constant buffers (windows, filterbanks) in the module's own state dict either
    assert len(full[name].state_dict()) == len(rows_of(name))


def optimizer_positions(full, loaded, names):
    """Give each parameter of the loaded modules a gradient equal to its release position (found from its
    values, not from our ordering), step AdamW over release_parameters and return its state dict."""
    h = full["h"]
    row_list = [row for name in names for row in rows_of(name)]
    position_of_row = {r: pos for pos, (r, _, _) in enumerate(row_list)}
    params = [p for name in names for p in checkpoints.release_parameters(loaded[name])]
    assert len(params) == len(row_list)
    for p in params:
        p.grad = torch.full_like(p, float(position_of_row[int(p.detach().flatten()[0])]))
    # lr 0 leaves the shared `loaded` modules unchanged; the moments do not depend on lr.
    optim = torch.optim.AdamW(params, 0.0, betas=(h.adam_b1, h.adam_b2))
    optim.step()
    for p in params:
        p.grad = None
    # AdamW state is saved by position: the state dict is what `optim_g` / `optim_d` hold on disk.
    return optim.state_dict(), row_list


def check_positions(state, row_list, h):
    assert state["param_groups"][0]["params"] == list(range(len(row_list)))
    for pos, (_, key, shape) in enumerate(row_list):
        s = state["state"][pos]
        assert tuple(s["exp_avg"].shape) == shape, key
        assert s["exp_avg"].flatten()[0].item() == pytest.approx((1 - h.adam_b1) * pos, rel=1e-5, abs=1e-7), key
        assert torch.all(s["exp_avg"] == s["exp_avg"].flatten()[0]), key
        assert s["exp_avg_sq"].flatten()[0].item() == pytest.approx((1 - h.adam_b2) * pos ** 2, rel=1e-5), key


def test_optimizer_positions_generator(full, loaded):
    state, rows = optimizer_positions(full, loaded, ["encoder", "decoder"])
    check_positions(state, rows, full["h"])


def test_optimizer_positions_discriminators(full, loaded):
    state, rows = optimizer_positions(full, loaded, ["mrd", "mpd"])
    assert rows[0][1] == "discriminators.0.convs.0.bias" and len(rows) == 54 + 90
    check_positions(state, rows, full["h"])


def test_load_errors_name_the_key(full):
    dec = fresh(full, "decoder")
    sd = distinct_state_dict("decoder")
    del sd["PHA_Decoder_output_I_conv.weight_g"]
    with pytest.raises(ValueError, match=re.escape("PHA_Decoder_output_I_conv.weight_g")):
        checkpoints.load_release_state_dict(dec, sd)

    sd = distinct_state_dict("decoder")
    sd["convnext_logamp.2.pwconv1.weight"] = torch.zeros(512, 255)
    with pytest.raises(ValueError, match=re.escape("convnext_logamp.2.pwconv1.weight")):
        checkpoints.load_release_state_dict(dec, sd)

    sd = distinct_state_dict("decoder")
    sd["PHA_Decoder_output_X_conv.bias"] = torch.zeros(513)
    with pytest.raises(ValueError, match=re.escape("PHA_Decoder_output_X_conv.bias")):
        checkpoints.load_release_state_dict(dec, sd)

    # nothing was half-loaded by the failed attempts
    assert torch.equal(dec.amp_out.bias, full["decoder"].amp_out.bias)


def test_load_error_for_wrong_config(tiny_h, full):
    """A full-size checkpoint into tiny modules fails naming a key; with the same layers, a key's shape."""
    torch.manual_seed(0)
    with pytest.raises(ValueError, match=r"unexpected key 'convnext_logamp\.1\.[\w.]+' for Encoder"):
        checkpoints.load_release_state_dict(models.Encoder(tiny_h), distinct_state_dict("encoder"))
    wider = models.Encoder(type(tiny_h)({**tiny_h, "convnext_dim": 2 * tiny_h.convnext_dim}))
    with pytest.raises(ValueError, match=r"key '[\w.]+' has shape \(32, [\d, ]+\), the model expects \(16, "):
        checkpoints.load_release_state_dict(models.Encoder(tiny_h), checkpoints.release_state_dict(wider))


@pytest.mark.parametrize("key, more", [("n_codebooks", 8), ("convnext_layers", 2)])
def test_load_error_for_layers_the_model_does_not_have(tiny_h, key, more):
    """A checkpoint with more codebooks or blocks than the config names its first extra key."""
    bigger = models.Encoder(type(tiny_h)({**tiny_h, key: more}))
    with pytest.raises(ValueError, match=r"unexpected key '(quantizer\.quantizers\.\d|convnext_logamp\.1)\.[\w.]+' for "
                                         r"Encoder \(\d+ unexpected\)"):
        checkpoints.load_release_state_dict(models.Encoder(tiny_h), checkpoints.release_state_dict(bigger))


def test_save_load_round_trip_reproduces_outputs(tiny_h, tmp_path):
    """Models saved in the release layout and loaded into fresh modules give identical outputs."""
    torch.manual_seed(3)
    built = [models.Encoder(tiny_h), models.Decoder(tiny_h),
             MultiPeriodDiscriminator(tiny_h), MultiResolutionDiscriminator(tiny_h)]
    for module in built:
        # Non-zero GRN parameters, so every tensor matters for the outputs.
        for name, p in module.named_parameters():
            if name.endswith(("gamma", "beta")):
                torch.nn.init.normal_(p, std=0.1)
    path = str(tmp_path / "set")
    checkpoints.save_checkpoint(path, {f"m{i}": checkpoints.release_state_dict(m) for i, m in enumerate(built)})
    torch.manual_seed(4)
    fresh = [models.Encoder(tiny_h), models.Decoder(tiny_h),
             MultiPeriodDiscriminator(tiny_h), MultiResolutionDiscriminator(tiny_h)]
    saved = checkpoints.load_checkpoint(path, torch.device("cpu"))
    for i, module in enumerate(fresh):
        checkpoints.load_release_state_dict(module, saved[f"m{i}"])

    audio = torch.from_numpy(tone(0.2))[None]
    logamp, pha, _, _ = spectral.amp_pha_spectrum(audio, tiny_h.n_fft, tiny_h.hop_size, tiny_h.win_size)
    with torch.no_grad():
        outputs = []
        for enc, dec, mpd, mrd in (built, fresh):
            latent, _, commitment, _ = enc(logamp, pha)
            decoded = dec(latent)
            y = audio[:, None]
            outputs.append([latent, commitment, *decoded,
                            *mpd(y, decoded[-1])[1], *mrd(y, decoded[-1])[1]])
    assert not torch.equal(outputs[0][0], torch.zeros_like(outputs[0][0]))
    for a, b in zip(*outputs):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# Finding a usable set, pruning, disk use


def _write_sets(folder, steps, h):
    encoder, decoder = models.Encoder(h), models.Decoder(h)
    mpd, mrd = MultiPeriodDiscriminator(h), MultiResolutionDiscriminator(h)
    for step in steps:
        checkpoints.save_checkpoint_set(folder, step, _set_parts(encoder, decoder, mpd, mrd, step))


def _set_parts(encoder, decoder, mpd, mrd, step):
    return {"encoder": {"encoder": checkpoints.release_state_dict(encoder)},
            "decoder": {"decoder": checkpoints.release_state_dict(decoder)},
            "do": {"mpd": checkpoints.release_state_dict(mpd), "mrd": checkpoints.release_state_dict(mrd),
                   "optim_g": {}, "optim_d": {}, "steps": step, "epoch": 0}}


def _killed_after_renames(monkeypatch, count):
    """os.replace stops the process (KeyboardInterrupt) after `count` renames; returns their targets."""
    rename, renamed = os.replace, []

    def replace(source, target):
        if len(renamed) == count:
            raise KeyboardInterrupt
        renamed.append(target)
        rename(source, target)
    monkeypatch.setattr(os, "replace", replace)
    return renamed


@pytest.mark.skipif(os.name == "nt", reason="folders cannot be opened for fsync on Windows")
def test_a_saved_set_is_on_disk_before_older_sets_are_pruned(tmp_path, tiny_h, monkeypatch):
    """After the last rename the folder itself is flushed (a power cut could otherwise undo
    the renames but keep the deletions of older sets that follow)."""
    events, real_open, real_fsync, real_replace = [], os.open, os.fsync, os.replace

    def logged_open(path, flags, *args):
        handle = real_open(path, flags, *args)
        events.append(("open", os.fspath(path), handle))
        return handle

    def logged_fsync(handle):
        events.append(("fsync", handle))
        real_fsync(handle)

    def logged_replace(source, target):
        events.append(("replace", os.path.basename(target)))
        real_replace(source, target)
    monkeypatch.setattr(os, "open", logged_open)
    monkeypatch.setattr(os, "fsync", logged_fsync)
    monkeypatch.setattr(os, "replace", logged_replace)
    _write_sets(str(tmp_path), [10], tiny_h)
    monkeypatch.undo()
    opened = [i for i, event in enumerate(events) if event[0] == "open" and event[1] == str(tmp_path)]
    assert len(opened) == 1 and events.index(("replace", "do_00000010")) < opened[0]
    assert events[opened[0] + 1] == ("fsync", events[opened[0]][2])


@pytest.mark.skipif(os.name == "nt", reason="folders are not flushed on Windows")
def test_a_folder_that_cannot_be_flushed_still_saves(tmp_path, tiny_h, monkeypatch):
    """Some network and FUSE file systems refuse fsync on a folder (EINVAL): the set is saved."""
    real_fsync = os.fsync

    def files_only(handle):
        if stat.S_ISDIR(os.fstat(handle).st_mode):
            raise OSError(errno.EINVAL, "Invalid argument")
        real_fsync(handle)
    monkeypatch.setattr(os, "fsync", files_only)
    _write_sets(str(tmp_path), [10], tiny_h)
    assert checkpoints.load_newest_set(str(tmp_path), torch.device("cpu"))[0] == 10


def test_a_set_rewritten_after_a_resume_passed_over_it_is_never_mixed(tmp_path, tiny_h, monkeypatch):
    """Set 20's encoder_ is unreadable, so a resume passes over it and training reaches step 20
    again. A rewrite stopped after its first file must not leave a complete set 20 of the new
    encoder_ beside the old decoder_ and do_. A run's own set, written again, stays whole."""
    folder = str(tmp_path)
    _write_sets(folder, [10, 20], tiny_h)
    with open(checkpoints.checkpoint_file(folder, "encoder", 20), "r+b") as f:
        f.truncate(100)
    assert checkpoints.load_newest_set(folder, torch.device("cpu"), lambda line: None)[0] == 10
    torch.manual_seed(1)
    encoder, decoder = models.Encoder(tiny_h), models.Decoder(tiny_h)
    parts = _set_parts(encoder, decoder, MultiPeriodDiscriminator(tiny_h), MultiResolutionDiscriminator(tiny_h), 20)
    renamed = _killed_after_renames(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        checkpoints.save_checkpoint_set(folder, 20, parts)
    monkeypatch.undo()
    assert renamed == [checkpoints.checkpoint_file(folder, "encoder", 20)]
    assert checkpoints.load_newest_set(folder, torch.device("cpu"), lambda line: None)[0] == 10
    assert not [name for name in os.listdir(folder) if name.startswith(".tmp_")]
    checkpoints.save_checkpoint_set(folder, 20, parts)
    step, sets = checkpoints.load_newest_set(folder, torch.device("cpu"))
    assert step == 20
    for name, module in (("encoder", encoder), ("decoder", decoder)):
        for key, value in checkpoints.release_state_dict(module).items():
            assert torch.equal(sets[name][name][key], value), (name, key)
    # The run's own set 20 written again (a final save), stopped before its do_: still whole.
    _killed_after_renames(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        checkpoints.save_checkpoint_set(folder, 20, dict(parts, do=dict(parts["do"], epoch=1)), own=True)
    monkeypatch.undo()
    step, sets = checkpoints.load_newest_set(folder, torch.device("cpu"))
    assert step == 20 and sets["do"]["epoch"] == 0


def test_encoder_and_decoder_of_different_networks_are_refused(tiny_h, tmp_path):
    enc, dec = str(tmp_path / "encoder"), str(tmp_path / "decoder")
    network = checkpoints.network_record(tiny_h)
    checkpoints.save_checkpoint(enc, {"encoder": checkpoints.release_state_dict(models.Encoder(tiny_h)),
                                      "network": network})
    checkpoints.save_checkpoint(dec, {"decoder": checkpoints.release_state_dict(models.Decoder(tiny_h)),
                                      "network": dict(network, causal=True, win_size=tiny_h.win_size - 2)})
    with pytest.raises(ValueError, match=f"^{re.escape(enc)} and {re.escape(dec)} are of different networks "
                                         r"\(causal, win_size\)$"):
        checkpoints.load_generator(tiny_h, enc, dec, torch.device("cpu"))


def test_the_network_recorded_in_checkpoints_comes_before_the_config_beside_them(tiny_h, tmp_path, capsys):
    """Causal weights have the non-causal network's shapes: only the record tells them apart,
    also when a config.json beside them says otherwise (or a record holds a bad value)."""
    causal = AttrDict(tiny_h, causal=True)
    enc, dec = str(tmp_path / "encoder"), str(tmp_path / "decoder")
    checkpoints.save_checkpoint(enc, {"encoder": checkpoints.release_state_dict(models.Encoder(causal)),
                                      "network": checkpoints.network_record(causal)})
    checkpoints.save_checkpoint(dec, {"decoder": checkpoints.release_state_dict(models.Decoder(causal))})
    save_config(tiny_h, str(tmp_path / "config.json"))
    _, _, used = checkpoints.load_generator(tiny_h, enc, dec, torch.device("cpu"))
    assert used.causal and used.source == enc
    assert f"using the network keys recorded in {enc} (causal)" in capsys.readouterr().out
    checkpoints.save_checkpoint(enc, {"encoder": checkpoints.release_state_dict(models.Encoder(causal)),
                                      "network": dict(checkpoints.network_record(causal), causal="yes")})
    with pytest.raises(ValueError, match=f"^checkpoint {re.escape(enc)}: its recorded 'causal' must be true or false"):
        checkpoints.load_generator(tiny_h, enc, dec, torch.device("cpu"))


def test_newest_readable_set_is_found_and_broken_ones_are_named(tmp_path, tiny_h, capsys):
    folder = str(tmp_path)
    _write_sets(folder, [10, 20, 30, 40], tiny_h)
    os.remove(checkpoints.checkpoint_file(folder, "do", 40))                      # killed mid-save
    do_30 = checkpoints.checkpoint_file(folder, "do", 30)
    with open(do_30, "r+b") as f:                                                 # truncated
        f.truncate(os.path.getsize(do_30) // 2)
    step, sets = checkpoints.load_newest_set(folder, torch.device("cpu"))
    assert step == 20 and sets["do"]["steps"] == 20 and set(sets) == {"encoder", "decoder", "do"}
    out = capsys.readouterr().out
    assert "checkpoint set 40" in out and "incomplete" in out
    assert "skipping checkpoint set 30" in out and "do_00000030" in out
    warnings = []
    assert checkpoints.load_newest_set(folder, torch.device("cpu"), warnings.append)[0] == 20
    assert capsys.readouterr().out == "" and len(warnings) == 2 and "set 40" in warnings[0]
    assert checkpoints.load_newest_set(str(tmp_path / "empty"), torch.device("cpu")) is None
    for kind in ("encoder", "decoder", "do"):
        for step in (10, 20, 30):
            os.remove(checkpoints.checkpoint_file(folder, kind, step))
    assert checkpoints.load_newest_set(folder, torch.device("cpu"), warnings.append) is None
    assert "training starts anew" in warnings[-1]


def test_a_file_system_error_stops_the_resume_instead_of_passing_over_the_set(tmp_path, tiny_h, monkeypatch):
    """An I/O error (a flaky mount) says nothing about the file: resuming from an older set
    would later write over one that may be whole, so the search stops with one line."""
    folder = str(tmp_path)
    _write_sets(folder, [10, 20], tiny_h)
    flaky = checkpoints.checkpoint_file(folder, "do", 20)
    real_load = torch.load

    def load(path, *args, **kwargs):
        if path == flaky:
            raise OSError(errno.EIO, "Input/output error")
        return real_load(path, *args, **kwargs)
    monkeypatch.setattr(checkpoints.torch, "load", load)
    with pytest.raises(OSError, match=rf"cannot read checkpoint {re.escape(flaky)}: \[Errno 5\] Input/output error"
                                      rf"; the set is not passed over as damaged: run again once it reads, or move it away"):
        checkpoints.load_newest_set(folder, torch.device("cpu"), pytest.fail)


def test_prune_keeps_the_newest_complete_sets(tmp_path, tiny_h):
    folder = str(tmp_path)
    _write_sets(folder, [1, 2, 3, 4], tiny_h)
    os.remove(checkpoints.checkpoint_file(folder, "do", 4))
    checkpoints.prune_checkpoints(folder, 0)
    assert checkpoints.complete_steps(folder) == [1, 2, 3]
    checkpoints.prune_checkpoints(folder, 2)
    assert checkpoints.complete_steps(folder) == [2, 3]
    assert sorted(os.listdir(folder)) == ["decoder_00000002", "decoder_00000003", "decoder_00000004",
                                          "do_00000002", "do_00000003",
                                          "encoder_00000002", "encoder_00000003", "encoder_00000004"]


def test_prune_counts_no_set_a_resume_passed_over(tmp_path, tiny_h):
    """A run resumed from set 4 past unreadable sets 6 and 7 saves 5: keeping one set keeps 5,
    not 7, and sets 6 and 7 stay for the user to look at. With another checkpoint_interval
    it saves 8 instead, beyond them: keeping two keeps 4 and 8, not 7 and 8."""
    folder = str(tmp_path)
    _write_sets(folder, [2, 4, 5, 6, 7], tiny_h)
    checkpoints.prune_checkpoints(folder, 1, passed_over={6, 7})
    assert checkpoints.complete_steps(folder) == [5, 6, 7]
    assert checkpoints.newest_complete_step(folder, up_to=5) == 5
    assert checkpoints.newest_complete_step(folder, up_to=1) is None
    other = str(tmp_path / "other_interval")
    _write_sets(other, [2, 4, 6, 7, 8], tiny_h)
    checkpoints.prune_checkpoints(other, 2, passed_over={6, 7})
    assert checkpoints.complete_steps(other) == [4, 6, 7, 8]


def test_checkpoint_set_bytes_counts_weights_and_adam_moments(full):
    params = sum(p.numel() for name in ("encoder", "decoder", "mpd", "mrd") for p in full[name].parameters())
    assert params == 6893120 + 10232582 + 41105770 + 600198
    assert checkpoints.checkpoint_set_bytes(full["h"]) == 12 * params


def test_only_tensors_and_plain_data_are_unpickled(tmp_path):
    """A pickled object that would run code is refused by name; an earlier version's training
    file, with numpy's random state in it, still loads."""
    class Payload:
        def __reduce__(self):
            return (os.system, ("echo unpickled",))

    torch.save({"encoder": Payload()}, tmp_path / "evil")
    with pytest.raises(ValueError, match=r"evil: it holds \S*system, which could run code"):
        checkpoints.load_checkpoint(str(tmp_path / "evil"), torch.device("cpu"), ["encoder"])
    state = np.random.RandomState(3).get_state()
    torch.save({"steps": 1, "random_states": {"numpy": state, "torch": torch.get_rng_state()}}, tmp_path / "old")
    loaded = checkpoints.load_checkpoint(str(tmp_path / "old"), torch.device("cpu"), ["steps"])
    assert np.array_equal(loaded["random_states"]["numpy"][1], state[1])
    # The same file as numpy 1 writes it (its arrays under numpy.core) loads too.
    with zipfile.ZipFile(tmp_path / "old") as source, zipfile.ZipFile(tmp_path / "numpy1", "w") as copy:
        for item in source.infolist():
            data = source.read(item.filename)
            if item.filename.endswith("data.pkl"):
                data = re.sub(rb"numpy\._?core\.multiarray", b"numpy.core.multiarray", data)
                assert b"numpy.core.multiarray" in data
            copy.writestr(item, data)
    loaded = checkpoints.load_checkpoint(str(tmp_path / "numpy1"), torch.device("cpu"), ["steps"])
    assert np.array_equal(loaded["random_states"]["numpy"][1], state[1])
    (tmp_path / "junk").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read checkpoint .*junk"):
        checkpoints.load_checkpoint(str(tmp_path / "junk"), torch.device("cpu"))
