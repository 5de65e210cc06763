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

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import torch

from models.encoders import build_encoder
from models.generation import generate
from stages.base import Blocked, Resources, Stage, Unit
from stages.decode import WindowReader, window_times
from stages.examples import ExampleReader, collate
from stages.features import FeaturesStage
from store import LEVEL, CAPTION_SCHEMA, Store, captions_rel, file_digest, fingerprint, read_captions, read_videos

if TYPE_CHECKING:
    from models.recap import RecapModel
    from models.tokenizer import Tokenizer


def weights_id(path: str) -> str:
    """Content id of a checkpoint without loading it (a folder's safetensors, or an official .pth)."""
    import fsspec

    p = Path(path)
    target = p / "model.safetensors" if p.is_dir() else p
    if not target.exists():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    return file_digest(fsspec.filesystem("file"), str(target))


def load_captioner(path: str, tokenizer: str = "", device: str = "cpu") -> tuple[RecapModel, Tokenizer]:
    # The caption model's modules import transformers (3 s a process): imported here, not with the stage
    # definitions, which feature workers, `recap evaluate` and dry runs import too.
    from models import checkpoint
    from models.recap import RecapModel
    from models.tokenizer import Tokenizer

    if Path(path).is_dir():
        model, tok = checkpoint.load(path, device)
    else:
        model, tok = RecapModel.from_official(path).to(device), None
    if tokenizer:
        tok = Tokenizer.load(tokenizer)
    if tok is None:
        raise ValueError(f"{path}: holds no tokenizer; give a local GPT-2 tokenizer folder (captions.tokenizer)")
    return model.eval(), tok


@dataclass(eq=False)
class CaptionStage(Stage):
    """Shared by the three levels; subclasses say which windows to caption and what text they read.
    Plain parameters (`pipeline.dag.caption_stage` resolves them from the configuration): the stage
    reads `upstream`'s committed output, and the sparse CLS / tokens of `features`."""

    checkpoint: str                # our checkpoint folder or an official .pth
    upstream: Stage                # the stage this level reads: features (clip) or the level below
    features: FeaturesStage
    method: str = "greedy"         # greedy | beam | sample
    num_beams: int = 4
    top_p: float = 0.9
    batch_size: int = 64           # windows per generate call
    device: str = "cpu"
    tokenizer: str = ""            # local GPT-2 tokenizer folder, for official .pth checkpoints
    level = "clip"
    work_name = "videos"
    model = tokenizer_model = pixel_encoder = None  # built per worker

    def __post_init__(self):
        self.resources = Resources(cpus=1.0, gpus=1.0 if self.device.startswith("cuda") else 0.0, memory_gb=2.0)
        self.name = LEVEL[self.level].stage
        self._version = None

    def output_params(self) -> dict:
        """What shapes this level's output beyond the model, decoding and input (segment: its windows)."""
        return {}

    def version(self) -> str:
        if self._version is None:
            # a setting the method does not read keeps its default here: changing the beam width must not
            # recompute greedy captions (nor the levels above them)
            beams = self.num_beams if self.method == "beam" else CaptionStage.num_beams
            top_p = self.top_p if self.method == "sample" else CaptionStage.top_p
            params = {"weights": weights_id(self.checkpoint), "method": self.method, "beams": beams,
                      "top_p": top_p, "upstream": self.upstream.version(), "windows": self.output_params()}
            self._version = f"{self.level}-{fingerprint(params, length=8)}"
        return self._version

    @property
    def output_dir(self) -> str:
        return f"captions/{self.level}/{self.version()}"

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
        return {**self.__dict__, "model": None, "tokenizer_model": None, "pixel_encoder": None}

    def setup(self) -> None:
        if self.model is None:
            self.use_reserved_cpus()
            with self.loading(f"the {self.level} model from {self.checkpoint} on {self.device}"):
                self.model, self.tokenizer_model = load_captioner(self.checkpoint, self.tokenizer, self.device)

    def process(self, unit: Unit, store: Store) -> dict:
        self.setup()
        reader = ExampleReader(self.features.feature_set(store), self.level, self.model.config.num_video_feat)
        examples = self.examples(unit, store, reader)
        rows = []
        for i in range(0, len(examples), self.batch_size):
            batch = examples[i:i + self.batch_size]
            for example, (text, score) in zip(batch, self.caption(batch, unit)):
                rows.append({"video_id": unit.video_id, "level": self.level, "start_s": example.start_s,
                             "end_s": example.end_s, "text": text, "score": score, "fingerprint": unit.fingerprint,
                             "version": self.version()})
        rel = captions_rel(self.level, self.version(), unit.video_id)
        tmp = store.stage_table(rel, pa.Table.from_pylist(rows, schema=CAPTION_SCHEMA))
        stats = {"rows": len(rows)}
        store.commit(self.name, self.version(), unit.id, unit.fingerprint, {rel: tmp}, stats)
        return stats

    @torch.inference_mode()
    def caption(self, examples, unit: Unit) -> list[tuple[str, float]]:
        device, tok = self.device, self.tokenizer_model
        max_text = min(512, self.model.config.n_positions)  # official: 512, under GPT-2's 1024 positions
        batch = {k: v.to(device) for k, v in collate(examples, tok, max_text_tokens=max_text).items()}
        context, mask = self.model.decoder_context(batch["video"], batch.get("video_mask"), batch.get("text_ids"),
                                                   batch.get("text_mask"))
        out = generate(self.model.text_decoder, context, queries_mask=mask, bos_id=tok.bos_id, eos_id=tok.eos_id,
                       max_new_tokens=self.model.config.max_gen_tokens - 1, method=self.method,
                       num_beams=self.num_beams, top_p=self.top_p, generator=torch.Generator(device).manual_seed(0),
                       tokenizer=tok)
        return list(zip(out.texts, out.scores.tolist()))

    def examples(self, unit: Unit, store: Store, reader: ExampleReader):
        raise NotImplementedError


@dataclass(eq=False)
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

        f = self.features
        if self.pixel_encoder is None:  # once per worker
            self.pixel_encoder = build_encoder(f.encoder, f.checkpoint or None, self.device)
        encoder, batch = self.pixel_encoder, f.batch_size
        frames = WindowReader(unit.payload["uri"], encoder.spec.image_size, encoder.spec.num_frames, np.array(spans))
        examples = []
        for i in range(0, len(spans), batch):
            _, tokens = encoder.encode(torch.from_numpy(frames.read(i, min(i + batch, len(spans)))))
            # Rounded as the store keeps them: the same captions as from stored tokens.
            tokens = tokens.cpu().numpy().astype(np.float16).astype(np.float32)
            examples += [Example(unit.video_id, s, e, t, np.ones(len(t), np.int64))
                         for (s, e), t in zip(spans[i:i + len(tokens)], tokens)]
        return examples


@dataclass(eq=False)
class SegmentStage(CaptionStage):
    segment_s: float = 180.0
    segment_min_tail: float = 0.5  # a last window shorter than this share of segment_s joins the one before
    level = "segment"

    def output_params(self) -> dict:
        return {"segment_s": self.segment_s, "segment_min_tail": self.segment_min_tail}

    def examples(self, unit, store, reader):
        clips = _lower_captions(store, self.upstream)(unit.video_id)
        spans = window_times(unit.payload["duration_s"], self.segment_s, self.segment_min_tail)
        return [reader.span(unit.video_id, s, e, clips) for s, e in spans.tolist()]


@dataclass(eq=False)
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


CAPTION_STAGES = {"clip": ClipCaptionStage, "segment": SegmentStage, "video": SummaryStage}
