"""`recap index` and `recap search` on a small real store: the tiny corpus, a one-epoch tiny dual encoder from
`recap pretrain`, features extracted with it, and captions at the three levels from small untrained checkpoints
(sampled, so clip captions differ from one another)."""

import io
import json
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch
import zarr

from models.clip_tokenizer import ClipTokenizer
from models.lavila import DualEncoder, LavilaConfig
from pipeline.config import load_config, settle
from pipeline.dag import build_stages, index_stage
from pipeline.pretrain import latest_encoder
from pipeline.runner import run_stage
from pipeline.search import SearchIndex, merge_hits, run_search, search
from stages.index import span_embedding
from store import LEVELS, Store, captions_rel, read_captions, read_videos
from store.index import read_index

from conftest import REPO, captioned_store, copy_store, run_cli

pytestmark = pytest.mark.usefixtures("one_torch_thread")
QUIET = io.StringIO()


@pytest.fixture(scope="module")
def indexed(tmp_path_factory, tiny_corpus):
    """The store, its settings in its recap.toml (so commands need only --store), every stage run and indexed."""
    store = captioned_store(tmp_path_factory.mktemp("index"), tiny_corpus)
    config = settle(store.root, None, record=False)
    assert run_stage(index_stage(config, store), store, executor="local", stream=QUIET).done == 6
    return store.root


def stage_of(store: Store):
    return index_stage(settle(store.root, record=False), store)


def written(store: Store, version: str) -> dict:
    """Per video, the files as written: the table (pandas) and both arrays."""
    out = {}
    for vid in sorted(store.markers("index", version)):
        group = zarr.open_group(store.abs(f"index/{version}/{vid}"), mode="r")
        out[vid] = (pd.read_parquet(store.abs(f"index/{version}/{vid}.parquet")), group["text"][:], group["video"][:])
    return out


def assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for vid in a:
        pd.testing.assert_frame_equal(a[vid][0], b[vid][0])
        for x, y in zip(a[vid][1:], b[vid][1:]):
            np.testing.assert_allclose(x.astype(np.float32), y.astype(np.float32), atol=2e-3)


def encoder(stage):
    return DualEncoder.from_lavila(stage.checkpoint, LavilaConfig.tiny()), ClipTokenizer()


def oracle(store: Store, stage, text: str, model=None):
    """Every row of the index with its score for `text`, the mean of its two cosine similarities, from the
    files as written (not through pipeline.search); and the query's embedding."""
    model, tok = model or encoder(stage)
    with torch.no_grad():
        q = model.encode_text(tok([text]))[0].numpy()
    frames = []
    for vid, (table, text_emb, video_emb) in written(store, stage.version()).items():
        sims_text, sims_video = text_emb.astype(np.float32) @ q, video_emb.astype(np.float32) @ q
        frames.append(table.assign(text_sim=sims_text, score=(sims_text + sims_video) / 2))
    return pd.concat(frames, ignore_index=True), q


# ---- the index stage -----------------------------------------------------------------------------------

def test_rows_hold_every_caption_with_unit_embeddings_of_a_direct_encoding(indexed):
    store = Store(indexed)
    stage = stage_of(store)
    assert stage.captions.keys() == set(LEVELS) and stage.checkpoint == latest_encoder(store)
    model, tok = encoder(stage)
    features = stage.features.feature_set(store)
    files = written(store, stage.version())
    assert list(files) == [v["video_id"] for v in read_videos(store)]
    for vid, (table, text, video) in files.items():
        captions = [read_captions(store, level, stage.captions[level], vid).sort_by("start_s").to_pandas()
                    for level in LEVELS]
        expected = pd.concat(captions, ignore_index=True)
        assert table.columns.tolist() == ["video_id", "level", "start_s", "end_s", "caption", "row"]
        assert table[["level", "start_s", "end_s", "caption"]].values.tolist() == \
            expected[["level", "start_s", "end_s", "text"]].values.tolist()
        assert set(table["video_id"]) == {vid} and table["row"].tolist() == list(range(len(table)))
        group = zarr.open_group(store.abs(f"index/{stage.version()}/{vid}"), mode="r")
        assert all(group[name].metadata.dimension_names == ("row", "channel") for name in ("text", "video"))
        assert text.dtype == video.dtype == np.float16 and text.shape == video.shape == (len(table), 32)
        for emb in (text, video):
            np.testing.assert_allclose(np.linalg.norm(emb.astype(np.float32), axis=1), 1.0, atol=1e-3)
        windows = features.windows(vid)
        with torch.no_grad():
            direct_text = torch.cat([model.encode_text(tok([c])) for c in table["caption"]]).numpy()
            per_window = model.embed_video_cls(torch.from_numpy(features.read_cls(vid).astype(np.float32))).numpy()
        np.testing.assert_allclose(text.astype(np.float32), direct_text, atol=2e-3)
        for row in table.itertuples():
            inside = (windows[:, 0] >= row.start_s) & (windows[:, 1] <= row.end_s)
            assert inside.any() and (row.level != "clip" or inside.sum() == 1)
            mean = per_window[inside].mean(axis=0)
            np.testing.assert_allclose(video[row.row].astype(np.float32), mean / np.linalg.norm(mean), atol=2e-3)


