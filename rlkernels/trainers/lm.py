"""Language-model plumbing shared by the RLHF trainers: building the model and
tokenizer (the embedded toy or a local transformers checkpoint), sampling with
`generate`, packing prompt + response token ids, and per-token log-probs computed
through the rlkernels ops (straight from hidden states with `linear_logprobs`, or from
logits with `logprobs`).  Models are plain transformers modules."""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from . import toy
from .config import Config, ConfigError

IGNORE_INDEX = -100


@dataclass
class ModelConfig(Config):
    name_or_path: str = "toy"    # "toy" (built in code) or a local transformers model directory
    n_layer: int = 2             # toy model sizes
    n_embd: int = 64
    n_head: int = 4
    n_positions: int = 64
    vocab_size: int = 0          # toy: 0 = its 62 words; larger pads with unused tokens (e.g. 50257, as GPT-2)
    pretrain_steps: int = 150    # language-model warm-up of the toy base model (0: random init)
    fused_head: bool | None = None  # log-probs from hidden states via linear_logprobs (no [N, V] logits);
                                    # None: when the build has linear_logprobs

    def check(self) -> None:
        super().check()
        self._positive("n_layer", "n_embd", "n_head", "n_positions")
        self._non_negative("pretrain_steps", "vocab_size")
        # a tiny model built from this config (a typo of a few zeros: a refusal, not an
        # allocation traceback or minutes of building a vocabulary)
        self._at_most("vocab_size", 1 << 20)
        self._at_most("n_positions", 1 << 16)
        self._at_most("n_embd", 1 << 14)
        self._at_most("n_layer", 1 << 10)
        if self.n_embd % self.n_head:
            raise ConfigError("n_embd", f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")


_BASE_CACHE: dict = {}


def build_lm(config: ModelConfig, *, seed: int = 0, device: torch.device | str = "cpu"):
    """(causal LM, tokenizer).  The toy base model is pretrained once per (config, seed)
    in this process and copied after that."""
    if config.name_or_path == "toy":
        key = (config.n_layer, config.n_embd, config.n_head, config.n_positions, config.vocab_size,
               config.pretrain_steps, seed)
        if key not in _BASE_CACHE:
            tokenizer = toy.build_tokenizer(config.vocab_size)
            model = toy.build_model(toy.model_config(n_layer=config.n_layer, n_embd=config.n_embd,
                                                     n_head=config.n_head, n_positions=config.n_positions,
                                                     vocab_size=config.vocab_size), seed=seed)
            toy.pretrain(model, tokenizer, steps=config.pretrain_steps, seed=seed)
            _BASE_CACHE[key] = (model, tokenizer)
        model, tokenizer = _BASE_CACHE[key]
        return copy.deepcopy(model).to(device), tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(config.name_or_path, local_files_only=True, padding_side="left")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    # safetensors only (a pickled pytorch_model.bin is refused), no remote code
    model = AutoModelForCausalLM.from_pretrained(config.name_or_path, local_files_only=True, use_safetensors=True,
                                                 trust_remote_code=False)
    model.eval()
    return model.to(device), tokenizer


def trunk(model: nn.Module) -> nn.Module:
    """The transformer without its lm_head (GPT2LMHeadModel.transformer, Llama's .model, ...)."""
    return model.base_model


def hidden_size(model: nn.Module) -> int:
    return model.config.hidden_size


def freeze(model: nn.Module) -> nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that skip left padding."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def hidden_states(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    out = trunk(model)(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions(attention_mask))
    return out.last_hidden_state


def token_logprobs(ops, model: nn.Module, hidden: torch.Tensor, labels: torch.Tensor, *, temperature: float = 1.0,
                   entropy: bool = False, fused: bool | None = None):
    """Log-probs of labels `[B, T]` (IGNORE_INDEX where not scored) given the hidden
    states `[B, T, H]` that predict them; with entropy=True also the per-token entropy.
    fused=True goes from hidden states through the lm_head weight in one op
    (`linear_logprobs`), so the [B*T, V] logits never exist; None picks it when the
    build has that op."""
    B, T, H = hidden.shape
    if fused is None:
        fused = ops.has("linear_logprobs")
    head = model.get_output_embeddings()
    flat_hidden, flat_labels = hidden.reshape(B * T, H), labels.reshape(B * T)
    if fused:
        out = ops.linear_logprobs(flat_hidden, head.weight, flat_labels, bias=head.bias, temperature=temperature,
                                  ignore_index=IGNORE_INDEX, entropy=entropy)
    else:
        out = ops.logprobs(head(flat_hidden), flat_labels, temperature=temperature, ignore_index=IGNORE_INDEX,
                           entropy=entropy)
    if entropy:
        logprobs, entropies = out
        return logprobs.view(B, T), entropies.view(B, T)
    return out.view(B, T)


def response_mask(responses: torch.Tensor, eos_token_id: int | None) -> torch.Tensor:
    """1 for response tokens up to and including the first EOS, 0 after it (works when
    the pad token equals the EOS token)."""
    if eos_token_id is None:
        return torch.ones_like(responses, dtype=torch.bool)
    is_eos = responses == eos_token_id
    after = (is_eos.long().cumsum(-1) - is_eos.long()) > 0
    return ~after


@dataclass
class Rollout:
    """A batch of sampled responses: sequences = [left-padded prompt | response]."""

    sequences: torch.Tensor       # [B, P + R]
    attention_mask: torch.Tensor  # [B, P + R]
    mask: torch.Tensor            # [B, R] bool: response tokens that count
    prompt_length: int            # P
    prompts: list[str]
    responses: list[str]

    @property
    def responses_ids(self) -> torch.Tensor:
        return self.sequences[:, self.prompt_length:]

    def labels(self) -> torch.Tensor:
        return self.responses_ids.masked_fill(~self.mask, IGNORE_INDEX)

    def select(self, index: torch.Tensor) -> "Rollout":
        rows = index.tolist()
        return Rollout(self.sequences[index], self.attention_mask[index], self.mask[index], self.prompt_length,
                       [self.prompts[i] for i in rows], [self.responses[i] for i in rows])


@torch.no_grad()
def sample(model: nn.Module, tokenizer, prompts: list[str], *, max_new_tokens: int, temperature: float = 1.0,
           device: torch.device | str = "cpu") -> Rollout:
    """Samples one response per prompt with transformers' `generate` (pure sampling:
    no top-k/top-p, so the log-probs we compute are those of the sampling policy)."""
    enc = tokenizer(prompts, padding=True, return_tensors="pt", add_special_tokens=True).to(device)
    P = enc["input_ids"].shape[1]
    sequences = model.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], do_sample=True,
                               top_k=0, top_p=1.0, temperature=temperature, max_new_tokens=max_new_tokens,
                               min_new_tokens=1, pad_token_id=tokenizer.pad_token_id,
                               eos_token_id=tokenizer.eos_token_id)
    responses = sequences[:, P:]
    if responses.shape[1] < max_new_tokens:  # every row stopped early: pad to a fixed width
        pad = responses.new_full((responses.shape[0], max_new_tokens - responses.shape[1]), tokenizer.pad_token_id)
        responses = torch.cat([responses, pad], 1)
        sequences = torch.cat([sequences[:, :P], responses], 1)
    mask = response_mask(responses, tokenizer.eos_token_id)
    attention = torch.cat([enc["attention_mask"].bool(), mask], 1).long()
    texts = [tokenizer.decode(row[m], skip_special_tokens=False) for row, m in zip(responses, mask)]
    return Rollout(sequences, attention, mask, P, list(prompts), texts)


