"""The `seqpar` command: LightningCLI over ForecastModule and ERA5DataModule, driven by the YAML recipes.

    seqpar fit --config recipes/quickstart.yaml
    seqpar test --config recipes/quickstart.yaml --ckpt_path last

`seqpar` registers the strategy names by importing `lightning_seqpar`, links the fields and the grid of the
data to the model, checks the configuration before it starts any process (:mod:`lightning_seqpar.weather.cli_checks`),
gives each run its own directory (``<default_root_dir>/lightning_logs/version_N``), resolves ``--ckpt_path
last`` inside the latest run, writes the forecasts of ``seqpar predict`` to NetCDF, ends a failed
multi-process run with the error of the rank that failed first, and writes the synthetic store of the
quickstart at ``synthetic_data.path`` when ``data.path`` names that same path.
"""

# ruff: noqa: E402 - the weather extra is checked before jsonargparse and the data modules are imported

from __future__ import annotations

import os
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from lightning_seqpar.weather import require_weather_extra

require_weather_extra("the seqpar command (lightning_seqpar.weather.cli)")  # before jsonargparse: name what is missing

from jsonargparse import DefaultHelpFormatter
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_info
from torch.distributed.elastic.multiprocessing.errors import record

import lightning_seqpar  # noqa: F401  registers the strategy names with Lightning
from lightning_seqpar.failures import FAILURE_DIR_ENV, FailureRecorder, report_failure, start_failure_dir
from lightning_seqpar.weather.cli_checks import (
    ConfigError,
    check_data,
    check_model,
    check_strategy,
    derive_data_options,
    resolve_checkpoint,
)
from lightning_seqpar.weather.data.era5 import ERA5DataModule
from lightning_seqpar.weather.data.synthetic import write_synthetic_era5
from lightning_seqpar.weather.forecast import ForecastModule
from lightning_seqpar.weather.forecast_io import ForecastWriter

__all__ = ["SeqParCLI", "SyntheticData", "main"]

SYNTHETIC_WAIT_SECONDS = 600.0
"""How long ranks other than 0 wait for rank 0 to write the synthetic store."""

HELP = """\
Train, score and run ClimaX-style weather forecasters, sequence-parallel over many GPUs (or CPU processes).

subcommands:
  fit       train; checkpoints, config.yaml and metrics go to <trainer.default_root_dir>/lightning_logs/version_N/
  validate  score the validation years
  test      RMSE/ACC per field and lead time against persistence and climatology, and two figures
            (forecast_map.png, rmse_by_lead_time.png) in the run's version_N/ directory
  predict   forecasts in physical units, written to version_N/forecasts.nc (CF-1.8 NetCDF)

recipes (YAML under recipes/, any key can be overridden on the command line):
  quickstart.yaml        2 CPU processes on a synthetic store it writes itself; a few minutes
  your_data.yaml         the quickstart's model on your store: --data.path PATH --data.variables "[t2m,z_500]"
  climax_5.625deg.yaml   ClimaX at 5.625 deg (WeatherBench2 ERA5), data parallel on GPUs
  climax_1.40625deg.yaml, longseq_0.25deg.yaml   sequence parallel on GPU nodes

common options:
  --config FILE                   the recipe
  --ckpt_path last|best|FILE      last/best checkpoint of the latest run under trainer.default_root_dir
  --data.path PATH                your store (zarr, NetCDF, GRIB, a directory or a glob)
  --data.variables [a,b]          input fields (t2m, z_500, geopotential_500, ...)
  --trainer.devices N             processes (GPUs, or CPU processes) per node
  --trainer.strategy NAME         {strategies},
                                  or a Lightning strategy (auto, ddp, ...)
  --trainer.default_root_dir DIR  where runs go
  --print_config                  print the full resolved configuration and stop

examples:
  seqpar fit --config recipes/quickstart.yaml
  seqpar test --config recipes/quickstart.yaml --ckpt_path last
  seqpar fit --help               every option of fit
Documentation: docs/recipes.md."""


def _help() -> str:
    """HELP with the strategy names registered now (one registry, read here and by Lightning)."""
    from lightning.pytorch.strategies import StrategyRegistry

    names = [n for n in StrategyRegistry.available_strategies() if n.startswith("seqpar")]
    lines, line = [], ""
    for name in names:  # wrapped under the option's column
        if line and len(line) + len(name) > 70:
            lines.append(line + ",")
            line = ""
        line = f"{line}, {name}" if line else name
    return HELP.format(strategies=("\n" + " " * 34).join(lines + [line]))


