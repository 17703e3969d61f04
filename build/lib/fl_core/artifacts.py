"""The layout of a trained run: the server writes it (output folder and MLflow run alike), the gateway reads it."""

from __future__ import annotations

import os
from datetime import datetime
from pathlib import Path

ADAPTER_DIR = "adapter"  # peft format: adapter_config.json + adapter_model.safetensors
CONFIG_FILE = "config.json"  # the resolved training config, to rebuild the same base model
LABELS_FILE = "labels.json"  # the classifier's label names in index order (public: the dataset's label set)
PRIVACY_REPORT_FILE = "privacy_report.json"
PRIVACY_REPORT_MARKDOWN = "privacy_report.md"
SUMMARY_FILE = "summary.json"

RUNS_ROOT = Path("outputs")  # where runs go when the config names no folder (flwr run); relative to the SuperExec's
LATEST = "latest"  # RUNS_ROOT/latest: a link to the newest of those runs


def run_folder(output_dir: str | None, resume_from: str | None) -> Path:
    """Where a run writes: the folder it resumes, the one its config names, else a new one, never a previous run's:
    `outputs/<date>/<time>` (`-2`, `-3`... when two start in one second), which `outputs/latest` then links to."""
    if resume_from:
        return Path(resume_from)
    if output_dir:
        return Path(output_dir)
    now = datetime.now()
    base = RUNS_ROOT / now.strftime("%Y-%m-%d") / now.strftime("%H-%M-%S")
    folder, tries = base, 1
    while True:
        try:
            folder.mkdir(parents=True)
            break
        except FileExistsError:
            tries += 1
            folder = base.with_name(f"{base.name}-{tries}")
    latest = RUNS_ROOT / LATEST
    if latest.is_symlink() or not latest.exists():  # a real folder there (an older layout) is left alone
        staged = RUNS_ROOT / f".{LATEST}-{os.getpid()}"
        staged.unlink(missing_ok=True)
        staged.symlink_to(folder.relative_to(RUNS_ROOT))
        os.replace(staged, latest)  # atomic: a reader sees the old run or the new one
    return folder
