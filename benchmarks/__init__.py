"""rlkernels microbenchmarks against pure-PyTorch baselines (`rlkernels bench`,
`python -m benchmarks`).  One module per op family, each exposing
`cases(device, quick) -> list[Case]`."""

FAMILIES = {
    "advantages": "benchmarks.advantages",
    "losses": "benchmarks.losses",
    "logprobs": "benchmarks.logprobs",
}
