"""Our checkpoint folder (safetensors + config + tokenizer), official conversion, inspect, tokenizers."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from models import checkpoint
from models.recap import RecapConfig, RecapModel
from models.tokenizer import Tokenizer

REF = Path(__file__).parent / "data" / "reference"
HEADS = {"n_head": 4, "qformer_num_heads": 4}
CAPTIONS = ["#C C picks up the knife", "#C C cuts the onion with the knife", "#C C washes the plate in the sink",
            "#O a woman opens the fridge", "#C C puts the onion on the plate"] * 4


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.train(CAPTIONS, vocab_size=300)


def tiny_model(level, tokenizer):
    torch.manual_seed(0)
    config = RecapConfig.preset(level, "tiny").with_overrides(
        {"vocab_size": tokenizer.vocab_size, "bos_token_id": tokenizer.eos_id, "eos_token_id": tokenizer.eos_id})
    model = RecapModel(config).eval()
    for p in model.parameters():
        if p.dim() == 0:
            torch.nn.init.uniform_(p, -1, 1)
    return model


def inputs(level):
    torch.manual_seed(1)
    if level == "clip":
        return (torch.randn(2, 4, 3, 32, 32),)
    return torch.randn(2, 10, 64), torch.ones(2, 10, dtype=torch.long), torch.randint(1, 250, (2, 7)), None


@pytest.mark.parametrize("level", ["clip", "segment"])
def test_save_load_round_trip_is_exact(tmp_path, tokenizer, level):
    model = tiny_model(level, tokenizer)
    checkpoint.save(model, tokenizer, tmp_path / "ckpt")
    assert {p.name for p in (tmp_path / "ckpt").iterdir()} >= {"model.safetensors", "config.json", "tokenizer.json"}
    loaded, loaded_tok = checkpoint.load(tmp_path / "ckpt")

    assert loaded.config == model.config
    before, after = model.state_dict(), loaded.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert before[k].dtype == after[k].dtype and torch.equal(before[k], after[k]), k
    assert loaded.text_decoder.lm_head.weight is loaded.text_decoder.transformer.wte.weight
    head = loaded.video_mapper.mapper.cls.predictions
    assert head.decoder.bias is head.bias
    assert len(load_file(tmp_path / "ckpt" / "model.safetensors")) == len(before) - len(model.tied_weights)

    caption = torch.tensor([[tokenizer.bos_id, 5, 6, tokenizer.eos_id], [tokenizer.bos_id, 7, tokenizer.eos_id, 0]])
    with torch.no_grad():
        assert torch.equal(model(*inputs(level)[:1], caption, *inputs(level)[1:]).logits,
                           loaded(*inputs(level)[:1], caption, *inputs(level)[1:]).logits)
    assert loaded_tok.encode(CAPTIONS[1]) == tokenizer.encode(CAPTIONS[1])
    assert (loaded_tok.bos_id, loaded_tok.eos_id, loaded_tok.pad_id) == (tokenizer.eos_id, tokenizer.eos_id, 0)


def test_load_names_a_missing_tensor(tmp_path, tokenizer):
    checkpoint.save(tiny_model("segment", tokenizer), None, tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    del state["text_mapper.mapper.bert.encoder.layer.1.output_query.dense.weight"]
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing keys: text_mapper\.mapper\.bert\.encoder\.layer\.1\.output_query\."):
        checkpoint.load(tmp_path)


def test_load_rejects_other_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        checkpoint.load(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="not a recap-checkpoint"):
        checkpoint.load(tmp_path)


def test_save_rejects_a_tokenizer_that_does_not_fit(tmp_path, tokenizer):
    model = RecapModel(RecapConfig.preset("video", "tiny"))  # vocab 100, eos 99
    with pytest.raises(ValueError, match="does not fit the model"):
        checkpoint.save(model, tokenizer, tmp_path)


def test_convert_official_then_load_matches_direct_official_load(tmp_path):
    official = REF / "tiny_video_checkpoint.pt"
    out = checkpoint.convert_official(official, tmp_path / "video", HEADS)
    model, tok = checkpoint.load(out)
    reference = RecapModel.from_official(official, HEADS)
    assert tok is None and model.config == reference.config
    io = torch.load(REF / "tiny_video_io.pt", weights_only=True)
    args = [io["inputs"][k] for k in ("video_features", "caption_tokens", "video_mask", "text_features", "text_mask")]
    with torch.no_grad():
        logits = model(*args).logits
        assert torch.equal(logits, reference(*args).logits)
    torch.testing.assert_close(logits, io["outputs"]["decoder_logits"], atol=2e-5, rtol=0)


def test_inspect_reads_both_formats(tmp_path):
    official = REF / "tiny_segment_checkpoint.pt"
    a = checkpoint.inspect(official, HEADS)
    b = checkpoint.inspect(checkpoint.convert_official(official, tmp_path / "seg", HEADS))
    assert (a["format"], b["format"]) == ("official", "recap-checkpoint/1")
    assert a["level"] == b["level"] == "segment" and a["epoch"] == 5
    assert (a["num_video_queries"], a["num_text_queries"]) == (b["num_video_queries"], b["num_text_queries"]) == (4, 6)
    assert a["parameters"] == b["parameters"]
    model = RecapModel.from_official(official, HEADS)
    assert a["parameters"]["total"] == sum(p.numel() for p in model.parameters())
    assert a["parameters"]["text_mapper"] == sum(p.numel() for p in model.text_mapper.parameters())
    assert a["num_keys"] == len(model.state_dict()) == 203  # tied names included, as in the file
    assert b["num_keys"] == 203 - 5 and b["config"] == a["config"]  # each tied tensor stored once


def test_inspect_clip_reports_the_vision_tower():
    info = checkpoint.inspect(REF / "tiny_clip_checkpoint.pt", {**HEADS, "vision": {"num_heads": 4}})
    assert info["level"] == "clip" and info["num_text_queries"] == 0 and "text_mapper" not in info["parameters"]
    assert info["parameters"]["vision_model"] > 0 and info["config"]["vision"]["embed_dim"] == 64


def test_trained_tokenizer_follows_the_official_id_convention(tokenizer):
    assert tokenizer.pad_id == 0 and tokenizer.hf.convert_ids_to_tokens(0) == "<pad>"
    assert tokenizer.bos_id == tokenizer.eos_id == tokenizer.vocab_size - 1 and tokenizer.vocab_size == 300
    ids = tokenizer.encode(CAPTIONS[0])
    assert 0 not in ids and tokenizer.decode(ids) == CAPTIONS[0]
    assert len(ids) < len(CAPTIONS[0])  # merges were learned

    tokens, mask = tokenizer.batch([CAPTIONS[1], "#C"], max_length=3, add_bos_eos=True)
    eos = tokenizer.eos_id
    assert tokens.tolist() == [[eos, *tokenizer.encode(CAPTIONS[1])[:3], eos], [eos, *tokenizer.encode("#C"), eos, 0]]
    assert mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    context, context_mask = tokenizer.batch(["#C", CAPTIONS[0]])
    assert context_mask.sum(1).tolist() == [len(tokenizer.encode("#C")), len(ids)] and context[0, -1] == 0


def test_tokenizer_save_load_and_gpt2_vocab_merges_folder(tmp_path, tokenizer):
    tokenizer.save(tmp_path / "ours")
    assert Tokenizer.load(tmp_path / "ours").encode(CAPTIONS[2]) == tokenizer.encode(CAPTIONS[2])
    # A GPT-2 tokenizer folder in its original layout: vocab.json + merges.txt, <|endoftext|> the last id.
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    tokenizer.hf.backend_tokenizer.model.save(str(gpt2))
    vocab = json.loads((gpt2 / "vocab.json").read_text())
    vocab["<|endoftext|>"] = len(vocab)
    (gpt2 / "vocab.json").write_text(json.dumps(vocab))
    loaded = Tokenizer.load(gpt2)
    assert loaded.eos_id == loaded.bos_id == vocab["<|endoftext|>"] == loaded.vocab_size - 1
    assert loaded.encode(CAPTIONS[2]) == tokenizer.encode(CAPTIONS[2])
    with pytest.raises(FileNotFoundError):
        Tokenizer.load(tmp_path / "missing")
