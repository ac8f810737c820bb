"""Token selection for one step, vectorised over the batch with no host sync inside.

Random choice uses the Gumbel-max trick (argmax of probs / Exponential noise) with noise from
a counter-based hash of (request seed, step, token id). A seeded request therefore draws the
same tokens whatever else is in the batch, and no per-request generator objects exist."""

from dataclasses import dataclass

import torch

from .request import Request
from .structured_output import allowed_mask

_MASK32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (two multiply-xorshift rounds). Inputs and constants stay below
    2**32 and 2**31, so the int64 products never overflow."""
    x = x ^ (x >> 16)
    x = (x * 0x21F0AAAD) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x735A2D97) & _MASK32
    return x ^ (x >> 15)


def exponential_noise(seeds: torch.Tensor, steps: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[B, V] Exponential(1) samples determined by each row's (seed, step)."""
    row = _mix32(_mix32(seeds & _MASK32) ^ ((seeds >> 32) & _MASK32))
    row = _mix32(row ^ _mix32(steps & _MASK32))
    col = _mix32(torch.arange(vocab_size, device=seeds.device) + 0x9E3779B9 & _MASK32)
    # 23 bits: (bits + 0.5) / 2**23 stays strictly inside (0, 1) in float32. With 24 bits the
    # largest value rounded to 1.0, the noise to 0, and a masked token's 0 / 0 became a NaN
    # that argmax picks (seen: grammar-masked tokens sampled about once in 300 steps).
    bits = _mix32(row[:, None] ^ col[None, :]) >> 9
    uniform = (bits.float() + 0.5) / float(1 << 23)
    return -torch.log(uniform)


@dataclass
class RandomSampling:
    """Per-row settings of a batch where some row samples at random."""

    temperature: torch.Tensor
    top_p: torch.Tensor
    top_k: torch.Tensor
    min_p: torch.Tensor
    seeds: torch.Tensor
    steps: torch.Tensor
    needs_filter: bool


@dataclass
class SamplingBatch:
    """Per-row sampling settings as tensors, built once per step from the requests."""

    random: RandomSampling | None  # None where every row is greedy (argmax reads nothing)
    penalties: tuple | None  # (presence, frequency, repetition, output_counts, seen_mask)
    blocked: tuple | None  # (rows, token ids) that may not be sampled (min_tokens, bad words)
    logit_bias: tuple | None  # (rows, token ids, values) added to the logits
    allowed: tuple | None  # (rows, [rows, V] mask of the only tokens those rows may sample:
    # allowed_token_ids and structured output grammars)
    num_logprobs: int  # largest top-k logprobs asked in the batch, -1 for none

    @classmethod
    def from_requests(cls, requests: list[Request], vocab_size: int,
                      device: torch.device) -> "SamplingBatch":
        params = [r.params for r in requests]

        def column(values, dtype):
            return torch.tensor(values, dtype=dtype, device=device)

        penalties = None
        if any(p.presence_penalty or p.frequency_penalty or p.repetition_penalty != 1
               for p in params):
            penalties = (
                column([p.presence_penalty for p in params], torch.float32),
                column([p.frequency_penalty for p in params], torch.float32),
                column([p.repetition_penalty for p in params], torch.float32),
                _token_counts([r.output_token_ids for r in requests], vocab_size, device),
                _token_counts([r.token_ids for r in requests], vocab_size, device) > 0,
            )
        blocked_rows, blocked_ids = [], []
        bias_rows, bias_ids, bias_values = [], [], []
        allowed_rows, allowed_masks = [], []
        for row, req in enumerate(requests):
            p = req.params
            if req.num_output_tokens < p.min_tokens:
                blocked_rows += [row] * len(req.stop_token_ids)
                blocked_ids += sorted(req.stop_token_ids)
            for token in banned_next_tokens(req):
                blocked_rows.append(row)
                blocked_ids.append(token)
            if p.logit_bias:
                bias_rows += [row] * len(p.logit_bias)
                bias_ids += list(p.logit_bias)
                bias_values += list(p.logit_bias.values())
            if p.allowed_token_ids or req.matcher is not None:
                mask = torch.ones(vocab_size, dtype=torch.bool)
                if p.allowed_token_ids:
                    mask = torch.zeros(vocab_size, dtype=torch.bool)
                    mask[p.allowed_token_ids] = True
                if req.matcher is not None:
                    mask &= allowed_mask(req.matcher, vocab_size)
                allowed_rows.append(row)
                allowed_masks.append(mask)
        allowed = None
        if allowed_rows:
            allowed = (column(allowed_rows, torch.int64), torch.stack(allowed_masks).to(device))
        logprobs = [p.logprobs for p in params if p.logprobs is not None]
        random = None
        if not all(p.is_greedy for p in params):
            top_k = [p.top_k if p.top_k > 0 else vocab_size for p in params]
            # Two tensors, not six: each costs its microseconds again in every decode step.
            floats = column([(p.temperature, p.top_p, p.min_p) for p in params], torch.float32)
            ints = column([(k, r.seed, r.num_output_tokens) for k, r in zip(top_k, requests)],
                          torch.int64)
            random = RandomSampling(
                temperature=floats[:, 0], top_p=floats[:, 1], top_k=ints[:, 0],
                min_p=floats[:, 2], seeds=ints[:, 1], steps=ints[:, 2],
                needs_filter=any(p.top_p < 1 or 1 < k < vocab_size or p.min_p > 0
                                 for p, k in zip(params, top_k)))
        return cls(
            random=random,
            penalties=penalties,
            blocked=(column(blocked_rows, torch.int64), column(blocked_ids, torch.int64))
            if blocked_rows else None,
            logit_bias=(column(bias_rows, torch.int64), column(bias_ids, torch.int64),
                        column(bias_values, torch.float32)) if bias_rows else None,
            allowed=allowed,
            num_logprobs=max(logprobs, default=-1),
        )


