"""Packaging: every fedssl module imports; a base install (every extra's packages hidden
from the import system, in a fresh interpreter, as if they were not installed) imports
every module but the Flower backend's, and each optional feature then names its extra
in one line."""

from __future__ import annotations

import importlib
import json
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

HIDE = """
import importlib.metadata
import importlib.util
import sys

class Hidden:  # a finder that says the packages are not installed
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in HIDDEN:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)

sys.meta_path.insert(0, Hidden())

def hidden(function, missing):  # what importlib.util.find_spec and importlib.metadata say of a missing package
    def ask(name, *args):
        if name.replace("-", "_").lower().split(".")[0] in HIDDEN:
            return missing(name)
        return function(name, *args)
    return ask

def not_found(name):
    raise importlib.metadata.PackageNotFoundError(name)

importlib.util.find_spec = hidden(importlib.util.find_spec, lambda name: None)
importlib.metadata.version = hidden(importlib.metadata.version, not_found)  # Lightning's RequirementCache asks these
importlib.metadata.distribution = hidden(importlib.metadata.distribution, not_found)
"""

BASE_INSTALL = """
import importlib, json, pkgutil, sys
import fedssl
from fedssl.cli import main
from fedssl.extras import MissingExtra

refused = {}
imported = 0
for module in pkgutil.walk_packages(fedssl.__path__, "fedssl.", onerror=lambda name: refused.setdefault(name, "")):
    try:
        importlib.import_module(module.name)
        imported += 1
    except MissingExtra as error:
        refused[module.name] = str(error)

def error_line(*argv):
    from contextlib import redirect_stderr
    from io import StringIO
    err = StringIO()
    with redirect_stderr(err):
        code = main(list(argv))
    return code, err.getvalue().strip().splitlines()

quiet = ["data.num_samples=200", "federation.rounds=1", "logging.wandb.mode=disabled", "output_dir=" + OUT]
features = {
    "privacy": error_line("run", "quickstart", "privacy.mechanism=central", *quiet),
    "plots": error_line("data", "quickstart", "data.num_samples=200", "--out", OUT),
    "flower": error_line("run", "quickstart", "federation.backend=flower", *quiet),
    "ssl": error_line("run", "ssl_fedaffect_faces", *quiet),
    "none": error_line("config", "quickstart"),  # a command that needs no extra
}
print(json.dumps({"imported": imported, "refused": refused, "features": features}))
"""


def test_every_module_imports():
    names = [m.name for m in pkgutil.walk_packages(fedssl.__path__, "fedssl.")]
    assert len(names) > 75
    for name in names:
        importlib.import_module(name)


def test_every_extra_is_declared_and_the_test_extra_installs_them():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    assert set(EXTRAS) <= set(extras)
    assert "fedssl[plots,privacy,flower,onnx,ssl]" in extras["test"]
    base = " ".join(project["dependencies"])
    for heavy in ("matplotlib", "dp-accounting", "flwr", "onnx", "torchvision"):
        assert heavy not in base
    for dependency in project["dependencies"]:
        assert "<=" not in dependency and "==" not in dependency, f"a patch-level cap: {dependency}"


@pytest.mark.slow
def test_a_base_install_imports_every_module_and_names_each_missing_extra(tmp_path):
    hidden = [p for _, packages in EXTRAS.values() for p in packages]
    script = f"HIDDEN = {hidden!r}\nOUT = {str(tmp_path)!r}\n{HIDE}\n{textwrap.dedent(BASE_INSTALL)}"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert found["imported"] > 75
    flower = "the Flower backend (federation.backend=flower) needs flwr, which is not installed: pip install 'fedssl[flower]'"
    assert found["refused"] == {"fedssl.backends.flower": flower}
    features = found["features"]
    assert features["privacy"] == [2, ["fedssl: error: differential privacy (privacy.mechanism=central) needs "
                                       "dp_accounting, which is not installed: pip install 'fedssl[privacy]'"]]
    assert features["plots"] == [2, ["fedssl: error: PNG plots (fedssl data, fedssl compare) needs matplotlib, "
                                     "which is not installed: pip install 'fedssl[plots]'"]]
    assert features["flower"] == [2, [f"fedssl: error: {flower}"]]
    assert features["ssl"] == [2, ["fedssl: error: self-supervised learning (algorithm.name=fedaffect) needs lightly, "
                                   "which is not installed: pip install 'fedssl[ssl]'"]]
    assert features["none"] == [0, []]
