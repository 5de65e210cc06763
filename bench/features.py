"""Features-stage benchmark: decode, encode, the real pipeline and a naive loop, on the same windows.

    .venv/bin/python bench/features.py [--quick] [--no-cli] [--only SECTION] [--data data/bench]

Sections, all in this one command:

1. Decode strategies for the sparse clip sampling (4 frames per 4-s window): decord `get_batch` per
   batch of 16 windows with sorted indices (what `WindowReader.read` did before), per window, per
   128-window chunk, `next()` on every frame, `skip_frames` + `next()`, the current
   `WindowReader.read`, and full-resolution decode + torch resize; at 32 px (tsf-tiny) and 224 px
   (tsf-base), on the first 256 windows of `hour` and 24 of `hd`. Best of 4 rounds (2 with
   --quick), reader opening not timed; all but the torch resize are checked byte for byte against the first.
2. Throughput in windows/s per encoder (tsf-tiny, all windows; TimeSformer-B = tsf-base at full size
   with random weights, first 32 windows only: it runs at well under 1 window/s on 2 CPU cores) and
   video (`hour`: 60 min 128x128 8 fps; `hd`: 182 s 1280x720 30 fps H.264, both with the synthetic
   corpus's keyframe at every window start; `hd-x264`: `hd` re-encoded with x264's defaults, a keyframe
   every 250 frames and B-frames, scene-cut keyframes off), at the torch threads
   the stage's setup() sets (1 per reserved CPU, as a Ray actor gets), and for tsf-tiny on `hour`
   also at torch's default (all cores, what an in-process run had before commit d713843):
   - decode: the stage's decode path alone (one `WindowReader` per video, batches of the stage's size: 4 on CPU),
   - encode: `encoder.encode` on the same frames, pre-decoded, in the same batches,
   - pipeline: `FeaturesStage.prepare` + `process` (= `_encode_chunk`: decode of the next batch in
     a thread overlapping the encode of this one, tokens and CLS into Zarr, commit) per unit in a
     temporary store, the path `run_stage(..., executor="local")` runs; the encoder is built first,
   - naive: one full-resolution reader, each window decoded alone (`get_batch` of its 4 frames:
     decord seeks to the window's keyframe when one lies between it and the last frame read), resized (antialiased bilinear) and cropped in torch, encoded alone (batch 1);
     its CLS rows are kept in memory, nothing is written.
   efficiency = pipeline / min(decode, encode); speed-up = pipeline / naive; CPU ms per window
   (all threads of this process) shows the work done, which load from elsewhere disturbs less
   than wall time. The four run
   round-robin, best of 3 rounds (a run over 20 s is not repeated; tsf-base: 1 round).
3. Peak memory (RSS high-water of a fresh process) of the real stage, `run_stage(executor="local")`,
   tsf-tiny with tokens, on a 10-minute and a 60-minute video, and their ratio.
4. `recap ingest` + `recap features --encoder tsf-tiny` (CLI, Ray, default workers) on the hour video.

Figures only; nothing is asserted. The machine may be shared: the load average is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import decord  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import synth  # noqa: E402
from models.encoders import build_encoder, describe_encoder  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from stages.base import Unit  # noqa: E402
from stages.decode import WindowReader, center_crop, window_times  # noqa: E402
from synth.presets import Preset  # noqa: E402

BATCH, CHUNK = 16, 128  # windows per read in the decode strategies; windows per unit (the features config default)
TEN_MIN = Preset("ten", 0, 0, 1, activities_per_video=(3, 3), objects_per_activity=(2, 3), segment_s=200,
                 tail_s=0.0)  # 3 x 200 s: the hour video's look, a sixth of its length


def log(*args):
    print(*args, f"[this process: peak RSS {vm_hwm() / 2**30:.2f} GiB]", file=sys.stderr, flush=True)


def load() -> str:
    return "load avg " + " ".join(f"{x:.2f}" for x in os.getloadavg())


# ---------------------------------------------------------------------------------------------- inputs

def corpus(data: Path) -> dict[str, str]:
    """Generate (once; the generator skips a complete copy) the hour, hd and 10-minute videos."""
    paths = {}
    for key, preset in (("hour", "hour"), ("hd", "hd"), ("ten", TEN_MIN)):
        out = data / key
        t = time.perf_counter()
        synth.generate(preset, out)
        (video,) = sorted((out / "videos").glob("*.mp4"))
        paths[key] = str(video)
        log(f"corpus {key}: {video} ({time.perf_counter() - t:.1f} s)")
    paths["hd-x264"] = str(data / "hd-x264.mp4")
    if not os.path.exists(paths["hd-x264"]):
        reencode_x264_defaults(paths["hd"], paths["hd-x264"])
    return paths


def reencode_x264_defaults(src: str, dst: str) -> None:
    """`src` as x264 writes it by default (keyint 250, 3 B-frames), scene-cut keyframes off: the
    synthetic scene changes at every 4-s clip, which would put a keyframe at each window again."""
    import av
    from fractions import Fraction

    partial = dst + ".partial"
    with av.open(src) as inp, av.open(partial, "w", format="mp4") as out:
        v = inp.streams.video[0]
        stream = out.add_stream("libx264", rate=v.average_rate,
                                options={"preset": "veryfast", "crf": "18", "x264-params": "scenecut=0"})
        stream.width, stream.height, stream.pix_fmt = v.width, v.height, "yuv420p"
        for i, frame in enumerate(inp.decode(v)):
            frame = frame.reformat(format="yuv420p")
            # A decoded frame keeps its I/P type, which x264 would obey as a forced keyframe.
            frame.pts, frame.time_base, frame.pict_type = i, 1 / Fraction(v.average_rate), av.video.frame.PictureType.NONE
            out.mux(stream.encode(frame))
        out.mux(stream.encode())
    os.replace(partial, dst)


def duration(path: str) -> float:
    vr = decord.VideoReader(path, num_threads=1)
    return float(vr.get_frame_timestamp([len(vr) - 1])[0, 1])


def describe(path: str) -> str:
    vr = decord.VideoReader(path, num_threads=1)
    h, w = vr[0].shape[:2]
    gop = np.diff(vr.get_key_indices()).mean()
    return f"{w}x{h} {vr.get_avg_fps():g} fps {len(vr)} frames, keyframe every {gop:.0f}"


def measure(fn):
    """((wall s, CPU s of this process, all threads), result) of one call."""
    c0, t0 = os.times(), time.perf_counter()
    out = fn()
    wall, c1 = time.perf_counter() - t0, os.times()
    return (wall, (c1.user - c0.user) + (c1.system - c0.system)), out


# ----------------------------------------------------------------------------------- decode strategies

def _reader(path, size, windows):
    return WindowReader(path, size, 4, windows)


def _stack(frames: dict, indices: np.ndarray, size: int) -> np.ndarray:
    out = center_crop(np.stack([frames[i] for i in indices.reshape(-1).tolist()]), size)
    return np.ascontiguousarray(out.reshape(indices.shape + out.shape[1:]))


def strat_get_batch(r: WindowReader, n: int, per: int) -> np.ndarray:
    """decord get_batch of the sorted unique indices of `per` windows at a time (the old read)."""
    out = []
    for s in range(0, n, per):
        wanted = r.indices[s:min(s + per, n)]
        unique, inverse = np.unique(wanted, return_inverse=True)
        frames = center_crop(r.reader.get_batch(unique.tolist()).asnumpy(), r.size)
        out.append(np.ascontiguousarray(frames[inverse.reshape(wanted.shape)]))
    return np.concatenate(out)


def strat_next_all(r: WindowReader, n: int) -> np.ndarray:
    """Sequential: next() on every frame up to the last needed one (each is scaled and converted)."""
    wanted = r.indices[:n]
    need, frames = set(np.unique(wanted).tolist()), {}
    r.reader.seek(0)
    for i in range(int(wanted.max()) + 1):
        f = r.reader.next()
        if i in need:
            frames[i] = f.asnumpy()
    return _stack(frames, wanted, r.size)


def strat_skip_next(r: WindowReader, n: int) -> np.ndarray:
    """Sequential: skip_frames to each needed frame (decord seeks when that passes a keyframe), next()."""
    wanted = r.indices[:n]
    frames, pos = {}, 0
    r.reader.seek(0)
    for i in np.unique(wanted).tolist():
        if i > pos:
            r.reader.skip_frames(i - pos)
        frames[i] = r.reader.next().asnumpy()
        pos = i + 1
    return _stack(frames, wanted, r.size)


def strat_window_reader(r: WindowReader, n: int) -> np.ndarray:
    """WindowReader.read as it is now, batches of 16 windows."""
    return np.concatenate([r.read(s, min(s + BATCH, n)) for s in range(0, n, BATCH)])


def resize_crop(frames: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (..., H, W, 3) -> uint8 (..., size, size, 3): short side to `size` (antialiased bilinear), centre crop."""
    lead, (h, w) = frames.shape[:-3], frames.shape[-3:-1]
    x = frames.reshape(-1, h, w, 3).permute(0, 3, 1, 2).float()
    scale = size / min(h, w)
    x = F.interpolate(x, size=(max(size, round(h * scale)), max(size, round(w * scale))), mode="bilinear",
                      antialias=True, align_corners=False)
    top, left = (x.shape[-2] - size) // 2, (x.shape[-1] - size) // 2
    x = x[..., top:top + size, left:left + size].round().clamp(0, 255).to(torch.uint8)
    return x.permute(0, 2, 3, 1).reshape(*lead, size, size, 3)


