import math
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from pipeline.config import load_config
from pipeline.dag import build_stages
from pipeline.ingest import ingest_hcap
from pipeline.run import run_all
from pipeline.runner import run_stage
from stages.examples import ExampleReader, inside, told_texts
from pipeline.dag import features_stage
from store import Store, read_captions, read_videos

from _checkpoints import tiny_checkpoint
from conftest import REPO, copy_store, run_cli


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    return {level: str(tiny_checkpoint(root / level, level)) for level in ("clip", "segment", "video")}


def config_for(root, checkpoints, segment_s=24.0, captions=None):
    return load_config(store=str(root), features={"encoder": "tsf-tiny", "batch_size": 8}, windows={"segment_s": segment_s},
                       captions={f"{k}_checkpoint": v for k, v in checkpoints.items()} | {"batch_size": 16} | (captions or {}))


def write_toml(path, config):
    c = config.captions
    path.write_text(
        f'store = "{config.store}"\n[features]\nencoder = "tsf-tiny"\nbatch_size = 8\n'
        f'[windows]\nsegment_s = {config.windows.segment_s}\n'
        f'[captions]\nclip_checkpoint = "{c.clip_checkpoint}"\nsegment_checkpoint = "{c.segment_checkpoint}"\n'
        f'video_checkpoint = "{c.video_checkpoint}"\nbatch_size = 16\n')
    return path


@pytest.fixture(scope="module")
def featured_store(tmp_path_factory, tiny_corpus, checkpoints):
    """The tiny corpus ingested with features extracted: the common start of these tests."""
    root = tmp_path_factory.mktemp("captions") / "base"
    store = Store(root)
    ingest_hcap(store, str(tiny_corpus), str(tiny_corpus / "videos"))
    cfg = config_for(root, checkpoints)
    assert run_stage(features_stage(cfg), store, executor="local").failed == 0
    return root


def caption_tables(store, config):
    return {s.level: read_captions(store, s.level, s.version()).sort_by([("video_id", "ascending"),
                                                                         ("start_s", "ascending")]).to_pylist()
            for s in build_stages(config, store)[1:]}


def test_each_level_fills_its_windows_and_rerun_does_nothing(featured_store, checkpoints, tmp_path):
    store = copy_store(featured_store, tmp_path / "s")
    cfg = config_for(store.root, checkpoints)
    summaries = run_all(cfg, store, local=True)
    assert [(s.stage, s.done, s.failed) for s in summaries] == [
        ("features", 0, 0), ("captions", 6, 0), ("segments", 6, 0), ("summaries", 6, 0)]
    tables = caption_tables(store, cfg)
    durations = {v["video_id"]: v["duration_s"] for v in read_videos(store)}
    for vid, duration in durations.items():
        clips = [(r["start_s"], r["end_s"]) for r in tables["clip"] if r["video_id"] == vid]
        assert clips == [(4.0 * k, min(4.0 * k + 4, duration)) for k in range(math.ceil(duration / 4))]
        segments = [(r["start_s"], r["end_s"]) for r in tables["segment"] if r["video_id"] == vid]
        tiles = [(24.0 * k, min(24.0 * k + 24, duration)) for k in range(math.ceil(duration / 24))]
        if len(tiles) > 1 and tiles[-1][1] - tiles[-1][0] < 12:  # a short tail joins the segment before
            tiles = tiles[:-2] + [(tiles[-2][0], duration)]
        assert segments == tiles
        assert [(r["start_s"], r["end_s"]) for r in tables["video"] if r["video_id"] == vid] == [(0.0, duration)]
    assert all(isinstance(r["text"], str) for level in tables.values() for r in level)

    again = run_all(cfg, store, local=True)
    assert all(s.done == 0 and s.failed == 0 for s in again)


def test_missing_upstream_is_reported_with_the_stage_to_run(featured_store, checkpoints, tmp_path):
    store = copy_store(featured_store, tmp_path / "s")
    cfg = config_for(store.root, checkpoints)
    segments = build_stages(cfg, store)[2]
    summary = run_stage(segments, store, executor="local")
    assert summary.done == 0 and summary.blocked == 6
    assert all("run `recap captions`" in r for r in summary.blocked_reasons)
    proc = run_cli("segments", "--store", store.root, "--config", str(write_toml(tmp_path / "c.toml", cfg)),
                   "--local")
    assert proc.returncode == 3 and "blocked" in proc.stderr and "recap captions" in proc.stderr  # EXIT_BLOCKED


