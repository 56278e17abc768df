"""The frozen norms' GNS under LoRA and QLoRA against the GNS of the parameters actually trained (the adapters).

peft freezes the normalization layers; the package still measures them wherever the backward passes through them
(every norm but the first block's input norm, which reads the frozen embeddings' output), so ``GNSCallback`` logs
``gns``, ``gns/block`` and ``gns/final`` under LoRA and QLoRA. This benchmark asks how those relate to the truth
that matters for the batch size of a fine-tuning run: ``gns_total`` from ``GNSCallback(validate_every=N)``, the GNS
of ALL TRAINABLE parameters from their per-example gradients, i.e. of the LoRA adapters.

The base is the main job's pretrained tiny LLaMA (``--base``, default ``runs/pretrain_clm``: 4 layers, hidden 128,
RMSNorm, tied embeddings, 1.05M parameters, a byte-level BPE of 2048 tokens, pretrained by
``python examples/pretrain_clm.py`` on the first 2 MB of the Python standard library's top-level ``.py`` files).
Two settings, each once per seed of ``--seeds`` (the seed sets the LoRA initialisation and the data order):

* ``lora``: the float32 base, frozen, LoRA r=``--lora_rank`` on every linear layer (``target_modules="all-linear"``:
  q/k/v/o/gate/up/down, not the tied head), no dropout;
* ``qlora``: the same with the base loaded in bitsandbytes NF4 4-bit (compute dtype float32; on the CPU too) and
  ``prepare_model_for_kbit_training`` (no gradient checkpointing), as ``examples/finetune_qlora.py`` does;

each patched with ``patch_model`` and trained through the real ``transformers.Trainer`` with
``optim="stable_spam"`` and ``GNSCallback(validate_every=N)`` measuring only (no batch schedule).

Fine-tuning data: a corpus the base never saw, through the data helpers of ``examples/pretrain_clm.py``
(``load_raw_datasets`` with a local JSON-lines ``train_file`` of one example per source file, 5% held out;
``tokenized_blocks`` with the base's tokenizer): the ``.py`` files of standard-library *packages*
(``--packages``, default asyncio, email, http, importlib, json, logging, multiprocessing, unittest, urllib, xml:
2.5 MB; the pretraining corpus has only top-level modules). Same language and tokenizer, new code: a domain shift
the adapters have to learn.

At every validation step it records the norms' smoothed signals (``gns``, ``gns/block``, ``gns/final``, with their
|G|² and tr Σ), the truth ``gns_total`` (and ``gns_total_no_embeddings``, equal here: nothing trained is an
embedding), each optimizer step's unsmoothed inputs of the norms' estimators (small and big, per group) and each
validation step's of the truth's. The statistics are those of ``benchmarks/gns_fidelity.py`` (imported, not
copied): per setting × signal against ``gns_total``, after the first ``--burn_in`` of the run, the median ratio
signal / truth and its IQR, sd(log ratio), r(log), and the cross-run control (one seed's signal against another
seed's truth: what the shared trend alone gives). Beside them:

* sd(log truth): the spread of the truth itself, what a constant signal would give as sd(log ratio);
* the pooled ratio: over the validation steps after the burn-in, (Σ tr Σ / Σ |G|²) of the signal's unsmoothed
  per-step estimates over the same of the truth's: one ratio per run, free of the EMAs.

The truth of ``validate_every`` is itself an EMA of estimates from the training batches (8 examples every N-th step),
noisy, and it shares those batches with the norms' estimate: part of any co-movement of the two can be their shared
sampling noise, which the cross-run control does not remove. Hence an independent reference (``ReferenceGNS``):
every ``--reference_every`` steps, the big-batch GNS of the adapters and of the norm groups (block, final, all) on two
disjoint fixed sets A and B of ``--reference_size`` training blocks each (the same sets in every run), by the
two-batch-size estimator on a second, unpatched copy of the model holding the current adapters. A second table puts
each against the adapters' reference on set A: the adapters' on set B (the reference's own noise), the norms' on set
B (no example shared: tracking free of shared noise) and on set A, and the callback's EMAs at those steps.

Prints the tables, writes ``finetune_gns.json`` (arguments, per-run series and statistics, per-seed values) to
``--output_dir`` and the figure ``--figure`` (signals, truth and references against optimizer step, first seed,
both settings).

    OMP_NUM_THREADS=1 python benchmarks/finetune_gns.py   # lora and qlora, seeds 0 1 2: ~28 min on 1 CPU thread
    python benchmarks/finetune_gns.py --max_steps 40 --reference_every 20 --reference_size 64   # a quick check
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# first: importing hf_gns_spam silences the message bitsandbytes logs when peft imports it on a CPU run
from hf_gns_spam import GNSCallback, patch_model  # isort: split

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    DataCollatorForLanguageModeling,
    PrinterCallback,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)

from hf_gns_spam.gns.estimator import unbiased_estimates

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gns_fidelity as fidelity  # noqa: E402  (puts examples/ on sys.path for pretrain_clm)
import pretrain_clm as clm  # noqa: E402

SETTINGS = ("lora", "qlora")
SIGNALS = ("gns", "gns/block", "gns/final")  # the frozen norms' estimates (a LLaMA has no "other" norm)
TRUTH = "gns_total"  # the GNS of all trainable parameters: the LoRA adapters
PACKAGES = ("asyncio", "email", "http", "importlib", "json", "logging", "multiprocessing", "unittest", "urllib", "xml")


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default=clm.DEFAULT_OUTPUT_DIR, help="the pretrained model (local directory)")
    parser.add_argument("--settings", nargs="+", choices=SETTINGS, default=list(SETTINGS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="2+: the cross-run control")
    parser.add_argument("--output_dir", default="runs/finetune_gns")
    parser.add_argument("--figure", default="docs/figures/finetune_gns.png")
    parser.add_argument("--packages", nargs="+", default=list(PACKAGES), help="standard-library packages")
    parser.add_argument("--block_size", type=int, default=128, help="the base's pretraining block size")
    parser.add_argument("--batch_size", type=int, default=8, help="examples per optimizer step (one micro-batch)")
    parser.add_argument("--max_steps", type=int, default=600)
    parser.add_argument("--learning_rate", type=float, default=1e-3, help="examples/finetune_qlora.py's")
    parser.add_argument("--lr_scheduler_type", default="linear")
    parser.add_argument("--lora_rank", type=int, default=8)
    parser.add_argument("--lora_alpha", type=int, default=16)
    parser.add_argument("--validate_every", type=int, default=4)
    parser.add_argument("--ema_decay", type=float, default=0.99, help="the callback's (and main job's) default")
    parser.add_argument(
        "--reference_every", type=int, default=60, help="optimizer steps between two big-batch reference GNS"
    )
    parser.add_argument(
        "--reference_size", type=int, default=512, help="training blocks in each of the reference's two sets"
    )
    parser.add_argument(
        "--burn_in", type=float, default=0.1, help="fraction of the run's steps left out of every statistic"
    )
    return parser.parse_args(argv)


def check_base(base: str) -> None:
    if not (Path(base) / "config.json").is_file():
        sys.exit(
            f"no pretrained model at {base!r}: make it with `python examples/pretrain_clm.py` (the main job, a few "
            f"minutes on 2 CPU cores; it writes {clm.DEFAULT_OUTPUT_DIR}), or pass --base DIRECTORY"
        )


def write_corpus(path: Path, packages: list[str]) -> int:
    """The ``.py`` files of the standard library's ``packages`` (tests left out), one JSON line each; their bytes."""
    root = Path(sysconfig.get_paths()["stdlib"])
    total = 0
    with path.open("w", encoding="utf-8") as out:
        for package in packages:
            for file in sorted((root / package).rglob("*.py")):
                if "test" in file.relative_to(root).parts or "tests" in file.relative_to(root).parts:
                    continue
                text = file.read_text(encoding="utf-8", errors="replace")
                out.write(json.dumps({"text": text}) + "\n")
                total += len(text)
    if not total:
        raise SystemExit(f"no .py files in the standard library packages {packages} under {root}")
    return total


