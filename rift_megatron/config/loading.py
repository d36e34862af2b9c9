"""YAML file + dotted overrides -> :class:`RiftConfig`, and the resolved config back to YAML.

Precedence: schema defaults < the YAML file < overrides, in the order given. An override is
``key.sub=value`` with the value read by the same YAML scalar rules as the file
(``training.steps=10``, ``algorithm.ratio_cap=null``, ``parallel.sequence_parallel=true``,
``rollout.stop=["\\n\\n"]``); ``key=`` sets null; a mapping value (``training={steps: 5}``) is merged
into the section like a file's would be.

YAML is read with YAML 1.2 core rules rather than PyYAML's YAML 1.1 defaults, because the 1.1
rules surprise config users: ``1e-5`` is a number (1.1: a string), ``yes`` / ``on`` / ``no`` are
strings (1.1: booleans), ``2026-01-01`` stays a string (1.1: a date), ``010`` is not octal.
Duplicate keys are errors (PyYAML silently keeps the last one).

Every error is a :class:`ConfigError` with one line naming the dotted key and where it was set:
``unknown config key 'training.stpes' (in cfg.yaml, line 3); did you mean 'training.steps'?``.
"""

from __future__ import annotations

import difflib
import functools
import math
import os
import re
import textwrap
import types
from collections.abc import Iterable, Mapping
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from .checks import check_config, where
from .schema import ConfigError, RiftConfig

__all__ = ["config_from_dict", "config_to_dict", "dump_yaml", "load_config", "save_config"]

# ---------------------------------------------------------------------------------- YAML rules

_YAML12_RESOLVERS = (
    ("tag:yaml.org,2002:null", re.compile(r"^(?:~|null|Null|NULL|)$"), ["~", "n", "N", ""]),
    ("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")),
    ("tag:yaml.org,2002:int", re.compile(r"^(?:[-+]?(?:0|[1-9][0-9_]*)|0x[0-9a-fA-F_]+|0o[0-7_]+)$"), list("-+0123456789")),
    (
        "tag:yaml.org,2002:float",
        re.compile(
            r"""^(?:[-+]?[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?
               |[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+
               |[-+]?\.[0-9][0-9_]*(?:[eE][-+]?[0-9]+)?
               |[-+]?\.(?:inf|Inf|INF)
               |\.(?:nan|NaN|NAN))$""",
            re.X,
        ),
        list("-+0123456789."),
    ),
    ("tag:yaml.org,2002:merge", re.compile(r"^(?:<<)$"), ["<"]),
)


class _Loader(yaml.SafeLoader):
    """SafeLoader with only the YAML 1.2 core implicit types (see the module docstring)."""

    yaml_implicit_resolvers: dict = {}


class _Dumper(yaml.SafeDumper):
    """Quotes every string that either rule set would read as something else, so the dump reads
    back identically with our loader and stays unambiguous for YAML 1.1 readers."""

    yaml_implicit_resolvers = {ch: list(rs) for ch, rs in yaml.SafeDumper.yaml_implicit_resolvers.items()}


for _tag, _regexp, _first in _YAML12_RESOLVERS:
    _Loader.add_implicit_resolver(_tag, _regexp, _first)
    _Dumper.add_implicit_resolver(_tag, _regexp, _first)


def _yaml_problem(exc: yaml.YAMLError) -> tuple[str, Any]:
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    context = getattr(exc, "context", None)
    if context and problem.startswith("but "):  # "expected a single document ..., but found another"
        problem = f"{context}, {problem}"
    return problem, mark


def _record_lines(node: yaml.Node, prefix: str, lines: dict[str, int], name: str) -> None:
    """Line of every key down to the leaves of the schema; duplicate keys are errors."""
    if not isinstance(node, yaml.MappingNode) or prefix.count(".") >= 2:
        return
    seen: dict[str, int] = {}
    for key_node, value_node in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = key_node.value if isinstance(key_node, yaml.ScalarNode) else "?"
        path, line = f"{prefix}{key}", key_node.start_mark.line + 1
        if key in seen:
            raise ConfigError(f"duplicate config key {path!r} in {name} (lines {seen[key]} and {line})")
        seen[key] = lines[path] = line
        _record_lines(value_node, f"{path}.", lines, name)


def _parse_file(text: str, name: str) -> tuple[Any, dict[str, int]]:
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        lines: dict[str, int] = {}
        if node is None:
            return None, lines
        _record_lines(node, "", lines, name)
        return loader.construct_document(node), lines
    except yaml.YAMLError as exc:
        problem, mark = _yaml_problem(exc)
        at = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"invalid YAML in {name}{at}: {problem}") from None
    finally:
        loader.dispose()


# ------------------------------------------------------------------------------------ overrides

_OVERRIDE_KEY = re.compile(r"^[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*$")


