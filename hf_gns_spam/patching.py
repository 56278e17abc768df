"""``patch_model``: put GNS-aware normalization into any PyTorch / Hugging Face model, and take it out again.

A module is patched in place by switching its class to a subclass of its own class whose ``forward`` calls
:func:`hf_gns_spam.ops.gns_norm.gns_norm`. The module keeps its ``nn.Parameter`` objects (optimizer groups, peft,
tied weights and state-dict keys stay valid), ``isinstance(module, nn.LayerNorm)`` stays true for LayerNorms (the
Trainer's weight-decay grouping uses it) and the class name keeps its "LayerNorm"/"RMSNorm" part (``_init_weights``
uses it): ``LlamaRMSNorm`` becomes ``GNSLlamaRMSNorm``.

Modules are recognised by structure and by a numerical probe, not by class name, so ``trust_remote_code`` models
work too:

* ``type(m) is nn.LayerNorm`` (or a subclass that does not override ``forward``) over the last dimension;
* otherwise a leaf module with a 1-D ``weight`` (and optionally a ``bias``), an epsilon attribute and a one-input
  ``forward``, whose output on random inputs matches one row of the variant table
  (:mod:`hf_gns_spam.kernels.norm_variants`: RMSNorm with ``w`` or ``1 + w``, or a LayerNorm written by hand), in
  float32 for the formula and, to find how it rounds, in bfloat16.

Everything else that looks like a normalization layer is reported as skipped, with the reason.
"""

from __future__ import annotations

import copy
import fnmatch
import inspect
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from hf_gns_spam.integrations.bitsandbytes_cpu import disable_cpu_weight_repacking, restore_cpu_weight_repacking
from hf_gns_spam.kernels.norm_variants import VARIANTS, NormVariant, find_variant
from hf_gns_spam.ops.gns_norm import gns_norm
from hf_gns_spam.ops.norm_reference import STATISTICS_SIZE, NormSpec, norm_forward, output_dtype
from hf_gns_spam.sequences import sequence_ids

__all__ = [
    "BatchContext",
    "PatchReport",
    "PatchedModule",
    "SkippedModule",
    "is_patched",
    "patch_model",
    "set_paired_rows",
    "unpatch_model",
]

EPS_ATTRIBUTES = ("variance_epsilon", "eps", "epsilon", "layer_norm_eps")


@dataclass(frozen=True)
class PatchedModule:
    """A normalization module ``patch_model`` took over: its name in ``model.named_modules()``, its original class
    name, how it was recognised (``kind``: its variant's :attr:`~hf_gns_spam.kernels.norm_variants.NormVariant.label`,
    e.g. ``"rms_norm(1+w), rounding float32_product"``; the same on a re-patch) and the :class:`NormSpec` its
    statistics are computed with."""

    name: str
    original_class: str
    kind: str
    spec: NormSpec


@dataclass(frozen=True)
class SkippedModule:
    """A module that looks like a normalization layer but was left alone, and why (``reason``)."""

    name: str
    class_name: str
    reason: str


@dataclass
class PatchReport:
    """What :func:`patch_model` did to the normalization modules: every patched module and every norm-like module
    it left alone, with why."""

    patched: list[PatchedModule] = field(default_factory=list)
    skipped: list[SkippedModule] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"patched {len(self.patched)} normalization module(s), skipped {len(self.skipped)}"]
        lines += [f"  patched  {p.name}: {p.original_class} -> {p.kind}" for p in self.patched]
        lines += [f"  skipped  {s.name}: {s.class_name} ({s.reason})" for s in self.skipped]
        return "\n".join(lines)


