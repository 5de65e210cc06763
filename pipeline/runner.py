"""Runs a stage over its units: skip committed ones, run the rest in-process or on Ray, record failures."""

from __future__ import annotations

import os
import re
import sys
import threading
import time
import traceback
from collections import Counter, deque
from contextlib import contextmanager

from pipeline.progress import Progress, Summary
from stages.base import Blocked, SetupFailed, Stage, Unit
from store import Store

MAX_FAILURE_LINES = 10  # per run; every failure still gets its record


def todo_units(stage: Stage, store: Store, retry_failed: bool = False):
    """Split a stage's plan into (to run, already done, failed before, blocked)."""
    version = stage.version()
    planned = stage.plan(store)
    blocked = [u for u in planned if isinstance(u, Blocked)]
    units = [u for u in planned if isinstance(u, Unit)]
    markers = store.markers(stage.name, version)
    failed_before = {f["unit"]: f for f in store.failures(stage.name, version)}
    todo, done, failed = [], [], []
    for u in units:
        if markers.get(u.id, {}).get("fingerprint") == u.fingerprint:
            done.append(u)
        elif u.id in failed_before and not retry_failed:
            failed.append(failed_before[u.id])
        else:
            todo.append(u)
    return todo, done, failed, blocked


def run_stage(stage: Stage, store: Store, *, executor: str = "ray", workers: int = 0, address: str | None = None,
              retry_failed: bool = False, max_retries: int = 2, progress_every_s: float = 2.0,
              stream=None) -> Summary:
    stream = sys.stderr if stream is None else stream  # at the call: --log-file replaces it
    start = time.monotonic()
    todo, done, failed_before, blocked = todo_units(stage, store, retry_failed)
    if executor != "ray" or todo:  # in this process: always (cheap); on Ray: only when there is work
        _check_gpus(stage, executor, address)
    summary = Summary(stage.name, skipped=len(done), failed=len(failed_before), blocked=len(blocked),
                      failures=list(failed_before), blocked_reasons=[b.reason for b in blocked])
    for record in failed_before:
        print(f"[{stage.name}] {record['unit']}: failed before ({record['message']}); "
              f"--retry-failed to try again", file=stream)
    for folder in (getattr(stage, "output_dir", None), f"markers/{stage.name}/{stage.version()}",
                   f"failures/{stage.name}/{stage.version()}"):
        if folder:  # what killed runs left behind, old enough that no live writer can own it
            store.remove_temporaries(folder, older_than_s=store.TMP_STALE_S)
    todo, elsewhere, done_meanwhile = _claim(stage, store, todo)
    summary.skipped += done_meanwhile
    if elsewhere:
        summary.elsewhere = len(elsewhere)
        print(f"[{stage.name}] {len(elsewhere)} unit(s) running in another process on this store: skipped "
              f"(e.g. {elsewhere[0].id})", file=stream)
    try:
        if todo:
            with _claims_kept_alive(store):
                _run_claimed(stage, store, todo, summary, executor, workers, address, max_retries, progress_every_s,
                             stream)
    finally:
        for unit in todo:
            store.release(stage.name, stage.version(), unit.id)
    if summary.failed > MAX_FAILURE_LINES:
        print(f"[{stage.name}] ... and {summary.failed - MAX_FAILURE_LINES} more failures: "
              f"failures/{stage.name}/{stage.version()}/", file=stream)
    for reason in summary.blocked_reasons[:MAX_FAILURE_LINES]:
        print(f"[{stage.name}] blocked: {reason}", file=stream)
    if len(summary.blocked_reasons) > MAX_FAILURE_LINES:
        print(f"[{stage.name}] ... and {len(summary.blocked_reasons) - MAX_FAILURE_LINES} more blocked", file=stream)
    summary.wall_s = time.monotonic() - start
    print(summary.line(), file=stream, flush=True)
    return summary


