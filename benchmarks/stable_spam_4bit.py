"""Stable-SPAM against AdamW, in BF16 and with W4A4 fake quantization (INT4 quantization-aware training).

The Stable-SPAM paper trains LLaMA models with the weights and input activations of every attention and MLP
projection fake-quantized to INT4 (``hf_gns_spam.fake_quant``: weights asymmetric min-max in groups of 256,
activations symmetric absmax with the 2 largest magnitudes of each group kept, straight-through backward), and
reports INT4 Stable-SPAM below BF16 Adam's perplexity, with INT4 Adam worst. This script runs that comparison on the
main job's model and data (``examples/pretrain_clm.py``: a small LLaMA on the Python standard library's source,
``patch_model`` and a measuring ``GNSCallback`` in every run) with the real ``Trainer``:

    adamw_bf16        optim="adamw_torch" in BF16
    adamw_int4        the same, the projections fake-quantized to INT4
    stable_spam_bf16  optim="stable_spam" (γ1, γ2, γ3 = 0.7, 0.9, 0.999, ΔT = 1000: the paper's 4-bit settings)
    stable_spam_int4  the same, INT4

BF16 is ``--precision mixed`` (the default; what ``--bf16`` gives a Trainer user: autocast, float32 weights and
optimizer states) or ``--precision pure`` (the paper's: the model cast to bfloat16, so weights, gradients and
optimizer states are bfloat16 and every update is rounded to bfloat16).

Same seed (initialisation, data order), data, budget, learning rate and cosine schedule for all four; no gradient
clipping (``max_grad_norm=0``, as the paper's baselines). Reported: the final held-out loss and perplexity (mean
[min, max] over seeds), held-out loss at points evenly spaced in data, and loss spikes: optimizer steps whose
training loss exceeds the median of the previous ``--spike_window`` steps by more than ``--spike_threshold`` nats.

    python benchmarks/stable_spam_4bit.py --seeds 0 1 2 --output_dir runs/stable_spam_4bit

Finished runs are cached in ``OUTPUT_DIR/runs/NAME_seedS.json`` (``--rerun`` retrains them), so seeds can be run by
separate processes (``--seeds 0`` and ``--seeds 1 2`` side by side) and a last call with all seeds makes the tables
and ``stable_spam_4bit.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import datasets
import torch
from transformers import TrainingArguments, set_seed
from transformers.trainer_callback import PrinterCallback
from transformers.utils import logging as hf_logging

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

import pretrain_clm as clm  # noqa: E402
from run_cache import RunCache  # noqa: E402

from hf_gns_spam import GNSCallback, patch_model  # noqa: E402

datasets.disable_progress_bars()
hf_logging.set_verbosity_error()

OPTIMIZERS = {"adamw": "adamw_torch", "stable_spam": "stable_spam"}
PRECISIONS = ("bf16", "int4")
RUNS = [f"{optimizer}_{precision}" for optimizer in OPTIMIZERS for precision in PRECISIONS]


def count_spikes(losses: list[float], window: int, threshold: float) -> int:
    """Steps whose loss exceeds the median of the previous ``window`` losses by more than ``threshold``."""
    return sum(
        1
        for i in range(window, len(losses))
        if losses[i] > statistics.median(losses[i - window : i]) + threshold or not math.isfinite(losses[i])
    )


def train_one(name: str, seed: int, args, model_args: clm.ModelArguments, tokenizer, lm_data) -> dict:
    optimizer, precision = name.rsplit("_", 1)
    set_seed(seed)
    model = clm.build_model(model_args, tokenizer, args.block_size)
    quantized = clm.quantize_model(model, "none" if precision == "bf16" else precision, model_args.quantize_group_size)
    if args.precision == "pure":
        model.to(torch.bfloat16)
    patch_model(model)
    work = Path(args.output_dir) / "tmp" / f"{name}_seed{seed}"
    training = TrainingArguments(
        output_dir=str(work),
        optim=OPTIMIZERS[optimizer],
        learning_rate=args.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=0.05,
        max_steps=args.budget // args.batch_size,
        max_grad_norm=0.0,
        weight_decay=0.0,
        bf16=args.precision == "mixed",
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=64,
        logging_steps=1,
        eval_strategy="no",
        save_strategy="no",
        report_to="none",
        include_num_input_tokens_seen=True,
        disable_tqdm=True,
        seed=seed,
        use_cpu=not torch.cuda.is_available(),
    )
    callback = GNSCallback(ema_decay=0.95)  # measuring only; its examples count drives the evaluation points
    clock = clm.EvaluateAtExamples(clm.evaluation_points(lm_data, training, args.eval_points), callback)
    trainer = clm.causal_lm_trainer(model, tokenizer, lm_data, training, [callback, clock])
    trainer.remove_callback(PrinterCallback)  # disable_tqdm would print every log record
    started = time.time()
    trainer.train()
    elapsed = time.time() - started
    shutil.rmtree(work, ignore_errors=True)
    history = trainer.state.log_history
    losses = [r["loss"] for r in history if "loss" in r and "step" in r]
    evaluations = clm.evaluations(history)
    return {
        "name": name,
        "seed": seed,
        "quantized_layers": len(quantized),
        "train_losses": losses,
        "eval": evaluations,
        "final_eval_loss": evaluations[-1]["loss"],
        "spikes": count_spikes(losses, args.spike_window, args.spike_threshold),
        "optimizer_steps": trainer.state.global_step,
        "wall_s": elapsed,
    }


def summary(values: list[float]) -> str:
    return f"{statistics.fmean(values):.4f} [{min(values):.4f}, {max(values):.4f}]"


def analyse(results: dict[str, dict[int, dict]], seeds: list[int]) -> tuple[dict, str]:
    lines = [f"{'run':>18} {'final held-out loss':>26} {'perplexity':>24} {'spikes':>14} {'wall s':>8}"]
    out: dict = {"runs": {}}
    for name in RUNS:
        runs = [results[name][s] for s in seeds]
        finals = [r["final_eval_loss"] for r in runs]
        spikes = [r["spikes"] for r in runs]
        out["runs"][name] = {"final_eval_loss": finals, "spikes": spikes}
        low, mean, high = (math.exp(value) for value in (min(finals), statistics.fmean(finals), max(finals)))
        perplexity = f"{mean:.2f} [{low:.2f}, {high:.2f}]"
        lines.append(
            f"{name:>18} {summary(finals):>26} {perplexity:>24} "
            f"{f'{statistics.fmean(spikes):.1f} [{min(spikes)}, {max(spikes)}]':>14} "
            f"{statistics.fmean(r['wall_s'] for r in runs):>8.0f}"
        )

    def mean_final(name: str) -> float:
        return statistics.fmean(results[name][s]["final_eval_loss"] for s in seeds)

    def paired(a: str, b: str) -> str:
        differences = [results[a][s]["final_eval_loss"] - results[b][s]["final_eval_loss"] for s in seeds]
        return f"{statistics.fmean(differences):+.4f} [{min(differences):+.4f}, {max(differences):+.4f}]"

    checks = {
        "INT4 Stable-SPAM <= BF16 AdamW": mean_final("stable_spam_int4") <= mean_final("adamw_bf16"),
        "INT4 AdamW worse than BF16 AdamW": mean_final("adamw_int4") > mean_final("adamw_bf16"),
        "INT4 AdamW worse than INT4 Stable-SPAM": mean_final("adamw_int4") > mean_final("stable_spam_int4"),
    }
    out["targets"] = checks
    lines += [
        "",
        "paired differences of the final held-out loss (per seed: mean [min, max])",
        f"  stable_spam_int4 - adamw_bf16      {paired('stable_spam_int4', 'adamw_bf16')}",
        f"  adamw_int4       - adamw_bf16      {paired('adamw_int4', 'adamw_bf16')}",
        f"  adamw_int4       - stable_spam_int4 {paired('adamw_int4', 'stable_spam_int4')}",
        f"  stable_spam_bf16 - adamw_bf16      {paired('stable_spam_bf16', 'adamw_bf16')}",
        "",
        "targets (mean over seeds): " + "; ".join(f"{k}: {'holds' if v else 'FAILS'}" for k, v in checks.items()),
    ]
    return out, "\n".join(lines)


def plot(results: dict, seeds: list[int], block_size: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    figure, (train_axis, eval_axis) = plt.subplots(1, 2, figsize=(13, 4.8))
    styles = {"bf16": "-", "int4": "--"}
    colors = {"adamw": "tab:red", "stable_spam": "tab:blue"}
    for name in RUNS:
        optimizer, precision = name.rsplit("_", 1)
        style = {"color": colors[optimizer], "linestyle": styles[precision], "label": name}
        losses = np.array([results[name][s]["train_losses"] for s in seeds])
        kernel = np.ones(10) / 10
        smoothed = np.array([np.convolve(row, kernel, mode="valid") for row in losses])
        train_axis.plot(np.arange(smoothed.shape[1]) + 10, smoothed.mean(0), **style)
        evals = [results[name][s]["eval"] for s in seeds]
        tokens = np.array([e["tokens"] for e in evals[0]]) / 1e6
        eval_axis.plot(tokens, np.mean([[e["loss"] for e in run] for run in evals], 0), marker="o", ms=3, **style)
    train_axis.set(title="Training loss (10-step mean, mean over seeds)", xlabel="optimizer step", ylabel="nats")
    eval_axis.set(title="Held-out loss (mean over seeds)", xlabel="Mtokens", ylabel="nats")
    for axis in (train_axis, eval_axis):
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--runs", nargs="+", default=RUNS, choices=RUNS)
    parser.add_argument("--output_dir", default="runs/stable_spam_4bit")
    parser.add_argument("--rerun", action="store_true", help="retrain runs found in the cache")
    parser.add_argument("--budget", type=int, default=4480, help="training examples per run (blocks)")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--learning_rate", type=float, default=2e-3)
    parser.add_argument("--block_size", type=int, default=128)
    parser.add_argument("--eval_examples", type=int, default=128, help="held-out blocks (a fixed set)")
    parser.add_argument("--eval_points", type=int, default=8)
    parser.add_argument("--spike_window", type=int, default=20)
    parser.add_argument("--spike_threshold", type=float, default=0.5, help="nats above the window's median")
    parser.add_argument(
        "--precision", choices=("mixed", "pure"), default="mixed", help="BF16 autocast, or the model in bfloat16"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: fastest on a shared 2-core CPU)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    output = Path(args.output_dir)
    config = {k: v for k, v in vars(args).items() if k not in ("seeds", "runs", "rerun", "output_dir", "threads")}
    cache = RunCache(output / "runs", config, args.rerun)
    model_args = clm.ModelArguments()
    data_args = clm.DataArguments(block_size=args.block_size, max_eval_examples=args.eval_examples)
    tokenizer = lm_data = None
    results: dict[str, dict[int, dict]] = {}
    for name in args.runs:
        for seed in args.seeds:
            cached = cache.get(name, seed)
            if cached is not None:
                results.setdefault(name, {})[seed] = cached
                continue
            if lm_data is None:
                set_seed(0)
                tokenizer, lm_data = clm.prepare_data(model_args, data_args)
            run = train_one(name, seed, args, model_args, tokenizer, lm_data)
            cache.put(name, seed, run)
            results.setdefault(name, {})[seed] = run
            print(
                f"{name:>18} seed {seed}: final held-out loss {run['final_eval_loss']:.4f}, {run['spikes']} spikes, "
                f"{run['wall_s']:.0f} s",
                flush=True,
            )
    if sorted(args.runs) != sorted(RUNS):
        return {"results": results}
    analysis, table = analyse(results, args.seeds)
    print()
    print(table)
    figure = output / "stable_spam_4bit.png"
    plot(results, args.seeds, args.block_size, figure)
    document = {"config": config, "seeds": args.seeds, "analysis": analysis, "runs": results}
    (output / "results.json").write_text(json.dumps(document, indent=1, allow_nan=True))
    print(f"wrote {output / 'results.json'} and {figure}")
    return document


if __name__ == "__main__":
    main()