@dataclass
class BatchContext:
    """What the latest forward call with gradients of a patched model says about its examples.

    Written by a pre-hook on the module ``patch_model`` was called on (its root) and read by that root's patched
    norms, so that two patched models in one process (a policy and its reference model, a teacher and a student)
    never see each other's batches. Kept after the forward, and left alone by forwards without gradients (which
    take no statistics): gradient checkpointing re-runs the norms during the backward of the same batch.
    """

    batch_size: int | None = None  # rows of the forward's inputs (dim 0 of input_ids, inputs_embeds, ...)
    sequence_ids: torch.Tensor | None = None  # [B, T] sequence of each token in a packed batch (see sequences.py)
    forward_index: int = 0  # counts the root's forward calls (a norm called twice in one is shared)
    # examples made of two rows, the batch being [first rows of the B/2 examples; their second rows] (TRL's DPO
    # and reward trainers: [chosen; rejected]); set by GNSCallback (set_paired_rows), not by the forward
    paired_rows: bool = False


_INPUT_NAMES = ("input_ids", "inputs_embeds", "pixel_values", "input_values", "input_features")


def _record_batch_context(root: nn.Module, args: tuple, kwargs: dict) -> None:
    if not torch.is_grad_enabled():  # no statistics to take; a checkpointed backward may still need the context
        return
    context: BatchContext = root._gns_batch_context
    context.forward_index += 1
    context.batch_size = None
    for name in _INPUT_NAMES:
        if isinstance(kwargs.get(name), torch.Tensor):
            context.batch_size = kwargs[name].shape[0]
            break
    else:
        for value in (*args, *kwargs.values()):
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                context.batch_size = value.shape[0]
                break
    context.sequence_ids = sequence_ids(kwargs)


def set_paired_rows(model: nn.Module, paired: bool) -> None:
    """Declare that in ``model``'s training forwards an example is a pair of rows: row i and row i + B/2 of a batch
    of B rows (TRL's DPOTrainer and RewardTrainer concatenate the chosen and the rejected sequences so). The
    statistics are then those of each pair's gradient, the sum of its two rows' contributions (cross term
    included), not of each row's. Applies to every patched norm of ``model`` (whichever module patch_model was
    called on)."""
    contexts = {id(m._gns_context): m._gns_context for m in model.modules() if is_patched(m)}
    for context in contexts.values():
        context.paired_rows = paired


