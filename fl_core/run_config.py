"""A deployed run's settings, as `flwr run` carries them: the run-config keys of `[tool.flwr.app.config]` mapped
onto the Hydra tree. The settings people change most have typed keys (`flwr run . FED --run-config
"num-rounds=5 target-epsilon=4.0"`); `overrides` takes any other Hydra override. A typed key at its neutral value
(0, -1 or "") leaves the config's own value, so `conf/` and the schema stay the one source of defaults, and a
typed key that is set wins over the same path in `overrides`. Flower-free: the ServerApp and the ClientApp both
call it, so the server and every node compose the same config.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping
from dataclasses import dataclass

from .config import DATASETS, MODELS, ConfigError, override_key

OVERRIDES_KEY = "overrides"


@dataclass(frozen=True)
class TypedKey:
    path: str  # the Hydra override's key: a config path, or a group (model, data) to choose
    kind: type
    unset: object  # the key's value in pyproject.toml: leave the config's value
    allowed: tuple[str, ...] = ()  # for strings: the values it takes


TYPED_KEYS = {
    "num-rounds": TypedKey("federation.num_rounds", int, 0),
    "target-epsilon": TypedKey("privacy.target_epsilon", float, 0.0),
    "delta": TypedKey("privacy.delta", float, 0.0),
    "model": TypedKey("model", str, "", MODELS),
    "data": TypedKey("data", str, "", DATASETS),
    "proximal-mu": TypedKey("strategy.proximal_mu", float, -1.0),
    "secure-aggregation": TypedKey("strategy.secagg.enabled", str, "", ("on", "off")),
}


def run_overrides(run_config: Mapping[str, object]) -> list[str]:
    """The Hydra overrides of a deployed run: `overrides` split as a shell would, then each typed key that is set."""
    overrides = shlex.split(str(run_config.get(OVERRIDES_KEY, "")))
    for name, key in TYPED_KEYS.items():
        value = run_config.get(name, key.unset)
        if value == key.unset:
            continue
        if key.kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)  # TOML writes 4 for 4.0
        if not isinstance(value, key.kind) or isinstance(value, bool):
            raise ConfigError(f"run-config {name}", f"must be a {key.kind.__name__}, got {value!r}")
        if key.allowed and value not in key.allowed:
            raise ConfigError(f"run-config {name}", f"must be one of {', '.join(key.allowed)}, got {value!r}")
        text = {"on": "true", "off": "false"}.get(str(value), str(value)) if key.path.endswith("enabled") \
            else str(value)
        overrides = [o for o in overrides if override_key(o) != key.path]
        overrides.append(f"{key.path}={text}")
    return overrides
