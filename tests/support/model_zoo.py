"""The one table of model families the tests use: tiny randomly initialised Hugging Face models of many
architectures, built from configs (no downloads).

``ARCHITECTURES`` (each family's config), what each family must give (``EXPECTED_NORMS``, ``EXPECTED_GROUPS``), the
named subsets of families that tests run on, and builders of a model, a batch and a tokenizer. Imports torch alone
at the top (transformers when a builder is called), so that the GPU tests can read the table cheaply."""

from __future__ import annotations

import torch

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

# the norm group ("block", "final" or "other") of each norm module of these architectures (2 layers), by the
# architectures' own names, written out independently of the rule in hf_gns_spam.gns.groups
EXPECTED_GROUPS = {
    "llama": {
        **{f"model.layers.{i}.{n}": "block" for i in range(2) for n in ("input_layernorm", "post_attention_layernorm")},
        "model.norm": "final",
    },
    "gpt2": {
        **{f"transformer.h.{i}.{n}": "block" for i in range(2) for n in ("ln_1", "ln_2")},
        "transformer.ln_f": "final",
    },
    "qwen3": {
        **{f"model.layers.{i}.{n}": "block" for i in range(2) for n in ("input_layernorm", "post_attention_layernorm")},
        **{f"model.layers.{i}.self_attn.{n}": "other" for i in range(2) for n in ("q_norm", "k_norm")},
        "model.norm": "final",
    },
    "opt": {
        **{
            f"model.decoder.layers.{i}.{n}": "block"
            for i in range(2)
            for n in ("self_attn_layer_norm", "final_layer_norm")
        },
        "model.decoder.final_layer_norm": "final",
    },
    "t5": {
        **{f"encoder.block.{i}.layer.{j}.layer_norm": "block" for i in range(2) for j in range(2)},
        **{f"decoder.block.{i}.layer.{j}.layer_norm": "block" for i in range(2) for j in range(3)},
        "encoder.final_layer_norm": "final",
        "decoder.final_layer_norm": "final",
    },
    "bert": {
        "bert.embeddings.LayerNorm": "other",
        **{f"bert.encoder.layer.{i}.{n}.LayerNorm": "block" for i in range(2) for n in ("attention.output", "output")},
        "cls.predictions.transform.LayerNorm": "other",
    },
}  # fmt: skip

# Named subsets of the families, for tests that cannot afford all of them (per-example gradients in float64 with
# torch.func, real Trainer steps, the GPU). Each is chosen for what its families have, not for speed alone.

#: the two norm kinds: RMSNorm without bias (LLaMA) and LayerNorm with weight and bias (GPT-2); every patched norm of
#: both is in the "block" or "final" group (no "other"), so their groups' sums add up to the all-norm sums
BOTH_NORM_KINDS = ("llama", "gpt2")
#: the three formulas of the norm variant table: rms_norm(w), layer_norm, and Gemma's zero-centred rms_norm(1+w)
BOTH_NORM_KINDS_AND_OFFSET = (*BOTH_NORM_KINDS, "gemma")
#: a family for each row of the norm variant table (hf_gns_spam/kernels/norm_variants.py): LLaMA's, OLMo 2's, T5's
#: and Gemma's RMSNorms, and LayerNorm (nn.LayerNorm in both GPT-2 and OPT)
ONE_PER_NORM_VARIANT = ("llama", "gemma", "olmo2", "t5", "gpt2", "opt")


def build(architecture: str, seed: int = 0, **config_overrides) -> torch.nn.Module:
    """A tiny ``architecture`` from its config (``config_overrides`` on top, e.g. ``tie_word_embeddings=True``)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

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


def group_parameters(model: torch.nn.Module, architecture: str, group: str) -> list[str]:
    """The parameter names of the group's norms (from EXPECTED_GROUPS, not from the classification under test)."""
    modules = {m for m, g in EXPECTED_GROUPS[architecture].items() if g == group}
    return [n for n, _ in model.named_parameters() if n.rpartition(".")[0] in modules]


def classification_model():
    """A 2-layer LlamaForSequenceClassification with 3 labels over VOCAB (no download), in eval mode."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_labels=3, pad_token_id=0,
    )  # fmt: skip
    return LlamaForSequenceClassification(config).eval()