def test_video_whose_features_failed_is_reported_and_skipped(featured_store, checkpoints, tmp_path):
    store = copy_store(featured_store, tmp_path / "s")
    cfg = config_for(store.root, checkpoints)
    features = build_stages(cfg, store)[0]
    victim = sorted(store.listdir(f"features/{features.version()}"))[0]
    for name in store.listdir(f"markers/features/{features.version()}"):
        if name.startswith(victim):
            store.remove(f"markers/features/{features.version()}/{name}")
    registry = store.read_table("videos.parquet").to_pylist()
    for row in registry:  # point the registry at a file that has since broken
        if row["video_id"] == victim:
            row["uri"] = str(tmp_path / "broken.mp4")
    (tmp_path / "broken.mp4").write_bytes(b"garbage")
    import pyarrow as pa

    from store import VIDEO_SCHEMA

    store.write_table("videos.parquet", pa.Table.from_pylist(registry, schema=VIDEO_SCHEMA))
    summaries = run_all(cfg, store, local=True)
    by_stage = {s.stage: s for s in summaries}
    assert by_stage["features"].failed >= 1
    for name in ("captions", "segments", "summaries"):
        assert (by_stage[name].done, by_stage[name].blocked) == (5, 1)
        assert any(victim in r and "failed" in r for r in by_stage[name].blocked_reasons)


def test_killed_caption_run_resumes_to_the_same_tables(featured_store, checkpoints, tmp_path):
    stores = [copy_store(featured_store, tmp_path / name) for name in ("killed", "clean")]
    configs = [config_for(s.root, checkpoints) for s in stores]
    toml = [write_toml(tmp_path / f"{i}.toml", c) for i, c in enumerate(configs)]
    cmd = [sys.executable, "-c", "from cli.main import main; main()", "run", "--local", "--config"]
    versions = [(s.name, s.version()) for s in build_stages(configs[0], stores[0])[1:]]

    def committed():  # units of the three caption stages: 6 videos each
        return sum(len(stores[0].markers(name, version)) for name, version in versions)

    killed_mid_run = 0
    for target in (2, 7, 13):  # die in each stage, a little after its target unit commits
        proc = subprocess.Popen(cmd + [str(toml[0])], cwd=REPO, stderr=subprocess.DEVNULL)
        while proc.poll() is None and committed() < target:
            time.sleep(0.005)
        time.sleep(0.02)
        killed_mid_run += proc.poll() is None
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert killed_mid_run == 3
    for t in toml:
        subprocess.run(cmd + [str(t)], cwd=REPO, check=True, capture_output=True)
    assert caption_tables(stores[0], configs[0]) == caption_tables(stores[1], configs[1])


def test_dry_run_prints_the_plan_and_computes_nothing(featured_store, checkpoints, tmp_path):
    store = copy_store(featured_store, tmp_path / "s")
    cfg = config_for(store.root, checkpoints)
    proc = run_cli("run", "--dry-run", "--config", str(write_toml(tmp_path / "c.toml", cfg)), check=True)
    lines = {line.split()[0]: line.split() for line in proc.stdout.splitlines() if line.split()}
    assert lines["captions"][2:5] == ["6", "0", "0"]  # to do, after upstream, done
    assert lines["segments"][2:4] == ["0", "6"] and lines["summaries"][2:4] == ["0", "6"]
    assert not store.exists("captions")


# The comparison below recomputes tokens in this process: with the stages' one reserved CPU, as they computed them
# (a matrix product on 2 threads sums in another order, and on some CPUs differs in the last bit).
@pytest.mark.usefixtures("one_torch_thread")
def test_clip_captions_from_pixels_when_tokens_were_not_stored(featured_store, checkpoints, tmp_path):
    store = copy_store(featured_store, tmp_path / "s")
    cfg = config_for(store.root, checkpoints)
    no_tokens = load_config(store=store.root, features={"encoder": "tsf-tiny", "tokens": False},
                            windows={"segment_s": 24.0},
                            captions={f"{k}_checkpoint": v for k, v in checkpoints.items()})
    stages = build_stages(no_tokens, store)
    assert run_stage(stages[0], store, executor="local").done == 6
    assert not stages[0].feature_set(store).has_tokens(read_videos(store)[0]["video_id"])
    assert run_stage(stages[1], store, executor="local").done == 6  # clip captions, tokens from pixels
    from_pixels = read_captions(store, "clip", stages[1].version())
    run_all(cfg, store, local=True, evaluate=False)
    from_tokens = read_captions(store, "clip", build_stages(cfg, store)[1].version())
    rows = lambda t: sorted(zip(*(t[c].to_pylist() for c in ("video_id", "start_s", "end_s", "text"))))
    assert rows(from_pixels) == rows(from_tokens)  # every window, and the same caption in each
    # The same captions because the same model inputs: tokens from pixels equal the stored ones, window by window.
    with_tokens = build_stages(cfg, store)
    for unit in stages[1].plan(store):
        pixels = stages[1].examples(unit, store, ExampleReader(stages[0].feature_set(store), "clip", 17))
        stored = with_tokens[1].examples(unit, store, ExampleReader(with_tokens[0].feature_set(store), "clip", 17))
        assert len(pixels) == len(stored) and all(
            (a.start_s, a.end_s) == (b.start_s, b.end_s) and np.array_equal(a.video, b.video)
            for a, b in zip(pixels, stored))


