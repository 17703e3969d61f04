"""Privacy-utility study: what a hospital federation gains over each hospital training alone, and how far it stays
from pooling all data, at each epsilon; and what non-IID data, FedProx and the number of hospitals change.

Arms, all on the same ICD-10-CM chapter task and held-out test set, all trained by DP-SGD with each party's own RDP
accountant (sigma calibrated once for all its planned steps):
- pooled: one party holds every hospital's data (the upper bound no hospital may legally reach);
- federated: FedProx over Flower with SecAgg+ secure aggregation, one simulated SuperNode per hospital;
- alone: each hospital trains on its own share for as many epochs; reported as the mean and the best hospital.
Two models: a linear head over frozen all-MiniLM-L6-v2 embeddings, cheap enough for the whole grid of settings
(`features.py`), and the product's own LoRA adapters on MiniLM as the main job trains them, at fewer epsilons in the
baseline split (`lora.py`). Pooled and alone parties train two at a time in worker processes (`parties.py`).

Usage: `python -m scripts.study [--quick] [--out docs]` writes OUT/results.md, OUT/results/*.png and
OUT/results/study.json. `--quick` is the smoke run CI does (a few hundred texts, one seed; numbers mean nothing).
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from pathlib import Path

from fl_client.plan import privacy_plan
from fl_core.config import AppConfig

from .features import StudyData, hospital_rows
from .federation import FederatedArm, run_federated_arms
from .lora import lora_data
from .parties import head_learner, start_worker, train_party
from .plan import FULL, QUICK, Setting, StudyPlan
from .report import POOLED, Result, StudyResults, communication, write_report

ROOT = Path(__file__).resolve().parents[2]


PartyRun = Future[tuple[dict[str, float], float, float]]  # test scores, epsilon spent, seconds


class Study:
    def __init__(self, plan: StudyPlan, log: Callable[[str], None], pool: Executor) -> None:
        self.plan, self.log, self.pool = plan, log, pool
        self.data: StudyData = head_learner(plan).data
        lora_data(plan)  # the LoRA model's prefixes, computed here once before the workers read them
        self.results = StudyResults(plan, self.data.num_labels)
        self._sigmas: dict[tuple[object, ...], float | None] = {}
        self._rows: dict[tuple[Setting, int], list[list[int]]] = {}
        self._alone: dict[tuple[Setting, float, int, bool], list[PartyRun]] = {}

    def rows(self, setting: Setting, seed: int) -> list[list[int]]:
        """Each hospital's rows, split once per setting and seed (every epsilon and arm sees the same split)."""
        if (setting, seed) not in self._rows:
            self._rows[setting, seed] = hospital_rows(self.plan, setting, seed)
        return self._rows[setting, seed]

    def sigma(self, cfg: AppConfig, num_examples: int) -> float | None:
        """Calibrated once per dataset size and everything else `privacy_plan` reads (the arm's privacy, batch,
        epochs and federation), shared by the arms and seeds that plan alike."""
        key = (num_examples, cfg.task.name, cfg.train.batch_size, cfg.train.local_epochs, repr(cfg.federation),
               repr(cfg.privacy))
        if key not in self._sigmas:
            self._sigmas[key] = privacy_plan(cfg, num_examples)[1]
        return self._sigmas[key]

    def train_party(self, cfg: AppConfig, rows: list[int], lora: bool) -> PartyRun:
        """One party trained alone, in a worker process."""
        return self.pool.submit(train_party, self.plan, cfg, rows, self.sigma(cfg, len(rows)), lora)

    def label(self, setting_label: str, lora: bool) -> str:
        """A result's setting as the report names it: the LoRA arms' carry their model."""
        return self.plan.lora.label(setting_label) if lora else setting_label

    def add(self, arm: str, setting: str, epsilon: float, seed: int, scores: dict[str, float], spent: float,
            seconds: float) -> None:
        result = Result(arm, setting, epsilon, seed, scores["accuracy"], scores["macro_f1"], spent, seconds)
        self.results.add(result)
        self.log(f"{arm:<11} {setting:<45} eps {epsilon:>4} seed {seed}: accuracy {result.accuracy:.3f}, "
                 f"macro-F1 {result.macro_f1:.3f}, spent {spent:.3f}")

    def run_pooled(self, epsilon: float, seed: int, lora: bool = False) -> Callable[[], None]:
        """Starts the pooled party; the returned call waits for it and records it."""
        cfg = self.plan.config(epsilon, seed, self.plan.lora.setting if lora else self.plan.baseline, lora)
        run = self.train_party(cfg, list(range(len(self.data.train_y))), lora)

        def record() -> None:
            scores, spent, seconds = run.result()
            self.add("pooled", self.label(POOLED, lora), epsilon, seed, scores, spent, seconds)
        return record

    def run_alone(self, epsilon: float, seed: int, setting: Setting, lora: bool = False) -> Callable[[], None]:
        """Starts each hospital on its own share; the returned call waits for them and records them. Training alone
        involves neither FedProx's mu nor the server, so a setting that differs from one already started only there
        shares its hospitals' runs (and is recorded with 0 seconds)."""
        split = (setting.split, epsilon, seed, lora)
        shared = split in self._alone
        if not shared:
            cfg = self.plan.config(epsilon, seed, setting, lora)
            self._alone[split] = [self.train_party(cfg, rows, lora) for rows in self.rows(setting, seed)]
        runs = self._alone[split]

        def record() -> None:
            outcomes = [run.result() for run in runs]
            mean = {k: statistics.fmean(scores[k] for scores, _, _ in outcomes) for k in ("accuracy", "macro_f1")}
            best = max((scores for scores, _, _ in outcomes), key=lambda s: s["accuracy"])
            spent = max(s for _, s, _ in outcomes)
            seconds = 0.0 if shared else sum(t for _, _, t in outcomes)
            label = self.label(setting.label, lora)
            self.add("alone-mean", label, epsilon, seed, mean, spent, seconds)
            self.add("alone-best", label, epsilon, seed, best, spent, seconds)
        return record

    def federated_arm(self, key: str, epsilon: float, seed: int, setting: Setting,
                      lora: bool = False) -> FederatedArm:
        cfg = self.plan.config(epsilon, seed, setting, lora)
        rows = self.rows(setting, seed)
        return FederatedArm(key, cfg, epsilon, seed, setting, tuple(tuple(r) for r in rows),
                            tuple(self.sigma(cfg, len(r)) for r in rows), lora)

    def run_federated(self, arms: Sequence[FederatedArm]) -> None:
        """Per hospital count, one simulation runs all its arms."""
        for count in sorted({arm.setting.hospitals for arm in arms}):
            group = [arm for arm in arms if arm.setting.hospitals == count]
            self.log(f"study: {len(group)} federated runs with {count} hospitals (Flower, SecAgg+)")
            with tempfile.TemporaryDirectory(prefix="study-") as work:
                outcomes = run_federated_arms(group, self.plan, Path(work))
            for arm in group:
                o = outcomes[arm.key]
                self.add("federated", self.label(arm.setting.label, arm.lora), arm.epsilon, arm.seed, o,
                         o["epsilon_spent"], o["seconds"])
                traffic = self.results.lora_traffic if arm.lora else self.results.traffic
                traffic.setdefault(count, {"bytes_down": o["bytes_down"], "bytes_up": o["bytes_up"]})

    def run(self) -> None:
        """Every party that trains on its own first, two at a time in the worker processes; then the federated arms,
        one simulation per hospital count."""
        p = self.plan
        arms: list[FederatedArm] = []
        recorders: list[Callable[[], None]] = []
        for seed in p.seeds:
            for epsilon in p.epsilons:
                recorders += [self.run_pooled(epsilon, seed), self.run_alone(epsilon, seed, p.baseline)]
                arms.append(self.federated_arm(f"arm-{len(arms)}", epsilon, seed, p.baseline))
            for setting in p.ablations:
                for epsilon in p.ablation_epsilons:
                    recorders.append(self.run_alone(epsilon, seed, setting))
                    arms.append(self.federated_arm(f"arm-{len(arms)}", epsilon, seed, setting))
            for epsilon in p.lora.epsilons:
                recorders += [self.run_pooled(epsilon, seed, lora=True),
                              self.run_alone(epsilon, seed, p.lora.setting, lora=True)]
                arms.append(self.federated_arm(f"arm-{len(arms)}", epsilon, seed, p.lora.setting, lora=True))
        for record in recorders:
            record()
        self.pool.shutdown()  # the workers' memory back before the simulation's hospitals load theirs
        self.run_federated(arms)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m scripts.study", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the smoke run CI does")
    parser.add_argument("--out", type=Path, default=ROOT / "docs", help="folder for results.md and results/")
    args = parser.parse_args(argv)
    start_worker()
    start = time.perf_counter()
    with ProcessPoolExecutor(max_workers=2, mp_context=multiprocessing.get_context("spawn"),
                             initializer=start_worker) as pool:
        study = Study(QUICK if args.quick else FULL, lambda line: print(line, flush=True), pool)
        study.run()
    study.results.communication = communication(study.data)
    path = write_report(study.results, args.out, time.perf_counter() - start, args.quick)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
