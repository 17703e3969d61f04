"""`fl-privacy audit`: a one-run canary audit of everything an audited hospital releases, in a real federated run.

The run is the product's: the ServerApp, and on every simulated node the ClientApp with its mods (release guard,
SecAgg+ as admitted), its plan, ledger and DP-SGD. The guarantee is replace-one (dataset sizes are public), so the
canaries come in pairs: for each of `canaries` slots hospital 0 gets one of two records, texts of random words from
the dataset with random labels, chosen by a fair coin (`SecureRandom`). Its dataset size, and so every figure the
plan makes public, is the same whichever record each coin picks. One observing mod, innermost on the audited node,
keeps what the hospital releases each round (its adapter before SecAgg+ masks it, and its declared metrics) and the
global adapter the server sent it. The auditor scores each slot by how much more the hospital's rounds lowered the
loss of its first record than of its second, summed over rounds, guesses "first" for the top and "second" for the
bottom `canaries / 20` scores, and turns the count of correct guesses into an epsilon lower bound (`privacy.audit`,
Steinke, Nasr & Jagielski 2023, whose argument holds for any one-slot change the mechanism is DP for), beside the
hospital's accountant epsilon.

`--sabotage no-noise` runs the same audit on a deliberately broken product: DP-SGD on every node adds no noise
while every accountant still claims the configured epsilon. Its bound must exceed the claim: that is what shows the
audit can see at all (the sabotage is on every node, as a real bug would be, so that no honest hospital's noise
hides it in the aggregate).
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fl_core.artifacts import PRIVACY_REPORT_FILE, PRIVACY_REPORT_MARKDOWN, SUMMARY_FILE
from fl_core.config import AppConfig, ConfigError
from privacy.audit import AuditError, epsilon_lower_bound, guess

OBSERVED = "observed"  # under the audit folder: each audited hospital's rounds, as it released them
GUESS_FRACTION = 20  # guesses on each side: canaries / 20, fixed before any score is seen


AUDITED = 0  # the hospital whose data holds the canaries


@dataclass(frozen=True)
class AuditResult:
    hospital: str
    sabotage: str  # "none": the shipped mechanism; "no-noise": DP noise removed behind the accountant's back
    epsilon_lower_bound: float
    epsilon_claimed: float
    confidence: float
    delta: float
    canaries: int  # slots, each holding one record of a pair
    first_picked: int  # slots whose coin picked the pair's first record
    guesses: int
    correct: int
    rounds: int


Canary = tuple[str, int]


def canary_pairs(words: list[str], count: int, num_labels: int, rng: random.Random) -> list[tuple[Canary, Canary]]:
    """Pairs of records no hospital has: eight random words of the dataset's vocabulary and a random label each."""
    def one() -> Canary:
        return " ".join(rng.choice(words) for _ in range(8)), rng.randrange(num_labels)

    return [(one(), one()) for _ in range(count)]


def prepare_hospitals(cfg: AppConfig, folder: Path, canaries: int, audited: list[int]) -> dict[int, dict[str, Any]]:
    """Each audited hospital's data folder: its share of the packaged data plus the canaries drawn in, and a node
    settings file pointing its simulated node at it. Returns each one's canaries and which were drawn in (also kept
    in the audit folder, so anyone can recompute the guesses)."""
    from fl_client.node import NODE_HOME_ENV, SIMULATED_SETTINGS_FILE, node_home
    from fl_core.data import TextDataset, hospital_share, write_examples
    from privacy.secure_random import SecureRandom

    assert node_home() == folder / "nodes", f"{NODE_HOME_ENV} must point at the audit's node home"
    plans: dict[int, dict[str, Any]] = {}
    coin = SecureRandom()
    for partition in audited:
        share = hospital_share(cfg.data, cfg.federation, partition)
        words = sorted({w for t in share.train.texts for w in t.split()})
        drawn = canary_pairs(words, canaries, len(share.train.label_names), random.Random(coin.random_bytes(16)))
        included = (coin.uniform(canaries) < 0.5).tolist()  # True: the pair's first record is the one drawn in
        members = [first if pick else second for (first, second), pick in zip(drawn, included, strict=True)]
        train = TextDataset(share.train.texts + tuple(t for t, _ in members),
                            share.train.labels + tuple(y for _, y in members), share.train.label_names)
        data_dir = folder / "data" / f"hospital-{partition}"
        write_examples(data_dir / "train.jsonl", train)
        write_examples(data_dir / "test.jsonl", share.test)
        home = folder / "nodes" / f"hospital-{partition}"
        home.mkdir(parents=True, exist_ok=True)
        (home / SIMULATED_SETTINGS_FILE).write_text(f'data-dir = "{data_dir}"\n')
        plans[partition] = {"canaries": drawn, "included": included}
        (folder / f"canaries-hospital-{partition}.json").write_text(json.dumps(plans[partition]))
    return plans


