"""The Triton GNS norm kernels (run on CPU through the Triton interpreter) against the pure-torch reference.

``tests/conftest.py`` sets ``TRITON_INTERPRET=1`` before triton is first imported, so these tests need no GPU.
Shapes are tiny: the interpreter executes every program in Python.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hf_gns_spam.kernels.gns_norm import gns_norm_backward, gns_norm_forward
from hf_gns_spam.ops import norm_reference
from hf_gns_spam.ops.norm_reference import NormSpec, norm_backward, norm_forward, output_dtype

# name -> (spec, has weight, has bias)
CASES = {
    "layer_norm": (NormSpec("layer_norm", 1e-5), True, True),
    "layer_norm_no_bias": (NormSpec("layer_norm", 1e-5), True, False),
    "layer_norm_no_affine": (NormSpec("layer_norm", 1e-5), False, False),
    "rms_llama": (NormSpec("rms_norm", 1e-6, rounding="input_dtype_first"), True, False),
    "rms_fp32": (NormSpec("rms_norm", 1e-6, rounding="float32_product"), True, False),
    "rms_gemma": (NormSpec("rms_norm", 1e-6, offset=1.0, rounding="float32_product"), True, False),
    "rms_t5": (NormSpec("rms_norm", 1e-6, rounding="weight_dtype_first"), True, False),
}
# (x dtype, parameter dtype)
DTYPES = {
    "fp32": (torch.float32, torch.float32),
    "bf16": (torch.bfloat16, torch.bfloat16),
    "bf16_x_fp32_w": (torch.bfloat16, torch.float32),
}


def make_inputs(case: str, shape, x_dtype, w_dtype, seed: int = 0):
    """x (with a non-zero mean), weight, bias, and an upstream gradient of the output dtype."""
    spec, has_weight, has_bias = CASES[case]
    gen = torch.Generator().manual_seed(seed)
    d = shape[-1]
    x = (torch.randn(shape, generator=gen) * 2.0 + 0.5).to(x_dtype)
    weight = bias = None
    if has_weight:
        centre = 0.0 if spec.offset else 1.0
        weight = (centre + 0.3 * torch.randn(d, generator=gen)).to(w_dtype)
    if has_bias:
        bias = (0.2 * torch.randn(d, generator=gen)).to(w_dtype)
    out_dtype = output_dtype(spec, x_dtype, None if weight is None else weight.dtype)
    dy = torch.randn(shape, generator=gen).to(out_dtype)
    return spec, x, weight, bias, dy


def reference_forward_with(monkeypatch, spec, x, weight, bias, mean, rstd):
    """The reference forward, but normalizing with the given (kernel's) mean and rstd instead of its own."""
    x_hat = (x.float() - mean.unsqueeze(-1)) * rstd.unsqueeze(-1)
    with monkeypatch.context() as m:
        m.setattr(norm_reference, "normalize", lambda _spec, _x: (x_hat, mean, rstd))
        return norm_forward(spec, x, weight, bias)[0]


def assert_close_relative(actual, expected, rtol, name):
    """|actual − expected| ≤ rtol·(|expected| + max|expected|·1e-2) elementwise (both promoted to float32)."""
    assert actual.dtype == expected.dtype, (name, actual.dtype, expected.dtype)
    assert actual.shape == expected.shape, (name, actual.shape, expected.shape)
    a, e = actual.float(), expected.float()
    scale = e.abs().max().clamp_min(1e-30)
    bound = rtol * (e.abs() + 1e-2 * scale)
    excess = ((a - e).abs() - bound).max().item()
    assert excess <= 0, f"{name}: max |diff| exceeds tolerance by {excess:.3e} (scale {scale.item():.3e})"


def check_against_reference(monkeypatch, case, shape, dtypes, max_block_d, rows_per_tile):
    """Forward and backward of the kernels against the reference for one configuration."""
    x_dtype, w_dtype = dtypes
    spec, x, weight, bias, dy = make_inputs(case, shape, x_dtype, w_dtype)
    y_ref, mean_ref, rstd_ref = norm_forward(spec, x, weight, bias)

    y, mean, rstd = gns_norm_forward(spec, x, weight, bias, max_block_d=max_block_d)
    assert y.shape == x.shape and y.dtype == y_ref.dtype
    assert mean.dtype == rstd.dtype == torch.float32 and mean.shape == rstd.shape == x.shape[:-1]
    # statistics: float32, only the summation order differs
    scale = x.float().abs().max()
    torch.testing.assert_close(mean, mean_ref, rtol=1e-6, atol=1e-6 * scale.item())
    torch.testing.assert_close(rstd, rstd_ref, rtol=2e-6, atol=0.0)
    # given the same mean and rstd, the outputs (roundings included) are bitwise the reference's
    assert torch.equal(y, reference_forward_with(monkeypatch, spec, x, weight, bias, mean, rstd))
    # and within one unit in the last place of the output dtype of the reference itself
    assert_close_relative(y, y_ref, 2.0 * torch.finfo(y.dtype).eps if y.dtype != torch.float32 else 1e-5, "y")

    # backward from the reference's saved statistics: the same x̂' bits, only the summation order differs
    need_bias = bias is not None
    grads = gns_norm_backward(
        spec, dy, x, weight, bias, mean_ref, rstd_ref, True, weight is not None, need_bias,
        max_block_d=max_block_d, rows_per_tile=rows_per_tile,
    )  # fmt: skip
    expected = norm_backward(spec, dy, x, weight, bias, mean_ref, rstd_ref, True, weight is not None, need_bias)
    for name, got, want in zip(("dx", "dw", "db"), grads[:3], expected[:3], strict=True):
        if want is None:
            assert got is None, name
            continue
        rtol = 1e-5 if want.dtype == torch.float32 else 2.0 * torch.finfo(want.dtype).eps
        assert_close_relative(got, want, rtol, name)
    torch.testing.assert_close(grads[3], expected[3], rtol=1e-5, atol=0.0)
    assert grads[3][2].item() == x.shape[0]

    # deterministic: a second run gives the same bits
    again = gns_norm_backward(
        spec, dy, x, weight, bias, mean_ref, rstd_ref, True, weight is not None, need_bias,
        max_block_d=max_block_d, rows_per_tile=rows_per_tile,
    )  # fmt: skip
    for first, second in zip(grads, again, strict=True):
        assert (first is None and second is None) or torch.equal(first, second)


@pytest.mark.parametrize("max_block_d", [None, 16], ids=["one_block", "d_tiled"])
@pytest.mark.parametrize("dtypes", list(DTYPES))
@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference(monkeypatch, case, dtypes, max_block_d):
    """[B, T, D] with D = 40 (masked tail; 3 chunks of 16 when tiled) and 2 rows per backward tile (R = 5)."""
    if dtypes == "bf16_x_fp32_w" and not CASES[case][1]:
        pytest.skip("no weight")
    check_against_reference(monkeypatch, case, (2, 5, 40), DTYPES[dtypes], max_block_d, rows_per_tile=2)


@pytest.mark.parametrize(
    "shape",
    [(3, 40), (2, 3, 2, 24), (1, 8, 33), (3, 1, 17)],
    ids=["B_D", "B_T_H_D", "one_example", "one_row_per_example"],
)
@pytest.mark.parametrize("case", ["layer_norm", "rms_llama", "rms_gemma"])
def test_shapes(monkeypatch, case, shape):
    """2-D and 4-D inputs, R = 1, B = 1, odd D; default tile plan."""
    check_against_reference(monkeypatch, case, shape, DTYPES["bf16"], None, rows_per_tile=None)


@pytest.mark.parametrize("case", ["layer_norm", "rms_llama", "rms_t5"])
@pytest.mark.parametrize("max_block_d", [None, 16], ids=["one_block", "d_tiled"])
@pytest.mark.parametrize(
    "dtypes", [(torch.float16, torch.float16), (torch.bfloat16, torch.float16)], ids=["fp16", "bf16_x_fp16_w"]
)
def test_float16(monkeypatch, case, dtypes, max_block_d):
    """float16 inputs, and a float16 weight on bfloat16 inputs (t5 rounds x̂ to w's dtype, llama to x's)."""
    check_against_reference(monkeypatch, case, (2, 3, 40), dtypes, max_block_d, rows_per_tile=1)


def test_non_contiguous_input():
    spec, x, weight, bias, dy = make_inputs("layer_norm", (4, 2, 24), torch.float32, torch.float32)
    x_t, dy_t = x.transpose(0, 1), dy.transpose(0, 1)  # [2, 4, 24], not contiguous
    assert not x_t.is_contiguous()
    y, _, _ = gns_norm_forward(spec, x_t, weight, bias)
    y_ref, mean_ref, rstd_ref = norm_forward(spec, x_t, weight, bias)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    got = gns_norm_backward(spec, dy_t, x_t, weight, bias, mean_ref, rstd_ref, True, True, True)
    want = norm_backward(spec, dy_t, x_t, weight, bias, mean_ref, rstd_ref, True, True, True)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("max_block_d", [None, 16], ids=["one_block", "d_tiled"])
@pytest.mark.parametrize(
    "needs",
    [(True, False, False), (True, False, True), (False, True, False), (False, False, True), (False, False, False)],
    ids=["dx_only", "frozen_weight", "dw_only", "db_only", "nothing"],
)
def test_skipped_gradients(needs, max_block_d):
    """Gradients not asked for are None and their statistics zero; the others are unchanged."""
    spec, x, weight, bias, dy = make_inputs("layer_norm", (2, 5, 40), torch.float32, torch.float32)
    _, mean, rstd = norm_forward(spec, x, weight, bias)
    got = gns_norm_backward(spec, dy, x, weight, bias, mean, rstd, *needs, max_block_d=max_block_d, rows_per_tile=2)
    want = norm_backward(spec, dy, x, weight, bias, mean, rstd, *needs)
    for needed, a, b in zip(needs, got[:3], want[:3], strict=True):
        assert (a is not None) == needed
        if needed:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[3], want[3], rtol=1e-5, atol=0.0)
    assert got[3][0].item() == 0.0 if not needs[1] else got[3][0].item() > 0.0
    assert got[3][1].item() == 0.0 if not needs[2] else got[3][1].item() > 0.0
    assert got[3][2].item() == 2


