"""Decoded images -> PNG bytes for results, and small preview strips for progress events."""

from __future__ import annotations

import base64
import io

import numpy as np
import torch
from PIL import Image

_IMAGE_CHANNELS = (1, 3, 4)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, C, H, W) floats in [0, 1] -> (B, H, W, C) uint8, rounded as diffusers' ``numpy_to_pil``."""
    array = images.detach().float().cpu().permute(0, 2, 3, 1).numpy()
    return (array * 255).round().astype(np.uint8)


def _pil_image(pixels: np.ndarray) -> Image.Image:
    """(H, W, C) uint8 -> a PIL image; channel counts other than 1/3/4 keep the first channel."""
    channels = pixels.shape[-1]
    if channels not in _IMAGE_CHANNELS:
        pixels, channels = pixels[..., :1], 1
    # uint8 (H, W) -> "L", (H, W, 3) -> "RGB", (H, W, 4) -> "RGBA"
    return Image.fromarray(np.ascontiguousarray(pixels[..., 0] if channels == 1 else pixels))


def png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    _pil_image(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def preview_png_bytes(pixels: np.ndarray, max_side: int) -> bytes:
    """A request's images, (N, H, W, C) uint8, side by side, each shrunk to at most ``max_side`` pixels."""
    tiles = [_pil_image(image) for image in pixels]
    width, height = tiles[0].size
    scale = min(1.0, max_side / max(width, height))
    tile_size = (max(1, round(width * scale)), max(1, round(height * scale)))
    if tile_size != (width, height):
        tiles = [tile.resize(tile_size, Image.Resampling.BILINEAR) for tile in tiles]
    strip = Image.new(tiles[0].mode, (tile_size[0] * len(tiles), tile_size[1]))
    for index, tile in enumerate(tiles):
        strip.paste(tile, (index * tile_size[0], 0))
    buffer = io.BytesIO()
    strip.save(buffer, format="PNG")
    return buffer.getvalue()


def decode_png_base64(data: str) -> np.ndarray:
    """A base64 PNG, as responses carry it -> (H, W, C) uint8 (tests and clients)."""
    image = Image.open(io.BytesIO(base64.b64decode(data)))
    array = np.asarray(image)
    return array[..., None] if array.ndim == 2 else array