def _apply_override(data: dict, sources: dict[str, str], text: str) -> None:
    key, sep, raw = str(text).partition("=")
    key = key.strip()
    if not sep or not _OVERRIDE_KEY.match(key):
        raise ConfigError(f"malformed override {text!r}: expected key.sub=value, e.g. training.steps=10")
    try:
        value = yaml.load(raw, Loader=_Loader)
    except yaml.YAMLError as exc:
        raise ConfigError(f"malformed override {text!r}: the value is not valid YAML ({_yaml_problem(exc)[0]})") from None
    source = f"in override {text!r}"
    *parents, last = key.split(".")
    node, prefix = data, ""
    for part in parents:
        if not isinstance(node.get(part), dict):
            node[part] = {}
            sources[f"{prefix}{part}"] = source
        node, prefix = node[part], f"{prefix}{part}."
    _merge(node, last, value, f"{prefix}{last}", sources, source)


def _merge(node: dict, key: str, value: Any, path: str, sources: dict[str, str], source: str) -> None:
    sources[path] = source
    if isinstance(value, dict) and isinstance(node.get(key), dict):
        for sub_key, sub_value in value.items():
            _merge(node[key], sub_key, sub_value, f"{path}.{sub_key}", sources, source)
    else:
        node[key] = value
        if isinstance(value, dict):
            for sub_key in value:
                sources[f"{path}.{sub_key}"] = source


# ------------------------------------------------------------------------- typed construction

_TYPE_NAMES = {bool: "a boolean (true or false)", int: "an integer", float: "a number", str: "a string",
               tuple: "a list of strings"}


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return get_type_hints(cls)


@functools.cache
def _all_keys() -> tuple[str, ...]:
    """Every valid dotted key, sections included, in schema order."""
    keys = []
    for section in fields(RiftConfig):
        keys.append(section.name)
        keys.extend(f"{section.name}.{f.name}" for f in fields(_hints(RiftConfig)[section.name]))
    return tuple(keys)


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"{str(value).lower()} (bool)"
    text = repr(value)
    text = text if len(text) <= 60 else text[:57] + "..."
    return f"{text} ({type(value).__name__})"


# Names users bring from Megatron-LM / other trainers' flags.
_ALIASES = {"tp": "tensor", "pp": "pipeline", "vpp": "virtual_pipeline", "sp": "sequence_parallel",
            "gbs": "global_batch_size", "mbs": "micro_batch_size", "n": "k", "num_samples": "k"}


def _suggest(path: str) -> str | None:
    """The valid key the user most likely meant: a close sibling (``training.stpes`` ->
    ``training.steps``, ``optimizer`` -> ``optim``, ``rollout.temp`` -> ``rollout.temperature``,
    ``parallel.tp`` -> ``parallel.tensor``), else the same (or a very close) name in another
    section (``training.lr`` -> ``optim.lr``, ``steps`` -> ``training.steps``)."""
    keys = _all_keys()
    prefix, _, name = path.rpartition(".")
    name = name.lower()
    siblings = {k.rpartition(".")[2]: k for k in keys if k.rpartition(".")[0] == prefix}
    if _ALIASES.get(name) in siblings:
        return siblings[_ALIASES[name]]
    close = difflib.get_close_matches(name, siblings, n=1, cutoff=0.6)
    if close:
        return siblings[close[0]]
    extensions = [k for sibling, k in siblings.items() if len(name) >= 2 and sibling.startswith(name)]
    if len(extensions) == 1:
        return extensions[0]
    leaves: dict[str, str] = {}
    for k in keys:
        if "." in k:
            leaves.setdefault(k.rpartition(".")[2], k)
    close = difflib.get_close_matches(name, leaves, n=1, cutoff=0.8)
    return leaves[close[0]] if close else None


def _unknown_key(path: str, sources: Mapping[str, str]) -> ConfigError:
    suggestion = _suggest(path)
    hint = f"; did you mean {suggestion!r}?" if suggestion else ""
    return ConfigError(f"unknown config key {path!r}{where(path, sources)}{hint}")


