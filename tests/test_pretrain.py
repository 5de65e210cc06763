"""`recap pretrain` on the tiny synthetic corpus: LaViLa-format checkpoints the features stage reads, the
contrastive loss, a killed run resuming to an uninterrupted one's weights, and two Ray Train workers."""

import io
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from models.lavila import DualEncoder, LavilaConfig
from models.timesformer import TimeSformer, TimeSformerConfig
from pipeline.config import load_config
from pipeline.dag import features_stage
from pipeline.ingest import ingest_hcap
from models.clip_tokenizer import ClipTokenizer
from pipeline.pretrain import latest_encoder, narrations, pretrain, span_texts
from pipeline.runner import run_stage
from stages.pretrain import contrastive_loss, recall_at_1
from store import FeatureSet, Store, read_groundtruth, read_videos

from conftest import REPO, copy_store, kill_at_first_epoch

SETTINGS = {"size": "tiny", "epochs": 2, "text_epochs": 1, "span_batch_size": 4, "batch_size": 16, "lr": 1e-3}
ONE_THREAD = {"OMP_NUM_THREADS": "1"}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def ingested(tmp_path_factory, tiny_corpus) -> Path:
    root = tmp_path_factory.mktemp("pretrain") / "store"
    ingest_hcap(Store(root), str(tiny_corpus), str(tiny_corpus / "videos"))
    return root


def run(store: Store, **settings):
    log = io.StringIO()
    result = pretrain(load_config(store=store.root, pretrain={**SETTINGS, **settings}), store, stream=log)
    return result, log.getvalue()


def recap(*args: str, **popen):
    import os

    command = [sys.executable, "-c", "from cli.main import main; main()", *args]
    env = {**os.environ, **ONE_THREAD}
    if popen:
        return subprocess.Popen(command, cwd=REPO, env=env, **popen)
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_contrastive_loss_is_symmetric_infonce():
    g = torch.Generator().manual_seed(0)
    video, text = (F.normalize(torch.randn(5, 8, generator=g), dim=-1) for _ in range(2))
    scale = torch.tensor(math.log(20.0))
    logits = 20.0 * video @ text.t()
    by_text = -torch.log_softmax(logits, dim=1).diagonal().mean()
    by_video = -torch.log_softmax(logits, dim=0).diagonal().mean()
    assert torch.allclose(contrastive_loss(video, text, scale), (by_text + by_video) / 2)
    assert recall_at_1(video, video) == 1.0 and recall_at_1(video, video.roll(1, 0)) == 0.0


def test_pretrained_checkpoint_is_lavila_format_and_feeds_the_features_stage(ingested, tmp_path):
    store = copy_store(ingested, tmp_path / "s")
    result, log = run(store)
    assert "epoch 2/3 | train loss" in log and "epoch 3/3 (text) | train loss" in log and "val text-to-video R@1" in log
    path = store.abs(result.checkpoint)
    assert latest_encoder(store) == path and result.checkpoint.endswith("epoch-0003/lavila.pth")
    trained = DualEncoder.from_lavila(path, LavilaConfig.tiny())  # strict: every tensor of both towers
    torch.manual_seed(SETTINGS.get("seed", 0))
    fresh = DualEncoder(LavilaConfig.tiny())
    changed = [k for k, v in trained.state_dict().items() if not torch.equal(v, fresh.state_dict()[k])]
    assert any(k.startswith("visual.") for k in changed) and any(k.startswith("transformer.") for k in changed)
    visual = TimeSformer.from_lavila(path, TimeSformerConfig.tiny())  # what `recap features` reads
    assert all(torch.equal(v, trained.visual.state_dict()[k]) for k, v in visual.state_dict().items())

    again, log = run(store)
    assert not again.trained and "already trained" in log

    cfg = load_config(features={"encoder": "tsf-tiny", "checkpoint": path})
    stage = features_stage(cfg)
    assert run_stage(stage, store, executor="local").failed == 0
    video = narrations(store, "train")[0]
    vid = next(v for v in FeatureSet(store, stage.version()).videos() if v in video.uri)
    cls = torch.from_numpy(FeatureSet(store, stage.version()).read_cls(vid).astype(np.float32))
    assert torch.allclose(trained.embed_video_cls(cls).norm(dim=-1), torch.ones(len(cls)), atol=1e-3)


