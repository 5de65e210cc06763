"""Every fault of issue 11, as a user meets it: the command, what it prints, its exit code, what is left on disk.

Real CLI processes on the tiny synthetic corpus. The full-disk and read-only rows need a tmpfs (root, or
CAP_SYS_ADMIN); elsewhere they say so. Prints a Markdown table.

    .venv/bin/python bench/fault_table.py
"""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from conftest import write_audio_only, write_video  # noqa: E402

import synth  # noqa: E402
from pipeline.ingest import ingest_hcap  # noqa: E402
from store import Store  # noqa: E402

FEATURES = ("features", "--encoder", "tsf-tiny", "--batch-size", "8", "--local")
ROWS: list[tuple[str, str, int, str]] = []


def recap(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "from cli.main import main; main()", *map(str, args)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})


def run(*args: str) -> tuple[int, str]:
    proc = recap(*args)
    _, err = proc.communicate(timeout=900)
    return proc.returncode, err


def left_on_disk(root: Path) -> str:
    tmps = [p for p in root.rglob(".tmp-*")]
    claims = list((root / "claims").rglob("*.json")) if (root / "claims").exists() else []
    failures = list((root / "failures").rglob("*.json")) if (root / "failures").exists() else []
    return f"{len(tmps)} temporaries, {len(claims)} claims, {len(failures)} failure records"


def lines(err: str, *needles: str, most: int = 12) -> str:
    keep = [line for line in err.splitlines() if any(n in line for n in needles)]
    return "<br>".join(f"`{line.strip()}`" for line in keep[:most]) or "(nothing)"


def row(fault: str, shown: str, code: int, root: Path) -> None:
    ROWS.append((fault, shown, code, left_on_disk(root) if root.exists() else "-"))
    print(f"{fault}: exit {code}", file=sys.stderr, flush=True)


def tmpfs(where: Path, size: str) -> bool:
    where.mkdir(parents=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                          capture_output=True).returncode == 0


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="faults-"))
    corpus = work / "corpus"
    synth.generate("tiny", corpus, seed=0)
    base = work / "base"
    ingest_hcap(Store(base), str(corpus), str(corpus / "videos"))

    bad = work / "bad"
    write_video(bad / "good.mp4", seconds=3)
    write_video(bad / "café ☕.mp4", seconds=3)
    good = (bad / "good.mp4").read_bytes()
    (bad / "truncated.mp4").write_bytes(good[: len(good) // 3])
    (bad / "empty.mp4").write_bytes(b"")
    (bad / "notes.mp4").write_text("these are my notes, not a video\n")
    write_audio_only(bad / "audio.mp4")
    (bad / "folder.mp4").mkdir()
    (bad / "loop.mp4").symlink_to(bad / "loop.mp4")
    (bad / "dangling.mp4").symlink_to(bad / "gone.mp4")
    s = work / "bad-store"
    code, err = run("ingest", bad, bad / "missing.mp4", "--store", s)
    row("bad inputs (one folder scan + a missing path)", lines(err, "FAILED", "done "), code, s)

    s = work / "two-runs"
    shutil.copytree(base, s)
    procs = [recap(*FEATURES, "--store", s) for _ in range(2)]
    outs = [p.communicate(timeout=900)[1] for p in procs]
    row("two `recap features` at once on one store", " / ".join(lines(e, "done ", "another process") for e in outs),
        max(p.returncode for p in procs), s)

    s = work / "full" / "store"
    if tmpfs(s.parent, "2m"):
        shutil.copytree(base, s)
        st = os.statvfs(s.parent)
        with open(s.parent / "filler", "wb") as f:
            f.write(b"\0" * max(0, st.f_bavail * st.f_frsize - (160 << 10)))
        code, err = run(*FEATURES, "--store", s)
        row("full disk (2 MB tmpfs)", lines(err, "FAILED", "done ", most=3), code, s)
        code, err = run("status", "--store", s)
        row("`status` on the full disk", lines(err, "error") if code else "(works)", code, s)
    else:
        ROWS.append(("full disk", "not measured: mounting a tmpfs needs root here", -1, "-"))

    s = work / "ro" / "store"
    if tmpfs(s.parent, "8m"):
        shutil.copytree(base, s)
        subprocess.run(["mount", "-o", "remount,ro", str(s.parent)], check=True)
        for args in (("ingest", bad / "good.mp4"), FEATURES, ("captions", "--local")):
            code, err = run(*args, "--store", s)
            row(f"read-only store: `recap {args[0]}`", lines(err, "error"), code, s)
    else:
        ROWS.append(("read-only store", "not measured: mounting a tmpfs needs root here", -1, "-"))

    meta = work / "pickle"
    meta.mkdir()
    with open(meta / "clips_train.pkl", "wb") as f:
        pickle.dump([("v", 0.0, 4.0, Exploit())], f)
    code, err = run("ingest", "ego4d-hcap", meta, "--videos", meta, "--store", work / "pickle-store")
    row("unsafe pickle in Ego4D-HCap metadata", lines(err, "error"), code, work / "pickle-store")

    from models.encoders import build_encoder

    build_encoder("videoprism-tiny", seed=3).model.save_pretrained(work / "vp")
    s = work / "vp-store"
    shutil.copytree(base, s)
    code, err = run("features", "--encoder", "videoprism-tiny", "--checkpoint", work / "vp", "--local", "--store", s)
    row("VideoPrism checkpoint folder (`save_pretrained`)", lines(err, "done ", "FAILED"), code, s)

    s = work / "tmps"
    shutil.copytree(base, s)
    from pipeline.config import load_config
    from pipeline.dag import features_stage

    version = features_stage(load_config(features={"encoder": "tsf-tiny"})).version()
    stale = s / "features" / version / ".tmp-killed-run"
    stale.mkdir(parents=True)
    hour_ago = time.time() - 2 * 3600
    os.utime(stale, (hour_ago, hour_ago))
    fresh = s / "features" / version / ".tmp-live-writer"
    fresh.mkdir()
    code, err = run(*FEATURES, "--store", s)
    row("temporaries of a killed run (one 2 h old, one fresh)",
        f"(silent) old one removed: {not stale.exists()}, fresh one kept: {fresh.exists()}", code, s)

    s = work / "changed"
    write_video(s.parent / "changed-videos" / "cam.mp4", seconds=60)
    video = s.parent / "changed-videos" / "cam.mp4"
    run("ingest", video, "--store", s)
    data = bytearray(video.read_bytes())
    middle = len(data) // 3  # inside the frames (mdat), before the index at the end
    data[middle:middle + 4096] = bytes(b ^ 0xFF for b in data[middle:middle + 4096])
    video.write_bytes(bytes(data))
    code, err = run("ingest", video, "--store", s)
    row("a video changed in the middle (4 KB flipped), re-ingested", lines(err, "changed", "done ", "cam"), code, s)

    print("| fault | what the user sees | exit | left on disk |\n|---|---|---|---|")
    for fault, shown, code, left in ROWS:
        print(f"| {fault} | {shown} | {code if code >= 0 else '-'} | {left} |")
    for mount in (work / "full", work / "ro"):
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)
    shutil.rmtree(work, ignore_errors=True)


class Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


if __name__ == "__main__":
    main()
