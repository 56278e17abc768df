"""The package's layers import one way: kernels (and their contracts) at the bottom, then the operator and the
optimizer, then patching, then the GNS, then the public names. Read from the source with ``ast``. Also: the
Trainer's internals are reached from ``integrations/`` only, and no module outgrows its concept (line counts)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.support.paths import PACKAGE

# module (dotted, relative to the package) or package prefix -> layer; a module may import its own layer or below
LAYERS = {
    "kernels": 0,
    "lazy_import": 0,
    "errors": 0,
    "ops": 1,
    "fake_quant": 1,
    "optim": 1,
    "sequences": 1,
    "integrations.bitsandbytes_cpu": 1,
    "patching": 2,
    "stats": 2,
    "integrations.trainer_optimizer": 2,
    "integrations.trainer_loop": 3,
    "integrations": 3,
    "gns": 3,
    "plotting": 4,
    "metrics": 4,
    "launch": 4,
    "cli": 4,
    "": 4,  # hf_gns_spam/__init__.py
}
# third-party imports a layer may not use
FORBIDDEN_BELOW = {0: ("transformers", "accelerate", "peft", "datasets")}


def layer_of(dotted: str) -> int:
    for prefix in sorted(LAYERS, key=len, reverse=True):
        if dotted == prefix or dotted.startswith(prefix + ".") or (prefix == "" and dotted in ("", "__init__")):
            return LAYERS[prefix]
    raise AssertionError(f"hf_gns_spam.{dotted} is in no layer: add it to LAYERS")


def package_modules() -> list[tuple[str, Path]]:
    modules = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        dotted = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules.append((dotted, path))
    return modules


def imports_of(path: Path) -> list[str]:
    """Every module a file imports (absolute names), at any depth (lazy imports inside functions included)."""
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
            names += [f"{node.module}.{alias.name}" for alias in node.names]
    return names


MODULES = package_modules()
KNOWN = {module for module, _ in MODULES}


def imported_module(name: str) -> str | None:
    """The package module ``name`` (``hf_gns_spam.x.y`` or ``hf_gns_spam.x.y.attribute``) refers to."""
    if name != "hf_gns_spam" and not name.startswith("hf_gns_spam."):
        return None
    parts = name.split(".")[1:]
    while parts and ".".join(parts) not in KNOWN:
        parts.pop()
    return ".".join(parts)


@pytest.mark.parametrize(("module", "path"), MODULES, ids=[module or "__init__" for module, _ in MODULES])
def test_imports_go_down_the_layers(module, path):
    own = layer_of(module)
    for name in imports_of(path):
        target = imported_module(name)
        if target is not None:
            assert layer_of(target) <= own, f"hf_gns_spam.{module} (layer {own}) imports {name}"
        for forbidden in FORBIDDEN_BELOW.get(own, ()):
            assert not (name == forbidden or name.startswith(forbidden + ".")), f"hf_gns_spam.{module} imports {name}"


def test_the_kernels_import_nothing_above_them():
    kernels = [(module, path) for module, path in MODULES if module.startswith("kernels")]
    assert {"kernels.gns_norm", "kernels.stable_spam_step", "kernels.norm_contract"} <= {m for m, _ in kernels}
    for module, path in kernels:
        above = [name for name in imports_of(path) if (imported_module(name) or "kernels").split(".")[0] != "kernels"]
        assert not above, f"hf_gns_spam.{module} imports {above}"


# the Trainer's, its callbacks' and its LR scheduler's internals the package reads or sets: only integrations/ may
TRAINER_INTERNALS = {
    "_last_lr", "base_lrs", "lr_lambdas", "last_epoch",  # torch LambdaLR
    "current_gradient_accumulation_steps", "stateful_callbacks", "label_smoother", "training_bar",  # transformers
}  # fmt: skip


@pytest.mark.parametrize(("module", "path"), MODULES, ids=[module or "__init__" for module, _ in MODULES])
def test_trainer_internals_are_reached_only_from_integrations(module, path):
    """Outside ``hf_gns_spam/integrations/``, no attribute of TRAINER_INTERNALS is used, and no private attribute of
    a ``trainer`` (the package's own ``_gns_*`` marks excepted): each reach has one home, with its why and check."""
    if module.startswith("integrations"):
        return
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.Attribute):
            continue
        assert node.attr not in TRAINER_INTERNALS, f"hf_gns_spam/{path.name}:{node.lineno} uses {node.attr}"
        owner = node.value
        name = owner.attr if isinstance(owner, ast.Attribute) else getattr(owner, "id", "")
        if name in ("trainer", "_trainer") and node.attr.startswith("_") and not node.attr.startswith("_gns_"):
            raise AssertionError(f"hf_gns_spam/{path.name}:{node.lineno} uses trainer.{node.attr}")


# a module that holds one concept stays readable; the Triton kernels are long by nature (one launch, its tiles)
MAX_LINES = 700
MAX_LINES_OF = {"gns.callback": 350}  # the callback is an adapter: what it adapts lives elsewhere


@pytest.mark.parametrize(("module", "path"), MODULES, ids=[m for m, _ in MODULES])
def test_no_module_outgrows_its_concept(module, path):
    if module == "kernels" or module.startswith("kernels."):
        return
    lines = len(path.read_text().splitlines())
    limit = MAX_LINES_OF.get(module, MAX_LINES)
    assert lines < limit, f"hf_gns_spam.{module} has {lines} lines (limit {limit}): split it along its concepts"
