"""The search space of `tune`: which `train` parameters are sampled, and from what (pure, no Optuna).

A space file (YAML or JSON) maps a parameter to a list of choices or to a range::

    optimizer: [adamw, rmsprop, sgd]
    lr: {low: 1.0e-4, high: 1.0e-1, log: true}
    momentum: {low: 0.8, high: 0.99, when: {optimizer: [sgd, rmsprop]}}

A range's type (int or float) is the parameter's type in :class:`TrainConfig`; ``when`` samples a
parameter only when earlier parameters took one of the listed values (momentum means nothing to
AdamW). Every mistake is a :class:`SceneMLError` naming the file and the key.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from sceneml.config import SEARCHABLE, TrainConfig
from sceneml.errors import SceneMLError

DEFAULT_SPACE = {
    "optimizer": ["adamw", "rmsprop", "sgd"],
    "lr": {"low": 1e-4, "high": 1e-1, "log": True},
    "weight_decay": {"low": 1e-6, "high": 1e-2, "log": True},
    "momentum": {"low": 0.8, "high": 0.99, "when": {"optimizer": ["sgd", "rmsprop"]}},
}


@dataclass
class Dimension:
    name: str
    choices: list | None = None  # categorical when set
    low: float | None = None
    high: float | None = None
    log: bool = False
    is_int: bool = False
    when: dict[str, list] = field(default_factory=dict)

    def active(self, sampled: dict) -> bool:
        """Whether this parameter is sampled, given the values sampled before it."""
        return all(sampled.get(key) in values for key, values in self.when.items())


def load_space(path: str = "") -> list[Dimension]:
    """The default space, or the one in the YAML/JSON file ``path``."""
    if not path:
        return parse_space(DEFAULT_SPACE, "the default space")
    file = Path(path).expanduser()
    try:
        raw = yaml.safe_load(file.read_text())
    except OSError as exc:
        raise SceneMLError(f"space file {path}: cannot read it ({exc.strerror or exc})") from None
    except yaml.YAMLError as exc:
        raise SceneMLError(f"space file {path}: not valid YAML/JSON ({str(exc).splitlines()[0]})") from None
    return parse_space(raw, f"space file {path}")


def parse_space(raw: object, where: str) -> list[Dimension]:
    if not isinstance(raw, dict) or not raw:
        raise SceneMLError(f"{where}: expected a mapping of parameter -> choices or range, got {raw!r}")
    types = {f.name: f.type for f in dataclasses.fields(TrainConfig)}
    dims: list[Dimension] = []
    for key, spec in raw.items():
        if key not in SEARCHABLE:
            raise SceneMLError(f"{where}: key {key!r} is not a searchable train parameter "
                               f"(searchable: {', '.join(SEARCHABLE)})")
        if isinstance(spec, list):
            dim = Dimension(key, choices=spec)
            if not spec:
                raise SceneMLError(f"{where}: key {key!r}: empty list of choices")
            for value in spec:  # every choice must be a valid train parameter on its own
                try:
                    dataclasses.replace(TrainConfig(), **{key: value})
                except (SceneMLError, TypeError) as exc:
                    raise SceneMLError(f"{where}: key {key!r}: choice {value!r} is invalid ({exc})") from None
        elif isinstance(spec, dict):
            unknown = set(spec) - {"low", "high", "log", "when"}
            if unknown or not {"low", "high"} <= set(spec):
                raise SceneMLError(f"{where}: key {key!r}: a range is {{low, high[, log][, when]}}, "
                                   f"got keys {sorted(spec)}")
            is_int = types[key] in ("int", int)
            try:
                low, high = (int(spec["low"]), int(spec["high"])) if is_int else \
                    (float(spec["low"]), float(spec["high"]))
            except (TypeError, ValueError):
                raise SceneMLError(f"{where}: key {key!r}: low and high must be numbers") from None
            if not low < high:
                raise SceneMLError(f"{where}: key {key!r}: low ({low}) must be < high ({high})")
            log = bool(spec.get("log", False))
            if log and low <= 0:
                raise SceneMLError(f"{where}: key {key!r}: a log range needs low > 0, got {low}")
            dim = Dimension(key, low=low, high=high, log=log, is_int=is_int)
            for bound in (low, high):
                try:
                    dataclasses.replace(TrainConfig(), **{key: bound})
                except SceneMLError as exc:
                    raise SceneMLError(f"{where}: key {key!r}: bound {bound} is invalid ({exc})") from None
        else:
            raise SceneMLError(f"{where}: key {key!r}: expected a list of choices or a {{low, high}} range")
        when = spec.get("when", {}) if isinstance(spec, dict) else {}
        if not isinstance(when, dict):
            raise SceneMLError(f"{where}: key {key!r}: 'when' must map an earlier key to a list of values")
        for other, values in when.items():
            earlier = {d.name: d for d in dims}
            if other not in earlier or earlier[other].choices is None:
                raise SceneMLError(f"{where}: key {key!r}: 'when' may only name a list-valued key listed before "
                                   f"it, got {other!r}")
            if not isinstance(values, list) or not set(values) <= set(earlier[other].choices):
                raise SceneMLError(f"{where}: key {key!r}: 'when' values for {other!r} must be among its choices")
        dim.when = dict(when)
        dims.append(dim)
    return dims
