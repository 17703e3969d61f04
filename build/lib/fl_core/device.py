"""Device selection from config: `auto` picks CUDA when present, so one config serves GPU sites and CPU tests."""

from __future__ import annotations

import torch

from .config import ConfigError


def resolve_device(name: str, field_path: str = "train.device") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(field_path, f"{name!r} requested but CUDA is not available here (use auto or cpu)")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(field_path, "'mps' requested but not available here (use auto or cpu)")
    return torch.device(name)
