"""CSI (`recap enhance --search-only`) killed midway and resumed, against an uninterrupted search, on a copy of a
store each: the final prompt, its score and every committed iteration must be the same.

    python bench/csi_resume.py recap-store/demo [--kill-after 5] [--level video] [--k 10]
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COMMAND = [sys.executable, "-c", "from cli.main import main; main()", "enhance", "--search-only"]


def search_dir(store: Path) -> Path:
    [run] = [p for p in (store / "enhance" / "search").iterdir() if p.is_dir()]
    return run


def records(store: Path) -> list[dict]:
    keep = ("iteration", "prompt", "similarity", "diversity", "score", "accepted", "best_prompt")
    return [{k: json.loads(p.read_text())[k] for k in keep} for p in sorted(search_dir(store).glob("iter-*.json"))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("store")
    parser.add_argument("--kill-after", type=int, default=5, help="SIGKILL once this many iterations are committed")
    parser.add_argument("--level", default="video")
    parser.add_argument("--k", default="10")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="csi-resume-"))
    stores = {name: work / name for name in ("uninterrupted", "killed")}
    for path in stores.values():
        shutil.copytree(args.store, path, ignore=shutil.ignore_patterns("enhance", "report", "thumbnails"))
    options = ["--level", args.level, "--k", args.k]

    began = time.monotonic()
    subprocess.run([*COMMAND, "--store", str(stores["uninterrupted"]), *options], cwd=REPO, check=True,
                   capture_output=True)
    uninterrupted_s = time.monotonic() - began

    proc = subprocess.Popen([*COMMAND, "--store", str(stores["killed"]), *options], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while proc.poll() is None:
        run = stores["killed"] / "enhance" / "search"
        if run.exists() and len(list(run.glob("*/iter-*.json"))) >= args.kill_after:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.wait()
    killed_at = len(records(stores["killed"]))
    resumed = subprocess.run([*COMMAND, "--store", str(stores["killed"]), *options], cwd=REPO, check=True,
                             capture_output=True, text=True)
    continued = next((line for line in resumed.stderr.splitlines() if "continu" in line or "resum" in line), "")

    results = {name: json.loads((search_dir(path) / "result.json").read_text()) for name, path in stores.items()}
    same_records = records(stores["uninterrupted"]) == records(stores["killed"])
    print(f"uninterrupted: {len(records(stores['uninterrupted']))} iterations in {uninterrupted_s:.1f} s, final prompt "
          f"{results['uninterrupted']['prompt']!r} (score {results['uninterrupted']['score']:.4f})")
    print(f"killed (SIGKILL) with {killed_at} iterations committed; resumed: {continued.strip()}")
    print(f"resumed: final prompt {results['killed']['prompt']!r} (score {results['killed']['score']:.4f})")
    print(f"same final prompt: {results['killed']['prompt'] == results['uninterrupted']['prompt']}; "
          f"same iteration records: {same_records}")
    shutil.rmtree(work)
    return 0 if same_records and results["killed"]["prompt"] == results["uninterrupted"]["prompt"] else 1


if __name__ == "__main__":
    sys.exit(main())
