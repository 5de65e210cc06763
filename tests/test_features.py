import os
import random
import signal
import subprocess
import sys
import time
from fractions import Fraction

import av
import numpy as np
import pytest

from pipeline.config import load_config
from pipeline.ingest import ingest
from pipeline.runner import run_stage
from stages.base import SetupFailed
from stages.decode import WindowReader, frame_indices, sample_times, window_times
from pipeline.dag import features_stage
from stages.features import FeaturesStage
from store import Store

from conftest import REPO, run_cli, write_video

FIXTURE_CKPT = REPO / "tests" / "data" / "reference" / "tiny_clip_checkpoint.pt"


def write_indexed_video(path, pts_ms, size=(64, 48)):
    """Frame i is uniformly grey at 20*i, shown from pts_ms[i]: its index is readable from its pixels."""
    w, h = size
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.codec_context.time_base = stream.time_base = Fraction(1, 1000)
        for i, t in enumerate(pts_ms):
            frame = av.VideoFrame.from_ndarray(np.full((h, w, 3), 20 * i, np.uint8), format="rgb24")
            frame.pts, frame.time_base = t, Fraction(1, 1000)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def tiny_stage(**features) -> FeaturesStage:
    cfg = load_config(features={"encoder": "tsf-tiny", "batch_size": 4, "chunk_windows": 8, "rows_per_chunk": 4,
                                **features})
    return features_stage(cfg)


def test_windows_and_frames_hand_computed():
    np.testing.assert_array_equal(window_times(10.0), [[0, 4], [4, 8], [8, 10]])
    np.testing.assert_array_equal(window_times(8.0), [[0, 4], [4, 8]])
    np.testing.assert_array_equal(window_times(2.5), [[0, 2.5]])  # shorter than a window: still one
    # Segments: a tail under half a window joins the last one; a longer tail keeps its own window.
    np.testing.assert_array_equal(window_times(98.0, 32.0, 0.5), [[0, 32], [32, 64], [64, 98]])
    np.testing.assert_array_equal(window_times(82.0, 32.0, 0.5), [[0, 32], [32, 64], [64, 82]])
    np.testing.assert_array_equal(window_times(10.0, 32.0, 0.5), [[0, 10]])
    times = sample_times(window_times(10.0), 4)
    np.testing.assert_allclose(times[0], [0.5, 1.5, 2.5, 3.5])
    np.testing.assert_allclose(times[2], [8.25, 8.75, 9.25, 9.75])  # clipped last window: midpoints of 2 s
    starts = np.arange(100) / 10.0  # 10 fps
    np.testing.assert_array_equal(frame_indices(times, starts)[2], [82, 87, 92, 97])


def test_reader_picks_the_frames_shown_at_each_time_variable_frame_rate(tmp_path):
    pts = [0, 100, 200, 300, 1000, 1100, 1200, 2500, 2600, 3900]  # gaps: variable frame rate
    path = write_indexed_video(tmp_path / "vfr.mp4", pts)
    windows = np.array([[0.0, 4.0]])  # samples at 0.5, 1.5, 2.5, 3.5 s
    reader = WindowReader(str(path), 32, 4, windows)
    frames = reader.read(0, 1)
    assert frames.shape == (1, 4, 32, 32, 3) and frames.dtype == np.uint8
    shown = [round(frames[0, j].mean() / 20) for j in range(4)]
    assert shown == [3, 6, 7, 8]  # frames starting at 0.3, 1.2, 2.5, 2.6 s


def test_stage_shapes_windows_and_tokens(store, tmp_path):
    write_video(tmp_path / "v" / "ten.mp4", seconds=10, fps=10, size=(96, 64))
    write_video(tmp_path / "v" / "short.mp4", seconds=2, fps=8, size=(75, 41))  # odd sizes, < one window
    ingest(store, [str(tmp_path / "v")])
    stage = tiny_stage()
    summary = run_stage(stage, store, executor="local")
    assert (summary.done, summary.failed) == (2, 0)
    fs = stage.feature_set(store)
    np.testing.assert_array_equal(fs.windows("ten"), [[0, 4], [4, 8], [8, 10]])
    assert fs.read_cls("ten").shape == (3, 64) and fs.read_tokens("ten", slice(None)).shape == (3, 17, 64)
    np.testing.assert_array_equal(fs.read_tokens("ten", slice(None))[:, 0], fs.read_cls("ten"))
    assert fs.read_cls("short").shape == (1, 64) and np.isfinite(fs.read_cls("short").astype(float)).all()
    assert len(set(map(tuple, fs.read_cls("ten").tolist()))) == 3  # windows differ

    again = run_stage(stage, store, executor="local")
    assert (again.done, again.skipped) == (0, 2)


