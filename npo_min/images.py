"""Images out: tensors in [-1, 1] to PIL, atomic PNG writes, and grids that carry their own labels.

A grid separated from the terminal that printed it must still say what it shows, so `labelled_grid`
writes a title, a header per block (e.g. "plain CFG" | "NPO") and a label per row into the pixels.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image, ImageDraw

from .checkpoint import atomic_write


def to_pil(pixels: torch.Tensor) -> Image.Image:
    """`(C, H, W)` in about [-1, 1], C = 1 or 3 -> a greyscale / RGB image (clamped, x -> round(127.5 (x + 1)))."""
    x = ((pixels.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    if x.shape[0] == 1:
        return Image.fromarray(x[0].numpy(), mode="L")
    return Image.fromarray(x.permute(1, 2, 0).numpy())  # (3, H, W) -> (H, W, 3)


def save_png(img: Image.Image, path: str | Path) -> None:
    atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))  # tmp ends in .tmp: name the format


def to_pil_frames(video: torch.Tensor) -> list[Image.Image]:
    """A clip `(C, F, H, W)` in about [-1, 1] -> F images (as `to_pil`)."""
    return [to_pil(video[:, f]) for f in range(video.shape[1])]


def save_gif(frames: list[Image.Image], path: str | Path, fps: float = 8.0) -> None:
    """An animated GIF, looping, `fps` frames a second (CogVideoX: 8), written atomically.

    GIF stores at most 256 colours a frame (pillow picks the palette): for pixel-exact frames read the
    latents or write PNGs.
    """
    atomic_write(path, lambda tmp: frames[0].save(tmp, format="GIF", save_all=True, append_images=frames[1:],
                                                  duration=round(1000 / fps), loop=0))


def labelled_grid(blocks: dict[str, list[list[Image.Image]]], row_labels: list[str], title: str,
                  min_cell: int = 32, gap: int = 8, pad: int = 2) -> Image.Image:
    """Blocks side by side, each a list of rows of equally sized images, with a title, block headers and row labels.

    blocks: {header: rows}, every block with len(row_labels) rows of the same length. Images smaller than
    `min_cell` pixels are enlarged by an integer factor (nearest neighbour), so 8x8 digits stay readable.
    """
    first = next(iter(blocks.values()))[0][0]
    zoom = max(1, -(-min_cell // max(first.size)))  # ceil(min_cell / size)
    iw, ih = first.width * zoom, first.height * zoom
    w, h = iw + pad, ih + pad  # cell = image + a white gap
    label_w = 8 + 7 * min(max((len(r) for r in row_labels), default=0), 24)
    ncols = [max(len(r) for r in rows) for rows in blocks.values()]
    width = label_w + sum(n * w for n in ncols) + gap * len(blocks)
    top = 36
    canvas = Image.new("RGB", (max(width, 8 + 7 * len(title)), top + len(row_labels) * h + 4), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((4, 4), title, fill="black")
    x0 = label_w
    for (header, rows), n in zip(blocks.items(), ncols):
        draw.text((x0 + 2, 20), header, fill="black")
        for r, row in enumerate(rows):
            for c, img in enumerate(row):
                canvas.paste(img.convert("RGB").resize((iw, ih), Image.NEAREST), (x0 + c * w, top + r * h))
        x0 += n * w + gap
    for r, label in enumerate(row_labels):
        draw.text((4, top + r * h + max(0, h // 2 - 6)), label[:24], fill="black")
    return canvas
