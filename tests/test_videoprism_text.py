"""VideoPrism video-text (`models.videoprism`: load_clip, embed_text, embed_video) and `recap index --encoder
videoprism` on a small real store: the tiny corpus, tiny VideoPrism features extracted from a tiny random
VideoPrismClipModel folder, and captions at the three levels from small untrained checkpoints."""

import io
import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
import zarr
from safetensors.torch import load_file, save_file

from models import videoprism
from models.encoders import build_encoder, weights_digest
from pipeline.config import ConfigError, load_config, record_settings, settle
from pipeline.dag import build_stages, index_stage
from pipeline.ingest import ingest_hcap
from pipeline.runner import run_stage
from pipeline.search import run_search
from stages.decode import WindowReader
from stages.features import _local_path
from stages.index import IndexStage
from store import LEVELS, Store, read_videos

from _checkpoints import tiny_checkpoint
from conftest import copy_store, run_cli

pytestmark = pytest.mark.usefixtures("one_torch_thread")
QUIET = io.StringIO()
CAPTIONS = ["#C C opens the fridge", "C sorted the cubes.", "#C C picks up the red cube"]


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    return videoprism.save_tiny_clip(tmp_path_factory.mktemp("videoprism") / "clip", seed=0)


@pytest.fixture(scope="module")
def clip(clip_folder):
    return videoprism.load_clip(clip_folder)


# ---- the model -----------------------------------------------------------------------------------------

def test_a_tiny_clip_folder_loads_back_with_its_own_tokenizer(tmp_path):
    tokenizer = videoprism.tiny_tokenizer()
    torch.manual_seed(5)
    model = videoprism.VideoPrismClipModel(videoprism.tiny_clip_config(len(tokenizer))).eval()
    model.save_pretrained(tmp_path / "clip")
    tokenizer.save_pretrained(tmp_path / "clip")
    loaded, loaded_tokenizer = videoprism.load_clip(tmp_path / "clip")
    assert type(loaded) is videoprism.VideoPrismClipModel and not loaded.training
    expected = model.state_dict()
    assert loaded.state_dict().keys() == expected.keys()
    assert all(torch.equal(t, expected[k]) for k, t in loaded.state_dict().items())
    ids = loaded_tokenizer(CAPTIONS)["input_ids"]
    assert ids == tokenizer(CAPTIONS)["input_ids"] and tokenizer.unk_token_id not in sum(ids, [])


def test_text_embeddings_are_transformers_own_normalised(clip):
    model, tokenizer = clip
    with torch.no_grad():
        ours = videoprism.embed_text(model, tokenizer, CAPTIONS)
        inputs = tokenizer(CAPTIONS, padding="max_length", max_length=64, truncation=True, return_tensors="pt")
        theirs = F.normalize(model.get_text_features(**inputs).pooler_output, dim=-1)
        alone = videoprism.embed_text(model, tokenizer, CAPTIONS[1:2])
    assert ours.shape == (3, 64) and ours.dtype == torch.float32
    torch.testing.assert_close(ours.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)
    torch.testing.assert_close(alone[0], ours[1], atol=1e-6, rtol=0)  # a caption's embedding is its own, in any batch
    assert (ours @ ours.T).fill_diagonal_(0).max() < 0.99  # different captions, different embeddings


