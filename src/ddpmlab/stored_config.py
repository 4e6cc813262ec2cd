"""Configs read from files (a checkpoint's ``ddpmlab_config``, an export's ``config.yaml``, a diffusers
``config.json``), bounded before OmegaConf sees them.

A pickle may store one list once and reference it many times, and YAML may do the same with anchors and aliases:
a few hundred bytes then stand for 10^9 values, which OmegaConf would walk one by one until memory runs out. So
every stored config is first checked here as plain data -- its values counted each time they are reached, shared
or not, with a cap far above any real config's size -- and a YAML file is read only if it is small and uses no
alias (ddpmlab writes none: ``OmegaConf.to_yaml`` writes every value out in full)."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf

from ddpmlab.errors import CheckpointError

MAX_NODES = 100_000  # values in one stored config; a training config holds a few hundred
MAX_DEPTH = 64  # nesting; a training config goes about six levels deep
MAX_FILE_BYTES = 1 << 20  # a config file; an export's config.yaml is a few KB
LEAVES = (str, bytes, int, float, bool, type(None))


def check_plain(obj: Any, where: str, what: str = "stored config") -> None:
    """Refuse ``obj`` (a config as read from a file) unless it is plain data -- dicts, lists, strings, numbers --
    of at most :data:`MAX_NODES` values and :data:`MAX_DEPTH` levels. Shared references count every time they are
    reached (they are what a small crafted file uses to stand for a huge config), and the walk stops at the cap."""
    too_big = (
        f"{where}: its {what} is far larger than any ddpmlab config (over {MAX_NODES:,} values or {MAX_DEPTH} "
        f"levels deep: a crafted file?); refused unread -- use files only from sources you trust"
    )
    stack, count = [(obj, 1)], 0
    while stack:
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise CheckpointError(too_big)
        if isinstance(node, LEAVES):
            continue
        if not isinstance(node, (dict, list, tuple)):
            raise CheckpointError(
                f"{where}: its {what} holds a {type(node).__name__}, which no ddpmlab config holds (only dicts, "
                "lists, strings and numbers); use files only from sources you trust"
            )
        count += 2 * len(node) if isinstance(node, dict) else len(node)  # counted before anything is copied
        if count > MAX_NODES:
            raise CheckpointError(too_big)
        children = [*node.keys(), *node.values()] if isinstance(node, dict) else node
        stack.extend((child, depth + 1) for child in children)


def config_from(obj: Any, where: str, what: str = "stored config") -> DictConfig:
    """``obj`` (a stored config as read from a file) as a DictConfig, once :func:`check_plain` has admitted it."""
    if not isinstance(obj, dict):
        raise CheckpointError(f"{where}: its {what} is not a config mapping (a {type(obj).__name__})")
    check_plain(obj, where, what)
    try:
        return OmegaConf.create(obj)
    except Exception as e:  # a key or value OmegaConf cannot hold
        raise CheckpointError(f"{where}: its {what} is broken ({type(e).__name__}: {str(e)[:200]})") from e


def build_checked(cls: type, kwargs: dict[str, Any], where: str, what: str) -> Any:
    """``cls(**kwargs)`` for keyword arguments read from a file: a key that ``cls`` does not take, or a value it
    refuses, is a CheckpointError naming them rather than a TypeError from deep inside the constructor."""
    params = inspect.signature(cls).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        unknown = sorted(str(k) for k in set(kwargs) - set(params))
        if unknown:
            raise CheckpointError(
                f"{where}: its stored {what} has keys that {cls.__name__} does not take "
                f"({', '.join(unknown)[:200]}); was it written by another ddpmlab, or edited?"
            )
    try:
        return cls(**kwargs)
    except Exception as e:  # a missing key, a value of the wrong type or out of range
        raise CheckpointError(
            f"{where}: its stored {what} does not build a {cls.__name__} ({type(e).__name__}: {str(e)[:200]})"
        ) from e


def read_text(path: Path, where: str) -> str:
    """A stored config file's text, refused above :data:`MAX_FILE_BYTES` before it is read."""
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise CheckpointError(
            f"{where}: {path.name} holds {size:,} bytes, far more than any ddpmlab config "
            f"(at most {MAX_FILE_BYTES:,}); refused unread"
        )
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{where}: {path.name} is not UTF-8 text ({e.reason} at byte {e.start})") from e


def read_yaml(path: str | Path, where: str | None = None) -> DictConfig:
    """A config file that ``OmegaConf.to_yaml`` wrote (an export's config.yaml), read as ``OmegaConf.load`` reads
    it, but refused when it is large, uses a YAML alias or tag, or is not a mapping of plain values."""
    from omegaconf._utils import get_yaml_loader  # OmegaConf's own loader: its floats, its duplicate-key check

    path = Path(path)
    where = where or str(path)
    text, loader = read_text(path, where), get_yaml_loader()
    try:
        for event in yaml.parse(text, Loader=loader):  # events only: nothing is expanded yet
            if isinstance(event, yaml.AliasEvent):
                raise CheckpointError(
                    f"{where}: {path.name} uses a YAML alias (*{event.anchor}), which ddpmlab never writes (an alias "
                    "can stand for a huge config); write every value out in full"
                )
        obj = yaml.load(text, Loader=loader)
    except yaml.YAMLError as e:  # a syntax error, or a tag (!!python/...) the safe loader has no constructor for
        first = " ".join(str(e).split())[:200]
        raise CheckpointError(f"{where}: {path.name} is not a ddpmlab config ({first})") from e
    return config_from(obj, where, path.name)
