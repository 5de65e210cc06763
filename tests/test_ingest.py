import pytest

from pipeline.ingest import ingest
from stages.ingest import BadVideo, probe_video
from store import read_videos

from conftest import run_cli, write_audio_only, write_video


def test_probe_reads_real_stream_facts(tmp_path):
    path = write_video(tmp_path / "clip.mp4", seconds=3, fps=10, size=(64, 48))
    row = probe_video(str(path))
    assert (row["frames"], row["fps"], row["width"], row["height"]) == (30, 10.0, 64, 48)
    assert row["duration_s"] == pytest.approx(3.0)
    assert row["codec"] == "h264" and row["status"] == "ok" and row["video_id"] == "clip"


@pytest.mark.parametrize("name,problem", [
    ("corrupt.mp4", "truncated: the file ends before the index (moov atom)"),
    ("truncated.mp4", "truncated: the file ends before the index (moov atom)"), ("empty.mp4", "empty file (0 bytes)"),
    ("notes.mp4", "not a video file (no container format recognised)"), ("missing.mp4", "file not found"),
    ("audio.mp4", "no video stream (audio only)"), ("folder.mp4", "a folder, not a video file"),
    ("loop.mp4", "symbolic link loop"), ("dangling.mp4", "broken symbolic link"),
])
def test_bad_files_get_one_line_errors_naming_the_file(bad_and_good_videos, name, problem):
    write_audio_only(bad_and_good_videos / "audio.mp4")
    (bad_and_good_videos / "folder.mp4").mkdir()
    (bad_and_good_videos / "loop.mp4").symlink_to(bad_and_good_videos / "loop.mp4")
    (bad_and_good_videos / "dangling.mp4").symlink_to(bad_and_good_videos / "gone.mp4")
    path = bad_and_good_videos / name
    with pytest.raises(BadVideo) as info:
        probe_video(str(path))
    message = str(info.value)
    assert message == f"{path}: {problem}"


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
    proc = run_cli("ingest", str(bad_and_good_videos), "--store", root, fresh=True)  # decoders' own lines too
    assert proc.returncode == 1  # some failed: the exit code says so
    assert "done 2" in proc.stderr and "failed 4" in proc.stderr
    status = run_cli("status", "--store", root, check=True).stdout
    assert "ingest" in status and " 2 " in status and " 4 " in status
    assert "ingest: 4 failed" in status and "empty file (0 bytes)" in status  # the first messages
    missing = run_cli("ingest", str(tmp_path / "nowhere"), "--store", root)
    assert missing.returncode == 2 and "nowhere" in missing.stderr


def test_a_folder_scan_reports_what_is_not_a_video_and_keeps_unicode_names(store, bad_and_good_videos):
    write_audio_only(bad_and_good_videos / "audio.mp4")
    (bad_and_good_videos / "folder.mp4").mkdir()
    (bad_and_good_videos / "loop.mp4").symlink_to(bad_and_good_videos / "loop.mp4")
    write_video(bad_and_good_videos / "vidéo ünï.mp4", seconds=2)
    summary = ingest(store, [str(bad_and_good_videos)])
    messages = sorted(f["message"] for f in store.failures("ingest"))
    assert summary.done == 3 and summary.failed == 7, messages
    assert any(m.endswith("folder.mp4: a folder, not a video file") for m in messages)
    assert any(m.endswith("loop.mp4: symbolic link loop") for m in messages)
    assert any(m.endswith("audio.mp4: no video stream (audio only)") for m in messages)
    assert any(v["uri"].endswith("vidéo ünï.mp4") for v in read_videos(store))


def test_a_change_in_the_middle_of_a_file_gives_a_new_content_id(store, tmp_path):
    """4 KB changed in the middle of a 3-MiB file, same size: the old id (size + first and last MiB) missed it."""
    import struct

    from store import sampled_digest
    import fsspec

    path = write_video(tmp_path / "v" / "clip.mp4", seconds=3)
    with open(path, "ab") as f:  # a `free` box that players skip, so the middle of the file is not the video
        f.write(struct.pack(">I", 8 + (3 << 20)) + b"free" + bytes(3 << 20))
    ingest(store, [str(path)])
    before = read_videos(store)[0]
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    old_sampled = sampled_digest(fsspec.filesystem("file"), str(path))
    data[middle:middle + 4096] = b"\xff" * 4096
    path.write_bytes(bytes(data))
    assert sampled_digest(fsspec.filesystem("file"), str(path)) == old_sampled  # what the old id saw
    import io

    said = io.StringIO()
    summary = ingest(store, [str(path)], stream=said)
    after = read_videos(store)[0]
    assert f"{path}: content changed since it was registered" in said.getvalue()
    assert summary.done == 1 and after["size_bytes"] == before["size_bytes"]
    assert after["content_id"] != before["content_id"]
    assert ingest(store, [str(path)]).skipped == 1  # unchanged since: not re-read, same id


def test_a_registry_from_before_full_hashing_keeps_its_ids_for_unchanged_files(store, tmp_path):
    import fsspec
    import pyarrow as pa

    from store import sampled_digest

    path = write_video(tmp_path / "v" / "clip.mp4", seconds=3)
    ingest(store, [str(path)])
    old = read_videos(store)[0]
    old_id = sampled_digest(fsspec.filesystem("file"), str(path))
    row = {**{k: v for k, v in old.items() if k != "mtime_ns"}, "content_id": old_id}
    store.write_table("videos.parquet", pa.Table.from_pylist([row]))  # the old schema: no mtime_ns
    assert read_videos(store)[0]["mtime_ns"] is None
    ingest(store, [str(path)])
    assert read_videos(store)[0]["content_id"] == old_id  # same file, same id: its outputs stand
    assert read_videos(store)[0]["mtime_ns"] == old["mtime_ns"]
