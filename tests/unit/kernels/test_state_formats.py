"""The state-format table (``STATE_FORMATS`` in hf_gns_spam/kernels/step_contract.py) against its users.

For every row (``state_bits``): the Trainer builds the format from its name; a step on the torch path and on the
Triton path (interpreter) creates exactly the row's state keys, dtypes and lengths; ``state_bytes()`` is what the
row predicts and what bitsandbytes-style formats cost per parameter; a state dict round-trips bit for bit, and a
buffer of another length or dtype is refused by checkpoint validation and by the fused step's checks, naming the key.
Last, no module outside the table compares a state width to a literal.
"""

from __future__ import annotations

import ast
import io
import math
import typing

import pytest
import torch

import hf_gns_spam.optim.stable_spam as stable_spam_module
from hf_gns_spam import StableSPAM
from hf_gns_spam.integrations.trainer_optimizer import TRAINER_OPTIMIZER_NAMES
from hf_gns_spam.kernels import stable_spam_step
from hf_gns_spam.kernels.step_contract import (
    DEFAULT_STATE_BITS,
    MIN_QUANTIZED_NUMEL,
    NONFINITE_GRAD_STEPS,
    QUANTIZED_BITS,
    STATE_FORMATS,
    STATISTICS,
    StateBits,
    StepHyperparameters,
)
from hf_gns_spam.optim.hyperparameters import check_hyperparameter
from tests.support.paths import PACKAGE

BITS = list(STATE_FORMATS)
#: Bytes of both moments per element of a large float32 tensor, as the formats are published (bitsandbytes' 8-bit
#: Adam: one byte and a float32 absmax per 256 elements per moment; 4-bit states: half a byte, absmax per 128).
PUBLISHED_BYTES_PER_PARAMETER = {32: 8.0, 16: 4.0, 8: 2 * (1 + 4 / 256), 4: 2 * (0.5 + 4 / 128)}
SMALL, LARGE = (7,), (3, 1433)  # under and over MIN_QUANTIZED_NUMEL; LARGE has an odd count and a partial block
STATISTICS_BYTES = 3 * 8 + 8  # T, μ, ν (float64) and the non-finite counter (int64) of every tensor


def test_the_table_lists_every_state_bits_value_the_optimizer_accepts():
    assert list(typing.get_args(StateBits)) == BITS
    assert DEFAULT_STATE_BITS in STATE_FORMATS
    assert PUBLISHED_BYTES_PER_PARAMETER.keys() == STATE_FORMATS.keys()
    for bits in BITS:
        assert check_hyperparameter("state_bits", bits) == bits
    for bits in (0, 2, 12, 64):
        with pytest.raises(ValueError, match="state_bits"):
            check_hyperparameter("state_bits", bits)
    assert math.prod(LARGE) >= MIN_QUANTIZED_NUMEL > math.prod(SMALL)


def stepped_optimizer(bits: int, params: list[torch.Tensor], use_triton: bool, monkeypatch) -> StableSPAM:
    """A StableSPAM with ``state_bits=bits`` after two steps on fixed gradients, on the torch or the Triton path."""
    monkeypatch.setattr(stable_spam_module, "_use_triton", lambda param: use_triton)
    optimizer = StableSPAM(params, lr=1e-2, state_bits=bits, weight_decay=0.1)
    generator = torch.Generator().manual_seed(bits)
    for _ in range(2):
        for param in params:
            param.grad = torch.randn(param.shape, generator=generator).to(param.dtype)
        optimizer.step()
    return optimizer


def assert_state_has_the_tables_layout(optimizer: StableSPAM, bits: int) -> None:
    """Every parameter's state holds exactly its format's moment buffers (keys, dtypes, lengths), the statistics
    and the counter, and the quantized mark when the format is quantized."""
    for param in (p for group in optimizer.param_groups for p in group["params"]):
        state = optimizer.state[param]
        fmt = STATE_FORMATS[bits].for_numel(param.numel())
        compute_dtype = torch.promote_types(param.dtype, torch.float32)
        buffers = fmt.moment_buffers(param.numel(), compute_dtype)
        tensors = {key for key, value in state.items() if torch.is_tensor(value)}
        assert tensors == {b.key for b in buffers} | set(STATISTICS) | {NONFINITE_GRAD_STEPS}, (bits, param.shape)
        assert (QUANTIZED_BITS in state) == fmt.is_quantized
        if fmt.is_quantized:
            assert state[QUANTIZED_BITS] == bits
        for buffer in buffers:
            assert state[buffer.key].dtype == buffer.dtype, (bits, buffer.key)
            assert state[buffer.key].numel() == buffer.numel, (bits, buffer.key)
            if not fmt.is_quantized:
                assert state[buffer.key].shape == param.shape


