"""Server-side optimisers over the aggregate (Reddi et al., ICLR 2021, "Adaptive Federated Optimization").

The server reads `aggregate - current` as a pseudo-gradient step and takes it with momentum (FedAvgM) or with Adam or
Yogi's per-coordinate scaling (FedAdam, FedYogi); the formulas are those of Flower's strategies of the same names.
They live here, free of Flower, because they must run *after* hospital-level noise (so they post-process the DP
release and cost no privacy) and because their state belongs in the run's checkpoint so a resumed run continues
the same trajectory. With `name="none"` the aggregate is the new model, as in plain FedAvg/FedProx.

Plain averaging under-steps: the mean of a few hospitals' local moves is shorter than each of them, so it needs more
rounds for the same progress (a server learning rate above 1 or momentum makes that up: the main job takes lr 1.5,
chosen by `scripts/validation_sweep.py`; the study's head takes momentum, chosen by `scripts.study.tune`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from fl_core.config import SERVER_OPTIMIZERS, ServerOptimizerConfig

Arrays = list[np.ndarray]


class ServerOptimizerError(ValueError):
    """A step or a restore that would leave the optimiser in a state no run should continue from."""


@dataclass
class ServerOptimizer:
    """One run's server optimiser: `step(current, aggregate)` gives the next global model.

    `bound`, when set, projects the stepped model onto [-bound, bound] (projected heavy-ball or Adam: the moments
    are kept unprojected): SecAgg+ clips what hospitals send to its `clipping_range`, and a server learning rate
    above 1, with or without momentum, can walk the model out of it. It equals Flower's trajectory only while no
    weight reaches it.
    """

    settings: ServerOptimizerConfig
    bound: float | None = None
    steps: int = 0
    first_moment: Arrays = field(default_factory=list)  # momentum buffer, or Adam/Yogi's m
    second_moment: Arrays = field(default_factory=list)  # Adam/Yogi's v

    def __post_init__(self) -> None:
        if self.settings.name not in SERVER_OPTIMIZERS:
            raise ValueError(f"unknown server optimiser {self.settings.name!r}: one of {SERVER_OPTIMIZERS}")

    @property
    def moments_needed(self) -> int:
        """How many moment lists a step keeps: 0 (none), 1 (momentum) or 2 (adam, yogi)."""
        return {"none": 0, "momentum": 1}.get(self.settings.name, 2)

    def step(self, current: Arrays, aggregate: Arrays) -> Arrays:
        """The next model; raises ServerOptimizerError, changing nothing, if it would not be finite."""
        s = self.settings
        if s.name == "none":
            stepped = [np.asarray(a) for a in aggregate]
            first, second = self.first_moment, self.second_moment
        else:
            delta = [np.asarray(a, dtype=np.float64) - np.asarray(c, dtype=np.float64)
                     for a, c in zip(aggregate, current, strict=True)]
            first, second, moves = self._moves(delta)
            stepped = [(np.asarray(c, dtype=np.float64) + mv).astype(np.asarray(c).dtype)
                       for c, mv in zip(current, moves, strict=True)]
        if not all(np.isfinite(a).all() for a in [*stepped, *first, *second]):
            raise ServerOptimizerError(f"server step {self.steps + 1}: the aggregate or the stepped model is not "
                                       "finite; the model and the optimiser's state are left as they were")
        if self.bound is not None:
            stepped = [np.clip(a, -self.bound, self.bound) for a in stepped]
        self.steps, self.first_moment, self.second_moment = self.steps + 1, first, second
        return stepped

    def _moves(self, delta: Arrays) -> tuple[Arrays, Arrays, Arrays]:
        """(first moment, second moment, move) of the next step, from this step's pseudo-gradient `delta`."""
        s, fresh = self.settings, not self.first_moment
        if s.name == "momentum":  # FedAvgM: buffer = momentum * buffer + delta; the first step's buffer is delta
            first = delta if fresh else [s.momentum * m + d for m, d in zip(self.first_moment, delta, strict=True)]
            return first, [], [s.lr * m for m in first]
        previous_first = [np.zeros_like(d) for d in delta] if fresh else self.first_moment
        previous_second = [np.zeros_like(d) for d in delta] if fresh else self.second_moment
        first = [s.beta_1 * m + (1 - s.beta_1) * d for m, d in zip(previous_first, delta, strict=True)]
        squares = [d * d for d in delta]
        if s.name == "adam":
            second = [s.beta_2 * v + (1 - s.beta_2) * q for v, q in zip(previous_second, squares, strict=True)]
        else:  # yogi: v moves towards delta^2 by an additive step, never multiplicatively
            second = [v - (1 - s.beta_2) * q * np.sign(v - q) for v, q in zip(previous_second, squares, strict=True)]
        # FedAdam corrects the bias of the moments as Flower does (counted in steps taken; Flower counts rounds, the
        # same when none failed); FedYogi takes its learning rate as it is, as Flower's does.
        lr = s.lr
        if s.name == "adam":
            taken = self.steps + 1
            lr *= np.sqrt(1 - s.beta_2 ** (taken + 1)) / (1 - s.beta_1 ** (taken + 1))
        return first, second, [lr * m / (np.sqrt(v) + s.tau) for m, v in zip(first, second, strict=True)]

    def restore(self, saved_settings: dict[str, object], steps: int, first_moment: Arrays, second_moment: Arrays,
                model: Arrays) -> None:
        """Continue from a checkpoint's state, after checking it is this optimiser's and fits `model`."""
        current = asdict(self.settings)
        if steps and not saved_settings:
            raise ServerOptimizerError("strategy.server_optimizer: the checkpoint does not record the settings that "
                                       "took its server steps; it cannot be resumed with a server optimiser")
        # A plain-averaging run takes no steps, yet resuming it with a server step would change its trajectory
        # midway; with `none` the other settings are unused, so two `none`s match whatever they hold.
        if saved_settings and _in_effect(saved_settings) != _in_effect(current):
            raise ServerOptimizerError(f"strategy.server_optimizer: the checkpoint was written with {saved_settings}, "
                                       f"this run asks for {current}; resume with the checkpoint's settings")
        kept = [first_moment, second_moment][:self.moments_needed]
        shapes = [tuple(np.shape(a)) for a in model]
        for moments in kept if steps else []:
            if [tuple(np.shape(m)) for m in moments] != shapes or not all(np.isfinite(m).all() for m in moments):
                raise ServerOptimizerError("strategy.server_optimizer: the checkpoint's optimiser state is missing, "
                                           "damaged or does not fit the model; it cannot be resumed")
        self.steps, self.first_moment, self.second_moment = steps, *(list(m) for m in (first_moment,
                                                                                      second_moment))


def _in_effect(settings: dict[str, object]) -> dict[str, object]:
    """The settings compared on a resume: only the name for `none`, which uses no other; otherwise all of them, those
    a name does not use too (resume with the checkpoint's settings as they were written)."""
    return {"name": "none"} if settings.get("name") == "none" else settings
