"""Evaluation: CIDEr, ROUGE-L and METEOR (pycocoevalcap) of committed captions against ground truth.

Scores are on the x100 scale the Video ReCap paper reports (CIDEr 0-1000, ROUGE-L and METEOR 0-100).

Pairs. Ground truth of one level and split is joined, with Dask, to one caption
version by video and window: each ground-truth window takes the prediction of
highest temporal IoU, if that IoU is at least 0.5 (both sides normally use the
same windows, so the match is exact). Windows left without a prediction are
counted as missing and reported; predictions without ground truth are ignored.

Protocols, named in every output:
- `coco`: the COCO caption evaluation: Stanford PTB tokenizer, lower case, punctuation dropped.
- `videorecap`: the official Video ReCap evaluation: hypothesis and reference lower-cased and
  stripped, then scored as whitespace-separated tokens, without PTB. Runs of whitespace become one
  space (they would give empty ROUGE tokens, and a newline would break METEOR's line protocol).
  The official script takes ROUGE-L from Hugging Face `evaluate` (rougeLsum); here both protocols
  use pycocoevalcap's ROUGE-L (LCS F-measure, beta 1.2), so ROUGE-L differs slightly from the paper's.

Semantic accuracy, where the ground truth carries facts (our synthetic corpus): each prediction is
parsed back to facts with the corpus grammar (`synth.facts.parse`) and compared with the facts of its
reference; text the grammar cannot parse is wrong on every fact. Per level (x100 except counts):
    clip     action, colour, shape, all_three (all three right)
    segment  activity, object_f1 (F1 of the named objects, "colour shape", per segment)
    video    place, sequence_exact (the ordered activities exactly right), sequence_edit (mean
             Levenshtein distance between predicted and true activity sequences; not x100)
    every    parsed (share of predictions the grammar parses), distinct (distinct predictions: a
             collapsed model shows as a handful)

Per-video scores (`by="video"`) are means of the per-caption scores of the corpus
computation. CIDEr therefore keeps the corpus document frequencies (CIDEr over one
video's captions alone would change the IDF), and a video's METEOR is the mean of
its sentence scores, whereas the corpus METEOR pools matching statistics.
"""

from __future__ import annotations

import json
import shutil
from contextlib import contextmanager

import dask.dataframe as dd
import numpy as np
import pandas as pd
import pyarrow as pa
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

from store import Store, captions_dir, check_name, now_iso
from store.tables import groundtruth_rel, read_groundtruth
from synth.facts import parse

PROTOCOLS = ("coco", "videorecap")
METRICS = ("CIDEr", "ROUGE_L", "METEOR")
SEMANTIC = {"clip": ("action", "colour", "shape", "all_three"), "segment": ("activity", "object_f1"),
            "video": ("place", "sequence_exact", "sequence_edit")}
COUNTS = ("parsed", "distinct")
SCALE = 100.0
MIN_IOU = 0.5

METRICS_SCHEMA = pa.schema([
    ("run", pa.string()), ("level", pa.string()), ("version", pa.string()), ("split", pa.string()),
    ("protocol", pa.string()), ("metric", pa.string()), ("value", pa.float64()), ("n_pairs", pa.int64()),
    ("n_missing", pa.int64()), ("video_id", pa.string()), ("computed_at", pa.string()),
])

_PAIRS_META = pd.DataFrame({
    "video_id": pd.Series(dtype="str"), "start_s": pd.Series(dtype="float64"), "end_s": pd.Series(dtype="float64"),
    "reference": pd.Series(dtype="str"), "prediction": pd.Series(dtype="str"), "iou": pd.Series(dtype="float64"),
    "facts": pd.Series(dtype="str"),
})


# ---- scorers -------------------------------------------------------------------

def _require_java() -> None:
    if shutil.which("java") is None:
        raise RuntimeError("java not found on PATH: METEOR and the coco protocol's PTB tokenizer need a Java runtime")


@contextmanager
def meteor_scorer():
    """pycocoevalcap's METEOR: one Java process, reusable across calls, ended on exit."""
    _require_java()
    meteor = Meteor()
    try:
        yield meteor
    finally:
        # Meteor.compute_score keeps its lock when the JVM fails mid-call; Meteor.__del__ would then block forever.
        if meteor.lock.locked():
            meteor.lock.release()
        meteor.meteor_p.kill()
        meteor.meteor_p.communicate()