def test_a_span_embedding_is_the_renormalised_mean_of_the_windows_inside_it():
    """On the tiny corpus every window's embedding is nearly the same (cosine > 0.98), so the rows above cannot
    tell a renormalised mean from a plain one: here orthogonal windows can."""
    windows = np.array([[0.0, 4.0], [4.0, 8.0], [8.0, 10.0]])
    emb = np.eye(3, 4, dtype=np.float32)
    np.testing.assert_allclose(span_embedding(emb, windows, 0.0, 8.0, "v"), [0.5**0.5, 0.5**0.5, 0, 0], atol=1e-6)
    np.testing.assert_allclose(span_embedding(emb, windows, 0.0, 10.0, "v"), [3**-0.5] * 3 + [0], atol=1e-6)
    np.testing.assert_allclose(span_embedding(emb, windows, 4.0, 8.0, "v"), emb[1])
    np.testing.assert_allclose(span_embedding(emb, windows, 8.5, 8.9, "v"), emb[2])  # under half a window: overlap
    with pytest.raises(ValueError, match="v: no feature window overlaps the caption span 10.00-12.00 s"):
        span_embedding(emb, windows, 10.0, 12.0, "v")


def test_rerun_skips_and_a_lost_marker_or_new_captions_redo_only_that_video(indexed, tmp_path):
    store = copy_store(indexed, tmp_path / "s")
    version = stage_of(store).version()
    before = written(store, version)
    again = run_stage(stage_of(store), store, executor="local", stream=QUIET)
    assert (again.done, again.skipped, again.failed) == (0, 6, 0)

    a, b, c = list(before)[:3]
    store.remove(f"markers/index/{version}/{a}.json")  # killed after renaming its outputs into place
    store.remove(f"markers/index/{version}/{b}.json")  # killed before
    store.remove(f"index/{version}/{b}")
    store.remove(f"index/{version}/{b}.parquet")
    redo = run_stage(stage_of(store), store, executor="local", stream=QUIET)
    assert (redo.done, redo.skipped, redo.failed) == (2, 4, 0)
    assert_same(written(store, version), before)

    clip = build_stages(settle(store.root, record=False), store)[1]
    table = read_captions(store, "clip", clip.version(), c).sort_by("start_s")
    texts = ["C opens the fridge"] + table["text"].to_pylist()[1:]
    changed = table.set_column(table.schema.get_field_index("text"), "text", pa.array(texts)) \
        .set_column(table.schema.get_field_index("fingerprint"), "fingerprint", pa.array(["edited"] * len(texts)))
    rel = captions_rel("clip", clip.version(), c)
    store.commit("captions", clip.version(), c, "edited", {rel: store.stage_table(rel, changed)})
    redo = run_stage(stage_of(store), store, executor="local", stream=QUIET)
    assert (redo.done, redo.skipped, redo.failed) == (1, 5, 0)
    after = written(store, version)
    assert_same({k: v for k, v in after.items() if k != c}, {k: v for k, v in before.items() if k != c})
    assert after[c][0]["caption"][0] == "C opens the fridge"
    assert not np.allclose(after[c][1][0], before[c][1][0]) and np.array_equal(after[c][1][1:], before[c][1][1:])