def _pair_order(rows: int, module: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For a batch of ``rows`` = 2P rows whose examples are the pairs (i, i + P): the order that puts each pair's
    rows together, its inverse, and each reordered row's pair (non-decreasing: the segment ids of the statistics)."""
    if rows % 2:
        raise ValueError(
            f"{type(module).__name__} {getattr(module, '_gns_name', '')!r}: the examples are pairs of rows (chosen and "
            f"rejected), but this batch has {rows} rows, an odd number"
        )
    half = rows // 2
    order = torch.arange(rows).view(2, half).t().reshape(-1)  # 0, P, 1, P + 1, ...
    return order, torch.argsort(order), torch.arange(half).repeat_interleave(2)


def _rebuild_patched_module(original: type[nn.Module]) -> nn.Module:
    """Unpickling: an empty instance of the patched class of ``original`` (its state is set afterwards)."""
    cls = _patched_class(original)
    return cls.__new__(cls)


class _GNSNormMixin:
    """The forward of every patched normalization module."""

    _gns_original_class: type[nn.Module]
    _gns_spec: NormSpec
    _gns_statistics: torch.Tensor
    _gns_sinks: tuple[torch.Tensor, torch.Tensor | None]  # gradients of a frozen weight and bias (_new_leaves)
    _gns_context: BatchContext

    def __reduce_ex__(self, protocol: int):
        # the patched class is made at run time, so pickle (torch.save, deepcopy) rebuilds it from the original
        return _rebuild_patched_module, (self._gns_original_class,), self.__dict__.copy()

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if hidden_states.dim() == 1:  # one feature vector, as nn.LayerNorm accepts: one example
            return self.forward(hidden_states.unsqueeze(0)).squeeze(0)
        weight: torch.Tensor = self.weight
        bias: torch.Tensor | None = getattr(self, "bias", None)
        context = self._gns_context
        statistics, sinks = None, (None, None)
        if (
            torch.is_grad_enabled()
            and not getattr(self, "_gns_shared", False)
            and _backward_passes(self, hidden_states)
        ):
            if self._gns_statistics.device != weight.device:  # the model moved after patching
                _new_leaves(self)
            statistics = self._gns_statistics
            self._note_call(context.forward_index)
            if getattr(self, "_gns_shared", False):
                statistics = None
            else:  # frozen parameters (LoRA): their gradient goes to a sink, so that they are measured too
                weight_sink, bias_sink = self._gns_sinks
                sinks = (
                    None if weight.requires_grad else weight_sink,
                    None if bias is None or bias.requires_grad else bias_sink,
                )
        if self._gns_spec.variant.kind.float32_under_autocast and torch.is_autocast_enabled(hidden_states.device.type):
            # F.layer_norm runs in float32 under autocast; do as it does
            hidden_states, weight = hidden_states.float(), weight.float()
            bias = None if bias is None else bias.float()
        shape, batch = hidden_states.shape, context.batch_size if statistics is not None else None
        if batch is not None and shape[0] != batch:
            if hidden_states.dim() >= 3 and shape[1] == batch:
                raise ValueError(
                    f"{type(self).__name__} got an input of shape {tuple(shape)} in a forward of {batch} examples: "
                    "examples on dimension 1 (a sequence-first model) are not supported; the per-example statistics "
                    "take examples along dimension 0. Leave this module out: patch_model(..., exclude=...)."
                )
            if shape[0] % batch == 0:  # [B·T, D] flattened by the model (OPT's MLP): examples stay examples
                hidden_states = hidden_states.reshape(batch, -1, shape[-1])
        segments = context.sequence_ids if statistics is not None else None
        if segments is not None and segments.shape != hidden_states.shape[:2]:
            segments = None  # a module off the token path (a vision tower in a multimodal model)
        inverse = None
        if statistics is not None and context.paired_rows:
            if segments is not None:
                raise ValueError("examples made of paired rows cannot also be packed sequences (padding_free)")
            # reorder the rows so that each pair's two rows are neighbours, and take each pair as one segment
            order, inverse, pairs = (t.to(hidden_states.device) for t in _pair_order(hidden_states.shape[0], self))
            hidden_states = hidden_states[order]
            segments = pairs if hidden_states.dim() == 2 else pairs[:, None].expand(hidden_states.shape[:2])
        output = gns_norm(
            hidden_states, weight, bias, self._gns_spec, statistics, segment_ids=segments, frozen_grads=sinks
        )
        if inverse is not None:
            output = output[inverse]
        return output.reshape(shape)

    def _note_call(self, forward_index: int) -> None:
        """A second call within one forward of the root (outside a backward's recomputation) means the module is
        shared (a layer applied in a loop, as ALBERT does): its per-example statistics would lack the cross terms
        between uses, so it stops measuring and :func:`~hf_gns_spam.stats.per_example_grad_stats` leaves it out."""
        if torch.compiler.is_compiling() or torch._C._current_graph_task_id() != -1:
            return  # traced by torch.compile (checked in eager runs), or gradient checkpointing re-running it
        if getattr(self, "_gns_last_forward", None) == forward_index and forward_index > 0:
            self._gns_shared = True
            _new_leaves(self)
            warnings.warn(
                f"{type(self).__name__} {getattr(self, '_gns_name', '')!r} was called more than once in one forward "
                "(a shared normalization layer): hf_gns_spam leaves it out of the per-example statistics",
                stacklevel=3,
            )
        self._gns_last_forward = forward_index


def _backward_passes(module: nn.Module, hidden_states: torch.Tensor) -> bool:
    """Whether the backward will pass through ``module``: one of its parameters is trained or its input carries a
    gradient. A frozen norm is measured only then, so that measuring never adds a backward through the layers
    below it (a norm whose input is a frozen embedding's output is not measured)."""
    bias = getattr(module, "bias", None)
    return module.weight.requires_grad or (bias is not None and bias.requires_grad) or hidden_states.requires_grad


_PATCHED_CLASSES: dict[type[nn.Module], type[nn.Module]] = {}


def _patched_class(original: type[nn.Module]) -> type[nn.Module]:
    if original not in _PATCHED_CLASSES:
        _PATCHED_CLASSES[original] = type(
            f"GNS{original.__name__}",
            (_GNSNormMixin, original),
            {"_gns_original_class": original, "__module__": __name__},
        )
    return _PATCHED_CLASSES[original]


def _new_leaves(module: nn.Module) -> None:
    """Fresh autograd leaves on the weight's device, whose ``.grad`` the backward fills
    (:mod:`hf_gns_spam.ops.gns_norm`): ``_gns_statistics``, the per-example statistics, and ``_gns_sinks``, the
    float32 gradients of a frozen weight and bias (so that frozen norms are measured too; their batch gradient is
    read from the sinks)."""
    device = module.weight.device
    module._gns_statistics = torch.zeros(STATISTICS_SIZE, dtype=torch.float32, device=device, requires_grad=True)
    module._gns_sinks = tuple(
        None if p is None else torch.zeros(p.shape, dtype=torch.float32, device=device, requires_grad=True)
        for p in (module.weight, getattr(module, "bias", None))
    )


def is_patched(module: nn.Module) -> bool:
    """Whether ``module`` is a normalization module swapped by :func:`patch_model` (and not yet unpatched)."""
    return isinstance(module, _GNSNormMixin)


def _epsilon(module: nn.Module) -> float | None:
    for attribute in EPS_ATTRIBUTES:
        value = getattr(module, attribute, None)
        if isinstance(value, (float, int)) and not isinstance(value, bool):
            return float(value)
    return None


def _looks_like_a_norm(name: str, module: nn.Module) -> bool:
    """Worth a line in the report if left alone."""
    leaf_name = name.rsplit(".", 1)[-1].lower()
    return "norm" in type(module).__name__.lower() or "norm" in leaf_name or leaf_name.startswith("ln")


def _forward_inputs(module: nn.Module) -> int:
    """How many positional inputs ``forward`` accepts (``*args`` counts as many)."""
    parameters = inspect.signature(module.forward).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in parameters):
        return 2
    return sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in parameters)


