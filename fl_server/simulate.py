"""`fl-simulate`: a Flower simulation of N hospitals from the Hydra config, ending in a before/after table.

Every check that can fail on configuration or data runs before the simulation engine starts: composing and
validating the config, partitioning the data and calibrating each hospital's noise.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from fl_core.artifacts import SUMMARY_FILE, mark_latest, run_folder
from fl_core.config import CONF_DIR, AppConfig, compose_config, register_schemas, to_app_config
from fl_core.console import run_console
from fl_core.entry import check_every_job, exit_on_bad_input, job_overrides, quiet_libraries
from fl_core.tracing import configure_tracing

from .admission import AdmissionFailed


def preflight(cfg: AppConfig) -> dict[str, float | None]:
    """Partition the data and calibrate every hospital's sigma, so bad input fails before Ray starts."""
    from fl_client.plan import privacy_plan
    from fl_core.data import hospital_datasets, load_splits

    trains = hospital_datasets(load_splits(cfg.data).train, cfg.federation, cfg.data.seed)
    return {f"hospital-{p}": privacy_plan(cfg, len(train))[1] for p, train in enumerate(trains)}


def backend_config(cfg: AppConfig) -> dict[str, Any]:
    """One single-threaded actor per hospital, up to two per core: 3 hospitals on 2 cores train side by side, so a
    round lasts the work over both cores, not two waves (the largest hospitals' sum)."""
    import torch

    cores = os.cpu_count() or 1
    gpus = 1.0 / cfg.federation.num_clients if cfg.train.device != "cpu" and torch.cuda.is_available() else 0.0
    actors = max(cores, min(cfg.federation.num_clients, 2 * cores))
    # the hospitals' own output (library warnings, Ray's notes) stays in Ray's logs unless asked for
    return {"client_resources": {"num_cpus": 1, "num_gpus": gpus},
            "init_args": {"num_cpus": actors, "log_to_driver": cfg.verbose}}


def simulate(overrides: list[str]) -> dict[str, Any]:
    """Run the simulation for these overrides; returns the run's summary."""
    from flwr.simulation import run_simulation

    from fl_client.client_app import build_client_app

    from .server_app import build_server_app

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # Ray listens on loopback only
    cfg = to_app_config(compose_config(overrides))
    sigmas = preflight(cfg)
    folder = run_folder(cfg.output_dir, cfg.resume_from)  # the Hydra job's folder (simulation_overrides)
    mark_latest(folder)  # `make demo`, then `fl-gateway replica` serves it by default
    print(f"fl-simulate: {cfg.federation.num_clients} hospitals, {cfg.model.name} on {cfg.data.name}, "
          f"{cfg.federation.num_rounds} rounds, SecAgg+ {'on' if cfg.strategy.secagg.enabled else 'off'}, "
          f"sigma {', '.join(f'{h} {s:.3f}' if s is not None else f'{h} none' for h, s in sigmas.items())}; "
          f"output in {folder}", flush=True)
    with run_console(folder, cfg.verbose, "fl-simulate", cfg.log_format):
        run_simulation(server_app=build_server_app(overrides), client_app=build_client_app(overrides),
                       num_supernodes=cfg.federation.num_clients, backend_config=backend_config(cfg))
    summary: dict[str, Any] = json.loads((folder / SUMMARY_FILE).read_text())
    return summary


def print_table(summary: dict[str, Any]) -> None:
    before, after = summary["initial_metrics"], summary["final_metrics"]
    print(f"\n{'metric':<14}{'before':>14}{'after':>14}")  # wide enough for a random model's perplexity
    for key in sorted(after):
        print(f"{key:<14}{before.get(key, float('nan')):>14.4f}{after[key]:>14.4f}")
    print(f"\n{'hospital':<14}{'epsilon':>9}{'sigma':>9}   (delta {summary['delta']})")
    for hospital in sorted(summary["epsilon_per_client"]):
        print(f"{hospital:<14}{summary['epsilon_per_client'][hospital]:>9.3f}"
              f"{summary['noise_multiplier'][hospital]:>9.3f}")
    print(f"\nrounds {summary['rounds_completed']} (stopped early: {summary['stopped_early']}), "
          f"adapter {summary['adapter_path']}, MLflow run {summary['mlflow_run_id']}")


def simulation_overrides(task_overrides: list[str], job_folder: str) -> list[str]:
    """The command line's overrides, writing in the Hydra job's folder, one thread per simulated hospital."""
    overrides = job_overrides(task_overrides, job_folder)
    if to_app_config(compose_config(task_overrides)).train.num_threads is None:
        overrides.append("train.num_threads=1")  # oversubscription is 4-8x slower
    return overrides


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def _hydra_main(_: DictConfig) -> None:
    quiet_libraries()
    hydra_cfg = HydraConfig.get()
    overrides = simulation_overrides(list(hydra_cfg.overrides.task), hydra_cfg.runtime.output_dir)
    # Inside the job, since Hydra reports exceptions raised here as tracebacks.
    try:
        exit_on_bad_input("fl-simulate", lambda: print_table(simulate(overrides)))
    except AdmissionFailed as err:
        print(f"fl-simulate: run refused: {err}", file=sys.stderr)
        raise SystemExit(3) from None


def main() -> None:
    quiet_libraries()
    register_schemas()

    exit_on_bad_input("fl-simulate", lambda: check_every_job(sys.argv[1:]))
    exit_on_bad_input("fl-simulate", lambda: configure_tracing("fl-serverapp"))  # the rounds' spans
    _hydra_main()


if __name__ == "__main__":
    main()
