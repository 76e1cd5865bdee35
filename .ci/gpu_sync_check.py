"""Every public op on a GPU without a host sync (issue 13): each case of
tests/sync_cases.py, per backend, is run

  1. forward and backward under torch.cuda.set_sync_debug_mode("error"), where any
     synchronising CUDA call (a read of tensor data, a blocking copy) raises;
  2. captured in a CUDA graph (forward and backward) and replayed; the replay must give
     the eager results;
  3. in the checked mode (rlkernels.set_checks(True)) under the same debug mode, where
     the cases with data checks must raise: the control that shows step 1 can see a sync.

The checked mode is off for steps 1 and 2, whatever RLKERNELS_CHECK says.  Needs no
pytest (the lent GPU machines have torch and Triton, not our test stack).

    python .ci/gpu_sync_check.py [--backends cuda triton] [--ops NAME ...] [--json FILE]
    python .ci/gpu_sync_check.py --list          # the cases, nothing run (no GPU needed)

Exit status 1 when any case fails (known gaps, listed in KNOWN, are reported apart)."""
from __future__ import annotations

import argparse
import json
import os
import sys
import traceback

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
import sync_cases  # noqa: E402  (tests/sync_cases.py)

import rlkernels  # noqa: E402

# (op, backend, stage) -> why it is expected to fail today.
KNOWN: dict = {}


def _step(run, leaves, backend):
    """The op's floating outputs, then the gradients of their sum for the leaves."""
    outs = sync_cases.floats(run(backend))
    wanted = [o for o in outs if o.requires_grad]
    grads = []
    if wanted and leaves:
        loss = sum(o.float().sum() for o in wanted)
        grads = [g for g in torch.autograd.grad(loss, leaves, allow_unused=True) if g is not None]
    return [o.detach() for o in outs] + grads


def _under_sync_errors(fn):
    torch.cuda.set_sync_debug_mode("error")
    try:
        return fn()
    finally:
        torch.cuda.set_sync_debug_mode(0)


def check(name: str, backend: str) -> dict:
    result = {"op": name, "backend": backend, "syncs": "skipped", "graph": "skipped", "checked": "skipped"}
    rlkernels.set_checks(False)
    run, leaves = sync_cases.build(name, "cuda", grad=True)
    try:
        eager = _step(run, leaves, backend)  # compiles the Triton kernels, initialises cuBLAS
        torch.cuda.synchronize()
    except Exception as exc:  # noqa: BLE001 - the report names it
        result["error"] = f"eager run: {exc!r}"
        return result
    stages = (("syncs", lambda: _under_sync_errors(lambda: _step(run, leaves, backend))),
              ("graph", lambda: _graph(run, leaves, backend, eager)),
              ("checked", lambda: _checked(name, run, leaves, backend)))
    for stage, fn in stages:
        try:
            fn()
            torch.cuda.synchronize()
            result[stage] = "passed"
        except Exception as exc:  # noqa: BLE001
            known = KNOWN.get((name, backend, stage))
            result[stage] = "known" if known else "failed"
            result[f"{stage}_error"] = (known + ": " if known else "") + "".join(
                traceback.format_exception_only(type(exc), exc)).strip()[-600:]
        finally:
            rlkernels.set_checks(False)
    return result


def _graph(run, leaves, backend, eager):
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on a side stream, as torch.cuda.graphs asks
        for _ in range(2):
            _step(run, leaves, backend)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = _step(run, leaves, backend)
    graph.replay()
    torch.cuda.synchronize()
    if len(captured) != len(eager):
        raise AssertionError(f"the captured step gave {len(captured)} tensors, eager {len(eager)}")
    for i, (got, want) in enumerate(zip(captured, eager)):
        if not torch.allclose(got.float(), want.float(), rtol=1e-4, atol=1e-5, equal_nan=True):
            raise AssertionError(f"replayed output {i} differs from eager: {(got.float() - want.float()).abs().max()}")


def _checked(name, run, leaves, backend):
    rlkernels.set_checks(True)
    try:
        _under_sync_errors(lambda: _step(run, leaves, backend))
    except RuntimeError:
        if name in sync_cases.CHECKED:
            return
        raise
    if name in sync_cases.CHECKED:
        raise AssertionError("the checked mode read no data under the sync debug mode")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backends", nargs="+", default=["cuda", "triton"], choices=["cuda", "triton"])
    p.add_argument("--ops", nargs="+", choices=sorted(sync_cases.CASES), help="only these ops")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--list", action="store_true", help="list the cases and exit")
    args = p.parse_args(argv)
    names = args.ops or sorted(sync_cases.CASES)
    if args.list:
        for name in names:
            print(name, "checked" if name in sync_cases.CHECKED else "-")
        return 0
    if not torch.cuda.is_available():
        print("gpu_sync_check: no GPU is visible to torch (--list needs none)", file=sys.stderr)
        return 2
    results = []
    for backend in args.backends:
        for name in names:
            r = check(name, backend)
            results.append(r)
            errors = " ".join(f"{k}: {v}" for k, v in r.items() if k.endswith("error"))
            print(f"{name:20s} {backend:7s} syncs={r['syncs']} graph={r['graph']} checked={r['checked']} {errors}",
                  flush=True)
    failed = [r for r in results if "error" in r or "failed" in (r["syncs"], r["graph"], r["checked"])]
    print(f"{len(results)} cases, {len(failed)} failed, "
          f"{sum('known' in (r['syncs'], r['graph'], r['checked']) for r in results)} with known gaps")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
