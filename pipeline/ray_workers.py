"""Ray plumbing: connecting to a cluster, and the actor that holds one stage per worker."""

from __future__ import annotations

import os

from stages.base import Stage, Unit
from store import Store


def ensure_ray(address: str | None = None) -> None:
    """Connect once: to `address`, RAY_ADDRESS, or a fresh local instance."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    ray.init(address=address, include_dashboard=False, log_to_driver=True, logging_level="WARNING",
             configure_logging=True)


class StageWorker:
    """Holds one stage instance; `setup` (model loading) runs once when the actor starts."""

    def __init__(self, stage: Stage):
        self.stage = stage
        self.stage.setup()

    def process(self, unit: Unit, store: Store) -> dict:
        return self.stage.process(unit, store)
