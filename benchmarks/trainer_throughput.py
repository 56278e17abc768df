"""End-to-end Trainer throughput: plain Hugging Face, Liger-Kernel and hf_gns_spam on the same LLaMA and data.

Trains a LLaMA built from a config (no download) with the real ``transformers.Trainer``, one configuration after
another in the same process, each from the same initial weights (same seed) on the same data in the same order:

    a  plain        optim="adamw_torch_fused"
    b  liger        use_liger_kernel=True, optim="adamw_torch_fused"   (skipped without liger-kernel or CUDA)
    c  gns_spam     patch_model(model), optim="stable_spam", GNSCallback(schedule="gns")
    d  gns_spam8    as c with optim="stable_spam_8bit"
    e  patched      patch_model(model), optim="adamw_torch_fused", no callback (the norm kernels' cost alone)

A row whose requirement is missing is skipped with the reason, and a row that fails (out of memory, an
integration error) is reported as failed with its traceback; the other rows still run. Model presets (``--size``,
LLaMA with full multi-head attention): tiny (0.2M parameters, seq 64), 125m (134M), 350m (374M), 1b (953M: hidden
2048, 16 layers, 16 heads, intermediate 5632, vocab 32000); seq 2048 but for tiny (``--seq`` overrides).

For each it reports tokens/s (the median over the timed optimizer steps, after the warm-up steps, of the tokens
the step processed over its wall time), the model FLOP rate (6·N + 12·layers·hidden·seq FLOPs per token, N the
parameters without the input embedding, as PaLM's MFU counts), peak memory (``torch.cuda.max_memory_allocated``,
reset before each run; n/a on CPU), the optimizer-state memory (bytes of every tensor in ``optimizer.state`` after
training) and the loss of the trained model on a fixed held-out batch, with the ratios against a.

A step's time runs from the previous ``on_step_end`` (``on_train_begin`` for the first) to its own, with
``torch.cuda.synchronize()`` at both ends: it covers fetching and collating the step's micro-batches, forward,
backward, clipping, the optimizer and every callback. (``on_step_begin`` comes after the Trainer has prefetched the
step's micro-batches, and is not called for every step when a batch schedule changes the accumulation.) Its tokens
are counted by the Trainer itself (``include_num_input_tokens_seen="all"``; the data have no padding), so that c
and d, whose GNS schedule grows the batch through gradient accumulation, report the tokens they really processed.
The schedule's budget is in data: c and d process the same tokens as a, in fewer optimizer steps once the batch
has grown. A grown batch amortises the optimizer step over more tokens; the ``batch`` column shows the range of
global batches (examples) over the timed steps, and ``--gns-schedule none`` keeps the batch fixed (the callback
then only measures the GNS).

Data: sequences of token ids drawn from a Zipf distribution (p(id) ∝ 1/(id+1)) with a fixed ``torch.Generator``,
input_ids = labels, in a plain ``torch.utils.data.Dataset`` (the ``datasets`` package is not needed). The loss then
falls from ln(vocab) towards the distribution's entropy within a few steps: a check that every configuration trains.

Precision, what a user pretraining from a config with ``bf16=True`` gets: ``--precision mixed`` (default) keeps
float32 weights, gradients and optimizer states and runs the forward and backward under bfloat16 autocast;
``pure`` builds the model in bfloat16 (``dtype=torch.bfloat16``; weights, gradients and AdamW's states in bfloat16,
as a model loaded with ``dtype=torch.bfloat16`` trains; Stable-SPAM keeps float32 moments there, so c's state is
twice a's); ``fp32`` turns autocast off. Attention: ``--attn sdpa``.
The GNS schedule uses ``hf-gns-spam launch --gns-schedule gns``'s defaults (the main job's): multiplier 2, at most
2× per decision every 10 steps after 20 warm-up steps, batch up to 8× the starting one, learning rate ×
(B/B_min)^0.5, EMA decay 0.95.

    python benchmarks/trainer_throughput.py                          # CUDA: the 1b preset, bf16 mixed precision
    PYTHONPATH=. python benchmarks/trainer_throughput.py ...         # the package not installed (pip install -e .)
    python benchmarks/trainer_throughput.py --size 350m --batch 16 --output runs/trainer_throughput.json
    python benchmarks/trainer_throughput.py --rows a,c --gns-schedule none    # equal batches: the overhead alone
    python benchmarks/trainer_throughput.py --device cpu --size tiny          # CPU smoke test (under a minute)

Targets (one GPU, bf16): c at least 0.98× a's tokens/s; d's optimizer state at most 25% of a's (8-bit moments in
blocks of 256 with a float32 absmax each take 2.03 bytes per parameter against AdamW's 8 in float32: 25.4%).
Absolute numbers mean something only on a GPU; on CPU the run checks that every configuration trains.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # models are built from configs: nothing to download

import argparse
import dataclasses
import datetime
import gc
import importlib.metadata
import importlib.util
import json
import math
import statistics
import subprocess
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch

import hf_gns_spam  # registers optim="stable_spam" / "stable_spam_8bit"; before transformers' Trainer is imported
from hf_gns_spam import GNSCallback, patch_model

# isort: split
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    PreTrainedModel,
    PrinterCallback,
    Trainer,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
    set_seed,
)
from transformers.training_args import OptimizerNames

ROOT = Path(__file__).resolve().parent.parent
# recent transformers name it activation_checkpointing (gradient_checkpointing: a deprecated alias that warns)
CHECKPOINTING = next(
    name
    for name in ("activation_checkpointing", "gradient_checkpointing")
    if name in {field.name for field in dataclasses.fields(TrainingArguments)}
)


@dataclasses.dataclass(frozen=True)
class Preset:
    hidden: int
    layers: int
    heads: int
    intermediate: int
    vocab: int
    seq: int


PRESETS = {
    "tiny": Preset(hidden=64, layers=2, heads=4, intermediate=176, vocab=1000, seq=64),
    "125m": Preset(hidden=768, layers=12, heads=12, intermediate=2048, vocab=32000, seq=2048),
    "350m": Preset(hidden=1024, layers=24, heads=16, intermediate=2816, vocab=32000, seq=2048),
    "1b": Preset(hidden=2048, layers=16, heads=16, intermediate=5632, vocab=32000, seq=2048),
}


@dataclasses.dataclass(frozen=True)
class Row:
    key: str
    name: str
    optim: str
    liger: bool = False
    patch: bool = False
    gns: bool = False
    requires: str | None = None  # a module the row needs (REQUIREMENTS says why)


ROWS = (
    Row("a", "plain", "adamw_torch_fused"),
    Row("b", "liger", "adamw_torch_fused", liger=True, requires="liger_kernel"),
    Row("c", "gns_spam", "stable_spam", patch=True, gns=True),
    Row("d", "gns_spam8", "stable_spam_8bit", patch=True, gns=True),
    Row("e", "patched", "adamw_torch_fused", patch=True),
)
REQUIREMENTS = {
    "liger_kernel": "liger-kernel is not installed (pip install liger-kernel)",
}


class TokenBlocks(torch.utils.data.Dataset):
    """Fixed-length sequences as ``{"input_ids", "labels"}`` dicts (the Trainer's default collator stacks them)."""

    def __init__(self, ids: torch.Tensor) -> None:
        self.ids = ids

    def __len__(self) -> int:
        return self.ids.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[index], "labels": self.ids[index]}


