"""Pipeline configuration: defaults are the official Video ReCap values; TOML files override them.

    [features]
    encoder = "tsf-base"
    checkpoint = "/ckpt/clip_openai_timesformer_base.baseline.ep_0003.pth"

A store remembers its settings in `recap.toml` at its root (only what differs from the defaults). A
command merges, in order: the defaults, the store's file, a `--config` file, its flags; a command that
works records what changed (`settle`). Every value with a range or a set of choices is checked here,
before any work (`check_config`).
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import asdict, dataclass, field, fields, is_dataclass, replace
from pathlib import Path

from models import ENCODERS, FREEZE, SIZES


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
    random_weights: bool = False  # allow a full-size encoder without a checkpoint (benchmarks only)
    tokens: bool = True          # store all tokens per window (the clip level needs them)
    batch_size: int = 0          # windows per encoder call; 0: 16 on CUDA, 4 on CPU (the faster per
                                 # window on CPU: `make bench`)
    device: str = "cpu"
    chunk_windows: int = 128     # windows per work unit; a multiple of rows_per_chunk
    rows_per_chunk: int = 64     # Zarr chunk rows of the CLS array
    decode_threads: int = 1


@dataclass(frozen=True)
class TrainConfig:
    size: str = "base"           # model size: base (official GPT-2 / BERT base) | demo | tiny
    epochs: int = 0              # 0: the level's official count (store.LEVEL: clip 5, segment 10, video 10)
    batch_size: int = 32
    lr: float = 1e-4
    weight_decay: float = 0.01
    warmup_frac: float = 0.05    # share of steps with linear warm-up, then cosine decay
    grad_clip: float = 1.0
    freeze: str = "official"     # official (cross-attention, layer norms, queries train) | none
    lower: str = "predicted"     # segment / video text input: predicted lower-level captions | groundtruth
    recursive: bool = True       # False: no lower-level text at all (the paper's non-recursive baseline)
    reordered: bool = True       # recursive video level: also the store's reordered and composed summaries, if any
                                 # (groundtruth/reordered.parquet: training segments told in orders no video has)
    group_by_length: bool = False  # batches of targets of like length (less padding; stages.train.epoch_batches)
    tokenizer: str = ""          # local GPT-2 tokenizer folder; empty = BPE trained on the corpus captions
    vocab_size: int = 1000       # for the corpus BPE tokenizer
    seed: int = 0
    workers: int = 1             # Ray Train workers; 1 = this process


@dataclass(frozen=True)
class PretrainConfig:
    size: str = "base"           # dual encoder: base (LaViLa TimeSformer-B + CLIP text tower) | tiny
    init: str = ""               # a LaViLa .pth to start from; empty = fresh weights
    epochs: int = 5
    batch_size: int = 32         # narrations per contrastive batch, over all workers
    text_epochs: int = 3         # then epochs of the text tower and projections alone (the visual tower kept):
                                 # narrations, segment descriptions and summaries; 0 = none
    span_batch_size: int = 16    # descriptions or summaries per text-epoch batch, each with its windows' pooled
                                 # embedding
    lr: float = 3e-5
    weight_decay: float = 0.01
    warmup_frac: float = 0.05
    grad_clip: float = 1.0
    seed: int = 0
    workers: int = 1             # Ray Train workers; 1 = this process


@dataclass(frozen=True)
class CaptionConfig:
    clip_checkpoint: str = ""    # our checkpoint folder or an official .pth; empty = latest trained in the store
    segment_checkpoint: str = ""
    video_checkpoint: str = ""
    method: str = "greedy"       # greedy | beam | sample (nucleus sampling with top_p)
    video_method: str = ""       # the video level's (summaries'), if not `method`
    num_beams: int = 4
    top_p: float = 0.9
    batch_size: int = 64         # windows per generate call
    device: str = "cpu"
    tokenizer: str = ""          # local GPT-2 tokenizer folder, for official .pth checkpoints


@dataclass(frozen=True)
class IndexConfig:
    encoder: str = "lavila"      # lavila | videoprism: the video-text model of the embeddings
    checkpoint: str = ""         # lavila: its dual-encoder .pth; empty = features.checkpoint, else the store's latest
                                 # `recap pretrain` encoder. videoprism: a local VideoPrismClipModel folder; empty =
                                 # features.checkpoint. Its video tower must be the features' encoder
    size: str = ""               # tiny | base; empty = the features encoder's (tsf-tiny: tiny, tsf-base: base)
    batch_size: int = 256        # captions per text-encoder call
    device: str = "cpu"


@dataclass(frozen=True)
class EnhanceConfig:
    """`recap enhance`: CSI (ExCae's caption self-improvement), then its final prompt applied to every video."""
    level: str = "video"         # clip | segment | video: the units captioned, and the ground truth scored against
    captioner: str = "local"     # local (the store's ReCap model of the level; a prompt is a decoding recipe) |
                                 # endpoint (an OpenAI-compatible chat endpoint given frames and the prompt text)
    engineer: str = "local"      # local (seeded one-field mutations of the best prompt) | endpoint (it rewrites it)
    endpoint_url: str = ""       # e.g. http://localhost:8000/v1 (a `vllm serve` server)
    endpoint_model: str = ""     # e.g. Qwen/Qwen2.5-VL-7B-Instruct
    api_key_env: str = "OPENAI_API_KEY"  # the environment variable holding the endpoint's key (never the key)
    timeout_s: float = 120.0     # per request
    retries: int = 2             # further attempts after a timeout or HTTP 429 / 5xx
    frames: int = 4              # frames per unit shown to the endpoint
    k: int = 10                  # captions per unit (ExCae: 10)
    initial: str = ""            # the iteration-0 prompt, a recipe ("method=greedy") or an instruction; empty: the
                                 # captioner's (sampling at temperature 1, top-p 0.9; ExCae's "Generate 10 captions
                                 # from different perspectives about this video.")
    iterations: int = 400        # rewrites at most after the initial prompt (ExCae: about 400)
    patience: int = 10           # stop after this many rewrites in a row that do not beat the best
    diversity_weight: float = 1.0  # score = similarity + diversity_weight * diversity
    sample_size: int = 8         # train videos the search scores prompts on
    seed: int = 0


@dataclass(frozen=True)
class EcsSettings:
    """`recap ecs`: ExCae's expertized caption selection, trained on the train split's queries."""
    experts: int = 8             # experts in the mixture
    active: int = 2              # experts per unit in training (top-k); 0 = mean fusion
    eval_routing: str = "topk"   # topk (as trained) | dense (every expert, the router's softmax)
    k: int = 10                  # enhanced captions per unit used
    enhanced: tuple = ()         # enhanced caption versions (captions/enhanced/<version>); the last feeds ECS
    epochs: int = 40
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.01
    temperature: float = 0.05
    balance_weight: float = 0.01  # the load-balancing term's weight
    seed: int = 0


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
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    captions: CaptionConfig = field(default_factory=CaptionConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    enhance: EnhanceConfig = field(default_factory=EnhanceConfig)
    ecs: EcsSettings = field(default_factory=EcsSettings)
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
    config = _merge(Config(), _read_toml(path), str(path)) if path else Config()
    clean = {k: v for k, v in overrides.items() if v is not None and v != {}}
    return check_config(_merge(config, clean, "overrides") if clean else config)


# ---- checks ----------------------------------------------------------------------

class ConfigError(ValueError):
    """A setting out of its range or choices: names the key, the value and what is allowed."""


def _choices(*allowed):
    names = ", ".join(a if a else '""' for a in map(str, allowed))
    return lambda v: None if v in allowed else f"not one of {names}"


def _at_least(low, strict=False):
    return lambda v: None if (v > low if strict else v >= low) else f"must be {'>' if strict else '>='} {low}"


def _fraction(v):
    return None if 0 <= v < 1 else "must be in [0, 1)"


def _device(v):
    return None if v == "cpu" or v == "cuda" or (v.startswith("cuda:") and v[5:].isdigit()) \
        else "not cpu, cuda or cuda:N"


def _rules() -> dict:
    return {
        "windows.clip_s": _at_least(0, strict=True), "windows.segment_s": _at_least(0, strict=True),
        "windows.segment_min_tail": _fraction,
        "features.encoder": _choices(*ENCODERS), "features.batch_size": _at_least(0),
        "features.device": _device, "features.chunk_windows": _at_least(1), "features.rows_per_chunk": _at_least(1),
        "features.decode_threads": _at_least(1),
        "train.size": _choices(*SIZES), "train.epochs": _at_least(0), "train.batch_size": _at_least(1),
        "train.lr": _at_least(0, strict=True), "train.weight_decay": _at_least(0), "train.warmup_frac": _fraction,
        "train.grad_clip": _at_least(0), "train.freeze": _choices(*FREEZE),
        "train.lower": _choices("predicted", "groundtruth"), "train.vocab_size": _at_least(8),
        "train.workers": _at_least(1),
        "pretrain.size": _choices("base", "tiny"), "pretrain.epochs": _at_least(1),
        "pretrain.batch_size": _at_least(2),
        "ecs.experts": _at_least(1), "ecs.active": _at_least(0), "ecs.eval_routing": _choices("topk", "dense"),
        "ecs.k": _at_least(1), "ecs.epochs": _at_least(1), "ecs.batch_size": _at_least(2),
        "ecs.lr": _at_least(0, strict=True), "ecs.temperature": _at_least(0, strict=True),
        "ecs.balance_weight": _at_least(0),
        "pretrain.span_batch_size": _at_least(2), "pretrain.text_epochs": _at_least(0),
        "pretrain.lr": _at_least(0, strict=True),
        "pretrain.weight_decay": _at_least(0), "pretrain.warmup_frac": _fraction, "pretrain.grad_clip": _at_least(0),
        "pretrain.workers": _at_least(1),
        "captions.method": _choices("greedy", "beam", "sample"),
        "captions.video_method": _choices("", "greedy", "beam", "sample"), "captions.num_beams": _at_least(1),
        "captions.top_p": lambda v: None if 0 < v <= 1 else "must be in (0, 1]",
        "captions.batch_size": _at_least(1), "captions.device": _device,
        "index.encoder": _choices("lavila", "videoprism"),
        "index.size": lambda v: None if v in ("", "tiny", "base")
        else "not tiny or base (or empty: the features encoder's size)",
        "index.batch_size": _at_least(1), "index.device": _device,
        "enhance.level": _choices("clip", "segment", "video"), "enhance.captioner": _choices("local", "endpoint"),
        "enhance.engineer": _choices("local", "endpoint"), "enhance.timeout_s": _at_least(0, strict=True),
        "enhance.retries": _at_least(0), "enhance.frames": _at_least(1), "enhance.k": _at_least(1),
        "enhance.iterations": _at_least(0), "enhance.patience": _at_least(1), "enhance.diversity_weight": _at_least(0),
        "enhance.sample_size": _at_least(1),
        "evaluate.split": _choices("train", "val", "test"),
        "evaluate.protocols": lambda v: None if v and set(v) <= {"videorecap", "coco"}
        else "must name one or more of videorecap, coco",
        "run.workers": _at_least(0), "run.executor": _choices("ray", "local"), "run.max_retries": _at_least(0),
    }


def check_config(config: Config) -> Config:
    """Raise ConfigError for the first value out of range or choice. Whether a CUDA device is there is
    checked when a stage that needs one is about to run (pipeline.runner): on a Ray cluster the
    driver's machine may have none while the workers do."""
    values = flatten(config)
    for key, rule in _rules().items():
        problem = rule(values[key])
        if problem:
            raise ConfigError(f"{key} = {values[key]!r}: {problem}")
    return config


def flatten(config: Config) -> dict:
    """{"features.encoder": "tsf-base", ...} for every setting but the store root."""
    return {f"{section}.{key}": value for section, table in asdict(config).items() if isinstance(table, dict)
            for key, value in table.items()}


# ---- the store's own settings -------------------------------------------------------

SETTINGS_FILE = "recap.toml"
# Local paths recorded absolute, so the store's settings hold wherever a command runs.
PATH_SETTINGS = ("features.checkpoint", "captions.clip_checkpoint", "captions.segment_checkpoint",
                 "captions.video_checkpoint", "captions.tokenizer", "train.tokenizer", "pretrain.init",
                 "index.checkpoint")


def settle(store: str | None = None, path: str | os.PathLike | None = None, *, record: bool = True,
           stream=None, **overrides) -> Config:
    """The configuration a command runs with: defaults, the store's `recap.toml`, the `path` file, then
    `overrides`; checked. `record`: write what changed into the store's file, with a one-line notice."""
    import sys

    import fsspec

    data = _read_toml(path) if path else {}
    root = store or data.pop("store", None) or Config.store
    data.pop("store", None)
    fs, settings = fsspec.core.url_to_fs(root)
    settings = f"{settings.rstrip('/')}/{SETTINGS_FILE}"
    remembered = Config(store=root)
    if fs.isfile(settings):
        remembered = _merge(remembered, _parse_toml(fs.cat_file(settings).decode(), f"{root}/{SETTINGS_FILE}"),
                            f"{root}/{SETTINGS_FILE}")
    clean = {k: v for k, v in overrides.items() if v is not None and v != {}}
    config = _absolute_paths(_merge(_merge(remembered, data, str(path)), clean, "flags"))
    check_config(config)
    before, after = flatten(remembered), flatten(config)
    changed = [k for k in after if after[k] != before[k]]
    if record and (changed or not fs.isfile(settings)) and after != flatten(Config()):
        from store import Store

        Store(root).write_bytes(SETTINGS_FILE, to_toml(config).encode())  # the store's atomic write
        what = ", ".join(f"{k} {before[k]!r} -> {after[k]!r}" for k in changed) or "first settings"
        print(f"[config] {root}/{SETTINGS_FILE}: {what}", file=stream or sys.stderr)
    return config


def record_settings(config: Config, stream=None) -> Config:
    """Write `config` as its store's settings (the demo, which builds its configuration in code)."""
    return settle(config.store, record=True, stream=stream, **{
        section: table for section, table in asdict(config).items() if isinstance(table, dict)})


def _absolute_paths(config: Config) -> Config:
    values = flatten(config)
    fixes = {}
    for key in PATH_SETTINGS:
        value = values[key]
        if value and "://" not in value and not os.path.isabs(value):
            section, name = key.split(".")
            fixes.setdefault(section, {})[name] = os.path.abspath(value)
    return _merge(config, fixes, "paths") if fixes else config


def to_toml(config: Config) -> str:
    """The settings that differ from the defaults, as TOML."""
    defaults = flatten(Config())
    lines = ["# recap settings of this store: what differs from the defaults. Commands read this file",
             "# first, then --config, then their flags; a command that changes a setting records it here."]
    for section, table in asdict(config).items():
        if not isinstance(table, dict):
            continue
        changed = {k: v for k, v in table.items() if defaults[f"{section}.{k}"] != v}
        if changed:
            lines += ["", f"[{section}]"] + [f"{k} = {_toml_value(v)}" for k, v in changed.items()]
    return "\n".join(lines) + "\n"


def _toml_value(value) -> str:
    import json

    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(value) if isinstance(value, str) else repr(value)


def _read_toml(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: config file not found")
    return _parse_toml(path.read_text(), str(path))


def _parse_toml(text: str, where: str) -> dict:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{where}: not valid TOML ({e})") from None