def per_example_statistics(loss, params, x, dy):
    """Σ_b ‖∂loss(params; x[b], dy[b])/∂p‖² for each p in params, from torch.func (independent of the reference)."""
    per_example = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(params, x, dy)
    return [g.square().sum() for g in per_example]


def test_statistics_match_torch_func_rms_norm():
    eps, offset = 1e-6, 1.0
    spec = NormSpec("rms_norm", eps, offset=offset, rounding="float32_product")
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(3, 4, 40, generator=gen) + 0.3
    weight = 0.3 * torch.randn(40, generator=gen)
    dy = torch.randn(3, 4, 40, generator=gen)

    def loss(params, x_b, dy_b):
        (w,) = params
        y = x_b * torch.rsqrt(x_b.square().mean(-1, keepdim=True) + eps) * (offset + w)
        return (y * dy_b).sum()

    (expected_w,) = per_example_statistics(loss, (weight,), x, dy)
    _, mean, rstd = gns_norm_forward(spec, x, weight, None)
    dx, dw, db, statistics = gns_norm_backward(
        spec, dy, x, weight, None, mean, rstd, True, True, False, rows_per_tile=3
    )
    assert db is None
    torch.testing.assert_close(statistics[0], expected_w, rtol=1e-5, atol=0.0)
    assert statistics[1].item() == 0.0 and statistics[2].item() == 3
    x_req = x.clone().requires_grad_()
    w_req = weight.clone().requires_grad_()
    loss((w_req,), x_req, dy).backward()
    torch.testing.assert_close(dx, x_req.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dw, w_req.grad, rtol=1e-5, atol=1e-6)


