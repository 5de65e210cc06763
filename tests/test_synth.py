"""The synthetic corpus, checked on real files of the `tiny` preset."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import pickle
import re
import subprocess
import sys
from pathlib import Path

import decord
import numpy as np
import pyarrow.parquet as pq
import pytest

from synth import PRESETS, CorpusMismatch, Preset, facts, generate, queries
from synth.corpus import SIDE_TABLE_FIELDS
from synth.captions import CLIP_TEMPLATES, SEGMENT_TEMPLATES, SUMMARY_PHRASES
from synth.presets import SPLITS
from synth.world import plan_composed, plan_corpus
from synth.writer import GROUNDTRUTH_SCHEMA

TINY = PRESETS["tiny"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("seed0")
    generate("tiny", out, seed=0)
    return out


@pytest.fixture(scope="module")
def twin(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("seed0-serial")
    generate("tiny", out, seed=0, workers=1)  # also shows that parallel encoding changes no byte
    return out


def digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def load(corpus: Path, split: str):
    clips = pickle.loads((corpus / f"clips_{split}.pkl").read_bytes())
    segments = pickle.loads((corpus / f"segments_{split}.pkl").read_bytes())
    videos = json.loads((corpus / f"videos_{split}.json").read_text())
    return clips, segments, videos


def test_same_seed_gives_identical_bytes(corpus, twin):
    files = digests(corpus)
    assert len([f for f in files if f.endswith(".mp4")]) == 6
    assert files == digests(twin)


def test_different_seed_gives_a_different_corpus(corpus, tmp_path):
    generate("tiny", tmp_path, seed=1)
    ours, theirs = digests(corpus), digests(tmp_path)
    assert ours["groundtruth/clip.parquet"] != theirs["groundtruth/clip.parquet"]
    videos = [{d for f, d in files.items() if f.endswith(".mp4")} for files in (ours, theirs)]
    assert videos[0].isdisjoint(videos[1])


def test_manifest(corpus):
    manifest = json.loads((corpus / "manifest.json").read_text())
    assert manifest["complete"] and manifest["seed"] == 0 and manifest["segment_s"] == TINY.segment_s
    assert manifest["preset"]["name"] == "tiny" and manifest["generator_version"]
    assert manifest["videos"] == TINY.videos_per_split()
    for split in SPLITS:
        clips, segments, videos = load(corpus, split)
        assert (manifest["clips"][split], manifest["segments"][split], manifest["videos"][split]) == (
            len(clips), len(segments), len(videos))


def test_videos_decode_with_expected_frames_rate_and_size(corpus):
    for split in SPLITS:
        for video in load(corpus, split)[2]:
            reader = decord.VideoReader(str(corpus / "videos" / f"{video['vid']}.mp4"))
            assert len(reader) == video["end_sec"] * TINY.fps
            assert reader.get_avg_fps() == TINY.fps
            assert reader[0].shape == (TINY.height, TINY.width, 3)


def test_every_clip_shows_motion_in_its_four_sampled_frames(corpus):
    """Frames at the midpoints of a window's quarters all differ visibly."""
    for clip_ in load(corpus, "test")[0]:
        vid, start, end, _ = clip_
        reader = decord.VideoReader(str(corpus / "videos" / f"{vid}.mp4"))
        times = start + (np.arange(4) + 0.5) * (end - start) / 4
        frames = reader.get_batch(list((times * TINY.fps).astype(int))).asnumpy().astype(int)
        for a in range(4):
            for b in range(a + 1, 4):
                assert np.abs(frames[a] - frames[b]).mean() > 0.3, (clip_, a, b)


def test_hcap_files_have_the_ego4d_hcap_fields(corpus):
    for split in SPLITS:
        clips, segments, videos = load(corpus, split)
        assert clips and segments and videos
        for vid, start, end, caption in clips:
            assert isinstance(vid, str) and isinstance(start, float) and isinstance(end, float)
            assert caption.startswith("#C C ")
        for segment in segments:
            assert list(segment) == ["vid", "sid", "start_sec", "end_sec", "captions_gt", "segment_description"]
        for video in videos:
            assert list(video) == ["vid", "start_sec", "end_sec", "segment_descriptions", "video_summary"]


