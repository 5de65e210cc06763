"""`recap ecs`: train ExCae's expertized caption selection (models.ecs) on the train split and measure text-to-video
and text-to-segment retrieval on the test split, against the arms it builds on.

Units come from the current index (stages.index) and, optionally, enhanced captions (`recap enhance`):
  a video:   its windows (the index's clip-row video embeddings) and its captions (every index row's text
             embedding, and the first K enhanced captions of each of its enhanced units);
  a segment: the windows whose middle lies in its span, its own description, the clip captions inside, and the
             first K enhanced captions of each enhanced unit of level segment or clip inside.
Queries: the corpus's held-out query sentences (synth.queries) of the video and segment levels, embedded by the
index's text tower. Training pairs each train-split query with its unit (its video; the segment row of its video
overlapping it most, IoU >= 0.5) under a symmetric InfoNCE, plus `balance_weight` times the load-balancing loss.
The test split's queries are ranked as `recap evaluate --task retrieval` ranks them: a video query's one relevant
video is its own; a segment query's relevant segments are those with its facts (pipeline.retrieval).

Arms (table rows): windows (the video embedding alone), + captions (mean fusion with the ReCap captions), + the
enhanced captions of each version given (mean fusion), and ECS over the tokens of the last arm.
"""

from __future__ import annotations

import io
import os
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd
import pyarrow as pa
import torch
import torch.nn.functional as F

from models.ecs import CAPTION, WINDOW, EcsConfig, ExpertSelection, load_balance
from pipeline.config import EcsSettings
from pipeline.retrieval import MIN_IOU, first_hit_rank, overlaps, rank_metrics, relevant_spans, restrict
from store import Store, read_groundtruth, read_queries
from store.index import IndexRows, read_index

LEVEL_OF_TASK = {"text-to-video": "video", "text-to-segment": "segment"}


