"""A trained run's files (the layout of fl_core.artifacts), written to its folder and to its MLflow run together,
for a federated run and for one hospital's run alike."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from peft import PeftModel

from fl_core.artifacts import ADAPTER_DIR, CONFIG_FILE, LABELS_FILE, PRIVACY_REPORT_FILE, PRIVACY_REPORT_MARKDOWN
from fl_core.config import AppConfig, config_as_dict
from fl_core.model import save_adapter

from .privacy_report import report_markdown
from .tracking import RunTracker


def save_report(folder: Path, tracker: RunTracker, report: dict[str, Any]) -> None:
    """The privacy report as JSON and Markdown; also for a run that failed or was refused."""
    folder.mkdir(parents=True, exist_ok=True)
    markdown = report_markdown(report)
    (folder / PRIVACY_REPORT_FILE).write_text(json.dumps(report, indent=2))
    (folder / PRIVACY_REPORT_MARKDOWN).write_text(markdown)
    tracker.log_privacy_report(report, markdown)


def save_model(folder: Path, tracker: RunTracker, cfg: AppConfig, model: PeftModel,
               label_names: Sequence[str]) -> Path:
    """What rebuilds the trained model: the adapter, the resolved config and the label names. Returns the
    adapter's folder."""
    adapter_dir = save_adapter(model, folder / ADAPTER_DIR, cfg.model)
    (folder / CONFIG_FILE).write_text(json.dumps(config_as_dict(cfg), indent=2))
    (folder / LABELS_FILE).write_text(json.dumps(list(label_names)))
    tracker.log_artifacts(adapter_dir, config_as_dict(cfg), label_names)
    return adapter_dir
