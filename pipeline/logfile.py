"""`recap --log-file PATH`: everything the command prints to stderr, also appended to a file as plain lines.

sys.stderr becomes a `TeeStream`: the terminal (or pipe) gets the text as before; the file gets whole lines
without colour codes, and a line a terminal rewrites in place (`\\r`) as it last stood. A progress bar never
reaches the file: `pipeline.progress.Progress` draws it on `TeeStream.terminal` and writes its plain
lines to `TeeStream.log`. What other processes or C libraries write to the stderr descriptor themselves
(Ray workers, which log to Ray's own files anyway; a decoder's warnings) is not copied.
"""

from __future__ import annotations

import atexit
import io
import re
import sys
from datetime import datetime
from pathlib import Path

_ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b[@-Z\\-_]")


def plain(text: str) -> str:
    """`text` without ANSI escape sequences (colours, cursor moves)."""
    return _ANSI.sub("", text)


class _LogLines(io.TextIOBase):
    """The file side: buffers a partial line, keeps what follows the last `\\r` of a line, writes whole lines."""

    def __init__(self, file):
        self.file = file
        self.pending = ""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        if self.file.closed:  # after exit closed it (a last word at shutdown): the terminal still has it
            return len(text)
        *lines, self.pending = (self.pending + plain(text)).split("\n")
        for line in lines:
            self.file.write(line.rstrip("\r").rsplit("\r", 1)[-1] + "\n")
        if lines:
            self.file.flush()
        return len(text)

    def flush(self) -> None:
        if not self.file.closed:
            self.file.flush()

    def close(self) -> None:
        if not self.file.closed:
            if self.pending:
                self.file.write(self.pending.rsplit("\r", 1)[-1] + "\n")
                self.pending = ""
            self.file.close()


class TeeStream(io.TextIOBase):
    """A text stream writing to `terminal` and, as plain lines, to `log`. Looks like `terminal` to
    whoever asks (`isatty`, `encoding`, `fileno`), so colours and bars are decided by where it shows."""

    def __init__(self, terminal, log_file):
        self.terminal = terminal
        self.log = _LogLines(log_file)

    @property
    def encoding(self):
        return getattr(self.terminal, "encoding", None) or "utf-8"

    @property
    def errors(self):
        return getattr(self.terminal, "errors", None) or "strict"

    def isatty(self) -> bool:
        return self.terminal.isatty()

    def fileno(self) -> int:
        return self.terminal.fileno()

    def writable(self) -> bool:
        return True

    def write(self, text) -> int:
        if not isinstance(text, str):  # click probes text streams with b"": refuse, as a text stream does
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
        self.terminal.write(text)
        self.log.write(text)
        return len(text)

    def flush(self) -> None:
        self.terminal.flush()
        self.log.flush()


def tee_stderr(path: str | Path, command: str = "") -> TeeStream:
    """Append what this process prints to sys.stderr from now on to `path` too (one header line per run)."""
    path = Path(path)
    if path.parent != Path(""):
        path.parent.mkdir(parents=True, exist_ok=True)
    file = open(path, "a", encoding="utf-8")
    file.write(f"# {datetime.now().astimezone().isoformat(timespec='seconds')} {command}".rstrip() + "\n")
    file.flush()
    tee = TeeStream(sys.stderr, file)
    sys.stderr = tee
    atexit.register(tee.log.close)
    return tee
