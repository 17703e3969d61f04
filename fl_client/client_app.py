"""Flower ClientApp: each hospital's SuperNode runs this; only adapter weights leave the hospital.

Configuration comes from the same Hydra tree as the server: the run's `overrides` (run-config in deployment, or
the list `fl-simulate` passes in simulation). Which hospital this is, where its ledger lives and which policy it
enforces come from the node alone (see `node.py`).
"""

from __future__ import annotations

import shlex
from collections.abc import Callable, Sequence
from functools import lru_cache

from flwr.client import Client, ClientApp
from flwr.client.mod import fixedclipping_mod, secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.common import Context, Message

from fl_core.config import AppConfig, compose_config, to_app_config
from fl_core.entry import quiet_libraries

from .node import NodeSettings


@lru_cache(maxsize=8)
def _config(overrides: tuple[str, ...]) -> AppConfig:
    return to_app_config(compose_config(overrides))


def run_config(context: Context, overrides: Sequence[str] | None) -> AppConfig:
    """Simulation passes overrides directly; deployment carries them in the run-config key `overrides`."""
    if overrides is None:
        overrides = shlex.split(str(context.run_config.get("overrides", "")))
    return _config(tuple(overrides))


def make_client_fn(overrides: Sequence[str] | None) -> Callable[[Context], Client]:
    def client_fn(context: Context) -> Client:
        # Imported here: a deployed node starts a process per message, and SecAgg+'s key-exchange and unmasking
        # stages never reach client_fn, so they skip torch, transformers and Opacus (about 10 s a process).
        from .hospital import HospitalClient

        quiet_libraries()
        cfg = run_config(context, overrides)
        return HospitalClient(cfg, NodeSettings.from_node_config(context.node_config)).to_client()

    return client_fn


def when_run_asks(enabled: Callable[[AppConfig], bool], mod: Mod, overrides: Sequence[str] | None) -> Mod:
    """`mod` on exactly the runs whose config turns it on; for other runs messages pass straight through."""

    def conditional(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        if enabled(run_config(context, overrides)):
            return mod(msg, context, call_next)
        return call_next(msg, context)

    return conditional


def make_secure_aggregation_mod(overrides: Sequence[str] | None) -> Mod:
    """SecAgg+ on exactly when the run asks for it; a SecAgg+ run then refuses plaintext train messages."""
    return when_run_asks(lambda cfg: cfg.strategy.secagg.enabled, secaggplus_mod, overrides)


def make_update_clipping_mod(overrides: Sequence[str] | None) -> Mod:
    """Hospital-level DP: clip this hospital's update on its own node, inside SecAgg+ (before masking)."""
    return when_run_asks(lambda cfg: cfg.privacy.client_level.enabled, fixedclipping_mod, overrides)


def build_client_app(overrides: Sequence[str] | None = None) -> ClientApp:
    return ClientApp(client_fn=make_client_fn(overrides),
                     mods=[make_secure_aggregation_mod(overrides), make_update_clipping_mod(overrides)])


app = build_client_app()
