"""Conformance: every public op has its whole stack, and its backends agree on bad input.

For each kernel op (a schema of csrc/registration.cpp) the stack is: a C++ CPU kernel,
a CUDA implementation in csrc/cuda, a Triton twin `<op>_triton` with the same schema,
a fake kernel for both, and an opcheck sample for both in tests/.  For each public
function (rlkernels.ops.__all__): a reference function, a benchmark case, a doc
entry, and the same error, naming the bad argument, from every backend.

Compositions (linear_logprobs and linear_ppo_loss, C++ ops over ATen ops and the kernel
ops of every backend, csrc/lm_head/) own ops over kernel ops.  They have no CUDA or Triton
kernel of their own (the kernel ops they call carry those and are checked as kernel ops);
their own ops need a fake kernel and an opcheck sample, and their reference is that of
the parts."""
from __future__ import annotations

import ast
import functools
import glob
import os
import pathlib
import re

import pytest
import torch
from torch._library.simple_registry import singleton as fake_registry
from torch.utils._python_dispatch import TorchDispatchMode

import rlkernels
from rlkernels import reference
from rlkernels.ops import _registry

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NS = "rlkernels"
TRITON_ON_CPU = rlkernels.HAS_TRITON and rlkernels._library.triton_interpreting()

# Public function -> the kernel ops it runs (the first is its forward).
KERNEL_OPS = {
    "gae": ("gae",),
    "discounted_returns": ("discounted_returns",),
    "group_advantages": ("group_advantages",),
    "masked_mean": ("masked_row_mean",),
    "masked_whiten": ("masked_whiten",),
    "logprobs": ("logprobs", "logprobs_backward", "logprobs_backward_inplace"),
    "kl_from_logits": ("kl_from_logits", "kl_from_logits_backward", "kl_vocab_tile"),
    "kl_penalty": ("kl_penalty",),
    "ppo_loss": ("policy_loss", "scale_rows"),
    "grpo_loss": ("policy_loss", "scale_rows"),
    "value_loss": ("value_loss", "scale_rows"),
    "dpo_loss": ("dpo_loss",),
    "sequence_logprobs": ("sequence_logprobs", "sequence_logprobs_backward"),
    "dpo_sequence_loss": ("dpo_sequence_loss", "dpo_sequence_loss_backward"),
    "pack_tensors": ("pack_tensors",),
    "unpack_tensors": ("unpack_tensors",),
    "gossip_mix": ("gossip_mix",),
}

# Python compositions: their own ops, the kernel ops those call, and their reference parts.
COMPOSITIONS = {
    "linear_logprobs": dict(ops=("linear_logprobs", "linear_logprobs_backward"),
                            kernels=("logprobs_vocab_tile", "logprobs_backward_inplace"),
                            reference=("linear_logprobs",)),
    "linear_ppo_loss": dict(ops=("linear_policy_loss",),
                            kernels=("logprobs", "logprobs_backward_inplace", "policy_loss", "scale_rows"),
                            reference=("linear_logprobs", "ppo_loss")),
}

# Ops measured inside a benchmark of the function built on them, or as an implementation of
# the case of the composition they fuse (benchmark case name).
BENCHMARKED_THROUGH = {"pack_tensors": "ring_all_reduce", "unpack_tensors": "ring_all_reduce",
                       "gossip_mix": "gossip_consensus", "dpo_sequence_loss": "dpo_loss"}

# Known gaps: (public op, check) -> why.  The test fails once a gap is closed, so that
# the entry goes too.
KNOWN_GAPS = {
}

KERNEL_NAMES = sorted({name for names in KERNEL_OPS.values() for name in names}
                      | {name for spec in COMPOSITIONS.values() for name in spec["kernels"]})
COMPOSITION_OPS = sorted(name for spec in COMPOSITIONS.values() for name in spec["ops"])
PUBLIC = sorted(rlkernels.ops.__all__)


def _qualified(name: str) -> str:
    return f"{NS}::{name}"


def _read(pattern: str) -> dict[str, str]:
    paths = sorted(glob.glob(os.path.join(ROOT, pattern), recursive=True))
    return {path: pathlib.Path(path).read_text(encoding="utf-8") for path in paths}


def _variants(name: str) -> list[str]:
    """A kernel op and its Triton twin (where triton is importable); a composition op alone."""
    if name in COMPOSITION_OPS or not rlkernels.HAS_TRITON:
        return [name]
    return [name, _registry.twin_name(name)]