def test_parquet_tables_match_the_hcap_files(corpus):
    expected = {"clip": set(), "segment": set(), "video": set()}
    for split in SPLITS:
        clips, segments, videos = load(corpus, split)
        expected["clip"] |= {(vid, split, s, e, text) for vid, s, e, text in clips}
        expected["segment"] |= {(g["vid"], split, g["start_sec"], g["end_sec"], g["segment_description"])
                                for g in segments}
        expected["video"] |= {(v["vid"], split, v["start_sec"], v["end_sec"], v["video_summary"]) for v in videos}
    for level, rows in expected.items():
        table = pq.read_table(corpus / "groundtruth" / f"{level}.parquet")
        assert table.schema.remove_metadata() == GROUNDTRUTH_SCHEMA
        assert set(table.column("level").to_pylist()) == {level}
        found = {(r["video_id"], r["split"], r["start_s"], r["end_s"], r["text"]) for r in table.to_pylist()}
        assert found == rows and table.num_rows == len(rows)


def test_clip_windows_tile_each_video_and_the_last_is_clipped(corpus):
    clipped = 0
    for split in SPLITS:
        clips, _, videos = load(corpus, split)
        for video in videos:
            windows = [(s, e) for vid, s, e, _ in clips if vid == video["vid"]]
            duration = video["end_sec"]
            assert windows == [(4.0 * k, min(4.0 * k + 4, duration)) for k in range(len(windows))]
            assert windows[-1][1] == duration
            clipped += windows[-1][1] - windows[-1][0] < 4
    assert clipped  # the tiny preset's tail makes every last window short


def test_segment_captions_are_the_clip_captions_inside_its_window(corpus):
    for split in SPLITS:
        clips, segments, videos = load(corpus, split)
        for segment in segments:
            inside = [c for vid, s, e, c in clips
                      if vid == segment["vid"] and s >= segment["start_sec"] and e <= segment["end_sec"]]
            assert segment["captions_gt"] == inside
            assert segment["end_sec"] - segment["start_sec"] == TINY.segment_s
        for video in videos:
            assert video["segment_descriptions"] == [
                g["segment_description"] for g in segments if g["vid"] == video["vid"]]


def test_summary_names_the_activities_in_order(corpus):
    summaries = {v["vid"]: v["video_summary"] for split in SPLITS for v in load(corpus, split)[2]}
    verbs = {name: phrase.split()[0] for name, phrase in SUMMARY_PHRASES.items()}
    for session in plan_corpus(TINY, seed=0):
        summary = summaries[session.vid]
        assert session.place in summary
        position = 0
        for segment in session.segments:
            position = summary.find(f" {verbs[segment.activity]} ", position) + 1
            assert position, (segment.activity, summary)


def test_paraphrases_vary_at_every_level():
    sessions = plan_corpus(PRESETS["demo"], seed=0)
    used: dict[str, set[str]] = {}
    for clip in (c for s in sessions for c in s.clips):
        a = clip.action
        template = clip.caption.replace(str(a.thing), "{thing}")
        if a.new_colour:
            template = re.sub(rf"\b{a.new_colour}\b", "{colour}", template)
        assert template in CLIP_TEMPLATES[a.verb]
        used.setdefault(a.verb, set()).add(template)
    assert used.keys() == CLIP_TEMPLATES.keys()
    assert all(len(templates) > 1 for templates in used.values())
    segments = [g for s in sessions for g in s.segments]
    for activity, templates in SEGMENT_TEMPLATES.items():
        openings = {g.description.split(" the ")[0] for g in segments if g.activity == activity}
        assert len(openings) > 1, activity
    assert len({s.summary.split(" ")[0] for s in sessions}) > 1


