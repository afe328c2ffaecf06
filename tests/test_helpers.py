"""The shared helpers every command leans on: atomic writes, fingerprints, per-input error lines."""
import os
from pathlib import Path

import numpy as np
import pytest

from histodg import SlideError
from histodg.batch import BatchResult, bad_window, check_bad_windows, collected, recorded
from histodg.files import atomic_write, new_temporary, setting_diffs, source_fingerprint, write_json_atomic


def test_atomic_write_leaves_nothing_when_writing_fails(tmp_path):
    target = tmp_path / "done.json"
    write_json_atomic(target, {"a": 1})

    def broken(tmp):
        tmp.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(target, broken)
    assert target.read_text().strip().startswith("{") and '"a": 1' in target.read_text()  # old file kept
    assert sorted(os.listdir(tmp_path)) == ["done.json"]  # no temporary left behind
    tmp = new_temporary(target)
    assert tmp.name.startswith(".done.tmp-") and tmp.suffix == ".json"  # keeps the extension for format-picking writers


def test_setting_diffs_name_each_change_and_a_changed_source(tmp_path):
    src = tmp_path / "slide.tif"
    src.write_bytes(b"x" * 10)
    fp = source_fingerprint(src)
    assert setting_diffs({"mpp": 1.0}, {"mpp": 1.0}, fp, src) is None
    assert setting_diffs({"mpp": 1.0}, {"mpp": 0.5}, fp, src) == "mpp 1.0 -> 0.5"
    src.write_bytes(b"x" * 11)
    assert setting_diffs({"mpp": 1.0}, {"mpp": 1.0}, fp, src) == "the source file changed"


def test_collected_turns_bad_input_into_one_line_and_lets_bugs_through(tmp_path):
    errors = []
    with collected(errors, tmp_path / "a.svs"):
        raise SlideError(tmp_path / "a.svs", "not a slide")
    with collected(errors, tmp_path / "b.svs"):
        open(tmp_path / "b.svs")  # missing: an OSError names the file
    with collected(errors, tmp_path / "c.svs"):
        pass
    assert len(errors) == 2
    assert errors[0].startswith(str(tmp_path / "a.svs")) and "not a slide" in errors[0]
    assert errors[1].startswith(str(tmp_path / "b.svs")) and "No such file" in errors[1]
    with pytest.raises(ZeroDivisionError), collected(errors, "d"):
        1 / 0  # a bug is not a bad input: it is not swallowed
    assert len(errors) == 2


def test_recorded_fails_the_input_and_times_it(tmp_path):
    r = BatchResult("a", "a.svs", "done")
    with recorded(r, "a.svs"):
        raise SlideError("a.svs", "truncated")
    assert r.status == "failed" and r.error.startswith("a.svs") and r.seconds >= 0


def test_check_bad_windows_fails_only_above_the_fraction():
    bad = [bad_window((10, 20), "JPEG error")]
    assert bad == [{"x": 10, "y": 20, "reason": "JPEG error"}]
    check_bad_windows("s.svs", bad, total=10, max_fraction=0.1)  # 1 of 10 is allowed at 0.1
    with pytest.raises(SlideError, match="1 of 5 windows"):
        check_bad_windows("s.svs", bad, total=5, max_fraction=0.1)


def test_a_full_disk_names_the_output_not_the_input():
    import errno

    r = BatchResult("a", "a.svs", "done")
    with recorded(r, "slides/a.svs", out="preds/a"):
        raise OSError(errno.ENOSPC, "No space left on device")
    assert r.error == "preds/a: No space left on device (writing the output of slides/a.svs)"
    with recorded(r, "slides/a.svs", out="preds/a"):
        raise OSError(errno.EACCES, "Permission denied", "slides/a.svs")
    assert r.error == "slides/a.svs: Permission denied"


def _resident_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs Linux /proc")
def test_run_jobs_hands_a_finished_jobs_freed_memory_back(monkeypatch):
    """300 MB freed inside a job, with one block still held at the top of the heap (as a slide's
    leftovers pin it): glibc keeps the pages resident unless the batch loop trims them."""
    import ctypes

    from histodg import batch

    try:
        ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        pytest.skip("not glibc")
    kept = []

    def job(name, progress):
        blocks = [np.ones(100_000 // 8) for _ in range(3000)]  # heap-sized blocks (under the mmap threshold)
        kept.append(blocks[-1])
        del blocks
        return batch.BatchResult(name, name, "done")

    base = _resident_mb()
    batch.run_jobs(["a"], job)
    assert _resident_mb() - base < 100
    monkeypatch.setattr(batch, "release_memory", lambda: None)  # the loop without it keeps them
    base = _resident_mb()
    batch.run_jobs(["b"], job)
    assert _resident_mb() - base > 200
