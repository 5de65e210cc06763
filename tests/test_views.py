"""Reading a store without knowing its version hashes: rows carry their version, current/ holds each level's
current version, feature groups open with xarray, the Python API (`recap.open_store`) and `recap show`. On a real
store: the tiny corpus, real features, captions of small random checkpoints, Parquet and Zarr on disk."""

import json
import re

import duckdb
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import xarray as xr

import recap
from recap.show import clock, show_lines
from pipeline.config import load_config, record_settings
from pipeline.dag import build_stages, features_stage
from pipeline.evaluate import evaluate_all
from pipeline.ingest import ingest_hcap
from pipeline.run import run_all
from pipeline.runner import run_stage
from store import CAPTION_SCHEMA, FeatureSet, Store, captions_rel, read_captions, read_groundtruth, read_videos

from _checkpoints import tiny_checkpoint
from conftest import copy_store, run_cli

LEVELS = ("clip", "segment", "video")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    return {level: str(tiny_checkpoint(root / level, level)) for level in LEVELS}


def settings(root, checkpoints, segment_s=24.0):
    return load_config(store=str(root), features={"encoder": "tsf-tiny", "batch_size": 8},
                       windows={"segment_s": segment_s}, evaluate={"protocols": ("videorecap",)},
                       captions={f"{k}_checkpoint": v for k, v in checkpoints.items()} | {"batch_size": 16})


@pytest.fixture(scope="module")
def featured(tmp_path_factory, tiny_corpus, checkpoints):
    """The tiny corpus ingested, features extracted, the settings recorded in the store (commands need no flags)."""
    root = tmp_path_factory.mktemp("views") / "featured"
    store = Store(root)
    ingest_hcap(store, str(tiny_corpus), str(tiny_corpus / "videos"))
    cfg = record_settings(settings(root, checkpoints))
    assert run_stage(features_stage(cfg), store, executor="local").failed == 0
    return root


@pytest.fixture(scope="module")
def captioned(featured, checkpoints, tmp_path_factory):
    """`featured` with every level captioned by `run_all`, the path `recap run` takes."""
    store = copy_store(featured, tmp_path_factory.mktemp("views") / "captioned")
    summaries = run_all(settings(store.root, checkpoints), store, local=True, evaluate=False)
    assert [s.done for s in summaries] == [0, 6, 6, 6]
    return store.root


def versions_of(store, cfg) -> dict:
    return {s.level: s.version() for s in build_stages(cfg, store)[1:]}


def rows(table) -> list[dict]:
    frame = table if isinstance(table, pd.DataFrame) else table.to_pandas()
    return frame.sort_values(["video_id", "start_s"]).to_dict("records")


# ---- every row carries its version --------------------------------------------------------------------

def test_caption_rows_carry_their_version_and_old_tables_get_it_from_the_folder(captioned, checkpoints, tmp_path):
    store = copy_store(captioned, tmp_path / "s")
    versions = versions_of(store, settings(store.root, checkpoints))
    for level, version in versions.items():
        video = read_videos(store)[0]["video_id"]
        written = pq.read_table(store.abs(captions_rel(level, version, video)))  # the file as the stage wrote it
        assert set(written["version"].to_pylist()) == {version}
        assert set(read_captions(store, level, version)["version"].to_pylist()) == {version}

    # A table written before captions had a version column, beside today's tables in the same folder.
    version = versions["clip"]
    old_video = read_videos(store)[0]["video_id"]
    rel = captions_rel("clip", version, old_video)
    old = pq.read_table(store.abs(rel)).drop_columns(["version"])
    store.write_table(rel, old)
    assert "version" not in pq.read_table(store.abs(rel)).column_names
    table = read_captions(store, "clip", version)
    assert table.schema == CAPTION_SCHEMA and table.num_rows == sum(len(read_captions(
        store, "clip", version, v["video_id"])) for v in read_videos(store))
    assert set(table["version"].to_pylist()) == {version}
    assert set(read_captions(store, "clip", version, old_video)["version"].to_pylist()) == {version}


# ---- current/: the current version of each level --------------------------------------------------------

