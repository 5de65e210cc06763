"""Contrastive video-text pretraining of the LaViLa dual encoder: the loop one worker runs.

Two phases. The first `epochs` train both towers on the clip narrations, each with its window. The next
`text_epochs` keep the visual tower as it is (its CLS of every train window computed once) and train the text
tower, the projections and the temperature on the narrations and on the train segment descriptions and video
summaries, each paired with the mean of its windows' unit embeddings, renormalised: the index's video embedding
of a span (stages.index). Without the second phase the text tower never reads a place or an activity word. As
the visual tower does not change in it, the features, and so the captions, are those of the first phase alone.
Each phase has its own warm-up and cosine decay; a text epoch's steps are the narration batches and the batches
of each span level, in a seeded random order.

`pipeline.pretrain` resolves the narrations into a `PretrainPlan`; `pretrain_worker(plan)` runs the remaining
epochs here, or as one of several Ray Train workers (DDP; the contrastive batch is gathered across workers, as
LaViLa does, so every worker scores its videos against every worker's texts).

checkpoints/encoder/<run>/
    epoch-NNNN/lavila.pth   the dual encoder in LaViLa's own format ({"state_dict": {"module.*"}, "args",
                            "epoch"}): `recap features --checkpoint` reads its visual tower as it reads
                            the official file
    epoch-NNNN/train_state.pt  optimizer, scheduler, loss history; only the newest epoch is kept
    losses.parquet / .png   train loss per step; val loss and text-to-video R@1 per epoch

LaViLa's recipe: symmetric InfoNCE over the batch, a learned temperature (logit scale initialised at
log(1/0.07), clamped at log(100)), AdamW with warm-up and cosine decay.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass, field
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from models.encoders import LAVILA_MEAN, LAVILA_STD
from models.clip_tokenizer import ClipTokenizer
from models.lavila import DualEncoder, LavilaConfig
from stages.decode import WindowReader
from stages.train import Curves, optimization, warmup_cosine
from store import Store, commit_epoch, epoch_dir, last_epoch

FRAME_CACHE_BYTES = 4 << 30  # per worker: decoded windows stay in memory up to this much, then are decoded again
PROGRESS_EVERY_S = 5.0
MAX_LOGIT_SCALE = math.log(100.0)


@dataclass(frozen=True)
class Narration:
    """One clip narration and the window it describes."""

    uri: str
    start_s: float
    end_s: float
    text: str


@dataclass(frozen=True)
class SpanText:
    """A segment description or video summary and the train narrations whose windows lie inside its span."""

    level: str
    text: str
    windows: tuple[int, ...]   # indices into PretrainPlan.train


@dataclass
class PretrainPlan:
    store: str
    run_dir: str                   # store-relative: checkpoints/encoder/<run>
    settings: object               # pipeline.config.PretrainConfig
    model: dict                    # LavilaConfig of a fresh model
    init_from: str | None          # a LaViLa .pth to start from
    train: list[Narration]
    val: list[Narration]
    spans: list[SpanText] = field(default_factory=list)
    val_spans: list[SpanText] = field(default_factory=list)   # windows index `val`


class WindowFrames:
    """The uint8 frames (T, H, W, 3) of each narration's window. A video's windows are decoded together on
    first use and kept while they fit in FRAME_CACHE_BYTES."""

    def __init__(self, narrations: list[Narration], num_frames: int, size: int):
        self.narrations, self.num_frames, self.size = narrations, num_frames, size
        self.by_video: dict[str, list[int]] = {}
        for i, n in enumerate(narrations):
            self.by_video.setdefault(n.uri, []).append(i)
        self.cache: dict[int, np.ndarray] = {}
        self.cached_bytes = 0

    def __len__(self) -> int:
        return len(self.narrations)

    def __getitem__(self, i: int) -> np.ndarray:
        if i not in self.cache:
            uri = self.narrations[i].uri
            indices = self.by_video[uri]
            windows = np.array([[self.narrations[j].start_s, self.narrations[j].end_s] for j in indices])
            frames = WindowReader(uri, self.size, self.num_frames, windows).read(0, len(indices))
            for j, f in zip(indices, frames):
                if j == i or self.cached_bytes + f.nbytes <= FRAME_CACHE_BYTES:
                    self.cache[j] = f
                    self.cached_bytes += f.nbytes
            if self.cached_bytes > FRAME_CACHE_BYTES:  # this one did not fit: read it, do not keep it
                self.cached_bytes -= self.cache[i].nbytes
                return self.cache.pop(i)
        return self.cache[i]


def contrastive_loss(video: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE: pair i of the batch is the positive of row i and of column i."""
    logits = logit_scale.exp() * video @ text.t()
    target = torch.arange(len(video), device=video.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2


def gather(x: torch.Tensor) -> torch.Tensor:
    """All workers' rows, with gradients flowing back to this worker's own."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x))


@torch.no_grad()
def recall_at_1(video: torch.Tensor, text: torch.Tensor) -> float:
    """Text-to-video: the share of texts whose own window ranks first (ties with identical narrations count)."""
    best = (text @ video.t()).argmax(dim=1)
    return float((best == torch.arange(len(text), device=text.device)).float().mean())


class BothTowers(nn.Module):
    """One forward for both towers and the temperature, so DDP sees the parameters used in its forward. The video
    side is a batch of windows' pixels, or (span pairs) the stored CLS of all windows and each span's indices."""

    def __init__(self, model: DualEncoder):
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor, pixels: torch.Tensor | None = None, cls: torch.Tensor | None = None,
                spans: list[list[int]] | None = None):
        if pixels is not None:
            video = self.model.encode_video(pixels)
        else:
            video = torch.stack([F.normalize(self.model.embed_video_cls(cls[w]).mean(0), dim=-1) for w in spans])
        # a copy, not the leaf: DDP with find_unused_parameters would mark a returned leaf ready twice
        return video, self.model.encode_text(ids), self.model.logit_scale.clone()


def pretrain_worker(plan: PretrainPlan, stream=None) -> None:
    PretrainTrainer(plan, sys.stderr if stream is None else stream).run()


class PretrainTrainer:
    def __init__(self, plan: PretrainPlan, stream):
        self.plan, self.s, self.stream = plan, plan.settings, stream
        self.rank, self.world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.store = Store(plan.store)
        self.start = last_epoch(self.store, plan.run_dir)
        self.model = self._model().to(self.device)
        pair = BothTowers(self.model)
        # text-phase steps leave the visual tower without gradients
        self.net = DistributedDataParallel(pair, find_unused_parameters=self.s.text_epochs > 0) \
            if self.world > 1 else pair
        self.tokenizer = ClipTokenizer()
        visual = self.model.config.vision
        self.frames = {split: WindowFrames(items, visual.num_frames, visual.img_size)
                       for split, items in (("train", plan.train), ("val", plan.val))}
        self.mean, self.std = (torch.tensor(v, device=self.device).view(1, 1, 3, 1, 1)
                               for v in (LAVILA_MEAN, LAVILA_STD))
        self.epochs = self.s.epochs + self.s.text_epochs
        self.steps = (len(self.batches(1)), len(self.batches(self.s.epochs + 1)) if self.s.text_epochs else 0)
        joint, text = (warmup_cosine(steps * epochs, self.s.warmup_frac)
                       for steps, epochs in zip(self.steps, (self.s.epochs, self.s.text_epochs)))
        first_phase = self.steps[0] * self.s.epochs
        self.optimizer, self.scheduler, self.history = optimization(
            self.model, self.s, self.steps[0], self.store, plan.run_dir, self.start,
            factor=lambda step: joint(step) if step < first_phase else text(step - first_phase))
        self.cls = None  # the text phase's CLS of every train window

    def say(self, line: str) -> None:
        if self.rank == 0:
            print(f"[pretrain] {line}", file=self.stream, flush=True)

    def _model(self) -> DualEncoder:
        if self.start:
            path = self.store.abs(f"{epoch_dir(self.plan.run_dir, self.start)}/lavila.pth")
            self.say(f"resuming after epoch {self.start} ({path})")
            return DualEncoder.from_lavila(path, LavilaConfig.from_dict(self.plan.model))
        if self.plan.init_from:
            self.say(f"init from {self.plan.init_from}")
            return DualEncoder.from_lavila(self.plan.init_from, LavilaConfig.from_dict(self.plan.model))
        torch.manual_seed(self.s.seed)
        return DualEncoder(LavilaConfig.from_dict(self.plan.model))

    def text_phase(self, epoch: int) -> bool:
        return epoch > self.s.epochs

    def first_step(self, epoch: int) -> int:
        """Steps taken before `epoch`."""
        joint = min(epoch - 1, self.s.epochs)
        return joint * self.steps[0] + (epoch - 1 - joint) * self.steps[1]

    def batches(self, epoch: int) -> list[tuple[str, list[int]]]:
        """Global batches of an epoch, the same on every rank: ("clip", narration indices), and in the text phase
        (level, span indices) too, in a seeded order; a last batch smaller than the world (or than 2) is dropped."""
        rng = np.random.default_rng([self.s.seed, epoch])
        groups = {"clip": np.arange(len(self.plan.train))}
        for i, span in enumerate(self.plan.spans if self.text_phase(epoch) else []):
            groups.setdefault(span.level, []).append(i)
        out = []
        for kind, items in groups.items():
            order = rng.permutation(np.asarray(items))
            size = self.s.batch_size if kind == "clip" else self.s.span_batch_size
            out += [(kind, order[i:i + size].tolist()) for i in range(0, len(order), size)]
        # every worker gathers as many rows as the others: a batch is cut to a multiple of the world
        out = [(kind, c[:len(c) - len(c) % self.world]) for kind, c in out if len(c) >= max(2, self.world)]
        return [out[i] for i in rng.permutation(len(out))] if self.text_phase(epoch) else out

    def pixels(self, split: str, indices) -> torch.Tensor:
        pixels = torch.from_numpy(np.stack([self.frames[split][i] for i in indices])).to(self.device)
        return (pixels.permute(0, 1, 4, 2, 3).float() - self.mean) / self.std  # (B, T, C, H, W)

    def ids(self, texts: list[str]) -> torch.Tensor:
        return self.tokenizer(texts, self.model.config.context_length).to(self.device)

    def embed(self, split: str, indices: list[int], net) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        narrations = self.plan.train if split == "train" else self.plan.val
        return net(self.ids([narrations[i].text for i in indices]), pixels=self.pixels(split, indices))

    @torch.no_grad()
    def window_cls(self) -> torch.Tensor:
        """The visual tower's CLS of every train window (N, width), for the text phase."""
        self.model.eval()
        n, size = len(self.plan.train), self.s.batch_size
        return torch.cat([self.model.visual(self.pixels("train", range(i, min(i + size, n))))
                          for i in range(0, n, size)])

    def run(self) -> None:
        if self.rank == 0:
            self.store.remove_temporaries(self.plan.run_dir)
        params = sum(p.numel() for p in self.model.parameters())
        text = (f" + {self.steps[1]} x {self.s.text_epochs} text epochs ({len(self.plan.spans)} descriptions and "
                f"summaries)" if self.s.text_epochs else "")
        self.say(f"{len(self.plan.train)} narrations ({len(self.plan.val)} val); {params / 1e6:.2f} M parameters; "
                 f"{self.steps[0]} steps x {self.s.epochs} epochs{text} on {self.world} worker(s), {self.device}")
        self.clock, self.steps_done, self.last_print = time.monotonic(), 0, time.monotonic()
        self.curves = Curves(self.store, self.plan.run_dir)
        for epoch in range(self.start + 1, self.epochs + 1):
            loss = self.train_epoch(epoch)
            if self.rank == 0:
                self.end_epoch(epoch, loss)

    def train_epoch(self, epoch: int) -> float:
        torch.manual_seed(int(np.random.SeedSequence([self.s.seed, epoch, self.rank]).generate_state(1)[0]))
        text_phase = self.text_phase(epoch)
        if text_phase and self.cls is None:
            self.cls = self.window_cls()
        self.net.train()
        losses = []
        for step, (kind, batch) in enumerate(self.batches(epoch), 1):
            indices = batch[self.rank::self.world]
            if not text_phase:
                video, text, logit_scale = self.embed("train", indices, self.net)
            else:
                pairs = [(self.plan.train[i].text, [i]) for i in indices] if kind == "clip" else \
                    [(self.plan.spans[i].text, list(self.plan.spans[i].windows)) for i in indices]
                video, text, logit_scale = self.net(self.ids([t for t, _ in pairs]), cls=self.cls,
                                                    spans=[w for _, w in pairs])
            loss = contrastive_loss(gather(video), gather(text), logit_scale)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.s.grad_clip)
            self.optimizer.step()
            self.scheduler.step()
            with torch.no_grad():
                self.model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
            losses.append(loss.item())
            self.history.append({"epoch": epoch, "step": self.first_step(epoch) + step,
                                 "split": "train", "level": "encoder" if kind == "clip" else f"encoder-{kind}",
                                 "loss": losses[-1],
                                 "lr": self.scheduler.get_last_lr()[0]})
            self.progress(epoch, step, losses[-1])
        return float(np.mean(losses))

    def progress(self, epoch: int, step: int, loss: float) -> None:
        self.steps_done += 1
        now = time.monotonic()
        if now - self.last_print < PROGRESS_EVERY_S:
            return
        self.last_print = now
        rate = self.steps_done / (now - self.clock)
        left = self.first_step(self.epochs + 1) - self.first_step(epoch) - step
        steps = self.steps[self.text_phase(epoch)]
        self.say(f"epoch {epoch}/{self.epochs} | step {step}/{steps} | loss {loss:.4f} | "
                 f"{rate:.1f} it/s | ETA {timedelta(seconds=round(left / rate))}")

    @torch.no_grad()
    def validate(self) -> tuple[float, float, dict[str, float]]:
        """The contrastive loss over val batches, text-to-video R@1 among all val windows, and per span level
        R@1 of its texts among its spans' pooled embeddings."""
        self.model.eval()
        videos, texts = [], []
        for i in range(0, len(self.plan.val), self.s.batch_size):
            v, t, _ = self.embed("val", list(range(i, min(i + self.s.batch_size, len(self.plan.val)))),
                                 BothTowers(self.model))
            videos.append(v)
            texts.append(t)
        video, text = torch.cat(videos), torch.cat(texts)
        loss = float(np.mean([contrastive_loss(v, t, self.model.logit_scale).item()
                              for v, t in zip(videos, texts) if len(v) > 1] or [float("nan")]))
        span_r1 = {}
        for level in dict.fromkeys(s.level for s in self.plan.val_spans):
            spans = [s for s in self.plan.val_spans if s.level == level]
            pooled = torch.stack([F.normalize(video[list(s.windows)].mean(0), dim=-1) for s in spans])
            span_r1[level] = recall_at_1(pooled, self.model.encode_text(self.ids([s.text for s in spans])))
        return loss, recall_at_1(video, text), span_r1

    def end_epoch(self, epoch: int, train_loss: float) -> None:
        val_loss, r1, span_r1 = self.validate() if self.plan.val else (float("nan"), float("nan"), {})
        if self.plan.val:
            self.history.append({"epoch": epoch, "step": self.first_step(epoch + 1), "split": "val",
                                 "level": "encoder", "loss": val_loss, "lr": self.scheduler.get_last_lr()[0]})
        state = {"epoch": epoch, "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                 "history": self.history}

        def write(folder: str) -> None:
            os.makedirs(folder, exist_ok=True)
            self.model.save_lavila(f"{folder}/lavila.pth", epoch)
            torch.save(state, f"{folder}/train_state.pt")

        rel = commit_epoch(self.store, self.plan.run_dir, epoch, write)
        self.curves.write(self.history, last=epoch == self.epochs)
        self.say(f"epoch {epoch}/{self.epochs}{' (text)' if self.text_phase(epoch) else ''} | train loss {train_loss:.4f} | val loss {val_loss:.4f} | "
                 f"val text-to-video R@1 {100 * r1:.1f}% of {len(self.plan.val)} | "
                 + "".join(f"{level} {100 * r:.1f}% | " for level, r in span_r1.items()) +
                 f"{timedelta(seconds=round(time.monotonic() - self.clock))} | saved {rel}")
