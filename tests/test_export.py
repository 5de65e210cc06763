"""`recap export`: WebVTT (clip cues, segment chapters, the summary as a note), SRT and JSONL from the current
captions of a real store (the tiny corpus, real features, committed captions), parsed back; and the .vtt as a
`<track>` of the video it describes, played in real headless Chromium."""

import html
import json
import re
import shutil
from pathlib import Path

import pytest

import recap
from recap.export import timestamp

from _browser import ARTIFACTS, TRICKY, Chromium, needs_chromium, readable_captions
from conftest import copy_store, run_cli
from test_views import captioned, checkpoints, featured  # noqa: F401 (module fixtures: a real captioned store)

VTT_TIME = r"(\d\d):(\d\d):(\d\d)\.(\d\d\d)"
SRT_TIME = r"(\d\d):(\d\d):(\d\d),(\d\d\d)"


@pytest.fixture(scope="module")
def readable(captioned, tmp_path_factory):  # noqa: F811
    store = copy_store(captioned, tmp_path_factory.mktemp("export") / "store")
    texts = readable_captions(store.root)
    return store.root, texts


def seconds(m, i=1) -> float:
    h, mi, s, ms = (int(m.group(k)) for k in range(i, i + 4))
    return h * 3600 + mi * 60 + s + ms / 1000


def cues(text: str, time: str) -> list[tuple[int | None, float, float, str]]:
    """(number, start, end, text) of every cue block; NOTE blocks and the header are not cues."""
    out = []
    for block in text.strip("\n").split("\n\n"):
        lines = block.split("\n")
        number = int(lines.pop(0)) if re.fullmatch(r"\d+", lines[0]) and len(lines) > 1 else None
        timing = re.fullmatch(rf"{time} --> {time}", lines[0])
        if timing:
            out.append((number, seconds(timing, 1), seconds(timing, 5), "\n".join(lines[1:])))
    return out


def expected(reader, level, video):
    frame = reader.captions(level, video_id=video)
    return [(float(s), float(e), t) for s, e, t in zip(frame["start_s"], frame["end_s"], frame["text"])]


def arrows(rows):
    """Captions as cues hold them: "-->" would read as a timing line."""
    return [(s, e, t.replace("-->", "->")) for s, e, t in rows]


def test_timestamps():
    assert timestamp(0) == "00:00:00.000" and timestamp(3723.4567) == "01:02:03.457"
    assert timestamp(59.9996, ",") == "00:01:00,000"


def test_vtt_and_srt_parse_back_to_the_current_captions(readable, tmp_path):
    root, texts = readable
    reader = recap.open_store(root)
    videos = list(reader.videos["video_id"])
    proc = run_cli("export", "--format", "vtt", "--store", root, check=True)
    assert f"wrote {2 * len(videos)} file(s)" in proc.stdout
    folder = reader.store.abs("exports/vtt")
    for video in videos:
        vtt = open(f"{folder}/{video}.vtt", encoding="utf-8").read()
        blocks = vtt.split("\n\n")
        assert blocks[0] == "WEBVTT"
        [summary] = expected(reader, "video", video)
        assert blocks[1] == f"NOTE summary\n{summary[2]}"  # the summary, first, as a note
        clips = expected(reader, "clip", video)
        parsed = cues(vtt, VTT_TIME)
        assert [n for n, *_ in parsed] == list(range(1, len(clips) + 1))
        assert [(s, e, html.unescape(t)) for _, s, e, t in parsed] == arrows(clips)  # in order, to the ms
        assert [t for *_, t in parsed][2] == "a &lt;b&gt; &amp; c -&gt; d"  # a cue that would have broken
        assert not re.search(r"\d\d:\d\d,\d\d\d", vtt)
        chapters = open(f"{folder}/{video}.chapters.vtt", encoding="utf-8").read()
        assert chapters.startswith("WEBVTT\n\n1\n")
        assert [(s, e, t) for _, s, e, t in cues(chapters, VTT_TIME)] == expected(reader, "segment", video)

    run_cli("export", "--format", "srt", "--store", root, check=True)
    for video in videos:
        srt = open(reader.store.abs(f"exports/srt/{video}.srt"), encoding="utf-8").read()
        parsed = cues(srt, SRT_TIME)
        clips = expected(reader, "clip", video)
        assert [n for n, *_ in parsed] == list(range(1, len(clips) + 1))
        assert [(s, e, t) for _, s, e, t in parsed] == arrows(clips)
        assert TRICKY.replace("-->", "->") in srt and "NOTE" not in srt and "WEBVTT" not in srt
        assert len(srt.strip().split("\n\n")) == len(clips)  # no summary cue: SRT has clip captions only

    snapshot = {p.name: p.read_bytes() for p in Path(folder).iterdir()}
    run_cli("export", "--format", "vtt", "--store", root, check=True)  # again: the same bytes
    assert {p.name: p.read_bytes() for p in Path(folder).iterdir()} == snapshot


def test_one_video_to_another_folder_and_errors(readable, tmp_path):
    root, _ = readable
    video = recap.open_store(root).videos["video_id"].iloc[1]
    out = tmp_path / "subs"
    run_cli("export", "-f", "srt", "--video", video, "--out", str(out), "--store", root, check=True)
    assert sorted(p.name for p in out.iterdir()) == [f"{video}.srt"]

    unknown = run_cli("export", "--format", "vtt", "--video", "nope", "--store", root)
    assert unknown.returncode == 2 and len(unknown.stderr.strip().splitlines()) == 1
    assert "videos.parquet: no readable video 'nope'" in unknown.stderr
    bad = run_cli("export", "--format", "ass", "--store", root)
    assert bad.returncode == 2 and "--format 'ass': expected one of vtt, srt, jsonl" in bad.stderr
    nothing = run_cli("export", "--format", "vtt", "--store", str(tmp_path / "none"))
    assert nothing.returncode == 2 and "no store here" in nothing.stderr


