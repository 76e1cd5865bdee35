"""The launches .ci/triton_aot.py compiles: each Triton op's host wrapper run on `meta`
tensors of realistic sizes, with every kernel launch recorded instead of run.

Importing this module replaces JITFunction.run with the recorder, so it must come before
anything launches a kernel; TRITON_INTERPRET is cleared first so that the kernels are
decorated for compiling, not for the interpreter.  A new Triton op needs a case in
cases() below, or triton_aot.py fails naming it."""
from __future__ import annotations

import dataclasses
import os

os.environ.pop("TRITON_INTERPRET", None)  # compile for real: decided when the kernels are decorated

import torch  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

@dataclasses.dataclass
class Launch:
    kernel: JITFunction
    args: tuple
    kwargs: dict
    grid: object
    case: str


_recorded: list[Launch] = []
_current_case = [""]


def _record(self, *args, grid, warmup, **kwargs):
    _recorded.append(Launch(self, args, dict(kwargs), grid, _current_case[0]))


JITFunction.run = _record  # every kernel[grid](...) in the wrappers lands here

import rlkernels  # noqa: E402,F401  (imports the Triton modules: their ops and kernels)
from rlkernels import triton as rlk_triton  # noqa: E402
from rlkernels.ops._registry import TWINS  # noqa: E402
from rlkernels.triton import (_token_loss, gae, group_advantages, kl_from_logits, kl_penalty,  # noqa: E402
                              kl_vocab_tile, logprobs, masked, multi_tensor, policy_loss, preference, value_loss)

MODULES = (gae, group_advantages, masked, kl_penalty, logprobs, kl_from_logits, kl_vocab_tile, _token_loss,
           policy_loss, value_loss, multi_tensor, preference)
F32, BF16, F16, F64 = torch.float32, torch.bfloat16, torch.float16, torch.float64


def meta(*shape, dtype=F32):
    return torch.empty(shape, dtype=dtype, device="meta")


def strided_logits(B, T, V, dtype):
    """[B, T, V] logits that are a slice of [B, T + 1, V] (a causal LM's outputs)."""
    return meta(B, T + 1, V, dtype=dtype)[:, :-1]


def labels(*shape):
    return meta(*shape, dtype=torch.int64)


def mask(*shape):
    return meta(*shape, dtype=torch.bool)


# 4097: a row of at most logprobs' vocabulary chunk (one program per row, odd length);
# the others are split into chunks (a (row, chunk) grid and a merge).
VOCABS = (4097, 32000, 50257, 128256, 151936)
QUICK_VOCABS = (4097, 50257)
LOGIT_DTYPES = (F32, BF16, F16)


def logits_cases(quick: bool):
    """(name, logits) over the vocabularies, dtypes and token counts of real models."""
    vocabs = QUICK_VOCABS if quick else VOCABS
    for V in vocabs:
        for dtype in LOGIT_DTYPES:
            d = str(dtype).split(".")[1]
            yield f"V={V} {d} 1 token", meta(1, V, dtype=dtype)
            yield f"V={V} {d} 65536 tokens", meta(65536, V, dtype=dtype)
            yield f"V={V} {d} [8, 4097, V][:, :-1]", strided_logits(8, 4096, V, dtype)