def test_video_embedding_from_encoder_tokens_is_the_video_models_own(clip, clip_folder):
    model, _ = clip
    pixels = torch.rand(3, 4, 3, 36, 36, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs = F.normalize(model.get_video_features(pixel_values_videos=pixels).pooler_output.reshape(3, -1), dim=-1)
        tokens = model.video_model.vision_model(pixel_values_videos=pixels).last_hidden_state
        ours = videoprism.embed_video(model, tokens)
    assert ours.shape == (3, 64)
    torch.testing.assert_close(ours.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)

    # The features stage reads the clip folder's vision encoder: its stored tokens (float16) give the same.
    encoder = build_encoder("videoprism-tiny", checkpoint=clip_folder)
    assert encoder.weights_id == weights_digest(model.video_model.vision_model)
    frames = (pixels * 255).round().to(torch.uint8).permute(0, 1, 3, 4, 2)
    _, stored = encoder.encode(frames)
    with torch.no_grad():
        from_stored = videoprism.embed_video(model, stored[:, 1:].half().float())
        from_pixels = model.get_video_features(pixel_values_videos=frames.permute(0, 1, 4, 2, 3) / 255.0)
    torch.testing.assert_close(from_stored, F.normalize(from_pixels.pooler_output.reshape(3, -1), dim=-1), atol=1e-3,
                               rtol=0)


# ---- the index ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def indexed(tmp_path_factory, tiny_corpus, clip_folder):
    """The store, its settings in its recap.toml, features from the clip folder, every caption level run, and
    indexed with encoder = videoprism."""
    base = tmp_path_factory.mktemp("vpindex")
    store = Store(base / "store")
    ingest_hcap(store, str(tiny_corpus), str(tiny_corpus / "videos"))
    checkpoints = {level: str(tiny_checkpoint(base / level, level)) for level in LEVELS}  # 64-d, 17 tokens
    config = load_config(store=store.root, windows={"segment_s": 24.0},
                         features={"encoder": "videoprism-tiny", "batch_size": 8, "checkpoint": str(clip_folder)},
                         captions={f"{k}_checkpoint": v for k, v in checkpoints.items()} | {"method": "sample"},
                         index={"encoder": "videoprism"})
    record_settings(config, stream=QUIET)
    for stage in build_stages(config, store):
        assert run_stage(stage, store, executor="local", stream=QUIET).failed == 0
    assert run_stage(index_stage(config, store), store, executor="local", stream=QUIET).done == 6
    return store.root


def stage_of(store: Store, **index) -> IndexStage:
    return index_stage(settle(store.root, record=False, index=index), store)


def written(store: Store, version: str) -> dict:
    out = {}
    for vid in sorted(store.markers("index", version)):
        group = zarr.open_group(store.abs(f"index/{version}/{vid}"), mode="r")
        out[vid] = (pd.read_parquet(store.abs(f"index/{version}/{vid}.parquet")),
                    group["text"][:].astype(np.float32), group["video"][:].astype(np.float32))
    return out


def test_index_rows_hold_videoprism_text_and_window_embeddings(indexed, clip, clip_folder):
    store = Store(indexed)
    stage = stage_of(store)
    assert (stage.encoder, stage.checkpoint) == ("videoprism", str(clip_folder))
    assert stage.version() != IndexStage(stage.checkpoint, stage.features, stage.captions, encoder="lavila",
                                         size=stage.size).version()
    model, tokenizer = clip
    features = stage.features.feature_set(store)
    files = written(store, stage.version())
    assert list(files) == [v["video_id"] for v in read_videos(store)]
    videos = {v["video_id"]: v for v in read_videos(store)}
    for vid, (table, text, video) in files.items():
        assert set(table["level"]) == set(LEVELS) and text.shape == video.shape == (len(table), 64)
        for emb in (text, video):
            np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-3)
        with torch.no_grad():
            np.testing.assert_allclose(text, videoprism.embed_text(model, tokenizer, table["caption"].tolist()),
                                       atol=2e-3)
        clips = table[table["level"] == "clip"]
        windows = features.windows(vid)
        assert len(clips) == len(windows)
        # A clip row's video embedding: its window through the video model's own path, from decoded pixels.
        frames = WindowReader(_local_path(videos[vid]["uri"]), 36, 4, windows).read(0, len(windows))
        with torch.no_grad():
            pixels = torch.from_numpy(frames).permute(0, 1, 4, 2, 3) / 255.0
            own = F.normalize(model.get_video_features(pixel_values_videos=pixels).pooler_output.reshape(len(frames),
                                                                                                         -1), dim=-1)
        np.testing.assert_allclose(video[clips["row"].to_numpy()], own.numpy(), atol=1e-3)

    # The first stored token is the features' mean "CLS", which the video model does not pool (on the tiny
    # corpus pooling it too moves an embedding by less than float16 storage does: here it is far off the rest).
    stage.model, stage.tokenizer = clip
    tokens = np.random.default_rng(0).standard_normal((2, 17, 64)).astype(np.float32)
    tokens[:, 0] *= 10
    with torch.no_grad():
        expected = videoprism.embed_video(model, torch.from_numpy(tokens[:, 1:])).numpy()
    np.testing.assert_allclose(stage.embed_window_tokens(tokens), expected, atol=1e-6)


def test_search_finds_a_stored_caption_at_its_clip(indexed, clip):
    """The query is the stored clip caption that leads a flat ranking of every clip row (scored from the files
    as written, with our own query embedding) by the widest margin over clips of other captions; coarse to fine
    with the defaults keeps every video and segment of this store, so search must return it."""
    store = Store(indexed)
    stage = stage_of(store)
    model, tokenizer = clip
    rows = pd.concat(t.assign(text_emb=list(te), video_emb=list(ve)) for t, te, ve in
                     written(store, stage.version()).values()).query("level == 'clip'")
    text_emb, video_emb = np.stack(rows["text_emb"]), np.stack(rows["video_emb"])
    leads = {}
    for caption in rows["caption"].unique():
        with torch.no_grad():
            q = videoprism.embed_text(model, tokenizer, [caption])[0].numpy()
        score = (text_emb @ q + video_emb @ q) / 2
        own = rows["caption"].to_numpy() == caption
        leads[caption] = (score[own].max() - score[~own].max(), score[own].max())
    caption = max(leads, key=lambda c: leads[c][0])
    lead, best = leads[caption]
    assert lead > 2e-3
    [hit] = run_search(settle(store.root, record=False), store, caption, top=1)
    assert (hit["level"], hit["caption"]) == ("clip", caption)
    assert hit["score"] == pytest.approx(best, abs=2e-3)


