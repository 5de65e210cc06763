"""Training a ReCap model: the loop one worker runs, from examples in the store to checkpoints in it.

`pipeline.train` resolves the inputs into a `TrainPlan`; `train_worker(plan)` runs the epochs in
this process, or as one of several Ray Train workers (DDP over torch.distributed, which Ray sets up).

checkpoints/<level>/<run>/
    tokenizer/          the run's tokenizer, committed by the driver before training starts
    epoch-NNNN/         our checkpoint format + train_state.pt (optimizer, scheduler, epoch, loss history);
                        committed atomically every epoch; only the newest is kept
    losses.parquet      train loss per step and val loss per epoch; losses.png plots them (redrawn at most
                        once a minute, and after the last epoch)

Randomness is a function of (seed, epoch, rank): every epoch reseeds torch (dropout) and draws its
batch order from its own generator, so a run resumed after epoch k repeats exactly what an
uninterrupted run does after epoch k.
"""

from __future__ import annotations

import io
import math
import sys
import time
from dataclasses import dataclass, replace
from datetime import timedelta

import numpy as np
import pyarrow as pa
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from models import checkpoint
from models.recap import RecapConfig, RecapModel
from models.tokenizer import Tokenizer
from models.training import load_init, set_trainable
from stages.examples import Example, ExampleReader, collate
from store import FeatureSet, Store, commit_epoch, epoch_dir, last_epoch

EXAMPLE_CACHE_BYTES = 2 << 30  # per worker: examples read once stay in memory up to this much
PROGRESS_EVERY_S = 5.0
LENGTH_GROUP_BATCHES = 50  # group_by_length: batches whose examples are sorted by length together
PLOT_EVERY_S = 60.0

HISTORY_SCHEMA = pa.schema([("epoch", pa.int64()), ("step", pa.int64()), ("split", pa.string()),
                            ("level", pa.string()), ("loss", pa.float64()), ("lr", pa.float64())])


# ---- optimisation ---------------------------------------------------------------

