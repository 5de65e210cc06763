"""`recap enhance` (CSI, ExCae's caption self-improvement) on a small real store: the tiny corpus, a one-epoch tiny
dual encoder (ψ), features extracted with it, captions at the three levels from small untrained checkpoints. The
search's scores, its acceptance and patience, a killed search resumed, the stage that applies the final prompt, and
the chat endpoint path against a local HTTP server that this file starts."""

import base64
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from models.clip_tokenizer import ClipTokenizer
from models.lavila import DualEncoder, LavilaConfig
from pipeline.config import settle
from pipeline.dag import build_stages, enhance_captioner, enhance_stage
from pipeline.enhance import EndpointEngineer, LocalEngineer, committed, run_search
from pipeline.runner import run_stage
from stages.chat import parse_lines
from stages.enhance import ChatPrompt, LocalCaptioner, Recipe, shift_frames
from store import Store, read_groundtruth, read_videos

from conftest import REPO, captioned_store, copy_store, run_cli

pytestmark = pytest.mark.usefixtures("one_torch_thread")
QUIET = io.StringIO()


@pytest.fixture(scope="module")
def captioned(tmp_path_factory, tiny_corpus):
    """Every level captioned, the settings in the store's recap.toml (commands need only --store)."""
    return captioned_store(tmp_path_factory.mktemp("enhance"), tiny_corpus).root


def settings(store: Store, **enhance):
    return settle(store.root, record=False, enhance=enhance)


def train_videos(store: Store) -> list[str]:
    return sorted(set(read_groundtruth(store, "video", "train")["video_id"].to_pylist()))


# ---- prompts and the local engineer ---------------------------------------------------------------------------

def test_a_recipe_is_its_canonical_text_and_a_rewrite_changes_one_field_it_reads():
    recipe = Recipe(level="segment", method="sample", temperature=0.7, top_p=0.95, jitter=0.25, returns=5)
    assert recipe.text() == "level=segment method=sample temperature=0.7 top_p=0.95 jitter=0.25 returns=5"
    assert Recipe.parse(recipe.text()) == recipe
    # a rewrite cannot change the search's level and K; fields the method does not read are at their defaults
    assert Recipe.parse("level=clip method=greedy temperature=0.5 returns=2", recipe) == \
        Recipe(level="segment", method="greedy", jitter=0.25, returns=5)
    for bad, named in (("method=nucleus", "method"), ("top_p=1.5", "top_p"), ("beams=2", "beams"),
                       ("num_beams=two", "num_beams")):
        with pytest.raises(ValueError, match=named):
            Recipe.parse(bad, recipe)

    engineer, tried = LocalEngineer(seed=3), []
    for t in range(1, 11):  # of its 12 neighbours
        new = engineer.rewrite(recipe, {}, tried, t)
        assert new == LocalEngineer(seed=3).rewrite(recipe, {}, tried, t)  # seeded by (seed, iteration) alone
        changed = [k for k in ("method", "temperature", "top_p", "num_beams", "jitter") if getattr(new, k) !=
                   getattr(recipe, k)]
        assert (new.level, new.returns) == (recipe.level, recipe.returns) and new == new.normal()
        if new.method != recipe.method:  # a new method: the fields it reads start at their defaults
            assert new == Recipe(level="segment", method=new.method, jitter=0.25, returns=5)
        else:
            assert len(changed) == 1 and changed[0] in recipe.mutable()
        assert new.text() not in {r["prompt"] for r in tried}
        tried.append({"prompt": new.text()})
    chat = ChatPrompt("Generate 3 captions from different perspectives about this video.", 3)
    assert engineer.rewrite(chat, {}, [], 1).instruction.startswith(("Write 3", "Describe this video in 3", "List 3",
                                                                     "Give 3"))
    assert parse_lines("Here:\n1. A man cuts.\n2) The cube is red\n- \"A ring\"\n\n* last\n3. extra", 4) == \
        ["Here:", "A man cuts.", "The cube is red", "A ring"]


def test_window_jitter_moves_a_clip_window_frames_across_its_neighbour():
    frames, patches, dim = 4, 2, 3
    tokens = np.zeros((3, 1 + frames * patches, dim), np.float32)
    for w in range(3):
        tokens[w, 0] = -w - 1  # the first token: the window's own, kept
        tokens[w, 1:] = np.repeat(10 * w + np.arange(frames), patches)[:, None]  # frame f of window w: 10w + f
    frame_ids = lambda t: t[1:].reshape(frames, patches, dim)[:, 0, 0].tolist()
    assert frame_ids(shift_frames(tokens, 1, frames, 1)) == [11, 12, 13, 20]
    assert frame_ids(shift_frames(tokens, 1, frames, -2)) == [2, 3, 10, 11]
    assert frame_ids(shift_frames(tokens, 1, frames, 0)) == [10, 11, 12, 13]
    assert shift_frames(tokens, 1, frames, 1)[0, 0] == -2
    assert frame_ids(shift_frames(tokens, 2, frames, 1)) == [20, 21, 22, 23]  # the last window: no later frames