def test_current_holds_exactly_the_current_versions_rows_and_follows_a_change_of_settings(captioned, checkpoints,
                                                                                           tmp_path):
    store = copy_store(captioned, tmp_path / "s")
    cfg = settings(store.root, checkpoints)
    before = versions_of(store, cfg)
    written = json.loads((tmp_path / "s" / "current" / "versions.json").read_text())
    assert written == {**before, "features": build_stages(cfg, store)[0].version()}
    for level, version in before.items():
        current = pd.read_parquet(tmp_path / "s" / "current" / f"{level}.parquet")
        assert rows(current) == rows(read_captions(store, level, version)) and len(current) > 0

    other = record_settings(settings(store.root, checkpoints, segment_s=32.0))  # the store's settings change
    run_all(other, store, local=True, evaluate=False)
    after = versions_of(store, other)
    assert after["clip"] == before["clip"] and after["segment"] != before["segment"]
    assert after["video"] != before["video"]
    assert json.loads((tmp_path / "s" / "current" / "versions.json").read_text())["segment"] == after["segment"]
    for level, version in after.items():
        current = pd.read_parquet(tmp_path / "s" / "current" / f"{level}.parquet")
        assert set(current["version"]) == {version}
        assert rows(current) == rows(read_captions(store, level, version))
    # Both segment versions stay in captions/; pandas over the level's folder now tells them apart.
    everything = pd.read_parquet(tmp_path / "s" / "captions" / "segment")
    assert set(everything["version"]) == {before["segment"], after["segment"]}
    assert everything.groupby("version").size().to_dict() == {
        v: len(read_captions(store, "segment", v)) for v in (before["segment"], after["segment"])}

    snapshot = {p.name: p.read_bytes() for p in (tmp_path / "s" / "current").iterdir()}
    again = run_all(other, store, local=True, evaluate=False)  # nothing to do: the same bytes
    assert all(s.done == 0 for s in again)
    assert {p.name: p.read_bytes() for p in (tmp_path / "s" / "current").iterdir()} == snapshot


def test_a_partial_caption_run_publishes_what_it_committed(featured, checkpoints, tmp_path):
    store = copy_store(featured, tmp_path / "s")
    cfg = record_settings(settings(store.root, {**checkpoints, "video": str(tmp_path / "deleted")}))
    features, clip = build_stages(cfg, store)[:2]
    victim = read_videos(store)[0]["video_id"]
    markers = f"markers/features/{features.version()}"
    unfinished = {name: store.read_json(f"{markers}/{name}") for name in store.listdir(markers)
                  if name.startswith(f"{victim}@")}
    for name in unfinished:  # its features never finished
        store.remove(f"{markers}/{name}")
    # Output a killed run renamed into place without its marker: not committed.
    stray = pa.Table.from_pylist([{"video_id": victim, "level": "clip", "start_s": 0.0, "end_s": 4.0,
                                   "text": "never committed", "score": 0.0, "fingerprint": "killed"}],
                                 schema=CAPTION_SCHEMA)
    store.write_table(captions_rel("clip", clip.version(), victim), stray)

    proc = run_cli("captions", "--local", "--store", store.root)
    assert proc.returncode == 3, proc.stderr  # the victim is blocked on its features
    current = pd.read_parquet(tmp_path / "s" / "current" / "clip.parquet")
    assert set(current["video_id"]) == {v["video_id"] for v in read_videos(store)} - {victim}
    assert "never committed" not in set(current["text"])
    assert set(current["version"]) == {clip.version()}
    assert rows(current) == rows(read_captions(store, "clip", clip.version()).filter(
        pc.field("video_id") != victim))
    versions = json.loads((tmp_path / "s" / "current" / "versions.json").read_text())
    assert versions["clip"] == clip.version() and set(versions) == {"clip", "segment", "features"}
    assert pd.read_parquet(tmp_path / "s" / "current" / "segment.parquet").empty  # current, nothing committed yet
    assert not (tmp_path / "s" / "current" / "video.parquet").exists()  # its checkpoint is gone: no version

    for name, marker in unfinished.items():  # its features finish; the same version gains the victim's captions
        store.write_json(f"{markers}/{name}", marker)
    run_cli("captions", "--local", "--store", store.root, check=True)
    current = pd.read_parquet(tmp_path / "s" / "current" / "clip.parquet")
    assert set(current["video_id"]) == {v["video_id"] for v in read_videos(store)}
    assert rows(current) == rows(read_captions(store, "clip", clip.version()))