_PROBE_CACHE: dict[tuple[type[nn.Module], bool], NormVariant | str] = {}


def _candidates(has_bias: bool) -> dict[str, list[NormVariant]]:
    """The variant table's rows a module may compute, grouped by formula in table order (only rows that allow a
    bias for a module with one)."""
    candidates: dict[str, list[NormVariant]] = {}
    for variant in VARIANTS:
        if variant.bias or not has_bias:
            candidates.setdefault(variant.formula, []).append(variant)
    return candidates


def _probe(module: nn.Module, eps: float) -> NormVariant | str:
    """Find the variant (formula and rounding) of a leaf normalization module numerically; a string says why none
    fits.

    The probe runs on a float copy of the module (the real one is never touched) with random weights, on inputs
    small enough that eps matters. The formula is the candidate group (:func:`_candidates`) whose float32 output
    matches (every rounding of a formula computes the same in float32); the rounding (where x̂ is cast before or
    after the multiplication by the weight) is the group's row that reproduces the most bfloat16 outputs exactly,
    for bfloat16 and for float32 weights, the first row on a tie.
    """
    features = module.weight.shape[0]
    has_bias = getattr(module, "bias", None) is not None
    generator = torch.Generator().manual_seed(0)
    probe = copy.deepcopy(module).to(device="cpu", dtype=torch.float32)
    with torch.no_grad():
        probe.weight.copy_(torch.randn(features, generator=generator))
        if has_bias:
            probe.bias.copy_(torch.randn(features, generator=generator))
    x = torch.randn(2, 3, features, generator=generator) * torch.logspace(-3.5, 0.5, 3).view(1, 3, 1) + 0.1

    def reference(spec: NormSpec, inputs: torch.Tensor, module_copy: nn.Module) -> torch.Tensor:
        bias = module_copy.bias if has_bias else None
        return norm_forward(spec, inputs, module_copy.weight, bias)[0]

    candidates = _candidates(has_bias)
    with torch.no_grad():
        try:
            y = probe(x)
        except Exception as error:
            return f"probe forward failed ({type(error).__name__})"
        if not isinstance(y, torch.Tensor) or y.shape != x.shape:
            return "output is not a tensor of the input's shape"
        errors = {}
        for formula, variants in candidates.items():
            spec = NormSpec.of(variants[0], eps)
            errors[formula] = ((y - reference(spec, x, probe)).abs().max() / y.abs().max()).item()
        formula = min(errors, key=errors.get)
        if errors[formula] > 1e-5:
            return "output matches no supported normalization formula"

        best_variant, best_agreement = None, -1.0
        for variant in candidates[formula]:
            spec = NormSpec.of(variant, eps)
            agreement = 1.0
            for weight_dtype in (torch.bfloat16, torch.float32):
                module_copy = copy.deepcopy(probe).to(weight_dtype)
                y = module_copy(x.bfloat16())
                expected = reference(spec, x.bfloat16(), module_copy)
                if y.dtype != output_dtype(spec, torch.bfloat16, weight_dtype):
                    agreement = 0.0
                    break
                agreement = min(agreement, (y == expected).float().mean().item())
            if agreement > best_agreement:
                best_variant, best_agreement = variant, agreement
        if best_agreement < 0.95:
            return "its bfloat16 rounding matches no supported variant"
    return best_variant


