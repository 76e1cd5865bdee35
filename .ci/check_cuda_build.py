"""After the CUDA build: rlkernels imports, reports CUDA, and every op that has a
CPU kernel also has a CUDA kernel registered with the dispatcher."""
import torch

import rlkernels

info = rlkernels.info()
print("build:", {k: info[k] for k in ("backends", "cuda_archs", "torch", "torch_cuda")})
assert "cuda" in info["backends"], info
assert info["cuda_archs"] == "8.0;9.0", info["cuda_archs"]

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
