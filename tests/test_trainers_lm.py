"""The language-model trainers (reward model, PPO-RLHF, GRPO, DPO) and the embedded
default they train on: a few steps of each at tiny sizes with their output files,
exact resume, the kernels switch, reward-model scoring, and learning tests (reward
goes up, preference accuracy rises above chance) on the embedded default."""
from __future__ import annotations

import json
import os
import random

import pytest
import torch

from rlkernels import trainers
from rlkernels.trainers import lm, toy
from rlkernels.trainers.data import Pairs, Prompts

TINY_MODEL = {"n_layer": 1, "n_embd": 32, "n_head": 2, "pretrain_steps": 10}
# the demo's model: the learning tests share its (cached) warm-up
LEARN_MODEL = {"n_layer": 2, "n_embd": 64, "n_head": 4, "pretrain_steps": 150}
TINY = {
    "reward-model": {"batch_size": 8, "num_pairs": 64, "eval_pairs": 16, "eval_every": 2},
    "ppo-rlhf": {"batch_size": 8, "minibatch_size": 4, "max_new_tokens": 6},
    "grpo": {"prompts_per_step": 2, "group_size": 4, "minibatch_size": 4, "iterations": 2, "max_new_tokens": 6},
    "dpo": {"batch_size": 8, "num_pairs": 64, "eval_pairs": 16, "eval_every": 2, "sample_eval": 4,
            "max_new_tokens": 6},
}
LM_TRAINERS = tuple(TINY)


def tiny(name: str, **extra) -> dict:
    return {"model": dict(TINY_MODEL), "progress": False, "plot": False, **TINY[name], **extra}


# ---------------------------------------------------------------- the embedded default
def test_tokenizer_round_trip():
    tokenizer = toy.build_tokenizer()
    text = "write a positive review of the movie : the movie was very good <eos>"
    ids = tokenizer(text)["input_ids"]
    assert len(ids) == len(text.split()) and tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids) == text
    assert tokenizer("the zebra")["input_ids"][1] == tokenizer.unk_token_id
    batch = tokenizer(["the movie", "it was good"], padding=True)["input_ids"]
    assert batch[0][0] == tokenizer.pad_token_id  # left padding for generation


def test_rule():
    positive, negative = "write a positive review of the movie :", "write a negative review of the movie :"
    assert toy.sentiment_score(positive, "it was great") == 0.5
    assert toy.sentiment_score(positive, "it was great and lovely and fun") == 1.0  # clipped
    assert toy.sentiment_score(positive, "it was bad") == -0.5
    assert toy.sentiment_score(negative, "it was bad") == 0.5
    assert toy.sentiment_score(positive, "it was long") == 0.0
    assert toy.sentiment_score(positive, "it was good <eos> great great") == 0.5  # nothing after EOS counts


def test_annotator_pairs():
    pairs = toy.preference_pairs(200, seed=1)
    assert all(toy.sentiment_score(p["prompt"], p["chosen"]) > toy.sentiment_score(p["prompt"], p["rejected"])
               for p in pairs)
    assert pairs == toy.preference_pairs(200, seed=1)
    noisy = toy.preference_pairs(400, seed=1, noise=0.5)
    wrong = sum(toy.sentiment_score(p["prompt"], p["chosen"]) < toy.sentiment_score(p["prompt"], p["rejected"])
                for p in noisy)
    assert 0 < wrong < 200
    mixed = toy.preference_pairs(200, seed=1, negative_fraction=0.5)
    assert 50 < sum("negative" in p["prompt"] for p in mixed) < 150


def test_jsonl_loader(tmp_path):
    rows = toy.preference_pairs(5, seed=0)
    path = str(tmp_path / "pairs.jsonl")
    toy.write_jsonl(path, rows)
    assert toy.load_jsonl(path) == rows
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a", "chosen": "b"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: missing key 'rejected'"):
        toy.load_jsonl(str(tmp_path / "bad.jsonl"))
    (tmp_path / "broken.jsonl").write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n\n{oops\n')
    with pytest.raises(ValueError, match=r"broken.jsonl:3: not valid JSON"):
        toy.load_jsonl(str(tmp_path / "broken.jsonl"))
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "write a review of the food :"}\n')
    assert Prompts(str(tmp_path / "prompts.jsonl")).batch(3, random.Random(0)) == ["write a review of the food :"] * 3
    split = Pairs(path)
    assert len(split.eval) == 1 and len(split.train) == 4


