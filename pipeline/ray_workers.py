"""Ray plumbing: connecting to a cluster, and the actor that holds one stage per worker."""

from __future__ import annotations

import logging
import os
import sys

from stages.base import Stage, Unit
from store import Store


def ensure_ray(address: str | None = None) -> None:
    """Connect once: to `address`, RAY_ADDRESS, or a fresh local instance."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    print(f"[ray] connecting to {address}" if address else "[ray] starting a local instance", file=sys.stderr,
          flush=True)
    # Ray's own start-up warnings go to the session's log files, not between our lines; what workers print
    # (model loading, training progress) still reaches this terminal, without colour codes in logs and pipes.
    if not sys.stderr.isatty():
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    context = ray.init(address=address, include_dashboard=False, log_to_driver=True, logging_level=logging.ERROR,
                       configure_logging=True,
                       runtime_env={"worker_process_setup_hook": "pipeline.ray_workers.quiet_ray_train_cleaner"})
    logs = getattr(context, "address_info", {}).get("session_dir")
    print(f"[ray] ready: {int(ray.cluster_resources().get('CPU', 0))} CPUs, "
          f"{int(ray.cluster_resources().get('GPU', 0))} GPUs" + (f"; logs in {logs}/logs" if logs else ""),
          file=sys.stderr, flush=True)


def quiet_ray_train_cleaner() -> None:
    """In every Ray worker process of our jobs: Ray Train's placement-group cleaner asks the state API, which needs
    the dashboard we do not start, and warns that it cannot, every second of a training run."""
    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.ERROR)


class StageWorker:
    """Holds one stage instance; `setup` (model loading) runs once when the actor starts."""

    def __init__(self, stage: Stage):
        self.stage = stage
        self.stage.setup()

    def process(self, unit: Unit, store: Store) -> dict:
        return self.stage.process(unit, store)
