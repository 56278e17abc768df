"""Per-example statistics of patched norms against torch.func per-sample gradients of the unpatched model."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from hf_gns_spam import patch_model, per_example_grad_stats, reset_per_example_grad_stats
from hf_gns_spam.integrations.bitsandbytes_cpu import disable_cpu_weight_repacking
from hf_gns_spam.ops.gns_norm import norm_backend
from hf_gns_spam.stats import norm_gradients
from tests.support import model_zoo
from tests.support.references import expected_sum_sq, snapshot, token_losses


def batch_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str) -> torch.Tensor:
    losses = token_losses(logits, labels)
    if reduction == "tokens":  # the Trainer's loss: mean over all label tokens of the batch
        return losses.sum() / (labels[:, 1:] != -100).sum()
    return (losses.sum(1) / (labels[:, 1:] != -100).sum(1)).mean()  # mean over examples of their mean


CASES = [("llama", "tokens"), ("llama", "examples"), ("gemma", "tokens"), ("gpt2", "tokens"), ("opt", "examples")]


@pytest.mark.parametrize(("architecture", "reduction"), CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_statistics_equal_torch_func_per_sample_gradients(architecture, reduction, dtype):
    reference = model_zoo.build(architecture)
    model = copy.deepcopy(reference).to(dtype)
    patch_model(model)
    inputs = model_zoo.batch(architecture, batch_size=3, length=8)
    logits = model(**{k: v for k, v in inputs.items() if k != "labels"}).logits
    batch_loss(logits, inputs["labels"], reduction).backward()

    stats = per_example_grad_stats(model)
    expected = expected_sum_sq(reference, inputs, reduction, list(stats))
    rtol = 1e-4 if dtype == torch.float32 else 5e-2
    for name, value in stats.items():
        assert value.count.item() == 3, name
        assert value.sum_sq.dtype == torch.float32
        assert value.sum_sq.item() == pytest.approx(expected[name], rel=rtol), name


def test_statistics_through_the_triton_kernels():
    """The same comparison with the Triton kernels, run on CPU by the Triton interpreter."""
    pytest.importorskip("hf_gns_spam.kernels.gns_norm")
    reference = model_zoo.build("gpt2")
    model = copy.deepcopy(reference)
    patch_model(model)
    inputs = model_zoo.batch("gpt2", batch_size=2, length=6)
    with norm_backend("triton"):
        logits = model(**{k: v for k, v in inputs.items() if k != "labels"}).logits
        batch_loss(logits, inputs["labels"], "tokens").backward()
    expected = expected_sum_sq(reference, inputs, "tokens", list(per_example_grad_stats(model)))
    for name, value in per_example_grad_stats(model).items():
        assert value.sum_sq.item() == pytest.approx(expected[name], rel=1e-4), name


def run_backward(model: nn.Module, inputs: dict) -> None:
    model(**inputs).loss.backward()


def test_statistics_accumulate_over_backward_passes_until_reset():
    model = model_zoo.build("llama")
    patch_model(model)
    first, second = model_zoo.batch("llama", seed=1), model_zoo.batch("llama", seed=2)
    run_backward(model, first)
    after_first = snapshot(model)
    reset_per_example_grad_stats(model)
    run_backward(model, second)
    after_second = snapshot(model)
    reset_per_example_grad_stats(model)
    assert all(v == (0.0, 0.0) for v in snapshot(model).values())
    run_backward(model, first)
    run_backward(model, second)
    for name, (sum_sq, count) in snapshot(model).items():
        assert count == 6
        assert sum_sq == pytest.approx(after_first[name][0] + after_second[name][0], rel=1e-6)


def test_frozen_norms_give_the_statistics_and_gradients_of_trained_ones():
    """LoRA freezes the norms: a frozen norm reached by the backward has the statistics it would have if trained,
    its sink holds the gradient it would have had, and the weight itself gets none."""
    trained = model_zoo.build("llama")
    frozen = copy.deepcopy(trained)
    for model in (trained, frozen):
        patch_model(model)
    for name, parameter in frozen.named_parameters():
        parameter.requires_grad_("norm" not in name)
    inputs = model_zoo.batch("llama")
    run_backward(trained, inputs)
    run_backward(frozen, inputs)
    expected, gradients = snapshot(trained), norm_gradients(frozen)
    for name, (sum_sq, count) in snapshot(frozen).items():
        assert count == expected[name][1] > 0
        assert sum_sq == pytest.approx(expected[name][0], rel=1e-5)
        parameter = dict(trained.named_parameters())[name]
        assert gradients[name].frozen and dict(frozen.named_parameters())[name].grad is None
        torch.testing.assert_close(gradients[name].gradient, parameter.grad, rtol=1e-5, atol=1e-7)


def test_gradient_checkpointing_gives_the_same_statistics():
    plain = model_zoo.build("llama")
    checkpointed = copy.deepcopy(plain)
    patch_model(plain)
    patch_model(checkpointed)
    checkpointed.gradient_checkpointing_enable()
    checkpointed.train()  # checkpointing is active in training mode only; the tiny config has no dropout
    inputs = model_zoo.batch("llama")
    run_backward(plain, inputs)
    run_backward(checkpointed, inputs)
    expected = snapshot(plain)
    for name, (sum_sq, count) in snapshot(checkpointed).items():
        assert count == expected[name][1]
        assert sum_sq == pytest.approx(expected[name][0], rel=1e-5)


@pytest.mark.parametrize("architecture", model_zoo.BOTH_NORM_KINDS)
def test_autocast(architecture):
    reference = model_zoo.build(architecture)
    model = copy.deepcopy(reference)
    patch_model(model)
    inputs = model_zoo.batch(architecture)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected_logits = reference(**inputs).logits
        output = model(**inputs)
    assert output.logits.dtype == expected_logits.dtype
    torch.testing.assert_close(output.logits.float(), expected_logits.float(), rtol=2e-2, atol=2e-2)
    output.loss.backward()
    plain = copy.deepcopy(reference)
    patch_model(plain)
    run_backward(plain, inputs)
    fp32 = snapshot(plain)
    for name, (sum_sq, count) in snapshot(model).items():
        assert count == 3 and sum_sq == pytest.approx(fp32[name][0], rel=1e-1), name


def test_peft_lora_with_a_norm_in_modules_to_save():
    from peft import LoraConfig, get_peft_model

    base = model_zoo.build("llama")
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["norm"]))
    report = patch_model(model)
    names = [p.name for p in report.patched]
    assert any(n.endswith("norm.modules_to_save.default") for n in names), names
    assert any(n.endswith("norm.original_module") for n in names), names
    run_backward(model, model_zoo.batch("llama"))
    stats = snapshot(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    unused = {n for n in stats if "original_module" in n or "layers.0.input_layernorm" in n}
    for name, (sum_sq, count) in stats.items():
        if name in unused:  # peft's unused copy; a frozen norm on the frozen embeddings' output: not measured
            assert (sum_sq, count) == (0.0, 0.0), name
        else:  # the trained norm and the frozen ones the backward passes through
            assert count == 3 and sum_sq > 0, name
    assert any(name in trainable for name in stats) and len(unused) == 2


def test_torch_compile_traces_the_norm_without_graph_breaks():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.GELU(), nn.Linear(16, 4))
    patch_model(model)
    eager = copy.deepcopy(model)
    x = torch.randn(5, 3, 8)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    compiled(x).square().sum().backward()
    eager(x).square().sum().backward()
    for name, value in per_example_grad_stats(eager).items():
        compiled_value = per_example_grad_stats(model)[name]
        assert compiled_value.count.item() == 5
        assert compiled_value.sum_sq.item() == pytest.approx(value.sum_sq.item(), rel=1e-5)
    torch.testing.assert_close(model[1].weight.grad, eager[1].weight.grad)


@pytest.mark.slow
def test_torch_compile_inductor_on_a_patched_llama():
    reference = model_zoo.build("llama")
    model = copy.deepcopy(reference)
    patch_model(model)
    eager = copy.deepcopy(model)
    inputs = model_zoo.batch("llama")
    torch.compile(model)(**inputs).loss.backward()
    run_backward(eager, inputs)
    expected = snapshot(eager)
    for name, (sum_sq, count) in snapshot(model).items():
        assert count == 3 and sum_sq == pytest.approx(expected[name][0], rel=1e-4), name


@pytest.mark.slow
def test_qlora_model_patched_norms_are_frozen_and_exact(tmp_path):
    """bitsandbytes 4-bit base weights + LoRA: the norms are frozen fp32 (prepare_model_for_kbit_training), the
    patched model computes what the original does, and the frozen norms the backward reaches are measured."""
    pytest.importorskip("bitsandbytes")
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    model_zoo.build("llama").save_pretrained(tmp_path)
    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
    )
    base = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=quantization, device_map="cpu")
    base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
    model = get_peft_model(base, LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.0))
    reference = copy.deepcopy(model)
    disable_cpu_weight_repacking(reference)  # as patch_model does: no bf16 CPU repacking in eval on either copy
    report = patch_model(model)
    assert len(report.patched) == 5
    inputs = model_zoo.batch("llama")
    expected = reference(**inputs)
    output = model(**inputs)
    torch.testing.assert_close(output.logits, expected.logits)
    output.loss.backward()
    measured = {n: count for n, (_, count) in snapshot(model).items()}
    assert measured.pop("base_model.model.model.layers.0.input_layernorm.weight") == 0  # on the frozen embeddings
    assert set(measured.values()) == {3.0}
    assert any(p.grad is not None for n, p in model.named_parameters() if "lora_" in n)
