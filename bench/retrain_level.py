"""A level of a demo store (video by default, or segment), retrained with a model variant: semantic scores, and
at the video level copy fidelity.

On a store that `recap demo` made, trains the level again from the store's latest checkpoint of the level below
(or `--init`), with fields of the demo size's configuration of the level changed (`--set '{"video_feature_whiten":
false}'`), captions the store with it through the pipeline's own caption stage, and prints the test split's
semantic scores and, for each summary, whether it copies the activity sequence its input descriptions state:

    python bench/retrain_level.py recap-store/demo --epochs 15 --set '{"video_feature_whiten": false}' --method greedy
    python bench/retrain_level.py recap-store/demo --epochs 10 --non-recursive --init recap-store/demo/checkpoints/segment/<run>/epoch-0030
    python bench/retrain_level.py recap-store/demo --only-copy     # the published summaries (current/), untouched
    python bench/retrain_level.py recap-store/demo --only-copy --split train   # the training videos' summaries
    python bench/retrain_level.py recap-store/demo --level segment --epochs 30 --set '{"video_feature_norm": true}'
    python bench/retrain_level.py recap-store/demo --epochs 15 --train-seed 1   # the spread of one configuration
    python bench/retrain_level.py recap-store/demo --epochs 15 --lower recap-store/demo/checkpoints/segment/<run>/epoch-0030
    python bench/retrain_level.py recap-store/demo --epochs 15 --no-reordered   # without the reordered and composed summaries
    python bench/retrain_level.py recap-store/demo --epochs 15 --train '{"lr": 0.002}'   # another training recipe
    python bench/retrain_level.py recap-store/demo --level segment --epochs 30 --non-recursive --train-seed 1 --init CLIP_CKPT

Runs get their own names (the variant is part of the run's fingerprint): nothing the demo wrote is replaced,
though the newest training becomes the store's latest video checkpoint, as with `recap train`.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from dataclasses import replace

import models.recap
import pipeline.train
from pipeline.config import settle
from pipeline.dag import build_stages, caption_stage, level_checkpoint
from pipeline.runner import run_stage
from stages.evaluate import match_windows, semantic_scores
from store import LEVELS, Store, current_versions, read_captions
from synth.facts import parse


LOWER = {"segment": "clip", "video": "segment"}


def retrain(store: Store, config, level: str, epochs: int, changes: dict, recursive: bool, init: str | None,
            method: str | None = None, checkpoint: str | None = None, train_seed: int | None = None,
            reordered: bool = True, training: dict | None = None):
    """The caption stage of `level`, of a retrained variant; `training` changes fields of the train settings."""
    models.recap.DEMO_LEVELS[level].update(changes)  # in the run's fingerprint
    level_config = pipeline.train.level_config
    # the init checkpoint's configuration is the base (models.training.level_config): apply the changes on top
    pipeline.train.level_config = lambda *a, **k: level_config(*a, **k).with_overrides(changes)
    seed = config.train.seed if train_seed is None else train_seed
    train = replace(config.train, epochs=epochs, recursive=recursive, seed=seed, reordered=reordered)
    config = replace(config, train=replace(train, **(training or {})))
    features, *captions = build_stages(config, store)
    lower = captions[LEVELS.index(LOWER[level])]
    if checkpoint is None:
        checkpoint = store.abs(pipeline.train.train(
            config, store, level, init_from=init or level_checkpoint(config, store, LOWER[level]),
            lower_versions=[lower.version()] if recursive else []).checkpoint)
    decoding = config  # a decoding of this level's only: not `lower`'s
    if method:
        decoding = replace(config, captions=replace(config.captions, method=method, video_method=method))
    stage = caption_stage(decoding, level, checkpoint, lower, features)
    run_stage(stage, store, executor="local")
    return stage


def copy_fidelity(store: Store, segment_version: str, video_version: str,
                  split: str = "test") -> tuple[Counter, dict[int, str]]:
    """Per video of the split: is the sequence in its input descriptions right and does the summary copy it; and per
    place k of the true sequence, how many summaries name the right activity there (an unparsed summary names none).
    Whole videos only (the train split's ground truth also summarises runs of segments)."""
    descriptions = read_captions(store, "segment", segment_version).to_pandas()
    counts, right_at, videos_at = Counter(), Counter(), Counter()
    rows = match_windows(store, "video", video_version, split)
    whole = rows[rows["end_s"] == rows.groupby("video_id")["end_s"].transform("max")]
    for _, row in whole[whole["start_s"] == 0.0].iterrows():
        true = json.loads(row["facts"])["activities"]
        inputs = descriptions[descriptions["video_id"] == row["video_id"]].sort_values("start_s")["text"]
        given = [(parse("segment", text) or {}).get("activity") for text in inputs]
        got = parse("video", row["prediction"])
        counts["videos"] += 1
        counts["input right"] += given == true
        videos_at.update(range(1, len(true) + 1))
        if got is None:
            counts["unparsed"] += 1
            continue
        sequence = got["activities"]
        right_at.update(k + 1 for k, (a, b) in enumerate(zip(true, sequence)) if a == b)
        counts["sequence right"] += sequence == true
        counts["copies its input"] += sequence == given
        counts["right where the input is right"] += sequence == given == true
        counts["shorter than its input"] += len(sequence) < len(given)
        counts["longer than its input"] += len(sequence) > len(given)
        counts["same length, wrong"] += len(sequence) == len(given) and sequence != given
    return counts, {k: f"{right_at[k]} of {n}" for k, n in sorted(videos_at.items())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("store")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--level", choices=sorted(LOWER), default="video")
    parser.add_argument("--set", default="{}", help="JSON of RecapConfig fields for the level's model")
    parser.add_argument("--train", default="{}", help='JSON of train settings (pipeline.config.TrainConfig), '
                        'e.g. \'{"lr": 0.002, "batch_size": 32}\'; part of the run\'s fingerprint; they win over '
                        '--epochs and --train-seed where they name the same field')
    parser.add_argument("--non-recursive", action="store_true")
    parser.add_argument("--train-seed", type=int, help="the training run's seed (default: the store's); runs "
                        "that differ only in it give the spread of one configuration")
    parser.add_argument("--no-reordered", action="store_true", help="leave the store's reordered and composed "
                        "summaries out (groundtruth/reordered.parquet): the video level as trained before they existed")
    parser.add_argument("--lower", help="checkpoint of the level below, whose captions the level reads and which it "
                        "starts from (default: the store's latest, which is the last one trained: after a --level "
                        "segment run, that run's)")
    parser.add_argument("--init", help="init checkpoint (default: --lower's)")
    parser.add_argument("--method", choices=("greedy", "beam"), help="decoding of the level (default: the store's "
                        "settings; a trained variant is not trained again: its run is found by its fingerprint)")
    parser.add_argument("--checkpoint", help="caption with this checkpoint of the level: train nothing")
    parser.add_argument("--only-copy", action="store_true", help="score the published summaries, train nothing")
    parser.add_argument("--version", help="with --only-copy: score this caption version instead")
    parser.add_argument("--split", default="test", help="the split whose summaries the copy fidelity counts (train: "
                        "does the model recall its training summaries?); the semantic scores are the test split's")
    args = parser.parse_args()
    store = Store(args.store)
    config = settle(args.store, record=False)
    if args.lower:
        config = replace(config, captions=replace(config.captions, **{f"{LOWER[args.level]}_checkpoint": args.lower}))
    if args.only_copy:
        version = args.version or (current_versions(store) or {}).get(args.level)
        if version is None:
            raise SystemExit(f"{args.store}: no current {args.level} captions (current/); publish them or give --version")
    else:
        version = retrain(store, config, args.level, args.epochs, json.loads(args.set), not args.non_recursive,
                          args.init, args.method, args.checkpoint, args.train_seed, not args.no_reordered,
                          json.loads(args.train)).version()
    pairs = match_windows(store, args.level, version, "test")
    found = pairs[pairs["iou"].notna()]
    scores = semantic_scores(args.level, found["prediction"].tolist(), found["facts"].tolist())
    print(f"{version}: " + ", ".join(f"{k} {v:.2f}" if k == "sequence_edit" else f"{k} {v:.1f}"
                                             for k, v in scores.items()))
    if args.level == "video":
        segment_version = build_stages(config, store)[2].version()  # --lower's, else the latest segment checkpoint's
        counts, right_at = copy_fidelity(store, segment_version, version, args.split)
        print("copy fidelity:", dict(counts))
        print("activity k right:", right_at)


if __name__ == "__main__":
    main()