def make_observer(folder: Path, sabotage: str) -> Any:
    """The innermost mod on every node: on the audited one it keeps each round's global adapter and the hospital's
    reply; with `sabotage`, it removes the DP noise from the round's training."""
    from flwr.clientapp.typing import ClientAppCallable
    from flwr.common import Context, Message, MessageType, parameters_to_ndarrays
    from flwr.compat.common import recorddict_compat as compat

    def observe(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        partition = int(str(context.node_config.get("partition-id", 0)))
        if msg.metadata.message_type != MessageType.TRAIN:
            return call_next(msg, context)
        sent = parameters_to_ndarrays(compat.recorddict_to_fitins(msg.content, keep_input=True).parameters)
        with _noise_removed(sabotage == "no-noise"):
            reply = call_next(msg, context)
        if partition == AUDITED and not reply.has_error():
            fitres = compat.recorddict_to_fitres(reply.content, keep_input=True)
            import numpy as np

            out = folder / OBSERVED / f"hospital-{partition}"
            out.mkdir(parents=True, exist_ok=True)
            index = len(list(out.glob("round-*.npz")))
            np.savez(out / f"round-{index:03d}.npz", *sent, *parameters_to_ndarrays(fitres.parameters))
            (out / f"round-{index:03d}.json").write_text(json.dumps(dict(fitres.metrics)))
        return reply

    return observe


@contextmanager
def _noise_removed(remove: bool) -> Iterator[None]:
    """The positive control's fault: DP-SGD adds no noise, while the accountant is told nothing of it."""
    from opacus.optimizers.optimizer import _mark_as_processed

    from privacy.dp_sgd import SecureNoise

    def no_noise(self: SecureNoise) -> None:
        for p in self.params:
            p.grad = p.summed_grad.clone().view_as(p)  # type: ignore[attr-defined]
            _mark_as_processed(p.summed_grad)  # type: ignore[attr-defined]

    honest = SecureNoise.add_noise
    if remove:
        SecureNoise.add_noise = no_noise  # type: ignore[method-assign]
    try:
        yield
    finally:
        SecureNoise.add_noise = honest  # type: ignore[method-assign]


def canary_scores(cfg: AppConfig, folder: Path, partition: int, pairs: list[tuple[Canary, Canary]]) -> list[float]:
    """Each slot's score: the loss drop of its first record minus that of its second, over the audited hospital's
    rounds (loss under the adapter the server sent minus loss under the adapter the hospital released, summed)."""
    canaries = [record for pair in pairs for record in pair]
    import numpy as np
    import torch

    from fl_core.data import TextDataset, load_splits
    from fl_core.model import adapter_to_arrays, build_model, load_adapter_arrays, load_tokenizer
    from fl_core.training import classification_logits

    label_names = load_splits(cfg.data).train.label_names
    probe = TextDataset(tuple(t for t, _ in canaries), tuple(y for _, y in canaries), label_names)
    tokenizer = load_tokenizer(cfg.model)
    model = build_model(cfg, tokenizer, len(label_names), torch.device("cpu"))
    tensors = len(adapter_to_arrays(model))

    def losses(arrays: list[np.ndarray]) -> np.ndarray:
        load_adapter_arrays(model, arrays)
        logits, labels = classification_logits(cfg, model, tokenizer, probe, torch.device("cpu"))
        return torch.nn.functional.cross_entropy(logits, labels, reduction="none").numpy()

    drop = np.zeros(len(canaries))
    for path in sorted((folder / OBSERVED / f"hospital-{partition}").glob("round-*.npz")):
        saved = np.load(path)
        arrays = [saved[f"arr_{i}"] for i in range(2 * tensors)]
        drop += losses(arrays[:tensors]) - losses(arrays[tensors:])
    return [float(s) for s in drop[0::2] - drop[1::2]]


def run_audit(cfg: AppConfig, overrides: list[str], folder: Path, canaries: int, confidence: float,
              sabotage: str = "none") -> AuditResult:
    """The audited run, then the audited hospital's bound; written to audit.json and the run's privacy report."""
    import os

    from flwr.clientapp import ClientApp
    from flwr.simulation import run_simulation

    from fl_client.client_app import client_mods, make_client_fn
    from fl_client.node import NODE_HOME_ENV
    from fl_server.privacy_report import report_markdown

    from .server_app import build_server_app

    if cfg.task.name != "classification":
        raise ConfigError("task.name", "the privacy audit scores canaries of a classification task")
    if canaries < 2 * GUESS_FRACTION:
        raise AuditError(f"--canaries: at least {2 * GUESS_FRACTION}, got {canaries}")
    if not 0 < confidence < 1:
        raise AuditError(f"--confidence: must be strictly between 0 and 1, got {confidence}")
    os.environ[NODE_HOME_ENV] = str(folder / "nodes")
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    plan = prepare_hospitals(cfg, folder, canaries, [AUDITED])[AUDITED]
    plan["canaries"] = [(tuple(a), tuple(b)) for a, b in plan["canaries"]]
    run_overrides = [*overrides, f"output_dir={folder / 'run'}"]
    client = ClientApp(client_fn=make_client_fn(run_overrides),
                       mods=[*client_mods(run_overrides), make_observer(folder, sabotage)])
    run_simulation(server_app=build_server_app(run_overrides), client_app=client,
                   num_supernodes=cfg.federation.num_clients,
                   backend_config={"client_resources": {"num_cpus": 1}})
    summary = json.loads((folder / "run" / SUMMARY_FILE).read_text())
    scores = canary_scores(cfg, folder, AUDITED, plan["canaries"])
    g = guess(scores, plan["included"], canaries // GUESS_FRACTION)
    hospital = f"hospital-{AUDITED}"
    result = AuditResult(
        hospital, sabotage, epsilon_lower_bound(g.canaries, g.guesses, g.correct, cfg.privacy.delta, confidence),
        float(summary["epsilon_per_client"][hospital]), confidence, cfg.privacy.delta, canaries,
        sum(plan["included"]), g.guesses, g.correct, int(summary["rounds_completed"]))
    (folder / "audit.json").write_text(json.dumps(asdict(result), indent=2))
    report_path = folder / "run" / PRIVACY_REPORT_FILE
    report = json.loads(report_path.read_text())
    report["audit"] = asdict(result)
    report_path.write_text(json.dumps(report, indent=2))
    (folder / "run" / PRIVACY_REPORT_MARKDOWN).write_text(report_markdown(report))
    return result


def describe(result: AuditResult) -> str:
    what = "the mechanism as shipped" if result.sabotage == "none" else f"sabotaged: {result.sabotage}"
    verdict = "below" if result.epsilon_lower_bound <= result.epsilon_claimed else "ABOVE"
    return (f"{result.hospital} ({what}): empirical epsilon >= {result.epsilon_lower_bound:.3f} at "
            f"{result.confidence:.0%} confidence, {verdict} the accountant's {result.epsilon_claimed:.3f} "
            f"({result.correct} of {result.guesses} guesses right, {result.canaries} canary pairs, "
            f"{result.rounds} rounds)")


def audit_from_cli(overrides: list[str], folder: Path, canaries: int, confidence: float, sabotage: str) -> None:
    from fl_core.config import compose_config, to_app_config

    cfg = to_app_config(compose_config(overrides))
    print(describe(run_audit(cfg, overrides, folder, canaries, confidence, sabotage)), flush=True)
    print(f"audit: {folder / 'audit.json'}; privacy report {folder / 'run' / PRIVACY_REPORT_MARKDOWN}")