def test_packing_and_masks():
    tokenizer = toy.build_tokenizer()
    ids, attention, labels = lm.encode_pairs(tokenizer, ["the movie :", "it :"], ["was good", "was bad <eos>"],
                                             max_length=16)
    eos = tokenizer.eos_token_id
    assert ids.shape == (2, 6) and attention[1].tolist() == [0, 1, 1, 1, 1, 1]
    scored = [tokenizer.convert_ids_to_tokens(int(t)) for t in labels[0][labels[0] != lm.IGNORE_INDEX]]
    assert scored == ["was", "good", "<eos>"]  # EOS appended once, prompt not scored
    assert (labels[1] != lm.IGNORE_INDEX).sum() == 3
    responses = torch.tensor([[5, eos, 0, 0], [5, 6, 7, 8], [eos, eos, eos, eos]])
    assert lm.response_mask(responses, eos).tolist() == [[True, True, False, False], [True] * 4,
                                                          [True, False, False, False]]


# ---------------------------------------------------------------- every trainer runs
@pytest.mark.parametrize("name", LM_TRAINERS)
def test_trainer_runs_and_writes_outputs(name, tmp_path):
    out = str(tmp_path / name)
    metrics = trainers.train(name, tiny(name, steps=2, plot=True), out)
    assert [m["step"] for m in metrics] == [1, 2]
    with open(os.path.join(out, "metrics.jsonl")) as fh:
        lines = [json.loads(line) for line in fh]
    assert [line["step"] for line in lines] == [1, 2]
    assert all(isinstance(line["reward"], float) and isinstance(line["loss"], float) for line in lines)
    assert os.path.getsize(os.path.join(out, "curves.png")) > 1000
    assert os.path.exists(os.path.join(out, "checkpoint", "trainer_state.json"))
    assert all(torch.isfinite(torch.tensor(v)) for m in metrics for v in m.values() if isinstance(v, float))


@pytest.mark.parametrize("name", LM_TRAINERS)
def test_resume_gives_the_uninterrupted_steps(name, tmp_path):
    config = tiny(name, steps=4)
    straight = trainers.trainer_class(name)(config, str(tmp_path / "a"))
    straight.run()
    first = trainers.trainer_class(name)(config, str(tmp_path / "b"))
    first.run(steps=2)
    resumed = trainers.trainer_class(name)(config, str(tmp_path / "b"))
    new = resumed.run(resume=True)
    drop = lambda m: {k: v for k, v in m.items() if k != "step_time"}  # noqa: E731
    assert [drop(m) for m in new] == [drop(m) for m in straight.metrics[2:]]
    for key, module in straight.modules().items():
        for (n1, a), (n2, b) in zip(module.state_dict().items(), resumed.modules()[key].state_dict().items()):
            assert n1 == n2 and torch.equal(a, b), n1
    with open(str(tmp_path / "b" / "metrics.jsonl")) as fh:
        assert [json.loads(line)["step"] for line in fh] == [1, 2, 3, 4]


@pytest.mark.parametrize("name", ["ppo-rlhf", "grpo", "dpo"])
def test_reference_kernels_give_the_same_first_step(name):
    """Step 1 samples from identical models, so both kernel sets see the same batch:
    every metric agrees to float32 rounding."""
    fast = trainers.train(name, tiny(name, steps=1, kernels="rlkernels"))[0]
    ref = trainers.train(name, tiny(name, steps=1, kernels="reference"))[0]
    for key, value in fast.items():
        if key != "step_time":
            assert ref[key] == pytest.approx(value, rel=1e-3, abs=1e-4), key


@pytest.mark.parametrize("extra", [{}, {"entropy_coef": 0.01}, {"kl_in_reward": False, "kl_estimator": "k3"},
                                   {"kl_in_reward": False, "kl_estimator": "abs"}])
def test_ppo_rlhf_fused_and_unfused_losses_agree(extra):
    """linear_ppo_loss from hidden states and logprobs + ppo_loss on materialised
    logits train the same first step (same rollout, same losses)."""
    fused = trainers.train("ppo-rlhf", tiny("ppo-rlhf", steps=1, **extra,
                                            model={**TINY_MODEL, "fused_head": True}))[0]
    unfused = trainers.train("ppo-rlhf", tiny("ppo-rlhf", steps=1, **extra,
                                              model={**TINY_MODEL, "fused_head": False}))[0]
    for key in ("reward", "kl", "entropy", "loss", "policy_loss", "vf_loss", "clipfrac", "approx_kl"):
        assert unfused[key] == pytest.approx(fused[key], rel=1e-3, abs=1e-5), key


