"""The README's screenshots of a store's report: docs/report-index.png and docs/report-video.png.

Renders report/index.html and one video's page (the first test video, else the first video) in headless
Chromium (tests/_browser.py), at 1280 px wide, the page's top 640 px. Run `recap report` on the store first.

    .venv/bin/python bench/screenshots.py recap-store/demo [--video VIDEO_ID]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from _browser import CHROMIUM, Chromium  # noqa: E402

import recap  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("store")
    parser.add_argument("--video")
    args = parser.parse_args()
    if CHROMIUM is None:
        sys.exit("needs Chromium: apt-get install chromium")
    reader = recap.open_store(args.store)
    report = Path(reader.store.abs("report"))
    if not (report / "index.html").exists():
        sys.exit(f"{report}/index.html: no report yet; run `recap report --store {args.store}`")
    video = args.video
    if video is None:
        test = reader.groundtruth("video", "test")["video_id"]
        video = sorted(test)[0] if len(test) else sorted(reader.videos["video_id"])[0]
    with tempfile.TemporaryDirectory() as tmp, Chromium(Path(tmp), height=640) as browser:
        for page, out in (("index.html", "report-index.png"), (f"{video}.html", "report-video.png")):
            browser.open(f"file://{report / page}")
            browser.screenshot(REPO / "docs" / out)
            print(f"docs/{out}: {page}")


if __name__ == "__main__":
    main()
