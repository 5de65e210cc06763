"""`recap train` on a real store built from the tiny synthetic corpus: the loss falls, a killed run resumes
to the weights of an uninterrupted one, re-runs skip, lower-level inputs, init from another level,
ReCap-U, the official freezing policy, and Ray Train with two workers."""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from models import checkpoint
from models.recap import RecapConfig, RecapModel
from pipeline.config import load_config
from pipeline.dag import build_stages
from pipeline.ingest import ingest_hcap
from pipeline.runner import run_stage
from pipeline.train import train
from stages.evaluate import evaluate_level
from pipeline.dag import features_stage
from models.training import load_init, query_rows, set_trainable
from stages.train import LENGTH_GROUP_BATCHES, epoch_batches, param_groups
from store import CAPTION_SCHEMA, Store, captions_rel, read_groundtruth

from conftest import REPO, copy_store, kill_at_first_epoch

TRAIN = {"size": "tiny", "freeze": "none", "epochs": 3, "batch_size": 8, "lr": 1e-3}
REFERENCE = REPO / "tests" / "data" / "reference"


# Tiny models train fastest on one thread per process; on a busy 2-core machine more threads wait on each other.
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def recap(*args: str, **popen) -> subprocess.CompletedProcess | subprocess.Popen:
    """`recap ...` in a fresh interpreter, as a user would run it: run to success, or with `popen` arguments
    started and returned."""
    command = [sys.executable, "-c", "from cli.main import main; main()", *args]
    if popen:
        return subprocess.Popen(command, cwd=REPO, env=ONE_THREAD, **popen)
    proc = subprocess.run(command, cwd=REPO, env=ONE_THREAD, capture_output=True, text=True)
    if proc.returncode != 0:
        raise AssertionError(f"recap {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def featured(tmp_path_factory, tiny_corpus) -> Path:
    """The tiny corpus ingested, with tsf-tiny features (tokens included)."""
    root = tmp_path_factory.mktemp("train") / "featured"
    store = Store(root)
    ingest_hcap(store, str(tiny_corpus), str(tiny_corpus / "videos"))
    cfg = load_config(features={"encoder": "tsf-tiny"})
    assert run_stage(features_stage(cfg), store, executor="local").failed == 0
    return root


@pytest.fixture
def store(featured, tmp_path) -> Store:
    return copy_store(featured, tmp_path / "store")


def run(store: Store, level="clip", init_from=None, lower_versions=(), encoder="tsf-tiny", **settings):
    cfg = load_config(store=store.root, features={"encoder": encoder}, train={**TRAIN, **settings})
    log = io.StringIO()
    result = train(cfg, store, level, init_from=init_from, lower_versions=lower_versions, stream=log)
    return result, log.getvalue()


def config_file(path: Path, store: Store, **settings) -> Path:
    lines = [f"{k} = {json.dumps(v)}" for k, v in {**TRAIN, **settings}.items()]
    path.write_text(f'store = "{store.root}"\n[features]\nencoder = "tsf-tiny"\n[train]\n' + "\n".join(lines) + "\n")
    return path


def history(store: Store, result):
    return pq.read_table(store.abs(f"{result.checkpoint.rsplit('/', 1)[0]}/losses.parquet")).to_pandas()


def test_clip_loss_falls_and_the_same_command_again_does_nothing(store):
    result, log = run(store, epochs=4)
    losses = history(store, result)
    per_epoch = losses[losses["split"] == "train"].groupby("epoch")["loss"].mean()
    val = losses[losses["split"] == "val"].set_index("epoch")["loss"]
    assert per_epoch[4] < per_epoch[1] - 0.5 and val[4] < val[1] - 0.3, losses
    assert len(losses[losses["split"] == "train"]) == 4 * 9  # 70 clips / batch 8, every step recorded

    run_dir = result.checkpoint.rsplit("/", 1)[0]
    assert store.listdir(run_dir) == ["epoch-0004", "losses.parquet", "losses.png", "tokenizer"]
    assert store.read_json("checkpoints/clip/latest.json") == {"path": result.checkpoint}
    model, tokenizer = checkpoint.load(store.abs(result.checkpoint))
    assert (model.config.level, model.config.num_video_feat, model.config.video_feature_width) == ("clip", 17, 64)
    # one vocabulary for the whole curriculum: words only video summaries use are whole tokens too
    summary_words = set(" ".join(read_groundtruth(store, "video", "train")["text"].to_pylist()).split())
    clip_words = set(" ".join(read_groundtruth(store, "clip")["text"].to_pylist()).split())
    assert all(len(tokenizer.encode(" " + w)) == 1 for w in summary_words - clip_words if w.isalpha() and w.islower())

    weights = Path(store.abs(result.checkpoint)) / "model.safetensors"
    written = weights.stat().st_mtime_ns
    again, log = run(store, epochs=4)
    assert (again.trained, again.checkpoint) == (False, result.checkpoint) and "nothing to do" in log
    assert weights.stat().st_mtime_ns == written


def test_killed_run_resumes_after_its_last_epoch_and_ends_as_an_uninterrupted_one(featured, tmp_path):
    epochs = 6  # an epoch takes well under a second here: enough of them to kill the run before its end
    reference = copy_store(featured, tmp_path / "reference")
    uninterrupted, _ = run(reference, epochs=epochs)

    killed = copy_store(featured, tmp_path / "killed")
    toml = config_file(tmp_path / "train.toml", killed, epochs=epochs)
    run_dir = Path(killed.abs(uninterrupted.checkpoint)).parent  # same settings and data: same run name
    with open(tmp_path / "first.log", "w") as log:
        committed = kill_at_first_epoch(recap("train", "--config", str(toml), stderr=log), run_dir, tmp_path / "first.log", 120)
    assert len(committed) == 1 and committed[0] < f"epoch-{epochs:04d}"

    resumed = recap("train", "--config", str(toml))
    done = int(committed[0][-4:])
    assert f"resuming after epoch {done}" in resumed.stderr
    trained_now = [f"epoch {e}/{epochs} | train loss" in resumed.stderr for e in range(1, epochs + 1)]
    assert trained_now == [e > done for e in range(1, epochs + 1)]
    a = load_file(Path(reference.abs(uninterrupted.checkpoint)) / "model.safetensors")
    b = load_file(run_dir / f"epoch-{epochs:04d}" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert history(reference, uninterrupted).equals(history(killed, uninterrupted))


def write_predicted_clip_captions(store: Store, version: str, videos) -> None:
    gt = read_groundtruth(store, "clip").to_pylist()
    for video in videos:
        rows = [{**{k: r[k] for k in ("video_id", "level", "start_s", "end_s")}, "text": r["text"].upper(),
                 "score": 0.0, "fingerprint": "test"} for r in gt if r["video_id"] == video]
        store.write_table(captions_rel("clip", version, video), pa.Table.from_pylist(rows, schema=CAPTION_SCHEMA))


def test_segment_level_reads_predicted_clip_captions_or_ground_truth(store):
    with pytest.raises(FileNotFoundError, match=r"no predicted clip captions .*run `recap captions`"):
        run(store, level="segment", lower="predicted", epochs=1)
    non_recursive, _ = run(store, level="segment", lower="predicted", recursive=False, epochs=1)
    model, _ = checkpoint.load(store.abs(non_recursive.checkpoint))
    assert model.config.num_text_queries == 0 and not hasattr(model, "text_mapper")

    segments = read_groundtruth(store, "segment")
    videos = sorted(set(segments.filter(pc.is_in(segments["split"], pa.array(["train", "val"])))["video_id"]
                        .to_pylist()))
    write_predicted_clip_captions(store, "clip-test", videos[1:])
    with pytest.raises(FileNotFoundError, match=rf"1 of {len(videos)} videos have no clip captions "
                                                rf"\(e.g. {videos[0]}\): run `recap captions`"):
        run(store, level="segment", lower="predicted", epochs=1)
    write_predicted_clip_captions(store, "clip-test", videos[:1])
    predicted, log = run(store, level="segment", lower="predicted", epochs=1)
    assert "predicted clip captions captions/clip/clip-test" in log

    write_predicted_clip_captions(store, "clip-other", videos)
    with pytest.raises(ValueError, match="several clip caption versions .*--lower-version"):
        run(store, level="segment", lower="predicted", epochs=1)
    chosen, _ = run(store, level="segment", lower="predicted", lower_versions=["clip-test"], epochs=1)
    assert not chosen.trained and chosen.run == predicted.run

    groundtruth, _ = run(store, level="segment", lower="groundtruth", epochs=1)
    assert groundtruth.trained and groundtruth.run != predicted.run
    model, _ = checkpoint.load(store.abs(groundtruth.checkpoint))
    assert model.config.level == "segment" and model.config.num_text_queries == 6


def test_query_rows_are_the_official_subsampling():
    assert query_rows(256, 32).tolist() == np.arange(0, 256, 256 / 33).astype(int)[1:].tolist()
    assert query_rows(8, 4).tolist() == [1, 3, 4, 6]
    assert len(query_rows(32, 256)) == 256  # the video level resumes 256 queries from the segment level's 32


def test_init_from_a_clip_checkpoint_subsamples_queries_and_adds_a_text_mapper(store):
    clip, _ = run(store, epochs=1)
    clip_model, _ = checkpoint.load(store.abs(clip.checkpoint))
    segment_model = RecapModel(clip_model.config.with_overrides({"level": "segment", "num_video_queries": 4,
                                                                  "num_text_queries": 6, "num_video_feat": 10}))
    notes = load_init(segment_model, store.abs(clip.checkpoint))
    assert notes == ["video_queries: 8 -> 4 rows", "text_mapper: freshly initialised",
                     "text_queries: freshly initialised"]
    assert torch.equal(segment_model.video_queries, clip_model.video_queries[[1, 3, 4, 6]])
    wte = "text_decoder.transformer.wte.weight"
    assert torch.equal(segment_model.state_dict()[wte], clip_model.state_dict()[wte])

    # end to end, with the official freezing: what it freezes stays the clip model's
    segment, log = run(store, level="segment", lower="groundtruth", freeze="official", epochs=1,
                       init_from=store.abs(clip.checkpoint))
    assert "video_queries: 8 -> 4 rows; text_mapper: freshly initialised" in log
    trained, _ = checkpoint.load(store.abs(segment.checkpoint))
    frozen = ("text_decoder.transformer.wte.weight", "text_decoder.transformer.h.0.attn.c_attn.weight",
              "video_mapper.mapper.bert.encoder.layer.0.attention.self.query.weight")
    clip_state, segment_state = clip_model.state_dict(), trained.state_dict()
    assert all(torch.equal(clip_state[k], segment_state[k]) for k in frozen)
    assert not torch.equal(clip_state["text_decoder.transformer.h.0.crossattention.q_attn.weight"],
                           segment_state["text_decoder.transformer.h.0.crossattention.q_attn.weight"])


def test_the_loss_plot_is_drawn_after_the_first_and_the_last_epoch_and_not_after_each(store, monkeypatch):
    import stages.train

    drawn = []
    plot = stages.train.plot_curves
    monkeypatch.setattr(stages.train, "plot_curves", lambda table, title: drawn.append(len(table)) or plot(table, title))
    monkeypatch.setattr(stages.train, "PLOT_EVERY_S", 1e9)
    result, _ = run(store, epochs=4)
    assert drawn == [9 + 1, 4 * (9 + 1)]  # the history after epochs 1 and 4: 9 steps and a val loss each
    assert len(history(store, result)) == 4 * (9 + 1)  # the table is written after every epoch


def test_unified_alternates_levels_and_clip_batches_pass_no_text(store, monkeypatch):
    seen = set()
    forward = RecapModel.forward

    def spy(self, video, caption_tokens, video_mask=None, text_ids=None, text_mask=None):
        seen.add((video.shape[1], text_ids is not None))
        return forward(self, video, caption_tokens, video_mask, text_ids, text_mask)

    monkeypatch.setattr(RecapModel, "forward", spy)
    result, _ = run(store, level="unified", lower="groundtruth", epochs=1)
    steps = history(store, result).query("split == 'train'")["level"].tolist()
    assert steps[:4] == ["clip", "segment", "video", "clip"] and steps.count("video") == 1  # 4 summaries, batch 8
    assert seen == {(17, False), (10, True), (12, True)}  # clip tokens; segment / video CLS rows + lower text
    model, _ = checkpoint.load(store.abs(result.checkpoint))
    assert model.config.level == "unified" and hasattr(model, "text_mapper")


def test_epoch_batches_cover_each_level_and_are_a_function_of_seed_and_epoch():
    batches = epoch_batches({"clip": 5, "segment": 2, "video": 1}, batch_size=2, seed=0, epoch=1, world=1)
    assert [level for level, _ in batches] == ["clip", "segment", "video", "clip", "clip"]
    assert sorted(i for level, idx in batches if level == "clip" for i in idx) == [0, 1, 2, 3, 4]
    assert batches == epoch_batches({"clip": 5, "segment": 2, "video": 1}, 2, seed=0, epoch=1, world=1)
    assert batches != epoch_batches({"clip": 5, "segment": 2, "video": 1}, 2, seed=0, epoch=2, world=1)
    # two workers: a batch of one example cannot be split, so it is dropped
    two = epoch_batches({"clip": 5, "segment": 2, "video": 1}, batch_size=2, seed=0, epoch=1, world=2)
    assert [level for level, _ in two] == ["clip", "segment", "clip"]


def test_batches_grouped_by_length_hold_examples_of_like_length():
    """As many batches as without grouping, every example once an epoch, a function of seed and epoch; inside each
    run of LENGTH_GROUP_BATCHES batches a batch's lengths do not overlap another's, so padding shrinks."""
    n, size = 1000, 16
    lengths = {"video": np.random.default_rng(0).integers(10, 120, n).tolist()}
    plain = epoch_batches({"video": n}, size, seed=0, epoch=1, world=1)
    grouped = epoch_batches({"video": n}, size, seed=0, epoch=1, world=1, lengths=lengths)
    assert len(grouped) == len(plain) and sorted(i for _, b in grouped for i in b) == list(range(n))
    assert grouped == epoch_batches({"video": n}, size, seed=0, epoch=1, world=1, lengths=lengths)
    assert grouped != epoch_batches({"video": n}, size, seed=0, epoch=2, world=1, lengths=lengths)
    run = LENGTH_GROUP_BATCHES * size
    span = lambda b: (min(lengths["video"][i] for i in b), max(lengths["video"][i] for i in b))
    for first in range(0, n, run):
        spans = sorted(span(b) for _, b in grouped if set(b) <= {int(i) for i in np.random.default_rng(
            [0, 1, 0]).permutation(n)[first:first + run]})
        assert len(spans) == len(range(first, min(n, first + run), size))
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))
    padded = lambda batches: sum(len(b) * span(b)[1] for _, b in batches)
    assert padded(grouped) < 0.8 * padded(plain)
    first_run = [span(b)[0] for _, b in grouped][:LENGTH_GROUP_BATCHES]
    assert first_run != sorted(first_run)  # the batches shuffled, not shortest first


