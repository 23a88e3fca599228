"""``MLproject`` and ``docs/parameters.md``, written from the declarations in :mod:`sceneml.config`.

MLflow reads ``MLproject`` as a static file, so it is generated and committed; a fast test fails
when either file differs from what the declarations give. After changing a parameter::

    python -m sceneml.mlproject     # rewrites MLproject and docs/parameters.md
"""

from __future__ import annotations

import sys
from pathlib import Path

from sceneml.config import ENTRY_POINTS, RECIPE, TRAIN_DDP_DEFAULTS, EntryPoint, recipe_default
from sceneml.params import Param

ROOT = Path(__file__).resolve().parents[1]
MLPROJECT = ROOT / "MLproject"
PARAMETERS_MD = ROOT / "docs" / "parameters.md"
HEADER = "# Generated from sceneml/config.py by `python -m sceneml.mlproject`: edit the declarations, not this file.\n"
_MLFLOW_TYPES = {str: "string", int: "int", float: "float", bool: "string"}


def mlflow_type(p: Param) -> str:
    """MLproject knows string, int and float (and path, uri): a bool is the string true/false."""
    return _MLFLOW_TYPES[p.type]


def _yaml_value(p: Param, default: object) -> str:
    text = p.text(default)
    if p.type in (int, float):
        return text
    return f'"{text}"'


def listed(entry: EntryPoint) -> list[Param]:
    """The parameters MLproject lists: all but the recipe's. `mlflow run` passes an unlisted one only
    when given (``-P lr=0.01`` becomes ``--lr 0.01``) and logs it only then, so a recipe's value is
    logged by the run itself, as the value it trained with, never as the word "recipe"."""
    return [p for p in entry.params if p.default != RECIPE]


def command(entry: EntryPoint) -> str:
    """The MLproject command: every listed parameter passed as its option, through
    ``entrypoints/python`` (the interpreter that launched `mlflow run`)."""
    args = " ".join(f"{p.option} {{{p.name}}}" for p in listed(entry))
    return f"sh entrypoints/python entrypoints/{entry.script} {args}"


def _entry_yaml(name: str, entry: EntryPoint, defaults: dict[str, object]) -> list[str]:
    lines = [f"  # {name}: {entry.doc}" if name != "train_ddp" else "  # `train` under torchrun: one process per GPU "
             "(gloo on the CPU)", f"  {name}:"]
    unlisted = [p.name for p in entry.params if p not in listed(entry)]
    if unlisted:
        lines += [f"    # {line}" for line in _wrap(f"set by the recipe unless given with -P: {', '.join(unlisted)}",
                                                     0, 100).splitlines()]
    lines.append("    parameters:")
    for p in listed(entry):
        spec = f"type: {mlflow_type(p)}"
        if not p.required:
            spec += f", default: {_yaml_value(p, defaults.get(p.name, p.default))}"
        lines.append(f"      {p.name}: {{{spec}}}")
    lines.append(f"    command: >-\n      {_wrap(command(entry), 6)}")
    return lines


def _wrap(text: str, indent: int, width: int = 110) -> str:
    """A folded YAML scalar over several lines (YAML joins them with spaces)."""
    lines, line = [], ""
    for word in text.split(" "):
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}" if line else word
    lines.append(line)
    return ("\n" + " " * indent).join(lines)


def render_mlproject() -> str:
    out = [HEADER, "name: sceneml", "", "conda_env: conda.yaml", "", "entry_points:"]
    for name, entry in ENTRY_POINTS.items():
        out += _entry_yaml(name, entry, {})
        out.append("")
        if name == "train":
            out += _entry_yaml("train_ddp", entry, TRAIN_DDP_DEFAULTS)
            out.append("")
    return "\n".join(out).rstrip() + "\n"


def render_parameters_md() -> str:
    """The reference of every parameter of every entry point."""
    out = ["# Parameters", "", HEADER.removeprefix("# ").replace("this file", "this page"),
           "Every entry point is `mlflow run . -e <entry point> --env-manager local -P name=value` and also "
           "`python -m sceneml <entry point> --name value` (the same names with dashes). `none` means "
           "nothing (an empty value); booleans are `true` or `false`. `train_ddp` takes the parameters "
           f"of `train`, with {', '.join(f'`{k}` = {v}' for k, v in TRAIN_DDP_DEFAULTS.items())}.", ""]
    for name, entry in ENTRY_POINTS.items():
        out += [f"## `{name}`", "", entry.doc, "", "| parameter | type | default | choices | meaning |",
                "|---|---|---|---|---|"]
        for p in entry.params:
            default = "(required)" if p.required else f"`{p.text()}`"
            if p.default == RECIPE:
                default = f"`recipe` ({recipe_default(p.name)})"
            rules = (" Must match on `resume`." if p.resume else "") + (" `tune` may search it." if p.search else "")
            choices = ", ".join(f"`{c}`" for c in p.choices)
            meaning = f"{p.help}.{rules}".replace("|", "\\|").replace("<", "&lt;")
            out.append(f"| `{p.name}` | {mlflow_type(p)} | {default} | {choices} | {meaning} |")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def render_conda_yaml() -> str:
    """conda.yaml: the environment `mlflow run` builds with conda, from pyproject.toml's dependencies."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    python = project["requires-python"].removeprefix(">=")
    lines = ["# Generated from pyproject.toml by `python -m sceneml.mlproject`; `mlflow run` builds this environment",
             "# with conda unless --env-manager local.", "name: sceneml", "channels:", "  - conda-forge",
             "dependencies:", f"  - python>={python}", "  - pip", "  - pip:",
             *(f'      - "{d}"' for d in project["dependencies"]), '      - "-e ."']
    return "\n".join(lines) + "\n"


CONDA_YAML = ROOT / "conda.yaml"
GENERATED = {MLPROJECT: render_mlproject, PARAMETERS_MD: render_parameters_md, CONDA_YAML: render_conda_yaml}


def main() -> None:
    for path, render in GENERATED.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(render())
        print(f"wrote {path.relative_to(ROOT)}", file=sys.stderr)


if __name__ == "__main__":
    main()
