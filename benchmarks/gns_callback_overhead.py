"""Per-step overhead of patch_model and GNSCallback in a real Trainer run.

Trains the same LLaMA-style model for the same steps three ways and prints the median time per optimizer step and
the ratios: ``baseline`` (unpatched model, no callback), ``patched`` (patch_model only: the norms compute their
per-example statistics) and ``patched+callback`` (the GNS estimate every step, merged into the logs).

    python benchmarks/gns_callback_overhead.py                   # CPU-sized model
    python benchmarks/gns_callback_overhead.py --hidden 1024 --layers 8 --seq 1024 --batch 8   # on a GPU
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch
from datasets import Dataset
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

from hf_gns_spam import GNSCallback, patch_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")


class StepTimer(TrainerCallback):
    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.times.append(time.perf_counter() - self._start)


def build_model(args: argparse.Namespace) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=4 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=max(1, args.hidden // 64),
        max_position_embeddings=args.seq,
    )
    return LlamaForCausalLM(config)


def median_step(args: argparse.Namespace, variant: str, output_dir: str) -> float:
    model = build_model(args)
    callbacks: list[TrainerCallback] = []
    if variant != "baseline":
        patch_model(model)
    if variant == "patched+callback":
        callbacks.append(GNSCallback())
    timer = StepTimer()
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, args.vocab, (args.batch * args.grad_accum * (args.steps + 2), args.seq), generator=generator)
    dataset = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    training = TrainingArguments(
        output_dir=output_dir,
        per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=args.grad_accum,
        max_steps=args.steps,
        optim="adamw_torch",
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        bf16=torch.cuda.is_available(),
        use_cpu=not torch.cuda.is_available(),
    )
    Trainer(model=model, args=training, train_dataset=dataset, callbacks=[*callbacks, timer]).train()
    return statistics.median(timer.times[2:])  # leave out the first steps (allocation, warm-up)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--grad-accum", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=12)
    args = parser.parse_args()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({torch.get_num_threads()} threads)"
    print(f"device={device} torch={torch.__version__} hidden={args.hidden} layers={args.layers} seq={args.seq}")
    print(f"batch={args.batch} x accumulation {args.grad_accum}, {args.steps} steps\n")
    times = {}
    with tempfile.TemporaryDirectory() as output_dir:
        for variant in ("baseline", "patched", "patched+callback"):
            times[variant] = median_step(args, variant, output_dir)
    print(f"{'variant':>18} {'ms/step':>10} {'vs baseline':>12}")
    for variant, seconds in times.items():
        print(f"{variant:>18} {1e3 * seconds:>10.1f} {seconds / times['baseline']:>12.3f}")
    overhead = times["patched+callback"] / times["patched"]
    print(f"\ncallback alone: {overhead:.3f}x the patched step")


if __name__ == "__main__":
    main()
