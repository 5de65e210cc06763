"""Cached generation (greedy, beam, nucleus) against the recompute-everything official greedy loop."""

import pytest
import torch
import torch.nn.functional as F

from models import gpt2_gated
from models.generation import decode_official, generate, generate_official
from models.recap import RecapConfig, RecapModel
from models.tokenizer import Tokenizer

BOS = 99
STEPS = 12


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def random_decoder(seed, vocab_size=100):
    """Tiny decoder with the fixtures' weight scales (reference sidecar `weight_init_rules`): open gates,
    so queries and tokens both matter and greedy top-1/top-2 margins are far above fp noise."""
    torch.manual_seed(seed)
    config = RecapConfig.preset("video", "tiny").with_overrides(
        {"vocab_size": vocab_size, "bos_token_id": vocab_size - 1, "eos_token_id": vocab_size - 1})
    decoder = RecapModel(config).text_decoder.eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in decoder.named_parameters():
            n = torch.randn(p.shape, generator=g)
            if p.dim() == 0:  # gates: +-U(0.4, 1.2)
                p.copy_((0.4 + 0.8 * torch.rand((), generator=g)) * n.sign())
            elif name.endswith(("wte.weight", "wpe.weight")):
                p.copy_(0.5 * n)
            elif p.dim() == 2:  # Conv1D weights are [in, out]
                p.copy_(n / p.shape[0] ** 0.5)
            else:
                p.copy_(1 + 0.2 * n if ".ln" in name and name.endswith("weight") else 0.1 * n)
    return decoder, torch.randn(6, 12, 64, generator=g)


def eos_ending_rows_at_different_steps(decoder, queries):
    """The token that, taken as EOS, ends the greedy rows at the most different steps (or never)."""
    free = generate_official(decoder, queries, bos_id=BOS, eos_id=-1, max_text_length=STEPS + 1).ids[:, 1:].tolist()
    ends = {eos: [row.index(eos) if eos in row else STEPS for row in free] for eos in {t for row in free for t in row}}
    eos = max(sorted(ends), key=lambda t: len(set(ends[t])))
    assert len(set(ends[eos])) >= 3, "rows should end at three different steps"
    return eos, ends[eos]


@pytest.mark.parametrize("seed", [0, 1, 2, 4])
def test_cached_greedy_equals_recompute_greedy(seed):
    decoder, queries = random_decoder(seed)
    eos, first = eos_ending_rows_at_different_steps(decoder, queries)
    cached = generate(decoder, queries, bos_id=BOS, eos_id=eos, max_new_tokens=STEPS)
    official = generate_official(decoder, queries, bos_id=BOS, eos_id=eos, max_text_length=STEPS + 1)
    for row, ids in enumerate(official.ids[:, 1:].tolist()):
        assert cached.ids[row] == ids[: first[row]]  # up to (without) the row's first EOS
    assert [len(ids) for ids in cached.ids] == first


def test_cross_attention_keys_values_are_computed_once(monkeypatch):
    decoder, queries = random_decoder(0)
    calls = []
    project = gpt2_gated.GPT2Attention.cross_kv
    monkeypatch.setattr(gpt2_gated.GPT2Attention, "cross_kv", lambda self, q: calls.append(q.shape) or project(self, q))
    for method in ("greedy", "beam", "sample"):
        calls.clear()
        generate(decoder, queries, bos_id=BOS, eos_id=None, max_new_tokens=STEPS, method=method)
        assert len(calls) == len(decoder.transformer.h)  # once per layer, not per step


def teacher_forced_mean_logprob(decoder, queries, ids, eos):
    """Mean log-probability per generated token (EOS included when it ended the caption)."""
    scores = []
    for q, row in zip(queries, ids):
        target = row + ([eos] if len(row) < STEPS else [])
        tokens = torch.tensor([[BOS, *target]])
        logp = F.log_softmax(decoder(tokens[:, :-1], q[None])[0], dim=-1)
        scores.append(logp[0].gather(-1, tokens[0, 1:, None]).mean())
    return torch.stack(scores)


@pytest.mark.parametrize("method", ["greedy", "beam", "sample"])
def test_scores_are_mean_token_logprobs_and_eos_ends_captions(method):
    decoder, queries = random_decoder(1)
    eos, first = eos_ending_rows_at_different_steps(decoder, queries)
    out = generate(decoder, queries, bos_id=BOS, eos_id=eos, max_new_tokens=STEPS, method=method, num_beams=3,
                   top_p=0.8, generator=torch.Generator().manual_seed(0))
    assert len(out.ids) == 6 and all(eos not in ids and len(ids) <= STEPS for ids in out.ids)
    if method != "sample":  # sampled rows may or may not meet this EOS
        assert any(len(ids) < STEPS for ids in out.ids)
    with torch.no_grad():
        expected = teacher_forced_mean_logprob(decoder, queries, out.ids, eos)
    torch.testing.assert_close(out.scores, expected, atol=1e-5, rtol=0)