# ---- the recursion: what each level reads of the level below ----------------------------

def test_segment_and_video_examples_hold_exactly_the_lower_captions_in_order(featured_store, checkpoints, tmp_path):
    store = copy_store(featured_store, tmp_path / "s")
    cfg = config_for(store.root, checkpoints)
    features, clip, segment, video = build_stages(cfg, store)
    for stage in (clip, segment):
        assert run_stage(stage, store, executor="local").failed == 0
    clip.setup()
    for unit in segment.plan(store):
        clips = read_captions(store, "clip", clip.version(), unit.video_id).to_pylist()
        segments = read_captions(store, "segment", segment.version(), unit.video_id).to_pylist()
        reader = ExampleReader(features.feature_set(store), "segment", 8)
        examples = segment.examples(unit, store, reader)
        assert [(e.start_s, e.end_s) for e in examples] == [(s["start_s"], s["end_s"]) for s in segments]
        seen = 0
        for example in examples:
            inside = [c["text"] for c in clips if c["start_s"] >= example.start_s and c["end_s"] <= example.end_s]
            assert len(inside) == math.ceil((example.end_s - example.start_s) / 4)  # 6, the tail segment fewer
            assert example.text == "".join(inside)
            seen += len(inside)
        assert seen == len(clips)  # every clip caption read by exactly one segment
        [whole] = video.examples(unit, store, ExampleReader(features.feature_set(store), "video", 8))
        assert whole.text == " ".join(s["text"].strip(".").strip() + "." for s in segments)


def test_a_told_summary_s_example_reads_its_parts_in_the_order_told(featured_store, checkpoints):
    """Training only: a reordered or composed summary's example reads part after part, each part's CLS rows and the
    descriptions of its own video that overlap it for more than half their length."""
    store = Store(featured_store)
    features = build_stages(config_for(store.root, checkpoints), store)[0].feature_set(store)
    reader = ExampleReader(features, "video", 64)  # more rows than the parts have: all of them, in the order told
    a, b = [v["video_id"] for v in read_videos(store)][:2]
    # predicted descriptions: the last window runs into the tail, past its segment's end
    lower = {a: [(0.0, 24.0, "C sorted the red cubes."), (24.0, 48.0, "C washed the ball."),
                 (48.0, 53.0, "C stacked.")],
             b: [(0.0, 24.0, "C painted the cone red."), (24.0, 48.0, "C arranged the ring.")]}
    parts = ((a, 48.0, 52.0), (b, 24.0, 48.0), (a, 0.0, 24.0))
    told = reader.told(parts, lower, "target")
    assert told.text == "C stacked. C arranged the ring. C sorted the red cubes."
    rows = [features.read_cls(v, np.flatnonzero(inside(features.windows(v), s, e))) for v, s, e in parts]
    assert all(len(r) for r in rows)
    assert np.array_equal(told.video[told.video_mask.astype(bool)], np.concatenate(rows).astype(np.float32))
    assert (told.video_id, told.target) == (a, "target")
    # one video's segments in another order read as the video's own example does, but for the order
    in_time = reader.span(a, 0.0, 53.0, lower[a], "target")
    assert reader.told(((a, 24.0, 48.0), (a, 0.0, 24.0), (a, 48.0, 52.0)), lower, "target").text == \
        "C washed the ball. C sorted the red cubes. C stacked."
    assert in_time.text == "C sorted the red cubes. C washed the ball. C stacked."
    # a part that no caption of its video overlaps for more than half the caption's length tells nothing
    assert told_texts(lower, ((a, 0.0, 13.0),)) == ["C sorted the red cubes."]
    assert told_texts(lower, ((a, 0.0, 12.0),)) is None and told_texts(lower, ((b, 48.0, 52.0),)) is None
    with pytest.raises(ValueError, match="do not all have a lower-level caption"):
        reader.told(((a, 0.0, 24.0), (b, 48.0, 52.0)), lower, "target")