def strat_fullres(path: str, r: WindowReader, n: int) -> np.ndarray:
    """Full-resolution get_batch per batch of 16 windows, then resize + crop in torch (not byte-identical)."""
    full = decord.VideoReader(path, num_threads=1)
    out = []
    for s in range(0, n, BATCH):
        wanted = r.indices[s:min(s + BATCH, n)]
        unique, inverse = np.unique(wanted, return_inverse=True)
        decoded = full.get_batch(unique.tolist()).asnumpy()
        frames = np.concatenate([resize_crop(torch.from_numpy(decoded[k:k + 4]), r.size).numpy()
                                 for k in range(0, len(decoded), 4)])
        out.append(frames[inverse.reshape(wanted.shape)])
    return np.concatenate(out)


def decode_strategies(paths: dict, quick: bool) -> None:
    cases = [("hour", 128 if quick else 256), ("hd", 12 if quick else 24)]
    repeats = 2 if quick else 4
    sizes = (32, 224)  # tsf-tiny, tsf-base input sizes
    strategies = [
        ("get_batch per 16-window batch, sorted (old read)", lambda p, r, n: strat_get_batch(r, n, BATCH)),
        ("get_batch per window", lambda p, r, n: strat_get_batch(r, n, 1)),
        ("get_batch per 128-window chunk", lambda p, r, n: strat_get_batch(r, n, CHUNK)),
        ("next() every frame", lambda p, r, n: strat_next_all(r, n)),
        ("skip_frames + next() (seeks at keyframes)", lambda p, r, n: strat_skip_next(r, n)),
        ("WindowReader.read now (no seek across 1 key)", lambda p, r, n: strat_window_reader(r, n)),
        ("full-res get_batch + torch resize", strat_fullres),
    ]
    cols, results = [], {}
    for video, limit in cases:
        path = paths[video]
        windows = window_times(duration(path))
        n = len(windows) if limit is None else min(limit, len(windows))
        for size in sizes:
            col = f"{video} {size}px ({n} win)"
            cols.append(col)
            log(f"decode strategies: {col} ({load()})")
            ref, seen = None, {}
            for _ in range(repeats):  # round-robin, so that load from elsewhere hits all strategies alike
                for name, fn in strategies:
                    r = _reader(path, size, windows)  # fresh reader: opening is not timed
                    (wall, cpu), out = measure(lambda: fn(path, r, n))
                    del r
                    if ref is None:
                        ref = out
                    same = "~" if name.startswith("full-res") else ("=" if np.array_equal(out, ref) else "DIFF")
                    old = seen.get(name, (float("inf"), float("inf"), "="))
                    seen[name] = (min(old[0], wall), min(old[1], cpu), "DIFF" if "DIFF" in (same, old[2]) else same)
            for name, (wall, cpu, same) in seen.items():
                results[name, col] = (n / wall, 1000 * cpu / n, same)
    print(f"\n## Decode strategies: best windows/s of {repeats} rounds, (least CPU ms per window); = identical "
          f"frames to the first row, ~ resized by torch (not identical)")
    print(f"| strategy | {' | '.join(cols)} |")
    print(f"|---|{'---:|' * len(cols)}")
    for name, _ in strategies:
        cells = [f"{results[name, c][0]:.1f} ({results[name, c][1]:.1f}) {results[name, c][2]}" for c in cols]
        print(f"| {name} | {' | '.join(cells)} |")


