"""The batch report on disk: summary.csv / summary.json of tile and predict, and predict's report.html."""
from __future__ import annotations

import csv
import json
import multiprocessing as mp
import re
from pathlib import Path

import pytest

from helpers import tiny_checkpoint
from histodg.batch import BatchResult
from histodg.summary import BatchSummary, merged, result_row

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_a_rerun_updates_the_rows_it_redid_and_keeps_the_others():
    first = [result_row("tile", BatchResult("b", "b.svs", "done", seconds=12.0)),
             result_row("tile", BatchResult("a", "a.svs", "failed", error="a.svs: truncated"))]
    rows = []
    for r in first:
        rows = merged(rows, r)
    assert [r["name"] for r in rows] == ["a", "b"]  # failed first
    # the rerun: a is fixed and done, b is skipped (its output exists): b keeps its first row
    rows = merged(rows, result_row("tile", BatchResult("a", "a.svs", "done", seconds=3.0)))
    rows = merged(rows, result_row("tile", BatchResult("b", "b.svs", "skipped")))
    assert [(r["name"], r["status"], r["seconds"]) for r in rows] == [("a", "done", 3.0), ("b", "done", 12.0)]
    # a skipped input with no row yet gets one; another command's row of the same name is its own
    rows = merged(rows, result_row("tile", BatchResult("c", "c.svs", "skipped", note="locked by host:1")))
    rows = merged(rows, result_row("predict", BatchResult("a", "a.svs", "failed", error="x")))
    assert [(r["command"], r["name"], r["status"]) for r in rows] == [
        ("predict", "a", "failed"), ("tile", "a", "done"), ("tile", "b", "done"), ("tile", "c", "skipped")]


def _add_many(out_dir: str, who: int, n: int) -> None:
    summary = BatchSummary(out_dir, "tile")
    for i in range(n):
        summary.add(BatchResult(f"w{who}-{i:02d}", "x", "done"))


def test_two_processes_writing_one_summary_lose_no_row(tmp_path):
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_add_many, args=(str(tmp_path), w, 15)) for w in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    rows = json.loads((tmp_path / "summary.json").read_text())
    assert len(rows) == 30 and len({r["name"] for r in rows}) == 30
    assert len(_csv(tmp_path / "summary.csv")) == 30


def test_tile_writes_the_summary_and_a_rerun_updates_it(cli, cmu, bad_dir, tmp_path):
    bad = bad_dir / "not_a_slide.svs"
    r = cli("tile", cmu, bad, "-o", tmp_path, "--tile-size", "128", "--mpp", "2")
    assert r.exit_code == 1
    rows = _csv(tmp_path / "summary.csv")
    assert [(x["name"], x["status"]) for x in rows] == [("not_a_slide", "failed"), ("cmu_small_region", "done")]
    assert rows[0]["error"].startswith(str(bad)) and rows[0]["error"] in r.stderr
    assert int(rows[1]["patches"]) > 0 and float(rows[1]["tissue_area_mm2"]) > 0
    assert list(rows[0])[:6] == ["command", "name", "status", "error", "note", "source"]
    done_before = rows[1]["finished"], rows[1]["seconds"]
    r = cli("tile", cmu, "-o", tmp_path, "--tile-size", "128", "--mpp", "2")
    assert r.exit_code == 0
    rows = json.loads((tmp_path / "summary.json").read_text())
    assert [(x["name"], x["status"]) for x in rows] == [("not_a_slide", "failed"), ("cmu_small_region", "done")]
    assert (rows[1]["finished"], str(rows[1]["seconds"])) == done_before  # skipped: the row of the run that made it


def test_predict_report_is_one_self_contained_page(cli, cmu, bad_dir, tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "tiny.pt")
    bad = bad_dir / "not_a_slide.svs"
    r = cli("predict", ckpt, cmu, bad, "-o", tmp_path / "out")
    assert r.exit_code == 1
    page = (tmp_path / "out" / "report.html").read_text()
    assert "<script" in page and "sortBy" in page and 'type="search"' in page
    assert not re.search(r"(src|href)=\"(https?:)?//", page) and "http://" not in page and "https://" not in page
    images = re.findall(r'<img src="data:image/jpeg;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) == 1  # the done slide's overlay, inlined; the failed one has none
    import base64
    import io

    from PIL import Image

    assert max(Image.open(io.BytesIO(base64.b64decode(images[0]))).size) <= 160
    failed_at, done_at = page.index("not_a_slide"), page.index("cmu_small_region")
    assert failed_at < done_at and "failed-row" in page  # failed slides first
    assert "2 slide(s): 1 done, 0 skipped, 1 failed" in page
    rows = _csv(tmp_path / "out" / "summary.csv")
    assert rows[1]["name"] == "cmu_small_region" and float(rows[1]["tumor_area_mm2"]) >= 0 and int(rows[1]["windows"]) > 0
