"""`recap report`: a static HTML report of a store, in the store, that opens from disk (no server, no scripts).

report/index.html         every video: status (ok, or the ingest failure), duration, caption counts, summary
report/<video_id>.html    a timeline: one thumbnail per clip window, the clip captions under their thumbnails,
                          the segment descriptions spanning their clips, the summary spanning the video; ground
                          truth under each prediction where the store has it; failures and missing levels marked
report/metrics.html       the evaluation per level (metrics/demo.parquet, else the newest `recap evaluate` table)
                          and the plots: metrics, semantic accuracy, training losses (report/*.png)

Thumbnails come from the thumbnails stage (stages.thumbnails), linked as ../thumbnails/...; every other
file is written here, through the store's atomic writes.
"""

from __future__ import annotations

import html
import io
from dataclasses import dataclass
from urllib.parse import quote

import numpy as np
import pandas as pd

from recap.reader import StoreReader
from recap.show import clock
from stages.decode import window_times
from stages.evaluate import METRICS, SEMANTIC
from stages.thumbnails import THUMBNAILS, thumbnail_rel
from store import LEVEL, LEVELS, Store

REPORT = "report"
TITLE = {"clip": "clip captions", "segment": "segment descriptions", "video": "summary"}
PERCENT = {m for names in SEMANTIC.values() for m in names} - {"sequence_edit"}  # x100 scores; the edit distance is not

CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5rem; color: #1d1d1f; }
a { color: #0b5cad; }
nav { margin-bottom: 1rem; }
h1 { font-size: 1.4rem; margin: .2rem 0; }
.meta { color: #555; }
table { border-collapse: collapse; margin: .5rem 0 1.5rem; }
th, td { border-bottom: 1px solid #ddd; padding: .3rem .6rem; text-align: left; vertical-align: top; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.status-ok { color: #1a7f37; }
.status-failed, .failed { color: #b42318; }
.failed { background: #fdecea; }
.missing { background: #f6f6f6; color: #666; }
.timeline { display: grid; grid-template-columns: 8rem repeat(var(--n), 6.5rem); gap: 4px;
            overflow-x: auto; padding-bottom: .6rem; }
.label { position: sticky; left: 0; z-index: 1; background: #fff; font-size: 12px; font-weight: 600;
         padding: 3px 4px; }
.label a { font-weight: normal; }
.cell { border-radius: 4px; padding: 3px 5px; font-size: 12px; overflow-wrap: anywhere; }
.cell p { margin: 0; position: sticky; left: 8.5rem; max-width: 70vw; }
.clip { background: #e8f0fe; }
.segment { background: #e6f4ea; }
.video { background: #fef3e0; }
.truth { background: #f4f4f4; color: #444; font-style: italic; }
.thumb { margin: 0; font-size: 11px; color: #555; }
.thumb img, .thumb .none { display: block; width: 96px; height: 96px; border-radius: 3px; background: #eee; }
.thumb .none { font-size: 10px; overflow: hidden; }
img.plot { max-width: 100%; height: auto; }
"""


@dataclass
class Thumbnails:
    """Where the thumbnails stage keeps a video's windows, and which videos it committed or failed."""

    version: str
    clip_s: float
    committed: set[str]
    failed: dict[str, str]  # video_id -> message


def thumbnails_of(store: Store, version: str, clip_s: float) -> Thumbnails:
    failed = {f["video_id"]: f["message"] for f in store.failures(THUMBNAILS, version)}
    return Thumbnails(version, clip_s, set(store.markers(THUMBNAILS, version)), failed)


def write_report(reader: StoreReader, thumbs: Thumbnails) -> list[str]:
    """Write the report's pages and plots; returns their store-relative paths, index.html first."""
    store = reader.store
    versions = _versions(reader)
    videos = reader.videos
    captions = {level: _current(reader, level) for level in LEVELS}
    truth = {level: _truth(reader, level) for level in LEVELS}
    failures = _caption_failures(store, versions)
    written = [_write(store, "index.html", _index_page(store, videos, captions, failures, versions))]
    for video in videos[videos["status"] == "ok"].itertuples():
        page = _video_page(video, versions, thumbs, {lvl: _of(captions[lvl], video.video_id) for lvl in LEVELS},
                           {lvl: _of(truth[lvl], video.video_id) for lvl in LEVELS},
                           {lvl: failures[lvl].get(video.video_id) for lvl in LEVELS})
        written.append(_write(store, f"{video.video_id}.html", page))
    plots = {name: png for name, png in _plots(reader, versions).items() if png is not None}
    for name, png in plots.items():
        store.write_bytes(f"{REPORT}/{name}", png)
        written.append(f"{REPORT}/{name}")
    written.append(_write(store, "metrics.html", _metrics_page(reader, versions, plots)))
    return written


# ---- reading --------------------------------------------------------------------------------------------

def _versions(reader: StoreReader) -> dict[str, str]:
    try:
        return reader.versions()
    except (FileNotFoundError, ValueError):  # settings that no longer resolve: what current/ says, if anything
        return {}


def _current(reader: StoreReader, level: str) -> pd.DataFrame:
    try:
        return reader.captions(level)
    except FileNotFoundError:
        return pd.DataFrame(columns=["video_id", "start_s", "end_s", "text"])


def _truth(reader: StoreReader, level: str) -> pd.DataFrame:
    try:
        frame = reader.groundtruth(level)
    except FileNotFoundError:
        return pd.DataFrame(columns=["video_id", "start_s", "end_s", "text"])
    if level == "video":  # the whole video's summary: summaries of runs of segments are extra training data
        ends = frame.groupby("video_id")["end_s"].transform("max")
        frame = frame[(frame["start_s"] == 0) & (frame["end_s"] == ends)]
    return frame


def _of(frame: pd.DataFrame, video_id: str) -> pd.DataFrame:
    return frame[frame["video_id"] == video_id].sort_values(["start_s", "end_s"], kind="stable")


def _caption_failures(store: Store, versions: dict[str, str]) -> dict[str, dict[str, str]]:
    """{level: {video_id: message}} of the current versions' failure records, features' counting for the clip
    level (whose captions they block)."""
    out = {}
    for level in LEVELS:
        version = versions.get(level)
        records = store.failures(LEVEL[level].stage, version) if version else []
        if level == "clip" and versions.get("features"):
            records = [{**r, "message": f"features failed: {r['message']}"}
                       for r in store.failures("features", versions["features"])] + records
        out[level] = {r["video_id"]: f"{r['message']} (run `recap {r['stage']} --retry-failed`)" for r in records}
    return out


# ---- pages ----------------------------------------------------------------------------------------------

def _write(store: Store, name: str, page: str) -> str:
    store.write_bytes(f"{REPORT}/{name}", page.encode())
    return f"{REPORT}/{name}"


def _page(title: str, body: str) -> str:
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{CSS}</style></head>\n<body>\n{body}\n</body></html>\n")


def _e(text) -> str:
    return html.escape(" ".join(str(text).split())) if isinstance(text, str) else ""


def _not_yet(level: str, failure: str | None) -> tuple[str, str]:
    """(css class, text) of a level without captions for a video."""
    if failure:
        return "failed", f"failed: {failure}"
    return "missing", f"not captioned yet: run `recap {LEVEL[level].stage}`"


def _index_page(store: Store, videos: pd.DataFrame, captions: dict, failures: dict, versions: dict) -> str:
    ok = int((videos["status"] == "ok").sum())
    rows = []
    for v in videos.itertuples():
        if v.status != "ok":
            rows.append(f'<tr><td>{_e(v.video_id)}</td><td class="num">-</td>'
                        f'<td class="status-failed">failed ingest: {_e(v.error)}</td><td></td><td></td></tr>')
            continue
        counts = " / ".join(str(int((captions[lvl]["video_id"] == v.video_id).sum())) for lvl in LEVELS)
        summary = _of(captions["video"], v.video_id)
        if len(summary):
            text = _e(summary["text"].iloc[0])
        else:
            css, message = _not_yet("video", failures["video"].get(v.video_id))
            text = f'<span class="{css}">{_e(message)}</span>'
        rows.append(f'<tr><td><a href="{quote(v.video_id)}.html">{_e(v.video_id)}</a></td>'
                    f'<td class="num">{clock(v.duration_s or 0.0)}</td><td class="status-ok">ok</td>'
                    f'<td class="num">{counts}</td><td>{text}</td></tr>')
    current = ", ".join(f"{lvl} {_e(versions[lvl])}" for lvl in LEVELS if lvl in versions) or "none yet"
    body = (f'<h1>recap report</h1>\n<p class="meta">{_e(store.root)}: {len(videos)} videos, {ok} ok, '
            f"{len(videos) - ok} failed at ingest. Current captions: {current}. "
            f'<a href="metrics.html">Evaluation and training</a>.</p>\n'
            "<table><thead><tr><th>video</th><th>duration</th><th>status</th><th>clips / segments / summary</th>"
            "<th>summary</th></tr></thead><tbody>\n" + "\n".join(rows) + "\n</tbody></table>")
    return _page("recap report", body)


def _video_page(video, versions: dict, thumbs: Thumbnails, captions: dict, truth: dict, failures: dict) -> str:
    vid = video.video_id
    windows = window_times(video.duration_s, thumbs.clip_s)
    starts, n = windows[:, 0], len(windows)
    cells = [_label(1, "frames", None)]
    for k, (start, _) in enumerate(windows.tolist()):
        cells.append(f'<figure class="thumb" style="grid-row:1;grid-column:{k + 2}">{_thumb(vid, start, thumbs)}'
                     f"<figcaption>{clock(start)}</figcaption></figure>")
    row = 2
    for level in LEVELS:
        cells.append(_label(row, TITLE[level], level))
        if len(captions[level]):
            cells += _spans(captions[level], starts, row, level, "")
        else:
            css, message = _not_yet(level, failures[level])
            cells.append(f'<div class="cell {css}" data-level="{level}" style="grid-row:{row};grid-column:2 / span '
                         f'{n}"><p>{_e(message)}</p></div>')
        row += 1
        if len(truth[level]):
            cells += [_label(row, "ground truth", None), *_spans(truth[level], starts, row, level, " truth")]
            row += 1
    shown = ", ".join(versions[lvl] for lvl in LEVELS if lvl in versions)
    meta = (f"{clock(video.duration_s)} · {n} clip windows of {thumbs.clip_s:g} s · {video.width}x{video.height} · "
            f"{_e(video.uri)}" + (f" · {_e(shown)}" if shown else ""))
    body = (f'<nav><a href="index.html">all videos</a> · <a href="metrics.html">evaluation</a></nav>\n'
            f'<h1>{_e(vid)}</h1>\n<p class="meta">{meta}</p>\n'
            f'<div class="timeline" style="--n:{n}">\n' + "\n".join(cells) + "\n</div>")
    return _page(f"{vid}: recap report", body)


def _label(row: int, text: str, level: str | None) -> str:
    link = f' <a href="metrics.html#{level}">metrics</a>' if level else ""
    return f'<div class="label" style="grid-row:{row};grid-column:1">{_e(text)}{link}</div>'


def _thumb(vid: str, start: float, thumbs: Thumbnails) -> str:
    if vid in thumbs.committed:
        src = "../" + quote(thumbnail_rel(thumbs.version, vid, start))
        return f'<img src="{src}" width="96" height="96" alt="{clock(start)}">'
    why = f"failed: {thumbs.failed[vid]}" if vid in thumbs.failed else "no thumbnail yet: run `recap report`"
    return f'<span class="none {"failed" if vid in thumbs.failed else "missing"}">{_e(why)}</span>'


def _spans(rows: pd.DataFrame, starts: np.ndarray, row: int, level: str, extra: str) -> list[str]:
    """Cells placed on the clip columns by time: from the window holding a row's start to the last window
    starting before its end. Rows that would overlap one cell (ground truth that is not on the clip windows)
    share it."""
    placed: list[list] = []  # [first column, end column (exclusive), texts, start_s, end_s]
    for r in rows.itertuples():
        first = max(0, int(np.searchsorted(starts, r.start_s + 1e-6, "right")) - 1)
        end = max(first + 1, int(np.searchsorted(starts, r.end_s - 1e-6, "left")))
        if placed and first < placed[-1][1]:
            placed[-1][1] = max(placed[-1][1], end)
            placed[-1][2].append(r.text)
            placed[-1][4] = max(placed[-1][4], r.end_s)
        else:
            placed.append([first, end, [r.text], r.start_s, r.end_s])
    return [f'<div class="cell {level}{extra}" data-level="{level}" data-start="{s:g}" '
            f'title="{clock(s)}–{clock(e)}" style="grid-row:{row};grid-column:{first + 2} / span {end - first}">'
            f'<p>{" / ".join(_e(t) for t in texts)}</p></div>' for first, end, texts, s, e in placed]


# ---- evaluation and training ------------------------------------------------------------------------------

def evaluation(reader: StoreReader) -> tuple[str, pd.DataFrame] | None:
    """(run name, corpus rows) of metrics/demo.parquet, else of the newest caption evaluation table; None if
    none. Retrieval tables (`evaluate --task retrieval`, whose level column holds the task) are not caption
    evaluations."""
    try:
        metrics = reader.metrics()
    except FileNotFoundError:
        return None
    corpus = metrics[metrics["video_id"].isna() & metrics["level"].isin(LEVELS)]
    if corpus.empty:
        return None
    runs = set(corpus["run"])
    run = "demo" if "demo" in runs else corpus.sort_values("computed_at")["run"].iloc[-1]
    return run, corpus[corpus["run"] == run]


def _methods(frame: pd.DataFrame, level: str, versions: dict) -> pd.DataFrame:
    """Metric values of one level: a row per version (method), split and protocol; a column per metric."""
    table = frame[frame["level"] == level].pivot_table(index=["version", "split", "protocol"], columns="metric",
                                                       values="value", aggfunc="first")
    order = [m for m in (*METRICS, *SEMANTIC.get(level, ()), "distinct") if m in table.columns]
    table = table[order].reset_index()
    table["method"] = [f"{v} (current)" if versions.get(level) == v else v for v in table["version"]]
    return table


def _metrics_page(reader: StoreReader, versions: dict, plots: dict) -> str:
    found = evaluation(reader)
    parts = ['<nav><a href="index.html">all videos</a></nav>\n<h1>Evaluation and training</h1>']
    if found is None:
        parts.append('<p class="missing">No evaluation yet: run `recap evaluate`.</p>')
    else:
        run, frame = found
        parts.append(f'<p class="meta">From metrics/{_e(run)}.parquet: scores x100 but seq edit (mean edit '
                     "distance of the activity sequence) and distinct (distinct captions).</p>")
        for level in LEVELS:
            parts.append(f'<h2 id="{level}">{level}: {TITLE[level]}</h2>')
            table = _methods(frame, level, versions)
            if table.empty:
                parts.append(f'<p class="missing">not evaluated: run `recap {LEVEL[level].stage}`, then '
                             "`recap evaluate`</p>")
                continue
            names = [c for c in table.columns if c not in ("version", "split", "protocol", "method")]
            head = "".join(f"<th>{_e(m)}</th>" for m in ("method", "split", "protocol", *names))
            body = "".join("<tr>" + "".join(f"<td>{_e(r[c])}</td>" for c in ("method", "split", "protocol"))
                           + "".join(f'<td class="num">{_number(r[m], m)}</td>' for m in names) + "</tr>"
                           for _, r in table.iterrows())
            parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
    for name, alt in (("metrics.png", "metrics per level and method"), ("semantic.png", "semantic accuracy"),
                      ("losses.png", "training losses")):
        if name in plots:
            parts.append(f'<h2>{alt}</h2>\n<img class="plot" src="{name}" alt="{alt}">')
    return _page("evaluation: recap report", "\n".join(parts))


def _number(value, metric: str) -> str:
    if pd.isna(value):
        return ""
    return f"{value:.0f}" if metric in ("distinct", "parsed") else f"{value:.2f}" if metric == "sequence_edit" \
        else f"{value:.1f}"


def _plots(reader: StoreReader, versions: dict) -> dict[str, bytes | None]:
    found = evaluation(reader)
    plots = {"losses.png": _loss_plot(reader.store)}
    if found is not None:
        frame = found[1]
        plots["metrics.png"] = _bar_plot(frame, versions, lambda level: METRICS, "score x100")
        plots["semantic.png"] = _bar_plot(frame, versions, lambda level: [m for m in SEMANTIC.get(level, ())
                                                                          if m in PERCENT], "% right")
    return plots


def _figure(panels: int):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.2 * panels, 3.6))
    FigureCanvasAgg(fig)
    return fig, fig.subplots(1, panels, squeeze=False)[0]


def _png(fig) -> bytes:
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    return buf.getvalue()


def _bar_plot(frame: pd.DataFrame, versions: dict, metrics_of, ylabel: str) -> bytes | None:
    """Grouped bars per level: one group per metric, one bar per method; None when no level has the metrics."""
    tables = {}
    for level in LEVELS:
        table = _methods(frame, level, versions)
        names = [m for m in metrics_of(level) if m in table.columns]
        if names and len(table):
            tables[level] = (table, names)
    if not tables:
        return None
    fig, axes = _figure(len(tables))
    for ax, (level, (table, names)) in zip(axes, tables.items()):
        width = 0.8 / len(table)
        for i, r in enumerate(table.itertuples()):
            values = [getattr(r, m) for m in names]
            ax.bar(np.arange(len(names)) + i * width, values, width, label=f"{r.method} {r.protocol}")
        ax.set_xticks(np.arange(len(names)) + 0.4 - width / 2, names, fontsize=8)
        ax.set(title=level, ylabel=ylabel)
        ax.legend(fontsize=7)
    return _png(fig)


def _loss_plot(store: Store) -> bytes | None:
    """One panel per trained level: every run's validation loss per epoch, and its training loss per step."""
    runs = {}
    for level in store.listdir("checkpoints"):
        for run in store.listdir(f"checkpoints/{level}"):
            table = store.read_table(f"checkpoints/{level}/{run}/losses.parquet")
            if table is not None and table.num_rows:
                runs.setdefault(level, []).append((run, table.to_pandas()))
    if not runs:
        return None
    fig, axes = _figure(len(runs))
    for ax, (level, level_runs) in zip(axes, runs.items()):
        latest = (store.read_json(f"checkpoints/{level}/latest.json") or {}).get("path", "")
        for run, losses in level_runs:
            train, val = losses[losses["split"] == "train"], losses[losses["split"] == "val"]
            label = run + (" (latest)" if f"/{run}/" in f"/{latest}/" else "")
            line, = ax.plot(train["step"], train["loss"], alpha=0.3, linewidth=0.7)
            ax.plot(val["step"], val["loss"], "o-", markersize=3, color=line.get_color(), label=f"{label} val")
        ax.set(title=level, xlabel="step", ylabel="loss", yscale="log")
        ax.legend(fontsize=7)
    return _png(fig)
