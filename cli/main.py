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

HELP = {"help_option_names": ["-h", "--help"]}  # -h as well as --help, on every command and sub-command
# rich_markup_mode=None: help text shows as written; Rich markup read "[default: ...]" as a tag and dropped it.
app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, context_settings=HELP,
                  rich_markup_mode=None,
                  help="Hierarchical captions for hour-long videos (Video ReCap) over a feature store.")

StoreOpt = Annotated[Optional[str], typer.Option("--store", "-s", help="Store root: folder or fsspec URL "
                                                  "[default: config's store, ./recap-store]")]
ConfigOpt = Annotated[Optional[Path], typer.Option("--config", "-c", help="TOML config overriding defaults")]


JsonOpt = Annotated[bool, typer.Option("--json", help="One JSON document on stdout instead of the table "
                                                      "(messages stay on stderr)")]


def _print_json(document: dict) -> None:
    import json

    typer.echo(json.dumps(document, indent=2, default=str))


def _setting(key: str, shown: str | None = None) -> str:
    """The help's "[default: ...]" of an option that falls back to a setting (the store's recap.toml, then
    --config, then the built-in value of pipeline/config.py)."""
    from pipeline.config import Config, flatten

    value = flatten(Config())[key] if shown is None else shown
    value = ", ".join(value) if isinstance(value, (tuple, list)) else value
    return f"[default: store's setting, else {value}]"


