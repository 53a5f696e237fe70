"""Tiled decoding: decode overlapping latent tiles one at a time and blend the overlaps linearly.

Tiles are `tile` x `tile` latents (clipped to the latent's size), all of one shape so the decoder
compiles once. Along each axis the tile starts are spread evenly from 0 to size - tile, with at least
`overlap` latents shared by neighbours. In a region shared by two tiles each output pixel is
w * left + (1 - w) * right, with w falling linearly from 1 to 0 across the shared pixels; where
rounding makes three tiles meet, the weights are renormalised to sum to one.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import tqdm


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Starts of tiles of length `tile` covering [0, size), evenly spaced, neighbours sharing >= overlap."""
    if tile >= size:
        return [0]
    count = math.ceil((size - overlap) / (tile - overlap))
    return [round(i * (size - tile) / (count - 1)) for i in range(count)]


def _ramps(starts: list[int], tile: int, scale: int) -> list[np.ndarray]:
    """Per tile, (tile * scale,) blend weights: linear ramps across the pixels shared with each neighbour."""
    length = tile * scale
    centres = np.arange(length) + 0.5
    ramps = []
    for k, start in enumerate(starts):
        weight = np.ones(length)
        shared_before = starts[k - 1] + tile - start if k > 0 else 0
        shared_after = start + tile - starts[k + 1] if k < len(starts) - 1 else 0
        if shared_before > 0:  # Rises from 0 to 1 across the pixels shared with the previous tile.
            weight = np.minimum(weight, centres / (shared_before * scale))
        if shared_after > 0:  # Falls from 1 to 0 across the pixels shared with the next tile.
            weight = np.minimum(weight, (length - centres) / (shared_after * scale))
        ramps.append(weight.astype(np.float32))
    return ramps


def tiled_decode(decode_fn: Callable[[jax.Array], jax.Array], latents: jax.Array, *, tile: int,
                 overlap: int, scale: int) -> jax.Array:
    """Decodes (B, h, w, C) latents tile by tile.

    Args:
      decode_fn: maps (B, t_h, t_w, C) latents to (B, t_h * scale, t_w * scale, C_out) images.
      latents: (B, h, w, C).
      tile: tile side in latents; a side longer than the latent is clipped to it.
      overlap: latents shared by neighbouring tiles (at least), 0 <= overlap < tile.
      scale: pixels per latent.
    Returns:
      (B, h * scale, w * scale, C_out) float32, equal to decode_fn(latents) when one tile covers it.
    """
    if not (isinstance(tile, int) and tile > 0 and isinstance(overlap, int) and 0 <= overlap < tile):
        raise ValueError(f"tile={tile!r}, overlap={overlap!r}: expected integers with 0 <= overlap < tile")
    _, height, width, _ = latents.shape
    tile_h, tile_w = min(tile, height), min(tile, width)
    rows, cols = tile_starts(height, tile_h, overlap), tile_starts(width, tile_w, overlap)
    if len(rows) == len(cols) == 1:
        return decode_fn(latents).astype(jnp.float32)
    row_ramps, col_ramps = _ramps(rows, tile_h, scale), _ramps(cols, tile_w, scale)
    batch, channels = latents.shape[0], latents.shape[-1]
    tile_shape = jax.ShapeDtypeStruct((batch, tile_h, tile_w, channels), latents.dtype)
    out_channels = jax.eval_shape(decode_fn, tile_shape).shape[-1]
    out = np.zeros((batch, height * scale, width * scale, out_channels), np.float32)
    total = np.zeros((height * scale, width * scale, 1), np.float32)
    with tqdm.tqdm(total=len(rows) * len(cols), desc="decoding tiles", leave=False) as progress:
        for top, row_ramp in zip(rows, row_ramps, strict=True):
            for left, col_ramp in zip(cols, col_ramps, strict=True):
                pixels = np.asarray(decode_fn(latents[:, top:top + tile_h, left:left + tile_w]), np.float32)
                weight = (row_ramp[:, None] * col_ramp[None, :])[..., None]
                rows_px = slice(top * scale, (top + tile_h) * scale)
                cols_px = slice(left * scale, (left + tile_w) * scale)
                out[:, rows_px, cols_px] += weight * pixels
                total[rows_px, cols_px] += weight
                progress.update()
    return jnp.asarray(out / total)
