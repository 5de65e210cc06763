import errno
import io
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from multiprocessing import get_context
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pytest

from store import (CAPTION_SCHEMA, FeatureSet, Store, captions_rel, check_name, locks, read_captions,
                   video_id_for)

from conftest import REPO


def caption_table(vid: str, n: int, fp: str) -> pa.Table:
    return pa.Table.from_pylist([
        {"video_id": vid, "level": "clip", "start_s": 4.0 * k, "end_s": 4.0 * k + 4, "text": f"#C C {fp} {k}",
         "score": 0.0, "fingerprint": fp} for k in range(n)], schema=CAPTION_SCHEMA)


def commit_captions(store: Store, vid: str, n: int, fp: str) -> bool:
    rel = captions_rel("clip", "v1", vid)
    return store.commit("captions", "v1", vid, fp, {rel: store.stage_table(rel, caption_table(vid, n, fp))})


def test_commit_writes_marker_last_and_skips_same_fingerprint(store):
    assert commit_captions(store, "vid", 3, "fpA")
    marker = store.marker("captions", "v1", "vid")
    assert marker["fingerprint"] == "fpA" and marker["outputs"] == ["captions/clip/v1/vid.parquet"]
    assert not commit_captions(store, "vid", 3, "fpA")  # same fingerprint: the first commit stands
    assert read_captions(store, "clip", "v1").num_rows == 3
    assert not [n for n in os.listdir(store.abs("captions/clip/v1")) if n.startswith(".tmp")]


def test_fingerprint_change_supersedes_and_never_mixes(store):
    commit_captions(store, "vid", 3, "fpA")
    assert commit_captions(store, "vid", 5, "fpB")
    table = read_captions(store, "clip", "v1")
    assert table.num_rows == 5 and set(table["fingerprint"].to_pylist()) == {"fpB"}
    kept = store.read_table("superseded/fpA/captions/clip/v1/vid.parquet")
    assert kept.num_rows == 3 and set(kept["fingerprint"].to_pylist()) == {"fpA"}


def test_partial_output_without_marker_is_overwritten(store):
    rel = captions_rel("clip", "v1", "vid")
    store.write_table(rel, caption_table("vid", 7, "stale"))  # as if killed between rename and marker
    assert not store.is_done("captions", "v1", "vid", "fpA")
    assert commit_captions(store, "vid", 2, "fpA")
    assert read_captions(store, "clip", "v1", "vid")["fingerprint"].to_pylist() == ["fpA", "fpA"]


def test_sigkill_at_random_moments_loses_nothing_and_duplicates_nothing(tmp_path):
    root, n_units = str(tmp_path / "store"), 40
    cmd = [sys.executable, str(REPO / "tests" / "_commit_worker.py"), root, str(n_units)]
    rng = random.Random(7)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    kills = 0
    for _ in range(8):
        proc = subprocess.Popen(cmd, env=env)
        time.sleep(rng.uniform(0.3, 1.2))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
    subprocess.run(cmd, env=env, check=True)
    assert kills >= 1
    store = Store(root)
    table = read_captions(store, "clip", "v1")
    counts = {}
    for vid in table["video_id"].to_pylist():
        counts[vid] = counts.get(vid, 0) + 1
    assert counts == {f"video{i:03d}": 50 + i for i in range(n_units)}
    for i in range(n_units):
        assert store.is_done("captions", "v1", f"video{i:03d}", f"fp{i}")


def _commit_same_unit(root, barrier, results):
    store = Store(root)
    rel = captions_rel("clip", "v1", "vid")
    tmp = store.stage_table(rel, caption_table("vid", 4, "fpA"))
    barrier.wait()
    results.put(store.commit("captions", "v1", "vid", "fpA", {rel: tmp}))


def test_concurrent_commit_of_one_unit_one_wins(tmp_path):
    root = str(tmp_path / "store")
    Store(root)
    ctx = get_context("spawn")
    for _ in range(3):
        barrier, results = ctx.Barrier(4), ctx.Queue()
        procs = [ctx.Process(target=_commit_same_unit, args=(root, barrier, results)) for _ in range(4)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(60)
        outcomes = [results.get(timeout=5) for _ in procs]
        store = Store(root)
        assert outcomes.count(True) <= 1
        assert read_captions(store, "clip", "v1").num_rows == 4
        assert os.listdir(store.abs("captions/clip/v1")) == ["vid.parquet"]  # no temporaries left
        store.remove("markers")
        store.remove("captions")


def test_stale_lock_of_killed_process_is_broken(store):
    path = store.abs("locks/x.lock")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    proc.kill()
    proc.wait()
    with open(path, "w") as f:
        f.write(f'{{"host": "{os.uname().nodename}", "pid": {proc.pid}, "t": {time.time()}}}')
    with store.lock("x", timeout_s=5):
        assert os.path.exists(path)
    assert not os.path.exists(path)


def test_a_lock_seen_before_its_owner_wrote_it_is_not_broken(store):
    # What a reader saw when the owner was preempted between creating the lock and writing its name
    # (CI once had two processes commit one unit this way).
    path = store.abs("locks/x.lock")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    open(path, "wb").close()
    with pytest.raises(TimeoutError):
        with store.lock("x", timeout_s=0.5):
            pass
    assert os.path.exists(path)
    old = time.time() - 60
    os.utime(path, (old, old))  # left empty for a minute: its owner died, so it is broken
    with store.lock("x", timeout_s=5):
        pass
    assert os.listdir(os.path.dirname(path)) == []


def _plant_lock(path, age_s=0.0, **owner):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"host": socket.gethostname(), **owner}, f)
    then = time.time() - age_s
    os.utime(path, (then, then))


