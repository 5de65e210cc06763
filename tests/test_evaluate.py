import json
import math
import os

import dask.dataframe as dd
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stages.evaluate import (
    METRICS, METRICS_SCHEMA, PROTOCOLS, evaluate_level, evaluate_pairs, format_metrics, match_windows,
    meteor_scorer, score_pairs, write_metrics,
)
from store import CAPTION_SCHEMA, GROUNDTRUTH_SCHEMA, captions_dir, captions_rel, write_groundtruth
from synth import facts


@pytest.fixture(scope="module")
def meteor():
    with meteor_scorer() as scorer:  # one JVM for the module: starting METEOR takes seconds
        yield scorer


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_hand_computed_scores(meteor, protocol):
    # Lower-case, unpunctuated text: both protocols see the same tokens.
    # CIDEr-D per pair = 10 * mean over n = 1..4 of cos_n(hyp, ref) * exp(-d^2 / 72), with n-gram weights
    # tf * (log N - log df) over the N = 2 references. "c" and "cube" are in both (weight 0), every other
    # n-gram in one (weight log 2); d = bigram count difference = 0 here.
    # Pair 1 (identical): cos_1 = cos_2 = cos_3 = 1, no 4-grams -> 10 * 3/4 = 7.5.
    # Pair 2: the only weighted unigram, "picks", is not in "c drops cube"; no shared bigram -> 0.
    scores = score_pairs(["c picks cube", "c picks cube"], ["c picks cube", "c drops cube"], protocol, meteor)
    assert scores["CIDEr"][1] == pytest.approx([750.0, 0.0])
    assert scores["CIDEr"][0] == pytest.approx(375.0)
    # ROUGE-L of pair 2: LCS "c cube" = 2 of 3 tokens each side, so P = R = F = 2/3.
    assert scores["ROUGE_L"][1] == pytest.approx([100.0, 200 / 3])
    # METEOR 1.5 has no fragmentation penalty for an exact match.
    assert scores["METEOR"][1][0] == pytest.approx(100.0)

    # LCS("c picks up the red cube", "c picks the cube up") = "c picks the cube" = 4,
    # P = 4/6, R = 4/5, ROUGE-L = (1 + 1.2^2) P R / (R + 1.2^2 P) = 1.30133 / 1.76 = 0.739394.
    one = evaluate_pairs(["c picks up the red cube"], ["c picks the cube up"], protocol, meteor)
    assert one["ROUGE_L"] == pytest.approx(100 * 2.44 * (4 / 6) * (4 / 5) / (4 / 5 + 1.44 * 4 / 6))
    assert one["CIDEr"] == 0.0  # one reference: every IDF is log(1) - log(1)
    disjoint = evaluate_pairs(["a dog runs", "the sky"], ["c picks cube", "c opens door"], protocol, meteor)
    assert disjoint == {"CIDEr": 0.0, "ROUGE_L": 0.0, "METEOR": 0.0}


def test_protocols_differ_on_case_and_punctuation(meteor):
    predictions = ["#c c picks up the cube", "#c c opens the top drawer"]
    references = ["#C C picks up the cube.", "#C C opens the top drawer."]
    coco = evaluate_pairs(predictions, references, "coco", meteor)
    recap = evaluate_pairs(predictions, references, "videorecap", meteor)
    # PTB lower-cases and drops the full stop: identical corpora. Every pair has informative
    # n-grams of each order 1..4, so CIDEr is 10 per pair.
    assert coco == pytest.approx({"CIDEr": 1000.0, "ROUGE_L": 100.0, "METEOR": 100.0})
    # Lower-case only: "cube." != "cube" and "drawer." != "drawer", so LCS = 5 of 6 tokens in each pair.
    assert recap["ROUGE_L"] == pytest.approx(100 * 5 / 6)
    assert recap["CIDEr"] < 1000.0 and recap["METEOR"] < 100.0


def _write_fixture(store):
    def gt(video_id, split, start, text):
        return {"video_id": video_id, "split": split, "level": "clip", "start_s": start, "end_s": start + 4.0,
                "text": text}

    write_groundtruth(store, "clip", pa.Table.from_pylist([
        gt("v1", "test", 0.0, "#C C picks up the cube."), gt("v1", "test", 4.0, "#C C puts down the cube."),
        gt("v1", "test", 8.0, "#C C opens the drawer."), gt("v2", "test", 0.0, "#C C washes the cup."),
        gt("v3", "test", 0.0, "#C C closes the door."), gt("v9", "train", 0.0, "#C C reads a book."),
    ], schema=GROUNDTRUTH_SCHEMA))

    def captions(video_id, windows):
        return pa.Table.from_pylist([
            {"video_id": video_id, "level": "clip", "start_s": s, "end_s": e, "text": t, "score": 0.0,
             "fingerprint": "fp"} for s, e, t in windows], schema=CAPTION_SCHEMA)

    store.write_table(captions_rel("clip", "p1", "v1"), captions("v1", [
        (0.0, 4.0, "#C C picks up the cube"),
        (3.2, 7.2, "#C C looks around"),  # IoU with [4, 8): 3.2 / 4.8
        (4.5, 8.5, "#C C puts the cube down"),  # IoU with [4, 8): 3.5 / 4.5, the highest
        (5.5, 14.5, "#C C walks around"),  # IoU with [8, 12): 4 / 9, under 0.5
    ]))
    store.write_table(captions_rel("clip", "p1", "v2"), captions("v2", [(0.0, 4.0, "#C C washes a cup")]))
    store.write_table(captions_rel("clip", "p1", "v9"), captions("v9", [(0.0, 4.0, "#C C reads a book")]))
    store.write_table(captions_rel("clip", "p1", "vx"), captions("vx", [(0.0, 4.0, "no ground truth")]))
    # A crashed writer's hidden leftover: readers skip it, so v3 stays missing.
    store.write_table(f"{captions_dir('clip', 'p1')}/.tmp-v3.parquet-0123", captions("v3", [(0.0, 4.0, "leak")]))