def lora_model(setting: str, args: argparse.Namespace, seed: int) -> torch.nn.Module:
    """The base (float32, or NF4 4-bit for qlora) with LoRA adapters on every linear layer, initialised from
    ``seed``; not patched."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if setting == "qlora":
        quantization = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
        )
        device_map = None if torch.cuda.is_available() else "cpu"
        model = AutoModelForCausalLM.from_pretrained(args.base, quantization_config=quantization, device_map=device_map)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    else:
        model = AutoModelForCausalLM.from_pretrained(args.base, dtype=torch.float32)
    torch.manual_seed(seed)
    lora = LoraConfig(r=args.lora_rank, lora_alpha=args.lora_alpha, target_modules="all-linear", lora_dropout=0.0)
    return get_peft_model(model, lora)


class StepRecorder(TrainerCallback):
    """Each optimizer step's unsmoothed inputs of the norms' estimators (the callback's ``history`` entry: small,
    big, effective batch, per group), with the step number."""

    def __init__(self, callback: GNSCallback) -> None:
        self.callback = callback
        self.steps: list[dict[str, float]] = []
        self._seen = 0

    def on_step_end(self, args, state, control, **kwargs):
        history = self.callback.estimates.history
        if len(history) > self._seen:  # the step gave an estimate (not skipped)
            self.steps.append({"step": state.global_step, **history[-1]})
        self._seen = len(history)


def reference_groups(model: torch.nn.Module) -> dict[str, list[torch.nn.Parameter]]:
    """The parameters of each reference group: the adapters (every ``lora_`` parameter) and the norms the callback
    measures under LoRA (``block``: every norm in the blocks but the first block's input norm; ``final``; ``all``:
    both)."""
    named = dict(model.named_parameters())
    norms = [n for n in named if n.endswith("norm.weight")]
    block = [n for n in norms if ".layers." in n and not n.endswith("layers.0.input_layernorm.weight")]
    final = [n for n in norms if ".layers." not in n]
    groups = {"adapters": [n for n in named if "lora_" in n], "block": block, "final": final, "all": block + final}
    if not all(groups.values()):
        raise RuntimeError(f"a reference group is empty: {groups}")
    return {group: [named[n] for n in names] for group, names in groups.items()}


class ReferenceGNS(TrainerCallback):
    """An independent, large-batch GNS of the adapters and of the norm groups every ``every`` optimizer steps (after
    the step), on two disjoint fixed sets A and B of ``set_size`` training blocks, by the two-batch-size estimator
    (McCandlish et al. 2018, App. A.1) with micro-batches of ``micro`` examples: for the K = set_size / micro
    micro-batch mean-loss gradients g_i and their mean Ĝ,

        small = Σ_i ‖g_i‖² / K   (E = |G|² + tr Σ / micro)      big = ‖Ĝ‖²   (E = |G|² + tr Σ / set_size)
        |G|² = (set_size·big − micro·small) / (set_size − micro)    tr Σ = (small − big) / (1/micro − 1/set_size)

    computed on a second, unpatched copy of the model (its norm weights made trainable there, so that plain
    autograd gives their gradients) holding the trained model's current adapter weights: the training model, its
    patched norms and the GNSCallback are not touched, and no random number is drawn. Set A's adapters against
    set B's norms share no example, so the comparison is free of the training batches' sampling noise."""

    def __init__(self, setting, args, seed, model, sets, collator, every: int, micro: int) -> None:
        self.model, self.every, self.micro = model, every, micro
        self.reference = lora_model(setting, args, seed)
        if setting == "qlora":
            from hf_gns_spam.integrations.bitsandbytes_cpu import disable_cpu_weight_repacking

            disable_cpu_weight_repacking(self.reference)
        self.groups = reference_groups(self.reference)
        for parameter in self.reference.parameters():
            parameter.requires_grad_(False)
        for parameters in self.groups.values():
            for parameter in parameters:
                parameter.requires_grad_(True)
        self.parameters = list(dict.fromkeys(p for ps in self.groups.values() for p in ps))
        self.batches = {
            name: [collator([examples[i] for i in range(j, j + micro)]) for j in range(0, len(examples), micro)]
            for name, examples in sets.items()
        }
        self.values: list[dict] = []

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every == 0:
            self.values.append({"step": state.global_step, **self.measure()})

    def measure(self) -> dict[str, dict[str, dict[str, float]]]:
        trained = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, parameter in self.reference.named_parameters():
                if "lora_" in name:
                    parameter.copy_(trained[name])
        index = {id(p): k for k, p in enumerate(self.parameters)}
        result = {}
        for name, batches in self.batches.items():
            sum_sq = dict.fromkeys(self.groups, 0.0)
            grad_sum = None
            for batch in batches:
                loss = self.reference(**batch).loss
                grads = [g.detach().double() for g in torch.autograd.grad(loss, self.parameters)]
                grad_sum = grads if grad_sum is None else [a + g for a, g in zip(grad_sum, grads, strict=True)]
                for group, parameters in self.groups.items():
                    sum_sq[group] += sum(float(grads[index[id(p)]].square().sum()) for p in parameters)
            k, size = len(batches), len(batches) * self.micro
            result[name] = {}
            for group, parameters in self.groups.items():
                small = sum_sq[group] / k
                big = sum(float((grad_sum[index[id(p)]] / k).square().sum()) for p in parameters)
                grad_sq = (size * big - self.micro * small) / (size - self.micro)
                trace_sigma = (small - big) / (1 / self.micro - 1 / size)
                gns = trace_sigma / grad_sq if grad_sq > 0 else math.nan
                result[name][group] = {"grad_sq": grad_sq, "trace_sigma": trace_sigma, "gns": gns}
        return result


def train_run(
    setting: str, seed: int, args: argparse.Namespace, tokenizer, lm_data, reference_sets, scratch: Path
) -> dict:
    set_seed(seed)
    model = lora_model(setting, args, seed)
    report = patch_model(model)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    norms = [n for n, _ in model.named_parameters() if "norm" in n]
    frozen_norms = sum(not p.requires_grad for n, p in model.named_parameters() if "norm" in n)
    callback = GNSCallback(ema_decay=args.ema_decay, validate_every=args.validate_every)  # measure only
    recorder = fidelity.ValidationRecorder(callback, args.validate_every)
    steps = StepRecorder(callback)
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    reference = ReferenceGNS(
        setting, args, seed, model, reference_sets, collator, args.reference_every, args.batch_size
    )
    training = TrainingArguments(
        output_dir=str(scratch / f"{setting}-{seed}"),
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=1,
        max_steps=args.max_steps,
        learning_rate=args.learning_rate,
        lr_scheduler_type=args.lr_scheduler_type,
        optim="stable_spam",
        logging_steps=args.validate_every,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        seed=seed,
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=True,
    )
    trainer = clm.causal_lm_trainer(model, tokenizer, lm_data, training, [callback, recorder, steps, reference])
    trainer.remove_callback(PrinterCallback)  # no log dict printed every logging step
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    evaluation = trainer.evaluate()
    totals = {h["step"]: h for h in callback.estimates.total_history}
    series = [
        {
            "step": step,
            **values,
            "total_step": {k: v for k, v in totals.get(step, {}).items() if k != "step"},
        }
        for step, values in sorted(recorder.values.items())
    ]
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    result = {
        "setting": setting,
        "family": setting,  # the key gns_fidelity.fidelity_rows groups by
        "seed": seed,
        "parameters": sum(p.numel() for p in model.parameters()),
        "trainable_parameters": sum(p.numel() for _, p in trainable),
        "trainable_names_sample": [n for n, _ in trainable[:3]],
        "norm_weights": len(norms),
        "frozen_norm_weights": frozen_norms,
        "patched_norms": len(report.patched),
        "groups": list(callback.estimates.groups_present),
        "steps": trainer.state.global_step,
        "burn_in_steps": args.burn_in * trainer.state.global_step,
        "seconds": seconds,
        "first_loss": losses[0] if losses else math.nan,
        "final_loss": losses[-1] if losses else math.nan,
        "eval_loss": evaluation["eval_loss"],
        "validations": len(callback.estimates.total_history),
        "norm_steps": steps.steps,
        "reference": reference.values,
        "series": series,
    }
    print(
        f"  {setting:>5} seed {seed}: {result['trainable_parameters']:,} trainable of {result['parameters']:,}, "
        f"{frozen_norms}/{len(norms)} norm weights frozen, loss {result['first_loss']:.3f} -> "
        f"{result['final_loss']:.3f} (held-out {result['eval_loss']:.3f}), {seconds:.0f} s",
        flush=True,
    )
    return result


def pooled_gns(entries: list[dict], small_key: str, big_key: str) -> float:
    """Σ tr Σ / Σ |G|² over the entries' unbiased per-step estimates (nan if the sum of |G|² is not positive)."""
    grad_sq = trace_sigma = 0.0
    count = 0
    for e in entries:
        small, big = e.get(small_key), e.get(big_key)
        if small is None or big is None or not (math.isfinite(small) and math.isfinite(big)):
            continue
        g, s = unbiased_estimates(small, big, e["effective_batch"])
        grad_sq, trace_sigma, count = grad_sq + g, trace_sigma + s, count + 1
    return trace_sigma / grad_sq if count and grad_sq > 0 else math.nan


