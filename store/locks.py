"""Lock files on a local or NFS root: the store's commit locks and unit claims.

A lock file names its owner: host, pid, the process's start (boot id and start tick, where /proc has them), the
time it was taken and a nonce. It is written whole under a hidden name and hard-linked into place, so nobody ever
reads it half-written. Its owner is gone when it is a process of this host that no longer runs (a reused pid has
another start), or, for another host's lock (or where /proc is missing), when it is older than the caller's
`stale_s`. A live owner on this host is never broken, however long it holds.

A gone owner's lock is replaced, not removed: under `<path>.break` (one breaker at a time), if the file still
holds what was judged stale, our own lock is renamed over it. The path is never empty meanwhile, so no other
process can slip in between.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import time
import uuid

BREAK_STALE_S = 10.0  # a `.break` file this old is a dead breaker's: replacing a lock takes microseconds
UNREADABLE_STALE_S = 5.0  # a lock file that does not parse (not written by this module) and was not touched since
NO_LINKS = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS}  # filesystems without hard links


def take(path: str, stale_s: float) -> bool:
    """Create the lock file `path` with this process as its owner; replace it first if its owner is gone."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    head, tail = os.path.split(path)
    tmp = os.path.join(head, f".tmp-{tail}-{uuid.uuid4().hex[:12]}")
    try:
        with open(tmp, "wb") as f:
            f.write(_owner())
        if _link(tmp, path):
            return True
        stale = _stale_content(path, stale_s)
        return stale is not None and _replace(path, stale, tmp)
    finally:
        _remove(tmp)


def drop(path: str) -> None:
    """Remove the lock file `path` if this process owns it (a lock judged stale and taken over is not ours)."""
    info = _read(path)
    if isinstance(info, dict) and info.get("host") == socket.gethostname() and info.get("pid") == os.getpid():
        _remove(path)


def _owner() -> bytes:
    return json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "start": _process_start(os.getpid()),
                       "t": time.time(), "nonce": uuid.uuid4().hex}).encode()


def _link(tmp: str, path: str) -> bool:
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        # NFS v2/v3 may answer a retried LINK that had succeeded with EEXIST: then the temporary has two names.
        return os.stat(tmp).st_nlink == 2
    except OSError as e:
        if e.errno not in NO_LINKS:
            raise
    try:  # no hard links here: an exclusive create, then the content (readers give it UNREADABLE_STALE_S)
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    with open(tmp, "rb") as f:
        os.write(fd, f.read())
    os.close(fd)
    return True


def _stale_content(path: str, stale_s: float) -> bytes | None:
    """The lock file's content if its owner is gone, else None."""
    try:
        with open(path, "rb") as f:
            content = f.read()
        info = json.loads(content)
        if not isinstance(info, dict):
            raise ValueError
    except FileNotFoundError:
        return None
    except ValueError:  # not a lock this module wrote whole
        return content if _age(path) > UNREADABLE_STALE_S else None
    if info.get("host") == socket.gethostname():
        if not _runs(info.get("pid"), info.get("start")):
            return content
        if info.get("start") is not None:
            return None
    return content if time.time() - float(info.get("t", 0)) > stale_s else None  # no way to tell a reused pid


def _replace(path: str, stale: bytes, tmp: str) -> bool:
    guard = f"{path}.break"
    try:
        fd = os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        if _age(guard) > BREAK_STALE_S:
            _remove(guard)
        return False  # another process is breaking it; the caller tries again or counts it as held
    os.close(fd)
    try:
        with open(path, "rb") as f:
            if f.read() != stale:
                return False
        os.rename(tmp, path)
        return True
    except FileNotFoundError:
        return False
    finally:
        _remove(guard)


def _runs(pid, start) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    except (TypeError, ValueError):
        return False
    return start is None or _process_start(int(pid)) in (start, None)


def _process_start(pid: int) -> str | None:
    """Boot id and start tick of a process (Linux), so that a pid reused by another process is told apart."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        with open(f"/proc/{pid}/stat") as f:
            tick = f.read().rsplit(")", 1)[1].split()[19]  # field 22, after the command name in brackets
        return f"{boot}:{tick}"
    except (OSError, IndexError):
        return None


def _read(path: str):
    try:
        with open(path, "rb") as f:
            return json.loads(f.read())
    except (FileNotFoundError, ValueError):
        return None


def _age(path: str) -> float:
    try:
        return time.time() - os.path.getmtime(path)
    except FileNotFoundError:
        return 0.0


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
