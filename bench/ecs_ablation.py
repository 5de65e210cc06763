"""ExCae's ablation on demo stores: text-to-video (and text-to-segment) retrieval of the test split per arm, the K
sweep and the active-expert sweep, per corpus seed, then the mean and the worst seed.

Per store (one corpus seed, after `recap demo --seed N`): the enhanced captions of the initial prompt ("w/o CSI") and
of CSI's searched prompt are made first if missing (`recap enhance`, video level, K = 10), then every arm is built
in-process from the index (pipeline.ecs.ablation):

    python bench/ecs_ablation.py recap-store/demo-0 recap-store/demo-1 recap-store/demo-2 [--out ecs.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.config import settle  # noqa: E402
from pipeline.ecs import ablation, read_current_index  # noqa: E402
from stages.enhance import Recipe, prompt_from  # noqa: E402
from store import Store  # noqa: E402

INITIAL = Recipe(level="video")  # the captioner's iteration-0 prompt: sampling at temperature 1, top-p 0.9
KS = (1, 3, 5, 7, 10)
ACTIVE = (0, 1, 2, 4)
SHOWN = ("text-to-video R@1", "text-to-video R@5", "text-to-video R@10", "text-to-video MdR",
         "text-to-segment R@1", "text-to-segment R@5", "text-to-segment MdR")


def recap(*args: str) -> str:
    proc = subprocess.run([sys.executable, "-c", "from cli.main import main; main()", *args], cwd=REPO, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"recap {' '.join(args)}: exit {proc.returncode}\n{proc.stderr[-2000:]}")
    return proc.stderr


def enhanced_versions(store: Store) -> tuple[str, str, float]:
    """(version of the initial prompt's captions, version of the searched prompt's, search + apply wall s)."""
    recap("enhance", "--store", store.root, "--level", "video", "--k", "10", "--prompt", INITIAL.text())
    initial = _version_of(store, INITIAL.text())
    began = time.monotonic()
    recap("enhance", "--store", store.root, "--level", "video", "--k", "10")
    wall = time.monotonic() - began
    result = json.loads(Path(store.abs(_newest_result(store))).read_text())
    searched = _version_of(store, prompt_from(result["fields"]).text())
    return initial, searched, wall


def _newest_result(store: Store) -> str:
    runs = [f"enhance/search/{r}/result.json" for r in store.listdir("enhance/search")
            if store.exists(f"enhance/search/{r}/result.json")]
    return max(runs, key=lambda rel: Path(store.abs(rel)).stat().st_mtime)


def _version_of(store: Store, prompt: str) -> str:
    for version in store.listdir("captions/enhanced"):
        first = next(iter(store.listdir(f"captions/enhanced/{version}")), None)
        if first and store.read_table(f"captions/enhanced/{version}/{first}")["prompt"][0].as_py() == prompt:
            return version
    raise FileNotFoundError(f"{store.root}: no enhanced captions of prompt {prompt!r}")


def one_store(root: str) -> dict:
    store = Store(root, create=False)
    initial, searched, enhance_s = enhanced_versions(store)
    config = settle(root, record=False)
    rows, stage = read_current_index(config, store)
    base = replace(config.ecs, enhanced=(initial, searched), k=10)
    say = lambda line: print(f"[{Path(root).name}] {line}", file=sys.stderr, flush=True)  # noqa: E731
    began = time.monotonic()
    main, model, history = ablation(store, rows, stage.embed_texts, base, say=say)
    train_s = time.monotonic() - began
    names = ["video embedding only", "+ ReCap captions (mean fusion)", "+ CSI captions, initial prompt (w/o CSI)",
             "+ CSI captions, searched prompt", f"+ ECS ({base.active} of {base.experts} experts)"]
    main["arm"] = names
    k_rows, active_rows = [], []
    for k in KS:
        table, _, _ = ablation(store, rows, stage.embed_texts, replace(base, k=k, enhanced=(searched,)), say=say)
        k_rows += [{"K": k, "fusion": "mean", **table.iloc[2].to_dict()}, {"K": k, "fusion": "ECS", **table.iloc[3].to_dict()}]
    for active in ACTIVE:
        for routing in ("topk", "dense") if active else ("topk",):
            s = replace(base, enhanced=(searched,), active=active, eval_routing=routing)
            table, _, _ = ablation(store, rows, stage.embed_texts, s, say=say)
            active_rows.append({"active": active, "routing": routing, **table.iloc[-1].to_dict()})
    return {"store": root, "initial": initial, "searched": searched, "enhance_s": enhance_s, "ecs_s": train_s,
            "main": main.to_dict("records"), "k": k_rows, "active": active_rows, "csi": search_curve(store)}


def search_curve(store: Store) -> list[dict]:
    """CSI's committed iterations of the newest search: score, accepted, best so far."""
    run = Path(store.abs(_newest_result(store))).parent
    return [{k: record[k] for k in ("iteration", "prompt", "similarity", "diversity", "score", "accepted",
                                    "best_score")}
            for record in (json.loads(p.read_text()) for p in sorted(run.glob("iter-*.json")))]


def aggregate(tables: list[pd.DataFrame], keys: list[str]) -> pd.DataFrame:
    """Mean and worst (lowest R@k, highest MdR) over seeds of each row."""
    rows = pd.concat(tables, ignore_index=True)
    out = rows.groupby(keys, sort=False)[list(SHOWN)].agg(["mean", "min", "max"])
    worst = {c: out[(c, "max" if c.endswith("MdR") else "min")] for c in SHOWN}
    return pd.concat({"mean": out.xs("mean", axis=1, level=1), "worst": pd.DataFrame(worst)}, axis=1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("stores", nargs="+")
    parser.add_argument("--out", help="Write every figure as JSON here")
    args = parser.parse_args()
    results = [one_store(root) for root in args.stores]
    pd.set_option("display.width", 200)
    for r in results:
        print(f"\n## {r['store']} (enhance {r['enhance_s']:.0f} s, ECS train + eval {r['ecs_s']:.0f} s)")
        print(pd.DataFrame(r["main"]).set_index("arm")[[*SHOWN, "expert usage"]].to_string(float_format="{:.1f}".format))
    for name, keys in (("main", ["arm"]), ("k", ["K", "fusion"]), ("active", ["active", "routing"])):
        table = aggregate([pd.DataFrame(r[name]) for r in results], keys)
        print(f"\n## {name}: mean and worst over {len(results)} seed(s)")
        print(table.to_string(float_format="{:.1f}".format))
    for r in results:
        curve = r["csi"]
        accepted = [c for c in curve if c["accepted"]]
        print(f"\n## {r['store']}: CSI search, {len(curve)} iterations, best score per iteration")
        print(" ".join(f"{c['best_score']:.3f}" for c in curve))
        for c in accepted:
            print(f"  accepted at {c['iteration']}: {c['score']:.4f} (similarity {c['similarity']:.4f}, diversity "
                  f"{c['diversity']:.4f}) {c['prompt']}")
    for r in results:
        print(f"\n## {r['store']}: expert usage by active experts")
        for row in r["active"]:
            print(f"active {row['active']} {row['routing']}: {row['expert usage']}")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
