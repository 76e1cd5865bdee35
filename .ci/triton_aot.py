"""Compiles every Triton kernel of rlkernels ahead of time for real GPUs, without one.

The Triton interpreter (TRITON_INTERPRET=1, how the tests run the kernels on the CPU)
checks what a kernel computes, not that it compiles: compiled Triton rejects things the
interpreter accepts.  This script runs each Triton op's host wrapper on `meta` tensors
(realistic sizes cost nothing there) with kernel launches recorded instead of run, then
compiles every distinct launch for each target with Triton's own argument
specialisation (the binder a real launch would use) and its bundled ptxas.

It fails on a compile error, a grid over the hardware's limits, shared memory over the
target's limit, register spills in a float32/bfloat16/float16 variant, a Triton op
without cases here, or a kernel that no case launches.  It prints one table row per
kernel and target: variants, registers, spills, shared memory and the widest global
load; `--markdown FILE` writes the table (docs/triton-aot.md keeps the latest).

    python .ci/triton_aot.py [--targets 80 90] [--quick] [--markdown docs/triton-aot.md]
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
import time

os.environ.pop("TRITON_INTERPRET", None)  # compile for real: decided when the kernels are decorated

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

GRID_LIMITS = (2**31 - 1, 65535, 65535)
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448, 100: 232448, 120: 101376}
SPILLS_FORBIDDEN = ("fp32", "bf16", "fp16")  # float64 variants may spill (reported, not fatal)


@dataclasses.dataclass
class Launch:
    kernel: JITFunction
    args: tuple
    kwargs: dict
    grid: object
    case: str


_recorded: list[Launch] = []
_current_case = [""]


def _record(self, *args, grid, warmup, **kwargs):
    _recorded.append(Launch(self, args, dict(kwargs), grid, _current_case[0]))


JITFunction.run = _record  # every kernel[grid](...) in the wrappers lands here

import rlkernels  # noqa: E402,F401  (imports the Triton modules: their ops and kernels)
from rlkernels import triton as rlk_triton  # noqa: E402
from rlkernels.ops._registry import TWINS  # noqa: E402
from rlkernels.triton import (_token_loss, gae, group_advantages, kl_from_logits, kl_penalty,  # noqa: E402
                              logprobs, masked, multi_tensor, policy_loss, preference, value_loss)

MODULES = (gae, group_advantages, masked, kl_penalty, logprobs, kl_from_logits, _token_loss, policy_loss,
           value_loss, multi_tensor, preference)
F32, BF16, F16, F64 = torch.float32, torch.bfloat16, torch.float16, torch.float64


def meta(*shape, dtype=F32):
    return torch.empty(shape, dtype=dtype, device="meta")


def strided_logits(B, T, V, dtype):
    """[B, T, V] logits that are a slice of [B, T + 1, V] (a causal LM's outputs)."""
    return meta(B, T + 1, V, dtype=dtype)[:, :-1]


def labels(*shape):
    return meta(*shape, dtype=torch.int64)


def mask(*shape):
    return meta(*shape, dtype=torch.bool)


VOCABS = (32000, 50257, 128256, 151936)
LOGIT_DTYPES = (F32, BF16, F16)


def logits_cases(quick: bool):
    """(name, logits) over the vocabularies, dtypes and token counts of real models."""
    vocabs = VOCABS[1:2] if quick else VOCABS
    for V in vocabs:
        for dtype in LOGIT_DTYPES:
            d = str(dtype).split(".")[1]
            yield f"V={V} {d} 1 token", meta(1, V, dtype=dtype)
            yield f"V={V} {d} 65536 tokens", meta(65536, V, dtype=dtype)
            yield f"V={V} {d} [8, 4097, V][:, :-1]", strided_logits(8, 4096, V, dtype)


def cases(quick: bool):
    """Yields (op name, case name, thunk): each thunk calls one Triton op's host wrapper."""
    T = logprobs
    for name, x in logits_cases(quick):
        lead = x.shape[:-1]
        n = x.numel() // x.shape[-1]
        for ent in (False, True):
            yield "logprobs_triton", f"{name} entropy={ent}", (
                lambda x=x, lead=lead, ent=ent: T.logprobs_triton(x, labels(*lead), 1.0, -100, ent, False))
            grad_entropy = meta(*lead) if ent else None
            args = (meta(*lead), grad_entropy, x, labels(*lead), meta(*lead, 2), meta(*lead) if ent else meta(0),
                    0.7, -100)
            yield "logprobs_backward_triton", f"{name} entropy={ent}", (
                lambda args=args: T.logprobs_backward_triton(*args))
            yield "logprobs_backward_inplace_triton", f"{name} entropy={ent}", (
                lambda args=args: T.logprobs_backward_inplace_triton(*args))
            for start, finish in ((0, False), (4096, True)):
                tile = x[..., :4096]
                for width in (4, 5):  # 5: the state also tracks whether the label is the arg-max
                    yield "logprobs_vocab_tile_triton", f"{name} tile entropy={ent} finish={finish} state={width}", (
                        lambda tile=tile, lead=lead, n=n, ent=ent, start=start, finish=finish, width=width:
                        T.logprobs_vocab_tile_triton(tile, labels(*lead), meta(n * width), 1.0, -100,
                                                              start, ent, finish))
        for with_mask in (False, True):
            m = mask(*lead) if with_mask else None
            yield "kl_from_logits_triton", f"{name} mask={with_mask}", (
                lambda x=x, m=m: kl_from_logits.kl_from_logits_triton(x, x, m, 1.0))
            for lg, rg in ((True, False), (False, True), (True, True)):
                yield "kl_from_logits_backward_triton", f"{name} mask={with_mask} grads={lg},{rg}", (
                    lambda x=x, m=m, lead=lead, lg=lg, rg=rg: kl_from_logits.kl_from_logits_backward_triton(
                        meta(*lead), x, x, m, meta(*lead, 5), 1.0, lg, rg))

    seq_shapes = ((1, 1), (256, 4096), (8, 4096), (1024, 127))
    seq_dtypes = (F32, BF16, F16, F64)
    for (B, L) in seq_shapes:
        for dtype in seq_dtypes:
            d = f"[{B}, {L}] {str(dtype).split('.')[1]}"
            for has_mask in (False, True):
                for has_dones in (False, True):
                    for has_last in (False, True):
                        yield "gae_triton", f"{d} mask={has_mask} dones={has_dones} last={has_last}", (
                            lambda B=B, L=L, dtype=dtype, hm=has_mask, hd=has_dones, hl=has_last:
                            gae.gae_triton(meta(B, L, dtype=dtype), meta(B, L, dtype=dtype),
                                                    mask(B, L) if hm else None, mask(B, L) if hd else None,
                                                    meta(B, dtype=F64 if dtype == F64 else F32) if hl else None,
                                                    0.99, 0.95))
                    yield "discounted_returns_triton", f"{d} mask={has_mask} dones={has_dones}", (
                        lambda B=B, L=L, dtype=dtype, hm=has_mask, hd=has_dones:
                        gae.discounted_returns_triton(meta(B, L, dtype=dtype), mask(B, L) if hm else None,
                                                               mask(B, L) if hd else None, 0.99))
                yield "masked_row_mean_triton", f"{d} mask={has_mask}", (
                    lambda B=B, L=L, dtype=dtype, hm=has_mask:
                    masked.masked_row_mean_triton(meta(B, L, dtype=dtype), mask(B, L) if hm else None))
                for shift in (False, True):
                    yield "masked_whiten_triton", f"{d} mask={has_mask} shift_mean={shift}", (
                        lambda B=B, L=L, dtype=dtype, hm=has_mask, shift=shift:
                        masked.masked_whiten_triton(meta(B, L, dtype=dtype), mask(B, L) if hm else None,
                                                            shift, 1e-8))
                for average in (False, True):
                    yield "sequence_logprobs_triton", f"{d} mask={has_mask} average={average}", (
                        lambda B=B, L=L, dtype=dtype, hm=has_mask, average=average:
                        preference.sequence_logprobs_triton(meta(B, L, dtype=dtype),
                                                                      mask(B, L) if hm else None, average))
                    acc = F64 if dtype == F64 else F32
                    yield "sequence_logprobs_backward_triton", f"{d} mask={has_mask} average={average}", (
                        lambda B=B, L=L, dtype=dtype, acc=acc, hm=has_mask, average=average:
                        preference.sequence_logprobs_backward_triton(
                            meta(B, dtype=acc), mask(B, L) if hm else None, meta(B, dtype=acc), average, L, dtype))
            for kind in sorted(set(kl_penalty.KIND_CODES.values())):
                name = next(k for k, v in kl_penalty.KIND_CODES.items() if v == kind)
                for clamp in (float("inf"), 10.0):
                    yield "kl_penalty_triton", f"{d} kind={name} clamp={clamp}", (
                        lambda B=B, L=L, dtype=dtype, name=name, clamp=clamp:
                        kl_penalty.kl_penalty_triton(meta(B, L, dtype=dtype), meta(B, L, dtype=dtype),
                                                              name, clamp))
            acc = F64 if dtype == F64 else F32
            for need_grad in (False, True):
                for agg in _token_loss._AGG_CODES:
                    for kl in policy_loss._KL_CODES:
                        for variant in ("plain", "mask+weights+dual+per-row-adv"):
                            rich = variant != "plain"
                            yield "policy_loss_triton", f"{d} agg={agg} kl={kl} {variant} grad={need_grad}", (
                                lambda B=B, L=L, dtype=dtype, agg=agg, kl=kl, rich=rich, g=need_grad:
                                policy_loss.policy_loss_triton(
                                    meta(B, L, dtype=dtype), meta(B, L, dtype=dtype),
                                    meta(B, dtype=dtype) if rich else meta(B, L, dtype=dtype),
                                    mask(B, L) if rich else None, meta(B, L, dtype=dtype) if rich else None,
                                    meta(B, L, dtype=dtype) if kl != "none" else None,
                                    [0.2, 0.28, 3.0 if rich else float("inf"), 20.0, 0.05, -1.0, -1.0, -1.0],
                                    kl, agg, g))
                    for clip in (float("inf"), 0.2):
                        yield "value_loss_triton", f"{d} agg={agg} clip={clip} grad={need_grad}", (
                            lambda B=B, L=L, dtype=dtype, agg=agg, clip=clip, g=need_grad:
                            value_loss.value_loss_triton(meta(B, L, dtype=dtype), meta(B, L, dtype=dtype),
                                                              meta(B, L, dtype=dtype), mask(B, L), [clip, -1.0, -1.0,
                                                                                                   -1.0], agg, g))
            yield "scale_rows_triton", d, (
                lambda B=B, L=L, dtype=dtype, acc=acc:
                _token_loss.scale_rows_triton(meta(B, L, dtype=acc), meta(B, dtype=acc), meta(dtype=acc), dtype))

    for B in (1, 4096, 300001):
        for dtype in (F32, BF16, F16, F64):
            d = f"B={B} {str(dtype).split('.')[1]}"
            for kind in preference._KINDS:
                yield "dpo_loss_triton", f"{d} kind={kind}", (
                    lambda B=B, dtype=dtype, kind=kind:
                    preference.dpo_loss_triton(*(meta(B, dtype=dtype) for _ in range(4)), 0.1, kind, 0.1))
            # groups of one, of 8 where 8 divides the batch, and ids given per score
            layouts = [(B, False)] + ([(B // 8, False)] if B % 8 == 0 else []) + [(max(B // 8, 1), True)]
            for G, idx in layouts:
                for baseline in (0, 1):
                    for scale in (0, 1, 2):
                        yield "group_advantages_triton", f"{d} groups={G} index={idx} baseline={baseline} scale={scale}", (
                            lambda B=B, dtype=dtype, G=G, idx=idx, baseline=baseline, scale=scale:
                            group_advantages.group_advantages_triton(
                                meta(B, dtype=dtype), labels(B) if idx else None, 0 if idx else B // G, G,
                                baseline, scale, 1e-6))

    for dtype in (F32, BF16, F16, F64):
        d = str(dtype).split(".")[1]
        params = [meta(4096, 4096, dtype=dtype), meta(1, dtype=dtype), meta(50257, 768, dtype=dtype)]
        total = sum(p.numel() for p in params)
        for bucket_dtype in {dtype, F32}:
            b = str(bucket_dtype).split(".")[1]
            for scale in (1.0, 0.25):
                yield "pack_tensors_triton", f"{d} -> bucket {b} scale={scale}", (
                    lambda params=params, total=total, bd=bucket_dtype, scale=scale:
                    multi_tensor.pack_tensors_triton(params, meta(total, dtype=bd), scale))
                yield "unpack_tensors_triton", f"bucket {b} -> {d} scale={scale}", (
                    lambda params=params, total=total, bd=bucket_dtype, scale=scale:
                    multi_tensor.unpack_tensors_triton(meta(total, dtype=bd), params, scale))
        for n in (1, 2**26 + 3):
            yield "gossip_mix_triton", f"{d} n={n}", (
                lambda n=n, dtype=dtype: multi_tensor.gossip_mix_triton(
                    meta(n, dtype=dtype), meta(n, dtype=dtype), meta(n, dtype=dtype), 0.5, 0.25, 0.25,
                    meta(n, dtype=dtype)))


def triton_ops() -> dict[str, object]:
    """Every Triton op the package defines, by short name."""
    return dict(TWINS)


def triton_kernels() -> dict[str, JITFunction]:
    """Every launchable @triton.jit kernel (jitted helpers excepted: they are inlined)."""
    found = {}
    for module in MODULES + (rlk_triton._common,):
        for value in vars(module).values():
            if isinstance(value, JITFunction) and value.fn.__name__.endswith("_kernel"):
                found[f"{module.__name__.rsplit('.', 1)[-1]}.{value.fn.__name__}"] = value
    return found


def dtype_tag(launch: Launch) -> str:
    """The widest floating dtype among the launch's tensors (fp64 decides spills)."""
    tags = set()
    for a in list(launch.args) + [a for v in launch.kwargs.values() for a in (v if isinstance(v, list) else [v])]:
        if isinstance(a, torch.Tensor) and a.dtype.is_floating_point:
            tags.add(a.dtype)
    if F64 in tags:
        return "fp64"
    for dtype, tag in ((BF16, "bf16"), (F16, "fp16")):
        if dtype in tags:
            return tag
    return "fp32"


def ptxas_path(capability: int) -> str:
    """The ptxas Triton itself uses for this target (the one bundled with it)."""
    from triton.backends.nvidia import compiler as nvidia
    try:
        ptxas = nvidia.get_ptxas(capability)
    except TypeError:  # Triton < 3.4: one ptxas for every target
        ptxas = nvidia.get_ptxas()
    return ptxas.path if hasattr(ptxas, "path") else str(ptxas)


_LOAD = re.compile(r"\bld\.global(?:\.[a-z0-9_]+)*?(?:\.v(\d))?\.(?:b|u|s|f)(\d+)\b")


def widest_load(ptx: str) -> int:
    bits = [int(v or 1) * int(w) for v, w in _LOAD.findall(ptx)]
    return max(bits, default=0)


def ptxas_usage(ptx: str, arch: str, ptxas: str) -> tuple[int, int]:
    """(registers, spill bytes stores + loads) as ptxas -v reports them."""
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    try:
        done = subprocess.run([ptxas, "-v", f"--gpu-name={arch}", f.name, "-o", os.devnull],
                              capture_output=True, text=True, check=True)
    finally:
        os.unlink(f.name)
    text = done.stdout + done.stderr
    regs = max((int(r) for r in re.findall(r"Used (\d+) registers", text)), default=0)
    spills = sum(int(s) for s in re.findall(r"(\d+) bytes spill (?:stores|loads)", text))
    return regs, spills


def grid_of(launch: Launch, bound_args) -> tuple[int, int, int]:
    grid = launch.grid(bound_args) if callable(launch.grid) else launch.grid
    grid = tuple(int(g) for g in grid) + (1,) * (3 - len(grid))
    return grid


def compile_all(launches: list[Launch], capabilities: list[int], log, ptx_dir=None) -> tuple[list[dict], list[str]]:
    """Each target in its own forked process (they share nothing; 2 cores halve the time)."""
    import multiprocessing
    if len(capabilities) == 1:
        return compile_target(launches, capabilities[0], log, ptx_dir)
    _forked[:] = [launches, log, ptx_dir]  # inherited by the forked workers, never pickled
    with multiprocessing.get_context("fork").Pool(len(capabilities)) as pool:
        results = pool.map(_compile_forked, capabilities)
    return [r for rows, _ in results for r in rows], [e for _, errors in results for e in errors]


_forked: list = []


def _compile_forked(cap: int):
    return compile_target(_forked[0], cap, _forked[1], _forked[2])


def compile_target(launches: list[Launch], cap: int, log, ptx_dir=None) -> tuple[list[dict], list[str]]:
    rows, errors = [], []
    ptxas = ptxas_path(cap)
    target = GPUTarget("cuda", cap, 32)
    backend = make_backend(target)
    binders: dict[int, object] = {}
    compiled: dict[tuple, dict] = {}
    for launch in launches:
        fn = launch.kernel
        name = f"{fn.fn.__module__.rsplit('.', 1)[-1]}.{fn.fn.__name__}"
        kwargs = dict(launch.kwargs, debug=False)
        if id(fn) not in binders:
            binders[id(fn)] = create_function_from_signature(fn.signature, fn.params, backend)
        try:
            bound_args, specialization, options = binders[id(fn)](*launch.args, **kwargs)
            grid = grid_of(launch, bound_args)
            for axis, (g, limit) in enumerate(zip(grid, GRID_LIMITS)):
                if not 0 < g <= limit:
                    errors.append(f"sm_{cap} {name} [{launch.case}]: grid axis {axis} = {g} outside (0, {limit}]")
            options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization,
                                                                  options)
        except Exception as exc:  # noqa: BLE001 - reported with the case that failed
            errors.append(f"sm_{cap} {name} [{launch.case}]: cannot bind the launch: {exc!r}")
            continue
        key = (name, repr(sorted(signature.items())), repr(sorted(constexprs.items(), key=repr)),
               repr(sorted(attrs.items(), key=repr)), repr(sorted(options.__dict__.items(), key=repr)))
        if key in compiled:
            compiled[key]["cases"] += 1
            continue
        entry = {"kernel": name, "target": f"sm_{cap}", "dtype": dtype_tag(launch), "case": launch.case,
                 "cases": 1, "num_warps": options.num_warps, "num_stages": options.num_stages}
        compiled[key] = entry
        started = time.perf_counter()
        try:
            kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target,
                                    options=options.__dict__)
            ptx = kernel.asm["ptx"]
            arch = re.search(r"^\.target\s+(\S+)", ptx, re.M).group(1).rstrip(",")
            regs, spills = ptxas_usage(ptx, arch, ptxas)
            if ptx_dir:
                path = os.path.join(ptx_dir, f"{name}-sm_{cap}-{entry['dtype']}-{len(compiled)}.ptx")
                with open(path, "w") as f:
                    f.write(f"// {launch.case}\n{ptx}")
        except Exception as exc:  # noqa: BLE001
            lines = [line for line in str(exc).strip().splitlines() if line.strip()]
            errors.append(f"sm_{cap} {name} [{launch.case}]: compile failed: {type(exc).__name__}: "
                          f"{lines[-1] if lines else ''}" + "".join(f"\n    {line}" for line in lines[:-1][-12:]))
            entry["error"] = True
            continue
        entry.update(registers=regs, spill_bytes=spills, shared=kernel.metadata.shared,
                     load_bits=widest_load(ptx), seconds=round(time.perf_counter() - started, 2))
        if entry["shared"] > SHARED_LIMIT.get(cap, 101376):
            errors.append(f"sm_{cap} {name} [{launch.case}]: {entry['shared']} bytes of shared memory, "
                          f"over the target's {SHARED_LIMIT.get(cap, 101376)}")
        if spills and entry["dtype"] in SPILLS_FORBIDDEN:
            errors.append(f"sm_{cap} {name} [{launch.case}] ({entry['dtype']}): {spills} bytes of register spills")
        log(f"  sm_{cap} {name:42s} {entry['dtype']:5s} regs {regs:3d} spills {spills:4d} "
            f"shared {entry['shared']:6d} load {entry['load_bits']:3d}b  ({entry['seconds']} s) [{launch.case}]")
    rows.extend(compiled.values())
    return rows, errors


def summary(rows: list[dict]) -> list[dict]:
    """One row per kernel and target: the worst over its variants."""
    by = collections.OrderedDict()
    for r in sorted(rows, key=lambda r: (r["kernel"], r["target"])):
        if r.get("error"):
            continue
        s = by.setdefault((r["kernel"], r["target"]), {
            "kernel": r["kernel"], "target": r["target"], "variants": 0, "launches": 0, "registers": 0,
            "spill_bytes_16_32": 0, "spill_bytes_64": 0, "shared": 0, "load_bits": set()})
        s["variants"] += 1
        s["launches"] += r["cases"]
        s["registers"] = max(s["registers"], r["registers"])
        s["spill_bytes_64" if r["dtype"] == "fp64" else "spill_bytes_16_32"] += r["spill_bytes"]
        s["shared"] = max(s["shared"], r["shared"])
        s["load_bits"].add(r["load_bits"])
    out = []
    for s in by.values():
        s["load_bits"] = "/".join(str(b) for b in sorted(s["load_bits"]))
        out.append(s)
    return out


def markdown(table: list[dict], meta_info: dict) -> str:
    lines = [
        "# Triton kernels compiled ahead of time",
        "",
        "Written by `python .ci/triton_aot.py --markdown docs/triton-aot.md` (CI runs it on every",
        "change and fails on a compile error, a grid over its limits, shared memory over the target's,",
        "or register spills in a float32/bfloat16/float16 variant). No GPU is needed: the launches are",
        "recorded from the Triton ops' own host code run on `meta` tensors of realistic sizes",
        "(vocabularies 32000 to 151936, 1 to 65536 tokens, `[B, T+1, V][:, :-1]` slices, GAE at",
        "T = 4096, every flag), specialised as a real launch would be, and compiled with Triton's",
        "bundled ptxas.",
        "",
        f"Triton {meta_info['triton']}, torch {meta_info['torch']}, {meta_info['launches']} launches, "
        f"{meta_info['variants']} compiled variants.",
        "",
        "Columns: variants = distinct specialisations compiled; registers = the most any variant uses per",
        "thread; spills = register spill bytes (stores + loads) summed over the 32/16-bit variants and",
        "over the float64 ones; shared = the most static + dynamic shared memory of a variant (bytes);",
        "load = widths in bits of the widest global load of each variant (128 = 4 x 32-bit vector loads).",
        "",
        "| kernel | target | variants | launches | registers | spills 32/16-bit | spills fp64 | shared | load |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for s in table:
        lines.append(f"| `{s['kernel']}` | {s['target']} | {s['variants']} | {s['launches']} | {s['registers']} | "
                     f"{s['spill_bytes_16_32']} | {s['spill_bytes_64']} | {s['shared']} | {s['load_bits']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", type=int, nargs="+", default=[80, 90],
                        help="compute capabilities to compile for (default: 80 90)")
    parser.add_argument("--quick", action="store_true", help="one vocabulary size instead of four")
    parser.add_argument("--ops", nargs="+", help="only the Triton ops whose names contain one of these")
    parser.add_argument("--markdown", help="write the summary table to this file")
    parser.add_argument("--json", help="write every compiled variant to this file")
    parser.add_argument("--quiet", action="store_true", help="print the summary only")
    parser.add_argument("--ptx-dir", help="write each variant's PTX here (<kernel>-<target>-<dtype>-<n>.ptx)")
    args = parser.parse_args(argv)
    log = (lambda s: None) if args.quiet else (lambda s: print(s, flush=True))

    errors: list[str] = []
    ops = triton_ops()
    covered = set()
    for op, case, thunk in cases(args.quick):
        covered.add(op)
        if args.ops and not any(o in op for o in args.ops):
            continue
        _current_case[0] = f"{op}: {case}"
        before = len(_recorded)
        try:
            thunk()
        except Exception as exc:  # noqa: BLE001
            errors.append(f"{op} [{case}]: the host wrapper failed on meta tensors: {exc!r}")
            continue
        if len(_recorded) == before:
            errors.append(f"{op} [{case}]: launched no kernel")
    for missing in sorted(set(ops) - covered):
        errors.append(f"rlkernels::{missing}: no ahead-of-time case in .ci/triton_aot.py")
    launched = {f"{launch.kernel.fn.__module__.rsplit('.', 1)[-1]}.{launch.kernel.fn.__name__}"
                for launch in _recorded}
    for name in sorted(set(triton_kernels()) - launched if not args.ops else ()):
        errors.append(f"{name}: no case launches this kernel")
    print(f"{len(ops)} Triton ops, {len(triton_kernels())} kernels, {len(_recorded)} launches recorded; "
          f"compiling for {', '.join(f'sm_{t}' for t in args.targets)}", flush=True)

    started = time.perf_counter()
    if args.ptx_dir:
        os.makedirs(args.ptx_dir, exist_ok=True)
    rows, compile_errors = compile_all(_recorded, args.targets, log, args.ptx_dir)
    errors += compile_errors
    table = summary(rows)
    info = {"triton": triton.__version__, "torch": torch.__version__, "launches": len(_recorded),
            "variants": sum(1 for r in rows if not r.get("error"))}
    print()
    print(markdown(table, info))
    print(f"compiled {info['variants']} variants in {time.perf_counter() - started:.0f} s")
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(markdown(table, info))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"info": info, "variants": rows, "errors": errors}, f, indent=1)
    if errors:
        print(f"\n{len(errors)} problem(s):", file=sys.stderr)
        for e in errors:
            print(f"- {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
