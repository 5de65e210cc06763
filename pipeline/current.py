"""Which version of each level the settings make current, and current/ rewritten to match (store.current)."""

from __future__ import annotations

from collections.abc import Iterable

from pipeline.config import Config
from pipeline.dag import build_stages
from store import LEVELS, Store, write_current


def resolved_versions(config: Config, store: Store) -> dict[str, str]:
    """{level: version, "features": feature set} of the stages `config` builds on `store`. A level without a
    checkpoint, or whose checkpoint file is gone, has no version, and nor have the levels above it: a caption
    run of a lower level still publishes (the missing file is reported when its own level runs)."""
    features, *levels = build_stages(config, store)
    versions = {"features": features.version()}
    for stage in levels:
        try:
            versions[stage.level] = stage.version()
        except FileNotFoundError:
            break
    return versions


def publish_current(config: Config, store: Store, levels: Iterable[str] = LEVELS) -> None:
    """After a caption run: current/ holds the committed rows of the versions `config` produces (the store's
    settings, which the command records). `levels`: the tables to rewrite even if their version is unchanged
    (the levels just run); a level whose version changed is always rewritten."""
    versions = resolved_versions(config, store)
    write_current(store, {k: v for k, v in versions.items() if k != "features"}, versions["features"], levels)
