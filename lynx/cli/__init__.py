"""The `lynx` command line.

Each command group lives in its own module and is registered here. Errors that users can act on
(``LynxError``) print one line on stderr and exit non-zero; set ``LYNX_DEBUG=1`` for tracebacks.
"""

from __future__ import annotations

import os
import sys

import typer

from lynx.errors import LynxError

app = typer.Typer(
    name="lynx",
    help="Identity-preserving video generation with Lynx: run jobs, campaigns and operator tools.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def _root() -> None:
    """Identity-preserving video generation with Lynx."""


# (module under lynx.cli, command group name); each module exposes a `typer.Typer` named `app`.
# A group name of None merges the module's commands into the top level (e.g. `lynx generate`).
_COMMAND_GROUPS: list[tuple[str, str | None]] = [
    ("db", "db"),
    ("store", "store"),
    ("retention", "retention"),
    ("subject", "subject"),
    ("deliver", "deliver"),
    ("faces", "faces"),
    ("models", "models"),
    ("generate", None),
    ("eval", "eval"),
    ("bench", None),
    ("campaign", "campaign"),
    ("jobs", "jobs"),
]


def _register() -> None:
    import importlib

    for module_name, group in _COMMAND_GROUPS:
        module = importlib.import_module(f"lynx.cli.{module_name}")
        if group is None:
            app.registered_commands.extend(module.app.registered_commands)
        else:
            app.add_typer(module.app, name=group)


_register()


def main(argv: list[str] | None = None) -> None:
    try:
        app(args=argv, prog_name="lynx", standalone_mode=True)
    except LynxError as err:
        if os.environ.get("LYNX_DEBUG"):
            raise
        print(f"lynx: error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)


if __name__ == "__main__":
    main()
