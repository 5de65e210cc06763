"""The `recap` command line: one command per stage, plus run, status and demo."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from pipeline.config import record_settings, settle
from pipeline.ingest import ingest as ingest_videos
from pipeline.ingest import ingest_hcap
from pipeline.progress import Summary
from pipeline.status import failure_lines, format_status, status_rows
from stages.base import SetupFailed
from store import Store

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Hierarchical captions for hour-long videos (Video ReCap) over a feature store.")

StoreOpt = Annotated[Optional[str], typer.Option("--store", "-s", help="Store root: folder or fsspec URL "
                                                  "[default: config's store, ./recap-store]")]
ConfigOpt = Annotated[Optional[Path], typer.Option("--config", "-c", help="TOML config overriding defaults")]


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg="red", err=True)
    raise typer.Exit(EXIT_USAGE)


# Exit codes: 0 all done or skipped; 1 some units failed; 2 bad input (nothing ran); 3 some units are
# blocked on inputs an earlier stage has not made (the lines above it name the command to run).
EXIT_FAILED, EXIT_USAGE, EXIT_BLOCKED = 1, 2, 3


_to_record = []  # the settings of a command that works: recorded in its store once it has run (not on exit 2)


def _load(store: str | None, config: Path | None, *, record: bool = True, **overrides):
    """The store's settings, then --config, then flags. Commands that work record changes in the store
    when they have run; commands that only read (`record=False`) neither record nor create a store."""
    try:
        cfg = settle(store, config, record=False, **overrides)
        if not record:
            Store(cfg.store, create=False)
    except (FileNotFoundError, ValueError) as e:
        _fail(str(e))
    if record:
        Store(cfg.store).check_writable()  # a read-only store: one line, before any work (main())
        _to_record.append(cfg)
    return cfg


def _record() -> None:
    while _to_record:
        record_settings(_to_record.pop())


def _open(store: str | None, config: Path | None, record: bool = True):
    cfg = _load(store, config, record=record)
    return cfg, Store(cfg.store)


def _exit_for(*summaries: Summary) -> None:
    _record()
    failed = sum(s.failed for s in summaries)
    blocked = sum(s.blocked for s in summaries)
    if failed:
        typer.secho(f"{failed} unit(s) failed; see failure records under failures/ or `recap status`",
                    fg="yellow", err=True)
        raise typer.Exit(EXIT_FAILED)
    if blocked:
        typer.secho(f"{blocked} unit(s) blocked on an earlier stage; run the command named above, then this "
                    f"one again", fg="yellow", err=True)
        raise typer.Exit(EXIT_BLOCKED)


@app.command()
def synth(preset: Annotated[str, typer.Option(help="tiny | demo | hour")] = "tiny",
          out: Annotated[Path, typer.Option(help="Output folder for videos and ground truth")] = Path("data/synth"),
          seed: Annotated[int, typer.Option(help="Same seed, same bytes")] = 0):
    """Generate the synthetic corpus: rendered mp4 videos with clip / segment / video ground truth."""
    import synth as synth_pkg

    try:
        manifest = synth_pkg.generate(preset, out, seed=seed)
    except (ValueError, KeyError, synth_pkg.CorpusMismatch) as e:
        _fail(str(e))
    counts = ", ".join(f"{split}: {manifest.videos[split]} videos / {manifest.segments[split]} segments / "
                       f"{manifest.clips[split]} clips" for split in manifest.videos)
    typer.echo(f"{out}: preset {preset}, seed {seed}; {counts}")


@app.command(context_settings={"help_option_names": ["-h", "--help"]})
def ingest(sources: Annotated[list[str], typer.Argument(help="Folders, list files or videos; or "
                                                        "`ego4d-hcap METADATA_DIR --videos ROOT`")],
           videos: Annotated[Optional[str], typer.Option(help="Video root for ego4d-hcap (ROOT/{vid}.mp4)")] = None,
           store: StoreOpt = None, config: ConfigOpt = None,
           threads: Annotated[int, typer.Option(help="Parallel probes")] = 4):
    """Probe videos and register them; unreadable files get failure records and the rest go on.

    `recap ingest ego4d-hcap METADATA_DIR --videos ROOT` reads official Ego4D-HCap metadata
    (clips_*.pkl, segments_*.pkl, videos_*.json) into ground-truth tables and registers ROOT/{vid}.mp4.
    """
    cfg, st = _open(store, config)
    try:
        if sources[0] == "ego4d-hcap":
            if len(sources) != 2 or not videos:
                _fail("usage: recap ingest ego4d-hcap METADATA_DIR --videos ROOT")
            summary = ingest_hcap(st, sources[1], videos, threads)
        else:
            summary = ingest_videos(st, sources, threads)
    except (FileNotFoundError, ValueError) as e:  # missing or unsafe metadata
        _fail(str(e))
    _exit_for(summary)


RetryOpt = Annotated[bool, typer.Option("--retry-failed", help="Retry units that failed before")]
WorkersOpt = Annotated[Optional[int], typer.Option(help="Ray workers [default: one per CPU]")]
AddressOpt = Annotated[Optional[str], typer.Option(help="Ray cluster address [default: RAY_ADDRESS or local]")]
LocalOpt = Annotated[bool, typer.Option("--local", help="Run in this process instead of on Ray (debugging)")]


def _run(build, cfg, st: Store, retry_failed: bool, local: bool):
    """Build the stage (`build()`: bad settings fail here), check it, run it; exit as `_exit_for` says."""
    from pipeline.runner import run_stage

    try:
        stage = build()
        summary = run_stage(stage, st, executor="local" if local else cfg.run.executor, workers=cfg.run.workers,
                            address=cfg.run.address or None, retry_failed=retry_failed,
                            max_retries=cfg.run.max_retries)
    except (ValueError, FileNotFoundError, SetupFailed) as e:  # settings, the stage's check() or setup
        _fail(str(e))
    _exit_for(summary)


@app.command()
def features(store: StoreOpt = None, config: ConfigOpt = None,
             encoder: Annotated[Optional[str], typer.Option(help="tsf-base | tsf-tiny | videoprism | "
                                                            "videoprism-tiny")] = None,
             checkpoint: Annotated[Optional[str], typer.Option(help="LaViLa .pth or VideoPrism folder")] = None,
             tokens: Annotated[Optional[bool], typer.Option("--tokens/--no-tokens",
                                                           help="Store all tokens per window")] = None,
             batch_size: Annotated[Optional[int],
                                   typer.Option(help="Windows per encoder call (default 16 on CUDA, 4 on CPU)")] = None,
             device: Annotated[Optional[str], typer.Option(help="cpu | cuda")] = None,
             workers: WorkersOpt = None, address: AddressOpt = None, retry_failed: RetryOpt = False,
             local: LocalOpt = False):
    """Per 4-s window CLS (and tokens) of every registered video, into Zarr."""
    from pipeline.dag import features_stage

    feats = {"encoder": encoder, "checkpoint": checkpoint, "tokens": tokens, "batch_size": batch_size,
             "device": device}
    cfg = _load(store, config, features=_given(feats), run=_given({"workers": workers, "address": address}))
    _run(lambda: features_stage(cfg), cfg, Store(cfg.store), retry_failed, local)


def _given(values: dict) -> dict:
    return {k: v for k, v in values.items() if v is not None}


CheckpointOpt = Annotated[Optional[str], typer.Option(help="Our checkpoint folder or an official .pth "
                                                      "[default: latest trained in the store]")]
MethodOpt = Annotated[Optional[str], typer.Option(help="greedy | beam | sample")]
BatchOpt = Annotated[Optional[int], typer.Option(help="Windows per generate call")]


def _caption_command(level: str, doc: str):
    """`recap captions | segments | summaries`: one command per level, the same options."""
    from store import LEVEL

    def command(store: StoreOpt = None, config: ConfigOpt = None, checkpoint: CheckpointOpt = None,
                method: MethodOpt = None, batch_size: BatchOpt = None, workers: WorkersOpt = None,
                address: AddressOpt = None, retry_failed: RetryOpt = False, local: LocalOpt = False):
        from pipeline.dag import build_stages

        caps = {f"{level}_checkpoint": checkpoint, "method": method, "batch_size": batch_size}
        cfg = _load(store, config, captions=_given(caps), run=_given({"workers": workers, "address": address}))
        st = Store(cfg.store)

        def build():
            chain = build_stages(cfg, st, upto=LEVEL[level].stage)
            if chain[-1].name != LEVEL[level].stage:
                raise FileNotFoundError(f"no {level} checkpoint: pass --checkpoint, set captions.{level}_checkpoint,"
                                        f" or run `recap train --level {level}`; earlier levels need theirs too")
            return chain[-1]
        _run(build, cfg, st, retry_failed, local)

    command.__doc__ = doc
    app.command(LEVEL[level].stage)(command)


_caption_command("clip", "Clip captions for every 4-s window of every video, into captions/clip.")
_caption_command("segment", "Segment descriptions: sparse CLS + the clip captions of each segment window, "
                            "into captions/segment.")
_caption_command("video", "Video summaries: sparse CLS of the video + its segment descriptions, into captions/video.")


@app.command()
def train(store: StoreOpt = None, config: ConfigOpt = None,
          level: Annotated[str, typer.Option(help="clip | segment | video | unified (ReCap-U)")] = "clip",
          init_from: Annotated[Optional[str], typer.Option(help="Checkpoint to start from: our folder or an "
                                                           "official .pth (the previous level's)")] = None,
          lower: Annotated[Optional[str], typer.Option(help="Lower-level text for segment / video: "
                                                       "predicted | groundtruth")] = None,
          lower_version: Annotated[Optional[list[str]], typer.Option(
              help="Predicted caption version to read, e.g. clip-71e289aa (repeatable; needed when there are "
                   "several)")] = None,
          recursive: Annotated[Optional[bool], typer.Option(
              "--recursive/--no-recursive", help="Read the lower level's text (off: the non-recursive "
                                                 "baseline, video features only)")] = None,
          freeze: Annotated[Optional[str], typer.Option(help="official | none (train everything)")] = None,
          size: Annotated[Optional[str], typer.Option(help="Model size without --init-from: base | demo | "
                                                      "tiny")] = None,
          epochs: Annotated[Optional[int], typer.Option(help="Epochs")] = None,
          batch_size: Annotated[Optional[int], typer.Option(help="Examples per step, over all workers")] = None,
          lr: Annotated[Optional[float], typer.Option(help="Peak learning rate")] = None,
          workers: Annotated[Optional[int], typer.Option(help="Ray Train workers (DDP); 1 = this process")] = None,
          address: AddressOpt = None):
    """Train a level's model on the store (checkpoint every epoch, resumable); captioning then uses it."""
    from pipeline.train import train as train_level

    settings = {"lower": lower, "recursive": recursive, "freeze": freeze, "size": size, "epochs": epochs,
                "batch_size": batch_size, "lr": lr, "workers": workers}
    cfg = _load(store, config, train={k: v for k, v in settings.items() if v is not None},
                run={"address": address} if address else None)
    try:
        train_level(cfg, Store(cfg.store), level, init_from=init_from, lower_versions=lower_version or ())
        _record()
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        _fail(str(e))


