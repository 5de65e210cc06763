"""`recap evaluate --task retrieval`: ranks and metrics on a hand-made index written as `recap index` writes one,
and the command end to end on the tiny corpus's real index (tests/test_index.py's store)."""

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.retrieval import (
    _as_metrics_rows, first_hit_rank, format_retrieval, query_ranks, rank_metrics, restrict, summarise,
)
from stages.evaluate import write_metrics
from store import Store, read_groundtruth, read_queries, write_groundtruth, write_queries
from store.index import INDEX_SCHEMA, INDEX_STAGE, index_group_rel, index_table_rel, read_index, stage_index_group

from conftest import REPO, copy_store, run_cli
from test_index import encoder, indexed, stage_of, written  # noqa: F401 (indexed: the fixture)

pytestmark = pytest.mark.usefixtures("one_torch_thread")
VERSION = "index-handmade"
SPANS = [("clip", 0.0, 4.0), ("clip", 4.0, 8.0), ("clip", 8.0, 12.0), ("segment", 0.0, 12.0), ("video", 0.0, 12.0)]
DIM = 8


def test_rank_is_the_first_hit_with_ties_against_it_and_metrics_follow():
    scores = np.array([0.9, 0.5, 0.5, 0.7, 0.1])
    assert first_hit_rank(scores, np.array([0, 1, 0, 0, 0], bool)) == 4  # 0.9, 0.7 and the tied 0.5 above it
    assert first_hit_rank(scores, np.array([1, 1, 0, 0, 0], bool)) == 1
    assert first_hit_rank(scores, np.zeros(5, bool)) == 6  # no hit: past the last candidate
    assert rank_metrics([1, 2, 5, 6, 11]) == {"R@1": 20.0, "R@5": 60.0, "R@10": 80.0, "MdR": 5.0, "MnR": 5.0}
    assert rank_metrics([1, 1, 3, 10]) == {"R@1": 50.0, "R@5": 75.0, "R@10": 100.0, "MdR": 2.0, "MnR": 3.75}


def handmade_store(root) -> Store:
    """Three test videos va, vb, vc and a training video vt, five index rows each (SPANS), committed as
    `recap index` commits them. Query q scores a row by dimension q of its embeddings: text[row, q] (captions),
    video[row, q] (video) and their mean (both). vt scores 1 everywhere: were it searched, it would lead."""
    store = Store(root)
    text = {v: np.zeros((len(SPANS), DIM), np.float32) for v in ("va", "vb", "vc", "vt")}
    video = {v: np.zeros((len(SPANS), DIM), np.float32) for v in text}
    text["vt"][:], video["vt"][:] = 1.0, 1.0
    # q0, video query of va: summaries (row 4) text .5/.75/.25, video .75/.5/.25; vc's clip 0 is its best
    # row at .875, which a summary-less video would score, but vc has a summary.
    for v, t, w in (("va", .5, .75), ("vb", .75, .5), ("vc", .25, .25)):
        text[v][4, 0], video[v][4, 0] = t, w
    text["vc"][0, 0] = video["vc"][0, 0] = .875
    # q1, video query of vb: text .5/.25/.75, video .25/.5/.125
    for v, t, w in (("va", .5, .25), ("vb", .25, .5), ("vc", .75, .125)):
        text[v][4, 1], video[v][4, 1] = t, w
    # q2, clip query of va 0-4 s; the same facts at vb 4-8 s and vc 1-5 s (IoU .6 with vc's 0-4 s row):
    # hits va row 0, vb row 1, vc row 0. Summaries score 1 and are no moment candidates.
    text["va"][0, 2], text["vb"][1, 2], text["vc"][0, 2] = .25, .5, .125
    text["va"][1, 2], text["va"][3, 2], text["vb"][0, 2] = .75, .625, .5
    video["vc"][0, 2], video["vc"][3, 2] = .875, .75
    for v in ("va", "vb", "vc"):
        text[v][4, 2] = video[v][4, 2] = 1.0
    # q3, segment query of vc; va's segment has the same objects in another order, vb's others: hits va, vc.
    text["va"][3, 3], text["vc"][3, 3], text["vb"][3, 3], text["va"][0, 3] = .25, .125, .75, .5
    video["vc"][3, 3], video["vb"][3, 3] = .5, .5
    # q4, a clip query of vc 12-16 s, a span no row covers: missing.
    for vid in text:
        table = pa.Table.from_pylist([{"video_id": vid, "level": level, "start_s": s, "end_s": e,
                                       "caption": f"{vid} {level} {s:g}", "row": i}
                                      for i, (level, s, e) in enumerate(SPANS)], schema=INDEX_SCHEMA)
        group, rel = index_group_rel(VERSION, vid), index_table_rel(VERSION, vid)
        staged = {group: stage_index_group(store, VERSION, vid, text[vid], video[vid], {"fingerprint": vid}),
                  rel: store.stage_table(rel, table)}
        store.commit(INDEX_STAGE, VERSION, vid, vid, staged)

    clip_f = json.dumps({"action": "turns", "colour": "red", "new_colour": None, "shape": "cube"}, sort_keys=True)
    other_f = json.dumps({"action": "washes", "colour": "blue", "new_colour": None, "shape": "ball"}, sort_keys=True)
    seg = lambda objects: json.dumps({"activity": "sorting", "objects": objects}, sort_keys=True)
    row = lambda vid, level, s, e, facts, split="test": {
        "video_id": vid, "split": split, "level": level, "start_s": s, "end_s": e, "text": "", "facts": facts}
    clips = [row("va", "clip", 0.0, 4.0, clip_f), row("vb", "clip", 4.0, 8.0, clip_f),
             row("vc", "clip", 1.0, 5.0, clip_f), row("vc", "clip", 12.0, 16.0, other_f),
             row("vt", "clip", 0.0, 4.0, clip_f, "train")]
    segments = [row("va", "segment", 0.0, 12.0, seg(["blue cube", "red cube"])),
                row("vb", "segment", 0.0, 12.0, seg(["red cube", "green cube"])),
                row("vc", "segment", 0.0, 12.0, seg(["red cube", "blue cube"]))]
    write_groundtruth(store, "clip", pa.Table.from_pylist(clips))
    write_groundtruth(store, "segment", pa.Table.from_pylist(segments))
    questions = [row("va", "video", 0.0, 12.0, None), row("vb", "video", 0.0, 12.0, None),
                 row("va", "clip", 0.0, 4.0, clip_f), row("vc", "segment", 0.0, 12.0, seg(["red cube", "blue cube"])),
                 row("vc", "clip", 12.0, 16.0, other_f), row("vt", "video", 0.0, 12.0, None, "train")]
    write_queries(store, pa.Table.from_pylist([{**q, "text": f"q{i}"} for i, q in enumerate(questions)]))
    return store


