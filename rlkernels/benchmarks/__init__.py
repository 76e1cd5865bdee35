"""rlkernels microbenchmarks against pure-PyTorch baselines (`rlkernels bench`,
`python -m rlkernels.benchmarks`).  One module per op family, each exposing
`cases(device, quick) -> list[Case]`, or `run(device, quick) -> list[dict]` for
families that time in their own way (distributed: several processes; overhead:
per-call cost on tiny inputs; busy: threads under load)."""

FAMILIES = {
    "advantages": "rlkernels.benchmarks.advantages",
    "logprobs": "rlkernels.benchmarks.logprobs",
    "losses": "rlkernels.benchmarks.losses",
    "packed": "rlkernels.benchmarks.packed",
    "distributed": "rlkernels.benchmarks.distributed",
    "overhead": "rlkernels.benchmarks.overhead",
    "busy": "rlkernels.benchmarks.busy",
    "vocab_parallel": "rlkernels.benchmarks.vocab_parallel",
}
