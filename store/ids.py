"""Names that become paths inside the store: sanitised so none can escape it."""

from __future__ import annotations

import hashlib
import re

_SAFE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._=@-]{0,127}")
_UNSAFE_CHARS = re.compile(r"[^A-Za-z0-9._=-]+")


def is_safe_name(name: str) -> bool:
    return bool(_SAFE.fullmatch(name)) and ".." not in name


def check_name(name: str, what: str = "name") -> str:
    if not isinstance(name, str) or not is_safe_name(name):
        raise ValueError(f"unsafe {what} {name!r}: use letters, digits and . _ = @ - (no '..', no leading dot)")
    return name


def video_id_for(stem: str, source: str | None = None) -> str:
    """A store-safe video id from a file stem.

    Safe stems are kept as they are (Ego4D ids are UUIDs). Anything else is
    reduced to safe characters and given a short hash of the original, so two
    different unsafe names never collapse to one id.
    """
    if is_safe_name(stem):
        return stem
    cleaned = re.sub(r"\.{2,}", ".", _UNSAFE_CHARS.sub("_", stem)).strip("._-")[:80] or "video"
    digest = hashlib.sha256((source or stem).encode()).hexdigest()[:10]
    return f"{cleaned}-{digest}"