def banned_next_tokens(req: Request) -> list[int]:
    """The last token of each bad word whose other tokens end the output so far (a
    one-token bad word is always banned)."""
    out = req.output_token_ids
    return [seq[-1] for seq in req.bad_words_token_ids
            if len(seq) == 1 or (len(out) >= len(seq) - 1 and out[len(out) - len(seq) + 1:]
                                 == seq[:-1])]


def _token_counts(seqs: list[list[int]], vocab_size: int, device) -> torch.Tensor:
    width = max((len(s) for s in seqs), default=0)
    padded = torch.full((len(seqs), width), vocab_size, dtype=torch.int64)
    for row, s in enumerate(seqs):
        padded[row, : len(s)] = torch.tensor(s, dtype=torch.int64)
    counts = torch.zeros(len(seqs), vocab_size + 1, dtype=torch.float32)
    counts.scatter_add_(1, padded, torch.ones_like(padded, dtype=torch.float32))
    return counts[:, :vocab_size].to(device)


@dataclass
class SamplerOutput:
    token_ids: torch.Tensor  # [B]
    logprobs: tuple | None  # (top ids [B, k], top logprobs [B, k], sampled logprob [B], rank [B])


def _apply_penalties(logits: torch.Tensor, penalties: tuple) -> torch.Tensor:
    presence, frequency, repetition, counts, seen = penalties
    rep = repetition[:, None].expand_as(logits)
    scaled = torch.where(logits > 0, logits / rep, logits * rep)
    logits = torch.where(seen, scaled, logits)
    return logits - frequency[:, None] * counts - presence[:, None] * (counts > 0).float()


def _filter(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
            min_p: torch.Tensor) -> torch.Tensor:
    """Set logits outside each row's top-k, top-p nucleus or min-p floor to -inf."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(logits.shape[-1], device=logits.device)
    drop = ranks[None, :] >= top_k[:, None]
    probs = sorted_logits.softmax(-1)
    drop |= (probs.cumsum(-1) - probs) > top_p[:, None]  # keeps the first token always
    drop |= probs < min_p[:, None] * probs[:, :1]
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


def sample(logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
    """logits: [B, V] float32 for the rows that sample this step."""
    raw = logits
    if batch.penalties is not None:
        logits = _apply_penalties(logits, batch.penalties)
    if batch.logit_bias is not None:
        rows, ids, values = batch.logit_bias
        logits = logits.index_put((rows, ids), values, accumulate=True)
    if batch.allowed is not None:
        rows, mask = batch.allowed
        logits = logits.index_put((rows,), logits[rows].masked_fill(~mask, float("-inf")))
    if batch.blocked is not None:
        logits = logits.index_put(batch.blocked, torch.tensor(float("-inf")))
    tokens = logits.argmax(-1)
    if batch.random is not None:
        rows = batch.random
        is_greedy = (rows.temperature == 0) | (rows.top_k == 1)
        temperature = torch.where(is_greedy, 1.0, rows.temperature)
        scaled = logits / temperature[:, None]
        if rows.needs_filter:
            scaled = _filter(scaled, rows.top_k, rows.top_p, rows.min_p)
        noise = exponential_noise(rows.seeds, rows.steps, logits.shape[-1])
        sampled = (scaled.softmax(-1) / noise).argmax(-1)
        tokens = torch.where(is_greedy, tokens, sampled)
    logprobs = None
    if batch.num_logprobs >= 0:
        all_logprobs = raw.log_softmax(-1)
        top = all_logprobs.topk(batch.num_logprobs, dim=-1)
        chosen = all_logprobs.gather(1, tokens[:, None])[:, 0]
        rank = (all_logprobs > chosen[:, None]).sum(-1) + 1
        logprobs = (top.indices, top.values, chosen, rank)
    return SamplerOutput(tokens, logprobs)