def test_reader_reused_across_chunks_in_any_order_gives_the_same_arrays(tmp_path):
    write_video(tmp_path / "v" / "long.mp4", seconds=60, fps=8, size=(64, 48))  # 15 windows: 4 chunks of 4
    stores = [Store(tmp_path / "reused"), Store(tmp_path / "fresh")]
    for s in stores:
        ingest(s, [str(tmp_path / "v")])
    reused = tiny_stage(chunk_windows=4)
    units = reused.plan(stores[0])
    reused.prepare(stores[0], units)
    opened = []
    for unit in [units[i] for i in (2, 3, 0, 1)]:  # forward across keyframes, then backward
        reused.process(unit, stores[0])
        opened.append(reused._reader[1])
    assert all(r is opened[0] for r in opened)  # one reader for the whole video
    for unit in units:
        fresh = tiny_stage(chunk_windows=4)
        fresh.prepare(stores[1], [unit])
        fresh.process(unit, stores[1])
    a, b = (reused.feature_set(s) for s in stores)
    np.testing.assert_array_equal(a.read_cls("long"), b.read_cls("long"))
    np.testing.assert_array_equal(a.read_tokens("long", slice(None)), b.read_tokens("long", slice(None)))


def test_no_tokens_is_another_feature_set(store, tmp_path):
    write_video(tmp_path / "v" / "a.mp4", seconds=5)
    ingest(store, [str(tmp_path / "v")])
    with_tokens, without = tiny_stage(), tiny_stage(tokens=False)
    assert with_tokens.version() != without.version()
    run_stage(without, store, executor="local")
    with pytest.raises(FileNotFoundError, match="no tokens stored"):
        without.feature_set(store).read_tokens("a", slice(None))


def test_official_checkpoint_loads_strictly_and_bad_one_fails_once(store, tmp_path):
    write_video(tmp_path / "v" / "a.mp4", seconds=5)
    ingest(store, [str(tmp_path / "v")])
    stage = tiny_stage(checkpoint=str(FIXTURE_CKPT))
    assert run_stage(stage, store, executor="local").done == 1  # 2 windows: one unit
    assert stage.version() != tiny_stage().version()  # weights are part of the version

    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    proc = run_cli("features", "--store", store.root, "--encoder", "tsf-tiny", "--checkpoint", str(bad), "--local")
    assert proc.returncode == 2 and "bad.pth" in proc.stderr and "not a loadable checkpoint" in proc.stderr
    proc = run_cli("features", "--store", store.root, "--encoder", "tsf-base", "--checkpoint", str(FIXTURE_CKPT),
                   "--local")
    assert proc.returncode == 2 and "shape mismatches" in proc.stderr


def test_bad_files_fail_alone_and_the_batch_goes_on(store, tmp_path):
    for name in ("good", "vanishes", "corrupted"):
        write_video(tmp_path / "v" / f"{name}.mp4", seconds=5)
    ingest(store, [str(tmp_path / "v")])
    (tmp_path / "v" / "vanishes.mp4").unlink()
    data = (tmp_path / "v" / "corrupted.mp4").read_bytes()
    (tmp_path / "v" / "corrupted.mp4").write_bytes(data[:200] + b"\x00" * (len(data) - 200))
    summary = run_stage(tiny_stage(), store, executor="local")
    assert summary.done == 1 and summary.failed == 2  # one unit per 5-s video
    messages = {f["video_id"]: f["message"] for f in summary.failures}
    assert set(messages) == {"vanishes", "corrupted"}
    assert all(m.startswith(str(tmp_path / "v")) and "\n" not in m for m in messages.values())
    assert tiny_stage().complete_videos(store) == {"good"}


def _features_cmd(root, config):
    return [sys.executable, "-c", "from cli.main import main; main()", "features", "--store", root,
            "--config", str(config), "--local"]


