"""The ReCap model against the official layout and tiny fixtures the official code made (tests/data/reference)."""

import json
from pathlib import Path

import pytest
import torch

from models.generation import generate_official
from models.official import load_official
from models.recap import RecapConfig, RecapModel

REF = Path(__file__).parent / "data" / "reference"
LEVELS = ["clip", "segment", "video"]
HEADS = {"n_head": 4, "qformer_num_heads": 4}  # official files do not record head counts
OVERRIDES = {"clip": {**HEADS, "vision": {"num_heads": 4}}, "segment": HEADS, "video": HEADS}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(autouse=True)
def strict_fp32():
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def load_tiny(level):
    return RecapModel.from_official(REF / f"tiny_{level}_checkpoint.pt", OVERRIDES[level])


def fixture_io(level):
    io = torch.load(REF / f"tiny_{level}_io.pt", map_location="cpu", weights_only=True)
    inputs = dict(io["inputs"])
    if level == "clip":  # fixture layout (B, C, T, H, W); ours is the encoder's (B, T, C, H, W)
        inputs["video_features"] = inputs["video_features"].permute(0, 2, 1, 3, 4)
    return inputs, io["outputs"], io["tokenizer"]


def close(actual, expected, atol):
    torch.testing.assert_close(actual, expected, atol=atol, rtol=0)


@pytest.mark.parametrize("level", LEVELS)
def test_reproduces_official_fixture(level):
    model = load_tiny(level)
    inp, out, tok = fixture_io(level)
    assert model.config.level == level and model.config.bos_token_id == tok["bos_token_id"] == 99
    video, video_mask = inp["video_features"], inp.get("video_mask")
    text, text_mask = inp.get("text_features"), inp.get("text_mask")
    B = video.size(0)
    with torch.no_grad():
        context = model.encode_video(video)
        if level == "clip":
            close(context, out["vision_tokens"], 5e-6)
        close(model.video_mapper(model.video_queries.expand(B, -1, -1), context, video_mask),
              out["video_query_embeds"], 5e-6)
        if text is not None:
            embeds = model.embed_text(text)
            close(embeds, out["text_token_embeds"], 5e-6)
            close(model.text_mapper(model.text_queries.expand(B, -1, -1), embeds, text_mask),
                  out["text_query_embeds"], 5e-6)
        queries = model.map_features(video, video_mask, text, text_mask)
        close(queries, out["queries"], 5e-6)
        result = model(video, inp["caption_tokens"], video_mask, text, text_mask)
        close(result.logits, out["decoder_logits"], 2e-5)
        close(result.loss, out["loss"], 1e-5)

    greedy = generate_official(model.text_decoder, queries, bos_id=99, eos_id=99, max_text_length=11)
    assert torch.equal(greedy.ids, out["generated_ids"])
    close(greedy.step_logits, out["generate_step_logits"], 2e-5)
    close(greedy.ppl, out["generated_ppl"], 1e-5)
    alone = generate_official(model.text_decoder, queries[:1], bos_id=99, eos_id=99, max_text_length=11)
    assert torch.equal(alone.ids, out["generated_ids_sample0_alone"])  # clip: [[99]], break before append
    close(alone.ppl, out["generated_ppl_sample0_alone"], 1e-5)


@pytest.mark.parametrize("level", ["segment", "video"])
def test_masked_features_and_text_have_no_effect(level):
    model = load_tiny(level)
    inp, out, _ = fixture_io(level)
    video, vmask, text, tmask = (inp[k] for k in ("video_features", "video_mask", "text_features", "text_mask"))
    noisy = torch.where(vmask[..., None].bool(), video, 1000 * torch.randn_like(video))
    other_text = torch.where(tmask.bool(), text, torch.full_like(text, 98))
    with torch.no_grad():
        changed = model.map_features(noisy, vmask, other_text, tmask)
        assert torch.equal(changed, model.map_features(video, vmask, text, tmask))


