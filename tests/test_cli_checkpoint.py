from models import checkpoint

from conftest import REPO, run_cli

OFFICIAL = REPO / "tests" / "data" / "reference" / "tiny_video_checkpoint.pt"
HEADS = "n_head = 4\nqformer_num_heads = 4\n"  # official files do not record head counts: TOML, as every --config


def test_convert_then_inspect_and_never_overwrite(tmp_path):
    out = tmp_path / "video"
    heads = tmp_path / "heads.toml"
    heads.write_text(HEADS)
    converted = run_cli("checkpoint", "convert", str(OFFICIAL), str(out), "--config", str(heads), check=True)
    assert "deprecated" not in converted.stderr
    model, _ = checkpoint.load(out)
    assert model.config.level == "video" and model.config.num_text_queries == 7
    info = run_cli("checkpoint", "inspect", str(out), check=True).stdout
    assert "level video" in info and "video queries 5" in info and "total" in info
    again = run_cli("checkpoint", "convert", str(OFFICIAL), str(out), "--config", str(heads))
    assert again.returncode == 2 and "not empty" in again.stderr


def test_missing_head_counts_are_a_clear_error():
    proc = run_cli("checkpoint", "inspect", str(OFFICIAL))
    assert proc.returncode == 2 and "head counts" in proc.stderr