def predicted_state_bytes(optimizer: StableSPAM, bits: int) -> int:
    total = 0
    for param in optimizer.param_groups[0]["params"]:
        fmt = STATE_FORMATS[bits].for_numel(param.numel())
        buffers = fmt.moment_buffers(param.numel(), torch.promote_types(param.dtype, torch.float32))
        total += sum(b.numel * b.dtype.itemsize for b in buffers) + STATISTICS_BYTES
    return total


@pytest.mark.parametrize("bits", BITS)
def test_torch_path_stores_the_tables_layout_and_bytes(bits, monkeypatch):
    params = [torch.randn(SMALL), torch.randn(LARGE), torch.randn(5, dtype=torch.float64)]
    optimizer = stepped_optimizer(bits, [p.requires_grad_() for p in params], False, monkeypatch)
    assert_state_has_the_tables_layout(optimizer, bits)
    assert optimizer.state_bytes() == predicted_state_bytes(optimizer, bits)
    # the format of the large tensor costs what the published format costs (up to its partial block and byte)
    numel = math.prod(LARGE)
    state = optimizer.state[optimizer.param_groups[0]["params"][1]]
    moment_bytes = sum(state[key].numel() * state[key].element_size() for key in STATE_FORMATS[bits].moment_keys)
    expected = PUBLISHED_BYTES_PER_PARAMETER[bits]
    assert STATE_FORMATS[bits].bytes_per_parameter(torch.float32) == expected
    assert expected * numel <= moment_bytes <= expected * numel + 2 * (4 + 1)  # one partial block, one half byte


@pytest.mark.parametrize("bits", BITS)
def test_triton_path_stores_the_tables_layout(bits, monkeypatch):
    """The fused step (Triton interpreter) takes every tensor and leaves the same layout as the torch path."""
    fused = []
    update = stable_spam_step.triton_update_tensors

    def counting_update(params, *args, **kwargs):
        fused.extend(param.shape for param in params)
        update(params, *args, **kwargs)

    monkeypatch.setattr(stable_spam_step, "triton_update_tensors", counting_update)
    params = [torch.randn(SMALL).requires_grad_(), torch.randn(LARGE).requires_grad_()]
    optimizer = stepped_optimizer(bits, params, True, monkeypatch)
    assert sorted(fused) == sorted([torch.Size(SMALL), torch.Size(LARGE)] * 2)
    assert_state_has_the_tables_layout(optimizer, bits)
    assert optimizer.state_bytes() == predicted_state_bytes(optimizer, bits)


def foreign_dtype(dtype: torch.dtype, allowed: tuple[str, ...]) -> torch.dtype:
    """A dtype of the same element count that the format does not store."""
    return next(
        d for d in (torch.bfloat16, torch.float32) if d != dtype and str(d).removeprefix("torch.") not in allowed
    )


@pytest.mark.parametrize("bits", BITS)
def test_state_dict_round_trips_and_a_foreign_buffer_is_refused_by_name(bits, monkeypatch):
    params = [torch.randn(SMALL).requires_grad_(), torch.randn(LARGE).requires_grad_()]
    optimizer = stepped_optimizer(bits, params, False, monkeypatch)
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)

    copies = [p.detach().clone().requires_grad_() for p in params]
    resumed = StableSPAM(copies, lr=1e-2, state_bits=bits, weight_decay=0.1)
    resumed.load_state_dict(saved)
    for param, copy in zip(params, copies, strict=True):
        assert optimizer.state[param].keys() == resumed.state[copy].keys()
        for key, value in optimizer.state[param].items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(resumed.state[copy][key])), key
            if torch.is_tensor(value):
                assert value.dtype == resumed.state[copy][key].dtype, key
    for param, copy in zip(params, copies, strict=True):
        param.grad = copy.grad = torch.ones_like(param)
    optimizer.step()
    resumed.step()
    assert all(torch.equal(p, c) for p, c in zip(params, copies, strict=True))

    fmt = STATE_FORMATS[bits].for_numel(math.prod(LARGE))
    large = 1  # the position of LARGE in the state dict
    for key in fmt.moment_keys:
        good = saved["state"][large][key]
        allowed = fmt.moment_dtypes if not fmt.is_quantized else (str(good.dtype).removeprefix("torch."),)
        for bad in (good.reshape(-1)[1:], good.to(foreign_dtype(good.dtype, allowed))):
            broken = {**saved, "state": {**saved["state"], large: {**saved["state"][large], key: bad}}}
            fresh = StableSPAM([p.detach().clone().requires_grad_() for p in params], state_bits=bits)
            with pytest.raises(ValueError, match=f"{key}.*(size|shape|is torch)"):
                fresh.load_state_dict(broken)
            assert not fresh.state  # nothing was loaded