def pooled_ratio(run: dict, signal: str) -> float:
    """The signal's pooled GNS over the truth's, both over the validation steps after the burn-in."""
    validation_steps = {s["step"] for s in run["series"] if s["step"] > run["burn_in_steps"] and s["total_step"]}
    suffix = "" if signal == "gns" else "/" + signal.removeprefix("gns/")
    norms = [e for e in run["norm_steps"] if e["step"] in validation_steps]
    truths = [s["total_step"] for s in run["series"] if s["step"] in validation_steps]
    return pooled_gns(norms, f"small{suffix}", f"big{suffix}") / pooled_gns(truths, "small", "big")


def sd_log(values: list[float]) -> float:
    logs = [math.log(v) for v in values if fidelity.usable(v)]
    return statistics.stdev(logs) if len(logs) > 1 else math.nan


def rows_for(runs: list[dict]) -> list[dict]:
    """gns_fidelity's rows (against gns_total only), with sd(log truth), the pooled ratio and per-seed values."""
    rows = []
    for row in fidelity.fidelity_rows(runs):
        if row["truth"] != TRUTH or row["signal"] not in SIGNALS:
            continue
        setting_runs = [r for r in runs if r["setting"] == row["family"]]
        truth_spread = []
        for run in setting_runs:
            steps = [s["step"] for s in run["series"] if s["step"] > run["burn_in_steps"]]
            truth_spread.append(sd_log([fidelity.by_step(run, TRUTH).get(k) for k in steps]))
        pooled = [pooled_ratio(r, row["signal"]) for r in setting_runs]
        medians = [r["ratio_median"] for r in row["runs"]]
        rows.append(
            {
                "setting": row.pop("family"),
                **row,
                "sd_log_truth": fidelity.mean(truth_spread),
                "pooled_ratio": fidelity.mean(pooled),
                "pooled_ratio_runs": pooled,
                "ratio_median_runs": medians,
            }
        )
    return rows


