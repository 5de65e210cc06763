"""Caption generation from the mapped queries: greedy, beam search and nucleus sampling with a
key/value cache, plus `generate_official`, the official greedy loop, kept for
reproducing official outputs exactly.

Queries are projected to cross-attention keys/values once per call; each step then feeds only the
newest token. Captions stop at EOS one by one; finished rows leave the batch (with their rows of every
cache, the queries' padding mask included).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from models.gpt2_gated import GatedGPT2LMHeadModel


@dataclass
class Generation:
    ids: list[list[int]]  # per caption: generated tokens without BOS and EOS
    scores: torch.Tensor  # (B,) mean log-probability per generated token, EOS included (beam: length-penalised)
    texts: list[str] | None = None  # decoded when a tokenizer is given


@torch.no_grad()
def generate(
    decoder: GatedGPT2LMHeadModel,
    queries: torch.Tensor,
    *,
    bos_id: int,
    eos_id: int | None,
    max_new_tokens: int,
    queries_mask: torch.Tensor | None = None,
    method: str = "greedy",
    num_beams: int = 4,
    length_penalty: float = 1.0,
    top_p: float = 0.9,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    tokenizer=None,
) -> Generation:
    """Caption each row of `queries` (B, n, width; `queries_mask` (B, n), 0 = padding, as the model's
    `decoder_context` gives it). method: greedy | beam | sample (nucleus, `top_p`).
    `eos_id=None` never stops early: exactly `max_new_tokens` tokens (benchmarks)."""
    if method == "beam":
        ids, scores = _beam_search(decoder, queries, queries_mask, bos_id, eos_id, max_new_tokens, num_beams,
                                   length_penalty)
    elif method in ("greedy", "sample"):
        sample = (top_p, temperature, generator) if method == "sample" else None
        ids, scores = _decode(decoder, queries, queries_mask, bos_id, eos_id, max_new_tokens, sample)
    else:
        raise ValueError(f"method must be greedy, beam or sample, got {method!r}")
    texts = [tokenizer.decode(row) for row in ids] if tokenizer is not None else None
    return Generation(ids, scores, texts)


def _take(cache, rows):
    return [None if kv is None else tuple(t[rows] for t in kv) for kv in cache]


def _sample_top_p(logits, top_p, temperature, generator):
    probs, order = F.softmax(logits / temperature, dim=-1).sort(dim=-1, descending=True)
    probs[probs.cumsum(-1) - probs > top_p] = 0  # smallest prefix whose mass reaches top_p
    return order.gather(-1, torch.multinomial(probs, 1, generator=generator)).squeeze(-1)


def _decode(decoder, queries, mask, bos_id, eos_id, max_new_tokens, sample):
    B, device = queries.size(0), queries.device
    cross_kv, past = decoder.cross_kv(queries, mask), None
    rows = torch.arange(B, device=device)  # original index of each row still decoding
    tokens = torch.full((B, 1), bos_id, dtype=torch.long, device=device)
    ids = [[] for _ in range(B)]
    logprob, length = torch.zeros(B, device=device), torch.zeros(B, device=device)
    for _ in range(max_new_tokens):
        logits, past = decoder(tokens, cross_kv=cross_kv, past_key_values=past)
        logits = logits[:, -1].float()
        nxt = logits.argmax(-1) if sample is None else _sample_top_p(logits, *sample)
        logprob[rows] += F.log_softmax(logits, -1).gather(-1, nxt[:, None]).squeeze(-1)
        length[rows] += 1
        ended = nxt == eos_id if eos_id is not None else torch.zeros_like(nxt, dtype=torch.bool)
        for r, t, e in zip(rows.tolist(), nxt.tolist(), ended.tolist()):
            if not e:
                ids[r].append(t)
        if ended.any():
            keep = ~ended
            rows, nxt, cross_kv, past = rows[keep], nxt[keep], _take(cross_kv, keep), _take(past, keep)
            if rows.numel() == 0:
                break
        tokens = nxt[:, None]
    return ids, (logprob / length).cpu()


def _beam_search(decoder, queries, mask, bos_id, eos_id, max_new_tokens, K, length_penalty):
    B, device = queries.size(0), queries.device
    cross_kv = [None if kv is None else tuple(t.repeat_interleave(K, 0) for t in kv)
                for kv in decoder.cross_kv(queries, mask)]
    past, tokens = None, torch.full((B * K, 1), bos_id, dtype=torch.long, device=device)
    beam_logprob = torch.zeros(B, K, device=device)
    beam_logprob[:, 1:] = float("-inf")  # all beams start equal: expand only the first at step 1
    seqs = torch.empty(B * K, 0, dtype=torch.long, device=device)
    finished = [[] for _ in range(B)]  # (score, ids) per batch item
    done = [False] * B
    for step in range(1, max_new_tokens + 1):
        logits, past = decoder(tokens, cross_kv=cross_kv, past_key_values=past)
        logprob = F.log_softmax(logits[:, -1].float(), -1)
        V = logprob.size(-1)
        cand = (beam_logprob[..., None] + logprob.view(B, K, V)).view(B, K * V)
        top, idx = cand.topk(2 * K, dim=1)  # enough to keep K beams that do not end here
        next_logprob = torch.full((B, K), float("-inf"), device=device)
        next_beam = torch.zeros(B, K, dtype=torch.long, device=device)
        next_token = torch.zeros(B, K, dtype=torch.long, device=device)
        for b, (tops, idxs) in enumerate(zip(top.tolist(), idx.tolist())):
            if done[b]:
                continue
            n = 0
            for rank, (s, i) in enumerate(zip(tops, idxs)):
                beam, tok = divmod(i, V)
                if tok == eos_id:
                    if rank < K:  # an ending counts only if it would have been kept as a beam
                        finished[b].append((s / step**length_penalty, seqs[b * K + beam].tolist()))
                else:
                    next_logprob[b, n], next_beam[b, n], next_token[b, n] = s, beam, tok
                    n += 1
                if n == K:
                    break
            done[b] = done[b] or len(finished[b]) >= K
        if all(done):
            break
        origin = (torch.arange(B, device=device)[:, None] * K + next_beam).view(-1)
        seqs = torch.cat([seqs[origin], next_token.view(-1, 1)], dim=1)
        past, beam_logprob, tokens = _take(past, origin), next_logprob, next_token.view(-1, 1)
    for b in range(B):
        if not done[b]:  # out of steps: unfinished beams compete as they are
            n_steps = seqs.size(1)
            finished[b] += [(beam_logprob[b, k].item() / n_steps**length_penalty, seqs[b * K + k].tolist())
                            for k in range(K) if beam_logprob[b, k] > float("-inf")]
    best = [max(hyps, key=lambda h: h[0]) for hyps in finished]
    return [ids for _, ids in best], torch.tensor([score for score, _ in best])


class OfficialGreedy(NamedTuple):
    ids: torch.Tensor  # (B, 1 + steps), starting with BOS
    ppl: torch.Tensor  # (B,) exp(mean entropy of the step distributions up to each row's first EOS)
    step_logits: torch.Tensor  # (B, steps, vocab) last-position logits of every decoder call


@torch.no_grad()
def generate_official(
    decoder: GatedGPT2LMHeadModel, queries: torch.Tensor, *, bos_id: int, eos_id: int, max_text_length: int
) -> OfficialGreedy:
    """Video ReCap's greedy `generate(do_sample=False)`: re-run the full prefix each step (no cache);
    at most max_text_length-1 steps; rows that hit EOS keep generating until all have, and the token
    of the step where the last row ends is not appended. Decode rows with `decode_official`."""
    B = queries.size(0)
    cross_kv = decoder.cross_kv(queries)  # same numbers as re-projecting the queries every call
    ids = torch.full((B, 1), bos_id, dtype=torch.long, device=queries.device)
    ended = torch.zeros(B, dtype=torch.bool, device=queries.device)
    entropy, count, step_logits = torch.zeros(B, device=queries.device), torch.zeros(B, device=queries.device), []
    for _ in range(max_text_length - 1):
        logits = decoder(ids, cross_kv=cross_kv)[0][:, -1].clone()  # a view would keep all (B, L, vocab) alive
        step_logits.append(logits)
        nxt = logits.argmax(-1)
        counted = (~ended).float()
        entropy += counted * torch.distributions.Categorical(logits=logits).entropy()
        count += counted
        ended |= nxt == eos_id
        if ended.all():
            break
        ids = torch.cat([ids, nxt[:, None]], dim=1)
    return OfficialGreedy(ids, torch.exp(entropy / count), torch.stack(step_logits, dim=1))


def decode_official(ids: torch.Tensor, eos_id: int) -> list[list[int]]:
    """Official decode_one (bos == eos): tokens after BOS up to the first EOS; without an EOS the
    last generated token is dropped too."""
    out = []
    for row in ids.tolist():
        rest = row[1:]
        out.append(rest[: rest.index(eos_id)] if eos_id in rest else rest[:-1])
    return out