def _run_meteor(meteor: Meteor, gts: dict, res: dict) -> tuple[float, list[float]]:
    try:
        return meteor.compute_score(gts, res)
    except (OSError, ValueError) as e:  # a closed pipe, or EOF where a score should be
        proc = meteor.meteor_p
        said = proc.stderr.read().decode(errors="replace").strip().splitlines() if proc.poll() is not None else []
        raise RuntimeError(f"METEOR's Java process failed (exit code {proc.poll()}): "
                           f"{said[-1] if said else type(e).__name__}") from e


def _tokenize(predictions: list[str], references: list[str], protocol: str) -> tuple[list[str], list[str]]:
    predictions = [" ".join((p or "").split()) for p in predictions]
    references = [" ".join((r or "").split()) for r in references]
    if protocol == "videorecap":
        return [p.lower() for p in predictions], [r.lower() for r in references]
    _require_java()
    # One JVM for both sides: each key holds its prediction, then its reference.
    tokens = PTBTokenizer().tokenize({i: [{"caption": p}, {"caption": r}]
                                      for i, (p, r) in enumerate(zip(predictions, references))})
    return [tokens[i][0] for i in range(len(predictions))], [tokens[i][1] for i in range(len(references))]


def score_pairs(predictions: list[str], references: list[str], protocol: str = "videorecap",
                meteor: Meteor | None = None) -> dict[str, tuple[float, np.ndarray]]:
    """Per metric, the corpus score and the per-pair scores (x100) of predictions against one reference each.

    `meteor` is a scorer from `meteor_scorer()` to reuse; without one, a JVM is started and ended here.
    CIDEr's IDF comes from the references of this call, so a single pair always scores 0.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; expected one of {', '.join(PROTOCOLS)}")
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not predictions:
        return {name: (float("nan"), np.empty(0)) for name in METRICS}
    hyps, refs = _tokenize(list(predictions), list(references), protocol)
    res = {i: [h] for i, h in enumerate(hyps)}
    gts = {i: [r] for i, r in enumerate(refs)}
    scores = {"CIDEr": Cider().compute_score(gts, res), "ROUGE_L": Rouge().compute_score(gts, res)}
    if meteor is None:
        with meteor_scorer() as own:
            scores["METEOR"] = _run_meteor(own, gts, res)
    else:
        scores["METEOR"] = _run_meteor(meteor, gts, res)
    return {name: (SCALE * float(corpus), SCALE * np.asarray(each, dtype=float))
            for name, (corpus, each) in scores.items()}


def evaluate_pairs(predictions: list[str], references: list[str], protocol: str = "videorecap",
                   meteor: Meteor | None = None) -> dict[str, float]:
    """Corpus CIDEr, ROUGE_L and METEOR (x100) of predictions against one reference each."""
    return {name: corpus for name, (corpus, _) in score_pairs(predictions, references, protocol, meteor).items()}


def _edit_distance(a: list, b: list) -> int:
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (x != y))
    return row[-1]


def _object_f1(predicted: list[str], true: list[str]) -> float:
    common = sum(min(predicted.count(o), true.count(o)) for o in set(true))
    return 2 * common / (len(predicted) + len(true)) if predicted or true else 1.0


def _semantic_pair(level: str, got: dict | None, true: dict) -> dict[str, float]:
    """Per-pair semantic scores: 1/0 hits (x100 later), F1, or an edit distance."""
    if level == "clip":
        hits = {k: float(got is not None and got[k] == true[k]) for k in ("action", "colour", "shape")}
        return {**hits, "all_three": float(all(hits.values()))}
    if level == "segment":
        return {"activity": float(got is not None and got["activity"] == true["activity"]),
                "object_f1": _object_f1(got["objects"], true["objects"]) if got else 0.0}
    sequence = got["activities"] if got else []
    return {"place": float(got is not None and got["place"] == true["place"]),
            "sequence_exact": float(sequence == true["activities"]),
            "sequence_edit": float(_edit_distance(sequence, true["activities"]))}


def semantic_pairs(level: str, predictions: list[str], facts: list[str]) -> pd.DataFrame:
    """One row per pair: the semantic scores of `level` and `parsed` (x100 but the edit distance)."""
    rows = []
    for prediction, true in zip(predictions, facts):
        got = parse(level, prediction)
        row = _semantic_pair(level, got, json.loads(true))
        rows.append({k: v if k == "sequence_edit" else SCALE * v for k, v in row.items()} |
                    {"parsed": SCALE * (got is not None)})
    return pd.DataFrame(rows, columns=[*SEMANTIC[level], "parsed"], dtype=float)


def semantic_scores(level: str, predictions: list[str], facts: list[str]) -> dict[str, float]:
    """Corpus semantic scores of predictions against the facts (JSON) of their references, and `distinct`."""
    return {**semantic_pairs(level, predictions, facts).mean().to_dict(), "distinct": float(len(set(predictions)))}


# ---- matching predictions to ground truth ------------------------------------------

def _match_video(rows: pd.DataFrame) -> pd.DataFrame:
    """One video's ground-truth windows, each with its best prediction (Dask passes the video id as `.name`)."""
    gt = rows[rows["is_ref"]].sort_values(["start_s", "end_s"])
    pred = rows[~rows["is_ref"]]
    pred = pred.assign(mid=(pred["start_s"] + pred["end_s"]) / 2).sort_values("mid", kind="stable")
    mids, starts, ends = pred["mid"].to_numpy(), pred["start_s"].to_numpy(), pred["end_s"].to_numpy()
    texts = pred["text"].fillna("").to_numpy()
    # IoU >= 0.5 puts the prediction's midpoint inside the ground-truth window: otherwise their overlap
    # is under half the prediction, and 3 * overlap < len(gt) + len(pred). Only those are candidates.
    lo = np.searchsorted(mids, gt["start_s"].to_numpy(), side="left")
    hi = np.searchsorted(mids, gt["end_s"].to_numpy(), side="right")
    prediction, best_iou = [], []
    for g_start, g_end, a, b in zip(gt["start_s"], gt["end_s"], lo, hi):
        inter = np.clip(np.minimum(g_end, ends[a:b]) - np.maximum(g_start, starts[a:b]), 0, None)
        iou = inter / ((g_end - g_start) + (ends[a:b] - starts[a:b]) - inter)
        k = int(np.argmax(iou)) if b > a else -1
        matched = k >= 0 and iou[k] >= MIN_IOU
        prediction.append(texts[a + k] if matched else None)
        best_iou.append(float(iou[k]) if matched else np.nan)
    return pd.DataFrame({
        "video_id": rows.name, "start_s": gt["start_s"].to_numpy(), "end_s": gt["end_s"].to_numpy(),
        "reference": gt["text"].fillna("").to_numpy(), "prediction": prediction, "iou": best_iou,
        "facts": gt["facts"].to_numpy(),
    }).astype(_PAIRS_META.dtypes.to_dict())


