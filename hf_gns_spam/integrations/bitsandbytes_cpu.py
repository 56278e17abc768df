"""Keep bitsandbytes 4-bit layers trainable on CPUs with AVX512-BF16.

On a CPU with AVX512-BF16, ``bitsandbytes.nn.Linear4bit.forward`` (bitsandbytes ≥ 0.49, observed in 0.50.2)
rewrites its weight, in place and for good, into the layout of a fused bfloat16 CPU inference kernel the first time
it runs in eval mode on an input that does not require grad (``Trainer.evaluate``, ``torch.no_grad()``). Whether a
module does this is decided once, at construction, by its instance attribute ``support_avx512bf16_for_cpu``
(``= bitsandbytes.functional.has_avx512bf16()``). Observed consequences for a model that is being trained:

* the repacking needs ``in_features % blocksize == 0`` and ``out_features % 32 == 0``; a narrower layer (a tiny
  test model) fails with ``RuntimeError: shape '[N, 0]' is invalid for input of size ...`` or an AssertionError;
* a repacked layer has no backward: when training resumes after an evaluation, no gradient reaches the layer's
  input (LoRA adapters below it silently stop learning from everything above), and a trainable bias fails with
  "a view of a leaf Variable that requires grad is being used in an in-place operation";
* the repacked forward computes in bfloat16 whatever ``bnb_4bit_compute_dtype`` says.

A model that is trained must therefore never be repacked. :func:`disable_cpu_weight_repacking` turns the switch off
on every 4-bit layer; the layers then take bitsandbytes' ordinary dequantize-and-matmul path in evaluation as in
training, on every CPU. It is a step of its own, for whoever trains a 4-bit model and evaluates it on the CPU, before
the first evaluation: ``patch_model`` runs it before patching the norms (apart from them: its result is not in the
norm report), and it can be called on its own, on a model that is not patched or for the list of the layers it
turned off (calling it again returns the same list). :func:`restore_cpu_weight_repacking` undoes it
(``unpatch_model`` calls it). Where the switch is
not what this module expects, or a weight was already repacked, it raises :class:`CPURepackingError` with the fix
instead of letting training go wrong later. bitsandbytes is never imported here: a model with 4-bit layers has
imported it already.
"""

from __future__ import annotations

import sys

from torch import nn

from hf_gns_spam.errors import CPURepackingError

__all__ = ["REPACKING_SWITCH", "CPURepackingError", "disable_cpu_weight_repacking", "restore_cpu_weight_repacking"]

# The per-module switch bitsandbytes reads in Linear4bit.forward before repacking the weight.
REPACKING_SWITCH = "support_avx512bf16_for_cpu"
# Where this module keeps the switch's value from before disable_cpu_weight_repacking, for unpatch_model.
_SAVED_SWITCH = "_gns_saved_support_avx512bf16_for_cpu"


def _linear4bit_class() -> type[nn.Module] | None:
    """``bitsandbytes.nn.Linear4bit`` if bitsandbytes is loaded (a model with 4-bit layers has loaded it)."""
    if "bitsandbytes" not in sys.modules:
        return None
    import bitsandbytes

    return bitsandbytes.nn.Linear4bit


def _bitsandbytes_repacks_on_this_cpu() -> bool:
    """Whether the loaded bitsandbytes has the CPU repacking and this CPU would take it."""
    import bitsandbytes.functional as bnb_functional

    has_avx512bf16 = getattr(bnb_functional, "has_avx512bf16", None)
    repacks = hasattr(bnb_functional, "_convert_weight_packed_for_cpu")
    return repacks and has_avx512bf16 is not None and bool(has_avx512bf16())


def disable_cpu_weight_repacking(model: nn.Module) -> list[str]:
    """Turn off bitsandbytes' CPU inference repacking on every 4-bit layer of ``model``.

    Returns the names of the layers whose switch is now off because of this call or an earlier one (none on a CPU
    without AVX512-BF16 or without 4-bit layers: the switch was never on). :func:`restore_cpu_weight_repacking`
    puts the switches back.

    Raises:
        CPURepackingError: a layer's weight has already been repacked (an evaluation or a ``torch.no_grad()``
            forward ran before this call; load the model again and call this, or ``patch_model``, first), or the
            loaded bitsandbytes repacks on this CPU but its layers lack the switch this function turns off.
    """
    linear4bit = _linear4bit_class()
    if linear4bit is None:
        return []
    disabled = []
    for name, module in model.named_modules():
        if not isinstance(module, linear4bit):
            continue
        quant_state = getattr(module.weight, "quant_state", None)
        if getattr(quant_state, "packing_format_for_cpu", False):
            raise CPURepackingError(
                f"the 4-bit weight of {name!r} has already been repacked by bitsandbytes for its CPU inference "
                "kernel (an evaluation or a torch.no_grad() forward ran on this CPU, which has AVX512-BF16). A "
                "repacked layer has no backward: training would silently stop the gradients below it. Load the "
                "model again and call hf_gns_spam.patch_model(model) before evaluating it."
            )
        if not hasattr(module, REPACKING_SWITCH):
            if module.weight.device.type == "cpu" and _bitsandbytes_repacks_on_this_cpu():
                import bitsandbytes

                raise CPURepackingError(
                    f"bitsandbytes {bitsandbytes.__version__} repacks 4-bit weights for CPU inference on this CPU "
                    f"(AVX512-BF16), but {name!r} ({type(module).__name__}) has no {REPACKING_SWITCH!r} switch, "
                    "the one hf_gns_spam turns off; a repacked layer has no backward, so training after an "
                    "evaluation would go wrong. Install a bitsandbytes release whose Linear4bit has "
                    "that switch (0.50.2 is tested), or train on a GPU."
                )
            continue
        if getattr(module, REPACKING_SWITCH) and not hasattr(module, _SAVED_SWITCH):
            setattr(module, _SAVED_SWITCH, True)
        if hasattr(module, _SAVED_SWITCH):  # turned off here, now or by an earlier call
            setattr(module, REPACKING_SWITCH, False)
            disabled.append(name)
    return disabled


def restore_cpu_weight_repacking(model: nn.Module) -> int:
    """Undo :func:`disable_cpu_weight_repacking` on ``model``; returns how many switches were restored."""
    restored = 0
    for module in model.modules():
        if hasattr(module, _SAVED_SWITCH):
            setattr(module, REPACKING_SWITCH, getattr(module, _SAVED_SWITCH))
            delattr(module, _SAVED_SWITCH)
            restored += 1
    return restored