def rollout_forward(ops, model: nn.Module, rollout: Rollout, *, temperature: float = 1.0, entropy: bool = False,
                    fused: bool | None = None, value_head: nn.Module | None = None):
    """Per-response-token log-probs `[B, R]` (and entropies, and values from
    `value_head` on the same hidden states) of a rollout under `model`."""
    hidden = hidden_states(model, rollout.sequences, rollout.attention_mask)
    P = rollout.prompt_length
    states = hidden[:, P - 1:-1]  # the state before each response token
    out = token_logprobs(ops, model, states, rollout.labels(), temperature=temperature, entropy=entropy, fused=fused)
    if value_head is None:
        return out
    values = value_head(states).squeeze(-1).float()
    return (*out, values) if entropy else (out, values)


# ---------------------------------------------------------------- (prompt, response) packing
def encode_pairs(tokenizer, prompts: list[str], responses: list[str], *, max_length: int,
                 device: torch.device | str = "cpu"):
    """Token ids of prompt + response (each tokenised on its own, EOS appended to the
    response if missing), left-padded: (input_ids [B, L], attention_mask [B, L],
    labels [B, L - 1]) where labels hold the next token on response positions and
    IGNORE_INDEX elsewhere.  Over-long rows lose prompt tokens from the left first."""
    rows = []
    for prompt, response in zip(prompts, responses):
        p = tokenizer(prompt, add_special_tokens=True)["input_ids"]
        r = tokenizer(response, add_special_tokens=False)["input_ids"]
        if tokenizer.eos_token_id is not None and (not r or r[-1] != tokenizer.eos_token_id):
            r = r + [tokenizer.eos_token_id]
        r = r[:max_length - 1]
        p = p[-(max_length - len(r)):] if len(p) + len(r) > max_length else p
        rows.append((p, r))
    L = max(len(p) + len(r) for p, r in rows)
    pad = tokenizer.pad_token_id
    input_ids = torch.full((len(rows), L), pad, dtype=torch.long)
    attention = torch.zeros((len(rows), L), dtype=torch.long)
    scored = torch.zeros((len(rows), L), dtype=torch.bool)
    for i, (p, r) in enumerate(rows):
        ids = p + r
        input_ids[i, L - len(ids):] = torch.tensor(ids)
        attention[i, L - len(ids):] = 1
        scored[i, L - len(r):] = True
    labels = input_ids[:, 1:].masked_fill(~scored[:, 1:], IGNORE_INDEX)
    return input_ids.to(device), attention.to(device), labels.to(device)