# ---- refusals, each in one line ----------------------------------------------------------------------

def refusal(store: Store, **settings) -> str:
    """check()'s message for these settings over the store's."""
    with pytest.raises((ValueError, FileNotFoundError)) as e:
        stage = index_stage(settle(store.root, record=False, **settings), store)
        stage.check()
    message = str(e.value)
    assert "\n" not in message
    return message


def test_features_that_cannot_give_the_embeddings_are_refused(indexed, clip_folder, tmp_path):
    store = Store(indexed)
    index = {"checkpoint": str(clip_folder)}
    message = refusal(store, features={"encoder": "tsf-tiny", "checkpoint": ""}, index=index)
    assert "index.encoder = 'videoprism' pools VideoPrism tokens, but features.encoder = 'tsf-tiny'" in message
    assert "features.tokens = false" in refusal(store, features={"tokens": False})
    assert "random weights (no features.checkpoint)" in refusal(store, features={"checkpoint": ""}, index=index)

    other = videoprism.save_tiny_clip(tmp_path / "other", seed=1)  # another vision tower
    message = refusal(store, index={"checkpoint": str(other)})
    assert f"{other} (vision weights" in message and f"{clip_folder} (vision weights" in message
    assert "is not the encoder the features" in message

    # The same vision weights in another folder, with another text tower: the features fit.
    same = shutil.copytree(clip_folder, tmp_path / "same")
    weights = load_file(same / "model.safetensors")
    weights["text_model.embeddings.cls_emb"] += 0.1
    save_file(weights, same / "model.safetensors", metadata={"format": "pt"})
    stage = stage_of(store, checkpoint=str(same))
    stage.check()
    assert stage.version() != stage_of(store).version()

    # The lavila encoder over VideoPrism features points to this one.
    assert "index.encoder = 'videoprism' (--encoder)" in refusal(store, index={"encoder": "lavila",
                                                                               "checkpoint": str(clip_folder)})


def test_a_missing_or_malformed_folder_is_refused_naming_it(indexed, clip_folder, tmp_path):
    store = Store(indexed)

    def broken(name, change):
        folder = shutil.copytree(clip_folder, tmp_path / name)
        change(folder)
        return refusal(store, index={"checkpoint": str(folder)}), str(folder)

    message = refusal(store, index={"checkpoint": str(tmp_path / "absent")})
    assert message == f"{tmp_path / 'absent'}: no such folder (a VideoPrism model is a local save_pretrained folder)"
    message, folder = broken("no_config", lambda f: (f / "config.json").unlink())
    assert message == f"{folder}: not a VideoPrism model folder (no config.json)"
    message, folder = broken("bad_config", lambda f: (f / "config.json").write_text("{not json"))
    assert message.startswith(f"{folder}/config.json: not a valid config.json")
    message, folder = broken("no_tokenizer", lambda f: (f / "tokenizer.json").unlink())
    assert message == f"{folder}: no tokenizer (tokenizer.json or spiece.model) in the folder"
    message, folder = broken("no_weights", lambda f: (f / "model.safetensors").unlink())
    assert message.startswith(f"{folder}: cannot load VideoPrismClipModel (") and "model.safetensors" in message

    def drop_a_weight(folder):
        weights = load_file(folder / "model.safetensors")
        del weights["video_model.head.pooling_attention_query"]
        save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})

    message, folder = broken("missing_weight", drop_a_weight)
    assert message == (f"{folder}: 1 of VideoPrismClipModel's weights missing from the folder (e.g. "
                       "video_model.head.pooling_attention_query)")

    vision = tmp_path / "vision"
    build_encoder("videoprism-tiny", seed=3).model.save_pretrained(vision)
    message = refusal(store, index={"checkpoint": str(vision)})
    assert message.startswith(f"{vision}: model_type 'videoprism_vision_model', not a VideoPrismClipModel")

    other = tmp_path / "other_type"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match=f"^{other}: model_type 'bert' is not a VideoPrism vision"):
        videoprism.load(other)  # the features stage's reader of these folders


def test_the_index_command_refuses_in_one_line(indexed, tmp_path):
    store = copy_store(indexed, tmp_path / "s")
    vision = tmp_path / "vision"
    build_encoder("videoprism-tiny", seed=3).model.save_pretrained(vision)
    proc = run_cli("index", "--store", store.root, "--encoder", "videoprism", "--checkpoint", str(vision), "--local")
    assert proc.returncode == 2
    [line] = proc.stderr.strip().splitlines()
    assert str(vision) in line and "not a VideoPrismClipModel" in line
    before = store.listdir("index")
    proc = run_cli("index", "--store", store.root, "--encoder", "clip", "--local")
    assert proc.returncode == 2
    [line] = proc.stderr.strip().splitlines()
    assert "index.encoder = 'clip': not one of lavila, videoprism" in line
    assert store.listdir("index") == before  # nothing written for the refused ones
    with pytest.raises(ConfigError, match="index.encoder = 'clip'"):
        load_config(index={"encoder": "clip"})