def test_rerun_of_the_same_corpus_is_a_no_op(corpus):
    before = {p: p.stat().st_mtime_ns for p in corpus.rglob("*")}
    assert generate("tiny", corpus, seed=0).complete
    assert {p: p.stat().st_mtime_ns for p in corpus.rglob("*")} == before


def test_interrupted_run_is_redone(corpus, tmp_path):
    generate("tiny", tmp_path, seed=0)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    (tmp_path / "manifest.json").write_text(json.dumps({**manifest, "complete": False}))
    next((tmp_path / "videos").iterdir()).write_bytes(b"truncated")
    generate("tiny", tmp_path, seed=0)
    assert digests(tmp_path) == digests(corpus)


def test_refuses_a_directory_holding_something_else(corpus, tmp_path):
    with pytest.raises(CorpusMismatch, match="different corpus"):
        generate("tiny", corpus, seed=1)
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(CorpusMismatch, match="holds no synthetic corpus"):
        generate("tiny", tmp_path, seed=0)


def test_cli_reports_a_foreign_directory_in_one_line(corpus):
    result = subprocess.run([sys.executable, "-m", "synth", "--preset", "tiny", "--out", str(corpus),
                             "--seed", "7"], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "different corpus" in result.stderr


def test_presets_reject_inconsistent_sizes():
    with pytest.raises(ValueError, match="multiple of clip_s"):
        dataclasses.replace(TINY, segment_s=30)
    with pytest.raises(ValueError, match="tail_s"):
        dataclasses.replace(TINY, tail_s=4.0)
    assert isinstance(PRESETS["hour"], Preset) and PRESETS["hour"].segment_s == 180


# ---- facts and the parser of the grammar -------------------------------------------

@pytest.mark.parametrize("preset", ["tiny", "demo", "hour"])
def test_parsing_every_caption_of_a_corpus_gives_its_planned_facts(preset):
    sessions = [s for seed in range(3) for s in plan_corpus(PRESETS[preset], seed)]
    for s in sessions:
        for c in s.clips:
            assert facts.parse("clip", c.caption) == facts.facts_of_clip(c.action), c.caption
        for g in s.segments:
            assert facts.parse("segment", g.description) == facts.facts_of_segment(g), g.description
        assert facts.parse("video", s.summary) == facts.facts_of_video(s.place, s.segments), s.summary
        for span in s.span_summaries:
            assert facts.parse("video", span.summary) == facts.facts_of_video(s.place, span.segments), span.summary
    seen = {(level, key) for s in sessions for level, key in
            [("clip", c.action.verb) for c in s.clips] + [("segment", g.activity) for g in s.segments]}
    assert len(seen) == len(CLIP_TEMPLATES) + len(SEGMENT_TEMPLATES)  # every verb and activity was exercised


def test_the_parser_reads_known_sentences_and_refuses_the_rest():
    assert facts.parse("clip", " #C C paints the red cone  with blue paint") == {
        "action": "paints", "shape": "cone", "colour": "red", "new_colour": "blue"}
    assert facts.parse("segment", "C painted the cone blue and the ball red.") == {
        "activity": "painting", "objects": ["blue cone", "red ball"]}
    assert facts.parse("segment", "C sorted the red, green and blue cubes.") == {
        "activity": "sorting", "objects": ["red cube", "green cube", "blue cube"]}
    assert facts.parse("video", "C spent the session in the garage. First, C washed the ball. Then C sorted the "
                                "rings. Finally, C painted the cube red.") == {
        "place": "garage", "activities": ["washing", "sorting", "painting"]}
    assert facts.parse("video", "In the studio, C first stacked the ball and the cone, and finally arranged the "
                                "ring.") == {"place": "studio", "activities": ["stacking", "arranging"]}
    for level, text in [("clip", "#C C turns the blue"), ("clip", "#C C turns the blue ring around and"),
                        ("clip", "#C C juggles the red ball"), ("segment", "C sorted."), ("video", ""),
                        ("video", "C was in the moon. C sorted the cubes."), ("clip", None),
                        ("video", "C was in the garden. C sorted the cubes, then flew.")]:
        assert facts.parse(level, text) is None, text


def test_span_summaries_cover_every_run_of_segments_of_training_videos_only():
    sessions = plan_corpus(PRESETS["demo"], 0)
    for s in sessions:
        n = len(s.segments)
        runs = {(p.start_s, p.end_s) for p in s.span_summaries}
        if s.split != "train":
            assert not runs
            continue
        assert runs == {(s.segments[i].start_s, s.segments[j - 1].end_s)
                        for i in range(n) for j in range(i + 1, n + 1) if j - i < n}
        for p in s.span_summaries:
            assert p.segments == tuple(g for g in s.segments if p.start_s <= g.start_s and g.end_s <= p.end_s)


def test_reordered_summaries_tell_a_training_video_s_segments_in_other_orders():
    told = plan_corpus(PRESETS["demo"], 0)
    for s in told:
        if s.split != "train":
            assert not s.reordered_summaries
            continue
        orders = [tuple(s.segments.index(g) for g in r.segments) for r in s.reordered_summaries]
        assert len(orders) == min(4, math.factorial(len(s.segments)) - 1) == len(set(orders))
        assert all(sorted(order) == list(range(len(s.segments))) != list(order) for order in orders)
        for r in s.reordered_summaries:
            assert facts.parse("video", r.summary) == {"place": s.place, "activities": [g.activity for g in r.segments]}
    # from a random stream of their own: every other part of the plan is as without them
    without = plan_corpus(dataclasses.replace(PRESETS["demo"], reordered_summaries=0), 0)
    assert [dataclasses.replace(s, reordered_summaries=()) for s in told] == without


def test_composed_summaries_tell_segments_of_several_training_videos_of_one_place():
    preset = PRESETS["demo"]
    sessions = plan_corpus(preset, 0)
    composed = plan_composed(preset, 0, sessions)
    train = {s.vid: s for s in sessions if s.split == "train"}
    assert len(composed) == preset.composed_summaries > 0
    assert sum(len({v for v, _ in c.parts}) > 1 for c in composed) > 0.9 * len(composed)
    lengths = {len(c.parts) for c in composed}
    assert lengths == set(range(preset.activities_per_video[0], preset.activities_per_video[1] + 1))
    for c in composed:
        assert all(v in train and train[v].place == c.place and g in train[v].segments for v, g in c.parts)
        assert len(set(c.parts)) == len(c.parts)
        activities = [g.activity for g in c.segments]
        assert all(a != b for a, b in zip(activities, activities[1:]))
        assert facts.parse("video", c.summary) == {"place": c.place, "activities": activities}
    assert len({c.summary for c in composed}) == len(composed)
    assert plan_composed(preset, 0, sessions) == composed and plan_composed(preset, 1, sessions) != composed


def test_the_reordered_table_names_the_parts_in_the_order_told(tmp_path):
    """Reordered summaries (one video's segments) and composed ones (several videos'), each part a
    [video, start, end] of a training segment."""
    preset = dataclasses.replace(TINY, reordered_summaries=2, composed_summaries=3)
    generate(preset, tmp_path, seed=0)
    rows = pq.read_table(tmp_path / "groundtruth" / "reordered.parquet").to_pylist()
    segments = pq.read_table(tmp_path / "groundtruth" / "segment.parquet").to_pylist()
    plan = plan_corpus(preset, 0)
    reordered = sum(len(s.reordered_summaries) for s in plan if s.split == "train")
    assert len(rows) == reordered + 3 and reordered > 0
    for i, r in enumerate(rows):
        parts = json.loads(r["parts"])
        told = [next(g for g in segments if [g["video_id"], g["start_s"], g["end_s"]] == part) for part in parts]
        assert r["split"] == "train" and all(g["split"] == "train" for g in told)
        assert r["video_id"] == parts[0][0] and (i >= reordered or {p[0] for p in parts} == {r["video_id"]})
        assert json.loads(r["facts"]) == facts.parse("video", r["text"])
        assert json.loads(r["facts"])["activities"] == [json.loads(g["facts"])["activity"] for g in told]
    assert [r["text"] for r in rows[reordered:]] == [c.summary for c in plan_composed(preset, 0, plan)]


@pytest.mark.parametrize("before", [None, 1])
def test_a_corpus_written_before_composed_summaries_or_with_another_count_gets_them_in_place(tmp_path, before):
    """The demo's upgrade path: the same videos and level tables; the reordered table written again with them."""
    preset = dataclasses.replace(TINY, reordered_summaries=2, composed_summaries=3)
    generate(dataclasses.replace(preset, composed_summaries=before or 0), tmp_path / "old", seed=0)
    generate(preset, tmp_path / "new", seed=0)
    if before is None:  # as written before the field existed
        manifest = json.loads((tmp_path / "old" / "manifest.json").read_text())
        del manifest["preset"]["composed_summaries"]
        (tmp_path / "old" / "manifest.json").write_text(json.dumps(manifest))
    videos = {p: p.stat().st_mtime_ns for p in (tmp_path / "old" / "videos").iterdir()}
    assert generate(preset, tmp_path / "old", seed=0).complete
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "old" / "videos").iterdir()} == videos
    assert digests(tmp_path / "old") == digests(tmp_path / "new")