def test_known_ranks_on_a_handmade_index(tmp_path):
    store = handmade_store(tmp_path / "store")
    queries = read_queries(store, "test").to_pandas().sort_values("text", ignore_index=True)
    assert queries["text"].tolist() == ["q0", "q1", "q2", "q3", "q4"]  # the train split's q5 is not asked
    groundtruth = pd.concat([read_groundtruth(store, level, "test").to_pandas() for level in ("clip", "segment")])
    rows = restrict(read_index(store, VERSION), sorted(set(queries["video_id"])))
    assert rows.video_ids == ["va", "vb", "vc"]
    embeddings = np.eye(len(queries), DIM, dtype=np.float32)  # query i: dimension i
    ranks = query_ranks(rows, queries, groundtruth, embeddings)
    got = {(task, arm): group.sort_values("query")["rank"].tolist()
           for (task, arm), group in ranks.groupby(["task", "arm"])}
    assert got == {
        ("text-to-video", "captions"): [2, 3], ("text-to-video", "video"): [1, 1], ("text-to-video", "both"): [2, 3],
        ("text-to-moment", "captions"): [4, 3, 13], ("text-to-moment", "video"): [1, 2, 13],
        ("text-to-moment", "both"): [1, 2, 13]}
    assert set(ranks.query("task == 'text-to-moment'")["candidates"]) == {12}  # 3 clips and a segment, 3 videos

    metrics = summarise(ranks)
    table = metrics.pivot_table(index=["task", "arm"], columns="metric", values="value")
    assert table.loc[("text-to-video", "captions")].to_dict() == {"R@1": 0.0, "R@5": 100.0, "R@10": 100.0,
                                                                  "MdR": 2.5, "MnR": 2.5}
    assert table.loc[("text-to-video", "video")].to_dict() == {"R@1": 100.0, "R@5": 100.0, "R@10": 100.0,
                                                               "MdR": 1.0, "MnR": 1.0}
    assert table.loc[("text-to-moment", "captions")].to_dict() == pytest.approx(
        {"R@1": 0.0, "R@5": 200 / 3, "R@10": 200 / 3, "MdR": 4.0, "MnR": 20 / 3})
    assert table.loc[("text-to-moment", "both")].to_dict() == pytest.approx(
        {"R@1": 100 / 3, "R@5": 200 / 3, "R@10": 200 / 3, "MdR": 2.0, "MnR": 16 / 3})
    counts = metrics.drop_duplicates(["task", "arm"]).set_index(["task", "arm"])[["queries", "missing"]]
    assert counts.loc[("text-to-video", "both")].tolist() == [2, 0]
    assert counts.loc[("text-to-moment", "video")].tolist() == [3, 1]

    lines = format_retrieval(metrics.assign(version=VERSION, split="test")).splitlines()
    assert VERSION in lines[0] and lines[1].split() == ["R@1", "R@5", "R@10", "MdR", "MnR", "queries"]
    assert lines[2].split() == ["text-to-video", "video", "100.0", "100.0", "100.0", "1.0", "1.0", "2"]
    assert lines[6].split() == ["captions", "0.0", "66.7", "66.7", "4.0", "6.7", "3"]