@app.command()
def evaluate(store: StoreOpt = None, config: ConfigOpt = None,
             split: Annotated[Optional[str], typer.Option(help="Ground-truth split [default: test]")] = None,
             protocol: Annotated[Optional[list[str]], typer.Option(help="videorecap | coco (repeatable)")] = None,
             by: Annotated[Optional[str], typer.Option(help="'video' for per-video scores")] = None):
    """CIDEr / ROUGE-L / METEOR per level against ground truth; writes a metrics table and prints it."""
    from pipeline.evaluate import evaluate_all

    ev = {"split": split, "protocols": tuple(protocol) if protocol else None}
    cfg = _load(store, config, record=False, evaluate={k: v for k, v in ev.items() if v is not None})
    if by not in (None, "video"):
        _fail(f"--by takes 'video', got {by!r}")
    try:
        result = evaluate_all(cfg, Store(cfg.store), by=by)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        _fail(str(e))
    if result is None:
        raise typer.Exit(1)


@app.command()
def run(store: StoreOpt = None, config: ConfigOpt = None,
        dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan, compute nothing")] = False,
        workers: WorkersOpt = None, address: AddressOpt = None, retry_failed: RetryOpt = False,
        local: LocalOpt = False):
    """The DAG: features -> captions -> segments -> summaries; only new or failed (with --retry-failed) work."""
    from pipeline.run import run_all

    cfg = _load(store, config, record=not dry_run, run=_given({"workers": workers, "address": address}))
    try:
        summaries = run_all(cfg, Store(cfg.store), dry_run=dry_run, retry_failed=retry_failed, local=local)
    except (ValueError, FileNotFoundError) as e:
        _fail(str(e))
    _exit_for(*summaries)


