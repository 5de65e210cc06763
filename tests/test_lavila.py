"""LaViLa dual encoder and CLIP tokenizer: official layout, strict loading, causal text tower, pooling."""

import argparse
import importlib.metadata
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from models.clip_tokenizer import ClipTokenizer
from models.encoders import LAVILA_MEAN, LAVILA_STD, build_encoder
from models.lavila import DualEncoder, LavilaConfig

REF = Path(__file__).parent / "data" / "reference"
MANIFEST = json.loads((REF / "lavila_clip_openai_timesformer_base.json").read_text())

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tok():
    return ClipTokenizer()


def write_official(path, state_dict):
    """A file in LaViLa's `main_pretrain.py` layout: DDP keys, the training state beside them."""
    args = argparse.Namespace(model="CLIP_OPENAI_TIMESFORMER_BASE", clip_length=4, project_embed_dim=256)
    ckpt = dict(epoch=3, state_dict={"module." + k: v for k, v in state_dict.items()},
                criterion={}, optimizer={}, scaler={}, best_acc1=0.0, args=args)
    torch.save(ckpt, path)
    return path


def tiny_state_dict():
    """Tiny weights: the visual tower from the official tiny ReCap fixture, the rest random."""
    torch.manual_seed(0)
    sd = DualEncoder(LavilaConfig.tiny()).state_dict()
    recap = torch.load(REF / "tiny_clip_checkpoint.pt", map_location="cpu", weights_only=True)["state_dict"]
    visual = {k.replace("module.vision_model.", "visual."): v for k, v in recap.items() if "vision_model" in k}
    assert visual.keys() == {k for k in sd if k.startswith("visual.")}
    sd |= visual
    sd["logit_scale"] = torch.tensor(2.5)
    return sd


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return write_official(tmp_path_factory.mktemp("lavila") / "tiny.pth", tiny_state_dict())


@pytest.fixture(scope="module")
def model(tiny_path):
    return DualEncoder.from_lavila(tiny_path, LavilaConfig.tiny())


# --- tokenizer ---------------------------------------------------------------------------------

def test_tokenizer_gives_known_clip_ids(tok):
    assert tok.vocab_size == 49408 and (tok.sot_id, tok.eot_id) == (49406, 49407)
    known = {  # ids OpenAI CLIP's tokenizer gives (also in CLIP ports' tests)
        "a diagram": [320, 22697],
        "a photo of a cat": [320, 1125, 539, 320, 2368],
        "A PHOTO of  a Cat!": [320, 1125, 539, 320, 2368, 256],
        "Hello, world!": [3306, 267, 1002, 256],
        "don't stop 42 times": [847, 713, 1691, 275, 273, 1661],
        "hello-world, 3.14 (test)": [3306, 268, 1002, 267, 274, 269, 272, 275, 263, 1628, 264],
        "café über naïve": [15304, 6522, 1516, 1097, 35689, 563],
        "\U0001F600 red car": [7334, 736, 1615],
        "  spaced   out  ": [10336, 538, 620],
        "": [],
    }
    for text, ids in known.items():
        assert tok.encode(text) == ids, text


def openai_reference(module):
    """A module of OpenAI's CLIP code as the `openai-clip` package ships it, loaded alone by path: the
    package's `__init__` imports torchvision, these two files do not. A test oracle only."""
    source = importlib.metadata.distribution("openai-clip").locate_file(f"clip/{module}.py")
    spec = importlib.util.spec_from_file_location(f"openai_clip_{module}", source)
    reference = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reference)
    return reference


def test_tokenizer_agrees_with_openai_reference_implementation(tok):
    openai = openai_reference("simple_tokenizer").SimpleTokenizer()
    texts = ["#C C picks up the knife from the countertop.", "#O man X opens the fridge",
             "Ångström's café—résumé", "tab\tand\nnewline", "&amp; &lt;b&gt; html", "mojibake: Ã©tÃ©",
             "日本の石灯籠", "x<|endoftext|>y", "it's we're they've I'm you'll he'd", "1234567890 3.5mm",
             "ﬁ ligature, ½ fraction", "...!?;:"]
    for text in texts:
        assert tok.encode(text) == openai.encode(text), text


def test_batch_pads_with_zeros_and_a_long_text_keeps_its_end_token(tok):
    ids = tok(["a diagram", "cat " * 100])
    assert ids.shape == (2, 77) and ids.dtype == torch.long
    assert ids[0, :4].tolist() == [49406, 320, 22697, 49407] and not ids[0, 4:].any()
    assert ids[1].tolist() == [49406] + [2368] * 75 + [49407]
    assert ids.argmax(-1).tolist() == [3, 76]
    assert tok(["a diagram"], context_length=5).tolist() == [[49406, 320, 22697, 49407, 0]]


