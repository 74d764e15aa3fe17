"""Print the README's settings table from ``LynxSettings`` (the single source of truth).

Usage: python scripts/settings_table.py > /tmp/table.md, then paste between the README markers
``<!-- settings-table:start -->`` and ``<!-- settings-table:end -->`` (or run with --write).
A test checks that the README's table equals this output.
"""

from __future__ import annotations

import sys
from pathlib import Path

from pydantic_core import PydanticUndefined

from lynx.settings import LynxSettings

START, END = "<!-- settings-table:start -->", "<!-- settings-table:end -->"
README = Path(__file__).resolve().parent.parent / "README.md"


def _default(field) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
        if isinstance(value, Path):
            return "platform data dir (`~/.local/share/lynx` on Linux)"
        return f"`{value!r}`" if value not in ([], {}) else "empty"
    if field.default is None or field.default is PydanticUndefined:
        return "unset"
    value = field.default
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    return f"`{value}`"


def settings_table() -> str:
    prefix = LynxSettings.model_config.get("env_prefix", "")
    lines = ["| Setting | Default | Meaning |", "| --- | --- | --- |"]
    for name, field in LynxSettings.model_fields.items():
        description = " ".join((field.description or "").split()).replace("|", "\\|")
        lines.append(f"| `{prefix}{name.upper()}` | {_default(field)} | {description} |")
    return "\n".join(lines)


def render_readme(text: str) -> str:
    head, _, rest = text.partition(START)
    _, _, tail = rest.partition(END)
    return f"{head}{START}\n{settings_table()}\n{END}{tail}"


if __name__ == "__main__":
    if "--write" in sys.argv:
        README.write_text(render_readme(README.read_text()))
    else:
        print(settings_table())
