"""`recap run`: the whole DAG in order; `--dry-run` prints the plan without computing."""

from __future__ import annotations

import sys

from pipeline.config import Config
from pipeline.current import publish_current
from pipeline.dag import build_stages
from pipeline.progress import Summary
from pipeline.runner import run_stage, todo_units
from store import Store, read_groundtruth


def plan_rows(stages, store: Store) -> list[dict]:
    rows = []
    for stage in stages:
        todo, done, failed, blocked = todo_units(stage, store)
        rows.append({"stage": stage.name, "version": stage.version(), "to_do": len(todo), "blocked": len(blocked),
                     "done": len(done), "failed": len(failed), "work": sum(u.work for u in todo),
                     "work_name": stage.work_name})
    return rows


def format_plan(rows: list[dict]) -> str:
    lines = [f"{'stage':<10} {'version':<20} {'to do':>6} {'after upstream':>15} {'done':>6} {'failed':>7}  work"]
    for r in rows:
        lines.append(f"{r['stage']:<10} {r['version']:<20} {r['to_do']:>6} {r['blocked']:>15} {r['done']:>6} "
                     f"{r['failed']:>7}  {r['work']:.0f} {r['work_name']}")
    return "\n".join(lines)


def run_all(config: Config, store: Store, *, dry_run: bool = False, retry_failed: bool = False,
            local: bool = False, evaluate: bool = True, stream=None) -> list[Summary]:
    stages = build_stages(config, store)
    if dry_run:
        print(format_plan(plan_rows(stages, store)), file=sys.stdout)
        print("(units 'after upstream' wait for an earlier stage of this run)", file=sys.stdout)
        return []
    summaries = []
    for stage in stages:
        summaries.append(run_stage(stage, store, executor="local" if local else config.run.executor,
                                   workers=config.run.workers, address=config.run.address or None,
                                   retry_failed=retry_failed, max_retries=config.run.max_retries, stream=stream))
        if stage is not stages[0]:  # a caption level: current/ gets what it committed
            publish_current(config, store, [stage.level])
    if evaluate and any(read_groundtruth(store, s.level, config.evaluate.split) is not None for s in stages[1:]):
        from pipeline.evaluate import evaluate_all

        evaluate_all(config, store, stream=sys.stdout)
    return summaries
