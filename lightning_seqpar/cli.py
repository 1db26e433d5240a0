"""The `seqpar` command: LightningCLI over ForecastModule and ERA5DataModule, driven by the YAML recipes.

    seqpar fit --config recipes/quickstart.yaml
    seqpar test --config recipes/quickstart.yaml --ckpt_path last

`seqpar` registers the strategy names (`seqpar`, `seqpar_ulysses`, `seqpar_lss`) by importing
`lightning_seqpar`, links the fields and the grid of the data to the model, and can write the synthetic
ERA5-like store the quickstart trains on when the recipe's `synthetic_data` section asks for it.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import lightning_seqpar  # noqa: F401  registers the strategy names with Lightning
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_info

from lightning_seqpar.data.era5 import ERA5DataModule
from lightning_seqpar.data.synthetic import write_synthetic_era5
from lightning_seqpar.forecast import ForecastModule

__all__ = ["SeqParCLI", "SyntheticData", "main"]

SYNTHETIC_WAIT_SECONDS = 600.0
"""How long ranks other than 0 wait for rank 0 to write the synthetic store."""


@dataclass
class SyntheticData:
    """Writes a synthetic ERA5-like store at `data.path` before training when no store is there yet.

    Attributes:
        grid: (latitudes, longitudes), e.g. (32, 64) for the 5.625 deg WeatherBench grid.
        years: consecutive years to write; the data's train/val/test years must be among them.
        step_hours: hours between stored times; must divide 24.
        levels: pressure levels in hPa, a subset of (500, 850).
        seed: seed of the synthetic weather.
    """

    grid: tuple[int, int] = (32, 64)
    years: list[int] = field(default_factory=lambda: [2000, 2001, 2002])
    step_hours: int = 6
    levels: list[int] = field(default_factory=lambda: [500, 850])
    seed: int = 0


def _global_rank() -> int:
    """This process's rank as the launcher (torchrun, srun, Lightning's subprocess launcher) sets it, 0 if none."""
    for name in ("RANK", "SLURM_PROCID", "PMI_RANK", "OMPI_COMM_WORLD_RANK"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 0


def ensure_synthetic_store(path: str | Path, spec: SyntheticData) -> None:
    """Writes the store at `path` once (rank 0, to a temporary name then renamed), other ranks wait for it."""
    path = Path(path)
    if path.exists():
        return
    if _global_rank() != 0:
        deadline = time.monotonic() + SYNTHETIC_WAIT_SECONDS
        while not path.exists():
            if time.monotonic() > deadline:
                raise TimeoutError(f"rank 0 did not write the synthetic store {path} in {SYNTHETIC_WAIT_SECONDS:g} s")
            time.sleep(2.0)
        return
    rank_zero_info(f"seqpar: writing a synthetic ERA5-like store to {path} (synthetic_data in the config)")
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        write_synthetic_era5(
            partial, years=spec.years, step_hours=spec.step_hours, grid=tuple(spec.grid), levels=spec.levels,
            seed=spec.seed, progress=True,
        )
        os.replace(partial, path)  # other ranks never see a half-written store
    finally:
        if partial.exists():
            shutil.rmtree(partial, ignore_errors=True)


def _model_variables(variables: list[str], out_variables: list[str]) -> list[str]:
    """Every field the model must know: the inputs, then outputs that are not inputs."""
    return list(dict.fromkeys([*variables, *out_variables]))


class SeqParCLI(LightningCLI):
    """LightningCLI with the data -> model links of the forecasting recipes and the synthetic-store option."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument(
            "--synthetic_data", type=SyntheticData | None, default=None,
            help="Write a synthetic ERA5-like store at data.path first if none is there (quickstart, tests).",
        )
        # The datamodule reports canonical field names (t2m -> 2m_temperature) and the grid of the store,
        # so the links run once it is instantiated.
        parser.link_arguments(
            ("data.variables", "data.out_variables"), "model.model.init_args.default_variables",
            compute_fn=_model_variables, apply_on="instantiate",
        )
        parser.link_arguments("data.grid_shape", "model.model.init_args.img_size", apply_on="instantiate")

    def before_instantiate_classes(self) -> None:
        config = self.config.get(self.subcommand, self.config) if self.subcommand else self.config
        spec = config.get("synthetic_data")
        if spec is not None:
            if not isinstance(spec, SyntheticData):
                spec = SyntheticData(**dict(spec))
            ensure_synthetic_store(config["data"]["path"], spec)


    def after_fit(self) -> None:
        """End a training run with its last validation skill next to persistence, on the console."""
        if self.trainer.is_global_zero:
            table = skill_table(self.trainer.callback_metrics, "val")
            if table:
                print(table, flush=True)


def skill_table(metrics: dict, stage: str) -> str:
    """A markdown table of ``<stage>/rmse/<field>/<lead>h`` against ``<stage>/persistence/rmse/...``, or ''."""
    prefix = f"{stage}/rmse/"
    rows = []
    for key in sorted(k for k in metrics if k.startswith(prefix)):
        field, lead = key[len(prefix):].rsplit("/", 1)
        model = float(metrics[key])
        baseline = metrics.get(f"{stage}/persistence/rmse/{field}/{lead}")
        if baseline is None:
            rows.append(f"| {field} | {lead} | {model:.4g} | - | - |")
        else:
            baseline = float(baseline)
            rows.append(f"| {field} | {lead} | {model:.4g} | {baseline:.4g} | {'yes' if model < baseline else 'no'} |")
    if not rows:
        return ""
    header = [f"{stage} RMSE (physical units), model vs persistence:", "", "| field | lead | model | persistence | beats persistence |", "|---|---|---|---|---|"]
    return "\n".join(header + rows)


def main(args: Sequence[str] | None = None) -> None:
    """Entry point of `seqpar fit|validate|test|predict --config RECIPE.yaml`."""
    SeqParCLI(
        ForecastModule,
        ERA5DataModule,
        subclass_mode_model=False,
        subclass_mode_data=False,
        auto_configure_optimizers=False,  # ForecastModule.configure_optimizers owns AdamW + warmup-cosine
        seed_everything_default=0,  # every rank of a sequence-parallel group must draw the same drop-path masks
        save_config_kwargs={"overwrite": True},
        args=args,
    )


if __name__ == "__main__":
    main()
