"""`fl-train-local`: one hospital fine-tunes the adapter alone under DP-SGD (the federation's baseline).

It spends the hospital's privacy like any federated run: the hospital's node admits the plan against its policy
and ledger, charges each round before training it, and commits the run at the end (or aborts it, keeping what was
spent, if training fails). Its output folder is a servable run, like the federation's: a hospital inference node
serves it with `fl-gateway replica --hospital NAME`, and the gateway's noisy vote asks such nodes.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
import tomllib
import uuid
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from fl_core.artifacts import SUMMARY_FILE, run_folder
from fl_core.config import (
    CONF_DIR,
    AppConfig,
    ConfigError,
    compose_config,
    register_schemas,
    to_app_config,
)
from fl_core.console import run_console
from fl_core.data import load_splits
from fl_core.device import resolve_device
from fl_core.entry import OneLineParser, check_every_job, exit_on_bad_input, job_overrides, quiet_libraries
from fl_core.logs import log_context
from fl_core.model import build_model, load_tokenizer
from fl_core.training import evaluate, remove_prefix_cache, train_local, training_view
from fl_server.privacy_report import build_report
from fl_server.run_files import save_model, save_report
from fl_server.tracking import RunTracker
from privacy.accountant import AccountantState
from privacy.governance import Governance, Refused
from privacy.ledger import ABORTED, COMMITTED, LOCAL_RUN

from .hospital import PREFIX_CACHE, hospital_data
from .node import NodeSettings, NodeSettingsError
from .plan import privacy_plan, run_plan

LOCAL_STORES = ("sqlite", "file")  # MLflow stores on this machine


def local_config(cfg: AppConfig) -> AppConfig:
    """The run as one hospital makes it alone: nothing is aggregated, so no SecAgg+, no hospital-level DP and no
    federated evaluation (a policy that requires secure aggregation refuses local jobs)."""
    strategy = dataclasses.replace(cfg.strategy, federated_evaluation=False,
                                   secagg=dataclasses.replace(cfg.strategy.secagg, enabled=False))
    privacy = dataclasses.replace(cfg.privacy,
                                  client_level=dataclasses.replace(cfg.privacy.client_level, enabled=False))
    return dataclasses.replace(cfg, strategy=strategy, privacy=privacy)


def require_store_on_the_node(mlflow_uri: str) -> None:
    """A hospital's run alone is tracked on its node only: its round timings and config, and MLflow's own tags
    (the user, the source path), are no release of the hospital's, so no tracking server elsewhere receives them."""
    scheme = mlflow_uri.split("://", 1)[0] if "://" in mlflow_uri else "file"
    if scheme not in LOCAL_STORES:
        raise ConfigError("tracking.mlflow_uri", f"fl-train-local tracks on the hospital's node only: a sqlite:/// "
                                                 f"or file store, not a {scheme}:// server (MLFLOW_TRACKING_URI?)")


