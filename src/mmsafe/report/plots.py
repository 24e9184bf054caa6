"""Plot specs -> small inline SVG, with every label escaped.

Checks describe plots as JSON-able dicts (``{"kind": "bar", ...}``) so the card keeps the data
and any front end can redraw it. This module draws them as self-contained SVG without a plotting
library: it is fast (the report adds milliseconds to an audit) and safe, since every string that
reaches the SVG passes through :func:`html.escape`.

Kinds: ``reliability``, ``bar``, ``heatmap``, ``line``, and the HTML kinds ``table`` (example
rows), ``images`` (a gallery of small base64 PNGs, e.g. anomaly maps over images) and
``tokens`` (texts with each word highlighted by a signed score, e.g. text attributions).

Example:
    >>> svg = render_plot({"kind": "bar", "title": "<b>", "labels": ["a"], "values": [0.5]})
    >>> "<b>" in svg, "&lt;b&gt;" in svg
    (False, True)
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from html import escape
from typing import Any

import numpy as np

W, H = 420, 300
LEFT, RIGHT, TOP, BOTTOM = 50, 15, 30, 55
ACCENT, MUTED, BAD = "#3465a4", "#888", "#cc3333"


def _e(x: Any) -> str:
    return escape(str(x), quote=True)


def _svg(body: list[str], title: str, width: int = W, height: int = H) -> str:
    head = (
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" '
        f'width="{width}" height="{height}" role="img" aria-label="{_e(title)}" '
        'font-family="sans-serif" font-size="11">'
        f'<text x="{width / 2}" y="16" text-anchor="middle" font-size="13">{_e(title)}</text>'
    )
    return head + "".join(body) + "</svg>"


def _axes(y0: float, y1: float, ylabel: str = "", xlabel: str = "") -> list[str]:
    pw, ph = W - LEFT - RIGHT, H - TOP - BOTTOM
    out = [
        f'<line x1="{LEFT}" y1="{TOP + ph}" x2="{LEFT + pw}" y2="{TOP + ph}" stroke="#333"/>',
        f'<line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{TOP + ph}" stroke="#333"/>',
    ]
    for i in range(6):
        v = y0 + (y1 - y0) * i / 5
        y = TOP + ph - ph * i / 5
        out.append(f'<text x="{LEFT - 4}" y="{y + 4}" text-anchor="end">{v:.2g}</text>')
        out.append(f'<line x1="{LEFT}" y1="{y}" x2="{LEFT + pw}" y2="{y}" stroke="#eee"/>')
    if ylabel:
        out.append(
            f'<text transform="translate(12,{TOP + ph / 2}) rotate(-90)" '
            f'text-anchor="middle">{_e(ylabel)}</text>'
        )
    if xlabel:
        out.append(
            f'<text x="{LEFT + pw / 2}" y="{H - 6}" text-anchor="middle">{_e(xlabel)}</text>'
        )
    return out


def _scale(v: float, lo: float, hi: float, length: float) -> float:
    return 0.0 if hi == lo else (v - lo) / (hi - lo) * length


def reliability_svg(spec: Mapping[str, Any]) -> str:
    """Accuracy per confidence bin against the diagonal, with bin counts as a shaded strip."""
    edges = spec["bin_edges"]
    pw, ph = W - LEFT - RIGHT, H - TOP - BOTTOM
    body = _axes(0.0, 1.0, "accuracy", "confidence")
    body.append(
        f'<line x1="{LEFT}" y1="{TOP + ph}" x2="{LEFT + pw}" y2="{TOP}" '
        f'stroke="{MUTED}" stroke-dasharray="4 3"/>'
    )
    counts = spec.get("count") or [0] * (len(edges) - 1)
    top = max(counts) or 1
    for i, (acc, conf) in enumerate(zip(spec["accuracy"], spec["confidence"], strict=True)):
        x = LEFT + edges[i] * pw
        bw = (edges[i + 1] - edges[i]) * pw
        if counts[i]:
            shade = 0.15 + 0.5 * counts[i] / top
            body.append(
                f'<rect x="{x:.1f}" y="{TOP + ph + 4}" width="{bw:.1f}" height="8" '
                f'fill="{ACCENT}" opacity="{shade:.2f}"><title>{counts[i]} rows</title></rect>'
            )
        if acc is None or conf is None:
            continue
        ya, yc = TOP + ph - acc * ph, TOP + ph - conf * ph
        body.append(
            f'<rect x="{x + 1:.1f}" y="{ya:.1f}" width="{max(bw - 2, 1):.1f}" '
            f'height="{acc * ph:.1f}" fill="{ACCENT}" opacity="0.8">'
            f"<title>acc {acc:.3f}, conf {conf:.3f}, n {counts[i]}</title></rect>"
        )
        gap_top, gap_h = min(ya, yc), abs(ya - yc)
        body.append(
            f'<rect x="{x + 1:.1f}" y="{gap_top:.1f}" width="{max(bw - 2, 1):.1f}" '
            f'height="{gap_h:.1f}" fill="{BAD}" opacity="0.35"/>'
        )
    return _svg(body, spec.get("title", "Reliability diagram"))


def bar_svg(spec: Mapping[str, Any]) -> str:
    """Vertical bars, one per label, with an optional horizontal reference line."""
    labels: Sequence[Any] = spec["labels"]
    values = [math.nan if v is None else float(v) for v in spec["values"]]
    finite = [v for v in values if math.isfinite(v)] or [0.0]
    lo, hi = spec.get("ylim") or [min(0.0, *finite), max(finite) * 1.1 or 1.0]
    pw, ph = W - LEFT - RIGHT, H - TOP - BOTTOM
    body = _axes(lo, hi, spec.get("ylabel", ""), spec.get("xlabel", ""))
    n = max(len(labels), 1)
    bw = pw / n
    for i, (label, v) in enumerate(zip(labels, values, strict=True)):
        x = LEFT + i * bw
        name = _e(label)
        body.append(
            f'<text transform="translate({x + bw / 2:.1f},{TOP + ph + 12}) rotate(30)" '
            f'font-size="10">{name[:24]}</text>'
        )
        if not math.isfinite(v):
            continue
        h = _scale(v, lo, hi, ph)
        body.append(
            f'<rect x="{x + bw * 0.15:.1f}" y="{TOP + ph - h:.1f}" width="{bw * 0.7:.1f}" '
            f'height="{h:.1f}" fill="{ACCENT}"><title>{name}: {v:.4g}</title></rect>'
        )
    ref = spec.get("reference")
    if ref is not None and math.isfinite(ref):
        y = TOP + ph - _scale(ref, lo, hi, ph)
        body.append(
            f'<line x1="{LEFT}" y1="{y:.1f}" x2="{LEFT + pw}" y2="{y:.1f}" stroke="{BAD}" '
            f'stroke-dasharray="5 3"><title>{_e(spec.get("reference_label", ""))}: '
            f"{ref:.4g}</title></line>"
        )
    return _svg(body, spec.get("title", ""))


def heatmap_svg(spec: Mapping[str, Any]) -> str:
    """A matrix of values (rows x columns) as coloured cells with their numbers."""
    rows, cols, values = spec["rows"], spec["columns"], spec["values"]
    flat = [v for r in values for v in r if v is not None and math.isfinite(v)] or [0.0]
    lo, hi = spec.get("vlim") or [min(flat), max(flat)]
    left, top = 110, 30
    cw = max(24, min(60, (W - left - 10) // max(len(cols), 1)))
    ch = 18
    width, height = left + cw * len(cols) + 10, top + ch * len(rows) + 30
    body = []
    for j, c in enumerate(cols):
        body.append(
            f'<text x="{left + j * cw + cw / 2}" y="{top - 4}" text-anchor="middle">{_e(c)}</text>'
        )
    for i, r in enumerate(rows):
        y = top + i * ch
        body.append(f'<text x="{left - 4}" y="{y + 13}" text-anchor="end">{_e(r)}</text>')
        for j, v in enumerate(values[i]):
            if v is None or not math.isfinite(v):
                continue
            t = 0.0 if hi == lo else (v - lo) / (hi - lo)
            color = f"rgb({int(255 - 200 * t)},{int(255 - 140 * t)},255)"
            body.append(
                f'<rect x="{left + j * cw}" y="{y}" width="{cw - 1}" height="{ch - 1}" '
                f'fill="{color}"><title>{_e(r)} / {_e(cols[j])}: {v:.4g}</title></rect>'
                f'<text x="{left + j * cw + cw / 2}" y="{y + 13}" text-anchor="middle" '
                f'font-size="10">{v:.2f}</text>'
            )
    return _svg(body, spec.get("title", ""), width, height)


def line_svg(spec: Mapping[str, Any]) -> str:
    """One or more series ``{"name", "x", "y"}`` on shared axes."""
    series = spec["series"]
    xs = [x for s in series for x in s["x"]] or [0.0, 1.0]
    ys = [y for s in series for y in s["y"] if y is not None] or [0.0, 1.0]
    x0, x1 = min(xs), max(xs)
    y0, y1 = spec.get("ylim") or [min(ys), max(ys)]
    pw, ph = W - LEFT - RIGHT, H - TOP - BOTTOM
    body = _axes(y0, y1, spec.get("ylabel", ""), spec.get("xlabel", ""))
    palette = [ACCENT, BAD, "#4e9a06", "#c4a000", "#75507b", "#ce5c00"]
    for k, s in enumerate(series):
        pts = [
            f"{LEFT + _scale(x, x0, x1, pw):.1f},{TOP + ph - _scale(y, y0, y1, ph):.1f}"
            for x, y in zip(s["x"], s["y"], strict=True)
            if y is not None
        ]
        color = palette[k % len(palette)]
        body.append(
            f'<polyline points="{" ".join(pts)}" fill="none" stroke="{color}" stroke-width="2">'
            f"<title>{_e(s.get('name', ''))}</title></polyline>"
        )
        body.append(
            f'<text x="{LEFT + pw - 4}" y="{TOP + 12 + 13 * k}" text-anchor="end" '
            f'fill="{color}">{_e(s.get("name", ""))}</text>'
        )
    return _svg(body, spec.get("title", ""))


TABLE_ROWS_SHOWN = 15
"""Rows a table shows before the rest collapse behind a "show more" toggle."""


def table_html(spec: Mapping[str, Any]) -> str:
    """A small HTML table ``{"columns": [...], "rows": [[...], ...]}`` with every cell escaped.

    Rows past :data:`TABLE_ROWS_SHOWN` are collapsed into a ``<details>`` below the table.

    Example:
        >>> html = table_html({"columns": ["a"], "rows": [[i] for i in range(20)]})
        >>> html.count("<tr>"), "5 more rows" in html
        (22, True)
    """
    head = "<tr>" + "".join(f"<th>{_e(c)}</th>" for c in spec["columns"]) + "</tr>"
    rows = [
        "<tr>" + "".join(f"<td>{_e(_cell(v))}</td>" for v in row) + "</tr>" for row in spec["rows"]
    ]
    title = f"<caption>{_e(spec.get('title', ''))}</caption>" if spec.get("title") else ""
    shown, rest = rows[:TABLE_ROWS_SHOWN], rows[TABLE_ROWS_SHOWN:]
    html = f'<table class="examples">{title}{head}{"".join(shown)}</table>'
    if rest:
        html += (
            f"<details><summary>{len(rest)} more rows</summary>"
            f'<table class="examples">{head}{"".join(rest)}</table></details>'
        )
    return html


CAPTIONS: dict[str, str] = {
    "table": "Rows as the check reported them; the first rows are shown, the rest fold away.",
    "reliability": "Accuracy per confidence bin against the dashed diagonal: bins below it are "
    "over-confident, above it under-confident; the strip counts the rows per bin.",
    "bar": "One bar per item: compare heights (the axis says which way is better).",
    "heatmap": "Each cell's colour and number give its value; rows and columns name what is "
    "compared.",
    "line": "Each line is one series across the x axis: look for where it rises or falls.",
    "images": "Thumbnails of the cases the check points at, captioned with what it found.",
    "tokens": "Words are tinted by their attribution: red pushes toward the prediction, blue "
    "away from it.",
}
"""How to read each plot kind, in one line (a spec's own ``caption`` takes precedence)."""


def plot_caption(spec: Mapping[str, Any]) -> str:
    """The one-line "how to read it" caption of a plot spec.

    Example:
        >>> plot_caption({"kind": "bar"})[:10], plot_caption({"kind": "bar", "caption": "x"})
        ('One bar pe', 'x')
    """
    return str(spec.get("caption") or CAPTIONS.get(str(spec.get("kind")), ""))


_BASE64 = re.compile(r"^[A-Za-z0-9+/]*={0,2}$")


def images_html(spec: Mapping[str, Any]) -> str:
    """A gallery ``{"items": [{"png": <base64 PNG>, "caption": str}, ...]}`` of small pictures.

    Only well-formed base64 is embedded (as a ``data:image/png`` URL); captions are escaped.

    Example:
        >>> html = images_html({"title": "t", "items": [{"png": "iVBO", "caption": "<x>"}]})
        >>> "data:image/png;base64,iVBO" in html and "&lt;x&gt;" in html
        True
    """
    figures = []
    for item in spec.get("items", []):
        png = str(item.get("png", ""))
        img = (
            f'<img alt="" src="data:image/png;base64,{png}" style="image-rendering:pixelated">'
            if _BASE64.match(png)
            else "<span>(invalid image)</span>"
        )
        figures.append(
            f"<figure>{img}<figcaption>{_e(item.get('caption', ''))}</figcaption></figure>"
        )
    title = f"<h4>{_e(spec['title'])}</h4>" if spec.get("title") else ""
    return f'<div class="gallery">{title}{"".join(figures)}</div>'


def tokens_html(spec: Mapping[str, Any]) -> str:
    """Highlighted texts ``{"items": [{"caption", "tokens": [str], "scores": [float]}, ...]}``.

    Each token's background is red for a positive score and blue for a negative one, its
    opacity the score over the item's largest absolute score; tokens and captions are escaped.

    Example:
        >>> item = {"caption": "c", "tokens": ["<b>", "x"], "scores": [1, -0.5]}
        >>> html = tokens_html({"items": [item]})
        >>> "&lt;b&gt;" in html, "rgba(204,51,51,0.80)" in html, "rgba(52,101,164,0.40)" in html
        (True, True, True)
    """
    blocks = []
    for item in spec.get("items", []):
        tokens = [str(t) for t in item.get("tokens", [])]
        scores = [0.0 if s is None else float(s) for s in item.get("scores", [])]
        scores = [s if math.isfinite(s) else 0.0 for s in scores]
        top = max((abs(s) for s in scores), default=0.0) or 1.0
        spans = []
        for tok, s in zip(tokens, scores, strict=True):
            rgb = "204,51,51" if s >= 0 else "52,101,164"
            spans.append(
                f'<span style="background:rgba({rgb},{0.8 * abs(s) / top:.2f})" '
                f'title="{s:+.4g}">{_e(tok)}</span>'
            )
        blocks.append(f"<p>{' '.join(spans)}<br><small>{_e(item.get('caption', ''))}</small></p>")
    title = f"<h4>{_e(spec['title'])}</h4>" if spec.get("title") else ""
    return f'<div class="tokens">{title}{"".join(blocks)}</div>'


def png_base64(pixels: np.ndarray, scale: int = 1) -> str:
    """Encode an ``(H, W, 3)`` uint8 array as a base64 PNG, upscaled ``scale`` times (nearest).

    Example:
        >>> png_base64(np.zeros((2, 2, 3), dtype=np.uint8), scale=2)[:8]
        'iVBORw0K'
    """
    import base64
    import io

    from PIL import Image

    img = Image.fromarray(np.ascontiguousarray(pixels, dtype=np.uint8))
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


THUMBNAIL_SIDE = 96
"""The height, in pixels, of the pictures in a card's galleries (a 32-px image shown 3x)."""


def thumbnail_png(pixels: np.ndarray, side: int = THUMBNAIL_SIDE) -> str:
    """A base64 PNG of an ``(H, W, 3)`` uint8 picture about ``side`` pixels high, any resolution.

    A picture lower than ``side`` is enlarged by the whole factor ``side // H`` (nearest
    neighbour, so pixels stay crisp: a 32-px image is shown 3x, 96 px high, as before); a higher
    one is shrunk to ``side`` pixels high (antialiased, aspect kept), so a card of 250-px photos
    stays as small as one of 32-px images.

    Example:
        >>> import base64, io
        >>> from PIL import Image
        >>> def size(px):
        ...     return Image.open(io.BytesIO(base64.b64decode(thumbnail_png(px)))).size
        >>> size(np.zeros((32, 64, 3), np.uint8)), size(np.zeros((250, 500, 3), np.uint8))
        ((192, 96), (192, 96))
    """
    h = int(np.asarray(pixels).shape[0])
    if h <= side:
        return png_base64(pixels, scale=max(1, side // max(h, 1)))
    import base64
    import io

    from PIL import Image

    img = Image.fromarray(np.ascontiguousarray(pixels, dtype=np.uint8))
    width = max(1, round(img.width * side / h))
    img = img.resize((width, side), Image.Resampling.LANCZOS, reducing_gap=3.0)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _cell(v: Any) -> str:
    return f"{v:.3f}" if isinstance(v, float) else str(v)


RENDERERS: dict[str, Callable[[Mapping[str, Any]], str]] = {
    "table": table_html,
    "reliability": reliability_svg,
    "bar": bar_svg,
    "heatmap": heatmap_svg,
    "line": line_svg,
    "images": images_html,
    "tokens": tokens_html,
}


def render_plot(spec: Mapping[str, Any]) -> str:
    """Draw a plot spec as an SVG string; an unknown kind draws a note instead of failing."""
    kind = spec.get("kind")
    renderer = RENDERERS.get(str(kind))
    if renderer is None:
        return _svg([f'<text x="10" y="40">no renderer for plot kind {_e(kind)}</text>'], "")
    return renderer(spec)


def overlay(image: np.ndarray, amap: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """The image and, beside it, the image blended with the anomaly map in red: ``(H, 2W, 3)``.

    The map is scaled to ``[0, 1]`` by ``lo``/``hi`` (shared by every shown image, so colours
    compare across images) and used as the red layer's opacity.

    Example:
        >>> img = np.zeros((2, 2, 3), dtype=np.uint8)
        >>> out = overlay(img, np.array([[0.0, 1.0], [0.0, 0.0]]), 0.0, 1.0)
        >>> out.shape, out[0, 3].tolist(), out[0, 2].tolist()
        ((2, 4, 3), [255, 0, 0], [0, 0, 0])
    """
    img = np.asarray(image, dtype=np.float32)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=-1)
    alpha = np.clip((np.asarray(amap, dtype=np.float32) - lo) / max(hi - lo, 1e-12), 0, 1)
    if alpha.shape != img.shape[:2]:  # nearest-neighbour upsampling to the image's size
        rows = np.arange(img.shape[0]) * alpha.shape[0] // img.shape[0]
        cols = np.arange(img.shape[1]) * alpha.shape[1] // img.shape[1]
        alpha = alpha[np.ix_(rows, cols)]
    red = np.array([255.0, 0.0, 0.0], dtype=np.float32)
    blended = img * (1 - alpha[..., None]) + red * alpha[..., None]
    return np.concatenate([img, blended], axis=1).round().astype(np.uint8)
