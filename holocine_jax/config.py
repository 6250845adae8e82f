"""Load a config by name or path and apply `--config.key=value` overrides. The one module that
reaches the top-level `configs/` package (by name, through importlib).

    load_config("tiny", ["--config.model.num_layers=4"])
    load_config("configs/wan22_t2v_a14b.py")
    wan_vae_arch("2.1")   # a row of configs/base.py's Wan VAE table
"""
from __future__ import annotations

import ast
import difflib
import importlib
import importlib.util
import os

import ml_collections

CONFIG_NAMES = ("tiny", "wan21_t2v_1_3b", "wan21_t2v_14b", "wan22_t2v_a14b", "wan22_ti2v_5b")


def load_config(name_or_path: str, overrides=()) -> ml_collections.ConfigDict:
    """A named config (`tiny`) or a config file path, with `--config.a.b=v` overrides applied."""
    if name_or_path.endswith(".py") or os.sep in name_or_path:
        if not os.path.exists(name_or_path):
            raise FileNotFoundError(f"config file {name_or_path!r} does not exist")
        spec = importlib.util.spec_from_file_location("_holocine_config", name_or_path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    else:
        if name_or_path not in CONFIG_NAMES:
            raise ValueError(f"unknown config {name_or_path!r}; known configs: {', '.join(CONFIG_NAMES)}")
        module = importlib.import_module(f"configs.{name_or_path}")
    config = module.get_config()
    for item in overrides:
        apply_override(config, item)
    return config


def wan_vae_arch(version: str) -> dict:
    """The Wan VAE architecture row of `configs/base.py`'s WAN_VAES ("2.1" or "2.2")."""
    tables = importlib.import_module("configs.base").WAN_VAES
    if version not in tables:
        raise ValueError(f"unknown Wan VAE version {version!r}; known: {sorted(tables)}")
    return tables[version]


def apply_override(config: ml_collections.ConfigDict, item: str) -> None:
    """Apply one `--config.a.b=value` (or `a.b=value`) override, typed like the current value."""
    text = item[len("--config."):] if item.startswith("--config.") else item
    if "=" not in text:
        raise ValueError(f"override {item!r} is not of the form --config.key=value")
    key, raw = text.split("=", 1)
    *parents, leaf = key.split(".")
    node = config
    for depth, part in enumerate(parents + [leaf]):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            where = ".".join(["config", *parents[:depth]])
            close = difflib.get_close_matches(part, list(node.keys()) if hasattr(node, "keys") else [], n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise KeyError(f"override {item!r}: {where} has no key {part!r}{hint}")
        if depth < len(parents):
            node = node[part]
    node[leaf] = _parse_like(raw, node[leaf], key)


def _parse_like(raw: str, current, key: str):
    """Parse `raw` into the type of `current` (bool, int, float, str, tuple)."""
    if isinstance(current, bool):
        if raw.lower() in ("true", "1", "yes"):
            return True
        if raw.lower() in ("false", "0", "no"):
            return False
        raise ValueError(f"--config.{key}: expected a boolean, got {raw!r}")
    if isinstance(current, str):
        return raw
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        raise ValueError(f"--config.{key}: cannot parse {raw!r} as {type(current).__name__}") from None
    if isinstance(current, tuple):
        return tuple(value) if isinstance(value, (tuple, list)) else (value,)
    if isinstance(current, float) and isinstance(value, int):
        return float(value)
    if current is not None and not isinstance(value, type(current)):
        raise ValueError(f"--config.{key}: expected {type(current).__name__}, got {raw!r}")
    return value
