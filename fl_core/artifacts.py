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
    `outputs/<date>/<time>` (`-2`, `-3`... when several start in one second), which `outputs/latest` then links to."""
    if resume_from:
        return Path(resume_from)
    if output_dir:
        return Path(output_dir)
    now = datetime.now()
    day = RUNS_ROOT / now.strftime("%Y-%m-%d")
    day.mkdir(parents=True, exist_ok=True)  # a parent that cannot be made (a dangling link) fails here, once
    for tries in range(1, 1000):
        folder = day / (now.strftime("%H-%M-%S") + (f"-{tries}" if tries > 1 else ""))
        try:
            folder.mkdir()
        except FileExistsError:
            continue
        mark_latest(folder)
        return folder
    raise FileExistsError(f"output_dir: {day} holds 999 runs started at {now:%H-%M-%S}; name one")


def mark_latest(folder: Path) -> None:
    """Point `outputs/latest` at a run folder under `outputs/` (the replica's default source). A real folder named
    so (an older layout) is left alone."""
    latest = RUNS_ROOT / LATEST
    if not folder.resolve().is_relative_to(RUNS_ROOT.resolve()) or (latest.exists() and not latest.is_symlink()):
        return
    staged = RUNS_ROOT / f".{LATEST}-{os.getpid()}"
    staged.unlink(missing_ok=True)
    staged.symlink_to(folder.resolve().relative_to(RUNS_ROOT.resolve()))
    os.replace(staged, latest)  # atomic: a reader sees the old run or the new one