# ---------------------------------------------------------------------------------------- throughput

def decode_only(path: str, size: int, windows: np.ndarray, n: int, batch: int) -> np.ndarray:
    """The stage's decode path without encoding: one reader per video (a worker reuses it across the
    video's chunks), batches that do not cross a 128-window chunk."""
    r = WindowReader(path, size, 4, windows)
    return np.concatenate([r.read(s, min(s + batch, c + CHUNK, n)) for c in range(0, n, CHUNK)
                           for s in range(c, min(c + CHUNK, n), batch)])


def encode_only(encoder, frames: np.ndarray, batch: int) -> None:
    for s in range(0, len(frames), batch):
        cls, tokens = encoder.encode(torch.from_numpy(frames[s:s + batch]))
        cls.numpy(), tokens.numpy()


def naive(path: str, encoder, indices: np.ndarray, n: int) -> None:
    full = decord.VideoReader(path, num_threads=1)
    rows = []
    for w in range(n):
        frames = torch.from_numpy(full.get_batch(indices[w].tolist()).asnumpy())  # seek + decode this window
        cls, _ = encoder.encode(resize_crop(frames, encoder.spec.image_size)[None])
        rows.append(cls.numpy())


def make_store(path: str, root: Path):
    from pipeline.ingest import ingest
    from store import Store

    store = Store(str(root))
    ingest(store, [path], stream=open(os.devnull, "w"))
    return store


