"""How a parameter is declared: a field of a config dataclass made with :func:`param`.

The field *is* the declaration: its name, type and default are the dataclass's, and :func:`param`
adds the help text, the choices, and two rules (whether ``resume`` must match it, whether ``tune``
may search it). The click options, MLproject, ``docs/parameters.md``, the resume guard and tune's
searchable set are all read from these fields (:mod:`sceneml.config` lists which entry point takes
which, :mod:`sceneml.mlproject` writes the files). Pure and torch-free.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sceneml.errors import SceneMLError

REQUIRED = "<required>"  # the default of a parameter that has none (MLproject: no default; click: required)
# A parameter's bound: the test a value must pass, and what the error says of the parameter when it fails
Rule = tuple[Callable[[Any], bool], str]


def at_least(low: float, note: str = "") -> Rule:
    return (lambda v: v >= low), f"must be >= {low}{note}"


def within(test: Callable[[Any], bool], says: str) -> Rule:
    """Any other bound: ``within(lambda v: 0 <= v < 1, "is a decay in [0, 1)")``."""
    return test, says
_TYPES = {"str": str, "int": int, "float": float, "bool": bool}


def param(default: Any, help: str, *, choices: tuple[str, ...] = (), valid: Rule | None = None,
          resume: bool = False, search: bool = False, logged: bool = True, none_is_empty: bool | None = None) -> Any:
    """A declared parameter. ``valid``: its bound (:func:`at_least`, :func:`within`), checked when the
    config is built (with ``choices``: the values it admits besides them, e.g. ``timm/<name>``);
    ``resume``: a resume must use the run's own value (it defines the data or the model); ``search``: a
    `tune` space may sample it; ``logged``: a training run logs it as a param (False for how a run is
    launched, e.g. ``resume`` itself); ``none_is_empty``: the value
    ``none`` means nothing (the default for a parameter whose default is empty; ``scheduler=none`` or
    ``weights=none`` are values of their own)."""
    return dataclasses.field(default=default, metadata={
        "help": help, "choices": tuple(choices), "valid": valid, "resume": resume, "search": search, "logged": logged,
        "none_is_empty": default == "" if none_is_empty is None else none_is_empty})


@dataclass(frozen=True)
class Param:
    """One declared parameter, as the generators and checks read it."""

    name: str
    type: type
    default: Any
    help: str
    choices: tuple[str, ...] = ()
    valid: Rule | None = dataclasses.field(default=None, compare=False)
    resume: bool = False
    search: bool = False
    logged: bool = True
    none_is_empty: bool = False
    owner: type | None = dataclasses.field(default=None, compare=False)  # the config class that declares it

    @property
    def required(self) -> bool:
        return self.default == REQUIRED

    @property
    def option(self) -> str:
        return "--" + self.name.replace("_", "-")

    def text(self, value: Any = None) -> str:
        """A value as MLproject and logged params spell it: true/false, and ``none`` for nothing."""
        return param_text(self.default if value is None else value)


def params_of(cls: type, only: tuple[str, ...] = (), exclude: tuple[str, ...] = ()) -> list[Param]:
    """The declared parameters of a config dataclass, in field order (plain fields are not parameters)."""
    out = []
    for f in dataclasses.fields(cls):
        if "help" not in f.metadata or (only and f.name not in only) or f.name in exclude:
            continue
        kind = f.type if isinstance(f.type, type) else _TYPES[str(f.type)]
        out.append(Param(f.name, kind, f.default, **f.metadata, owner=cls))
    missing = set(only) - {p.name for p in out}
    if missing:
        raise AssertionError(f"{cls.__name__} declares no parameter {sorted(missing)}")
    return out


def check_declared(cfg: object) -> None:
    """Every declared choice list and bound of ``cfg`` holds, in field order: one line naming the valid
    choices or the bound otherwise."""
    for p in params_of(type(cfg)):
        value = getattr(cfg, p.name)
        if p.choices and value not in p.choices and not (p.valid is not None and p.valid[0](value)):
            more = f", or {p.valid[1]}" if p.valid is not None else ""
            raise SceneMLError(f"unknown {p.name} {value!r}; choose one of {', '.join(p.choices)}{more}")
        if not p.choices and p.valid is not None and not p.valid[0](value):
            raise SceneMLError(f"{p.name} {p.valid[1]}, got {value!r}")

def build(cls: type, values: dict[str, Any], params: Sequence[Param]) -> Any:
    """``cls`` from a flat mapping of parameter values (a command line's): each of ``params`` goes to
    the config class that declares it, ``cls`` or a config dataclass nested in it (`main`'s
    ``batch_size`` is its training runs', not its analysis's)."""
    kwargs = {p.name: values[p.name] for p in params if p.owner is cls and p.name in values}
    for f in dataclasses.fields(cls):
        if f.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(f.default_factory):
            kwargs[f.name] = build(f.default_factory, values, params)
    return cls(**kwargs)


def param_text(value: object) -> str:
    """One spelling per value in logged params: true/false, and "none" for nothing."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None or value == "":
        return "none"
    return str(value)