def reference_by_step(run: dict, name: str, group: str) -> dict[int, float]:
    return {v["step"]: v[name][group]["gns"] for v in run["reference"]}


# against the adapters' big-batch GNS on set A: (label, what it is, its series in a run)
REFERENCE_SIGNALS = (
    ("adapters ref B", "the same reference on set B: its own noise", lambda r: reference_by_step(r, "B", "adapters")),
    ("block ref B", "the block norms' big-batch GNS, set B", lambda r: reference_by_step(r, "B", "block")),
    ("final ref B", "the final norm's big-batch GNS, set B", lambda r: reference_by_step(r, "B", "final")),
    ("all ref B", "all measured norms' big-batch GNS, set B", lambda r: reference_by_step(r, "B", "all")),
    ("block ref A", "the block norms' big-batch GNS, set A", lambda r: reference_by_step(r, "A", "block")),
    ("final ref A", "the final norm's big-batch GNS, set A", lambda r: reference_by_step(r, "A", "final")),
    ("all ref A", "all measured norms' big-batch GNS, set A", lambda r: reference_by_step(r, "A", "all")),
    *((s, "the callback's signal (EMA) at the step", lambda r, s=s: fidelity.by_step(r, s)) for s in SIGNALS),
    (TRUTH, "validate_every's truth (EMA) at the step", lambda r: fidelity.by_step(r, TRUTH)),
)


