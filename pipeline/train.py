"""`recap train`: resolve a level's training inputs in the store, name the run, and train it in this
process or on Ray Train. The caption stages then use its final checkpoint by default.

    clip     the tokens of each 4-s window + ground-truth clip captions
    segment  sparse CLS + the clip captions in the window: ground truth, or predicted (captions/clip/<version>)
    video    sparse CLS + the segment descriptions: ground truth, or predicted (captions/segment/<version>)
    unified  all three in alternating batches, one set of weights (ReCap-U)
With `train.recursive` off, segment and video models read video features only (the paper's
non-recursive baseline).

Targets are the ground truth of the train split; the val split gives the validation loss. The run
name fingerprints the level, the train settings (not the worker count), the model's architecture,
the init checkpoint and the data (feature versions, targets, lower-level captions): the same command
after completion does nothing, and after a kill resumes from the last committed epoch.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Sequence

from models import checkpoint
from models.recap import RecapConfig
from models.tokenizer import Tokenizer
from pipeline.config import Config
from pipeline.dag import features_stage
from stages.captions import weights_id
from stages.features import FeaturesStage
from models.recap import SIZES
from models.training import FREEZE, MODEL_RULES, level_config
from stages.examples import told_texts
from stages.train import Item, TrainPlan, train_worker
from store import (
    LEVEL, LEVELS, REORDERED_REL, Store, epoch_dir, fingerprint, last_epoch, latest_checkpoint, read_captions,
    read_groundtruth, read_reordered, record_latest,
)

CURRICULUM = {"clip": ("clip",), "segment": ("segment",), "video": ("video",), "unified": LEVELS}
LOWER_SOURCES = ("predicted", "groundtruth")


@dataclass
class TrainResult:
    level: str
    run: str
    checkpoint: str   # store-relative folder of the final epoch
    trained: bool     # False: the run was already complete
    wall_s: float


def train(config: Config, store: Store, level: str, *, init_from: str | None = None,
          lower_versions: Sequence[str] = (), stream=None) -> TrainResult:
    """Train `level` (clip | segment | video | unified) as `config.train` says; `lower_versions` names the
    predicted caption versions to read when there are several."""
    stream = sys.stderr if stream is None else stream  # at the call: --log-file replaces it
    start = time.monotonic()
    settings = replace(config.train, epochs=config.train.epochs or LEVEL.get(level, LEVEL["video"]).epochs)
    _check_arguments(settings, store, level, init_from)
    features = features_stage(config)
    levels = CURRICULUM[level]
    targets = {split: {lvl: _targets(store, lvl, split) for lvl in levels} for split in ("train", "val")}
    lower = {lvl: _lower_captions(store, lvl, settings.lower, lower_versions, targets, stream)
             for lvl in levels if LEVEL[lvl].lower and settings.recursive}
    if "video" in levels and settings.recursive and settings.reordered:
        targets["train"]["video"] += _reordered_targets(store, lower["video"], f"[train {level}]", stream)
    feature_ids = _feature_fingerprints(store, features, targets, needs_tokens="clip" in levels)

    # `reordered` shows in the data; `group_by_length` only when on: runs from before they existed keep their names
    params = {k: v for k, v in asdict(settings).items()
              if k not in ("workers", "reordered") and (k != "lower" or lower) and (k != "group_by_length" or v)}
    data = {split: {lvl: [i.key() for i in items] for lvl, items in by_level.items()}
            for split, by_level in targets.items()}
    architecture = [MODEL_RULES, RecapConfig.preset("video" if level == "unified" else level, settings.size).to_dict()]
    run = fingerprint(level, params, architecture, weights_id(init_from) if init_from else None, feature_ids, data,
                      lower, length=12)
    run_dir = f"checkpoints/{level}/{run}"
    final = epoch_dir(run_dir, settings.epochs)
    trained = last_epoch(store, run_dir) < settings.epochs
    if trained:
        print(f"[train {level}] run {run_dir}", file=stream, flush=True)
        tokenizer = _run_tokenizer(store, run_dir, settings, init_from)
        info = features.feature_set(store).info(next(iter(feature_ids)))
        init = RecapConfig.from_dict(checkpoint.inspect(init_from)["config"]) if init_from else None
        model = level_config(settings.size, level, info["dim"], info["num_tokens"] or 0, tokenizer, init,
                             settings.recursive)
        plan = TrainPlan(
            store=store.root, level=level, run_dir=run_dir, features=features.version(), settings=settings,
            model=model.to_dict(), init_from=init_from, train=targets["train"], val=targets["val"], lower=lower,
            num_feat={lvl: RecapConfig.preset(lvl, settings.size).num_video_feat for lvl in levels if lvl != "clip"})
        run_workers(train_worker, plan, settings.workers, config.run.address or None, stream,
                    name=f"recap-train-{run_dir.replace('/', '-')}")
    else:
        print(f"[train {level}] already trained: {store.abs(final)}; nothing to do", file=stream)
    if latest_checkpoint(store, level) != store.abs(final):
        record_latest(store, level, final)
    result = TrainResult(level, run, final, trained, time.monotonic() - start)
    if trained:
        print(f"[train {level}] done: {store.abs(final)} (default for captioning: checkpoints/{level}/latest.json)"
              f" | wall {result.wall_s:.1f} s", file=stream, flush=True)
    return result


def _check_arguments(settings, store: Store, level: str, init_from: str | None) -> None:
    if level not in CURRICULUM:
        raise ValueError(f"unknown level {level!r}; expected one of {', '.join(CURRICULUM)}")
    for name, known in (("size", SIZES), ("freeze", FREEZE), ("lower", LOWER_SOURCES)):
        if getattr(settings, name) not in known:
            raise ValueError(f"train.{name} must be one of {', '.join(known)}, got {getattr(settings, name)!r}")
    if settings.freeze == "official" and not init_from:
        raise ValueError("freeze 'official' trains only cross-attention, layer norms and queries, so GPT-2 keeps "
                         "its random init and cannot learn language: pass --init-from a checkpoint, or train "
                         "everything with --freeze none")
    if not store.local:
        raise ValueError(f"{store.root}: training writes checkpoints to a local (or mounted) store")
    if init_from and not Path(init_from).exists():
        raise FileNotFoundError(f"{init_from}: init checkpoint not found")


def _targets(store: Store, level: str, split: str) -> list[Item]:
    table = read_groundtruth(store, level, split)
    if table is None:
        raise FileNotFoundError(f"no {level} ground truth in {store.root}: ingest a corpus with ground truth "
                                f"(`recap ingest ego4d-hcap METADATA_DIR --videos ROOT`)")
    items = [Item(r["video_id"], r["start_s"], r["end_s"], r["text"]) for r in table.to_pylist()]
    if split == "train" and not items:
        raise ValueError(f"no {level} ground truth in the train split of {store.root}")
    return items


def _reordered_targets(store: Store, lower: dict, prefix: str, stream) -> list[Item]:
    """The store's reordered and composed summaries of training videos whose parts the lower-level captions tell one
    by one (each part some caption); none: an empty list."""
    table = read_reordered(store, "train")
    if table is None or not table.num_rows:
        return []
    items = [Item(r["video_id"], r["start_s"], r["end_s"], r["text"], told_parts(r["video_id"], r["parts"]))
             for r in table.to_pylist()]
    tellable = [i for i in items if told_texts(lower, i.parts) is not None]
    skipped = len(items) - len(tellable)
    across = sum(len({v for v, _, _ in i.parts}) > 1 for i in tellable)
    print(f"{prefix} {len(tellable)} reordered and composed summaries, {across} of them across videos ({REORDERED_REL})"
          + (f"; {skipped} left out: their parts are not the lower-level captions' windows" if skipped else ""),
          file=stream)
    return tellable


def told_parts(video_id: str, parts: str) -> tuple[tuple[str, float, float], ...]:
    """A reordered table's `parts` as (video, start, end); corpora written before composed summaries name no
    video: the row's own."""
    return tuple((p[0], p[1], p[2]) if len(p) == 3 else (video_id, p[0], p[1]) for p in json.loads(parts))


