"""`OUT_DIR/report.html`: every slide of a predict batch on one page a pathologist can scan.

One self-contained file (thumbnails inlined as JPEG data URIs, the styles and the few lines of
script that sort the table in the page itself: nothing is fetched, so it opens from a share, an
e-mail or an air-gapped workstation). Per slide: the overlay thumbnail, name, status, tumour
area, windows, seconds and the error or note; failed slides first. A column header sorts by it
(again: the other way), as does `report.html#sort=tumour` in the address; the box filters by
name, status or error. Made from the batch's summary rows,
so it covers every slide of the output folder, also those of earlier runs and other shards.
"""
from __future__ import annotations

import base64
import html
import io
import time
from pathlib import Path

from ..files import write_text_atomic

THUMB_PX = 160  # the longer side of a thumbnail in the report

STYLE = """body{font:14px system-ui,sans-serif;margin:1.5em;color:#222}
h1{font-size:1.3em;margin:0 0 .3em}p.meta{color:#666;margin:0 0 1em}
input{font:inherit;padding:.3em .5em;width:22em;margin-bottom:.8em}
table{border-collapse:collapse}th,td{border-bottom:1px solid #ddd;padding:.35em .7em;text-align:left;vertical-align:middle}
th{cursor:pointer;background:#f4f4f4;position:sticky;top:0;user-select:none}th:hover{background:#e8e8e8}
td.n{text-align:right;font-variant-numeric:tabular-nums}img{display:block;max-width:160px;max-height:160px}
.failed{color:#b00020;font-weight:600}.done{color:#1b7f3b}.skipped{color:#555}tr.failed-row{background:#fff3f3}
.msg{max-width:28em;font-size:.92em;color:#555}td.warn{color:#a15c00;font-weight:600;background:#fff6e0}"""

SCRIPT = """function sortBy(th){const t=th.closest('table'),i=[...th.parentNode.children].indexOf(th),
b=t.tBodies[0],up=th.dataset.dir!=='up';th.dataset.dir=up?'up':'down';
const key=r=>{const c=r.children[i],v=c.dataset.v??c.textContent.trim(),n=parseFloat(v);return isNaN(n)?v.toLowerCase():n};
[...b.rows].sort((a,c)=>{const x=key(a),y=key(c);return (x<y?-1:x>y?1:0)*(up?1:-1)}).forEach(r=>b.appendChild(r))}
function filt(q){q=q.toLowerCase();for(const r of document.querySelectorAll('tbody tr'))
r.style.display=r.textContent.toLowerCase().includes(q)?'':'none'}
addEventListener('load',()=>{const m=location.hash.match(/^#sort=(.+)$/);if(!m)return;const q=decodeURIComponent(m[1]).toLowerCase();
for(const th of document.querySelectorAll('th'))if(th.textContent.toLowerCase().startsWith(q)){sortBy(th);break}})"""

HEADERS = ("overlay", "slide", "status", "tumour mm²", "region mm²", "windows", "QC excluded mm²", "domain shift", "seconds",
           "error / note")


def thumbnail_uri(path: Path, size: int = THUMB_PX) -> str | None:
    """An image file as a small JPEG data URI, or None when it cannot be read."""
    from PIL import Image

    try:
        with Image.open(path) as source:
            im = source.convert("RGB")
            im.thumbnail((size, size))
            buf = io.BytesIO()
            im.save(buf, "JPEG", quality=80)
    except (OSError, ValueError):
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _cell(value, numeric: bool = False, digits: int = 1) -> str:
    if value in (None, ""):
        return '<td class="n" data-v="-1"></td>' if numeric else "<td></td>"
    if numeric:
        v = float(value)
        return f'<td class="n" data-v="{v}">{v:.{digits}f}</td>' if digits else f'<td class="n" data-v="{v}">{int(v)}</td>'
    return f"<td>{html.escape(str(value))}</td>"


def _row(row: dict, out_dir: Path) -> str:
    status = str(row.get("status", ""))
    overlay = Path(row["out_dir"]) / "overlay.png" if row.get("out_dir") else out_dir / str(row.get("name")) / "overlay.png"
    uri = thumbnail_uri(overlay) if status != "failed" else None
    img = f'<img src="{uri}" alt="overlay of {html.escape(str(row.get("name")))}">' if uri else ""
    message = row.get("error") or row.get("note") or ""
    return (f'<tr class="{"failed-row" if status == "failed" else ""}"><td data-v="">{img}</td>'
            f"{_cell(row.get('name'))}<td class=\"{html.escape(status)}\">{html.escape(status)}</td>"
            f"{_cell(row.get('tumor_area_mm2'), True, 2)}{_cell(row.get('roi_area_mm2'), True, 2)}"
            f"{_cell(None if status == 'failed' else row.get('windows'), True, 0)}"
            f"{_cell(row.get('qc_area_mm2'), True, 2)}{_shift_cell(row)}{_cell(row.get('seconds'), True, 1)}"
            f"<td class=\"msg\">{html.escape(str(message))}</td></tr>")


def _shift_cell(row: dict) -> str:
    """The domain-shift score (x the farthest training slide), marked when it warns."""
    score = row.get("shift_score")
    if score in (None, ""):
        return '<td class="n" data-v="-1"></td>'
    warn = str(row.get("shift_warn")).lower() == "true"
    title = html.escape(f"nearest training domain: {row.get('shift_nearest')}; farther than {row.get('shift_percentile')}% "
                        f"of the training slides")
    return (f'<td class="n{" warn" if warn else ""}" data-v="{float(score)}" title="{title}">'
            f'{float(score):.2f}{" ⚠" if warn else ""}</td>')


def report_html(rows: list[dict], out_dir: Path, title: str = "histodg predict") -> str:
    rows = [r for r in rows if r.get("command") == "predict"]
    counts = {s: sum(r.get("status") == s for r in rows) for s in ("done", "skipped", "failed")}
    head = "".join(f"<th onclick=\"sortBy(this)\">{html.escape(h)}</th>" for h in HEADERS)
    body = "\n".join(_row(r, out_dir) for r in rows)
    meta = (f"{len(rows)} slide(s): {counts['done']} done, {counts['skipped']} skipped, {counts['failed']} failed"
            f" &middot; {html.escape(str(out_dir))} &middot; {time.strftime('%Y-%m-%d %H:%M')}")
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1><p class=\"meta\">{meta}</p>"
            f"<input type=\"search\" placeholder=\"filter by name, status, error\" oninput=\"filt(this.value)\">"
            f"<table><thead><tr>{head}</tr></thead><tbody>\n{body}\n</tbody></table>"
            f"<script>{SCRIPT}</script></body></html>\n")


def write_report(out_dir, rows: list[dict]) -> Path:
    """Write `OUT_DIR/report.html` (atomically) from the summary rows."""
    out_dir = Path(out_dir)
    return write_text_atomic(out_dir / "report.html", report_html(rows, out_dir))
