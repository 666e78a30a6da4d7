"""Result grids: a query image beside its top-k results, with labels and scores; correct results
framed green, wrong ones red (grey when the query's label is unknown)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

TILE = 160        # pixels per image tile (square)
PAD = 8           # between tiles and around the grid
FRAME = 4         # frame width
CAPTION = 34      # two lines of text under each tile
COLOURS = {"query": (40, 90, 200), "right": (30, 160, 60), "wrong": (210, 40, 40), "unknown": (150, 150, 150)}


@dataclass(frozen=True)
class Tile:
    """One image of a grid and its two caption lines."""

    image: np.ndarray          # RGB uint8 (H, W, 3), any size
    title: str
    subtitle: str = ""
    kind: str = "unknown"      # query | right | wrong | unknown


def grid_size(k: int, tile: int = TILE) -> tuple[int, int]:
    """(width, height) of a grid of one query and ``k`` results."""
    return PAD + (k + 1) * (tile + PAD), PAD + tile + CAPTION + PAD


def result_tiles(query: np.ndarray, query_label: str | None, results: list[tuple[np.ndarray, str | None, float]],
                 ) -> list[Tile]:
    """The tiles of a query and its results ``(image, label, score)``, judged by label equality."""
    tiles = [Tile(query, f"query: {query_label or '?'}", "", "query")]
    for rank, (image, label, score) in enumerate(results, 1):
        kind = "unknown" if query_label is None else ("right" if label == query_label else "wrong")
        tiles.append(Tile(image, f"{rank}. {label or '?'}", f"score {score:.3f}", kind))
    return tiles


def draw_grid(tiles: list[Tile], k: int | None = None, tile: int = TILE) -> Image.Image:
    """Draws the tiles in one row (``k`` result slots; missing results leave empty slots)."""
    k = len(tiles) - 1 if k is None else k
    canvas = Image.new("RGB", grid_size(k, tile), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    inner = tile - 2 * FRAME
    for i, t in enumerate(tiles[: k + 1]):
        x0, y0 = PAD + i * (tile + PAD), PAD
        draw.rectangle([x0, y0, x0 + tile - 1, y0 + tile - 1], fill=COLOURS[t.kind])
        picture = Image.fromarray(t.image)
        picture.thumbnail((inner, inner), Image.Resampling.BICUBIC)
        if max(picture.size) < inner:  # small images (28-px digits) are scaled up to be seen
            scale = inner / max(picture.size)
            picture = picture.resize((max(1, round(picture.width * scale)), max(1, round(picture.height * scale))),
                                     Image.Resampling.NEAREST)
        canvas.paste(picture, (x0 + FRAME + (inner - picture.width) // 2, y0 + FRAME + (inner - picture.height) // 2))
        draw.text((x0, y0 + tile + 3), t.title[:28], fill="black", font=font)
        draw.text((x0, y0 + tile + 18), t.subtitle[:28], fill=(90, 90, 90), font=font)
    return canvas
