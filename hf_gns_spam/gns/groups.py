"""Which group each patched norm belongs to, for the per-group GNS (``gns/block``, ``gns/final``, ``gns/other``).

The norms' GNS sums tr Σ and |G|² over every patched norm, so the norm with the largest mean gradient dominates it:
in the main job the final norm carries 79–97% of the norms' |G|², and its own GNS stays flat while the blocks'
rises 5–20×. Each patched module is put in one group, by the model's structure (names only where noted):

* ``"block"``: a norm inside an element of an ``nn.ModuleList`` (the repeated transformer blocks:
  ``model.layers.3.input_layernorm``, ``transformer.h.0.ln_1``, ``encoder.block.0.layer.1.layer_norm``), except
  a query/key norm: one whose parent module computes attention (its class name contains ``"Attention"`` and it
  directly holds a projection, a child module with a 2-D ``weight``: ``self_attn.q_norm`` and ``k_norm`` of
  Qwen3 and OLMo2), which is ``"other"``;
* ``"final"``: a norm in no block whose parent module directly holds a ``ModuleList`` with patched norms in it
  (the base model's own norm beside its layers, applied after the last one: ``model.norm``,
  ``transformer.ln_f``, ``model.decoder.final_layer_norm``, T5's ``encoder.final_layer_norm`` and
  ``decoder.final_layer_norm``), unless its attribute name contains ``"emb"`` (an embedding norm placed beside
  the layers, as Bloom's ``word_embeddings_layernorm``);
* ``"other"``: everything else (embedding norms such as BERT's ``embeddings.LayerNorm``, query/key norms, a
  head's norm such as BERT's ``cls.predictions.transform.LayerNorm``).

Not told apart yet: the blocks of a vision tower in a multimodal model count as ``"block"`` too.
"""

from __future__ import annotations

from torch import nn

from hf_gns_spam.gns.arguments import NORM_GROUPS, NormGroup
from hf_gns_spam.patching import is_patched

__all__ = ["NORM_GROUPS", "norm_groups"]


def _computes_attention(module: nn.Module) -> bool:
    if "Attention" not in type(module).__name__:
        return False
    return any(getattr(child, "weight", None) is not None and child.weight.dim() == 2 for child in module.children())


def norm_groups(model: nn.Module) -> dict[str, NormGroup]:
    """The group of every patched module of ``model``, keyed by its name in ``model.named_modules()``."""
    modules = dict(model.named_modules())
    patched = [name for name, module in modules.items() if is_patched(module)]
    in_block: dict[str, bool] = {}
    lists_with_norms: set[str] = set()  # ModuleLists whose elements hold a patched norm
    for name in patched:
        parts = name.split(".")
        containers = [".".join(parts[:i]) for i in range(1, len(parts) - 1) if parts[i].isdigit()]
        lists = [c for c in containers if isinstance(modules.get(c), nn.ModuleList)]
        in_block[name] = bool(lists)
        lists_with_norms.update(lists)
    holders_of_blocks = {list_name.rpartition(".")[0] for list_name in lists_with_norms}
    groups: dict[str, NormGroup] = {}
    for name in patched:
        parent_name, _, attribute = name.rpartition(".")
        if in_block[name]:
            groups[name] = "other" if _computes_attention(modules[parent_name]) else "block"
        elif parent_name in holders_of_blocks and "emb" not in attribute.lower():
            groups[name] = "final"
        else:
            groups[name] = "other"
    return groups
