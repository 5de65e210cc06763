import os
import pickle

import pyarrow.parquet as pq
import pytest

from pipeline.ingest import ingest_hcap
from stages.ingest import read_hcap
from store import read_groundtruth, read_reordered, read_videos

from conftest import run_cli


def _rows(table):
    return sorted(table.to_pylist(), key=lambda r: (r["video_id"], r["start_s"], r["text"]))


def test_hcap_round_trip_through_the_store(store, tiny_corpus):
    summary = ingest_hcap(store, str(tiny_corpus), str(tiny_corpus / "videos"))
    assert (summary.done, summary.failed) == (6, 0)
    assert [v["video_id"] for v in read_videos(store)] == sorted(p.stem for p in (tiny_corpus / "videos").iterdir())
    for level in ("clip", "segment", "video"):
        expected = pq.read_table(tiny_corpus / "groundtruth" / f"{level}.parquet")
        assert _rows(read_groundtruth(store, level)) == _rows(expected), level
    assert {r["split"] for r in _rows(read_groundtruth(store, "video"))} == {"train", "val", "test"}


def test_hcap_ingest_is_idempotent_and_reports_missing_videos(store, tiny_corpus, tmp_path):
    ingest_hcap(store, str(tiny_corpus), str(tiny_corpus / "videos"))
    before = read_groundtruth(store, "clip").num_rows
    again = ingest_hcap(store, str(tiny_corpus), str(tiny_corpus / "videos"))
    assert (again.done, again.skipped) == (0, 6) and read_groundtruth(store, "clip").num_rows == before

    other = tmp_path / "store2"
    proc = run_cli("ingest", "ego4d-hcap", str(tiny_corpus), "--videos", str(tmp_path / "nowhere"), "--store",
                   str(other))
    assert proc.returncode == 1 and "file not found" in proc.stderr  # ground truth kept, videos reported


class Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_metadata_pickles_are_never_trusted(tmp_path):
    with open(tmp_path / "clips_train.pkl", "wb") as f:
        pickle.dump([("v", 0.0, 4.0, Exploit())], f)
    with pytest.raises(ValueError, match=r"clips_train.pkl: refusing to unpickle posix.system"):
        read_hcap(tmp_path)
    proc = run_cli("ingest", "ego4d-hcap", str(tmp_path), "--videos", str(tmp_path), "--store", str(tmp_path / "s"),
                   fresh=True)  # what os.system would print reaches the pipes
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "refusing to unpickle" in proc.stderr
    assert "pwned" not in proc.stdout + proc.stderr


def test_missing_metadata_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no Ego4D-HCap metadata"):
        read_hcap(tmp_path)


def test_ground_truth_is_keyed_by_the_registry_ids(store, tiny_corpus, tmp_path):
    """An Ego4D id that is not a safe file name (here with a space) gets one cleaned id, in both tables."""
    vid = sorted(p.stem for p in (tiny_corpus / "videos").iterdir())[0]
    raw = f"{vid} copy"
    videos = tmp_path / "videos"
    videos.mkdir()
    os.symlink(tiny_corpus / "videos" / f"{vid}.mp4", videos / f"{raw}.mp4")
    meta = tmp_path / "meta"
    meta.mkdir()
    with open(meta / "clips_train.pkl", "wb") as f:
        pickle.dump([(raw, 0.0, 4.0, "#C C picks up the red ball")], f)
    assert ingest_hcap(store, str(meta), str(videos)).failed == 0
    registered = [v["video_id"] for v in read_videos(store)]
    assert len(registered) == 1 and registered[0] != raw
    assert read_groundtruth(store, "clip")["video_id"].to_pylist() == registered


def test_a_corpus_s_reordered_and_composed_summaries_reach_the_store(store, tmp_path):
    import dataclasses

    import synth

    corpus = tmp_path / "corpus"
    synth.generate(dataclasses.replace(synth.PRESETS["tiny"], reordered_summaries=2, composed_summaries=2), corpus,
                   seed=0)
    ingest_hcap(store, str(corpus), str(corpus / "videos"))
    expected = pq.read_table(corpus / "groundtruth" / "reordered.parquet")
    assert expected.num_rows and _rows(read_reordered(store)) == _rows(expected)
    assert _rows(read_reordered(store, "train")) == _rows(expected) and not read_reordered(store, "test").num_rows
    synth.generate("tiny", tmp_path / "without", seed=0)  # the same videos, no reordered summaries
    ingest_hcap(store, str(tmp_path / "without"), str(tmp_path / "without" / "videos"))
    assert read_reordered(store).num_rows == 0  # not kept from the earlier corpus


def test_the_parts_of_told_summaries_name_the_videos_by_their_registry_ids():
    """A composed summary's parts name other videos: ingest keys them as it keys the rows; parts written before
    they named videos (the row's own) stay as they are."""
    import json

    import pyarrow as pa

    from pipeline.ingest import _keyed, _keyed_parts
    from store import REORDERED_SCHEMA

    row = {"video_id": "a b", "split": "train", "level": "video", "start_s": 0.0, "end_s": 48.0, "text": "t"}
    table = pa.Table.from_pylist([{**row, "parts": json.dumps([["c d", 0.0, 24.0], ["a b", 24.0, 48.0]])},
                                  {**row, "parts": json.dumps([[24.0, 48.0], [0.0, 24.0]])}], schema=REORDERED_SCHEMA)
    ids = {"a b": "a_b-1", "c d": "c_d-2"}
    keyed = _keyed_parts(_keyed(table, ids), ids)
    assert keyed["video_id"].to_pylist() == ["a_b-1", "a_b-1"]
    assert [json.loads(p) for p in keyed["parts"].to_pylist()] == [
        [["c_d-2", 0.0, 24.0], ["a_b-1", 24.0, 48.0]], [[24.0, 48.0], [0.0, 24.0]]]
