"""A training script that knows nothing of hf_gns_spam, in the style of transformers' examples: HfArgumentParser,
TrainingArguments and a Trainer, a tiny LLaMA built from a config and a learnable dataset (no downloads).

tests/end_to_end/test_launch.py runs it through ``hf-gns-spam launch``; plain python would reject
``--optim stable_spam``. It imports a module from its own folder, as scripts do, which needs sys.path[0] to be that
folder.
"""

from dataclasses import dataclass

from plain_trainer_data import counting_dataset
from transformers import HfArgumentParser, LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments


@dataclass
class ModelArguments:
    hidden_size: int = 32
    num_examples: int = 64


def main() -> None:
    model_args, training_args = HfArgumentParser((ModelArguments, TrainingArguments)).parse_args_into_dataclasses()
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=model_args.hidden_size,
        intermediate_size=2 * model_args.hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    model = LlamaForCausalLM(config)
    trainer = Trainer(model=model, args=training_args, train_dataset=counting_dataset(model_args.num_examples))
    trainer.train()
    trainer.save_state()


if __name__ == "__main__":
    main()