needs_triton = pytest.mark.skipif(not rlkernels.HAS_TRITON, reason="triton is not importable: no Triton twins")


def registered_ops() -> set[str]:
    return {n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith(NS + "::")}


def _gap(op: str, check: str, missing: bool) -> None:
    """Asserts `missing` is False unless (op, check) is a known gap, which must still be one."""
    if (op, check) in KNOWN_GAPS:
        assert missing, f"{op}: the {check} gap is closed; remove it from KNOWN_GAPS"
        pytest.xfail(KNOWN_GAPS[(op, check)])
    assert not missing


# ---- which ops the tests opcheck -----------------------------------------------------------------

def _strings(node: ast.AST) -> set[str]:
    return {n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str)}


def _op_attributes(node: ast.AST) -> set[str]:
    """NAME in every torch.ops.rlkernels.NAME under `node`."""
    found = set()
    for n in ast.walk(node):
        if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Attribute) and n.value.attr == NS:
            found.add(n.attr)
    return found


def _stored_ops(fn: ast.FunctionDef) -> set[str]:
    """Ops a test function puts into variables: assignments, loops, list.append/extend."""
    found: set[str] = set()
    for node in ast.walk(fn):
        if isinstance(node, (ast.Assign, ast.AugAssign)):
            found |= _op_attributes(node.value)
        elif isinstance(node, ast.For):
            found |= _op_attributes(node.iter)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr in ("append", "extend")):
            for arg in node.args:
                found |= _op_attributes(arg)
    return found


def opchecked_ops(sources: dict[str, str] | None = None) -> set[str]:
    """The ops that tests/ passes to opcheck: torch.ops.rlkernels.NAME written in the
    opcheck call, else the ops the test function stores in variables, or op names in
    strings of the call and of the module-level tables it reads (a "_triton" string
    there names the twins of those)."""
    sources = _read("tests/test_*.py") if sources is None else sources
    known = registered_ops()
    found: set[str] = set()
    for text in sources.values():
        tree = ast.parse(text)
        tables = {t.id: node.value for node in tree.body if isinstance(node, ast.Assign)
                  for t in node.targets if isinstance(t, ast.Name)}
        for fn in ast.walk(tree):
            if not isinstance(fn, ast.FunctionDef):
                continue
            for call in ast.walk(fn):
                if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute)
                        and call.func.attr == "opcheck" and call.args):
                    continue
                target = call.args[0]
                direct = _op_attributes(target)
                if direct:
                    found |= direct
                    continue
                strings = _strings(target)
                for n in ast.walk(target):
                    if isinstance(n, ast.Name) and n.id in tables:
                        strings |= _strings(tables[n.id])
                named = {s for s in strings if s in known}
                if "_triton" in strings:
                    named |= {s + "_triton" for s in strings if s + "_triton" in known}
                found |= named or _stored_ops(fn)
    return found


@functools.cache
def _tests_opcheck() -> frozenset[str]:
    return frozenset(opchecked_ops())


# ---- benchmark cases and doc entries --------------------------------------------------------------

def benchmark_names(sources: dict[str, str] | None = None) -> set[str]:
    """The words of every benchmark case's family and name: the first two arguments of
    Case(...), the first of the _case(...) helper, the "family" and "name" of result rows."""
    sources = _read("rlkernels/benchmarks/*.py") if sources is None else sources
    words: set[str] = set()
    for text in sources.values():
        for node in ast.walk(ast.parse(text)):
            parts: list[ast.AST] = []
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("Case", "_case"):
                parts = node.args[:2] if node.func.id == "Case" else node.args[:1]
            elif isinstance(node, ast.Dict):
                parts = [v for k, v in zip(node.keys, node.values)
                         if isinstance(k, ast.Constant) and k.value in ("family", "name")]
            for part in parts:
                if isinstance(part, ast.Constant) and isinstance(part.value, str):
                    words |= set(re.findall(r"[A-Za-z0-9_]+", part.value))
    return words


@functools.cache
def _benchmarked() -> frozenset[str]:
    return frozenset(benchmark_names())


def documented(name: str, docs: dict[str, str] | None = None) -> bool:
    docs = _read("docs/*.md") if docs is None else docs
    return any(re.search(rf"\b{re.escape(name)}\b", text) for text in docs.values())


