"""Every subcommand's ``handler`` ("module:function") names a function that exists.

The CLI imports a subcommand's implementation only when that subcommand runs, so a handler string
that went stale in a move (a renamed module, a function split away) shows only when a user types
that command. This walks the real parser, nested targets included, and imports every handler now.
"""

from __future__ import annotations

import argparse
import importlib
import inspect

import pytest

from anomalygpt_edge.cli import build_parser


def _subcommands(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = (), inherited: str | None = None
) -> list[tuple[str, str | None]]:
    """(command path, handler string) of every leaf command under ``parser``.

    A nested parser inherits its parent's ``handler`` unless it sets its own, as argparse does when
    it fills the namespace; aliases of one command are walked once.
    """
    handler = parser.get_default("handler") or inherited
    groups = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not groups:
        return [(" ".join(path), handler)]
    found: list[tuple[str, str | None]] = []
    for group in groups:
        seen: set[int] = set()
        for name, child in group.choices.items():
            if id(child) in seen:
                continue
            seen.add(id(child))
            found.extend(_subcommands(child, (*path, name), handler))
    return found


LEAVES = _subcommands(build_parser())


def test_parser_walk_finds_every_area_of_the_cli() -> None:
    # Guards the walk itself: the top-level jobs and the nested export/bench targets are all seen.
    commands = {command for command, _ in LEAVES}
    tops = {command.split()[0] for command in commands}
    assert {"export", "enroll", "inspect", "run", "bench"} <= tops, sorted(tops)
    assert any(command.startswith("export ") for command in commands), sorted(commands)
    assert any(command.startswith("bench ") for command in commands), sorted(commands)
    assert len(LEAVES) >= 15, sorted(commands)


@pytest.mark.parametrize(("command", "handler"), LEAVES, ids=[command for command, _ in LEAVES])
def test_every_subcommand_handler_imports_and_is_callable(command: str, handler: str | None) -> None:
    assert handler, f"'{command}' sets no handler: running it would fail in cli.main"
    module_name, sep, func_name = handler.partition(":")
    assert sep and module_name and func_name and ":" not in func_name, f"'{command}': malformed handler {handler!r}"
    module = importlib.import_module(module_name)
    func = getattr(module, func_name, None)
    assert func is not None, f"'{command}': {module_name} has no {func_name}"
    assert callable(func), f"'{command}': {handler} is not callable"
    # cli.main calls handler(args): one positional argument must bind.
    inspect.signature(func).bind(argparse.Namespace())
