"""Where derived artefacts (the dequantised model, the built ICD-10 set) are cached, once per machine."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    return Path(os.environ.get("FEDERATED_DP_LLM_CACHE", Path.home() / ".cache" / "federated-dp-llm"))