def test_an_unindexed_video_of_the_split_is_refused(tmp_path):
    store = handmade_store(tmp_path / "store")
    with pytest.raises(FileNotFoundError, match=r"1 of the 4 videos to search are not indexed \(first: vd\); "
                                                r"run `recap index`"):
        restrict(read_index(store, VERSION), ["va", "vb", "vc", "vd"])


# ---- the command on the tiny corpus's index ------------------------------------------------------------

def test_the_store_holds_the_corpus_queries(indexed, tiny_corpus):
    stored = read_queries(Store(indexed)).to_pylist()
    corpus = pq.read_table(tiny_corpus / "groundtruth" / "queries.parquet").to_pylist()
    assert sorted(map(json.dumps, stored)) == sorted(map(json.dumps, corpus)) and len(stored) == 124


def iou(a, b) -> float:
    inter = max(0.0, min(a[1], b[1]) - max(a[0], b[0]))
    return inter / (a[1] - a[0] + b[1] - b[0] - inter)


def oracle_moment_ranks(store: Store, split: str) -> dict[str, list[int]]:
    """Per arm, the text-to-moment ranks computed from the files as written with a direct encoding: a row is
    relevant where it overlaps, IoU >= 0.5, a ground-truth window of the query's level with the same facts (the
    last segment's caption window takes in the tail clip: 48-74 s against 48-72 s), ties against the hit."""
    stage = stage_of(store)
    model, tok = encoder(stage)
    queries = read_queries(store, split).to_pandas().query("level != 'video'")
    facts = lambda level, f: json.dumps({**json.loads(f), **({"objects": sorted(json.loads(f)["objects"])}
                                                              if level == "segment" else {})}, sort_keys=True)
    truth = pd.concat([read_groundtruth(store, lv, split).to_pandas() for lv in ("clip", "segment")])
    windows = {}
    for r in truth.itertuples():
        windows.setdefault((r.level, facts(r.level, r.facts)), set()).add((r.video_id, r.start_s, r.end_s))
    tables = [(t, x, v) for vid, (t, x, v) in written(store, stage.version()).items() if vid in set(truth["video_id"])]
    table = pd.concat([t for t, _, _ in tables], ignore_index=True)
    moment = (table["level"] != "video").to_numpy()
    text = np.concatenate([x for _, x, _ in tables]).astype(np.float32)[moment]
    video = np.concatenate([v for _, _, v in tables]).astype(np.float32)[moment]
    table = table[moment]
    joint = ((text + video) / 2).astype(np.float16).astype(np.float32)  # as search holds it
    with torch.no_grad():
        q = torch.cat([model.encode_text(tok([t])) for t in queries["text"]]).numpy()
    ranks = {"captions": [], "video": [], "both": []}
    for i, r in enumerate(queries.itertuples()):
        relevant = windows[r.level, facts(r.level, r.facts)]
        hit = np.array([any(v == rv and iou((s, e), (rs, re)) >= 0.5 for rv, rs, re in relevant)
                        for v, s, e in zip(table["video_id"], table["start_s"], table["end_s"])])
        for arm, scores in (("captions", text @ q[i]), ("video", video @ q[i]), ("both", joint @ q[i])):
            ranks[arm].append(1 + int((scores[~hit] >= scores[hit].max()).sum()))
    return ranks


