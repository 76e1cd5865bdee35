"""The one dtype rule every op follows: reductions and recurrences accumulate in
float32 (float64 input stays float64), and outputs that feed losses use that dtype."""
from __future__ import annotations

import torch


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32