def test_a_corpus_written_before_reordered_summaries_is_completed_in_place(corpus, tmp_path):
    import shutil

    old = tmp_path / "old"
    shutil.copytree(corpus, old)
    (old / "groundtruth" / "reordered.parquet").unlink()
    manifest = json.loads((old / "manifest.json").read_text())
    del manifest["preset"]["reordered_summaries"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    videos = {p: p.stat().st_mtime_ns for p in (old / "videos").iterdir()}
    assert generate("tiny", old, seed=0).complete
    assert {p: p.stat().st_mtime_ns for p in (old / "videos").iterdir()} == videos
    assert digests(old) == digests(corpus)


def test_the_ground_truth_tables_carry_the_facts(corpus):
    for level in ("clip", "segment", "video"):
        rows = pq.read_table(corpus / "groundtruth" / f"{level}.parquet").to_pylist()
        assert rows and all(json.loads(r["facts"]) == facts.parse(level, r["text"]) for r in rows)


# ---- retrieval queries ---------------------------------------------------------------

# The tiny preset, seed 0, as generated before corpora had retrieval queries: the HCap pickles, JSON and
# manifest (bytes), the ground-truth Parquet tables (rows) and the plan the videos are rendered from.
BEFORE_QUERIES = {
    "hcap": "168aa0a5d958e16e8b3965ec37139893065167fb45e7d91d6093044980a7554a",
    "parquet": "3beea416788d2c35f16286551831ce30e7dfafe6e7fa08f6954dcbc7ff798783",
    "plan": "cc0fd3d6a5c95450faa6282ee71f5f17ca01d209031acedf808f447ee0b34d09",
}

# Every ground-truth template, and the summaries' fixed wording (synth.captions.video_summary).
GT_TEMPLATES = [*(t for ts in CLIP_TEMPLATES.values() for t in ts),
                *(t for ts in SEGMENT_TEMPLATES.values() for t in ts), *SUMMARY_PHRASES.values(),
                "C was in the {place}. C ", "In the {place}, C first ", ", then ", ", and finally ",
                "C spent the session in the {place}. ", "First, C ", "Then C ", "Finally, C "]


def _words(text: str) -> list[str]:
    return re.findall(r"[#\w]+", text.lower())


def _fragments(template: str) -> set[str]:
    """The template's fixed wording between its fields, runs of two words or more."""
    return {" ".join(w) for part in re.split(r"\{\w+\}", template) if len(w := _words(part)) >= 2}


def test_queries_leave_every_other_file_of_a_seed_as_it_was(corpus):
    hcap = hashlib.sha256()
    for path in sorted(p for p in corpus.iterdir() if p.suffix in (".pkl", ".json")):
        hcap.update(path.name.encode())
        if path.name == "manifest.json":  # as written before the preset had these fields
            manifest = json.loads(path.read_text())
            for field in SIDE_TABLE_FIELDS:
                del manifest["preset"][field]
            hcap.update((json.dumps(manifest, indent=1) + "\n").encode())
        else:
            hcap.update(path.read_bytes())
    parquet = hashlib.sha256()
    for level in ("clip", "segment", "video"):
        parquet.update(json.dumps(pq.read_table(corpus / "groundtruth" / f"{level}.parquet").to_pylist()).encode())
    plan = hashlib.sha256(repr([{k: v for k, v in dataclasses.asdict(s).items() if k != "reordered_summaries"}
                                for s in plan_corpus(TINY, 0)]).encode())
    assert {"hcap": hcap.hexdigest(), "parquet": parquet.hexdigest(), "plan": plan.hexdigest()} == BEFORE_QUERIES
    assert sorted(p.name for p in (corpus / "groundtruth").iterdir()) == [
        "clip.parquet", "queries.parquet", "reordered.parquet", "segment.parquet", "video.parquet"]


def test_every_unit_has_one_query_stating_its_facts(corpus):
    queries = pq.read_table(corpus / "groundtruth" / "queries.parquet")
    assert queries.schema.remove_metadata() == GROUNDTRUTH_SCHEMA
    key = lambda r: (r["video_id"], r["split"], r["level"], r["start_s"], r["end_s"], r["facts"])
    found = [key(r) for r in queries.to_pylist()]
    units = [key(r) for level in ("clip", "segment", "video")
             for r in pq.read_table(corpus / "groundtruth" / f"{level}.parquet").to_pylist()]
    assert len(found) == len(set(found)) and set(found) == set(units)  # tiny has no span summaries
    assert {r["split"] for r in queries.to_pylist()} == set(SPLITS)


def test_no_query_is_a_ground_truth_sentence():
    """On the demo plan of three seeds: the grammar parses no query, at any level; no query opens like a
    narration ("#C C") or a description ("C ..."), none holds two or more words in a row of a caption template's
    fixed wording, and every query template was used."""
    fragments = set().union(*map(_fragments, GT_TEMPLATES))
    assert {"#c c picks up the", "on the table", "to the left", "in the", "and finally"} <= fragments
    rows = [r for seed in range(3) for r in queries.plan_queries(plan_corpus(PRESETS["demo"], seed), seed)]
    assert {r["level"] for r in rows} == {"clip", "segment", "video"}
    for r in rows:
        text = r["text"]
        assert all(facts.parse(level, text) is None for level in ("clip", "segment", "video")), text
        assert not re.match(r"#|C\b", text), text
        padded = f" {' '.join(_words(text))} "
        assert not [f for f in fragments if f" {f} " in padded], text
    templates = [*(t for ts in queries.CLIP_QUERIES.values() for t in ts),
                 *(t for ts in queries.SEGMENT_QUERIES.values() for t in ts), *queries.VIDEO_QUERIES]
    for template in templates:
        pattern = re.compile(".+".join(map(re.escape, re.split(r"\{\w+\}", template))))
        assert any(pattern.fullmatch(r["text"]) for r in rows), template
    steps = {s for ss in queries.STEPS.values() for s in ss} | set(queries.STEP_JOINERS)
    assert all(any(s in r["text"] for r in rows if r["level"] == "video") for s in steps)


def test_queries_come_from_their_own_random_stream():
    sessions = plan_corpus(TINY, 0)
    assert queries.plan_queries(sessions, 0) == queries.plan_queries(plan_corpus(TINY, 0), 0)
    assert [r["text"] for r in queries.plan_queries(sessions, 0)] != [r["text"] for r in queries.plan_queries(
        sessions, 1)]  # the same units, other wording: the stream is the seed's, not the plan's