def run_local(cfg: AppConfig, node: NodeSettings) -> dict[str, object]:
    """Train the node's hospital's data for `federation.num_rounds` rounds of local epochs, in its ledger."""
    cfg = local_config(cfg)
    device = resolve_device(cfg.train.device)
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    public_test = load_splits(cfg.data).test
    data = hospital_data(cfg, node)
    sampling, sigma = privacy_plan(cfg, len(data.train))
    plan = run_plan(cfg, sampling, sigma, len(data.test))
    governance = Governance(node.rules, cfg.data.name)
    run_id = f"local-{node.hospital}-{uuid.uuid4().hex[:8]}"
    tracker = RunTracker(cfg, hospital=node.hospital)  # before admission: a store that fails reserves nothing
    try:
        admission = governance.admit(run_id, LOCAL_RUN, plan)
        print(f"{node.hospital}: {len(data.train)} examples, sigma={sigma}, {sampling.total_steps} steps, planned "
              f"epsilon {admission.entry.planned_epsilon:.3f}; run {run_id} in {node.ledger_path}", flush=True)
        tokenizer = load_tokenizer(cfg.model)
        model = build_model(cfg, tokenizer, len(data.train.label_names), device)
        before = evaluate(cfg, model, tokenizer, public_test, device)
        tracker.log_metrics({f"eval_{k}": v for k, v in before.items()}, step=0)
        print(f"before: {before}", flush=True)
        view = training_view(cfg, model, tokenizer, data.train, device, cache_dir=node.state_dir / PREFIX_CACHE)
        status = ABORTED
        optimizer_state = None  # kept in this one process (`train.keep_optimizer_state`); no file outlives it
        try:
            for epoch_round in range(1, cfg.federation.num_rounds + 1):
                start = time.perf_counter()
                entry = governance.begin_round(run_id, LOCAL_RUN, plan)
                history = AccountantState(entry.spent.history[:-1]) if sigma is not None else None
                result = train_local(cfg, model, tokenizer, data.train, device, plan=sampling,
                                     noise_multiplier=sigma, accountant=history, view=view,
                                     optimizer_state=optimizer_state)
                optimizer_state = result.optimizer_state
                # only what a federated run releases too: the training loss is no DP release, and the tracking
                # URI may name a server off the node
                tracker.log_metrics({f"epsilon/{node.hospital}": entry.epsilon,
                                     "round_seconds": time.perf_counter() - start}, step=epoch_round)
                print(f"round {epoch_round}/{cfg.federation.num_rounds}: loss {result.train_loss:.4f}, "
                      f"epsilon {entry.epsilon:.3f}, {time.perf_counter() - start:.1f}s", flush=True)
            status = COMMITTED
        finally:
            closed, _ = governance.close(run_id, LOCAL_RUN, status)
            remove_prefix_cache(node.state_dir / PREFIX_CACHE)
        after = evaluate(cfg, model, tokenizer, public_test, device)
        tracker.log_metrics({f"eval_{k}": v for k, v in after.items()}, step=cfg.federation.num_rounds)
        out = run_folder(cfg.output_dir, None)
        spend = {node.hospital: {"epsilon": closed.epsilon, "noise_multiplier": sigma or 0.0,
                                 "sample_rate": sampling.sample_rate, "steps": closed.spent.steps}}
        report = build_report(cfg, run_id, spend, cfg.federation.num_rounds, None, {})
        report["secure_aggregation"] = {"protocol": "none: trained by one hospital alone",
                                        "trust": "nothing is aggregated: the model stays on the hospital's node"}
        save_report(out, tracker, report)
        save_model(out, tracker, cfg, model, data.train.label_names)
        summary = {"hospital": node.hospital, "run_id": run_id, "before": before, "after": after,
                   "epsilon": closed.epsilon, "delta": cfg.privacy.delta, "noise_multiplier": sigma,
                   "steps": closed.spent.steps, "ledger": str(node.ledger_path), "mlflow_run_id": tracker.run_id}
        (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
    except BaseException:
        tracker.end("FAILED")
        raise
    tracker.end("FINISHED")
    print(json.dumps(summary, indent=2))
    return summary


def node_settings(hospital: int | None, node_config: Path | None) -> NodeSettings:
    """A node's own settings file (a real hospital), else the simulated hospital N under the node home."""
    if node_config is not None:
        try:
            raw = tomllib.loads(node_config.read_text())
        except (OSError, tomllib.TOMLDecodeError) as err:
            raise NodeSettingsError("--node-config", f"{node_config}: {err}") from None
        return NodeSettings.from_node_config(raw)
    return NodeSettings.from_node_config({"partition-id": hospital or 0}, simulated=True)


def main() -> None:
    """`fl-train-local [--hospital N | --node-config FILE] [Hydra flags] [overrides...]`: a Hydra app, so `-m`
    sweeps (one job after another, each in its own folder), `--cfg job`, `--info` and `--help` work as in
    fl-simulate."""
    quiet_libraries()
    register_schemas()
    parser = OneLineParser(prog="fl-train-local", add_help=False,
                           description="One hospital trains alone, in its ledger and its own MLflow.",
                           epilog="Then Hydra's flags (-m, --cfg job, --info) and config overrides.")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--hospital", type=int, help="partition N of the packaged data (a simulated hospital)")
    where.add_argument("--node-config", type=Path, help="the hospital node's settings (TOML), as fl-node reads them")
    args, hydra_argv = parser.parse_known_args(sys.argv[1:])
    if args.hospital is not None and args.hospital < 0:
        parser.error("--hospital: must be a partition number 0..N-1")
    if {"-h", "--help"} & set(hydra_argv):
        parser.print_help()
        print()

    def check(cfg: AppConfig) -> AppConfig:
        if args.hospital is not None and args.hospital >= cfg.federation.num_clients:
            raise ConfigError("--hospital", f"must be below federation.num_clients={cfg.federation.num_clients}")
        require_store_on_the_node(cfg.tracking.mlflow_uri)
        return cfg

    @hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
    def job(_: DictConfig) -> None:
        hydra_cfg = HydraConfig.get()
        overrides = job_overrides(list(hydra_cfg.overrides.task), hydra_cfg.runtime.output_dir)

        def run() -> None:
            cfg = check(to_app_config(compose_config(overrides)))
            folder = run_folder(cfg.output_dir, None)  # resolved once: run_local writes there too
            cfg = dataclasses.replace(cfg, output_dir=str(folder))
            node = node_settings(args.hospital, args.node_config)
            with run_console(folder, cfg.verbose, "fl-train-local", cfg.log_format), \
                    log_context(hospital=node.hospital):
                run_local(cfg, node)

        try:  # inside the job: Hydra reports exceptions raised here as tracebacks
            exit_on_bad_input("fl-train-local", run)
        except (Refused, NodeSettingsError) as err:
            print(f"fl-train-local: {err}", file=sys.stderr)
            raise SystemExit(3 if isinstance(err, Refused) else 2) from None

    exit_on_bad_input("fl-train-local", lambda: check_every_job(hydra_argv, check))
    sys.argv = [sys.argv[0], *hydra_argv]
    job()


if __name__ == "__main__":
    main()