def has_cuda_source(name: str, sources: dict[str, str] | None = None) -> bool:
    """A CUDA implementation of the op: m.impl("<name>", ...) in csrc/cuda (this CPU
    build registers no CUDA kernel to ask the dispatcher about)."""
    sources = _read("csrc/cuda/**/*.c*") if sources is None else sources
    pattern = re.compile(rf'\.impl\(\s*"(?:{NS}::)?{re.escape(name)}"')
    return any(pattern.search(text) for text in sources.values())


def has_fake(qualified: str) -> bool:
    """A fake kernel for the op "namespace::name": registered with torch.library, or a Meta kernel."""
    return (fake_registry.find(qualified).fake_impl.kernel is not None
            or torch._C._dispatch_has_kernel_for_dispatch_key(qualified, "Meta"))


# ---- the op tables against what is registered --------------------------------------------------

def test_tables_cover_the_public_ops():
    assert sorted(set(KERNEL_OPS) | set(COMPOSITIONS)) == PUBLIC
    assert not set(KERNEL_OPS) & set(COMPOSITIONS)
    assert set(rlkernels.__all__) >= set(PUBLIC)


def test_every_registered_op_is_in_the_tables():
    ops = registered_ops()
    twins = {name for name in ops if name.endswith(_registry.TWIN_SUFFIX)}
    assert ops - twins - set(COMPOSITION_OPS) == set(KERNEL_NAMES), "an op that no public function runs"
    assert set(COMPOSITION_OPS) <= ops


@needs_triton
def test_the_registry_defines_every_twin_and_fake():
    assert set(_registry.TWINS) == {_registry.twin_name(name) for name in KERNEL_NAMES}
    assert set(_registry.registered()) == set(KERNEL_NAMES)


# ---- kernel ops --------------------------------------------------------------------------------

