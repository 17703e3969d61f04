"""What a hospital's node keeps across runs: its identity, its privacy ledger and its policy file.

All of it comes from the SuperNode's own node config (`hospital-id`, `state-dir`, `policy-file`, and either
`data-dir`, the hospital's own `train.jsonl` and `test.jsonl`, or `partition-id`, its share of the packaged data)
or, in simulation, from the node home folder named in the node's environment; never from the run config that a
researcher submits.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

NODE_HOME_ENV = "FEDERATED_DP_LLM_NODE_HOME"
LEDGER_FILE = "ledger.sqlite"
POLICY_FILE = "policy.yaml"


def node_home() -> Path:
    """Where simulated hospitals keep their state: one folder per hospital."""
    default = Path.home() / ".local" / "share" / "federated-dp-llm" / "nodes"
    return Path(os.environ.get(NODE_HOME_ENV, default))


@dataclass(frozen=True)
class NodeSettings:
    hospital: str
    partition: int
    state_dir: Path
    policy_file: Path | None
    data_dir: Path | None = None

    @property
    def ledger_path(self) -> Path:
        return self.state_dir / LEDGER_FILE

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, object]) -> NodeSettings:
        """The node's settings; a `policy.yaml` in its state folder applies unless `policy-file` names another."""
        partition = int(str(node_config.get("partition-id", 0)))
        hospital = str(node_config.get("hospital-id", f"hospital-{partition}"))
        state_dir = Path(str(node_config.get("state-dir", node_home() / hospital)))
        policy = node_config.get("policy-file")
        default_policy = state_dir / POLICY_FILE
        policy_file = Path(str(policy)) if policy else (default_policy if default_policy.exists() else None)
        data_dir = node_config.get("data-dir")
        return cls(hospital, partition, state_dir, policy_file, Path(str(data_dir)) if data_dir else None)
