"""Tiny randomly initialised Hugging Face models of many architectures, built from configs (no downloads)."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

VOCAB = 96
_DECODER = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": VOCAB,
    "max_position_embeddings": 64,
    "head_dim": 8,
}
ARCHITECTURES: dict[str, dict] = {
    "llama": {},
    "mistral": {},
    "qwen2": {},
    "qwen3": {},
    "gemma": {},
    "gemma2": {},
    "olmo2": {},
    "gpt2": {
        "n_embd": 32,
        "n_layer": 2,
        "n_head": 4,
        "n_positions": 64,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
    },
    "opt": {"ffn_dim": 64, "word_embed_proj_dim": 32},
    "gpt_neox": {},
    "phi": {},
    "bert": {"is_decoder": True},
    "t5": {"d_model": 32, "d_ff": 64, "d_kv": 8, "num_layers": 2, "num_heads": 4},
}
# normalization modules each architecture has (2 layers), to check that none is silently ignored
EXPECTED_NORMS = {
    "llama": 5,
    "mistral": 5,
    "qwen2": 5,
    "qwen3": 9,
    "gemma": 5,
    "gemma2": 9,
    "olmo2": 9,
    "gpt2": 5,
    "opt": 5,
    "gpt_neox": 5,
    "phi": 3,
    "bert": 6,
    "t5": 12,
}


def build(architecture: str, seed: int = 0, **config_overrides) -> torch.nn.Module:
    """A tiny ``architecture`` from its config (``config_overrides`` on top, e.g. ``tie_word_embeddings=True``)."""
    config = AutoConfig.for_model(architecture, **{**_DECODER, **ARCHITECTURES[architecture], **config_overrides})
    torch.manual_seed(seed)
    if architecture == "t5":
        model = AutoModelForSeq2SeqLM.from_config(config)
    else:
        model = AutoModelForCausalLM.from_config(config)
    # random norm weights, so that a patch that ignored them could not pass
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name.lower() or "ln" in name.split(".")[-2].lower():
                parameter.normal_(0.0, 0.5).add_(1.0 if parameter.dim() == 1 and "bias" not in name else 0.0)
    return model.eval()  # no dropout: the patched and original runs must see the same computation


def batch(architecture: str, batch_size: int = 3, length: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    """Token ids with right padding: example b has length - b real tokens; padded labels are -100."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, VOCAB, (batch_size, length), generator=generator)
    attention_mask = torch.ones(batch_size, length, dtype=torch.long)
    for b in range(batch_size):
        attention_mask[b, length - b :] = 0
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    if architecture == "t5":
        inputs["decoder_input_ids"] = torch.randint(3, VOCAB, (batch_size, length), generator=generator)
    return inputs


def tokenizer():
    """A word-level tokenizer over the VOCAB ids ("t0" … ), "t0" for padding and "t1" for end of text."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t2"))
    backend.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="t0", eos_token="t1", unk_token="t2")