def _package_version() -> str:
    """The installed package's version; from pyproject.toml in a checkout that was never installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("recap")
    except PackageNotFoundError:
        import tomllib

        pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
        try:
            return tomllib.loads(pyproject.read_text())["project"]["version"]
        except (OSError, KeyError, tomllib.TOMLDecodeError):
            return "unknown"


def _show_version(value: bool) -> None:
    if value:
        typer.echo(f"recap {_package_version()}")
        raise typer.Exit()


@app.callback()
def _everywhere(
        version: Annotated[Optional[bool], typer.Option("--version", callback=_show_version, is_eager=True,
                                                        help="Print the version and exit")] = None,
        log_file: Annotated[Optional[Path], typer.Option(
            "--log-file", envvar="RECAP_LOG_FILE", metavar="PATH",
            help="Also append everything the command prints to stderr to PATH, as plain lines (no colours, no "
                 "progress bar) [default: none]")] = None):
    """Options before the command: `recap --log-file run.log features ...`."""
    if log_file is not None:
        import sys

        from pipeline.logfile import tee_stderr

        tee_stderr(log_file, "recap " + " ".join(sys.argv[1:]))


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg="red", err=True)
    raise typer.Exit(EXIT_USAGE)


# Exit codes: 0 all done or skipped; 1 some units failed; 2 bad input (nothing ran); 3 some units are
# blocked on inputs an earlier stage has not made (the lines above it name the command to run).
EXIT_FAILED, EXIT_USAGE, EXIT_BLOCKED = 1, 2, 3


_to_record = []  # the settings of a command that works: recorded in its store once it has run (not on exit 2)


def _load(store: str | None, config: Path | None, *, record: bool = True, **overrides):
    """The store's settings, then --config, then flags. Commands that work record changes in the store
    when they have run; commands that only read (`record=False`) neither record nor create a store.
    Commands call it before importing the pipeline (torch, transformers: seconds), so bad settings fail at once."""
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
        if getattr(stage, "level", None):  # a caption level: current/ gets what it committed
            from pipeline.current import publish_current

            publish_current(cfg, st, [stage.level])
    except (ValueError, FileNotFoundError, SetupFailed) as e:  # settings, the stage's check() or setup
        _fail(str(e))
    _exit_for(summary)


@app.command()
def features(store: StoreOpt = None, config: ConfigOpt = None,
             encoder: Annotated[Optional[str], typer.Option(help="tsf-base | tsf-tiny | videoprism | "
                                                            "videoprism-tiny " + _setting("features.encoder"))] = None,
             checkpoint: Annotated[Optional[str], typer.Option(help="LaViLa .pth or VideoPrism folder " + _setting(
                 "features.checkpoint", "none (seeded random weights)"))] = None,
             tokens: Annotated[Optional[bool], typer.Option("--tokens/--no-tokens",
                                                           help="Store all tokens per window "
                                                                + _setting("features.tokens", "--tokens"))] = None,
             batch_size: Annotated[Optional[int],
                                   typer.Option(help="Windows per encoder call " + _setting(
                                       "features.batch_size", "16 on CUDA, 4 on CPU"))] = None,
             device: Annotated[Optional[str], typer.Option(help="cpu | cuda " + _setting("features.device"))] = None,
             workers: WorkersOpt = None, address: AddressOpt = None, retry_failed: RetryOpt = False,
             local: LocalOpt = False):
    """Per 4-s window CLS (and tokens) of every registered video, into Zarr."""
    feats = {"encoder": encoder, "checkpoint": checkpoint, "tokens": tokens, "batch_size": batch_size,
             "device": device}
    cfg = _load(store, config, features=_given(feats), run=_given({"workers": workers, "address": address}))
    from pipeline.dag import features_stage

    _run(lambda: features_stage(cfg), cfg, Store(cfg.store), retry_failed, local)


def _given(values: dict) -> dict:
    return {k: v for k, v in values.items() if v is not None}


CheckpointOpt = Annotated[Optional[str], typer.Option(help="Our checkpoint folder or an official .pth "
                                                      "[default: latest trained in the store]")]
MethodOpt = Annotated[Optional[str], typer.Option(help="greedy | beam | sample (summaries: sets captions.video_method) "
                                                        + _setting("captions.method"))]
BatchOpt = Annotated[Optional[int], typer.Option(help="Windows per generate call " + _setting("captions.batch_size"))]


def _caption_command(level: str, doc: str):
    """`recap captions | segments | summaries`: one command per level, the same options."""
    from store import LEVEL

    def command(store: StoreOpt = None, config: ConfigOpt = None, checkpoint: CheckpointOpt = None,
                method: MethodOpt = None, batch_size: BatchOpt = None, workers: WorkersOpt = None,
                address: AddressOpt = None, retry_failed: RetryOpt = False, local: LocalOpt = False):
        # summaries have a decoding setting of their own (captions.video_method), which --method must win over
        caps = {f"{level}_checkpoint": checkpoint, "video_method" if level == "video" else "method": method,
                "batch_size": batch_size}
        cfg = _load(store, config, captions=_given(caps), run=_given({"workers": workers, "address": address}))
        from pipeline.dag import build_stages

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
def index(store: StoreOpt = None, config: ConfigOpt = None,
          encoder: Annotated[Optional[str], typer.Option(help="lavila | videoprism: the video-text model "
                                                         + _setting("index.encoder"))] = None,
          checkpoint: Annotated[Optional[str], typer.Option(help="LaViLa dual-encoder .pth or VideoPrismClipModel "
                                                            "folder, whose video tower made the features " + _setting(
                                                                "index.checkpoint", "features.checkpoint, then (lavila)"
                                                                " the store's latest `recap pretrain`"))] = None,
          size: Annotated[Optional[str], typer.Option(help="tiny | base " + _setting(
              "index.size", "the features encoder's"))] = None,
          batch_size: Annotated[Optional[int], typer.Option(help="Captions per text-encoder call "
                                                            + _setting("index.batch_size"))] = None,
          device: Annotated[Optional[str], typer.Option(help="cpu | cuda " + _setting("index.device"))] = None,
          workers: WorkersOpt = None, address: AddressOpt = None, retry_failed: RetryOpt = False,
          local: LocalOpt = False):
    """Text and video embeddings of every committed caption (clip, segment, video) into index/, for `recap search`."""
    settings = {"encoder": encoder, "checkpoint": checkpoint, "size": size, "batch_size": batch_size,
                "device": device}
    cfg = _load(store, config, index=_given(settings), run=_given({"workers": workers, "address": address}))
    from pipeline.dag import index_stage

    _run(lambda: index_stage(cfg, Store(cfg.store)), cfg, Store(cfg.store), retry_failed, local)


@app.command()
def enhance(store: StoreOpt = None, config: ConfigOpt = None,
            level: Annotated[Optional[str], typer.Option(help="clip | segment | video: the units captioned "
                                                         + _setting("enhance.level"))] = None,
            captioner: Annotated[Optional[str], typer.Option(help="local (the store's ReCap model; a prompt is a "
                                                             "decoding recipe) | endpoint (a chat endpoint shown "
                                                             "frames) " + _setting("enhance.captioner"))] = None,
            engineer: Annotated[Optional[str], typer.Option(help="local (seeded one-field mutations) | endpoint "
                                                            + _setting("enhance.engineer"))] = None,
            endpoint_url: Annotated[Optional[str], typer.Option(help="OpenAI-compatible base URL, e.g. "
                                                                "http://localhost:8000/v1 "
                                                                + _setting("enhance.endpoint_url", "none"))] = None,
            endpoint_model: Annotated[Optional[str], typer.Option(help="The served model " + _setting(
                "enhance.endpoint_model", "none"))] = None,
            k: Annotated[Optional[int], typer.Option("--k", "-k", help="Captions per unit "
                                                     + _setting("enhance.k"))] = None,
            iterations: Annotated[Optional[int], typer.Option(help="Rewrites at most after the initial prompt "
                                                              + _setting("enhance.iterations"))] = None,
            patience: Annotated[Optional[int], typer.Option(help="Stop after this many rewrites in a row that do not "
                                                            "beat the best " + _setting("enhance.patience"))] = None,
            diversity_weight: Annotated[Optional[float], typer.Option(help="score = similarity + weight * diversity "
                                                                      + _setting("enhance.diversity_weight"))] = None,
            sample_size: Annotated[Optional[int], typer.Option(help="Train videos the search scores on "
                                                               + _setting("enhance.sample_size"))] = None,
            seed: Annotated[Optional[int], typer.Option(help="Seed of the sample, the engineer and sampling "
                                                        + _setting("enhance.seed"))] = None,
            initial: Annotated[Optional[str], typer.Option(help="The iteration-0 prompt " + _setting(
                "enhance.initial", "the captioner's"))] = None,
            prompt: Annotated[Optional[str], typer.Option(help="Apply this prompt, no search (a recipe such as "
                                                          "'method=greedy jitter=0.25', or an instruction for the "
                                                          "endpoint) [default: the search's final prompt]")] = None,
            search_only: Annotated[bool, typer.Option("--search-only", help="Stop after the search")] = False,
            workers: WorkersOpt = None, address: AddressOpt = None, retry_failed: RetryOpt = False,
            local: LocalOpt = False):
    """CSI (ExCae's caption self-improvement): search a prompt that makes K captions per unit close to the train
    ground truth and diverse (each iteration committed, resumable), then apply it to every video into
    captions/enhanced/."""
    settings = {"level": level, "captioner": captioner, "engineer": engineer, "endpoint_url": endpoint_url,
                "endpoint_model": endpoint_model, "k": k, "iterations": iterations, "patience": patience,
                "diversity_weight": diversity_weight, "sample_size": sample_size, "seed": seed, "initial": initial}
    cfg = _load(store, config, enhance=_given(settings), run=_given({"workers": workers, "address": address}))
    from pipeline.dag import enhance_captioner, enhance_stage
    from pipeline.enhance import run_search

    st = Store(cfg.store)
    try:
        if prompt is None:
            result = run_search(cfg, st)
            final, source = result.prompt, {"search": result.run_dir, "search_score": result.score}
        else:
            like = enhance_captioner(cfg, st).initial(cfg.enhance.k)
            final, source = type(like).parse(prompt, like), {"prompt": "given"}
    except (ValueError, FileNotFoundError, RuntimeError) as e:  # settings, inputs, an endpoint (EndpointError)
        _fail(str(e))
    if search_only:
        _record()
        return
    _run(lambda: enhance_stage(cfg, st, final, source), cfg, st, retry_failed, local)


@app.command()
def search(text: Annotated[str, typer.Argument(help="What to find, in words")],
           store: StoreOpt = None, config: ConfigOpt = None,
           level: Annotated[str, typer.Option(help="clip | segment | video: what is returned (clip: the finest "
                                                   "spans, adjacent hits merged)")] = "clip",
           top: Annotated[int, typer.Option(help="Rows returned")] = 10,
           fusion: Annotated[str, typer.Option(help="mean (a row's caption and video embeddings) | ecs (videos and "
                                                    "segments by the newest `recap ecs` model of this index)")]
           = "mean",
           json_out: Annotated[bool, typer.Option("--json", help="A JSON list on stdout instead of the table")] = False):
    """Ranked spans of the indexed videos for a text query: videos, then their segments, then their clips."""
    cfg = _load(store, config, record=False)
    from pipeline.search import format_results, run_search

    if fusion not in ("mean", "ecs"):
        _fail(f"--fusion takes mean or ecs, got {fusion!r}")
    try:
        rows = run_search(cfg, Store(cfg.store), text, level, top, fusion)
    except (ValueError, FileNotFoundError) as e:
        _fail(str(e))
    if json_out:
        import json

        typer.echo(json.dumps(rows, indent=1))
    elif rows:
        typer.echo(format_results(rows))
    else:
        typer.secho("no indexed rows match", fg="yellow", err=True)


@app.command()
def train(store: StoreOpt = None, config: ConfigOpt = None,
          level: Annotated[str, typer.Option(help="clip | segment | video | unified (ReCap-U)")] = "clip",
          init_from: Annotated[Optional[str], typer.Option(help="Checkpoint to start from: our folder or an "
                                                           "official .pth (the previous level's) [default: none, "
                                                           "a new model of --size]")] = None,
          lower: Annotated[Optional[str], typer.Option(help="Lower-level text for segment / video: "
                                                       "predicted | groundtruth " + _setting("train.lower"))] = None,
          lower_version: Annotated[Optional[list[str]], typer.Option(
              help="Predicted caption version to read, e.g. clip-71e289aa (repeatable; needed when there are "
                   "several) [default: the only one]")] = None,
          recursive: Annotated[Optional[bool], typer.Option(
              "--recursive/--no-recursive", help="Read the lower level's text (off: the non-recursive "
                                                 "baseline, video features only) "
                                                 + _setting("train.recursive", "--recursive"))] = None,
          reordered: Annotated[Optional[bool], typer.Option(
              "--reordered/--no-reordered", help="Recursive video level: also the store's reordered and composed summaries, "
                                                 "if it has any " + _setting("train.reordered", "--reordered"))] = None,
          freeze: Annotated[Optional[str], typer.Option(help="official | none (train everything) "
                                                        + _setting("train.freeze"))] = None,
          size: Annotated[Optional[str], typer.Option(help="Model size without --init-from: base | demo | "
                                                      "tiny " + _setting("train.size"))] = None,
          epochs: Annotated[Optional[int], typer.Option(help="Epochs " + _setting(
              "train.epochs", "the level's official count"))] = None,
          batch_size: Annotated[Optional[int], typer.Option(help="Examples per step, over all workers "
                                                            + _setting("train.batch_size"))] = None,
          lr: Annotated[Optional[float], typer.Option(help="Peak learning rate " + _setting("train.lr"))] = None,
          workers: Annotated[Optional[int], typer.Option(help="Ray Train workers (DDP); 1 = this process "
                                                         + _setting("train.workers"))] = None,
          address: AddressOpt = None):
    """Train a level's model on the store (checkpoint every epoch, resumable); captioning then uses it."""
    settings = {"lower": lower, "recursive": recursive, "reordered": reordered, "freeze": freeze, "size": size,
                "epochs": epochs, "batch_size": batch_size, "lr": lr, "workers": workers}
    cfg = _load(store, config, train={k: v for k, v in settings.items() if v is not None},
                run={"address": address} if address else None)
    from pipeline.train import train as train_level

    try:
        train_level(cfg, Store(cfg.store), level, init_from=init_from, lower_versions=lower_version or ())
        _record()
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        _fail(str(e))


@app.command()
def pretrain(store: StoreOpt = None, config: ConfigOpt = None,
             size: Annotated[Optional[str], typer.Option(help="Dual encoder: base (LaViLa TimeSformer-B + CLIP "
                                                         "text) | tiny " + _setting("pretrain.size"))] = None,
             init: Annotated[Optional[str], typer.Option(help="A LaViLa .pth to start from "
                                                         + _setting("pretrain.init", "fresh weights"))] = None,
             epochs: Annotated[Optional[int], typer.Option(help="Epochs " + _setting("pretrain.epochs"))] = None,
             batch_size: Annotated[Optional[int], typer.Option(help="Narrations per contrastive batch, over all "
                                                               "workers " + _setting("pretrain.batch_size"))] = None,
             text_epochs: Annotated[Optional[int], typer.Option(
                 help="Then epochs of the text tower alone (visual tower kept) on narrations, segment descriptions "
                      "and summaries; 0 = none " + _setting("pretrain.text_epochs"))] = None,
             span_batch_size: Annotated[Optional[int], typer.Option(
                 help="Descriptions or summaries per text-epoch batch " + _setting("pretrain.span_batch_size"))] = None,
             lr: Annotated[Optional[float], typer.Option(help="Peak learning rate "
                                                         + _setting("pretrain.lr"))] = None,
             workers: Annotated[Optional[int], typer.Option(help="Ray Train workers (DDP); 1 = this process "
                                                            + _setting("pretrain.workers"))] = None,
             address: AddressOpt = None):
    """Contrastive video-text training of the LaViLa dual encoder on the train split's clip narrations,
    segment descriptions and video summaries (resumable per epoch); `features --checkpoint` then reads its
    visual tower."""
    settings = {"size": size, "init": init, "epochs": epochs, "batch_size": batch_size,
                "text_epochs": text_epochs, "span_batch_size": span_batch_size, "lr": lr, "workers": workers}
    cfg = _load(store, config, pretrain={k: v for k, v in settings.items() if v is not None},
                run={"address": address} if address else None)
    from pipeline.pretrain import pretrain as run_pretrain

    try:
        run_pretrain(cfg, Store(cfg.store))
        _record()
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        _fail(str(e))


@app.command()
def evaluate(store: StoreOpt = None, config: ConfigOpt = None,
             split: Annotated[Optional[str], typer.Option(help="Ground-truth split "
                                                          + _setting("evaluate.split"))] = None,
             protocol: Annotated[Optional[list[str]], typer.Option(help="videorecap | coco (repeatable) "
                                                                   + _setting("evaluate.protocols"))] = None,
             by: Annotated[Optional[str], typer.Option(help="'video' for per-video scores "
                                                       "[default: none, corpus scores only]")] = None,
             task: Annotated[str, typer.Option(help="captions (CIDEr, ROUGE-L, METEOR per level) | retrieval "
                                                    "(text-to-video and text-to-moment R@k from the index)")]
             = "captions",
             json_out: JsonOpt = False):
    """CIDEr / ROUGE-L / METEOR per level against ground truth, or retrieval recall (--task retrieval); writes a
    metrics table and prints it."""
    ev = {"split": split, "protocols": tuple(protocol) if protocol else None}
    cfg = _load(store, config, record=False, evaluate={k: v for k, v in ev.items() if v is not None})
    from pipeline.evaluate import evaluate_all

    if by not in (None, "video"):
        _fail(f"--by takes 'video', got {by!r}")
    if task not in ("captions", "retrieval"):
        _fail(f"--task takes captions or retrieval, got {task!r}")
    import sys

    if task == "retrieval":
        if by or protocol:
            _fail("--by and --protocol go with --task captions")
        _evaluate_retrieval(cfg, json_out)
        return
    try:
        result = evaluate_all(cfg, Store(cfg.store), by=by, stream=None if json_out else sys.stdout)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        _fail(str(e))
    if result is None:
        raise typer.Exit(1)
    if json_out:  # one row per level, version, protocol, metric (and video with --by video); NaN as null
        import json

        _print_json({"store": cfg.store, "split": cfg.evaluate.split, "metrics_file": result.attrs["path"],
                     "metrics": json.loads(result.to_json(orient="records"))})


def _evaluate_retrieval(cfg, json_out: bool) -> None:
    import sys

    from pipeline.retrieval import evaluate_retrieval

    try:
        result = evaluate_retrieval(cfg, Store(cfg.store), stream=None if json_out else sys.stdout)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        _fail(str(e))
    if json_out:  # one row per task, arm and metric
        import json

        _print_json({"store": cfg.store, "split": cfg.evaluate.split, "task": "retrieval",
                     "index_version": result["version"].iloc[0], "metrics_file": result.attrs["path"],
                     "metrics": json.loads(result.drop(columns=["version", "split"]).to_json(orient="records"))})


@app.command()
def ecs(store: StoreOpt = None, config: ConfigOpt = None,
        enhanced: Annotated[Optional[list[str]], typer.Option(help="An enhanced caption version (repeatable; each is "
                                                               "an arm, the last feeds ECS) "
                                                               + _setting("ecs.enhanced", "none"))] = None,
        experts: Annotated[Optional[int], typer.Option(help="Experts " + _setting("ecs.experts"))] = None,
        active: Annotated[Optional[int], typer.Option(help="Active experts per unit; 0 = mean fusion "
                                                      + _setting("ecs.active"))] = None,
        eval_routing: Annotated[Optional[str], typer.Option(help="topk | dense " + _setting("ecs.eval_routing"))]
        = None,
        k: Annotated[Optional[int], typer.Option("--k", "-k", help="Enhanced captions per unit used "
                                                 + _setting("ecs.k"))] = None,
        epochs: Annotated[Optional[int], typer.Option(help="Epochs " + _setting("ecs.epochs"))] = None,
        json_out: JsonOpt = False):
    """ExCae's expertized caption selection: train the expert mixture on the train split's queries, then rank the
    test split's videos and segments by it and by the arms it builds on (windows, + captions, + enhanced)."""
    import sys

    settings = {"enhanced": tuple(enhanced) if enhanced else None, "experts": experts, "active": active,
                "eval_routing": eval_routing, "k": k, "epochs": epochs}
    cfg = _load(store, config, ecs={k: v for k, v in settings.items() if v is not None})
    from pipeline.ecs import format_table, run_ecs

    try:
        table = run_ecs(cfg, Store(cfg.store))
        _record()
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        _fail(str(e))
    if json_out:
        import json

        _print_json({"store": cfg.store, "metrics_file": table.attrs["path"],
                     "arms": json.loads(table.to_json(orient="records"))})
    else:
        print(format_table(table), file=sys.stdout)


@app.command()
def run(store: StoreOpt = None, config: ConfigOpt = None,
        dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan, compute nothing")] = False,
        workers: WorkersOpt = None, address: AddressOpt = None, retry_failed: RetryOpt = False,
        local: LocalOpt = False, json_out: JsonOpt = False):
    """The DAG: features -> captions -> segments -> summaries; only new or failed (with --retry-failed) work."""
    if json_out and not dry_run:
        _fail("--json goes with --dry-run (the plan); after a run, `recap status --json` and "
              "`recap evaluate --json` say what it made")
    cfg = _load(store, config, record=not dry_run, run=_given({"workers": workers, "address": address}))
    from pipeline.run import run_all

    if json_out:
        from pipeline.dag import build_stages
        from pipeline.run import plan_rows

        st = Store(cfg.store)
        try:
            rows = plan_rows(build_stages(cfg, st), st)
        except (ValueError, FileNotFoundError) as e:
            _fail(str(e))
        _print_json({"store": cfg.store, "plan": rows})  # "blocked": units that wait for an earlier stage
        return
    try:
        summaries = run_all(cfg, Store(cfg.store), dry_run=dry_run, retry_failed=retry_failed, local=local)
    except (ValueError, FileNotFoundError) as e:
        _fail(str(e))
    _exit_for(*summaries)


@app.command()
def status(store: StoreOpt = None, config: ConfigOpt = None, json_out: JsonOpt = False):
    """Per stage and level: units done / failed / pending, with sizes."""
    cfg, st = _open(store, config, record=False)
    from pipeline.dag import build_stages

    rows = status_rows(st, build_stages(cfg, st))
    if json_out:  # sizes in bytes; null where the table shows "-"
        from pipeline.status import failure_groups

        _print_json({"store": st.root, "stages": rows, "failures": failure_groups(st, rows)})
        return
    typer.echo(f"store: {st.root}")
    typer.echo(format_status(rows))
    for line in failure_lines(st, rows):
        typer.echo(line)


@app.command()
def show(video: Annotated[str, typer.Argument(help="Video id (see `recap status` or videos.parquet)")],
         at: Annotated[Optional[str], typer.Option(help="A moment, mm:ss: only the clip, segment and summary "
                                                   "covering it")] = None,
         store: StoreOpt = None):
    """A video's summary, then its segment descriptions and clip captions on a timeline (the current versions)."""
    from pipeline.config import Config
    from recap import open_store
    from recap.show import parse_moment, show_lines

    try:  # no settings to settle: current/ names the versions (and settling imports torch, seconds)
        lines = show_lines(open_store(store or Config.store), video, None if at is None else parse_moment(at))
    except (ValueError, FileNotFoundError) as e:
        _fail(str(e))
    for line in lines:
        typer.echo(line)


@app.command()
def export(fmt: Annotated[str, typer.Option("--format", "-f", help="vtt | srt | jsonl")],
           video: Annotated[Optional[str], typer.Option(help="One video id [default: every video with "
                                                        "captions]")] = None,
           out: Annotated[Optional[str], typer.Option(help="Output folder [default: exports/<format>/ in the "
                                                      "store]")] = None,
           store: StoreOpt = None):
    """The current captions as WebVTT (clip cues, segment chapters, the summary as a note), SRT or JSONL."""
    from pipeline.config import Config
    from recap import open_store
    from recap.export import export as export_captions

    try:
        reader = open_store(store or Config.store)
        done = export_captions(reader, fmt, video, out)
    except (ValueError, FileNotFoundError) as e:
        _fail(str(e))
    where = reader.store.url(f"exports/{fmt}") if out is None else out
    typer.echo(f"wrote {len(done.files)} file(s) to {where}")
    if done.skipped:
        typer.echo(f"[export] {len(done.skipped)} video(s) without captions skipped (e.g. {done.skipped[0]}); "
                   "run `recap captions`", err=True)


@app.command()
def report(store: StoreOpt = None, config: ConfigOpt = None,
           ray: Annotated[bool, typer.Option("--ray", help="Decode thumbnails on Ray (run.workers, run.address) "
                                             "[default: in this process]")] = False,
           retry_failed: RetryOpt = False):
    """Static HTML report in the store (report/index.html): a thumbnail timeline per video with its captions at
    every level beside the ground truth, failures, the evaluation and the training curves."""
    from recap import open_store
    from recap.report import thumbnails_of, write_report

    cfg, st = _open(store, config, record=False)
    from pipeline.dag import thumbnails_stage
    from pipeline.runner import run_stage

    stage = thumbnails_stage(cfg)
    summary = run_stage(stage, st, executor="ray" if ray else "local", workers=cfg.run.workers,
                        address=cfg.run.address or None, retry_failed=retry_failed, max_retries=cfg.run.max_retries)
    try:
        pages = write_report(open_store(st.root), thumbnails_of(st, stage.version(), stage.clip_s))
    except (ValueError, FileNotFoundError) as e:
        _fail(str(e))
    typer.echo(f"wrote {len(pages)} file(s); open {st.url(pages[0])}")
    _exit_for(summary)


@app.command()
def demo(store: Annotated[str, typer.Option("--store", "-s", help="Store root for the demo")] = "recap-store/demo",
         data: Annotated[Path, typer.Option(help="Where the demo corpus is generated")] = Path("data/demo"),
         preset: Annotated[str, typer.Option(help="Corpus preset")] = "demo",
         seed: int = 0,
         pretrain: Annotated[bool, typer.Option(help="Pretrain the dual encoder and extract with it; "
                                                     "--no-pretrain: the random encoder's features, no index "
                                                     "(an ablation)")] = True,
         retry_failed: RetryOpt = False):
    """The main job on the embedded synthetic corpus: generate, ingest, every stage, status."""
    from pipeline.demo import run_demo

    _exit_for(*run_demo(store, data, preset, seed, pretrain_encoder=pretrain, retry_failed=retry_failed))


checkpoint_app = typer.Typer(no_args_is_help=True, context_settings=HELP, rich_markup_mode=None,
                             help="Official checkpoints: convert and inspect.")
app.add_typer(checkpoint_app, name="checkpoint")
OverridesOpt = Annotated[Optional[str], typer.Option("--config", "-c", metavar="PATH",
                                                     help="TOML file with model settings an official file lacks, "
                                                          "e.g. head counts: n_head = 12 (JSON still read, "
                                                          "deprecated) [default: none, base-size head counts]")]


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

    _to_record.clear()  # one that stopped before recording (exit 2) leaves nothing to the next in this process
    try:
        app()
    except OSError as e:
        if os.environ.get("RECAP_DEBUG"):
            raise
        where = f"{e.filename}: " if e.filename else ""
        typer.secho(f"error: {where}{e.strerror or e}", fg="red", err=True)
        raise SystemExit(EXIT_USAGE) from None
