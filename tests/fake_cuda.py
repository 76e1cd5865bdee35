"""Fake CUDA tensors on a CPU-only torch.

FakeTensorMode makes tensors with device="cuda" without a GPU, but a CPU-only torch
registers no CUDA device guard, and Python indexing (`t[a:b]`, `t[i] = v`) takes one:
"PyTorch is not linked with support for cuda devices".  `install()` compiles a few
lines of C++ against c10 (about a second) that register c10's FakeGuardImpl for CUDA
(what the CUDA build's guard does for a device that is not there), and loads them.
Where torch already has a CUDA guard it changes nothing.  Autograd's engine still
needs a real accelerator, so backward passes are driven by hand (test_host_syncs.py)."""
from __future__ import annotations

import ctypes
import os
import shutil
import subprocess

import torch

_SOURCE = r"""
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <c10/core/impl/FakeGuardImpl.h>
namespace {
c10::impl::FakeGuardImpl<c10::DeviceType::CUDA> fake_guard;
}
extern "C" int rlkernels_fake_cuda_guard() {
  auto& slot = c10::impl::device_guard_impl_registry[static_cast<size_t>(c10::DeviceType::CUDA)];
  if (slot.load() != nullptr) return 0;
  slot.store(&fake_guard);
  return 1;
}
"""
_LOADED: list = []


def install(build_dir: str) -> str | None:
    """Registers the fake CUDA guard where torch has none; returns why it cannot, or None."""
    if _LOADED:
        return None
    from torch.utils.cpp_extension import include_paths

    compiler = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")
    if compiler is None:
        return "no C++ compiler"
    lib = os.path.join(os.path.dirname(torch.__file__), "lib")
    source, shared = os.path.join(build_dir, "fake_cuda_guard.cpp"), os.path.join(build_dir, "fake_cuda_guard.so")
    with open(source, "w") as f:
        f.write(_SOURCE)
    command = [compiler, "-O1", "-shared", "-fPIC", "-std=c++17", *(f"-I{p}" for p in include_paths()[:1]), source,
               f"-L{lib}", "-lc10", f"-Wl,-rpath,{lib}", "-o", shared]
    # (without the sanitizer run's preloaded libraries: the compiler is not ours to check)
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    if done.returncode != 0:
        return f"the fake CUDA guard did not compile: {done.stderr[-500:]}"
    handle = ctypes.CDLL(shared)
    handle.rlkernels_fake_cuda_guard()
    _LOADED.append(handle)
    return None
