"""The embedded default: everything the language-model trainers need, built in code
(no downloads, safe under HF_HUB_OFFLINE=1).

- A word-level tokenizer over a 62-word review language (`build_tokenizer`).
- A tiny GPT-2 built from a config (`build_model`), optionally warmed up on grammatical
  reviews of random sentiment (`pretrain`), so RL starts from a fluent "base model".
- Prompts that ask for a review of a subject (`sample_prompts`): positive by default,
  optionally a fraction asking for a negative one.
- A rule-based reward (`sentiment_score`): +1/2 per sentiment word of the requested
  polarity, -1/2 per word of the opposite one, clipped to [-1, 1].  A base model that
  ignores the request scores about 0; one that follows it scores up to 1.
- A simulated annotator that prefers, between two reviews, the one the rule scores
  higher (`preference_pairs`), optionally with Bradley-Terry noise, for reward-model
  and DPO training; and `load_jsonl` for the common prompt/chosen/rejected files.
"""
from __future__ import annotations

import json
import math
import os
import random
import stat
from typing import Iterable, Sequence

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
POSITIVE = ("good", "great", "happy", "lovely", "wonderful", "excellent", "fun", "nice", "best", "amazing")
NEGATIVE = ("bad", "awful", "sad", "terrible", "boring", "poor", "worst", "dull", "ugly", "horrible")
NEUTRAL_ADJ = ("long", "short", "new", "old", "loud", "quiet", "big", "small")
SUBJECTS = ("movie", "film", "book", "song", "food", "hotel", "game", "show", "story", "city")
ADVERBS = ("very", "really", "quite", "truly", "rather")
CONNECTORS = ("and", "but", "so")
STRUCTURE = ("the", "was", "is", "it", "this", "a", "write", "review", "of", ":", "positive", "negative")
SPECIAL = (PAD, BOS, EOS, UNK)
WORDS = SPECIAL + STRUCTURE + SUBJECTS + ADVERBS + CONNECTORS + NEUTRAL_ADJ + POSITIVE + NEGATIVE
assert len(set(WORDS)) == len(WORDS), "every word of the toy language must be unique"
POLARITY = {**{w: 1 for w in POSITIVE}, **{w: -1 for w in NEGATIVE}}


def vocabulary(vocab_size: int = 0) -> list[str]:
    """WORDS, padded with never-used tokens '<unused_i>' up to vocab_size (when larger)."""
    return list(WORDS) + [f"<unused_{i}>" for i in range(max(0, vocab_size - len(WORDS)))]