def reference_rows(runs: list[dict]) -> list[dict]:
    """Each REFERENCE_SIGNALS series against the adapters' big-batch GNS on set A (same run, and the cross-run
    control), at the reference steps after the burn-in; the statistics of gns_fidelity.agreement, seed means."""
    rows = []
    for setting in dict.fromkeys(r["setting"] for r in runs):
        setting_runs = [r for r in runs if r["setting"] == setting]
        for label, meaning, series in REFERENCE_SIGNALS:
            same, cross = [], []
            for a in setting_runs:
                steps = [v["step"] for v in a["reference"] if v["step"] > a["burn_in_steps"]]
                truth = reference_by_step(a, "A", "adapters")
                same.append({"seed": a["seed"], **fidelity.agreement(series(a), truth, steps)})
                for b in setting_runs:
                    if b is not a:
                        result = fidelity.agreement(series(a), reference_by_step(b, "A", "adapters"), steps)
                        cross.append({"signal_seed": a["seed"], "truth_seed": b["seed"], **result})
            rows.append(
                {
                    "setting": setting,
                    "signal": label,
                    "meaning": meaning,
                    **{k: fidelity.mean([r[k] for r in same]) for k in ("n", "ratio_median", "ratio_p25", "ratio_p75")},
                    "sd_log_ratio": fidelity.mean([r["sd_log_ratio"] for r in same]),
                    "r_log": fidelity.mean([r["r_log"] for r in same]),
                    "cross_sd_log_ratio": fidelity.mean([r["sd_log_ratio"] for r in cross]),
                    "cross_r_log": fidelity.mean([r["r_log"] for r in cross]),
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
    figure, axes = plt.subplots(1, len(first), figsize=(6 * len(first), 4.2), squeeze=False, sharey=True)
    for axis, run in zip(axes[0], first, strict=True):
        for key in (*SIGNALS, TRUTH):
            points = [(s["step"], s[key]) for s in run["series"] if fidelity.usable(s.get(key))]
            if points:
                style = "-" if key == TRUTH else "--"
                label = f"{key} (adapters, per-example)" if key == TRUTH else f"{key} (frozen norms)"
                axis.plot([p[0] for p in points], [p[1] for p in points], style, marker=".", label=label)
        for name, group, color, label in (
            ("A", "adapters", "tab:red", "adapters, big-batch reference (set A)"),
            ("B", "block", "tab:orange", "block norms, big-batch reference (set B)"),
        ):
            points = [
                (v["step"], v[name][group]["gns"]) for v in run["reference"] if fidelity.usable(v[name][group]["gns"])
            ]
            if points:
                axis.plot([p[0] for p in points], [p[1] for p in points], "o", mfc="none", color=color, label=label)
        axis.axvline(run["burn_in_steps"], color="grey", linewidth=0.8)
        axis.set_yscale("log")
        axis.set_xlabel("optimizer step (8 examples of 128 tokens)")
        axis.set_ylabel("GNS (examples, EMA)")
        name = "LoRA (float32 base)" if run["setting"] == "lora" else "QLoRA (NF4 4-bit base)"
        axis.set_title(f"{name}, r=8 all-linear, seed {run['seed']}; grey: end of burn-in", fontsize=9)
        axis.legend(fontsize=7)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)


def versions() -> str:
    import bitsandbytes
    import peft
    import transformers

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError, StopIteration):
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores: {cpu})"
    return (
        f"{device}, {torch.get_num_threads()} torch thread(s); python {platform.python_version()}, torch "
        f"{torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, bitsandbytes "
        f"{bitsandbytes.__version__}"
    )


