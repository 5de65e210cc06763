"""Small stages for the runner's tests: a worker that dies (Ray retries), fails setup, writes files, checks its claim."""

import os
import time
from pathlib import Path

from stages.base import Resources, Stage, Unit


class DiesOnceStage(Stage):
    name = "dies-once"
    resources = Resources(cpus=0.5, memory_gb=0)

    def __init__(self, scratch: str, n: int, dying: tuple[str, ...] | None = None):
        self.scratch, self.n = Path(scratch), n
        self.dying = dying  # the units whose first attempt kills the worker; None: all

    def version(self) -> str:
        return "v1"

    def plan(self, store):
        return [Unit(id=f"u{i}", video_id=f"u{i}", fingerprint="fp") for i in range(self.n)]

    def process(self, unit, store):
        attempt = self.scratch / f"{unit.id}.attempted"
        if not attempt.exists() and (self.dying is None or unit.id in self.dying):
            attempt.touch()
            os._exit(1)  # the worker process dies mid-task
        store.commit(self.name, "v1", unit.id, "fp", {}, {"pid": os.getpid()})
        return {}


class SetupFailsStage(DiesOnceStage):
    name = "setup-fails"

    def setup(self):
        raise OSError("checkpoint /nowhere/model.pt: not found")


class WritesStage(DiesOnceStage):
    """Each unit stages a 4 KiB file and commits it (for the full-disk test on an fsspec root)."""

    name = "writes"

    def process(self, unit, store):
        store.write_bytes(f"out/.tmp-{unit.id}", bytes(4096))
        store.commit(self.name, "v1", unit.id, "fp", {f"out/{unit.id}.bin": f"out/.tmp-{unit.id}"})
        return {}


class ChecksItsClaimStage(DiesOnceStage):
    """Makes its claim look an hour old, waits, and writes down how old it is then (the heartbeat test)."""

    name = "checks-its-claim"

    def process(self, unit, store):
        path = store.abs(f"claims/{self.name}/v1/{unit.id}.json")
        hour_ago = time.time() - 3600
        os.utime(path, (hour_ago, hour_ago))
        time.sleep(0.5)
        (self.scratch / f"{unit.id}.age").write_text(str(time.time() - os.path.getmtime(path)))
        store.commit(self.name, "v1", unit.id, "fp", {})
        return {}
