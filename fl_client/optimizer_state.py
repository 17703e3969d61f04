"""A hospital's local optimiser state from one of its rounds to the next (`train.keep_optimizer_state`).

A deployed node starts a ClientApp process per message, so what a hospital carries between rounds lives in its
node's state folder, as the prefix cache does. Adam's moments are running averages of the hospital's clipped and
noised gradients, which DP-SGD's accounting already treats as released (its analysis publishes every noised step):
keeping them costs no privacy. They still never leave the node, are owner-only files named by a digest of the run
id, and the node removes them when the run closes.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fl_core.node_files import mark_used, save_owner_only

log = logging.getLogger(__name__)
OPTIMIZER_STATE = "optimizer-state"  # in the node's state folder
KEEP = 4  # runs whose state a node keeps at once; a run that never closed is pruned by later ones


def _path(state_dir: Path, run_id: str) -> Path:
    return state_dir / OPTIMIZER_STATE / f"{hashlib.sha256(run_id.encode()).hexdigest()[:32]}.pt"


def load_optimizer_state(state_dir: Path, run_id: str, model: nn.Module) -> dict[str, Any] | None:
    """The state this hospital's last round of `run_id` left, if it fits `model`'s trainable parameters; None (a
    fresh optimiser) when there is none or it is damaged or foreign, which is then removed."""
    path = _path(state_dir, run_id)
    if not path.exists():
        return None
    trainable = [p for p in model.parameters() if p.requires_grad]
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        indices = [i for group in saved["param_groups"] for i in group["params"]]
        if sorted(indices) != list(range(len(trainable))):
            raise ValueError("another model's state")
        for i, moments in saved["state"].items():
            for name, value in moments.items():
                fits = value.numel() == 1 and value.item() >= 1 if name == "step" else \
                    value.shape == trainable[i].shape and not ("sq" in name and bool((value < 0).any()))
                if not fits or not bool(torch.isfinite(value).all()):  # a bad step or moment makes Adam's step NaN
                    raise ValueError(f"{name} of parameter {i} does not fit")
    except Exception as err:  # whatever a damaged file raises, the answer is a fresh optimiser
        log.warning("optimiser state of run %s not used (%s): this round starts it afresh", run_id, err)
        path.unlink(missing_ok=True)
        return None
    mark_used(path)
    return dict(saved)


def save_optimizer_state(state_dir: Path, run_id: str, state: dict[str, Any]) -> None:
    """Best effort: a state that cannot be written costs the next round a fresh optimiser, never this round."""
    try:
        save_owner_only(_path(state_dir, run_id), state, KEEP)
    except OSError as err:
        log.warning("optimiser state not written (%s): the next round starts it afresh", type(err).__name__)


def remove_optimizer_state(state_dir: Path, run_id: str) -> None:
    """What a node does when a run closes: its state goes with it."""
    _path(state_dir, run_id).unlink(missing_ok=True)