def _claim(stage: Stage, store: Store, units: list[Unit]) -> tuple[list[Unit], list[Unit], int]:
    """Take the units no other live process holds: (ours, held elsewhere, committed since planning)."""
    ours, elsewhere, done = [], [], 0
    version = stage.version()
    try:
        for unit in units:
            if not store.claim(stage.name, version, unit.id):
                elsewhere.append(unit)
            elif store.is_done(stage.name, version, unit.id, unit.fingerprint):  # another run finished it meanwhile
                store.release(stage.name, version, unit.id)
                done += 1
            else:
                ours.append(unit)
    except BaseException:
        for unit in units:  # release gives back only what this store claimed
            store.release(stage.name, version, unit.id)
        raise
    return ours, elsewhere, done


@contextmanager
def _claims_kept_alive(store: Store):
    """Touch this run's claims every CLAIM_HEARTBEAT_S in a thread: another host takes them over only once they
    stop (a run that died), not after a fixed time however long the run."""
    stop = threading.Event()

    def beat():
        while not stop.wait(store.CLAIM_HEARTBEAT_S):
            try:
                store.touch_claims()
            except OSError:  # a full or flaky disk: the next beat tries again
                pass

    thread = threading.Thread(target=beat, name="claims-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _run_claimed(stage: Stage, store: Store, todo: list[Unit], summary: Summary, executor: str, workers: int,
                 address: str | None, max_retries: int, progress_every_s: float, stream) -> None:
    import torch

    # check() and local runs load models here, setting torch's threads to the stage's reservation: the
    # caller's count comes back after, or a demo trained with 1 thread after its first stage, and
    # differently when a resumed run skipped that stage.
    threads = torch.get_num_threads()
    try:
        _run_checked(stage, store, todo, summary, executor, workers, address, max_retries, progress_every_s, stream)
    finally:
        torch.set_num_threads(threads)


def _run_checked(stage: Stage, store: Store, todo: list[Unit], summary: Summary, executor: str, workers: int,
                 address: str | None, max_retries: int, progress_every_s: float, stream) -> None:
    stage.check()
    stage.prepare(store, todo)
    progress = Progress(stage.name, len(todo), sum(u.work for u in todo), stage.work_name, stream, progress_every_s)
    results = (_run_ray(stage, store, todo, workers, max_retries, address) if executor == "ray"
               else _run_local(stage, store, todo))
    try:
        for unit, error in results:
            if error is None:
                summary.done += 1
                summary.work += unit.work
            else:
                record = store.record_failure(stage.name, stage.version(), unit.id, error, unit.video_id)
                summary.failed += 1
                summary.failures.append(record)
                if summary.failed <= MAX_FAILURE_LINES:
                    progress.write(f"[{stage.name}] {unit.id}: FAILED {record['error_type']}: {record['message']}"
                                   + (f" (no failure record: {record['not_recorded']})" if "not_recorded" in record
                                      else ""))
            progress.advance(unit.work)
    finally:  # a run stopped midway (a worker that cannot set up, Ctrl-C): the bar's line ends first
        progress.close()


def _check_gpus(stage: Stage, executor: str, address: str | None) -> None:
    """A stage that asks for GPUs, where there are none, fails here: not in every unit, nor waiting on Ray."""
    if stage.resources.gpus <= 0:
        return
    device = getattr(stage, "device", "cuda")
    if executor == "ray":
        import ray

        from pipeline.ray_workers import ensure_ray

        ensure_ray(address)
        if ray.cluster_resources().get("GPU", 0) < stage.resources.gpus:
            raise ValueError(f"{stage.name}: device {device!r} needs a GPU per worker, and the Ray cluster has none; "
                             "use --device cpu, or a cluster with GPUs")
        return
    import torch

    index = int(device.split(":")[1]) if ":" in device else 0
    if index >= torch.cuda.device_count():
        raise ValueError(f"{stage.name}: device {device!r}, and this machine has {torch.cuda.device_count()} CUDA "
                         "device(s); use --device cpu")


