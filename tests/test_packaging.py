"""Every fedssl module imports; an optional feature whose extra is missing says which
extra to install, in one line (the package is hidden from the import system, in a
fresh interpreter, as if it were not installed)."""

from __future__ import annotations

import importlib
import pkgutil
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

import fedssl
from fedssl.extras import EXTRAS

ROOT = Path(__file__).resolve().parents[1]


def test_every_module_imports():
    names = [m.name for m in pkgutil.walk_packages(fedssl.__path__, "fedssl.")]
    assert len(names) > 80
    for name in names:
        importlib.import_module(name)


def test_every_extra_is_declared_and_the_test_extra_installs_them():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    assert set(EXTRAS) <= set(extras)
    assert "fedssl[plots,privacy,flower,onnx]" in extras["test"]
    base = " ".join(project["dependencies"])
    for heavy in ("matplotlib", "dp-accounting", "flwr", "onnx", "torchvision"):
        assert heavy not in base
    for dependency in project["dependencies"]:
        assert "<=" not in dependency and "==" not in dependency, f"a patch-level cap: {dependency}"


HIDE = """
import importlib.metadata
import sys

class Hidden:  # a finder that says the packages are not installed (as find_spec sees it too)
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in HIDDEN:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)

sys.meta_path.insert(0, Hidden())

def hidden_metadata(function):  # libraries that ask the installed distributions (Lightning's RequirementCache)
    def ask(name):
        if name.replace("-", "_").lower() in HIDDEN:
            raise importlib.metadata.PackageNotFoundError(name)
        return function(name)
    return ask

importlib.metadata.version = hidden_metadata(importlib.metadata.version)
importlib.metadata.distribution = hidden_metadata(importlib.metadata.distribution)
"""


def without(packages: list[str], code: str) -> subprocess.CompletedProcess:
    script = f"HIDDEN = {packages!r}\n{HIDE}\n" + textwrap.dedent(code)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=120)


@pytest.mark.parametrize("packages, code, extra", [
    (["dp_accounting"], """
        from fedssl.config.load import load_recipe
        from fedssl.privacy.mechanism import CentralDP
        CentralDP.build(load_recipe("quickstart", ["privacy.mechanism=central"]), "fedavg", True)
        """, "privacy"),
    (["matplotlib"], """
        import sys
        from fedssl.cli import main
        sys.exit(main(["data", "quickstart", "data.num_samples=200", "--out", "{out}"]))
        """, "plots"),
    (["flwr"], """
        import fedssl.backends.flower.simulation
        """, "flower"),
], ids=["privacy", "plots", "flower"])
def test_a_missing_extra_is_named(packages, code, extra, tmp_path):
    result = without(packages, code.replace("{out}", str(tmp_path)))
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert f"pip install 'fedssl[{extra}]'" in last, result.stderr


def test_the_cli_names_a_missing_extra_in_one_line(tmp_path):
    result = without(["flwr"], f"""
        import sys
        from fedssl.cli import main
        sys.exit(main(["run", "quickstart", "federation.backend=flower", "federation.rounds=1",
                       "data.num_samples=300", "logging.wandb.mode=disabled", "output_dir={tmp_path}"]))
        """)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "fedssl: error: the Flower backend (federation.backend=flower) needs flwr, which is not installed: "
        "pip install 'fedssl[flower]'")
