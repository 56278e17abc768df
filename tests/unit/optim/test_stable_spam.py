"""StableSPAM against a float64 reference written from the formulas, against pytorch-optimizer, and its edge cases."""

from __future__ import annotations

import importlib.metadata
import io
import math

import pytest
import torch

from hf_gns_spam import StableSPAM
from hf_gns_spam.optim import momentum_decay_factor
from tests.support.host_sync import forbid_host_sync
from tests.support.optimizer_runs import initial_params, make_gradient_stream, max_relative_error, run_reference


def run_optimizer(optimizer_params, stream, dtype=torch.float32, **kwargs) -> list[torch.Tensor]:
    params = [p.detach().clone().to(dtype).requires_grad_() for p in optimizer_params]
    opt = StableSPAM(params, **kwargs)
    for grads in stream:
        for p, g in zip(params, grads, strict=True):
            p.grad = None if g is None else g.to(dtype)
        opt.step()
    return params


CONFIGS = [
    pytest.param({"mode": "clean", "reset_interval": 25}, id="clean"),
    pytest.param({"mode": "faithful", "reset_interval": 25}, id="faithful"),
    pytest.param({"mode": "clean", "reset_interval": 20, "total_steps": 60, "weight_decay": 0.1}, id="clean-cosine-wd"),
    pytest.param({"mode": "faithful", "reset_interval": 20, "total_steps": 60, "weight_decay": 0.1}, id="faith-cos-wd"),
    pytest.param({"mode": "faithful", "reset_interval": 0, "gamma1": 0.85, "gamma2": 0.99999}, id="faithful-bf16-hp"),
    pytest.param({"mode": "clean", "reset_interval": 0, "gamma1": -1, "gamma3": 0.0}, id="clean-gamma1-beta1"),
]


@pytest.mark.parametrize("config", CONFIGS)
def test_matches_float64_reference(config):
    stream = make_gradient_stream(90)
    init = initial_params()
    kwargs = {"lr": 1e-2, **config}
    reference_kwargs = {k: v for k, v in kwargs.items()}
    if reference_kwargs.get("gamma1") == -1:
        reference_kwargs["gamma1"] = 0.9
    expected = run_reference(init, stream, **reference_kwargs)
    # float64 parameters: the same maths, so agreement to float64 rounding.
    assert max_relative_error(run_optimizer(init, stream, torch.float64, **kwargs), expected) < 1e-10
    # float32 parameters and states: agreement to float32 rounding accumulated over 90 steps.
    assert max_relative_error(run_optimizer(init, stream, torch.float32, **kwargs), expected) < 2e-5


def test_clean_mode_equals_pytorch_optimizer_over_200_steps():
    # a test dependency (not on the GPU image); versions <= 3.11 silently skipped the clipping
    pytorch_optimizer = pytest.importorskip("pytorch_optimizer")

    assert int(importlib.metadata.version("pytorch-optimizer").split(".")[0]) >= 4
    stream = make_gradient_stream(200)
    init = initial_params()
    ours = [p.float().requires_grad_() for p in init]
    theirs = [p.float().requires_grad_() for p in init]
    groups = lambda ps: [{"params": ps[:2], "weight_decay": 0.05}, {"params": ps[2:], "weight_decay": 0.0}]  # noqa: E731
    opt = StableSPAM(groups(ours), lr=3e-3, reset_interval=50)
    ref = pytorch_optimizer.StableSPAM(groups(theirs), lr=3e-3, update_proj_gap=50)
    for grads in stream:
        for a, b, g in zip(ours, theirs, grads, strict=True):
            a.grad, b.grad = (None, None) if g is None else (g.float().clone(), g.float().clone())
        opt.step()
        ref.step()
    # the stream had 4 momentum resets, 11 spike steps, one all-zero gradient and one missing gradient
    assert max_relative_error(ours, [p.double() for p in theirs]) < 1e-6
    moved = max((a.double() - p).abs().max().item() for a, p in zip(ours, init, strict=True))
    assert moved > 0.1  # the comparison is not between two frozen copies


def adagn_norm_input(state_before: dict, state_after: dict, gamma1: float) -> float:
    """Recover n = ‖clipped g‖ from AdaGN's EMA update μ' = γ1·μ + (1−γ1)·n."""
    return ((state_after["norm_ema"] - gamma1 * state_before["norm_ema"]) / (1 - gamma1)).item()