def _owned_by(pid):
    boot, pidns = locks._process_space()
    return dict(boot=boot, pidns=pidns, pid=pid, start=locks._start(pid))


@pytest.fixture
def live_pid():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc.pid
    proc.kill()
    proc.wait()


def test_a_live_owner_on_this_host_is_never_broken_however_long_it_holds(store, live_pid):
    path = store.abs("locks/x.lock")
    _plant_lock(path, 10 * 3600, **_owned_by(live_pid))
    with pytest.raises(TimeoutError):
        with store.lock("x", timeout_s=0.3):
            pass
    assert json.load(open(path))["pid"] == live_pid


@pytest.mark.parametrize("gone", ["reused pid", "zombie", "earlier boot"])
def test_a_lock_whose_owner_is_gone_is_taken_over(store, live_pid, gone):
    path = store.abs("locks/x.lock")
    owner = _owned_by(live_pid)
    zombie = None
    if gone == "reused pid":
        owner["start"] = "-1"  # the pid now runs another process
    elif gone == "zombie":
        zombie = subprocess.Popen([sys.executable, "-c", "pass"])
        while locks._stat(zombie.pid)[0] != "Z":  # exited, not yet reaped
            time.sleep(0.01)
        owner = _owned_by(zombie.pid)
    else:
        owner["boot"] = "another-boot"
    _plant_lock(path, **owner)
    with store.lock("x", timeout_s=5):
        assert json.load(open(path))["pid"] == os.getpid()
    assert not os.path.exists(path)
    if zombie:
        zombie.wait()


def test_a_lock_from_another_pid_namespace_is_held_until_stale(store):
    # Containers that share the host's name but not its pids: a pid there says nothing here.
    path = store.abs("locks/x.lock")
    _plant_lock(path, **_owned_by(_dead_pid()) | dict(pidns=1, start="1"))
    with pytest.raises(TimeoutError):
        with store.lock("x", timeout_s=0.3):
            pass
    old = time.time() - store.LOCK_STALE_S - 1
    os.utime(path, (old, old))
    with store.lock("x", timeout_s=5):
        pass


def test_release_leaves_a_claim_that_another_process_holds(store, live_pid):
    path = store.abs("claims/s/v1/u.json")
    _plant_lock(path, **_owned_by(live_pid))
    assert not store.claim("s", "v1", "u")
    store.release("s", "v1", "u")
    assert json.load(open(path))["pid"] == live_pid
    os.remove(path)
    assert store.claim("s", "v1", "u")
    _plant_lock(path, 3600, **_owned_by(live_pid))  # taken over meanwhile
    store.touch_claims()
    assert time.time() - os.path.getmtime(path) > 3000  # no heartbeat for another's claim
    store.release("s", "v1", "u")
    assert json.load(open(path))["pid"] == live_pid
    os.remove(path)
    assert store.claim("s", "v1", "u")
    store.release("s", "v1", "u")
    assert not os.path.exists(path)


def test_a_breaker_does_not_replace_the_lock_that_took_the_stale_one_s_place(store):
    path = store.abs("locks/x.lock")
    _plant_lock(path, pid=_dead_pid())
    now = time.time()
    judged = locks._stale_content(path, 120, now)  # one process judges it stale, and is preempted
    assert judged is not None and locks.take(path, 120)  # another replaces it and holds the lock
    mine = open(path, "rb").read()
    tmp = path + ".late"
    open(tmp, "wb").write(b'{"host": "late breaker"}')
    assert not locks._replace(path, judged, tmp, now)  # the first one resumes
    assert open(path, "rb").read() == mine and not os.path.exists(path + ".break")
    os.remove(tmp)


def test_a_dead_breaker_s_guard_does_not_block_for_long(store):
    path = store.abs("locks/x.lock")
    _plant_lock(path, pid=_dead_pid())
    _plant_lock(path + ".break", 60)
    with store.lock("x", timeout_s=5):
        assert json.load(open(path))["pid"] == os.getpid()
    assert os.listdir(os.path.dirname(path)) == []


def test_locks_on_a_filesystem_without_hard_links(store, monkeypatch):
    def no_link(src, dst):
        raise OSError(errno.EPERM, "Operation not permitted", dst)
    monkeypatch.setattr(locks.os, "link", no_link)
    with store.lock("x", timeout_s=5):
        path = store.abs("locks/x.lock")
        assert json.load(open(path))["pid"] == os.getpid()
        assert locks.take(path, 120) is None
    assert os.listdir(os.path.dirname(path)) == []


