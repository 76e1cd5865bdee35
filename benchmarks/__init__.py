"""rlkernels microbenchmarks against pure-PyTorch baselines (`rlkernels bench`,
`python -m benchmarks`).  One module per op family, each exposing
`cases(device, quick) -> list[Case]`, or `run(device, quick) -> list[dict]` for
families that drive several processes themselves (distributed)."""

FAMILIES = {
    "advantages": "benchmarks.advantages",
    "logprobs": "benchmarks.logprobs",
    "losses": "benchmarks.losses",
    "distributed": "benchmarks.distributed",
}
