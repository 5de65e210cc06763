"""Two `recap <stage> --local` processes started together on one store, N tries per stage.

Prints, per stage: tries where both exited 0, tries where every unit was done exactly once (the two
"done" counts add up to the units, and every unit has one marker), and tries whose outputs equal a
single run's. The tiny synthetic corpus and small untrained checkpoints (their captions are not
meant to be good; the point is that two runs agree with one).

    .venv/bin/python bench/concurrent_runs.py [--tries 10]
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from _checkpoints import tiny_checkpoint  # noqa: E402

import synth  # noqa: E402
from pipeline.ingest import ingest_hcap  # noqa: E402
from store import Store, read_captions  # noqa: E402

STAGES = {"features": ("--encoder", "tsf-tiny", "--batch-size", "8"), "captions": (), "segments": (),
          "summaries": ()}
LEVEL = {"captions": "clip", "segments": "segment", "summaries": "video"}


def recap(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "from cli.main import main; main()", *args], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def outputs(store: Store, stage: str):
    if stage == "features":
        from store import FeatureSet

        name = store.listdir("features")[0]
        fs = FeatureSet(store, name)
        return {v: fs.read_cls(v, slice(None)).tobytes() for v in fs.videos()}
    level = LEVEL[stage]
    return {v: read_captions(store, level, v).sort_by([("video_id", "ascending"), ("start_s", "ascending")]).to_pylist()
            for v in store.listdir(f"captions/{level}")}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tries", type=int, default=10)
    tries = parser.parse_args().tries
    work = Path(tempfile.mkdtemp(prefix="recap-concurrent-"))
    synth.generate("tiny", work / "corpus", seed=0)
    base = work / "base"
    ingest_hcap(Store(base), str(work / "corpus"), str(work / "corpus" / "videos"))
    (base / "recap.toml").write_text("[windows]\nsegment_s = 24.0\n[features]\nencoder = \"tsf-tiny\"\n"
                                     "batch_size = 8\n[captions]\n" + "".join(
                                         f'{level}_checkpoint = "{tiny_checkpoint(work / level, level)}"\n'
                                         for level in ("clip", "segment", "video")))
    print(f"{'stage':<10} {'tries':>5} {'both exit 0':>12} {'each unit once':>15} {'same as one run':>16}")
    for stage, extra in STAGES.items():
        single = work / f"{stage}-single"
        shutil.copytree(base, single)
        subprocess.run([sys.executable, "-c", "from cli.main import main; main()", stage, "--store", str(single),
                        "--local", *extra], cwd=REPO, check=True, capture_output=True)
        expected = outputs(Store(single), stage)
        units = sum(1 for _ in (single / "markers" / stage).rglob("*.json"))
        ok = once = same = 0
        for t in range(tries):
            root = work / f"{stage}-{t}"
            shutil.copytree(base, root)
            runs = [recap(stage, "--store", str(root), "--local", *extra) for _ in range(2)]
            errs = [run.communicate()[1] for run in runs]
            ok += all(run.returncode == 0 for run in runs)
            done = sum(int(re.search(rf"\[{stage}\] done (\d+),", e).group(1)) for e in errs)
            markers = sum(1 for _ in (root / "markers" / stage).rglob("*.json"))
            once += done == units == markers
            same += outputs(Store(root), stage) == expected
            shutil.rmtree(root)
        base = single  # the next stage reads this stage's output
        print(f"{stage:<10} {tries:>5} {ok:>12} {once:>15} {same:>16}   ({units} units)")
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