def test_the_one_liners_read_the_current_captions(captioned):
    path = f"{captioned}/current/segment.parquet"
    frame = pd.read_parquet(path)
    api = recap.open_store(captioned).captions("segment")
    assert rows(frame) == rows(api) and len(frame) > 6
    counts = duckdb.sql(f"SELECT version, count(*) AS n, count(DISTINCT video_id) AS videos FROM '{path}' "
                        "GROUP BY version").fetchall()
    assert counts == [(api["version"].iloc[0], len(api), 6)]
    first = duckdb.sql(f"SELECT video_id, start_s, text FROM '{path}' ORDER BY video_id, start_s LIMIT 1").fetchall()[0]
    assert first == tuple(api[["video_id", "start_s", "text"]].iloc[0])


# ---- features with named dimensions ---------------------------------------------------------------------

def test_a_new_feature_group_opens_with_xarray_and_the_api_names_older_ones(featured, tmp_path):
    store = Store(featured)
    name = store.listdir("features")[0]
    features = FeatureSet(store, name)
    video = features.videos()[0]
    group = store.abs(features.rel(video))
    ds = xr.open_zarr(group, consolidated=False)
    assert ds["cls"].dims == ("window", "channel") and ds["windows"].dims == ("window", "bound")
    assert ds["tokens"].dims == ("window", "token", "channel")
    assert (ds["cls"].values == features.read_cls(video)).all()
    assert ds.sizes["window"] == len(features.windows(video)) and ds.attrs["fingerprint"]

    old = copy_store(featured, tmp_path / "old")  # arrays as written before they had dimension names
    for meta in (tmp_path / "old" / "features" / name / video).glob("*/zarr.json"):
        meta.write_text(json.dumps({k: v for k, v in json.loads(meta.read_text()).items()
                                    if k != "dimension_names"}))
    with pytest.raises(Exception, match="dimension_names"):
        xr.open_zarr(old.abs(features.rel(video)), consolidated=False)
    for reader in (recap.open_store(featured), recap.open_store(old.root)):
        api = reader.features(video)
        assert api["cls"].dims == ("window", "channel") and api["tokens"].dims == ("window", "token", "channel")
        assert (api["cls"].values == features.read_cls(video)).all()
        assert (api["start_s"].values == features.windows(video)[:, 0]).all()
        assert api.attrs["feature_set"] == name


# ---- the Python API -----------------------------------------------------------------------------------------

def test_open_store_reads_videos_captions_groundtruth_features_and_metrics(captioned, checkpoints, tmp_path):
    store = copy_store(captioned, tmp_path / "s")
    cfg = settings(store.root, checkpoints)
    versions = versions_of(store, cfg)
    reader = recap.open_store(store.root)
    assert list(reader.videos["video_id"]) == [v["video_id"] for v in read_videos(store)]
    assert (reader.videos["status"] == "ok").all() and "duration_s" in reader.videos
    video = reader.videos["video_id"].iloc[2]
    for level, version in versions.items():
        everything = reader.captions(level)
        assert rows(everything) == rows(read_captions(store, level, version))
        one = reader.captions(level, video_id=video)
        assert set(one["video_id"]) == {video} and rows(one) == rows(read_captions(store, level, version, video))
        assert rows(reader.captions(level, version=version)) == rows(everything)
    assert rows(reader.groundtruth("segment")) == rows(read_groundtruth(store, "segment"))
    assert reader.features(video)["cls"].sizes["window"] == len(reader.captions("clip", video_id=video))

    store.remove("current")  # no caption run has published: the store's settings say which versions are current
    assert reader.versions() == {**versions, "features": build_stages(cfg, store)[0].version()}
    assert rows(reader.captions("segment", video_id=video)) == rows(read_captions(store, "segment",
                                                                                  versions["segment"], video))

    with pytest.raises(FileNotFoundError, match="metrics: no evaluation results"):
        reader.metrics()
    scores = evaluate_all(cfg, store)  # what `recap evaluate` does
    metrics = reader.metrics()
    assert len(metrics) == len(scores) and set(metrics["version"]) == set(versions.values())
    assert metrics.set_index(["level", "metric"])["value"].to_dict() == pytest.approx(
        scores.set_index(["level", "metric"])["value"].to_dict(), nan_ok=True)

    with pytest.raises(FileNotFoundError, match=r"captions/clip/clip-nosuch0: no clip captions"):
        reader.captions("clip", version="clip-nosuch0")
    with pytest.raises(ValueError, match="unknown caption level"):
        reader.captions("scene")
    with pytest.raises(FileNotFoundError, match="no store here"):
        recap.open_store(tmp_path / "nothing")