def match_windows(store: Store, level: str, version: str, split: str = "test") -> pd.DataFrame:
    """Every ground-truth window of the split with its matched prediction.

    Columns video_id, start_s, end_s, reference, prediction, iou, facts; prediction and iou are null
    where the window is missing, facts where the ground truth has none. Sorted by video and start.
    """
    gt_rel, pred_rel = groundtruth_rel(level), captions_dir(level, version)
    if not store.exists(gt_rel):
        raise FileNotFoundError(f"{store.url(gt_rel)}: no {level} ground truth")
    if not store.listdir(pred_rel):
        raise FileNotFoundError(f"{store.url(pred_rel)}: no committed {level} captions of version {version}")
    columns = ["video_id", "start_s", "end_s", "text"]
    gt = read_groundtruth(store, level, split).select([*columns, "facts"]).to_pandas()
    gt = dd.from_pandas(gt, npartitions=max(1, len(gt) // 100_000))
    pred = dd.read_parquet(store.url(pred_rel), columns=columns).assign(facts=None)
    rows = dd.concat([gt.assign(is_ref=True), pred.assign(is_ref=False)])
    pairs = rows.groupby("video_id").apply(_match_video, meta=_PAIRS_META).compute().reset_index(drop=True)
    if pairs.empty:
        raise ValueError(f"{store.url(gt_rel)}: no ground truth in split {split!r}")
    return pairs.sort_values(["video_id", "start_s", "end_s"]).reset_index(drop=True)


# ---- levels and metric tables ----------------------------------------------------------

def evaluate_level(store: Store, level: str, version: str, split: str = "test", protocol: str = "videorecap",
                   by: str | None = None, meteor: Meteor | None = None) -> pd.DataFrame:
    """Scores (x100) of one caption level and version against the split's ground truth.

    One corpus row per metric (video_id null), semantic ones included where the ground truth has
    facts; with by="video", also one row per metric and
    ground-truth video, holding the mean of its per-caption scores (NaN when all its windows
    are missing). n_pairs counts matched windows, n_missing ground-truth windows without a prediction.
    """
    if by not in (None, "video"):
        raise ValueError(f"by must be None or 'video', not {by!r}")
    pairs = match_windows(store, level, version, split)
    found = pairs[pairs["iou"].notna()]
    scores = score_pairs(found["prediction"].tolist(), found["reference"].tolist(), protocol, meteor)
    base = {"level": level, "version": version, "split": split, "protocol": protocol, "computed_at": now_iso()}
    each = pd.DataFrame({name: each for name, (_, each) in scores.items()}, index=found.index)
    corpus = {name: corpus for name, (corpus, _) in scores.items()}
    if len(found) and found["facts"].notna().all():
        semantic = semantic_pairs(level, found["prediction"].tolist(), found["facts"].tolist()).set_index(found.index)
        each = each.join(semantic)
        corpus |= semantic.mean().to_dict() | {"distinct": float(found["prediction"].nunique())}
    rows = [{**base, "metric": name, "value": value, "n_pairs": len(found), "n_missing": len(pairs) - len(found),
             "video_id": None} for name, value in corpus.items()]
    if by == "video":
        per_caption = pairs.join(each)
        for video_id, video in per_caption.groupby("video_id", sort=True):
            n_pairs = int(video["iou"].notna().sum())
            values = {name: video[name].mean() for name in corpus if name != "distinct"}
            if "distinct" in corpus:
                values["distinct"] = float(video["prediction"].dropna().nunique())
            rows += [{**base, "metric": name, "value": value, "n_pairs": n_pairs,
                      "n_missing": len(video) - n_pairs, "video_id": video_id} for name, value in values.items()]
    return pd.DataFrame(rows, columns=[n for n in METRICS_SCHEMA.names if n != "run"])


def write_metrics(store: Store, df: pd.DataFrame, name: str) -> str:
    """Write evaluation rows, with run = name, atomically to metrics/<name>.parquet; returns that path."""
    rel = f"metrics/{check_name(name, 'metrics name')}.parquet"
    frame = df.assign(run=name)[METRICS_SCHEMA.names]
    store.write_table(rel, pa.Table.from_pandas(frame, schema=METRICS_SCHEMA, preserve_index=False))
    return rel


def format_metrics(df: pd.DataFrame) -> str:
    """A plain-text table per level, version, split and protocol: the corpus row, then any per-video rows."""
    blocks = []
    for (level, version, split, protocol), group in df.groupby(["level", "version", "split", "protocol"], sort=False):
        group = group.assign(row=group["video_id"].fillna("(corpus)"))
        order = ["(corpus)"] + sorted(set(group["row"]) - {"(corpus)"})
        names = [m for m in (*METRICS, *SEMANTIC.get(level, ()), *COUNTS) if m in set(group["metric"])]
        table = group.pivot(index="row", columns="metric", values="value").reindex(index=order, columns=names)
        counts = group.drop_duplicates("row").set_index("row")[["n_pairs", "n_missing"]]
        table = table.join(counts.rename(columns={"n_pairs": "pairs", "n_missing": "missing"}))
        table.index.name = None
        header = f"{level} captions, version {version}, split {split}, protocol {protocol} (scores x100)"
        blocks.append(f"{header}\n{table.to_string(float_format='{:.2f}'.format, na_rep='n/a')}")
    return "\n\n".join(blocks)