def test_group_by_length_reaches_the_trainer_and_names_a_run_of_its_own(store, monkeypatch):
    """On, the trainer batches by its targets' lengths; off, a run keeps the name it had before the setting existed
    (the setting is not among the fingerprinted train settings)."""
    import pipeline.train
    import stages.train

    given, named = [], []
    batches, fingerprint = stages.train.epoch_batches, pipeline.train.fingerprint
    monkeypatch.setattr(stages.train, "epoch_batches", lambda *a: given.append(a[5]) or batches(*a))
    monkeypatch.setattr(pipeline.train, "fingerprint", lambda *a, **k: named.append(a[1]) or fingerprint(*a, **k))
    plain, _ = run(store, epochs=1)
    assert set(given) == {None} and "group_by_length" not in named[-1]
    grouped, _ = run(store, epochs=1, group_by_length=True)
    assert grouped.trained and grouped.run != plain.run and named[-1]["group_by_length"] is True
    targets = read_groundtruth(store, "clip", "train")["text"].to_pylist()
    assert given[-1] == {"clip": [len(t) for t in targets]}


@pytest.mark.parametrize("level", ["clip", "segment", "video"])
def test_official_freezing_trains_the_reference_trainable_set(level):
    manifest = json.loads((REFERENCE / f"videorecap_{level}.json").read_text())
    with torch.device("meta"):
        model = RecapModel(RecapConfig.preset(level))
    set_trainable(model, "official")
    assert ({n for n, p in model.named_parameters() if p.requires_grad}
            == {k.removeprefix("module.") for k in manifest["trainable"]})

    set_trainable(model, "none")
    decayed, not_decayed = param_groups(model, weight_decay=0.01)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(p.ndim == 2 and not names[id(p)].endswith("_queries") for p in decayed["params"])
    assert {"video_queries", "text_decoder.transformer.h.0.alpha_cattn", "text_decoder.transformer.h.0.ln_1.weight",
            "text_decoder.transformer.h.0.attn.c_attn.bias"} <= {names[id(p)] for p in not_decayed["params"]}
    assert not any(n.startswith("vision_model.") for n, p in model.named_parameters() if p.requires_grad)


