"""The store: a root folder or fsspec URL holding tables, features and markers.

Layout (relative to the root):
    recap.toml                            the store's settings (pipeline.config.settle)
    videos.parquet                        registry of ingested videos
    groundtruth/<level>.parquet           reference captions
    groundtruth/queries.parquet           retrieval queries, same schema (recap evaluate --task retrieval)
    groundtruth/reordered.parquet         training segments told in orders no video has, + parts (recap train)
    features/<feature_set>/<video_id>/    Zarr v3 arrays (see store.features)
    captions/<level>/<version>/<video_id>.parquet   every row names its version
    captions/enhanced/<version>/<video_id>.parquet  K captions per unit under one prompt (recap enhance)
    enhance/search/<run>/iter-NNNN.json  recap enhance's prompt search, one file per committed iteration
    current/<level>.parquet                the committed rows of each level's current version, one table
    current/versions.json                  which versions those are (see store.current)
    metrics/<name>.parquet                 evaluation results (recap evaluate, the demo)
    exports/<format>/<video_id>.*          recap export (recap.export)
    thumbnails/<version>/<video_id>/<start_ms>.jpg   the report's thumbnails (stages.thumbnails)
    report/                                recap report's pages and plots (recap.report)
    markers/<stage>/<version>/<unit>.json  completion markers, written last
    failures/<stage>/<version>/<unit>.json failure records
    superseded/<fingerprint>/...           outputs replaced by a changed fingerprint
    locks/                                 short-lived commit locks (local roots)
    claims/<stage>/<version>/<unit>.json   units a running process has taken (local roots)

Every write is atomic: a hidden temporary name, then a rename (local) or a
single put (object stores). Readers of table folders skip hidden names.
current/ is derived, never an input: the caption drivers rewrite it after each
run from the committed rows (markers), tables first and versions.json last,
so deleting it loses nothing.
"""

from __future__ import annotations

import io
import json
import os
import posixpath
import time
import uuid
from contextlib import contextmanager
from datetime import datetime, timezone