def test_adaclip_clips_an_injected_spike_to_the_threshold():
    torch.manual_seed(0)
    p = torch.zeros(256, dtype=torch.float64, requires_grad=True)
    gamma3 = 0.9
    opt = StableSPAM([p], lr=0.0, gamma3=gamma3, reset_interval=0)
    for _ in range(30):
        p.grad = torch.randn(256, dtype=torch.float64)
        opt.step()
    state = opt.state[p]
    before = {k: v.clone() for k, v in state.items() if torch.is_tensor(v)}
    g = torch.randn(256, dtype=torch.float64)
    g[17] = 100.0 * g.abs().max()
    p.grad = g.clone()
    opt.step()
    t = 31
    ema = gamma3 * before["clip_max_ema"].item() + (1 - gamma3) * g.abs().max().item()
    threshold = ema / (1 - gamma3**t)
    assert state["clip_max_ema"].item() == pytest.approx(ema, rel=1e-12)
    expected_clipped = torch.where(g.abs() > threshold, g / g.abs().max() * threshold, g)
    assert expected_clipped[17].abs().item() == pytest.approx(threshold, rel=1e-12)  # the spike lands on T̂
    assert expected_clipped.abs().max().item() == pytest.approx(threshold, rel=1e-12)
    n = adagn_norm_input(before, state, 0.7)
    assert n == pytest.approx(expected_clipped.norm().item(), rel=1e-9)
    assert n < 0.2 * g.norm().item()  # without clipping the norm would be dominated by the spike


