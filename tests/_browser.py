"""Real headless Chromium for the export and report tests, and a store whose captions read as sentences.

Chromium is driven over the DevTools protocol on a pipe (`--remote-debugging-pipe`: it reads our commands on
fd 3 and writes replies on fd 4, JSON messages ended by NUL), with the standard library only. `--dump-dom` with
`--virtual-time-budget` was tried first: the budget can run out while a video seek is still decoding (media runs
in real time, virtual time jumps ahead while the page waits), so the DOM was dumped before the cue was read in
about a third of the runs. Here a test awaits a promise the page resolves, and the read timeout only guards a
hung browser.
"""

import base64
import fcntl
import json
import os
import select
import shutil
import subprocess
from pathlib import Path

import pyarrow as pa
import pytest

from store import LEVELS, Store, captions_dir, current_versions, write_current

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "tests" / "artifacts"  # git-ignored: screenshots and pages to look at after a run
CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium: apt-get install chromium")


class Chromium:
    """One headless browser with one page: `open(url)` waits for its load event; `evaluate` awaits a JS value."""

    GUARD_S = 300  # a browser that answers nothing for this long has hung

    def __init__(self, tmp: Path, *flags: str, width: int = 1280, height: int = 900):
        to_us, theirs_out = os.pipe()
        theirs_in, self.out = os.pipe()

        def on_fds_3_and_4():  # in the child, before exec: above 9 first, so neither dup2 overwrites the other
            high_in, high_out = fcntl.fcntl(theirs_in, fcntl.F_DUPFD, 10), fcntl.fcntl(theirs_out, fcntl.F_DUPFD, 10)
            os.dup2(high_in, 3)
            os.dup2(high_out, 4)

        self.proc = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--remote-debugging-pipe",
             f"--user-data-dir={tmp / 'chromium-profile'}", f"--window-size={width},{height}", *flags],
            preexec_fn=on_fds_3_and_4, pass_fds=(3, 4), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(theirs_in)
        os.close(theirs_out)
        self.inp, self.buffer, self.next_id, self.events = to_us, b"", 0, []
        target = self.send("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.send("Page.enable", session=True)
        self.send("Emulation.setDeviceMetricsOverride", session=True, width=width, height=height,
                  deviceScaleFactor=1, mobile=False)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        try:
            self.send("Browser.close")
        except (OSError, AssertionError):
            pass
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self.inp)
        os.close(self.out)

    def send(self, method: str, session: bool = False, **params):
        self.next_id += 1
        message = {"id": self.next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = self.session
        os.write(self.out, json.dumps(message).encode() + b"\0")
        while True:
            reply = self._read()
            if reply.get("id") == self.next_id:
                assert "error" not in reply, f"{method}: {reply['error']}"
                return reply["result"]
            self.events.append(reply)

    def _read(self) -> dict:
        while b"\0" not in self.buffer:
            ready, _, _ = select.select([self.inp], [], [], self.GUARD_S)
            assert ready, f"chromium answered nothing for {self.GUARD_S} s"
            chunk = os.read(self.inp, 1 << 20)
            assert chunk, "chromium closed its pipe"
            self.buffer += chunk
        message, self.buffer = self.buffer.split(b"\0", 1)
        return json.loads(message)

    def open(self, url: str) -> None:
        self.events.clear()
        self.send("Page.navigate", session=True, url=url)
        while not any(e.get("method") == "Page.loadEventFired" for e in self.events):
            self.events.append(self._read())

    def evaluate(self, expression: str):
        """The value of a JS expression, a promise awaited; a thrown error fails the test."""
        result = self.send("Runtime.evaluate", session=True, expression=expression, awaitPromise=True,
                           returnByValue=True)
        assert "exceptionDetails" not in result, result["exceptionDetails"]
        return result["result"].get("value")

    def screenshot(self, path: Path, full_page: bool = False) -> None:
        shot = self.send("Page.captureScreenshot", session=True, format="png", captureBeyondViewport=full_page)
        path.write_bytes(base64.b64decode(shot["data"]))


TRICKY = "a <b> & c --> d"  # markup, a character reference and a timing arrow: escaped in WebVTT, kept in SRT


def readable_captions(root) -> dict[str, dict]:
    """Give every committed caption of the current versions a distinct sentence (the tiny random models write
    one string, or nothing, everywhere), then republish current/ as a caption run does. The third clip of every
    video gets TRICKY. Returns {video_id: {level: [texts in start order]}}."""
    store = Store(root)
    versions = current_versions(store)
    texts = {}
    for level in LEVELS:
        folder = captions_dir(level, versions[level])
        for name in store.listdir(folder):
            table = store.read_table(f"{folder}/{name}").sort_by("start_s")
            video = name.removesuffix(".parquet")
            new = [TRICKY if level == "clip" and k == 2 else f"{level} {k} of {video}: the hand moves things"
                   for k in range(table.num_rows)]
            store.write_table(f"{folder}/{name}", table.set_column(table.schema.get_field_index("text"), "text",
                                                                   pa.array(new, pa.string())))
            texts.setdefault(video, {})[level] = new
    write_current(store, {level: versions[level] for level in LEVELS}, versions["features"])
    return texts
