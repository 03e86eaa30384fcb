"""What the docs show must be real: links lead somewhere, the commands and their
flags exist in the CLI, the recipe keys exist in the schema, and the generated
recipe reference is the schema's."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from fedssl.cli import build_parser
from fedssl.config.load import all_keys

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
REFERENCE = DOCS / "recipe-reference.md"
# Every page a reader can land on; the generated reference only where links are checked.
PAGES = [ROOT / "README.md", ROOT / "BENCHMARKS.md", *sorted(DOCS.glob("*.md"))]
WRITTEN = [page for page in PAGES if page not in (REFERENCE, ROOT / "BENCHMARKS.md")]

FENCE = re.compile(r"^```.*?^```", re.S | re.M)
INLINE = re.compile(r"`([^`\n]+)`")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
# Shown on purpose as a mistake: the error example in the README and docs/running.md.
DELIBERATE_TYPOS = {"federation.roundz"}
# `model.pt`, `model.safetensors`: file names that look like keys of the `model` section.
FILE_SUFFIXES = (".pt", ".pt2", ".onnx", ".safetensors", ".pth", ".yaml", ".json", ".md", ".png", ".py", ".csv")


def rel(page: Path) -> str:
    return str(page.relative_to(ROOT))


def code_of(text: str) -> str:
    """The text of fenced blocks and inline code spans: where commands and keys are shown."""
    blocks = FENCE.findall(text)
    prose = FENCE.sub("", text)
    return "\n".join(blocks + INLINE.findall(prose))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = heading.strip().lower().replace("`", "")
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = FENCE.sub("", page.read_text())
    return {slug(m.group(1)) for m in re.finditer(r"^#{1,6} (.+)$", text, re.M)}


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_relative_links_lead_to_files_and_headings(page):
    text = FENCE.sub("", page.read_text())
    broken = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading #{anchor} in {rel(dest)}")
    assert not broken, f"{rel(page)}: " + "; ".join(broken)


def test_the_readme_links_every_docs_page_and_the_benchmarks():
    linked = {(ROOT / target.partition("#")[0]).resolve() for target in LINK.findall((ROOT / "README.md").read_text())}
    missing = [rel(page) for page in [*DOCS.glob("*.md"), ROOT / "BENCHMARKS.md"] if page.resolve() not in linked]
    assert not missing, f"README.md does not link {missing}"


def subcommands() -> dict[str, set[str]]:
    """Each `fedssl` command and its option strings, from the real parser."""
    parser = build_parser()
    (commands,) = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"]
    return {name: set(sub._option_string_actions) for name, sub in commands.choices.items()}


def shown_commands(text: str) -> list[tuple[str, str]]:
    """(command, rest of its line) for every `fedssl CMD ...` in code, prompts and `&&` chains included."""
    shown = []
    for line in code_of(text).splitlines():
        for m in re.finditer(r"(?:^|\$ |&& )fedssl ([a-z][a-z-]*)([^#\n]*)", line):
            shown.append((m.group(1), m.group(2)))
    return shown


@pytest.mark.parametrize("page", WRITTEN, ids=rel)
def test_the_fedssl_commands_shown_exist_with_their_flags(page):
    known = subcommands()
    shown = shown_commands(page.read_text())
    wrong = []
    for command, rest in shown:
        if command not in known:
            wrong.append(f"fedssl {command}: no such command")
            continue
        wrong += [f"fedssl {command} {flag}: no such option" for flag in re.findall(r"(?<![\w-])--[a-z][a-z-]*", rest)
                  if flag not in known[command]]
    assert not wrong, f"{rel(page)}: " + "; ".join(wrong)


def test_the_readme_shows_every_command():
    shown = {command for command, _ in shown_commands((ROOT / "README.md").read_text())}
    assert set(subcommands()) <= shown, f"README.md does not show {set(subcommands()) - shown}"


def shown_keys(text: str, sections: set[str]) -> set[str]:
    """Dotted recipe keys in code (`data.partition.alpha=0.1`, `algorithm.ssl.*`)."""
    first = "|".join(sorted(sections))
    found = re.findall(rf"(?<![\w./-])((?:{first})(?:\.[A-Za-z_]\w*)+)", code_of(text))
    return {key for key in found if not key.endswith(FILE_SUFFIXES)}


@pytest.mark.parametrize("page", WRITTEN, ids=rel)
def test_the_recipe_keys_shown_exist_in_the_schema(page):
    keys = set(all_keys())
    sections = {key for key in keys if "." not in key}
    shown = shown_keys(page.read_text(), sections)
    unknown = sorted(shown - keys - DELIBERATE_TYPOS)
    assert not unknown, f"{rel(page)} shows keys the schema does not have: {unknown}"


def test_the_deliberate_typos_are_still_typos():
    assert not DELIBERATE_TYPOS & set(all_keys())


def test_the_checks_see_what_they_check():
    """Guard against a regex that silently matches nothing."""
    readme = (ROOT / "README.md").read_text()
    sections = {key for key in all_keys() if "." not in key}
    assert {"data.partition.alpha", "federation.rounds", "data.labels.fraction"} <= shown_keys(readme, sections)
    assert ("personalize", " runs/quickstart --data my_faces") in shown_commands(readme)
    assert "model.pt" not in shown_keys("`model.pt`", sections)


@pytest.mark.slow
def test_the_recipe_reference_page_is_generated_from_the_schema():
    generated = subprocess.run([sys.executable, str(ROOT / "tools" / "recipe_reference.py")],
                               capture_output=True, text=True, check=True).stdout
    assert REFERENCE.read_text() == generated, \
        "docs/recipe-reference.md is stale: regenerate it with python tools/recipe_reference.py --write"
