"""`recap report`: static HTML in the store, checked in real headless Chromium. The store is real: the tiny
corpus with features and captions at every level (sentences in place of the random models' text), evaluated,
with a training run's loss curves, plus three videos registered later: one that never decodes (a failed
ingest), one not captioned yet, and one whose file broke after ingest (its features and thumbnails fail)."""

import math
import shutil

import pandas as pd
import pytest
from PIL import Image

import recap
from pipeline.evaluate import evaluate_all
from recap.show import clock
from stages.evaluate import write_metrics
from stages.thumbnails import ThumbnailStage
from stages.train import write_curves
from store import LEVEL, LEVELS, Store

from _browser import ARTIFACTS, Chromium, needs_chromium, readable_captions
from conftest import copy_store, run_cli, write_video
from test_views import captioned, checkpoints, featured, settings  # noqa: F401 (module fixtures: a real store)

LATE, BROKEN = "late", "broken"


@pytest.fixture(scope="module")
def reported(captioned, checkpoints, tmp_path_factory):  # noqa: F811
    tmp = tmp_path_factory.mktemp("report")
    store = copy_store(captioned, tmp / "store")
    texts = readable_captions(store.root)
    evaluate_all(settings(store.root, checkpoints), store, stream=None)
    write_metrics(store, pd.DataFrame([{  # a newer retrieval table (`evaluate --task retrieval`): not captions
        "level": "text-to-video", "version": "index-x", "split": "test", "protocol": "both", "metric": "R@1",
        "value": 50.0, "n_pairs": 2, "n_missing": 0, "video_id": None, "computed_at": "9999-01-01T00:00:00"}]),
        "retrieval-test")
    write_curves(store, "checkpoints/clip/run0", [  # what `recap train` writes after each epoch
        {"epoch": e, "step": s, "split": split, "level": "clip", "loss": 4.0 / s, "lr": 1e-4}
        for e in (1, 2) for s, split in ((e * 10 - 5, "train"), (e * 10, "train"), (e * 10, "val"))])
    videos = tmp / "videos"
    write_video(videos / f"{LATE}.mp4", seconds=9, size=(64, 48))
    write_video(videos / f"{BROKEN}.mp4", seconds=9, size=(64, 48))
    (videos / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 40)
    assert run_cli("ingest", str(videos), "--store", store.root).returncode == 1  # the corrupt file
    (videos / f"{BROKEN}.mp4").write_bytes(b"not a video any more")
    assert run_cli("features", "--local", "--store", store.root).returncode == 1  # the broken file
    proc = run_cli("report", "--store", store.root)
    assert proc.returncode == 1, proc.stderr  # the broken file's thumbnails failed; the report is written
    assert f"open {store.abs('report/index.html')}" in proc.stdout
    return store, texts


def thumbnail_version(store: Store) -> str:
    [version] = store.listdir("thumbnails")
    return version


def test_thumbnails_are_decoded_once_and_kept_in_the_store(reported, tmp_path):
    store, texts = reported
    version = thumbnail_version(store)
    assert version == ThumbnailStage(clip_s=4.0).version()
    videos = recap.open_store(store.root).videos
    ok = videos[videos["status"] == "ok"]
    for video in ok.itertuples():
        files = sorted(store.listdir(f"thumbnails/{version}/{video.video_id}"), key=lambda n: int(n[:-4]))
        if video.video_id == BROKEN:
            assert files == [] and store.failures("thumbnails")[0]["video_id"] == BROKEN
            continue
        assert files == [f"{4000 * k}.jpg" for k in range(math.ceil(video.duration_s / 4))]
        with Image.open(store.abs(f"thumbnails/{version}/{video.video_id}/{files[1]}")) as image:
            assert (image.format, image.size) == ("JPEG", (96, 96))

    copy = copy_store(store.root, tmp_path / "s")  # the report again: nothing decoded twice
    folder = f"thumbnails/{version}/{ok['video_id'].iloc[0]}"
    stamps = {name: copy.fs.modified(copy.abs(f"{folder}/{name}")) for name in copy.listdir(folder)}
    again = run_cli("report", "--store", copy.root)
    assert again.returncode == 1 and f"[thumbnails] done 0, skipped {len(ok) - 1}, failed 1" in again.stderr
    assert {name: copy.fs.modified(copy.abs(f"{folder}/{name}")) for name in copy.listdir(folder)} == stamps
    copy.remove(f"markers/thumbnails/{version}/{LATE}.json")  # as if a run was killed before its marker
    redo = run_cli("report", "--store", copy.root)
    assert f"[thumbnails] done 1, skipped {len(ok) - 2}, failed 1" in redo.stderr


