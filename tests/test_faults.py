"""Faults, with real files and real processes: two runs on one store, a full disk (a tmpfs where the machine
lets us mount one; an fsspec filesystem with a byte budget everywhere), a read-only store, a VideoPrism checkpoint
folder, temporaries of killed runs, a Ray worker killed in each caption stage."""

import errno
import io
import os
import re
import shutil
import subprocess
import sys

import fsspec
import numpy as np
import pytest
from fsspec.implementations.memory import MemoryFileSystem

from pipeline.config import load_config, settle
from pipeline.dag import features_stage
from pipeline.ingest import ingest_hcap
from pipeline.run import run_all
from pipeline.runner import run_stage
from store import FeatureSet, Store, read_captions

from _checkpoints import tiny_checkpoint
from conftest import REPO, run_cli

FEATURES = ("features", "--encoder", "tsf-tiny", "--batch-size", "8", "--local")


@pytest.fixture(scope="module")
def ingested(tmp_path_factory, tiny_corpus):
    root = tmp_path_factory.mktemp("faults") / "store"
    ingest_hcap(Store(root), str(tiny_corpus), str(tiny_corpus / "videos"))
    return root


def _popen(*args):
    return subprocess.Popen([sys.executable, "-c", "from cli.main import main; main()", *args], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _done(stderr: str, stage: str) -> int:
    return int(re.search(rf"\[{stage}\] done (\d+),", stderr).group(1))


def test_two_runs_at_once_finish_and_do_each_unit_once(ingested, tmp_path):
    """One try here; `bench/concurrent_runs.py` makes ten per stage."""
    store = Store(shutil.copytree(ingested, tmp_path / "s"))
    units = len(features_stage(load_config(features={"encoder": "tsf-tiny"})).plan(store))
    runs = [_popen(*FEATURES, "--store", store.root) for _ in range(2)]
    outs = [run.communicate(timeout=600) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], [err for _, err in outs]
    assert sum(_done(err, "features") for _, err in outs) == units  # each unit done once, by one of them
    assert len(store.listdir(f"markers/features/{store.listdir('features')[0]}")) == units
    assert not [p for p in (tmp_path / "s").rglob(".tmp-*")]

    alone = Store(shutil.copytree(ingested, tmp_path / "alone"))
    run_cli(*FEATURES, "--store", alone.root, check=True)
    name = store.listdir("features")[0]
    for video in FeatureSet(alone, name).videos():
        np.testing.assert_array_equal(FeatureSet(store, name).read_cls(video, slice(None)),
                                      FeatureSet(alone, name).read_cls(video, slice(None)))


def test_two_caption_runs_at_once(ingested, tmp_path):
    store = Store(shutil.copytree(ingested, tmp_path / "s"))
    run_cli(*FEATURES, "--store", store.root, check=True)
    clip = str(tiny_checkpoint(tmp_path / "clip", "clip"))
    runs = [_popen("captions", "--store", store.root, "--checkpoint", clip, "--local") for _ in range(2)]
    outs = [run.communicate(timeout=600) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], [err for _, err in outs]
    assert sum(_done(err, "captions") for _, err in outs) == 6
    assert sum(len(store.listdir(f"captions/clip/{v}")) for v in store.listdir("captions/clip")) == 6


@pytest.fixture
def tmpfs(tmp_path):
    """A real small filesystem: a tmpfs, where the machine lets us mount one."""
    mount = tmp_path / "mnt"
    mount.mkdir()
    mounted = []

    def make(size: str) -> str:
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)], capture_output=True)
        if proc.returncode:
            pytest.skip("mounting a tmpfs needs root (or CAP_SYS_ADMIN) on this machine")
        mounted.append(mount)
        return str(mount)

    yield make
    for m in mounted:
        subprocess.run(["umount", "-l", str(m)], capture_output=True)


def test_a_full_disk_fails_units_one_line_each_and_the_batch_goes_on(ingested, tmpfs):
    root = tmpfs("2m")
    shutil.copytree(ingested, f"{root}/store")
    free = os.statvfs(root).f_bavail * os.statvfs(root).f_frsize
    with open(f"{root}/filler", "wb") as f:  # room for the arrays and a few units, not for all of them
        f.write(b"\0" * max(0, free - (160 << 10)))
    proc = run_cli(*FEATURES, "--store", f"{root}/store")
    assert proc.returncode == 1, proc.stderr[-2000:]
    failed = [line for line in proc.stderr.splitlines() if ": FAILED " in line]
    assert failed and all("No space left on device" in line for line in failed), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and f"failed {len(failed)}" in proc.stderr
    assert _done(proc.stderr, "features") + len(failed) == 6  # every unit was tried
    assert not [p for p in Store(f"{root}/store").fs.find(f"{root}/store") if "/.tmp-" in p]


class FullMemoryFileSystem(MemoryFileSystem):
    """fsspec's memory filesystem with a byte budget: a write past it raises ENOSPC, as a full disk does.
    The full-disk fault for machines that cannot mount a tmpfs; it takes the store's object-store branch."""

    protocol = "fullmem"
    bytes_left = 0

    @classmethod
    def _strip_protocol(cls, path):
        return super()._strip_protocol(path.removeprefix("fullmem://"))

    def _open(self, path, mode="rb", **kwargs):
        f = super()._open(path, mode, **kwargs)
        if "r" not in mode:
            write = f.write

            def limited(data):
                if len(data) > FullMemoryFileSystem.bytes_left:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
                FullMemoryFileSystem.bytes_left -= len(data)
                return write(data)

            f.write = limited
        return f


