"""The stages of a full run, in order, built from one config."""

from __future__ import annotations

from pipeline.config import Config
from stages.base import Stage
from stages.features import FeaturesStage


def build_stages(config: Config) -> list[Stage]:
    return [FeaturesStage(config.features, config.windows)]
