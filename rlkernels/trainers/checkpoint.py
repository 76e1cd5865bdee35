"""Checkpoints as safetensors (no pickle anywhere, so loading one runs no code).

Layout of a checkpoint directory:
  <module>.safetensors        one file per module (state_dict; tied weights stored once)
  trainer_state.safetensors   optimiser tensors, extra trainer tensors, RNG states
  trainer_state.json          step, trainer name, config, optimiser hyper-parameters,
                              Python RNG state, extra JSON values
Writes go to a temporary directory renamed into place, so a crash mid-save leaves the
previous checkpoint intact."""
from __future__ import annotations

import json
import os
import shutil

import torch
from safetensors.torch import load_file, save_file

STATE_JSON = "trainer_state.json"
STATE_TENSORS = "trainer_state.safetensors"
FORMAT = 1


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


def load_module_state(path: str) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    with safe_open(path, framework="pt") as fh:
        aliases = json.loads((fh.metadata() or {}).get("aliases", "{}"))
    tensors = load_file(path)
    for alias, key in aliases.items():
        tensors[alias] = tensors[key]
    return tensors


def check_module_state(module: torch.nn.Module, state: dict[str, torch.Tensor], path: str) -> None:
    """ValueError naming the file and the first differences unless `state` has exactly
    the module's keys, shapes and dtypes (checked before anything is copied, so a bad
    checkpoint never leaves a module half-loaded)."""
    own = module.state_dict()
    problems = [f"missing {k}" for k in own if k not in state]
    problems += [f"unexpected {k}" for k in state if k not in own]
    problems += [f"{k}: {tuple(state[k].shape)} {state[k].dtype} in the file, {tuple(v.shape)} {v.dtype} in the model"
                 for k, v in own.items() if k in state and (state[k].shape != v.shape or state[k].dtype != v.dtype)]
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise ValueError(f"checkpoint {path} does not fit the model: {'; '.join(problems[:5])}{more}")


def load_module(module: torch.nn.Module, path: str) -> None:
    state = load_module_state(path)
    check_module_state(module, state, path)
    module.load_state_dict(state)


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


def _restore_optimizer(name: str, optimizer: torch.optim.Optimizer, meta: dict, tensors: dict) -> None:
    state = {}
    for pid, entries in meta["state"].items():
        state[int(pid)] = {key: tensors[f"optim/{name}/{pid}/{key}"] if spec.get("tensor") else spec["value"]
                           for key, spec in entries.items()}
    groups = []
    for saved, current in zip(meta["param_groups"], optimizer.state_dict()["param_groups"]):
        group = dict(saved)
        for key, value in current.items():  # JSON turned tuples (betas) into lists
            if isinstance(value, tuple) and isinstance(group.get(key), list):
                group[key] = tuple(group[key])
        groups.append(group)
    optimizer.load_state_dict({"state": state, "param_groups": groups})


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


def read_state(path: str) -> dict:
    file = os.path.join(path, STATE_JSON)
    if not os.path.exists(file):
        raise FileNotFoundError(f"no checkpoint at {path} (missing {STATE_JSON}); run without --resume first")
    with open(file, encoding="utf-8") as fh:
        return json.load(fh)


def load(path: str, *, trainer: str, modules: dict, optimizers: dict, generator: torch.Generator | None) -> dict:
    meta = read_state(path)
    if meta.get("trainer") != trainer:
        raise ValueError(f"checkpoint at {path} was written by trainer {meta.get('trainer')!r}, not {trainer!r}")
    if sorted(modules) != meta["modules"]:
        raise ValueError(f"checkpoint at {path} holds modules {meta['modules']}, the trainer has {sorted(modules)}")
    states = {}
    for name, module in modules.items():  # every file checked before any module changes
        file = os.path.join(path, f"{name}.safetensors")
        states[name] = load_module_state(file)
        check_module_state(module, states[name], file)
    tensors = load_file(os.path.join(path, STATE_TENSORS))
    for name, module in modules.items():
        module.load_state_dict(states[name])
    for name, optimizer in optimizers.items():
        _restore_optimizer(name, optimizer, meta["optimizers"][name], tensors)
    torch.set_rng_state(tensors["rng/torch"])
    if generator is not None and "rng/generator" in tensors:
        generator.set_state(tensors["rng/generator"])
    cuda_keys = sorted((k for k in tensors if k.startswith("rng/cuda/")), key=lambda k: int(k.rsplit("/", 1)[1]))
    cuda_states = [tensors[k] for k in cuda_keys]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states)
    version, internal, gauss = meta["python_rng"]
    extra_tensors = {k[len("extra/"):]: v for k, v in tensors.items() if k.startswith("extra/")}
    return {"step": meta["step"], "config": meta["config"], "python_rng": (version, tuple(internal), gauss),
            "extra_tensors": extra_tensors, "extra_values": meta.get("extra", {})}