def test_first_step_passes_the_gradient_through():
    p = torch.zeros(50, dtype=torch.float64, requires_grad=True)
    opt = StableSPAM([p], lr=0.1, eps=0.0)
    g = torch.randn(50, dtype=torch.float64)
    p.grad = g.clone()
    opt.step()
    # step 1: threshold = max|g| (no clipping), AdaGN scale = 1, Adam's first step = -lr * sign(g)
    torch.testing.assert_close(p.detach(), -0.1 * g.sign(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", ["clean", "faithful"])
def test_zero_gradient(mode):
    p = torch.randn(20, dtype=torch.float64, requires_grad=True)
    opt = StableSPAM([p], lr=0.01, weight_decay=0.5, mode=mode, reset_interval=0)
    for _ in range(5):
        p.grad = torch.randn(20, dtype=torch.float64)
        opt.step()
    state = opt.state[p]
    before = {k: v.clone() for k, v in state.items() if torch.is_tensor(v)}
    value_before = p.detach().clone()
    p.grad = torch.zeros(20, dtype=torch.float64)
    opt.step()
    decayed = value_before * (1 - 0.01 * 0.5)
    assert torch.isfinite(p).all()
    if mode == "clean":  # skipped: only the weight decay acts
        torch.testing.assert_close(p.detach(), decayed, rtol=0, atol=0)
        for key in ("exp_avg", "exp_avg_sq", "norm_ema", "norm_sq_ema"):
            torch.testing.assert_close(state[key], before[key], rtol=0, atol=0)
    else:  # the official code: the zero gradient enters the moments and the parameter moves on its momentum
        torch.testing.assert_close(state["exp_avg"], 0.9 * before["exp_avg"], rtol=1e-12, atol=0)
        torch.testing.assert_close(state["norm_ema"], 0.7 * before["norm_ema"], rtol=1e-12, atol=0)
        assert (p.detach() - decayed).abs().max() > 1e-4


def test_reset_step_clean_mode_restarts_adam():
    p = torch.zeros(64, dtype=torch.float64, requires_grad=True)
    opt = StableSPAM([p], lr=0.1, eps=0.0, reset_interval=5)
    for _ in range(5):
        before = p.detach().clone()
        g = torch.randn(64, dtype=torch.float64) + 0.5
        p.grad = g.clone()
        opt.step()
    # t=5 is a reset step: the moments held only this step's gradient, so the update is a first Adam step
    update = p.detach() - before
    torch.testing.assert_close(update, -0.1 * g.sign(), rtol=1e-12, atol=1e-12)
    scaled = opt.state[p]["exp_avg"] / (1 - 0.9)  # m = (1 − β1)·ĝ
    torch.testing.assert_close(opt.state[p]["exp_avg_sq"], (1 - 0.999) * scaled**2, rtol=1e-12, atol=0)


def test_reset_step_faithful_mode_uses_the_old_moments():
    """reference/stable_spam.md §4.2: with a constant gradient and ΔT=5 the official reset step moves 1.84x a sign
    step (old moments, step-1 bias corrections) and the step after it 0.744x (fresh moments, bias corrections of k=2).
    """
    p = torch.zeros(64, dtype=torch.float64, requires_grad=True)
    lr, beta1, beta2 = 0.1, 0.9, 0.999
    opt = StableSPAM([p], lr=lr, eps=0.0, mode="faithful", reset_interval=5)
    g = torch.linspace(-1, 1, 64, dtype=torch.float64) + 0.01  # constant: AdaClip never fires, AdaGN scale = 1
    unit = g / g.norm()
    updates = []
    for _ in range(6):
        before = p.detach().clone()
        p.grad = g.clone()
        opt.step()
        updates.append(p.detach() - before)
    m5 = (1 - beta1**5) * unit  # five EMA steps of the same unit-norm gradient
    v5 = (1 - beta2**5) * unit**2
    expected_reset_update = -lr / (1 - beta1) * m5 / (v5.sqrt() / math.sqrt(1 - beta2))
    torch.testing.assert_close(updates[4], expected_reset_update, rtol=1e-10, atol=0)
    assert (updates[4] / (-lr * unit.sign())).mean().item() == pytest.approx(1.834, abs=1e-3)
    assert (updates[5] / (-lr * unit.sign())).mean().item() == pytest.approx(math.sqrt(1 + beta2) / (1 + beta1))
    assert math.sqrt(1 + beta2) / (1 + beta1) == pytest.approx(0.744, abs=1e-3)
    assert opt.state[p]["step"] == 2


def test_cosine_factor_values():
    # faithful: the official closed form, measured values in reference/stable_spam.md §4.2
    for t, s in [(1, 1.0), (1000, 0.997), (5000, 0.927), (10000, 0.750), (15000, 0.573), (20000, 0.5)]:
        assert momentum_decay_factor(t, 20000, 0.5, "faithful") == pytest.approx(s, abs=1e-3)
    assert momentum_decay_factor(25000, 20000, 0.5, "faithful") == pytest.approx(0.573, abs=1e-3)  # periodic
    assert momentum_decay_factor(40002, 20000, 0.5, "faithful") == pytest.approx(1.0, abs=1e-6)
    # clean: reaches eta_min at T and stays
    assert momentum_decay_factor(100, 100, 0.5, "clean") == 0.5
    assert momentum_decay_factor(500, 100, 0.5, "clean") == 0.5
    assert momentum_decay_factor(50, 100, 0.2, "clean") == pytest.approx(0.6)
    assert momentum_decay_factor(7, None, 0.5, "clean") == 1.0


@pytest.mark.parametrize("mode", ["clean", "faithful"])
@pytest.mark.parametrize(
    ("param_dtype", "state_bits"),
    [(torch.float32, 32), (torch.bfloat16, 32), (torch.float32, 16)],
    ids=["fp32", "bf16-params", "bf16-states"],
)
def test_state_dict_is_weights_only_and_resume_is_bit_identical(mode, param_dtype, state_bits):
    stream = make_gradient_stream(40)
    init = initial_params()

    def fresh():
        params = [p.to(param_dtype).requires_grad_() for p in init]
        groups = [{"params": params[:2]}, {"params": params[2:], "weight_decay": 0.01}, {"params": []}]
        return params, StableSPAM(groups, lr=1e-2, mode=mode, reset_interval=7, total_steps=30, state_bits=state_bits)

    def run(params, opt, grads_list):
        for grads in grads_list:
            for p, g in zip(params, grads, strict=True):
                p.grad = None if g is None else g.to(param_dtype)
            opt.step()

    straight_params, straight_opt = fresh()
    run(straight_params, straight_opt, stream)

    first_params, first_opt = fresh()
    run(first_params, first_opt, stream[:19])
    buffer = io.BytesIO()
    torch.save({"params": [p.detach() for p in first_params], "optimizer": first_opt.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    assert checkpoint["optimizer"]["param_groups"][0]["step"] == 19

    resumed_params, resumed_opt = fresh()
    with torch.no_grad():
        for p, saved in zip(resumed_params, checkpoint["params"], strict=True):
            p.copy_(saved)
    resumed_opt.load_state_dict(checkpoint["optimizer"])
    expected_moment_dtype = torch.bfloat16 if state_bits == 16 else torch.float32
    assert resumed_opt.state[resumed_params[0]]["exp_avg"].dtype == expected_moment_dtype
    run(resumed_params, resumed_opt, stream[19:])
    for a, b in zip(resumed_params, straight_params, strict=True):
        assert torch.equal(a, b)


def test_bf16_parameters_and_states_track_fp32():
    stream = make_gradient_stream(40)
    init = initial_params()
    expected = run_reference(init, stream, lr=1e-2, reset_interval=15)
    # bf16 parameters round every update to 8 mantissa bits (0.4%); bf16 moments only perturb the update direction.
    for dtype, bits, tol in [(torch.bfloat16, 32, 5e-2), (torch.float32, 16, 1e-3)]:
        got = run_optimizer(init, stream, dtype, lr=1e-2, reset_interval=15, state_bits=bits)
        assert got[0].dtype == dtype
        assert max_relative_error(got, expected) < tol


def test_parameter_groups_empty_frozen_and_several():
    a = torch.randn(5, 5, requires_grad=True)
    b = torch.randn(5, requires_grad=True)
    frozen = torch.randn(3, requires_grad=False)
    opt = StableSPAM([{"params": [a]}, {"params": [], "lr": 0.5}, {"params": [b, frozen], "lr": 0.1}], lr=0.01)
    a.grad, b.grad = torch.randn(5, 5), torch.randn(5)
    a0, b0, f0 = a.detach().clone(), b.detach().clone(), frozen.clone()
    opt.step()
    assert torch.equal(frozen, f0) and frozen not in opt.state
    # first step = -lr * sign(g) per group
    torch.testing.assert_close(a.detach() - a0, -0.01 * a.grad.sign(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(b.detach() - b0, -0.1 * b.grad.sign(), rtol=1e-4, atol=1e-6)
    assert [g["step"] for g in opt.param_groups] == [1, 1, 1]


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"lr": -1.0}, "lr"),
        ({"betas": (0.9, 1.0)}, "betas"),
        ({"betas": (0.9,)}, "betas"),
        ({"eps": -1e-8}, "eps"),
        ({"weight_decay": -0.1}, "weight_decay"),
        ({"gamma1": 1.0}, "gamma1"),
        ({"gamma2": -0.1}, "gamma2"),
        ({"gamma3": 1.5}, "gamma3"),
        ({"reset_interval": -1}, "reset_interval"),
        ({"reset_interval": 2.5}, "reset_interval"),
        ({"total_steps": 0}, "total_steps"),
        ({"eta_min": 1.5}, "eta_min"),
        ({"mode": "official"}, "mode"),
        ({"state_bits": 12}, "state_bits"),
        ({"lr": float("nan")}, "lr"),
    ],
)
def test_out_of_range_hyperparameters_are_rejected_by_name(kwargs, name):
    with pytest.raises(ValueError, match=rf"invalid {name}=.*{name} must be"):
        StableSPAM([torch.zeros(2, requires_grad=True)], **kwargs)


def test_out_of_range_group_override_is_rejected():
    with pytest.raises(ValueError, match="gamma2"):
        StableSPAM([{"params": [torch.zeros(2, requires_grad=True)], "gamma2": 2.0}])


@pytest.mark.parametrize("mode", ["clean", "faithful"])
def test_step_has_no_host_synchronisation(mode, monkeypatch):
    """The step must not read tensor values on the host: no .item(), bool(), boolean-mask indexing, .tolist()."""
    params = [torch.randn(s, requires_grad=True) for s in [(8, 8), (8,), (2, 3, 4)]]
    opt = StableSPAM(params, reset_interval=2, mode=mode, weight_decay=0.1, total_steps=5)
    for p in params:
        p.grad = torch.randn_like(p)
    params[1].grad.zero_()

    with forbid_host_sync(monkeypatch, "StableSPAM.step"):
        for _ in range(3):
            opt.step()
    assert all(torch.isfinite(p).all() for p in params)
