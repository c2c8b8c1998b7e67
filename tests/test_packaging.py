"""Packaging as Python expects: PEP 621 metadata with one version, the licence file it names,
the py.typed marker, and an API reference that builds from the docstrings."""
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

import ppl_lvm

ROOT = Path(__file__).resolve().parents[1]


def pyproject():
    try:
        import tomllib
    except ImportError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_one_version_from_pyproject_read_at_run_time():
    project = pyproject()["project"]
    assert not (ROOT / "setup.cfg").exists() and not (ROOT / "setup.py").exists()
    assert '__version__ = "0.' not in (ROOT / "ppl_lvm" / "__init__.py").read_text()
    assert ppl_lvm.__version__ in (project["version"], "0+unknown")


def test_licence_urls_extras_and_typed_marker():
    project = pyproject()["project"]
    assert project["license"] == {"file": "LICENSE"}
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")
    assert "License :: OSI Approved :: MIT License" in project["classifiers"]
    assert {"tensorboard", "notebooks", "bench", "docs", "test"} <= set(
        project["optional-dependencies"])
    assert any(dep.startswith("filelock") for dep in project["dependencies"])
    assert (ROOT / "ppl_lvm" / "py.typed").is_file()
    assert "py.typed" in pyproject()["tool"]["setuptools"]["package-data"]["ppl_lvm"]
    assert (ROOT / "CHANGELOG.md").read_text().startswith("# Changelog")


def test_project_urls_name_the_real_repository_or_are_absent():
    """No invented addresses: each project URL lies under the repository's git remote, and with
    no remote (not yet published) there are none."""
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    remotes = subprocess.run(["git", "remote", "-v"], cwd=ROOT, capture_output=True, text=True)
    if remotes.returncode != 0:
        pytest.skip("git is not usable here")
    addresses = {line.split()[1].removesuffix(".git").replace("git@github.com:", "https://github.com/")
                 for line in remotes.stdout.splitlines()}
    urls = pyproject()["project"].get("urls", {})
    assert all(any(url.startswith(address) for address in addresses) for url in urls.values()), urls


def test_no_platform_only_lock():
    assert "fcntl" not in (ROOT / "ppl_lvm" / "runs.py").read_text()


@pytest.mark.skipif(importlib.util.find_spec("pdoc") is None, reason="pdoc is not installed "
                    "(pip install -e '.[docs]')")
def test_api_reference_builds_from_the_docstrings(tmp_path):
    done = subprocess.run([sys.executable, "docs/build_api.py", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    page = (tmp_path / "ppl_lvm.html").read_text()
    assert "log_marginal" in page and "fit" in page
    for module in ("estimators", "ais", "guides", "train", "models/vae"):
        assert (tmp_path / "ppl_lvm" / f"{module}.html").is_file(), module


def _public_callables():
    """(name, function) for every public function of ``ppl_lvm.__all__`` and every public method
    or property of its classes that ppl_lvm defines (inherited torch/Pyro ones are theirs)."""
    import inspect

    for name in ppl_lvm.__all__:
        obj = getattr(ppl_lvm, name)
        if not inspect.isclass(obj):
            if callable(obj):
                yield name, obj
            continue
        for klass in obj.__mro__:
            if not klass.__module__.startswith("ppl_lvm"):
                continue
            for attr, member in vars(klass).items():
                if attr.startswith("_") and attr != "__init__":
                    continue
                if isinstance(member, (staticmethod, classmethod)):
                    member = member.__func__
                elif isinstance(member, property):
                    member = member.fget
                if inspect.isfunction(member):
                    yield f"{name}.{attr}", member


def test_the_public_api_is_annotated_and_its_hints_resolve():
    """Every parameter and every return of the public API carries a type hint, and
    ``typing.get_type_hints`` can evaluate them all (no name missing from the module)."""
    import inspect
    import typing

    callables = dict(_public_callables())
    assert {"fit", "log_marginal", "LocalGuide.__init__", "VAE.model",
            "LogMarginalEstimate.mean"} <= set(callables)
    missing = []
    for name, function in callables.items():
        hints = typing.get_type_hints(function)
        signature = inspect.signature(function)
        missing += [f"{name}({p})" for p in signature.parameters
                    if p not in ("self", "cls") and p not in hints]
        if "return" not in hints:
            missing.append(f"{name} -> ?")
    assert not missing, f"{len(missing)} unannotated: {missing}"
    for name in ppl_lvm.__all__:  # the result types' fields resolve too
        obj = getattr(ppl_lvm, name)
        if inspect.isclass(obj) and hasattr(obj, "__dataclass_fields__"):
            typing.get_type_hints(obj)