@app.command()
def status(store: StoreOpt = None, config: ConfigOpt = None):
    """Per stage and level: units done / failed / pending, with sizes."""
    from pipeline.dag import build_stages

    cfg, st = _open(store, config, record=False)
    typer.echo(f"store: {st.root}")
    rows = status_rows(st, build_stages(cfg, st))
    typer.echo(format_status(rows))
    for line in failure_lines(st, rows):
        typer.echo(line)


@app.command()
def demo(store: Annotated[str, typer.Option("--store", "-s", help="Store root for the demo")] = "recap-store/demo",
         data: Annotated[Path, typer.Option(help="Where the demo corpus is generated")] = Path("data/demo"),
         preset: Annotated[str, typer.Option(help="Corpus preset")] = "demo",
         seed: int = 0):
    """The main job on the embedded synthetic corpus: generate, ingest, every stage, status."""
    from pipeline.demo import run_demo

    _exit_for(*run_demo(store, data, preset, seed))


checkpoint_app = typer.Typer(no_args_is_help=True, help="Official checkpoints: convert and inspect.")
app.add_typer(checkpoint_app, name="checkpoint")
OverridesOpt = Annotated[Optional[str], typer.Option("--config", help="JSON (file or inline) with model settings "
                                                     "an official file lacks, e.g. head counts")]