#: The row nn.LayerNorm computes (recognised by type, not probed).
_LAYER_NORM = find_variant("layer_norm", 0.0, "float32_product")


def _classify(module: nn.Module) -> tuple[str, NormSpec] | str:
    """(description, spec) for a module patch_model can take over, else the reason it cannot."""
    if isinstance(module, nn.LayerNorm):
        if type(module).forward is not nn.LayerNorm.forward:
            return "nn.LayerNorm subclass that overrides forward"
        if len(module.normalized_shape) != 1:
            return "normalizes over more than the last dimension"
        if not module.elementwise_affine:
            return "weightless (no parameters to measure)"
        return _LAYER_NORM.label, NormSpec.of(_LAYER_NORM, module.eps)
    if list(module.children()):
        return "has child modules"
    parameters = dict(module.named_parameters(recurse=False))
    weight = parameters.get("weight")
    if weight is None:
        return "weightless (no parameters to measure)"
    if set(parameters) - {"weight", "bias"}:
        return f"unexpected parameters {sorted(set(parameters) - {'weight', 'bias'})}"
    if weight.dim() != 1:
        return f"{weight.dim()}-D weight (per-head norm)"
    if weight.device.type == "meta" or not weight.dtype.is_floating_point:
        return "weight is on the meta device or quantized"
    if _forward_inputs(module) != 1:
        return "forward takes more than one input (gated norm)"
    eps = _epsilon(module)
    if eps is None:
        eps = 1e-6 if isinstance(module, nn.RMSNorm) and module.eps is None else None
    if eps is None:
        return "no epsilon attribute (variance_epsilon/eps/epsilon)"
    cache_key = (type(module), getattr(module, "bias", None) is not None)
    if cache_key not in _PROBE_CACHE:
        _PROBE_CACHE[cache_key] = _probe(module, eps)
    variant = _PROBE_CACHE[cache_key]
    if isinstance(variant, str):
        return variant
    return variant.label, NormSpec.of(variant, eps)


def _selected(name: str, include: Iterable[str] | None, exclude: Iterable[str] | None) -> bool:
    if include is not None and not any(fnmatch.fnmatchcase(name, pattern) for pattern in include):
        return False
    return not (exclude is not None and any(fnmatch.fnmatchcase(name, pattern) for pattern in exclude))


