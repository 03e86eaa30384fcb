"""The README's promises that can drift: the two commands, its length, its links."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_ci_runs_the_readme_test_command_verbatim():
    commands = re.findall(r"```bash\n(.+?)\n```", README)
    install_and_quickstart, install_and_test = commands[0], commands[1]
    assert "fedssl run recipes/quickstart.yaml" in install_and_quickstart
    assert "pytest" in install_and_test
    assert install_and_test in (ROOT / ".ci" / "run").read_text()


def test_the_readme_stays_short():
    """Depth belongs in docs/ (tests/test_docs.py checks it links every page)."""
    lines = len(README.splitlines())
    assert lines <= 200, f"README.md has {lines} lines; move detail into a docs/ page"
