"""A hospital's Adam moments from one of its rounds to the next (`train.keep_optimizer_state`).

A deployed node starts a ClientApp process per message, so what a hospital carries between rounds lives in its
node's state folder, as the prefix cache does. The moments are derived from its records. Under DP-SGD they are
running averages of clipped and noised gradients, which the accounting already treats as released (its analysis
publishes every noised step); under hospital-level DP alone each round's update is clipped whatever produced it.
Either way keeping them costs no privacy, but they are the node's: owner-only files, never sent, named by a digest
of the run, the hospital and the admitted plan (another plan under the same run id starts afresh), and removed
with the whole folder whenever a run closes on the node (a run the ledger expires without closing keeps them until
the next one closes, as it keeps its prefix cache).
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fl_core.config import AppConfig
from fl_core.node_files import mark_used, save_owner_only
from fl_core.training import check_optimizer_state

log = logging.getLogger(__name__)
OPTIMIZER_STATE = "optimizer-state"  # in the node's state folder
KEEP = 4  # runs whose state a node keeps at once, for runs open side by side


def state_path(state_dir: Path, run_key: str) -> Path:
    """`run_key` names the run, the hospital, the dataset and its admitted plan (built in `HospitalClient.fit`)."""
    return state_dir / OPTIMIZER_STATE / f"{hashlib.sha256(run_key.encode()).hexdigest()[:32]}.pt"


def load_optimizer_state(cfg: AppConfig, model: nn.Module, path: Path) -> dict[str, Any] | None:
    """The state the hospital's last round of this run left, if Adam can step from it for `model`; None (a fresh
    optimiser) when there is none, or when it is damaged or does not fit, which is then removed."""
    try:
        saved: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
        check_optimizer_state(cfg, model, saved)
        mark_used(path)
    except FileNotFoundError:
        return None
    except Exception as err:  # whatever a damaged file raises, the answer is a fresh optimiser
        log.warning("a kept optimiser state was not used (%s): this round starts Adam afresh", type(err).__name__)
        path.unlink(missing_ok=True)
        return None
    return saved


def save_optimizer_state(path: Path, state: dict[str, Any]) -> None:
    """Best effort: a state that cannot be written costs the next round a fresh optimiser, never this round (which
    is charged and trained by now): torch's writer reports a full disk as a RuntimeError, not an OSError."""
    try:
        save_owner_only(path, state, KEEP)
    except Exception as err:
        log.warning("optimiser state not written (%s): the next round starts it afresh", type(err).__name__)


def remove_optimizer_state(state_dir: Path) -> None:
    """What a node does when a run closes, as with the prefix cache: no derivative of its records outlives it (a run
    open beside it restarts Adam at its next round)."""
    shutil.rmtree(state_dir / OPTIMIZER_STATE, ignore_errors=True)