def test_missing_inputs_fail_naming_what_to_run(store):
    with pytest.raises(ValueError, match="--init-from a checkpoint, or train everything with --freeze none"):
        run(store, freeze="official")
    with pytest.raises(FileNotFoundError, match=r"features tsf-base-\w+ are missing for 5 of 5 videos .*"
                                                r"run `recap features`"):
        run(store, encoder="tsf-base")


@pytest.mark.slow
def test_two_ray_train_workers(store, tmp_path):
    toml = config_file(tmp_path / "train.toml", store, epochs=1)
    proc = recap("train", "--config", str(toml), "--workers", "2")
    assert "on 2 worker(s)" in proc.stderr and proc.stderr.count("epoch 1/1 | train loss") == 1
    assert "State API may be temporarily unavailable" not in proc.stderr  # Ray Train's cleaner, every second
    latest = store.read_json("checkpoints/clip/latest.json")["path"]
    model, _ = checkpoint.load(store.abs(latest))
    assert model.config.level == "clip"
    losses = pq.read_table(store.abs(f"{latest.rsplit('/', 1)[0]}/losses.parquet")).to_pandas()
    assert len(losses[losses["split"] == "train"]) == 9  # global batches of 8, each split over the 2 workers


@pytest.fixture(scope="module")
def small_corpus_store(tmp_path_factory) -> Store:
    """32 training videos of one 32-s activity (256 clips) and 4 test videos, ingested with tsf-tiny features."""
    from synth import Preset, generate

    data = tmp_path_factory.mktemp("small-corpus")
    generate(Preset("check", 32, 0, 4, activities_per_video=(1, 1), objects_per_activity=(2, 3), segment_s=32,
                    tail_s=0.0), data, seed=0)
    store = Store(tmp_path_factory.mktemp("small") / "store")
    ingest_hcap(store, str(data), str(data / "videos"))
    cfg = load_config(features={"encoder": "tsf-tiny"})
    assert run_stage(features_stage(cfg), store, executor="local").failed == 0
    return store