INDEX = """(() => [...document.querySelectorAll("tbody tr")].map(tr => ({
  cells: [...tr.cells].map(td => td.textContent),
  href: tr.querySelector("a") && tr.querySelector("a").getAttribute("href"),
})))()"""


@needs_chromium
def test_the_index_lists_every_video_with_summary_duration_and_status(reported, tmp_path):
    store, texts = reported
    reader = recap.open_store(store.root)
    folder = ARTIFACTS / "report"
    folder.mkdir(parents=True, exist_ok=True)
    with Chromium(tmp_path) as browser:
        browser.open(f"file://{store.abs('report/index.html')}")
        rows = browser.evaluate(INDEX)
        browser.screenshot(folder / "index.png")
        links = {}
        for row in rows:  # every video page the index links to opens, from disk
            if row["href"]:
                browser.open(f"file://{store.abs('report/' + row['href'])}")
                links[row["cells"][0]] = browser.evaluate("document.querySelector('h1').textContent")
    videos = reader.videos
    assert [row["cells"][0] for row in rows] == list(videos["video_id"])
    for row, video in zip(rows, videos.itertuples()):
        name, duration, status, counts, summary = row["cells"]
        if video.status != "ok":
            assert status == f"failed ingest: {' '.join(video.error.split())}" and row["href"] is None
            continue
        assert status == "ok" and duration == clock(video.duration_s) and links[name] == name
        if name in texts:
            assert summary == texts[name]["video"][0]
            assert counts == " / ".join(str(len(texts[name][level])) for level in LEVELS)
        else:
            assert summary == "not captioned yet: run `recap summaries`" and counts == "0 / 0 / 0"
    print(f"\nscreenshot: {folder / 'index.png'}")


TIMELINE = """(() => {
  const box = e => { const r = e.getBoundingClientRect(); return {left: r.left, right: r.right, top: r.top}; };
  const timeline = document.querySelector(".timeline");
  return {
    thumbs: [...timeline.querySelectorAll(".thumb")].map(f => {
      const img = f.querySelector("img");
      return {...box(f), time: f.querySelector("figcaption").textContent, text: f.textContent,
              loaded: img ? img.complete && img.naturalWidth > 0 : null};
    }),
    cells: [...timeline.querySelectorAll(".cell")].map(c => ({
      ...box(c), level: c.dataset.level, start: c.dataset.start ? Number(c.dataset.start) : null, text: c.textContent,
      kind: ["truth", "missing", "failed"].find(k => c.classList.contains(k)) || "prediction"})),
    labels: [...timeline.querySelectorAll(".label")].map(l => ({...box(l), text: l.textContent,
      href: l.querySelector("a") && l.querySelector("a").getAttribute("href")})),
  };
})()"""


def near(a, b):
    return abs(a - b) < 0.5


@needs_chromium
def test_a_video_page_aligns_the_three_levels_under_the_thumbnails(reported, tmp_path):
    store, texts = reported
    reader = recap.open_store(store.root)
    vid = sorted(texts)[0]
    video = reader.videos.set_index("video_id").loc[vid]
    folder = ARTIFACTS / "report"
    folder.mkdir(parents=True, exist_ok=True)
    with Chromium(tmp_path) as browser:
        browser.open(f"file://{store.abs(f'report/{vid}.html')}")
        page = browser.evaluate(TIMELINE)
        browser.screenshot(folder / "video.png")
    n = math.ceil(video["duration_s"] / 4)
    thumbs = page["thumbs"]
    assert len(thumbs) == n and all(t["loaded"] for t in thumbs)  # every thumbnail decoded and shown
    assert [t["time"] for t in thumbs] == [clock(4 * k) for k in range(n)]
    assert all(near(b["left"] - a["right"], thumbs[1]["left"] - thumbs[0]["right"]) for a, b in zip(thumbs, thumbs[1:]))

    def column(at):
        return max(k for k in range(n) if 4 * k <= at + 1e-6)

    for level in LEVELS:
        rows = reader.captions(level, video_id=vid)
        cells = [c for c in page["cells"] if c["level"] == level and c["kind"] == "prediction"]
        assert [c["text"] for c in cells] == texts[vid][level] == list(rows["text"])
        for cell, row in zip(cells, rows.itertuples()):  # from the thumbnail of its start to that of its end
            first, last = column(row.start_s), column(row.end_s - 1e-3)
            assert near(cell["left"], thumbs[first]["left"]) and near(cell["right"], thumbs[last]["right"])
            assert cell["top"] > thumbs[0]["top"]
        truth = reader.groundtruth(level)
        truth = truth[truth["video_id"] == vid]
        shown = [c["text"] for c in page["cells"] if c["level"] == level and c["kind"] == "truth"]
        assert shown and set(shown) <= set(truth["text"])  # ground truth under the predictions
    clip_cells = [c for c in page["cells"] if c["level"] == "clip" and c["kind"] == "prediction"]
    assert len(clip_cells) == n  # one clip caption under each thumbnail
    labels = {label["text"].replace(" metrics", ""): label["href"] for label in page["labels"]}
    assert labels["clip captions"] == "metrics.html#clip" and labels["summary"] == "metrics.html#video"
    print(f"\nscreenshot: {folder / 'video.png'}")