def test_killed_run_resumes_after_its_last_epoch_to_the_uninterrupted_weights(ingested, tmp_path):
    epochs, total = 3, 4  # the last one a text epoch: resuming crosses into the text phase
    reference = copy_store(ingested, tmp_path / "reference")
    uninterrupted, _ = run(reference, epochs=epochs)

    killed = copy_store(ingested, tmp_path / "killed")
    run_dir = Path(killed.abs(uninterrupted.checkpoint)).parent.parent  # same settings and data: same run
    args = ["pretrain", "--store", killed.root, "--size", "tiny", "--epochs", str(epochs), "--text-epochs", "1",
            "--span-batch-size", "4", "--batch-size", "16",
            "--lr", "0.001"]
    with open(tmp_path / "first.log", "w") as log:
        committed = kill_at_first_epoch(recap(*args, stderr=log), run_dir, tmp_path / "first.log", 300)
    assert len(committed) == 1 and committed[0] < f"epoch-{epochs:04d}"

    resumed = recap(*args)
    done = int(committed[0][-4:])
    assert f"resuming after epoch {done}" in resumed.stderr
    assert [any(f"epoch {e}/{total}{text} | train loss" in resumed.stderr for text in ("", " (text)"))
            for e in range(1, total + 1)] == [e > done for e in range(1, total + 1)]
    a = torch.load(reference.abs(uninterrupted.checkpoint), weights_only=True)["state_dict"]
    b = torch.load(run_dir / f"epoch-{total:04d}" / "lavila.pth", weights_only=True)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_two_ray_train_workers(ingested, tmp_path):
    store = copy_store(ingested, tmp_path / "s")
    proc = recap("pretrain", "--store", store.root, "--size", "tiny", "--epochs", "1", "--text-epochs", "1",
                 "--batch-size", "16",
                 "--workers", "2")
    assert "on 2 worker(s)" in proc.stderr and proc.stderr.count("epoch 1/2 | train loss") == 1
    assert proc.stderr.count("epoch 2/2 (text) | train loss") == 1
    DualEncoder.from_lavila(latest_encoder(store), LavilaConfig.tiny())


def test_no_narrations_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no clip narrations in the train split"):
        run(Store(tmp_path / "empty"))


def test_span_pairs_hold_the_windows_inside_each_description_and_summary(ingested):
    store = Store(ingested)
    train = narrations(store, "train")
    spans = span_texts(store, "train", train)
    for level in ("segment", "video"):
        truth = read_groundtruth(store, level, "train").to_pylist()
        assert sorted(s.text for s in spans if s.level == level) == sorted(r["text"] for r in truth)
    uris = {v["video_id"]: v["uri"] for v in read_videos(store)}
    for r in read_groundtruth(store, "video", "train").to_pylist():
        span = next(s for s in spans if s.level == "video" and s.text == r["text"])
        assert set(span.windows) == {i for i, n in enumerate(train) if n.uri == uris[r["video_id"]]}
    for span in (s for s in spans if s.level == "segment"):
        own = [train[i] for i in span.windows]
        assert len({n.uri for n in own}) == 1 and len(own) < len([n for n in train if n.uri == own[0].uri])


def _token_ids(texts: list[str]) -> set[int]:
    return set(ClipTokenizer()(texts, 77).flatten().tolist())


def test_span_pairs_teach_the_text_tower_words_that_only_descriptions_and_summaries_use(ingested, tmp_path):
    store = Store(ingested)
    train = narrations(store, "train")
    only_spans = sorted(_token_ids([s.text for s in span_texts(store, "train", train)])
                        - _token_ids([n.text for n in train]))
    assert only_spans, "the corpus's descriptions and summaries use no token its narrations lack"
    torch.manual_seed(SETTINGS.get("seed", 0))
    fresh = DualEncoder(LavilaConfig.tiny()).token_embedding.weight.detach()[only_spans]
    turned, models = {}, {}
    for text_epochs in (0, 2):
        copy = copy_store(ingested, tmp_path / f"text-{text_epochs}")
        trained, log = run(copy, text_epochs=text_epochs)
        models[text_epochs] = DualEncoder.from_lavila(copy.abs(trained.checkpoint), LavilaConfig.tiny()).state_dict()
        # weight decay alone only shrinks an embedding row that no step reads; a step that reads it turns it
        rows = models[text_epochs]["token_embedding.weight"][only_spans]
        turned[text_epochs] = 1 - F.cosine_similarity(rows, fresh, dim=-1)
    assert turned[0].max() < 1e-5
    assert turned[2].min() > 1e-4, turned[2]
    assert "| segment " in log and "| video " in log  # the val R@1 of each span level
    # the text phase keeps the visual tower as the first phase left it: the same features, the same captions
    visual = [k for k in models[0] if k.startswith("visual.")]
    assert visual and all(torch.equal(models[0][k], models[2][k]) for k in visual)
    assert not torch.equal(models[0]["text_projection"], models[2]["text_projection"])