def test_window_jitter_feeds_the_model_each_caption_s_shifted_windows(captioned, monkeypatch):
    """An untrained model writes the same caption whatever the video, so what is checked is what it is given."""
    store = Store(captioned)
    given = []

    def decode(self, examples, recipe, generator):  # every input, numbered in the order given
        given.extend(e.video.copy() for e in examples)
        return [str(i) for i in range(len(given) - len(examples), len(given))]

    monkeypatch.setattr(LocalCaptioner, "decode", decode)
    features = build_stages(settle(store.root, record=False), store)[0].feature_set(store)
    vid = read_videos(store)[0]["video_id"]
    windows = features.windows(vid)

    clip = enhance_captioner(settings(store, level="clip"), store)
    unit = next(u for u in clip.plan(store) if u.video_id == vid)
    captions = clip.caption(store, unit, Recipe(level="clip", method="greedy", jitter=0.5, returns=5), 0)
    # offsets -0.5, -0.25, 0, 0.25, 0.5 of the 4 frames: shifts -2, -1, 0, 1, 2, each decoded once, in that order
    assert len(captions) == len(windows) and len(given) == 5 * len(windows)
    assert [c for _, _, c in captions[:2]] == [[str(v * len(windows) + w) for v in range(5)] for w in range(2)]
    tokens = features.read_tokens(vid, slice(0, len(windows))).astype(np.float32)
    for v, shift in enumerate((-2, -1, 0, 1, 2)):
        for w in range(len(windows)):
            np.testing.assert_array_equal(given[v * len(windows) + w], shift_frames(tokens, w, 4, shift))
    assert not np.array_equal(given[3 * len(windows) + 1], tokens[1])

    given.clear()
    video = enhance_captioner(settings(store, level="video"), store)
    unit = next(u for u in video.plan(store) if u.video_id == vid)
    [(_, _, texts)] = video.caption(store, unit, Recipe(level="video", method="sample", jitter=0.5, returns=3), 0)
    assert texts == ["0", "1", "2"]  # sampling: every caption decoded, even one without a shift
    n, f = len(windows), 8  # the official picks (j + 1) n / (f + 1), moved by -0.5, 0, +0.5 of their spacing
    cls = features.read_cls(vid).astype(np.float32)
    for i, offset in enumerate((-0.5, 0.0, 0.5)):
        rows = ((np.arange(f) + 1 + offset) * n / (f + 1)).astype(int)
        np.testing.assert_array_equal(given[i], cls[rows])
    assert not np.array_equal(given[0], given[1])


# ---- the search ----------------------------------------------------------------------------------------------

def psi_scores(store: Store, captioner, recipe, record: dict, references: dict, weight: float):
    """similarity and diversity of a prompt, recomputed here: the captions again, ψ from the checkpoint file."""
    config = settle(store.root, record=False)
    model = DualEncoder.from_lavila(config.features.checkpoint, LavilaConfig.tiny()).eval()
    tok = ClipTokenizer()
    sims, divs = [], []
    units = {u.video_id: u for u in captioner.plan(store)}
    for vid in record["videos"]:
        [(_, _, captions)] = captioner.caption(store, units[vid], recipe, 0)
        with torch.no_grad():
            emb = model.encode_text(tok([references[vid]] + captions)).numpy().astype(np.float64)
        g, c = emb[0], emb[1:]
        sims.append((c @ g).mean())
        k = len(c)
        divs.append(1 - ((c @ c.T).sum() - k) / (k * (k - 1)))
    return np.mean(sims), np.mean(divs), np.mean(sims) + weight * np.mean(divs)