@pytest.mark.parametrize("level", LEVELS)
def test_full_size_presets_have_the_official_layout(level):
    manifest = json.loads((REF / f"videorecap_{level}.json").read_text())
    with torch.device("meta"):
        model = RecapModel(RecapConfig.preset(level))
    entries = manifest["params"] + manifest["buffers"]
    expected = {k.removeprefix("module."): (shape, dtype) for k, shape, dtype in entries}
    found = {k: (list(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in model.state_dict().items()}
    assert found == expected
    assert sum(p.numel() for p in model.parameters()) == manifest["num_params_unique"]
    tied = {frozenset(k.removeprefix("module.") for k in group) for group in manifest["tied_parameters"]}
    assert {frozenset(pair) for pair in model.tied_weights.items()} == tied


def write_official(tmp_path, level, edit=None, args=None):
    """The tiny official checkpoint, its state dict (with `module.`) changed by `edit`."""
    ckpt = load_official(REF / f"tiny_{level}_checkpoint.pt")
    if edit:
        edit(ckpt["state_dict"])
    ckpt["args"].update(args or {})
    path = tmp_path / f"{level}.pth"
    torch.save(ckpt, path)
    return path


def test_strict_load_names_missing_unexpected_and_misshaped_keys(tmp_path):
    key = "module.text_decoder.transformer.h.1.crossattention.c_attn.weight"

    def drop(sd):
        del sd[key]

    with pytest.raises(ValueError, match=r"missing keys: text_decoder\.transformer\.h\.1\.crossattention\.c_attn\.w"):
        RecapModel.from_official(write_official(tmp_path, "segment", drop), HEADS)

    def extra(sd):
        sd["module.text_decoder.transformer.h.0.extra_gate"] = torch.zeros(())

    with pytest.raises(ValueError, match=r"unexpected keys: text_decoder\.transformer\.h\.0\.extra_gate"):
        RecapModel.from_official(write_official(tmp_path, "segment", extra), HEADS)

    def reshape(sd):
        sd["module.text_mapper.mapper.bert.encoder.layer.0.output_query.dense.bias"] = torch.zeros(65)

    with pytest.raises(ValueError, match=r"layer\.0\.output_query\.dense\.bias: checkpoint \(65,\) vs model \(64,\)"):
        RecapModel.from_official(write_official(tmp_path, "segment", reshape), HEADS)

    def not_recap(sd):
        del sd["module.video_queries"]

    with pytest.raises(ValueError, match="not a Video ReCap checkpoint, missing key 'video_queries'"):
        RecapModel.from_official(write_official(tmp_path, "segment", not_recap), HEADS)


def test_official_load_needs_head_counts_for_non_base_widths():
    with pytest.raises(ValueError, match="n_head=12 does not divide the width 64"):
        RecapModel.from_official(REF / "tiny_segment_checkpoint.pt")


def test_official_load_infers_structure_from_shapes():
    config = load_tiny("video").config
    assert (config.level, config.video_feature_type) == ("video", "cls")
    assert (config.num_video_queries, config.num_text_queries) == (5, 7)
    assert (config.n_layer, config.qformer_num_layers, config.n_positions, config.vocab_size) == (2, 2, 64, 100)
    assert (config.num_video_feat, config.max_gen_tokens) == (12, 120)  # from the args
    clip = load_tiny("clip").config
    assert clip.vision.img_size == 32 and clip.vision.depth == 2 and clip.num_text_queries == 0


def test_recap_u_one_model_runs_all_three_levels(tmp_path):
    """ReCap-U has the segment/video layout (video + text mappers). No official ReCap-U file or fixture
    exists; the tiny segment weights stand in, with ReCap-U's `unify_type` arg set. One model then
    captions clip inputs (clip tokens, no text), segment inputs (CLS features + clip captions) and
    video inputs (more CLS features + segment descriptions); on segment inputs it is the segment model."""
    model = RecapModel.from_official(write_official(tmp_path, "segment", args={"unify_type": "all"}), HEADS)
    assert model.config.level == "unified"
    clip_inp, clip_out, _ = fixture_io("clip")
    seg_inp, seg_out, _ = fixture_io("segment")
    vid_inp, _, _ = fixture_io("video")
    with torch.no_grad():
        clip_q = model.map_features(clip_out["vision_tokens"])  # (B, 17, 64) stored clip tokens
        names = ("video_features", "video_mask", "text_features", "text_mask")
        seg_q = model.map_features(*(seg_inp[k] for k in names))
        vid_q = model.map_features(*(vid_inp[k] for k in names))
    assert clip_q.shape == (2, 4, 64) and seg_q.shape == vid_q.shape == (2, 10, 64)
    close(seg_q, seg_out["queries"], 5e-6)
    for queries in (clip_q, seg_q, vid_q):
        ids = generate_official(model.text_decoder, queries, bos_id=99, eos_id=99, max_text_length=11).ids
        assert ids.shape[0] == 2 and ids[0, 0] == 99
    seg_ids = generate_official(model.text_decoder, seg_q, bos_id=99, eos_id=99, max_text_length=11).ids
    assert torch.equal(seg_ids, seg_out["generated_ids"])


def test_checkpoint_without_ddp_prefix_loads(tmp_path):
    def unprefix(sd):
        for k in list(sd):
            sd[k.removeprefix("module.")] = sd.pop(k)

    model = RecapModel.from_official(write_official(tmp_path, "video", unprefix), HEADS)
    reference = load_tiny("video")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values()))