def patch_model(
    model: nn.Module, include: str | Iterable[str] | None = None, exclude: str | Iterable[str] | None = None
) -> PatchReport:
    """Swap every supported normalization module of ``model`` for its GNS-aware twin, in place.

    Args:
        model: any ``nn.Module`` (a Hugging Face model, a peft model, ...). Patch it before the optimizer is built.
        include: glob pattern(s) over module names (``"model.layers.*.input_layernorm"``); only these are patched.
        exclude: glob pattern(s) of module names to leave alone.

    Returns:
        A :class:`PatchReport` of the normalization modules. Patching twice is harmless: already patched modules
        are listed as patched again.

    Before the norms, and apart from them, ``patch_model`` runs one step that is not about normalization:
    :func:`~hf_gns_spam.integrations.bitsandbytes_cpu.disable_cpu_weight_repacking`, so that bitsandbytes 4-bit
    layers (QLoRA) still train after an evaluation on a CPU with AVX512-BF16; a layer that was already repacked
    raises :class:`~hf_gns_spam.integrations.bitsandbytes_cpu.CPURepackingError`. Its result is not part of the
    report: call that function (idempotent) for the list of layers, or on a model you do not patch.
    """
    include = [include] if isinstance(include, str) else include
    exclude = [exclude] if isinstance(exclude, str) else exclude
    disable_cpu_weight_repacking(model)  # the bitsandbytes step (docstring), before any norm is touched
    report = PatchReport()
    context = getattr(model, "_gns_batch_context", None) or BatchContext()
    shared = _shared_modules(model)
    for name, module in model.named_modules():
        if is_patched(module):
            if not hasattr(module, "_gns_sinks"):  # patched by a version without sinks, then pickled
                _new_leaves(module)
            report.patched.append(
                PatchedModule(name, module._gns_original_class.__name__, module._gns_description, module._gns_spec)
            )
            continue
        candidate = isinstance(module, nn.LayerNorm) or _looks_like_a_norm(name, module)
        if not candidate and (list(module.children()) or not hasattr(module, "weight") or _epsilon(module) is None):
            continue
        if not _selected(name, include, exclude):
            if candidate:
                report.skipped.append(SkippedModule(name, type(module).__name__, "excluded by include/exclude"))
            continue
        result = shared.get(module) or _classify(module)
        if isinstance(result, str):
            if candidate:
                report.skipped.append(SkippedModule(name, type(module).__name__, result))
            continue
        description, spec = result
        original = type(module)
        module.__class__ = _patched_class(original)
        module._gns_spec, module._gns_description, module._gns_context = spec, description, context
        module._gns_name = name  # its name in the model patch_model was given, for messages
        _new_leaves(module)
        report.patched.append(PatchedModule(name, original.__name__, description, spec))
    if report.patched and getattr(model, "_gns_batch_context_hook", None) is None:
        model._gns_batch_context = context
        model._gns_batch_context_hook = model.register_forward_pre_hook(_record_batch_context, with_kwargs=True)
    return report


def _shared_modules(model: nn.Module) -> dict[nn.Module, str]:
    """Modules registered under several names, or whose weight another module also holds (tied weights), with the
    reason to skip them: a norm applied more than once per forward has per-example gradients that sum over its
    uses, which statistics taken use by use cannot give."""
    names: dict[nn.Module, list[str]] = {}
    owners: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        names.setdefault(module, []).append(name)
        for parameter in module.parameters(recurse=False):
            owners.setdefault(id(parameter), []).append(name)
    reasons = {}
    for module, module_names in names.items():
        weight = getattr(module, "weight", None)
        holders = sorted(set(owners.get(id(weight), ())) - set(module_names)) if weight is not None else []
        if len(module_names) > 1:
            reasons[module] = f"shared: the same module is registered as {', '.join(module_names)}"
        elif holders:
            reasons[module] = f"shared: its weight is also held by {', '.join(holders)}"
    return reasons


def unpatch_model(model: nn.Module) -> int:
    """Restore the original class of every patched module; returns how many norm modules were restored. Also undoes
    :func:`patch_model`'s bitsandbytes step (``restore_cpu_weight_repacking``)."""
    restore_cpu_weight_repacking(model)
    restored = 0
    for module in model.modules():
        if is_patched(module):
            module.__class__ = module._gns_original_class
            for attribute in ("_gns_spec", "_gns_description", "_gns_statistics", "_gns_context"):
                delattr(module, attribute)
            for attribute in ("_gns_shared", "_gns_last_forward", "_gns_name", "_gns_sinks"):
                module.__dict__.pop(attribute, None)
            restored += 1
    hook = getattr(model, "_gns_batch_context_hook", None)
    if hook is not None:
        hook.remove()
        del model._gns_batch_context_hook, model._gns_batch_context
    return restored