class _HelpFormatter(DefaultHelpFormatter):
    """Keeps the line breaks of the description (argparse reflows it into one paragraph)."""

    def _fill_text(self, text, width, indent):
        return "".join(indent + line for line in text.splitlines(keepends=True))


@dataclass
class SyntheticData:
    """Writes a synthetic ERA5-like store at `path` before training, when `data.path` is that same path and no
    store is there yet. A `data.path` elsewhere is read as real data: nothing synthetic is ever written there.

    Attributes:
        path: where the synthetic store lives, e.g. data/synthetic-era5.zarr; must be given.
        grid: (latitudes, longitudes), e.g. (32, 64) for the 5.625 deg WeatherBench grid.
        years: consecutive years to write; the data's train/val/test years must be among them.
        step_hours: hours between stored times; must divide 24.
        levels: pressure levels in hPa, a subset of (500, 850).
        seed: seed of the synthetic weather.
    """

    path: str | None = None
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
    return int(os.environ.get("LOCAL_RANK", "0")) if os.environ.get("LOCAL_RANK", "").isdigit() else 0


def ensure_synthetic_store(path: str | Path, spec: SyntheticData) -> None:
    """Writes the store at `path` once (rank 0, to a temporary name then renamed), other ranks wait for it.

    Raises:
        TimeoutError: on a rank other than 0, when rank 0 has not written the store in time.
    """
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
    rank_zero_info(f"seqpar: writing a synthetic ERA5-like store to {path} (synthetic_data.path in the config)")
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


def _synthetic_spec(value) -> SyntheticData | None:
    if value is None or isinstance(value, SyntheticData):
        return value
    return SyntheticData(**(value.as_dict() if hasattr(value, "as_dict") else dict(value)))


class SeqParCLI(LightningCLI):
    """LightningCLI with the data -> model links of the forecasting recipes, checks before launch, one directory
    per run, ``--ckpt_path last`` of the latest run, the forecast writer, and first-failure reporting.

    Raises:
        SystemExit: when a rank of a multi-process run fails: the failure is recorded for the launcher,
            which reports the first one (``report_failure``).
    """

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("parser_kwargs", {}).setdefault("description", _help())
        kwargs["parser_kwargs"].setdefault("formatter_class", _HelpFormatter)
        try:
            super().__init__(*args, **kwargs)
        except (ConfigError, SystemExit, KeyboardInterrupt):
            raise
        except Exception as err:
            trainer = getattr(self, "trainer", None)
            children = getattr(getattr(getattr(trainer, "strategy", None), "launcher", None), "procs", None)
            if os.environ.get(FAILURE_DIR_ENV) and (children or _global_rank() != 0):
                raise SystemExit(report_failure(err, trainer)) from None  # several ranks: the first failure last
            raise

    def add_arguments_to_parser(self, parser) -> None:
        """Adds ``--synthetic_data`` and links the data's fields, grid and lead times to the model's arguments."""
        parser.add_argument(
            "--synthetic_data", type=SyntheticData | None, default=None,
            help="Write a synthetic ERA5-like store at synthetic_data.path first, if data.path is that path and "
                 "no store is there (quickstart, tests). Never writes at any other data.path.",
        )
        # The datamodule reports canonical field names (t2m -> 2m_temperature) and the grid of the store,
        # so the links run once it is instantiated.
        parser.link_arguments(
            ("data.variables", "data.out_variables"), "model.model.init_args.default_variables",
            compute_fn=_model_variables, apply_on="instantiate",
        )
        # With TILES the model sees one tile with its halo, not the whole grid.
        parser.link_arguments("data.model_grid_shape", "model.model.init_args.img_size", apply_on="instantiate")

    def before_instantiate_classes(self) -> None:
        """Writes the synthetic store if asked, derives and checks the data, model and strategy options, and
        resolves ``--ckpt_path last|best``, all before any process is started.

        Raises:
            ConfigError: for an option that cannot work (missing synthetic store path, fields, years, lead
                times, strategy or checkpoint), naming the option and what to write instead.
        """
        config = self.config.get(self.subcommand, self.config) if self.subcommand else self.config
        data = config["data"]
        spec = _synthetic_spec(config.get("synthetic_data"))
        if spec is not None:
            if not spec.path:
                raise ConfigError("--synthetic_data.path: name where the synthetic store goes, e.g. "
                                  "data/synthetic-era5.zarr, and point --data.path at it")
            if os.path.abspath(spec.path) == os.path.abspath(str(data["path"])):
                ensure_synthetic_store(spec.path, spec)
            elif _global_rank() == 0:
                print(f"seqpar: reading --data.path {data['path']} as your data (synthetic_data.path is "
                      f"{spec.path}; no synthetic store is written)", file=sys.stderr)
        plain = data.as_dict() if hasattr(data, "as_dict") else dict(data)
        for key, value in derive_data_options(plain).items():
            data[key] = value
            if _global_rank() == 0:
                print(f"seqpar: --data.{key} {value} (the store's last year)", file=sys.stderr)
        dm = check_data(plain)
        model = config["model"].as_dict() if hasattr(config["model"], "as_dict") else dict(config["model"])
        check_model(model, dm)
        trainer = config["trainer"].as_dict() if hasattr(config["trainer"], "as_dict") else dict(config["trainer"])
        for note in check_strategy(trainer, model):
            if _global_rank() == 0:
                print(f"seqpar: warning: {note}", file=sys.stderr)
        which = config.get("ckpt_path")
        if which in ("last", "best"):
            root = trainer.get("default_root_dir") or os.getcwd()
            path = resolve_checkpoint(which, root)
            config["ckpt_path"] = str(path)
            if _global_rank() == 0:
                print(f"seqpar: --ckpt_path {which} -> {path}", file=sys.stderr)

    def instantiate_trainer(self, **kwargs):
        """The recipe's trainer plus the failure recorder, and the forecast writer for `predict`."""
        extra = [FailureRecorder()]
        if self.subcommand == "predict":
            callbacks = self._get(self.config_init, "trainer.callbacks", default=None) or []
            if not any(isinstance(c, ForecastWriter) for c in callbacks):
                extra.append(ForecastWriter())
        trainer = super().instantiate_trainer(**kwargs)
        trainer.callbacks.extend(extra)
        return trainer

    def after_fit(self) -> None:
        """End a training run with its last validation skill next to persistence, and where the run went."""
        if self.trainer.is_global_zero:
            table = skill_table(self.trainer.callback_metrics, "val")
            if table:
                print(table, flush=True)
            print(f"seqpar: run written to {_run_dir(self.trainer)}", flush=True)

    def after_test(self) -> None:
        """Prints where the test metrics and figures were written (on global rank 0)."""
        if self.trainer.is_global_zero:
            print(f"seqpar: metrics and figures in {_run_dir(self.trainer)}", flush=True)


