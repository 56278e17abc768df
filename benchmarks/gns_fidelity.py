"""How well the normalization layers' GNS follows the whole model's, over a real pretraining run.

Trains two model families on the main job's corpus (the Python standard library's source, byte-level BPE, blocks
of ``--block_size`` tokens; the data helpers of ``examples/pretrain_clm.py``): a tiny LLaMA (RMSNorm) and a tiny
GPT-2 (LayerNorm), each built from a config and patched with ``patch_model``, with
``GNSCallback(validate_every=N)``: every optimizer step the norms' GNS (``gns``), every N-th step also the GNS of
all trainable parameters from their per-example gradients (``gns_total``). Over the validation steps at which both
smoothed estimates are finite and positive it reports

* the Pearson correlation of log(gns) and log(gns_total) (the EMA-smoothed values the callback logs),
* the ratio gns / gns_total: median, interquartile range, min and max,
* the same correlation and median ratio after the first ``--burn_in`` fraction of the steps (the start of a run,
  where the norms' GNS first falls by an order of magnitude, is a transient of its own),
* a control for the sampling: ``gns_total`` averages only the validation steps (ema_decay^N per validation), so
  it is noisier than ``gns``; ``r(log) sub`` correlates it with the norms' GNS smoothed the same way (an EMA fed
  the norms' small and big of the validation steps only, with the same decay),

prints a table and writes a figure of both against tokens (``gns_fidelity.png``) and the raw series
(``gns_fidelity.json``) to ``--output_dir``.

    python benchmarks/gns_fidelity.py                         # both families, CPU-sized (a few minutes, 2 cores)
    python benchmarks/gns_fidelity.py --families llama --max_steps 1000 --hidden_size 256 --num_hidden_layers 6
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    TrainingArguments,
    set_seed,
)

from hf_gns_spam import GNSCallback, patch_model
from hf_gns_spam.gns.estimator import GradientNoiseScale

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

import pretrain_clm as clm  # noqa: E402

FAMILIES = ("llama", "gpt2")


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", choices=FAMILIES, default=list(FAMILIES))
    parser.add_argument("--output_dir", default="runs/gns_fidelity")
    parser.add_argument("--max_corpus_bytes", type=int, default=1_000_000)
    parser.add_argument("--vocab_size", type=int, default=1024)
    parser.add_argument("--block_size", type=int, default=64)
    parser.add_argument("--hidden_size", type=int, default=64)
    parser.add_argument("--num_hidden_layers", type=int, default=2)
    parser.add_argument("--num_attention_heads", type=int, default=4)
    parser.add_argument("--batch_size", type=int, default=16, help="examples per optimizer step (one micro-batch)")
    parser.add_argument("--max_steps", type=int, default=300)
    parser.add_argument("--learning_rate", type=float, default=2e-3)
    parser.add_argument("--optim", default="adamw_torch", help="any TrainingArguments optim (stable_spam too)")
    parser.add_argument("--validate_every", type=int, default=5)
    parser.add_argument("--ema_decay", type=float, default=0.95, help="the main job's --gns_ema_decay")
    parser.add_argument(
        "--burn_in", type=float, default=0.2, help="fraction of the steps left out of the 'late' columns"
    )
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def build_model(family: str, args: argparse.Namespace, tokenizer) -> torch.nn.Module:
    """A new model of ``family`` from a config, in the manner of examples/pretrain_clm.py (no dropout)."""
    torch.manual_seed(args.seed)
    special = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    if family == "llama":
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=args.hidden_size,
            intermediate_size=args.hidden_size * 8 // 3,
            num_hidden_layers=args.num_hidden_layers,
            num_attention_heads=args.num_attention_heads,
            num_key_value_heads=args.num_attention_heads,
            max_position_embeddings=max(args.block_size, 128),
            tie_word_embeddings=True,
            **special,
        )
        return LlamaForCausalLM(config)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_embd=args.hidden_size,
        n_layer=args.num_hidden_layers,
        n_head=args.num_attention_heads,
        n_positions=max(args.block_size, 128),
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        **special,
    )
    return GPT2LMHeadModel(config)


def pearson(xs: list[float], ys: list[float]) -> float:
    if len(xs) < 3:
        return math.nan
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True))
    sxx = sum((x - mx) ** 2 for x in xs)
    syy = sum((y - my) ** 2 for y in ys)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else math.nan


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def train_family(family: str, args: argparse.Namespace, tokenizer, lm_data, output_dir: Path) -> dict:
    set_seed(args.seed)
    model = build_model(family, args, tokenizer)
    report = patch_model(model)
    callback = GNSCallback(ema_decay=args.ema_decay, validate_every=args.validate_every)
    training = TrainingArguments(
        output_dir=str(output_dir / family),
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=1,
        max_steps=args.max_steps,
        learning_rate=args.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=0.05,
        optim=args.optim,
        logging_steps=args.validate_every,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        seed=args.seed,
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=True,
    )
    trainer = clm.causal_lm_trainer(model, tokenizer, lm_data, training, [callback])
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    tokens_per_step = args.batch_size * args.block_size
    series = [
        {
            "step": h["step"],
            "tokens": h["step"] * tokens_per_step,
            "gns": h["gns"],
            "gns_total": h["gns_total"],
            "grad_sq": h["grad_sq"],
            "trace_sigma": h["trace_sigma"],
        }
        for h in callback.total_history
    ]
    # the norms' estimate sampled as the total's: only the validation steps, the same EMA per validation
    subsampled = GradientNoiseScale(ema_decay=args.ema_decay**args.validate_every)
    history = list(callback.history)  # one entry per optimizer step that gave an estimate
    for s in series:
        if len(history) == trainer.state.global_step:
            h = history[s["step"] - 1]
            subsampled.update(h["small"], h["big"], h["effective_batch"])
        s["gns_sub"] = subsampled.gns if subsampled.is_current else math.nan
    usable = [s for s in series if all(math.isfinite(s[k]) and s[k] > 0 for k in ("gns", "gns_total"))]
    usable_sub = [s for s in series if all(math.isfinite(s[k]) and s[k] > 0 for k in ("gns_sub", "gns_total"))]
    ratios = [s["gns"] / s["gns_total"] for s in usable]
    late = [s for s in usable if s["step"] > args.burn_in * args.max_steps]
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    parameters = sum(p.numel() for p in model.parameters())
    return {
        "family": family,
        "norm": "RMSNorm" if family == "llama" else "LayerNorm",
        "parameters": parameters,
        "patched_norms": len(report.patched),
        "steps": trainer.state.global_step,
        "seconds": seconds,
        "first_loss": losses[0] if losses else math.nan,
        "final_loss": losses[-1] if losses else math.nan,
        "validations": len(series),
        "usable": len(usable),
        "pearson_log": pearson([math.log(s["gns"]) for s in usable], [math.log(s["gns_total"]) for s in usable]),
        "ratio_median": statistics.median(ratios) if ratios else math.nan,
        "late_usable": len(late),
        "sub_pearson_log": pearson(
            [math.log(s["gns_sub"]) for s in usable_sub], [math.log(s["gns_total"]) for s in usable_sub]
        ),
        "late_pearson_log": pearson([math.log(s["gns"]) for s in late], [math.log(s["gns_total"]) for s in late]),
        "late_ratio_median": statistics.median(s["gns"] / s["gns_total"] for s in late) if late else math.nan,
        "ratio_p25": quantile(ratios, 0.25) if ratios else math.nan,
        "ratio_p75": quantile(ratios, 0.75) if ratios else math.nan,
        "ratio_min": min(ratios) if ratios else math.nan,
        "ratio_max": max(ratios) if ratios else math.nan,
        "final_gns": usable[-1]["gns"] if usable else math.nan,
        "final_gns_total": usable[-1]["gns_total"] if usable else math.nan,
        "series": series,
    }


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4), squeeze=False)
    for axis, result in zip(axes[0], results, strict=True):
        for key, label in (("gns", "norm layers (gns)"), ("gns_total", "all parameters (gns_total)")):
            points = [(s["tokens"], s[key]) for s in result["series"] if math.isfinite(s[key]) and s[key] > 0]
            axis.plot([p[0] for p in points], [p[1] for p in points], marker=".", label=label)
        axis.set_yscale("log")
        axis.set_xlabel("tokens")
        axis.set_ylabel("GNS (examples, EMA)")
        axis.set_title(
            f"{result['family']} ({result['norm']}), r(log) = {result['pearson_log']:.3f}, "
            f"median ratio {result['ratio_median']:.2f}"
        )
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_arguments(argv)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    data = clm.DataArguments(max_corpus_bytes=args.max_corpus_bytes, block_size=args.block_size)
    raw = clm.load_raw_datasets(data)
    tokenizer = clm.train_byte_level_tokenizer(raw["train"], data.text_column, args.vocab_size)
    lm_data = clm.tokenized_blocks(raw, tokenizer, data.text_column, args.block_size)
    print(f"corpus: {len(lm_data['train'])} training blocks of {args.block_size} tokens")
    results = []
    with tempfile.TemporaryDirectory() as scratch:
        for family in args.families:
            results.append(train_family(family, args, tokenizer, lm_data, Path(scratch)))
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    (output_dir / "gns_fidelity.json").write_text(
        json.dumps({"arguments": vars(args), "commit": commit, "results": results}, indent=2, allow_nan=True)
    )
    plot(results, output_dir / "gns_fidelity.png")

    print(
        f"\n{args.max_steps} steps of {args.batch_size} x {args.block_size} tokens, {args.optim}, lr "
        f"{args.learning_rate:g} cosine, validate_every={args.validate_every}, ema_decay={args.ema_decay} "
        f"(gns_total: {args.ema_decay}^{args.validate_every} per validation), torch {torch.__version__}, "
        f"commit {commit}; 'late': after the first {args.burn_in:.0%} of the steps"
    )
    header = (
        f"{'family':>8} {'norm':>9} {'params':>8} {'loss':>13} {'valid.':>7} {'r(log)':>7} "
        f"{'ratio median':>12} {'ratio IQR':>13} {'ratio min-max':>13} {'late r(log)':>11} {'late ratio':>10} "
        f"{'r(log) sub':>10} "
        f"{'final gns/total':>17} {'s':>6}"
    )
    print(header)
    for r in results:
        print(
            f"{r['family']:>8} {r['norm']:>9} {r['parameters']:>8,} "
            f"{r['first_loss']:>6.2f}->{r['final_loss']:<5.2f} {r['usable']:>3}/{r['validations']:<3} "
            f"{r['pearson_log']:>7.3f} {r['ratio_median']:>12.3f} "
            f"{r['ratio_p25']:>6.2f}-{r['ratio_p75']:<6.2f} {r['ratio_min']:>6.2f}-{r['ratio_max']:<6.2f} "
            f"{r['late_pearson_log']:>11.3f} {r['late_ratio_median']:>10.3f} {r['sub_pearson_log']:>10.3f} "
            f"{r['final_gns']:>8.1f}/{r['final_gns_total']:<8.1f} {r['seconds']:>6.1f}"
        )
    print(f"\nfigure and series written to {output_dir}/gns_fidelity.png, gns_fidelity.json")
    return results


if __name__ == "__main__":
    main()