def test_loaded_model_keeps_ties_and_official_buffers():
    model = load_tiny("segment")
    decoder, head = model.text_decoder, model.text_mapper.mapper.cls.predictions
    assert decoder.lm_head.weight is decoder.transformer.wte.weight
    assert head.decoder.weight is model.text_mapper.mapper.bert.embeddings.word_embeddings.weight
    assert head.decoder.bias is head.bias
    block = decoder.transformer.h[0]
    assert block.attn.bias.dtype == torch.uint8 and block.attn.bias.shape == (1, 1, 64, 64)
    assert block.crossattention.masked_bias.item() == -1e4


def test_cached_decoding_matches_full_forward():
    torch.manual_seed(0)
    model = RecapModel(RecapConfig.preset("video", "tiny")).eval()
    for p in model.parameters():
        if p.dim() == 0:
            torch.nn.init.uniform_(p, -1, 1)  # open the gates so the queries matter
    queries, ids = torch.randn(3, 12, 64), torch.randint(0, 100, (3, 9))
    decoder = model.text_decoder
    with torch.no_grad():
        full = decoder(ids, queries)[0]
        cross_kv, past, steps = decoder.cross_kv(queries), None, []
        for chunk in (ids[:, :4], ids[:, 4:5], ids[:, 5:]):
            logits, past = decoder(chunk, cross_kv=cross_kv, past_key_values=past)
            steps.append(logits)
    close(torch.cat(steps, dim=1), full, 1e-5)


def test_training_step_reaches_every_trainable_part():
    torch.manual_seed(0)
    model = RecapModel(RecapConfig.preset("segment", "tiny")).train()
    for p in model.parameters():
        if p.dim() == 0:
            torch.nn.init.constant_(p, 0.5)
    video, mask = torch.randn(2, 10, 64), torch.ones(2, 10, dtype=torch.long)
    text, caption = torch.randint(1, 99, (2, 7)), torch.tensor([[99, 5, 6, 7, 99, 0], [99, 8, 99, 0, 0, 0]])
    loss = model(video, caption, mask, text, torch.ones_like(text)).loss
    loss.backward()
    assert torch.isfinite(loss)
    for name in ("video_queries", "text_queries", "text_decoder.transformer.h.1.alpha_cattn",
                 "video_mapper.mapper.bert.encoder.layer.0.crossattention.self.key.weight"):
        assert model.get_parameter(name).grad.abs().sum() > 0, name