def test_decode_round_trips(tok):
    for text in ["a photo of a cat", "c picks up the knife", "café über naïve", "日本の石灯籠"]:
        assert tok.decode(tok([text])[0].tolist()) == text  # stops at the end token: the zero padding is '!'
    for text in ["#C C picks up the knife", "Hello, world!", "don't stop 42 times", "x-ray (3.5mm)"]:
        spaced = tok.decode(tok.encode(text))
        assert spaced != text.lower() and tok.encode(spaced) == tok.encode(text)


# --- checkpoint layout and strict loading --------------------------------------------------------

def test_base_state_dict_matches_lavila_manifest():
    with torch.device("meta"):
        model = DualEncoder(LavilaConfig.base())
    ours = {"module." + k: list(v.shape) for k, v in model.state_dict().items()}
    assert ours == {key: shape for key, shape, _ in MANIFEST["params"]}
    assert not MANIFEST["buffers"] and not list(model.buffers())
    assert sum(p.numel() for p in model.parameters()) == MANIFEST["num_params_total"] == 177_662_977
    assert sum(p.numel() for p in model.visual.parameters()) == MANIFEST["num_params_visual"]


def test_loads_a_full_size_checkpoint_built_from_the_manifest(tmp_path):
    """Random weights under exactly the manifest's names and shapes; loading only (a full-size forward is
    slow here)."""
    g = torch.Generator().manual_seed(0)
    sd = {key.removeprefix("module."): torch.randn(shape, generator=g) for key, shape, _ in MANIFEST["params"]}
    model = DualEncoder.from_lavila(write_official(tmp_path / "full.pth", sd))
    assert model.config == LavilaConfig.base() and not model.training
    loaded = model.state_dict()
    for key in ["logit_scale", "token_embedding.weight", "transformer.resblocks.11.attn.in_proj_weight",
                "visual.blocks.11.timeattn.qkv.weight", "image_projection", "text_projection"]:
        assert torch.equal(loaded[key], sd[key]), key


@pytest.mark.parametrize("problem, pattern", [
    ("missing", r"1 missing keys: transformer\.resblocks\.1\.attn\.out_proj\.bias$"),
    ("unexpected", r"1 unexpected keys: transformer\.resblocks\.2\.ln_1\.weight$"),
    ("misshaped", r"1 shape mismatches: text_projection: checkpoint \(512, 256\) vs model \(32, 32\)$"),
])
def test_a_checkpoint_that_does_not_fit_is_named(tmp_path, problem, pattern):
    sd = tiny_state_dict()
    if problem == "missing":
        del sd["transformer.resblocks.1.attn.out_proj.bias"]
    elif problem == "unexpected":
        sd["transformer.resblocks.2.ln_1.weight"] = torch.ones(32)
    else:
        sd["text_projection"] = torch.zeros(512, 256)
    with pytest.raises(ValueError, match=pattern):
        DualEncoder.from_lavila(write_official(tmp_path / "bad.pth", sd), LavilaConfig.tiny())


def test_all_problems_are_named_together_and_a_file_without_state_dict_is_refused(tmp_path):
    sd = tiny_state_dict()
    del sd["ln_final.bias"]
    sd["extra"] = torch.zeros(1)
    sd["positional_embedding"] = torch.zeros(16, 32)
    with pytest.raises(ValueError) as err:
        DualEncoder.from_lavila(write_official(tmp_path / "bad.pth", sd), LavilaConfig.tiny())
    assert "1 missing keys: ln_final.bias" in str(err.value) and "1 unexpected keys: extra" in str(err.value)
    assert "positional_embedding: checkpoint (16, 32) vs model (77, 32)" in str(err.value)
    torch.save({"model": sd}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="no 'state_dict'"):
        DualEncoder.from_lavila(tmp_path / "other.pth", LavilaConfig.tiny())


def test_loaded_tensors_are_the_checkpoints(model):
    sd = tiny_state_dict()
    loaded = model.state_dict()
    assert loaded.keys() == sd.keys()
    assert all(torch.equal(loaded[k], sd[k]) for k in sd)


# --- text tower --------------------------------------------------------------------------------

