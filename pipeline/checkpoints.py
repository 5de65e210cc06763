"""`recap checkpoint`: convert official Video ReCap files to our format, and describe any checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

from models import checkpoint


def _overrides(config: str | None) -> dict | None:
    """Model settings an official file does not record (head counts), from a JSON file or inline JSON."""
    if not config:
        return None
    text = Path(config).read_text() if Path(config).is_file() else config
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{config}: model overrides must be JSON, e.g. '{{\"n_head\": 12}}' ({e})") from None


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
