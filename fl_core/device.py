"""Device selection from config: `auto` picks CUDA when present, so one config serves GPU sites and CPU tests."""

from __future__ import annotations

from pathlib import Path

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


def computes_bf16_natively(device: torch.device, cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether `device` has bfloat16 arithmetic in hardware (a CUDA GPU from Ampere on; a CPU with AVX512-BF16 or
    AMX), where `train.precision=bf16` pays; elsewhere it is emulated and slower than fp32. Other devices: True."""
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    if device.type != "cpu":
        return True  # unknown here (Apple's chips differ by generation): no warning
    try:
        flags = cpuinfo.read_text(errors="replace").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags
