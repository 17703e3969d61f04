"""Hospital-level DP on the server: Gaussian noise on the mean of the clipped updates actually aggregated.

Each hospital clips its update to C on its own node (inside SecAgg+) and weighs 1, so the aggregate is the mean of
the n clipped updates that reached it. Unit of privacy: one hospital's whole dataset, replaced by any other. The
roster of admitted hospitals is public, so this is replace-one at the hospital level: replacing one update moves
the mean by up to 2C/n. The noise has std sigma * C / n, with n the number of updates in *this* aggregate (a
hospital that dropped out makes n smaller and the noise larger), so every round is one Gaussian mechanism with
noise multiplier sigma / 2 (`hospital_level_epsilon`). Flower's own wrapper fixes n at the number sampled whatever
arrives and draws from numpy's global generator; the noise here comes from `SecureRandom`.
"""

from __future__ import annotations

import numpy as np
from flwr.common import (
    FitIns,
    FitRes,
    Parameters,
    Scalar,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from privacy.accountant import gaussian_epsilon
from privacy.secure_random import SecureRandom

from .delegating import DelegatingStrategy
from .fedprox import RecordingFedProx

HOSPITAL_LEVEL_SENSITIVITY = 2.0  # in units of C / n: replacing one hospital's clipped update


def hospital_level_epsilon(noise_multiplier: float, delta: float, rounds: int) -> float:
    """epsilon for one hospital's whole dataset after `rounds` noised aggregates (Gaussian mechanism, Renyi DP)."""
    return gaussian_epsilon(noise_multiplier / HOSPITAL_LEVEL_SENSITIVITY, delta, rounds)


class HospitalLevelDP(DelegatingStrategy):
    """Wraps the recording FedProx: asks hospitals to clip at C, adds noise scaled to the updates aggregated."""

    strategy: RecordingFedProx

    def __init__(self, strategy: RecordingFedProx, noise_multiplier: float, clipping_norm: float,
                 rng: SecureRandom | None = None) -> None:
        if noise_multiplier < 0 or clipping_norm <= 0:
            raise ValueError("HospitalLevelDP: need noise_multiplier >= 0 and clipping_norm > 0")
        super().__init__(strategy)
        self.noise_multiplier = noise_multiplier
        self.clipping_norm = clipping_norm
        self.rng = rng or SecureRandom()

    def configure_fit(self, server_round: int, parameters: Parameters,
                      client_manager: ClientManager) -> list[tuple[ClientProxy, FitIns]]:
        instructions = self.strategy.configure_fit(server_round, parameters, client_manager)
        for _, fit_ins in instructions:
            fit_ins.config[KEY_CLIPPING_NORM] = self.clipping_norm
        return instructions

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
                      failures: list[tuple[ClientProxy, FitRes] | BaseException],
                      ) -> tuple[Parameters | None, dict[str, Scalar]]:
        parameters, metrics = self.strategy.aggregate_fit(server_round, results, failures)
        if parameters is None:
            return None, {}
        std = self.noise_multiplier * self.clipping_norm / len(results)
        noised = [a + self.rng.normal_numpy(a.shape, std).astype(a.dtype) if std > 0 else a
                  for a in parameters_to_ndarrays(parameters)]
        self.strategy.rounds[server_round].hospital_noise_std = std
        return ndarrays_to_parameters([np.asarray(a, dtype=np.float32) for a in noised]), metrics