@pytest.mark.parametrize("text_queries", [7, 0])  # with the text mapper, and the tokens alone
def test_decoder_reads_the_text_tokens_but_not_their_pads(text_queries):
    torch.manual_seed(0)
    config = RecapConfig.preset("video", "tiny").with_overrides(
        {"text_tokens_to_decoder": True, "text_context_norm": True, "num_text_queries": text_queries, "gate_init": 1.0})
    model = RecapModel(config).eval()
    video, vmask = torch.randn(2, 12, 64), torch.ones(2, 12, dtype=torch.long)
    text, caption = torch.randint(1, 98, (2, 9)), torch.randint(1, 98, (2, 6))
    tmask = torch.tensor([[1] * 5 + [0] * 4, [1] * 7 + [0] * 2])
    with torch.no_grad():
        logits = model(video, caption, vmask, text, tmask).logits
        other_pads = torch.where(tmask.bool(), text, torch.full_like(text, 98))
        assert torch.equal(model(video, caption, vmask, other_pads, tmask).logits, logits)
        other_token = text.clone()
        other_token[:, 2] = 98
        assert not torch.allclose(model(video, caption, vmask, other_token, tmask).logits, logits)
        context, mask = model.decoder_context(video, vmask, text, tmask)
    assert context.shape == (2, 5 + text_queries + 9, 64) and torch.equal(mask[:, 5 + text_queries:], tmask)


def test_text_tokens_to_decoder_leaves_the_official_layout():
    """Off unless asked (official files load and compute as before: the fixture tests); on, it adds no tensor
    where the decoder reads the queries' width already, else one projection."""
    assert not load_tiny("video").config.text_tokens_to_decoder

    def keys(**overrides):
        with torch.device("meta"):
            return set(RecapModel(RecapConfig.preset("video", "tiny").with_overrides(overrides)).state_dict())

    assert keys(text_tokens_to_decoder=True) == keys()
    narrow = dict(qformer_hidden_size=32, qformer_intermediate_size=64)
    assert keys(text_tokens_to_decoder=True, **narrow) - keys(**narrow) == {"text_token_proj.weight",
                                                                          "text_token_proj.bias"}
    model = RecapModel.from_official(REF / "tiny_video_checkpoint.pt", {**HEADS, "text_tokens_to_decoder": True})
    inp, out, _ = fixture_io("video")
    names = ("video_features", "video_mask", "text_features", "text_mask")
    with torch.no_grad():
        context, mask = model.decoder_context(*(inp[k] for k in names))
    close(context[:, :out["queries"].size(1)], out["queries"], 5e-6)  # the official queries, then the tokens
    assert torch.equal(mask[:, out["queries"].size(1):], inp["text_mask"])


def test_each_text_token_carries_the_index_of_its_sentence():
    """With `text_sentence_rows`, a token's context row holds the embedding of how many sentence ends come before it
    (the end itself belongs to its sentence): a '.' less moves every later token to the sentence before."""
    torch.manual_seed(0)
    END = 97
    model = RecapModel(RecapConfig.preset("video", "tiny").with_overrides(
        {"text_sentence_rows": 3, "text_sentence_end_id": END, "text_context_norm": True})).eval()
    text = torch.tensor([[5, 6, END, 7, 8, END, 9, END, 10, END, 11]])
    with torch.no_grad():
        expected = model.embed_text(text) + model.text_sentence(torch.tensor([[0, 0, 0, 1, 1, 1, 2, 2, 2, 2, 2]]))
        assert torch.equal(model.text_context(text), model.text_context_norm(expected))  # rows past the last: clamped
        merged = torch.tensor([[5, 6, 4, 7, 8, END, 9, END, 10, END, 11]])  # the first '.' gone: one sentence less
        changed = (model.text_context(merged) - model.text_context(text)).abs().sum(-1)[0] > 0
    # the same words at the same places from row 3 on: rows 3-7 change by their sentence only (8-10 stay clamped)
    assert changed.tolist() == [False, False] + [True] * 6 + [False] * 3
    with torch.device("meta"):
        keys = set(RecapModel(RecapConfig.preset("video", "tiny")).state_dict())
    assert not any(k.startswith("text_sentence") for k in keys)  # off by default: official files load as before
    with pytest.raises(ValueError, match="text_sentence_end_id"):
        RecapModel(RecapConfig.preset("video", "tiny").with_overrides({"text_sentence_rows": 3}))


