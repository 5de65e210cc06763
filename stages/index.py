"""Index: per video, a text embedding of every committed caption (clip, segment, video) and a video embedding
of its span, from a video-text model (`encoder`), for `recap search` (pipeline.search). Layout: store.index.

The video embeddings come from the stored features, not from pixels, so the model's video tower must be the one
the features were extracted with, and `check` refuses otherwise, naming both:
- lavila: LaViLa's dual encoder projects each window's stored CLS (`embed_video_cls`); the features' checkpoint
  file must be this one.
- videoprism: a VideoPrismClipModel folder pools each window's stored tokens (`models.videoprism.embed_video`);
  the features must be VideoPrism's, with tokens, from the same vision weights.
A video whose features are not complete is blocked; a caption level not captioned yet has no rows. A unit's
fingerprint holds the video's feature markers and each level's caption marker, so new or changed captions
re-index only their video.
"""

from __future__ import annotations

from dataclasses import dataclass

import fsspec
import numpy as np
import pyarrow as pa
import torch

from models.clip_tokenizer import ClipTokenizer
from models.lavila import DualEncoder, LavilaConfig
from stages.base import Blocked, Resources, Stage, Unit
from stages.features import FeaturesStage
from store import LEVEL, LEVELS, Store, committed_captions, fingerprint, path_digest, read_videos
from store.index import (
    INDEX_SCHEMA, INDEX_STAGE, index_dir, index_group_rel, index_table_rel, stage_index_group,
)

SIZE_OF_ENCODER = {"tsf-tiny": "tiny", "tsf-base": "base"}  # feature encoder -> dual-encoder preset
INDEX_ENCODERS = ("lavila", "videoprism")
VIDEOPRISM_FEATURES = ("videoprism", "videoprism-tiny")
# VideoPrism stored tokens are read a few windows (a Zarr chunk) at a time and pooled one window per call: its
# auxiliary layers' eager attention over all T*N tokens takes ~1.6 GB per window at base size (4096 tokens).
WINDOWS_PER_READ = 4


