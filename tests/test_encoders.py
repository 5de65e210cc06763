"""The encoder registry: uint8 frames in, CLS and tokens out, for every tiny encoder."""

from pathlib import Path

import pytest
import torch

from models.encoders import build_encoder
from models.timesformer import TimeSformer, TimeSformerConfig

RECAP_CKPT = Path(__file__).parent / "data" / "reference" / "tiny_clip_checkpoint.pt"


def frames_for(enc, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (batch, enc.spec.num_frames, enc.spec.image_size, enc.spec.image_size, 3)
    return torch.randint(0, 256, shape, dtype=torch.uint8, generator=g)


@pytest.mark.parametrize("name", ["tsf-tiny", "videoprism-tiny"])
def test_encodes_to_declared_shapes_deterministically(name):
    enc = build_encoder(name, seed=0)
    frames = frames_for(enc)
    cls, tokens = enc.encode(frames)
    assert cls.shape == (2, enc.spec.dim) and tokens.shape == (2, enc.spec.num_tokens, enc.spec.dim)
    assert cls.dtype == tokens.dtype == torch.float32 and torch.isfinite(tokens).all()
    assert torch.equal(tokens[:, 0], cls)
    assert not torch.allclose(cls[0], cls[1])

    again = build_encoder(name, seed=0)
    assert again.weights_id == enc.weights_id and enc.weights_id.startswith("random-seed0-")
    assert torch.equal(again.encode(frames)[1], tokens)

    other = build_encoder(name, seed=1)
    assert other.weights_id != enc.weights_id
    assert not torch.allclose(other.encode(frames)[0], cls)


def test_tsf_normalises_with_lavila_statistics():
    enc = build_encoder("tsf-tiny", checkpoint=RECAP_CKPT)
    frames = frames_for(enc)
    x = frames.permute(0, 1, 4, 2, 3).float()
    x = (x - torch.tensor(enc.spec.mean).view(3, 1, 1)) / torch.tensor(enc.spec.std).view(3, 1, 1)
    model = TimeSformer.from_lavila(RECAP_CKPT, TimeSformerConfig.tiny())
    with torch.no_grad():
        expected = model.forward_tokens(x)
    _, tokens = enc.encode(frames)
    torch.testing.assert_close(tokens, expected)
    assert not enc.weights_id.startswith("random")


def test_checkpoint_weights_id_is_the_weights_hash(tmp_path):
    a = build_encoder("tsf-tiny", checkpoint=RECAP_CKPT)
    assert build_encoder("tsf-tiny", checkpoint=RECAP_CKPT).weights_id == a.weights_id
    sd = torch.load(RECAP_CKPT, map_location="cpu", weights_only=True)
    sd["state_dict"]["module.vision_model.norm.bias"] += 1e-3
    torch.save(sd, tmp_path / "changed.pt")
    assert build_encoder("tsf-tiny", checkpoint=tmp_path / "changed.pt").weights_id != a.weights_id


def test_videoprism_round_trips_through_a_local_folder(tmp_path):
    enc = build_encoder("videoprism-tiny", seed=3)
    enc.model.save_pretrained(tmp_path / "vp")
    loaded = build_encoder("videoprism-tiny", checkpoint=tmp_path / "vp")
    assert loaded.weights_id == enc.weights_id.removeprefix("random-seed3-")
    frames = frames_for(enc)
    cls, tokens = loaded.encode(frames)
    torch.testing.assert_close(tokens, enc.encode(frames)[1], atol=0, rtol=0)
    with torch.no_grad():  # VideoPrism reads [0, 1] pixels; its CLS is the token mean
        hidden = loaded.model(pixel_values_videos=frames.permute(0, 1, 4, 2, 3) / 255.0).last_hidden_state
    torch.testing.assert_close(cls, hidden.mean(1))
    torch.testing.assert_close(tokens[:, 1:], hidden)


@pytest.mark.parametrize(
    "name, frames, size, tokens, mean",
    [
        ("tsf-base", 4, 224, 1 + 4 * 196, (108.3272985, 116.7460125, 104.09373615)),
        ("videoprism", 16, 288, 1 + 16 * 256, (0.0, 0.0, 0.0)),  # [0, 1] pixels
    ],
)
def test_full_size_encoders_declare_their_windows(name, frames, size, tokens, mean):
    spec = build_encoder(name).spec  # random weights, not run: too slow for the suite
    assert (spec.num_frames, spec.image_size, spec.dim, spec.num_tokens, spec.mean) == (frames, size, 768, tokens, mean)


def test_bad_frames_and_names_are_refused(tmp_path):
    enc = build_encoder("tsf-tiny")
    with pytest.raises(ValueError, match=r"expected uint8 frames of shape \(B, 4, 32, 32, 3\)"):
        enc.encode(frames_for(enc).float())
    with pytest.raises(ValueError, match=r"expected uint8"):
        enc.encode(frames_for(enc).permute(0, 1, 4, 2, 3))
    with pytest.raises(ValueError, match="choose from tsf-base, tsf-tiny, videoprism, videoprism-tiny"):
        build_encoder("resnet")
    with pytest.raises(FileNotFoundError):
        build_encoder("videoprism-tiny", checkpoint=tmp_path / "absent")


def test_bf16_autocast_runs_on_cpu():
    enc = build_encoder("tsf-tiny", autocast=torch.bfloat16)
    fp32 = build_encoder("tsf-tiny")
    frames = frames_for(enc)
    cls, _ = enc.encode(frames)
    reference, _ = fp32.encode(frames)
    assert cls.dtype == torch.float32 and not torch.equal(cls, reference)
    torch.testing.assert_close(cls, reference, atol=0.05, rtol=0.05)
