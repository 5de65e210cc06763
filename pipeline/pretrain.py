"""`recap pretrain`: contrastive video-text training of the LaViLa dual encoder on the clip narrations of
the train split, then of its text tower alone on the narrations, segment descriptions and video summaries
(stages.pretrain); the val split gives the validation loss and text-to-video R@1 per level.

The run name fingerprints the settings (not the worker count), the architecture, the init checkpoint and
the data (each narration with its video's content id): the same command after completion does nothing,
and after a kill resumes from the last committed epoch. `checkpoints/encoder/latest.json` names the final
epoch's `lavila.pth`, which `recap features --checkpoint` reads like an official LaViLa file.
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, astuple, dataclass

from models.lavila import LavilaConfig
from pipeline.config import Config
from pipeline.train import run_workers
from stages.captions import weights_id
from stages.pretrain import Narration, PretrainPlan, SpanText, pretrain_worker
from store import Store, epoch_dir, fingerprint, last_epoch, read_groundtruth, read_videos

RUNS = "checkpoints/encoder"


@dataclass
class PretrainResult:
    run: str
    checkpoint: str   # store-relative lavila.pth of the final epoch
    trained: bool     # False: the run was already complete
    wall_s: float


def narrations(store: Store, split: str) -> list[Narration]:
    """The clip ground truth of a split, each with its registered video's file; videos not registered (or
    unreadable) are left out."""
    table = read_groundtruth(store, "clip", split)
    if table is None:
        return []
    videos = {v["video_id"]: v for v in read_videos(store)}
    return [Narration(videos[r["video_id"]]["uri"], r["start_s"], r["end_s"], r["text"])
            for r in table.to_pylist() if r["video_id"] in videos]


def span_texts(store: Store, split: str, windows: list[Narration]) -> list[SpanText]:
    """The segment and video ground truth of a split, each with the `windows` whose middle lies in its span
    [start, end), as the index pools a span (stages.index.span_embedding);
    spans without a window are left out."""
    uris = {v["video_id"]: v["uri"] for v in read_videos(store)}
    by_uri: dict[str, list[tuple[float, int]]] = {}
    for i, n in enumerate(windows):
        by_uri.setdefault(n.uri, []).append(((n.start_s + n.end_s) / 2, i))
    out = []
    for level in ("segment", "video"):
        table = read_groundtruth(store, level, split)
        for r in table.to_pylist() if table is not None else []:
            inside = tuple(i for mid, i in by_uri.get(uris.get(r["video_id"]), []) if r["start_s"] <= mid < r["end_s"])
            if inside:
                out.append(SpanText(level, r["text"], inside))
    return out


def latest_encoder(store: Store) -> str | None:
    """The absolute path of the newest pretrained encoder of this store, if any."""
    record = store.read_json(f"{RUNS}/latest.json")
    return store.abs(record["path"]) if record else None


def pretrain(config: Config, store: Store, stream=None) -> PretrainResult:
    stream = sys.stderr if stream is None else stream
    start = time.monotonic()
    settings = config.pretrain
    train, val = narrations(store, "train"), narrations(store, "val")
    if not train:
        raise ValueError(f"{store.root}: no clip narrations in the train split to pretrain on "
                         "(ingest ground truth first: `recap ingest ego4d-hcap` or `recap demo`)")
    model = (LavilaConfig.base() if settings.size == "base" else LavilaConfig.tiny()).to_dict()
    contents = {v["uri"]: v["content_id"] for v in read_videos(store)}
    data = {split: [(contents[n.uri], *astuple(n)[1:]) for n in items] for split, items in (("train", train),
                                                                                          ("val", val))}
    spans = {split: span_texts(store, split, items) if settings.text_epochs else []
             for split, items in (("train", train), ("val", val))}
    params = {k: v for k, v in asdict(settings).items() if k != "workers"}
    if not settings.text_epochs:  # runs without a text phase keep the names they had before it existed
        del params["span_batch_size"], params["text_epochs"]
    else:
        data |= {f"{split}_spans": [astuple(s) for s in items] for split, items in spans.items()}
    run = fingerprint(params, model, weights_id(settings.init) if settings.init else None, data, length=12)
    run_dir = f"{RUNS}/{run}"
    epochs = settings.epochs + settings.text_epochs
    final = f"{epoch_dir(run_dir, epochs)}/lavila.pth"
    trained = last_epoch(store, run_dir) < epochs
    if trained:
        print(f"[pretrain] run {run_dir}", file=stream, flush=True)
        plan = PretrainPlan(store=store.root, run_dir=run_dir, settings=settings, model=model,
                            init_from=settings.init or None, train=train, val=val,
                            spans=spans["train"], val_spans=spans["val"])
        run_workers(pretrain_worker, plan, settings.workers, config.run.address or None, stream,
                    name=f"recap-pretrain-{run}")
    else:
        print(f"[pretrain] already trained: {store.abs(final)}; nothing to do", file=stream)
    if latest_encoder(store) != store.abs(final):
        store.write_json(f"{RUNS}/latest.json", {"path": final})
    result = PretrainResult(run, final, trained, time.monotonic() - start)
    if trained:
        print(f"[pretrain] done: {store.abs(final)} (use it: recap features --checkpoint {store.abs(final)})"
              f" | wall {result.wall_s:.1f} s", file=stream, flush=True)
    return result
