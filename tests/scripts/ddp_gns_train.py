"""Run by tests/test_gns_ddp.py under ``torchrun --nproc_per_node 2`` (gloo, CPU): train a tiny patched LLaMA with
GNSCallback and write this rank's logged GNS values, batch sizes and final parameters to OUTPUT_DIR/rank{R}.pt."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from transformers import Trainer, TrainingArguments

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from hf_gns_spam import GNSCallback, patch_model
from tests import model_zoo
from tests.test_gns_callback import padded_dataset


def main() -> None:
    output_dir = Path(sys.argv[1])
    schedule = sys.argv[2] if len(sys.argv) > 2 else "none"
    model = model_zoo.build("llama")
    patch_model(model)
    if schedule == "none":
        callback = GNSCallback()
    else:  # the unit is 2 processes x 2 examples per device
        callback = GNSCallback(
            schedule=schedule, min_batch_size=4, max_batch_size=12, warmup_steps=2, update_interval=2
        )
    args = TrainingArguments(
        output_dir=str(output_dir / "trainer"),
        per_device_train_batch_size=2,
        gradient_accumulation_steps=1 if schedule != "none" else 2,
        num_train_epochs=2,
        learning_rate=1e-3,
        optim="stable_spam",
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        seed=0,
        use_cpu=True,
        disable_tqdm=True,
        ddp_backend="gloo",
    )
    trainer = Trainer(model=model, args=args, train_dataset=padded_dataset(size=32), callbacks=[callback])
    first_step_inputs = []

    def record(module, args, kwargs):
        if len(first_step_inputs) < 2:  # the first optimizer step's two micro-batches on this rank
            keep = ("input_ids", "attention_mask", "labels", "num_items_in_batch")
            first_step_inputs.append({k: kwargs[k] for k in keep})

    model.register_forward_pre_hook(record, with_kwargs=True)
    trainer.train()
    rank = int(os.environ.get("RANK", "0"))
    records = [r for r in trainer.state.log_history if "loss" in r]
    torch.save(
        {
            "gns": [r["gns"] for r in records],
            "gns_trace_sigma": [r["gns_trace_sigma"] for r in records],
            "batch_size": [r["batch_size"] for r in records],
            "samples": callback.samples,
            "history": callback.history,
            "first_step_inputs": first_step_inputs,
            "params": {n: p.detach().clone() for n, p in model.named_parameters()},
            "world_size": trainer.accelerator.num_processes,
        },
        output_dir / f"rank{rank}.pt",
    )


if __name__ == "__main__":
    main()
