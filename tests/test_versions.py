"""The versions the package declares are the ones the README says were tested.

``make test-oldest`` runs the unit tests at the lower bounds of ``pyproject.toml``
(uv's lowest-direct resolution); the README's "Supported versions" records that run.
These checks keep the three in step: every runtime dependency's lower bound, and
Python's, appears in the README's tested set, and ``environment.yml`` asks for the
oldest Python declared.
"""

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _project():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _lower_bounds() -> dict[str, str]:
    bounds = {}
    for spec in _project()["dependencies"]:
        found = re.fullmatch(r"([A-Za-z0-9_.-]+)\s*>=\s*([0-9.]+)", spec.strip())
        assert found, f"a runtime dependency without a plain lower bound: {spec!r}"
        bounds[found.group(1).lower()] = found.group(2)
    return bounds


def _supported_versions() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("### Supported versions", 1)
    assert len(section) == 2, "the README has no 'Supported versions' section"
    return section[1].split("\n#", 1)[0]


def _same(declared: str, tested: str) -> bool:
    """1.24 and 1.24.0 name the same release."""
    pad = max(declared.count("."), tested.count(".")) + 1
    parts = [(v.split(".") + ["0"] * pad)[:pad] for v in (declared, tested)]
    return [int(p) for p in parts[0]] == [int(p) for p in parts[1]]


def test_each_lower_bound_is_the_version_make_test_oldest_ran():
    text = " ".join(_supported_versions().split())
    bounds = _lower_bounds()
    assert set(bounds) == {
        "torch",
        "torchvision",
        "numpy",
        "matplotlib",
        "tqdm",
        "ninja",
    }
    for name, declared in bounds.items():
        tested = re.search(rf"`make test-oldest` \(.*?\b{name} ([0-9.]+)\b", text)
        assert tested, f"the README's tested set does not name {name}"
        assert _same(declared, tested.group(1).rstrip(".")), (
            f"{name}: pyproject.toml declares >= {declared}, "
            f"make test-oldest ran {tested.group(1)}"
        )


def test_python_bound_is_the_tested_python_and_environment_yml_agrees():
    declared = re.fullmatch(r">=\s*([0-9.]+)", _project()["requires-python"]).group(1)
    text = " ".join(_supported_versions().split())
    tested = re.search(r"\(Python ([0-9]+\.[0-9]+)\.[0-9]+", text)
    assert tested and _same(declared, tested.group(1))
    env = (ROOT / "environment.yml").read_text()
    assert re.search(rf"^\s*- python={re.escape(declared)}\b", env, re.M)
