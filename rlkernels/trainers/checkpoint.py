"""Checkpoints as safetensors (no pickle anywhere, so loading one runs no code).

Layout of a checkpoint directory:
  <module>.safetensors        one file per module (state_dict; tied weights stored once)
  trainer_state.safetensors   optimiser tensors, extra trainer tensors, RNG states
  trainer_state.json          step, trainer name, config, optimiser hyper-parameters,
                              Python RNG state, extra JSON values
Writes go to a temporary directory renamed into place, so a crash mid-save leaves the
previous checkpoint intact.

Reading treats every file as untrusted: only regular files inside the checkpoint
directory (after resolving symlinks) are opened, never FIFOs or devices, and each is
refused before reading when it is larger than what the model can need.  Everything is
parsed and checked against the model and optimisers (keys, shapes, dtypes, finite
values, the JSON's types and ranges, RNG states) before anything is changed; a problem
raises CheckpointError (a ValueError) naming the file and what is wrong."""
from __future__ import annotations

import json
import math
import os
import random
import shutil
import stat

import torch
from safetensors.torch import save_file

STATE_JSON = "trainer_state.json"
STATE_TENSORS = "trainer_state.safetensors"
FORMAT = 1
MAX_JSON_BYTES = 64 << 20       # trainer_state.json holds a config, RNG words and small values
HEADER_BYTES = 16 << 20         # room for a safetensors header beyond the tensor bytes
STATE_TENSOR_FACTOR = 4         # optimiser moments and extra state: at most this many copies of the weights
MAX_STEPS = 10 ** 9             # more steps than any run of these trainers: a larger count is damage or a typo


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


def _check_finite(tensors: dict[str, torch.Tensor], path: str, what: str) -> None:
    for key, value in tensors.items():
        if value.is_floating_point() and value.numel() and not bool(torch.isfinite(value).all()):
            raise CheckpointError(path, f"{what} {key} holds NaN or infinite values")


def _nbytes(module: torch.nn.Module) -> int:
    return sum(v.numel() * v.element_size() for v in module_tensors(module)[0].values())


# ---------------------------------------------------------------------- modules
def module_tensors(module: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """state_dict with tied tensors stored once: (tensors, {alias: stored_key})."""
    tensors, aliases, seen = {}, {}, {}
    for key, value in module.state_dict().items():
        value = value.detach()
        ident = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape),
                 tuple(value.stride()), value.dtype)
        if value.numel() and ident in seen:
            aliases[key] = seen[ident]
            continue
        seen[ident] = key
        tensors[key] = value.contiguous().cpu()
    return tensors, aliases


def save_module(module: torch.nn.Module, path: str) -> None:
    tensors, aliases = module_tensors(module)
    save_file(tensors, path, metadata={"aliases": json.dumps(aliases)})


def _with_aliases(tensors: dict, metadata: dict, path: str) -> dict[str, torch.Tensor]:
    try:
        aliases = json.loads(metadata.get("aliases", "{}"))
    except ValueError:
        raise CheckpointError(path, "its 'aliases' metadata is not JSON") from None
    if not isinstance(aliases, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in aliases.items()):
        raise CheckpointError(path, "its 'aliases' metadata must map tensor names to tensor names")
    for alias, key in aliases.items():
        if key not in tensors or alias in tensors:
            raise CheckpointError(path, f"alias {alias} -> {key} does not name one stored tensor")
        tensors[alias] = tensors[key]
    return tensors


def load_module_state(path: str, *, limit: int | None = None, root: str | None = None) -> dict[str, torch.Tensor]:
    data = read_regular_file(path, (1 << 62) if limit is None else limit, root=root)
    tensors, metadata = parse_safetensors(data, path)
    return _with_aliases(tensors, metadata, path)


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


def load_module(module: torch.nn.Module, path: str) -> None:
    state = load_module_state(path, limit=_nbytes(module) + HEADER_BYTES, root=os.path.dirname(os.path.abspath(path)))
    check_module_state(module, state, path)
    module.load_state_dict(state)


# ---------------------------------------------------------------------- optimisers
def _split_optimizer(name: str, optimizer: torch.optim.Optimizer, tensors: dict) -> dict:
    state = optimizer.state_dict()
    meta = {"param_groups": state["param_groups"], "state": {}}
    for pid, entries in state["state"].items():
        kept = {}
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim/{name}/{pid}/{key}"] = value.detach().contiguous().cpu()
                kept[key] = {"tensor": True}
            else:
                kept[key] = {"value": value}
        meta["state"][str(pid)] = kept
    return meta


def _same_kind(saved, current) -> bool:
    """Whether a JSON value can stand where `current` (an optimiser setting) stands."""
    if isinstance(current, bool):
        return isinstance(saved, bool)
    if isinstance(current, (int, float)):
        return isinstance(saved, (int, float)) and not isinstance(saved, bool) and math.isfinite(saved)
    if isinstance(current, (tuple, list)):
        return isinstance(saved, list) and len(saved) == len(current) and all(
            _same_kind(s, c) for s, c in zip(saved, current))
    if current is None:
        return saved is None
    return type(saved) is type(current)


def _optimizer_state(name: str, optimizer: torch.optim.Optimizer, meta, tensors: dict, json_path: str,
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
                raise CheckpointError(json_path, f"{where}.param_groups[{i}].{key} is {saved[key]!r}, which cannot "
                                                 f"stand for {value!r}")
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
                restored[key] = spec["value"]
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
            restored[key] = value
        state[int(pid)] = restored
    return {"state": state, "param_groups": groups}


# ---------------------------------------------------------------------- whole checkpoints
def save(path: str, *, trainer: str, step: int, config: dict, modules: dict, optimizers: dict,
         extra_tensors: dict, extra_values: dict, python_rng, generator: torch.Generator | None) -> None:
    tmp = path.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    for name, module in modules.items():
        save_module(module, os.path.join(tmp, f"{name}.safetensors"))
    tensors: dict[str, torch.Tensor] = {"rng/torch": torch.get_rng_state()}
    if generator is not None:
        tensors["rng/generator"] = generator.get_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, rng_state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng/cuda/{i}"] = rng_state
    optim_meta = {name: _split_optimizer(name, opt, tensors) for name, opt in optimizers.items()}
    for key, value in extra_tensors.items():
        tensors[f"extra/{key}"] = value.detach().contiguous().cpu()
    save_file(tensors, os.path.join(tmp, STATE_TENSORS))
    meta = {"format": FORMAT, "trainer": trainer, "step": step, "config": config, "optimizers": optim_meta,
            "python_rng": [python_rng[0], list(python_rng[1]), python_rng[2]], "extra": extra_values,
            "modules": sorted(modules)}
    with open(os.path.join(tmp, STATE_JSON), "w", encoding="utf-8") as fh:
        json.dump(meta, fh)
    old = path.rstrip("/") + ".old"
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(path):
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def read_state(path: str, *, trainer: str | None = None) -> dict:
    """trainer_state.json of the checkpoint in directory `path`, with its types checked
    (and, given `trainer`, that this trainer wrote it)."""
    if not os.path.isdir(path):
        raise MissingCheckpointError(path, f"no checkpoint here (not a directory holding {STATE_JSON}); "
                                           "run without --resume first")
    file = os.path.join(path, STATE_JSON)
    if not os.path.lexists(file):
        raise MissingCheckpointError(file, "no checkpoint here (the file is missing); run without --resume first")
    data = read_regular_file(file, MAX_JSON_BYTES, root=path)
    try:
        meta = json.loads(data.decode("utf-8"), parse_constant=_reject_constant)
    except UnicodeDecodeError:
        raise CheckpointError(file, "is not UTF-8 text") from None
    except (ValueError, RecursionError) as exc:
        raise CheckpointError(file, f"is not valid JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(file, "must hold a JSON object")
    if meta.get("format") != FORMAT:
        raise CheckpointError(file, f"has format {meta.get('format')!r}; this version of rlkernels reads {FORMAT}")
    if not isinstance(meta.get("trainer"), str):
        raise CheckpointError(file, f"trainer must be a string, got {meta.get('trainer')!r}")
    if trainer is not None and meta["trainer"] != trainer:
        raise CheckpointError(file, f"was written by trainer {meta['trainer']!r}, not {trainer!r}")
    step = meta.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step <= MAX_STEPS:
        raise CheckpointError(file, f"step must be an integer from 0 to {MAX_STEPS}, got {step!r:.80}")
    for key, kind in (("config", dict), ("optimizers", dict), ("extra", dict), ("modules", list),
                      ("python_rng", list)):
        if not isinstance(meta.get(key), kind):
            raise CheckpointError(file, f"{key} must be a JSON {'object' if kind is dict else 'array'}, "
                                        f"got {meta.get(key)!r:.80}")
    if not all(isinstance(m, str) for m in meta["modules"]):
        raise CheckpointError(file, "modules must be a list of names")
    meta["python_rng"] = _python_rng(meta["python_rng"], file)
    return meta


def _python_rng(value: list, file: str) -> tuple:
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


def _rng_tensor(tensors: dict, key: str, like: torch.Tensor, file: str) -> torch.Tensor:
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


class LoadedCheckpoint:
    """A checkpoint read and checked in full; `apply()` copies it into the modules,
    optimisers and RNG streams (it cannot fail on the checked data)."""

    def __init__(self, path, meta, states, optimizer_states, tensors, modules, optimizers, generator):
        self.path, self.meta = path, meta
        self._states, self._optimizer_states, self._tensors = states, optimizer_states, tensors
        self._modules, self._optimizers, self._generator = modules, optimizers, generator
        self.step = meta["step"]
        self.config = meta["config"]
        self.python_rng = meta["python_rng"]
        self.extra_tensors = {k[len("extra/"):]: v for k, v in tensors.items() if k.startswith("extra/")}
        self.extra_values = meta["extra"]
        self.json_file = os.path.join(path, STATE_JSON)
        self.tensor_file = os.path.join(path, STATE_TENSORS)
        self.metrics = None  # the trainer's checked metrics log, when it resumes into an output directory

    def apply(self) -> dict:
        for name, module in self._modules.items():
            module.load_state_dict(self._states[name])
        for name, optimizer in self._optimizers.items():
            optimizer.load_state_dict(self._optimizer_states[name])
        torch.set_rng_state(self._tensors["rng/torch"])
        if self._generator is not None and "rng/generator" in self._tensors:
            self._generator.set_state(self._tensors["rng/generator"])
        cuda_keys = sorted((k for k in self._tensors if k.startswith("rng/cuda/")), key=lambda k: int(k.rsplit("/", 1)[1]))
        if cuda_keys and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([self._tensors[k] for k in cuda_keys][:torch.cuda.device_count()])
        return {"step": self.step, "config": self.config, "python_rng": self.python_rng,
                "extra_tensors": self.extra_tensors, "extra_values": self.extra_values}


def read(path: str, *, trainer: str, modules: dict, optimizers: dict,
         generator: torch.Generator | None) -> LoadedCheckpoint:
    """Reads and checks the checkpoint in directory `path` against the trainer's modules
    and optimisers; changes nothing (see LoadedCheckpoint.apply)."""
    meta = read_state(path, trainer=trainer)
    json_file, tensor_file = os.path.join(path, STATE_JSON), os.path.join(path, STATE_TENSORS)
    if sorted(modules) != sorted(meta["modules"]):
        raise CheckpointError(json_file, f"holds modules {meta['modules']}, the trainer has {sorted(modules)}")
    if sorted(optimizers) != sorted(meta["optimizers"]):
        raise CheckpointError(json_file, f"holds optimisers {sorted(meta['optimizers'])}, the trainer has "
                                         f"{sorted(optimizers)}")
    states = {}
    for name, module in modules.items():
        file = os.path.join(path, f"{name}.safetensors")
        states[name] = load_module_state(file, limit=_nbytes(module) + HEADER_BYTES, root=path)
        check_module_state(module, states[name], file)
    weights = sum(_nbytes(m) for m in modules.values())
    tensors, _ = parse_safetensors(
        read_regular_file(tensor_file, STATE_TENSOR_FACTOR * weights + HEADER_BYTES, root=path), tensor_file)
    optimizer_states = {name: _optimizer_state(name, opt, meta["optimizers"][name], tensors, json_file, tensor_file)
                        for name, opt in optimizers.items()}
    _rng_tensor(tensors, "rng/torch", torch.get_rng_state(), tensor_file)
    if generator is not None:
        _rng_tensor(tensors, "rng/generator", generator.get_state(), tensor_file)
    for key in (k for k in tensors if k.startswith("rng/cuda/")):
        if not key[len("rng/cuda/"):].isdigit() or tensors[key].dtype != torch.uint8 or tensors[key].dim() != 1:
            raise CheckpointError(tensor_file, f"{key} is not a CUDA RNG state")
    used = {f"optim/{name}/{pid}/{key}" for name, state in optimizer_states.items()
            for pid, entries in state["state"].items() for key, value in entries.items()
            if isinstance(value, torch.Tensor)}
    unexpected = sorted(k for k in tensors if k not in used and k not in ("rng/torch", "rng/generator")
                        and not k.startswith(("rng/cuda/", "extra/")))
    if unexpected:
        raise CheckpointError(tensor_file, f"holds a tensor no part of the trainer reads: {unexpected[0]}")
    return LoadedCheckpoint(path, meta, states, optimizer_states, tensors, modules, optimizers, generator)


def load(path: str, *, trainer: str, modules: dict, optimizers: dict, generator: torch.Generator | None) -> dict:
    """read() then apply(): all of the checkpoint or (CheckpointError) none of it."""
    return read(path, trainer=trainer, modules=modules, optimizers=optimizers, generator=generator).apply()


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
            if isinstance(item, bool) or not isinstance(item, (int, float)) or not math.isfinite(item):
                raise CheckpointError(file, f"{where}[{i}] is {item!r:.80}, expected a finite number")
    elif isinstance(current, bool) or current is None or isinstance(current, str):
        if type(saved) is not type(current):
            raise CheckpointError(file, f"{where} is {saved!r:.80}, expected a value like {current!r}")
    elif isinstance(current, int):
        if isinstance(saved, bool) or not isinstance(saved, int) or saved < 0:
            raise CheckpointError(file, f"{where} must be an integer >= 0, got {saved!r:.80}")
    elif isinstance(current, float):
        if isinstance(saved, bool) or not isinstance(saved, (int, float)) or not math.isfinite(saved):
            raise CheckpointError(file, f"{where} must be a finite number, got {saved!r:.80}")
