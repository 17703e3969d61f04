"""Flower ClientApp: each hospital's node runs this; only DP-trained adapter weights leave the hospital.

Configuration comes from the same Hydra tree as the server: the run's `overrides` (run-config in deployment, or
the list `fl-simulate` passes in simulation). Which hospital this is, where its ledger lives and which policy it
enforces come from the node alone (see `node.py`). In deployment `fl-node` runs this installed module, never the
copy inside the app bundle the SuperLink sends (see `runtime.py`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import lru_cache

from flwr.client import Client, ClientApp
from flwr.clientapp.typing import Mod
from flwr.common import Context

from fl_core.config import AppConfig, compose_config, to_app_config
from fl_core.entry import quiet_libraries
from fl_core.run_config import run_overrides
from privacy.governance import Refused

from .mods import make_hospital_level_clipping, make_release_guard, make_secure_aggregation_as_admitted
from .node import NodeSettings


@lru_cache(maxsize=8)
def _config(overrides: tuple[str, ...]) -> AppConfig:
    return to_app_config(compose_config(overrides))


def run_config(context: Context, overrides: Sequence[str] | None) -> AppConfig:
    """Simulation passes overrides directly; deployment carries them in the run config (fl_core.run_config)."""
    if overrides is None:
        overrides = run_overrides(context.run_config)
        # `${oc.env:...}` (or Hydra's escaped `$\{...\}`) would resolve on the node, and its value could leave in a
        # reply: a run's overrides are plain values
        interpolated = [o for o in overrides if "$" in o or "\\" in o]
        if interpolated:
            raise Refused(f"the run's overrides may not interpolate or escape ($ or \\): {interpolated[0]}")
    return _config(tuple(overrides))


def make_client_fn(overrides: Sequence[str] | None) -> Callable[[Context], Client]:
    simulated = overrides is not None

    def client_fn(context: Context) -> Client:
        # Imported here: a deployed node starts a process per message, and SecAgg+'s key-exchange and unmasking
        # stages never reach client_fn, so they skip torch, transformers and Opacus (about 10 s a process).
        from .hospital import HospitalClient

        quiet_libraries()
        cfg = run_config(context, overrides)
        node = NodeSettings.from_node_config(context.node_config, simulated=simulated)
        return HospitalClient(cfg, node, context.run_id).to_client()

    return client_fn


def client_mods(overrides: Sequence[str] | None) -> list[Mod]:
    """Outermost first: the release guard sees every reply last; SecAgg+ wraps the hospital-level clipping."""
    def config_for(context: Context) -> AppConfig:
        return run_config(context, overrides)

    return [make_release_guard(overrides is not None, config_for), make_secure_aggregation_as_admitted(config_for),
            make_hospital_level_clipping(config_for)]


def build_client_app(overrides: Sequence[str] | None = None) -> ClientApp:
    return ClientApp(client_fn=make_client_fn(overrides), mods=client_mods(overrides))


app = build_client_app()
