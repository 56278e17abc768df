"""Run by tests/end_to_end/test_gns_ddp.py (and test_gns_resume.py) under ``torchrun --nproc_per_node 2`` (gloo,
CPU): train a tiny patched LLaMA with GNSCallback (arguments: OUTPUT_DIR [SCHEDULE] [frozen] [save]) and write this
rank's logged GNS values (all norms and per norm group), batch sizes, final parameters, and each optimizer step's
micro-batches and the parameters they saw to OUTPUT_DIR/rank{R}.pt."""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import Trainer, TrainerCallback, TrainingArguments

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from hf_gns_spam import GNSCallback, patch_model, unpatch_model
from tests.support import model_zoo
from tests.support.data import padded_dataset
from tests.support.processes import exit_distributed_script
from tests.support.references import token_losses


class DistributedStepAuditor(TrainerCallback):
    """Checks every optimizer step's all-reduced gradient against a recomputation over both ranks' micro-batches of
    that step: Σ token losses / (label tokens of all of them), each rank computing its part on a copy of the model,
    summed with an all-reduce."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.pending: list[dict[str, torch.Tensor]] = []
        # each optimizer step: this rank's micro-batches and the parameters they were computed at
        self.steps: list[dict] = []
        self.max_relative_error = 0.0
        self.rows = 0
        model.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module, args, kwargs):
        if torch.is_grad_enabled():
            self.pending.append({k: kwargs[k] for k in ("input_ids", "attention_mask", "labels", "num_items_in_batch")})

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        micro_batches, self.pending = self.pending, []
        self.rows += sum(len(m["input_ids"]) for m in micro_batches)
        module = model.module if hasattr(model, "module") else model
        parameters = {n: p.detach().clone() for n, p in module.named_parameters()}  # before the optimizer step
        self.steps.append({"micro_batches": micro_batches, "parameters": parameters})
        reference = copy.deepcopy(module)
        reference._forward_pre_hooks.clear()  # not recorded (the copied hooks)
        unpatch_model(reference)  # the original norms: an independent computation (and no statistics)
        reference.zero_grad(set_to_none=True)
        tokens = sum((m["labels"][:, 1:] != -100).sum() for m in micro_batches)
        dist.all_reduce(tokens)
        for m in micro_batches:
            logits = reference(input_ids=m["input_ids"], attention_mask=m["attention_mask"]).logits
            (token_losses(logits, m["labels"]).sum() / tokens).backward()
        for p, q in zip(module.parameters(), reference.parameters(), strict=True):
            if q.grad is None:  # frozen
                continue
            dist.all_reduce(q.grad)
            error = ((p.grad - q.grad).abs().max() / q.grad.abs().max().clamp_min(1e-12)).item()
            self.max_relative_error = max(self.max_relative_error, error)


def main() -> None:
    output_dir = Path(sys.argv[1])
    schedule = sys.argv[2] if len(sys.argv) > 2 else "none"
    frozen_norms = "frozen" in sys.argv[3:]
    # a checkpoint every 3 steps (tests/end_to_end/test_gns_resume.py resumes one elsewhere)
    save = "save" in sys.argv[3:]
    model = model_zoo.build("llama")
    patch_model(model)
    if frozen_norms:  # as peft's LoRA leaves them: measured through their sinks, averaged over the processes
        for name, parameter in model.named_parameters():
            parameter.requires_grad_("norm" not in name)
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
        save_strategy="steps" if save else "no",
        save_steps=3,
        logging_steps=1,
        seed=0,
        use_cpu=True,
        disable_tqdm=True,
        ddp_backend="gloo",
        max_grad_norm=0.0,  # the auditor reads the gradients after the (here absent) clipping
    )
    size = 32 if schedule == "none" else 30  # with a schedule: data that no batch divides
    auditor = DistributedStepAuditor(model)
    trainer = Trainer(model=model, args=args, train_dataset=padded_dataset(size=size), callbacks=[callback, auditor])
    first_step_inputs = []

    def record(module, args, kwargs):
        if len(first_step_inputs) < 2:  # the first optimizer step's two micro-batches on this rank
            keep = ("input_ids", "attention_mask", "labels", "num_items_in_batch")
            first_step_inputs.append({k: kwargs[k] for k in keep})

    model.register_forward_pre_hook(record, with_kwargs=True)
    trainer.train()
    rank = int(os.environ.get("RANK", "0"))
    records = [r for r in trainer.state.log_history if "loss" in r]
    group_keys = [k for k in records[0] if k.startswith("gns/")] if records else []
    torch.save(
        {
            "gns": [r["gns"] for r in records],
            "gns_trace_sigma": [r["gns_trace_sigma"] for r in records],
            "batch_size": [r["batch_size"] for r in records],
            "groups": {k: [r[k] for r in records] for k in group_keys},  # gns/<group>, _grad_sq, _trace_sigma
            "ema_decay": callback.ema_decay,
            "steps": auditor.steps,
            "samples": callback.samples,
            "history": callback.estimates.history,
            "first_step_inputs": first_step_inputs,
            "params": {n: p.detach().clone() for n, p in model.named_parameters()},
            "world_size": trainer.accelerator.num_processes,
            "max_relative_error": auditor.max_relative_error,
            "rows": auditor.rows,
        },
        output_dir / f"rank{rank}.pt",
    )


if __name__ == "__main__":
    main()
    exit_distributed_script()  # the Trainer's gloo group
