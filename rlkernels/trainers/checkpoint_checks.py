"""Reading checkpoint files as untrusted input, and checking what they hold.

Files: only regular files inside the checkpoint directory (after resolving symlinks)
are opened, never FIFOs or devices, and each is refused before reading when it is larger
than the caller's limit.  Contents: module weights, optimiser state, RNG states and the
trainer's extra state are checked against the live model and optimisers (keys, shapes,
dtypes, finite values, JSON types and ranges) before anything is changed.  Every problem
raises CheckpointError naming the file.  The checkpoint layout and the save/load entry
points are in checkpoint.py."""
from __future__ import annotations

import json
import math
import os
import random
import stat

import torch


class CheckpointError(ValueError):
    """A checkpoint (or run) file that cannot be loaded; `path` names it.  Raised before
    any module, optimiser, RNG stream or trainer attribute has changed."""

    def __init__(self, path: str, message: str):
        self.path, self.message = path, message
        super().__init__(f"{path}: {message}")


class MissingCheckpointError(CheckpointError, FileNotFoundError):
    """There is no checkpoint where one was asked for."""


# ---------------------------------------------------------------------- reading files safely
def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def read_regular_file(path: str, limit: int, *, root: str | None = None) -> bytes:
    """The bytes of `path`.  Refused (CheckpointError) unless it is a regular file of at
    most `limit` bytes and, when `root` is given, lies inside `root` once symlinks are
    resolved.  Opened non-blocking, so a FIFO is refused instead of waited on."""
    real = os.path.realpath(path)
    if root is not None:
        real_root = os.path.realpath(root)
        if os.path.commonpath([real_root, real]) != real_root:
            raise CheckpointError(path, f"is a link to {real}, outside the checkpoint directory {real_root}; refused")
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(real, flags)
    except FileNotFoundError:
        raise MissingCheckpointError(path, "missing" if real == os.path.abspath(path)
                                     else f"is a link to {real}, which does not exist") from None
    except OSError as exc:
        raise CheckpointError(path, f"cannot be opened ({exc.strerror})") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise CheckpointError(path, f"is {_kind(info.st_mode)}, not a regular file; refused")
        if info.st_size > limit:
            raise CheckpointError(path, f"is {info.st_size} bytes, more than the {limit} this checkpoint can need; "
                                        "refused before reading")
        chunks, total = [], 0
        while total <= limit:
            chunk = os.read(fd, min(1 << 24, limit + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        if total > limit:
            raise CheckpointError(path, f"grew beyond {limit} bytes while being read; refused")
        return b"".join(chunks)
    except OSError as exc:
        raise CheckpointError(path, f"cannot be read ({exc.strerror})") from None
    finally:
        os.close(fd)


def parse_safetensors(data: bytes, path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) from the bytes of a safetensors file; CheckpointError naming
    `path` when they are not one (a pickle, a truncated file, a bad header)."""
    from safetensors.torch import load as load_bytes

    if len(data) < 8:
        raise CheckpointError(path, f"is {len(data)} bytes: too short for a safetensors file (truncated?)")
    size = int.from_bytes(data[:8], "little")
    if size > len(data) - 8:
        raise CheckpointError(path, f"is not a valid safetensors file: its header claims {size} bytes but the file "
                                    f"has {len(data) - 8} after the length (truncated, or not safetensors)")
    try:
        header = json.loads(data[8:8 + size].decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise CheckpointError(path, "is not a valid safetensors file: its header is not JSON") from None
    if not isinstance(header, dict):
        raise CheckpointError(path, "is not a valid safetensors file: its header is not a JSON object")
    metadata = header.get("__metadata__") or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(path, "is not a valid safetensors file: __metadata__ must map names to strings")
    try:
        tensors = load_bytes(data)
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(path, f"is not a valid safetensors file ({reason})") from None
    return tensors, metadata


# ---------------------------------------------------------------------- checking contents
def _check_finite(tensors: dict[str, torch.Tensor], path: str, what: str) -> None:
    for key, value in tensors.items():
        if value.is_floating_point() and value.numel() and not bool(torch.isfinite(value).all()):
            raise CheckpointError(path, f"{what} {key} holds NaN or infinite values")


def check_module_state(module: torch.nn.Module, state: dict[str, torch.Tensor], path: str) -> None:
    """CheckpointError (a ValueError) naming the file and the first differences unless
    `state` has exactly the module's keys, shapes and dtypes and finite values (checked
    before anything is copied, so a bad checkpoint never leaves a module half-loaded)."""
    own = module.state_dict()
    problems = [f"missing {k}" for k in own if k not in state]
    problems += [f"unexpected {k}" for k in state if k not in own]
    problems += [f"{k}: {tuple(state[k].shape)} {state[k].dtype} in the file, {tuple(v.shape)} {v.dtype} in the model"
                 for k, v in own.items() if k in state and (state[k].shape != v.shape or state[k].dtype != v.dtype)]
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise CheckpointError(path, f"does not fit the model: {'; '.join(problems[:5])}{more}")
    _check_finite(state, path, "weight")


def _finite(value) -> bool:
    """A finite int or float (not a bool); False for an int too large for a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


# The optimiser settings a checkpoint may not change (how the optimiser runs, not where it
# is), and the ranges of the numeric ones (torch.optim's own checks, made before loading).
_FIXED_FLAGS = ("amsgrad", "maximize", "capturable", "differentiable", "foreach", "fused",
                "decoupled_weight_decay", "nesterov")
_AT_LEAST_0 = ("lr", "eps", "weight_decay", "momentum", "dampening")
# Per-parameter optimiser entries that are tensors shaped like the parameter, and those of
# them that are second moments (>= 0: a negative one makes Adam's step NaN).
_MOMENTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer")
_SECOND_MOMENTS = ("exp_avg_sq", "max_exp_avg_sq")


def _setting_problem(key: str, saved, own) -> str | None:
    if key in _FIXED_FLAGS and saved != own:
        return f"is {saved!r}; this trainer's optimiser runs with {own!r}"
    if key in _AT_LEAST_0 and _finite(saved) and saved < 0:
        return f"is {saved!r}, below 0"
    if key == "betas" and isinstance(saved, list) and not all(_finite(b) and 0 <= b < 1 for b in saved):
        return f"is {saved!r}; each must be in [0, 1)"
    return None


def _same_kind(saved, current) -> bool:
    """Whether a JSON value can stand where `current` (an optimiser setting) stands."""
    if isinstance(current, bool):
        return isinstance(saved, bool)
    if isinstance(current, (int, float)):
        return _finite(saved)
    if isinstance(current, (tuple, list)):
        return isinstance(saved, list) and len(saved) == len(current) and all(
            _same_kind(s, c) for s, c in zip(saved, current))
    if current is None:
        return saved is None
    return type(saved) is type(current)


def optimizer_state(name: str, optimizer: torch.optim.Optimizer, meta, tensors: dict, json_path: str,
                     tensor_path: str) -> dict:
    """The state dict to load into `optimizer`, built and checked without touching it."""
    where = f"optimizers.{name}"
    if not isinstance(meta, dict) or not isinstance(meta.get("param_groups"), list) \
            or not isinstance(meta.get("state"), dict):
        raise CheckpointError(json_path, f"{where} must hold 'param_groups' (a list) and 'state' (an object)")
    current = optimizer.state_dict()
    if len(meta["param_groups"]) != len(current["param_groups"]):
        raise CheckpointError(json_path, f"{where} has {len(meta['param_groups'])} parameter groups, the optimiser "
                                         f"{len(current['param_groups'])}")
    groups = []
    for i, (saved, own) in enumerate(zip(meta["param_groups"], current["param_groups"])):
        if not isinstance(saved, dict) or set(saved) != set(own):
            raise CheckpointError(json_path, f"{where}.param_groups[{i}] must have the keys {sorted(own)}")
        if saved["params"] != own["params"]:
            raise CheckpointError(json_path, f"{where}.param_groups[{i}].params is {saved['params']!r}, the "
                                             f"optimiser has {own['params']!r}")
        for key, value in own.items():
            if key != "params" and not _same_kind(saved[key], value):
                raise CheckpointError(json_path, f"{where}.param_groups[{i}].{key} is {saved[key]!r:.80}, which "
                                                 f"cannot stand for {value!r}")
            problem = None if key == "params" else _setting_problem(key, saved[key], value)
            if problem:
                raise CheckpointError(json_path, f"{where}.param_groups[{i}].{key} {problem}")
        groups.append({k: tuple(v) if isinstance(own[k], tuple) else v for k, v in saved.items()})
    params = {}
    for group, pids in zip(optimizer.param_groups, (g["params"] for g in current["param_groups"])):
        params.update(zip(pids, group["params"]))
    state = {}
    for pid, entries in meta["state"].items():
        if not pid.isdigit() or int(pid) not in params or not isinstance(entries, dict):
            raise CheckpointError(json_path, f"{where}.state has an entry {pid!r} for no parameter of the optimiser")
        param = params[int(pid)]
        restored = {}
        for key, spec in entries.items():
            if not isinstance(spec, dict) or len(spec) != 1 or not (spec.get("tensor") is True or "value" in spec):
                raise CheckpointError(json_path, f"{where}.state.{pid}.{key} must be {{\"tensor\": true}} or "
                                                 "{\"value\": ...}")
            if "value" in spec:
                # a number kept as JSON (a step counter, a None momentum buffer); the moments
                # are tensors
                value = spec["value"]
                if key == "momentum_buffer" and value is None:
                    restored[key] = None
                    continue
                if key in _MOMENTS or not _finite(value) or value < 0:
                    raise CheckpointError(json_path, f"{where}.state.{pid}.{key} is {value!r:.80}; expected "
                                                     + ("a tensor" if key in _MOMENTS else "a finite number >= 0"))
                restored[key] = value
                continue
            tensor_key = f"optim/{name}/{pid}/{key}"
            if tensor_key not in tensors:
                raise CheckpointError(tensor_path, f"missing the optimiser tensor {tensor_key}")
            value = tensors[tensor_key]
            # a step counter is one float; every other entry (moments, momentum) is shaped like the parameter
            fits = value.is_floating_point() and value.numel() == 1 if key == "step" else (
                value.shape == param.shape and value.dtype == param.dtype)
            if not fits:
                raise CheckpointError(tensor_path, f"{tensor_key} is {tuple(value.shape)} {value.dtype}; the "
                                                   f"parameter is {tuple(param.shape)} {param.dtype}")
            _check_finite({tensor_key: value}, tensor_path, "optimiser tensor")
            if key == "step" and float(value.reshape(-1)[0]) < 0:
                raise CheckpointError(tensor_path, f"{tensor_key} is negative")
            if key in _SECOND_MOMENTS and value.numel() and bool((value < 0).any()):
                raise CheckpointError(tensor_path, f"{tensor_key} holds negative values (a second moment is >= 0)")
            restored[key] = value
        needed = _needed_entries(optimizer, int(pid), groups, current)
        missing = [k for k in needed if k not in restored]
        if restored and missing:
            raise CheckpointError(json_path, f"{where}.state.{pid} lacks {missing[0]!r} (Adam keeps "
                                             f"{', '.join(needed)} for each parameter it has stepped)")
        state[int(pid)] = restored
    return {"state": state, "param_groups": groups}


def _needed_entries(optimizer, pid: int, groups: list, current: dict) -> tuple[str, ...]:
    """The per-parameter entries torch's Adam and AdamW keep once they have stepped a
    parameter (other optimisers: none demanded)."""
    if not isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        return ()
    for group, own in zip(groups, current["param_groups"]):
        if pid in own["params"]:
            return ("step", "exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if group.get("amsgrad") else ())
    return ()


def python_rng_state(value: list, file: str) -> tuple:
    if len(value) != 3 or not isinstance(value[1], list):
        raise CheckpointError(file, "python_rng must be [version, [state words], gauss]")
    version, internal, gauss = value
    if any(isinstance(v, bool) for v in (version, *internal)) or not (gauss is None or (
            isinstance(gauss, float) and math.isfinite(gauss))):
        raise CheckpointError(file, "python_rng holds a value of the wrong type")
    state = (version, tuple(internal), gauss)
    try:
        random.Random().setstate(state)
    except (ValueError, TypeError, OverflowError) as exc:
        raise CheckpointError(file, f"python_rng is not a state of Python's random module ({exc})") from None
    return state


def rng_tensor(tensors: dict, key: str, like: torch.Tensor, file: str) -> torch.Tensor:
    value = tensors.get(key)
    if value is None:
        raise CheckpointError(file, f"missing the RNG state {key}")
    if value.dtype != torch.uint8 or value.shape != like.shape:
        raise CheckpointError(file, f"RNG state {key} is {tuple(value.shape)} {value.dtype}, expected "
                                    f"{tuple(like.shape)} torch.uint8")
    try:
        torch.Generator().set_state(value)
    except RuntimeError as exc:
        raise CheckpointError(file, f"RNG state {key} is not a valid generator state ({str(exc).splitlines()[0]})") from None
    return value


def check_extra(saved_tensors: dict, saved_values: dict, current_tensors: dict, current_values: dict,
                tensor_file: str, json_file: str) -> None:
    """CheckpointError unless the saved extra state has the layout of the trainer's own
    (same tensor names, shapes and dtypes, finite floats; same JSON keys and kinds)."""
    for key, own in current_tensors.items():
        saved = saved_tensors.get(key)
        if saved is None:
            raise CheckpointError(tensor_file, f"missing the trainer tensor extra/{key}")
        if saved.shape != own.shape or saved.dtype != own.dtype:
            raise CheckpointError(tensor_file, f"extra/{key} is {tuple(saved.shape)} {saved.dtype}, the trainer's is "
                                               f"{tuple(own.shape)} {own.dtype}")
    unexpected = sorted(set(saved_tensors) - set(current_tensors))
    if unexpected:
        raise CheckpointError(tensor_file, f"holds trainer tensors this trainer does not have: extra/{unexpected[0]}")
    _check_finite({f"extra/{k}": v for k, v in saved_tensors.items()}, tensor_file, "trainer tensor")
    _check_json_like(saved_values, current_values, json_file, "extra")


def _check_json_like(saved, current, file: str, where: str) -> None:
    if isinstance(current, dict):
        if not isinstance(saved, dict) or set(saved) != set(current):
            raise CheckpointError(file, f"{where} must have the keys {sorted(current)}, got {saved!r:.80}")
        for key in current:
            _check_json_like(saved[key], current[key], file, f"{where}.{key}")
    elif isinstance(current, (list, tuple)):
        if not isinstance(saved, list):
            raise CheckpointError(file, f"{where} must be a list, got {saved!r:.80}")
        for i, item in enumerate(saved):  # the lists trainers keep are of numbers (recent returns)
            if not _finite(item):
                raise CheckpointError(file, f"{where}[{i}] is {item!r:.80}, expected a finite number")
    elif isinstance(current, bool) or current is None or isinstance(current, str):
        if type(saved) is not type(current):
            raise CheckpointError(file, f"{where} is {saved!r:.80}, expected a value like {current!r}")
    elif isinstance(current, int):
        if isinstance(saved, bool) or not isinstance(saved, int) or saved < 0:
            raise CheckpointError(file, f"{where} must be an integer >= 0, got {saved!r:.80}")
    elif isinstance(current, float):
        if not _finite(saved):
            raise CheckpointError(file, f"{where} must be a finite number, got {saved!r:.80}")
