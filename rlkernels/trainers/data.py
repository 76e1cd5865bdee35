"""Where prompts and preference pairs come from: the embedded toy language (generated
in code from the run's seed) or JSONL files in the common prompt/chosen/rejected form.
Batches are drawn with the trainer's own `random.Random`, which checkpoints save, so
a resumed run sees the batches an uninterrupted one would."""
from __future__ import annotations

import random

from . import toy


class Prompts:
    def __init__(self, path: str | None = None, *, negative_fraction: float = 0.0):
        self.negative_fraction = negative_fraction
        self.rows = [r["prompt"] for r in toy.load_jsonl(path, keys=("prompt",))] if path else None

    def batch(self, n: int, rng: random.Random) -> list[str]:
        if self.rows is None:
            return toy.sample_prompts(n, rng, self.negative_fraction)
        return [self.rows[rng.randrange(len(self.rows))] for _ in range(n)]


class Pairs:
    """Preference pairs split into train and held-out eval rows."""

    def __init__(self, path: str | None = None, *, num_pairs: int = 2048, eval_pairs: int = 256, seed: int = 0,
                 noise: float = 0.0, negative_fraction: float = 0.0):
        if path:
            rows = toy.load_jsonl(path)
            cut = max(1, min(eval_pairs, len(rows) // 5)) if len(rows) > 1 else 0
            self.train, self.eval = rows[cut:] or rows, rows[:cut]
        else:
            rows = toy.preference_pairs(num_pairs + eval_pairs, seed=seed, noise=noise,
                                        negative_fraction=negative_fraction)
            self.train, self.eval = rows[eval_pairs:], rows[:eval_pairs]

    @classmethod
    def from_config(cls, cfg) -> "Pairs":
        """The pairs of a DPO or reward-model config: its data, num_pairs, eval_pairs,
        annotator_noise, negative_prompts and seed."""
        return cls(cfg.data, num_pairs=cfg.num_pairs, eval_pairs=cfg.eval_pairs, seed=cfg.seed,
                   noise=cfg.annotator_noise, negative_fraction=cfg.negative_prompts)

    def batch(self, n: int, rng: random.Random) -> list[dict]:
        return [self.train[rng.randrange(len(self.train))] for _ in range(n)]
