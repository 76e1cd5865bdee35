"""PNG of a run's curves (reward, loss, KL, ...) from its metrics records."""
from __future__ import annotations

import math
from typing import Sequence, Union

# A panel: one key, or several keys drawn together with a legend.  A key whose values
# are lists (the decentralized trainer's agent_rewards) draws one line per element.
Panel = Union[str, Sequence[str]]


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _series(records: Sequence[dict], key: str) -> list[tuple[str, list[int], list[float]]]:
    """(label, steps, values) of each line key draws."""
    width = max((len(r[key]) for r in records if isinstance(r.get(key), list)), default=0)
    if width:
        lines = []
        for i in range(width):
            points = [(r["step"], r[key][i]) for r in records
                      if isinstance(r.get(key), list) and len(r[key]) > i and _number(r[key][i])]
            label = f"agent {i}" if key.startswith("agent_") else f"{key}[{i}]"
            lines.append((label, [s for s, _ in points], [v for _, v in points]))
        return lines
    points = [(r["step"], r[key]) for r in records if _number(r.get(key))]
    return [(key, [s for s, _ in points], [v for _, v in points])] if points else []


def save_curves(records: Sequence[dict], path: str, *, keys: Sequence[Panel] = ("reward", "loss", "kl"),
                title: str = "") -> str | None:
    """One panel per entry of `keys` present in the records (raw values and, for a single
    line, a moving average); returns the path, or None when there is nothing to plot."""
    panels = []
    for panel in keys:
        names = (panel,) if isinstance(panel, str) else tuple(panel)
        lines = [line for name in names for line in _series(records, name)]
        if any(values for _, _, values in lines):
            panels.append((" / ".join(names), lines))
    if not panels:
        return None
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.2), squeeze=False)
    for ax, (name, lines) in zip(axes[0], panels):
        if len(lines) == 1:
            _, steps, values = lines[0]
            ax.plot(steps, values, lw=0.8, alpha=0.45, color="tab:blue")
            window = max(1, len(values) // 15)
            if window > 1:
                smooth = [sum(values[max(0, i - window + 1): i + 1]) / len(values[max(0, i - window + 1): i + 1])
                          for i in range(len(values))]
                ax.plot(steps, smooth, lw=1.8, color="tab:blue")
        else:
            for label, steps, values in lines:
                ax.plot(steps, values, lw=1.2, label=label)
            ax.legend(fontsize=7)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