def pipeline_run(stage, path: str, n: int, scratch: Path) -> None:
    """FeaturesStage.prepare + process of every unit (clipped to the first n windows) in a new store.
    Store creation and ingest are not timed: `timed` brackets the stage's own work."""
    root = Path(tempfile.mkdtemp(dir=scratch))
    try:
        store = make_store(path, root)
        units = []
        for u in stage.plan(store):
            if u.payload["start"] < n:
                stop = min(u.payload["stop"], n)
                units.append(Unit(id=u.id, video_id=u.video_id, fingerprint=u.fingerprint,
                                  work=stop - u.payload["start"], payload={**u.payload, "stop": stop}))
        def run():
            stage.prepare(store, units)
            for u in units:
                stage.process(u, store)
        return measure(run)[0]
    finally:
        shutil.rmtree(root, ignore_errors=True)


def rounds(measures: dict, n_rounds: int, slow_s: float = 20.0) -> dict:
    """Run the measures round-robin (so a load spike from elsewhere hits them alike) and keep each
    one's least (wall, CPU) seconds; a measure whose first run took more than slow_s runs only once."""
    best = {}
    for r in range(n_rounds):
        for name, fn in measures.items():
            if r and best[name][0] > slow_s:
                continue
            wall, cpu = fn()
            old = best.get(name, (float("inf"), float("inf")))
            best[name] = (min(old[0], wall), min(old[1], cpu))
    return best


def timed(fn):
    return lambda: measure(fn)[0]


