"""What SECURITY.md promises about untrusted files: checkpoints and models load from
safetensors only (a pickle next to them is never opened), config files are parsed as
data (YAML's object tags are refused), and a tampered checkpoint fails with an error."""
from __future__ import annotations

import os
import pickle

import pytest
import torch

from rlkernels.trainers import checkpoint as ckpt
from rlkernels.trainers.config import ConfigFileError, read_file
from rlkernels.trainers.lm import ModelConfig, build_lm
from rlkernels.trainers import toy

MARKER = "rlkernels-security-marker"


class _Bomb:
    """Unpickling this writes a marker file: proof that a pickle was executed."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _plant_pickle(directory: str, name: str, marker: str) -> None:
    with open(os.path.join(directory, name), "wb") as fh:
        pickle.dump(_Bomb(marker), fh)


def _toy_dir(tmp_path, safe: bool):
    """A local transformers checkpoint: model.safetensors, or (safe=False) the same
    weights only as a pickled pytorch_model.bin."""
    model = toy.build_model(toy.model_config(n_layer=1, n_embd=16, n_head=2, n_positions=16), seed=0)
    tokenizer = toy.build_tokenizer()
    out = tmp_path / ("safe" if safe else "pickled")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    if not safe:
        torch.save(model.state_dict(), out / "pytorch_model.bin")
        for name in os.listdir(out):
            if name.endswith(".safetensors") or name.endswith(".safetensors.index.json"):
                os.remove(out / name)
    return model, str(out)


def test_local_model_loads_from_safetensors(tmp_path):
    model, path = _toy_dir(tmp_path, safe=True)
    marker = str(tmp_path / MARKER)
    _plant_pickle(path, "training_args.bin", marker)
    loaded, tokenizer = build_lm(ModelConfig(name_or_path=path))
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    assert tokenizer.pad_token is not None
    assert not os.path.exists(marker)


def test_local_model_in_pickle_format_is_refused(tmp_path):
    _, path = _toy_dir(tmp_path, safe=False)
    assert any(f.endswith(".bin") for f in os.listdir(path))
    with pytest.raises(OSError, match="safetensors"):
        build_lm(ModelConfig(name_or_path=path))


def _module():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))


def test_checkpoint_round_trip_never_unpickles(tmp_path):
    module = _module()
    path = str(tmp_path / "m.safetensors")
    ckpt.save_module(module, path)
    marker = str(tmp_path / MARKER)
    _plant_pickle(str(tmp_path), "m.pt", marker)
    _plant_pickle(str(tmp_path), "optimizer.pt", marker)
    other = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    ckpt.load_module(other, path)
    for a, b in zip(module.parameters(), other.parameters()):
        assert torch.equal(a, b)
    assert not os.path.exists(marker)


def test_checkpoint_with_a_pickle_inside_is_rejected(tmp_path):
    """A .safetensors file that is really a pickle is refused by the parser."""
    path = str(tmp_path / "m.safetensors")
    marker = str(tmp_path / MARKER)
    _plant_pickle(str(tmp_path), "m.safetensors", marker)
    with pytest.raises(Exception):
        ckpt.load_module(_module(), path)
    assert not os.path.exists(marker)


def test_checkpoint_with_wrong_shapes_is_rejected(tmp_path):
    path = str(tmp_path / "m.safetensors")
    ckpt.save_module(torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Linear(5, 2)), path)
    module = _module()
    before = [p.detach().clone() for p in module.parameters()]
    with pytest.raises(ValueError, match=r"does not fit the model: 0.weight: \(5, 4\)"):
        ckpt.load_module(module, path)
    for a, b in zip(before, module.parameters()):
        assert torch.equal(a, b)


def test_yaml_config_object_tags_are_refused(tmp_path):
    pytest.importorskip("yaml")
    marker = tmp_path / MARKER
    path = tmp_path / "c.yaml"
    path.write_text(f"steps: !!python/object/apply:builtins.open ['{marker}', 'w']\n")
    with pytest.raises(ConfigFileError, match="c.yaml: is not valid YAML .*python/object"):
        read_file(str(path))
    assert not marker.exists()
