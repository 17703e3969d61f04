"""Privacy-utility study: what a hospital federation gains over training alone, and what pooling all data would give,
at each epsilon; and what non-IID data, FedProx and the number of hospitals change.

Every arm trains the same model with the project's own code: `fl_core.training.train_local` (Opacus DP-SGD, sigma
calibrated once per hospital for all its planned steps, accountant carried across rounds), evaluated on the same
held-out ICD-10-CM test set (chapter classification, 22 classes).

- pooled: one party holds every hospital's data (the upper bound no hospital may legally reach);
- federated: FedProx rounds in one process (each hospital trains from the global adapter with the proximal term, the
  server averages adapters weighted by examples, as Flower's FedProx does). The aggregate is what SecAgg+ yields up to
  its quantisation step (`tests/test_secure_aggregation.py`: the real protocol matches plaintext FedProx);
- alone: each hospital trains on its own share for the same number of epochs; reported as the mean over hospitals
  and the best one.

Usage: `python -m scripts.study [--quick] [--out docs]`. Writes OUT/results.md, OUT/results/*.png and
OUT/results/study.json. `--quick` is a one-minute smoke run of the whole pipeline on the tiny random-initialised
model (CI runs it; its numbers mean nothing).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from flwr.server.strategy.aggregate import aggregate  # noqa: E402

from fl_client.hospital import privacy_plan  # noqa: E402
from fl_core.config import AppConfig, compose_config, to_app_config  # noqa: E402
from fl_core.data import TextDataset, hospital_datasets, load_splits  # noqa: E402
from fl_core.entry import quiet_libraries  # noqa: E402
from fl_core.model import (  # noqa: E402
    adapter_to_arrays,
    build_model,
    count_parameters,
    load_adapter_arrays,
    load_tokenizer,
)
from fl_core.training import evaluate, train_local  # noqa: E402
from privacy.accountant import AccountantState  # noqa: E402

INF = math.inf


@dataclass(frozen=True)
class Setting:
    """One federation: how many hospitals, how their data is split, and FedProx's mu (0: FedAvg)."""

    hospitals: int = 3
    partitioning: str = "dirichlet"
    alpha: float = 0.3
    mu: float = 0.01

    @property
    def label(self) -> str:
        split = "IID" if self.partitioning == "iid" else f"Dirichlet a={self.alpha}"
        return f"{self.hospitals} hospitals, {split}, {'FedAvg' if self.mu == 0 else f'FedProx mu={self.mu}'}"


@dataclass(frozen=True)
class StudyPlan:
    model: str
    train_examples: int
    test_examples: int
    rounds: int
    local_epochs: int
    batch_size: int
    epsilons: tuple[float, ...]
    seeds: tuple[int, ...]
    baseline: Setting
    ablations: tuple[Setting, ...]
    ablation_epsilons: tuple[float, ...]
    delta: float = 1e-5


FULL = StudyPlan(model="minilm", train_examples=3000, test_examples=1000, rounds=4, local_epochs=1, batch_size=32,
                 epsilons=(1.0, 2.0, 4.0, 8.0, INF), seeds=(0, 1, 2), baseline=Setting(),
                 ablations=(Setting(partitioning="iid"), Setting(mu=0.0), Setting(hospitals=10)),
                 ablation_epsilons=(1.0, 8.0, INF))
# The smoke run: the tiny random-initialised model, so CI checks the whole pipeline quickly; its numbers mean nothing.
QUICK = StudyPlan(model="tiny", train_examples=240, test_examples=120, rounds=2, local_epochs=1, batch_size=32,
                  epsilons=(8.0, INF), seeds=(0,), baseline=Setting(), ablations=(Setting(partitioning="iid"),),
                  ablation_epsilons=(INF,))  # DP arms cost seconds of calibration each


