"""The per-ISA copies of the explicit-SIMD CPU kernels (csrc/cpu/simd.h: run_avx512 and
run_avx2 of logprobs, kl_from_logits and their tiles) must stay vectorised.

GCC 12 lowers some generic vector code inside the always-inlined kernel templates before
it reaches the copy compiled for the wider ISA: two vector masks combined (m1 & m2, or
selects nested on two masks) became one scalar compare, set and lane insert per element
in kl_from_logits' AVX-512 copy, 184 such instructions a copy, and the forward ran 3.4x
slower, with every result still right.  No value test sees that; the disassembly does.
Today's copies hold at most 14 (the scalar statistics code around the loops)."""
from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess

import pytest

from rlkernels import _C

# lane-by-lane work in vector code: scalar compares, lane inserts and extracts
_SCALAR_LANE = re.compile(r"\t(vpinsr[bwdq]|vpextr[bwdq]|vinsertps|vextractps|v?u?comiss)\b")
_COPY = re.compile(r"^[0-9a-f]+ <(.*rlk::simd::run_avx(?:512|2)<.*)>:$")
_LIMIT = 48


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="the per-ISA copies are x86-64's")
@pytest.mark.skipif(os.environ.get("RLK_SANITIZED") == "1", reason="checks the optimised build's code")
def test_per_isa_kernel_copies_stay_vectorised():
    objdump = shutil.which("objdump")
    if objdump is None:
        pytest.skip("objdump (binutils) is not installed")
    listing = subprocess.run([objdump, "-d", "--no-show-raw-insn", "-C", _C.__file__], capture_output=True,
                             text=True, check=True).stdout
    counts: dict[str, int] = {}
    current = None
    for line in listing.splitlines():
        if line.endswith(">:"):
            match = _COPY.match(line)
            current = match.group(1) if match else None
            if current is not None:
                counts[current] = 0
        elif current is not None and _SCALAR_LANE.search(line):
            counts[current] += 1
    assert len(counts) >= 24, f"expected the kernels' AVX2 and AVX-512 copies, found {len(counts)}"
    worst = sorted(((n, name) for name, n in counts.items() if n >= _LIMIT), reverse=True)
    assert not worst, "per-ISA kernel copies with lane-by-lane scalar code:\n" + "\n".join(
        f"{n:5d}  {name[:160]}" for n, name in worst[:10])