def code_version() -> str:
    """The checkout's commit, and whether hf_gns_spam/ has uncommitted changes (read when the run starts)."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        changed = subprocess.run(
            ["git", "status", "--porcelain", "--", "hf_gns_spam"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + (" (+ uncommitted changes in hf_gns_spam/)" if changed else "")


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_arguments(argv)
    check_base(args.base)
    if len(args.seeds) < 2:
        sys.exit("--seeds: give 2 or more (the cross-run control pairs the runs of different seeds)")
    if args.reference_every % args.validate_every or args.reference_size % args.batch_size:
        sys.exit("--reference_every must be a multiple of --validate_every, --reference_size of --batch_size")
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    commit = code_version()  # at the start: the code this run imports
    print(f"machine: {versions()}", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(args.base)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    start = time.perf_counter()
    runs = []
    with tempfile.TemporaryDirectory() as scratch:
        corpus = Path(scratch) / "finetune_corpus.json"
        corpus_bytes = write_corpus(corpus, args.packages)
        data = clm.DataArguments(train_file=str(corpus), block_size=args.block_size)
        lm_data = clm.tokenized_blocks(clm.load_raw_datasets(data), tokenizer, data.text_column, args.block_size)
        print(
            f"fine-tuning corpus: standard-library packages {', '.join(args.packages)} ({corpus_bytes / 1e6:.2f} MB): "
            f"{len(lm_data['train'])} training and {len(lm_data['validation'])} held-out blocks of {args.block_size} "
            f"tokens ({args.max_steps * args.batch_size / len(lm_data['train']):.2f} epochs)",
            flush=True,
        )
        # two disjoint fixed sets of training blocks for the big-batch reference, the same for every run
        order = torch.randperm(len(lm_data["train"]), generator=torch.Generator().manual_seed(1234)).tolist()
        reference_sets = {
            name: [lm_data["train"][i] for i in order[k * args.reference_size : (k + 1) * args.reference_size]]
            for k, name in enumerate(("A", "B"))
        }
        for setting in args.settings:
            for seed in args.seeds:
                runs.append(train_run(setting, seed, args, tokenizer, lm_data, reference_sets, Path(scratch)))
    total_seconds = time.perf_counter() - start
    rows = rows_for(runs)
    references = reference_rows(runs)
    # nothing trained is an embedding (the tied head is not a LoRA target): the two whole-model truths agree
    differences = [
        abs(s["gns_total"] / s["gns_total_no_embeddings"] - 1)
        for r in runs
        for s in r["series"]
        if fidelity.usable(s.get("gns_total")) and fidelity.usable(s.get("gns_total_no_embeddings"))
    ]
    (output_dir / "finetune_gns.json").write_text(
        json.dumps(
            {
                "arguments": vars(args),
                "commit": commit,
                "machine": versions(),
                "rows": rows,
                "reference_rows": references,
                "runs": runs,
            },
            indent=2,
            allow_nan=True,
        )
    )
    plot(runs, Path(args.figure))

    print(
        f"\n{args.max_steps} steps of {args.batch_size} x {args.block_size} tokens, stable_spam, lr "
        f"{args.learning_rate:g} {args.lr_scheduler_type}, LoRA r={args.lora_rank} alpha={args.lora_alpha} "
        f"all-linear, validate_every={args.validate_every}, ema_decay={args.ema_decay} (adapters: "
        f"{args.ema_decay}^{args.validate_every} per validation), seeds {args.seeds}, commit {commit}; base "
        f"{args.base}"
    )
    print(
        f"{'setting':>7} {'seed':>4} {'trainable':>9} {'patched':>7} {'groups':>11} {'loss':>13} {'held-out':>8} "
        f"{'valid.':>6} {'s':>6}"
    )
    for r in runs:
        print(
            f"{r['setting']:>7} {r['seed']:>4} {r['trainable_parameters']:>9,} {r['patched_norms']:>7} "
            f"{','.join(r['groups']):>11} {r['first_loss']:>6.3f}->{r['final_loss']:<6.3f} {r['eval_loss']:>8.3f} "
            f"{r['validations']:>6} {r['seconds']:>6.0f}"
        )
    print(
        f"gns_total_no_embeddings vs gns_total: max relative difference {max(differences, default=math.nan):.1e} "
        "(nothing trained is an embedding)"
    )
    print(
        f"\nTruth: gns_total (the LoRA adapters' GNS from per-example gradients). After the first {args.burn_in:.0%} "
        f"of each run; each value the mean over the {len(args.seeds)} seeds; cross: one run's signal against another "
        "seed's truth (the shared trend alone); sd log truth: what a constant signal would give as sd log ratio; "
        "pooled: Σ tr Σ / Σ |G|² of the unsmoothed per-step estimates, signal over truth, validation steps only."
    )
    print(
        f"{'setting':>7} {'signal':>9} {'n':>3} {'median ratio':>12} {'ratio IQR':>15} {'sd log ratio':>12} "
        f"{'cross sd':>8} {'sd log truth':>12} {'r(log)':>7} {'cross r':>7} {'pooled':>7}"
    )
    for row in rows:
        print(
            f"{row['setting']:>7} {row['signal']:>9} {row['n']:>3.0f} {row['ratio_median']:>12.3g} "
            f"{row['ratio_p25']:>7.3g}-{row['ratio_p75']:<7.3g} {row['sd_log_ratio']:>12.3f} "
            f"{row['cross_sd_log_ratio']:>8.3f} {row['sd_log_truth']:>12.3f} {row['r_log']:>7.3f} "
            f"{row['cross_r_log']:>7.3f} {row['pooled_ratio']:>7.3g}"
        )
    print("\nper seed (median ratio | pooled ratio):")
    for row in rows:
        seeds = ", ".join(
            f"{r['seed']}: {r['ratio_median']:.3g} | {p:.3g}"
            for r, p in zip(row["runs"], row["pooled_ratio_runs"], strict=True)
        )
        print(f"{row['setting']:>7} {row['signal']:>9}  {seeds}")
    print(
        f"\nAgainst an independent reference: the adapters' big-batch GNS on a fixed set A of {args.reference_size} "
        f"training blocks, every {args.reference_every} steps (two-batch estimator, micro-batches of "
        f"{args.batch_size}, no EMA); 'ref B': big-batch GNS on a disjoint set B (no example shared with A), "
        "'ref A' on set A itself; gns, gns/block, gns/final, gns_total: the callback's EMAs at the same steps. "
        "After the burn-in, seed means."
    )
    print(
        f"{'setting':>7} {'signal':>14} {'n':>3} {'median ratio':>12} {'ratio IQR':>15} {'sd log ratio':>12} "
        f"{'cross sd':>8} {'r(log)':>7} {'cross r':>7}"
    )
    for row in references:
        print(
            f"{row['setting']:>7} {row['signal']:>14} {row['n']:>3.0f} {row['ratio_median']:>12.3g} "
            f"{row['ratio_p25']:>7.3g}-{row['ratio_p75']:<7.3g} {row['sd_log_ratio']:>12.3f} "
            f"{row['cross_sd_log_ratio']:>8.3f} {row['r_log']:>7.3f} {row['cross_r_log']:>7.3f}"
        )
    print("\nper seed, median ratio to the adapters' reference on set A:")
    for row in references:
        print(
            f"{row['setting']:>7} {row['signal']:>14}  "
            + ", ".join(f"{r['seed']}: {r['ratio_median']:.3g}" for r in row["runs"])
        )
    print(
        f"\nwall time {total_seconds / 60:.1f} min; figure {args.figure}, series and statistics "
        f"{output_dir}/finetune_gns.json"
    )
    return rows


if __name__ == "__main__":
    main()
