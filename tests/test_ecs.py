"""ECS (ExCae's expertized caption selection): the mixture's routing and fusion, that training it learns to select
the caption a query is about where mean fusion cannot, and `recap ecs` end to end on a real indexed store."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from models.ecs import CAPTION, WINDOW, EcsConfig, ExpertSelection, load_balance, mean_fusion
from pipeline.config import EcsSettings, settle
from pipeline.dag import index_stage
from pipeline.ecs import Units, embed_units, latest_fused, train_ecs
from pipeline.retrieval import first_hit_rank

from conftest import captioned_store, copy_store, run_cli

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _tokens(b=3, n=5, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = F.normalize(torch.randn(b, n, dim, generator=g), dim=-1)
    kinds = torch.tensor([[WINDOW, WINDOW, CAPTION, CAPTION, CAPTION]] * b)
    mask = torch.ones(b, n, dtype=torch.bool)
    mask[0, 4] = False  # the first unit has one caption fewer
    return tokens, kinds, mask


def test_mean_fusion_and_a_fresh_mixture_fuse_as_the_windows_and_captions_means():
    tokens, kinds, mask = _tokens()
    by_hand = torch.stack([F.normalize(F.normalize(t[:2].mean(0), dim=-1)
                                       + F.normalize(t[2:int(m.sum())].mean(0), dim=-1), dim=-1)
                           for t, m in zip(tokens, mask)])
    assert torch.allclose(mean_fusion(tokens, kinds, mask), by_hand, atol=1e-6)
    windows_only = mean_fusion(tokens, torch.zeros_like(kinds), mask)
    assert torch.allclose(windows_only, F.normalize((tokens * mask[..., None]).sum(1), dim=-1), atol=1e-6)
    fresh = ExpertSelection(EcsConfig(embed_dim=16, num_experts=4, active=2)).eval()
    fused, probs, gates = fresh(tokens, kinds, mask)
    assert torch.allclose(fused, by_hand, atol=1e-6)  # experts' last layers start at zero
    assert torch.allclose(probs.sum(-1), torch.ones(3))


@pytest.mark.parametrize("routing", ["topk", "dense"])
def test_training_routes_top_k_and_evaluation_routes_as_configured(routing):
    tokens, kinds, mask = _tokens()
    model = ExpertSelection(EcsConfig(embed_dim=16, num_experts=4, active=2, eval_routing=routing))
    _, probs, gates = model.train()(tokens, kinds, mask)
    assert ((gates > 0).sum(-1) == 2).all() and torch.allclose(gates.sum(-1), torch.ones(3))
    assert torch.equal(gates > 0, torch.zeros_like(gates, dtype=torch.bool).scatter(-1, probs.topk(2).indices, True))
    _, probs, gates = model.eval()(tokens, kinds, mask)
    assert torch.equal(gates, probs) == (routing == "dense")
    assert ((gates > 0).sum(-1) == (4 if routing == "dense" else 2)).all()


def test_load_balance_is_one_when_even_and_grows_with_collapse():
    even = torch.full((4, 4), 0.25)
    assert load_balance(even, torch.eye(4)) == pytest.approx(1.0)
    collapsed = torch.tensor([[0.7, 0.1, 0.1, 0.1]] * 4)
    assert load_balance(collapsed, torch.tensor([[1.0, 0, 0, 0]] * 4)) == pytest.approx(2.8)


def _selection_task(units_n=64, distractors=6, dim=32, seed=0):
    """Each unit: one window token, its own key caption (dimension 0 marks keys) and `distractors` captions that are
    other units' keys without the mark. A query is its unit's key: mean fusion cannot tell a unit from the units that
    carry its key as a distractor; a mixture that pools the marked token can."""
    rng = np.random.default_rng(seed)
    keys = rng.normal(size=(units_n, dim)).astype(np.float32)
    keys[:, 0] = 0
    keys /= np.linalg.norm(keys, axis=1, keepdims=True)
    units = Units()
    for u in range(units_n):
        own = keys[u].copy()
        own[0] = 1.0
        others = keys[rng.choice(np.delete(np.arange(units_n), u), distractors, replace=False)]
        window = rng.normal(size=(1, dim)).astype(np.float32)
        units.add(f"v{u}", "video", 0, 1, window / np.linalg.norm(window), np.vstack([own / np.linalg.norm(own), others]))
    return units, keys


def _r_at_1(units, model, keys) -> float:
    fused, _ = embed_units(model, units)
    scores = fused @ keys.T
    return float(np.mean([first_hit_rank(scores[:, q], np.arange(len(keys)) == q) == 1 for q in range(len(keys))]))


def test_trained_mixture_selects_the_caption_the_query_is_about():
    units, keys = _selection_task()
    mean = ExpertSelection(EcsConfig(embed_dim=32, num_experts=4, active=0)).eval()
    settings = EcsSettings(epochs=60, batch_size=16, lr=3e-3, temperature=0.05)
    model, history = train_ecs(EcsConfig(embed_dim=32, num_experts=4, active=2), settings, units,
                               [(u, u) for u in range(len(keys))], keys)
    assert history[-1]["loss"] < history[0]["loss"]
    before, after = _r_at_1(units, mean, keys), _r_at_1(units, model, keys)
    assert after >= 0.9 and after > before + 0.2, (before, after)


@pytest.fixture(scope="module")
def indexed(tmp_path_factory, tiny_corpus):
    store = captioned_store(tmp_path_factory.mktemp("ecs"), tiny_corpus)
    proc = run_cli("index", "--store", store.root, "--local")
    assert proc.returncode == 0, proc.stderr
    proc = run_cli("enhance", "--store", store.root, "--level", "video", "--k", "3", "--prompt", "method=sample",
                   "--local")
    assert proc.returncode == 0, proc.stderr
    return store


def test_recap_ecs_trains_on_the_train_queries_and_ranks_the_test_split_by_every_arm(indexed, tmp_path):
    store = copy_store(indexed.root, tmp_path / "s")
    [version] = store.listdir("captions/enhanced")
    args = ("ecs", "--store", store.root, "--enhanced", version, "--k", "3", "--experts", "4", "--epochs", "3", "--json")
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    arms = [a["arm"] for a in out["arms"]]
    assert arms == ["windows", "+ ReCap captions (mean)", f"+ {version} K=3 (mean)", "+ ECS (2 of 4, topk)"]
    for a in out["arms"]:
        assert a["text-to-video queries"] > 0 and 0 <= a["text-to-video R@1"] <= a["text-to-video R@5"] <= 100
    usage = [float(u) for u in out["arms"][-1]["expert usage"].split()]
    assert len(usage) == 4 and sum(usage) == pytest.approx(2.0, abs=0.02)  # two experts per unit
    assert "epoch 3/3" in proc.stderr and "saved" in proc.stderr
    again = run_cli(*args)
    assert again.returncode == 0 and "already trained" in again.stderr
    assert json.loads(again.stdout)["arms"] == out["arms"]

    query = "a person in a kitchen sorting followed by stacking"
    found = run_cli("search", query, "--store", store.root, "--level", "video", "--fusion", "ecs", "--json")
    assert found.returncode == 0, found.stderr
    hits = json.loads(found.stdout)
    config = settle(store.root, record=False)
    stage = index_stage(config, store)
    stage.model, stage.tokenizer = stage.load_encoder()
    q = stage.embed_texts([query])[0]
    fused = latest_fused(store, stage.version()).to_pandas()
    expected = {r.video_id: float(np.dot(r.embedding, q)) for r in fused[fused["level"] == "video"].itertuples()}
    assert len(hits) == len(expected)
    assert all(h["score"] == pytest.approx(expected[h["video_id"]], abs=2e-3) for h in hits)  # float16 rows
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
