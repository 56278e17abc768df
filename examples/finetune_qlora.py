"""QLoRA fine-tuning with Stable-SPAM and the GNS callback: LoRA adapters on bitsandbytes 4-bit base weights.

    python examples/finetune_qlora.py --model_name_or_path runs/pretrain_clm --output_dir runs/qlora

Loads a causal LM (any Hub id or local path; the main job's output works offline) with NF4 4-bit base weights
(bitsandbytes, CPU or GPU), prepares it for k-bit training, adds LoRA adapters to every linear layer, patches its
normalization layers (frozen here, but measured wherever the backward passes through them: every norm except the
first block's input norm, which reads the frozen embeddings' output; the callback logs ``gns``, ``gns/block`` and
``gns/final``), and trains with ``optim="stable_spam"`` through the Trainer. Data arguments and every
``TrainingArguments`` flag are those of ``examples/pretrain_clm.py``. It writes the adapter, ``metrics.json`` (with
the held-out next-token accuracy, ``eval_accuracy``, from :func:`hf_gns_spam.metrics.causal_lm_accuracy` through
``evaluate``) and ``gns_plot.png``.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

# first: importing hf_gns_spam silences the message bitsandbytes logs when peft imports it on a CPU run
import hf_gns_spam  # isort: split

import torch
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from pretrain_clm import (
    DataArguments,
    GNSArguments,
    causal_lm_trainer,
    gns_callback,
    load_raw_datasets,
    tokenized_blocks,
    truncated,
)
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    HfArgumentParser,
    TrainingArguments,
    set_seed,
)

from hf_gns_spam.plotting import plot_run, training_records

DEFAULT_TRAINING_FLAGS = {
    "--output_dir": "runs/qlora",
    "--optim": "stable_spam",
    "--learning_rate": "1e-3",
    "--num_train_epochs": "1",
    "--per_device_train_batch_size": "8",
    "--logging_steps": "5",
    "--save_strategy": "no",
    "--report_to": "none",
    "--include_num_input_tokens_seen": "true",
    "--seed": "0",
}


@dataclass
class QLoRAArguments:
    model_name_or_path: str = field(metadata={"help": "Hub id or local path of the base model"})
    lora_rank: int = field(default=8, metadata={"help": "LoRA rank r"})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha"})
    compute_dtype: str = field(default="float32", metadata={"help": "4-bit compute dtype: float32 or bfloat16"})


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    for flag, value in DEFAULT_TRAINING_FLAGS.items():
        if flag not in argv:
            argv += [flag, value]
    parser = HfArgumentParser((QLoRAArguments, DataArguments, GNSArguments, TrainingArguments))
    qlora, data_args, gns_args, training = parser.parse_args_into_dataclasses(args=argv)
    set_seed(training.seed)

    tokenizer = AutoTokenizer.from_pretrained(qlora.model_name_or_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    raw = load_raw_datasets(data_args)
    lm_data = truncated(tokenized_blocks(raw, tokenizer, data_args.text_column, data_args.block_size), data_args)

    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=getattr(torch, qlora.compute_dtype)
    )
    device_map = None if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(
        qlora.model_name_or_path, quantization_config=quantization, device_map=device_map
    )
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    lora = LoraConfig(r=qlora.lora_rank, lora_alpha=qlora.lora_alpha, target_modules="all-linear", lora_dropout=0.0)
    model = get_peft_model(model, lora)
    model.print_trainable_parameters()
    report = hf_gns_spam.patch_model(model)
    print(report)

    trainer = causal_lm_trainer(model, tokenizer, lm_data, training, [gns_callback(gns_args, training)])
    trainer.train(resume_from_checkpoint=training.resume_from_checkpoint)
    evaluation = trainer.evaluate()
    trainer.save_model()
    trainer.save_state()
    records = training_records({"log_history": trainer.state.log_history})
    metrics = {
        "first_train_loss": records[0]["loss"],
        "final_train_loss": records[-1]["loss"],
        "eval_loss": evaluation["eval_loss"],
        "eval_accuracy": evaluation["eval_accuracy"],
        "eval_perplexity": math.exp(evaluation["eval_loss"]),
        "perplexity_note": "exp(eval_loss), computed locally (evaluate's perplexity metric needs the Hub)",
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "patched_norms": len(report.patched),
        "history": [{k: r.get(k) for k in ("step", "num_input_tokens_seen", "loss", "batch_size")} for r in records],
    }
    if not trainer.is_world_process_zero():  # several processes (torchrun): one writes
        return metrics
    (Path(training.output_dir) / "metrics.json").write_text(json.dumps(metrics, indent=2))
    plot_run(training.output_dir)
    print(
        f"loss {metrics['first_train_loss']:.3f} -> {metrics['final_train_loss']:.3f}; written to {training.output_dir}"
    )
    return metrics


if __name__ == "__main__":
    main()