@dataclass
class Result:
    arm: str  # pooled | federated | alone-mean | alone-best
    setting: str
    epsilon: float  # the target (inf: no DP)
    seed: int
    accuracy: float
    macro_f1: float
    epsilon_spent: float  # the largest any party spent, by its accountant
    seconds: float
    extra: dict[str, float] = field(default_factory=dict)


class Study:
    def __init__(self, plan: StudyPlan, log: Callable[[str], None]) -> None:
        self.plan, self.log = plan, log
        self.device = torch.device("cpu")
        base = self.config(INF, 0, plan.baseline)
        splits = load_splits(base.data)
        self.train, self.test = splits.train, splits.test
        self.tokenizer = load_tokenizer(base.model)
        self.num_labels = len(self.train.label_names)
        self.results: list[Result] = []
        self.communication: dict[str, float] = {}

    def config(self, epsilon: float, seed: int, setting: Setting, rounds: int | None = None) -> AppConfig:
        p = self.plan
        overrides = [
            f"model={p.model}", "data=icd10", "task=classification", f"data.max_train_examples={p.train_examples}",
            f"data.max_test_examples={p.test_examples}", f"train.batch_size={p.batch_size}", "train.device=cpu",
            f"train.local_epochs={p.local_epochs}", f"train.seed={seed}", f"data.seed={0}",
            f"federation.num_rounds={rounds or p.rounds}", f"federation.num_clients={setting.hospitals}",
            f"federation.min_participants={min(setting.hospitals, 3)}",
            f"federation.partitioning={setting.partitioning}", f"federation.dirichlet_alpha={setting.alpha}",
            f"strategy.proximal_mu={setting.mu}", f"privacy.delta={p.delta}",
            *(["privacy.enabled=false"] if math.isinf(epsilon) else [f"privacy.target_epsilon={epsilon}"]),
        ]
        return to_app_config(compose_config(overrides))

    def fresh_model(self, cfg: AppConfig) -> tuple[Any, list[np.ndarray]]:
        model = build_model(cfg, self.tokenizer, self.num_labels, self.device)
        return model, adapter_to_arrays(model)

    def train_party(self, cfg: AppConfig, model: Any, data: TextDataset, rounds: int) -> float:
        """Train alone for `rounds` x local epochs under one calibration; returns epsilon spent."""
        plan_cfg = replace(cfg, federation=replace(cfg.federation, num_rounds=rounds))
        _, sigma = privacy_plan(plan_cfg, len(data))
        accountant = AccountantState(cfg.privacy.accountant) if sigma is not None else None
        epsilon = INF
        for _ in range(rounds):
            result = train_local(cfg, model, self.tokenizer, data, self.device, noise_multiplier=sigma,
                                 accountant=accountant)
            accountant, epsilon = result.accountant, result.epsilon
        return epsilon

    def run_pooled(self, epsilon: float, seed: int) -> None:
        start = time.perf_counter()
        cfg = self.config(epsilon, seed, self.plan.baseline)
        model, _ = self.fresh_model(cfg)
        spent = self.train_party(cfg, model, self.train, self.plan.rounds)
        scores = evaluate(cfg, model, self.tokenizer, self.test, self.device)
        self.add("pooled", "all data in one place", epsilon, seed, scores, spent, start)

    def run_alone(self, epsilon: float, seed: int, setting: Setting) -> None:
        start = time.perf_counter()
        cfg = self.config(epsilon, seed, setting)
        scores, spent = [], []
        for data in hospital_datasets(self.train, cfg.federation, seed):
            model, _ = self.fresh_model(cfg)
            spent.append(self.train_party(cfg, model, data, self.plan.rounds))
            scores.append(evaluate(cfg, model, self.tokenizer, self.test, self.device))
        mean = {k: statistics.fmean(s[k] for s in scores) for k in ("accuracy", "macro_f1")}
        best = max(scores, key=lambda s: s["accuracy"])
        self.add("alone-mean", setting.label, epsilon, seed, mean, max(spent), start)
        self.add("alone-best", setting.label, epsilon, seed, best, max(spent), start)

    def run_federated(self, epsilon: float, seed: int, setting: Setting) -> None:
        start = time.perf_counter()
        cfg = self.config(epsilon, seed, setting)
        model, global_arrays = self.fresh_model(cfg)
        shares = hospital_datasets(self.train, cfg.federation, seed)
        plans = [privacy_plan(cfg, len(d))[1] for d in shares]
        accountants = [AccountantState(cfg.privacy.accountant) if s is not None else None for s in plans]
        spent = [INF] * len(shares)
        adapter_bytes = sum(a.nbytes for a in global_arrays)
        for _ in range(cfg.federation.num_rounds):
            updates = []
            for h, data in enumerate(shares):
                load_adapter_arrays(model, global_arrays)
                result = train_local(cfg, model, self.tokenizer, data, self.device, noise_multiplier=plans[h],
                                     accountant=accountants[h], proximal_mu=setting.mu)
                accountants[h], spent[h] = result.accountant, result.epsilon
                updates.append((adapter_to_arrays(model), len(data)))
            global_arrays = [a.astype(np.float32) for a in aggregate(updates)]
        load_adapter_arrays(model, global_arrays)
        scores = evaluate(cfg, model, self.tokenizer, self.test, self.device)
        self.add("federated", setting.label, epsilon, seed, scores, max(spent), start,
                 {"bytes_per_hospital_per_round": 2.0 * adapter_bytes})
        if not self.communication:
            _, total = count_parameters(model)
            self.communication = {"adapter_bytes": float(adapter_bytes), "full_model_bytes": 4.0 * total}

    def add(self, arm: str, setting: str, epsilon: float, seed: int, scores: dict[str, float], spent: float,
            start: float, extra: dict[str, float] | None = None) -> None:
        result = Result(arm, setting, epsilon, seed, scores["accuracy"], scores["macro_f1"], spent,
                        time.perf_counter() - start, extra or {})
        self.results.append(result)
        self.log(f"{arm:<11} {setting:<45} eps {epsilon:>4} seed {seed}: accuracy {result.accuracy:.3f}, "
                 f"macro-F1 {result.macro_f1:.3f}, spent {spent:.3f}, {result.seconds:.0f}s")

    def run(self) -> None:
        p = self.plan
        for seed in p.seeds:
            for epsilon in p.epsilons:
                self.run_pooled(epsilon, seed)
                self.run_federated(epsilon, seed, p.baseline)
                self.run_alone(epsilon, seed, p.baseline)
            for setting in p.ablations:
                for epsilon in p.ablation_epsilons:
                    self.run_federated(epsilon, seed, setting)
                    self.run_alone(epsilon, seed, setting)


