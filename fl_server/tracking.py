"""MLflow tracking of a federated run: resolved config, per-round convergence and privacy spend, artifacts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlflow

from fl_core.config import AppConfig, config_as_dict


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


class RunTracker:
    """One MLflow run per federated training run; a resumed run continues the same MLflow run."""

    def __init__(self, cfg: AppConfig, resume_run_id: str | None = None) -> None:
        mlflow.set_tracking_uri(cfg.tracking.mlflow_uri)
        mlflow.set_experiment(cfg.tracking.experiment)
        self.run = mlflow.start_run(run_id=resume_run_id)
        self.run_id: str = self.run.info.run_id
        if resume_run_id is None:
            mlflow.log_params(flatten(config_as_dict(cfg)))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        mlflow.log_metrics({k.replace(" ", "_"): float(v) for k, v in metrics.items()}, step=step)

    def log_artifacts(self, adapter_dir: Path, config: dict[str, Any]) -> None:
        mlflow.log_artifacts(str(adapter_dir), artifact_path="adapter")
        mlflow.log_dict(config, "config.json")

    def log_privacy_report(self, report: dict[str, Any], markdown: str) -> None:
        mlflow.log_text(json.dumps(report, indent=2), "privacy_report.json")
        mlflow.log_text(markdown, "privacy_report.md")

    def log_admission(self, plans: dict[str, dict[str, Any]], refusals: dict[str, str]) -> None:
        """Who admitted the run with what plan, and every refusal with its reason (a tag per hospital)."""
        mlflow.log_dict({"admitted": plans, "refused": refusals}, "admission.json")
        mlflow.set_tags({f"refused.{hospital}": reason[:5000] for hospital, reason in refusals.items()})
        mlflow.log_metric("hospitals_admitted", len(plans))

    def end(self, status: str) -> None:
        mlflow.end_run(status=status)
