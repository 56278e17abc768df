"""How well the normalization layers' GNS follows the whole model's, over a real pretraining run, with a control.

Trains two model families on the main job's corpus (the Python standard library's source, byte-level BPE, blocks
of ``--block_size`` tokens; the data helpers of ``examples/pretrain_clm.py``): a tiny LLaMA (RMSNorm, tied
embeddings) and a tiny GPT-2 (LayerNorm, tied embeddings, learned position embeddings), each built from a config
and patched with ``patch_model``, once per seed of ``--seeds`` (the seed sets the initialisation and the data order),
with ``GNSCallback(validate_every=N)``. Every N-th optimizer step it reads

* the signals, the norms' smoothed GNS as the callback logs them: ``gns`` (every patched norm) and each norm
  group's ``gns/block``, ``gns/final``, ``gns/other`` (the groups the model has);
* the truths, the whole model's smoothed GNS from per-example gradients of every trainable parameter:
  ``gns_total``, and ``gns_total_no_embeddings`` (without the token/position embeddings and the LM head, as the
  reference code nanoGNS counts it);

and, for each family × signal × truth, over the validation steps after the first ``--burn_in`` of the run (default
10%: the start, where the norms' GNS first falls by an order of magnitude, is a transient of its own) at which both
are finite and positive, reports

* the median ratio signal / truth, and the interquartile range of the ratio;
* **sd(log ratio)**, the standard deviation of log(signal / truth): the headline measure. A signal that is a fixed
  multiple of the truth has 0, whatever the multiple; a batch schedule that follows the signal with a calibrated
  multiplier is off by a factor of about exp(sd);
* r(log), the Pearson correlation of log(signal) and log(truth), and beside it **the cross-run control**: the same r
  and sd(log ratio) with the signal of one run against the truth of another run of the same family (another seed),
  step by step. Both GNS rise over a run, so a high r comes from the shared trend alone: r is evidence of tracking
  only as far as it exceeds the control's, and sd(log ratio) only as far as it is below the control's.

Each statistic is computed per run and averaged over the seeds (the control over every ordered pair of different
seeds); the per-run values are in the JSON. The whole model's EMA is fed only the validation steps
(``ema_decay``^N per validation, the same horizon in steps), so it is noisier than the signals'.

Prints the table and writes the raw series of every run (each validation step's signals, truths and the whole
model's unsmoothed per-step estimates), the per-run and control statistics (``gns_fidelity.json``) and a figure of
the first seed's signals and truths against tokens (``gns_fidelity.png``) to ``--output_dir``.

    python benchmarks/gns_fidelity.py                         # both families, 2 seeds, CPU-sized
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
    TrainerCallback,
    TrainingArguments,
    set_seed,
)

from hf_gns_spam import GNSCallback, patch_model

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

import pretrain_clm as clm  # noqa: E402

FAMILIES = ("llama", "gpt2")
SIGNALS = ("gns", "gns/block", "gns/final", "gns/other")  # the norms' estimates, those the model has
TRUTHS = ("gns_total", "gns_total_no_embeddings")  # the whole model's, from per-example gradients


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
        "--burn_in", type=float, default=0.1, help="fraction of the run's steps left out of every statistic"
    )
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=[0, 1], help="one run per seed and family (2+: the cross-run control)"
    )
    return parser.parse_args(argv)


def build_model(family: str, args: argparse.Namespace, tokenizer, seed: int) -> torch.nn.Module:
    """A new model of ``family`` from a config, in the manner of examples/pretrain_clm.py (no dropout)."""
    torch.manual_seed(seed)
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


def usable(value: float | None) -> bool:
    return value is not None and math.isfinite(value) and value > 0


def agreement(signal: dict[int, float], truth: dict[int, float], steps: list[int]) -> dict:
    """Signal against truth at ``steps`` (those where both are finite and positive): n, the median ratio and its
    interquartile range, sd(log ratio) and r(log)."""
    pairs = [(signal[k], truth[k]) for k in steps if usable(signal.get(k)) and usable(truth.get(k))]
    if not pairs:
        return {"n": 0, "ratio_median": math.nan, "ratio_p25": math.nan, "ratio_p75": math.nan,
                "sd_log_ratio": math.nan, "r_log": math.nan}  # fmt: skip
    ratios = [a / b for a, b in pairs]
    log_ratios = [math.log(r) for r in ratios]
    return {
        "n": len(pairs),
        "ratio_median": statistics.median(ratios),
        "ratio_p25": quantile(ratios, 0.25),
        "ratio_p75": quantile(ratios, 0.75),
        "sd_log_ratio": statistics.stdev(log_ratios) if len(pairs) > 1 else math.nan,
        "r_log": pearson([math.log(a) for a, _ in pairs], [math.log(b) for _, b in pairs]),
    }


def mean(values: list[float]) -> float:
    """The mean of the finite values (nan if none)."""
    finite = [v for v in values if math.isfinite(v)]
    return statistics.fmean(finite) if finite else math.nan


class ValidationRecorder(TrainerCallback):
    """Every validation step's smoothed estimates as the GNSCallback has them after the step: the norms' (all and
    per group) and the whole model's (with and without embeddings), with their |G|² and tr Σ."""

    def __init__(self, callback: GNSCallback, every: int) -> None:
        self.callback, self.every = callback, every
        self.values: dict[int, dict[str, float]] = {}

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every == 0:
            metrics = {**self.callback.metrics(), **self.callback.estimates.total_metrics()}
            self.values[state.global_step] = {k: float(v) for k, v in metrics.items() if k.startswith("gns")}