@dataclass(eq=False)
class IndexStage(Stage):
    """Plain parameters (`pipeline.dag.index_stage` resolves them from the configuration)."""

    checkpoint: str                # lavila: dual-encoder .pth (official, or `recap pretrain`'s lavila.pth);
                                   # videoprism: a local VideoPrismClipModel folder
    features: FeaturesStage        # the feature set whose CLS rows (lavila) or tokens (videoprism) give the video
    captions: dict                 # {level: caption version} of the levels that have one
    encoder: str = "lavila"        # INDEX_ENCODERS
    size: str = "base"             # lavila: tiny | base, the LavilaConfig preset of the checkpoint
    batch_size: int = 256          # captions per text-encoder call
    device: str = "cpu"
    name = INDEX_STAGE
    work_name = "videos"
    model = tokenizer = None       # built per worker

    def __post_init__(self):
        if self.encoder not in INDEX_ENCODERS:
            raise ValueError(f"index.encoder = {self.encoder!r}: not one of {', '.join(INDEX_ENCODERS)}")
        self.resources = Resources(cpus=1.0, gpus=1.0 if self.device.startswith("cuda") else 0.0, memory_gb=2.0)
        self._version = None

    def weights(self) -> str:
        fs, path = fsspec.core.url_to_fs(self.checkpoint)
        if not fs.exists(path):
            what = "VideoPrism video-text folder" if self.encoder == "videoprism" else "dual-encoder checkpoint"
            raise FileNotFoundError(f"{self.checkpoint}: {what} not found (index.checkpoint)")
        return path_digest(fs, path)

    def version(self) -> str:
        if self._version is None:
            params = {"weights": self.weights(), "features": self.features.version(), "captions": self.captions}
            # lavila's keeps the keys it had before index.encoder existed, and so its existing indexes
            params |= {"size": self.size} if self.encoder == "lavila" else {"encoder": self.encoder}
            self._version = f"index-{fingerprint(params, length=8)}"
        return self._version

    @property
    def output_dir(self) -> str:
        return index_dir(self.version())

    def plan(self, store: Store) -> list[Unit | Blocked]:
        feats = self.features
        complete = feats.complete_videos(store)
        feature_markers = store.markers(feats.name, feats.version())
        failed = {f["video_id"] for f in store.failures(feats.name, feats.version())}
        caption_markers = {level: store.markers(LEVEL[level].stage, version) for level, version in self.captions.items()}
        units = []
        for video in read_videos(store):
            vid = video["video_id"]
            if vid not in complete:
                state, retry = ("failed", " --retry-failed") if vid in failed else ("not done yet", "")
                units.append(Blocked(vid, vid, f"{vid}: features {state} for {feats.version()}; "
                                               f"run `recap features{retry}`"))
                continue
            inputs = sorted(m["fingerprint"] for u, m in feature_markers.items() if u.startswith(f"{vid}@"))
            captions = {level: markers.get(vid, {}).get("fingerprint") for level, markers in caption_markers.items()}
            units.append(Unit(vid, vid, fingerprint(self.version(), video["content_id"], inputs, captions)))
        return units

    def check(self) -> None:
        """The features must come from this model's video tower: refuse, naming both, when they do not."""
        if self.encoder == "videoprism":
            self._check_videoprism()
            return
        feats = self.features
        if feats.encoder not in SIZE_OF_ENCODER:
            hint = "; or index.encoder = 'videoprism' (--encoder)" if feats.encoder in VIDEOPRISM_FEATURES else ""
            raise ValueError(f"features.encoder = {feats.encoder!r}: the index needs TimeSformer features from a "
                             f"LaViLa dual encoder ({', '.join(SIZE_OF_ENCODER)}){hint}")
        if SIZE_OF_ENCODER[feats.encoder] != self.size:
            raise ValueError(f"index.size = {self.size!r} does not fit features.encoder = {feats.encoder!r} "
                             f"({SIZE_OF_ENCODER[feats.encoder]!r})")
        mine = self.weights()
        theirs = path_digest(*fsspec.core.url_to_fs(feats.checkpoint)) if feats.checkpoint else None
        if mine != theirs:
            made = f"{feats.checkpoint} (digest {theirs})" if theirs else "random weights (no features.checkpoint)"
            raise ValueError(f"{self.checkpoint} (digest {mine}) is not the encoder the features {feats.version()} "
                             f"were extracted with: {made}; index with that checkpoint, or extract features with "
                             f"this one (`recap features --checkpoint {self.checkpoint}`)")
        self.setup()  # a checkpoint without a text tower fails here once, naming the keys

    def _check_videoprism(self) -> None:
        from models import videoprism
        from models.encoders import weights_digest

        feats = self.features
        fix = f"extract them with `recap features --encoder videoprism --checkpoint {self.checkpoint}`"
        if feats.encoder not in VIDEOPRISM_FEATURES:
            raise ValueError(f"index.encoder = 'videoprism' pools VideoPrism tokens, but features.encoder = "
                             f"{feats.encoder!r}; {fix}")
        if not feats.tokens:
            raise ValueError(f"index.encoder = 'videoprism' pools each window's stored tokens, but features.tokens "
                             f"= false; {fix} (with tokens)")
        if not feats.checkpoint:
            raise ValueError(f"{self.checkpoint} is not the encoder the features {feats.version()} were extracted "
                             f"with: random weights (no features.checkpoint); {fix}")
        videoprism.check_clip_folder(self.checkpoint)  # before setup's "loading" line: the error is the only one
        self.setup()  # weights that do not load fail here, naming the folder
        fs, path = fsspec.core.url_to_fs(feats.checkpoint)
        if fs.exists(path) and path_digest(fs, path) == self.weights():
            return  # the same folder
        mine = weights_digest(self.model.video_model.vision_model)
        theirs = weights_digest(videoprism.load(feats.checkpoint))  # names a missing or malformed folder
        if mine != theirs:
            raise ValueError(f"{self.checkpoint} (vision weights {mine}) is not the encoder the features "
                             f"{feats.version()} were extracted with: {feats.checkpoint} (vision weights {theirs}); "
                             f"index with that folder's video-text model, or {fix}")

    def __getstate__(self):  # Ray workers load their own model
        return {**self.__dict__, "model": None, "tokenizer": None}

    def load_encoder(self):
        """(model, tokenizer): a DualEncoder and the CLIP tokenizer, or a VideoPrismClipModel and its own."""
        if self.encoder == "videoprism":
            from models import videoprism

            model, tokenizer = videoprism.load_clip(self.checkpoint)
            return model.to(self.device), tokenizer
        config = LavilaConfig.tiny() if self.size == "tiny" else LavilaConfig.base()
        return DualEncoder.from_lavila(self.checkpoint, config).to(self.device), ClipTokenizer()

    def setup(self) -> None:
        if self.model is None:
            self.use_reserved_cpus()
            model = f"the {self.size} dual encoder" if self.encoder == "lavila" else "the VideoPrism video-text model"
            with self.loading(f"{model} from {self.checkpoint} on {self.device}"):
                self.model, self.tokenizer = self.load_encoder()

    @torch.inference_mode()
    def embed_texts(self, texts: list[str]) -> np.ndarray:
        """(len(texts), E) float32, unit length."""
        out = [np.zeros((0, self.embed_dim), np.float32)]
        for i in range(0, len(texts), self.batch_size):
            batch = texts[i:i + self.batch_size]
            if self.encoder == "videoprism":
                from models import videoprism

                out.append(videoprism.embed_text(self.model, self.tokenizer, batch).float().cpu().numpy())
                continue
            ids = self.tokenizer(batch)
            # Causal attention: cut after the last end-of-text token (the largest id) and the features are the same.
            ids = ids[:, :int(ids.argmax(dim=-1).max()) + 1]
            out.append(self.model.encode_text(ids.to(self.device)).float().cpu().numpy())
        return np.concatenate(out)

    @property
    def embed_dim(self) -> int:
        c = self.model.config
        return c.text_config.hidden_size if self.encoder == "videoprism" else c.embed_dim

    @torch.inference_mode()
    def embed_windows(self, cls: np.ndarray) -> np.ndarray:
        """Stored CLS rows (n, D) -> (n, E) float32, unit length."""
        x = torch.from_numpy(np.asarray(cls, np.float32)).to(self.device)
        return self.model.embed_video_cls(x).float().cpu().numpy()

    @torch.inference_mode()
    def embed_window_tokens(self, tokens: np.ndarray) -> np.ndarray:
        """Stored VideoPrism tokens (n, 1 + T*N, D), the first the token mean -> (n, E) float32, unit length."""
        from models import videoprism

        x = torch.from_numpy(np.asarray(tokens[:, 1:], np.float32)).to(self.device)
        out = [videoprism.embed_video(self.model, window[None]) for window in x]
        return torch.cat(out).float().cpu().numpy() if out else np.zeros((0, self.embed_dim), np.float32)

    def window_embeddings(self, fs, video_id: str, n: int) -> np.ndarray:
        """(n windows, E) for one video, from the stored features."""
        if self.encoder == "lavila":
            return self.embed_windows(fs.read_cls(video_id))
        return np.concatenate([self.embed_window_tokens(fs.read_tokens(video_id, slice(i, i + WINDOWS_PER_READ)))
                               for i in range(0, n, WINDOWS_PER_READ)])

    def process(self, unit: Unit, store: Store) -> dict:
        self.setup()
        vid, version = unit.video_id, self.version()
        fs = self.features.feature_set(store)
        windows = fs.windows(vid)
        window_emb = self.window_embeddings(fs, vid, len(windows))
        rows = []
        for level in LEVELS:
            if level not in self.captions:
                continue
            table = committed_captions(store, level, self.captions[level], vid)
            for start, end, text in zip(*(table[c].to_pylist() for c in ("start_s", "end_s", "text"))):
                rows.append({"video_id": vid, "level": level, "start_s": start, "end_s": end, "caption": text,
                             "row": len(rows)})
        text = self.embed_texts([r["caption"] for r in rows])
        video = np.stack([span_embedding(window_emb, windows, r["start_s"], r["end_s"], vid) for r in rows]) \
            if rows else np.zeros((0, window_emb.shape[1]), np.float32)
        group, table = index_group_rel(version, vid), index_table_rel(version, vid)
        if store.marker(self.name, version, unit.id) is None:  # what a run killed before its marker renamed
            store.remove(group)
            store.remove(table)
        staged = []
        try:
            staged.append(stage_index_group(store, version, vid, text, video, {"fingerprint": unit.fingerprint}))
            staged.append(store.stage_table(table, pa.Table.from_pylist(rows, schema=INDEX_SCHEMA)))
            stats = {"rows": len(rows), **{lv: sum(r["level"] == lv for r in rows) for lv in self.captions}}
            store.commit(self.name, version, unit.id, unit.fingerprint, {group: staged[0], table: staged[1]}, stats)
        except BaseException:  # a full disk, a kill: leave no temporary behind where we can
            for tmp in staged:
                try:
                    store.remove(tmp)
                except OSError:
                    pass
            raise
        return stats


def span_embedding(window_emb: np.ndarray, windows: np.ndarray, start: float, end: float, video_id: str) -> np.ndarray:
    """The mean of the unit embeddings of the windows whose middle lies in [start, end), renormalised; a span
    shorter than half a window takes the windows it overlaps."""
    middle = windows.mean(axis=1)
    inside = (middle >= start) & (middle < end)
    if not inside.any():
        inside = (windows[:, 0] < end) & (windows[:, 1] > start)
    if not inside.any():
        raise ValueError(f"{video_id}: no feature window overlaps the caption span {start:.2f}-{end:.2f} s")
    mean = window_emb[inside].mean(axis=0)
    return mean / max(float(np.linalg.norm(mean)), 1e-12)