def _lower_captions(store: Store, level: str, source: str, versions: Sequence[str], targets: dict, stream):
    """video -> (start, end, text) of the level below, ground truth or a predicted caption version; fails
    naming the stage to run when a video of the targets has none."""
    lower = LEVEL[level].lower
    if source == "groundtruth":
        table = read_groundtruth(store, lower)
        if table is None:
            raise FileNotFoundError(f"no {lower} ground truth in {store.root} for --lower groundtruth")
    else:
        version = _caption_version(store, lower, versions)
        print(f"[train {level}] lower level: predicted {lower} captions captions/{lower}/{version}", file=stream)
        table = read_captions(store, lower, version)
    by_video: dict[str, list[tuple[float, float, str]]] = {}
    for video_id, start, end, text in zip(*(table[c].to_pylist() for c in ("video_id", "start_s", "end_s", "text"))):
        by_video.setdefault(video_id, []).append((start, end, text))
    videos = {i.video_id for split in targets.values() for i in split[level]}
    missing = sorted(videos - set(by_video))
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {len(videos)} videos have no {lower} captions (e.g. {missing[0]}): "
                                f"run `recap {LEVEL[lower].stage}` for them, or train with --lower groundtruth")
    return by_video


def _caption_version(store: Store, lower: str, versions: Sequence[str]) -> str:
    available = store.listdir(f"captions/{lower}")
    candidates = [v for v in versions if v in available] if versions else available
    if len(candidates) == 1:
        return candidates[0]
    run = f"run `recap {LEVEL[lower].stage}` first, or train with --lower groundtruth"
    if not available:
        raise FileNotFoundError(f"no predicted {lower} captions in {store.root} (captions/{lower}/): {run}")
    if versions:
        raise ValueError(f"--lower-version {', '.join(versions)}: not a {lower} caption version in the store; "
                         f"there are {', '.join(available)}")
    raise ValueError(f"several {lower} caption versions in the store ({', '.join(available)}): "
                     f"choose one with --lower-version")