import fsspec
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from store import locks
from store.ids import check_name


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class Store:
    LOCK_STALE_S = 120.0  # another host's commit lock untouched this long is a dead process's (store.locks)
    CLAIM_STALE_S = 600.0  # a claim from another host untouched this long is a dead run's
    CLAIM_HEARTBEAT_S = 60.0  # how often a running driver touches its claims (pipeline.runner)
    TMP_STALE_S = 3600.0  # a temporary this old is a dead writer's: every write renames within seconds

    def __init__(self, root: str | os.PathLike = "recap-store", create: bool = True):
        """`create=False`: a store that does not exist is a FileNotFoundError (commands that only read)."""
        self.root = str(root)
        self.fs, self.path = fsspec.core.url_to_fs(self.root)
        self.local = "file" in (self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,))
        if self.local:
            self.path = os.path.abspath(self.path)
        if not create and not self.fs.isdir(self.path):
            raise FileNotFoundError(f"{self.root}: no store here (run `recap ingest` or `recap demo` first, "
                                    "or pass --store)")
        self.fs.makedirs(self.path, exist_ok=True)
        self._claims: dict[str, bytes] = {}  # path -> what claim() wrote there

    def check_writable(self) -> None:
        """Raise the OSError a write would (a read-only or full disk, no permission) before any work starts."""
        if self.local:
            probe = os.path.join(self.path, f".write-test-{os.getpid()}")
            try:
                with open(probe, "wb"):
                    pass
                os.remove(probe)
            except OSError as e:
                raise OSError(e.errno, f"{e.strerror}: the store cannot be written", self.root) from None

    def __repr__(self) -> str:
        return f"Store({self.root!r})"

    def __reduce__(self):  # cheap to ship to Ray workers: reopen from the URL
        return (Store, (self.root,))

    # ---- paths -----------------------------------------------------------------

    def abs(self, rel: str) -> str:
        rel = rel.strip("/")
        if any(part in ("..", "") for part in rel.split("/")) and rel:
            raise ValueError(f"path {rel!r} escapes the store")
        return posixpath.join(self.path, rel) if rel else self.path

    def url(self, rel: str) -> str:
        """A URL other libraries (zarr, dask) can open."""
        full = self.abs(rel)
        return full if self.local else self.fs.unstrip_protocol(full)

    def exists(self, rel: str) -> bool:
        return self.fs.exists(self.abs(rel))

    def listdir(self, rel: str) -> list[str]:
        """Visible entry names directly under `rel` (empty if absent)."""
        full = self.abs(rel)
        if not self.fs.exists(full):
            return []
        names = [posixpath.basename(p.rstrip("/")) for p in self.fs.ls(full, detail=False)]
        return sorted(n for n in names if not n.startswith((".", "_")))

    def size(self, rel: str) -> int:
        full = self.abs(rel)
        if not self.fs.exists(full):
            return 0
        return int(self.fs.du(full, total=True)) if self.fs.isdir(full) else int(self.fs.size(full))

    # ---- atomic writes ---------------------------------------------------------

    def tmp_name(self, rel: str) -> str:
        """A hidden sibling of `rel` to write before renaming into place."""
        head, tail = posixpath.split(rel)
        return posixpath.join(head, f".tmp-{tail}-{uuid.uuid4().hex[:12]}")

    def remove_temporaries(self, folder: str, older_than_s: float = 0.0) -> int:
        """Remove the temporaries directly in `folder` that a killed or crashed writer never renamed into
        place, if older than `older_than_s` (0: all, only safe while no writer runs). Returns how many."""
        removed = 0
        for path in self.fs.glob(f"{self.abs(folder)}/.tmp-*"):
            try:
                age = time.time() - self.fs.modified(path).timestamp()
                if age >= older_than_s:
                    self.fs.rm(path, recursive=True)
                    removed += 1
            except FileNotFoundError:  # its writer renamed it into place meanwhile: not debris
                continue
        return removed

    def write_bytes(self, rel: str, data: bytes) -> None:
        tmp = self.tmp_name(rel)
        self.fs.makedirs(posixpath.dirname(self.abs(rel)), exist_ok=True)
        try:
            with self.fs.open(self.abs(tmp), "wb") as f:
                f.write(data)
            self.replace(tmp, rel)
        except BaseException:  # a full disk, a kill: leave no temporary behind where we can
            try:
                self.remove(tmp)
            except OSError:
                pass
            raise

    def replace(self, src_rel: str, dst_rel: str) -> None:
        """Move src over dst atomically (local rename; on object stores a move of a hidden temp)."""
        src, dst = self.abs(src_rel), self.abs(dst_rel)
        self.fs.makedirs(posixpath.dirname(dst), exist_ok=True)
        if self.local:
            os.replace(src, dst)
        else:
            self.fs.mv(src, dst, recursive=True)

    def remove(self, rel: str) -> None:
        full = self.abs(rel)
        if self.fs.exists(full):
            self.fs.rm(full, recursive=True)

    def write_json(self, rel: str, obj) -> None:
        self.write_bytes(rel, json.dumps(obj, indent=1, sort_keys=True, default=str).encode())

    def read_json(self, rel: str):
        try:
            with self.fs.open(self.abs(rel), "rb") as f:
                return json.load(f)
        except FileNotFoundError:
            return None

    def write_table(self, rel: str, table: pa.Table) -> None:
        buf = io.BytesIO()
        pq.write_table(table, buf)
        self.write_bytes(rel, buf.getvalue())

    def stage_table(self, rel: str, table: pa.Table) -> str:
        """Write a table under a hidden temporary name; return that name for `commit`."""
        tmp = self.tmp_name(rel)
        self.fs.makedirs(posixpath.dirname(self.abs(rel)), exist_ok=True)
        with self.fs.open(self.abs(tmp), "wb") as f:
            pq.write_table(table, f)
        return tmp

    def read_table(self, rel: str, columns=None, filter=None, schema: pa.Schema | None = None) -> pa.Table | None:
        """A Parquet file, or every visible Parquet file under a folder, as one table. With `schema`, files
        that lack one of its columns read it as nulls (otherwise the first file's schema decides)."""
        full = self.abs(rel)
        if not self.fs.exists(full):
            return None
        if self.fs.isdir(full) and not self.listdir(rel):
            return None
        dataset = ds.dataset(full, filesystem=self.fs, format="parquet", schema=schema)
        return dataset.to_table(columns=columns, filter=filter)

    # ---- markers, failures, commits -------------------------------------------

    @staticmethod
    def _unit_rel(kind: str, stage: str, version: str, unit: str) -> str:
        check_name(stage, "stage")
        check_name(version, "version")
        check_name(unit, "unit id")
        return f"{kind}/{stage}/{version}/{unit}.json"

    def marker(self, stage: str, version: str, unit: str) -> dict | None:
        return self.read_json(self._unit_rel("markers", stage, version, unit))

    def markers(self, stage: str, version: str) -> dict[str, dict]:
        """All completion markers of one stage version, by unit id."""
        out = {}
        for name in self.listdir(f"markers/{stage}/{version}"):
            m = self.read_json(f"markers/{stage}/{version}/{name}")
            if m is not None:
                out[name.removesuffix(".json")] = m
        return out

    def is_done(self, stage: str, version: str, unit: str, fingerprint: str) -> bool:
        m = self.marker(stage, version, unit)
        return m is not None and m.get("fingerprint") == fingerprint

    def commit(self, stage: str, version: str, unit: str, fingerprint: str,
               outputs: dict[str, str | None], stats: dict | None = None) -> bool:
        """Move staged outputs into place and write the marker last.

        `outputs` maps final path -> staged temporary path (None for output
        already written in place, such as Zarr regions). Returns False when
        another process committed the same unit and fingerprint first; the
        staged files are then discarded. Outputs of an earlier, different
        fingerprint are moved to superseded/ rather than overwritten.
        """
        with self.lock(f"{stage}.{version}.{unit}"):
            old = self.marker(stage, version, unit)
            if old is not None and old.get("fingerprint") == fingerprint:
                for tmp in outputs.values():
                    if tmp:
                        self.remove(tmp)
                return False
            if old is not None:
                for final in old.get("outputs", []):
                    if final not in outputs or outputs[final]:
                        self.supersede(final, old["fingerprint"])
            for final, tmp in outputs.items():
                if tmp:
                    self.replace(tmp, final)
            self.write_json(self._unit_rel("markers", stage, version, unit), {
                "stage": stage, "version": version, "unit": unit, "fingerprint": fingerprint,
                "outputs": sorted(outputs), "stats": stats or {}, "committed_at": now_iso(),
            })
            self.remove(self._unit_rel("failures", stage, version, unit))
        return True

    def supersede(self, rel: str, old_fingerprint: str) -> None:
        """Keep an output that a new fingerprint replaces, under superseded/<old fp>/."""
        if self.exists(rel):
            self.replace(rel, f"superseded/{old_fingerprint}/{rel}")

    def record_failure(self, stage: str, version: str, unit: str, error: BaseException | str,
                       video_id: str | None = None) -> dict:
        rel = self._unit_rel("failures", stage, version, unit)
        previous = self.read_json(rel) or {}
        record = {
            "stage": stage, "version": version, "unit": unit, "video_id": video_id or unit,
            "error_type": type(error).__name__ if isinstance(error, BaseException) else "Error",
            "message": str(error).strip().splitlines()[0][:500] if str(error).strip() else repr(error),
            "attempts": int(previous.get("attempts", 0)) + 1, "failed_at": now_iso(),
        }
        try:
            self.write_json(rel, record)
        except OSError as e:  # a full or read-only disk must not stop the batch: the caller says so instead
            record["not_recorded"] = e.strerror or str(e)
        return record

    def failures(self, stage: str, version: str | None = None) -> list[dict]:
        versions = [version] if version else self.listdir(f"failures/{stage}")
        records = []
        for v in versions:
            for name in self.listdir(f"failures/{stage}/{v}"):
                rec = self.read_json(f"failures/{stage}/{v}/{name}")
                if rec:
                    records.append(rec)
        return records

    # ---- locks -----------------------------------------------------------------

    @contextmanager
    def lock(self, name: str, timeout_s: float = 300.0):
        """Exclusive lock for a short critical section (local roots).

        Object stores have no exclusive create through fsspec; there commits
        rely on single-object puts and deterministic outputs, so the last
        writer wins with identical content.
        """
        if not self.local:
            yield
            return
        path = self.abs(f"locks/{check_name(name, 'lock name')}.lock")
        deadline = time.monotonic() + timeout_s
        while (owner := locks.take(path, self.LOCK_STALE_S)) is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{path}: lock held by another process for over {timeout_s:.0f} s")
            time.sleep(0.02)
        try:
            yield
        finally:
            locks.drop(path, owner)

    def claim(self, stage: str, version: str, unit: str) -> bool:
        """Claim a unit for this process (local roots): False while another live process holds it. Claims
        of a dead process on this host are taken over; another host's, once untouched for CLAIM_STALE_S."""
        if not self.local:
            return True
        path = self.abs(self._unit_rel("claims", stage, version, unit))
        owner = locks.take(path, self.CLAIM_STALE_S)
        if owner is not None:
            self._claims[path] = owner
        return owner is not None

    def touch_claims(self) -> None:
        """Refresh every claim this Store holds, so that other hosts see a live run."""
        for path, owner in list(self._claims.items()):
            locks.touch(path, owner)

    def release(self, stage: str, version: str, unit: str) -> None:
        """Give back a claim this Store took; anything else at its path is left alone."""
        path = self.abs(self._unit_rel("claims", stage, version, unit))
        if path in self._claims:
            locks.drop(path, self._claims.pop(path))
