"""Choose the study's federation settings on validation texts, never on the test texts.

The validation texts are ICD-10-CM training-split texts no arm trains on (positions 40,000-41,999 of the shuffled
training split; the study trains on the first 20,000). Each candidate runs the federated arm in one process: the
study's hospital shares and DP-SGD head, each hospital's sigma calibrated for the whole plan, the server's
example-weighted average of the heads (what FedProx aggregates; SecAgg+ changes it by its quantisation step only),
then the candidate's server optimiser. Beside it, every hospital alone, so a candidate is read as "does the
federation beat the best hospital alone".

    .venv/bin/python -m scripts.study.tune    # the grid below: 3 and 10 hospitals, IID and Dirichlet 0.3, ~1.5 hours
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import replace

import numpy as np
import torch

from fl_client.plan import privacy_plan
from fl_core.data import load_splits
from fl_core.entry import quiet_libraries
from fl_server.server_app import server_optimizer_for
from privacy.accountant import AccountantState

from .features import (
    StudyData,
    cached_embeddings,
    evaluate_head,
    head_to_arrays,
    hospital_rows,
    load_head_arrays,
    load_study_data,
    new_head,
    train_head,
)
from .plan import FULL, INF, Setting

VALIDATION = range(40_000, 42_000)
CANDIDATES = (  # FedProx's mu and the server optimiser: (mu, name, lr, momentum)
    (0.01, "none", 1.0, 0.0),  # the study before the server optimiser
    (0.01, "momentum", 1.0, 0.9),
    (0.01, "momentum", 1.5, 0.7),
    (0.01, "adam", 0.01, 0.0),
    (0.01, "adam", 0.03, 0.0),
    (0.01, "adam", 0.3, 0.0),
    (0.01, "yogi", 0.01, 0.0),
    (0.01, "yogi", 0.03, 0.0),
    (0.001, "none", 1.0, 0.0),
    (0.001, "momentum", 2.0, 0.0),  # a server learning rate alone
    (0.001, "momentum", 1.0, 0.9),
    (0.001, "momentum", 1.5, 0.5),
    (0.001, "momentum", 1.5, 0.7),
    (0.0, "momentum", 1.5, 0.7),
)
SETTINGS = (Setting(), Setting(partitioning="iid"), Setting(hospitals=10))
EPSILONS = (8.0, INF)


def validation_data(data: StudyData) -> StudyData:
    """The study's training rows with the validation texts as its test set."""
    cfg = FULL.config(INF, 0, FULL.baseline)
    train = load_splits(replace(cfg.data, max_train_examples=None)).train.subset(list(VALIDATION))
    return replace(data, test_x=cached_embeddings(train.texts), test_y=np.array(train.labels, dtype=np.int64))


def federate(data: StudyData, setting: Setting, epsilon: float, seed: int, alone: bool = False) -> dict[str, float]:
    """One federated run of `setting` or, `alone`, every hospital on its own; validation accuracy."""
    cfg = FULL.config(epsilon, seed, setting)
    rows = hospital_rows(FULL, setting, seed)
    plans = [privacy_plan(cfg, len(r))[1] for r in rows]
    accountants = [AccountantState() if sigma is not None else None for sigma in plans]
    if alone:
        scores = []
        for k, r in enumerate(rows):
            head = new_head(data, seed)
            for _ in range(FULL.rounds):
                accountants[k] = train_head(cfg, head, data, r, sigma=plans[k], accountant=accountants[k],
                                            proximal_mu=0.0).accountant
            scores.append(evaluate_head(head, data))
        return {"alone_mean": float(np.mean([s["accuracy"] for s in scores])),
                "alone_best": max(s["accuracy"] for s in scores)}
    server = server_optimizer_for(cfg)
    current = head_to_arrays(new_head(data, seed))
    head = new_head(data, seed)
    for _ in range(FULL.rounds):
        summed = [np.zeros_like(a, dtype=np.float64) for a in current]
        for k, r in enumerate(rows):
            load_head_arrays(head, current)
            result = train_head(cfg, head, data, r, sigma=plans[k], accountant=accountants[k],
                                proximal_mu=setting.mu)
            accountants[k] = result.accountant
            for total, a in zip(summed, head_to_arrays(head), strict=True):
                total += len(r) * a
        aggregate = [(t / sum(map(len, rows))).astype(np.float32) for t in summed]
        current = server.step(current, aggregate)
    load_head_arrays(head, current)
    return evaluate_head(head, data)


def main() -> None:
    quiet_libraries()
    torch.set_num_threads(1)
    data = validation_data(load_study_data(FULL))
    for setting in SETTINGS:
        for epsilon in EPSILONS:
            start = time.perf_counter()
            alone = federate(data, setting, epsilon, 0, alone=True)
            line: dict[str, object] = {"setting": setting.label, "epsilon": epsilon if math.isfinite(epsilon)
                                       else "inf", **{k: round(v, 4) for k, v in alone.items()}}
            for mu, name, lr, momentum in CANDIDATES:
                candidate = replace(setting, mu=mu, server=name, server_lr=lr, server_momentum=momentum)
                line[candidate.label.removeprefix(f"{setting.label.rsplit(', ', 1)[0]}, ")] = \
                    round(federate(data, candidate, epsilon, 0)["accuracy"], 4)
            line["seconds"] = round(time.perf_counter() - start, 1)
            print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