@dataclass
class Units:
    """Token sets of the video and segment units of some videos: unit u's tokens are tokens[offsets[u]:offsets[u+1]]."""

    video_id: list[str] = field(default_factory=list)
    level: list[str] = field(default_factory=list)
    start: list[float] = field(default_factory=list)
    end: list[float] = field(default_factory=list)
    tokens: list[np.ndarray] = field(default_factory=list)   # per unit (n, E) float32
    kinds: list[np.ndarray] = field(default_factory=list)    # per unit (n,) WINDOW | CAPTION

    def add(self, video_id, level, start, end, windows, captions):
        if not len(windows) and not len(captions):  # nothing to fuse: not a candidate
            return
        self.video_id.append(video_id)
        self.level.append(level)
        self.start.append(float(start))
        self.end.append(float(end))
        self.tokens.append(np.concatenate([windows, captions]).astype(np.float32))
        self.kinds.append(np.repeat([WINDOW, CAPTION], [len(windows), len(captions)]))

    def batch(self, indices) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Padded (tokens (B, N, E), kinds (B, N), mask (B, N)) of the chosen units."""
        n = max(len(self.tokens[i]) for i in indices)
        dim = self.tokens[indices[0]].shape[1]
        tokens, kinds, mask = np.zeros((len(indices), n, dim), np.float32), np.zeros((len(indices), n), np.int64), \
            np.zeros((len(indices), n), bool)
        for row, i in enumerate(indices):
            k = len(self.tokens[i])
            tokens[row, :k], kinds[row, :k], mask[row, :k] = self.tokens[i], self.kinds[i], True
        return torch.from_numpy(tokens), torch.from_numpy(kinds), torch.from_numpy(mask)


@dataclass
class Enhanced:
    """Enhanced captions of one version: per video, rows (level, start_s, end_s, k) and their text embeddings."""

    rows: dict[str, pd.DataFrame]
    embeddings: dict[str, np.ndarray]


def read_enhanced(store: Store, version: str, video_ids: list[str], embed_texts) -> Enhanced:
    from stages.enhance import enhanced_rel

    rows, embeddings = {}, {}
    for vid in video_ids:
        table = store.read_table(enhanced_rel(version, vid))
        if table is None:
            continue
        frame = table.select(["level", "start_s", "end_s", "k", "text"]).to_pandas()
        rows[vid], embeddings[vid] = frame, embed_texts(frame["text"].tolist())
    if not rows:
        raise FileNotFoundError(f"{store.url(f'captions/enhanced/{version}')}: no enhanced captions of these "
                                "videos; run `recap enhance`")
    return Enhanced(rows, embeddings)


def build_units(rows: IndexRows, enhanced: Enhanced | None, k: int, use_captions: bool = True) -> Units:
    """The video and segment units of every video of `rows` (see the module docstring); no caption tokens when
    `use_captions` is False; the enhanced captions numbered below `k` of each enhanced unit."""
    units = Units()
    levels = rows.table["level"].to_numpy(zero_copy_only=False)
    starts, ends = rows.table["start_s"].to_numpy(), rows.table["end_s"].to_numpy()
    text = rows.text.astype(np.float32)
    for v, vid in enumerate(rows.video_ids):
        r = np.arange(rows.offsets[v], rows.offsets[v + 1])
        clips = r[levels[r] == "clip"]
        middle = (starts[clips] + ends[clips]) / 2
        window_emb = rows.video[clips].astype(np.float32)
        extra = enhanced.rows.get(vid) if enhanced is not None else None
        if extra is not None:
            chosen = (extra["k"] < k).to_numpy()
            extra_mid = ((extra["start_s"] + extra["end_s"]) / 2).to_numpy()
            extra_levels = extra["level"].to_numpy()
            extra_emb = enhanced.embeddings[vid]
        empty = np.zeros((0, rows.text.shape[1]), np.float32)
        captions = [text[r]] if use_captions else []
        if extra is not None and use_captions:
            captions.append(extra_emb[chosen])
        units.add(vid, "video", starts[r].min(), ends[r].max(), window_emb, np.concatenate([empty, *captions]))
        for s in r[levels[r] == "segment"]:
            inside = (middle >= starts[s]) & (middle < ends[s])
            captions = [text[[s]], text[clips[inside]]] if use_captions else []
            if extra is not None and use_captions:
                extra_inside = chosen & (extra_levels != "video") & (extra_mid >= starts[s]) & (extra_mid < ends[s])
                captions.append(extra_emb[extra_inside])
            units.add(vid, "segment", starts[s], ends[s], window_emb[inside], np.concatenate([empty, *captions]))
    return units


# ---- queries and ranks ---------------------------------------------------------------------------------------

def match_queries(units: Units, queries: pd.DataFrame) -> np.ndarray:
    """Per query (video or segment level) its unit: the video's, or the segment of its video overlapping it most
    with IoU >= MIN_IOU; -1 without one."""
    out = np.full(len(queries), -1)
    by_video: dict[tuple[str, str], list[int]] = {}
    for u, (vid, level) in enumerate(zip(units.video_id, units.level)):
        by_video.setdefault((vid, level), []).append(u)
    for q, row in enumerate(queries.itertuples()):
        best, best_iou = -1, MIN_IOU if row.level == "segment" else -1.0
        for u in by_video.get((row.video_id, row.level), []):
            inter = max(0.0, min(row.end_s, units.end[u]) - max(row.start_s, units.start[u]))
            iou = inter / ((row.end_s - row.start_s) + (units.end[u] - units.start[u]) - inter)
            if iou >= best_iou:
                best, best_iou = u, iou
        out[q] = best
    return out


def unit_ranks(units: Units, embeddings: np.ndarray, queries: pd.DataFrame, query_emb: np.ndarray,
               groundtruth: pd.DataFrame) -> pd.DataFrame:
    """Per test query: task, rank (ties against it), candidates. `embeddings` (units, E) are the units' fused ones."""
    out = []
    level = np.array(units.level)
    for task, unit_level in LEVEL_OF_TASK.items():
        candidates = np.flatnonzero(level == unit_level)
        chosen = queries[queries["level"] == unit_level]
        if not len(chosen) or not len(candidates):
            continue
        scores = embeddings[candidates] @ query_emb[chosen.index.to_numpy()].T
        for j, spans in enumerate(relevant_spans(chosen, groundtruth) if unit_level == "segment"
                                  else [[(vid, 0.0, np.inf)] for vid in chosen["video_id"]]):
            hits = _unit_hits(units, candidates, spans, unit_level)
            out.append((task, first_hit_rank(scores[:, j], hits), len(candidates)))
    return pd.DataFrame(out, columns=["task", "rank", "candidates"])


