"""What a hospital's node keeps across runs: its identity, its privacy ledger, its policy and its rules.

All of it comes from the SuperNode's own node config (TOML written by the hospital's operator), or, for simulated
hospitals, from the node home folder named in the environment (hospital N's folder is `hospital-N`, and a
`node.toml` there sets the other settings); never from the run config a researcher submits.

| setting | meaning |
|---|---|
| `hospital-id` | the hospital's name in ledgers and reports |
| `state-dir` | required: the folder of the hospital's ledger (`ledger.sqlite`), on persistent storage |
| `data-dir` | the hospital's `train.jsonl` and `test.jsonl` (else `partition-id` picks a share of the packaged data) |
| `partition-id` | that share (trials and simulations) |
| `policy-file` | the hospital's policy (default: `policy.yaml` in the state folder, if there is one) |
| `reservation-timeout` | seconds after which a run that stopped talking to the node loses its reservation (3600) |
| `approved-bundles` | the file of app bundles the hospital approved (`fl-node approve`); `fl-node` requires it |
| `log-format` | `text` (default), or `json`: `fl-node` and its task processes log JSON lines (`node_logs.py`) |
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from fl_core.config import LOG_FORMATS
from privacy.governance import NodeRules

NODE_HOME_ENV = "FEDERATED_DP_LLM_NODE_HOME"
LEDGER_FILE = "ledger.sqlite"
POLICY_FILE = "policy.yaml"
SIMULATED_SETTINGS_FILE = "node.toml"
DEFAULT_RESERVATION_TIMEOUT = 3600.0
SETTINGS = ("hospital-id", "state-dir", "data-dir", "partition-id", "policy-file", "reservation-timeout",
            "approved-bundles", "log-format")
SIMULATION_SETTINGS = ("partition-id", "num-partitions")  # what Flower's simulation engine gives each node


class NodeSettingsError(ValueError):
    """A node setting is missing or wrong; the message names it. The node does not start."""

    def __init__(self, setting: str, problem: str) -> None:
        super().__init__(f"node setting {setting}: {problem}")


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
    reservation_timeout: float = DEFAULT_RESERVATION_TIMEOUT
    approved_bundles: Path | None = None
    log_format: str = "text"

    @property
    def ledger_path(self) -> Path:
        return self.state_dir / LEDGER_FILE

    @property
    def rules(self) -> NodeRules:
        return NodeRules(self.hospital, self.ledger_path, self.policy_file, self.reservation_timeout)

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, object], *, simulated: bool = False) -> NodeSettings:
        """The node's settings, checked; a deployed node must name its state folder (a container's home folder
        is gone at restart, and with it the hospital's spend)."""
        if simulated:
            node_config = {**cls.simulated_settings(node_config), **node_config}
        unknown = sorted(set(node_config) - set(SETTINGS) - (set(SIMULATION_SETTINGS) if simulated else set()))
        if unknown:
            raise NodeSettingsError(unknown[0], f"unknown setting; the node's settings are {', '.join(SETTINGS)}")
        raw_partition = str(node_config.get("partition-id", 0))
        if not raw_partition.isdigit():
            raise NodeSettingsError("partition-id", f"must be a partition number, got {raw_partition!r}")
        partition = int(raw_partition)
        hospital = str(node_config.get("hospital-id", f"hospital-{partition}"))
        if not hospital.strip():
            raise NodeSettingsError("hospital-id", "must not be empty")
        if "state-dir" in node_config:
            state_dir = Path(str(node_config["state-dir"]))
        elif simulated:
            state_dir = node_home() / hospital
        else:
            raise NodeSettingsError("state-dir", "required: the folder (on persistent storage) that keeps the "
                                                 "hospital's privacy ledger")
        if state_dir.exists() and not state_dir.is_dir():
            raise NodeSettingsError("state-dir", f"{state_dir} is not a folder")
        policy = node_config.get("policy-file")
        default_policy = state_dir / POLICY_FILE
        policy_file = Path(str(policy)) if policy else (default_policy if default_policy.exists() else None)
        misnamed = sorted(p.name for p in state_dir.glob("policy.*")) if policy_file is None and \
            state_dir.is_dir() else []
        if misnamed:  # a policy the node would silently not read is worse than none
            raise NodeSettingsError("policy-file", f"{state_dir} holds {misnamed[0]}, but the node reads "
                                                   f"{POLICY_FILE} there (or the file policy-file names)")
        if policy_file is not None and not policy_file.is_file():
            raise NodeSettingsError("policy-file", f"no such file {policy_file}")
        data_dir = Path(str(node_config["data-dir"])) if node_config.get("data-dir") else None
        if data_dir is not None and not data_dir.is_dir():
            raise NodeSettingsError("data-dir", f"no such folder {data_dir}")
        try:
            timeout = float(str(node_config.get("reservation-timeout", DEFAULT_RESERVATION_TIMEOUT)))
        except ValueError:
            timeout = math.nan
        if not (math.isfinite(timeout) and timeout > 0):
            raise NodeSettingsError("reservation-timeout", "must be a number of seconds > 0, got "
                                                           f"{node_config.get('reservation-timeout')!r}")
        approved = Path(str(node_config["approved-bundles"])) if node_config.get("approved-bundles") else None
        log_format = str(node_config.get("log-format", "text"))
        if log_format not in LOG_FORMATS:
            raise NodeSettingsError("log-format", f"unknown value {log_format!r}; choose one of "
                                                  f"{', '.join(LOG_FORMATS)}")
        return cls(hospital, partition, state_dir, policy_file, data_dir, timeout, approved, log_format)

    @staticmethod
    def simulated_settings(node_config: Mapping[str, object]) -> dict[str, object]:
        """A simulated hospital's `node.toml` in its node home folder, if it has one."""
        import tomllib

        path = node_home() / f"hospital-{node_config.get('partition-id', 0)}" / SIMULATED_SETTINGS_FILE
        if not path.is_file():
            return {}
        settings = tomllib.loads(path.read_text())
        for fixed in ("hospital-id", "state-dir", "partition-id"):
            if fixed in settings:
                raise NodeSettingsError(fixed, f"{path}: a simulated hospital's {fixed} follows from its partition")
        return settings