def _run_dir(trainer) -> str:
    """The run's directory without a collective (``Trainer.log_dir`` broadcasts; the other ranks may have left)."""
    logger = trainer.logger
    return str(getattr(logger, "log_dir", None) or trainer.default_root_dir)


def skill_table(metrics: dict, stage: str) -> str:
    """A markdown table of ``<stage>/rmse/<field>/<lead>`` against ``<stage>/persistence/rmse/...``, or ''."""
    prefix = f"{stage}/rmse/"
    rows = []
    for key in sorted(k for k in metrics if k.startswith(prefix)):
        name, lead = key[len(prefix):].rsplit("/", 1)
        model = float(metrics[key])
        baseline = metrics.get(f"{stage}/persistence/rmse/{name}/{lead}")
        if baseline is None:
            rows.append(f"| {name} | {lead} | {model:.4g} | - | - |")
        else:
            baseline = float(baseline)
            rows.append(f"| {name} | {lead} | {model:.4g} | {baseline:.4g} | {'yes' if model < baseline else 'no'} |")
    if not rows:
        return ""
    header = [f"{stage} RMSE (physical units), model vs persistence:", "",
              "| field | lead | model | persistence | beats persistence |", "|---|---|---|---|---|"]
    return "\n".join(header + rows)


def main(args: Sequence[str] | None = None) -> None:
    """Entry point of `seqpar fit|validate|test|predict --config RECIPE.yaml`."""
    if "TORCHELASTIC_RUN_ID" in os.environ:  # torchrun's summary then names the root-cause rank and its traceback
        return record(_main)(args)
    return _main(args)


def _main(args: Sequence[str] | None) -> None:
    created = FAILURE_DIR_ENV not in os.environ and start_failure_dir()
    try:
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
    except ConfigError as err:
        subcommand = next(
            (a for a in (args if args is not None else sys.argv[1:]) if a in ("fit", "validate", "test", "predict")), ""
        )
        print(f"seqpar {subcommand}: error: {err}".replace("seqpar : ", "seqpar: "), file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    finally:
        if created:
            os.environ.pop(FAILURE_DIR_ENV, None)
            shutil.rmtree(created, ignore_errors=True)


if __name__ == "__main__":
    main()
