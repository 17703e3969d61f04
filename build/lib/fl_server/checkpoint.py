"""Global adapter checkpoints, one per round, so an interrupted run resumes where it stopped."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from flwr.common import NDArrays

LATEST = "latest.json"
OPTIMIZER_FILE = "{stem}-server-optimizer.npz"


@dataclass
class Checkpoint:
    server_round: int
    arrays_file: str
    mlflow_run_id: str | None = None
    convergence_streak: int = 0
    last_loss: float | None = None
    initial_metrics: dict[str, float] = field(default_factory=dict)
    server_optimizer_steps: int = 0  # with its moments in OPTIMIZER_FILE next to the arrays
    server_optimizer: dict[str, object] = field(default_factory=dict)  # the settings that took those steps


def checkpoint_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def save_checkpoint(output_dir: str | Path, arrays: NDArrays, checkpoint: Checkpoint,
                    moments: tuple[NDArrays, NDArrays] = ([], [])) -> Path:
    """The round's model and the server optimiser's `moments` (first, second), then latest.json naming them."""
    folder = checkpoint_dir(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    arrays_path = folder / checkpoint.arrays_file
    np.savez(arrays_path, *arrays)
    first, second = moments
    _optimizer_path(folder, checkpoint).unlink(missing_ok=True)  # never a stale one from an earlier try
    if first or second:  # plain averaging keeps none
        moments_by_name = {f"first_{i}": a for i, a in enumerate(first)} | {f"second_{i}": a
                                                                             for i, a in enumerate(second)}
        np.savez(_optimizer_path(folder, checkpoint), **moments_by_name)  # type: ignore[arg-type]
    tmp = folder / f".{LATEST}.tmp"
    tmp.write_text(json.dumps(asdict(checkpoint), indent=2))
    os.replace(tmp, folder / LATEST)  # latest.json only ever names a complete arrays file
    return arrays_path


Resumed = tuple[Checkpoint, NDArrays, tuple[NDArrays, NDArrays]]  # the record, the model, the server moments


def load_checkpoint(output_dir: str | Path) -> Resumed | None:
    """The newest checkpoint: its record, the model, and the server optimiser's moments (first, second)."""
    latest = checkpoint_dir(output_dir) / LATEST
    if not latest.exists():
        return None
    checkpoint = Checkpoint(**json.loads(latest.read_text()))
    with np.load(checkpoint_dir(output_dir) / checkpoint.arrays_file) as stored:
        arrays = [stored[f"arr_{i}"] for i in range(len(stored.files))]
    optimizer = _optimizer_path(checkpoint_dir(output_dir), checkpoint)
    if not optimizer.exists():
        return checkpoint, arrays, ([], [])
    with np.load(optimizer) as stored:
        first, second = ([stored[f"{kind}_{i}"] for i in range(sum(k.startswith(f"{kind}_") for k in stored.files))]
                         for kind in ("first", "second"))
    return checkpoint, arrays, (first, second)


def _optimizer_path(folder: Path, checkpoint: Checkpoint) -> Path:
    return folder / OPTIMIZER_FILE.format(stem=Path(checkpoint.arrays_file).stem)