def build_tokenizer(vocab_size: int = 0):
    """A transformers PreTrainedTokenizerFast over WORDS (whitespace-split, word level),
    left padding for generation.  vocab_size > len(WORDS) pads the vocabulary with
    unused tokens, so the per-token work over the vocabulary (log-probs, entropy, KL)
    has the size of a real LM's (32k-152k) while the language stays the same."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(vocabulary(vocab_size))}
    core = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   unk_token=UNK, padding_side="left")


def model_config(*, n_layer: int = 2, n_embd: int = 64, n_head: int = 4, n_positions: int = 64,
                 vocab_size: int = 0):
    """GPT-2 config for the toy language; dropout off (RL and DPO want a deterministic policy)."""
    from transformers import GPT2Config

    return GPT2Config(vocab_size=len(vocabulary(vocab_size)), n_positions=n_positions, n_embd=n_embd, n_layer=n_layer,
                      n_head=n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                      bos_token_id=WORDS.index(BOS), eos_token_id=WORDS.index(EOS),
                      pad_token_id=WORDS.index(PAD))


def build_model(config=None, *, seed: int = 0):
    """A freshly initialised GPT2LMHeadModel (deterministic for a seed)."""
    import torch
    from transformers import GPT2LMHeadModel

    config = config or model_config()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(config)
    model.eval()  # no dropout anywhere; gradients still flow
    return model


# ---------------------------------------------------------------- the language
def sample_prompt(rng: random.Random, negative_fraction: float = 0.0) -> str:
    """'write a positive review of the movie :'; a `negative_fraction` of the prompts ask
    for a negative review instead (a harder, prompt-conditional task: a 2-layer model
    needs far more than a few CPU minutes of RL to learn it, so the default is 0)."""
    mood = "negative" if negative_fraction > 0 and rng.random() < negative_fraction else "positive"
    return f"write a {mood} review of the {rng.choice(SUBJECTS)} :"


def sample_prompts(n: int, rng: random.Random, negative_fraction: float = 0.0) -> list[str]:
    return [sample_prompt(rng, negative_fraction) for _ in range(n)]


def sample_clause(rng: random.Random, polarity: int | None = None) -> list[str]:
    """'the movie was very good' with an adjective of the given polarity (+1, -1, 0),
    or of a random one when polarity is None."""
    if polarity is None:
        polarity = rng.choice((1, -1, 0))
    adjectives = POSITIVE if polarity > 0 else NEGATIVE if polarity < 0 else NEUTRAL_ADJ
    words = ["it"] if rng.random() < 0.3 else ["the", rng.choice(SUBJECTS)]
    words.append(rng.choice(("was", "is")))
    if rng.random() < 0.4:
        words.append(rng.choice(ADVERBS))
    words.append(rng.choice(adjectives))
    return words


def sample_review(rng: random.Random, polarity: int | None = None, max_clauses: int = 2) -> str:
    """A grammatical review of one or more clauses, each of random (or given) polarity."""
    words = sample_clause(rng, polarity)
    for _ in range(rng.randrange(max_clauses)):
        words += [rng.choice(CONNECTORS)] + sample_clause(rng, polarity)
    return " ".join(words)


def requested_polarity(prompt: str) -> int:
    words = prompt.split()
    if "negative" in words:
        return -1
    return 1


def sentiment_score(prompt: str, response: str) -> float:
    """The rule: each sentiment word of the requested polarity +1/2, each of the opposite
    one -1/2, clipped to [-1, 1].  Words after an end-of-sequence token do not count."""
    target = requested_polarity(prompt)
    total = 0.0
    for word in response.split():
        if word == EOS:
            break
        total += 0.5 * target * POLARITY.get(word, 0)
    return max(-1.0, min(1.0, total))


def score_batch(prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
    return [sentiment_score(p, r) for p, r in zip(prompts, responses)]


def sft_corpus(n: int, rng: random.Random) -> list[tuple[str, str]]:
    """(prompt, review) pairs whose sentiment ignores the prompt: a fluent base model
    that has not yet learnt to follow the request."""
    return [(sample_prompt(rng, 0.5), sample_review(rng)) for _ in range(n)]


def preference_pairs(n: int, *, seed: int = 0, noise: float = 0.0, negative_fraction: float = 0.0) -> list[dict]:
    """n {prompt, chosen, rejected} dicts from the simulated annotator.  Two reviews
    are drawn for a prompt; with noise = 0 the one the rule scores higher is chosen
    (ties are redrawn); with noise > 0 the annotator follows Bradley-Terry,
    P(first preferred) = sigmoid((s1 - s2) / noise)."""
    rng = random.Random(seed)
    pairs = []
    while len(pairs) < n:
        prompt = sample_prompt(rng, negative_fraction)
        first, second = sample_review(rng), sample_review(rng)
        s1, s2 = sentiment_score(prompt, first), sentiment_score(prompt, second)
        if s1 == s2:
            continue
        if noise > 0:
            first_wins = rng.random() < 1.0 / (1.0 + math.exp(-(s1 - s2) / noise))
        else:
            first_wins = s1 > s2
        chosen, rejected = (first, second) if first_wins else (second, first)
        pairs.append({"prompt": prompt, "chosen": chosen + " " + EOS, "rejected": rejected + " " + EOS})
    return pairs


# ---------------------------------------------------------------- warm start
def pretrain(model, tokenizer, *, steps: int, batch_size: int = 32, lr: float = 3e-3, seed: int = 0) -> list[float]:
    """A short language-model warm-up on `sft_corpus` so the base model writes grammatical
    reviews of random sentiment.  Returns the losses.  The loss is the mean negative
    log-likelihood through `rlkernels.linear_logprobs` (always the compiled kernels, so runs
    with either kernel set start from the same base model)."""
    import torch

    import rlkernels

    if steps <= 0:
        return []
    rng = random.Random(seed + 7919)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    losses = []
    for _ in range(steps):
        texts = [f"{p} {r} {EOS}" for p, r in sft_corpus(batch_size, rng)]
        enc = tokenizer(texts, padding=True, return_tensors="pt").to(model.device)
        ids, attn = enc["input_ids"], enc["attention_mask"]
        positions = (attn.cumsum(-1) - 1).clamp(min=0)
        hidden = model.base_model(input_ids=ids, attention_mask=attn, position_ids=positions).last_hidden_state
        labels = ids[:, 1:].masked_fill(attn[:, 1:] == 0, -100)
        head = model.get_output_embeddings()
        logprobs = rlkernels.linear_logprobs(hidden[:, :-1], head.weight, labels, bias=head.bias)
        loss = -logprobs.sum() / (labels != -100).sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


# ---------------------------------------------------------------- files
def load_jsonl(path: str, keys: Iterable[str] = ("prompt", "chosen", "rejected")) -> list[dict]:
    """Rows of a JSONL file, each checked to have string values for `keys`; errors name
    the file, the line and the missing key.  Blank lines are skipped."""
    keys = tuple(keys)
    if not os.path.exists(path):
        raise FileNotFoundError(f"data file not found: {path}")
    # (a FIFO would block open() until something writes to it; a directory or device is no file)
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise ValueError(f"{path}: not a regular file")
    rows = []
    try:
        with open(path, encoding="utf-8") as fh:
            lines = list(enumerate(fh, 1))
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8 text") from None
    except OSError as exc:
        raise ValueError(f"{path}: cannot be read ({exc.strerror})") from None
    for number, line in lines:
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{number}: each line must be a JSON object")
        for key in keys:
            if key not in row:
                raise ValueError(f"{path}:{number}: missing key '{key}' (need {', '.join(keys)})")
            if not isinstance(row[key], str):
                raise ValueError(f"{path}:{number}: '{key}' must be a string")
        rows.append({key: row[key] for key in keys})
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


def write_jsonl(path: str, rows: Iterable[dict]) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")
