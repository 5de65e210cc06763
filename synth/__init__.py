"""A deterministic generator of rendered videos with hierarchical ground truth
(clip captions, segment descriptions, video summaries)."""

from synth.corpus import CorpusMismatch, Manifest, generate
from synth.presets import PRESETS, Preset

__all__ = ["CorpusMismatch", "Manifest", "PRESETS", "Preset", "generate"]
