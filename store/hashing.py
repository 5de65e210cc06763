"""Fingerprints: short stable hashes of parameters, weights and inputs."""

from __future__ import annotations

import hashlib
import json


def fingerprint(*parts, length: int = 16) -> str:
    """Hash of JSON-serialisable parts (dict keys sorted), as hex."""
    blob = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:length]


def file_digest(fs, path: str, block: int = 1 << 20) -> str:
    """Cheap content id of a (possibly huge) file: size + first and last MiB."""
    size = fs.size(path)
    h = hashlib.sha256(str(size).encode())
    with fs.open(path, "rb") as f:
        h.update(f.read(block))
        if size > block:
            f.seek(max(block, size - block))
            h.update(f.read(block))
    return h.hexdigest()[:16]
