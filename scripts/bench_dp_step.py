"""DP-SGD step time and peak memory against plain training of the same LoRA model, measured in one run.

Each (model, mode) runs in its own subprocess so its peak RSS is its own. Ratios are against the plain step measured
in the same invocation. `opacus-noise` is hooks mode as Opacus's own PrivacyEngine runs it (noise from torch's
generator, 32 bits of seed): the baseline for the cost of the product's ChaCha20 noise (`hooks`).
Usage: `python scripts/bench_dp_step.py [--models tiny smollm2-135m] [--steps 6]`.
Writes the table into docs/benchmarks.md between the DP-step markers.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

MODES = ("plain", "opacus-noise", "hooks", "functorch", "ghost")
BEGIN, END = "<!-- dp-step:begin -->", "<!-- dp-step:end -->"


def measure(model_name: str, mode: str, batch: int, seq_len: int, steps: int, threads: int) -> dict[str, float]:
    import torch
    from opacus import PrivacyEngine

    from fl_core.config import compose_config, to_app_config
    from fl_core.entry import quiet_libraries
    from fl_core.model import build_model, load_tokenizer
    from privacy.dp_sgd import make_private
    from privacy.loss import SequenceClassificationLoss
    from privacy.secure_random import SecureRandom

    quiet_libraries()
    torch.set_num_threads(threads)
    cfg = to_app_config(compose_config([f"model={model_name}", "train.device=cpu"]))
    device = torch.device("cpu")
    tokenizer = load_tokenizer(cfg.model)
    model = build_model(cfg, tokenizer, 22, device)
    model.train()  # from_pretrained returns eval mode, where Opacus captures no activations
    g = torch.Generator().manual_seed(0)
    n = batch * (steps + 2)
    ids = torch.randint(5, len(tokenizer) - 1, (n, seq_len), generator=g)
    labels = torch.randint(0, 22, (n,), generator=g)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids, labels), batch_size=batch)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer: torch.optim.Optimizer = torch.optim.Adam(params, lr=1e-3)
    module: torch.nn.Module = model
    per_sequence_loss = SequenceClassificationLoss()
    criterion: Callable[..., torch.Tensor] = per_sequence_loss
    if mode == "opacus-noise":
        module, optimizer, loader = PrivacyEngine().make_private(
            module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0,
            poisson_sampling=False)
    elif mode != "plain":
        session = make_private(model, optimizer, per_sequence_loss, noise_multiplier=1.0, max_grad_norm=1.0,
                               expected_batch_size=batch, grad_sample_mode=mode, secure_random=SecureRandom())
        module, optimizer, criterion = session.module, session.optimizer, session.criterion  # type: ignore[assignment]
    times = []
    for i, (x, y) in enumerate(loader):
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = criterion(module(input_ids=x, attention_mask=torch.ones_like(x)).logits, y)
        loss.backward()
        optimizer.step()
        if i >= 2:  # first two steps warm up allocators and hooks
            times.append(time.perf_counter() - start)
    times.sort()
    return {"step_s": times[len(times) // 2], "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def run_all(models: list[str], batch: int, seq_len: int, steps: int, threads: int,
            repeat: int) -> list[dict[str, object]]:
    """Every mode `repeat` times, interleaved (plain, opacus-noise, hooks, ..., plain, ...), so that a swing of the
    machine's load falls on all modes alike; each mode's figure is the median of its runs' medians."""
    rows: list[dict[str, object]] = []
    for model_name in models:
        runs: dict[str, list[dict[str, float]]] = {mode: [] for mode in MODES}
        errors: dict[str, str] = {}
        for _ in range(repeat):
            for mode in MODES:
                proc = subprocess.run([sys.executable, __file__, "--one", model_name, mode, "--batch", str(batch),
                                       "--seq-len", str(seq_len), "--steps", str(steps), "--threads", str(threads)],
                                      capture_output=True, text=True)
                if proc.returncode != 0:
                    errors[mode] = proc.stderr.strip().splitlines()[-1]
                    continue
                runs[mode].append(json.loads(proc.stdout.strip().splitlines()[-1]))
                print(model_name, mode, runs[mode][-1], flush=True)
        for mode in MODES:
            if mode in errors:
                rows.append({"model": model_name, "mode": mode, "error": errors[mode]})
                continue
            steps_s = sorted(r["step_s"] for r in runs[mode])
            rows.append({"model": model_name, "mode": mode, "step_s": steps_s[len(steps_s) // 2],
                         "peak_rss_mb": max(r["peak_rss_mb"] for r in runs[mode]), "runs": len(steps_s)})
    return rows


def table(rows: list[dict[str, object]], batch: int, seq_len: int, threads: int) -> str:
    plain = {r["model"]: r["step_s"] for r in rows if r["mode"] == "plain" and "step_s" in r}
    opacus = {r["model"]: r["step_s"] for r in rows if r["mode"] == "opacus-noise" and "step_s" in r}
    lines = [f"Batch {batch} x {seq_len} tokens, classification, LoRA r=8, {threads} thread(s), median step "
             f"after 2 warm-up steps, then the median over {rows[0].get('runs', 1)} interleaved runs of every "
             "mode; peak RSS of a process that builds the model and trains. `opacus-noise`: "
             "Opacus's PrivacyEngine as it ships (torch generator noise); the other DP modes draw their noise "
             "from ChaCha20 (`privacy/secure_random.py`).", "",
             "| model | mode | step (s) | vs plain | vs opacus-noise | peak RSS (MB) |", "|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['mode']} | failed: {r['error']} | | | |")
            continue
        step = float(r["step_s"])  # type: ignore[arg-type]
        ratio = step / float(plain[r["model"]])  # type: ignore[arg-type]
        versus = f"{step / float(opacus[r['model']]):.2f}x" if r["mode"] != "plain" and r["model"] in opacus else ""  # type: ignore[arg-type]
        lines.append(f"| {r['model']} | {r['mode']} | {step:.3f} | {ratio:.2f}x | {versus} | "
                     f"{float(r['peak_rss_mb']):.0f} |")  # type: ignore[arg-type]
    return "\n".join(lines)


def write_section(markdown: str, begin: str = BEGIN, end: str = END,
                  heading: str = "DP-SGD step against plain training") -> Path:
    """Replace the block between `begin` and `end` in docs/benchmarks.md, or append it under `heading`."""
    path = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    block = f"{begin}\n{markdown}\n{end}"
    if begin in text:
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end):]
    else:
        text += f"\n## {heading}\n\n{block}\n"
    path.write_text(text)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "MODE"))
    parser.add_argument("--models", nargs="+", default=["tiny", "smollm2-135m"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--repeat", type=int, default=3, help="interleaved runs of every mode")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one[0], args.one[1], args.batch, args.seq_len, args.steps, args.threads)))
        return
    rows = run_all(args.models, args.batch, args.seq_len, args.steps, args.threads, args.repeat)
    print(f"wrote {write_section(table(rows, args.batch, args.seq_len, args.threads))}")


if __name__ == "__main__":
    main()
