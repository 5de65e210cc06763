"""Training a ReCap model: the loop one worker runs, from examples in the store to checkpoints in it.

`pipeline.train` resolves the inputs into a `TrainPlan`; `train_worker(plan)` runs the epochs in
this process, or as one of several Ray Train workers (DDP over torch.distributed, which Ray sets up).

checkpoints/<level>/<run>/
    tokenizer/          the run's tokenizer, committed by the driver before training starts
    epoch-NNNN/         our checkpoint format + train_state.pt (optimizer, scheduler, epoch, loss history);
                        committed atomically every epoch; only the newest is kept
    losses.parquet      train loss per step and val loss per epoch; losses.png plots them

Randomness is a function of (seed, epoch, rank): every epoch reseeds torch (dropout) and draws its
batch order from its own generator, so a run resumed after epoch k repeats exactly what an
uninterrupted run does after epoch k.
"""

from __future__ import annotations

import io
import math
import re
import sys
import time
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from models import checkpoint
from models.recap import RecapConfig, RecapModel
from models.tokenizer import Tokenizer
from stages.examples import Example, ExampleReader, collate
from store import FeatureSet, Store

SIZES = ("base", "demo", "tiny")
FREEZE = ("official", "none")

# `demo`: small enough to train from scratch on 2 CPU cores in minutes. Widths, then per level
# (features per example, video queries, text queries); clip examples take all tokens of a window.
# Trained from scratch, the official layout underfits: each of these was measured on the demo
# corpus (docs/caption-accuracy.md): cross-attention in every Q-Former layer, open decoder gates,
# a LayerNorm on the text context, learned positions of the clip level's tokens (`level_config`), no dropout.
DEMO_WIDTHS = dict(qformer_hidden_size=128, qformer_num_layers=2, qformer_num_heads=4, qformer_intermediate_size=256,
                   qformer_cross_attention_freq=1, gate_init=1.0, dropout=0.0, text_context_norm=True,
                   qformer_vocab_size=30, qformer_max_positions=16,
                   n_positions=256, n_embd=128, n_layer=3, n_head=4, n_inner=512)
DEMO_LEVELS = {"clip": dict(num_video_queries=16),
               "segment": dict(num_video_feat=16, num_video_queries=8, num_text_queries=32),
               "video": dict(num_video_feat=32, num_video_queries=16, num_text_queries=96)}

# The version of how `level_config` builds a model from a size; part of every run's name, so a change
# trains anew instead of resuming an incompatible checkpoint. 3: the demo size's changes above; 4: 96 text
# queries at the video level (a summary copies 3-6 descriptions in order; 32 queries garbled them).
MODEL_RULES = 4

# README 1, "trainable sets": what the official training updates when freezing (everything else keeps its init).
OFFICIAL_TRAINABLE = re.compile(
    r"(video_queries|text_queries"
    r"|(video|text)_mapper\.mapper\.bert\.encoder\.layer\.\d+\.crossattention\."
    r"|text_decoder\.transformer\.h\.\d+\.(crossattention|ln_cross_attn|mlp_crossattention|ln_2_crossattention"
    r"|alpha_cattn|alpha_dense|ln_1|ln_2)\b)")

EXAMPLE_CACHE_BYTES = 2 << 30  # per worker: examples read once stay in memory up to this much
PROGRESS_EVERY_S = 5.0

HISTORY_SCHEMA = pa.schema([("epoch", pa.int64()), ("step", pa.int64()), ("split", pa.string()),
                            ("level", pa.string()), ("loss", pa.float64()), ("lr", pa.float64())])


# ---- model ----------------------------------------------------------------------

def sized_config(size: str, level: str) -> RecapConfig:
    """The official configuration of a level, at a model size (base = official, tiny = the reference fixtures')."""
    if size not in SIZES:
        raise ValueError(f"unknown model size {size!r}; expected one of {', '.join(SIZES)}")
    config = RecapConfig.preset(level, tiny=size == "tiny")
    return config.with_overrides({**DEMO_WIDTHS, **DEMO_LEVELS[level]}) if size == "demo" else config