def test_beam_search_one_beam_is_greedy_and_rows_are_independent():
    decoder, queries = random_decoder(2)
    eos, _ = eos_ending_rows_at_different_steps(decoder, queries)
    kw = dict(bos_id=BOS, eos_id=eos, max_new_tokens=STEPS)
    greedy = generate(decoder, queries, **kw)
    assert generate(decoder, queries, method="beam", num_beams=1, **kw).ids == greedy.ids
    batched = generate(decoder, queries, method="beam", num_beams=4, **kw)
    alone = [generate(decoder, queries[i : i + 1], method="beam", num_beams=4, **kw).ids[0] for i in range(6)]
    assert batched.ids == alone


def test_nucleus_sampling_is_seeded_and_reduces_to_greedy():
    decoder, queries = random_decoder(3)
    kw = dict(bos_id=BOS, eos_id=None, max_new_tokens=STEPS, method="sample")
    a = generate(decoder, queries, top_p=1.0, temperature=2.0, generator=torch.Generator().manual_seed(7), **kw)
    b = generate(decoder, queries, top_p=1.0, temperature=2.0, generator=torch.Generator().manual_seed(7), **kw)
    assert a.ids == b.ids and all(len(ids) == STEPS for ids in a.ids)
    greedy = generate(decoder, queries, bos_id=BOS, eos_id=None, max_new_tokens=STEPS)
    assert a.ids != greedy.ids
    assert generate(decoder, queries, top_p=1e-6, **kw).ids == greedy.ids  # only the top token survives


def test_texts_are_decoded_with_the_tokenizer():
    captions = ["#C C picks up the knife", "#C C cuts the onion", "#C C washes the plate"] * 5
    tokenizer = Tokenizer.train(captions, vocab_size=300)
    decoder, queries = random_decoder(0, vocab_size=tokenizer.vocab_size)
    out = generate(decoder, queries, bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id, max_new_tokens=8,
                   tokenizer=tokenizer)
    assert out.texts == [tokenizer.decode(ids) for ids in out.ids]


def test_decode_official_cuts_at_eos_and_drops_the_last_token_without_one():
    ids = torch.tensor([[99, 5, 6, 99, 7], [99, 5, 6, 7, 8], [99, 99, 99, 4, 4]])
    assert decode_official(ids, 99) == [[5, 6], [5, 6, 7], []]


def test_unknown_method_is_rejected():
    decoder, queries = random_decoder(0)
    with pytest.raises(ValueError, match="method"):
        generate(decoder, queries, bos_id=BOS, eos_id=BOS, max_new_tokens=2, method="contrastive")


def padded_queries(queries, real=(12, 9, 5, 12, 7, 3)):
    """A mask (0 = padding) keeping `real` rows of each batch item, and the queries with garbage in the pads."""
    mask = (torch.arange(queries.size(1)) < torch.tensor(real)[:, None]).long()
    noise = 100 * torch.randn(queries.shape, generator=torch.Generator().manual_seed(5))
    return torch.where(mask[..., None].bool(), queries, noise), mask


@torch.no_grad()
def recompute_greedy(decoder, queries, mask):
    """Greedy by a full masked forward of the whole prefix every step: no cache, no rows leaving."""
    ids = torch.full((queries.size(0), 1), BOS)
    for _ in range(STEPS):
        ids = torch.cat([ids, decoder(ids, queries, mask)[0][:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids[:, 1:].tolist()


@pytest.mark.parametrize("seed", [0, 4])
def test_masked_queries_cached_generation_equals_recompute_and_ignores_pads(seed):
    """The padded text tokens of `text_tokens_to_decoder`: the mask rides in the cross cache, so it must follow
    rows that end early (greedy) and the beams' copies of each row."""
    decoder, queries = random_decoder(seed)
    padded, mask = padded_queries(queries)
    free = recompute_greedy(decoder, padded, mask)
    ends = {eos: [row.index(eos) if eos in row else STEPS for row in free] for eos in {t for row in free for t in row}}
    eos = max(sorted(ends), key=lambda t: len(set(ends[t])))
    assert len(set(ends[eos])) >= 3, "rows should end at three different steps"
    kw = dict(bos_id=BOS, eos_id=eos, max_new_tokens=STEPS)
    cached = generate(decoder, padded, queries_mask=mask, **kw)
    assert cached.ids == [row[:end] for row, end in zip(free, ends[eos])]
    alone = [generate(decoder, queries[i : i + 1, :n], **kw).ids[0] for i, n in enumerate(mask.sum(1).tolist())]
    assert cached.ids == alone  # each row as if it had no pads at all
    beams = generate(decoder, padded, queries_mask=mask, method="beam", num_beams=3, **kw)
    assert beams.ids == [generate(decoder, queries[i : i + 1, :n], method="beam", num_beams=3, **kw).ids[0]
                         for i, n in enumerate(mask.sum(1).tolist())]
