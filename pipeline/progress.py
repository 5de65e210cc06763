"""Progress for long work: units done, rate, ETA; and the closing summary.

On a terminal (the stream's `isatty()`) a live bar; elsewhere (logs, CI, pipes) plain lines every few
seconds, which tools parse. A log file behind the stream (`--log-file`: `pipeline.logfile.TeeStream`) gets
the plain lines, never the bar.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from dataclasses import dataclass, field


def _clock(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def _shape(stream) -> tuple[int, int]:
    """Columns and rows of the terminal; 80 x 24 (or $COLUMNS, $LINES) where it reports none (a pty made
    without a size says 0 x 0, which would hide the bar)."""
    try:
        columns, lines = os.get_terminal_size(stream.fileno())
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is both of the last two
        columns = lines = 0
    fallback = shutil.get_terminal_size()
    return columns or fallback.columns, lines or fallback.lines


class Progress:
    """Prints `[stage] 12/40 units | 350/1200 windows | 48.2 windows/s | ETA 0:00:17` at most every `every_s`;
    on a terminal, a bar with the same counts instead. `stream`: sys.stderr at the time of the call."""

    def __init__(self, stage: str, units: int, work: float, work_name: str = "units",
                 stream=None, every_s: float = 2.0):
        self.stage, self.units, self.work, self.work_name = stage, units, work, work_name
        self.stream, self.every_s = (sys.stderr if stream is None else stream), every_s
        self.start = self.last_print = time.monotonic()
        self.units_done = 0
        self.work_done = 0.0
        self.live = is_terminal(self.stream)
        # Plain lines: to the stream itself, or with a bar to the log file behind it (if any).
        self.plain = getattr(self.stream, "log", None) if self.live else self.stream
        self.bar = None  # made at the first unit done: lines printed before it (Ray, model loading) stay whole

    def advance(self, work: float) -> None:
        self.units_done += 1
        self.work_done += work
        now = time.monotonic()
        last = self.units_done == self.units
        if self.live:
            self._draw(work)
        if self.plain is not None and (now - self.last_print >= self.every_s or last):
            self.last_print = now
            print(self.line(), file=self.plain, flush=True)
        if last:
            self.close()

    def write(self, text: str) -> None:
        """A line of its own while the bar is drawn (a unit's failure): the bar moves below it."""
        if self.bar is not None:
            self.bar.clear()
        print(text, file=self.stream, flush=True)
        if self.bar is not None:
            self.bar.refresh()

    def close(self) -> None:
        """Leave the bar as it last stood, and the cursor on the line below it."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
            self.live = False  # closed for good: nothing more to draw

    def _draw(self, work: float) -> None:
        if self.bar is None:
            from tqdm import tqdm

            progress, terminal = self, getattr(self.stream, "terminal", self.stream)

            class Bar(tqdm):
                monitor_interval = 0  # no monitor thread: the bar moves when a unit is done

                @property
                def format_dict(self):
                    self.ncols, self.nrows = _shape(terminal)  # follows a resized window
                    return {**super().format_dict, "counts": progress.counts()}

            self._whole = float(self.work).is_integer()
            ncols, nrows = _shape(terminal)
            self.bar = Bar(total=self._amount(self.work), initial=self._amount(self.work_done), desc=f"[{self.stage}]",
                           file=terminal, leave=True, ncols=ncols, nrows=nrows, mininterval=0.2,
                           bar_format="{desc} {percentage:3.0f}%|{bar}| {counts}")
        else:
            self.bar.update(self._amount(work))

    def _amount(self, work: float) -> float:
        return int(work) if self._whole and float(work).is_integer() else work

    def counts(self) -> str:
        elapsed = time.monotonic() - self.start
        rate = self.work_done / elapsed if elapsed > 0 else 0.0
        eta = (self.work - self.work_done) / rate if rate > 0 else 0.0
        return (f"{self.units_done}/{self.units} units | "
                f"{self.work_done:.0f}/{self.work:.0f} {self.work_name} | "
                f"{rate:.1f} {self.work_name}/s | ETA {_clock(eta)}")

    def line(self) -> str:
        return f"[{self.stage}] {self.counts()}"


@dataclass
class Summary:
    stage: str
    done: int = 0
    skipped: int = 0
    failed: int = 0
    blocked: int = 0
    elsewhere: int = 0  # units another process on the store was running: left to it
    work: float = 0.0
    wall_s: float = 0.0
    failures: list[dict] = field(default_factory=list)
    blocked_reasons: list[str] = field(default_factory=list)

    def line(self) -> str:
        text = (f"[{self.stage}] done {self.done}, skipped {self.skipped}, failed {self.failed}"
                + (f", blocked {self.blocked}" if self.blocked else "")
                + (f", running elsewhere {self.elsewhere}" if self.elsewhere else "") + f" | wall {self.wall_s:.1f} s")
        if self.done and self.wall_s > 0 and self.work:
            text += f" | {self.work / self.wall_s:.1f} work/s"
        return text