def test_killed_run_resumes_to_the_same_arrays(tmp_path):
    write_video(tmp_path / "v" / "long.mp4", seconds=240, fps=8, size=(96, 64))  # 60 windows: 15 units
    config = tmp_path / "recap.toml"
    config.write_text('[features]\nencoder = "tsf-tiny"\nbatch_size = 4\nchunk_windows = 4\nrows_per_chunk = 4\n')
    roots = [str(tmp_path / "killed"), str(tmp_path / "clean")]
    for root in roots:
        assert run_cli("ingest", str(tmp_path / "v"), "--store", root).returncode == 0
    version = tiny_stage(chunk_windows=4).version()
    killed = Store(roots[0])
    rng = random.Random(3)
    killed_mid_run = 0
    for _ in range(4):  # each run commits 1-3 more units, then dies at a random moment after that
        target = min(len(killed.markers("features", version)) + rng.randint(1, 3), 14)
        proc = subprocess.Popen(_features_cmd(roots[0], config), cwd=REPO, stderr=subprocess.DEVNULL)
        while proc.poll() is None and len(killed.markers("features", version)) < target:
            time.sleep(0.005)
        time.sleep(rng.uniform(0, 0.03))
        killed_mid_run += proc.poll() is None
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert killed_mid_run >= 3
    for root in roots:
        subprocess.run(_features_cmd(root, config), cwd=REPO, check=True, capture_output=True)
    stage = tiny_stage(chunk_windows=4)
    a, b = (stage.feature_set(Store(r)) for r in roots)
    np.testing.assert_array_equal(a.read_cls("long"), b.read_cls("long"))
    np.testing.assert_array_equal(a.read_tokens("long", slice(None)), b.read_tokens("long", slice(None)))
    assert len(Store(roots[0]).markers("features", stage.version())) == 15


@pytest.fixture(scope="module")
def ray_local():
    import ray

    os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO / "tests"), str(REPO), os.environ.get("PYTHONPATH", "")])
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    yield ray
    ray.shutdown()


def test_ray_run_matches_local_run(ray_local, tmp_path):
    write_video(tmp_path / "v" / "a.mp4", seconds=40, fps=8)
    write_video(tmp_path / "v" / "b.mp4", seconds=9, fps=8)
    stores = [Store(tmp_path / "ray"), Store(tmp_path / "local")]
    for s in stores:
        ingest(s, [str(tmp_path / "v")])
    ray_summary = run_stage(tiny_stage(), stores[0], executor="ray", workers=2)
    run_stage(tiny_stage(), stores[1], executor="local")
    assert (ray_summary.done, ray_summary.failed) == (3, 0)  # a: 10 windows = 2 chunks, b: 1
    for vid in ("a", "b"):
        np.testing.assert_array_equal(*(tiny_stage().feature_set(s).read_cls(vid) for s in stores))


def test_ray_retries_a_task_whose_worker_dies(ray_local, tmp_path, store):
    from _dying_stage import DiesOnceStage

    stage = DiesOnceStage(str(tmp_path), n=3)
    summary = run_stage(stage, store, executor="ray", workers=2, max_retries=2)
    assert (summary.done, summary.failed) == (3, 0)
    assert all((tmp_path / f"u{i}.attempted").exists() for i in range(3))  # each died once, then succeeded


def test_without_retries_only_the_unit_a_worker_died_on_fails(ray_local, tmp_path, store):
    from _dying_stage import DiesOnceStage

    stage = DiesOnceStage(str(tmp_path), n=3, dying=("u0",))
    summary = run_stage(stage, store, executor="ray", workers=1, max_retries=0)
    assert (summary.done, summary.failed) == (2, 1)  # u1, queued behind u0 on the same worker, is not charged
    [failure] = summary.failures
    assert failure["unit"] == "u0" and "worker process died 1 time(s)" in failure["message"]


def test_a_stage_whose_setup_fails_on_ray_stops_with_its_error(ray_local, tmp_path, store):
    from _dying_stage import SetupFailsStage

    with pytest.raises(SetupFailed, match=r"could not set the stage up: OSError: checkpoint /nowhere/model.pt"):
        run_stage(SetupFailsStage(str(tmp_path), n=2), store, executor="ray", workers=1)


def rotate_90_in_container(path):
    """Set the track's display matrix to a 90-degree rotation, as phones record portrait video."""
    import struct

    data = bytearray(path.read_bytes())
    tkhd = data.index(b"tkhd") + 4
    assert data[tkhd] == 0  # version 0 box: the matrix sits 40 bytes in
    fixed = [struct.pack(">i", v * 65536) for v in (0, 1, 0, -1, 0, 0, 0, 0)]
    data[tkhd + 40:tkhd + 76] = b"".join(fixed) + struct.pack(">I", 0x40000000)
    path.write_bytes(data)


def test_rotated_video_comes_out_upright(tmp_path):
    path = tmp_path / "portrait.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 32, "yuv420p"
        for _ in range(10):
            img = np.zeros((32, 64, 3), np.uint8)
            img[:, 16:32] = 255  # stored left-of-centre band: upright, the top half of the centre crop
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    rotate_90_in_container(path)
    frame = WindowReader(str(path), 16, 1, np.array([[0.0, 1.0]])).read(0, 1)[0, 0, :, :, 0].astype(float)
    rows = frame.mean(axis=1)
    assert rows[:6].min() > 200 and rows[-6:].max() < 40  # horizontal band on top: upright
