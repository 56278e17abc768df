"""The critical batch size measured by branching, and every GNS variant against it.

The method of Merrill et al. 2025 ("Critical Batch Size Revisited", arXiv 2505.23971), at the main job's size: a
run at the small batch ``B0`` (the *trunk*) is stopped at several points of training; from each point the run is
continued at batch sizes ``B0 … 16·B0`` (the *branches*) over the same next ``--window`` of training examples, and
the critical batch size (CBS) at that point is the largest batch whose held-out loss at the window's end is within
``--tolerance`` nats of the trunk's (which is the ``B0`` branch):

    penalty(B) = L_B(window end) − L_B0(window end)
    CBS        = the batch at which penalty first exceeds the tolerance, interpolated linearly in log B between
                 the last batch of the sweep within it and the first beyond it (``> max`` when every batch is
                 within it; only batches up to the first failing one count)

How everything is set, and why:

* **Model, data, optimizer**: the main job's (``examples/pretrain_clm.py``): its LLaMA (hidden 128, 4 layers, tied
  embeddings) or a GPT-2 of the same width and depth (``--settings gpt2``, LayerNorm with biases and learned
  positions), ``patch_model``, the Python standard library's source in blocks of 128 tokens under a byte-level BPE
  of 2,048, Stable-SPAM made by the Trainer itself (``Trainer.create_optimizer`` with ``optim="stable_spam"``, lr
  2e-3), gradients clipped to norm 1 as the Trainer does, one epoch.
* **Learning rate**: the main job's cosine schedule with 5% warm-up, defined over training examples (the schedule of
  the fixed batch ``B0`` at the examples consumed, as ``GNSCallback`` drives it), times (B / B0)^0.5: square-root
  scaling, the package's ``lr_batch_power=0.5``.
* **Branches** start from a copy of the trunk's parameters and optimizer state (moments and Stable-SPAM's counters
  included: the large-batch branches inherit the small batch's second moments, which matters most to the branches
  of few steps, e.g. 5 steps at 16·B0), and see the same examples in the same order as the trunk.
* **Window**: ``--window`` of the epoch (default 20%): shorter windows credit a large batch with a brief, annealing-
  like drop that does not last (``../shared/reference/critical_batch.md``).
* **Held-out loss**: the mean token cross-entropy over the first ``--eval_examples`` validation blocks, the same
  blocks for every branch (the noise of the set is shared, so the penalties are paired).

The GNS variants, from per-example gradients of every parameter, one example at a time (``loss.backward()`` on each
example alone; independent of the package's norm kernels):

* **trunk EMAs**: at every trunk step, each parameter group's (1/B)Σ‖g_e‖² and ‖mean g_e‖², combined into the
  signals below and fed to the package's estimator (``GradientNoiseScale``) with each ``--ema_decays``; its GNS at
  the step that reaches each point;
* **snapshot**: at each point, B_simple = tr Σ / |G|² from ``--snapshot_examples`` per-example gradients at once
  (the window's first examples; no smoothing, no lag).

Signals: ``norms`` (every patched norm: the package's ``gns``), ``block``, ``final`` (``gns/block``,
``gns/final``, :mod:`hf_gns_spam.gns.groups`), ``whole`` (every parameter) and ``whole_no_emb`` (without the
``nn.Embedding`` weights and the output embeddings: nanoGNS leaves tied embeddings out).

Each variant against the CBS: the ratio GNS/CBS at every point and seed, its median, and the standard deviation of
log(ratio) (a constant multiple of the CBS would give 0). Controls that would give a similar spread if the GNS
carried no information about the CBS: a constant (the spread of log CBS itself) and the linear schedule's shape
(CBS ∝ the fraction of training done, the ``schedule="linear"`` ramp: a shared upward trend alone).

    python benchmarks/critical_batch.py --settings llama --seeds 0          # one trunk and its branches
    python benchmarks/critical_batch.py --settings llama gpt2 --seeds 0 1   # all (cached runs are reused)
    python benchmarks/critical_batch.py --analyse_only                      # tables and figure from the cache

Each (setting, seed) is cached in ``OUTPUT_DIR/runs/SETTING_seedS.json`` (``--rerun`` retrains); ``results.json``
and ``critical_batch.png`` are written to ``--output_dir``.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import datasets
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments, set_seed
from transformers.optimization import get_cosine_schedule_with_warmup
from transformers.utils import logging as hf_logging

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import pretrain_clm as clm  # noqa: E402
from run_cache import RunCache  # noqa: E402

from hf_gns_spam import patch_model  # noqa: E402
from hf_gns_spam.gns.estimator import GradientNoiseScale, unbiased_estimates  # noqa: E402
from hf_gns_spam.gns.groups import norm_groups  # noqa: E402
from hf_gns_spam.gns.whole_model import embedding_parameters  # noqa: E402

datasets.disable_progress_bars()
hf_logging.set_verbosity_error()

SETTINGS = ("llama", "gpt2")
# parameter groups of the per-example gradients; each signal is a union of them
PARTS = ("norm_block", "norm_final", "norm_other", "embeddings", "rest")
SIGNALS: dict[str, tuple[str, ...]] = {
    "norms": ("norm_block", "norm_final", "norm_other"),
    "block": ("norm_block",),
    "final": ("norm_final",),
    "whole": PARTS,
    "whole_no_emb": ("norm_block", "norm_final", "norm_other", "rest"),
}
LEARNING_RATE = 2e-3
WARMUP_RATIO = 0.05
MAX_GRAD_NORM = 1.0
LR_BATCH_POWER = 0.5


# ------------------------------------------------------------------------------------------------ setting
def build_model(setting: str, tokenizer, block_size: int) -> nn.Module:
    """The main job's LLaMA, or a GPT-2 of the same width and depth (no dropout), patched."""
    if setting == "llama":
        model = clm.build_model(clm.ModelArguments(), tokenizer, block_size)
    else:
        defaults = clm.ModelArguments()
        config = GPT2Config(
            vocab_size=len(tokenizer),
            n_embd=defaults.hidden_size,
            n_layer=defaults.num_hidden_layers,
            n_head=defaults.num_attention_heads,
            n_positions=block_size,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        model = GPT2LMHeadModel(config)
    patch_model(model)
    return model


def parameter_parts(model: nn.Module) -> dict[str, str]:
    """The part (:data:`PARTS`) of every trainable parameter, by name (a tied parameter once)."""
    groups = norm_groups(model)
    embedding_ids = {id(p) for p in embedding_parameters(model)}  # the rule of gns_total_no_embeddings
    parts = {}
    for name, parameter in model.named_parameters():  # named_parameters() yields a tied parameter once
        module_name = name.rpartition(".")[0]
        if module_name in groups:
            parts[name] = f"norm_{groups[module_name]}"
        elif id(parameter) in embedding_ids:
            parts[name] = "embeddings"
        else:
            parts[name] = "rest"
    return parts


def make_optimizer(model: nn.Module, output_dir: str) -> torch.optim.Optimizer:
    """Stable-SPAM exactly as the Trainer makes it for the main job (optim="stable_spam", its parameter groups)."""
    args = TrainingArguments(
        output_dir=output_dir, optim="stable_spam", learning_rate=LEARNING_RATE, report_to="none", use_cpu=True
    )
    return Trainer(model=model, args=args).create_optimizer()


class LearningRate:
    """The main job's schedule in examples: the cosine-with-warm-up of the fixed batch B0 at the examples consumed,
    times (B / B0)^LR_BATCH_POWER."""

    def __init__(self, train_examples: int, base_batch: int):
        steps = math.ceil(train_examples / base_batch)
        dummy = torch.optim.SGD([torch.zeros(1)], lr=1.0)
        self.factor = get_cosine_schedule_with_warmup(dummy, math.ceil(WARMUP_RATIO * steps), steps).lr_lambdas[0]
        self.base_batch = base_batch

    def __call__(self, examples_before: int, batch: int) -> float:
        position = examples_before / self.base_batch
        return LEARNING_RATE * self.factor(position) * (batch / self.base_batch) ** LR_BATCH_POWER


def optimizer_step(model: nn.Module, optimizer, lr: float) -> None:
    torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


@torch.no_grad()
def held_out_loss(model: nn.Module, blocks: torch.Tensor, batch: int = 64) -> float:
    """Mean token cross-entropy over ``blocks`` (all of one length, so the mean of the blocks' means)."""
    total = 0.0
    for start in range(0, len(blocks), batch):
        chunk = blocks[start : start + batch]
        total += model(input_ids=chunk, labels=chunk).loss.item() * len(chunk)
    return total / len(blocks)


def per_example_sums(model: nn.Module, parts: dict[str, str], examples: torch.Tensor) -> tuple[dict, dict, float]:
    """For each part: small = (1/B)Σ_e‖g_e‖² and big = ‖(1/B)Σ_e g_e‖² from one backward per example; leaves the
    mean gradient in the parameters' ``.grad`` (the gradient of the batch's mean loss). Returns (small, big, loss)."""
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    total = {name: torch.zeros_like(p) for name, p in named}
    small = dict.fromkeys(PARTS, 0.0)
    loss_sum = 0.0
    for e in range(len(examples)):
        model.zero_grad(set_to_none=True)
        row = examples[e : e + 1]
        loss = model(input_ids=row, labels=row).loss
        loss.backward()
        loss_sum += loss.item()
        for name, p in named:
            small[parts[name]] += p.grad.double().pow(2).sum().item()
            total[name] += p.grad
    batch = len(examples)
    big = dict.fromkeys(PARTS, 0.0)
    for name, p in named:
        p.grad = total[name] / batch
        big[parts[name]] += p.grad.double().pow(2).sum().item()
    return {k: v / batch for k, v in small.items()}, big, loss_sum / batch


def signal_sums(per_part: dict[str, float], signal: str) -> float:
    return sum(per_part[part] for part in SIGNALS[signal])


def snapshot_gns(model: nn.Module, parts: dict[str, str], examples: torch.Tensor) -> dict[str, dict]:
    """B_simple = tr Σ / |G|² of each signal from the per-example gradients of ``examples`` (the parameters are
    not changed; their ``.grad`` is cleared)."""
    small, big, _ = per_example_sums(model, parts, examples)
    model.zero_grad(set_to_none=True)
    out = {}
    for signal in SIGNALS:
        grad_sq, trace = unbiased_estimates(signal_sums(small, signal), signal_sums(big, signal), len(examples))
        out[signal] = {"gns": trace / grad_sq if grad_sq > 0 else math.inf, "grad_sq": grad_sq, "trace": trace}
    return out


# ------------------------------------------------------------------------------------------------ one trunk
def branch(model, optimizer, data: torch.Tensor, start: int, window: int, batch: int, lr: LearningRate, tmp: str):
    """Continue a copy of (model, optimizer) at ``batch`` over data[start:start + window]; the copy."""
    model = copy.deepcopy(model)
    twin = make_optimizer(model, tmp)
    twin.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    model.train()
    for first in range(start, start + window, batch):
        chunk = data[first : first + batch]
        model(input_ids=chunk, labels=chunk).loss.backward()
        optimizer_step(model, twin, lr(first, batch))
    return model


def train_trunk(setting: str, seed: int, args, tokenizer, lm_data) -> dict:
    """The B0 trunk with per-example statistics at every step, and its branches at every point."""
    torch.set_num_threads(args.threads)
    set_seed(seed)
    model = build_model(setting, tokenizer, args.block_size)
    parts = parameter_parts(model)
    train = torch.tensor(lm_data["train"]["input_ids"])
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    base = args.base_batch
    examples = len(train) // base * base
    data = train[order[:examples]]
    held_out = torch.tensor(lm_data["validation"]["input_ids"][: args.eval_examples])
    lr = LearningRate(len(train), base)
    largest = base * args.max_multiple
    window = max(largest, round(args.window * examples / largest) * largest)
    starts = [round(p * examples / base) * base for p in args.points]
    if starts[-1] + window > examples:
        raise SystemExit(
            f"--points: the last point's window ends after the epoch ({starts[-1]} + {window} > {examples})"
        )
    batches = [base * 2**k for k in range(int(math.log2(args.max_multiple)) + 1)]
    ends = {s + window for s in starts}
    tmp = tempfile.mkdtemp(prefix="critical_batch_")
    optimizer = make_optimizer(model, tmp)
    steps, points, trunk_losses = [], [], {}
    began = time.time()
    for first in range(0, examples, base):
        if first in ends:
            trunk_losses[first] = held_out_loss(model, held_out)
        if first in starts:
            point = {"examples": first, "fraction": first / examples, "loss": held_out_loss(model, held_out)}
            point["snapshot"] = snapshot_gns(model, parts, data[first : first + args.snapshot_examples])
            point["penalty"] = {}
            point["branch_loss"] = {}
            for batch in batches[1:]:
                done = branch(model, optimizer, data, first, window, batch, lr, tmp)
                point["branch_loss"][batch] = held_out_loss(done, held_out)
            points.append(point)
            print(
                f"  {setting} seed {seed}: point {first}/{examples} done "
                f"({time.time() - began:.0f} s, loss {point['loss']:.3f})",
                flush=True,
            )
        model.train()
        small, big, loss = per_example_sums(model, parts, data[first : first + base])
        step_lr = lr(first, base)
        optimizer_step(model, optimizer, step_lr)
        steps.append({"examples": first, "lr": step_lr, "loss": loss, "small": small, "big": big})
    trunk_losses[examples] = held_out_loss(model, held_out)
    for point in points:
        trunk = trunk_losses[point["examples"] + window]
        point["branch_loss"][base] = trunk
        point["penalty"] = {b: point["branch_loss"][b] - trunk for b in batches}
    return {
        "setting": setting,
        "seed": seed,
        "examples": examples,
        "window": window,
        "batches": batches,
        "points": points,
        "steps": steps,
        "final_loss": trunk_losses[examples],
        "parameters": sum(p.numel() for p in model.parameters()),
        "seconds": time.time() - began,
    }


# ------------------------------------------------------------------------------------------------ analysis
def critical_batch(penalty: dict[int, float], batches: list[int], tolerance: float) -> tuple[float, bool]:
    """(CBS, censored): where the penalty first exceeds ``tolerance``, interpolated in log batch; censored=True when
    every batch of the sweep is within it (the CBS is then at least the largest)."""
    for lower, upper in itertools.pairwise(batches):
        if penalty[upper] > tolerance:
            p0, p1 = penalty[lower], penalty[upper]
            share = (tolerance - p0) / (p1 - p0) if p1 > p0 else 0.0
            share = min(max(share, 0.0), 1.0)
            return math.exp(math.log(lower) + share * (math.log(upper) - math.log(lower))), False
    return float(batches[-1]), True


def trunk_emas(run: dict, decay: float) -> dict[str, list[float]]:
    """Each signal's EMA GNS after every trunk step (the package's estimator, equal weights: B_eff = B0)."""
    base = run["batches"][0]
    out = {}
    for signal in SIGNALS:
        estimator = GradientNoiseScale(ema_decay=decay)
        series = []
        for step in run["steps"]:
            estimator.update(signal_sums(step["small"], signal), signal_sums(step["big"], signal), base)
            series.append(estimator.gns)
        out[signal] = series
    return out


def variants_at_points(run: dict, decays: list[float]) -> dict[str, list[float]]:
    """GNS of every variant at every point of ``run`` (the EMA after the last step before the point)."""
    base = run["batches"][0]
    out: dict[str, list[float]] = {}
    for decay in decays:
        series = trunk_emas(run, decay)
        for signal in SIGNALS:
            out[f"{signal} ema{decay}"] = [series[signal][p["examples"] // base - 1] for p in run["points"]]
    for signal in SIGNALS:
        out[f"{signal} snapshot"] = [p["snapshot"][signal]["gns"] for p in run["points"]]
    return out


def log_spread(ratios: list[float]) -> tuple[float, float]:
    """(median ratio, sd of log ratio) over the finite positive ratios; nan when fewer than 2."""
    usable = [r for r in ratios if math.isfinite(r) and r > 0]
    if len(usable) < 2:
        return math.nan, math.nan
    return statistics.median(usable), statistics.stdev(math.log(r) for r in usable)


def analyse(runs: list[dict], tolerances: list[float], decays: list[float]) -> tuple[dict, str]:
    lines, results = [], {"fractions": {}, "cbs": {}, "variants": {}}
    for setting in sorted({r["setting"] for r in runs}):
        mine = [r for r in runs if r["setting"] == setting]
        batches = mine[0]["batches"]
        lines.append(
            f"\n## {setting}: {mine[0]['parameters'] / 1e6:.2f}M parameters, {mine[0]['examples']} examples, window "
            f"{mine[0]['window']} examples, seeds {[r['seed'] for r in mine]}"
        )
        lines.append("\npenalty (nats) of each batch at the window's end, mean over seeds (min..max)")
        lines.append("| point | " + " | ".join(f"B={b}" for b in batches[1:]) + " |")
        lines.append("|---|" + "---|" * (len(batches) - 1))
        for i, point in enumerate(mine[0]["points"]):
            cells = []
            for b in batches[1:]:
                values = [r["points"][i]["penalty"][str(b)] for r in mine]
                cells.append(f"{statistics.mean(values):+.4f} ({min(values):+.3f}..{max(values):+.3f})")
            lines.append(f"| {point['fraction']:.0%} | " + " | ".join(cells) + " |")
        cbs_by_tol = {}
        for tol in tolerances:
            per_run = []
            for r in mine:
                per_run.append(
                    [critical_batch({b: p["penalty"][str(b)] for b in batches}, batches, tol) for p in r["points"]]
                )
            cbs_by_tol[tol] = per_run
        lines.append("\nCBS (examples) at each point, per seed; '>' = every batch of the sweep was within tolerance")
        lines.append("| point | " + " | ".join(f"tol {t}" for t in tolerances) + " |")
        lines.append("|---|" + "---|" * len(tolerances))
        for i, point in enumerate(mine[0]["points"]):
            cells = [" / ".join(f"{'>' if c[i][1] else ''}{c[i][0]:.0f}" for c in cbs_by_tol[t]) for t in tolerances]
            lines.append(f"| {point['fraction']:.0%} | " + " | ".join(cells) + " |")
        results["fractions"][setting] = [p["fraction"] for p in mine[0]["points"]]
        results["cbs"][setting] = {str(t): [[c for c, _ in per] for per in cbs_by_tol[t]] for t in tolerances}
        # every variant against the CBS at each tolerance
        values = [variants_at_points(r, decays) for r in mine]
        fractions = [p["fraction"] for p in mine[0]["points"]]
        for tol in tolerances:
            cbs = [[c for c, _ in per] for per in cbs_by_tol[tol]]
            flat_cbs = [c for per in cbs for c in per]
            lines.append(f"\nGNS variants against the CBS at tolerance {tol} nats (all points and seeds)")
            lines.append("| variant | GNS at the points (seed 1st) | median GNS/CBS | sd log(GNS/CBS) |")
            lines.append("|---|---|---|---|")
            rows = {}
            for name in values[0]:
                ratios = [v[name][i] / cbs[k][i] for k, v in enumerate(values) for i in range(len(fractions))]
                median, spread = log_spread(ratios)
                rows[name] = {"median_ratio": median, "sd_log_ratio": spread, "gns": [v[name] for v in values]}
                shown = " ".join(f"{g:.0f}" if math.isfinite(g) else str(g) for g in values[0][name])
                lines.append(f"| {name} | {shown} | {median:.2f} | {spread:.2f} |")
            _, constant = log_spread(flat_cbs)
            trend = [fractions[i] / cbs[k][i] for k in range(len(cbs)) for i in range(len(fractions))]
            _, linear = log_spread(trend)
            rows["control: constant"] = {"sd_log_ratio": constant}
            rows["control: linear in training"] = {"sd_log_ratio": linear}
            lines.append(f"| control: a constant | | | {constant:.2f} |")
            lines.append(f"| control: ∝ fraction of training (linear ramp) | | | {linear:.2f} |")
            results["variants"].setdefault(setting, {})[str(tol)] = rows
    return results, "\n".join(lines)


def plot(runs: list[dict], tolerance: float, decay: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    settings = sorted({r["setting"] for r in runs})
    fig, axes = plt.subplots(1, len(settings), figsize=(6 * len(settings), 4.5), squeeze=False)
    colours = {"norms": "C0", "block": "C1", "final": "C2", "whole": "C3", "whole_no_emb": "C4"}  # snapshots left out
    for ax, setting in zip(axes[0], settings, strict=True):
        for k, run in enumerate(r for r in runs if r["setting"] == setting):
            batches = run["batches"]
            fractions = [p["fraction"] for p in run["points"]]
            cbs = [
                critical_batch({b: p["penalty"][str(b)] for b in batches}, batches, tolerance) for p in run["points"]
            ]
            ax.plot(
                fractions,
                [c for c, _ in cbs],
                "k-o",
                lw=2,
                label=f"measured CBS ({tolerance} nats)" if k == 0 else None,
            )
            for i, (c, censored) in enumerate(cbs):
                if censored:
                    ax.annotate("≥", (fractions[i], c), textcoords="offset points", xytext=(4, 4))
            emas = variants_at_points(run, [decay])
            for signal, colour in colours.items():
                ax.plot(
                    fractions,
                    emas[f"{signal} ema{decay}"],
                    "-",
                    color=colour,
                    alpha=0.8,
                    label=f"{signal} (EMA {decay})" if k == 0 else None,
                )
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(
            matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}" if f"{v:g}"[0] in "235" else "")
        )
        ax.set_xlabel("fraction of the epoch at the branch point")
        ax.set_ylabel("examples")
        ax.set_title(f"{setting}: CBS (black), GNS (EMA {decay}); a line per seed", fontsize=10)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", nargs="+", choices=SETTINGS, default=list(SETTINGS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--points", nargs="+", type=float, default=[0.1, 0.24, 0.38, 0.52, 0.66, 0.8])
    parser.add_argument("--window", type=float, default=0.2, help="fraction of the epoch each branch trains")
    parser.add_argument("--base_batch", type=int, default=8, help="B0: the trunk's batch (the main job's)")
    parser.add_argument("--max_multiple", type=int, default=16, help="largest branch batch / B0 (a power of 2)")
    parser.add_argument("--tolerances", nargs="+", type=float, default=[0.005, 0.01, 0.02])
    parser.add_argument("--ema_decays", nargs="+", type=float, default=[0.95, 0.98, 0.99])
    parser.add_argument("--eval_examples", type=int, default=512)
    parser.add_argument("--snapshot_examples", type=int, default=256)
    parser.add_argument("--block_size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of this process")
    parser.add_argument("--output_dir", default="runs/critical_batch")
    parser.add_argument("--rerun", action="store_true")
    parser.add_argument("--analyse_only", action="store_true", help="tables and figure from the cached runs")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    output = Path(args.output_dir)
    config = {
        k: getattr(args, k)
        for k in ("points", "window", "base_batch", "max_multiple", "eval_examples", "snapshot_examples", "block_size")
    }
    cache = RunCache(output / "runs", config, rerun=args.rerun)
    runs = []
    tokenizer = lm_data = None
    for setting in args.settings:
        for seed in args.seeds:
            run = cache.get(setting, seed)
            if run is None and not args.analyse_only:
                if tokenizer is None:
                    tokenizer, lm_data = clm.prepare_data(
                        clm.ModelArguments(), clm.DataArguments(block_size=args.block_size)
                    )
                print(f"training {setting} seed {seed}", flush=True)
                run = train_trunk(setting, seed, args, tokenizer, lm_data)
                cache.put(setting, seed, run)
                run = cache.get(setting, seed)  # as stored (JSON keys are strings)
            if run is not None:
                runs.append(run)
    if not runs:
        raise SystemExit("no runs: train some first (without --analyse_only)")
    results, table = analyse(runs, args.tolerances, args.ema_decays)
    print(table)
    (output / "results.json").write_text(json.dumps(results, indent=1, allow_nan=True))
    plot(
        runs,
        0.01 if 0.01 in args.tolerances else args.tolerances[0],
        args.ema_decays[-1],
        output / "critical_batch.png",
    )
    print(f"\nwrote {output / 'results.json'} and {output / 'critical_batch.png'}")
    return results


if __name__ == "__main__":
    main()
