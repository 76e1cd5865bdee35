"""rlkernels microbenchmarks against pure-PyTorch baselines (`rlkernels bench`,
`python -m rlkernels.benchmarks`).  One module per op family, each exposing
`cases(device, quick) -> list[Case]`, or `run(device, quick) -> list[dict]` for
families that drive several processes themselves (distributed)."""

FAMILIES = {
    "advantages": "rlkernels.benchmarks.advantages",
    "logprobs": "rlkernels.benchmarks.logprobs",
    "losses": "rlkernels.benchmarks.losses",
    "distributed": "rlkernels.benchmarks.distributed",
}