def test_match_windows_by_iou_counts_missing_and_filters_split(store):
    _write_fixture(store)
    pairs = match_windows(store, "clip", "p1")
    assert [(r.video_id, r.start_s, r.prediction) for r in pairs.fillna({"prediction": "-"}).itertuples()] == [
        ("v1", 0.0, "#C C picks up the cube"), ("v1", 4.0, "#C C puts the cube down"), ("v1", 8.0, "-"),
        ("v2", 0.0, "#C C washes a cup"), ("v3", 0.0, "-")]
    assert pairs["iou"].tolist()[:2] == pytest.approx([1.0, 3.5 / 4.5])
    assert pairs["iou"].isna().tolist() == [False, False, True, False, True]
    train = match_windows(store, "clip", "p1", split="train")
    assert train[["video_id", "prediction"]].values.tolist() == [["v9", "#C C reads a book"]]
    with pytest.raises(FileNotFoundError, match="no committed clip captions of version p2"):
        match_windows(store, "clip", "p2")
    with pytest.raises(ValueError, match="no ground truth in split 'val'"):
        match_windows(store, "clip", "p1", split="val")


def test_evaluate_level_corpus_and_per_video_rows(store, meteor):
    _write_fixture(store)
    df = evaluate_level(store, "clip", "p1", by="video", meteor=meteor)
    assert set(df["protocol"]) == {"videorecap"} and set(df["split"]) == {"test"}
    corpus = df[df["video_id"].isna()].set_index("metric")
    assert corpus[["n_pairs", "n_missing"]].values.tolist() == [[3, 2]] * 3

    predictions = ["#C C picks up the cube", "#C C puts the cube down", "#C C washes a cup"]
    references = ["#C C picks up the cube.", "#C C puts down the cube.", "#C C washes the cup."]
    expected = score_pairs(predictions, references, "videorecap", meteor)
    videos = df[df["video_id"].notna()].set_index(["video_id", "metric"])
    for name in METRICS:
        assert corpus.loc[name, "value"] == pytest.approx(expected[name][0])
        # Per-video values are means of the corpus computation's per-caption scores.
        assert videos.loc[("v1", name), "value"] == pytest.approx(expected[name][1][:2].mean())
        assert videos.loc[("v2", name), "value"] == pytest.approx(expected[name][1][2])
        assert math.isnan(videos.loc[("v3", name), "value"])
    # CIDEr of v1's captions alone would use other IDFs (here: a v1-only corpus).
    assert videos.loc[("v1", "CIDEr"), "value"] != pytest.approx(
        evaluate_pairs(predictions[:2], references[:2], "videorecap", meteor)["CIDEr"])
    counts = videos.xs("CIDEr", level="metric")[["n_pairs", "n_missing"]]
    assert counts.to_dict("index") == {"v1": {"n_pairs": 2, "n_missing": 1}, "v2": {"n_pairs": 1, "n_missing": 0},
                                       "v3": {"n_pairs": 0, "n_missing": 1}}


def test_metrics_table_round_trips_through_pyarrow_and_dask(store, meteor):
    _write_fixture(store)
    df = evaluate_level(store, "clip", "p1", protocol="coco", by="video", meteor=meteor)
    rel = write_metrics(store, df, "run1")
    assert rel == "metrics/run1.parquet"
    assert os.listdir(store.abs("metrics")) == ["run1.parquet"]
    table = pq.read_table(store.abs(rel))
    assert table.schema.equals(METRICS_SCHEMA)
    assert set(table["run"].to_pylist()) == {"run1"} and table["video_id"].null_count == 3
    back = dd.read_parquet(store.url("metrics")).compute()
    assert back.sort_values(["video_id", "metric"], na_position="first")["value"].tolist() == pytest.approx(
        df.sort_values(["video_id", "metric"], na_position="first")["value"].tolist(), nan_ok=True)

    text = format_metrics(back)
    assert text.splitlines()[0] == "clip captions, version p1, split test, protocol coco (scores x100)"
    lines = {line.split()[0]: line.split()[1:] for line in text.splitlines()[2:]}
    assert list(lines) == ["(corpus)", "v1", "v2", "v3"]
    assert lines["(corpus)"][-2:] == ["3", "2"] and lines["v3"] == ["n/a", "n/a", "n/a", "0", "1"]
    cider = back[back["video_id"].isna() & (back["metric"] == "CIDEr")]["value"].item()
    assert lines["(corpus)"][0] == f"{cider:.2f}"


