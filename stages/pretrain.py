"""Contrastive video-text pretraining of the LaViLa dual encoder: the loop one worker runs.

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
from dataclasses import dataclass
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
from stages.train import optimization, write_curves
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


@dataclass
class PretrainPlan:
    store: str
    run_dir: str                   # store-relative: checkpoints/encoder/<run>
    settings: object               # pipeline.config.PretrainConfig
    model: dict                    # LavilaConfig of a fresh model
    init_from: str | None          # a LaViLa .pth to start from
    train: list[Narration]
    val: list[Narration]


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
    """One forward for both towers and the temperature, so DDP sees every parameter used in its forward."""

    def __init__(self, model: DualEncoder):
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor, ids: torch.Tensor):
        return self.model.encode_video(pixels), self.model.encode_text(ids), self.model.logit_scale


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
        self.net = DistributedDataParallel(pair) if self.world > 1 else pair
        self.tokenizer = ClipTokenizer()
        visual = self.model.config.vision
        self.frames = {split: WindowFrames(items, visual.num_frames, visual.img_size)
                       for split, items in (("train", plan.train), ("val", plan.val))}
        self.mean, self.std = (torch.tensor(v, device=self.device).view(1, 1, 3, 1, 1)
                               for v in (LAVILA_MEAN, LAVILA_STD))
        self.steps_per_epoch = len(self.batches(1))
        self.optimizer, self.scheduler, self.history = optimization(self.model, self.s, self.steps_per_epoch,
                                                                    self.store, plan.run_dir, self.start)

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

    def batches(self, epoch: int) -> list[list[int]]:
        """Global batches of an epoch, the same on every rank; a last batch smaller than the world is dropped."""
        order = np.random.default_rng([self.s.seed, epoch]).permutation(len(self.plan.train))
        chunks = [order[i:i + self.s.batch_size].tolist() for i in range(0, len(order), self.s.batch_size)]
        return [c for c in chunks if len(c) >= max(2, self.world)]

    def embed(self, split: str, indices: list[int], net) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pixels = torch.from_numpy(np.stack([self.frames[split][i] for i in indices])).to(self.device)
        pixels = (pixels.permute(0, 1, 4, 2, 3).float() - self.mean) / self.std  # (B, T, C, H, W)
        narrations = self.plan.train if split == "train" else self.plan.val
        ids = self.tokenizer([narrations[i].text for i in indices], self.model.config.context_length)
        return net(pixels, ids.to(self.device))

    def run(self) -> None:
        if self.rank == 0:
            self.store.remove_temporaries(self.plan.run_dir)
        params = sum(p.numel() for p in self.model.parameters())
        self.say(f"{len(self.plan.train)} narrations ({len(self.plan.val)} val); {params / 1e6:.2f} M parameters; "
                 f"{self.steps_per_epoch} steps x {self.s.epochs} epochs on {self.world} worker(s), {self.device}")
        self.clock, self.steps_done, self.last_print = time.monotonic(), 0, time.monotonic()
        for epoch in range(self.start + 1, self.s.epochs + 1):
            loss = self.train_epoch(epoch)
            if self.rank == 0:
                self.end_epoch(epoch, loss)

    def train_epoch(self, epoch: int) -> float:
        torch.manual_seed(int(np.random.SeedSequence([self.s.seed, epoch, self.rank]).generate_state(1)[0]))
        self.net.train()
        losses = []
        for step, indices in enumerate(self.batches(epoch), 1):
            video, text, logit_scale = self.embed("train", indices[self.rank::self.world], self.net)
            loss = contrastive_loss(gather(video), gather(text), logit_scale)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.s.grad_clip)
            self.optimizer.step()
            self.scheduler.step()
            with torch.no_grad():
                self.model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
            losses.append(loss.item())
            self.history.append({"epoch": epoch, "step": (epoch - 1) * self.steps_per_epoch + step,
                                 "split": "train", "level": "encoder", "loss": losses[-1],
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
        left = (self.s.epochs - epoch + 1) * self.steps_per_epoch - step
        self.say(f"epoch {epoch}/{self.s.epochs} | step {step}/{self.steps_per_epoch} | loss {loss:.4f} | "
                 f"{rate:.1f} it/s | ETA {timedelta(seconds=round(left / rate))}")

    @torch.no_grad()
    def validate(self) -> tuple[float, float]:
        """The contrastive loss over val batches, and text-to-video R@1 among all val windows."""
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
        return loss, recall_at_1(video, text)

    def end_epoch(self, epoch: int, train_loss: float) -> None:
        val_loss, r1 = self.validate() if self.plan.val else (float("nan"), float("nan"))
        if self.plan.val:
            self.history.append({"epoch": epoch, "step": epoch * self.steps_per_epoch, "split": "val",
                                 "level": "encoder", "loss": val_loss, "lr": self.scheduler.get_last_lr()[0]})
        state = {"epoch": epoch, "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                 "history": self.history}

        def write(folder: str) -> None:
            os.makedirs(folder, exist_ok=True)
            self.model.save_lavila(f"{folder}/lavila.pth", epoch)
            torch.save(state, f"{folder}/train_state.pt")

        rel = commit_epoch(self.store, self.plan.run_dir, epoch, write)
        write_curves(self.store, self.plan.run_dir, self.history)
        self.say(f"epoch {epoch}/{self.s.epochs} | train loss {train_loss:.4f} | val loss {val_loss:.4f} | "
                 f"val text-to-video R@1 {100 * r1:.1f}% of {len(self.plan.val)} | "
                 f"{timedelta(seconds=round(time.monotonic() - self.clock))} | saved {rel}")
