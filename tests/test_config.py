"""Configuration: the store remembers its settings, bad values stop before any work, exit codes."""

import shutil

import pytest

from pipeline.config import SETTINGS_FILE, ConfigError, load_config, settle
from store import read_videos

from conftest import run_cli


def test_store_file_then_config_file_then_flags(tmp_path):
    root = tmp_path / "store"
    first = settle(str(root), features={"encoder": "tsf-tiny", "batch_size": 8})
    text = (root / SETTINGS_FILE).read_text()
    assert 'encoder = "tsf-tiny"' in text and "batch_size = 8" in text and "[windows]" not in text
    assert settle(str(root)) == first  # remembered, no flags
    toml = tmp_path / "c.toml"
    toml.write_text("[features]\nbatch_size = 6\n[windows]\nsegment_s = 32\n")
    assert settle(str(root), toml, record=False).features.batch_size == 6  # the file over the store's
    both = settle(str(root), toml, features={"batch_size": 5})  # flags over the file
    assert (both.features.batch_size, both.windows.segment_s, both.features.encoder) == (5, 32.0, "tsf-tiny")
    assert settle(str(root)) == both  # recorded


def test_a_change_is_recorded_with_a_one_line_notice(tmp_path, capsys):
    root = str(tmp_path / "store")
    settle(root, features={"encoder": "tsf-tiny"})
    capsys.readouterr()
    settle(root, features={"encoder": "tsf-tiny"})
    assert capsys.readouterr().err == ""  # nothing changed, nothing said
    settle(root, windows={"segment_s": 32.0})
    assert capsys.readouterr().err.strip() == f"[config] {root}/{SETTINGS_FILE}: windows.segment_s 180.0 -> 32.0"


def test_relative_paths_are_recorded_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = settle("store", captions={"clip_checkpoint": "ckpt/clip"})
    assert cfg.captions.clip_checkpoint == str(tmp_path / "ckpt" / "clip")
    monkeypatch.chdir("/")
    assert settle(str(tmp_path / "store")).captions.clip_checkpoint == str(tmp_path / "ckpt" / "clip")


@pytest.mark.parametrize("overrides, message", [
    ({"windows": {"clip_s": -4.0}}, "windows.clip_s = -4.0: must be > 0"),
    ({"windows": {"clip_s": 0.0}}, "windows.clip_s = 0.0: must be > 0"),
    ({"features": {"batch_size": -3}}, "features.batch_size = -3: must be >= 0"),
    ({"captions": {"method": "nucleus"}}, "captions.method = 'nucleus': not one of greedy, beam, sample"),
    ({"captions": {"video_method": "top"}}, "captions.video_method = 'top': not one of \"\", greedy, beam, sample"),
    ({"features": {"encoder": "tsf-huge"}}, "features.encoder = 'tsf-huge': not one of tsf-base, tsf-tiny"),
    ({"train": {"epochs": -1}}, "train.epochs = -1: must be >= 0"),
    ({"run": {"max_retries": -1}}, "run.max_retries = -1: must be >= 0"),
    ({"features": {"device": "gpu"}}, "features.device = 'gpu': not cpu, cuda or cuda:N"),
])
def test_bad_values_are_rejected_naming_key_value_and_what_is_allowed(overrides, message):
    with pytest.raises(ConfigError) as error:
        load_config(**overrides)
    assert str(error.value).startswith(message)


def test_the_summaries_decode_their_own_way_where_a_video_method_is_set():
    from pipeline.dag import caption_stage, features_stage

    def methods(cfg):
        features = features_stage(cfg)
        return [caption_stage(cfg, level, "ckpt", features, features).method for level in ("clip", "segment", "video")]

    assert methods(load_config(captions={"video_method": "beam"})) == ["greedy", "greedy", "beam"]
    assert methods(load_config(captions={"method": "sample"})) == ["sample", "sample", "sample"]


def test_bad_values_on_the_command_line_exit_2_before_any_work(tmp_path):
    root = tmp_path / "store"
    bad = tmp_path / "bad.toml"
    bad.write_text("[windows]\nclip_s = -4\n")
    cases = [("features", "--config", str(bad)), ("features", "--batch-size", "-3"),
             ("captions", "--method", "nucleus"), ("run", "--config", str(bad)), ("features", "--device", "gpu")]
    for args in cases:
        proc = run_cli(*args, "--store", str(root), "--local")
        assert proc.returncode == 2, (args, proc.stderr)
        assert proc.stderr.startswith("error: ") and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert not root.exists()  # nothing written, not even the settings


@pytest.mark.parametrize("args", [("features", "--batch-size", "-3"), ("summaries", "--method", "nucleus"),
                                  ("train", "--epochs", "-1"), ("run", "--workers", "-1"), ("evaluate", "--split", "x")])