def test_a_run_killed_mid_way_resumes_with_the_units_it_did_not_commit(indexed, tmp_path):
    version = stage_of(Store(indexed)).version()
    reference = written(Store(indexed), version)
    for attempt in range(3):  # the kill lands after the first commit and, nearly always, before the last
        store = copy_store(indexed, tmp_path / f"s{attempt}")
        store.remove(f"index/{version}")
        store.remove(f"markers/index/{version}")
        proc = subprocess.Popen([sys.executable, "-c", "from cli.main import main; main()", "index", "--store",
                                 store.root, "--local", "--batch-size", "1"], cwd=REPO, stderr=subprocess.DEVNULL)
        while proc.poll() is None and not store.markers("index", version):
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        committed = len(store.markers("index", version))
        if committed < 6:
            break
    assert 1 <= committed < 6
    resumed = run_stage(stage_of(store), store, executor="local", stream=QUIET)
    assert (resumed.done, resumed.skipped, resumed.failed) == (6 - committed, committed, 0)
    assert_same(written(store, version), reference)


def test_index_command_on_ray_equals_the_local_run(indexed, tmp_path):
    store = copy_store(indexed, tmp_path / "s")
    version = stage_of(store).version()
    store.remove(f"index/{version}")
    store.remove(f"markers/index/{version}")
    proc = run_cli("index", "--store", store.root, "--workers", "2", fresh=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "[ray] ready" in proc.stderr and "[index] done 6, skipped 0, failed 0" in proc.stderr
    assert_same(written(store, version), written(Store(indexed), version))


def test_an_encoder_that_did_not_make_the_features_is_refused_in_one_line(indexed, tmp_path):
    store = copy_store(indexed, tmp_path / "s")
    stage = stage_of(store)
    other, _ = encoder(stage)
    with torch.no_grad():
        other.visual.cls_token.add_(0.01)
    other.save_lavila(tmp_path / "other.pth")
    proc = run_cli("index", "--store", store.root, "--checkpoint", str(tmp_path / "other.pth"), "--local")
    assert proc.returncode == 2
    [line] = proc.stderr.strip().splitlines()
    assert str(tmp_path / "other.pth") in line and stage.checkpoint in line and "not the encoder" in line
    assert store.listdir("index") == [stage.version()]  # nothing written for the refused one

    random_features = load_config(store=store.root, features={"encoder": "tsf-tiny"})  # the store's latest encoder
    refused = index_stage(random_features, store)
    assert refused.checkpoint == latest_encoder(store)
    with pytest.raises(ValueError, match=r"random weights \(no features.checkpoint\)"):
        refused.check()


# ---- search --------------------------------------------------------------------------------------------

def test_a_stored_clip_caption_is_found_at_its_clip(indexed):
    """Coarse to fine with the defaults keeps every video and segment of this store, so its best clip must be
    the best of a flat ranking of every clip row. The untrained captioners repeat captions across videos, and the
    one-epoch text tower puts all of them close together: the query is the stored caption that leads that flat
    ranking by the widest margin over clips of other captions."""
    store = Store(indexed)
    stage = stage_of(store)
    clips = pd.concat(table for table, _, _ in written(store, stage.version()).values()).query("level == 'clip'")
    model = encoder(stage)
    leads = {}
    for caption in clips["caption"].unique():
        rows = oracle(store, stage, caption, model)[0].query("level == 'clip'")
        own, others = rows[rows["caption"] == caption], rows[rows["caption"] != caption]
        assert own["text_sim"].to_numpy() == pytest.approx(1.0, abs=2e-3)  # its own caption
        leads[caption] = (own["score"].max() - others["score"].max(), own)
    caption = max(leads, key=lambda c: leads[c][0])
    lead, own = leads[caption]
    assert lead > 2e-3  # wider than float16 rounding: the clip to find is well defined
    [hit] = run_search(settle(store.root, record=False), store, caption, top=1)
    assert list(hit) == ["video_id", "start_s", "end_s", "level", "caption", "score"]
    assert (hit["level"], hit["caption"]) == ("clip", caption)
    assert hit["score"] == pytest.approx(own["score"].max(), abs=2e-3)
    carriers = own[own["video_id"] == hit["video_id"]]
    # its clip's span, or the span of adjacent hits it merged into
    assert any(hit["start_s"] <= c.start_s and c.end_s <= hit["end_s"] for c in carriers.itertuples())


def test_each_coarse_step_narrows_the_next(indexed):
    store = Store(indexed)
    stage = stage_of(store)
    query = "C sorted the cubes"
    rows, q = oracle(store, stage, query)
    index = SearchIndex.from_rows(read_index(store, stage.version()))
    summaries = rows.query("level == 'video'").set_index("video_id")["score"]

    videos = search(index, q, level="video", top=10)
    assert [r["level"] for r in videos] == ["video"] * 6
    assert [r["score"] for r in videos] == sorted((r["score"] for r in videos), reverse=True)
    for r in videos:
        assert r["score"] == pytest.approx(summaries[r["video_id"]], abs=2e-3)
    first = videos[0]["video_id"]
    assert summaries[first] == pytest.approx(summaries.max(), abs=2e-3)

    segments = search(index, q, level="segment", top=10, videos=1)
    own = rows.query("level == 'segment' and video_id == @first")
    assert [r["video_id"] for r in segments] == [first] * len(own)
    assert segments[0]["score"] == pytest.approx(own["score"].max(), abs=2e-3)

    clips = search(index, q, level="clip", top=10, videos=1)
    assert clips and {r["video_id"] for r in clips} == {first}
    best_segment = segments[0]
    narrowed = search(index, q, level="clip", top=10, videos=1, segments=1)
    assert all(best_segment["start_s"] <= r["start_s"] and r["end_s"] <= best_segment["end_s"] for r in narrowed)
    lo, hi = best_segment["start_s"], best_segment["end_s"]
    inside = rows.query("level == 'clip' and video_id == @first and start_s >= @lo and end_s <= @hi")
    assert narrowed[0]["score"] == pytest.approx(inside["score"].max(), abs=2e-3)


def test_adjacent_clip_hits_merge_into_one_span(indexed):
    store = Store(indexed)
    stage = stage_of(store)
    index = SearchIndex.from_rows(read_index(store, stage.version()))
    scores = np.random.default_rng(0).random(len(index.level)).astype(np.float32)
    r = int(np.flatnonzero(index.level == 0)[0])  # the first video's first clip
    scores[r + 2] = 2.0  # the better of two adjacent hits
    spans = merge_hits(index, np.array([r + 5, r + 1, r + 2]), scores)
    assert [(s["start_s"], s["end_s"], s["score"], s["caption"]) for s in spans] == [
        (index.start[r + 1], index.end[r + 2], 2.0, index.caption[r + 2].as_py()),
        (index.start[r + 5], index.end[r + 5], pytest.approx(scores[r + 5]), index.caption[r + 5].as_py())]

    # Asking for more rows than there are clips makes every clip a hit: each video is one span, start to end.
    _, q = oracle(store, stage, "C sorted the cubes")
    whole = search(index, q, level="clip", top=1000)
    durations = {v["video_id"]: v["duration_s"] for v in read_videos(store)}
    assert sorted((r["video_id"], r["start_s"], r["end_s"]) for r in whole) == \
        [(v, 0.0, pytest.approx(d)) for v, d in sorted(durations.items())]


def test_search_command_prints_json_or_a_table(indexed, tmp_path):
    proc = run_cli("search", "C sorted the cubes", "--store", indexed, "--json", "--top", "3")
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(proc.stdout)
    assert 1 <= len(rows) <= 3 and all(list(r) == ["video_id", "start_s", "end_s", "level", "caption", "score"]
                                       for r in rows)
    assert [r["score"] for r in rows] == sorted((r["score"] for r in rows), reverse=True)

    proc = run_cli("search", "C sorted the cubes", "--store", indexed, "--level", "segment", "--top", "2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    header, *lines = proc.stdout.splitlines()
    assert header.split() == ["#", "score", "video", "span", "level", "caption"] and len(lines) == 2
    assert all(re.match(r"\s*\d+\s+\d\.\d{3}\s+tiny-\S+\s+\d\d:\d\d–\d\d:\d\d\s+segment\b", line) for line in lines)

    bare = copy_store(indexed, tmp_path / "bare")
    bare.remove("index")
    bare.remove("markers/index")
    proc = run_cli("search", "C sorted the cubes", "--store", bare.root)
    assert proc.returncode == 2 and "run `recap index`" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
