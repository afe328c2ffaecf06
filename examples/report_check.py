#!/usr/bin/env python
"""Open a `histodg predict` report.html in headless Chromium: check it sorts, keep a screenshot.

    python examples/report_check.py demo_out/predictions                      # after `make demo`
    python examples/report_check.py OUT_DIR --screenshot examples/report.png

Needs Chromium (`apt install chromium`). The page is opened with every host name unresolvable,
so anything it tried to fetch would be missing from the screenshot. Checks, in the page as the
browser built it: one row per slide of OUT_DIR/summary.json, a thumbnail for every slide that
is not failed, and `#sort=tumour` ordering the rows by tumour area.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--host-resolver-rules=MAP * ~NOTFOUND",
         "--virtual-time-budget=3000"]


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    raise SystemExit("error: no Chromium on PATH (apt install chromium)")


def rendered(browser: str, url: str) -> str:
    r = subprocess.run([browser, *FLAGS, "--dump-dom", url], capture_output=True, text=True, timeout=120)
    if r.returncode or "<table" not in r.stdout:
        raise SystemExit(f"error: {url}: Chromium did not render the page ({r.stderr.strip()[-300:]})")
    return r.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--screenshot", type=Path, default=None)
    args = ap.parse_args()
    page = (args.out_dir / "report.html").resolve()
    rows = [r for r in json.loads((args.out_dir / "summary.json").read_text()) if r.get("command") == "predict"]
    browser = chromium()
    dom = rendered(browser, page.as_uri() + "#sort=tumour")
    body = dom[dom.index("<tbody>"):dom.index("</tbody>")]
    trs = re.findall(r"<tr.*?</tr>", body, flags=re.S)
    assert len(trs) == len(rows), f"{len(trs)} rows in the page, {len(rows)} in summary.json"
    thumbs = sum("data:image/jpeg;base64," in tr for tr in trs)
    assert thumbs == sum(r["status"] != "failed" for r in rows), "a slide without its thumbnail"
    areas = [float(re.findall(r'<td class="n" data-v="([-0-9.e]+)"', tr)[0]) for tr in trs]
    assert areas == sorted(areas), f"#sort=tumour did not sort: {areas}"
    print(f"ok: {len(trs)} rows, {thumbs} thumbnails, sorted by tumour area in Chromium ({page})")
    if args.screenshot:
        args.screenshot.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([browser, *FLAGS, "--window-size=1100,760", f"--screenshot={args.screenshot.resolve()}",
                        page.as_uri()], check=True, capture_output=True, timeout=120)
        print(f"screenshot: {args.screenshot}")


if __name__ == "__main__":
    sys.exit(main())