@pytest.mark.parametrize("bits", [bits for bits, fmt in STATE_FORMATS.items() if fmt.is_quantized])
def test_fused_step_refuses_a_quantized_buffer_of_another_length_by_name(bits, monkeypatch):
    params = [torch.randn(LARGE).requires_grad_()]
    optimizer = stepped_optimizer(bits, params, False, monkeypatch)
    state = optimizer.state[params[0]]
    assert stable_spam_step.triton_update_supported(params[0], state)
    for key in STATE_FORMATS[bits].moment_keys:
        broken = {**state, key: state[key][1:]}
        assert not stable_spam_step.triton_update_supported(params[0], broken)
        with pytest.raises(ValueError, match=key):
            stable_spam_step.triton_update_tensor(params[0], broken, HYPERPARAMETERS, 1, 1)


#: Hyperparameters of a launch that its checks refuse before any kernel runs.
HYPERPARAMETERS = StepHyperparameters(1e-3, 0.0, 0.9, 0.999, 0.7, 0.9, 0.999, 1e-8, False, False)


@pytest.mark.slow
@pytest.mark.parametrize("bits", BITS)
def test_trainer_builds_each_format_from_its_name(bits, tmp_path):
    from tests.support.trainers import built_optimizer

    fmt = STATE_FORMATS[bits]
    if fmt.trainer_name is not None:
        assert TRAINER_OPTIMIZER_NAMES[fmt.trainer_name] == ({"state_bits": bits} if bits != DEFAULT_STATE_BITS else {})
        optimizer = built_optimizer(tmp_path, optim=fmt.trainer_name)
    else:  # no name of its own: the default name and optim_args, as the format's trainer_spelling says
        assert fmt.trainer_spelling.endswith(f"optim_args='state_bits={bits}'")
        optimizer = built_optimizer(tmp_path, optim=STATE_FORMATS[DEFAULT_STATE_BITS].trainer_name,
                                    optim_args=f"state_bits={bits}")  # fmt: skip
    assert isinstance(optimizer, StableSPAM)
    assert {group["state_bits"] for group in optimizer.param_groups} == {bits}
    for group in optimizer.param_groups:
        for param in group["params"]:
            param.grad = torch.randn_like(param)
    optimizer.step()
    assert_state_has_the_tables_layout(optimizer, bits)


# ----------------------------------------------------------------------------------------------------------------
# no literal state widths outside the table
# ----------------------------------------------------------------------------------------------------------------

TABLE_MODULE = PACKAGE / "kernels" / "step_contract.py"
#: Modules that handle optimizer state; elsewhere (fake_quant.py) ``bits`` is a weight's bit width.
STATE_MODULES = sorted([*(PACKAGE / "optim").glob("*.py"), *(PACKAGE / "kernels").glob("*.py"),
                        *(PACKAGE / "integrations").glob("*.py")])  # fmt: skip


def _names_bits(node: ast.AST) -> bool:
    """``bits``, ``state_bits``, ``fmt.bits``, ``state["quantized_bits"]``, ``BITS``, ... (any case)."""
    if isinstance(node, ast.Name):
        name = node.id
    elif isinstance(node, ast.Attribute):
        name = node.attr
    elif isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant):
        name = str(node.slice.value)
    elif isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Name):
        name = node.slice.id
    else:
        return False
    return "bits" in name.lower()


def _is_int_literal(node: ast.AST) -> bool:
    if isinstance(node, ast.Constant):
        return isinstance(node.value, int) and not isinstance(node.value, bool)
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return any(_is_int_literal(element) for element in node.elts)
    return False


def literal_width_comparisons(source: str) -> list[int]:
    """Lines where a width (a name containing ``bits``) is compared to an int literal or tested against a
    collection of them."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            if any(_names_bits(o) for o in operands) and any(_is_int_literal(o) for o in operands):
                lines.append(node.lineno)
    return lines


def test_the_literal_check_finds_what_it_looks_for():
    assert literal_width_comparisons("x = bits == 8\ny = state_bits in (8, 4)\nz = fmt.bits != 4") == [1, 2, 3]
    assert literal_width_comparisons("a = state['quantized_bits'] == 4\nb = group[BITS] < 16") == [1, 2]
    assert literal_width_comparisons("bits == DEFAULT_STATE_BITS\nbits in STATE_FORMATS\nn == 8") == []


@pytest.mark.parametrize("path", STATE_MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_outside_the_table_compares_a_width_to_a_literal(path):
    if path == TABLE_MODULE:
        return
    lines = literal_width_comparisons(path.read_text())
    assert not lines, f"hf_gns_spam/{path.relative_to(PACKAGE)} lines {lines}: read the state-format table instead"
