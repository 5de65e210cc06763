"""Lock files on a local or NFS root: the store's commit locks and unit claims.

A lock file names its owner: host, the boot and the pid namespace it runs in (where /proc has them), pid, the
process's start tick, and a nonce. It is written whole under a hidden name and hard-linked into place, so
nobody ever reads it half-written. Its owner is gone when it ran in an earlier boot of this host, or in this
pid namespace and that process no longer runs (a reused pid has another start tick; a zombie counts as gone).
Otherwise (another host, another container) it is gone when the file is older than the caller's `stale_s`; ages
are differences of file times, so that one clock, the file server's, decides. A live owner in this pid namespace
is never broken, however long it holds.

A gone owner's lock is replaced, not removed: under `<path>.break` (one breaker at a time), if the file still
holds what was judged stale, our own lock is renamed over it. The path is never empty meanwhile, so no other
process can slip in between. A process removes only the lock it took (`drop` compares the bytes).
"""

from __future__ import annotations

import errno
import functools
import json
import os
import socket
import uuid

BREAK_STALE_S = 10.0  # a `.break` file this old is a dead breaker's: replacing a lock takes microseconds
UNREADABLE_STALE_S = 5.0  # a lock file that does not parse (half-written without hard links, or not ours)
NO_LINKS = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS}  # filesystems without hard links


def take(path: str, stale_s: float) -> bytes | None:
    """Create the lock file `path` with this process as its owner, replacing it first if its owner is gone.
    Returns what was written (hand it to `drop`), or None while another owner holds it."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    head, tail = os.path.split(path)
    tmp = os.path.join(head, f".tmp-{tail}-{uuid.uuid4().hex[:12]}")
    owner = _owner()
    try:
        with open(tmp, "wb") as f:
            f.write(owner)
        if _link(tmp, path, owner):
            return owner
        now = os.stat(tmp).st_mtime  # the file server's clock
        stale = _stale_content(path, stale_s, now)
        return owner if stale is not None and _replace(path, stale, tmp, now) else None
    finally:
        _remove(tmp)


def drop(path: str, owner: bytes) -> None:
    """Remove the lock file `path` if it still holds `owner` (a lock judged stale and taken over is not ours)."""
    if _holds(path, owner):
        _remove(path)


def touch(path: str, owner: bytes) -> None:
    """Refresh the file time of a lock that still holds `owner`: a heartbeat other hosts can see."""
    try:
        if _holds(path, owner):
            os.utime(path)
    except FileNotFoundError:
        pass


def _holds(path: str, owner: bytes) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read() == owner
    except FileNotFoundError:
        return False


def _owner() -> bytes:
    boot, pidns = _process_space()
    pid = os.getpid()
    return json.dumps({"host": socket.gethostname(), "boot": boot, "pidns": pidns, "pid": pid, "start": _start(pid),
                       "nonce": uuid.uuid4().hex}).encode()


def _link(tmp: str, path: str, owner: bytes) -> bool:
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
    os.write(fd, owner)
    os.close(fd)
    return True


def _stale_content(path: str, stale_s: float, now: float) -> bytes | None:
    """The lock file's content if its owner is gone, else None. `now`: a file time just written."""
    try:
        with open(path, "rb") as f:
            content = f.read()
        age = now - os.stat(path).st_mtime
    except FileNotFoundError:
        return None
    try:
        info = json.loads(content)
        if not isinstance(info, dict):
            raise ValueError
    except ValueError:
        return content if age > UNREADABLE_STALE_S else None
    if info.get("host") != socket.gethostname():
        return content if age > stale_s else None
    boot, pidns = _process_space()
    if boot and info.get("boot") not in (None, boot):
        return content  # an earlier boot of this host: every process of it is gone
    if info.get("pidns") in (None, pidns):  # (None: written before the field existed, or without /proc)
        if not _runs(info.get("pid"), info.get("start")):
            return content
        if info.get("start") is not None:
            return None  # alive, and not a reused pid
    return content if age > stale_s else None


def _replace(path: str, stale: bytes, tmp: str, now: float) -> bool:
    guard = f"{path}.break"
    try:
        fd = os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        try:
            if now - os.stat(guard).st_mtime > BREAK_STALE_S:
                _remove(guard)
        except FileNotFoundError:
            pass
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
    stat = _stat(int(pid))
    if stat is None:
        return True  # no /proc: the pid is all there is to go by
    state, tick = stat
    return state not in "ZX" and (start is None or tick == start)


@functools.cache
def _process_space() -> tuple[str | None, int | None]:
    """Boot id and pid namespace: where a pid names one process (Linux; None, None elsewhere)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip(), os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None, None


def _start(pid: int) -> str | None:
    stat = _stat(pid)
    return stat[1] if stat else None


def _stat(pid: int) -> tuple[str, str] | None:
    """State and start tick of a process (fields 3 and 22 of /proc/<pid>/stat, after the command in brackets)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return fields[0], fields[19]
    except (OSError, IndexError):
        return None


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
