"""Reading official (.pth) checkpoints without trusting pickle.

Official Video ReCap and LaViLa files are dicts holding a state dict, optimizer
and scaler states and an `argparse.Namespace` of training arguments. They load
with `weights_only=True` once the few non-tensor types they hold are allowed.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

# Every type an official file may hold beyond tensors and builtins.
ALLOWED_GLOBALS = [argparse.Namespace]


def load_official(path: str | Path) -> dict:
    """Load an official checkpoint file safely; return its top-level dict."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint file not found")
    try:
        with torch.serialization.safe_globals(ALLOWED_GLOBALS):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle refusal, truncated file, not a torch file
        raise ValueError(f"{path}: not a loadable checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a dict at top level, found {type(obj).__name__}")
    return obj


def args_dict(ckpt: dict) -> dict:
    """The checkpoint's training arguments as a plain dict (Namespace or dict in the file)."""
    args = ckpt.get("args") or {}
    return dict(vars(args)) if isinstance(args, argparse.Namespace) else dict(args)


def strip_prefix(state_dict: dict, prefix: str) -> dict:
    """Keys that start with `prefix`, with it removed (e.g. 'module.' from DDP)."""
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


def check_keys(path, expected: dict, found: dict) -> None:
    """Fail naming missing and unexpected keys and mismatched shapes."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    shapes = sorted(
        f"{k}: checkpoint {tuple(found[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in set(expected) & set(found)
        if tuple(found[k].shape) != tuple(expected[k].shape)
    )
    if missing or unexpected or shapes:
        def head(items):
            return ", ".join(items[:8]) + (f" ... (+{len(items) - 8} more)" if len(items) > 8 else "")
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys: {head(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys: {head(unexpected)}")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatches: {head(shapes)}")
        raise ValueError(f"{path}: checkpoint does not match the model; " + "; ".join(parts))
