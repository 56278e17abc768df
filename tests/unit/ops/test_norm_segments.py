"""Per-sequence statistics of packed rows (``segment_ids``) in both norm backends, against per-sequence ground truth.

Ground truth: one sequence at a time, ``torch.func.grad`` in float64 of Σ (y ⊙ dy) over that sequence's rows with
respect to the weight and the bias, y written out from the original modules' formulas (not from this package). The
Triton kernels run on CPU under the Triton interpreter (``tests/conftest.py``); shapes are tiny.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hf_gns_spam.kernels import gns_norm as kernels
from hf_gns_spam.ops.gns_norm import NormSpec, gns_norm, norm_backend
from hf_gns_spam.ops.norm_reference import STATISTICS_SIZE, norm_backward, norm_forward

BACKENDS = ["torch", "triton"]
D = 24

# name -> (spec, x dtype, has bias)
CASES = {
    "layer_norm_bias": (NormSpec("layer_norm", 1e-5), torch.float32, True),
    "rms_llama_bf16": (NormSpec("rms_norm", 1e-6, rounding="input_dtype_first"), torch.bfloat16, False),
    "rms_fp32_gemma": (NormSpec("rms_norm", 1e-6, offset=1.0, rounding="float32_product"), torch.float32, False),
}

# name -> (x shape without D, sequence lengths of each row of dimension 0)
LAYOUTS = {
    "one_row": ((1, 16), [[5, 1, 7, 3]]),
    "two_rows": ((2, 12), [[1, 5, 6], [12]]),  # a length-1 sequence first, a sequence spanning the whole row
    "heads": ((2, 6, 3), [[1, 4, 1], [6]]),  # [B, T, H, D]: the heads of a token belong to its sequence
    "flat": ((9,), [[2, 1, 6]]),  # a 2-D [N, D] input, segment_ids of shape [N]
}


def segment_ids_for(layout: str) -> torch.Tensor:
    """Sequences numbered 0 … E−1 in row-major order; shape x.shape[:2] (x.shape[:1] for 2-D)."""
    shape, rows = LAYOUTS[layout]
    ids, next_id = [], 0
    for lengths in rows:
        row = []
        for length in lengths:
            row += [next_id] * length
            next_id += 1
        ids.append(row)
    ids = torch.tensor(ids)
    return ids.reshape(shape[:2] if len(shape) >= 2 else shape[:1])


def make_inputs(case: str, layout: str, seed: int = 0):
    spec, x_dtype, has_bias = CASES[case]
    shape = (*LAYOUTS[layout][0], D)
    gen = torch.Generator().manual_seed(seed)
    x = (1.5 * torch.randn(shape, generator=gen) + 0.3).to(x_dtype)
    weight = ((0.0 if spec.offset else 1.0) + 0.3 * torch.randn(D, generator=gen)).to(x_dtype)
    bias = (0.2 * torch.randn(D, generator=gen)).to(x_dtype) if has_bias else None
    dy = torch.randn(shape, generator=gen).to(x_dtype)
    return spec, x, weight, bias, dy


def module_output(case: str, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """y in float64 as the original module computes it, as a function of float64 parameters."""
    spec = CASES[case][0]
    if case == "layer_norm_bias":
        return F.layer_norm(x.double(), (D,), w, b, spec.eps)
    if case == "rms_fp32_gemma":
        xd = x.double()
        return xd * torch.rsqrt(xd.square().mean(-1, keepdim=True) + spec.eps) * (spec.offset + w)
    # LlamaRMSNorm: normalise in float32, round to the input dtype, multiply by the weight
    hidden = x.float()
    hidden = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + spec.eps)
    return w * hidden.to(x.dtype).double()


def ground_truth(case: str, layout: str, x, weight, bias, dy) -> torch.Tensor:
    """[Σ‖G_w[e]‖², Σ‖G_b[e]‖², E] from torch.func, one sequence at a time."""
    ids = segment_ids_for(layout)
    tokens_x = x.reshape(ids.numel(), -1, D)  # [tokens, rows per token, D]
    tokens_dy = dy.reshape(ids.numel(), -1, D)
    flat = ids.reshape(-1)
    num_segments = int(flat[-1]) + 1
    w64 = weight.double()
    b64 = torch.zeros(D, dtype=torch.float64) if bias is None else bias.double()

    def contribution(w, b, x_e, dy_e):
        return (module_output(case, x_e, w, b if bias is not None else None) * dy_e.double()).sum()

    totals = torch.zeros(STATISTICS_SIZE, dtype=torch.float64)
    totals[2] = num_segments
    for e in range(num_segments):
        rows = flat == e
        g_w, g_b = torch.func.grad(contribution, argnums=(0, 1))(w64, b64, tokens_x[rows], tokens_dy[rows])
        totals[0] += g_w.square().sum()
        if bias is not None:
            totals[1] += g_b.square().sum()
    return totals


def run(backend, spec, x, weight, bias, dy, segment_ids, statistics=None):
    """Forward and backward through the operator; returns (dx, dw, db, statistics.grad)."""
    x = x.clone().requires_grad_()
    weight = weight.clone().requires_grad_()
    bias = None if bias is None else bias.clone().requires_grad_()
    if statistics is None:
        statistics = torch.zeros(STATISTICS_SIZE, requires_grad=True)
    with norm_backend(backend):
        gns_norm(x, weight, bias, spec, statistics, segment_ids).backward(dy)
    return x.grad, weight.grad, None if bias is None else bias.grad, statistics.grad


def tolerance(case: str) -> float:
    # bfloat16 x̂': the kernel's float32 x̂ may round to the other neighbour than the module's on a few elements
    return 1e-3 if CASES[case][1] == torch.bfloat16 else 1e-5


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_statistics_equal_per_sequence_ground_truth(backend, case, layout):
    """All the statistics against torch.func one sequence at a time."""
    spec, x, weight, bias, dy = make_inputs(case, layout)
    ids = segment_ids_for(layout)
    num_segments = int(ids.max()) + 1
    *_, statistics = run(backend, spec, x, weight, bias, dy, ids)
    expected = ground_truth(case, layout, x, weight, bias, dy)
    assert statistics.dtype == torch.float32
    assert statistics[2].item() == num_segments
    torch.testing.assert_close(statistics.double(), expected, rtol=tolerance(case), atol=1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
def test_statistics_accumulate_over_two_backward_passes(backend):
    """Two packed batches (different segmentations) into one leaf: the sum of the two ground truths."""
    spec, x1, weight, bias, dy1 = make_inputs("layer_norm_bias", "one_row", seed=1)
    _, x2, _, _, dy2 = make_inputs("layer_norm_bias", "two_rows", seed=2)
    statistics = torch.zeros(STATISTICS_SIZE, requires_grad=True)
    run(backend, spec, x1, weight, bias, dy1, segment_ids_for("one_row"), statistics)
    run(backend, spec, x2, weight, bias, dy2, segment_ids_for("two_rows"), statistics)
    expected = ground_truth("layer_norm_bias", "one_row", x1, weight, bias, dy1) + ground_truth(
        "layer_norm_bias", "two_rows", x2, weight, bias, dy2
    )
    assert statistics.grad[2].item() == 4 + 4
    torch.testing.assert_close(statistics.grad.double(), expected, rtol=1e-5, atol=1e-9)


def assert_close(actual, expected, name):
    """float32: max|actual − expected| ≤ 1e-6·max|expected| (summation order only); half precision: within one
    unit in the last place elementwise (a float32 value on either side of a rounding boundary)."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, name
    a, e = actual.float(), expected.float()
    if actual.dtype == torch.float32:
        bound = 1e-6 * e.abs().max()
    else:
        bound = torch.finfo(actual.dtype).eps * (e.abs() + 1e-2 * e.abs().max())
    excess = ((a - e).abs() - bound).max().item()
    assert excess <= 0, f"{name}: max |diff| exceeds tolerance by {excess:.3e}"


