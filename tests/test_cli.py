"""The command line as automation meets it: --version, -h everywhere, defaults in help, --json, --log-file, and
progress as a bar on a terminal but plain lines elsewhere."""

import io
import json
import os
import re
import subprocess
import sys
import tomllib

import pyarrow as pa
import pytest

from pipeline.config import settle
from pipeline.dag import build_stages
from pipeline.ingest import ingest
from pipeline.logfile import TeeStream
from pipeline.progress import Progress
from store import CAPTION_SCHEMA, GROUNDTRUTH_SCHEMA, Store, captions_rel, read_videos, write_groundtruth

from _checkpoints import tiny_checkpoint
from conftest import REPO, copy_store, run_cli, write_video

PLAIN = re.compile(r"^\[features\] (\d+)/(\d+) units \| (\d+)/(\d+) windows \| [\d.]+ windows/s \| ETA \d+:\d\d:\d\d$")

_DRIVER = """
import json, sys
from cli.main import main
for argv in json.loads(sys.argv[1]):
    sys.argv = ["recap", *argv]
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code or 0
    for stream in (sys.stdout, sys.stderr):
        print(f"\\n=== exit {code}", file=stream, flush=True)
"""


def run_cli_each(*argvs: list[str]) -> list[tuple[int, str, str]]:
    """Several `recap ...` invocations in one fresh interpreter (one import of the app, not one each):
    (exit code, stdout, stderr) of each."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "100"}
    proc = subprocess.run([sys.executable, "-c", _DRIVER, json.dumps(argvs)], capture_output=True, text=True,
                          cwd=REPO, env=env)
    outs, errs = proc.stdout.split("\n=== exit "), proc.stderr.split("\n=== exit ")
    assert len(outs) == len(argvs) + 1, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    codes = [int(part.split("\n", 1)[0]) for part in outs[1:]]
    strip = lambda parts: [parts[0]] + [p.split("\n", 1)[1] if "\n" in p else "" for p in parts[1:-1]]
    return list(zip(codes, strip(outs), strip(errs)))


def _commands():
    """Every registered command and sub-command, as argv prefixes: [], ["features"], ["checkpoint", "convert"]..."""
    import typer.main
    from typer.core import TyperGroup

    from cli.main import app

    found = []

    def walk(command, path):
        found.append((path, command))
        if isinstance(command, TyperGroup):
            for name, sub in command.commands.items():
                walk(sub, path + [name])
    walk(typer.main.get_command(app), [])
    return found


def _flat(text: str) -> str:
    """Help text with its line wrapping (and any box drawing) undone."""
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", text).split())


def test_version_h_on_every_command_and_defaults_in_help():
    from typer.core import TyperOption

    commands = _commands()
    argvs = [["--version"]] + [path + ["-h"] for path, _ in commands] + [["features", "--help"], ["run", "--json"]]
    results = run_cli_each(*argvs)
    code, out, _ = results[0]
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert (code, out) == (0, f"recap {version}\n")
    helps = {}
    for (path, command), (code, out, err) in zip(commands, results[1:]):
        assert code == 0 and out.startswith(f"Usage: recap {' '.join(path)}".rstrip()), (path, out, err)
        assert "-h, --help" in out, (path, out)
        helps[tuple(path)] = flat = _flat(out)
        # Every default a command has, given or written into its help, is shown.
        shown = [p for p in command.params if isinstance(p, TyperOption) and not p.is_flag and not p.hidden
                 and (p.default is not None or "[default:" in (p.help or ""))]
        assert flat.count("[default:") >= len(shown), (path, [p.name for p in shown], out)
    assert results[-2][1] == results[1 + [p for p, _ in commands].index(["features"])][1]  # --help as -h
    code, _, err = results[-1]
    assert code == 2 and "--json goes with --dry-run" in err  # a run's JSON: the plan only, before any work
    features = helps[("features",)]
    for text in ("[default: config's store, ./recap-store]", "[default: store's setting, else tsf-base]",
                 "[default: store's setting, else cpu]", "[default: one per CPU]",
                 "[default: store's setting, else 16 on CUDA, 4 on CPU]"):
        assert text in features, (text, features)
    assert "[default: store's setting, else greedy]" in helps[("captions",)]
    assert "[default: store's setting, else videorecap, coco]" in helps[("evaluate",)]
    assert "[default: store's setting, else 0.0001]" in helps[("train",)]
    assert "[default: tiny]" in helps[("synth",)]
    assert "--version" in helps[()] and "--log-file PATH" in helps[()]


def test_version_falls_back_to_pyproject(monkeypatch):
    import importlib.metadata

    from cli.main import _package_version

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", missing)
    assert _package_version() == tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]


@pytest.fixture(scope="module")
def small_store(tmp_path_factory):
    """Two registered videos, tsf-tiny and a clip checkpoint in the store's settings, clip ground truth and
    clip captions of the current version (written directly: no model runs), one failure record."""
    tmp = tmp_path_factory.mktemp("cli")
    root = tmp / "store"
    videos = [write_video(tmp / "videos" / f"{name}.mp4", seconds=3) for name in ("alpha", "beta")]
    store = Store(root)
    assert ingest(store, [str(v) for v in videos], stream=io.StringIO()).done == 2
    clip = tiny_checkpoint(tmp / "clip", "clip")
    cfg = settle(str(root), features={"encoder": "tsf-tiny", "batch_size": 8},
                 captions={"clip_checkpoint": str(clip)}, stream=io.StringIO())
    features, captions = build_stages(cfg, store)
    ids = [v["video_id"] for v in read_videos(store)]
    texts = {ids[0]: "#C C picks up the red cube", ids[1]: "#C C puts down the blue ball"}
    write_groundtruth(store, "clip", pa.Table.from_pylist(
        [{"video_id": vid, "split": "test", "level": "clip", "start_s": 0.0, "end_s": 4.0, "text": text,
          "facts": None} for vid, text in texts.items()], schema=GROUNDTRUTH_SCHEMA))
    for vid, text in texts.items():
        store.write_table(captions_rel("clip", captions.version(), vid), pa.Table.from_pylist(
            [{"video_id": vid, "level": "clip", "start_s": 0.0, "end_s": 4.0, "text": text, "score": 0.0,
              "fingerprint": "fp", "version": captions.version()}], schema=CAPTION_SCHEMA))
    store.record_failure("features", features.version(), f"{ids[1]}@000000", ValueError("an old failure"), ids[1])
    return root


def test_json_outputs_parse_and_carry_what_the_tables_show(small_store):
    status = run_cli("status", "--store", str(small_store), "--json", check=True)
    doc = json.loads(status.stdout)
    assert doc["store"] == str(small_store)
    rows = {(r["stage"], r["what"]): r for r in doc["stages"]}
    assert set(next(iter(rows.values()))) == {"stage", "what", "done", "failed", "pending", "size", "note"}
    assert rows[("ingest", "videos")]["done"] == 2 and rows[("groundtruth", "clip")]["done"] == 2
    features = next(r for r in doc["stages"] if r["stage"] == "features")
    assert (features["done"], features["failed"], features["pending"], features["note"]) == (0, 1, 1, "current")
    [failure] = doc["failures"]
    assert failure["stage"] == "features" and failure["failed"] == 1
    assert failure["first"][0]["message"] == "an old failure" and failure["first"][0]["error_type"] == "ValueError"

    plan = run_cli("run", "--dry-run", "--json", "--store", str(small_store), check=True)
    doc = json.loads(plan.stdout)
    steps = {r["stage"]: r for r in doc["plan"]}
    assert list(steps) == ["features", "captions"]
    assert (steps["features"]["to_do"], steps["features"]["failed"], steps["features"]["work_name"]) == (1, 1, "windows")
    assert (steps["captions"]["to_do"], steps["captions"]["blocked"]) == (0, 2)  # waiting for features

    evaluate = run_cli("evaluate", "--json", "--protocol", "videorecap", "--store", str(small_store), check=True)
    doc = json.loads(evaluate.stdout)  # stdout holds the document only: no table
    assert doc["split"] == "test" and (small_store / doc["metrics_file"]).is_file()
    scores = {r["metric"]: r for r in doc["metrics"]}
    assert {"CIDEr", "ROUGE_L", "METEOR"} <= set(scores)
    assert scores["ROUGE_L"]["value"] == pytest.approx(100.0) and scores["ROUGE_L"]["n_pairs"] == 2
    assert {"level", "version", "protocol", "video_id", "n_missing"} <= set(scores["CIDEr"])
    assert "[evaluate] wrote" in evaluate.stderr



def test_log_file_gets_every_stderr_line_plain(small_store, tmp_path):
    root = copy_store(small_store, tmp_path / "store").root
    log = tmp_path / "logs" / "recap.log"
    log.parent.mkdir()
    log.write_text("an earlier line\n")
    proc = run_cli("--log-file", str(log), "features", "--store", str(root), "--local", "--retry-failed",
                   fresh=True)  # the log file is closed at exit
    assert proc.returncode == 0, proc.stderr
    text = log.read_text()
    assert text.startswith("an earlier line\n# ")  # appended, with a header naming the command
    lines = text.splitlines()
    assert "features --store" in lines[1] and "--local" in lines[1]
    assert lines[2:] == proc.stderr.splitlines()  # the same lines as the terminal got
    assert "[features] loading tsf-tiny with random weights on cpu" in lines
    assert any(re.fullmatch(r"\[features\] model ready in \d+\.\d s", line) for line in lines), lines
    assert any(PLAIN.match(line) for line in lines), lines
    assert any(line.startswith("[features] done 2, skipped 0, failed 0 | wall ") for line in lines), lines
    assert "\x1b" not in text and "\r" not in text


class _Terminal(io.StringIO):
    def isatty(self):
        return True


class _Pipe(io.StringIO):
    def isatty(self):
        return False


def test_progress_is_a_bar_on_a_terminal_and_plain_lines_elsewhere(tmp_path):
    pipe = _Pipe()
    progress = Progress("features", 3, 300, "windows", stream=pipe, every_s=0)
    for _ in range(3):
        progress.advance(100)
    lines = pipe.getvalue().splitlines()
    assert [PLAIN.match(line).group(1, 3) for line in lines] == [("1", "100"), ("2", "200"), ("3", "300")]
    assert "\r" not in pipe.getvalue()

    terminal = _Terminal()
    progress = Progress("features", 3, 300, "windows", stream=terminal, every_s=0)
    progress.advance(100)
    progress.write("[features] beta@000000: FAILED ValueError: boom")
    progress.advance(100)
    progress.advance(100)
    shown = terminal.getvalue()
    assert "\r" in shown and "%|" in shown and "100%|" in shown
    assert "3/3 units | 300/300 windows" in shown
    assert "\n[features] beta@000000: FAILED ValueError: boom\n" in shown.replace("\r", "\n")
    assert not any(PLAIN.match(line) for line in shown.replace("\r", "\n").splitlines())  # no plain lines
    assert shown.endswith("\n")  # the bar closed: the next line starts on its own

    with open(tmp_path / "log", "w") as log:  # a terminal with --log-file: the bar there, plain lines in the file
        terminal = _Terminal()
        tee = TeeStream(terminal, log)
        progress = Progress("features", 2, 200, "windows", stream=tee, every_s=0)
        progress.advance(100)
        progress.advance(100)
        print("[features] done 2, skipped 0, failed 0 | wall 1.0 s", file=tee)
    logged = (tmp_path / "log").read_text()
    assert "%|" in terminal.getvalue()
    assert [PLAIN.match(line).group(1) for line in logged.splitlines()[:2]] == ["1", "2"]
    assert logged.splitlines()[2] == "[features] done 2, skipped 0, failed 0 | wall 1.0 s"
    assert "\r" not in logged and "%|" not in logged


def test_tee_keeps_plain_whole_lines(tmp_path):
    terminal = _Terminal()
    with open(tmp_path / "log", "w") as log:
        tee = TeeStream(terminal, log)
        tee.write("\x1b[31merror: red\x1b[0m\n")
        tee.write("videos 1/3\rvideos 3/3")
        tee.write("\nlast")
        tee.log.close()
    assert terminal.getvalue() == "\x1b[31merror: red\x1b[0m\nvideos 1/3\rvideos 3/3\nlast"
    assert (tmp_path / "log").read_text() == "error: red\nvideos 3/3\nlast\n"
    assert tee.isatty() and tee.encoding


def test_checkpoint_model_settings_toml_and_deprecated_json(tmp_path, capsys):
    from pipeline.checkpoints import _overrides

    toml = tmp_path / "heads.toml"
    toml.write_text("n_head = 4\nqformer_num_heads = 4\n[vision]\nnum_heads = 2\n")
    assert _overrides(str(toml)) == {"n_head": 4, "qformer_num_heads": 4, "vision": {"num_heads": 2}}
    assert capsys.readouterr().err == ""
    old = tmp_path / "heads.json"
    old.write_text('{"n_head": 4, "qformer_num_heads": 4}')
    assert _overrides(str(old)) == {"n_head": 4, "qformer_num_heads": 4}
    notice = capsys.readouterr().err.splitlines()
    assert len(notice) == 1 and "deprecated" in notice[0] and "n_head = 4; qformer_num_heads = 4" in notice[0]
    assert _overrides('{"n_head": 4}') == {"n_head": 4}  # inline JSON, as before: the same notice
    assert "deprecated" in capsys.readouterr().err
    bad = tmp_path / "bad.toml"
    bad.write_text("n_head = \n")
    with pytest.raises(ValueError, match="not valid TOML"):
        _overrides(str(bad))
    with pytest.raises(FileNotFoundError, match="a TOML file"):
        _overrides(str(tmp_path / "missing.toml"))