def test_trained_clip_captions_beat_chance_on_the_facts(small_corpus_store):
    """The demo-size clip model, trained for a minute, captions unseen videos with facts well above chance."""
    store = small_corpus_store
    result, _ = run(store, level="clip", size="demo", epochs=25, batch_size=16, lr=1e-3, vocab_size=300)
    cfg = load_config(store=store.root, features={"encoder": "tsf-tiny"},
                      captions={"clip_checkpoint": store.abs(result.checkpoint)})
    stage = build_stages(cfg, store)[1]
    assert run_stage(stage, store, executor="local").failed == 0
    frame = evaluate_level(store, "clip", stage.version(), "test", "videorecap")
    scores = frame[frame["video_id"].isna()].set_index("metric")["value"]
    actions = [json.loads(f)["action"] for f in read_groundtruth(store, "clip", "train")["facts"].to_pylist()]
    most_frequent_action = 100 * max(map(actions.count, set(actions))) / len(actions)
    assert scores["colour"] >= 60 and scores["action"] > most_frequent_action and scores["distinct"] > 4, scores


def test_each_level_trains_with_its_own_size_s_dropout_whatever_its_init_had():
    from types import SimpleNamespace

    from models.training import level_config

    tokenizer = SimpleNamespace(vocab_size=600, bos_id=1, eos_id=2, encode=lambda text: [3])
    config = lambda size, level, init=None: level_config(size, level, 64, 17, tokenizer, init=init)
    demo_segment = config("demo", "segment", init=config("demo", "clip"))
    assert demo_segment.dropout == 0.0
    assert config("demo", "video", init=demo_segment.with_overrides({"dropout": 0.3})).dropout == 0.0
    assert config("tiny", "video", init=demo_segment).dropout == RecapConfig.preset("video", "tiny").dropout == 0.1
    assert config("tiny", "video", init=demo_segment).n_embd == demo_segment.n_embd  # widths still come from the init


