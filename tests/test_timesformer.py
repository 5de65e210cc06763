"""TimeSformer against the official layout and the official tiny-clip outputs."""

import argparse
import json
from pathlib import Path

import pytest
import torch

from models.timesformer import TimeSformer, TimeSformerConfig

REF = Path(__file__).parent / "data" / "reference"
RECAP_CKPT = REF / "tiny_clip_checkpoint.pt"


@pytest.fixture(scope="module")
def io():
    io = torch.load(REF / "tiny_clip_io.pt", map_location="cpu", weights_only=True)
    x = io["inputs"]["video_features"].permute(0, 2, 1, 3, 4).contiguous()  # (B,C,T,H,W) -> (B,T,C,H,W)
    return x, io["outputs"]


def reproduces_fixture(model, io):
    x, out = io
    with torch.no_grad():
        tokens = model.forward_tokens(x)
        cls = model(x)
    # Bit-exact with explicit softmax attention; the fused SDPA kernel rounds differently (~1e-6).
    torch.testing.assert_close(tokens, out["vision_tokens"], atol=5e-6, rtol=0)
    torch.testing.assert_close(cls, out["vision_cls"], atol=5e-6, rtol=0)


def lavila_checkpoint(path, drop=None, replace=None):
    """A tiny checkpoint in LaViLa's `main_pretrain.py` layout, visual tower from the ReCap fixture."""
    recap = torch.load(RECAP_CKPT, map_location="cpu", weights_only=True)["state_dict"]
    sd = {k.replace("module.vision_model.", "module.visual."): v for k, v in recap.items() if "vision_model" in k}
    sd |= {
        "module.logit_scale": torch.tensor(3.0),
        "module.image_projection": torch.randn(64, 32),
        "module.token_embedding.weight": torch.randn(100, 32),
    }
    sd.pop(drop, None)
    sd |= replace or {}
    args = argparse.Namespace(model="CLIP_OPENAI_TIMESFORMER_BASE", clip_length=4, project_embed_dim=256)
    ckpt = dict(epoch=3, state_dict=sd, criterion={}, optimizer={}, scaler={}, best_acc1=0.0, args=args)
    torch.save(ckpt, path)
    return path


def test_reproduces_official_tiny_clip_outputs_from_recap_checkpoint(io):
    reproduces_fixture(TimeSformer.from_lavila(RECAP_CKPT, TimeSformerConfig.tiny()), io)


def test_loads_lavila_dual_encoder_checkpoint(tmp_path, io):
    model = TimeSformer.from_lavila(lavila_checkpoint(tmp_path / "lavila.pth"), TimeSformerConfig.tiny())
    reproduces_fixture(model, io)


def test_missing_key_is_named(tmp_path):
    path = lavila_checkpoint(tmp_path / "lavila.pth", drop="module.visual.blocks.1.timeattn.qkv.bias")
    with pytest.raises(ValueError, match=r"1 missing keys: blocks\.1\.timeattn\.qkv\.bias"):
        TimeSformer.from_lavila(path, TimeSformerConfig.tiny())


def test_wrong_shape_is_named(tmp_path):
    path = lavila_checkpoint(tmp_path / "lavila.pth", replace={"module.visual.pos_embed": torch.zeros(1, 197, 64)})
    with pytest.raises(ValueError, match=r"pos_embed: checkpoint \(1, 197, 64\) vs model \(1, 5, 64\)"):
        TimeSformer.from_lavila(path, TimeSformerConfig.tiny())


def test_tiny_checkpoint_does_not_fit_base_config():
    with pytest.raises(ValueError, match="shape mismatches"):
        TimeSformer.from_lavila(RECAP_CKPT, TimeSformerConfig.base())


def test_base_state_dict_matches_lavila_manifest():
    manifest = json.loads((REF / "lavila_clip_openai_timesformer_base.json").read_text())
    with torch.device("meta"):
        model = TimeSformer(TimeSformerConfig.base())
    ours = {"module.visual." + k: list(v.shape) for k, v in model.state_dict().items()}
    assert ours == {key: shape for key, shape, _ in manifest["visual_params"]}
    assert sum(p.numel() for p in model.parameters()) == manifest["num_params_visual"]


def test_fewer_frames_than_configured():
    model = TimeSformer(TimeSformerConfig.tiny()).eval()
    with torch.no_grad():
        tokens = model.forward_tokens(torch.randn(2, 2, 3, 32, 32))
    assert tokens.shape == (2, 1 + 2 * 4, 64)