@pytest.mark.parametrize("fused", [True, False])
def test_fused_and_unfused_head_agree(fused):
    """linear_logprobs from hidden states and logprobs from materialised logits give
    the same per-token log-probs and entropies."""
    from rlkernels.trainers.kernels import Kernels

    ops = Kernels("rlkernels")
    model = toy.build_model(toy.model_config(n_layer=1, n_embd=32, n_head=2), seed=0)
    tokenizer = toy.build_tokenizer()
    rollout = lm.sample(model, tokenizer, toy.sample_prompts(4, random.Random(0)), max_new_tokens=5)
    got_lp, got_h = lm.rollout_forward(ops, model, rollout, entropy=True, fused=fused)
    hidden = lm.hidden_states(model, rollout.sequences, rollout.attention_mask)[:, rollout.prompt_length - 1:-1]
    logp = torch.log_softmax(model.lm_head(hidden).double(), -1)
    labels = rollout.labels()
    want_lp = logp.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1) * rollout.mask
    want_h = -(logp.exp() * logp).sum(-1) * rollout.mask
    torch.testing.assert_close(got_lp.double() * rollout.mask, want_lp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_h.double() * rollout.mask, want_h, atol=1e-5, rtol=1e-5)


def test_ppo_rlhf_scores_with_a_trained_reward_model(tmp_path):
    rm_dir = str(tmp_path / "rm")
    trainers.train("reward-model", tiny("reward-model", steps=2), rm_dir)
    from rlkernels.trainers.reward_model import load_scorer

    scorer = load_scorer(rm_dir)
    scores = scorer(["write a positive review of the food :"] * 2, ["it was good", "it was bad"])
    assert scores.shape == (2,) and torch.isfinite(scores).all()
    for name in ("ppo-rlhf", "grpo"):
        metrics = trainers.train(name, tiny(name, steps=1, reward=rm_dir))
        assert torch.isfinite(torch.tensor(metrics[0]["reward"]))
    with pytest.raises(ValueError, match="not a reward model"):
        ppo_dir = str(tmp_path / "ppo")
        trainers.train("ppo-rlhf", tiny("ppo-rlhf", steps=1), ppo_dir)
        load_scorer(ppo_dir)


# ---------------------------------------------------------------- learning
def _mean(values):
    return sum(values) / len(values)


@pytest.mark.parametrize("name, steps", [("ppo-rlhf", 20), ("grpo", 20)])
def test_rl_raises_the_reward(name, steps):
    metrics = trainers.train(name, {"model": LEARN_MODEL, "steps": steps, "progress": False, "plot": False})
    rewards = [m["reward"] for m in metrics]
    assert _mean(rewards[-5:]) > _mean(rewards[:5]) + 0.3, rewards


def test_dpo_preference_accuracy_rises_above_chance():
    metrics = trainers.train("dpo", {"model": LEARN_MODEL, "steps": 40, "eval_every": 20, "eval_pairs": 128,
                                     "progress": False, "plot": False})
    evals = [m for m in metrics if "eval_accuracy" in m]
    assert evals[-1]["eval_accuracy"] > 0.75, evals
    assert evals[-1]["sample_score"] > evals[0]["sample_score"] - 0.05  # and samples do not get worse


def test_reward_model_learns_the_annotator():
    metrics = trainers.train("reward-model", {"model": LEARN_MODEL, "steps": 40, "eval_every": 20,
                                              "eval_pairs": 128, "progress": False, "plot": False})
    assert metrics[-1]["eval_accuracy"] > 0.85


def test_padded_vocabulary_keeps_the_language():
    tokenizer = toy.build_tokenizer(vocab_size=1000)
    assert len(tokenizer) == 1000
    assert tokenizer.convert_ids_to_tokens(999) == f"<unused_{999 - len(toy.WORDS)}>"
    assert tokenizer("the movie was good")["input_ids"] == toy.build_tokenizer()("the movie was good")["input_ids"]
    metrics = trainers.train("ppo-rlhf", tiny("ppo-rlhf", steps=1, model={**TINY_MODEL, "vocab_size": 1000}))
    assert torch.isfinite(torch.tensor(metrics[0]["loss"]))
