"""Pipeline configuration: defaults are the official Video ReCap values; a TOML file overrides them.

    [features]
    encoder = "tsf-base"
    checkpoint = "/ckpt/clip_openai_timesformer_base.baseline.ep_0003.pth"
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import asdict, dataclass, field, fields, is_dataclass, replace
from pathlib import Path


@dataclass(frozen=True)
class WindowConfig:
    clip_s: float = 4.0          # clip windows [4k, 4k+4)
    segment_s: float = 180.0     # segment windows [180j, 180j+180)
    # A last segment shorter than this share of segment_s joins the one before: a few seconds left at the
    # end of a video are no activity of their own, and a description of them misleads the summary.
    segment_min_tail: float = 0.5


@dataclass(frozen=True)
class FeaturesConfig:
    encoder: str = "tsf-base"    # see models.encoders; "tsf-tiny" for tests and the demo
    checkpoint: str = ""         # local LaViLa / VideoPrism weights; empty = seeded random weights
    tokens: bool = True          # store all tokens per window (the clip level needs them)
    batch_size: int = 0          # windows per encoder call; 0: 16 on CUDA, 4 on CPU (where 16 is 27%
                                 # slower per window for TimeSformer-B: bench/features.py)
    device: str = "cpu"
    chunk_windows: int = 128     # windows per work unit; a multiple of rows_per_chunk
    rows_per_chunk: int = 64     # Zarr chunk rows of the CLS array
    decode_threads: int = 1


@dataclass(frozen=True)
class TrainConfig:
    size: str = "base"           # model size: base (official GPT-2 / BERT base) | demo | tiny
    epochs: int = 5              # official: clip 5, segment +10, video +10
    batch_size: int = 32
    lr: float = 1e-4
    weight_decay: float = 0.01
    warmup_frac: float = 0.05    # share of steps with linear warm-up, then cosine decay
    grad_clip: float = 1.0
    freeze: str = "official"     # official (cross-attention, layer norms, queries train) | none
    lower: str = "predicted"     # segment / video text input: predicted lower-level captions | groundtruth
    recursive: bool = True       # False: no lower-level text at all (the paper's non-recursive baseline)
    tokenizer: str = ""          # local GPT-2 tokenizer folder; empty = BPE trained on the corpus captions
    vocab_size: int = 1000       # for the corpus BPE tokenizer
    seed: int = 0
    workers: int = 1             # Ray Train workers; 1 = this process


@dataclass(frozen=True)
class CaptionConfig:
    clip_checkpoint: str = ""    # our checkpoint folder or an official .pth; empty = latest trained in the store
    segment_checkpoint: str = ""
    video_checkpoint: str = ""
    method: str = "greedy"       # greedy | beam | nucleus
    num_beams: int = 4
    top_p: float = 0.9
    batch_size: int = 64         # windows per generate call
    device: str = "cpu"
    tokenizer: str = ""          # local GPT-2 tokenizer folder, for official .pth checkpoints


@dataclass(frozen=True)
class EvalConfig:
    split: str = "test"
    protocols: tuple = ("videorecap", "coco")   # official Video ReCap scoring, and COCO's (PTB tokenizer)


@dataclass(frozen=True)
class RunConfig:
    workers: int = 0             # Ray workers per stage; 0 = as many as the cluster's CPUs allow
    address: str = ""            # Ray address; empty = RAY_ADDRESS or a local instance
    executor: str = "ray"        # "ray" or "local" (in-process, for debugging)
    max_retries: int = 2         # retries of a task whose worker died


@dataclass(frozen=True)
class Config:
    store: str = "recap-store"
    windows: WindowConfig = field(default_factory=WindowConfig)
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    captions: CaptionConfig = field(default_factory=CaptionConfig)
    evaluate: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict:
        return asdict(self)


def _merge(obj, overrides: dict, where: str):
    known = {f.name: f for f in fields(obj)}
    changes = {}
    for key, value in overrides.items():
        if key not in known:
            raise ValueError(f"{where}: unknown setting {key!r}; known: {', '.join(sorted(known))}")
        current = getattr(obj, key)
        if is_dataclass(current):
            if not isinstance(value, dict):
                raise ValueError(f"{where}.{key}: expected a table of settings")
            changes[key] = _merge(current, value, f"{where}.{key}")
        else:
            expected = type(current)
            if expected is float and isinstance(value, int):
                value = float(value)
            if expected is tuple and isinstance(value, list):
                value = tuple(value)
            if not isinstance(value, expected):
                raise ValueError(f"{where}.{key}: expected {expected.__name__}, got {value!r}")
            changes[key] = value
    return replace(obj, **changes)


def load_config(path: str | os.PathLike | None = None, **overrides) -> Config:
    """Defaults, then the TOML file, then keyword overrides like features={"encoder": "tsf-tiny"}."""
    config = Config()
    if path:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: config file not found")
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"{path}: not valid TOML ({e})") from None
        config = _merge(config, data, str(path))
    clean = {k: v for k, v in overrides.items() if v is not None and v != {}}
    return _merge(config, clean, "overrides") if clean else config