def _run_local(stage: Stage, store: Store, units: list[Unit]):
    stage.setup()
    for unit in units:
        try:
            stage.process(unit, store)
            yield unit, None
        except Exception as e:  # one bad unit never stops the batch
            if os.environ.get("RECAP_DEBUG"):
                traceback.print_exc()
            yield unit, e


def _run_ray(stage: Stage, store: Store, units: list[Unit], workers: int, max_retries: int, address: str | None):
    """Units on a pool of actors, two in flight per actor (one running, one queued).

    Retries are the driver's, not Ray's: when an actor dies, only the unit it was running (its oldest task still in
    flight; an actor runs its tasks in order) is charged a death, and the unit queued behind it goes back to the queue
    uncharged. A unit fails after `max_retries + 1` deaths; a replacement actor takes the dead one's place.
    """
    import ray

    from pipeline.ray_workers import StageWorker, ensure_ray

    ensure_ray(address)  # only now: a run with nothing to do never starts Ray
    res = stage.resources
    if workers <= 0:
        cpus = ray.cluster_resources().get("CPU", 1)
        workers = max(1, int(cpus // max(res.cpus, 1e-3)))
    actor_cls = ray.remote(StageWorker).options(
        num_cpus=res.cpus, num_gpus=res.gpus, memory=int(res.memory_gb * 2**30) if res.memory_gb else None,
        max_restarts=0, max_task_retries=0)
    queue = deque(units)
    deaths: Counter[str] = Counter()
    lanes: dict[object, list] = {}  # actor -> its refs in flight, oldest first
    owner = {}  # ref -> (unit, actor)
    per_actor = 2

    def start_actor():
        actor = actor_cls.remote(stage)
        lanes[actor] = []
        fill(actor)

    def fill(actor):
        while queue and len(lanes[actor]) < per_actor:
            unit = queue.popleft()
            ref = actor.process.remote(unit, store)
            lanes[actor].append(ref)
            owner[ref] = (unit, actor)

    for _ in range(min(workers, len(units))):
        start_actor()
    try:
        while owner:
            [ready], _ = ray.wait(list(owner), num_returns=1)
            actor = owner[ready][1]
            try:
                ray.get(ready)
                lanes[actor].remove(ready)
                yield owner.pop(ready)[0], None
            except ray.exceptions.RayTaskError as e:
                lanes[actor].remove(ready)
                yield owner.pop(ready)[0], e.cause if isinstance(e.cause, BaseException) else e
            except ray.exceptions.RayActorError as e:
                if e.actor_init_failed:
                    raise SetupFailed(f"{stage.name}: a Ray worker could not set the stage up: "
                                       f"{_last_error_line(e.error_msg)}") from None
                yield from _after_death(actor, lanes, owner, queue, deaths, max_retries)
                start_actor()
                continue
            fill(actor)
    finally:
        for actor in lanes:
            ray.kill(actor)


def _after_death(actor, lanes: dict, owner: dict, queue: deque, deaths: Counter, max_retries: int):
    """Settle a dead actor's refs in submission order: finished ones count, the running one is charged a death."""
    import ray

    charged = False
    for ref in lanes.pop(actor):
        unit, _ = owner.pop(ref)
        try:
            ray.get(ref)
            yield unit, None
            continue
        except ray.exceptions.RayTaskError as e:
            yield unit, e.cause if isinstance(e.cause, BaseException) else e
            continue
        except ray.exceptions.RayActorError:
            pass
        if not charged:
            charged = True
            deaths[unit.id] += 1
            if deaths[unit.id] > max_retries:
                yield unit, RuntimeError(f"its worker process died {deaths[unit.id]} time(s) while running it")
                continue
        queue.appendleft(unit)


def _last_error_line(message: str) -> str:
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    errors = [line for line in lines if re.match(r"^[\w.]+(Error|Exception): ", line)]
    return (errors or lines or ["unknown error"])[-1]