def test_a_full_fsspec_store_fails_units_one_line_each_and_the_batch_goes_on(tmp_path):
    from _dying_stage import WritesStage

    fsspec.register_implementation("fullmem", FullMemoryFileSystem, clobber=True)
    store = Store(f"fullmem://full-{tmp_path.name}")
    FullMemoryFileSystem.bytes_left = 3 * 4096 + 1200  # three units' files and markers, one failure record
    lines = io.StringIO()
    summary = run_stage(WritesStage(str(tmp_path), n=6), store, executor="local", stream=lines)
    failed = [line for line in lines.getvalue().splitlines() if ": FAILED " in line]
    assert summary.done >= 1 and summary.done + summary.failed == 6  # every unit was tried
    assert len(failed) == summary.failed and all("No space left on device" in line for line in failed)
    recorded = {f["unit"] for f in store.failures("writes", "v1")}
    assert recorded and len(recorded) < len(failed)  # until the disk had no room left for them either:
    assert all(("no failure record" in line) != (line.split()[1][:-1] in recorded) for line in failed)
    assert not [p for p in store.fs.find(store.path) if "/.tmp-" in p]


def test_a_read_only_store_is_a_one_line_error(ingested, tiny_corpus, tmpfs, tmp_path):
    root = tmpfs("8m")
    shutil.copytree(ingested, f"{root}/store")
    subprocess.run(["mount", "-o", "remount,ro", root], check=True)
    assert "ingest" in run_cli("status", "--store", f"{root}/store", check=True).stdout  # reading works
    new_video = tmp_path / "new_video.mp4"
    shutil.copy(next((tiny_corpus / "videos").iterdir()), new_video)
    for args in (("ingest", str(new_video)), FEATURES):
        proc = run_cli(*args, "--store", f"{root}/store")
        assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0, proc.stderr[-2000:]
        assert proc.stderr.startswith("error: ") and "Read-only file system" in proc.stderr


def test_features_from_a_videoprism_checkpoint_folder(ingested, tmp_path):
    from models.encoders import build_encoder

    folder = tmp_path / "vp"
    build_encoder("videoprism-tiny", seed=3).model.save_pretrained(folder)
    store = Store(shutil.copytree(ingested, tmp_path / "s"))
    proc = run_cli("features", "--encoder", "videoprism-tiny", "--checkpoint", str(folder), "--local",
                   "--store", store.root)
    assert proc.returncode == 0 and _done(proc.stderr, "features") > 0, proc.stderr[-2000:]
    (folder / "config.json").write_text((folder / "config.json").read_text() + "\n")  # another file, another version
    other = run_cli("run", "--dry-run", "--store", store.root, check=True).stdout
    assert store.listdir("features")[0] not in other


def test_old_temporaries_of_killed_runs_are_removed_and_fresh_ones_kept(ingested, tmp_path):
    import os
    import time

    store = Store(shutil.copytree(ingested, tmp_path / "s"))
    version = features_stage(load_config(features={"encoder": "tsf-tiny"})).version()
    old, fresh = (store.abs(f"features/{version}/.tmp-{n}") for n in ("old-video-0a1b", "fresh-video-2c3d"))
    marker = store.abs(f"markers/features/{version}/.tmp-unit.json-0a1b")
    for path in (old, fresh):
        os.makedirs(path)
    os.makedirs(os.path.dirname(marker))
    open(marker, "w").close()
    for path in (old, marker):
        os.utime(path, (time.time() - 2 * 3600,) * 2)  # a run killed two hours ago
    run_cli(*FEATURES, "--store", store.root, check=True)
    assert not os.path.exists(old) and not os.path.exists(marker)
    assert os.path.exists(fresh)  # could be a live writer's


def _kill_one_worker(proc: subprocess.Popen, deadline_s: float = 300.0) -> bool:
    """SIGKILL the first Ray stage worker (`ray::StageWorker`) that shows up while `proc` runs."""
    import time

    import psutil

    end = time.monotonic() + deadline_s
    while proc.poll() is None and time.monotonic() < end:
        for p in psutil.process_iter(["cmdline"]):
            if any("StageWorker" in part for part in (p.info["cmdline"] or [])):
                p.kill()
                return True
        time.sleep(0.05)
    return False


def test_a_worker_killed_in_each_caption_stage_is_retried_to_the_same_tables(ingested, tmp_path):
    ray_store = Store(shutil.copytree(ingested, tmp_path / "ray"))
    run_cli(*FEATURES, "--store", ray_store.root, check=True)
    local_store = Store(shutil.copytree(ray_store.root, tmp_path / "local"))
    settings = "[windows]\nsegment_s = 24.0\n[captions]\n" + "".join(
        f'{level}_checkpoint = "{tiny_checkpoint(tmp_path / level, level)}"\n' for level in ("clip", "segment", "video"))
    for store in (ray_store, local_store):
        with open(f"{store.root}/recap.toml", "a") as f:
            f.write(settings)
    run_all(settle(local_store.root, record=False), local_store, local=True, evaluate=False)  # the reference
    for stage, level in (("captions", "clip"), ("segments", "segment"), ("summaries", "video")):
        run = _popen(stage, "--store", ray_store.root, "--workers", "2")
        assert _kill_one_worker(run), f"no {stage} worker seen"
        _, err = run.communicate(timeout=600)
        assert run.returncode == 0 and _done(err, stage) == 6, err[-2000:]
        [version] = ray_store.listdir(f"captions/{level}")
        assert version in local_store.listdir(f"captions/{level}")
        rows = [read_captions(s, level, version).sort_by([("video_id", "ascending"), ("start_s", "ascending")])
                .to_pylist() for s in (ray_store, local_store)]
        assert rows[0] == rows[1]