# (layout, max_block_d, rows_per_tile): tiles of one row (each in one sequence), tiles that cut sequences, tiles that
# hold several (first, middle and last), the default plan, and rows in chunks of 16 features (D = 24)
TILINGS = [
    ("one_row", None, 1),
    ("one_row", None, 2),
    ("one_row", None, 5),
    ("one_row", None, None),
    ("one_row", 16, 3),
    ("two_rows", None, 4),
    ("heads", None, 5),
    ("heads", 16, 7),
]


@pytest.mark.parametrize(("layout", "max_block_d", "rows_per_tile"), TILINGS, ids=lambda v: str(v))
@pytest.mark.parametrize("case", list(CASES))
def test_triton_equals_torch(case, layout, max_block_d, rows_per_tile):
    """The kernels against the torch path; and their dx, dw, db with segments against their own without: dx
    bitwise, dw and db to rounding (bitwise where every tile lies in one sequence: one_row-None-1)."""
    spec, x, weight, bias, dy = make_inputs(case, layout)
    ids = segment_ids_for(layout)
    _, mean, rstd = norm_forward(spec, x, weight, bias)
    need_bias = bias is not None
    want = norm_backward(spec, dy, x, weight, bias, mean, rstd, True, True, need_bias, ids)
    tiling = {"max_block_d": max_block_d, "rows_per_tile": rows_per_tile}
    got = kernels.gns_norm_backward(spec, dy, x, weight, bias, mean, rstd, True, True, need_bias, ids, **tiling)
    plain = kernels.gns_norm_backward(spec, dy, x, weight, bias, mean, rstd, True, True, need_bias, **tiling)
    for name, a, e, p in zip(("dx", "dw", "db"), got[:3], want[:3], plain[:3], strict=True):
        if e is None:
            assert a is None
            continue
        assert_close(a, e, name)
        if name == "dx" or rows_per_tile == 1:
            assert torch.equal(a, p), name
        else:
            assert_close(a, p, name)
    torch.testing.assert_close(got[3], want[3], rtol=1e-5, atol=1e-6)
    assert got[3][2].item() == int(ids.max()) + 1
    again = kernels.gns_norm_backward(
        spec, dy, x, weight, bias, mean, rstd, True, True, need_bias, ids, **tiling
    )  # deterministic: the same bits
    for first, second in zip(got, again, strict=True):
        assert (first is None and second is None) or torch.equal(first, second)


