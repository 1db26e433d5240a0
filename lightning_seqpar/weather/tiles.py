"""TILES (ORBIT-2, arXiv 2505.04802): a global field cut into div x div spatial tiles with a halo, each tile an
independent sequence, and the tiles' outputs stitched back with the halos cropped.

Letters in shape comments: B batch (of whole fields), T = div * div tiles per field, C channels, H x W grid
(latitudes x longitudes), Th x Tw one tile with its halo, N samples of a dataset.

Every tile has the same shape, so that one fixed-size model (ClimaX is built for one grid) runs all of them: the
core of a tile is one cell of a div x div split of the grid (``split_sizes``: the first rows / columns get one cell
more when the grid does not divide), and its window adds ``halo`` cells on every side, plus, for a core one cell
smaller than the largest, one more cell after it. The cores partition the grid, so stitching the cores of the
tiles of an identity model gives the input back exactly.

Edges of the globe: longitude is periodic, so a halo that crosses 0 / 360 degrees wraps around to the other side of
the grid (a tile at the dateline sees its real neighbours); latitude is not, so a halo beyond a pole repeats the
pole row (replication, as :class:`~lightning_seqpar.weather.models.climax.Patchify` pads). These repeated rows lie
in halos only, which are never stitched and never enter the tiled loss. ORBIT-2's paper states that tiles carry
halos that are cropped before stitching but not how the domain edges are treated; periodic longitude and
replicated latitude are this project's choice.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor
from torch.utils.data import Dataset

from lightning_seqpar.comm import split_sizes

__all__ = ["TileLayout", "TiledDataset", "forward_tiles", "run_tiled", "tiled_mse"]


@dataclass(frozen=True)
class TileLayout:
    """How a ``grid`` = (H, W) field is cut into ``tiles`` x ``tiles`` windows with ``halo`` cells of context.

    Args:
        grid: (latitudes, longitudes) of the whole field.
        tiles: tiles per axis (``div``); ``tiles=1`` with ``halo=0`` is the whole field.
        halo: cells of context on every side of a tile's core, >= 0; cropped away when stitching.

    Raises:
        ValueError: ``tiles`` < 1, ``halo`` < 0, or more tiles per axis than cells.

    Warns:
        UserWarning: a halo so wide that a tile's window is larger than the grid (see :attr:`max_halo`).
    """

    grid: tuple[int, int]
    tiles: int
    halo: int = 2

    def __post_init__(self) -> None:
        object.__setattr__(self, "grid", (int(self.grid[0]), int(self.grid[1])))
        if self.tiles < 1:
            raise ValueError(f"tiles (per axis) must be >= 1, got {self.tiles}")
        if self.halo < 0:
            raise ValueError(f"tile halo must be >= 0 cells, got {self.halo}")
        if self.tiles > min(self.grid):
            raise ValueError(
                f"{self.tiles} tiles per axis do not fit a {self.grid[0]} x {self.grid[1]} grid; "
                f"use at most {min(self.grid)}"
            )
        window = self.tile_shape
        if window[0] > self.grid[0] or window[1] > self.grid[1]:
            warnings.warn(
                f"TILES: halo={self.halo} makes every tile a {window[0]} x {window[1]} window, larger than the "
                f"{self.grid[0]} x {self.grid[1]} grid, so a tile sees some cells more than once (longitudes wrap, "
                f"the pole rows repeat) and the tiles together cost more than the whole field; use halo <= "
                f"{self.max_halo}, or fewer tiles",
                stacklevel=3,
            )

    @property
    def max_halo(self) -> int:
        """The largest halo whose window (largest core plus the halo on both sides) still fits inside the grid."""
        return max(0, min((n - -(-n // self.tiles)) // 2 for n in self.grid))

    @property
    def num_tiles(self) -> int:
        """T = tiles * tiles, in row-major order (tile t covers core row band t // tiles, column band t % tiles)."""
        return self.tiles * self.tiles

    @property
    def tile_shape(self) -> tuple[int, int]:
        """(Th, Tw): the largest core plus the halo on both sides; build the model for this grid."""
        return tuple(-(-n // self.tiles) + 2 * self.halo for n in self.grid)  # type: ignore[return-value]

    @cached_property
    def cores(self) -> tuple[tuple[int, int, int, int], ...]:
        """Per tile ``(row_start, rows, col_start, cols)`` of its core in the grid."""
        row_sizes, col_sizes = (split_sizes(n, self.tiles) for n in self.grid)
        row_starts = [sum(row_sizes[:i]) for i in range(self.tiles)]
        col_starts = [sum(col_sizes[:i]) for i in range(self.tiles)]
        return tuple(
            (row_starts[i], row_sizes[i], col_starts[j], col_sizes[j])
            for i in range(self.tiles)
            for j in range(self.tiles)
        )

    @cached_property
    def indices(self) -> tuple[Tensor, Tensor]:
        """``rows [T, Th]`` and ``cols [T, Tw]``: grid cell of every window cell (latitudes clamped, longitudes
        wrapped)."""
        (H, W), (Th, Tw) = self.grid, self.tile_shape
        offsets_h, offsets_w = torch.arange(Th) - self.halo, torch.arange(Tw) - self.halo
        rows = torch.stack([(r0 + offsets_h).clamp(0, H - 1) for r0, _, _, _ in self.cores])  # [T, Th], poles repeated
        cols = torch.stack([(c0 + offsets_w) % W for _, _, c0, _ in self.cores])  # [T, Tw], periodic
        return rows, cols

    @cached_property
    def core_mask(self) -> Tensor:
        """``[T, Th, Tw]`` float32, 1 on the cells of each tile's core and 0 on its halo."""
        mask = torch.zeros(self.num_tiles, *self.tile_shape)
        for t, (_, rows, _, cols) in enumerate(self.cores):
            mask[t, self.halo : self.halo + rows, self.halo : self.halo + cols] = 1.0
        return mask

    def split(self, x: Tensor) -> Tensor:
        """Cut whole fields into tiles: ``[B, C, H, W] -> [B*T, C, Th, Tw]`` (sample-major: field b's tiles are rows
        ``b*T .. b*T + T-1``)."""
        if tuple(x.shape[-2:]) != self.grid:
            raise ValueError(f"TileLayout for a {self.grid} grid got a field of shape {tuple(x.shape)}")
        B, C = x.shape[:2]
        rows, cols = (i.to(x.device) for i in self.indices)
        tiles = x[:, :, rows[:, :, None], cols[:, None, :]]  # [B, C, T, Th, Tw]
        return tiles.transpose(1, 2).reshape(B * self.num_tiles, C, *self.tile_shape)

    def tile(self, x: Tensor, t: int) -> Tensor:
        """Tile ``t`` of one field: ``[C, H, W] -> [C, Th, Tw]``."""
        rows, cols = self.indices
        return x[:, rows[t][:, None], cols[t][None, :]]

    def stitch(self, tiles: Tensor) -> Tensor:
        """Crop every tile's halo and put the cores together: ``[B*T, C, Th, Tw] -> [B, C, H, W]``."""
        if tiles.shape[0] % self.num_tiles or tuple(tiles.shape[-2:]) != self.tile_shape:
            raise ValueError(
                f"stitch expects [B*{self.num_tiles}, C, {self.tile_shape[0]}, {self.tile_shape[1]}] tiles, "
                f"got {tuple(tiles.shape)}"
            )
        B, C = tiles.shape[0] // self.num_tiles, tiles.shape[1]
        per_field = tiles.reshape(B, self.num_tiles, C, *self.tile_shape)  # [B, T, C, Th, Tw]
        out = tiles.new_empty(B, C, *self.grid)
        h = self.halo
        for t, (r0, rows, c0, cols) in enumerate(self.cores):
            out[:, :, r0 : r0 + rows, c0 : c0 + cols] = per_field[:, t, :, h : h + rows, h : h + cols]
        return out

    def to_config(self) -> dict[str, int]:
        return {"tiles": self.tiles, "halo": self.halo}


def run_tiled(model: Callable[[Tensor, Tensor], Tensor], x: Tensor, lead_time_hours: Tensor, layout: TileLayout,
              max_tiles_per_call: int | None = None) -> Tensor:
    """Run ``model(x_tiles, lead)`` on every tile of whole fields and stitch: ``[B, V, H, W] -> [B, V_out, H, W]``.

    Args:
        model: maps ``[n, V, Th, Tw]`` tiles and ``[n]`` lead times to ``[n, V_out, Th, Tw]``.
        x: whole fields ``[B, V, H, W]``.
        lead_time_hours: ``[B]``.
        layout: the tiling.
        max_tiles_per_call: run at most this many tiles at once (bounds activation memory at inference); None: all.
    """
    tiles = layout.split(x)  # [B*T, V, Th, Tw]
    lead = lead_time_hours.repeat_interleave(layout.num_tiles)  # [B*T]
    step = max_tiles_per_call or tiles.shape[0]
    outs = [model(tiles[i : i + step], lead[i : i + step]) for i in range(0, tiles.shape[0], step)]
    return layout.stitch(torch.cat(outs))


def forward_tiles(
    model: Callable[[Tensor, Tensor], Tensor],
    x: Tensor,
    lead_time_hours: Tensor,
    layout: TileLayout | None,
    max_tiles_per_call: int | None = None,
) -> Tensor:
    """``model(x, lead)`` for tiles and whole fields alike: what the forecasting module calls.

    No layout: ``model`` directly. A whole field ``[B, V, H, W]``: every tile, stitched (:func:`run_tiled`).
    A batch of tiles ``[n, V, Th, Tw]`` (training on :class:`TiledDataset`): ``model`` directly.

    Raises:
        ValueError: the input is neither the layout's grid nor its tile shape.
    """
    if layout is None or tuple(x.shape[-2:]) == layout.tile_shape:
        return model(x, lead_time_hours)
    if tuple(x.shape[-2:]) == layout.grid:
        return run_tiled(model, x, lead_time_hours, layout, max_tiles_per_call)
    raise ValueError(
        f"tiled forecasting with {layout.tiles} x {layout.tiles} tiles (halo {layout.halo}) takes whole fields "
        f"{layout.grid} or tiles {layout.tile_shape}, got input of shape {tuple(x.shape)}"
    )


def tiled_mse(pred: Tensor, target: Tensor, cell_weights: Tensor, field_weights: Tensor | None = None) -> Tensor:
    """Weighted MSE over the cores of a batch of tiles: the tile analogue of ``latitude_weighted_mse``.

    Args:
        pred: ``[n, V_out, Th, Tw]`` tile forecasts.
        target: ``[n, V_out, Th, Tw]``.
        cell_weights: ``[n, 1 or V_out, Th, Tw]``, latitude weight x core mask (x valid mask), from
            :meth:`TiledDataset.cell_weights`; halos weigh 0.
        field_weights: optional ``[V_out]``.

    Returns:
        The mean over fields of ``sum(w * err^2) / sum(w)``: for a batch holding every tile of some fields this
        equals ``latitude_weighted_mse`` of the stitched fields.
    """
    w = cell_weights.float().expand_as(pred)
    per_field = ((pred.float() - target.float()).square() * w).sum(dim=(0, 2, 3)) / w.sum(dim=(0, 2, 3)).clamp_min(
        1e-12
    )
    if field_weights is not None:
        per_field = per_field * field_weights.float()
    return per_field.mean()


class TiledDataset(Dataset):
    """Every tile of every sample of a forecasting dataset as a sample of its own (length N * T).

    Item ``n`` is tile ``n % T`` of sample ``n // T``: ``input [V, Th, Tw]``, ``target [V_out, Th, Tw]``, the
    sample's ``lead_time_hours`` and ``index``, and ``tile`` (int64). Each item reads its whole sample, so a
    tiled epoch reads the store T times.
    """

    def __init__(self, dataset: Dataset, layout: TileLayout) -> None:
        self.dataset, self.layout = dataset, layout

    def __len__(self) -> int:
        return len(self.dataset) * self.layout.num_tiles  # type: ignore[arg-type]

    def __getitem__(self, n: int) -> dict[str, Tensor]:
        sample, t = divmod(int(n), self.layout.num_tiles)
        item = dict(self.dataset[sample])
        item["input"], item["target"] = self.layout.tile(item["input"], t), self.layout.tile(item["target"], t)
        item["tile"] = torch.tensor(t, dtype=torch.int64)
        return item

    @staticmethod
    def cell_weights(
        layout: TileLayout, lat_weights: Tensor, tiles: Tensor, valid_mask: Tensor | None = None
    ) -> Tensor:
        """Loss weight of every cell of a batch of tiles: ``[n, 1 or V_out, Th, Tw]``.

        Args:
            layout: the tiling.
            lat_weights: ``[H]`` latitude weights of the whole grid.
            tiles: ``[n]`` tile index of each batch row.
            valid_mask: optional ``[V_out, H, W]``, 1 where the target holds data.
        """
        rows, cols = (i.to(tiles.device) for i in layout.indices)
        weights = lat_weights.float()[rows[tiles]][:, :, None] * layout.core_mask.to(tiles.device)[tiles]  # [n, Th, Tw]
        weights = weights[:, None]  # [n, 1, Th, Tw]
        if valid_mask is not None:
            valid = valid_mask.float()[:, rows[tiles][:, :, None], cols[tiles][:, None, :]]  # [V_out, n, Th, Tw]
            weights = weights * valid.transpose(0, 1)
        return weights
