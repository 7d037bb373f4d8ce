"""The evaluation as one self-contained HTML file: the table with level labels, image grids
(original / disguised / reconstructed, per attack) as inline PNG, and plots (PSNR or SSIM against
pairs m, against noise, against InstaHide's T) as inline SVG. No scripts, no external resources."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import numpy as np

from ..home import atomic_write
from .common import LEVELS

VERDICT_COLOURS = {"holds": "#1a7f37", "partial": "#b35900", "broken": "#c62828"}
FIGURES = (
    "examiner_accuracy",
    "misusability",
    "psnr_db",
    "ssim",
    "block_hit_rate",
    "placement_accuracy",
    "repeat_rate",
    "chance",
)


def figure_text(row: dict) -> str:
    parts = []
    for k in FIGURES:
        if k in row and row[k] is not None:
            v = row[k]
            parts.append(f"{k.replace('_', ' ')} {v:.1f}" if k == "psnr_db" else f"{k.replace('_', ' ')} {v:.3f}")
    base = row.get("baseline")
    if base and "ssim" in base:
        parts.append(f"(no-attack guess: SSIM {base['ssim']:.3f})")
    return "; ".join(parts)


def setting_text(params: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in params.items())


def counts_text(counts: dict) -> str:
    """What the figures rest on, in words."""
    if not counts:
        return ""
    return (
        f"Plain images: {counts.get('plain', 0):,} ({counts.get('targets', 0):,} held-out targets, "
        f"{counts.get('pair_pool', 0):,} for known pairs, {counts.get('public', 0):,} unpaired); "
        f"{counts.get('cloud_rows', 0):,} rows of the disguised dataset as the cloud's view."
    )


def png_grid(rows: dict[str, np.ndarray], scale: int = 3) -> str:
    """Images (n, H, W, C) uint8 per row name -> a data: URI of one PNG grid (rows top to bottom)."""
    from PIL import Image

    rows = {k: v for k, v in rows.items() if v is not None and len(v)}
    n = min(len(v) for v in rows.values())
    h, w, c = next(iter(rows.values())).shape[1:]
    pad = 2
    grid = np.full((len(rows) * (h + pad), n * (w + pad), 3), 255, dtype=np.uint8)
    for r, imgs in enumerate(rows.values()):
        for i in range(n):
            img = imgs[i] if c == 3 else np.repeat(imgs[i][..., :1], 3, axis=2)
            grid[r * (h + pad) : r * (h + pad) + h, i * (w + pad) : i * (w + pad) + w] = img
    im = Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def svg_plot(
    series: dict[str, list[tuple[float, float]]],
    xlabel: str,
    ylabel: str,
    *,
    logx: bool = False,
    hline: tuple[float, str] | None = None,
) -> str:
    """A small line plot as inline SVG: series name -> [(x, y)]."""
    width, height, left, bottom, top, right = 420, 260, 52, 40, 14, 110
    pts = [p for s in series.values() for p in s]
    if not pts:
        return ""
    xs = [np.log10(max(x, 1e-9)) if logx else x for x, _ in pts]
    ys = [y for _, y in pts] + ([hline[0]] if hline else [])
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(0.0, min(ys)), max(ys) * 1.08 or 1.0
    x1 = x1 if x1 > x0 else x0 + 1

    def px(x):
        x = np.log10(max(x, 1e-9)) if logx else x
        return left + (x - x0) / (x1 - x0) * (width - left - right)

    def py(y):
        return height - bottom - (y - y0) / (y1 - y0) * (height - bottom - top)

    colours = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e"]
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-size="11">',
        f'<line x1="{left}" y1="{py(y0)}" x2="{width - right}" y2="{py(y0)}" stroke="#333"/>',
        f'<line x1="{left}" y1="{py(y0)}" x2="{left}" y2="{top}" stroke="#333"/>',
    ]
    for k in range(5):
        yv = y0 + (y1 - y0) * k / 4
        out.append(f'<text x="{left - 6}" y="{py(yv) + 4}" text-anchor="end">{yv:.3g}</text>')
    for x in sorted({x for x, _ in pts}):
        out.append(f'<text x="{px(x)}" y="{height - bottom + 15}" text-anchor="middle">{x:g}</text>')
    out.append(
        f'<text x="{(left + width - right) / 2}" y="{height - 6}" text-anchor="middle">{html.escape(xlabel)}</text>'
    )
    out.append(
        f'<text x="12" y="{(top + height - bottom) / 2}" transform="rotate(-90 12 '
        f'{(top + height - bottom) / 2})" text-anchor="middle">{html.escape(ylabel)}</text>'
    )
    if hline:
        out.append(
            f'<line x1="{left}" y1="{py(hline[0])}" x2="{width - right}" y2="{py(hline[0])}" '
            f'stroke="#999" stroke-dasharray="4 3"/><text x="{width - right + 4}" y="{py(hline[0]) + 4}" '
            f'fill="#666">{html.escape(hline[1])}</text>'
        )
    for n, (name, s) in enumerate(series.items()):
        col = colours[n % len(colours)]
        s = sorted(s)
        path = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in s)
        out.append(f'<polyline points="{path}" fill="none" stroke="{col}" stroke-width="2"/>')
        out += [f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3" fill="{col}"/>' for x, y in s]
        out.append(f'<text x="{width - right + 4}" y="{top + 14 * n + 10}" fill="{col}">{html.escape(name)}</text>')
    out.append("</svg>")
    return "".join(out)


def svg_scatter(points: list[dict], xlabel: str, ylabel: str) -> str:
    """Labelled points {x, y, label, mark}: marked points (the frontier) are filled and joined."""
    width, height, left, bottom, top, right = 560, 340, 52, 40, 14, 20
    if not points:
        return ""
    xs, ys = [p["x"] for p in points], [p["y"] for p in points]
    x0, x1 = min(0.0, min(xs)), max(1.0, max(xs))
    y0, y1 = min(0.0, min(ys)), max(1.0, max(ys))

    def px(x):
        return left + (x - x0) / (x1 - x0) * (width - left - right)

    def py(y):
        return height - bottom - (y - y0) / (y1 - y0) * (height - bottom - top)

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-size="10">',
        f'<line x1="{left}" y1="{py(y0)}" x2="{width - right}" y2="{py(y0)}" stroke="#333"/>',
        f'<line x1="{left}" y1="{py(y0)}" x2="{left}" y2="{top}" stroke="#333"/>',
    ]
    for k in range(6):
        v = k / 5
        out.append(
            f'<text x="{left - 6}" y="{py(y0 + (y1 - y0) * v) + 4}" text-anchor="end">{y0 + (y1 - y0) * v:.2g}</text>'
        )
        out.append(
            f'<text x="{px(x0 + (x1 - x0) * v)}" y="{height - bottom + 15}" text-anchor="middle">'
            f"{x0 + (x1 - x0) * v:.2g}</text>"
        )
    out.append(
        f'<text x="{(left + width - right) / 2}" y="{height - 6}" text-anchor="middle">{html.escape(xlabel)}</text>'
    )
    out.append(
        f'<text x="12" y="{(top + height - bottom) / 2}" transform="rotate(-90 12 '
        f'{(top + height - bottom) / 2})" text-anchor="middle">{html.escape(ylabel)}</text>'
    )
    front = sorted((p for p in points if p.get("mark")), key=lambda p: p["x"])
    if len(front) > 1:
        path = " ".join(f"{px(p['x']):.1f},{py(p['y']):.1f}" for p in front)
        out.append(f'<polyline points="{path}" fill="none" stroke="#d62728" stroke-width="1.5"/>')
    for p in points:
        fill = "#d62728" if p.get("mark") else "#fff"
        out.append(f'<circle cx="{px(p["x"]):.1f}" cy="{py(p["y"]):.1f}" r="4" fill="{fill}" stroke="#d62728"/>')
        out.append(f'<text x="{px(p["x"]) + 6:.1f}" y="{py(p["y"]) - 5:.1f}">{html.escape(p["label"])}</text>')
    out.append("</svg>")
    return "".join(out)


def plots(doc: dict) -> list[tuple[str, str]]:
    """(title, svg) for each sweep present in an evaluation's attacks."""
    found = []
    rows = doc.get("attacks", [])
    kpa = [(r["params"]["pairs"], r["psnr_db"]) for r in rows if r["attack"] == "kpa"]
    if kpa:
        found.append(
            (
                "Known-plaintext regression (level 2): PSNR against pairs m",
                svg_plot({"KPA PSNR (dB)": kpa}, "known pairs m", "PSNR (dB)", logx=True),
            )
        )
    cb = [(r["params"]["pairs"], r["block_hit_rate"]) for r in rows if r["attack"] == "codebook" and r["level"] == 2]
    if cb:
        found.append(
            (
                "AES codebook (level 2): held-out blocks recovered against pairs m",
                svg_plot({"block hit rate": cb}, "known pairs m", "block hit rate", logx=True),
            )
        )
    ih = [(r["params"]["encodings_per_image"], r["ssim"]) for r in rows if r["attack"] == "instahide"]
    ihb = [
        (r["params"]["encodings_per_image"], r["baseline"]["ssim"])
        for r in rows
        if r["attack"] == "instahide" and "baseline" in r
    ]
    if ih:
        found.append(
            (
                "InstaHide attack (level 1): best-match SSIM against encodings per image T",
                svg_plot({"attack": ih, "random match": ihb}, "encodings per image T", "SSIM"),
            )
        )
    return found


