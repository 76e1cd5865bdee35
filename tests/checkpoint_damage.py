"""The damage tests/test_checkpoint_faults.py does to a saved run: every way of breaking
any file (ANY_FILE), the tensors of the safetensors files (TENSOR_EDITS) and the
fields of trainer_state.json (JSON_EDITS); cases() lists (file kind, damage) pairs and
damaged_copy() applies one to a copy of the run folder."""
from __future__ import annotations

import json
import os
import pickle
import random
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from rlkernels.trainers.checkpoint import STATE_JSON, STATE_TENSORS


def _write(path, data: bytes):
    with open(path, "wb") as fh:
        fh.write(data)


def _read(path) -> bytes:
    with open(path, "rb") as fh:
        return fh.read()


def _link_outside(path):
    outside = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(path))), "outside-" + os.path.basename(path))
    shutil.copyfile(path, outside)  # a perfectly good file, but not in the checkpoint folder
    os.remove(path)
    os.symlink(outside, path)


def _replace(path, make):
    os.remove(path)
    make(path)


# Damage that applies to any file: (name, function of the file's path).
ANY_FILE = {
    "pickle": lambda p: _write(p, pickle.dumps({"weight": [1.0, 2.0]})),
    "truncated_half": lambda p: _write(p, _read(p)[:_mid_line_cut(_read(p))]),
    "truncated_end": lambda p: _write(p, _read(p)[:-3]),
    "empty": lambda p: _write(p, b""),
    "header_length_2_40": lambda p: _write(p, (2 ** 40).to_bytes(8, "little") + _read(p)[8:]),
    "random_bytes": lambda p: _write(p, bytes(random.Random(0).randrange(256) for _ in range(4096))),
    "link_outside": _link_outside,
    "link_dev_zero": lambda p: _replace(p, lambda q: os.symlink("/dev/zero", q)),
    "link_dangling": lambda p: _replace(p, lambda q: os.symlink(q + ".nowhere", q)),
    "fifo": lambda p: _replace(p, os.mkfifo),
    "directory": lambda p: _replace(p, os.mkdir),
    "missing": os.remove,
    "oversize": lambda p: os.truncate(p, os.path.getsize(p) + (3 << 30)),  # sparse: nothing is written
}
# A missing or empty metrics log only means no steps were logged: not damage.
def _mid_line_cut(data: bytes) -> int:
    """About half of the file, ending inside a line: a cut just after a newline would
    leave a shorter but well-formed line-based file (metrics.jsonl), whose lengths vary
    with the logged step times."""
    cut = len(data) // 2 + 1
    while cut < len(data) and data[cut - 1:cut] == b"\n":
        cut += 1
    return cut


NOT_DAMAGE = {("metrics.jsonl", "missing"), ("metrics.jsonl", "empty")}


def edit_tensors(path, edit):
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


def _first(tensors, prefix, floating=True):
    keys = sorted(k for k, v in tensors.items() if k.startswith(prefix) and (v.is_floating_point() or not floating))
    if not keys:
        pytest.skip(f"no tensor {prefix}* in this checkpoint")
    return keys[0]


def _reshape(tensors, prefix):
    key = _first(tensors, prefix, floating=False)
    value = tensors[key]
    tensors[key] = torch.zeros((value.shape[0] + 1,) + tuple(value.shape[1:]) if value.dim() else (2,),
                               dtype=value.dtype)


def _redtype(tensors, prefix):
    key = _first(tensors, prefix, floating=False)
    tensors[key] = tensors[key].to(torch.float64 if tensors[key].dtype != torch.float64 else torch.float32)


def _zero_dim(tensors, prefix):
    key = _first(tensors, prefix, floating=False)
    tensors[key] = torch.tensor(1, dtype=tensors[key].dtype)


def _nan(tensors, prefix):
    key = _first(tensors, prefix)
    value = tensors[key].clone()
    value.view(-1)[0] = float("nan")
    tensors[key] = value


def _drop(tensors, prefix):
    del tensors[_first(tensors, prefix, floating=False)]


TENSOR_EDITS = {"wrong_shape": _reshape, "wrong_dtype": _redtype, "zero_dim": _zero_dim, "nan": _nan,
                "missing_key": _drop}
# Which tensors of trainer_state.safetensors to damage (module files: every edit on their first tensor).
STATE_PREFIXES = ["optim/", "rng/torch", "rng/generator", "extra/"]


def _edit_json(path, edit):
    with open(path) as fh:
        meta = json.load(fh)
    result = edit(meta)
    with open(path, "w") as fh:
        json.dump(meta if result is None else result, fh)


def _set(*keys_and_value):
    *keys, value = keys_and_value

    def edit(meta):
        node = meta
        for key in keys[:-1]:
            node = node[key]
        node[keys[-1]] = value
    return edit


def _group(key, value):
    return lambda meta: meta["optimizers"]["optimizer"]["param_groups"][0].__setitem__(key, value)


def _python_rng_index(value):
    def edit(meta):
        meta["python_rng"][1][-1] = value
    return edit


def _optimizer_entry(edit_entry):
    def edit(meta):
        state = meta["optimizers"]["optimizer"]["state"]
        edit_entry(state, next(iter(state)))
    return edit


