"""Pretrain (or continue training) a causal LM with GNS-aware norms, Stable-SPAM and a GNS-driven batch size.

In the style of transformers' ``run_clm.py``: every ``TrainingArguments`` flag works on the command line. With no
arguments it pretrains a small LLaMA-style model, built from a config, on the Python standard library's own source
files (a real text corpus on every machine, no download), with a byte-level BPE tokenizer trained on that corpus,
``patch_model``, ``optim="stable_spam"`` and ``GNSCallback(schedule="gns")``, in a few minutes on 2 CPU cores:

    python examples/pretrain_clm.py                                  # writes runs/pretrain_clm/
    python examples/pretrain_clm.py --model_name_or_path gpt2 --dataset_name wikitext \\
        --dataset_config_name wikitext-2-raw-v1 --output_dir runs/gpt2 --bf16   # any Hub model / datasets source

Unless ``--baseline none``, it then trains the same model (same seed, data, budget and learning-rate schedule) with
the batch fixed at ``--min_batch_size`` into ``OUTPUT_DIR/baseline_fixed_batch``, and compares: both runs are
evaluated on the held-out blocks at ``--eval_points`` points evenly spaced in training examples, and the comparison
gives the optimizer steps and tokens each needs to reach the scheduled run's final held-out loss.

It announces each run as it starts ("run 1/2: GNS schedule (...) → OUTPUT_DIR", "run 2/2: fixed batch 8 baseline
→ OUTPUT_DIR/baseline_fixed_batch") and its result when it ends, and writes each run's folder as it goes: at each
evaluation point a checkpoint (``checkpoint-STEP``, the latest ``--save_total_limit`` kept; ``--save_strategy``
replaces these with the Trainer's own) and ``metrics.json`` with the run so far (``"complete": false``: the training
and evaluation history), so that an interrupted run can be plotted (``hf-gns-spam plot OUTPUT_DIR`` reads the latest
checkpoint's ``trainer_state.json``) and continued: ``--resume_from_checkpoint true`` keeps the runs whose
``metrics.json`` is complete and continues the others from their latest checkpoint. A job started without it clears
the checkpoints, ``trainer_state.json`` and ``metrics.json`` an earlier job left in the two run folders.

At the end each run's folder holds its model and tokenizer, ``trainer_state.json``, its latest checkpoint and its
``metrics.json`` (final loss, evaluation loss and perplexity, tokens, the GNS and batch-size history, the
evaluations); ``--output_dir``'s ``metrics.json`` also holds the baseline's and the comparison, and ``gns_plot.png``
draws held-out loss against tokens and against optimizer steps, GNS and batch size, both runs overlaid.
``--quantize int4`` trains with the projections fake-quantized to 4 bits (weights and activations, the Stable-SPAM
paper's W4A4 quantization-aware training).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import sys
import sysconfig
import time
from argparse import ArgumentTypeError
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# first: importing hf_gns_spam silences the message bitsandbytes logs when transformers' Trainer imports it
from hf_gns_spam import GNSCallback, patch_model  # isort: split

import datasets
import torch.distributed
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DataCollatorForLanguageModeling,
    HfArgumentParser,
    LlamaConfig,
    PreTrainedTokenizerFast,
    Trainer,
    TrainerCallback,
    TrainerState,
    TrainingArguments,
    set_seed,
)
from transformers.hf_argparser import string_to_bool
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from hf_gns_spam.fake_quant import apply_fake_quantization
from hf_gns_spam.gns.arguments import CALLBACK_DEFAULTS
from hf_gns_spam.metrics import causal_lm_accuracy
from hf_gns_spam.plotting import first_crossing, plot_runs, training_records

DEFAULT_OUTPUT_DIR = "runs/pretrain_clm"
# the main job's TrainingArguments when the command line does not set them
DEFAULT_TRAINING_FLAGS = {
    "--output_dir": DEFAULT_OUTPUT_DIR,
    "--optim": "stable_spam",
    "--learning_rate": "2e-3",
    "--lr_scheduler_type": "cosine",
    "--warmup_steps": "0.05",
    "--num_train_epochs": "1",
    "--per_device_train_batch_size": "8",
    "--per_device_eval_batch_size": "32",
    "--logging_steps": "5",
    "--eval_strategy": "no",
    "--save_strategy": "no",  # the job saves at its evaluation points (JobArguments.save_at_eval_points)
    "--save_total_limit": "1",
    "--report_to": "none",
    "--include_num_input_tokens_seen": "true",
    "--seed": "0",
}


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Hub id or local path to start from; default: a new small LLaMA"}
    )
    tokenizer_name: str | None = field(default=None, metadata={"help": "tokenizer (default: the model's)"})
    hidden_size: int = field(default=128, metadata={"help": "new model: hidden size"})
    num_hidden_layers: int = field(default=4, metadata={"help": "new model: layers"})
    num_attention_heads: int = field(default=4, metadata={"help": "new model: attention heads"})
    intermediate_size: int = field(default=344, metadata={"help": "new model: MLP width"})
    vocab_size: int = field(default=2048, metadata={"help": "new tokenizer: byte-level BPE vocabulary size"})
    quantize: str = field(
        default="none",
        metadata={
            "help": "none, or int4: train with the q/k/v/o/gate/up/down projections' weights and inputs fake-"
            "quantized to 4 bits (the Stable-SPAM paper's W4A4 setting, hf_gns_spam.fake_quant)"
        },
    )
    quantize_group_size: int = field(default=256, metadata={"help": "--quantize: elements per quantization group"})


@dataclass
class DataArguments:
    dataset_name: str | None = field(default=None, metadata={"help": "a `datasets` dataset name"})
    dataset_config_name: str | None = field(default=None, metadata={"help": "its configuration"})
    train_file: str | None = field(default=None, metadata={"help": "a local .txt/.json/.csv training file"})
    validation_file: str | None = field(default=None, metadata={"help": "a local validation file"})
    text_column: str = field(default="text", metadata={"help": "the column holding the text"})
    block_size: int = field(default=128, metadata={"help": "tokens per training example"})
    validation_split_percentage: int = field(default=5, metadata={"help": "held out when there is no validation"})
    max_corpus_bytes: int = field(
        default=2_000_000, metadata={"help": "default corpus: bytes of the standard library's .py files to use"}
    )
    max_train_examples: int | None = field(default=None, metadata={"help": "truncate the training set"})
    max_eval_examples: int | None = field(default=None, metadata={"help": "truncate the evaluation set"})


@dataclass
class GNSArguments:
    schedule: str = field(default="gns", metadata={"help": "batch-size schedule: none, linear or gns"})
    min_batch_size: int | None = field(default=None, metadata={"help": "default: micro-batch x processes"})
    max_batch_size: int | None = field(default=None, metadata={"help": "default: 8 x min_batch_size"})
    gns_warmup_steps: float = field(
        default=CALLBACK_DEFAULTS["warmup_steps"],
        metadata={"help": "no change before this many optimizer steps (>= 1) or this fraction of the data (< 1)"},
    )
    gns_update_interval: int = field(
        default=CALLBACK_DEFAULTS["update_interval"], metadata={"help": "optimizer steps between changes"}
    )
    gns_multiplier: float = field(
        default=CALLBACK_DEFAULTS["gns_multiplier"], metadata={"help": "batch target = multiplier x GNS"}
    )
    gns_lr_batch_power: float = field(
        default=CALLBACK_DEFAULTS["lr_batch_power"],
        metadata={"help": "learning rate x (batch / min_batch_size)^power on top of its schedule"},
    )
    gns_ema_decay: float = field(
        default=CALLBACK_DEFAULTS["ema_decay"], metadata={"help": "EMA decay of |G|^2 and tr(Sigma)"}
    )
    gns_signal: str = field(
        default=CALLBACK_DEFAULTS["gns_signal"],
        metadata={"help": "the GNS the batch follows: block (the per-block norms'), all, final or other"},
    )


@dataclass
class JobArguments:
    baseline: str = field(
        default="fixed",
        metadata={
            "help": "fixed: also train the same model on the same data and budget with a fixed batch of "
            "min_batch_size, and compare (loss against tokens and optimizer steps); none: the scheduled run only"
        },
    )
    eval_points: int = field(
        default=12, metadata={"help": "held-out evaluations per run, evenly spaced in training examples"}
    )
    save_at_eval_points: bool | None = field(
        default=None,
        metadata={
            "help": "save a checkpoint at each evaluation point (the latest --save_total_limit kept); "
            "default: true unless --save_strategy is given"
        },
    )


def standard_library_corpus(max_bytes: int) -> datasets.Dataset:
    """The Python standard library's top-level .py files, one example each, up to ``max_bytes`` in total."""
    root = Path(sysconfig.get_paths()["stdlib"])
    texts, total = [], 0
    for path in sorted(root.glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        texts.append(text[: max_bytes - total])
        total += len(texts[-1])
        if total >= max_bytes:
            break
    return datasets.Dataset.from_dict({"text": texts})


def load_raw_datasets(data: DataArguments) -> datasets.DatasetDict:
    if data.dataset_name is not None:
        raw = datasets.load_dataset(data.dataset_name, data.dataset_config_name)
    elif data.train_file is not None:
        files = {"train": data.train_file}
        if data.validation_file is not None:
            files["validation"] = data.validation_file
        extension = data.train_file.rsplit(".", 1)[-1]
        raw = datasets.load_dataset("text" if extension == "txt" else extension, data_files=files)
    else:
        raw = datasets.DatasetDict({"train": standard_library_corpus(data.max_corpus_bytes)})
    if "validation" not in raw:
        split = raw["train"].train_test_split(test_size=data.validation_split_percentage / 100, seed=0)
        raw = datasets.DatasetDict({"train": split["train"], "validation": split["test"]})
    return raw


def train_byte_level_tokenizer(texts: datasets.Dataset, column: str, vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on the training texts (no download)."""
    from tokenizers import ByteLevelBPETokenizer

    tokenizer = ByteLevelBPETokenizer()
    batches = (texts[i : i + 256][column] for i in range(0, len(texts), 256))
    tokenizer.train_from_iterator(batches, vocab_size=vocab_size, min_frequency=2, special_tokens=["<|endoftext|>"])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<|endoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )


def tokenized_blocks(raw: datasets.DatasetDict, tokenizer, column: str, block_size: int) -> datasets.DatasetDict:
    """run_clm's preprocessing: tokenize, append EOS, concatenate, cut into blocks of ``block_size`` tokens."""

    def tokenize(batch):
        return tokenizer([text + tokenizer.eos_token for text in batch[column]])

    def group(batch):
        joined = list(chain(*batch["input_ids"]))
        length = len(joined) // block_size * block_size
        blocks = [joined[i : i + block_size] for i in range(0, length, block_size)]
        return {"input_ids": blocks, "attention_mask": [[1] * block_size for _ in blocks]}

    columns = raw["train"].column_names
    tokens = raw.map(tokenize, batched=True, remove_columns=columns, desc="tokenizing")
    return tokens.map(group, batched=True, remove_columns=tokens["train"].column_names, desc="grouping")


def truncated(lm_data: datasets.DatasetDict, data: DataArguments) -> datasets.DatasetDict:
    """Apply --max_train_examples / --max_eval_examples."""
    for split, limit in (("train", data.max_train_examples), ("validation", data.max_eval_examples)):
        if limit is not None:
            lm_data[split] = lm_data[split].select(range(min(limit, len(lm_data[split]))))
    return lm_data


def prepare_data(model_args: ModelArguments, data_args: DataArguments) -> tuple:
    """The tokenizer (the model's, or a byte-level BPE trained on the training texts) and the training and
    validation blocks."""
    raw = load_raw_datasets(data_args)
    if model_args.tokenizer_name or model_args.model_name_or_path:
        tokenizer = AutoTokenizer.from_pretrained(model_args.tokenizer_name or model_args.model_name_or_path)
    else:
        tokenizer = train_byte_level_tokenizer(raw["train"], data_args.text_column, model_args.vocab_size)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    lm_data = truncated(tokenized_blocks(raw, tokenizer, data_args.text_column, data_args.block_size), data_args)
    return tokenizer, lm_data


def given(argv: list[str], flag: str) -> bool:
    """Whether the command line sets ``flag`` (``--flag value`` or ``--flag=value``)."""
    return any(arg == flag or arg.startswith(f"{flag}=") for arg in argv)


def parse_arguments(
    argv: list[str],
) -> tuple[ModelArguments, DataArguments, GNSArguments, JobArguments, TrainingArguments]:
    """The command line's arguments, with the main job's ``TrainingArguments`` defaults where it sets none."""
    defaults = [
        item for flag, value in DEFAULT_TRAINING_FLAGS.items() if not given(argv, flag) for item in (flag, value)
    ]
    parser = HfArgumentParser((ModelArguments, DataArguments, GNSArguments, JobArguments, TrainingArguments))
    model_args, data_args, gns_args, job_args, training = parser.parse_args_into_dataclasses(args=[*argv, *defaults])
    if job_args.save_at_eval_points is None:
        job_args.save_at_eval_points = not given(argv, "--save_strategy")
    return model_args, data_args, gns_args, job_args, training


def build_model(model_args: ModelArguments, tokenizer, block_size: int):
    if model_args.model_name_or_path is not None:
        model = AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path)
        if model.get_input_embeddings().num_embeddings < len(tokenizer):
            model.resize_token_embeddings(len(tokenizer))
        return model
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=model_args.hidden_size,
        intermediate_size=model_args.intermediate_size,
        num_hidden_layers=model_args.num_hidden_layers,
        num_attention_heads=model_args.num_attention_heads,
        num_key_value_heads=model_args.num_attention_heads,
        max_position_embeddings=max(block_size, 128),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    return AutoModelForCausalLM.from_config(config)


QUANTIZATION_BITS = {"none": None, "int4": 4}


def quantize_model(model, quantize: str, group_size: int) -> list[str]:
    """Apply ``--quantize`` (fake quantization of the projections for quantization-aware training); returns the
    quantized layers' names."""
    if quantize not in QUANTIZATION_BITS:
        raise ValueError(f"--quantize must be one of {list(QUANTIZATION_BITS)}, got {quantize!r}")
    bits = QUANTIZATION_BITS[quantize]
    if bits is None:
        return []
    return apply_fake_quantization(model, bits=bits, group_size=group_size)


def min_batch_size(gns_args: GNSArguments, training: TrainingArguments) -> int:
    """--min_batch_size, by default the batch the TrainingArguments give (micro-batch x accumulation x processes)."""
    unit = training.per_device_train_batch_size * training.world_size
    return gns_args.min_batch_size or unit * training.gradient_accumulation_steps


def gns_callback(gns_args: GNSArguments, training: TrainingArguments) -> GNSCallback:
    if gns_args.schedule == "none":
        return GNSCallback(ema_decay=gns_args.gns_ema_decay)
    minimum = min_batch_size(gns_args, training)
    return GNSCallback(
        schedule=gns_args.schedule,
        min_batch_size=minimum,
        max_batch_size=gns_args.max_batch_size or 8 * minimum,
        warmup_steps=gns_args.gns_warmup_steps,
        update_interval=gns_args.gns_update_interval,
        gns_multiplier=gns_args.gns_multiplier,
        lr_batch_power=gns_args.gns_lr_batch_power,
        ema_decay=gns_args.gns_ema_decay,
        gns_signal=gns_args.gns_signal,
    )


def causal_lm_trainer(
    model, tokenizer, lm_data: datasets.DatasetDict, training: TrainingArguments, callbacks: list
) -> Trainer:
    """A Trainer for causal language modelling on ``lm_data``'s train and validation blocks; its evaluations report
    the next-token accuracy (``eval_accuracy``) beside the loss."""
    compute_metrics, preprocess_logits_for_metrics = causal_lm_accuracy()
    return Trainer(
        model=model,
        args=training,
        train_dataset=lm_data["train"],
        eval_dataset=lm_data["validation"],
        processing_class=tokenizer,
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
        callbacks=callbacks,
        compute_metrics=compute_metrics,
        preprocess_logits_for_metrics=preprocess_logits_for_metrics,
    )


class EvaluateAtExamples(TrainerCallback):
    """Evaluates on the held-out set when the examples consumed (all processes, from the ``GNSCallback``) first
    reach each of ``points``, so that runs with different batch sizes are compared at the same data; with ``save``,
    also saves a checkpoint there. A run continued from a checkpoint skips the points its examples already passed."""

    def __init__(self, points: list[int], gns_callback: GNSCallback, save: bool = False):
        self.points, self.gns_callback, self.save = sorted(points), gns_callback, save
        self.next = 0

    def _reached(self, start: int) -> int:
        """How many of the points the examples consumed so far have reached (``start`` of them known to be)."""
        reached = start
        while reached < len(self.points) and self.gns_callback.samples >= self.points[reached]:
            reached += 1
        return reached

    def on_train_begin(self, args, state, control, **kwargs):
        # continuing from a checkpoint, the GNSCallback has restored its examples before this event
        self.next = self._reached(0) if state.global_step > 0 else 0

    def on_step_end(self, args, state, control, **kwargs):
        reached = self._reached(self.next)
        if reached > self.next:
            control.should_evaluate = True
            control.should_save = control.should_save or self.save
            self.next = reached


def write_json(path: Path, data: dict) -> None:
    """Write ``data`` to ``path`` through a temporary file, so that an interruption never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.tmp")
    partial.write_text(json.dumps(data, indent=2, allow_nan=True))
    partial.replace(path)


def run_progress(state: TrainerState) -> dict:
    """A run's record so far: optimizer steps, tokens, the logged training history and the held-out evaluations."""
    records = training_records({"log_history": state.log_history})
    return {
        "optimizer_steps": state.global_step,
        "train_tokens": state.num_input_tokens_seen,
        "history": [
            {
                key: record.get(key)
                for key in ("step", "num_input_tokens_seen", "loss", "gns", "gns_tokens", "batch_size")
            }
            for record in records
        ],
        "evaluations": evaluations(state.log_history),
    }


class MetricsSoFar(TrainerCallback):
    """Writes the run so far to ``OUTPUT_DIR/metrics.json`` (``"complete": false`` and :func:`run_progress`) after
    each evaluation, so that an interrupted run leaves its history; the run's end replaces it with the whole."""

    def on_evaluate(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            write_json(Path(args.output_dir) / "metrics.json", {"complete": False, **run_progress(state)})


def evaluation_points(lm_data: datasets.DatasetDict, training: TrainingArguments, count: int) -> list[int]:
    """``count`` points evenly spaced over the run's training examples (its budget)."""
    if training.max_steps > 0:
        batch = training.per_device_train_batch_size * training.gradient_accumulation_steps * training.world_size
        budget = training.max_steps * batch
    else:
        budget = math.floor(len(lm_data["train"]) * training.num_train_epochs)
    return [max(1, round(budget * (i + 1) / count)) for i in range(count)]


def evaluations(log_history: list[dict]) -> list[dict]:
    """The run's held-out evaluations: optimizer step, tokens seen, loss."""
    return [
        {"step": r["step"], "tokens": r.get("num_input_tokens_seen"), "loss": r["eval_loss"]}
        for r in log_history
        if "eval_loss" in r
    ]


def compare_to_baseline(run: list[dict], baseline: list[dict]) -> dict:
    """Optimizer steps and tokens the scheduled run and the fixed-batch baseline need to reach the scheduled run's
    final held-out loss (interpolated between evaluations), and the steps saved, 1 − steps(run)/steps(baseline)."""
    target = run[-1]["loss"]

    def reach(evals: list[dict], key: str) -> float | None:
        return first_crossing([e[key] for e in evals], [e["loss"] for e in evals], target)

    result = {"target_loss": target}
    for key, name in (("step", "steps"), ("tokens", "tokens")):
        ours, theirs = reach(run, key), reach(baseline, key)
        result[f"run_{name}"], result[f"baseline_{name}"] = ours, theirs
        result[f"{name}_saved"] = None if ours is None or theirs is None or theirs == 0 else 1 - ours / theirs
    return result


def train_evaluate_save(model, tokenizer, lm_data: datasets.DatasetDict, training: TrainingArguments, callbacks):
    """Train a causal LM on ``lm_data`` with the Trainer (continuing from ``training.resume_from_checkpoint`` if
    set), evaluate it, save the model and trainer_state.json.

    Returns (trainer, train output, evaluation metrics).
    """
    trainer = causal_lm_trainer(model, tokenizer, lm_data, training, callbacks)
    result = trainer.train(resume_from_checkpoint=training.resume_from_checkpoint)
    evaluation = trainer.evaluate()
    trainer.save_model()
    trainer.save_state()
    return trainer, result, evaluation


def train_run(
    model_args: ModelArguments,
    data_args: DataArguments,
    tokenizer,
    lm_data: datasets.DatasetDict,
    training: TrainingArguments,
    callback: GNSCallback,
    job: JobArguments,
) -> dict:
    """Build the model (from the seed), quantize and patch it, train (writing checkpoints and the metrics so far as
    it goes), evaluate, save, and write the run's ``metrics.json`` (``"complete": true``).

    Returns the run's metrics."""
    set_seed(training.seed)
    model = build_model(model_args, tokenizer, data_args.block_size)
    quantized = quantize_model(model, model_args.quantize, model_args.quantize_group_size)
    report = patch_model(model)
    if training.process_index == 0:
        print(report)
        if quantized:
            print(f"fake-quantized to {model_args.quantize}: {len(quantized)} linear layers")
    clock = EvaluateAtExamples(evaluation_points(lm_data, training, job.eval_points), callback, job.save_at_eval_points)
    trainer, result, evaluation = train_evaluate_save(
        model, tokenizer, lm_data, training, [callback, clock, MetricsSoFar()]
    )
    records = training_records({"log_history": trainer.state.log_history})
    metrics = {
        "complete": True,
        "final_train_loss": records[-1]["loss"] if records else math.nan,
        "first_train_loss": records[0]["loss"] if records else math.nan,
        "train_loss_mean": result.training_loss,
        "eval_loss": evaluation["eval_loss"],
        "eval_accuracy": evaluation["eval_accuracy"],
        # evaluate's "perplexity" metric downloads a model from the Hub; the perplexity of this model on the
        # evaluation blocks is exp(mean token cross-entropy), computed here from the Trainer's eval_loss
        "eval_perplexity": math.exp(evaluation["eval_loss"]),
        "perplexity_note": "exp(eval_loss), computed locally (evaluate's perplexity metric needs the Hub)",
        "patched_norms": len(report.patched),
        "quantized_layers": len(quantized),
        "output_dir": training.output_dir,
        **run_progress(trainer.state),
    }
    if trainer.is_world_process_zero():
        write_json(Path(training.output_dir) / "metrics.json", metrics)
    return metrics


@dataclass
class Run:
    """One training run of the job: its label (in the plot), what it is (for its announcement), its arguments and
    its GNSCallback."""

    label: str
    description: str
    training: TrainingArguments
    callback: GNSCallback


def schedule_description(gns_args: GNSArguments, minimum: int) -> str:
    """The scheduled run in words, e.g. ``GNS schedule (batch 8 to 64, 0.75 × GNS of the block norms, learning rate ×
    (B/8)^0.5)``."""
    if gns_args.schedule == "none":
        return f"fixed batch {minimum}, GNS measured"
    rule = f"batch {minimum} to {gns_args.max_batch_size or 8 * minimum}"
    if gns_args.schedule == "gns":
        rule += f", {gns_args.gns_multiplier:g} × GNS of the {gns_args.gns_signal} norms"
    if gns_args.gns_lr_batch_power:
        rule += f", learning rate × (B/{minimum})^{gns_args.gns_lr_batch_power:g}"
    return f"{'GNS' if gns_args.schedule == 'gns' else gns_args.schedule} schedule ({rule})"


def job_runs(gns_args: GNSArguments, job: JobArguments, training: TrainingArguments) -> list[Run]:
    """The scheduled run into ``--output_dir`` and, with ``--baseline fixed``, the same model, seed, data, budget
    and learning-rate schedule with the batch fixed at min_batch_size, into ``OUTPUT_DIR/baseline_fixed_batch``."""
    minimum = min_batch_size(gns_args, training)
    runs = [
        Run(
            f"{gns_args.schedule} schedule",
            schedule_description(gns_args, minimum),
            training,
            gns_callback(gns_args, training),
        )
    ]
    if job.baseline == "fixed" and gns_args.schedule != "none":
        unit = training.per_device_train_batch_size * training.world_size
        if minimum % unit:
            raise ValueError(f"--min_batch_size {minimum} is not a multiple of micro-batch x processes ({unit})")
        baseline_args = dataclasses.replace(
            training,
            output_dir=str(Path(training.output_dir) / "baseline_fixed_batch"),
            gradient_accumulation_steps=minimum // unit,
        )
        measuring = GNSCallback(ema_decay=gns_args.gns_ema_decay)
        runs.append(Run(f"fixed batch {minimum}", f"fixed batch {minimum} baseline", baseline_args, measuring))
    return runs


def continues_job(training: TrainingArguments) -> bool:
    """Whether ``--resume_from_checkpoint`` asks to continue the job (``true``; not given or ``false``: start it)."""
    value = training.resume_from_checkpoint
    if value is None:
        return False
    try:
        return string_to_bool(value)
    except ArgumentTypeError:
        raise ValueError(
            f"--resume_from_checkpoint {value!r}: the main job continues with --resume_from_checkpoint true (each run "
            "from the latest checkpoint in its own folder, the runs whose metrics.json is complete kept)"
        ) from None


def clear_progress(folder: Path) -> list[str]:
    """Remove what an earlier job left in a run's folder that would pass for this run's progress until the run
    replaces it: its checkpoints (continuing picks the highest-numbered), ``trainer_state.json`` (``hf-gns-spam
    plot`` reads it before any checkpoint's) and ``metrics.json`` (continuing keeps a run whose metrics.json is
    complete). Returns the names removed."""
    removed = []
    for path in sorted(folder.glob(f"{PREFIX_CHECKPOINT_DIR}-*")):
        if path.is_dir():
            shutil.rmtree(path)
            removed.append(path.name)
    for name in ("trainer_state.json", "metrics.json"):
        if (folder / name).is_file():
            (folder / name).unlink()
            removed.append(name)
    return removed


def interrupted_progress(folder: Path) -> list[str]:
    """What an interrupted run left in ``folder``: its checkpoints and metrics.json while that metrics.json is not
    complete (a finished run's folder, or an empty one, gives []; a metrics.json without ``complete`` was written at
    the end of a job, before the job wrote its metrics as it went)."""
    metrics = folder / "metrics.json"
    if metrics.is_file() and json.loads(metrics.read_text()).get("complete", True):
        return []
    left = sorted(path.name for path in folder.glob(f"{PREFIX_CHECKPOINT_DIR}-*") if path.is_dir())
    return left + ["metrics.json"] * metrics.is_file()


def completed_run(folder: Path) -> dict | None:
    """The metrics of a run that finished in ``folder`` (its metrics.json is complete), else None."""
    path = folder / "metrics.json"
    if not path.is_file():
        return None
    metrics = json.loads(path.read_text())
    if not metrics.get("complete"):
        return None
    return {key: value for key, value in metrics.items() if key not in ("baseline", "comparison")}


def announce(message: str, training: TrainingArguments) -> None:
    """Print a line of the job's progress on the main process, at once (also when stdout is a pipe)."""
    if training.process_index == 0:
        print(message, flush=True)


def duration(seconds: float) -> str:
    """``1 h 2 min``, ``3 min 4 s`` or ``5 s``."""
    minutes, seconds = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours} h {minutes} min"
    return f"{minutes} min {seconds} s" if minutes else f"{seconds} s"


def run_summary(metrics: dict) -> str:
    """A finished run's result in one line."""
    return (
        f"training loss {metrics['first_train_loss']:.3f} -> {metrics['final_train_loss']:.3f}, held-out loss "
        f"{metrics['eval_loss']:.3f} (perplexity {metrics['eval_perplexity']:.2f}, next-token accuracy "
        f"{metrics['eval_accuracy']:.3f}), {metrics['train_tokens']:,} tokens, "
        f"{metrics['optimizer_steps']} optimizer steps"
    )


def main(argv: list[str] | None = None) -> dict:
    """The main job (the module docstring): its runs, one after the other, then the comparison and the plot.

    Returns the scheduled run's metrics, with the baseline's and the comparison under ``baseline`` and
    ``comparison``."""
    model_args, data_args, gns_args, job, training = parse_arguments(list(sys.argv[1:] if argv is None else argv))
    if job.baseline not in ("fixed", "none"):
        raise ValueError(f"--baseline must be fixed or none, got {job.baseline!r}")
    continuing = continues_job(training)
    set_seed(training.seed)
    tokenizer, lm_data = prepare_data(model_args, data_args)
    runs = job_runs(gns_args, job, training)
    if not continuing:
        # a finished job's files are replaced by this one; an interrupted job's progress is never thrown away
        for run in runs:
            left = interrupted_progress(Path(run.training.output_dir))
            if left:
                raise FileExistsError(
                    f"{run.training.output_dir} holds an interrupted job's progress ({', '.join(left)}): continue it "
                    "with --resume_from_checkpoint true, or start afresh in another --output_dir (or after removing "
                    "that folder)"
                )
    if not continuing and training.process_index == 0:
        for run in runs:
            removed = clear_progress(Path(run.training.output_dir))
            if removed:
                print(f"removed an earlier job's {', '.join(removed)} from {run.training.output_dir}", flush=True)

    results = []
    for index, run in enumerate(runs, start=1):
        folder = Path(run.training.output_dir)
        header = f"run {index}/{len(runs)}: {run.description} → {folder}"
        kept = completed_run(folder) if continuing else None
        if kept is not None:
            announce(f"{header}: already complete (its metrics.json), not trained again", training)
            results.append(kept)
            continue
        checkpoint = get_last_checkpoint(folder) if continuing and folder.is_dir() else None
        announce(header + (f", continuing from {Path(checkpoint).name}" if checkpoint else ""), training)
        started = time.monotonic()
        arguments = dataclasses.replace(run.training, resume_from_checkpoint=checkpoint)
        results.append(train_run(model_args, data_args, tokenizer, lm_data, arguments, run.callback, job))
        announce(
            f"run {index}/{len(runs)} done in {duration(time.monotonic() - started)}: {run_summary(results[-1])}",
            training,
        )

    metrics = results[0]
    if len(runs) == 2:
        metrics["baseline"] = results[1]
        metrics["comparison"] = compare_to_baseline(metrics["evaluations"], results[1]["evaluations"])
    if training.process_index != 0:  # several processes (torchrun): one writes
        return metrics
    write_json(Path(training.output_dir) / "metrics.json", metrics)
    plot = plot_runs({run.label: run.training.output_dir for run in runs}, Path(training.output_dir) / "gns_plot.png")
    print(f"model, metrics.json and {plot.name} written to {training.output_dir}")
    if "comparison" in metrics:
        comparison = metrics["comparison"]
        steps = comparison["baseline_steps"]
        print(
            f"to its final held-out loss {comparison['target_loss']:.3f}: {comparison['run_steps']:.0f} optimizer "
            + (
                f"steps against the fixed batch's {steps:.0f} ({100 * comparison['steps_saved']:+.1f}% saved)"
                if steps is not None
                else "steps; the fixed batch never reaches it"
            )
        )
    return metrics


if __name__ == "__main__":
    main()
    # under torchrun the Trainer created a gloo/NCCL process group: left to the interpreter's shutdown it can abort
    # the process ("terminate called without an active exception") after a successful run
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
