"""The README's promises that can drift: the recipe reference and the two commands."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_recipe_reference_matches_the_schema():
    table = subprocess.run([sys.executable, str(ROOT / "tools" / "recipe_reference.py")],
                           capture_output=True, text=True, check=True).stdout.strip()
    assert table in README, "README's recipe reference is stale: regenerate it with tools/recipe_reference.py"


def test_ci_runs_the_readme_test_command_verbatim():
    commands = re.findall(r"```bash\n(.+?)\n```", README)
    install_and_quickstart, install_and_test = commands[0], commands[1]
    assert "fedssl run recipes/quickstart.yaml" in install_and_quickstart
    assert "pytest" in install_and_test
    assert install_and_test in (ROOT / ".ci" / "run").read_text()
