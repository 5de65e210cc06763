"""Training runs in the store: checkpoints/<level>/<run>/epoch-NNNN/, one committed folder per epoch."""

from __future__ import annotations

from typing import Callable

from store.store import Store


def epoch_dir(run_dir: str, epoch: int) -> str:
    return f"{run_dir}/epoch-{epoch:04d}"


def last_epoch(store: Store, run_dir: str) -> int:
    """The newest committed epoch of a run (0: none)."""
    epochs = [int(name.removeprefix("epoch-")) for name in store.listdir(run_dir) if name.startswith("epoch-")]
    return max(epochs, default=0)


def commit_epoch(store: Store, run_dir: str, epoch: int, write: Callable[[str], None]) -> str:
    """`write(folder)` fills a hidden temporary folder, renamed into place as the epoch's; the older epochs
    are then dropped. Returns the epoch's store-relative folder."""
    rel = epoch_dir(run_dir, epoch)
    tmp = store.tmp_name(rel)
    write(store.abs(tmp))
    store.replace(tmp, rel)
    for name in store.listdir(run_dir):
        if name.startswith("epoch-") and name != rel.rsplit("/", 1)[1]:
            store.remove(f"{run_dir}/{name}")
    return rel
