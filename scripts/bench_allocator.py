"""The main job's DP-SGD step with glibc's default allocator settings against `fl_core.allocator.keep_freed_buffers`.

Each variant runs in its own subprocess (the setting is per process), alternating over `--repeat` rounds so a swing
of the machine's load falls on both; each subprocess trains the main job's model (MiniLM, adapters on the top
feed-forward block over cached prefixes, batch 256) for `--steps` DP-SGD steps on one thread, through
`fl_core.training.train_epochs`, and reports wall, user and kernel seconds. Writes docs/benchmarks.md between the
allocator markers.

    .venv/bin/python scripts/bench_allocator.py [--steps 10] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scripts.bench_dp_step import write_section  # noqa: E402

VARIANTS = {"default": "glibc's defaults", "kept": "`keep_freed_buffers` (as shipped)"}


def measure(variant: str, steps: int) -> dict[str, float]:
    """One subprocess's figures: seconds per step, and the share of CPU time spent in the kernel."""
    import torch

    from fl_core import training
    from fl_core.config import compose_config, to_app_config
    from fl_core.data import load_splits
    from fl_core.entry import quiet_libraries
    from fl_core.model import build_model, load_tokenizer
    from privacy.accountant import AccountantState
    from privacy.calibration import sampling_plan

    quiet_libraries()
    torch.set_num_threads(1)
    if variant == "default":
        training.keep_freed_buffers = lambda: False  # train_epochs calls it: leave glibc as it starts
    cfg = to_app_config(compose_config(["train.device=cpu", f"data.max_train_examples={256 * steps}"]))
    splits = load_splits(cfg.data)
    tokenizer = load_tokenizer(cfg.model)
    cpu = torch.device("cpu")
    model = build_model(cfg, tokenizer, len(splits.train.label_names), cpu)
    view = training.training_view(cfg, model, tokenizer, splits.train, cpu)
    plan = sampling_plan(len(splits.train), 256, 1, 1)
    before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    training.train_epochs(cfg, model, view.dataset, view.collate, view.forward, cpu, plan=plan, noise_multiplier=1.0,
                          accountant=AccountantState(), proximal_mu=0.0, criterion=view.criterion)
    wall, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
    user, kernel = after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime
    return {"step": wall / plan.steps_per_round, "kernel_share": kernel / (user + kernel)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--variant", choices=sorted(VARIANTS), help=argparse.SUPPRESS)  # a measuring subprocess
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(measure(args.variant, args.steps)))
        return
    runs: dict[str, list[dict[str, float]]] = {v: [] for v in VARIANTS}
    for _ in range(args.repeat):
        for variant in VARIANTS:
            done = subprocess.run([sys.executable, __file__, "--variant", variant, "--steps", str(args.steps)],
                                  capture_output=True, text=True, check=True)
            runs[variant].append(json.loads(done.stdout.splitlines()[-1]))
    base = statistics.median(r["step"] for r in runs["default"])
    lines = [f"The main job's DP-SGD step (MiniLM, batch 256 ICD-10-CM texts over cached prefixes, Opacus hooks, one "
             f"thread), {args.steps} steps per subprocess, variants alternating over {args.repeat} rounds; median; "
             "`python scripts/bench_allocator.py`.", "",
             "| allocator | DP step (s) | vs glibc's defaults | CPU time in the kernel |", "|---|---|---|---|"]
    for variant, label in VARIANTS.items():
        step = statistics.median(r["step"] for r in runs[variant])
        kernel = statistics.median(r["kernel_share"] for r in runs[variant])
        lines.append(f"| {label} | {step:.3f} | {step / base:.2f}x | {100 * kernel:.0f}% |")
    markdown = "\n".join(lines)
    print(markdown)
    path = write_section(markdown, "<!-- allocator:begin -->", "<!-- allocator:end -->",
                         "Allocator: a step's large buffers kept between steps")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
