"""`recap demo` end to end, on the tiny corpus (about a minute on 2 cores)."""

from store import Store

from conftest import run_cli


def test_a_demo_whose_unit_failed_before_finishes_with_retry_failed(tmp_path):
    """A unit that failed in an earlier run (here: as a worker killed past its retries leaves it, no marker, no output,
    a failure record) is skipped and named, and the demo exits 1; `--retry-failed` finishes it, with the captions a
    clean run wrote."""
    demo = ("demo", "--preset", "tiny", "--store", str(tmp_path / "store"), "--data", str(tmp_path / "data"))
    run_cli(*demo, check=True, fresh=True)
    store = Store(tmp_path / "store")
    version = store.read_json("current/versions.json")["clip"]
    unit = sorted(store.markers("captions", version))[0]
    output = f"captions/clip/{version}/{unit}.parquet"
    written = open(store.abs(output), "rb").read()
    store.remove(f"markers/captions/{version}/{unit}.json")
    store.remove(output)
    store.record_failure("captions", version, unit, "worker killed")

    again = run_cli(*demo, fresh=True)
    assert again.returncode == 1
    assert f"[captions] {unit}: failed before (worker killed); --retry-failed to try again" in again.stderr
    assert "[demo] stopped: 1 unit(s) of captions failed; `recap demo --retry-failed` tries them again" in again.stderr
    assert "[demo] train segment" not in again.stderr and not store.exists(output)

    retried = run_cli(*demo, "--retry-failed", fresh=True)
    assert retried.returncode == 0, retried.stderr[-2000:]
    assert open(store.abs(output), "rb").read() == written
