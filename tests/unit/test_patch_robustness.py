"""A patch that never breaks a model: pickling, shared norms, patching a submodule, 1-D inputs, sequence-first
inputs, and two patched models in one process."""

from __future__ import annotations

import copy
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from hf_gns_spam import patch_model, per_example_grad_stats, reset_per_example_grad_stats, unpatch_model
from hf_gns_spam.patching import is_patched
from tests.support import model_zoo
from tests.support.paths import REPO_ROOT
from tests.support.references import assert_same_statistics, snapshot


def test_a_patched_model_pickles_and_loads_in_a_fresh_process(tmp_path):
    model = model_zoo.build("llama")
    patch_model(model)
    inputs = model_zoo.batch("llama")
    expected = model(**inputs).logits
    path = tmp_path / "model.pt"
    torch.save(model, path)
    torch.save(inputs, tmp_path / "inputs.pt")
    torch.save(expected, tmp_path / "expected.pt")
    code = textwrap.dedent(
        f"""
        import torch, hf_gns_spam
        from hf_gns_spam import per_example_grad_stats
        from hf_gns_spam.patching import is_patched
        model = torch.load({str(path)!r}, weights_only=False)
        inputs = torch.load({str(tmp_path / "inputs.pt")!r})
        assert sum(is_patched(m) for m in model.modules()) == 5
        output = model(**inputs)
        assert torch.equal(output.logits, torch.load({str(tmp_path / "expected.pt")!r}))
        output.loss.backward()
        stats = per_example_grad_stats(model)
        assert all(s.count.item() == 3 and s.sum_sq.item() > 0 for s in stats.values()), stats
        print("ok")
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, check=False)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]


class SharedNorms(nn.Module):
    """A norm registered under two names, a norm whose weight is tied to another's, and one applied in a loop."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.first = nn.LayerNorm(16)
        self.alias = self.first  # the same module under a second name
        self.tied = nn.LayerNorm(16)
        self.tied_too = nn.LayerNorm(16)
        self.tied_too.weight = self.tied.weight
        self.looped = nn.LayerNorm(16)
        self.plain = nn.LayerNorm(16)
        self.head = nn.Linear(16, 50)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        hidden = self.tied_too(self.tied(self.first(self.embed(input_ids))))
        for _ in range(3):  # ALBERT-style: one layer applied several times
            hidden = hidden + self.looped(hidden)
        return self.head(self.plain(hidden))


def test_shared_norms_are_skipped_at_patch_time_or_left_out_at_run_time():
    model = SharedNorms()
    report = patch_model(model)
    reasons = {s.name: s.reason for s in report.skipped}
    assert reasons["first"].startswith("shared: the same module is registered as first, alias")
    assert reasons["tied"] == "shared: its weight is also held by tied_too"
    assert reasons["tied_too"] == "shared: its weight is also held by tied"
    assert sorted(p.name for p in report.patched) == ["looped", "plain"]  # the loop is only seen at run time
    input_ids = torch.randint(0, 50, (4, 6))
    with pytest.warns(UserWarning, match="'looped' was called more than once in one forward"):
        model(input_ids).sum().backward()
    assert sorted(per_example_grad_stats(model)) == ["plain.bias", "plain.weight"]
    # plain is still exact: 4 examples, and the same statistics as with the loop left unpatched
    reference = SharedNorms()
    reference.load_state_dict(model.state_dict())
    patch_model(reference, exclude="looped")
    reference(input_ids).sum().backward()
    assert_same_statistics(snapshot(model), snapshot(reference))


def test_gradient_checkpointing_is_not_mistaken_for_sharing():
    model = model_zoo.build("llama")
    patch_model(model)
    model.gradient_checkpointing_enable()
    model.train()
    model(**model_zoo.batch("llama")).loss.backward()  # recomputation calls each norm again, inside the backward
    assert not any(getattr(m, "_gns_shared", False) for m in model.modules())
    assert len(per_example_grad_stats(model)) == 5


def test_patching_the_decoder_inside_a_causal_lm_measures_the_same():
    inputs = model_zoo.batch("llama")
    whole, inner = model_zoo.build("llama"), model_zoo.build("llama")
    patch_model(whole)
    patch_model(inner.model)
    whole(**inputs).loss.backward()
    inner(**inputs).loss.backward()
    expected = snapshot(whole)
    assert_same_statistics({f"model.{k}": v for k, v in snapshot(inner.model).items()}, expected)


def test_a_one_dimensional_input_behaves_as_the_original():
    norm = nn.LayerNorm(8)
    with torch.no_grad():
        norm.weight.normal_()
    patched = copy.deepcopy(norm)
    patch_model(patched)
    x = torch.randn(8)
    torch.testing.assert_close(patched(x), norm(x))
    x.requires_grad_()
    patched(x).square().sum().backward()
    stats = per_example_grad_stats(patched)
    assert stats["weight"].count.item() == 1


class SequenceFirst(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.norm = nn.LayerNorm(16)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.norm(self.embed(input_ids).transpose(0, 1))  # [T, B, D]


def test_a_sequence_first_input_is_refused():
    model = SequenceFirst()
    patch_model(model)
    with pytest.raises(ValueError, match="sequence-first model"):
        model(torch.randint(0, 50, (3, 6)))
    unpatch_model(model)
    assert not any(is_patched(m) for m in model.modules())
    assert model(torch.randint(0, 50, (3, 6))).shape == (6, 3, 16)


def test_two_patched_models_interleaving_forward_and_backward():
    """Each model keeps its own batch context: OPT flattens [B, T, D] to [B·T, D] before a norm, and gradient
    checkpointing re-runs the norms in the backward, after the other model's forward."""
    first, second = model_zoo.build("opt"), model_zoo.build("opt", seed=1)
    for model in (first, second):
        patch_model(model)
        model.gradient_checkpointing_enable()
        model.train()  # checkpointing needs train mode; without dropout the runs are deterministic
        for module in model.modules():
            for attribute in ("p", "dropout", "activation_dropout", "attention_dropout", "layerdrop"):
                if isinstance(getattr(module, attribute, None), float):
                    setattr(module, attribute, 0.0)
    batch_first, batch_second = model_zoo.batch("opt", batch_size=2), model_zoo.batch("opt", batch_size=3, seed=1)
    alone = {}
    for name, model, batch in (("first", first, batch_first), ("second", second, batch_second)):
        model(**batch).loss.backward()
        alone[name] = snapshot(model)
        reset_per_example_grad_stats(model)
        model.zero_grad()
    loss_first = first(**batch_first).loss
    loss_second = second(**batch_second).loss
    loss_first.backward()
    loss_second.backward()
    assert_same_statistics(snapshot(first), alone["first"])
    assert_same_statistics(snapshot(second), alone["second"])