def _java_children() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True) if "java" in p.name()}


def test_meteor_jvm_is_ended_and_a_dead_one_is_reported(meteor):
    before = _java_children()
    assert evaluate_pairs(["c opens the door"], ["c opens the door"])["METEOR"] == pytest.approx(100.0)
    assert _java_children() <= before  # the call's own JVM is gone

    with meteor_scorer() as scorer:
        scorer.meteor_p.kill()
        scorer.meteor_p.wait()
        with pytest.raises(RuntimeError, match="METEOR's Java process failed"):
            evaluate_pairs(["a b"], ["a b"], meteor=scorer)
    assert not scorer.lock.locked()  # else Meteor.__del__ would hang at garbage collection


def test_missing_java_is_one_clear_line(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    for protocol in PROTOCOLS:
        with pytest.raises(RuntimeError, match="^java not found on PATH: [^\n]*$"):
            evaluate_pairs(["a b"], ["a b"], protocol)


def test_empty_and_mismatched_input():
    assert all(math.isnan(v) for v in evaluate_pairs([], []).values())
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        evaluate_pairs(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="unknown protocol"):
        evaluate_pairs(["a"], ["a"], "bleu")


# ---- semantic accuracy --------------------------------------------------------------

def _facts_fixture(store, level, rows):
    """Ground truth of `level` with facts (as the synthetic corpus writes them) and one prediction per row."""
    write_groundtruth(store, level, pa.Table.from_pylist([
        {"video_id": f"v{i}", "split": "test", "level": level, "start_s": 0.0, "end_s": 4.0, "text": truth,
         "facts": json.dumps(facts.parse(level, truth))} for i, (truth, _) in enumerate(rows)]))
    for i, (_, prediction) in enumerate(rows):
        if prediction is not None:
            store.write_table(captions_rel(level, "p", f"v{i}"), pa.Table.from_pylist([
                {"video_id": f"v{i}", "level": level, "start_s": 0.0, "end_s": 4.0, "text": prediction,
                 "score": 0.0, "fingerprint": "fp"}], schema=CAPTION_SCHEMA))


def _corpus(scores):
    return scores[scores["video_id"].isna()].set_index("metric")["value"].to_dict()


def test_semantic_accuracy_per_level(store, meteor):
    _facts_fixture(store, "clip", [
        ("#C C picks up the red cube", "#C C lifts the red cube"),       # all right, other words
        ("#C C turns the blue ring", "#C C turns the blue ball around"),  # shape wrong
        ("#C C washes the green cone", "#C C washes the green cone"),
        ("#C C paints the red ball blue", "#C C turns the"),              # not a sentence: wrong on every fact
        ("#C C moves the red cube to the left", None),                    # missing: not scored
    ])
    clip = _corpus(evaluate_level(store, "clip", "p", meteor=meteor))
    assert {k: clip[k] for k in ("action", "colour", "shape", "all_three", "parsed", "distinct")} == {
        "action": 75.0, "colour": 75.0, "shape": 50.0, "all_three": 50.0, "parsed": 75.0, "distinct": 4.0}

    _facts_fixture(store, "segment", [
        ("C sorted the red, green and blue cubes.", "C sorted the red cube and the green cube by colour."),
        ("C painted the cone blue.", "C washed the blue cone."),
    ])
    segment = _corpus(evaluate_level(store, "segment", "p", meteor=meteor))
    # F1 of {red, green} cubes against {red, green, blue}: 2 * 2 / (2 + 3); then the right object, wrong activity.
    assert segment["activity"] == 50.0 and segment["object_f1"] == pytest.approx(100 * (0.8 + 1.0) / 2)

    _facts_fixture(store, "video", [
        ("C was in the garden. C sorted the cubes, then washed the ball, then stacked the ring and the cone.",
         "In the garden, C first sorted the rings, then stacked the cube, and finally washed the ball."),
        ("C was in the studio. C arranged the cube.", "C spent the session in the studio. C arranged the cone."),
        ("C was in the kitchen. C washed the cube.", "C was in the"),
    ])
    video = _corpus(evaluate_level(store, "video", "p", by="video", meteor=meteor))
    assert video["place"] == pytest.approx(200 / 3) and video["sequence_exact"] == pytest.approx(100 / 3)
    # Edit distances: sorting, washing, stacking -> sorting, stacking, washing = 2; 0; one activity missing = 1.
    assert video["sequence_edit"] == pytest.approx(1.0)


def test_semantic_scores_need_facts(store, meteor):
    _write_fixture(store)  # ground truth without facts: only the caption metrics
    assert set(_corpus(evaluate_level(store, "clip", "p1", meteor=meteor))) == set(METRICS)