def _coerce(value: Any, tp: Any, path: str, sources: Mapping[str, str]) -> Any:
    """``value`` checked against the annotation ``tp`` (and converted: int -> float, list -> tuple)."""
    optional = False
    if get_origin(tp) in (Union, types.UnionType):
        inner = [a for a in get_args(tp) if a is not type(None)]
        optional = len(inner) < len(get_args(tp))
        (tp,) = inner
    at = f"config key {path!r}{where(path, sources)}"
    if get_origin(tp) is Literal:
        choices = get_args(tp)
        if any(value == choice and type(value) is type(choice) for choice in choices):  # 1 is not True
            return value
        if value is None and optional:
            return None
        words = [c for c in choices if isinstance(c, str)]
        close = difflib.get_close_matches(value, words, n=1) if isinstance(value, str) else []
        hint = f"; did you mean {close[0]!r}?" if close else ""
        allowed = ", ".join(repr(c) if isinstance(c, str) else str(c).lower() for c in choices) + (" or null" if optional else "")
        raise ConfigError(f"{at} must be one of {allowed}, got {_describe(value)}{hint}")
    if value is None and optional:
        return None
    base = get_origin(tp) or tp
    if base is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            number = float(value)
        except OverflowError:  # an integer beyond float range
            number = math.inf
        if not math.isfinite(number):
            shown = value if isinstance(value, float) else _describe(value)
            raise ConfigError(f"{at} must be a finite number, got {shown}")
        return number
    if base is tuple and isinstance(value, list) and all(isinstance(item, str) for item in value):
        return tuple(value)
    if base in (bool, int, str) and isinstance(value, base) and not (base is int and isinstance(value, bool)):
        return value
    expected = _TYPE_NAMES[base] + (" or null" if optional else "")
    raise ConfigError(f"{at} must be {expected}, got {_describe(value)}")


def _build(cls: type, data: Any, prefix: str, sources: Mapping[str, str]) -> Any:
    if data is None:  # an empty section (every key commented out)
        data = {}
    if not isinstance(data, dict):
        section = prefix.rstrip(".")
        raise ConfigError(f"config section {section!r}{where(section, sources)} must be a mapping of keys, got {_describe(data)}")
    names = {f.name for f in fields(cls)}
    for key in data:
        if key not in names:
            raise _unknown_key(f"{prefix}{key}", sources)
    kwargs = {}
    for f in fields(cls):
        if f.name in data:
            tp, path = _hints(cls)[f.name], f"{prefix}{f.name}"
            if is_dataclass(tp):
                kwargs[f.name] = _build(tp, data[f.name], f"{path}.", sources)
            else:
                kwargs[f.name] = _coerce(data[f.name], tp, path, sources)
    return cls(**kwargs)


# --------------------------------------------------------------------------------- public API


def config_from_dict(data: Mapping[str, Any] | None, sources: Mapping[str, str] | None = None) -> RiftConfig:
    """Build and check a config from a nested mapping (``sources``: dotted key -> where it was set)."""
    sources = dict(sources or {})
    if data is not None and not isinstance(data, Mapping):
        raise ConfigError(f"a config must be a mapping of sections (model:, training:, ...), got {_describe(data)}")
    cfg = _build(RiftConfig, dict(data or {}), "", sources)
    check_config(cfg, sources)
    return cfg


def load_config(path: str | os.PathLike[str] | None = None, overrides: Iterable[str] = ()) -> RiftConfig:
    """The config of a run: schema defaults, then the YAML file ``path`` (if any), then the
    ``key.sub=value`` overrides in order. Raises :class:`ConfigError` (one line) on any problem."""
    data: Any = {}
    sources: dict[str, str] = {}
    if path is not None:
        name = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"config file {name!r} does not exist") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"config file {name!r} cannot be read: {getattr(exc, 'strerror', None) or exc}") from None
        data, lines = _parse_file(text, name)
        if data is None:  # an empty file
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(
                f"config file {name} must contain a mapping of sections (model:, training:, ...), got {_describe(data)}"
            )
        sources = {key: f"in {name}, line {line}" for key, line in lines.items()}
    for text in [overrides] if isinstance(overrides, str) else overrides:
        _apply_override(data, sources, text)
    return config_from_dict(data, sources)


def _plain(value: Any) -> Any:
    if is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, tuple):
        return list(value)
    return value


def config_to_dict(config: RiftConfig) -> dict[str, Any]:
    """Nested plain dict (lists, not tuples) of the whole config, sections in schema order."""
    return _plain(config)


def _dump(data: Any, flow: bool | None) -> str:
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False, default_flow_style=flow, allow_unicode=True, width=1 << 16)


def dump_yaml(config: RiftConfig, comments: bool = False) -> str:
    """The resolved config as YAML that ``load_config`` reads back to an equal config. With
    ``comments=True`` every key is preceded by its documentation (a commented template)."""
    if not comments:
        return _dump(config_to_dict(config), flow=False)
    out = []
    for section in fields(config):
        value = getattr(config, section.name)
        out.append(f"# {section.metadata['doc'].strip().splitlines()[0]}")
        out.append(f"{section.name}:")
        for f in fields(value):
            out.extend(f"  # {line}" for line in textwrap.wrap(f.metadata["doc"], 96))
            out.extend(f"  {line}" for line in _dump({f.name: _plain(getattr(value, f.name))}, flow=False).splitlines())
        out.append("")
    return "\n".join(out)


def save_config(config: RiftConfig, path: str | os.PathLike[str]) -> Path:
    """Write the resolved config to ``path`` (e.g. ``<checkpoint>/config.yaml``); returns the path."""
    path = Path(path)
    path.write_text(dump_yaml(config), encoding="utf-8")
    return path