def test_statistics_match_torch_func_layer_norm():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(3, 2, 2, 24, generator=gen) * 3.0
    weight = 1.0 + 0.3 * torch.randn(24, generator=gen)
    bias = 0.1 * torch.randn(24, generator=gen)
    dy = torch.randn(3, 2, 2, 24, generator=gen)
    spec = NormSpec("layer_norm", 1e-5)

    def loss(params, x_b, dy_b):
        w, b = params
        return (F.layer_norm(x_b, (24,), w, b, 1e-5) * dy_b).sum()

    expected_w, expected_b = per_example_statistics(loss, (weight, bias), x, dy)
    _, mean, rstd = gns_norm_forward(spec, x, weight, bias, max_block_d=8)
    _, _, _, statistics = gns_norm_backward(
        spec, dy, x, weight, bias, mean, rstd, False, True, True, max_block_d=8, rows_per_tile=3
    )
    torch.testing.assert_close(statistics[0], expected_w, rtol=1e-5, atol=0.0)
    torch.testing.assert_close(statistics[1], expected_b, rtol=1e-5, atol=0.0)
    assert statistics[2].item() == 3


def test_rejects_bad_arguments():
    spec = NormSpec("rms_norm", 1e-6, rounding="input_dtype_first")
    x = torch.randn(2, 3, 8)
    with pytest.raises(ValueError):
        gns_norm_forward(spec, x[0, 0], None, None)
    with pytest.raises(ValueError):
        gns_norm_forward(spec, x, torch.ones(7), None)
    with pytest.raises(ValueError):
        gns_norm_forward(spec, x, torch.ones(8), None, max_block_d=12)
    with pytest.raises(ValueError):
        gns_norm_backward(spec, x, x, None, None, x[..., 0], x[..., 0], True, True, False)
