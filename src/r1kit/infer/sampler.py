"""The engine's sampler: next tokens for a batch of sequences, each under its own SamplingParams.

Per row, in this order: logit bias; ``min_tokens`` (EOS and stop ids masked); the thinking budget
(only ``</think>`` left once a sequence has used its reasoning tokens); presence/frequency
penalties over the output; then :func:`r1kit.infer.sampling.sample_next` (repetition penalty over
prompt + output, greedy or temperature/top-k/top-p/min-p), the same code as the reference loop, so
a seeded request draws the same tokens as ``generate`` does. A seeded sequence owns its
``torch.Generator``, so its draws do not depend on which other requests share the batch; unseeded
rows with the same controls are sampled together, in one call.
Log-probabilities are those of the model's raw distribution (before any processing), as vLLM's.
Rows that need nothing but an argmax share one ``argmax`` call.
Before all of that, a row under structured output (:func:`constrained`) has every token its grammar
does not allow next set to -inf (``r1kit.infer.structured``); the other rows are not touched, and a
batch without such rows costs nothing more.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from r1kit.infer.sampling import (
    apply_logit_bias,
    apply_presence_frequency,
    sample_next,
)
from r1kit.infer.sequence import Sequence
from r1kit.infer.structured import mask_disallowed


@dataclass
class Logprob:
    logprob: float
    rank: int  # 1 is the most likely token
    decoded_token: str | None = None


@dataclass
class SpecialIds:
    eos: frozenset[int]
    think_start: int | None = None
    think_end: int | None = None


def _plain_greedy(seq: Sequence, forced: bool) -> bool:
    p = seq.params
    return (
        p.greedy and p.repetition_penalty == 1.0 and p.presence_penalty == 0.0 and p.frequency_penalty == 0.0
        and not p.logit_bias and seq.num_output_tokens >= p.min_tokens and not forced and p.logprobs is None
    )


def constrained(seq: Sequence) -> bool:
    """Whether the next token must follow the sequence's grammar: the grammar is the answer's, so a
    reasoning model's thinking (up to ``</think>``) is free."""
    return seq.grammar is not None and not seq.in_reasoning


def must_close_thinking(seq: Sequence, special: SpecialIds) -> bool:
    budget = seq.params.thinking_budget
    return budget is not None and seq.in_reasoning and seq.reasoning_tokens >= budget and special.think_end is not None


def process_row(logits: torch.Tensor, seq: Sequence, special: SpecialIds) -> torch.Tensor:
    """The controls before :func:`sample_next`, for one row [V] (float32)."""
    p = seq.params
    logits = apply_logit_bias(logits, p.logit_bias)
    if seq.num_output_tokens < p.min_tokens:
        banned = set(p.stop_token_ids) | (set() if p.ignore_eos else set(special.eos))
        if banned:
            logits = logits.index_fill(-1, torch.tensor(sorted(banned), device=logits.device), float("-inf"))
    if must_close_thinking(seq, special):
        forced = torch.full_like(logits, float("-inf"))
        forced[special.think_end] = 0.0
        logits = forced
    if p.presence_penalty or p.frequency_penalty:
        out = torch.tensor(seq.output_token_ids, dtype=torch.long, device=logits.device)
        logits = apply_presence_frequency(logits, out, p.presence_penalty, p.frequency_penalty)
    return logits


def sample(
    logits: torch.Tensor, seqs: list[Sequence], special: SpecialIds, decode: Callable[[int], str] | None = None
) -> list[tuple[int, dict[int, Logprob] | None]]:
    """Next token for each row of ``logits`` [B, V], with its logprobs entry when asked for. The rows of
    constrained sequences are masked in place (float32 ``logits`` are the caller's tensor)."""
    guided = [i for i, s in enumerate(seqs) if constrained(s)]
    forced = [must_close_thinking(s, special) for s in seqs]
    plain = [_plain_greedy(s, f) for s, f in zip(seqs, forced)]
    if all(plain) and not guided:
        # greedy alone: the argmax of bfloat16 logits is their float32 copy's, without the copy
        return [(t, None) for t in logits.argmax(-1).tolist()]
    logits = logits.float()
    raw = {i: logits[i].clone() for i in guided if seqs[i].params.logprobs is not None}  # logprobs: the raw distribution
    if guided:
        mask_disallowed(logits, guided, [seqs[i].grammar for i in guided])
    tokens: list[int] = [0] * len(seqs)
    if any(plain):
        rows = [i for i, ok in enumerate(plain) if ok]
        picked = (logits if len(rows) == len(seqs) else logits[rows]).argmax(-1).tolist()
        for i, t in zip(rows, picked):
            tokens[i] = t
    # rows that draw from their own generator go one by one (reproducible whatever the batch);
    # the others share one sample_next call per set of identical sampling controls
    groups: dict[tuple, list[int]] = {}
    for i, seq in enumerate(seqs):
        if not plain[i]:
            p = seq.params
            own = seq.generator is not None and not p.greedy
            key = (i,) if own else (p.temperature, p.top_k, p.top_p, p.min_p, p.repetition_penalty)
            groups.setdefault(key, []).append(i)
    for rows in groups.values():
        params = seqs[rows[0]].params
        batch = torch.stack([process_row(logits[i], seqs[i], special) for i in rows])
        seen = _seen([seqs[i] for i in rows], params.repetition_penalty, batch.device)
        generator = seqs[rows[0]].generator if len(rows) == 1 else None
        picked = sample_next(batch, params, seen, generator).tolist()
        for i, t in zip(rows, picked):
            tokens[i] = int(t)
    results: list[tuple[int, dict[int, Logprob] | None]] = []
    for i, seq in enumerate(seqs):
        entry = None
        if seq.params.logprobs is not None:
            entry = logprob_entry(raw.get(i, logits[i]), tokens[i], seq.params.logprobs, decode)
        results.append((tokens[i], entry))
    return results


def _seen(seqs: list[Sequence], penalty: float, device: torch.device) -> torch.Tensor:
    """Prompt + output ids [B, L] for the repetition penalty, each row padded with its own first id
    (a repeated id is penalised once, as it should be)."""
    if penalty == 1.0:
        return torch.empty((len(seqs), 0), dtype=torch.long, device=device)
    width = max(len(s.token_ids) for s in seqs)
    return torch.tensor([s.token_ids + [s.token_ids[0]] * (width - len(s.token_ids)) for s in seqs], device=device)


def logprob_entry(logits: torch.Tensor, token: int, top: int, decode: Callable[[int], str] | None) -> dict[int, Logprob]:
    """The chosen token's logprob and rank, plus the ``top`` most likely tokens (raw distribution)."""
    logprobs = logits.float().log_softmax(-1)
    chosen = float(logprobs[token])
    entry = {token: Logprob(chosen, 1 + int((logprobs > logprobs[token]).sum()), decode(token) if decode else None)}
    if top > 0:
        values, ids = logprobs.topk(min(top, logprobs.shape[-1]))
        for rank, (value, tid) in enumerate(zip(values.tolist(), ids.tolist()), start=1):
            entry.setdefault(tid, Logprob(value, rank, decode(tid) if decode else None))
    return entry
