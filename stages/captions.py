"""Caption stages: clip captions, segment descriptions and video summaries, one video per unit.

clip     every 4-s window, from the window's stored tokens (or its pixels through
         the feature encoder when tokens were not stored)
segment  every `segment_s` window: sparse CLS + the clip captions inside it
video    the whole video: sparse CLS + all its segment descriptions
Each writes captions/<level>/<version>/<video_id>.parquet. A video whose input
is missing (features not extracted or failed, lower level not captioned) is
reported as blocked with the stage to run, and skipped.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from models import checkpoint
from models.encoders import build_encoder
from models.generation import generate
from models.recap import RecapModel
from models.tokenizer import Tokenizer
from stages.base import Blocked, Resources, Stage, Unit
from stages.decode import WindowReader, window_times
from stages.examples import ExampleReader, collate
from stages.features import FeaturesStage
from store import CAPTION_SCHEMA, Store, captions_rel, file_digest, fingerprint, read_captions, read_videos

LEVEL_STAGE = {"clip": "captions", "segment": "segments", "video": "summaries"}


def resolve_checkpoint(store: Store, level: str, configured: str) -> str:
    """The configured checkpoint, else the latest one `recap train` recorded for this level in the store."""
    if configured:
        return configured
    pointer = store.read_json(f"checkpoints/{level}/latest.json")
    if not pointer:
        raise FileNotFoundError(f"no {level} checkpoint: set captions.{level}_checkpoint or run "
                                f"`recap train --level {level}` first")
    path = pointer["path"]
    return path if Path(path).is_absolute() else store.abs(path)


def weights_id(path: str) -> str:
    """Content id of a checkpoint without loading it (a folder's safetensors, or an official .pth)."""
    import fsspec

    p = Path(path)
    target = p / "model.safetensors" if p.is_dir() else p
    if not target.exists():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    return file_digest(fsspec.filesystem("file"), str(target))


def load_captioner(path: str, tokenizer: str = "", device: str = "cpu") -> tuple[RecapModel, Tokenizer]:
    if Path(path).is_dir():
        model, tok = checkpoint.load(path, device)
    else:
        model, tok = RecapModel.from_official(path).to(device), None
    if tokenizer:
        tok = Tokenizer.load(tokenizer)
    if tok is None:
        raise ValueError(f"{path}: holds no tokenizer; give a local GPT-2 tokenizer folder (captions.tokenizer)")
    return model.eval(), tok


class CaptionStage(Stage):
    """Shared by the three levels; subclasses say which windows to caption and what text they read."""

    level = "clip"
    work_name = "videos"

    def __init__(self, config, store: Store, upstream: Stage):
        self.cfg, self.store_root, self.upstream = config, store.root, upstream
        self.checkpoint = resolve_checkpoint(store, self.level, getattr(config.captions, f"{self.level}_checkpoint"))
        gpu = config.captions.device.startswith("cuda")
        self.resources = Resources(cpus=1.0, gpus=1.0 if gpu else 0.0, memory_gb=2.0)
        self.name = LEVEL_STAGE[self.level]
        self._version = None
        self.model = self.tokenizer = None
        self.pixel_encoder = None  # clip level, built on first need: videos whose tokens were not stored

    def version(self) -> str:
        if self._version is None:
            c = self.cfg.captions
            params = {"weights": weights_id(self.checkpoint), "method": c.method, "beams": c.num_beams,
                      "top_p": c.top_p, "upstream": self.upstream.version(), "windows": vars(self.cfg.windows)}
            self._version = f"{self.level}-{fingerprint(params, length=8)}"
        return self._version

    @property
    def output_dir(self) -> str:
        return f"captions/{self.level}/{self.version()}"

    def features_stage(self) -> FeaturesStage:
        stage = self.upstream
        while not isinstance(stage, FeaturesStage):
            stage = stage.upstream
        return stage

    def plan(self, store: Store) -> list[Unit | Blocked]:
        up = self.upstream
        up_markers = store.markers(up.name, up.version())
        up_failed = {f["video_id"] for f in store.failures(up.name, up.version())}
        complete = up.complete_videos(store)
        up_blocked = {u.video_id: u.reason for u in up.plan(store) if isinstance(u, Blocked)}
        units = []
        for video in read_videos(store):
            vid = video["video_id"]
            if vid not in complete:
                retry = " --retry-failed" if vid in up_failed else ""
                state = "failed" if vid in up_failed else "not done yet"
                units.append(Blocked(vid, vid, up_blocked.get(vid) or
                                     f"{vid}: {up.name} {state} for {up.version()}; run `recap {up.name}{retry}`"))
                continue
            inputs = sorted(m["fingerprint"] for u, m in up_markers.items() if u == vid or u.startswith(f"{vid}@"))
            units.append(Unit(vid, vid, fingerprint(self.version(), video["content_id"], inputs),
                              payload={"uri": video["uri"], "duration_s": video["duration_s"]}))
        return units

    def complete_videos(self, store: Store) -> set[str]:
        """Videos whose captions are committed with the fingerprint their current inputs give."""
        markers = store.markers(self.name, self.version())
        return {u.video_id for u in self.plan(store)
                if isinstance(u, Unit) and markers.get(u.id, {}).get("fingerprint") == u.fingerprint}

    def check(self) -> None:
        self.setup()  # a bad checkpoint fails here once, not in every worker

    def __getstate__(self):  # Ray workers load their own models
        return {**self.__dict__, "model": None, "tokenizer": None, "pixel_encoder": None}

    def setup(self) -> None:
        if self.model is None:
            self.use_reserved_cpus()
            c = self.cfg.captions
            self.model, self.tokenizer = load_captioner(self.checkpoint, c.tokenizer, c.device)

    def process(self, unit: Unit, store: Store) -> dict:
        self.setup()
        reader = ExampleReader(self.features_stage().feature_set(store), self.level, self.model.config.num_video_feat)
        examples = self.examples(unit, store, reader)
        rows = []
        for i in range(0, len(examples), self.cfg.captions.batch_size):
            batch = examples[i:i + self.cfg.captions.batch_size]
            for example, (text, score) in zip(batch, self.caption(batch, unit)):
                rows.append({"video_id": unit.video_id, "level": self.level, "start_s": example.start_s,
                             "end_s": example.end_s, "text": text, "score": score, "fingerprint": unit.fingerprint})
        rel = captions_rel(self.level, self.version(), unit.video_id)
        tmp = store.stage_table(rel, pa.Table.from_pylist(rows, schema=CAPTION_SCHEMA))
        stats = {"rows": len(rows)}
        store.commit(self.name, self.version(), unit.id, unit.fingerprint, {rel: tmp}, stats)
        return stats

    @torch.inference_mode()
    def caption(self, examples, unit: Unit) -> list[tuple[str, float]]:
        device = self.cfg.captions.device
        max_text = min(512, self.model.config.n_positions)  # official: 512, under GPT-2's 1024 positions
        batch = {k: v.to(device) for k, v in collate(examples, self.tokenizer, max_text_tokens=max_text).items()}
        queries = self.model.map_features(batch["video"], batch.get("video_mask"), batch.get("text_ids"),
                                          batch.get("text_mask"))
        c = self.cfg.captions
        out = generate(self.model.text_decoder, queries, bos_id=self.tokenizer.bos_id, eos_id=self.tokenizer.eos_id,
                       max_new_tokens=self.model.config.max_gen_tokens - 1, method=c.method, num_beams=c.num_beams,
                       top_p=c.top_p, generator=torch.Generator(device).manual_seed(0), tokenizer=self.tokenizer)
        return list(zip(out.texts, out.scores.tolist()))

    def examples(self, unit: Unit, store: Store, reader: ExampleReader):
        raise NotImplementedError


class ClipCaptionStage(CaptionStage):
    level = "clip"

    def examples(self, unit, store, reader):
        windows = reader.windows(unit.video_id)
        spans = [tuple(w) for w in windows.tolist()]
        if reader.features.has_tokens(unit.video_id):
            return reader.clip(unit.video_id, spans)
        return self._examples_from_pixels(unit, reader, spans)

    def _examples_from_pixels(self, unit, reader, spans):
        """Tokens were not stored (or were pruned): recompute them with the feature encoder."""
        from stages.examples import Example

        features = self.features_stage()
        if self.pixel_encoder is None:  # once per worker
            f = features.cfg
            self.pixel_encoder = build_encoder(f.encoder, f.checkpoint or None, self.cfg.captions.device)
        encoder, batch = self.pixel_encoder, features.batch_size
        frames = WindowReader(unit.payload["uri"], encoder.image_size, encoder.num_frames, np.array(spans))
        examples = []
        for i in range(0, len(spans), batch):
            _, tokens = encoder.encode(torch.from_numpy(frames.read(i, min(i + batch, len(spans)))))
            # Rounded as the store keeps them: the same captions as from stored tokens.
            tokens = tokens.cpu().numpy().astype(np.float16).astype(np.float32)
            examples += [Example(unit.video_id, s, e, t, np.ones(len(t), np.int64))
                         for (s, e), t in zip(spans[i:i + len(tokens)], tokens)]
        return examples


class SegmentStage(CaptionStage):
    level = "segment"

    def examples(self, unit, store, reader):
        lower = _lower_captions(store, self.upstream)
        clips = lower(unit.video_id)
        w = self.cfg.windows
        spans = window_times(unit.payload["duration_s"], w.segment_s, w.segment_min_tail)
        return [reader.span(unit.video_id, s, e, clips) for s, e in spans.tolist()]


class SummaryStage(CaptionStage):
    level = "video"

    def examples(self, unit, store, reader):
        segments = _lower_captions(store, self.upstream)(unit.video_id)
        return [reader.span(unit.video_id, 0.0, unit.payload["duration_s"], segments)]


def _lower_captions(store: Store, stage: CaptionStage):
    def read(video_id: str) -> list[tuple[float, float, str]]:
        table = read_captions(store, stage.level, stage.version(), video_id)
        if table is None:
            raise FileNotFoundError(f"{video_id}: no {stage.level} captions in {stage.output_dir}; "
                                    f"run `recap {stage.name}`")
        return list(zip(table["start_s"].to_pylist(), table["end_s"].to_pylist(), table["text"].to_pylist()))
    return read


def write_latest(store: Store, level: str, path: str) -> None:
    """Record the checkpoint caption stages use by default for `level` (written by training)."""
    store.write_json(f"checkpoints/{level}/latest.json", {"path": path})