def level_config(size: str, level: str, feature_dim: int, tokens_per_window: int, tokenizer: Tokenizer,
                 init: RecapConfig | None = None, recursive: bool = True) -> RecapConfig:
    """The model trained here: an init checkpoint's widths (else the size's), the level's query and feature
    counts at `size`, fed stored features (no pixel tower), with the tokenizer's vocabulary. ReCap-U takes
    the video level's counts. Not `recursive`: no text mapper (the non-recursive baseline)."""
    sized = sized_config(size, "video" if level == "unified" else level)
    num_feat = tokens_per_window if level == "clip" else sized.num_video_feat
    return (init or sized).with_overrides({
        "level": level, "video_feature_type": "cls", "vision": None, "video_feature_width": feature_dim,
        "num_video_feat": num_feat, "video_positions": num_feat if size == "demo" and level == "clip" else 0,
        "num_video_queries": sized.num_video_queries,
        "num_text_queries": sized.num_text_queries if recursive else 0,
        "max_gen_tokens": sized.max_gen_tokens, "vocab_size": tokenizer.vocab_size,
        "bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id})


def query_rows(n: int, k: int) -> np.ndarray:
    """Rows of n learned queries that make k (README 4.7): the official arange(0, n, n/(k+1))[1:],
    which also repeats rows when k > n."""
    return np.arange(0, n, n / (k + 1)).astype(int)[1:k + 1]


def load_init(model: RecapModel, path: str) -> list[str]:
    """Copy an init checkpoint's tensors (our folder or an official .pth) into `model`; query counts that
    differ are subsampled. Tensors the init lacks (the text mapper of a clip checkpoint) keep their fresh
    init. Returns what was adapted."""
    source = (checkpoint.load(path)[0] if Path(path).is_dir() else RecapModel.from_official(path)).state_dict()
    own = model.state_dict()
    notes = []
    with torch.no_grad():
        for name, tensor in own.items():
            value = source.get(name)
            if value is None:
                continue
            if name.endswith("_queries") and value.shape[0] != tensor.shape[0] and value.shape[1:] == tensor.shape[1:]:
                notes.append(f"{name}: {value.shape[0]} -> {tensor.shape[0]} rows")
                value = value[torch.from_numpy(query_rows(value.shape[0], tensor.shape[0]))]
            if name == "video_position.weight" and value.shape != tensor.shape:
                notes.append(f"{name}: {value.shape[0]} -> {tensor.shape[0]} rows, freshly initialised")
                continue
            if value.shape != tensor.shape:
                raise ValueError(f"{path}: {name} has shape {list(value.shape)}; the {model.config.level} model "
                                 f"trained here needs {list(tensor.shape)}")
            tensor.copy_(value)
    notes += [f"{top}: freshly initialised" for top in sorted({n.split(".")[0] for n in own if n not in source})]
    notes += [f"{top}: not used" for top in sorted({n.split(".")[0] for n in source if n not in own})]
    return notes


def set_trainable(model: RecapModel, freeze: str) -> None:
    """`official`: what the official training updates; `none`: everything. The pixel tower never trains
    (training reads features it computed)."""
    if freeze not in FREEZE:
        raise ValueError(f"unknown freeze policy {freeze!r}; expected one of {', '.join(FREEZE)}")
    for name, p in model.named_parameters():
        p.requires_grad = not name.startswith("vision_model.") and (
            freeze == "none" or OFFICIAL_TRAINABLE.match(name) is not None)


def param_groups(model: RecapModel, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: not on biases, norms, gates or the learned queries."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or name.endswith("_queries") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def warmup_cosine(total_steps: int, warmup_frac: float):
    """LR factor per step: linear warm-up over `warmup_frac` of the steps, then cosine decay to 0."""
    warmup = max(1, round(warmup_frac * total_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total_steps - warmup))))
    return factor


# ---- data -----------------------------------------------------------------------

@dataclass(frozen=True)
class Item:
    """One training example before reading features: a ground-truth caption and its window."""

    video_id: str
    start_s: float
    end_s: float
    target: str


@dataclass
class TrainPlan:
    """Everything a worker needs, resolved by the driver."""

    store: str
    level: str                       # clip | segment | video | unified
    run_dir: str                     # store-relative: checkpoints/<level>/<run>
    features: str                    # feature set name
    settings: object                 # pipeline TrainConfig
    model: dict                      # RecapConfig of a fresh model
    init_from: str | None            # checkpoint folder or official .pth
    train: dict[str, list[Item]]     # per caption level trained (several for ReCap-U)
    val: dict[str, list[Item]]
    lower: dict[str, dict[str, list[tuple[float, float, str]]]]  # level -> video -> lower captions; {}: non-recursive
    num_feat: dict[str, int]         # CLS rows per segment / video example


class Examples:
    """The examples of one level and split, read from the store on first use and then kept in memory."""

    def __init__(self, reader: ExampleReader, items: list[Item], lower: dict | None):
        """`lower`: video -> lower-level captions; None above the clip level trains on video features alone."""
        self.reader, self.items, self.lower = reader, items, lower
        self.cache: dict[int, Example] = {}
        self.cached_bytes = 0

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Example:
        if i in self.cache:
            return self.cache[i]
        item = self.items[i]
        if self.reader.level == "clip":
            example = self.reader.clip(item.video_id, [(item.start_s, item.end_s)], [item.target])[0]
        elif self.lower is None:
            example = replace(self.reader.span(item.video_id, item.start_s, item.end_s, [], item.target), text=None)
        else:
            example = self.reader.span(item.video_id, item.start_s, item.end_s, self.lower[item.video_id],
                                       item.target)
        if self.cached_bytes + example.video.nbytes <= EXAMPLE_CACHE_BYTES:
            self.cache[i] = example
            self.cached_bytes += example.video.nbytes
        return example


def epoch_batches(sizes: dict[str, int], batch_size: int, seed: int, epoch: int, world: int):
    """(level, example indices) of every global batch of an epoch, the same on every rank. Each level is
    shuffled on its own; levels alternate batch by batch (ReCap-U). A last batch too small to give every
    rank an example is dropped."""
    per_level = []
    for index, (level, n) in enumerate(sizes.items()):
        order = np.random.default_rng([seed, epoch, index]).permutation(n)
        chunks = [order[i:i + batch_size].tolist() for i in range(0, n, batch_size)]
        per_level.append([(level, c) for c in chunks if len(c) >= world])
    return [batches[turn] for turn in range(max(map(len, per_level), default=0))
            for batches in per_level if turn < len(batches)]


# ---- checkpoints ----------------------------------------------------------------

def epoch_dir(run_dir: str, epoch: int) -> str:
    return f"{run_dir}/epoch-{epoch:04d}"


def last_epoch(store: Store, run_dir: str) -> int:
    """The newest committed epoch of a run (0: none)."""
    epochs = [int(name.removeprefix("epoch-")) for name in store.listdir(run_dir) if name.startswith("epoch-")]
    return max(epochs, default=0)


def save_epoch(store: Store, run_dir: str, epoch: int, model: RecapModel, tokenizer: Tokenizer, state: dict) -> str:
    """Commit an epoch's checkpoint folder (hidden temporary name, then rename), then drop the older ones."""
    rel = epoch_dir(run_dir, epoch)
    tmp = store.tmp_name(rel)
    checkpoint.save(model, tokenizer, store.abs(tmp))
    torch.save(state, f"{store.abs(tmp)}/train_state.pt")
    store.replace(tmp, rel)
    for name in store.listdir(run_dir):
        if name.startswith("epoch-") and name != rel.rsplit("/", 1)[1]:
            store.remove(f"{run_dir}/{name}")
    return rel


def write_curves(store: Store, run_dir: str, history: list[dict]) -> None:
    table = pa.Table.from_pylist(history, schema=HISTORY_SCHEMA)
    store.write_table(f"{run_dir}/losses.parquet", table)
    store.write_bytes(f"{run_dir}/losses.png", plot_curves(table, run_dir))


def plot_curves(table: pa.Table, title: str) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    rows = table.to_pandas()
    for level, group in rows.groupby("level"):
        train, val = group[group["split"] == "train"], group[group["split"] == "val"]
        line, = ax.plot(train["step"], train["loss"], alpha=0.35, linewidth=0.8, label=f"{level} train (per step)")
        ax.plot(val["step"], val["loss"], "o-", color=line.get_color(), label=f"{level} val (per epoch)")
    ax.set(xlabel="step", ylabel="loss", title=title, yscale="log")
    ax.legend()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


# ---- the loop -------------------------------------------------------------------

def train_worker(plan: TrainPlan, stream=sys.stderr) -> None:
    """Train the plan's remaining epochs on this worker (rank 0 validates, saves and reports)."""
    Trainer(plan, stream).run()


class Trainer:
    def __init__(self, plan: TrainPlan, stream):
        self.plan, self.s, self.stream = plan, plan.settings, stream
        self.rank, self.world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.store = Store(plan.store)
        self.tokenizer = Tokenizer.load(self.store.abs(f"{plan.run_dir}/tokenizer"))
        self.start = last_epoch(self.store, plan.run_dir)
        self.model = self._model().to(self.device)
        set_trainable(self.model, self.s.freeze)
        # Unused parameters: clip batches skip the text mapper, and the Q-Formers' token embeddings are never
        # read. The buffers (causal masks) are constants, so there is nothing to broadcast every step.
        self.net = (DistributedDataParallel(self.model, find_unused_parameters=True, broadcast_buffers=False)
                    if self.world > 1 else self.model)
        features = FeatureSet(self.store, plan.features)
        self.data = {split: {level: Examples(ExampleReader(features, level, plan.num_feat.get(level, 0)),
                                             items, plan.lower.get(level))
                             for level, items in by_level.items()}
                     for split, by_level in (("train", plan.train), ("val", plan.val))}
        self.sizes = {level: len(examples) for level, examples in self.data["train"].items()}
        self.steps_per_epoch = len(epoch_batches(self.sizes, self.s.batch_size, self.s.seed, 1, self.world))
        self.optimizer = torch.optim.AdamW(param_groups(self.model, self.s.weight_decay), lr=self.s.lr)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, warmup_cosine(self.steps_per_epoch * self.s.epochs, self.s.warmup_frac))
        self.history: list[dict] = []
        if self.start:
            state = torch.load(self.store.abs(f"{epoch_dir(plan.run_dir, self.start)}/train_state.pt"),
                               weights_only=True)
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.history = state["history"]

    def say(self, line: str) -> None:
        if self.rank == 0:
            print(f"[train {self.plan.level}] {line}", file=self.stream, flush=True)

    def _model(self) -> RecapModel:
        if self.start:
            self.say(f"resuming after epoch {self.start} ({epoch_dir(self.plan.run_dir, self.start)})")
            return checkpoint.load(self.store.abs(epoch_dir(self.plan.run_dir, self.start)))[0]
        torch.manual_seed(self.s.seed)
        model = RecapModel(RecapConfig.from_dict(self.plan.model))
        if self.plan.init_from:
            notes = load_init(model, self.plan.init_from)
            self.say(f"init from {self.plan.init_from}: {'; '.join(notes) or 'every tensor as it is'}")
        return model

    def run(self) -> None:
        if self.rank == 0:
            self.store.remove_temporaries(self.plan.run_dir)  # saves a killed run never renamed
        params = sum(p.numel() for p in self.model.parameters())
        trained = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        self.say(f"{', '.join(f'{n} {level}' for level, n in self.sizes.items())} training examples; "
                 f"{params / 1e6:.2f} M parameters ({trained / 1e6:.2f} M trained, freeze={self.s.freeze}); "
                 f"{self.steps_per_epoch} steps x {self.s.epochs} epochs on {self.world} worker(s), {self.device}")
        self.clock, self.steps_done, self.last_print = time.monotonic(), 0, time.monotonic()
        for epoch in range(self.start + 1, self.s.epochs + 1):
            train_loss = self.train_epoch(epoch)
            if self.rank == 0:
                self.end_epoch(epoch, train_loss)

    def train_epoch(self, epoch: int) -> float:
        torch.manual_seed(int(np.random.SeedSequence([self.s.seed, epoch, self.rank]).generate_state(1)[0]))
        self.net.train()
        losses = []
        for i, (level, indices) in enumerate(epoch_batches(self.sizes, self.s.batch_size, self.s.seed, epoch,
                                                           self.world)):
            loss = self.loss([self.data["train"][level][j] for j in indices[self.rank::self.world]], self.net)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.s.grad_clip)
            self.optimizer.step()
            self.scheduler.step()
            loss = loss.detach()
            if self.world > 1:
                dist.all_reduce(loss, op=dist.ReduceOp.AVG)
            losses.append(loss.item())
            self.history.append({"epoch": epoch, "step": (epoch - 1) * self.steps_per_epoch + i + 1, "split": "train",
                                 "level": level, "loss": losses[-1], "lr": self.scheduler.get_last_lr()[0]})
            self.progress(epoch, i + 1, losses[-1])
        return float(np.mean(losses))

    def loss(self, examples: list[Example], net) -> torch.Tensor:
        batch = collate(examples, self.tokenizer, max_text_tokens=min(512, self.model.config.n_positions),
                        max_target_tokens=self.model.config.max_gen_tokens)
        batch = {k: v.to(self.device) for k, v in batch.items()}
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            return net(**batch).loss

    def progress(self, epoch: int, step: int, loss: float) -> None:
        self.steps_done += 1
        now = time.monotonic()
        if now - self.last_print < PROGRESS_EVERY_S:
            return
        self.last_print = now
        rate = self.steps_done / (now - self.clock)
        left = (self.s.epochs - epoch + 1) * self.steps_per_epoch - step
        self.say(f"epoch {epoch}/{self.s.epochs} | step {step}/{self.steps_per_epoch} | loss {loss:.4f} | "
                 f"{rate:.1f} it/s | ETA {timedelta(seconds=round(left / rate))}")

    def end_epoch(self, epoch: int, train_loss: float) -> None:
        val = {level: self.validation_loss(examples) for level, examples in self.data["val"].items() if len(examples)}
        self.history += [{"epoch": epoch, "step": epoch * self.steps_per_epoch, "split": "val", "level": level,
                          "loss": loss, "lr": self.scheduler.get_last_lr()[0]} for level, loss in val.items()]
        state = {"epoch": epoch, "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                 "history": self.history}
        rel = save_epoch(self.store, self.plan.run_dir, epoch, self.model, self.tokenizer, state)
        write_curves(self.store, self.plan.run_dir, self.history)
        val_text = ", ".join(f"{level} {loss:.4f}" for level, loss in val.items()) or "no val split"
        self.say(f"epoch {epoch}/{self.s.epochs} | train loss {train_loss:.4f} | val loss {val_text} | "
                 f"{timedelta(seconds=round(time.monotonic() - self.clock))} | saved {rel}")

    @torch.no_grad()
    def validation_loss(self, examples: Examples) -> float:
        """The training loss over the val examples in order, averaged over examples."""
        self.model.eval()
        total = 0.0
        for i in range(0, len(examples), self.s.batch_size):
            chunk = [examples[j] for j in range(i, min(i + self.s.batch_size, len(examples)))]
            total += self.loss(chunk, self.model).item() * len(chunk)
        return total / len(examples)