def test_the_demo_video_model_reads_each_description_s_index_and_the_other_levels_are_named_as_before():
    from models.tokenizer import Tokenizer
    from models.training import level_config

    tokenizer = Tokenizer.train(["C sorted the red cubes. C washed the ball.", "C stacked the ring."], vocab_size=300)
    config = lambda level, **kw: level_config("demo", level, 64, 17, tokenizer, **kw)
    video = config("video", init=config("segment"))
    assert video.text_sentence_rows == 16 and [video.text_sentence_end_id] == tokenizer.encode(".")
    assert config("video", recursive=False).text_sentence_rows == 0  # no text to read
    # the field is left out of the fingerprinted configuration where it is off: those runs keep their names
    assert "text_sentence_rows" not in RecapConfig.preset("segment", "demo").to_dict()
    assert RecapConfig.preset("video", "demo").to_dict()["text_sentence_rows"] == 16


def test_the_demo_video_model_whitens_its_features_with_the_train_split_s_statistics(store):
    from stages.examples import ExampleReader
    from store import FeatureSet

    result, log = run(store, level="video", lower="groundtruth", size="demo", epochs=1, batch_size=4)
    model, _ = checkpoint.load(store.abs(result.checkpoint))
    assert model.config.video_feature_norm
    cfg = load_config(features={"encoder": "tsf-tiny"})
    reader = ExampleReader(FeatureSet(store, features_stage(cfg).version()), "video", model.config.num_video_feat)
    train_rows = read_groundtruth(store, "video", "train").to_pylist()
    examples = [reader.span(r["video_id"], r["start_s"], r["end_s"], []) for r in train_rows]
    rows = torch.from_numpy(np.concatenate([e.video[e.video_mask.astype(bool)] for e in examples])).double()
    assert f"statistics of {len(rows)} training rows" in log
    assert torch.allclose(model.video_feature_mean, rows.mean(0).float())
    # whitened: the basis decorrelates the training rows, and the std is theirs along each of its axes
    assert model.config.video_feature_whiten
    projected = (rows - rows.mean(0)) @ model.video_feature_basis.double()
    covariance = torch.cov(projected.T)
    assert (covariance - torch.diag(covariance.diag())).abs().max() < 1e-4 * covariance.diag().max()
    floor = 1e-2 * float(projected.std(0).max())
    assert torch.allclose(model.video_feature_std, projected.std(0).clamp_min(floor).float(), rtol=1e-4)


