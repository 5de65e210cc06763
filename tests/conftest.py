import os
import shutil
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest

from store import Store

REPO = Path(__file__).resolve().parents[1]


def write_video(path: Path, seconds: float = 3.0, fps: int = 10, size=(64, 48), codec="libx264") -> Path:
    """A small real H.264 mp4: a moving bright square on a gradient, so frames differ."""
    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = size
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        odd = w % 2 or h % 2  # 4:2:0 needs even sizes; odd-sized videos in the wild are 4:4:4
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv444p" if odd else "yuv420p"
        for i in range(int(seconds * fps)):
            img = np.zeros((h, w, 3), np.uint8)
            img[..., 0] = np.linspace(0, 255, w, dtype=np.uint8)
            x = (i * 3) % (w - 8)
            img[h // 3: h // 3 + 8, x: x + 8] = 255
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def copy_store(src, dst) -> Store:
    """A copy of a store built once per module, for a test to change."""
    shutil.copytree(src, dst)
    return Store(dst)


@pytest.fixture
def store(tmp_path) -> Store:
    return Store(tmp_path / "store")


@pytest.fixture
def bad_and_good_videos(tmp_path) -> Path:
    """Two good videos next to a corrupt, a truncated, an empty and a non-video file."""
    folder = tmp_path / "videos"
    write_video(folder / "good_a.mp4", seconds=3)
    write_video(folder / "good_b.mp4", seconds=5, size=(80, 60))
    good = (folder / "good_a.mp4").read_bytes()
    (folder / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 40)
    (folder / "truncated.mp4").write_bytes(good[: len(good) // 3])
    (folder / "empty.mp4").write_bytes(b"")
    (folder / "notes.mp4").write_text("these are my notes, not a video\n")
    return folder


def write_audio_only(path: Path) -> Path:
    """An mp4 with one AAC stream and no video."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=16000)
        stream.layout = "mono"
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate = 16000
        for i in range(10):
            frame.pts = i * 1024
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return path


@pytest.fixture(autouse=True, scope="module")
def _no_ray_left_to_the_next_module():
    """A module that starts Ray in this process (run_stage on Ray: pipeline.ray_workers.ensure_ray) shuts it down
    when it ends: the next module that this xdist worker runs may start its own (`ray.init` refuses a second)."""
    yield
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()


def run_cli(*args: str, check: bool = False, cwd=REPO, fresh: bool = False) -> subprocess.CompletedProcess:
    """Run `recap ...` as a user would: its exit code, stdout and stderr. In this process by default (a fresh
    interpreter pays 2-8 s of imports on 2 cores, every call); `fresh=True` starts one, where the test is about the
    process itself: what it imports, Ray started from the command line, a log file closed at exit."""
    if fresh:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        proc = subprocess.run([sys.executable, "-c", "from cli.main import main; main()", *args],
                              capture_output=True, text=True, cwd=cwd, env=env)
    else:
        proc = _run_in_process(args, cwd)
    if check and proc.returncode != 0:
        raise AssertionError(f"recap {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def _run_in_process(args, cwd) -> subprocess.CompletedProcess:
    import io
    import logging
    import traceback
    import warnings

    import torch

    from cli.main import main

    out, err = io.StringIO(), io.StringIO()
    saved = sys.argv, sys.stdout, sys.stderr, os.getcwd(), torch.get_num_threads()
    # Warnings and library log records reach stderr as in an interpreter of its own (pytest would keep them)
    log = logging.StreamHandler(err)
    log.setLevel(logging.WARNING)
    code = 0
    try:
        sys.argv, sys.stdout, sys.stderr = ["recap", *map(str, args)], out, err
        os.chdir(cwd)
        logging.getLogger().addHandler(log)
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            warnings.showwarning = lambda message, category, filename, lineno, file=None, line=None: err.write(
                warnings.formatwarning(message, category, filename, lineno, line))
            main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
    except Exception:  # what the interpreter would print before exiting 1
        traceback.print_exc(file=err)
        code = 1
    finally:
        logging.getLogger().removeHandler(log)
        sys.argv, sys.stdout, sys.stderr = saved[:3]
        os.chdir(saved[3])
        torch.set_num_threads(saved[4])
    return subprocess.CompletedProcess(["recap", *map(str, args)], code, out.getvalue(), err.getvalue())


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> Path:
    """The synthetic `tiny` corpus, generated once per test session."""
    import synth

    out = tmp_path_factory.mktemp("corpus") / "tiny"
    synth.generate("tiny", out, seed=0)
    return out


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models: thread hand-offs cost more than the math (100x on a busy 2-core machine)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def captioned_store(base: Path, corpus: Path) -> Store:
    """A real store under `base`: the corpus ingested, a tiny dual encoder pretrained one epoch, its features,
    every level captioned by tiny random checkpoints (sampled, so captions differ), the settings in the store's
    recap.toml (commands need only --store)."""
    import io

    from _checkpoints import tiny_checkpoint
    from pipeline.config import load_config, record_settings
    from pipeline.dag import build_stages
    from pipeline.ingest import ingest_hcap
    from pipeline.pretrain import latest_encoder, pretrain
    from pipeline.runner import run_stage
    from store import LEVELS

    quiet = io.StringIO()
    store = Store(base / "store")
    ingest_hcap(store, str(corpus), str(corpus / "videos"))
    settings = {"size": "tiny", "epochs": 1, "text_epochs": 1, "batch_size": 16, "lr": 1e-3}
    pretrain(load_config(store=store.root, pretrain=settings), store, stream=quiet)
    checkpoints = {level: str(tiny_checkpoint(base / level, level)) for level in LEVELS}
    config = load_config(store=store.root, windows={"segment_s": 24.0},
                         features={"encoder": "tsf-tiny", "batch_size": 8, "checkpoint": latest_encoder(store)},
                         captions={f"{k}_checkpoint": v for k, v in checkpoints.items()} | {"method": "sample"})
    record_settings(config, stream=quiet)
    for stage in build_stages(config, store):
        assert run_stage(stage, store, executor="local", stream=quiet).failed == 0
    return store


def kill_at_first_epoch(proc: subprocess.Popen, run_dir: Path, log: Path, timeout_s: float) -> list[str]:
    """SIGKILL a training command as soon as its first epoch folder appears; the epoch folders left."""
    import signal
    import time

    deadline = time.monotonic() + timeout_s
    while not any(run_dir.glob("epoch-*")):
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return sorted(p.name for p in run_dir.glob("epoch-*"))