@checkpoint_app.command("convert")
def checkpoint_convert(official: Annotated[str, typer.Argument(help="Official Video ReCap .pth")],
                       out_dir: Annotated[str, typer.Argument(help="New folder for our format")],
                       config: OverridesOpt = None,
                       tokenizer: Annotated[Optional[str], typer.Option(help="Local GPT-2 tokenizer folder")] = None):
    """Official .pth (loaded strictly, never unpickling code) -> safetensors + config + tokenizer folder."""
    from pipeline.checkpoints import convert

    try:
        typer.echo(f"wrote {convert(official, out_dir, config, tokenizer)}")
    except (ValueError, FileNotFoundError) as e:
        _fail(str(e))


@checkpoint_app.command("inspect")
def checkpoint_inspect(path: Annotated[str, typer.Argument(help="Our checkpoint folder or an official .pth")],
                       config: OverridesOpt = None):
    """Level, parameter counts, query counts and configuration of a checkpoint."""
    from pipeline.checkpoints import describe

    try:
        typer.echo(describe(path, config))
    except (ValueError, FileNotFoundError) as e:
        _fail(str(e))


def main() -> None:
    """The app, with errors of the machine (a read-only or full store, a missing mount) as one line, exit 2;
    RECAP_DEBUG=1 shows the traceback."""
    import os

    try:
        app()
    except OSError as e:
        if os.environ.get("RECAP_DEBUG"):
            raise
        where = f"{e.filename}: " if e.filename else ""
        typer.secho(f"error: {where}{e.strerror or e}", fg="red", err=True)
        raise SystemExit(EXIT_USAGE) from None