@pytest.mark.parametrize(
    "needs", [(True, False, False), (False, True, False), (False, False, True)], ids=["dx_only", "dw", "db"]
)
def test_triton_equals_torch_for_each_needed_gradient(needs):
    spec, x, weight, bias, dy = make_inputs("layer_norm_bias", "two_rows")
    ids = segment_ids_for("two_rows")
    _, mean, rstd = norm_forward(spec, x, weight, bias)
    want = norm_backward(spec, dy, x, weight, bias, mean, rstd, *needs, ids)
    got = kernels.gns_norm_backward(spec, dy, x, weight, bias, mean, rstd, *needs, ids, rows_per_tile=3)
    for needed, a, e in zip(needs, got[:3], want[:3], strict=True):
        assert (a is not None) == needed == (e is not None)
    torch.testing.assert_close(got[3], want[3], rtol=1e-5, atol=1e-6)
    assert got[3][2].item() == 4
    assert (got[3][0].item() > 0) == needs[1] and (got[3][1].item() > 0) == needs[2]


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_dim0_segments_reproduce_unsegmented_results(backend, case):
    """segment_ids = the dim-0 index: dx, dw, db bitwise as without segment_ids, the statistics to rounding."""
    spec, x, weight, bias, dy = make_inputs(case, "two_rows")
    ids = torch.arange(2).repeat_interleave(12).reshape(2, 12)
    with_ids = run(backend, spec, x, weight, bias, dy, ids)
    without = run(backend, spec, x, weight, bias, dy, None)
    for name, a, e in zip(("dx", "dw", "db"), with_ids[:3], without[:3], strict=True):
        assert (a is None and e is None) or torch.equal(a, e), name
    assert with_ids[3][2].item() == without[3][2].item() == 2
    torch.testing.assert_close(with_ids[3], without[3], rtol=1e-6, atol=0.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen_parameters_give_only_the_count(backend):
    """A frozen weight and bias (LoRA): no per-segment sums, the statistics are the count E alone."""
    spec, x, weight, bias, dy = make_inputs("layer_norm_bias", "two_rows")
    ids = segment_ids_for("two_rows")
    statistics = torch.zeros(STATISTICS_SIZE, requires_grad=True)
    x_leaf = x.clone().requires_grad_()
    with norm_backend(backend):
        gns_norm(x_leaf, weight, bias, spec, statistics, ids).backward(dy)
    assert statistics.grad.tolist() == [0.0, 0.0, 4.0]


def run_without_statistics(backend, spec, x, weight, bias, dy, ids):
    x = x.clone().requires_grad_()
    weight = weight.clone().requires_grad_()
    with norm_backend(backend):
        gns_norm(x, weight, bias, spec, None, ids).backward(dy)
    return x.grad, weight.grad


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_statistics_means_no_segment_work(backend, monkeypatch):
    """statistics=None: the segments are not looked at in the backward, and the gradients are unchanged."""
    spec, x, weight, bias, dy = make_inputs("rms_llama_bf16", "one_row")
    ids = segment_ids_for("one_row")
    expected = run_without_statistics(backend, spec, x, weight, bias, dy, None)

    def no_segment_work(*args, **kwargs):
        raise AssertionError("per-segment work without statistics")

    monkeypatch.setattr(kernels, "_segment_statistics", no_segment_work)
    monkeypatch.setattr("hf_gns_spam.ops.norm_reference.segment_sums", no_segment_work)
    got = run_without_statistics(backend, spec, x, weight, bias, dy, ids)
    assert all(torch.equal(a, e) for a, e in zip(got, expected, strict=True))


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph_with_segments(backend):
    spec, x, weight, bias, dy = make_inputs("layer_norm_bias", "heads")
    ids = segment_ids_for("heads")

    def step(x, weight, bias, statistics, ids):
        return gns_norm(x, weight, bias, spec, statistics, ids) * 2.0

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    results = []
    for function in (step, compiled):
        leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
        statistics = torch.zeros(STATISTICS_SIZE, requires_grad=True)
        with norm_backend(backend):
            function(*leaves, statistics, ids).backward(dy)
        results.append([t.grad for t in leaves] + [statistics.grad])
    for eager, traced in zip(*results, strict=True):
        assert torch.equal(eager, traced)
    assert results[1][3][2].item() == 4


@pytest.mark.parametrize("backend", BACKENDS)
def test_invalid_segment_ids_are_refused(backend):
    spec, x, weight, bias, dy = make_inputs("layer_norm_bias", "two_rows")
    ids = segment_ids_for("two_rows")

    def call(segment_ids):
        with norm_backend(backend):
            gns_norm(x, weight, bias, spec, torch.zeros(STATISTICS_SIZE, requires_grad=True), segment_ids)

    with pytest.raises(TypeError, match=r"int32 or int64, got torch\.float32"):
        call(ids.float())
    with pytest.raises(TypeError, match="int32 or int64"):
        call(ids.to(torch.int16))
    with pytest.raises(ValueError, match=r"shape \[2, 12\].*got \[24\]"):
        call(ids.reshape(-1))
    with pytest.raises(ValueError, match=r"shape \[2, 12\].*got \[2, 12, 1\]"):
        call(ids[..., None])
    with pytest.raises(ValueError, match=r"non-decreasing.*segment_ids\[1, 0\] = 0 follows 2"):
        call(torch.cat([ids[:1], ids[1:] - 3]))
    with pytest.raises(ValueError, match="≥ 0"):
        call(ids - 1)
    call(ids.int())  # int32 ids are fine
    with pytest.raises(ValueError, match="non-decreasing"):  # the torch backward checks too (it reads the ids)
        _, mean, rstd = norm_forward(spec, x, weight, bias)
        norm_backward(spec, dy, x, weight, bias, mean, rstd, True, True, True, ids.flip(1))


def test_kernel_marks_unchecked_invalid_ids_with_nan(monkeypatch):
    """On a GPU the Triton backward reads no ids on the host: invalid ids give NaN statistics instead of an error.
    Simulated on CPU by turning the host check off."""
    spec, x, weight, bias, dy = make_inputs("layer_norm_bias", "two_rows")
    ids = segment_ids_for("two_rows")
    _, mean, rstd = norm_forward(spec, x, weight, bias)
    monkeypatch.setattr(kernels, "check_segment_values", lambda *args, **kwargs: 0)

    def statistics(segment_ids):
        return kernels.gns_norm_backward(
            spec, dy, x, weight, bias, mean, rstd, True, True, True, segment_ids, rows_per_tile=4
        )[3]

    assert torch.isfinite(statistics(ids)).all()
    assert torch.isnan(statistics(ids.flip(1))).all()  # decreasing
    assert torch.isnan(statistics(ids - 1)).all()  # negative
    assert torch.isnan(statistics(ids + 2**31)).all()  # beyond int32
    assert torch.isnan(statistics(ids + 2**31 - 4)).all()  # the last id is 2³¹ − 1: no overflow in the kernel's loop
    assert torch.isfinite(statistics(ids + 2**31 - 5)).all()  # the largest id the kernel takes is 2³¹ − 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_unused_ids_count_as_empty_sequences(backend):
    """Ids need not be consecutive: E = max + 1, an unused id is a sequence with a zero gradient."""
    spec, x, weight, bias, dy = make_inputs("layer_norm_bias", "two_rows")
    ids = segment_ids_for("two_rows")
    gapped = ids + (ids >= 1).long() * 2  # ids 0, 3, 4, 5: ids 1 and 2 unused
    *_, dense = run(backend, spec, x, weight, bias, dy, ids)
    *_, sparse = run(backend, spec, x, weight, bias, dy, gapped)
    assert sparse[2].item() == 6 and dense[2].item() == 4
    torch.testing.assert_close(sparse[[0, 1]], dense[[0, 1]], rtol=1e-6, atol=0.0)