def _unit_hits(units: Units, candidates: np.ndarray, spans, level: str) -> np.ndarray:
    vids = np.array(units.video_id, dtype=object)[candidates]
    if level == "video":
        return np.isin(vids, [vid for vid, _, _ in spans])
    return overlaps(vids, np.array(units.start)[candidates], np.array(units.end)[candidates], spans)


# ---- training ------------------------------------------------------------------------------------------------

def train_ecs(config: EcsConfig, training: EcsSettings, units: Units, pairs: list[tuple[int, int]],
              query_emb: np.ndarray, say=lambda line: None) -> tuple[ExpertSelection, list[dict]]:
    """`pairs`: (unit, query row of `query_emb`). Returns the model (eval mode) and the loss per epoch."""
    torch.manual_seed(training.seed)
    model = ExpertSelection(config)
    history = []
    if config.active == 0 or not pairs:
        return model.eval(), history
    optimizer = torch.optim.AdamW(model.parameters(), lr=training.lr, weight_decay=training.weight_decay)
    queries = torch.from_numpy(np.asarray(query_emb, np.float32))
    rng = np.random.default_rng(training.seed)
    for epoch in range(1, training.epochs + 1):
        model.train()
        order = rng.permutation(len(pairs))
        losses, balances = [], []
        for i in range(0, len(order), training.batch_size):
            batch = [pairs[j] for j in order[i:i + training.batch_size]]
            if len(batch) < 2:
                continue
            fused, probs, gates = model(*units.batch([u for u, _ in batch]))
            logits = fused @ queries[[q for _, q in batch]].T / training.temperature
            target = torch.arange(len(batch))
            contrastive = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
            balance = load_balance(probs, gates)
            loss = contrastive + training.balance_weight * balance
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(contrastive.item())
            balances.append(balance.item())
        history.append({"epoch": epoch, "loss": float(np.mean(losses)), "balance": float(np.mean(balances))})
        if epoch == 1 or epoch % 10 == 0 or epoch == training.epochs:
            say(f"epoch {epoch}/{training.epochs} | InfoNCE {history[-1]['loss']:.4f} | balance "
                f"{history[-1]['balance']:.3f}")
    return model.eval(), history


@torch.no_grad()
def embed_units(model: ExpertSelection, units: Units, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray | None]:
    """(fused embeddings (units, E), expert usage: the share of units whose gates choose each expert, or None)."""
    fused, chosen = [], []
    for i in range(0, len(units.tokens), batch_size):
        out, _, gates = model(*units.batch(list(range(i, min(i + batch_size, len(units.tokens))))))
        fused.append(out.numpy())
        if gates is not None:
            chosen.append((gates > 0).float().numpy())
    usage = np.concatenate(chosen).mean(axis=0) if chosen else None
    return np.concatenate(fused), usage


# ---- the command ---------------------------------------------------------------------------------------------

@dataclass
class Split:
    units: Units
    queries: pd.DataFrame
    query_emb: np.ndarray


def load_split(store: Store, rows: IndexRows, split: str, enhanced_versions: list[str], k: int, embed_texts,
               use_captions: bool = True) -> Split:
    queries = read_queries(store, split)
    if queries is None or not queries.num_rows:
        raise FileNotFoundError(f"{store.root}: no retrieval queries of split {split!r} (they come with a synthetic "
                                "corpus)")
    queries = queries.to_pandas()
    queries = queries[queries["level"].isin(["video", "segment"])].reset_index(drop=True)
    mine = restrict(rows, sorted(set(queries["video_id"])))
    enhanced = None
    for version in enhanced_versions:  # the last version given is the one used; earlier ones are arms
        enhanced = read_enhanced(store, version, mine.video_ids, embed_texts)
    return Split(build_units(mine, enhanced, k, use_captions), queries, embed_texts(queries["text"].tolist()))


