"""MLflow tracking of a federated run: resolved config, per-round convergence and privacy spend, artifacts."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import mlflow

from fl_core.artifacts import ADAPTER_DIR, CONFIG_FILE, LABELS_FILE, PRIVACY_REPORT_FILE, PRIVACY_REPORT_MARKDOWN
from fl_core.config import AppConfig, config_as_dict

NEWEST_ALIAS = "newest"  # the newest finished DP run's version


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def run_name(cfg: AppConfig, who: str | None = None) -> str:
    """A name a person can tell runs apart by in the MLflow UI: what was trained, on what, at what target, by whom
    (`who`: a hospital alone; else the federation's size)."""
    p = cfg.privacy
    target = "no-dp" if not p.enabled else f"sigma{p.noise_multiplier:g}" if p.noise_multiplier is not None \
        else f"eps{p.target_epsilon:g}"
    return f"{cfg.model.name}-{cfg.task.name}-{cfg.data.name}-{target}-{who or f'{cfg.federation.num_clients}h'}"


class RunTracker:
    """One MLflow run per training run, federated or one hospital's alone (`fl-train-local`, tracked in the
    hospital's own MLflow); a resumed run continues the same MLflow run."""

    def __init__(self, cfg: AppConfig, resume_run_id: str | None = None, hospital: str | None = None) -> None:
        mlflow.set_tracking_uri(cfg.tracking.mlflow_uri)
        mlflow.set_experiment(cfg.tracking.experiment)
        self.run = mlflow.start_run(run_id=resume_run_id,
                                    run_name=None if resume_run_id else run_name(cfg, hospital and f"{hospital}-alone"),
                                    tags={"trained_by": hospital or "federation"})
        self.run_id: str = self.run.info.run_id
        self.registered_model = cfg.tracking.registered_model
        if resume_run_id is None:
            mlflow.log_params(flatten(config_as_dict(cfg)))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        mlflow.log_metrics({k.replace(" ", "_"): float(v) for k, v in metrics.items()}, step=step)

    def log_artifacts(self, adapter_dir: Path, config: dict[str, Any], label_names: Sequence[str]) -> None:
        mlflow.log_artifacts(str(adapter_dir), artifact_path=ADAPTER_DIR)
        mlflow.log_dict(config, CONFIG_FILE)
        mlflow.log_text(json.dumps(list(label_names)), LABELS_FILE)

    def register_model(self, tags: dict[str, str], description: str, newest: bool) -> str:
        """A version of the registered model whose files are this run's (adapter, config, privacy report), so the
        gateway serves `models:/NAME/VERSION` with the same layout as a run folder, and an MLflow Model (an
        `MLmodel` at the run's root) that `mlflow.pyfunc.load_model` loads. The alias `newest` moves to it when
        `newest` (a run under DP: a deployment that serves @newest never picks up a run without it). Returns that
        URI."""
        from gateway.mlflow_model import save_mlmodel  # here: a hospital's local run never loads the gateway

        with tempfile.TemporaryDirectory() as folder:
            mlflow.log_artifact(str(save_mlmodel(Path(folder), self.run_id)))
        client = mlflow.MlflowClient()
        name = self.registered_model
        if not client.search_registered_models(filter_string=f"name = '{name}'"):
            client.create_registered_model(name)
        version = client.create_model_version(name, source=self.run.info.artifact_uri, run_id=self.run_id,
                                              tags=tags, description=description)
        if newest:
            client.set_registered_model_alias(name, NEWEST_ALIAS, version.version)
        return f"models:/{name}/{version.version}"

    def log_privacy_report(self, report: dict[str, Any], markdown: str) -> None:
        mlflow.log_text(json.dumps(report, indent=2), PRIVACY_REPORT_FILE)
        mlflow.log_text(markdown, PRIVACY_REPORT_MARKDOWN)

    def log_admission(self, plans: dict[str, dict[str, Any]], refusals: dict[str, str]) -> None:
        """Who admitted the run with what plan, and every refusal with its reason (a tag per hospital)."""
        mlflow.log_dict({"admitted": plans, "refused": refusals}, "admission.json")
        mlflow.set_tags({f"refused.{hospital}": reason[:5000] for hospital, reason in refusals.items()})
        mlflow.log_metric("hospitals_admitted", len(plans))

    def end(self, status: str) -> None:
        mlflow.end_run(status=status)