def test_local_search_improves_the_best_and_stops_by_patience(captioned, tmp_path):
    store = copy_store(captioned, tmp_path / "s")
    config = settings(store, level="video", k=4, initial="method=greedy", patience=3, iterations=40,
                      diversity_weight=0.5, sample_size=3)
    result = run_search(config, store, stream=QUIET)
    records = committed(store, result.run_dir)
    assert len(records) == result.iterations
    assert records[0]["prompt"] == "level=video method=greedy jitter=0.0 returns=4"
    assert records[0]["diversity"] == pytest.approx(0.0, abs=1e-6)  # greedy, no jitter: K equal captions
    assert result.score > records[0]["score"] and result.best_iteration > 0  # the search found a better prompt
    best = float("-inf")
    for r in records:  # accepted exactly when it beats every score before it, and then it is the best
        assert r["accepted"] == (r["score"] is not None and r["score"] > best and r["note"] is None)
        best = max(best, r["score"])
        assert r["best_score"] == best and r["score"] == pytest.approx(r["similarity"] + 0.5 * r["diversity"])
    assert result.stopped == "patience" and [r["accepted"] for r in records[-3:]] == [False] * 3
    assert not any(r["accepted"] for r in records[result.best_iteration + 1:])
    assert json.loads((tmp_path / "s" / result.run_dir / "result.json").read_text())["prompt"] == result.prompt.text()

    # the committed numbers are ψ's: recomputed from the captions and the dual encoder's text tower
    captioner = enhance_captioner(config, store)
    references = {r["video_id"]: r["text"] for r in read_groundtruth(store, "video", "train").to_pylist()}
    for r in (records[0], records[result.best_iteration]):
        r["videos"] = sorted({s["video_id"] for s in r["samples"]})
        assert r["units"] == len(r["videos"]) == 3
        sim, div, score = psi_scores(store, captioner, Recipe(**r["fields"]), r, references, 0.5)
        assert (r["similarity"], r["diversity"], r["score"]) == pytest.approx((sim, div, score), abs=1e-5)

    again = run_search(config, store, stream=(log := io.StringIO()))  # complete: replays, scores nothing
    assert again.prompt == result.prompt and "resuming after iteration" in log.getvalue()
    assert "| score" not in log.getvalue()