def zipf_tokens(sequences: int, seq: int, vocab: int, generator: torch.Generator) -> torch.Tensor:
    """``sequences`` × ``seq`` token ids with p(id) ∝ 1/(id+1)."""
    weights = 1.0 / torch.arange(1, vocab + 1, dtype=torch.float64)
    return torch.multinomial(weights, sequences * seq, replacement=True, generator=generator).view(sequences, seq)


class ThroughputMeter(TrainerCallback):
    """Wall time and tokens of every optimizer step, from the previous step's end to this one's."""

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")
        self.seconds: list[float] = []
        self.tokens: list[int] = []
        self._last_time = 0.0
        self._last_tokens = 0

    def _now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._last_time = self._now()
        self._last_tokens = state.num_input_tokens_seen

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        now = self._now()
        self.seconds.append(now - self._last_time)
        self.tokens.append(state.num_input_tokens_seen - self._last_tokens)
        self._last_time, self._last_tokens = now, state.num_input_tokens_seen


def tensor_bytes(value: object) -> int:
    """Bytes of every tensor in ``value`` (a tensor, or dicts, lists and tuples of them)."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(tensor_bytes(v) for v in value)
    return 0


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the optimizer
    return sum(tensor_bytes(state) for state in inner.state.values())


def build_model(preset: Preset, device: str, precision: str, attn: str, seed: int) -> PreTrainedModel:
    config = LlamaConfig(
        vocab_size=preset.vocab,
        hidden_size=preset.hidden,
        intermediate_size=preset.intermediate,
        num_hidden_layers=preset.layers,
        num_attention_heads=preset.heads,
        num_key_value_heads=preset.heads,
        max_position_embeddings=preset.seq,
    )
    set_seed(seed)
    with torch.device(device):  # initialised where it trains: no host-side initialisation of a large model
        return AutoModelForCausalLM.from_config(
            config, dtype=torch.bfloat16 if precision == "pure" else torch.float32, attn_implementation=attn
        )


def flops_per_token(model: PreTrainedModel, preset: Preset) -> float:
    embedding = model.get_input_embeddings().weight.numel()
    parameters = sum(p.numel() for p in model.parameters()) - embedding
    return 6 * parameters + 12 * preset.layers * preset.hidden * preset.seq


def skip_reason(row: Row, device: str) -> str | None:
    if row.requires is not None and importlib.util.find_spec(row.requires) is None:
        return REQUIREMENTS[row.requires]
    if row.liger and not device.startswith("cuda"):
        return "Liger-Kernel's kernels need CUDA"
    try:
        OptimizerNames(row.optim)
    except ValueError:
        return f"optim={row.optim!r} is not registered with this transformers (see import hf_gns_spam's warning)"
    return None


def gns_callback(args: argparse.Namespace) -> GNSCallback:
    if args.gns_schedule == "none":
        return GNSCallback(ema_decay=0.95)
    start = args.batch * args.grad_accum
    return GNSCallback(
        schedule="gns",
        min_batch_size=start,
        max_batch_size=start * args.max_batch_multiple,
        update_interval=args.gns_update_interval,
        warmup_steps=args.gns_warmup_steps,
        gns_multiplier=2.0,
        lr_batch_power=0.5,
        ema_decay=0.95,
    )


def run_row(
    row: Row,
    preset: Preset,
    args: argparse.Namespace,
    dataset: TokenBlocks,
    held_out: dict[str, torch.Tensor],
    output_dir: str,
) -> dict[str, Any]:
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start_allocated = torch.cuda.memory_allocated() if cuda else None
    model = build_model(preset, args.device, args.precision, args.attn, args.seed)
    per_token = flops_per_token(model, preset)
    if row.patch:
        patch_model(model)
    callback = gns_callback(args) if row.gns else None
    meter = ThroughputMeter(args.device)
    training_args = TrainingArguments(
        output_dir=output_dir,
        per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=args.grad_accum,
        max_steps=args.warmup_steps + args.timed_steps,
        learning_rate=args.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=args.warmup_steps,
        optim=row.optim,
        use_liger_kernel=row.liger,
        bf16=args.precision != "fp32",
        use_cpu=not cuda,
        **{CHECKPOINTING: args.gradient_checkpointing},
        include_num_input_tokens_seen="all",
        logging_strategy="no",
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=args.seed,
    )
    callbacks = [callback, meter] if callback is not None else [meter]  # the meter last: its step includes theirs
    trainer = Trainer(model=model, args=training_args, train_dataset=dataset, callbacks=callbacks)
    trainer.remove_callback(PrinterCallback)  # disable_tqdm's printer of the closing train_runtime record
    output = trainer.train()
    peak = torch.cuda.max_memory_allocated() if cuda else None  # before the held-out forward
    state_bytes = optimizer_state_bytes(trainer.optimizer)
    model.eval()
    device_type = "cuda" if cuda else "cpu"
    with torch.no_grad(), torch.autocast(device_type, torch.bfloat16, enabled=args.precision != "fp32"):
        held_out_loss = float(model(**{k: v.to(args.device) for k, v in held_out.items()}).loss)
    seconds, tokens = meter.seconds[args.warmup_steps :], meter.tokens[args.warmup_steps :]
    rates = [n / s for n, s in zip(tokens, seconds, strict=True)]
    median_rate = statistics.median(rates) if rates else math.nan
    return {
        "status": "ok",
        "tokens_per_s": median_rate,
        "tokens_per_s_window": sum(tokens) / sum(seconds) if seconds else math.nan,
        "model_tflops": median_rate * per_token / 1e12,
        "timed_steps": len(seconds),
        "optimizer_steps": len(meter.seconds),
        "batch_sizes": [n // preset.seq for n in meter.tokens],
        "step_seconds": meter.seconds,
        "step_tokens": meter.tokens,
        "tokens_total": trainer.state.num_input_tokens_seen,
        "peak_memory_bytes": peak,
        "start_allocated_bytes": start_allocated,
        "optimizer_state_bytes": state_bytes,
        "held_out_loss": held_out_loss,
        "train_loss": output.training_loss,
        "gns": callback.metrics()["gns"] if callback is not None else None,
    }


def release_memory(device: str) -> None:
    gc.collect()  # the Trainer, its callbacks and the model reference each other
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def environment(device: str) -> dict[str, str]:
    def version(distribution: str) -> str:
        try:
            return importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    if device.startswith("cuda"):
        name = f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    else:
        name = f"cpu ({torch.get_num_threads()} threads)"
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        commit += " (with uncommitted changes)" if dirty else ""
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    date = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    info = {"device": name, "date": date, "commit": commit}
    for distribution in ("torch", "triton", "transformers", "accelerate", "liger-kernel", "bitsandbytes"):
        info[distribution] = version(distribution)
    info["hf_gns_spam"] = hf_gns_spam.__version__
    return info


def mib(value: float | None) -> str:
    return "n/a" if value is None else f"{value / 2**20:.1f}"


def ratio(results: dict[str, dict[str, Any]], key: str, field: str) -> float | None:
    """``results[key][field] / results["a"][field]``, None when either is missing."""
    mine, base = results.get(key, {}).get(field), results.get("a", {}).get(field)
    return None if mine is None or not base else mine / base


def print_table(results: dict[str, dict[str, Any]]) -> None:
    header = (
        f"{'row':<14} {'tokens/s':>10} {'x a':>6} {'TFLOP/s':>8} {'steps':>6} {'batch':>8} {'peak MiB':>9} "
        f"{'opt MiB':>8} {'x a':>6} {'loss':>7}"
    )
    print(header)
    for row in ROWS:
        result = results.get(row.key)
        if result is None:
            continue
        label = f"{row.key} {row.name}"
        if result["status"] != "ok":
            print(f"{label:<14} {result['status']}: {result['reason']}")
            continue
        timed = result["batch_sizes"][-result["timed_steps"] :] if result["timed_steps"] else [0]
        batch = f"{min(timed)}" if min(timed) == max(timed) else f"{min(timed)}-{max(timed)}"
        speed, state = ratio(results, row.key, "tokens_per_s"), ratio(results, row.key, "optimizer_state_bytes")
        print(
            f"{label:<14} {result['tokens_per_s']:>10.0f} {'-' if speed is None else f'{speed:.3f}':>6} "
            f"{result['model_tflops']:>8.1f} {result['timed_steps']:>6} {batch:>8} "
            f"{mib(result['peak_memory_bytes']):>9} {mib(result['optimizer_state_bytes']):>8} "
            f"{'-' if state is None else f'{state:.3f}':>6} {result['held_out_loss']:>7.4f}"
        )
    targets = [
        ("c tokens/s >= 0.98 x a", ratio(results, "c", "tokens_per_s"), lambda r: r >= 0.98, "{:.3f}x"),
        ("d optimizer state <= 25% of a", ratio(results, "d", "optimizer_state_bytes"), lambda r: r <= 0.25, "{:.1%}"),
    ]
    print("\ntargets:")
    for label, value, holds, form in targets:
        verdict = "not measured" if value is None else f"{form.format(value)} {'holds' if holds(value) else 'FAILS'}"
        print(f"  {label}: {verdict}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", choices=sorted(PRESETS), default=None, help="default 1b on CUDA, tiny on CPU")
    parser.add_argument("--seq", type=int, default=None, help="sequence length (default: the preset's)")
    parser.add_argument("--batch", type=int, default=None, help="per_device_train_batch_size (default 8; CPU 4)")
    parser.add_argument("--grad-accum", type=int, default=1, help="gradient_accumulation_steps (c, d: the start)")
    parser.add_argument("--warmup-steps", type=int, default=None, help="untimed optimizer steps (default 5; CPU 2)")
    parser.add_argument("--timed-steps", type=int, default=None, help="timed optimizer steps (default 20; CPU 6)")
    parser.add_argument("--precision", choices=["mixed", "pure", "fp32"], default="mixed")
    parser.add_argument("--attn", default="sdpa", help="attn_implementation")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--learning-rate", type=float, default=3e-4)
    parser.add_argument("--rows", default=",".join(row.key for row in ROWS), help="which of a,b,c,d,e to run")
    parser.add_argument("--gns-schedule", choices=["gns", "none"], default="gns", help="c, d: none measures only")
    parser.add_argument("--gns-warmup-steps", type=int, default=20)
    parser.add_argument("--gns-update-interval", type=int, default=10)
    parser.add_argument("--max-batch-multiple", type=int, default=8, help="c, d: the largest batch / the first")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=None, help="write the raw numbers to this JSON file")
    args = parser.parse_args()
    on_gpu = args.device.startswith("cuda")
    args.size = args.size or ("1b" if on_gpu else "tiny")
    args.batch = args.batch or (8 if on_gpu else 4)
    if args.warmup_steps is None:
        args.warmup_steps = 5 if on_gpu else 2
    if args.timed_steps is None:
        args.timed_steps = 20 if on_gpu else 6
    preset = dataclasses.replace(PRESETS[args.size], seq=args.seq or PRESETS[args.size].seq)
    unknown = set(args.rows.split(",")) - {row.key for row in ROWS}
    if unknown:
        parser.error(f"--rows: unknown {sorted(unknown)}; choose from {[row.key for row in ROWS]}")
    selected = [row for row in ROWS if row.key in args.rows.split(",")]

    info = environment(args.device)
    print(" | ".join(f"{key} {value}" for key, value in info.items()))
    generator = torch.Generator().manual_seed(args.seed)
    sequences = (args.warmup_steps + args.timed_steps) * args.batch * args.grad_accum
    dataset = TokenBlocks(zipf_tokens(sequences, preset.seq, preset.vocab, generator))
    held_out_ids = zipf_tokens(args.batch, preset.seq, preset.vocab, generator)
    held_out = {"input_ids": held_out_ids, "labels": held_out_ids}
    shapes = build_model(preset, "meta", args.precision, args.attn, args.seed)
    parameters = sum(p.numel() for p in shapes.parameters())
    precision = {
        "mixed": "float32 weights and states, bfloat16 autocast",
        "pure": "bfloat16 weights, gradients and AdamW states, bfloat16 autocast",
        "fp32": "float32, no autocast",
    }[args.precision]
    print(
        f"LLaMA {args.size}: hidden {preset.hidden}, {preset.layers} layers, {preset.heads} heads, intermediate "
        f"{preset.intermediate}, vocab {preset.vocab}, {parameters / 1e6:.1f}M parameters; seq {preset.seq}, "
        f"batch {args.batch} x accumulation {args.grad_accum} ({args.batch * args.grad_accum * preset.seq} tokens "
        f"per step); {args.precision} precision ({precision}), attention {args.attn}, gradient checkpointing "
        f"{'on' if args.gradient_checkpointing else 'off'}; {args.warmup_steps} warm-up + {args.timed_steps} timed "
        f"steps; GNS schedule {args.gns_schedule}\n"
    )

    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as output_dir:
        for row in selected:
            reason = skip_reason(row, args.device)
            if reason is not None:
                print(f"{row.key} {row.name}: skipped, {reason}")
                results[row.key] = {"status": "skipped", "reason": reason}
                continue
            started = time.perf_counter()
            try:
                results[row.key] = run_row(row, preset, args, dataset, held_out, output_dir)
            except Exception as error:  # an OOM or an integration error loses one row, not the run
                traceback.print_exc()
                results[row.key] = {"status": "failed", "reason": f"{type(error).__name__}: {str(error)[:200]}"}
            release_memory(args.device)
            result = results[row.key]
            summary = f"{result['tokens_per_s']:.0f} tokens/s" if result["status"] == "ok" else result["status"]
            print(f"{row.key} {row.name}: {summary} ({time.perf_counter() - started:.0f} s)")

    print()
    print_table(results)
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        record = {"environment": info, "arguments": {**vars(args), "output": str(args.output)}, "results": results}
        args.output.write_text(json.dumps(record, indent=2))
        print(f"\nraw numbers: {args.output}")


if __name__ == "__main__":
    main()
