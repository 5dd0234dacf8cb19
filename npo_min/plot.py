"""A very small plotting helper on pillow (no matplotlib): axes with ticks, polylines, scatter,
a heat map, iso-level contour lines (marching squares), legends and labelled image grids.

    fig = Figure(900, 600, "title")
    ax = Axes(fig, (80, 60, 860, 540), xlim=(0, 999), ylim=(1e-2, 1e2), ylog=True)
    ax.frame("panel title", "timestep t", "nsr_t")
    ax.line(x, y, "tab:blue"); ax.legend([("nsr_t", "tab:blue", "line")])
    fig.save("out.png")   # atomic (npo_min.checkpoint.atomic_write)

Coordinates: data (x, y) -> pixels by `Axes.px`; pixel y grows downwards.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .checkpoint import atomic_write

COLORS = {  # the "tab10" hues, by name
    "tab:blue": (31, 119, 180), "tab:orange": (255, 127, 14), "tab:green": (44, 160, 44), "tab:red": (214, 39, 40),
    "tab:purple": (148, 103, 189), "tab:brown": (140, 86, 75), "tab:gray": (127, 127, 127), "black": (0, 0, 0),
    "gray": (150, 150, 150), "lightgray": (215, 215, 215), "white": (255, 255, 255),
}


def rgb(color) -> tuple[int, int, int]:
    return COLORS[color] if isinstance(color, str) else tuple(color)


@lru_cache(maxsize=None)
def font(size: int = 15) -> ImageFont.ImageFont:
    """Pillow's built-in scalable font (no system font needed)."""
    return ImageFont.load_default(size=size)


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About n round tick values (steps 1, 2, 5 x 10^k) inside [lo, hi]."""
    raw = (hi - lo) / max(n, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    return [round(first + i * step, 12) for i in range(int((hi - first) / step + 1e-9) + 1)]


def log_ticks(lo: float, hi: float) -> list[float]:
    """The powers of ten inside [lo, hi]."""
    return [10.0**k for k in range(math.ceil(math.log10(lo) - 1e-9), math.floor(math.log10(hi) + 1e-9) + 1)]


def tick_label(v: float, log: bool = False) -> str:
    if log:
        k = round(math.log10(v))
        return {0: "1", 1: "10"}.get(k, f"1e{k}")
    return f"{v:g}"


GRAYS = ((255, 255, 255), (236, 236, 236), (214, 214, 214), (190, 190, 190))  # a light background shading


def colormap(u: np.ndarray, stops=((255, 255, 255), (198, 219, 239), (107, 174, 214), (33, 113, 181), (8, 48, 107))) -> np.ndarray:
    """Values u in [0, 1] `(H, W)` -> uint8 RGB `(H, W, 3)`, linear between the colour stops (default: white -> blue)."""
    stops = np.asarray(stops, dtype=np.float64)  # (S, 3)
    pos = np.clip(u, 0, 1) * (len(stops) - 1)
    i = np.minimum(pos.astype(int), len(stops) - 2)
    f = (pos - i)[..., None]
    return (stops[i] * (1 - f) + stops[i + 1] * f).round().astype(np.uint8)


def marching_squares(field: np.ndarray, level: float) -> list[tuple[tuple[float, float], tuple[float, float]]]:
    """Line segments of the iso-line {field = level} of a sampled 2-D field `(H, W)`.

    Each grid cell (4 neighbouring samples) where the field crosses `level` contributes the
    segment(s) joining the crossing points on its edges, found by linear interpolation. A cell
    with crossings on all 4 edges (a saddle) is resolved by the cell-centre average. Points are
    (col, row) in fractional sample indices. Returns a list of ((c0, r0), (c1, r1)).
    """
    f = np.asarray(field, dtype=np.float64)
    H, W = f.shape
    segments = []
    for r in range(H - 1):
        for c in range(W - 1):
            # corners in order TL, TR, BR, BL; edges top, right, bottom, left join consecutive corners
            corners = [(c, r), (c + 1, r), (c + 1, r + 1), (c, r + 1)]
            vals = [f[r, c], f[r, c + 1], f[r + 1, c + 1], f[r + 1, c]]
            above = [v > level for v in vals]
            if all(above) or not any(above):
                continue
            points = []  # crossing point per edge, or None
            for e in range(4):
                (c0, r0), (c1, r1), v0, v1 = corners[e], corners[(e + 1) % 4], vals[e], vals[(e + 1) % 4]
                if above[e] != above[(e + 1) % 4]:
                    u = (level - v0) / (v1 - v0)
                    points.append((c0 + u * (c1 - c0), r0 + u * (r1 - r0)))
                else:
                    points.append(None)
            cut = [e for e in range(4) if points[e] is not None]
            if len(cut) == 2:
                segments.append((points[cut[0]], points[cut[1]]))
            else:  # saddle: join (top, right) + (bottom, left) if the centre is on TL's side, else (top, left) + (right, bottom)
                centre_above = sum(vals) / 4 > level
                pairs = ((0, 1), (2, 3)) if centre_above == above[0] else ((0, 3), (1, 2))
                segments += [(points[a], points[b]) for a, b in pairs]
    return segments


class Figure:
    """A white RGB canvas `width x height` with a title line at the top."""

    def __init__(self, width: int, height: int, title: str = "", title_size: int = 22):
        self.image = Image.new("RGB", (width, height), "white")
        self.draw = ImageDraw.Draw(self.image)
        if title:
            self.text((width // 2, 12), title, size=title_size, anchor="mt")

    def text(self, xy, s: str, size: int = 15, color="black", anchor: str = "la") -> None:
        self.draw.text(xy, s, fill=rgb(color), font=font(size), anchor=anchor)

    def vtext(self, xy, s: str, size: int = 15, color="black") -> None:
        """Text rotated 90 degrees (reading upwards), centred on xy."""
        l, t, r, b = self.draw.textbbox((0, 0), s, font=font(size))
        tile = Image.new("L", (r + 2, b + 2), 0)
        ImageDraw.Draw(tile).text((1, 1), s, fill=255, font=font(size))
        tile = tile.rotate(90, expand=True)
        x, y = int(xy[0] - tile.width / 2), int(xy[1] - tile.height / 2)
        self.image.paste(Image.new("RGB", tile.size, rgb(color)), (x, y), tile)

    def paste(self, pixels: np.ndarray, xy, scale: int = 1) -> None:
        """Paste uint8 `(H, W)` or `(H, W, 3)` pixels at xy, upscaled `scale` times (nearest)."""
        img = Image.fromarray(pixels)
        if scale != 1:
            img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
        self.image.paste(img.convert("RGB"), (int(xy[0]), int(xy[1])))

    def save(self, path) -> None:
        atomic_write(path, lambda tmp: self.image.save(tmp, format="PNG"))


def _polyline(draw, pts, color, width, dash=None):
    """Draw connected points; dash = (on, off) pixel lengths for a dashed line."""
    if not dash:
        draw.line(pts, fill=color, width=width, joint="curve")
        return
    on, off = dash
    carry, drawing = 0.0, True  # distance walked in the current dash state
    for (x0, y0), (x1, y1) in zip(pts[:-1], pts[1:]):
        length, pos = math.hypot(x1 - x0, y1 - y0), 0.0
        while pos < length:
            step = min((on if drawing else off) - carry, length - pos)
            if drawing:
                a, b = pos / length, (pos + step) / length
                draw.line([(x0 + a * (x1 - x0), y0 + a * (y1 - y0)), (x0 + b * (x1 - x0), y0 + b * (y1 - y0))], fill=color, width=width)
            pos, carry = pos + step, carry + step
            if carry >= (on if drawing else off) - 1e-9:
                carry, drawing = 0.0, not drawing


class Axes:
    """A plotting box `(left, top, right, bottom)` in pixels on a Figure, with data limits
    xlim / ylim (log10-scaled if xlog / ylog). Points outside the limits are not drawn."""

    def __init__(self, fig: Figure, box, xlim, ylim, xlog: bool = False, ylog: bool = False):
        self.fig, self.draw, self.box = fig, fig.draw, tuple(int(v) for v in box)
        self.xlim, self.ylim, self.xlog, self.ylog = tuple(xlim), tuple(ylim), xlog, ylog

    def _unit(self, v, lim, log):
        v, lo, hi = np.asarray(v, dtype=np.float64), lim[0], lim[1]
        if log:
            v, lo, hi = np.log10(np.maximum(v, 1e-300)), math.log10(lo), math.log10(hi)
        return (v - lo) / (hi - lo)

    def px(self, x, y) -> tuple[np.ndarray, np.ndarray]:
        """Data coordinates -> pixel coordinates (arrays)."""
        l, t, r, b = self.box
        return l + self._unit(x, self.xlim, self.xlog) * (r - l), b - self._unit(y, self.ylim, self.ylog) * (b - t)

    def inside(self, x, y) -> np.ndarray:
        u, v = self._unit(x, self.xlim, self.xlog), self._unit(y, self.ylim, self.ylog)
        return (u >= 0) & (u <= 1) & (v >= 0) & (v <= 1) & np.isfinite(u) & np.isfinite(v)

    def frame(self, title: str = "", xlabel: str = "", ylabel: str = "", xticks=None, yticks=None, size: int = 14,
              grid: bool = True) -> None:
        """Box, ticks with labels, light grid lines (unless grid=False), axis labels and the panel title."""
        l, t, r, b = self.box
        xticks = xticks if xticks is not None else (log_ticks if self.xlog else nice_ticks)(*self.xlim)
        yticks = yticks if yticks is not None else (log_ticks if self.ylog else nice_ticks)(*self.ylim)
        for v in xticks:
            x = float(self.px(v, self.ylim[0])[0])
            self.draw.line([(x, b), (x, b + 5)], fill=rgb("black"))
            if grid:
                self.draw.line([(x, t), (x, b)], fill=(238, 238, 238))
            self.fig.text((x, b + 8), tick_label(v, self.xlog), size=size - 1, anchor="mt")
        for v in yticks:
            y = float(self.px(self.xlim[0], v)[1])
            self.draw.line([(l - 5, y), (l, y)], fill=rgb("black"))
            if grid:
                self.draw.line([(l, y), (r, y)], fill=(238, 238, 238))
            self.fig.text((l - 8, y), tick_label(v, self.ylog), size=size - 1, anchor="rm")
        self.draw.rectangle([l, t, r, b], outline=rgb("black"))
        if title:
            self.fig.text(((l + r) / 2, t - 8), title, size=size + 1, anchor="md")
        if xlabel:
            self.fig.text(((l + r) / 2, b + 28), xlabel, size=size, anchor="mt")
        if ylabel:
            width = max(self.draw.textlength(tick_label(v, self.ylog), font=font(size - 1)) for v in yticks) if len(yticks) else 0
            self.fig.vtext((l - 20 - width, (t + b) / 2), ylabel, size=size)

    def line(self, x, y, color="tab:blue", width: int = 2, dash=None) -> None:
        """A polyline through the points (x, y); breaks at points outside the limits."""
        keep = self.inside(x, y)
        px, py = self.px(x, y)
        run = []
        for k in range(len(keep)):
            if keep[k]:
                run.append((float(px[k]), float(py[k])))
            if (not keep[k] or k == len(keep) - 1) and len(run) > 1:
                _polyline(self.draw, run, rgb(color), width, dash)
            if not keep[k]:
                run = []

    def scatter(self, x, y, color="tab:blue", radius: float = 1.5, outline=None) -> None:
        keep = self.inside(x, y)
        px, py = self.px(np.asarray(x)[keep], np.asarray(y)[keep])
        for u, v in zip(px, py):
            self.draw.ellipse([u - radius, v - radius, u + radius, v + radius], fill=rgb(color),
                              outline=rgb(outline) if outline else None)

    def hline(self, y, color="gray", width: int = 1, dash=(6, 4)) -> None:
        self.line(np.array(self.xlim), np.array([y, y]), color, width, dash)

    def vline(self, x, color="gray", width: int = 1, dash=(6, 4)) -> None:
        self.line(np.array([x, x]), np.array(self.ylim), color, width, dash)

    def heatmap(self, values: np.ndarray, vmin: float | None = None, vmax: float | None = None, stops=None) -> None:
        """Fill the box with `values` `(H, W)` sampled on a regular grid over xlim x ylim
        (row 0 = ylim[0], the bottom), mapped through `colormap`."""
        v = np.asarray(values, dtype=np.float64)
        lo = v.min() if vmin is None else vmin
        hi = v.max() if vmax is None else vmax
        rgb_ = colormap((v - lo) / max(hi - lo, 1e-300), **({"stops": stops} if stops else {}))[::-1]  # row 0 at the bottom
        l, t, r, b = self.box
        self.fig.image.paste(Image.fromarray(rgb_).resize((r - l, b - t), Image.BILINEAR), (l, t))

    def contour(self, field: np.ndarray, level: float, color="black", width: int = 1) -> None:
        """The iso-line {field = level} of `field` `(H, W)` sampled on a regular grid over xlim x ylim (row 0 at ylim[0])."""
        H, W = field.shape
        (x0, x1), (y0, y1) = self.xlim, self.ylim
        for (c0, r0), (c1, r1) in marching_squares(field, level):
            xs = np.array([x0 + c0 * (x1 - x0) / (W - 1), x0 + c1 * (x1 - x0) / (W - 1)])
            ys = np.array([y0 + r0 * (y1 - y0) / (H - 1), y0 + r1 * (y1 - y0) / (H - 1)])
            px, py = self.px(xs, ys)
            self.draw.line([(float(px[0]), float(py[0])), (float(px[1]), float(py[1]))], fill=rgb(color), width=width)

    def legend(self, entries, corner: str = "tr", size: int = 13) -> None:
        """entries: (label, color, kind) with kind "line", "dash" or "dot"; a boxed key in a corner of the axes."""
        l, t, r, b = self.box
        row, key = size + 8, 26
        w = key + 14 + max(self.draw.textlength(e[0], font=font(size)) for e in entries)
        h = row * len(entries) + 8
        x = r - w - 8 if corner[1] == "r" else l + 8
        y = t + 8 if corner[0] == "t" else b - h - 8
        self.draw.rectangle([x, y, x + w, y + h], fill=(255, 255, 255), outline=rgb("gray"))
        for i, (label, color, kind) in enumerate(entries):
            cy = y + 4 + row * i + row / 2
            if kind == "dot":
                self.draw.ellipse([x + 6 + key / 2 - 4, cy - 4, x + 6 + key / 2 + 4, cy + 4], fill=rgb(color))
            else:
                _polyline(self.draw, [(x + 6, cy), (x + 6 + key, cy)], rgb(color), 2, (5, 3) if kind == "dash" else None)
            self.fig.text((x + key + 12, cy), label, size=size, anchor="lm")