def test_feature_norm_standardises_the_features_per_channel_and_is_saved_with_the_model(tmp_path):
    from models import checkpoint

    assert not load_tiny("segment").config.video_feature_norm  # official files: off, and no extra tensors
    config = RecapConfig.preset("segment", "tiny").with_overrides({"video_feature_norm": True})
    torch.manual_seed(0)
    model = RecapModel(config).eval()
    assert set(model.state_dict()) - set(RecapModel(RecapConfig.preset("segment", "tiny")).state_dict()) == {
        "video_feature_mean", "video_feature_std"}
    scale, shift = torch.linspace(0.1, 5.0, 64), torch.linspace(-3.0, 3.0, 64)
    model.set_feature_stats(torch.randn(4000, 64) * scale + shift)
    video = torch.randn(4, 500, 64) * scale + shift
    standardised = model.encode_video(video)
    assert standardised.std(dim=(0, 1)).sub(1).abs().max() < 0.1 and standardised.mean(dim=(0, 1)).abs().max() < 0.1
    assert torch.allclose(standardised * model.video_feature_std + model.video_feature_mean, video, atol=1e-5)

    checkpoint.save(model, None, tmp_path / "ckpt")
    loaded, _ = checkpoint.load(tmp_path / "ckpt")
    assert torch.equal(loaded.video_feature_std, model.video_feature_std)
    assert torch.equal(loaded.encode_video(video), standardised)


def test_feature_whitening_decorrelates_the_features_along_their_principal_axes(tmp_path):
    from models import checkpoint

    config = RecapConfig.preset("segment", "tiny").with_overrides({"video_feature_norm": True,
                                                                   "video_feature_whiten": True})
    torch.manual_seed(0)
    model = RecapModel(config).eval()
    # a few dominant directions that mix every channel, as a contrastively trained encoder's features have
    mixing = torch.logspace(0.5, -1, 64)[:, None] * torch.linalg.qr(torch.randn(64, 64))[0]  # axes of std 3.2 to 0.1
    model.set_feature_stats(torch.randn(8000, 64) @ mixing + 2.0)
    video = torch.randn(4, 2000, 64) @ mixing + 2.0
    whitened = model.encode_video(video).reshape(-1, 64)
    assert torch.cov(whitened.T).sub(torch.eye(64)).abs().max() < 0.1  # per channel alone leaves correlations
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as training runs on CUDA: the whitening stays in float32
        assert torch.equal(model.encode_video(video).reshape(-1, 64), whitened)
    assert torch.allclose(model.encode_video(video.half()).reshape(-1, 64), whitened, atol=0.05)  # stored float16
    checkpoint.save(model, None, tmp_path / "ckpt")
    assert torch.equal(checkpoint.load(tmp_path / "ckpt")[0].video_feature_basis, model.video_feature_basis)
    # LayerNorm'd features have a null axis: it is stretched no more than 100-fold beyond the widest one's scale
    rows = torch.randn(8000, 64) @ mixing
    model.set_feature_stats(rows - rows.mean(1, keepdim=True))
    assert model.video_feature_std.min() == pytest.approx(1e-2 * model.video_feature_std.max().item())
    with pytest.raises(ValueError, match="video_feature_whiten needs video_feature_norm"):
        RecapConfig.preset("segment", "tiny").with_overrides({"video_feature_whiten": True})
