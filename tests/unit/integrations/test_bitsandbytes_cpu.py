"""bitsandbytes 4-bit layers evaluate and keep training after an evaluation on CPUs with AVX512-BF16.

bitsandbytes repacks a ``Linear4bit`` weight for its CPU inference kernel in eval mode without gradients when the
module was built with ``support_avx512bf16_for_cpu`` on (from ``has_avx512bf16()``); see
``hf_gns_spam/integrations/bitsandbytes_cpu.py``. The ``has_avx512bf16`` fixture (conftest) builds the layers as
such a CPU would, so that the tests take that branch on any CPU.
"""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from torch import nn

from hf_gns_spam import patch_model, unpatch_model
from hf_gns_spam.integrations.bitsandbytes_cpu import (
    REPACKING_SWITCH,
    CPURepackingError,
    disable_cpu_weight_repacking,
)
from tests.support import model_zoo

bnb = pytest.importorskip("bitsandbytes")


def four_bit_stack(widths: list[int], trainable_bias: bool = False, seed: int = 0) -> nn.Sequential:
    """NF4 ``Linear4bit`` layers (fp32 compute) of the given widths in sequence, quantized on the CPU."""
    torch.manual_seed(seed)
    layers = []
    for fan_in, fan_out in itertools.pairwise(widths):
        layer = bnb.nn.Linear4bit(fan_in, fan_out, compute_dtype=torch.float32, quant_type="nf4")
        layer.load_state_dict(nn.Linear(fan_in, fan_out).state_dict())
        layer = layer.to("cpu")  # quantizes the weight
        layer.bias.requires_grad_(trainable_bias)
        layers.append(layer)
    return nn.Sequential(*layers)


def input_and_bias_grads(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """One training forward/backward in train mode: the gradients of the input and of the trainable biases."""
    model.train()
    x = x.clone().requires_grad_()
    model(x).square().sum().backward()
    return [x.grad] + [p.grad for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize(
    ("widths", "trainable_bias"),
    [
        ([32, 64, 64, 48], False),  # narrower than a quantization block (32 < 64) and out_features % 32 != 0
        ([64, 64, 128], True),  # widths the repacking accepts; a trainable bias (peft bias="all")
    ],
)
def test_patched_4bit_layers_evaluate_and_then_train_exactly(has_avx512bf16, widths, trainable_bias):
    has_avx512bf16(True)
    stack = four_bit_stack(widths, trainable_bias)
    assert all(getattr(layer, REPACKING_SWITCH) for layer in stack)  # the branch is taken
    never_evaluated = copy.deepcopy(stack)

    report = patch_model(stack)
    assert "repacking" not in str(report)  # a step of its own, not in the norm report
    assert disable_cpu_weight_repacking(stack) == [str(i) for i in range(len(stack))]  # turned off by patch_model

    x = torch.randn(5, widths[0], generator=torch.Generator().manual_seed(1))
    stack.eval()
    with torch.no_grad():  # Trainer.evaluate; repacked layers would fail here or lose their backward
        evaluated = stack(x)
    assert not any(getattr(layer.weight.quant_state, "packing_format_for_cpu", False) for layer in stack)
    torch.testing.assert_close(evaluated, never_evaluated.train()(x), rtol=0, atol=0)

    # training after the evaluation: every gradient as in a model that was never evaluated
    expected = input_and_bias_grads(never_evaluated, x)
    measured = input_and_bias_grads(stack, x)
    assert len(measured) == (1 + len(stack) if trainable_bias else 1)
    for grad, reference in zip(measured, expected, strict=True):
        assert grad is not None
        torch.testing.assert_close(grad, reference, rtol=0, atol=0)


def test_qlora_model_evaluates_and_trains_after_evaluation(tmp_path, has_avx512bf16):
    """The tiny LLaMA (hidden 32) with NF4 base weights and LoRA: evaluation, then LoRA gradients as without it."""
    has_avx512bf16(True)
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    model_zoo.build("llama").save_pretrained(tmp_path)
    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    )
    base = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=quantization, device_map="cpu")
    base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
    lora = LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.0, init_lora_weights=False)  # B ≠ 0
    model = get_peft_model(base, lora)
    never_evaluated = copy.deepcopy(model)
    patch_model(model)
    disabled = disable_cpu_weight_repacking(model)  # those patch_model turned off
    assert len(disabled) == 2 * 7  # q, k, v, o, gate, up, down in each of the two layers
    assert all(".base_layer" in name for name in disabled)

    inputs = model_zoo.batch("llama")
    model.eval()
    with torch.no_grad():
        evaluation_loss = model(**inputs).loss
    assert torch.isfinite(evaluation_loss)

    def lora_grads(peft_model: nn.Module) -> dict[str, torch.Tensor]:
        peft_model.train()
        peft_model(**inputs).loss.backward()
        return {n: p.grad for n, p in peft_model.named_parameters() if "lora_" in n}

    expected, measured = lora_grads(never_evaluated), lora_grads(model)
    assert len(measured) == 4 * 7 and expected.keys() == measured.keys()
    for name, grad in measured.items():  # the lowest layers' adapters too: gradients pass through 4-bit layers
        assert grad is not None and grad.abs().sum() > 0, name
        torch.testing.assert_close(grad, expected[name], rtol=1e-5, atol=1e-7, msg=name)


