"""The study's report: tables (mean ± standard deviation over seeds), matplotlib figures, the traffic per round,
and findings read off the numbers, including where the federation does not beat training alone."""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .features import StudyData, head_to_arrays, new_head
from .plan import LoraPlan, StudyPlan

POOLED = "all data in one place"


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


@dataclass
class StudyResults:
    plan: StudyPlan
    num_labels: int
    results: list[Result] = field(default_factory=list)
    traffic: dict[int, dict[str, float]] = field(default_factory=dict)  # hospitals -> bytes per hospital per round
    lora_traffic: dict[int, dict[str, float]] = field(default_factory=dict)  # the same for the LoRA arms
    communication: dict[str, float] = field(default_factory=dict)

    def add(self, result: Result) -> None:
        self.results.append(result)


def communication(data: StudyData) -> dict[str, float]:
    """What travels (the study's head; the product's MiniLM LoRA adapter) against the whole model's size."""
    import torch

    from fl_core.config import compose_config, to_app_config
    from fl_core.model import adapter_to_arrays, build_model, count_parameters, load_tokenizer

    cfg = to_app_config(compose_config(["model=minilm", "task=classification"]))
    lora = build_model(cfg, load_tokenizer(cfg.model), data.num_labels, torch.device("cpu"))
    head_bytes = float(sum(a.nbytes for a in head_to_arrays(new_head(data, 0))))
    return {"head_bytes": head_bytes, "lora_adapter_bytes": float(sum(a.nbytes for a in adapter_to_arrays(lora))),
            "full_model_bytes": 4.0 * count_parameters(lora)[1]}


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


