"""Global adapter checkpoints, one per round, so an interrupted run resumes where it stopped."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from flwr.common import NDArrays

LATEST = "latest.json"


@dataclass
class Checkpoint:
    server_round: int
    arrays_file: str
    mlflow_run_id: str | None = None
    convergence_streak: int = 0
    last_loss: float | None = None
    initial_metrics: dict[str, float] = field(default_factory=dict)


def checkpoint_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def save_checkpoint(output_dir: str | Path, arrays: NDArrays, checkpoint: Checkpoint) -> Path:
    folder = checkpoint_dir(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    arrays_path = folder / checkpoint.arrays_file
    np.savez(arrays_path, *arrays)
    tmp = folder / f".{LATEST}.tmp"
    tmp.write_text(json.dumps(asdict(checkpoint), indent=2))
    os.replace(tmp, folder / LATEST)  # latest.json only ever names a complete arrays file
    return arrays_path


def load_checkpoint(output_dir: str | Path) -> tuple[Checkpoint, NDArrays] | None:
    latest = checkpoint_dir(output_dir) / LATEST
    if not latest.exists():
        return None
    checkpoint = Checkpoint(**json.loads(latest.read_text()))
    with np.load(checkpoint_dir(output_dir) / checkpoint.arrays_file) as stored:
        arrays = [stored[f"arr_{i}"] for i in range(len(stored.files))]
    return checkpoint, arrays