def throughput(paths: dict, quick: bool, scratch: Path) -> None:
    from pipeline.dag import features_stage

    default_threads = torch.get_num_threads()
    base_windows = 8 if quick else 32
    tiny_hour = 256 if quick else None
    # (encoder, video, windows or None = all, torch threads or None = what the stage's setup() sets)
    cases = [("tsf-tiny", "hour", tiny_hour, None), ("tsf-tiny", "hd", None, None),
             ("tsf-tiny", "hd-x264", None, None), ("tsf-tiny", "hour", tiny_hour, default_threads),
             ("tsf-base", "hour", base_windows, None), ("tsf-base", "hd", base_windows, None)]
    rows = []
    try:
        for name, video, limit, threads in cases:
            path = paths[video]
            windows = window_times(duration(path))
            n = len(windows) if limit is None else min(limit, len(windows))
            spec = describe_encoder(name)
            cfg = load_config(features={"encoder": name, "random_weights": True})
            stage = features_stage(cfg)
            if threads is None:  # the stage as users run it: setup() builds the encoder and sets torch threads
                torch.set_num_threads(default_threads)
                stage.setup()
                threads = f"{torch.get_num_threads()} (stage)"
            else:  # torch's default beside the decode thread: the stage before d713843 when run in-process
                torch.set_num_threads(threads)
                stage.encoder_model = build_encoder(name)
                threads = f"{threads} (torch default)"
            encoder = stage.encoder_model
            log(f"throughput: {name} on {video}, {n} windows, {threads} torch threads ({load()})")
            frames = decode_only(path, spec.image_size, windows, n, stage.batch_size)
            indices = _reader(path, spec.image_size, windows).indices
            measures = {
                "decode": timed(lambda: decode_only(path, spec.image_size, windows, n, stage.batch_size)),
                "encode": timed(lambda: encode_only(encoder, frames, stage.batch_size)),
                "pipeline": lambda: pipeline_run(stage, path, n, scratch),
                "naive": timed(lambda: naive(path, encoder, indices, n)),
            }
            best = rounds(measures, 1 if name == "tsf-base" else 3)
            rate = {k: n / v[0] for k, v in best.items()}
            cpu = {k: 1000 * v[1] / n for k, v in best.items()}  # ms per window
            dec, enc, pipe, nv = rate["decode"], rate["encode"], rate["pipeline"], rate["naive"]
            rows.append((name, video, f"{n}" + (" (all)" if limit is None else ""), threads, dec, enc, pipe, nv,
                         pipe / min(dec, enc), pipe / nv, cpu["pipeline"], cpu["naive"]))
    finally:
        torch.set_num_threads(default_threads)
    print(f"\n## Throughput, windows/s, one worker (tsf-base: random weights, full size, first {base_windows} "
          f"windows only; the stage's default batch size, 4 on CPU; {CHUNK}-window units, tokens on, 1 decode thread)")
    print("| encoder | video | windows | torch threads | decode | encode | pipeline | naive | efficiency | speed-up "
          "| CPU ms/win pipeline / naive |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, video, n, threads, dec, enc, pipe, nv, eff, up, cpu_pipe, cpu_naive in rows:
        print(f"| {name} | {video} | {n} | {threads} | {dec:.1f} | {enc:.1f} | {pipe:.2f} | {nv:.2f} | {eff:.2f} | "
              f"{up:.2f}x | {cpu_pipe:.1f} / {cpu_naive:.1f} |")
    print(f"efficiency = pipeline / min(decode, encode); speed-up = pipeline / naive; encode and naive run at the "
          f"pipeline's torch threads: the stage's setup() sets as many as the CPUs it reserves (1), as Ray does for "
          f"an actor; '{default_threads} (torch default)' is what an in-process run got before commit d713843.")


# -------------------------------------------------------------------------------------------- memory

def vm_hwm() -> int:
    """Peak RSS of this process's address space, bytes. Not getrusage's ru_maxrss: Linux carries that
    across exec, so a child started from this (large) benchmark process would report the parent's peak."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def memory_child(path: str, root: str) -> None:
    """In a fresh process: the real stage, run_stage(executor="local"), tsf-tiny with tokens."""
    import psutil

    from pipeline.runner import run_stage
    from pipeline.dag import features_stage

    store = make_store(path, Path(root))
    cfg = load_config(features={"encoder": "tsf-tiny", "tokens": True})
    stage = features_stage(cfg)
    before = psutil.Process().memory_info().rss
    t = time.perf_counter()
    summary = run_stage(stage, store, executor="local", stream=open(os.devnull, "w"))
    wall = time.perf_counter() - t
    print(json.dumps({"peak": vm_hwm(), "before": before,
                      "wall": wall, "units": summary.done, "failed": summary.failed,
                      "windows": len(window_times(duration(path)))}))


def memory(paths: dict, scratch: Path) -> None:
    results = {}
    for key in ("ten", "hour"):
        log(f"memory: {key} ({load()})")
        root = Path(tempfile.mkdtemp(dir=scratch))
        try:
            out = subprocess.run([sys.executable, __file__, "--memory-child", paths[key], str(root)],
                                 check=True, capture_output=True, text=True)
        finally:
            shutil.rmtree(root, ignore_errors=True)
        results[key] = json.loads(out.stdout.strip().splitlines()[-1])
    print("\n## Peak memory of the real stage (run_stage executor=local, tsf-tiny, tokens on; one fresh process each)")
    print("| video | windows | units | wall s | RSS before run | peak RSS | peak - before |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for key, label in (("ten", "10 min"), ("hour", "60 min")):
        r = results[key]
        print(f"| {label} | {r['windows']} | {r['units']} | {r['wall']:.1f} | {r['before'] / 2**20:.0f} MiB | "
              f"{r['peak'] / 2**20:.0f} MiB | {(r['peak'] - r['before']) / 2**20:.0f} MiB |")
    ten, hour = results["ten"], results["hour"]
    print(f"peak ratio 60 min / 10 min: {hour['peak'] / ten['peak']:.3f} "
          f"(growth during the run: {(hour['peak'] - hour['before']) / 2**20:.0f} vs "
          f"{(ten['peak'] - ten['before']) / 2**20:.0f} MiB)")


# ----------------------------------------------------------------------------------------------- CLI

def cli(paths: dict, scratch: Path) -> None:
    recap = str(Path(sys.executable).with_name("recap"))
    n = len(window_times(duration(paths["hour"])))
    features = [recap, "features", "--store", "S", "--encoder", "tsf-tiny"]
    rows = []
    for cmd in ([recap, "ingest", str(Path(paths["hour"]).parent), "--store", "S"], features, features + ["--local"]):
        store = Path(tempfile.mkdtemp(dir=scratch)) / "store"
        try:
            if cmd[1] == "features":  # a store of its own, so each features run does all the work
                subprocess.run([recap, "ingest", paths["hour"], "--store", str(store)], check=True, capture_output=True)
            log(f"cli: {' '.join(cmd)} ({load()})")
            t = time.perf_counter()
            done = subprocess.run([str(store) if a == "S" else a for a in cmd], capture_output=True, text=True)
            wall = time.perf_counter() - t
        finally:
            shutil.rmtree(store.parent, ignore_errors=True)
        if done.returncode:
            print(f"\n{' '.join(cmd[1:])} failed ({done.returncode}):\n{done.stderr[-2000:]}")
            return
        summary = [line for line in done.stderr.splitlines() if line.startswith(f"[{cmd[1]}] done")]
        rows.append((" ".join(["recap"] + cmd[1:]).replace(str(Path(paths["hour"]).parent), "DIR"), wall,
                     f"{n / wall:.1f}" if cmd[1] == "features" else "", summary[0].replace("|", "·") if summary else ""))
    print("\n## CLI on the hour video (Ray with default workers, and --local), wall time incl. start-up")
    print("| command | wall s | windows/s | the stage's own summary |\n|---|---:|---:|---|")
    for cmd, wall, rate, summary in rows:
        print(f"| {cmd} | {wall:.1f} | {rate} | {summary} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer windows (256 tiny / 8 base), no CLI run")
    parser.add_argument("--no-cli", action="store_true", help="skip the `recap` CLI run")
    parser.add_argument("--only", choices=("decode", "throughput", "memory", "cli"), help="run one section")
    parser.add_argument("--data", default=str(ROOT / "data" / "bench"), help="where the synthetic videos live")
    parser.add_argument("--memory-child", nargs=2, metavar=("VIDEO", "ROOT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        return memory_child(*args.memory_child)

    paths = corpus(Path(args.data))
    scratch = Path(tempfile.mkdtemp(prefix="bench-features-"))
    print(f"torch {torch.__version__} ({torch.get_num_threads()} threads), decord {decord.__version__}, "
          f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}; {load()} at start")
    for key in ("hour", "hd", "hd-x264", "ten"):
        print(f"- {key}: {Path(paths[key]).name}, {duration(paths[key]):.0f} s, {describe(paths[key])}")
    try:
        sections = {"decode": lambda: decode_strategies(paths, args.quick),
                    "throughput": lambda: throughput(paths, args.quick, scratch),
                    "memory": lambda: memory(paths, scratch),
                    "cli": lambda: None if args.quick or args.no_cli else cli(paths, scratch)}
        for name, run in sections.items():
            if args.only in (None, name):
                run()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"\n{load()} at end")


if __name__ == "__main__":
    main()
