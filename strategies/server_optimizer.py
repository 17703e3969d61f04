"""Server-side optimisers over the aggregate (Reddi et al., ICLR 2021, "Adaptive Federated Optimization").

The server reads `aggregate - current` as a pseudo-gradient step and takes it with momentum (FedAvgM) or with Adam or
Yogi's per-coordinate scaling (FedAdam, FedYogi); the formulas are those of Flower's strategies of the same names.
They live here, free of Flower, because they must run *after* hospital-level noise (so they post-process the DP
release and cost no privacy) and because their state belongs in the run's checkpoint so a resumed run continues
the same trajectory. With `name="none"` the aggregate is the new model, as in plain FedAvg/FedProx.

Plain averaging under-steps: the mean of a few hospitals' local moves is shorter than each of them, so it needs more
rounds for the same progress (a server learning rate above 1 or momentum makes that up; the study measures which).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from fl_core.config import SERVER_OPTIMIZERS, ServerOptimizerConfig

Arrays = list[np.ndarray]


@dataclass
class ServerOptimizer:
    """One run's server optimiser: `step(current, aggregate)` gives the next global model."""

    settings: ServerOptimizerConfig
    steps: int = 0
    first_moment: Arrays = field(default_factory=list)  # momentum buffer, or Adam/Yogi's m
    second_moment: Arrays = field(default_factory=list)  # Adam/Yogi's v

    def __post_init__(self) -> None:
        if self.settings.name not in SERVER_OPTIMIZERS:
            raise ValueError(f"unknown server optimiser {self.settings.name!r}: one of {SERVER_OPTIMIZERS}")

    def step(self, current: Arrays, aggregate: Arrays) -> Arrays:
        s = self.settings
        self.steps += 1
        if s.name == "none":
            return [np.asarray(a) for a in aggregate]
        delta = [np.asarray(a, dtype=np.float64) - np.asarray(c, dtype=np.float64)
                 for a, c in zip(aggregate, current, strict=True)]
        if s.name == "momentum":  # FedAvgM: buffer = momentum * buffer + delta; round 1 starts at delta
            self.first_moment = delta if self.steps == 1 else [
                s.momentum * m + d for m, d in zip(self.first_moment, delta, strict=True)]
            moves = [s.lr * m for m in self.first_moment]
        else:
            if not self.first_moment:
                self.first_moment = [np.zeros_like(d) for d in delta]
                self.second_moment = [np.zeros_like(d) for d in delta]
            self.first_moment = [s.beta_1 * m + (1 - s.beta_1) * d for m, d in zip(self.first_moment, delta,
                                                                                   strict=True)]
            squares = [d * d for d in delta]
            if s.name == "adam":
                self.second_moment = [s.beta_2 * v + (1 - s.beta_2) * q for v, q in zip(self.second_moment, squares,
                                                                                       strict=True)]
            else:  # yogi: v moves towards delta^2 by an additive step, never multiplicatively
                self.second_moment = [v - (1 - s.beta_2) * q * np.sign(v - q)
                                      for v, q in zip(self.second_moment, squares, strict=True)]
            # FedAdam corrects the bias of the moments as Flower does (counted in steps taken; Flower counts rounds,
            # the same when none failed); FedYogi takes its learning rate as it is, as Flower's does.
            lr = s.lr
            if s.name == "adam":
                lr *= np.sqrt(1 - s.beta_2 ** (self.steps + 1)) / (1 - s.beta_1 ** (self.steps + 1))
            moves = [lr * m / (np.sqrt(v) + s.tau) for m, v in zip(self.first_moment, self.second_moment,
                                                                   strict=True)]
        return [(np.asarray(c, dtype=np.float64) + mv).astype(np.asarray(c).dtype)
                for c, mv in zip(current, moves, strict=True)]

    def restore(self, steps: int, first_moment: Arrays, second_moment: Arrays) -> None:
        """Continue from a checkpoint's state."""
        self.steps, self.first_moment, self.second_moment = steps, list(first_moment), list(second_moment)
