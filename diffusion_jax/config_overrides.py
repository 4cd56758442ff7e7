"""`--config.KEY=VALUE` command-line overrides of a ConfigDict, checked against it.

A key the config does not have, or a value that does not parse as the field's type, is an
error naming the key (and the closest existing keys), raised before anything runs.
"""

from __future__ import annotations

import ast
import difflib
from typing import Any, Iterable, Sequence

import ml_collections

PREFIX = "--config."


def _all_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    keys = []
    for key, value in config.items():
        name = f"{prefix}{key}"
        keys.append(name)
        if isinstance(value, ml_collections.ConfigDict):
            keys.extend(_all_keys(value, name + "."))
    return keys


def _parse(key: str, text: str, current: Any) -> Any:
    if isinstance(current, bool):
        if text.lower() in ("true", "1", "yes"):
            return True
        if text.lower() in ("false", "0", "no"):
            return False
        raise ValueError(f"--config.{key}={text}: expected true or false")
    if isinstance(current, str):
        return text
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        raise ValueError(f"--config.{key}={text}: expected a {type(current).__name__} "
                         f"like {current!r}") from None
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(current, tuple) and isinstance(value, list):
        value = tuple(value)
    if current is not None and not isinstance(value, type(current)):
        raise ValueError(f"--config.{key}={text}: expected a {type(current).__name__} "
                         f"like {current!r}, got a {type(value).__name__}")
    return value


def split_overrides(argv: Sequence[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """(the other arguments, [(key, value text)]) of a command line; accepts both
    `--config.a.b=1` and `--config.a.b 1`."""
    rest, overrides, i = [], [], 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith(PREFIX):
            key, eq, value = arg[len(PREFIX):].partition("=")
            if not eq:
                if i + 1 >= len(argv):
                    raise ValueError(f"{arg}: no value given")
                value, i = argv[i + 1], i + 1
            overrides.append((key, value))
        else:
            rest.append(arg)
        i += 1
    return rest, overrides


def apply_overrides(config: ml_collections.ConfigDict,
                    overrides: Iterable[tuple[str, str]]) -> ml_collections.ConfigDict:
    keys = _all_keys(config)
    for key, text in overrides:
        if key not in keys:
            close = difflib.get_close_matches(key, keys, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ValueError(f"--config.{key}: the config has no key `{key}`{hint}")
        parent, _, leaf = key.rpartition(".")
        node = config
        for part in filter(None, parent.split(".")):
            node = node[part]
        if isinstance(node[leaf], ml_collections.ConfigDict):
            raise ValueError(f"--config.{key}: `{key}` is a section; set one of its fields")
        value = _parse(key, text, node[leaf])
        try:
            node[leaf] = value
        except TypeError as e:
            raise ValueError(f"--config.{key}: {e}") from None
    return config