def encode_preferences(tokenizer, rows: list[dict], *, max_length: int, device: torch.device | str = "cpu"):
    """encode_pairs of preference rows (prompt, chosen, rejected) in one batch: the
    chosen responses in rows 0..B-1, the rejected ones in rows B..2B-1."""
    prompts = [r["prompt"] for r in rows]
    responses = [r["chosen"] for r in rows] + [r["rejected"] for r in rows]
    return encode_pairs(tokenizer, prompts + prompts, responses, max_length=max_length, device=device)

def sequence_logprobs(ops, model: nn.Module, input_ids, attention_mask, labels, *, fused: bool | None = None):
    """Summed response log-probs per row `[B]` (the DPO quantity), through the ops."""
    hidden = hidden_states(model, input_ids, attention_mask)[:, :-1]
    token = token_logprobs(ops, model, hidden, labels, fused=fused)
    return ops.sequence_logprobs(token, labels != IGNORE_INDEX)


# ---------------------------------------------------------------- reward model
class RewardModel(nn.Module):
    """A transformer trunk with a scalar head read at each sequence's last token."""

    def __init__(self, trunk_module: nn.Module, hidden: int):
        super().__init__()
        self.trunk = trunk_module
        self.head = nn.Linear(hidden, 1)
        nn.init.normal_(self.head.weight, std=1.0 / (hidden + 1) ** 0.5)
        nn.init.zeros_(self.head.bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.trunk(input_ids=input_ids, attention_mask=attention_mask,
                            position_ids=positions(attention_mask)).last_hidden_state
        L = attention_mask.shape[1]
        last = L - 1 - attention_mask.flip(-1).long().argmax(-1)
        return self.head(hidden[torch.arange(hidden.shape[0], device=hidden.device), last]).squeeze(-1).float()


class RewardScorer:
    """Scores (prompt, response) texts with a trained reward model."""

    def __init__(self, model: RewardModel, tokenizer, *, max_length: int, device):
        self.model, self.tokenizer, self.max_length, self.device = freeze(model), tokenizer, max_length, device

    @torch.no_grad()
    def __call__(self, prompts: list[str], responses: list[str]) -> torch.Tensor:
        ids, attention, _ = encode_pairs(self.tokenizer, prompts, responses, max_length=self.max_length,
                                         device=self.device)
        return self.model(ids, attention)


class RuleScorer:
    """Scores with the embedded rule (`toy.sentiment_score`)."""

    def __call__(self, prompts: list[str], responses: list[str]) -> torch.Tensor:
        return torch.tensor(toy.score_batch(prompts, responses), dtype=torch.float32)
