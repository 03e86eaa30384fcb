"""Print the recipe reference (every key, its default, its meaning) as a markdown table.

The meanings are the comments beside each field in fedssl/config/schema.py, so the
README's table is regenerated from the schema rather than kept in step by hand:

    python tools/recipe_reference.py            # print it
    python tools/recipe_reference.py --readme   # rewrite the table at the end of README.md
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import sys
from pathlib import Path

from fedssl.config import schema

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


def rewrite_readme(path: Path) -> None:
    """Replace the reference table, the last thing in the README, with a fresh one."""
    text = path.read_text()
    start = text.index("| key | default | meaning |")
    path.write_text(text[:start] + markdown() + "\n")


if __name__ == "__main__":
    if "--readme" in sys.argv:
        rewrite_readme(Path(__file__).resolve().parents[1] / "README.md")
    else:
        print(markdown())
