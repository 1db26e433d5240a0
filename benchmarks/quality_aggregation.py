"""Training quality on CPU: flat vs hierarchical variable aggregation, and TILES vs whole fields, same data and budget.

    PYTHONPATH=. python benchmarks/quality_aggregation.py --out benchmarks/results

Writes ``aggregation_quality.json`` and ``aggregation_quality.md``. Data: the synthetic ERA5-like store
(`lightning_seqpar.weather.data.synthetic`, 32 x 64 grid, 12-hourly), train 2000, validate 2001, 24 h lead, the 7
dynamic fields plus latitude / longitude channels in, 3 fields out. Every run: the same small ClimaX (D = 64,
depth 2, patch 2), residual forecasting, AdamW, the same number of epochs and optimizer steps, seed 0; a tiled
run's batch holds the tiles of as many fields as a whole-field batch holds fields. The number reported is the
validation RMSE of the stitched fields in physical units, at the end.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

FIELDS = [
    "2m_temperature",
    "10m_u_component_of_wind",
    "10m_v_component_of_wind",
    "geopotential_500",
    "geopotential_850",
    "temperature_500",
    "temperature_850",
]
OUT = ["geopotential_500", "temperature_850", "2m_temperature"]
RUNS = {
    "flat": {"aggregation": "flat"},
    "hierarchical (groups of 3)": {"aggregation": "hierarchical", "aggregation_group_size": 3},
    "hierarchical linear (groups of 3)": {"aggregation": "hierarchical", "aggregation_group_size": 3,
                                          "partial_aggregation": "linear"},
    "flat + TILES 2x2 halo 2": {"aggregation": "flat", "tiles": 2},
}


def train(store: Path, name: str, options: dict, epochs: int, batch: int, root: Path) -> dict:
    import torch
    from lightning.pytorch import Trainer, seed_everything

    from lightning_seqpar.weather.data.era5 import ERA5DataModule
    from lightning_seqpar.weather.forecast import ForecastModule
    from lightning_seqpar.weather.models import ClimaX

    seed_everything(0)
    tiles = options.pop("tiles", None)
    dm = ERA5DataModule(str(store), variables=FIELDS, out_variables=OUT, lead_time_hours=24, train_years="2000",
                        val_years="2001", static_variables=["latitude", "longitude"], tiles=tiles, tile_halo=2,
                        batch_size=batch * (tiles or 1) ** 2)
    grid = dm.tile_layout.tile_shape if tiles else dm.grid_shape
    model = ClimaX(dm.variables, grid, patch_size=2, embed_dim=64, depth=2, decoder_depth=1, num_heads=4, drop_path=0.0,
                   **options)
    module = ForecastModule(model, lr=1e-3, warmup_steps=20, residual=True, tiles=tiles, tile_halo=2)
    trainer = Trainer(
        default_root_dir=root / name.split()[0],
        max_epochs=epochs,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        check_val_every_n_epoch=epochs,
    )
    start = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    seconds = time.perf_counter() - start
    (metrics,) = trainer.validate(module, datamodule=dm, verbose=False)
    rmse = {f: metrics[f"val/rmse/{f}/24h"] for f in OUT}
    persistence = {f: metrics[f"val/persistence/rmse/{f}/24h"] for f in OUT}
    return {
        "run": name,
        "rmse": rmse,
        "persistence_rmse": persistence,
        "train_seconds": seconds,
        "steps": trainer.global_step,
        "tokens_per_sequence": model.num_patches,
        "parameters": sum(p.numel() for p in model.parameters()),
        "torch_threads": torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--runs", default=",".join(RUNS), help="comma list of run names (default: all)")
    args = parser.parse_args()
    from lightning_seqpar.weather.data.synthetic import write_synthetic_era5

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        store = write_synthetic_era5(Path(tmp) / "synthetic.zarr", years=[2000, 2001], step_hours=12, progress=False)
        for name in args.runs.split(","):
            options = RUNS[name]
            results.append(train(store, name, dict(options), args.epochs, args.batch, Path(tmp)))
            print(json.dumps(results[-1]), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "aggregation_quality.json").write_text(
        json.dumps({"epochs": args.epochs, "batch_fields": args.batch, "results": results}, indent=1)
    )
    lines = ["| run | tokens / sequence | steps | " + " | ".join(f"RMSE {f}" for f in OUT) + " | train s (CPU) |",
             "| --- | --- | --- | " + " | ".join("---" for _ in OUT) + " | --- |"]
    lines += [
        f"| {r['run']} | {r['tokens_per_sequence']} | {r['steps']} | "
        + " | ".join(f"{r['rmse'][f]:.3g}" for f in OUT)
        + f" | {r['train_seconds']:.0f} |"
        for r in results
    ]
    lines += ["| persistence | | | " + " | ".join(f"{results[0]['persistence_rmse'][f]:.3g}" for f in OUT) + " | |"]
    (out / "aggregation_quality.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