def _feature_fingerprints(store: Store, features: FeaturesStage, targets: dict, needs_tokens: bool) -> dict[str, str]:
    """Fingerprints of the features of every video used; fails naming the videos not extracted."""
    videos = sorted({v for split in targets.values() for items in split.values() for i in items
                     for v in (i.video_id, *(part[0] for part in i.parts))})
    missing = sorted(set(videos) - features.complete_videos(store))
    if missing:
        raise FileNotFoundError(f"features {features.version()} are missing for {len(missing)} of {len(videos)} "
                                f"videos (e.g. {missing[0]}): run `recap features`")
    fs = features.feature_set(store)
    if needs_tokens:
        clip_videos = {i.video_id for split in targets.values() for i in split["clip"]}
        pruned = sorted(v for v in clip_videos if not fs.has_tokens(v))
        if pruned:
            raise FileNotFoundError(f"features {fs.name} of {len(pruned)} videos hold no tokens (e.g. {pruned[0]}), "
                                    f"which clip captions are trained on: run `recap features --tokens`")
    return {v: fs.info(v)["fingerprint"] for v in videos}


def _run_tokenizer(store: Store, run_dir: str, settings, init_from: str | None) -> Tokenizer:
    """The run's tokenizer, committed once under the run so that every worker and every resume reads the same:
    the init checkpoint's, a configured GPT-2 one, or a BPE trained on all ground-truth training captions."""
    rel = f"{run_dir}/tokenizer"
    if store.exists(rel):
        return Tokenizer.load(store.abs(rel))
    if init_from and (Path(init_from) / "tokenizer.json").exists():
        tokenizer = Tokenizer.load(init_from)
    elif settings.tokenizer:
        tokenizer = Tokenizer.load(settings.tokenizer)
    elif init_from:
        raise ValueError(f"{init_from}: holds no tokenizer; set train.tokenizer to the GPT-2 tokenizer folder it "
                         f"was trained with")
    else:
        tables = [read_groundtruth(store, lvl, "train") for lvl in LEVELS]
        tokenizer = Tokenizer.train([t for table in tables if table is not None for t in table["text"].to_pylist()],
                                    settings.vocab_size)
    tmp = store.tmp_name(rel)
    tokenizer.save(store.abs(tmp))
    store.replace(tmp, rel)
    return tokenizer


def run_workers(worker, plan, workers: int, address: str | None, stream, name: str) -> None:
    """`worker(plan, stream)` in this process (workers <= 1), or on that many Ray Train workers (DDP)."""
    if workers <= 1:
        worker(plan, stream)
        return
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from pipeline.ray_workers import ensure_ray

    ensure_ray(address)
    trainer = TorchTrainer(
        _ray_train_loop, train_loop_config={"worker": worker, "plan": plan},
        scaling_config=ray.train.ScalingConfig(num_workers=workers,
                                               use_gpu=ray.cluster_resources().get("GPU", 0) >= workers),
        # Ray Train's own INFO and WARNING lines stay in the session's log files (its placement-group cleaner warns
        # every second where the state API has no dashboard to ask); the workers' progress and errors still print.
        run_config=ray.train.RunConfig(name=name, logging_config=ray.train.LoggingConfig(log_level="ERROR")))
    try:
        trainer.fit()
    except ray.train.TrainingFailedError as e:
        raise RuntimeError(f"training failed on Ray Train: {e}") from None


def _ray_train_loop(config: dict) -> None:
    """One Ray Train worker; Ray has set up torch.distributed (gloo on CPU, nccl on GPUs). Progress goes to
    the process's own stderr, which Ray forwards: through `sys.stderr`, Ray Train's print patch repeats it."""
    config["worker"](config["plan"], stream=sys.__stderr__)