def has_kernel(qualified: str, key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(qualified, key)


@pytest.mark.parametrize("name", KERNEL_NAMES)
def test_cpu_kernel(name):
    assert has_kernel(_qualified(name), "CPU")


@pytest.mark.skipif(not os.path.isdir(os.path.join(ROOT, "csrc")),
                    reason="no C++ sources in this tree (the sanitizer's copy of the package)")
@pytest.mark.parametrize("name", KERNEL_NAMES)
def test_cuda_implementation(name):
    assert has_cuda_source(name), f"no m.impl(\"{name}\", ...) in csrc/cuda"


@needs_triton
@pytest.mark.parametrize("name", KERNEL_NAMES)
def test_triton_twin_has_the_compiled_schema(name):
    twin = _registry.twin_name(name)
    assert twin in registered_ops()
    compiled = str(_registry.compiled_schema(name))
    derived = str(getattr(torch.ops.rlkernels, twin).default._schema)
    assert derived == compiled.replace(f"{NS}::{name}(", f"{NS}::{twin}(", 1)
    for key in ("CPU", "CUDA"):
        assert has_kernel(_qualified(twin), key), key


@pytest.mark.parametrize("name", KERNEL_NAMES + COMPOSITION_OPS)
def test_fake_kernel(name):
    for op in _variants(name):
        assert has_fake(_qualified(op)), f"{op} has no fake kernel"


@pytest.mark.parametrize("name", KERNEL_NAMES + COMPOSITION_OPS)
def test_opcheck_sample(name):
    missing = set(_variants(name)) - _tests_opcheck()
    assert not missing, f"no opcheck of {sorted(missing)} in tests/"


# ---- public functions --------------------------------------------------------------------------

@pytest.mark.parametrize("public", PUBLIC)
def test_reference(public):
    parts = COMPOSITIONS[public]["reference"] if public in COMPOSITIONS else (public,)
    for part in parts:
        assert part in reference.__all__ and callable(getattr(reference, part)), part


@pytest.mark.parametrize("public", PUBLIC)
def test_benchmark_case(public):
    words = _benchmarked()
    _gap(public, "benchmark", BENCHMARKED_THROUGH.get(public, public) not in words)


@pytest.mark.parametrize("public", PUBLIC)
def test_doc_entry(public):
    assert documented(public), f"{public} appears in no docs/*.md"


def _f(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


def _i(*shape):
    return torch.randint(0, 5, shape)


def _mask(*shape):
    return torch.rand(*shape) > 0.3


B, T, V, H = 2, 3, 5, 4


def samples():
    """Public op -> (good keyword arguments, [(argument, bad value), ...]): one bad dtype
    and one bad shape each.  (pack_tensors' messages call its `out` the bucket.)"""
    loss = dict(logprobs=_f(B, T), old_logprobs=_f(B, T), advantages=_f(B, T), mask=_mask(B, T))
    return {
        "gae": (dict(rewards=_f(B, T), values=_f(B, T)), [("values", _i(B, T)), ("values", _f(B, T + 1))]),
        "discounted_returns": (dict(rewards=_f(B, T), mask=_mask(B, T)),
                               [("rewards", _i(B, T)), ("mask", _mask(B, T + 1))]),
        "group_advantages": (dict(scores=_f(6), group_size=3), [("scores", _i(6)), ("scores", _f(6, 1))]),
        "masked_mean": (dict(x=_f(B, T), mask=_mask(B, T)), [("x", _i(B, T)), ("mask", _mask(B, T + 1))]),
        "masked_whiten": (dict(x=_f(B, T), mask=_mask(B, T)), [("x", _i(B, T)), ("mask", _mask(B, T + 1))]),
        "logprobs": (dict(logits=_f(B, T, V), labels=_i(B, T)),
                     [("labels", _f(B, T)), ("labels", _i(B, T + 1))]),
        "linear_logprobs": (dict(hidden=_f(B, T, H), weight=_f(V, H), labels=_i(B, T)),
                            [("labels", _f(B, T)), ("weight", _f(V, H + 1))]),
        "kl_from_logits": (dict(logits=_f(B, T, V), ref_logits=_f(B, T, V)),
                           [("ref_logits", _i(B, T, V)), ("ref_logits", _f(B, T, V + 1))]),
        "kl_penalty": (dict(logprobs=_f(B, T), ref_logprobs=_f(B, T)),
                       [("ref_logprobs", _i(B, T)), ("ref_logprobs", _f(B, T + 1))]),
        "ppo_loss": (dict(loss), [("old_logprobs", _i(B, T)), ("advantages", _f(B, T + 1))]),
        "grpo_loss": (dict(loss), [("old_logprobs", _i(B, T)), ("advantages", _f(B, T + 1))]),
        "value_loss": (dict(values=_f(B, T), old_values=_f(B, T), returns=_f(B, T), mask=_mask(B, T)),
                       [("returns", _i(B, T)), ("returns", _f(B, T + 1))]),
        "dpo_loss": (dict(policy_chosen=_f(B), policy_rejected=_f(B), ref_chosen=_f(B), ref_rejected=_f(B)),
                     [("ref_rejected", _i(B)), ("ref_rejected", _f(B + 1))]),
        "sequence_logprobs": (dict(token_logprobs=_f(B, T), mask=_mask(B, T)),
                              [("token_logprobs", _i(B, T)), ("mask", _mask(B, T + 1))]),
        "dpo_sequence_loss": (dict(policy_logprobs=_f(2 * B, T), ref_logprobs=_f(2 * B, T), mask=_mask(2 * B, T)),
                              [("ref_logprobs", _i(2 * B, T)), ("ref_logprobs", _f(2 * B, T + 1))]),
        "linear_ppo_loss": (dict(hidden=_f(B, T, H), weight=_f(V, H), labels=_i(B, T), old_logprobs=_f(B, T),
                                 advantages=_f(B, T)),
                            [("old_logprobs", _i(B, T)), ("advantages", _f(B, T + 1))]),
        "pack_tensors": (dict(tensors=[_f(3), _f(2, 2)], out=_f(7)), [("tensors", [_f(3), _i(2, 2)]),
                                                                     ("out", _f(8))]),
        "unpack_tensors": (dict(bucket=_f(7), tensors=[_f(3), _f(2, 2)]),
                           [("bucket", _i(7)), ("bucket", _f(8))]),
        "gossip_mix": (dict(x=_f(B, T), left=_f(B, T), right=_f(B, T)),
                       [("left", _i(B, T)), ("right", _f(B, T + 1))]),
    }


# Arguments that error messages call by another name: (public op, argument) -> that name.
MESSAGE_NAMES = {("pack_tensors", "out"): "bucket"}


def _backends() -> list[str]:
    return ["cpu", "reference"] + (["triton"] if TRITON_ON_CPU else [])


def _outcome(fn, kwargs, backend):
    try:
        fn(**kwargs, backend=backend)
    except Exception as exc:  # noqa: BLE001  (what is raised is the point)
        return type(exc), str(exc)
    return None


def test_samples_cover_the_public_ops():
    assert sorted(samples()) == PUBLIC


@pytest.mark.parametrize("kind", ["dtype", "shape"])
@pytest.mark.parametrize("public", PUBLIC)
def test_backends_agree_on_bad_input(public, kind):
    good, bad = samples()[public]
    argument, value = bad[0 if kind == "dtype" else 1]
    fn = getattr(rlkernels, public)
    named = MESSAGE_NAMES.get((public, argument), argument)
    outcomes = {backend: _outcome(fn, {**good, argument: value}, backend) for backend in _backends()}
    for backend, outcome in outcomes.items():
        assert outcome is not None, f"{public}(backend={backend!r}) accepted a bad {argument} ({kind})"
        assert named in outcome[1], f"{public}(backend={backend!r}): {outcome[1]!r} does not name {named}"
    assert len({outcome[0] for outcome in outcomes.values()}) == 1, outcomes


class _Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        namespace, _, rest = func.name().partition("::")
        if namespace == NS:
            self.seen.add(rest.split(".")[0])
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("public", PUBLIC)
def test_cpu_backend_runs_the_declared_ops(public):
    """The good sample, forward and backward on backend="cpu", reaches the forward op of
    the table and no rlkernels op outside it."""
    good, _ = samples()[public]
    good = {k: v.clone().requires_grad_() if isinstance(v, torch.Tensor) and v.is_floating_point()
            and k not in ("out", "bucket", "tensors") else v for k, v in good.items()}
    if public in ("gae", "discounted_returns", "group_advantages", "masked_whiten"):
        good = {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in good.items()}
    recorder = _Recorder()
    with recorder:
        out = getattr(rlkernels, public)(**good, backend="cpu")
        flat = [out] if isinstance(out, torch.Tensor) else [t for t in (out if isinstance(out, tuple) else ())
                                                             if isinstance(t, torch.Tensor)]
        grads = [t.sum() for t in flat if t.requires_grad]
        if grads:
            torch.stack(grads).sum().backward()
    declared = set(COMPOSITIONS[public]["ops"] if public in COMPOSITIONS else KERNEL_OPS[public])
    assert recorder.seen <= declared, sorted(recorder.seen - declared)
    forward = COMPOSITIONS[public]["ops"][0] if public in COMPOSITIONS else KERNEL_OPS[public][0]
    assert forward in recorder.seen


# ---- the checks themselves fail where they should ------------------------------------------------

def test_checks_fail_on_a_missing_piece():
    assert not has_cuda_source("gae", {"x.cpp": 'm.impl("gae_other", &f);'})
    assert has_cuda_source("gae", {"x.cpp": 'm.impl("gae", &rlk::gae_cuda);'})
    assert not documented("gae", {"a.md": "generalised advantage estimation (gae_like)"})
    assert "gae" not in benchmark_names({"b.py": 'Case("advantages", "masked_whiten", {}, 1, [])'})
    assert "gae" in benchmark_names({"b.py": 'Case("advantages", "gae", {}, 1, [])'})
    sample = "def test_x():\n    torch.library.opcheck(torch.ops.rlkernels.gae.default, ())\n"
    assert opchecked_ops({"t.py": sample}) == {"gae"}
    assert opchecked_ops({"t.py": sample.replace("opcheck", "run")}) == set()
    kept = ("def test_x():\n    print(torch.ops.rlkernels.gae)\n"
            "    torch.library.opcheck(torch.ops.rlkernels.kl_penalty.default, ())\n")
    assert opchecked_ops({"t.py": kept}) == {"kl_penalty"}
    table = ('_OPS = {"a": "gossip_mix"}\n\ndef test_t(name):\n'
             '    torch.library.opcheck(getattr(torch.ops.rlkernels, _OPS[name] + "_triton").default, ())\n')
    assert opchecked_ops({"t.py": table}) == {"gossip_mix", "gossip_mix_triton"}
    probe = torch.library.Library("rlkernels_conformance_probe", "FRAGMENT")
    probe.define("bare(Tensor x) -> Tensor")
    probe.define("unimplemented(Tensor x) -> Tensor")
    probe.impl("bare", lambda x: x.clone(), "CPU")
    assert not has_fake("rlkernels_conformance_probe::bare")
    assert has_kernel("rlkernels_conformance_probe::bare", "CPU")
    assert not has_kernel("rlkernels_conformance_probe::unimplemented", "CPU")
    assert has_fake(_qualified("gae"))