def test_killed_search_resumes_after_its_last_iteration_to_the_uninterrupted_final_prompt(captioned, tmp_path):
    args = ["enhance", "--search-only", "--level", "segment", "--k", "4", "--patience", "6", "--iterations", "14",
            "--sample-size", "3", "--seed", "1"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-c", "from cli.main import main; main()", *args]

    reference = copy_store(captioned, tmp_path / "reference")
    done = subprocess.run([*command, "--store", reference.root], env=env, cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    [run] = reference.listdir("enhance/search")
    uninterrupted = committed(reference, f"enhance/search/{run}")
    assert len(uninterrupted) >= 7  # iteration 0 and at least `patience` more: long enough to be killed midway

    killed = copy_store(captioned, tmp_path / "killed")
    run_dir = tmp_path / "killed" / "enhance" / "search" / run  # the same settings and data: the same run
    proc = subprocess.Popen([*command, "--store", killed.root], env=env, cwd=REPO, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (run_dir / "iter-0001.json").exists():
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    kept = committed(killed, f"enhance/search/{run}")
    assert 2 <= len(kept) < len(uninterrupted) and not (run_dir / "result.json").exists()

    resumed = subprocess.run([*command, "--store", killed.root], env=env, cwd=REPO, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resuming after iteration {len(kept) - 1}" in resumed.stderr
    assert [f"iteration {t} |" in resumed.stderr for t in range(len(uninterrupted))] == \
        [t >= len(kept) for t in range(len(uninterrupted))]  # nothing committed is scored again
    drop = lambda records: [{k: v for k, v in r.items() if k != "wall_s"} for r in records]
    assert drop(committed(killed, f"enhance/search/{run}")) == drop(uninterrupted)
    final = lambda s: json.loads((tmp_path / s / "enhance" / "search" / run / "result.json").read_text())
    assert final("killed") == final("reference")


# ---- the stage that applies the prompt ------------------------------------------------------------------------

def test_the_final_prompt_applied_writes_k_captions_per_unit_and_reruns_skip(captioned, tmp_path):
    store = copy_store(captioned, tmp_path / "s")
    proc = run_cli("enhance", "--store", store.root, "--level", "clip", "--k", "3", "--prompt",
                   "method=greedy jitter=0.5", "--local")
    assert proc.returncode == 0, proc.stderr
    assert "done 6, skipped 0, failed 0" in proc.stderr and "search" not in proc.stderr  # a given prompt: no search
    config = settle(store.root, record=False)
    stage = enhance_stage(config, store, Recipe(level="clip", method="greedy", jitter=0.5, returns=3))
    [version] = store.listdir("captions/enhanced")
    assert version == stage.version()
    features = build_stages(config, store)[0].feature_set(store)
    for video in read_videos(store):
        table = pq.read_table(store.abs(f"captions/enhanced/{version}/{video['video_id']}.parquet")).to_pandas()
        windows = features.windows(video["video_id"])
        assert len(table) == 3 * len(windows) and table["k"].tolist() == [0, 1, 2] * len(windows)
        assert table[["start_s", "end_s"]].drop_duplicates().values.tolist() == windows.tolist()
        assert set(table["prompt"]) == {"level=clip method=greedy jitter=0.5 returns=3"}
        assert json.loads(table["recipe"][0]) == {"level": "clip", "method": "greedy", "temperature": 1.0,
                                                  "top_p": 0.9, "num_beams": 4, "jitter": 0.5, "returns": 3}
        assert set(table["level"]) == {"clip"} and set(table["version"]) == {version}

    again = run_cli("enhance", "--store", store.root, "--level", "clip", "--k", "3", "--prompt",
                    "method=greedy jitter=0.5", "--local")
    assert again.returncode == 0 and "done 0, skipped 6" in again.stderr
    lost = read_videos(store)[2]["video_id"]
    before = {v["video_id"]: os.path.getmtime(store.abs(f"captions/enhanced/{version}/{v['video_id']}.parquet"))
              for v in read_videos(store)}
    store.remove(f"markers/enhance/{version}/{lost}.json")  # as a run killed before this video's commit leaves it
    summary = run_stage(stage, store, executor="local", stream=QUIET)
    assert (summary.done, summary.skipped) == (1, 5)
    after = {v: os.path.getmtime(store.abs(f"captions/enhanced/{version}/{v}.parquet")) for v in before}
    assert [v for v in before if after[v] != before[v]] == [lost]
    assert enhance_stage(config, store, Recipe(level="clip", method="greedy", jitter=0.5, returns=4)).version() \
        != version  # K is in the version


# ---- the chat endpoint --------------------------------------------------------------------------------------

class Endpoint:
    """A local OpenAI-compatible server: captions for most units; for `faults` (video id -> timeout | malformed |
    500) a failure; engineer requests get `rewrites` in turn. Every request is kept."""

    def __init__(self, faults: dict, rewrites=(), delay_s: float = 3.0):
        self.faults, self.rewrites, self.requests = faults, list(rewrites), []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                unit = self.headers.get("X-Request-Id", "")
                owner.requests.append({"path": self.path, "unit": unit, "body": body,
                                       "auth": self.headers.get("Authorization")})
                fault = owner.faults.get(unit.split("@")[0])
                try:
                    if fault == "timeout":
                        time.sleep(delay_s)
                    if fault == "500":
                        self.send_error(500, "boom")
                        return
                    if unit.startswith("engineer@"):
                        content = owner.rewrites.pop(0)
                    else:
                        k = int(body["messages"][0]["content"][0]["text"].split("Answer with ")[1].split()[0])
                        content = "\n".join(f"{i + 1}. C moves the red cube, view {i}" for i in range(k))
                    reply = b"{not json" if fault == "malformed" else json.dumps(
                        {"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(reply)))
                    self.end_headers()
                    self.wfile.write(reply)
                except (BrokenPipeError, ConnectionResetError):  # the client timed out and left
                    pass

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def endpoint_settings(store: Store, server: Endpoint, **more):
    return settings(store, captioner="endpoint", endpoint_url=server.url, endpoint_model="test-vlm", timeout_s=1.0,
                    retries=1, frames=3, k=3, api_key_env="RECAP_TEST_KEY", **more)


def test_endpoint_captioner_sends_frames_and_prompt_and_reports_each_failed_unit(captioned, tmp_path, monkeypatch):
    store = copy_store(captioned, tmp_path / "s")
    videos = [v["video_id"] for v in read_videos(store)]
    faults = {videos[1]: "timeout", videos[2]: "malformed", videos[4]: "500"}
    server = Endpoint(faults)
    monkeypatch.setenv("RECAP_TEST_KEY", "sekret")
    try:
        config = endpoint_settings(store, server)
        prompt = ChatPrompt("Describe the objects and colours in this video.", 3)
        stage = enhance_stage(config, store, prompt)
        log = io.StringIO()
        summary = run_stage(stage, store, executor="local", stream=log)
    finally:
        server.close()
    assert (summary.done, summary.failed) == (3, 3)  # the batch went on past each failure
    failed = {r["unit"]: r["message"] for r in store.failures("enhance", stage.version())}
    assert set(failed) == set(faults)
    assert "timed out after 1 s (attempt 2 of 2)" in failed[videos[1]]
    assert "malformed reply" in failed[videos[2]] and "attempt" not in failed[videos[2]]
    assert "HTTP 500" in failed[videos[4]] and "(attempt 2 of 2)" in failed[videos[4]]
    for vid in faults:  # one line each
        [line] = [line for line in log.getvalue().splitlines() if f"{vid}: FAILED" in line]
        assert "EndpointError" in line

    by_unit = {}
    for r in server.requests:
        by_unit.setdefault(r["unit"].split("@")[0], []).append(r)
    assert {v: len(rs) for v, rs in by_unit.items()} == {v: 2 if f in ("timeout", "500") else 1 for v, f in
                                                          {**dict.fromkeys(videos, None), **faults}.items()}
    for r in server.requests:
        assert r["path"] == "/v1/chat/completions" and r["auth"] == "Bearer sekret"
        assert r["body"]["model"] == "test-vlm" and r["body"]["seed"] == 0
        [message] = r["body"]["messages"]
        text, *images = message["content"]
        assert text["type"] == "text" and text["text"].startswith(prompt.text())
        assert "Answer with 3 lines" in text["text"]
        assert len(images) == 3
        for part in images:
            url = part["image_url"]["url"]
            assert part["type"] == "image_url" and url.startswith("data:image/jpeg;base64,")
            image = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
            assert image.format == "JPEG" and image.size == (336, 336)
    for vid in set(videos) - set(faults):
        table = pq.read_table(store.abs(f"captions/enhanced/{stage.version()}/{vid}.parquet")).to_pandas()
        duration = next(v["duration_s"] for v in read_videos(store) if v["video_id"] == vid)
        assert table["text"].tolist() == [f"C moves the red cube, view {i}" for i in range(3)]
        assert table[["start_s", "end_s"]].values.tolist() == [[0.0, duration]] * 3
        assert set(table["prompt"]) == {prompt.text()}


def test_endpoint_search_engineer_rewrites_the_best_prompt_and_a_failing_unit_leaves_the_rest_scored(captioned,
                                                                                                    tmp_path):
    store = copy_store(captioned, tmp_path / "s")
    broken = train_videos(store)[0]
    rewrite = "Write 3 captions naming each object and its colour."
    server = Endpoint({broken: "500"}, rewrites=[rewrite, "Generate 3 captions from different perspectives about "
                                                          "this video.", "  "])
    try:
        config = endpoint_settings(store, server, engineer="endpoint", iterations=3, patience=5, sample_size=4)
        result = run_search(config, store, stream=(log := io.StringIO()))
    finally:
        server.close()
    records = committed(store, result.run_dir)
    assert result.stopped == "iterations"
    assert result.prompt.text() == max(records[:2], key=lambda r: r["score"])["prompt"]
    assert [r["prompt"] for r in records] == ["Generate 3 captions from different perspectives about this video.",
                                              rewrite, records[0]["prompt"], None]
    assert records[2]["note"] == "repeat of iteration 0" and not records[2]["accepted"]
    assert records[3]["note"].startswith("invalid rewrite") and not records[3]["accepted"]
    for r in records[:3]:  # the failing video is reported, the other three are scored
        assert r["units"] == 3 and len(r["failures"]) == 1 and r["failures"][0].startswith(f"{broken}: EndpointError")
        assert r["score"] is not None
    assert f"iteration 0: {broken}: EndpointError" in log.getvalue()
    engineer = [r["body"]["messages"][0]["content"][0]["text"] for r in server.requests if r["unit"] == "engineer@1"]
    assert len(engineer) == 1 and records[0]["prompt"] in engineer[0]
    assert f"score {records[0]['score']:.4f}" in engineer[0]
    assert "C moves the red cube, view 0" in engineer[0] and records[0]["samples"][0]["reference"] in engineer[0]


def test_endpoint_engineer_reply_must_be_a_valid_recipe_for_our_models():
    class Canned:
        url, model = "http://x/v1", "m"

        def __init__(self, reply):
            self.reply = reply

        def complete(self, content, **_):
            return self.reply

    best = Recipe(level="video", method="sample", returns=10)
    record = {"score": 0.5, "similarity": 0.4, "diversity": 0.2, "samples": []}
    new = EndpointEngineer(Canned("`method=beam num_beams=8 jitter=0.25 level=clip`")).rewrite(best, record, [], 1)
    assert new == Recipe(level="video", method="beam", num_beams=8, jitter=0.25, returns=10)
    with pytest.raises(ValueError, match="not name=value"):
        EndpointEngineer(Canned("use beam search please")).rewrite(best, record, [], 1)