def test_text_tower_matches_openai_clip_reference(model, tok):
    """OpenAI's CLIP text path (the code LaViLa's text tower copies) with our tiny weights: same
    embedding, tower, final norm, end-token pooling and projection."""
    c = LavilaConfig.tiny()
    reference = openai_reference("model").CLIP(
        embed_dim=c.embed_dim, image_resolution=32, vision_layers=1, vision_width=64, vision_patch_size=16,
        context_length=c.context_length, vocab_size=c.vocab_size, transformer_width=c.text_width,
        transformer_heads=c.text_heads, transformer_layers=c.text_layers).eval()
    text = {k: v for k, v in model.state_dict().items() if not k.startswith(("visual.", "image_projection"))}
    result = reference.load_state_dict(text, strict=False)
    assert not result.unexpected_keys and all(k.startswith("visual.") for k in result.missing_keys)
    ids = tok(["#C C picks up the knife", "#O a woman opens the fridge and looks inside", ""])
    with torch.no_grad():
        expected = F.normalize(reference.encode_text(ids), dim=-1)
        torch.testing.assert_close(model.encode_text(ids), expected, atol=2e-6, rtol=0)


def test_text_attention_is_causal(model, tok):
    ids = tok(["#C C picks up the knife from the table"])
    changed = ids.clone()
    changed[0, 5] = 1125  # 'photo'
    with torch.no_grad():
        a, b = model.text_features(ids), model.text_features(changed)
    torch.testing.assert_close(a[:, :5], b[:, :5], atol=1e-6, rtol=0)
    assert (a[:, 5:] - b[:, 5:]).abs().amax(-1).min() > 1e-3  # every later position sees the change


def test_text_is_pooled_at_the_end_token(model, tok):
    ids = tok(["#C C picks up the knife", "#C C picks up the knife from the table"])
    eot = ids.argmax(-1)
    with torch.no_grad():
        emb = model.encode_text(ids)
        features = model.text_features(ids)
        short = model.encode_text(ids[:, : int(eot.max()) + 1])  # less padding after the end token
    expected = F.normalize(features[torch.arange(2), eot] @ model.text_projection, dim=-1)
    torch.testing.assert_close(emb, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(short, emb, atol=1e-6, rtol=0)
    assert emb.shape == (2, 32) and torch.allclose(emb.norm(dim=-1), torch.ones(2))

    moved = ids[:1].clone()  # same tokens, end token one position earlier: a different embedding
    moved[0, eot[0] - 1], moved[0, eot[0]] = 49407, 0
    with torch.no_grad():
        assert (model.encode_text(moved) - emb[:1]).abs().max() > 1e-3


# --- video tower and similarity ----------------------------------------------------------------

def test_video_embedding_from_pixels_equals_embedding_of_stored_cls(model, tiny_path):
    io = torch.load(REF / "tiny_clip_io.pt", map_location="cpu", weights_only=True)
    pixels = io["inputs"]["video_features"].permute(0, 2, 1, 3, 4).contiguous()  # (B,C,T,H,W) -> (B,T,C,H,W)
    with torch.no_grad():
        emb = model.encode_video(pixels)
        cls = model.visual(pixels)
        torch.testing.assert_close(cls, io["outputs"]["vision_cls"], atol=5e-6, rtol=0)  # the official CLS
        assert torch.equal(model.embed_video_cls(cls), emb)
        torch.testing.assert_close(emb, F.normalize(cls @ model.image_projection, dim=-1), atol=1e-6, rtol=0)
    assert emb.shape == (2, 32) and torch.allclose(emb.norm(dim=-1), torch.ones(2))

    # What the features stage stores: the encoder loads the same file's visual tower, from uint8 frames.
    encoder = build_encoder("tsf-tiny", checkpoint=tiny_path)
    frames = torch.randint(0, 256, (2, 4, 32, 32, 3), dtype=torch.uint8)
    stored_cls, _ = encoder.encode(frames)
    mean, std = (torch.tensor(s).view(3, 1, 1) for s in (LAVILA_MEAN, LAVILA_STD))
    pixels = (frames.permute(0, 1, 4, 2, 3).float() - mean) / std
    with torch.no_grad():
        torch.testing.assert_close(model.embed_video_cls(stored_cls), model.encode_video(pixels), atol=1e-6, rtol=0)


def test_logits_are_scaled_by_exp_logit_scale(model, tok):
    io = torch.load(REF / "tiny_clip_io.pt", map_location="cpu", weights_only=True)
    pixels = io["inputs"]["video_features"].permute(0, 2, 1, 3, 4).contiguous()
    ids = tok(["#C C opens the fridge", "#C C cuts the onion", "#O a man walks"])
    with torch.no_grad():
        v, t = model.encode_video(pixels), model.encode_text(ids)
        logits = model(pixels, ids)
    assert model.logit_scale.item() == 2.5 and logits.shape == (2, 3)
    torch.testing.assert_close(logits, math.exp(2.5) * v @ t.T, atol=1e-5, rtol=0)
    assert logits.abs().max() <= math.exp(2.5) + 1e-4  # cosine similarities times the scale
    fresh = DualEncoder(LavilaConfig.tiny())
    assert fresh.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