def cases(quick: bool):
    """Yields (op name, case name, thunk): each thunk calls one Triton op's host wrapper."""
    T = logprobs
    for name, x in logits_cases(quick):
        lead = x.shape[:-1]
        n = x.numel() // x.shape[-1]
        for ent in (False, True):
            yield "logprobs_triton", f"{name} entropy={ent}", (
                lambda x=x, lead=lead, ent=ent: T.logprobs_triton(x, labels(*lead), 1.0, -100, ent, False))
            grad_entropy = meta(*lead) if ent else None
            args = (meta(*lead), grad_entropy, x, labels(*lead), meta(*lead, 2), meta(*lead) if ent else meta(0),
                    0.7, -100)
            yield "logprobs_backward_triton", f"{name} entropy={ent}", (
                lambda args=args: T.logprobs_backward_triton(*args))
            yield "logprobs_backward_inplace_triton", f"{name} entropy={ent}", (
                lambda args=args: T.logprobs_backward_inplace_triton(*args))
            for start, finish in ((0, False), (4096, True)):
                tile = x[..., :4096]
                for width in (4, 5):  # 5: the state also tracks whether the label is the arg-max
                    yield "logprobs_vocab_tile_triton", f"{name} tile entropy={ent} finish={finish} state={width}", (
                        lambda tile=tile, lead=lead, n=n, ent=ent, start=start, finish=finish, width=width:
                        T.logprobs_vocab_tile_triton(tile, labels(*lead), meta(n * width), 1.0, -100,
                                                              start, ent, finish))
        for with_mask in (False, True):
            m = mask(*lead) if with_mask else None
            yield "kl_from_logits_triton", f"{name} mask={with_mask}", (
                lambda x=x, m=m: kl_from_logits.kl_from_logits_triton(x, x, m, 1.0))
            for lg, rg in ((True, False), (False, True), (True, True)):
                yield "kl_from_logits_backward_triton", f"{name} mask={with_mask} grads={lg},{rg}", (
                    lambda x=x, m=m, lead=lead, lg=lg, rg=rg: kl_from_logits.kl_from_logits_backward_triton(
                        meta(*lead), x, x, m, meta(*lead, 5), 1.0, lg, rg))
        # KL's per-chunk statistics: the whole row as one tile with finish, and a fold alone
        chunks = -(-x.shape[-1] // 8192)
        for tile, start in ((x, 0), (x[..., :0], x.shape[-1])):
            yield "kl_vocab_tile_triton", f"{name} tile of {tile.shape[-1]} finish", (
                lambda tile=tile, start=start, lead=lead, chunks=chunks: kl_vocab_tile.kl_vocab_tile_triton(
                    tile, tile, meta(*lead, chunks, 6), 1.0, start, True))

    # GAE's tile shape follows T: [1, 512] tiles at T = 4096, [4, 128] at T = 127, [32, 16] at T = 1
    seq_shapes = ((1, 1), (256, 4096), (8, 4096), (1024, 127))
    seq_dtypes = (F32, BF16, F16, F64)
    for (B, L) in seq_shapes:
        for dtype in seq_dtypes:
            d = f"[{B}, {L}] {str(dtype).split('.')[1]}"
            for has_mask in (False, True):
                for has_dones in (False, True):
                    for has_last in (False, True):
                        yield "gae_triton", f"{d} mask={has_mask} dones={has_dones} last={has_last}", (
                            lambda B=B, L=L, dtype=dtype, hm=has_mask, hd=has_dones, hl=has_last:
                            gae.gae_triton(meta(B, L, dtype=dtype), meta(B, L, dtype=dtype),
                                                    mask(B, L) if hm else None, mask(B, L) if hd else None,
                                                    meta(B, dtype=F64 if dtype == F64 else F32) if hl else None,
                                                    0.99, 0.95))
                    yield "discounted_returns_triton", f"{d} mask={has_mask} dones={has_dones}", (
                        lambda B=B, L=L, dtype=dtype, hm=has_mask, hd=has_dones:
                        gae.discounted_returns_triton(meta(B, L, dtype=dtype), mask(B, L) if hm else None,
                                                               mask(B, L) if hd else None, 0.99))
                yield "masked_row_mean_triton", f"{d} mask={has_mask}", (
                    lambda B=B, L=L, dtype=dtype, hm=has_mask:
                    masked.masked_row_mean_triton(meta(B, L, dtype=dtype), mask(B, L) if hm else None))
                for shift in (False, True):
                    yield "masked_whiten_triton", f"{d} mask={has_mask} shift_mean={shift}", (
                        lambda B=B, L=L, dtype=dtype, hm=has_mask, shift=shift:
                        masked.masked_whiten_triton(meta(B, L, dtype=dtype), mask(B, L) if hm else None,
                                                            shift, 1e-8))
                for average in (False, True):
                    yield "sequence_logprobs_triton", f"{d} mask={has_mask} average={average}", (
                        lambda B=B, L=L, dtype=dtype, hm=has_mask, average=average:
                        preference.sequence_logprobs_triton(meta(B, L, dtype=dtype),
                                                                      mask(B, L) if hm else None, average))
                    acc = F64 if dtype == F64 else F32
                    yield "sequence_logprobs_backward_triton", f"{d} mask={has_mask} average={average}", (
                        lambda B=B, L=L, dtype=dtype, acc=acc, hm=has_mask, average=average:
                        preference.sequence_logprobs_backward_triton(
                            meta(B, dtype=acc), mask(B, L) if hm else None, meta(B, dtype=acc), average, L, dtype))
                    # the fused step over [2B, L]: every kind once (mask, sums), sigmoid with each
                    # mask/average combination
                    for kind in preference._KINDS:
                        if kind != "sigmoid" and (average or not has_mask):
                            continue
                        yield "dpo_sequence_loss_triton", f"{d} kind={kind} mask={has_mask} average={average}", (
                            lambda B=B, L=L, dtype=dtype, hm=has_mask, average=average, kind=kind:
                            preference.dpo_sequence_loss_triton(
                                meta(2 * B, L, dtype=dtype), meta(2 * B, L, dtype=dtype),
                                mask(2 * B, L) if hm else None, 0.1, kind, 0.0, average))
                if has_mask:
                    yield "dpo_sequence_loss_backward_triton", f"{d} mask={has_mask}", (
                        lambda B=B, L=L, dtype=dtype, acc=acc:
                        preference.dpo_sequence_loss_backward_triton(
                            meta(B, dtype=acc), mask(2 * B, L), meta(2 * B, dtype=acc), -1.0, L, dtype))
                else:
                    yield "dpo_sequence_loss_backward_triton", f"{d} mask={has_mask}", (
                        lambda B=B, L=L, dtype=dtype, acc=acc:
                        preference.dpo_sequence_loss_backward_triton(
                            meta(B, dtype=acc), None, meta(2 * B, dtype=acc), 1.0, L, dtype))
            for kind in sorted(set(kl_penalty.KIND_CODES.values())):
                name = next(k for k, v in kl_penalty.KIND_CODES.items() if v == kind)
                for clamp in (float("inf"), 10.0):
                    yield "kl_penalty_triton", f"{d} kind={name} clamp={clamp}", (
                        lambda B=B, L=L, dtype=dtype, name=name, clamp=clamp:
                        kl_penalty.kl_penalty_triton(meta(B, L, dtype=dtype), meta(B, L, dtype=dtype),
                                                              name, clamp))
            acc = F64 if dtype == F64 else F32
            for need_grad in (False, True):
                for agg in _token_loss._AGG_CODES:
                    for kl in policy_loss._KL_CODES:
                        for variant in ("plain", "mask+weights+dual+per-row-adv"):
                            rich = variant != "plain"
                            yield "policy_loss_triton", f"{d} agg={agg} kl={kl} {variant} grad={need_grad}", (
                                lambda B=B, L=L, dtype=dtype, agg=agg, kl=kl, rich=rich, g=need_grad:
                                policy_loss.policy_loss_triton(
                                    meta(B, L, dtype=dtype), meta(B, L, dtype=dtype),
                                    meta(B, dtype=dtype) if rich else meta(B, L, dtype=dtype),
                                    mask(B, L) if rich else None, meta(B, L, dtype=dtype) if rich else None,
                                    meta(B, L, dtype=dtype) if kl != "none" else None,
                                    [0.2, 0.28, 3.0 if rich else float("inf"), 20.0, 0.05, -1.0, -1.0, -1.0],
                                    kl, agg, g))
                    for clip in (float("inf"), 0.2):
                        yield "value_loss_triton", f"{d} agg={agg} clip={clip} grad={need_grad}", (
                            lambda B=B, L=L, dtype=dtype, agg=agg, clip=clip, g=need_grad:
                            value_loss.value_loss_triton(meta(B, L, dtype=dtype), meta(B, L, dtype=dtype),
                                                              meta(B, L, dtype=dtype), mask(B, L), [clip, -1.0, -1.0,
                                                                                                   -1.0], agg, g))
            yield "scale_rows_triton", d, (
                lambda B=B, L=L, dtype=dtype, acc=acc:
                _token_loss.scale_rows_triton(meta(B, L, dtype=acc), meta(B, dtype=acc), meta(dtype=acc), dtype))

    for B in (1, 4096, 300001):
        for dtype in (F32, BF16, F16, F64):
            d = f"B={B} {str(dtype).split('.')[1]}"
            for kind in preference._KINDS:
                yield "dpo_loss_triton", f"{d} kind={kind}", (
                    lambda B=B, dtype=dtype, kind=kind:
                    preference.dpo_loss_triton(*(meta(B, dtype=dtype) for _ in range(4)), 0.1, kind, 0.1))
            # groups of one, of 8 where 8 divides the batch, and ids given per score, groups of 8
            # and of about 1024 on average (a block fits the group: 16 at size 1 and 8, 1024 at
            # 1024 and more; ids: the mean group's, each program reading its run of the id order)
            layouts = [(B, False)] + ([(B // 8, False)] if B % 8 == 0 else []) + [(max(B // 8, 1), True)]
            layouts += [(B // 1024, True)] if B >= 1024 else []
            layouts += [(1, False)] if B == 4096 else []
            for G, idx in layouts:
                for baseline in (0, 1):
                    for scale in (0, 1, 2):
                        yield "group_advantages_triton", f"{d} groups={G} index={idx} baseline={baseline} scale={scale}", (
                            lambda B=B, dtype=dtype, G=G, idx=idx, baseline=baseline, scale=scale:
                            group_advantages.group_advantages_triton(
                                meta(B, dtype=dtype), labels(B) if idx else None, 0 if idx else B // G, G,
                                baseline, scale, 1e-6))

    for dtype in (F32, BF16, F16, F64):
        d = str(dtype).split(".")[1]
        params = [meta(4096, 4096, dtype=dtype), meta(1, dtype=dtype), meta(50257, 768, dtype=dtype)]
        total = sum(p.numel() for p in params)
        for bucket_dtype in {dtype, F32}:
            b = str(bucket_dtype).split(".")[1]
            for scale in (1.0, 0.25):
                yield "pack_tensors_triton", f"{d} -> bucket {b} scale={scale}", (
                    lambda params=params, total=total, bd=bucket_dtype, scale=scale:
                    multi_tensor.pack_tensors_triton(params, meta(total, dtype=bd), scale))
                yield "unpack_tensors_triton", f"bucket {b} -> {d} scale={scale}", (
                    lambda params=params, total=total, bd=bucket_dtype, scale=scale:
                    multi_tensor.unpack_tensors_triton(meta(total, dtype=bd), params, scale))
        for n in (1, 2**26 + 3):
            yield "gossip_mix_triton", f"{d} n={n}", (
                lambda n=n, dtype=dtype: multi_tensor.gossip_mix_triton(
                    meta(n, dtype=dtype), meta(n, dtype=dtype), meta(n, dtype=dtype), 0.5, 0.25, 0.25,
                    meta(n, dtype=dtype)))


def triton_ops() -> dict[str, object]:
    """Every Triton custom op the package defines, by short name."""
    return dict(TWINS)


def triton_kernels() -> dict[str, JITFunction]:
    """Every launchable @triton.jit kernel (jitted helpers excepted: they are inlined)."""
    found = {}
    for module in MODULES + (rlk_triton._common,):
        for value in vars(module).values():
            if isinstance(value, JITFunction) and value.fn.__name__.endswith("_kernel"):
                found[f"{module.__name__.rsplit('.', 1)[-1]}.{value.fn.__name__}"] = value
    return found


def record(quick: bool, only: list[str] | None = None) -> tuple[list[Launch], list[str], dict, dict]:
    """Runs every case (those of the ops whose names contain one of `only`, if given)
    and returns (the recorded launches, the problems found, the Triton ops, the
    kernels).  A problem: a wrapper that fails or launches nothing, a Triton op
    without a case, or (without `only`) a kernel that no case launches."""
    errors: list[str] = []
    ops = triton_ops()
    kernels = triton_kernels()
    covered = set()
    for op, case, thunk in cases(quick):
        covered.add(op)
        if only and not any(o in op for o in only):
            continue
        _current_case[0] = f"{op}: {case}"
        before = len(_recorded)
        try:
            thunk()
        except Exception as exc:  # noqa: BLE001
            errors.append(f"{op} [{case}]: the host wrapper failed on meta tensors: {exc!r}")
            continue
        if len(_recorded) == before:
            errors.append(f"{op} [{case}]: launched no kernel")
    for missing in sorted(set(ops) - covered):
        errors.append(f"rlkernels::{missing}: no ahead-of-time case in .ci/triton_aot_cases.py")
    launched = {f"{launch.kernel.fn.__module__.rsplit('.', 1)[-1]}.{launch.kernel.fn.__name__}"
                for launch in _recorded}
    for name in sorted(set(kernels) - launched if not only else ()):
        errors.append(f"{name}: no case launches this kernel")
    return _recorded, errors, ops, kernels