def test_a_composed_summary_needs_the_features_of_every_video_it_names(store):
    """A part in a video that no target names, whose features are not extracted: a clear error naming it, before any
    training (not a failed read inside a worker)."""
    from store import REORDERED_SCHEMA, write_reordered

    train = read_groundtruth(store, "segment", "train").to_pylist()[0]
    test = read_groundtruth(store, "segment", "test").to_pylist()[0]
    for folder in store.listdir("markers/features"):
        for name in store.listdir(f"markers/features/{folder}"):
            if name.startswith(test["video_id"]):
                store.remove(f"markers/features/{folder}/{name}")
    row = {**read_groundtruth(store, "video", "train").to_pylist()[0], "text": "In the garden, C washed the ball.",
           "parts": json.dumps([[g["video_id"], g["start_s"], g["end_s"]] for g in (train, test)])}
    write_reordered(store, pa.Table.from_pylist([row], schema=REORDERED_SCHEMA))
    with pytest.raises(FileNotFoundError, match=f"features .* are missing for 1 of .*{test['video_id']}"):
        run(store, level="video", lower="groundtruth", epochs=1)


def test_reordered_and_composed_summaries_are_targets_of_the_recursive_video_level_only(store, monkeypatch):
    """Each reordered or composed summary is one more training example of the recursive video model, which reads its
    parts' descriptions in the order told (a composed one's from several videos); the non-recursive model, which has
    no text to read the order from, and `reordered = false` leave them out; a run without them keeps the name it had
    before they existed. Tables written before composed summaries name no video in their parts: the row's own."""
    from stages.examples import ExampleReader
    from stages.train import Item
    from store import REORDERED_SCHEMA, write_reordered

    assert Item("v", 0.0, 1.0, "t").key() == ("v", 0.0, 1.0, "t")  # as runs were named before `parts` existed
    before, _ = run(store, level="video", lower="groundtruth", epochs=1)
    videos = read_groundtruth(store, "video", "train").to_pylist()
    segments = read_groundtruth(store, "segment", "train").to_pylist()
    told_text = {}
    for video in videos:
        mine = [s for s in segments if s["video_id"] == video["video_id"]][::-1]
        told_text[video["video_id"]] = " ".join(s["text"].strip(".") + "." for s in mine)
        video["parts"] = json.dumps([[s["start_s"], s["end_s"]] for s in mine])
    rows = [{**video, "text": "In the garden, C washed the ball, then sorted the cubes.", "facts": None}
            for video in videos]
    untellable = {**rows[0], "parts": json.dumps([[0.0, 1.0]])}  # the descriptions are not this part's
    first, second = ([s for s in segments if s["video_id"] == v["video_id"]][0] for v in videos[:2])
    composed = {**rows[0], "video_id": second["video_id"], "text": "In the kitchen, C stacked the cone.",
                "parts": json.dumps([[g["video_id"], g["start_s"], g["end_s"]] for g in (second, first)])}
    write_reordered(store, pa.Table.from_pylist(rows + [untellable, composed], schema=REORDERED_SCHEMA))
    read = []
    for name in ("span", "told"):
        method = getattr(ExampleReader, name)
        monkeypatch.setattr(ExampleReader, name,
                            lambda self, *a, _m=method, **k: read.append(_m(self, *a, **k)) or read[-1])

    told, log = run(store, level="video", lower="groundtruth", epochs=1)
    assert told.trained and told.run != before.run
    assert f"{len(rows) + 1} reordered and composed summaries, 1 of them across videos" in log and "1 left out" in log
    assert f"{len(videos) + len(rows) + 1} video training examples" in log
    reordered = [e for e in read if e.target == rows[0]["text"]]
    assert len(reordered) == len(rows) and all(e.text == told_text[e.video_id] for e in reordered)
    [across] = [e for e in read if e.target == composed["text"]]
    assert across.text == f"{second['text'].strip('.')}. {first['text'].strip('.')}."
    without, _ = run(store, level="video", lower="groundtruth", epochs=1, reordered=False)
    assert not without.trained and without.run == before.run
    flat, log = run(store, level="video", recursive=False, epochs=1)
    assert "reordered summaries" not in log and f"{len(videos)} video training examples" in log
