"""Everything a hospital's node may send, in one list, each field with the reason it may leave.

A field is either public by the admitted plan (a function of the run's config, the hospital's dataset sizes and
its policy: never of a record's content), the output of a DP mechanism whose cost is charged to the hospital's
ledger, or released outside the guarantee because the hospital's own policy lists it in
`release_outside_guarantee`. A reply with any other field does not leave the node (`released` raises), and the
node's release guard checks every message on its way out against the same list.

Dataset sizes are public by the plan: the sampling rate 1/ceil(N/B) and the FedAvg weight both carry N, so the
record-level guarantee is stated for the replace-one relation (see `accountant.py`).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

FIT, EVALUATE, PROPERTIES = "fit", "evaluate", "properties"


class Status(StrEnum):
    PUBLIC = "public by the plan"
    DP = "DP mechanism, charged to the hospital's ledger"
    OUTSIDE = "outside the guarantee: released only where the hospital's policy allows it"


@dataclass(frozen=True)
class Field:
    message: str
    name: str
    status: Status
    what: str


RELEASES: tuple[Field, ...] = (
    Field(FIT, "parameters", Status.DP, "the adapter after the round's DP-SGD steps (clipped, noised)"),
    Field(FIT, "num_examples", Status.PUBLIC, "aggregation weight: the dataset size N of the admitted plan "
                                              "(1 under hospital-level DP)"),
    Field(FIT, "hospital", Status.PUBLIC, "the hospital's id, from its node's settings"),
    Field(FIT, "epsilon", Status.PUBLIC, "replace-one epsilon of the hospital's history so far (from the plan)"),
    Field(FIT, "delta", Status.PUBLIC, "the run's delta"),
    Field(FIT, "noise_multiplier", Status.PUBLIC, "sigma of the plan"),
    Field(FIT, "sample_rate", Status.PUBLIC, "Poisson sampling rate of the plan, 1/ceil(N/B)"),
    Field(FIT, "steps", Status.PUBLIC, "releases so far: DP-SGD steps and noised evaluations (from the plan)"),
    Field(FIT, "accountant", Status.PUBLIC, "the accountant history: (sigma, rate, steps) of every release"),
    Field(FIT, "train_loss", Status.OUTSIDE, "exact mean training loss over the round's private batches"),
    Field(EVALUATE, "loss", Status.DP, "mean loss on the hospital's held-out records, from a noised sum of "
                                       "clipped losses"),
    Field(EVALUATE, "accuracy", Status.DP, "accuracy from the noised count of correctly classified records"),
    Field(EVALUATE, "perplexity", Status.DP, "exp of the noised mean loss (causal LM)"),
    Field(EVALUATE, "num_examples", Status.PUBLIC, "the held-out set's size N_test of the admitted plan"),
    Field(EVALUATE, "hospital", Status.PUBLIC, "the hospital's id"),
    Field(PROPERTIES, "hospital", Status.PUBLIC, "the hospital's id"),
    Field(PROPERTIES, "admitted", Status.PUBLIC, "the node's decision on the run"),
    Field(PROPERTIES, "reason", Status.PUBLIC, "why it refused: policy rules and ledger figures, never data"),
    Field(PROPERTIES, "planned_epsilon", Status.PUBLIC, "epsilon of the whole admitted plan"),
    Field(PROPERTIES, "num_examples", Status.PUBLIC, "dataset size N (public by the plan)"),
    Field(PROPERTIES, "num_test_examples", Status.PUBLIC, "held-out size N_test (public by the plan)"),
    Field(PROPERTIES, "outside_guarantee", Status.PUBLIC, "the fields the hospital's policy releases outside "
                                                          "the guarantee, comma-separated"),
    Field(PROPERTIES, "status", Status.PUBLIC, "the run's ledger status after closing"),
    Field(PROPERTIES, "epsilon", Status.PUBLIC, "epsilon the run spent, from its ledger entry"),
    Field(PROPERTIES, "accountant", Status.PUBLIC, "the run's accountant history at closing (from the plan)"),
    Field(PROPERTIES, "lifetime_epsilon", Status.PUBLIC, "ledger: composition of every run on the dataset"),
    Field(PROPERTIES, "lifetime_delta", Status.PUBLIC, "ledger: the delta of lifetime_epsilon"),
    Field(PROPERTIES, "summed_epsilon", Status.PUBLIC, "ledger: plain sum of the runs' epsilons"),
    Field(PROPERTIES, "budget_epsilon", Status.PUBLIC, "ledger: the lifetime cap"),
    Field(PROPERTIES, "remaining_epsilon", Status.PUBLIC, "ledger: cap minus lifetime_epsilon"),
)
DECLARED: dict[tuple[str, str], Field] = {(f.message, f.name): f for f in RELEASES}
OUTSIDE_GUARANTEE = tuple(f.name for f in RELEASES if f.status is Status.OUTSIDE)


class UndeclaredRelease(RuntimeError):
    """A reply would carry a field that is not on the declared list, or one the hospital's policy does not allow."""


def check_field(message: str, name: str, allowed_outside: Collection[str]) -> Field:
    found = DECLARED.get((message, name))
    if found is None:
        raise UndeclaredRelease(f"{message} reply field {name!r} is not a declared release; it does not leave the node")
    if found.status is Status.OUTSIDE and name not in allowed_outside:
        raise UndeclaredRelease(f"{message} reply field {name!r} is outside the guarantee and the hospital's policy "
                                "does not list it in release_outside_guarantee")
    return found


def released(message: str, values: Mapping[str, Any], allowed_outside: Collection[str]) -> dict[str, Any]:
    """`values` as they may leave the node; raises UndeclaredRelease on the first field that may not."""
    for name in values:
        check_field(message, name, allowed_outside)
    return dict(values)