def test_the_lower_level_text_reaches_the_model(featured_store, checkpoints):
    """Other clip captions give a segment model other queries and other logits; so does other video."""
    from models import checkpoint as ckpt
    from stages.examples import Example, collate

    model, tokenizer = ckpt.load(checkpoints["segment"])
    with torch.no_grad():  # an untrained checkpoint: its closed gates (0, the official init) would hide every query
        for name, p in model.text_decoder.named_parameters():
            if "alpha_" in name:
                p.fill_(1.0)
    rng = np.random.default_rng(0)
    video, mask = rng.normal(size=(1, 8, 64)).astype(np.float32), np.ones((1, 8), np.int64)

    def outputs(text, features=video):
        batch = collate([Example("v", 0.0, 24.0, features[0], mask[0], text, "C sorted the cubes.")], tokenizer)
        with torch.no_grad():
            return model.map_features(batch["video"], batch["video_mask"], batch["text_ids"], batch["text_mask"]), \
                model(**batch).logits

    queries, logits = outputs("#C C picks up the red cube#C C puts down the blue ball")
    other_queries, other_logits = outputs("#C C washes the red cube")
    n_video = model.config.num_video_queries
    assert torch.equal(queries[:, :n_video], other_queries[:, :n_video])  # the video queries read no text
    assert not torch.allclose(queries[:, n_video:], other_queries[:, n_video:])
    assert not torch.allclose(logits, other_logits)
    moved_queries, _ = outputs("#C C washes the red cube", video + 1.0)
    assert not torch.allclose(moved_queries[:, :n_video], other_queries[:, :n_video])


def test_a_version_changes_only_with_what_changes_its_output(featured_store, checkpoints):
    store = Store(featured_store)
    versions = lambda cfg: [s.version() for s in build_stages(cfg, store)]
    base = versions(config_for(featured_store, checkpoints))
    longer = versions(config_for(featured_store, checkpoints, segment_s=32.0))
    assert longer[:2] == base[:2]  # features and clip captions do not read segment windows
    assert longer[2] != base[2] and longer[3] != base[3]  # segments, and the summaries that read them
    batch = versions(load_config(store=str(featured_store), features={"encoder": "tsf-tiny", "batch_size": 8},
                                 windows={"segment_s": 24.0}, captions={
                                     **{f"{k}_checkpoint": v for k, v in checkpoints.items()}, "batch_size": 3}))
    assert batch == base  # how many windows go through the model at once changes nothing
    decoding = lambda **c: versions(config_for(featured_store, checkpoints, captions=c))
    assert decoding(num_beams=8, top_p=0.5) == base  # greedy decoding reads neither
    wider = decoding(video_method="beam", num_beams=8)
    assert wider[:3] == decoding(video_method="beam")[:3] == base[:3]  # the levels below decode greedily
    assert wider[3] != decoding(video_method="beam")[3] != base[3]


def test_a_stage_run_leaves_the_caller_s_torch_threads_as_they_were(featured_store, checkpoints, tmp_path):
    # check() loads the model in the caller and sets torch's threads to the stage's 1 CPU: a demo then trained
    # every later level with 1 thread, and differently when a resumed run skipped the stage. (The runner gives
    # them back in one `finally` around both executors; the Ray case, 30 s of a local Ray, is not run.)
    store = copy_store(featured_store, tmp_path / "s")
    cfg = config_for(store.root, checkpoints)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        summary = run_stage(build_stages(cfg, store)[1], store, executor="local")
        assert summary.done == 6 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_the_summaries_method_flag_decodes_the_summaries_only(featured_store, checkpoints, tmp_path):
    """`recap summaries --method beam` records captions.video_method: the clip captions and segment
    descriptions it reads stay the versions already made, so the summaries are made, not blocked."""
    from pipeline.config import settle

    store = copy_store(featured_store, tmp_path / "s")
    toml = write_toml(tmp_path / "c.toml", config_for(store.root, checkpoints))
    run_cli("run", "--local", "--config", str(toml), check=True)
    run_cli("summaries", "--local", "--method", "beam", "--store", str(store.root), check=True)  # remembers the rest
    settled = settle(str(store.root), record=False)
    assert (settled.captions.method, settled.captions.video_method) == ("greedy", "beam")
    stages = build_stages(settled, store)
    assert [s.method for s in stages[1:]] == ["greedy", "greedy", "beam"]
    assert len(store.markers(stages[3].name, stages[3].version())) == 6