def _eps(epsilon: float) -> str:
    return "∞" if math.isinf(epsilon) else f"{epsilon:g}"


def _summary(results: Sequence[Result], metric: str) -> tuple[float, float]:
    values = [getattr(r, metric) for r in results]
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _cell(results: Sequence[Result], metric: str) -> str:
    if not results:
        return "-"
    mean, sd = _summary(results, metric)
    return f"{mean:.3f} ± {sd:.3f}" if len(results) > 1 else f"{mean:.3f}"


def _select(results: Sequence[Result], arm: str, setting: str, epsilon: float) -> list[Result]:
    return [r for r in results if r.arm == arm and r.setting == setting and r.epsilon == epsilon]


def plot(study: Study, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plan, results, base = study.plan, study.results, study.plan.baseline.label
    positions = list(range(len(plan.epsilons)))
    paths = []
    for metric, name in (("accuracy", "accuracy"), ("macro_f1", "macro-F1")):
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for arm, setting, label in (("pooled", "all data in one place", "pooled (upper bound)"),
                                    ("federated", base, "federated (FedProx)"),
                                    ("alone-mean", base, "each hospital alone (mean)"),
                                    ("alone-best", base, "best hospital alone")):
            stats = [_summary(_select(results, arm, setting, e), metric) for e in plan.epsilons]
            ax.errorbar(positions, [s[0] for s in stats], yerr=[s[1] for s in stats], marker="o", capsize=3,
                        label=label)
        ax.set_xticks(positions, [_eps(e) for e in plan.epsilons])
        ax.set_xlabel(f"target epsilon per hospital (delta {plan.delta:g})")
        ax.set_ylabel(f"test {name}")
        ax.set_title(f"ICD-10-CM chapter, {base}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out / f"{metric}_vs_epsilon.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    settings = [plan.baseline, *plan.ablations]
    fig, axes = plt.subplots(1, len(plan.ablation_epsilons), figsize=(4.2 * len(plan.ablation_epsilons), 4.2),
                             squeeze=False)
    for ax, epsilon in zip(axes[0], plan.ablation_epsilons, strict=True):
        x = np.arange(len(settings))
        for offset, arm, label in ((-0.2, "federated", "federated"), (0.2, "alone-mean", "alone (mean)")):
            stats = [_summary(_select(results, arm, s.label, epsilon), "accuracy") for s in settings]
            ax.bar(x + offset, [s[0] for s in stats], 0.4, yerr=[s[1] for s in stats], capsize=3, label=label)
        ax.set_xticks(x, [s.label.replace(", ", "\n") for s in settings], fontsize=7)
        ax.set_title(f"epsilon {_eps(epsilon)}")
        ax.set_ylabel("test accuracy")
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / "settings.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return [*paths, path]


def findings(study: Study) -> list[str]:
    """Statements read off the numbers, including where federation does not pay."""
    plan, results, base = study.plan, study.results, study.plan.baseline.label
    lines = []
    for epsilon in plan.epsilons:
        fed = _summary(_select(results, "federated", base, epsilon), "accuracy")[0]
        mean = _summary(_select(results, "alone-mean", base, epsilon), "accuracy")[0]
        best = _summary(_select(results, "alone-best", base, epsilon), "accuracy")[0]
        pooled = _summary(_select(results, "pooled", "all data in one place", epsilon), "accuracy")[0]
        closes = ("matches or exceeds pooled training" if fed >= pooled else
                  f"closes {_share(fed - mean, pooled - mean)} of the gap between a hospital alone and pooled data")
        verdict = ("beats every hospital alone" if fed > best else
                   "beats the average hospital alone but not the best one" if fed > mean else
                   "does **not** beat training alone")
        lines.append(f"- ε {_eps(epsilon)}: federated {fed:.3f} against alone {mean:.3f} (mean) / {best:.3f} (best) "
                     f"and pooled {pooled:.3f}: the federation {verdict}; it {closes}.")
    for setting in plan.ablations:
        for epsilon in plan.ablation_epsilons:
            new = _summary(_select(results, "federated", setting.label, epsilon), "accuracy")[0]
            old = _summary(_select(results, "federated", base, epsilon), "accuracy")[0]
            alone = _summary(_select(results, "alone-mean", setting.label, epsilon), "accuracy")[0]
            lines.append(f"- {setting.label} at ε {_eps(epsilon)}: federated {new:.3f} ({new - old:+.3f} against the "
                         f"baseline's {old:.3f}); alone {alone:.3f} (mean).")
    return lines


def _share(part: float, whole: float) -> str:
    return "none" if whole <= 0 else f"{100 * part / whole:.0f}%"


def write_report(study: Study, out: Path, seconds: float, quick: bool) -> Path:
    figures = out / "results"
    figures.mkdir(parents=True, exist_ok=True)
    plan, results, base = study.plan, study.results, study.plan.baseline.label
    (figures / "study.json").write_text(json.dumps({"plan": asdict(plan), "results": [asdict(r) for r in results],
                                                    "communication": study.communication}, indent=2, default=str))
    images = plot(study, figures)
    over = [r for r in results if r.epsilon_spent > r.epsilon * (1 + 1e-9)]
    lines = [
        "# Privacy-utility study" + (" (quick smoke run: not a result)" if quick else ""), "",
        f"Regenerate: `python -m scripts.study{' --quick' if quick else ''}` ({seconds / 60:.0f} min on this "
        f"machine). Model {plan.model} + LoRA, ICD-10-CM chapter classification ({study.num_labels} classes), "
        f"{plan.train_examples} training texts split over the hospitals, {plan.test_examples} shared test texts; "
        f"{plan.rounds} rounds of {plan.local_epochs} local epoch(s) at batch {plan.batch_size} (the same epochs for "
        f"pooled and alone); DP-SGD with delta {plan.delta}; seeds {', '.join(map(str, plan.seeds))} "
        "(mean ± standard deviation). Every epsilon spent was computed by the hospital's RDP accountant; "
        f"{'none' if not over else len(over)} of {len(results)} arms exceeded their target.", "",
        f"## Accuracy and macro-F1 against epsilon ({base})", "",
        "| ε | pooled acc | federated acc | alone acc (mean) | alone acc (best) | pooled F1 | federated F1 | "
        "alone F1 (mean) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for e in plan.epsilons:
        row = [_cell(_select(results, "pooled", "all data in one place", e), "accuracy"),
               _cell(_select(results, "federated", base, e), "accuracy"),
               _cell(_select(results, "alone-mean", base, e), "accuracy"),
               _cell(_select(results, "alone-best", base, e), "accuracy"),
               _cell(_select(results, "pooled", "all data in one place", e), "macro_f1"),
               _cell(_select(results, "federated", base, e), "macro_f1"),
               _cell(_select(results, "alone-mean", base, e), "macro_f1")]
        lines.append(f"| {_eps(e)} | " + " | ".join(row) + " |")
    lines += ["", *[f"![{p.stem}](results/{p.name})" for p in images[:2]], "",
              "## Non-IID data, FedAvg against FedProx, 3 against 10 hospitals", "",
              "| setting | ε | federated acc | federated F1 | alone acc (mean) | alone F1 (mean) |",
              "|---|---|---|---|---|---|"]
    for setting in (plan.baseline, *plan.ablations):
        for e in plan.ablation_epsilons:
            lines.append(f"| {setting.label} | {_eps(e)} | "
                         f"{_cell(_select(results, 'federated', setting.label, e), 'accuracy')} | "
                         f"{_cell(_select(results, 'federated', setting.label, e), 'macro_f1')} | "
                         f"{_cell(_select(results, 'alone-mean', setting.label, e), 'accuracy')} | "
                         f"{_cell(_select(results, 'alone-mean', setting.label, e), 'macro_f1')} |")
    comm = study.communication
    lines += ["", f"![settings](results/{images[2].name})", "",
              "## Communication", "",
              f"Each round a hospital downloads the global adapter and uploads its own: "
              f"{2 * comm['adapter_bytes'] / 1e6:.2f} MB per hospital per round (float32 LoRA matrices and the "
              f"classification head), against {comm['full_model_bytes'] / 1e6:.1f} MB for the full model: "
              f"{comm['full_model_bytes'] / comm['adapter_bytes']:.0f}x less than shipping the model once. SecAgg+ "
              "adds its key exchange and share messages on top (`docs/benchmarks.md`).", "",
              "## What the figures show", "", *findings(study), ""]
    path = out / "results.md"
    path.write_text("\n".join(lines))
    return path


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m scripts.study", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run on the tiny model, for CI")
    parser.add_argument("--out", type=Path, default=ROOT / "docs", help="folder for results.md and results/")
    args = parser.parse_args(argv)
    quiet_libraries()
    torch.set_num_threads(1)
    start = time.perf_counter()
    study = Study(QUICK if args.quick else FULL, lambda line: print(line, flush=True))
    study.run()
    path = write_report(study, args.out, time.perf_counter() - start, args.quick)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
