"""Fingerprints: short stable hashes of parameters, weights and inputs."""

from __future__ import annotations

import hashlib
import json


def fingerprint(*parts, length: int = 16) -> str:
    """Hash of JSON-serialisable parts (dict keys sorted), as hex."""
    blob = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:length]


def file_digest(fs, path: str) -> str:
    """Content id of a file: SHA-256 of every byte (1.2 GB/s here from the page cache; an hour of 1080p
    video, about 3 GB, costs a few seconds, far below decoding it). Cached per (path, size, mtime)."""
    info = fs.info(path)
    key = (fs.unstrip_protocol(path), info.get("size"), info.get("mtime") or info.get("LastModified"))
    if key not in _DIGESTS:
        h = hashlib.sha256()
        with fs.open(path, "rb") as f:
            while chunk := f.read(8 << 20):
                h.update(chunk)
        _DIGESTS[key] = h.hexdigest()[:16]
    return _DIGESTS[key]


_DIGESTS: dict = {}


def sampled_digest(fs, path: str, block: int = 1 << 20) -> str:
    """The content id registries held before full hashing: size + first and last MiB. Only to recognise
    an unchanged file of an old registry row without changing its id (and so its outputs)."""
    size = fs.size(path)
    h = hashlib.sha256(str(size).encode())
    with fs.open(path, "rb") as f:
        h.update(f.read(block))
        if size > block:
            f.seek(max(block, size - block))
            h.update(f.read(block))
    return h.hexdigest()[:16]


def path_digest(fs, path: str) -> str:
    """`file_digest` of a file; of a folder (a `save_pretrained` checkpoint), a hash of every file's name
    and digest."""
    if not fs.isdir(path):
        return file_digest(fs, path)
    root = path.rstrip("/")
    return fingerprint(sorted((p[len(root):], file_digest(fs, p)) for p in fs.find(root)))
