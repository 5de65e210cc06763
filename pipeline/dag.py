"""The stages of a full run, in order, built from one config."""

from __future__ import annotations

from pipeline.config import Config
from stages.base import Stage
from stages.features import FeaturesStage
from store import Store


def build_stages(config: Config, store: Store | None = None, upto: str | None = None) -> list[Stage]:
    """features -> captions -> segments -> summaries; caption stages only where a checkpoint is known."""
    from stages.captions import ClipCaptionStage, SegmentStage, SummaryStage

    stages: list[Stage] = [FeaturesStage(config.features, config.windows)]
    for cls in (ClipCaptionStage, SegmentStage, SummaryStage):
        if upto == stages[-1].name:
            break
        try:
            stages.append(cls(config, store or Store(config.store), stages[-1]))
        except FileNotFoundError:  # no checkpoint for this level yet: the DAG ends here
            break
    return stages
