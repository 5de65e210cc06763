import pytest

from pipeline.ingest import ingest
from stages.ingest import BadVideo, probe_video
from store import read_videos

from conftest import run_cli, write_video


def test_probe_reads_real_stream_facts(tmp_path):
    path = write_video(tmp_path / "clip.mp4", seconds=3, fps=10, size=(64, 48))
    row = probe_video(str(path))
    assert (row["frames"], row["fps"], row["width"], row["height"]) == (30, 10.0, 64, 48)
    assert row["duration_s"] == pytest.approx(3.0)
    assert row["codec"] == "h264" and row["status"] == "ok" and row["video_id"] == "clip"


@pytest.mark.parametrize("name,problem", [
    ("corrupt.mp4", "not a readable video"), ("truncated.mp4", "truncated"), ("empty.mp4", "empty file"),
    ("notes.mp4", "not a readable video"), ("missing.mp4", "file not found"),
])
def test_bad_files_get_one_line_errors_naming_the_file(bad_and_good_videos, name, problem):
    path = bad_and_good_videos / name
    with pytest.raises(BadVideo) as info:
        probe_video(str(path))
    message = str(info.value)
    assert message.startswith(str(path)) and problem in message and "\n" not in message


def test_ingest_registers_good_files_and_records_bad_ones(store, bad_and_good_videos):
    summary = ingest(store, [str(bad_and_good_videos)])
    assert (summary.done, summary.failed) == (2, 4)
    assert [v["video_id"] for v in read_videos(store)] == ["good_a", "good_b"]
    failures = {f["unit"]: f for f in store.failures("ingest")}
    assert set(failures) == {"corrupt", "truncated", "empty", "notes"}
    assert all(f["attempts"] == 1 and str(bad_and_good_videos) in f["message"] for f in failures.values())

    again = ingest(store, [str(bad_and_good_videos)])  # idempotent: nothing new, failures counted again
    assert (again.done, again.skipped, again.failed) == (0, 2, 4)
    assert {f["attempts"] for f in store.failures("ingest")} == {2}


def test_fixed_file_clears_its_failure(store, bad_and_good_videos):
    ingest(store, [str(bad_and_good_videos)])
    write_video(bad_and_good_videos / "empty.mp4", seconds=2)
    summary = ingest(store, [str(bad_and_good_videos)])
    assert summary.done == 1 and "empty" in [v["video_id"] for v in read_videos(store)]
    assert "empty" not in {f["unit"] for f in store.failures("ingest")}


def test_changed_file_updates_its_row(store, tmp_path):
    path = write_video(tmp_path / "v.mp4", seconds=2)
    ingest(store, [str(path)])
    write_video(path, seconds=4)
    summary = ingest(store, [str(path)])
    assert summary.done == 1 and read_videos(store)[0]["duration_s"] == pytest.approx(4.0)


def test_same_stem_in_two_folders_is_refused_not_overwritten(store, tmp_path):
    a = write_video(tmp_path / "a" / "cam.mp4")
    b = write_video(tmp_path / "b" / "cam.mp4")
    summary = ingest(store, [str(a), str(b)])
    assert summary.failed == 1 and read_videos(store)[0]["uri"] == str(a)
    assert "already taken" in store.failures("ingest")[0]["message"]


def test_list_file_source(store, tmp_path):
    a = write_video(tmp_path / "x1.mp4")
    listing = tmp_path / "videos.txt"
    listing.write_text(f"# my videos\n{a}\n{tmp_path / 'gone.mp4'}\n")
    summary = ingest(store, [str(listing)])
    assert (summary.done, summary.failed) == (1, 1)


def test_cli_ingest_and_status(tmp_path, bad_and_good_videos):
    root = str(tmp_path / "cli-store")
    proc = run_cli("ingest", str(bad_and_good_videos), "--store", root)
    assert proc.returncode == 1  # some failed: the exit code says so
    assert "done 2" in proc.stderr and "failed 4" in proc.stderr
    status = run_cli("status", "--store", root, check=True).stdout
    assert "ingest" in status and " 2 " in status and " 4 " in status
    assert "ingest: 4 failed" in status and "empty file (0 bytes)" in status  # the first messages
    missing = run_cli("ingest", str(tmp_path / "nowhere"), "--store", root)
    assert missing.returncode == 2 and "nowhere" in missing.stderr
