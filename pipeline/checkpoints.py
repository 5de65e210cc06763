"""`recap checkpoint`: convert official Video ReCap files to our format, and describe any checkpoint."""

from __future__ import annotations

import json
import sys
import tomllib
from pathlib import Path

from models import checkpoint


def _overrides(config: str | None) -> dict | None:
    """Model settings an official file does not record (head counts), from a TOML file like every other
    --config: `n_head = 12`, `qformer_num_heads = 12`, a `[vision]` table. JSON, a .json file or inline
    text, the format before, is still read, with a one-line notice."""
    if not config:
        return None
    path = Path(config)
    if path.suffix.lower() == ".json" or (not path.is_file() and config.lstrip().startswith("{")):
        text = path.read_text() if path.is_file() else config
        try:
            overrides = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{config}: not valid JSON ({e})") from None
        print(f"[checkpoint] deprecated: JSON model settings ({config}); write them as TOML, e.g. "
              f"{_toml_example(overrides)}", file=sys.stderr)
    else:
        if not path.is_file():
            raise FileNotFoundError(f"{config}: model settings file not found (a TOML file, e.g. n_head = 12)")
        try:
            overrides = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"{config}: not valid TOML ({e})") from None
    if not isinstance(overrides, dict):
        raise ValueError(f"{config}: model settings must be a table of names and values, e.g. n_head = 12")
    return overrides


def _toml_example(overrides) -> str:
    """`n_head = 4; qformer_num_heads = 4` for the notice: one line (a file holds one setting a line)."""
    flat = {k: v for k, v in overrides.items() if isinstance(v, (bool, int, float, str))} \
        if isinstance(overrides, dict) else {}
    return "; ".join(f"{k} = {json.dumps(v)}" for k, v in flat.items()) or "n_head = 12"


def convert(pth: str, out_dir: str, config: str | None = None, tokenizer: str | None = None) -> Path:
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out}: not empty; choose a new folder (nothing is overwritten)")
    return checkpoint.convert_official(pth, out, _overrides(config), tokenizer)


def describe(path: str, config: str | None = None) -> str:
    info = checkpoint.inspect(path, _overrides(config))
    params = info["parameters"]
    lines = [f"{info['path']}: {info['format']} checkpoint, level {info['level']}",
             f"  keys {info['num_keys']}, video queries {info['num_video_queries']}, "
             f"text queries {info['num_text_queries']}"]
    lines += [f"  {name:<14} {count:>13,} parameters" for name, count in params.items()]
    model = {k: v for k, v in info["config"].items() if k != "vision"}
    lines.append("  config " + json.dumps(model, sort_keys=True))
    return "\n".join(lines)
