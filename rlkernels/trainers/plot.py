"""PNG of a run's curves (reward, loss, KL, ...) from its metrics records."""
from __future__ import annotations

import math
from typing import Sequence


def save_curves(records: Sequence[dict], path: str, *, keys: Sequence[str] = ("reward", "loss", "kl"),
                title: str = "") -> str | None:
    """One panel per key present in the records (raw values and a moving average);
    returns the path, or None when there is nothing to plot."""
    keys = [k for k in keys if any(isinstance(r.get(k), (int, float)) for r in records)]
    if not keys:
        return None
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.2), squeeze=False)
    for ax, key in zip(axes[0], keys):
        points = [(r["step"], r[key]) for r in records
                  if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
        steps = [s for s, _ in points]
        values = [v for _, v in points]
        ax.plot(steps, values, lw=0.8, alpha=0.45, color="tab:blue")
        window = max(1, len(values) // 15)
        if window > 1:
            smooth = [sum(values[max(0, i - window + 1): i + 1]) / len(values[max(0, i - window + 1): i + 1])
                      for i in range(len(values))]
            ax.plot(steps, smooth, lw=1.8, color="tab:blue")
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
