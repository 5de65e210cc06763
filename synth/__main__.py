"""python -m synth --preset tiny --out DIR [--seed N]"""

import argparse
import sys
import time
from pathlib import Path

from synth import PRESETS, CorpusMismatch, generate


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m synth", description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    started = time.monotonic()

    def progress(done: int, total: int) -> None:
        elapsed = time.monotonic() - started
        eta = elapsed / done * (total - done)
        print(f"\rvideos {done}/{total}  {elapsed:.0f} s elapsed, ETA {eta:.0f} s", end="", file=sys.stderr)

    try:
        manifest = generate(args.preset, args.out, args.seed, progress)
    except CorpusMismatch as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(file=sys.stderr)
    print(f"{args.out}: {sum(manifest.videos.values())} videos {manifest.videos}, "
          f"{sum(manifest.segments.values())} segments, {sum(manifest.clips.values())} clips "
          f"in {time.monotonic() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
