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
load; `--markdown FILE` writes the table (docs/triton-aot.md keeps the latest).  The
cases and the launch recorder are in triton_aot_cases.py.

    python .ci/triton_aot.py [--targets 80 90] [--quick] [--markdown docs/triton-aot.md]
"""
from __future__ import annotations

import argparse
import collections
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
from triton.runtime.jit import create_function_from_signature  # noqa: E402

from triton_aot_cases import BF16, F16, F64, Launch, record  # noqa: E402  (beside this script)

GRID_LIMITS = (2**31 - 1, 65535, 65535)
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448, 100: 232448, 120: 101376}
SPILLS_FORBIDDEN = ("fp32", "bf16", "fp16")  # float64 variants may spill (reported, not fatal)


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
    parser.add_argument("--quick", action="store_true", help="two vocabulary sizes (one whole-row, one split) instead of five")
    parser.add_argument("--ops", nargs="+", help="only the Triton ops whose names contain one of these")
    parser.add_argument("--markdown", help="write the summary table to this file")
    parser.add_argument("--json", help="write every compiled variant to this file")
    parser.add_argument("--quiet", action="store_true", help="print the summary only")
    parser.add_argument("--ptx-dir", help="write each variant's PTX here (<kernel>-<target>-<dtype>-<n>.ptx)")
    args = parser.parse_args(argv)
    log = (lambda s: None) if args.quiet else (lambda s: print(s, flush=True))

    launches, errors, ops, kernels = record(args.quick, args.ops)
    print(f"{len(ops)} Triton ops, {len(kernels)} kernels, {len(launches)} launches recorded; "
          f"compiling for {', '.join(f'sm_{t}' for t in args.targets)}", flush=True)

    started = time.perf_counter()
    if args.ptx_dir:
        os.makedirs(args.ptx_dir, exist_ok=True)
    rows, compile_errors = compile_all(launches, args.targets, log, args.ptx_dir)
    errors += compile_errors
    table = summary(rows)
    info = {"triton": triton.__version__, "torch": torch.__version__, "launches": len(launches),
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