def plot(study: StudyResults, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plan, results, base = study.plan, study.results, study.plan.baseline.label
    positions = list(range(len(plan.epsilons)))
    paths = []
    for metric, name in (("accuracy", "accuracy"), ("macro_f1", "macro-F1")):
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for arm, setting, label in (("pooled", POOLED, "pooled (upper bound)"),
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
    fig, axes = plt.subplots(1, len(plan.ablation_epsilons), figsize=(5.2 * len(plan.ablation_epsilons), 4.4),
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


def _compare(new: Sequence[Result], old: Sequence[Result]) -> str:
    """The difference of mean accuracies, and whether it stands out from the spread over seeds."""
    (m_new, sd_new), (m_old, sd_old) = _summary(new, "accuracy"), _summary(old, "accuracy")
    spread = math.hypot(sd_new, sd_old)
    if len(new) < 2 or len(old) < 2:
        return f"{m_new - m_old:+.3f} (one seed: no spread to judge it by)"
    judged = "within the spread over seeds" if abs(m_new - m_old) <= spread else "beyond the spread over seeds"
    return f"{m_new - m_old:+.3f}, {judged} ({spread:.3f})"


def findings(study: StudyResults) -> list[str]:
    """Statements read off the numbers, including where federation does not pay."""
    plan, results, base = study.plan, study.results, study.plan.baseline.label
    lines = _epsilon_findings(results, plan.epsilons, POOLED, base, "")
    for setting in plan.ablations:
        for epsilon in plan.ablation_epsilons:
            new = _select(results, "federated", setting.label, epsilon)
            mean = _summary(_select(results, "alone-mean", setting.label, epsilon), "accuracy")[0]
            best = _summary(_select(results, "alone-best", setting.label, epsilon), "accuracy")[0]
            fed = _summary(new, "accuracy")[0]
            lines.append(f"- {setting.label} at ε {_eps(epsilon)}: federated {fed:.3f}, "
                         f"{_compare(new, _select(results, 'federated', base, epsilon))} against the baseline; it "
                         f"{_verdict(fed, mean, best)} ({mean:.3f} mean, {best:.3f} best).")
    return lines


def _epsilon_findings(results: Sequence[Result], epsilons: Sequence[float], pooled_label: str, label: str,
                      model: str) -> list[str]:
    """Federated against alone and pooled at each epsilon, and what privacy costs each arm."""
    lines = []
    for epsilon in epsilons:
        fed = _summary(_select(results, "federated", label, epsilon), "accuracy")[0]
        mean = _summary(_select(results, "alone-mean", label, epsilon), "accuracy")[0]
        best = _summary(_select(results, "alone-best", label, epsilon), "accuracy")[0]
        pooled = _summary(_select(results, "pooled", pooled_label, epsilon), "accuracy")[0]
        if fed >= pooled:
            gap = "it matches or exceeds pooled training"
        elif fed > mean:
            gap = f"it closes {100 * (fed - mean) / (pooled - mean):.0f}% of the gap from alone to pooled data"
        else:
            gap = f"it trails the average hospital alone by {mean - fed:.3f}"
        model_at = f"{model}, " if model else ""
        lines.append(f"- {model_at}ε {_eps(epsilon)}: federated {fed:.3f} against alone {mean:.3f} (mean) / "
                     f"{best:.3f} (best) and pooled {pooled:.3f}: the federation {_verdict(fed, mean, best)}; {gap}.")
    strict, loose = min(epsilons), max(epsilons)
    arms = (("pooled", pooled_label), ("federated", label), ("alone-mean", label)) if strict < loose else ()
    for arm, arm_label in arms:
        cost = _compare(_select(results, arm, arm_label, strict), _select(results, arm, arm_label, loose))
        lines.append(f"- Privacy cost{f' ({model})' if model else ''}, {arm} from ε {_eps(loose)} to ε {_eps(strict)}: "
                     f"accuracy {cost}.")
    return lines


def _epsilon_rows(results: Sequence[Result], epsilons: Sequence[float], pooled_label: str, label: str) -> list[str]:
    """The table of pooled, federated and alone against epsilon."""
    lines = ["| ε | pooled acc | federated acc | alone acc (mean) | alone acc (best) | pooled F1 | federated F1 | "
             "alone F1 (mean) |", "|---|---|---|---|---|---|---|---|"]
    for e in epsilons:
        row = [_cell(_select(results, "pooled", pooled_label, e), "accuracy"),
               _cell(_select(results, "federated", label, e), "accuracy"),
               _cell(_select(results, "alone-mean", label, e), "accuracy"),
               _cell(_select(results, "alone-best", label, e), "accuracy"),
               _cell(_select(results, "pooled", pooled_label, e), "macro_f1"),
               _cell(_select(results, "federated", label, e), "macro_f1"),
               _cell(_select(results, "alone-mean", label, e), "macro_f1")]
        lines.append(f"| {_eps(e)} | " + " | ".join(row) + " |")
    return lines


def _verdict(federated: float, alone_mean: float, alone_best: float) -> str:
    return ("beats every hospital alone" if federated > alone_best else
            "beats the average hospital alone but **not the best one**" if federated > alone_mean else
            "does **not** beat training alone")


def traffic_lines(study: StudyResults) -> list[str]:
    comm = study.communication
    lines = ["Bytes a hospital receives and sends per round, counted on every Flower message it handled (all four "
             "SecAgg+ stages: key setup, key shares, masked update, unmasking), averaged over hospitals and rounds:",
             "", "| hospitals | down per round | up per round | plaintext update |", "|---|---|---|---|"]
    for count, t in sorted(study.traffic.items()):
        lines.append(f"| {count} | {t['bytes_down'] / 1e3:.1f} kB | {t['bytes_up'] / 1e3:.1f} kB | "
                     f"{comm['head_bytes'] / 1e3:.1f} kB |")
    lines += ["", f"The whole model (MiniLM encoder and head) is {comm['full_model_bytes'] / 1e6:.1f} MB: the study's "
              f"head travels {comm['full_model_bytes'] / comm['head_bytes']:.0f}x less. The product's MiniLM LoRA "
              f"adapter (with its head) is {comm['lora_adapter_bytes'] / 1e6:.2f} MB each way per round, "
              f"{comm['full_model_bytes'] / comm['lora_adapter_bytes']:.0f}x less than the model. SecAgg+ sends the "
              "update as masked integers and adds key and share messages that grow with the number of hospitals "
              "(the table's gap between plaintext and upload)."]
    for count, t in sorted(study.lora_traffic.items()):
        lines += ["", f"Measured on the LoRA arms ({count} hospitals): {t['bytes_down'] / 1e3:.1f} kB down and "
                  f"{t['bytes_up'] / 1e3:.1f} kB up per hospital per round, for a plaintext adapter of "
                  f"{comm['lora_adapter_bytes'] / 1e3:.1f} kB."]
    return lines


def write_report(study: StudyResults, out: Path, seconds: float, quick: bool) -> Path:
    figures = out / "results"
    figures.mkdir(parents=True, exist_ok=True)
    plan, results, base = study.plan, study.results, study.plan.baseline.label
    (figures / "study.json").write_text(json.dumps(
        {"plan": asdict(plan), "results": [asdict(r) for r in results], "communication": study.communication,
         "traffic_per_hospital_per_round": study.traffic, "lora_traffic_per_hospital_per_round": study.lora_traffic},
        indent=2, default=str))
    images = plot(study, figures)
    over = [r for r in results if r.epsilon_spent > r.epsilon * (1 + 1e-9)]
    lines = [
        "# Privacy-utility study" + (" (quick smoke run: not a result)" if quick else ""), "",
        f"Regenerate: `make study{' ARGS=--quick' if quick else ''}` ({seconds / 60:.0f} min on this "
        "machine, 2 cores). ICD-10-CM chapter classification "
        f"({study.num_labels} classes): {plan.train_examples} training texts split over the hospitals, "
        f"{plan.test_examples} held-out test texts shared by every arm. Two models: the grid of settings below uses a "
        "linear classifier over frozen all-MiniLM-L6-v2 sentence embeddings, trained by DP-SGD (Opacus), whose "
        "steps cost milliseconds; the product's own LoRA model, whose steps cost hundreds of times more, has its own "
        "section at fewer epsilons (\"The product's model\"). Settings whose hospitals train alone identically "
        "(they differ only in FedProx's mu or the server) share those alone arms. The head: each party trains "
        f"{plan.rounds} rounds of {plan.local_epochs} local epoch(s) at expected batch "
        f"{plan.batch_size} (Adam, lr {plan.lr}); pooled and alone train for as many epochs. The federated arm runs "
        "on Flower: FedProx with SecAgg+ secure aggregation, one simulated SuperNode per hospital, and the server "
        "optimiser of the setting's label stepping from each round's aggregate (chosen on validation texts apart from "
        "the test texts: `python -m scripts.study.tune`). DP-SGD with "
        f"delta {plan.delta:g}, sigma calibrated once per party for all its steps; seeds "
        f"{', '.join(map(str, plan.seeds))} (mean ± standard deviation; the seed sets the split and the "
        "initialisation, DP noise is fresh). Every epsilon spent was computed by the party's own accountant "
        "(`privacy.accountant`, replace-one PLD); "
        f"{'none' if not over else len(over)} of {len(results)} arms exceeded their target.", "",
        f"## Accuracy and macro-F1 against epsilon ({base})", "",
        *_epsilon_rows(results, plan.epsilons, POOLED, base)]
    lines += ["", *[f"![{p.stem}](results/{p.name})" for p in images[:2]], "",
              "## Non-IID data, the server optimiser, FedAvg against FedProx, 3 against 10 hospitals", "",
              "| setting | ε | federated acc | federated F1 | alone acc (mean) | alone acc (best) | alone F1 (mean) |",
              "|---|---|---|---|---|---|---|"]
    for setting in plan.settings:
        for e in plan.ablation_epsilons:
            lines.append(f"| {setting.label} | {_eps(e)} | "
                         f"{_cell(_select(results, 'federated', setting.label, e), 'accuracy')} | "
                         f"{_cell(_select(results, 'federated', setting.label, e), 'macro_f1')} | "
                         f"{_cell(_select(results, 'alone-mean', setting.label, e), 'accuracy')} | "
                         f"{_cell(_select(results, 'alone-best', setting.label, e), 'accuracy')} | "
                         f"{_cell(_select(results, 'alone-mean', setting.label, e), 'macro_f1')} |")
    lora, lora_base = plan.lora, plan.lora.label(plan.lora.setting.label)
    lora_cfg = plan.config(math.inf, plan.seeds[0], lora.setting, lora=True)
    lines += ["", f"![settings](results/{images[2].name})", "",
              "## The product's model: LoRA adapters", "",
              "The same texts, splits, seeds and test set, with the model the product federates, trained as the main "
              "job trains it (`conf/model/minilm.yaml`: LoRA on MiniLM's top feed-forward block, the lower layers run "
              "once per text, a zero-initialised head clipped apart from the adapters, Adam at lr "
              f"{lora_cfg.train.lr:g} for the adapters and {lora_cfg.train.head_lr:g} for the head, expected batch "
              f"{lora_cfg.train.batch_size}) for {lora.rounds} rounds of {lora_cfg.train.local_epochs} local epoch(s), "
              "pooled and alone for as many epochs, and federated with the main job's strategy over Flower with "
              f"SecAgg+, in one setting: {lora.setting.label}. "
              "Fewer epsilons and settings than the head's grid, to keep the study within the hour: a DP step of "
              "this model costs hundreds of times the head's.", "",
              f"### {lora_base}", "",
              *_epsilon_rows(results, lora.epsilons, lora.label(POOLED), lora_base), "",
              *_epsilon_findings(results, lora.epsilons, lora.label(POOLED), lora_base, LoraPlan.LABEL), "",
              "## Communication", "", *traffic_lines(study), "",
              "## What the figures show", "", *findings(study), ""]
    path = out / "results.md"
    path.write_text("\n".join(lines))
    return path