def groundtruth_segments(store: Store, split: str) -> pd.DataFrame:
    table = read_groundtruth(store, "segment", split)
    return table.select(["video_id", "level", "start_s", "end_s", "facts"]).to_pandas()


def evaluate_arm(units: Units, embeddings: np.ndarray, split: Split, groundtruth: pd.DataFrame) -> dict:
    ranks = unit_ranks(units, embeddings, split.queries, split.query_emb, groundtruth)
    out = {}
    for task, group in ranks.groupby("task", sort=False):
        metrics = rank_metrics(group["rank"])
        out |= {f"{task} {m}": metrics[m] for m in ("R@1", "R@5", "R@10", "MdR")}
        out[f"{task} queries"] = len(group)
    return out


def ablation(store: Store, rows: IndexRows, embed_texts, s: EcsSettings, model: ExpertSelection | None = None,
             say=lambda line: None) -> tuple[pd.DataFrame, ExpertSelection, list[dict]]:
    """The arm table (one row per arm: R@1/5/10 and MdR per task, expert usage), the ECS model (`model`, else
    trained here) and its training history."""
    groundtruth = groundtruth_segments(store, "test")
    table = []

    def arm(name: str, split: Split, fusion: ExpertSelection):
        embeddings, usage = embed_units(fusion, split.units)
        table.append({"arm": name, **evaluate_arm(split.units, embeddings, split, groundtruth),
                      "expert usage": "" if usage is None else " ".join(f"{u:.2f}" for u in usage)})

    dim = rows.text.shape[1]
    mean_only = ExpertSelection(EcsConfig(embed_dim=dim, num_experts=1, active=0)).eval()
    arm("windows", load_split(store, rows, "test", [], s.k, embed_texts, use_captions=False), mean_only)
    arm("+ ReCap captions (mean)", load_split(store, rows, "test", [], s.k, embed_texts), mean_only)
    for i, version in enumerate(s.enhanced):
        arm(f"+ {version} K={s.k} (mean)", load_split(store, rows, "test", list(s.enhanced[:i + 1]), s.k, embed_texts),
            mean_only)
    history = []
    if model is None:
        train = load_split(store, rows, "train", list(s.enhanced), s.k, embed_texts)
        pairs = [(int(u), q) for q, u in enumerate(match_queries(train.units, train.queries)) if u >= 0]
        say(f"{len(train.units.tokens)} train units, {len(pairs)} query pairs; {s.experts} experts, {s.active} active")
        config = EcsConfig(embed_dim=dim, num_experts=s.experts, active=s.active, eval_routing=s.eval_routing)
        model, history = train_ecs(config, s, train.units, pairs, train.query_emb, say)
    c = model.config
    arm(f"+ ECS ({c.active} of {c.num_experts}, {c.eval_routing})",
        load_split(store, rows, "test", list(s.enhanced), s.k, embed_texts), model)
    return pd.DataFrame(table), model, history


RUNS = "checkpoints/ecs"
FUSED = "fused.parquet"  # video_id, level, start_s, end_s, embedding: ECS's embedding of each indexed unit


def fused_table(model: ExpertSelection, store: Store, rows: IndexRows, embed_texts, s: EcsSettings) -> pa.Table:
    """ECS's embedding of every video and segment unit of the index (every split), with the enhanced captions of
    `s.enhanced[-1]` where a video has them."""
    enhanced = read_enhanced(store, s.enhanced[-1], rows.video_ids, embed_texts) if s.enhanced else None
    units = build_units(rows, enhanced, s.k)
    embeddings, _ = embed_units(model, units)
    return pa.table({"video_id": units.video_id, "level": units.level, "start_s": units.start, "end_s": units.end,
                     "embedding": pa.FixedSizeListArray.from_arrays(pa.array(embeddings.astype(np.float32).ravel()),
                                                                    embeddings.shape[1])})


