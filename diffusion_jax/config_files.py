"""Config files by name or path: `--config sd15_finetune`, `--config configs/sd15.py`,
`--config my_run.py`, each optionally `:ARG` passed to `get_config(ARG)` (ml_collections'
config_flags convention; e.g. `sd21_base_pretrain:512`).

The repository's configs/ folder is installed as the package `diffusion_jax.configs`, so the
bundled names resolve after any install (editable, wheel, a TPU VM image). A path that does
not exist but names a bundled file (`configs/sd15.py` run outside the repository) loads the
bundled one and says so.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
import re
import sys
from pathlib import Path
from typing import Any

import ml_collections

BUNDLED_DIR = Path(importlib.util.find_spec("diffusion_jax.configs").submodule_search_locations[0])
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


def bundled_names() -> list[str]:
    """The configs installed with the package (importable modules with a get_config)."""
    return sorted(p.stem for p in BUNDLED_DIR.glob("*.py")
                  if not p.stem.startswith("_") and "def get_config" in p.read_text())


def resolve(spec: str | os.PathLike) -> tuple[Path, str | None]:
    """(config file, argument for get_config or None) of a --config value."""
    text = os.fspath(spec)
    path_text, arg = text, ""
    if ":" in text and not Path(text).exists():
        path_text, _, arg = text.partition(":")
    path = Path(path_text)
    if path.is_file():
        return path, arg or None
    # A bare name, or configs/NAME.py as the READMEs write it, run away from the repository.
    readme_path = path.suffix == ".py" and path.parent.name == "configs"
    stem = path.stem if readme_path else path_text
    if _NAME.match(stem) and (BUNDLED_DIR / f"{stem}.py").is_file():
        if readme_path:
            print(f"note: {path} does not exist here; using the bundled config {stem}",
                  file=sys.stderr)
        return BUNDLED_DIR / f"{stem}.py", arg or None
    names = ", ".join(bundled_names())
    raise FileNotFoundError(f"config {text}: no such file, and not a bundled config name "
                            f"(bundled: {names})")


def load(spec: str | os.PathLike) -> ml_collections.ConfigDict:
    """`get_config()` (or `get_config(ARG)`) of a config file or bundled name."""
    path, arg = resolve(spec)
    # Files outside the package may still import each other the old way (`from configs
    # import x`) from their repository: the folder above theirs goes on sys.path.
    root = str(path.resolve().parent.parent)
    if root not in sys.path:
        sys.path.append(root)
    name = f"_diffusion_jax_config_{path.stem}"
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    get_config = getattr(module, "get_config", None)
    if get_config is None:
        raise ValueError(f"config file {path} defines no get_config()")
    takes_arg = bool(inspect.signature(get_config).parameters)
    if arg is not None and not takes_arg:
        raise ValueError(f"config {path}: get_config() takes no argument, got ':{arg}'")
    return get_config(arg) if arg is not None else get_config()


def as_dict(config: Any) -> dict:
    return config.to_dict() if hasattr(config, "to_dict") else dict(config)
