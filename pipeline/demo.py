"""The main job on the embedded synthetic corpus, end to end, resumable at every step."""

from __future__ import annotations

import sys
from pathlib import Path

import synth
from pipeline.config import Config, load_config
from pipeline.ingest import ingest_hcap
from pipeline.progress import Summary
from pipeline.runner import run_stage
from pipeline.status import format_status, status_rows
from stages.features import FeaturesStage
from store import Store

# Small enough for 2 CPU cores; the synthetic frames are 128 px, the tiny encoder reads 32 px.
DEMO_SETTINGS = {"features": {"encoder": "tsf-tiny", "tokens": True, "batch_size": 32}}


def demo_config(store: str) -> Config:
    return load_config(store=store, **DEMO_SETTINGS)


def run_demo(store_root: str, data: Path, preset: str = "demo", seed: int = 0, stream=sys.stderr) -> list[Summary]:
    config = demo_config(store_root)
    store = Store(config.store)
    print(f"[demo] corpus: synthetic '{preset}' preset, seed {seed}, in {data}", file=stream)
    synth.generate(preset, data, seed=seed,
                   progress=lambda done, total: done == total and print(f"[synth] {total} videos", file=stream))
    summaries = [ingest_hcap(store, str(data), str(data / "videos"), stream=stream)]
    stages = [FeaturesStage(config.features, config.windows)]
    for stage in stages:
        summaries.append(run_stage(stage, store, executor=config.run.executor, address=config.run.address or None,
                                   max_retries=config.run.max_retries, stream=stream))
    print(f"store: {store.root}\n" + format_status(status_rows(store, stages)), file=sys.stdout)
    return summaries
