"""The stage contract: a stage turns committed inputs into committed outputs, one unit at a time."""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

from store import Store


@dataclass(frozen=True)
class Resources:
    """What one worker of a stage needs; the runner asks Ray for this per worker."""

    cpus: float = 1.0
    gpus: float = 0.0
    memory_gb: float = 1.0


@dataclass(frozen=True)
class Unit:
    """One piece of work: a video or a chunk of one.

    `fingerprint` hashes the stage parameters, the weights used and the
    fingerprints of the unit's inputs; a committed marker with the same
    fingerprint means the unit is done. `work` is the expected amount of work
    (windows, seconds of video) for rates and ETAs.
    """

    id: str
    video_id: str
    fingerprint: str
    work: float = 1.0
    payload: dict = field(default_factory=dict, compare=False, hash=False)


class SetupFailed(RuntimeError):
    """A stage could not be set up where it runs (e.g. on a Ray worker): no unit can run, so the run stops."""


@dataclass(frozen=True)
class Blocked:
    """A unit that cannot run yet because an input is missing."""

    id: str
    video_id: str
    reason: str


class Stage:
    """Base class. Subclasses set `name`, `resources`, and implement the methods below.

    `plan` runs on the driver and must be cheap (reads registry, markers and
    metadata only). `setup` runs once per worker before its first unit (load
    models there). `process` computes one unit and commits it with
    `store.commit`; it raises on bad input and the runner records the failure.
    """

    name: str = "stage"
    work_name: str = "units"
    resources: Resources = Resources()

    def version(self) -> str:
        """Names the output version: a hash of parameters and weights (not inputs)."""
        raise NotImplementedError

    def plan(self, store: Store) -> list[Unit | Blocked]:
        raise NotImplementedError

    def check(self) -> None:
        """Driver-side validation before any work (e.g. the checkpoint matches the model); raise ValueError."""

    def prepare(self, store: Store, units: list[Unit]) -> None:
        """Driver-side set-up before any unit of this run starts (e.g. create arrays)."""

    def setup(self) -> None:
        """Per-worker set-up, once, before processing."""

    def use_reserved_cpus(self) -> None:
        """As many torch threads as CPUs reserved, as Ray gives an actor, in-process runs too: on 2 cores a
        second torch thread beside the decode thread slowed the features pipeline several-fold (`make bench`)."""
        import torch

        torch.set_num_threads(max(1, int(self.resources.cpus)))

    @contextmanager
    def loading(self, what: str):
        """One line before `setup` loads a model and one with the time it took: to stderr, which is the
        terminal (or --log-file) for the local executor and the worker's log file on Ray."""
        print(f"[{self.name}] loading {what}", file=sys.stderr, flush=True)
        start = time.monotonic()
        yield
        print(f"[{self.name}] model ready in {time.monotonic() - start:.1f} s", file=sys.stderr, flush=True)

    def process(self, unit: Unit, store: Store) -> dict:
        raise NotImplementedError