def test_claims_taken_before_a_failure_are_given_back(store, monkeypatch):
    from pipeline.runner import _claim
    stage = SimpleNamespace(name="s", version=lambda: "v1")
    units = [SimpleNamespace(id=f"u{i}", fingerprint="fp") for i in range(3)]
    calls = []

    def is_done(*args):
        calls.append(args)
        if len(calls) == 2:
            raise OSError("markers/s/v1/u1.json: unreadable")
        return False
    monkeypatch.setattr(store, "is_done", is_done)
    with pytest.raises(OSError):
        _claim(stage, store, units)
    assert store.listdir("claims/s/v1") == []
    assert _claim(stage, store, units[2:])[0] == units[2:]


def test_a_running_stage_keeps_its_claims_fresh(store, tmp_path, monkeypatch):
    from _dying_stage import ChecksItsClaimStage
    from pipeline.runner import run_stage
    monkeypatch.setattr(Store, "CLAIM_HEARTBEAT_S", 0.05)
    summary = run_stage(ChecksItsClaimStage(str(tmp_path), 2), store, executor="local", stream=io.StringIO())
    assert summary.done == 2
    ages = [float((tmp_path / f"u{i}.age").read_text()) for i in range(2)]
    assert max(ages) < 60  # made an hour old, then touched again while its unit ran
    assert store.listdir("claims/checks-its-claim/v1") == []


def _dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.mark.parametrize("bad", ["../../etc/passwd", "a/b", ".hidden", "", "x" * 300, "a..b", "con sole"])
def test_unsafe_names_are_refused(store, bad):
    with pytest.raises(ValueError):
        check_name(bad)
    with pytest.raises(ValueError):
        captions_rel("clip", "v1", bad)


@pytest.mark.parametrize("stem", ["../../etc/passwd", "my video (1)", ".hidden", "vidéo", "a/../../b", "..", ""])
def test_video_ids_are_sanitised_inside_the_store(store, stem):
    vid = video_id_for(stem, f"/data/{stem}.mp4")
    assert check_name(vid) == vid
    target = os.path.realpath(store.abs(FeatureSet(store, "f").rel(vid)))
    assert target.startswith(os.path.realpath(store.path) + os.sep)


def test_distinct_unsafe_names_get_distinct_ids():
    assert video_id_for("a b", "/x/a b.mp4") != video_id_for("a?b", "/x/a?b.mp4")
    assert video_id_for("9f1c-uuid_0") == "9f1c-uuid_0"


def test_store_path_cannot_escape(store):
    with pytest.raises(ValueError):
        store.abs("captions/../../outside")


def test_features_cls_read_does_not_touch_tokens(store):
    fs = FeatureSet(store, "tiny-1")
    n = 150
    windows = np.stack([np.arange(n) * 4.0, np.arange(n) * 4.0 + 4], 1)
    assert fs.create("vid", windows, dim=8, num_tokens=5, fingerprint="fp1", rows_per_chunk=64)
    cls = np.random.default_rng(0).standard_normal((n, 8)).astype("float16")
    fs.write("vid", 0, cls, np.zeros((n, 5, 8), "float16"))
    store.remove("features/tiny-1/vid/tokens/c")  # token chunks gone: a CLS read must not need them
    rows = np.linspace(0, n - 1, 80).astype(int)
    np.testing.assert_array_equal(fs.read_cls("vid", rows), cls[rows])
    np.testing.assert_array_equal(fs.windows("vid"), windows)
    assert not fs.create("vid", windows, 8, 5, "fp1")  # same fingerprint: untouched
    assert fs.create("vid", windows, 8, None, "fp2")  # changed: old group kept under superseded/
    assert store.exists("superseded/fp1/features/tiny-1/vid/cls/zarr.json")
    assert fs.info("vid")["fingerprint"] == "fp2"


def test_fsspec_url_root(tmp_path):
    store = Store(f"file://{tmp_path}/remote-like")
    commit_captions(store, "vid", 2, "fpA")
    assert read_captions(store, "clip", "v1").num_rows == 2


def test_commit_on_an_object_store_root():
    """A non-local fsspec root (memory://) takes the object-store branch: no rename, no lock file."""
    import uuid

    store = Store(f"memory://recap-{uuid.uuid4().hex[:8]}")
    assert not store.local
    assert commit_captions(store, "vid", 2, "fpA")
    assert not commit_captions(store, "vid", 2, "fpA")  # same fingerprint: nothing moves
    assert commit_captions(store, "vid", 3, "fpB")  # changed: the old table is kept aside
    assert read_captions(store, "clip", "v1").num_rows == 3
    assert store.exists(f"superseded/fpA/{captions_rel('clip', 'v1', 'vid')}")
    assert store.marker("captions", "v1", "vid")["fingerprint"] == "fpB"
    assert not store.exists("locks") and not [p for p in store.fs.find(store.path) if "/.tmp-" in p]