def latest_fused(store: Store, index_version: str) -> pa.Table:
    """The newest ECS run's fused embeddings for this index version (FileNotFoundError if none)."""
    runs = [r for r in store.listdir(RUNS) if store.exists(f"{RUNS}/{r}/{FUSED}")
            and torch.load(store.abs(f"{RUNS}/{r}/ecs.pt"), weights_only=True)["index"] == index_version]
    if not runs:
        raise FileNotFoundError(f"{store.url(RUNS)}: no ECS model of index {index_version}; run `recap ecs`")
    newest = max(runs, key=lambda r: os.path.getmtime(store.abs(f"{RUNS}/{r}/{FUSED}")))
    return store.read_table(f"{RUNS}/{newest}/{FUSED}")


def run_ecs(config, store: Store, stream=None) -> pd.DataFrame:
    """Train ECS on the current index (or load the run's model when trained before), print and write the arm
    table (metrics/ecs-<index version>-<run>.parquet); the table's path is in `.attrs["path"]`."""
    stream = sys.stderr if stream is None else stream  # at the call: --log-file replaces it
    from store import fingerprint

    say = lambda line: print(f"[ecs] {line}", file=stream, flush=True)  # noqa: E731
    began = time.monotonic()
    rows, stage = read_current_index(config, store)
    s = config.ecs
    run = fingerprint(asdict(s), stage.version(), length=12)
    path = f"{RUNS}/{run}/ecs.pt"
    model = None
    if store.exists(path):
        state = torch.load(store.abs(path), weights_only=True)
        model = ExpertSelection(EcsConfig(**state["config"]))
        model.load_state_dict(state["state_dict"])
        model.eval()
        say(f"already trained: {store.abs(path)}")
    table, model, history = ablation(store, rows, stage.embed_texts, s, model, say)
    if history:
        store.write_bytes(path, _saved(model, history, stage.version()))
        say(f"saved {store.abs(path)}")
    if model.config.active and not store.exists(f"{RUNS}/{run}/{FUSED}"):
        store.write_table(f"{RUNS}/{run}/{FUSED}", fused_table(model, store, rows, stage.embed_texts, s))
        say(f"fused embeddings of every indexed video and segment: {store.abs(f'{RUNS}/{run}/{FUSED}')} "
            f"(recap search --fusion ecs)")
    rel = f"metrics/ecs-{stage.version()}-{run}.parquet"
    store.write_table(rel, pa.Table.from_pandas(table, preserve_index=False))
    table.attrs["path"] = store.abs(rel)
    say(f"wrote {table.attrs['path']} | wall {time.monotonic() - began:.1f} s")
    return table


def _saved(model: ExpertSelection, history: list[dict], index_version: str) -> bytes:
    buffer = io.BytesIO()
    torch.save({"config": model.config.to_dict(), "state_dict": model.state_dict(), "history": history,
                "index": index_version}, buffer)
    return buffer.getvalue()


def format_table(table: pd.DataFrame) -> str:
    """One line per arm: R@1 R@5 R@10 (x100) and MdR of each task, then the expert usage."""
    shown = table.set_index("arm").drop(columns=[c for c in table if c.endswith(" queries")])
    shown.columns = [c.replace("text-to-video ", "video ").replace("text-to-segment ", "segment ") for c in shown]
    shown.index.name = None
    queries = " and ".join(f"{int(table[f'text-to-{t} queries'].iloc[0])} {t}"
                           for t in ("video", "segment") if f"text-to-{t} queries" in table)
    return (f"test split, {queries} queries (R@k x100; MdR: median rank of the first relevant result; expert "
            f"usage: the share of units each expert serves)\n{shown.to_string(float_format='{:.1f}'.format)}")


def read_current_index(config, store: Store):
    """(IndexRows, the index stage with its encoder loaded) of the current index version."""
    from pipeline.dag import index_stage

    stage = index_stage(config, store)
    stage.model, stage.tokenizer = stage.load_encoder()
    return read_index(store, stage.version()), stage