def test_a_weight_repacked_before_patching_is_refused(has_avx512bf16):
    has_avx512bf16(True)
    stack = four_bit_stack([64, 64])
    repack = getattr(bnb.functional, "_convert_weight_packed_for_cpu", None)
    if repack is None:
        pytest.skip(f"bitsandbytes {bnb.__version__} does not repack 4-bit weights for the CPU")
    layer = stack[0]
    layer.weight.data, layer.weight.quant_state = repack(layer.weight.data, layer.weight.quant_state)  # as eval does
    with pytest.raises(CPURepackingError, match=r"'0' has already been repacked .* call hf_gns_spam.patch_model"):
        patch_model(stack)


def test_a_bitsandbytes_without_the_switch_is_refused_where_it_repacks(has_avx512bf16):
    has_avx512bf16(True)
    if not hasattr(bnb.functional, "_convert_weight_packed_for_cpu"):
        pytest.skip(f"bitsandbytes {bnb.__version__} does not repack 4-bit weights for the CPU")
    stack = four_bit_stack([64, 64])
    delattr(stack[0], REPACKING_SWITCH)
    with pytest.raises(CPURepackingError, match=r"has no 'support_avx512bf16_for_cpu' switch"):
        patch_model(stack)
    has_avx512bf16(False)  # a CPU that bitsandbytes would not repack on: nothing to refuse
    assert disable_cpu_weight_repacking(stack) == []


def test_nothing_changes_where_bitsandbytes_would_not_repack(has_avx512bf16):
    has_avx512bf16(False)
    stack = four_bit_stack([64, 64])
    patch_model(stack)
    assert disable_cpu_weight_repacking(stack) == []
    assert not getattr(stack[0], REPACKING_SWITCH)
    assert disable_cpu_weight_repacking(model_zoo.build("llama")) == []  # no 4-bit layers


def test_repatching_leaves_the_same_layers_off_and_unpatching_restores_the_switch(has_avx512bf16):
    has_avx512bf16(True)
    stack = four_bit_stack([64, 64, 64])
    patch_model(stack)
    patch_model(stack)
    assert disable_cpu_weight_repacking(stack) == ["0", "1"]
    assert not any(getattr(layer, REPACKING_SWITCH) for layer in stack)
    unpatch_model(stack)
    assert all(getattr(layer, REPACKING_SWITCH) for layer in stack)
    assert disable_cpu_weight_repacking(stack) == ["0", "1"]
