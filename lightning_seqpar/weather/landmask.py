"""A land-sea mask for drawing coastlines on maps without a download: ERA5's, at the 5.625 deg WeatherBench grid.

The mask is ERA5's ``lsm`` (land fraction 0-1) on the 32 x 64 WeatherBench 5.625 deg grid (cell centres
-87.1875 ... 87.1875 N, 0 ... 354.375 E), from ``tests/data/era5-sample`` (see its SOURCE.md; contains modified
Copernicus Climate Change Service information), quantised to 16 levels and zlib-compressed: 480 bytes. It is
interpolated to any grid and contoured at 0.5 to draw coastlines; at this resolution they are coarse (about
600 km) but place the continents. A store with its own mask (``land_sea_mask`` or ``lsm``) is used instead.
"""

from __future__ import annotations

import base64
import zlib

import numpy as np

__all__ = ["bundled_land_sea_mask"]

_MASK_5P625 = (
    "eNqtU7FOwzAQvbYiaksa5xM6sCJFTIz8AUXsiJWfKBI73wBiRQIkZiRWFigSrEn6AU1MQSBE4oedOE5MhTrADcn53t353ssF+E97"
    "JWnVIVZujocGPidjDOrZoV9tlf5k3SW4xxdjccNvL+KMN7quQDswhFI0s/Gmw8GtdoSNQ4d5XAWsKyF4iVdVHQtmaQkwvJeBg8Ab"
    "bdW4kl1/jeK8yx2v3Wyf4kXjqm9r+PiDrIGrsU5tXJhvLXEuZQis6bVICgZnYLacMe+Rqf84L1620pUmyCRR5ClSSzudzVx/rVqu"
    "freeXeihGffnQ64TnFpaGPUTqP6fDZ5ESZ6MQ17wvS4q80iVfEma5BP1kYhodn+lcOdmD4giFF021Q1TijALaV33GnvPKFFlWc8t"
    "2OQYTFxOhzLhWPY8UwNlCNUE+ahFF9veZeAh29e76tMAk3r5nLvpUbBTT7yxuMonyZNIkQXLfpNvpN5bqQ=="
)
_LATITUDES = -87.1875 + 5.625 * np.arange(32)  # [32] cell centres, ascending
_LONGITUDES = 5.625 * np.arange(64)  # [64] cell centres, degrees east


def _mask_5p625() -> np.ndarray:
    """``[32, 64]`` land fraction on the 5.625 deg grid, latitude ascending."""
    packed = np.frombuffer(zlib.decompress(base64.b64decode("".join(_MASK_5P625))), np.uint8).reshape(32, 32)
    levels = np.empty((32, 64), np.uint8)
    levels[:, 0::2], levels[:, 1::2] = packed >> 4, packed & 0x0F  # two 4-bit levels per byte
    return levels.astype(np.float32) / 15.0


def bundled_land_sea_mask(latitudes: np.ndarray, longitudes: np.ndarray) -> np.ndarray:
    """``[H, W]`` land fraction (0 sea, 1 land) at the given cell centres, bilinear in latitude and (periodic)
    longitude.

    Args:
        latitudes: ``[H]`` degrees north, either order.
        longitudes: ``[W]`` degrees east, any range (taken modulo 360).
    """
    mask = _mask_5p625()
    lat = np.clip(np.asarray(latitudes, np.float64), _LATITUDES[0], _LATITUDES[-1])
    lon = np.mod(np.asarray(longitudes, np.float64), 360.0)
    # Fractional row and column of every target cell in the 5.625 deg grid.
    row = (lat - _LATITUDES[0]) / 5.625  # [H]
    col = lon / 5.625  # [W]
    r0 = np.clip(np.floor(row).astype(int), 0, 30)
    c0 = np.floor(col).astype(int) % 64
    fr, fc = (row - r0)[:, None], (col - np.floor(col))[None, :]
    c1 = (c0 + 1) % 64  # periodic in longitude
    top = mask[r0][:, c0] * (1 - fc) + mask[r0][:, c1] * fc  # [H, W]
    bottom = mask[r0 + 1][:, c0] * (1 - fc) + mask[r0 + 1][:, c1] * fc
    return (top * (1 - fr) + bottom * fr).astype(np.float32)