def render(doc: dict, samples: list[tuple[str, dict]], *, title: str = "dkit evaluate") -> str:
    """``doc``: Evaluation.to_dict() (or calibrate's); ``samples``: (caption, {row: images}) grids."""
    e = html.escape
    css = (
        "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;"
        "text-align:left;vertical-align:top}th{background:#f3f3f3}.v{font-weight:bold}"
        "figure{display:inline-block;margin:0 1.5em 1.5em 0}figcaption{font-size:0.9em;color:#444}"
        "code{background:#f4f4f4;padding:1px 4px}"
    )
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{e(title)}</title><style>{css}</style></head><body>",
        f"<h1>{e(title)}</h1>",
    ]
    parts.append(
        f"<p>Key ID <code>{e(str(doc.get('key_id')))}</code>, version {e(str(doc.get('key_version')))}: "
        f"<b>{e(doc.get('setting') or ' + '.join(doc.get('pipeline', [])))}</b>. "
        f"{e(counts_text(doc.get('counts') or {}))}</p>"
    )
    parts.append(
        "<p>A disguise is not encryption. <b>holds</b>: the attack did no better than a guess without "
        "it; <b>partial</b>: clearly better, not recognisable; <b>broken</b>: recognisable "
        "reconstructions (SSIM &ge; 0.5), or the key structure recovered.</p>"
    )
    parts.append(
        "<h2>Threat levels</h2><ul>"
        + "".join(f"<li><b>Level {k}</b>: {e(v)}</li>" for k, v in LEVELS.items())
        + "</ul>"
    )
    vp = doc.get("visual_privacy")
    if vp:
        parts.append(
            f"<p><b>Visual privacy</b> {vp['visual_privacy']:.3f} (examiner accuracy "
            f"{vp['examiner_accuracy']:.3f}, chance {vp['chance']:.3f})"
            + (f"; <b>model misusability</b> {doc['misusability']:.3f}" if doc.get("misusability") is not None else "")
            + ".</p>"
        )
    parts.append(
        "<h2>Attacks</h2><table><tr><th>attack</th><th>level</th><th>setting</th><th>figures</th>"
        "<th>verdict</th><th>note</th></tr>"
    )
    for r in doc["attacks"]:
        col = VERDICT_COLOURS.get(r["verdict"], "#333")
        parts.append(
            f"<tr><td>{e(r['attack'])}</td><td>{r['level']}</td><td>{e(setting_text(r['params']))}</td>"
            f"<td>{e(figure_text(r))}</td><td class='v' style='color:{col}'>{e(r['verdict'])}</td>"
            f"<td>{e(r.get('note', ''))}</td></tr>"
        )
    parts.append("</table>")
    figs = plots(doc) + list(doc.get("extra_plots", []))
    if figs:
        parts.append("<h2>Plots</h2>")
        parts += [f"<figure>{svg}<figcaption>{e(t)}</figcaption></figure>" for t, svg in figs]
    if samples:
        parts.append("<h2>Images</h2><p>Each grid: rows top to bottom as named; columns are held-out images.</p>")
        for caption, rows in samples:
            if rows:
                parts.append(
                    f"<figure><img alt='{e(caption)}' src='{png_grid(rows)}'>"
                    f"<figcaption>{e(caption)}: {e(' / '.join(rows))}</figcaption></figure>"
                )
    parts.append(
        "<p style='color:#777;font-size:0.85em'>Made by dkit. Figures are measured on held-out images; "
        "see SECURITY.md for what each mechanism does and does not protect.</p></body></html>"
    )
    return "\n".join(parts)