def optimization(model: torch.nn.Module, s, steps_per_epoch: int, store: Store, run_dir: str, start: int,
                 factor=None):
    """AdamW over `param_groups`, warm-up then cosine over the whole run (or the LR `factor` of each step), and
    the loss history; resumed from epoch `start`'s train_state.pt when start > 0. `s` holds lr, weight_decay,
    epochs and warmup_frac."""
    optimizer = torch.optim.AdamW(param_groups(model, s.weight_decay), lr=s.lr)
    factor = factor or warmup_cosine(steps_per_epoch * s.epochs, s.warmup_frac)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    if not start:
        return optimizer, scheduler, []
    state = torch.load(store.abs(f"{epoch_dir(run_dir, start)}/train_state.pt"), weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return optimizer, scheduler, state["history"]


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
    """One training example before reading features: a ground-truth caption and its window; `parts`, where
    set, the (video, start, end) of each lower-level window in the order the caption tells them (a reordered or
    composed summary)."""

    video_id: str
    start_s: float
    end_s: float
    target: str
    parts: tuple[tuple[str, float, float], ...] = ()

    def key(self) -> tuple:
        """What a run's fingerprint reads: `parts` only where set, so that runs without them keep their names."""
        return (self.video_id, self.start_s, self.end_s, self.target) + ((self.parts,) if self.parts else ())


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
        elif item.parts:
            example = self.reader.told(item.parts, self.lower, item.target)
        else:
            example = self.reader.span(item.video_id, item.start_s, item.end_s, self.lower[item.video_id], item.target)
        if self.cached_bytes + example.video.nbytes <= EXAMPLE_CACHE_BYTES:
            self.cache[i] = example
            self.cached_bytes += example.video.nbytes
        return example


def epoch_batches(sizes: dict[str, int], batch_size: int, seed: int, epoch: int, world: int,
                  lengths: dict[str, list[int]] | None = None):
    """(level, example indices) of every global batch of an epoch, the same on every rank. Each level is
    shuffled on its own; levels alternate batch by batch (ReCap-U). A last batch too small to give every
    rank an example is dropped. With `lengths` (each example's target length, per level), batches hold examples
    of like length: each run of LENGTH_GROUP_BATCHES batches of the shuffled order is sorted by length before it
    is cut, and the batches are then shuffled (less padding; as many batches)."""
    per_level = []
    for index, (level, n) in enumerate(sizes.items()):
        rng = np.random.default_rng([seed, epoch, index])
        order = rng.permutation(n)
        if lengths:
            run = LENGTH_GROUP_BATCHES * batch_size
            order = np.concatenate([sorted(order[i:i + run], key=lambda j: lengths[level][j])
                                    for i in range(0, n, run)])
        chunks = [order[i:i + batch_size].tolist() for i in range(0, n, batch_size)]
        if lengths:
            chunks = [chunks[i] for i in rng.permutation(len(chunks))]
        per_level.append([(level, c) for c in chunks if len(c) >= world])
    return [batches[turn] for turn in range(max(map(len, per_level), default=0))
            for batches in per_level if turn < len(batches)]


def write_curves(store: Store, run_dir: str, history: list[dict], plot: bool = True) -> None:
    table = pa.Table.from_pylist(history, schema=HISTORY_SCHEMA)
    store.write_table(f"{run_dir}/losses.parquet", table)
    if plot:
        store.write_bytes(f"{run_dir}/losses.png", plot_curves(table, run_dir))


class Curves:
    """losses.parquet after every epoch; losses.png after the first and the last, and in between at most every
    PLOT_EVERY_S: drawing it takes about 0.5 s, as long as a demo-size epoch (a minute of the demo's 111 epochs)."""

    def __init__(self, store: Store, run_dir: str):
        self.store, self.run_dir, self.plotted = store, run_dir, -math.inf

    def write(self, history: list[dict], last: bool) -> None:
        plot = last or time.monotonic() - self.plotted >= PLOT_EVERY_S
        write_curves(self.store, self.run_dir, history, plot)
        if plot:
            self.plotted = time.monotonic()


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

def train_worker(plan: TrainPlan, stream=None) -> None:
    """Train the plan's remaining epochs on this worker (rank 0 validates, saves and reports)."""
    Trainer(plan, sys.stderr if stream is None else stream).run()


class Trainer:
    def __init__(self, plan: TrainPlan, stream):
        self.plan, self.s, self.stream = plan, plan.settings, stream
        self.rank, self.world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.store = Store(plan.store)
        self.tokenizer = Tokenizer.load(self.store.abs(f"{plan.run_dir}/tokenizer"))
        self.start = last_epoch(self.store, plan.run_dir)
        features = FeatureSet(self.store, plan.features)
        self.data = {split: {level: Examples(ExampleReader(features, level, plan.num_feat.get(level, 0)),
                                             items, plan.lower.get(level))
                             for level, items in by_level.items()}
                     for split, by_level in (("train", plan.train), ("val", plan.val))}
        self.sizes = {level: len(examples) for level, examples in self.data["train"].items()}
        self.lengths = ({level: [len(item.target) for item in items] for level, items in plan.train.items()}
                        if self.s.group_by_length else None)
        self.model = self._model().to(self.device)
        set_trainable(self.model, self.s.freeze)
        # Unused parameters: clip batches skip the text mapper, and the Q-Formers' token embeddings are never
        # read. The buffers (causal masks, feature statistics) are constants: nothing to broadcast every step.
        self.net = (DistributedDataParallel(self.model, find_unused_parameters=True, forward_sync_buffers=False)
                    if self.world > 1 else self.model)
        self.steps_per_epoch = len(epoch_batches(self.sizes, self.s.batch_size, self.s.seed, 1, self.world,
                                                 self.lengths))
        self.optimizer, self.scheduler, self.history = optimization(self.model, self.s, self.steps_per_epoch,
                                                                    self.store, plan.run_dir, self.start)

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
        if model.config.video_feature_norm:
            rows = torch.from_numpy(np.concatenate([e.video[e.video_mask.astype(bool)] for examples
                                                    in self.data["train"].values() for e in examples]))
            model.set_feature_stats(rows)
            axes = "principal axes" if model.config.video_feature_whiten else "per channel"
            self.say(f"features standardised ({axes}) with the statistics of {len(rows)} training rows")
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
        self.curves = Curves(self.store, self.plan.run_dir)
        for epoch in range(self.start + 1, self.s.epochs + 1):
            train_loss = self.train_epoch(epoch)
            if self.rank == 0:
                self.end_epoch(epoch, train_loss)

    def train_epoch(self, epoch: int) -> float:
        torch.manual_seed(int(np.random.SeedSequence([self.s.seed, epoch, self.rank]).generate_state(1)[0]))
        self.net.train()
        losses = []
        for i, (level, indices) in enumerate(epoch_batches(self.sizes, self.s.batch_size, self.s.seed, epoch,
                                                           self.world, self.lengths)):
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
        def write(folder: str) -> None:
            checkpoint.save(self.model, self.tokenizer, folder)
            torch.save(state, f"{folder}/train_state.pt")
        rel = commit_epoch(self.store, self.plan.run_dir, epoch, write)
        self.curves.write(self.history, last=epoch == self.s.epochs)
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