def test_a_bad_setting_is_refused_before_the_pipeline_is_imported(tmp_path, args):
    """Checking settings needs no torch: a typo costs a second, not the seconds of importing the models."""
    import subprocess
    import sys

    from conftest import REPO

    code = ("import sys; from cli.main import main\ntry:\n    main()\nexcept SystemExit as e:\n"
            "    print(e.code, 'torch' in sys.modules, 'pipeline.dag' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code, *args, "--store", str(tmp_path / "s")], capture_output=True,
                          text=True, cwd=REPO)
    assert proc.stdout.split() == ["2", "False", "False"], proc.stdout + proc.stderr
    assert proc.stderr.startswith("error: ") and args[1].strip("-").replace("-", "_") in proc.stderr


def test_commands_that_only_read_do_not_create_a_store(tmp_path):
    root = tmp_path / "nowhere"
    for args in (("status",), ("evaluate",), ("run", "--dry-run")):
        proc = run_cli(*args, "--store", str(root))
        assert proc.returncode == 2 and "no store here" in proc.stderr, (args, proc.stderr)
    assert not root.exists()


def test_the_store_remembers_and_moves(tiny_corpus, tmp_path):
    """Ingest by a relative path, extract with a flag, then: no flags needed, from anywhere, after a move."""
    (tmp_path / "a").mkdir()
    shutil.copytree(tiny_corpus / "videos", tmp_path / "a" / "videos")
    files = sorted(f"videos/{p.name}" for p in (tmp_path / "a" / "videos").iterdir())
    run_cli("ingest", *files, "--store", "store", cwd=tmp_path / "a", check=True)  # relative file paths
    one = run_cli("features", "--store", str(tmp_path / "a" / "store"), "--encoder", "tsf-tiny",
                  "--batch-size", "8", "--local", check=True)
    assert "features.encoder 'tsf-base' -> 'tsf-tiny'" in one.stderr
    moved = tmp_path / "b" / "moved"
    shutil.move(tmp_path / "a" / "store", moved)
    status = run_cli("status", "--store", str(moved), check=True).stdout
    assert "tsf-tiny" in status and "not current" not in status and "current" in status, status
    plan = run_cli("run", "--dry-run", "--store", str(moved), check=True).stdout
    features = next(line.split() for line in plan.splitlines() if line.startswith("features"))
    assert features[2:5] == ["0", "0", "6"], plan  # to do, after upstream, done
    for name in (moved / "markers" / "features").rglob("*.json"):  # redo the work from the moved store
        name.unlink()
    again = run_cli("features", "--store", "moved", "--local", cwd=tmp_path / "b", check=True)
    assert "done 6, skipped 0, failed 0" in again.stderr and "[config]" not in again.stderr
    from store import Store

    assert all(v["uri"].startswith(str(tmp_path / "a" / "videos")) for v in read_videos(Store(moved)))


def test_a_full_size_encoder_without_weights_or_a_missing_gpu_is_refused_before_work(tiny_corpus, tmp_path):
    root = str(tmp_path / "store")
    run_cli("ingest", str(tiny_corpus / "videos"), "--store", root, check=True)
    proc = run_cli("features", "--store", root, "--local")
    assert proc.returncode == 2 and "features.random_weights" in proc.stderr
    import torch

    if not torch.cuda.is_available():
        local = run_cli("features", "--store", root, "--encoder", "tsf-tiny", "--device", "cuda", "--local")
        assert local.returncode == 2 and "this machine has 0 CUDA device(s)" in local.stderr, local.stderr
        ray = run_cli("features", "--store", root, "--encoder", "tsf-tiny", "--device", "cuda", fresh=True)  # no wait on Ray
        assert ray.returncode == 2 and "the Ray cluster has none" in ray.stderr, ray.stderr
    assert "features" not in [p.name for p in (tmp_path / "store").iterdir()]
    assert not (tmp_path / "store" / SETTINGS_FILE).exists()  # a refused command records nothing


def test_a_refused_command_leaves_nothing_to_record_for_the_next_in_the_same_process(tiny_corpus, tmp_path):
    """`main()` called twice in one interpreter (the tests do; so may a scheduler that embeds the app)."""
    refused, other = str(tmp_path / "refused"), str(tmp_path / "other")
    run_cli("ingest", str(tiny_corpus / "videos"), "--store", refused, check=True)
    (tmp_path / "refused" / SETTINGS_FILE).unlink(missing_ok=True)
    refusal = run_cli("features", "--batch-size", "8", "--store", refused, "--local")  # tsf-base without weights
    assert refusal.returncode == 2 and "features.random_weights" in refusal.stderr
    run_cli("ingest", str(tiny_corpus / "videos"), "--store", other, check=True)
    assert not (tmp_path / "refused" / SETTINGS_FILE).exists()