def train_run(family: str, seed: int, args: argparse.Namespace, tokenizer, lm_data, output_dir: Path) -> dict:
    set_seed(seed)
    model = build_model(family, args, tokenizer, seed)
    report = patch_model(model)
    callback = GNSCallback(ema_decay=args.ema_decay, validate_every=args.validate_every)
    recorder = ValidationRecorder(callback, args.validate_every)
    training = TrainingArguments(
        output_dir=str(output_dir / f"{family}-{seed}"),
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
        seed=seed,
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=True,
    )
    trainer = clm.causal_lm_trainer(model, tokenizer, lm_data, training, [callback, recorder])
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    tokens_per_step = args.batch_size * args.block_size
    unsmoothed = ("small", "big", "effective_batch", "grad_sq", "trace_sigma", "small_no_embeddings",
                  "big_no_embeddings", "grad_sq_no_embeddings", "trace_sigma_no_embeddings")  # fmt: skip
    series = [
        {
            "step": h["step"],
            "tokens": h["step"] * tokens_per_step,
            **recorder.values.get(h["step"], {}),
            "total_step": {k: h[k] for k in unsmoothed},  # the whole model's per-step inputs and estimates
        }
        for h in callback.estimates.total_history
    ]
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    steps = trainer.state.global_step
    return {
        "family": family,
        "seed": seed,
        "norm": "RMSNorm" if family == "llama" else "LayerNorm",
        "parameters": sum(p.numel() for p in model.parameters()),
        "patched_norms": len(report.patched),
        "groups": list(callback.estimates.groups_present),
        "steps": steps,
        "burn_in_steps": args.burn_in * steps,
        "tokens_per_step": tokens_per_step,
        "seconds": seconds,
        "first_loss": losses[0] if losses else math.nan,
        "final_loss": losses[-1] if losses else math.nan,
        "validations": len(series),
        "series": series,
    }


def by_step(run: dict, key: str) -> dict[int, float]:
    return {s["step"]: s[key] for s in run["series"] if key in s}