def test_jsonl_holds_the_hierarchy_with_each_rows_parent(readable):
    root, texts = readable
    reader = recap.open_store(root)
    run_cli("export", "--format", "jsonl", "--store", root, check=True)
    for video in reader.videos.itertuples():
        lines = open(reader.store.abs(f"exports/jsonl/{video.video_id}.jsonl"), encoding="utf-8").read().splitlines()
        rows = [json.loads(line) for line in lines]
        segments = expected(reader, "segment", video.video_id)
        assert len(rows) == 1 + len(segments) + len(expected(reader, "clip", video.video_id))
        assert rows[0]["level"] == "video" and rows[0]["parent_level"] is None
        assert rows[0]["text"] == texts[video.video_id]["video"][0]
        versions = reader.versions()
        segment = None
        for row in rows[1:]:
            assert row["video_id"] == video.video_id and row["version"] == versions[row["level"]]
            if row["level"] == "segment":
                segment = row
                assert (row["parent_level"], row["parent_start_s"], row["parent_end_s"]) == (
                    "video", 0.0, video.duration_s)
            else:  # each clip after the segment holding its start, which it names
                assert row["level"] == "clip" and segment is not None
                assert segment["start_s"] <= row["start_s"] < segment["end_s"]
                assert (row["parent_level"], row["parent_start_s"], row["parent_end_s"]) == (
                    "segment", segment["start_s"], segment["end_s"])
        clips = [(r["start_s"], r["end_s"], r["text"]) for r in rows if r["level"] == "clip"]
        assert clips == expected(reader, "clip", video.video_id)
        assert [(r["start_s"], r["end_s"], r["text"]) for r in rows if r["level"] == "segment"] == segments


PLAYER = """<!doctype html><html><head><meta charset="utf-8"></head><body>
<video id="video" src="{video}" preload="auto" muted width="320">
  <track id="track" kind="captions" src="{vtt}" srclang="en" label="clip captions" default>
</video>
<script>
// Seek to each moment in turn; after each seek, the cue the track shows there. probeDone resolves with them all.
const video = document.getElementById("video"), times = {times}, seen = [];
window.probeDone = new Promise(resolve => {{
  function next() {{
    if (seen.length === times.length) resolve({{seen}});
    else video.currentTime = times[seen.length];
  }}
  video.addEventListener("error", () => resolve({{error: video.error && video.error.code}}));
  video.addEventListener("seeked", () => {{
    const track = video.textTracks[0], cue = track.activeCues[0];
    seen.push({{at: video.currentTime, cues: track.cues.length, active: track.activeCues.length,
               text: cue ? cue.text : null, shown: cue ? cue.getCueAsHTML().textContent : null}});
    next();
  }});
  video.addEventListener("loadedmetadata", () => {{
    video.textTracks[0].mode = "showing";
    const track = document.getElementById("track");
    if (track.readyState === 2) next(); else track.addEventListener("load", next);
  }});
}});
</script></body></html>
"""


@needs_chromium
def test_chromium_plays_the_video_with_its_vtt_and_shows_the_clip_caption_at_each_moment(readable, tmp_path):
    root, _ = readable
    reader = recap.open_store(root)
    video = reader.videos.iloc[0]
    run_cli("export", "--format", "vtt", "--video", video["video_id"], "--store", root, check=True)
    # The store's own video (H.264, which Debian's chromium decodes) next to its .vtt and a page that plays it.
    folder = ARTIFACTS / "export"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    shutil.copy(video["uri"], folder / "video.mp4")
    vtt = folder / f"{video['video_id']}.vtt"
    shutil.copy(reader.store.abs(f"exports/vtt/{video['video_id']}.vtt"), vtt)
    clips = expected(reader, "clip", video["video_id"])
    times = [clips[2][0] + 1.5, clips[0][0] + 0.5, clips[-1][0] + 1.0]  # the tricky cue, the first, the last
    (folder / "player.html").write_text(PLAYER.format(video="video.mp4", vtt=vtt.name, times=json.dumps(times)))

    # file:// pages may not fetch a <track> without this flag (a server would serve both from one origin)
    with Chromium(tmp_path, "--allow-file-access-from-files") as browser:
        browser.open((folder / "player.html").as_uri())
        found = browser.evaluate("window.probeDone")
        browser.screenshot(folder / "player.png")
    assert "error" not in found, f"chromium could not play {video['uri']}: media error {found['error']}"
    (folder / "cues-read.json").write_text(json.dumps(found, indent=1))
    print(f"\ncues read by chromium: {found['seen']}\nartifacts: {folder}")
    for at, seen in zip(times, found["seen"]):
        [caption] = [text for start, end, text in clips if start <= at < end]
        assert seen["at"] == pytest.approx(at) and seen["cues"] == len(clips) and seen["active"] == 1
        assert seen["shown"] == caption.replace("-->", "->")  # what the viewer sees, escapes undone
    assert found["seen"][0]["shown"] == TRICKY.replace("-->", "->")