def test_evaluate_retrieval_command(indexed, tmp_path):
    store = copy_store(indexed, tmp_path / "s")
    proc = run_cli("evaluate", "--task", "retrieval", "--store", store.root, "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads(proc.stdout)
    assert (doc["task"], doc["split"], doc["index_version"]) == ("retrieval", "test", stage_of(store).version())
    metrics = pd.DataFrame(doc["metrics"])
    assert len(metrics) == 2 * 3 * 5 and list(metrics.columns) == ["task", "arm", "metric", "value", "queries",
                                                                   "missing"]
    test_queries = read_queries(store, "test").to_pandas()
    count = metrics.drop_duplicates(["task", "arm"]).set_index(["task", "arm"])["queries"]
    assert set(count.loc["text-to-video"]) == {1} and set(count.loc["text-to-moment"]) == {
        int((test_queries["level"] != "video").sum())}
    assert set(metrics.query("task == 'text-to-video'")["value"]) <= {100.0, 1.0}  # one test video: found first
    for arm, ranks in oracle_moment_ranks(store, "test").items():
        got = metrics.query("task == 'text-to-moment' and arm == @arm").set_index("metric")["value"].to_dict()
        assert got == pytest.approx(rank_metrics(ranks), abs=1e-6), arm

    written_table = store.read_table(doc["metrics_file"]).to_pandas()
    assert doc["metrics_file"] == f"metrics/retrieval-test-{doc['index_version']}.parquet"
    assert sorted(written_table["value"]) == pytest.approx(sorted(metrics["value"]))
    assert set(written_table["level"]) == {"text-to-video", "text-to-moment"}
    assert set(written_table["protocol"]) == {"video", "captions", "both"}

    proc = run_cli("evaluate", "--task", "retrieval", "--store", store.root, "--split", "train")
    assert proc.returncode == 0, proc.stderr[-2000:]
    header, columns, *lines = proc.stdout.splitlines()
    assert "split train" in header and columns.split() == ["R@1", "R@5", "R@10", "MdR", "MnR", "queries"]
    assert [line.split()[-1] for line in lines] == ["4"] * 3 + [str(int((read_queries(store, "train").to_pandas()[
        "level"] != "video").sum()))] * 3
    assert f"wrote metrics/retrieval-train-{doc['index_version']}.parquet" in proc.stderr


def test_no_index_or_no_queries_is_one_line(indexed, tmp_path):
    bare = copy_store(indexed, tmp_path / "bare")
    bare.remove("index")
    bare.remove("markers/index")
    proc = run_cli("evaluate", "--task", "retrieval", "--store", bare.root)
    assert proc.returncode == 2 and "run `recap index`" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1

    bare.remove("groundtruth/queries.parquet")
    proc = run_cli("evaluate", "--task", "retrieval", "--store", bare.root)
    assert proc.returncode == 2 and "no retrieval queries of split 'test'" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1

    proc = run_cli("evaluate", "--task", "retrieval", "--store", bare.root, "--by", "video")
    assert proc.returncode == 2 and "--by and --protocol go with --task captions" in proc.stderr
    proc = run_cli("evaluate", "--task", "ranking", "--store", bare.root)
    assert proc.returncode == 2 and "--task takes captions or retrieval" in proc.stderr


def test_bench_combines_seeds_into_mean_and_worst(tmp_path):
    """bench/retrieval_seeds.py on two stores, each holding a retrieval table as the command writes it."""
    for seed, ranks in enumerate(([1, 2], [3, 3, 4])):
        frame = pd.DataFrame([("text-to-video", "video", q, r, 4) for q, r in enumerate(ranks)],
                             columns=["task", "arm", "query", "rank", "candidates"])
        metrics = summarise(frame).assign(version=f"index-{seed}", split="test")
        write_metrics(Store(tmp_path / f"s{seed}"), _as_metrics_rows(metrics), f"retrieval-test-index-{seed}")
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "retrieval_seeds.py"), str(tmp_path / "s0"),
                           str(tmp_path / "s1")], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    header, names, _, line = proc.stdout.splitlines()
    assert "2 seeds (indexes index-0, index-1)" in header
    assert names.split()[:4] == ["R@1", "mean", "R@1", "worst"]
    # R@1 50 and 0; R@5, R@10 100; MdR 1.5 and 3; MnR 1.5 and 3.33
    assert line.split() == ["text-to-video", "video", "25.0", "0.0", "100.0", "100.0", "100.0", "100.0", "2.2",
                            "3.0", "2.4", "3.3", "2/3"]
