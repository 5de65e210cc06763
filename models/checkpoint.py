"""Our checkpoint format, and conversion of official Video ReCap `.pth` files to it.

A checkpoint is a folder:
    model.safetensors                    every tensor of the state dict once (shared ones under one name)
    config.json                          {"format": "recap-checkpoint/1", "config": RecapConfig fields}
    tokenizer.json, tokenizer_config.json   when saved with a tokenizer
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from models.official import args_dict, load_official
from models.recap import RecapConfig, RecapModel, official_state_dict
from models.tokenizer import Tokenizer

FORMAT = "recap-checkpoint/1"


def save(model: RecapModel, tokenizer: Tokenizer | None, path: str | Path) -> Path:
    path = Path(path)
    config = model.config
    if tokenizer is not None and (tokenizer.eos_id != config.eos_token_id or tokenizer.vocab_size > config.vocab_size):
        raise ValueError(f"tokenizer (eos {tokenizer.eos_id}, {tokenizer.vocab_size} tokens) does not fit the model "
                         f"(eos {config.eos_token_id}, vocab {config.vocab_size})")
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k not in model.tied_weights}
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps({"format": FORMAT, "config": config.to_dict()}, indent=2))
    if tokenizer is not None:
        tokenizer.save(path)
    return path


def _read_config(path: Path) -> RecapConfig:
    meta = json.loads((path / "config.json").read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: not a {FORMAT} checkpoint (format {meta.get('format')!r})")
    return RecapConfig.from_dict(meta["config"])


def load(path: str | Path, device: str | torch.device = "cpu") -> tuple[RecapModel, Tokenizer | None]:
    """Model (eval mode) and tokenizer (None when saved without one) of a checkpoint folder."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: no config.json; not a checkpoint folder")
    config = _read_config(path)
    model = RecapModel.from_state_dict(config, load_file(path / "model.safetensors", device=str(device)), path)
    tokenizer = Tokenizer.load(path) if (path / "tokenizer.json").exists() else None
    return model, tokenizer


def convert_official(
    pth: str | Path, out_dir: str | Path, config_overrides: dict | None = None, tokenizer: str | Path | None = None
) -> Path:
    """Official `.pth` -> checkpoint folder; `tokenizer` is a local GPT-2 tokenizer folder to bundle."""
    model = RecapModel.from_official(pth, config_overrides)
    return save(model, Tokenizer.load(tokenizer) if tokenizer is not None else None, out_dir)


def inspect(path: str | Path, config_overrides: dict | None = None) -> dict:
    """Summary of a checkpoint folder or an official `.pth`: level, parameter and query counts, config.
    `config_overrides` completes what an official file does not record (head counts)."""
    path = Path(path)
    if path.is_dir():
        config = _read_config(path)
        with safe_open(path / "model.safetensors", "pt") as f:
            num_keys = len(f.keys())
        info = {"format": FORMAT, "tokenizer": (path / "tokenizer.json").exists()}
    else:
        ckpt = load_official(path)
        sd = official_state_dict(ckpt)
        config, num_keys = RecapConfig.from_official_state_dict(sd, args_dict(ckpt), config_overrides), len(sd)
        info = {"format": "official", "epoch": ckpt.get("epoch")}
    with torch.device("meta"):
        model = RecapModel(config)
    parameters = {name: sum(p.numel() for p in child.parameters()) for name, child in model.named_children()}
    parameters["queries"] = sum(p.numel() for n, p in model.named_parameters(recurse=False))
    parameters["total"] = sum(p.numel() for p in model.parameters())
    return {
        **info,
        "path": str(path),
        "level": config.level,
        "num_keys": num_keys,
        "num_video_queries": config.num_video_queries,
        "num_text_queries": config.num_text_queries,
        "parameters": parameters,
        "config": config.to_dict(),
    }
