"""Packaging (issue 16): the installed package is the library `mora` alone, whose dependencies are what
mora/ imports; the reproduction stack is the `experiments` extra; requirements/lock.txt pins one point
inside every declared range; Python is declared as tested (3.11) without refusing newer versions.

Building a wheel into a fresh virtualenv is too slow for the suite; these checks are static, and the
README's library example runs here in the development environment."""

from __future__ import annotations

import ast
import fnmatch
import re
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
LOCK = REPO / "requirements" / "lock.txt"
LOCKED_EXTRAS = ("experiments", "test")  # installed by `make` from the lock; the others (slurm, deepspeed) are not
FIRST_PARTY = {"mora", "experiments", "analysis", "benchmarks", "tests", "lm_eval_tasks", "rehearsal", "reference"}


def declared(*extras: str) -> list[Requirement]:
    """The library's requirements plus those of ``extras``."""
    return [Requirement(r) for r in PROJECT["dependencies"]] + \
        [Requirement(r) for e in extras for r in PROJECT["optional-dependencies"][e]]


def locked() -> dict[str, Version]:
    """requirements/lock.txt as {canonical name: version}; every line must be an exact ``name==version``."""
    pins = {}
    for line in LOCK.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==" and not req.marker and not req.extras, f"lock line not name==version: {line}"
            pins[canonicalize_name(req.name)] = Version(spec.version)
    return pins


def third_party_imports(*folders: str) -> dict[str, set[str]]:
    """Top-level modules imported by the .py files under ``folders``: {module: files}, stdlib and ours left out."""
    found: dict[str, set[str]] = {}
    for folder in folders:
        for path in sorted((REPO / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for top in {n.split(".")[0] for n in names} - FIRST_PARTY - set(sys.stdlib_module_names):
                    found.setdefault(top, set()).add(str(path.relative_to(REPO)))
    return found


def undeclared(modules: dict[str, set[str]], requirements: list[Requirement]) -> list[str]:
    """Modules whose installed distribution is not among ``requirements``, each with where it is imported."""
    names = {canonicalize_name(r.name) for r in requirements}
    dists = metadata.packages_distributions()
    return [f"{m} (from {sorted(files)[0]}): distribution {dists.get(m)}" for m, files in sorted(modules.items())
            if not {canonicalize_name(d) for d in dists.get(m, [])} & names]


def test_the_library_depends_on_exactly_what_mora_imports():
    imports = third_party_imports("mora")
    assert not undeclared(imports, declared()), undeclared(imports, declared())
    dists = metadata.packages_distributions()
    used = {canonicalize_name(d) for m in imports for d in dists.get(m, [])}
    unused = [r.name for r in declared() if canonicalize_name(r.name) not in used]
    assert not unused, f"library dependencies that mora/ never imports (move them to an extra): {unused}"


@pytest.mark.parametrize("folders, extras", [
    (("experiments", "analysis", "benchmarks", "lm_eval_tasks", "rehearsal"), ("experiments",)),
    (("tests",), LOCKED_EXTRAS),
])
def test_the_reproduction_imports_are_declared_in_the_extras(folders, extras):
    missing = undeclared(third_party_imports(*folders), declared(*extras))
    assert not missing, f"imported under {folders} but not declared in pyproject's {extras}: {missing}"


def test_the_lock_pins_every_declared_dependency_inside_its_range():
    pins = locked()
    problems = []
    for req in declared(*LOCKED_EXTRAS):
        pin = pins.get(canonicalize_name(req.name))
        if pin is None:
            problems.append(f"{req} is not in the lock")
        elif not req.specifier.contains(pin, prereleases=True):
            problems.append(f"lock has {req.name}=={pin}, outside pyproject's {req}")
    for extra in set(PROJECT["optional-dependencies"]) - set(LOCKED_EXTRAS):
        for req in declared(extra)[len(declared()):]:
            pin = pins.get(canonicalize_name(req.name))
            if pin is not None and not req.specifier.contains(pin, prereleases=True):
                problems.append(f"lock has {req.name}=={pin}, outside the {extra} extra's {req}")
    assert not problems, problems


def test_the_lock_holds_no_project_and_no_local_build_label():
    pins = locked()
    assert canonicalize_name(PROJECT["name"]) not in pins, "the lock must not pin the project itself"
    assert not [n for n, v in pins.items() if v.local], "local labels (+cpu, +cu126) are chosen by the install"
    assert "-e " not in LOCK.read_text()


def test_only_the_library_is_packaged():
    include = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = [p.name for p in REPO.iterdir() if (p / "__init__.py").is_file()]
    packaged = sorted(p for p in packages if any(fnmatch.fnmatch(p, pattern) for pattern in include))
    assert packaged == ["mora"], f"top-level packages the wheel would hold: {packaged}"
    assert {"experiments", "analysis"} <= set(packages) - set(packaged)


def test_python_is_declared_as_tested_without_refusing_newer():
    requires = SpecifierSet(PROJECT["requires-python"])
    assert all(v in requires for v in ("3.11", "3.12", "3.13", "3.14")) and "3.10" not in requires
    assert "Programming Language :: Python :: 3.11" in PROJECT["classifiers"]


def test_make_and_environment_yml_install_the_locked_torch():
    torch = locked()["torch"]
    makefile = (REPO / "Makefile").read_text()
    assert re.search(r"^LOCK\s*:=\s*requirements/lock\.txt$", makefile, re.M) and "-r $(LOCK)" in makefile
    pip = next(d["pip"] for d in yaml.safe_load((REPO / "environment.yml").read_text())["dependencies"]
               if isinstance(d, dict))
    assert "-r requirements/lock.txt" in pip
    (pin,) = [Requirement(line) for line in pip if line.startswith("torch")]
    (spec,) = pin.specifier
    assert Version(spec.version).public == str(torch), f"environment.yml's {pin} vs the lock's torch=={torch}"


def test_the_readme_library_example_fine_tunes_a_tiny_llama():
    readme = (REPO / "README.md").read_text()
    block = readme.split("<!-- library-example:begin -->", 1)[1].split("<!-- library-example:end -->", 1)[0]
    code = block.split("```python\n", 1)[1].split("```", 1)[0]
    scope: dict = {}
    exec(compile(code, "README.md (library example)", "exec"), scope)
    model = scope["model"]
    assert type(model).__name__ == "LlamaForCausalLM" and scope["step"] == 2
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "Linear"  # merged and unloaded
