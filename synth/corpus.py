"""`generate`: plan a corpus, render and encode its videos (in parallel
processes), then write the ground truth and the manifest."""

from __future__ import annotations

import json
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

from synth import render
from synth.presets import SPLITS, Preset, resolve
from synth.world import Session, plan_composed, plan_corpus
from synth.writer import (
    QUERIES_FILE, REORDERED_FILE, write_groundtruth, write_json, write_mp4, write_queries, write_reordered,
)

GENERATOR_VERSION = "2"  # 2: ground-truth tables carry facts
# Preset fields that add side tables and leave the videos and the level tables as they were: a corpus written
# before one existed, or with another value, is the same corpus, its side tables written again in place.
SIDE_TABLE_FIELDS = ("reordered_summaries", "composed_summaries")


class CorpusMismatch(Exception):
    """The output directory holds something other than the requested corpus."""


@dataclass(frozen=True)
class Manifest:
    generator_version: str
    preset: dict
    seed: int
    segment_s: int
    videos: dict[str, int]  # per split
    segments: dict[str, int]
    clips: dict[str, int]
    # Written false before any other file and true after the last one, so an
    # interrupted run is recognised (and redone) rather than taken as done.
    complete: bool

    @classmethod
    def of(cls, preset: Preset, seed: int, sessions: list[Session]) -> Manifest:
        def count(of: Callable[[Session], int]) -> dict[str, int]:
            return {split: sum(of(s) for s in sessions if s.split == split) for split in SPLITS}
        return cls(GENERATOR_VERSION, preset.to_dict(), seed, preset.segment_s, count(lambda s: 1),
                   count(lambda s: len(s.segments)), count(lambda s: len(s.clips)), complete=False)


def generate(preset: str | Preset, out: Path, seed: int = 0,
             progress: Callable[[int, int], None] | None = None, workers: int | None = None) -> Manifest:
    """Write the corpus `preset` x `seed` into `out`, calling `progress(videos
    done, videos in all)` as videos are written by `workers` processes (default:
    the usable CPUs). Same arguments, same bytes, whatever the number of workers.
    Re-running into a complete copy of the same corpus does nothing but add the
    side tables (retrieval queries, reordered and composed summaries) to a
    copy written before corpora had them, or again where their count differs."""
    preset, out = resolve(preset), Path(out)
    sessions = plan_corpus(preset, seed)
    composed = plan_composed(preset, seed, sessions)
    manifest = Manifest.of(preset, seed, sessions)
    done = replace(manifest, complete=True)
    if _existing_manifest(out, manifest) == done:
        if not (out / "groundtruth" / QUERIES_FILE).is_file():
            write_queries(out, sessions, seed)
        written = json.loads((out / "manifest.json").read_text())["preset"]
        if not (out / "groundtruth" / REORDERED_FILE).is_file() or any(
                written.get(k) != manifest.preset.get(k) for k in SIDE_TABLE_FIELDS):
            write_reordered(out, sessions, composed)
            write_json(out / "manifest.json", asdict(done))  # with today's preset fields
        return done

    (out / "videos").mkdir(parents=True, exist_ok=True)
    write_json(out / "manifest.json", asdict(manifest))
    workers = min(workers or len(os.sched_getaffinity(0)), len(sessions))
    jobs = [(s, preset, out / "videos" / f"{s.vid}.mp4") for s in sessions]
    if workers > 1:
        # forkserver: forking a caller that runs threads (torch, Ray) can deadlock.
        context = multiprocessing.get_context("forkserver")
        with ProcessPoolExecutor(workers, mp_context=context) as pool:
            _report(pool.map(_write_video, *zip(*jobs)), len(jobs), progress)
    else:
        _report(map(_write_video, *zip(*jobs)), len(jobs), progress)
    write_groundtruth(out, sessions)
    write_queries(out, sessions, seed)
    write_reordered(out, sessions, composed)
    write_json(out / "manifest.json", asdict(done))
    return done


def _write_video(session: Session, preset: Preset, path: Path) -> None:
    frames = render.frames(session, preset.width, preset.height, preset.fps, preset.clip_s)
    write_mp4(path, frames, preset.width, preset.height, preset.fps, gop=preset.clip_s * preset.fps)


def _report(results, total: int, progress: Callable[[int, int], None] | None) -> None:
    for done, _ in enumerate(results, 1):
        if progress:
            progress(done, total)


def _existing_manifest(out: Path, ours: Manifest) -> Manifest | None:
    """The manifest of the same corpus in `out`; raises if `out` holds anything else."""
    if not out.exists() or not any(out.iterdir()):
        return None
    path = out / "manifest.json"
    if not path.is_file():
        raise CorpusMismatch(f"{out} is not empty and holds no synthetic corpus; choose an empty directory")
    found = json.loads(path.read_text())
    if isinstance(found.get("preset"), dict):  # side tables aside (or not yet there), the same videos
        found["preset"] = {**found["preset"], **{k: ours.preset[k] for k in SIDE_TABLE_FIELDS if k in ours.preset}}
    if [found.get(k) for k in ("generator_version", "preset", "seed")] != [
            ours.generator_version, ours.preset, ours.seed]:
        raise CorpusMismatch(
            f"{out} holds a different corpus (preset {found.get('preset', {}).get('name')}, "
            f"seed {found.get('seed')}, generator {found.get('generator_version')}); choose an empty directory")
    return Manifest(**found)
