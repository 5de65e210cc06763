"""Progress lines for long work: units done, rate, ETA; and the closing summary."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field


def _clock(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    """Prints `[stage] 12/40 units | 350/1200 windows | 48.2 windows/s | ETA 0:00:17` at most every `every_s`."""

    def __init__(self, stage: str, units: int, work: float, work_name: str = "units",
                 stream=sys.stderr, every_s: float = 2.0):
        self.stage, self.units, self.work, self.work_name = stage, units, work, work_name
        self.stream, self.every_s = stream, every_s
        self.start = self.last_print = time.monotonic()
        self.units_done = 0
        self.work_done = 0.0

    def advance(self, work: float) -> None:
        self.units_done += 1
        self.work_done += work
        now = time.monotonic()
        if now - self.last_print >= self.every_s or self.units_done == self.units:
            self.last_print = now
            print(self.line(), file=self.stream, flush=True)

    def line(self) -> str:
        elapsed = time.monotonic() - self.start
        rate = self.work_done / elapsed if elapsed > 0 else 0.0
        eta = (self.work - self.work_done) / rate if rate > 0 else 0.0
        return (f"[{self.stage}] {self.units_done}/{self.units} units | "
                f"{self.work_done:.0f}/{self.work:.0f} {self.work_name} | "
                f"{rate:.1f} {self.work_name}/s | ETA {_clock(eta)}")


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
