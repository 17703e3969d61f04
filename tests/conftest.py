"""Shared fixtures: the tiny random-initialised Llama and small real ICD-10-CM slices."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch

from fl_core.config import AppConfig, compose_config, to_app_config
from fl_core.entry import quiet_libraries

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # any Ray a test starts listens on loopback only
# Simulated hospitals keep their ledgers here; never in the user's own node home.
os.environ["FEDERATED_DP_LLM_NODE_HOME"] = tempfile.mkdtemp(prefix="fdpl-nodes-")
quiet_libraries()
torch.set_num_threads(1)


def tiny_config(*overrides: str) -> AppConfig:
    base = ["model=tiny", "data.max_train_examples=256", "data.max_test_examples=64", "train.batch_size=16",
            "train.device=cpu"]
    return to_app_config(compose_config([*base, *overrides]))


@pytest.fixture
def tiny_cfg() -> AppConfig:
    return tiny_config()
