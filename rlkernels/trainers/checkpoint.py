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
raises CheckpointError (a ValueError) naming the file and what is wrong.  The reading
and the checks live in checkpoint_checks.py; this module writes and loads."""
from __future__ import annotations

import json
import os
import shutil

import torch
from safetensors.torch import save_file

from .checkpoint_checks import (  # noqa: F401  (CheckpointError ... check_extra: also this module's API)
    CheckpointError, MissingCheckpointError, check_extra, check_module_state, optimizer_state, parse_safetensors,
    python_rng_state, read_regular_file, rng_tensor)

STATE_JSON = "trainer_state.json"
STATE_TENSORS = "trainer_state.safetensors"
FORMAT = 1
MAX_JSON_BYTES = 64 << 20       # trainer_state.json holds a config, RNG words and small values
HEADER_BYTES = 16 << 20         # room for a safetensors header beyond the tensor bytes
STATE_TENSOR_FACTOR = 4         # optimiser moments and extra state: at most this many copies of the weights
MAX_STEPS = 10 ** 9             # more steps than any run of these trainers: a larger count is damage or a typo


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


# ---------------------------------------------------------------------- whole checkpoints
def save(path: str, *, trainer: str, step: int, config: dict, modules: dict, optimizers: dict,
         extra_tensors: dict, extra_values: dict, python_rng, generator: torch.Generator | None) -> None:
    tmp = path.rstrip("/") + ".tmp"
    _remove(tmp)
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
    _remove(old)
    if os.path.exists(path):
        os.replace(path, old)
    os.replace(tmp, path)
    _remove(old)


def _remove(path: str) -> None:
    """Removes what stands at `path` (a save's own scratch name): a folder, or a file or
    link left there (which made os.makedirs / os.replace fail after a whole run)."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.remove(path)


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def read_state(path: str, *, trainer: str | None = None) -> dict:
    """trainer_state.json of the checkpoint in directory `path`, with its types checked
    (and, given `trainer`, that this trainer wrote it)."""
    if not os.path.isdir(path):
        old = path.rstrip("/") + ".old"
        if os.path.isdir(old) and os.path.isfile(os.path.join(old, STATE_JSON)):
            # a save stopped between its two renames: the previous checkpoint is whole there
            raise MissingCheckpointError(path, f"no checkpoint here, but {old} holds the previous one (a save was "
                                               f"interrupted): rename it to {os.path.basename(path.rstrip('/'))} "
                                               "to resume from it")
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
    meta["python_rng"] = python_rng_state(meta["python_rng"], file)
    return meta


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
    optimizer_states = {name: optimizer_state(name, opt, meta["optimizers"][name], tensors, json_file, tensor_file)
                        for name, opt in optimizers.items()}
    rng_tensor(tensors, "rng/torch", torch.get_rng_state(), tensor_file)
    if generator is not None:
        rng_tensor(tensors, "rng/generator", generator.get_state(), tensor_file)
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


