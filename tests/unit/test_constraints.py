"""The set-up installs the tested versions: every pin of constraints.txt is the installed version, and lies in the
range pyproject.toml gives users (a pin outside it would test something users cannot install)."""

from __future__ import annotations

import os
from importlib import metadata

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from tests.support.paths import REPO_ROOT


def pins() -> dict[str, Version]:
    """constraints.txt as {canonical name: version}; every line that is not a comment is `name==version`."""
    result = {}
    for line in (REPO_ROOT / "constraints.txt").read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        requirement = Requirement(line)
        (specifier,) = requirement.specifier
        assert specifier.operator == "==", f"constraints.txt pins exact versions, not {line!r}"
        result[canonicalize_name(requirement.name)] = Version(specifier.version)
    return result


def installed_version(name: str) -> Version:
    """The installed distribution's version without a local label (torch 2.13.0+cpu is 2.13.0)."""
    return Version(Version(metadata.version(name)).public)


def test_every_pin_is_the_installed_version():
    if os.environ.get("HF_GNS_SPAM_CONSTRAINTS") == "none":
        pytest.skip("HF_GNS_SPAM_CONSTRAINTS=none: running against the newest releases")
    wrong = {}
    for name, version in pins().items():
        try:
            found = installed_version(name)
        except metadata.PackageNotFoundError:
            found = None
        if found != version:
            wrong[name] = f"constraints.txt {version}, installed {found}"
    assert not wrong, (
        f"{wrong}: run `bash scripts/setup.sh` to install the pinned versions "
        "(or set HF_GNS_SPAM_CONSTRAINTS=none to test against the newest)"
    )


def project_requirements() -> list[Requirement]:
    tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11's tomllib")
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    lines = project["dependencies"] + [line for extra in project["optional-dependencies"].values() for line in extra]
    return [Requirement(line) for line in lines]


def test_the_pins_cover_and_satisfy_every_requirement_of_pyproject():
    pinned = pins()
    for requirement in project_requirements():
        if requirement.marker is not None and not requirement.marker.evaluate():
            continue  # e.g. triton off Linux x86_64/aarch64
        name = canonicalize_name(requirement.name)
        assert name in pinned, f"{requirement.name} is a requirement of pyproject.toml but not pinned"
        assert requirement.specifier.contains(pinned[name], prereleases=True), (
            f"constraints.txt pins {name} {pinned[name]}, outside pyproject.toml's {requirement}"
        )


def test_the_supported_transformers_are_stated_once():
    """pyproject.toml's transformers requirement is hf_gns_spam.errors.TRANSFORMERS_REQUIREMENT, which every message
    about an unsupported transformers quotes."""
    tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11's tomllib")
    from hf_gns_spam.errors import TRANSFORMERS_REQUIREMENT

    requirements = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert TRANSFORMERS_REQUIREMENT in requirements