@needs_chromium
def test_missing_levels_and_failures_are_marked(reported, tmp_path):
    store, _ = reported
    with Chromium(tmp_path) as browser:
        pages = {}
        for vid in (LATE, BROKEN):
            browser.open(f"file://{store.abs(f'report/{vid}.html')}")
            pages[vid] = browser.evaluate(TIMELINE)
    late = pages[LATE]
    assert all(t["loaded"] for t in late["thumbs"]) and len(late["thumbs"]) == 3
    for level in LEVELS:
        [cell] = [c for c in late["cells"] if c["level"] == level]
        assert cell["kind"] == "missing" and cell["text"] == f"not captioned yet: run `recap {LEVEL[level].stage}`"
        assert near(cell["left"], late["thumbs"][0]["left"]) and near(cell["right"], late["thumbs"][-1]["right"])
    broken = pages[BROKEN]
    [failure] = store.failures("thumbnails")
    assert all(t["loaded"] is None and t["text"].startswith(f"failed: {failure['message']}")
               for t in broken["thumbs"])
    [features] = [f for f in store.failures("features") if f["video_id"] == BROKEN]
    [clip] = [c for c in broken["cells"] if c["level"] == "clip"]
    assert clip["kind"] == "failed"
    assert clip["text"] == f"failed: features failed: {features['message']} (run `recap features --retry-failed`)"
    assert [c["kind"] for c in broken["cells"] if c["level"] != "clip"] == ["missing", "missing"]
    assert not store.exists("report/corrupt.html")  # a failed ingest has no page: the index says why


METRICS = """(() => ({
  sections: Object.fromEntries([...document.querySelectorAll("h2[id]")].map(h => {
    const table = h.nextElementSibling;
    return [h.id, [...table.querySelectorAll("tr")].map(tr => [...tr.cells].map(c => c.textContent))];
  })),
  plots: [...document.querySelectorAll("img.plot")].map(i => ({src: i.getAttribute("src"),
                                                              loaded: i.complete && i.naturalWidth > 0})),
}))()"""


@needs_chromium
def test_the_metrics_page_shows_the_evaluation_and_the_plots(reported, tmp_path):
    store, _ = reported
    reader = recap.open_store(store.root)
    with Chromium(tmp_path) as browser:
        browser.open(f"file://{store.abs('report/metrics.html')}")
        page = browser.evaluate(METRICS)
        browser.screenshot(ARTIFACTS / "report" / "metrics.png", full_page=True)
    metrics = reader.metrics()
    corpus = metrics[metrics["video_id"].isna()]
    versions = reader.versions()
    assert set(page["sections"]) == set(LEVELS)
    for level in LEVELS:
        head, *rows = page["sections"][level]
        [row] = rows
        assert head[:3] == ["method", "split", "protocol"] and row[0] == f"{versions[level]} (current)"
        values = dict(zip(head[3:], row[3:]))
        expected = corpus[corpus["level"] == level].set_index("metric")["value"]
        assert values["CIDEr"] == f"{expected['CIDEr']:.1f}" and values["METEOR"] == f"{expected['METEOR']:.1f}"
    semantic = {"clip": "action", "segment": "activity", "video": "place"}
    assert all(name in page["sections"][level][0] for level, name in semantic.items())  # the corpus knows facts
    assert {p["src"]: p["loaded"] for p in page["plots"]} == {"metrics.png": True, "semantic.png": True,
                                                               "losses.png": True}
    with Image.open(store.abs("report/losses.png")) as image:
        assert image.format == "PNG" and image.size[0] > 200
    shutil.copy(store.abs("report/losses.png"), ARTIFACTS / "report" / "losses.png")
