"""After the CUDA build: rlkernels imports, reports CUDA, the default arch list
was used (A100 and H100 code plus sm_90 PTX for newer GPUs, and the library really
holds that PTX), and every op that has a CPU kernel also has a CUDA kernel
registered with the dispatcher.  A build made with TORCH_CUDA_ARCH_LIST set (a
quick local compile) is checked against that list instead; CI unsets it."""
import os
import re
import shutil
import subprocess

import torch

import rlkernels

info = rlkernels.info()
print("build:", {k: info[k] for k in ("backends", "cuda_archs", "torch", "torch_cuda")})
assert "cuda" in info["backends"], info
DEFAULT_ARCHS = "8.0;9.0+PTX"
wanted = os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_ARCHS
assert info["cuda_archs"] == wanted, (info["cuda_archs"], wanted)


def embedded_archs(arch_list: str):
    """The cubin and PTX architectures a TORCH_CUDA_ARCH_LIST asks for ("8.0;9.0+PTX")."""
    cubin, ptx = set(), set()
    for entry in arch_list.replace(" ", ";").split(";"):
        if entry:
            sm = "sm_" + entry.replace("+PTX", "").replace(".", "")
            cubin.add(sm)
            if entry.endswith("+PTX"):
                ptx.add(sm)
    return sorted(cubin), sorted(ptx)



def find_cuobjdump() -> str:
    """The toolkit's cuobjdump, or the one Triton bundles (a toolkit of nvcc alone has none)."""
    candidates = [shutil.which("cuobjdump"),
                  os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "cuobjdump")]
    try:
        import triton
        candidates.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"))
    except ImportError:
        pass
    for path in candidates:
        if path and os.access(path, os.X_OK):
            return path
    raise SystemExit(f"cuobjdump not found (looked at {candidates})")


cuobjdump = find_cuobjdump()
listing = subprocess.run([cuobjdump, "--list-ptx", "--list-elf", rlkernels._C.__file__], capture_output=True,
                         text=True, check=True).stdout
ptx_archs = sorted(set(re.findall(r"\.(sm_\d+)\.ptx", listing)))
elf_archs = sorted(set(re.findall(r"\.(sm_\d+)\.cubin", listing)))
print("embedded:", {"cubin": elf_archs, "ptx": ptx_archs})
want_cubin, want_ptx = embedded_archs(wanted)
assert elf_archs == want_cubin, (want_cubin, listing[-2000:])
assert ptx_archs == want_ptx, (want_ptx, listing[-2000:])

schemas = [s for s in torch._C._jit_get_all_schemas() if s.name.startswith("rlkernels::")]
names = sorted({s.name for s in schemas})
missing = []
for name in names:
    if torch._C._dispatch_has_kernel_for_dispatch_key(name, "CPU"):
        if not torch._C._dispatch_has_kernel_for_dispatch_key(name, "CUDA"):
            missing.append(name)
print(f"{len(names)} rlkernels ops; CPU ops without a CUDA kernel: {missing}")
assert not missing, f"ops with a CPU kernel but no CUDA kernel: {missing}"
print("CUDA build OK")
