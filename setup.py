"""Builds rlkernels._C: the C++ CPU kernels always, the CUDA kernels when torch
has CUDA and a CUDA toolkit is found (RLKERNELS_CUDA=0|1|auto).

Build with `pip install --no-build-isolation .` so the installed torch is used.
Set RLKERNELS_NATIVE=1 to add -march=native for a local, non-portable build.
Set RLKERNELS_SANITIZE=address,undefined (any -fsanitize= list) for a sanitizer
build of the CPU kernels (see .ci/sanitize.sh; CUDA is left out of such a build).
"""
import glob
import os

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _want_cuda():
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    mode = os.environ.get("RLKERNELS_CUDA", "auto").lower()
    if mode not in ("0", "1", "auto"):
        raise RuntimeError(f"RLKERNELS_CUDA must be 0, 1 or auto, got {mode!r}")
    available = torch.version.cuda is not None and CUDA_HOME is not None
    if mode == "1" and not available:
        raise RuntimeError(
            "RLKERNELS_CUDA=1 but this torch has no CUDA (torch.version.cuda="
            f"{torch.version.cuda!r}) or no CUDA toolkit was found (CUDA_HOME={CUDA_HOME!r})"
        )
    return mode != "0" and available


def _sanitizers():
    value = os.environ.get("RLKERNELS_SANITIZE", "").strip()
    if value and not all(part in ("address", "undefined", "leak") for part in value.split(",")):
        raise RuntimeError(f"RLKERNELS_SANITIZE must list address, undefined or leak, got {value!r}")
    return value


def _extension():
    import torch
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    sanitize = _sanitizers()
    use_cuda = _want_cuda() and not sanitize
    # csrc/autograd: the compiled ops' autograd (Autograd dispatch key), for CPU and CUDA alike;
    # csrc/lm_head: device-generic op bodies over ATen ops and the dispatcher (CPU and CUDA keys).
    sources = (_sources("csrc/*.cpp") + _sources("csrc/cpu/*.cpp") + _sources("csrc/lm_head/*.cpp")
               + _sources("csrc/autograd/*.cpp"))
    # -fopenmp: ATen's parallel_for is an inline OpenMP region in the header; without
    # the flag it silently runs on one thread.  -fno-trapping-math lets GCC if-convert
    # (and so vectorise) loops with selects around floating-point arithmetic; results
    # are unchanged.
    cxx = ["-O3", "-fopenmp", "-fvisibility=hidden", "-Wall", "-Wno-unused-function", "-fno-trapping-math"]
    if os.environ.get("RLKERNELS_NATIVE") == "1":
        cxx.append("-march=native")
    link = ["-fopenmp"]
    if sanitize:
        # -O1 keeps reports exact; a UB finding aborts instead of printing and going on.
        flags = [f"-fsanitize={sanitize}", "-fno-omit-frame-pointer", "-g"]
        if "undefined" in sanitize:
            flags.append("-fno-sanitize-recover=undefined")
        cxx = [f for f in cxx if f != "-O3"] + ["-O1"] + flags
        link += flags
    # The C++ standard is left to torch.utils.cpp_extension, which picks the one
    # its headers need (C++17 up to torch 2.13, C++20 from 2.14).
    extra = {"cxx": cxx}
    macros = []
    if use_cuda:
        # Without a list torch builds for the visible GPU only, or guesses with none.
        # The default: A100 and H100 code, plus sm_90 PTX that newer GPUs (Blackwell)
        # JIT-compile at load instead of failing with "no kernel image".
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
        # One .cu per family: kernels and launchers, then its torch ops behind
        # #ifdef TORCH_EXTENSION_NAME, which BuildExtension passes to nvcc too.
        sources += _sources("csrc/cuda/*.cu")
        extra["nvcc"] = ["-O3", "-lineinfo"]
        archs = os.environ["TORCH_CUDA_ARCH_LIST"]
        macros += [("RLK_WITH_CUDA", None), ("RLK_CUDA_ARCHS", f'"{archs}"')]
        extra["nvcc"].append("-Xcompiler=-fopenmp")
        return CUDAExtension("rlkernels._C", sources, extra_compile_args=extra, define_macros=macros,
                             extra_link_args=link)
    return CppExtension("rlkernels._C", sources, extra_compile_args=extra, define_macros=macros,
                        extra_link_args=link)


def _build_ext():
    from torch.utils.cpp_extension import BuildExtension

    return BuildExtension.with_options(use_ninja=True)


setup(ext_modules=[_extension()], cmdclass={"build_ext": _build_ext()})