def fidelity_rows(runs: list[dict]) -> list[dict]:
    """One row per family × signal × truth: the statistics of each run (signal and truth of the same run) and of
    the control (signal of one run, truth of another of the family), each list averaged in the row."""
    rows = []
    for family in dict.fromkeys(r["family"] for r in runs):
        family_runs = [r for r in runs if r["family"] == family]
        signals = [s for s in SIGNALS if s == "gns" or any(s.removeprefix("gns/") in r["groups"] for r in family_runs)]
        for signal in signals:
            for truth in TRUTHS:
                same, cross = [], []
                for a in family_runs:
                    steps = [s["step"] for s in a["series"] if s["step"] > a["burn_in_steps"]]
                    same.append({"seed": a["seed"], **agreement(by_step(a, signal), by_step(a, truth), steps)})
                    for b in family_runs:
                        if b is not a:
                            result = agreement(by_step(a, signal), by_step(b, truth), steps)
                            cross.append({"signal_seed": a["seed"], "truth_seed": b["seed"], **result})
                rows.append(
                    {
                        "family": family,
                        "signal": signal,
                        "truth": truth,
                        "n": mean([r["n"] for r in same]),
                        **{k: mean([r[k] for r in same]) for k in ("ratio_median", "ratio_p25", "ratio_p75")},
                        "sd_log_ratio": mean([r["sd_log_ratio"] for r in same]),
                        "r_log": mean([r["r_log"] for r in same]),
                        "cross_sd_log_ratio": mean([r["sd_log_ratio"] for r in cross]),
                        "cross_r_log": mean([r["r_log"] for r in cross]),
                        "runs": same,
                        "cross_runs": cross,
                    }
                )
    return rows


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first = [r for r in runs if r["seed"] == runs[0]["seed"]]
    figure, axes = plt.subplots(1, len(first), figsize=(6 * len(first), 4), squeeze=False)
    for axis, run in zip(axes[0], first, strict=True):
        for key in (*SIGNALS, *TRUTHS):
            points = [(s["tokens"], s[key]) for s in run["series"] if usable(s.get(key))]
            if points:
                style = "-" if key in TRUTHS else "--"
                axis.plot([p[0] for p in points], [p[1] for p in points], style, marker=".", label=key)
        axis.axvline(run["burn_in_steps"] * run["tokens_per_step"], color="grey", linewidth=0.8)
        axis.set_yscale("log")
        axis.set_xlabel("tokens")
        axis.set_ylabel("GNS (examples, EMA)")
        axis.set_title(f"{run['family']} ({run['norm']}), seed {run['seed']}; grey: end of burn-in")
        axis.legend(fontsize=7)
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
    runs = []
    with tempfile.TemporaryDirectory() as scratch:
        for family in args.families:
            for seed in args.seeds:
                runs.append(train_run(family, seed, args, tokenizer, lm_data, Path(scratch)))
    rows = fidelity_rows(runs)
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    (output_dir / "gns_fidelity.json").write_text(
        json.dumps({"arguments": vars(args), "commit": commit, "rows": rows, "runs": runs}, indent=2, allow_nan=True)
    )
    plot(runs, output_dir / "gns_fidelity.png")

    print(
        f"\n{args.max_steps} steps of {args.batch_size} x {args.block_size} tokens, {args.optim}, lr "
        f"{args.learning_rate:g} cosine, validate_every={args.validate_every}, ema_decay={args.ema_decay} "
        f"(whole model: {args.ema_decay}^{args.validate_every} per validation), seeds {args.seeds}, "
        f"torch {torch.__version__}, commit {commit}"
    )
    print(f"{'family':>6} {'seed':>4} {'norm':>9} {'params':>8} {'loss':>13} {'groups':>18} {'valid.':>6} {'s':>6}")
    for r in runs:
        print(
            f"{r['family']:>6} {r['seed']:>4} {r['norm']:>9} {r['parameters']:>8,} "
            f"{r['first_loss']:>6.2f}->{r['final_loss']:<5.2f} {','.join(r['groups']):>18} {r['validations']:>6} "
            f"{r['seconds']:>6.1f}"
        )
    print(
        f"\nAfter the first {args.burn_in:.0%} of each run; each value the mean over the {len(args.seeds)} seeds; "
        "cross: the signal of one run against the truth of another seed's run (the shared trend alone)."
    )
    print(
        f"{'family':>6} {'signal':>10} {'truth':>23} {'n':>4} {'median ratio':>12} {'ratio IQR':>15} "
        f"{'sd log ratio':>12} {'cross sd':>8} {'r(log)':>7} {'cross r':>7}"
    )
    for row in rows:
        print(
            f"{row['family']:>6} {row['signal']:>10} {row['truth']:>23} {row['n']:>4.0f} {row['ratio_median']:>12.3g} "
            f"{row['ratio_p25']:>7.3g}-{row['ratio_p75']:<7.3g} {row['sd_log_ratio']:>12.3f} "
            f"{row['cross_sd_log_ratio']:>8.3f} {row['r_log']:>7.3f} {row['cross_r_log']:>7.3f}"
        )
    print(f"\nfigure and series written to {output_dir}/gns_fidelity.png, gns_fidelity.json")
    return rows


if __name__ == "__main__":
    main()
