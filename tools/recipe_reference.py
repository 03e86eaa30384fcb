"""The recipe reference page (every key, its default, its meaning), docs/recipe-reference.md.

The meanings are the comments beside each field in fedssl/config/schema.py, so the
page is regenerated from the schema rather than kept in step by hand;
tests/test_docs.py fails when the committed page and this script disagree:

    python tools/recipe_reference.py           # print the page
    python tools/recipe_reference.py --write   # rewrite docs/recipe-reference.md
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import sys
from pathlib import Path

from fedssl.config import schema
from fedssl.config.moved import MOVED_KEYS

FIELD_LINE = re.compile(r"^\s+(\w+): [^=]+= (.+?)\s+#\s*(.*)$")


def field_comments(cls: type) -> dict[str, str]:
    """The comment beside each field, read from the source of `cls` and its bases (the
    schema's `algorithm` section is assembled at run time and has no source of its own)."""
    comments = {}
    for klass in reversed(cls.__mro__[:-1]):
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        for line in source.splitlines():
            match = FIELD_LINE.match(line)
            if match:
                comments[match.group(1)] = match.group(3)
    return comments


def rows(cls: type | None = None, prefix: str = ""):
    cls = cls or schema.recipe_schema()
    comments = field_comments(cls)
    instance = cls()
    for f in dataclasses.fields(cls):
        value = getattr(instance, f.name)
        if dataclasses.is_dataclass(value):
            yield from rows(type(value), f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", value, comments.get(f.name, "")


def markdown() -> str:
    lines = ["| key | default | meaning |", "| --- | --- | --- |"]
    for key, default, meaning in rows():
        shown = "null" if default is None else repr(default) if isinstance(default, str) else str(default).lower() if isinstance(default, bool) else default
        escaped = meaning.replace("|", r"\|")  # a bare | would end the table cell
        lines.append(f"| `{key}` | `{shown}` | {escaped} |")
    return "\n".join(lines)


PAGE = Path(__file__).resolve().parents[1] / "docs" / "recipe-reference.md"

HEADER = """# Recipe reference

Every key, its default and its meaning, generated from `fedssl/config/schema.py` by
`python tools/recipe_reference.py --write` (do not edit this page by hand; a test
keeps it in step with the schema). A recipe sets keys as nested YAML; the command line
overrides any of them as `key=value` ([running](running.md#overrides-and-errors)).
"""


def moved_note() -> str:
    """Which keys moved to which section (`fedssl.config.moved.MOVED_KEYS`), in a few lines."""
    sections: dict[str, list[str]] = {}
    for old, new in MOVED_KEYS.items():
        sections.setdefault(new.rpartition(".")[0], []).append(old.rpartition(".")[2])
    groups = "; ".join(f"`{section}`: {', '.join(keys)}" for section, keys in sections.items())
    return ("**Moved keys.** The keys of `federation` once sat in one flat section; those of how clients are "
            f"trained, of robustness and of evaluation now have their own sections, under the same names ({groups}). "
            "A key's old path (federation.aggregator for `federation.robust.aggregator`) still works wherever a key "
            "is given: recipes and their bases, overrides, `fedssl sweep --param`, `--name-from`, and the config of "
            "a run or checkpoint written before; a recipe or override that uses one logs one INFO line naming the "
            "new paths, and giving one key by both paths at once is an error. The mapping is "
            "`fedssl/config/moved.py`.\n")


def page() -> str:
    """The whole reference page: a short header, the keys that moved, then the table."""
    return f"{HEADER}\n{moved_note()}\n{markdown()}\n"


if __name__ == "__main__":
    if "--write" in sys.argv:
        PAGE.write_text(page())
    else:
        print(page(), end="")