def write(path: str | Path, doc: dict, samples: list[tuple[str, dict]], *, title: str = "dkit evaluate") -> None:
    atomic_write(Path(path), render(doc, samples, title=title).encode(), mode=0o644)


def evaluation_samples(ev) -> list[tuple[str, dict]]:
    out = []
    for r in ev.results:
        if r.samples:
            setting = setting_text(r.params)
            out.append((f"{r.attack} (level {r.level}, {setting}): {r.verdict}", r.samples))
    return out


def render_calibration(doc: dict) -> str:
    e = html.escape
    pts = [
        {"x": r["privacy"], "y": r["utility"], "label": r["setting"], "mark": r["on_frontier"]} for r in doc["settings"]
    ]
    head = (
        "<!doctype html><html><head><meta charset='utf-8'><title>dkit calibrate</title><style>"
        "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}"
        "th{background:#f3f3f3}</style></head><body>"
    )
    parts = [
        head,
        f"<h1>dkit calibrate: {e(doc['pipeline'])} on {e(doc['shape'])}</h1>",
        f"<p>{doc['images']:,} images, {doc['epochs']} training epochs per setting. Utility: held-out "
        "accuracy of the model trained on the disguise. Privacy: 1 &minus; the best SSIM any attack reached "
        "on held-out images (levels 1 to 3), so each setting is as private as its weakest point.</p>",
        f"<p><b>Recommendation:</b> {e(doc['recommendation'])}</p>",
        "<figure>"
        + svg_scatter(pts, "privacy (1 - worst reconstruction SSIM)", "utility (held-out accuracy)")
        + "<figcaption>Filled points joined in red: the frontier (no other setting is better on both)."
        "</figcaption></figure>",
        "<table><tr><th>setting</th><th>utility</th><th>privacy</th><th>worst attack</th>"
        "<th>worst SSIM by level</th><th>visual privacy</th><th>misusability</th><th>frontier</th></tr>",
    ]
    for r in doc["settings"]:
        lv = ", ".join(f"L{k} {v:.2f}" for k, v in sorted(r["worst_ssim_by_level"].items()))
        vp = "" if r["visual_privacy"] is None else f"{r['visual_privacy']:.3f}"
        mis = "" if r["misusability"] is None else f"{r['misusability']:.3f}"
        parts.append(
            f"<tr><td>{e(r['setting'])}</td><td>{r['utility']:.3f}</td><td>{r['privacy']:.3f}</td>"
            f"<td>{e(str(r['worst_attack']))}</td><td>{e(lv)}</td><td>{vp}</td><td>{mis}</td>"
            f"<td>{'yes' if r['on_frontier'] else ''}</td></tr>"
        )
    parts.append("</table>")
    if doc.get("skipped"):
        parts.append("<p>Skipped: " + "; ".join(e(f"{s['setting']} ({s['reason']})") for s in doc["skipped"]) + "</p>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_calibration(path: str | Path, doc: dict) -> None:
    atomic_write(Path(path), render_calibration(doc).encode(), mode=0o644)