# ---- recap show -----------------------------------------------------------------------------------------------

SPAN = r"(\d\d):(\d\d)–(\d\d):(\d\d)"


def _seconds(m, i):
    return int(m.group(i)) * 60 + int(m.group(i + 1))


def test_recap_show_prints_a_video_on_a_timeline_and_one_moment(captioned):
    reader = recap.open_store(captioned)
    video = reader.videos["video_id"].iloc[0]
    caps = {level: reader.captions(level, video_id=video) for level in LEVELS}
    proc = run_cli("show", video, "--store", captioned, check=True)
    lines = proc.stdout.splitlines()
    assert lines[0].startswith(video) and caps["clip"]["version"].iloc[0] in lines[0]
    assert re.fullmatch(rf"summary  {SPAN}  .*", lines[1])
    timeline = [(line.split()[0], re.search(SPAN, line)) for line in lines[2:]]
    assert [kind for kind, _ in timeline].count("segment") == len(caps["segment"])
    assert [kind for kind, _ in timeline].count("clip") == len(caps["clip"])
    segment_start = None
    for kind, span in timeline:  # each clip listed under the segment it starts in
        if kind == "segment":
            segment_start, segment_end = _seconds(span, 1), _seconds(span, 3)
        else:
            assert segment_start is not None and segment_start <= _seconds(span, 1) < segment_end
    starts = [_seconds(span, 1) for kind, span in timeline if kind == "clip"]
    assert starts == [int(s) for s in caps["clip"]["start_s"]]

    at = run_cli("show", video, "--at", "0:30", "--store", captioned, check=True).stdout.splitlines()
    assert len(at) == 4 and "at 00:30" in at[0]
    assert [line.split()[0] for line in at[1:]] == ["summary", "segment", "clip"]
    for line, level in zip(at[1:], ("video", "segment", "clip")):
        frame = caps[level]
        [hit] = frame[(frame["start_s"] <= 30) & (30 < frame["end_s"])].to_dict("records")
        span = re.search(SPAN, line)
        assert (_seconds(span, 1), _seconds(span, 3)) == (int(hit["start_s"]), int(hit["end_s"]))
        assert line.endswith(" ".join(hit["text"].split()))
    assert re.search(SPAN, at[3]).group(0) == "00:28–00:32"
    boundary = show_lines(reader, video, 24.0)  # windows are [start, end): the later one; the end is in the last
    assert [re.search(SPAN, line).group(0)[:5] for line in boundary[2:]] == ["00:24", "00:24"]
    duration = float(reader.videos["duration_s"].iloc[0])
    end = show_lines(reader, video, duration)
    assert re.search(SPAN, end[3]).group(0) == f"{clock(caps['clip']['start_s'].iloc[-1])}–{clock(duration)}"

    unknown = run_cli("show", "no-such-video", "--store", captioned)
    assert unknown.returncode == 2 and unknown.stdout == ""
    assert len(unknown.stderr.strip().splitlines()) == 1 and "videos.parquet: no video 'no-such-video'" in unknown.stderr
    for bad in ("7:99", "99:00"):
        proc = run_cli("show", video, "--at", bad, "--store", captioned)
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and "--at" in proc.stderr
