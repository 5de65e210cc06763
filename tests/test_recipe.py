"""The scheduled-job recipe (pipeline/recipes): its config is valid, and two nights on a real Ray head do only new work."""

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from pipeline.config import load_config
from store import Store

from _checkpoints import tiny_checkpoint
from conftest import REPO

RECIPES = REPO / "pipeline" / "recipes"


def test_recipe_config_is_valid_and_official():
    cfg = load_config(RECIPES / "ego4d-nightly.toml")
    assert cfg.store.startswith("s3://") and cfg.features.encoder == "tsf-base"
    assert (cfg.windows.clip_s, cfg.windows.segment_s) == (4.0, 180.0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_head():
    """A real Ray head with the job server, in its own process group (torn down without touching others)."""
    port, dashboard = _free_port(), _free_port()
    # The job agent's port defaults to 52365 on every Ray node: a local Ray of another test (in this worker or
    # the next) that holds it leaves this head without a job agent ("No available agent to submit job").
    agent_ports = [arg for flag in ("--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
                                    "--runtime-env-agent-port", "--metrics-export-port")
                   for arg in (flag, str(_free_port()))]
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's unix socket paths must fit 107 bytes
    ray = Path(sys.executable).with_name("ray")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.Popen([str(ray), "start", "--head", "--block", "--port", str(port), "--num-cpus", "2",
                             "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
                             "--dashboard-port", str(dashboard), *agent_ports, "--temp-dir", temp],
                            env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{dashboard}"
    deadline = time.monotonic() + 420  # under load a 2-core machine has taken more than 180 s
    ready = [str(ray), "job", "submit", "--address", url, "--", "true"]  # the job agent too, not just the API
    while subprocess.run(ready, env=env, capture_output=True).returncode:
        if time.monotonic() > deadline or proc.poll() is not None:
            _stop(proc, temp)
            pytest.fail("Ray head did not come up")
        time.sleep(2)
    yield url, env
    _stop(proc, temp)


def _stop(proc, temp):
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # SIGTERM would drain for 30 s first
    except ProcessLookupError:
        pass
    proc.wait()
    shutil.rmtree(temp, ignore_errors=True)


def _night(config: Path, videos: Path, url: str, env: dict) -> subprocess.CompletedProcess:
    recap = Path(sys.executable).with_name("recap")
    return subprocess.run([str(RECIPES / "nightly.sh")], capture_output=True, text=True, cwd=REPO, env={
        **env, "RECAP_CONFIG": str(config), "VIDEOS": str(videos), "RAY_DASHBOARD": url, "RECAP": str(recap),
        "PATH": f"{recap.parent}{os.pathsep}{env['PATH']}"})


def test_two_nights_on_a_ray_cluster_do_only_new_work(ray_head, tiny_corpus, tmp_path):
    url, env = ray_head
    checkpoints = {level: tiny_checkpoint(tmp_path / "ckpt" / level, level) for level in ("clip", "segment", "video")}
    text = (RECIPES / "ego4d-nightly.toml").read_text()
    for key, value in {"store": tmp_path / "store", "encoder": "tsf-tiny", "checkpoint": "", "device": "cpu",
                       "segment_s": 24.0, **{f"{k}_checkpoint": v for k, v in checkpoints.items()}}.items():
        literal = f"{value}" if isinstance(value, float) else f'"{value}"'
        text = re.sub(rf"^{key} = .*$", f"{key} = {literal}", text, flags=re.M)
    config = tmp_path / "nightly.toml"
    config.write_text(text)

    videos = tmp_path / "incoming"
    videos.mkdir()
    all_videos = sorted((tiny_corpus / "videos").glob("*.mp4"))
    for path in all_videos[:4]:
        shutil.copy(path, videos)
    first = _night(config, videos, url, env)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    store = Store(tmp_path / "store")
    cfg = load_config(config)
    from pipeline.dag import build_stages

    stages = build_stages(cfg, store)
    done_first = {s.name: store.markers(s.name, s.version()) for s in stages}
    assert [len(done_first[s.name]) for s in stages[1:]] == [4, 4, 4]

    for path in all_videos[4:]:
        shutil.copy(path, videos)
    (videos / "broken.mp4").write_bytes(b"not a video")
    second = _night(config, videos, url, env)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    plan = {line.split()[0]: line.split() for line in second.stdout.splitlines() if line.split()}
    assert plan["features"][2] == "2"  # the dry run: two new videos' features to do now,
    assert [plan[s][3] for s in ("captions", "segments", "summaries")] == ["2", "2", "2"]  # and captions after
    for stage in stages:
        markers = store.markers(stage.name, stage.version())
        assert {u: markers[u] for u in done_first[stage.name]} == done_first[stage.name]  # nothing redone
    assert [len(store.markers(s.name, s.version())) for s in stages[1:]] == [6, 6, 6]
    assert [f["unit"] for f in store.failures("ingest")] == ["broken"]