JSON_EDITS = {
    "step_abc": _set("step", "abc"),
    "step_negative": _set("step", -5),
    "step_fraction": _set("step", 2.5),
    "step_null": _set("step", None),
    "step_bool": _set("step", True),
    "step_huge": _set("step", 10 ** 30),
    "trainer_mismatch": _set("trainer", "grpo"),
    "format_unknown": _set("format", 99),
    "modules_wrong": _set("modules", ["brain"]),
    "optimizers_missing": _set("optimizers", {}),
    "config_not_object": _set("config", [1, 2]),
    "extra_not_object": _set("extra", "none"),
    "lr_string": _group("lr", "fast"),
    "lr_nan": _group("lr", float("nan")),
    "betas_short": _group("betas", [0.9]),
    "group_params_wrong": _group("params", [999]),
    "group_key_missing": lambda meta: meta["optimizers"]["optimizer"]["param_groups"][0].pop("eps"),
    "optimizer_state_for_no_param": _optimizer_entry(lambda state, pid: state.__setitem__("999", state[pid])),
    "optimizer_state_spec_bad": _optimizer_entry(lambda state, pid: state[pid].__setitem__("exp_avg", {"tensor": 1})),
    "optimizer_state_value_string": _optimizer_entry(
        lambda state, pid: state[pid].__setitem__("exp_avg", {"value": "abc"})),
    "optimizer_state_value_number": _optimizer_entry(
        lambda state, pid: state[pid].__setitem__("exp_avg", {"value": 1e30})),
    "optimizer_state_step_string": _optimizer_entry(
        lambda state, pid: state[pid].__setitem__("step", {"value": "abc"})),
    "optimizer_state_step_negative": _optimizer_entry(
        lambda state, pid: state[pid].__setitem__("step", {"value": -3})),
    "capturable_true": _group("capturable", True),
    "amsgrad_true": _group("amsgrad", True),
    "maximize_true": _group("maximize", True),
    "betas_out_of_range": _group("betas", [5.0, -3.0]),
    "eps_negative": _group("eps", -1.0),
    "lr_negative": _group("lr", -1.0),
    "lr_huge_int": _group("lr", 10 ** 400),
    "python_rng_short": _set("python_rng", [3, [1, 2, 3], None]),
    "python_rng_index": _python_rng_index(10 ** 6),
    "python_rng_negative": _python_rng_index(-1),
    "python_rng_gauss": lambda meta: meta["python_rng"].__setitem__(2, "x"),
    "python_rng_not_list": _set("python_rng", {"a": 1}),
    "top_level_list": lambda meta: [meta],
    "nan_constant": None,  # raw bytes below
    "utf16": None,
}


def _damage_json_raw(path, kind):
    text = _read(path).decode()
    if kind == "nan_constant":
        _write(path, text.replace('"step": ', '"step": NaN, "was": ', 1).encode())
    else:
        _write(path, text.encode("utf-16"))


def cases():
    """(file kind, damage) for every file kind the trainers write."""
    kinds = ["module", "state_tensors", "state_json", "metrics"]
    out = [(kind, f"any:{name}") for kind in kinds for name in ANY_FILE]
    out += [("module", f"tensor:{name}") for name in TENSOR_EDITS]
    out += [("module", "tensor:extra_key")]
    out += [("state_tensors", f"tensor:{name}@{prefix}") for prefix in STATE_PREFIXES for name in TENSOR_EDITS
            if not (name == "nan" and prefix.startswith("rng/"))]  # RNG states hold bytes: no NaN
    out += [("state_tensors", "tensor:extra_key")]
    out += [("state_json", f"json:{name}") for name in JSON_EDITS]
    out += [("metrics", "metrics:garbage_line"), ("metrics", "metrics:no_step"), ("metrics", "metrics:step_string")]
    return out


def target_files(run, kind: str) -> list[str]:
    files = run.files()
    if kind == "module":
        return [f for f in files if f.endswith(".safetensors") and not f.endswith(STATE_TENSORS)]
    return [{"state_tensors": os.path.join("checkpoint", STATE_TENSORS),
             "state_json": os.path.join("checkpoint", STATE_JSON), "metrics": "metrics.jsonl"}[kind]]


def damage(path: str, how: str, run) -> None:
    family, _, name = how.partition(":")
    if family == "any":
        ANY_FILE[name](path)
    elif family == "tensor":
        name, _, prefix = name.partition("@")
        if name == "extra_key":
            edit_tensors(path, lambda t: t.__setitem__("bogus/weight", torch.zeros(2)))
        else:
            edit_tensors(path, lambda t: TENSOR_EDITS[name](t, prefix))
    elif family == "json":
        if JSON_EDITS[name] is None:
            _damage_json_raw(path, name)
        else:
            _edit_json(path, JSON_EDITS[name])
    else:
        lines = _read(path).decode().splitlines()
        bad = {"garbage_line": "{not json", "no_step": '{"reward": 1.0}', "step_string": '{"step": "2"}'}[name]
        _write(path, "\n".join(lines[:1] + [bad] + lines[1:]).encode() + b"\n")


def damaged_copy(run, rel: str, how: str, tmp_path) -> str:
    folder = str(tmp_path / "run")
    shutil.copytree(run.folder, folder, symlinks=True)
    damage(os.path.join(folder, rel), how, run)
    return folder
