"""The configuration resolved into stages, once: every stage gets plain parameters, and the default
checkpoint of a level (the one `recap train` finished last) is looked up here and nowhere else."""

from __future__ import annotations

from pipeline.config import Config
from stages.base import Stage
from stages.captions import CAPTION_STAGES, CaptionStage
from stages.features import FeaturesStage
from stages.index import SIZE_OF_ENCODER, IndexStage
from stages.thumbnails import ThumbnailStage
from store import LEVELS, Store, latest_checkpoint


def features_stage(config: Config) -> FeaturesStage:
    f = config.features
    batch_size = f.batch_size or (16 if f.device.startswith("cuda") else 4)  # CPU: bench/features.py
    return FeaturesStage(encoder=f.encoder, checkpoint=f.checkpoint, clip_s=config.windows.clip_s, tokens=f.tokens,
                         batch_size=batch_size, device=f.device, chunk_windows=f.chunk_windows,
                         rows_per_chunk=f.rows_per_chunk, decode_threads=f.decode_threads,
                         random_weights=f.random_weights)


def thumbnails_stage(config: Config) -> ThumbnailStage:
    """The report's thumbnails: one per clip window, the features' windows."""
    return ThumbnailStage(clip_s=config.windows.clip_s)


def caption_stage(config: Config, level: str, checkpoint: str, upstream: Stage,
                  features: FeaturesStage) -> CaptionStage:
    c = config.captions
    method = c.video_method if level == "video" and c.video_method else c.method
    params = dict(checkpoint=checkpoint, upstream=upstream, features=features, method=method,
                  num_beams=c.num_beams, top_p=c.top_p, batch_size=c.batch_size, device=c.device, tokenizer=c.tokenizer)
    if level == "segment":
        params |= dict(segment_s=config.windows.segment_s, segment_min_tail=config.windows.segment_min_tail)
    return CAPTION_STAGES[level](**params)


def level_checkpoint(config: Config, store: Store, level: str) -> str | None:
    """The configured checkpoint of a level, else the latest trained in the store, else None."""
    return getattr(config.captions, f"{level}_checkpoint") or latest_checkpoint(store, level)


def build_stages(config: Config, store: Store, upto: str | None = None) -> list[Stage]:
    """features -> captions -> segments -> summaries, up to the stage named `upto`, and only as far as
    each level has a checkpoint."""
    features = features_stage(config)
    stages: list[Stage] = [features]
    for level in LEVELS:
        checkpoint = level_checkpoint(config, store, level)
        if upto == stages[-1].name or not checkpoint:
            break
        stages.append(caption_stage(config, level, checkpoint, stages[-1], features))
    return stages


def index_stage(config: Config, store: Store) -> IndexStage:
    """The index of the caption versions the settings make current. Its model (index.encoder): index.checkpoint,
    else the features' checkpoint (the only file whose visual tower made them), else, for LaViLa, the store's
    latest pretrained encoder (which `check` refuses, naming both, unless the features were extracted with it)."""
    from pipeline.pretrain import latest_encoder  # pipeline.pretrain imports this module through pipeline.train

    features, *levels = build_stages(config, store)
    captions = {}
    for stage in levels:
        try:
            captions[stage.level] = stage.version()
        except FileNotFoundError:  # a checkpoint file gone: this level and those above have no version
            break
    i = config.index
    if i.encoder == "videoprism":
        checkpoint = i.checkpoint or features.checkpoint
        if not checkpoint:
            raise FileNotFoundError("no VideoPrism video-text model to index with: set index.checkpoint "
                                    "(--checkpoint) to a local VideoPrismClipModel folder")
    else:
        checkpoint = i.checkpoint or features.checkpoint or latest_encoder(store)
        if not checkpoint:
            raise FileNotFoundError("no dual encoder to index with: set index.checkpoint (--checkpoint), or run "
                                    "`recap pretrain`, then `recap features --checkpoint` with its lavila.pth")
    size = i.size or SIZE_OF_ENCODER.get(features.encoder, "base")
    return IndexStage(checkpoint=checkpoint, features=features, captions=captions, encoder=i.encoder, size=size,
                      batch_size=i.batch_size, device=i.device)


def enhance_captioner(config: Config, store: Store):
    """CSI's captioner (enhance.captioner): the level's ReCap model, or the chat endpoint."""
    from dataclasses import fields, replace

    from stages.enhance import EndpointCaptioner, LocalCaptioner

    e, w = config.enhance, config.windows
    if e.captioner == "endpoint":
        return EndpointCaptioner(endpoint=chat_endpoint(config), level=e.level, clip_s=w.clip_s, segment_s=w.segment_s,
                                 segment_min_tail=w.segment_min_tail, frames=e.frames)
    stages = build_stages(config, store)
    found = [s for s in stages[1:] if s.level == e.level]
    if not found:
        raise FileNotFoundError(f"no {e.level} checkpoint for enhance.captioner = 'local': run `recap train --level "
                                f"{e.level}` or set captions.{e.level}_checkpoint (levels below need theirs too)")
    # The recipe decodes: the stage's own decoding settings are left at their defaults, out of the version.
    neutral = {f.name: f.default for f in fields(CaptionStage) if f.name in ("method", "num_beams", "top_p")}
    return LocalCaptioner(replace(found[0], **neutral))


def chat_endpoint(config: Config):
    from stages.chat import ChatEndpoint

    e = config.enhance
    if not e.endpoint_url or not e.endpoint_model:
        raise ValueError("enhance.endpoint_url and enhance.endpoint_model must be set for an endpoint captioner or "
                         "engineer (--endpoint-url http://localhost:8000/v1 --endpoint-model NAME)")
    return ChatEndpoint(e.endpoint_url, e.endpoint_model, e.api_key_env, e.timeout_s, e.retries)


def enhance_stage(config: Config, store: Store, prompt, source: dict | None = None):
    """`prompt` (CSI's final one) applied to every video: captions/enhanced/<version>/."""
    from stages.enhance import EnhanceStage

    return EnhanceStage(captioner=enhance_captioner(config, store), prompt=prompt, seed=config.enhance.seed,
                        source=source or {})
