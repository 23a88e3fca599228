"""Each parameter is declared once (sceneml/config.py); MLproject, docs/parameters.md, the command
line, the resume guard and tune's searchable set must all say what the declarations say."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import click
import pytest
import yaml

from sceneml import mlproject
from sceneml.cli import cli
from sceneml.config import (
    ENTRY_POINTS,
    RECIPE_PARAMS,
    RECIPES,
    RESUME_MUST_MATCH,
    SEARCHABLE,
    TRAIN_DDP_DEFAULTS,
    TrainConfig,
)
from sceneml.params import build, param_text, params_of

from .conftest import REPO

MLPROJECT = yaml.safe_load((REPO / "MLproject").read_text())["entry_points"]
TYPE_OF = {str: "string", int: "int", float: "float", bool: "string"}


def _mlproject_default(p, overrides=None):
    value = (overrides or {}).get(p.name, p.default)
    if isinstance(value, bool):
        return "true" if value else "false"
    return "none" if value == "" else value


def test_the_generated_files_are_current():
    for path, render in mlproject.GENERATED.items():
        assert path.read_text() == render(), f"{path.name} is stale: run `python -m sceneml.mlproject`"


@pytest.mark.parametrize("name", [*ENTRY_POINTS, "train_ddp"])
def test_mlproject_agrees_with_the_declarations_in_name_type_and_default(name):
    entry = ENTRY_POINTS["train" if name == "train_ddp" else name]
    overrides = TRAIN_DDP_DEFAULTS if name == "train_ddp" else {}
    declared = {p.name: p for p in mlproject.listed(entry)}
    in_file = MLPROJECT[name]["parameters"]
    assert list(in_file) == list(declared)
    # the recipe's parameters are the ones left out, and only they
    assert {p.name for p in entry.params} - set(declared) == set(RECIPE_PARAMS) & {p.name for p in entry.params}
    for key, spec in in_file.items():
        p = declared[key]
        assert spec["type"] == TYPE_OF[p.type], key
        if p.required:
            assert "default" not in spec, key
        else:
            assert spec["default"] == _mlproject_default(p, overrides), key
    # every parameter reaches the script, as its dashed option
    command = MLPROJECT[name]["command"]
    assert command.startswith(f"sh entrypoints/python entrypoints/{entry.script} ")
    assert [w for w in command.split() if w.startswith("--")] == [p.option for p in declared.values()]


@pytest.mark.parametrize("name", list(ENTRY_POINTS))
def test_each_subcommand_has_every_mlproject_parameter_with_its_default_and_nothing_else(name):
    command = cli.commands[name]
    options = {o.name for o in command.params if isinstance(o, click.Option)}
    in_file = MLPROJECT[name]["parameters"]
    assert options == set(in_file) | (set(RECIPE_PARAMS) & {p.name for p in ENTRY_POINTS[name].params})
    # what `mlflow run` passes (every default, as MLproject spells it) parses to click's own defaults
    def opt(key: str) -> str:
        return "--" + key.replace("_", "-")

    required = {k: "x" for k, spec in in_file.items() if "default" not in spec}
    as_mlflow_passes = [f"{opt(k)}={spec['default']}" for k, spec in in_file.items() if "default" in spec]
    parsed = command.make_context(name, as_mlflow_passes + [f"{opt(k)}={v}" for k, v in required.items()]).params
    # ... and builds the declared defaults (scheduler=none stays "none"; resume=none is empty)
    entry = ENTRY_POINTS[name]
    assert build(entry.config, parsed, entry.params) == dataclasses.replace(entry.config(), **required)


def test_a_recipe_sets_its_parameters_and_each_one_given_overrides_it_even_at_another_recipes_value():
    assert all(set(values) == set(RECIPE_PARAMS) for values in RECIPES.values())
    for recipe, values in RECIPES.items():
        assert {k: getattr(TrainConfig(recipe=recipe), k) for k in RECIPE_PARAMS} == values
    fast, classic = RECIPES["fast"], RECIPES["classic"]
    differ = [k for k in RECIPE_PARAMS if fast[k] != classic[k]]
    assert differ  # else `fast` would be `classic`
    # given explicitly at classic's value, the value holds under recipe=fast (it is not "unset")
    given = {k: classic[k] for k in differ[:2]}
    cfg = TrainConfig(recipe="fast", **given)
    assert {k: getattr(cfg, k) for k in RECIPE_PARAMS} == {**fast, **given}
    # the same from a command line as `mlflow run` builds it: a recipe parameter arrives only when given,
    # spelt as -P wrote it (--label_smoothing), the others as MLproject lists them
    command, entry = cli.commands["train"], ENTRY_POINTS["train"]
    parsed = command.make_context("train", ["--recipe=fast", *(f"--{k}={param_text(v)}" for k, v in given.items())])
    assert build(TrainConfig, parsed.params, entry.params) == cfg
    assert cfg.as_params()["recipe"] == "fast"
    assert {k: cfg.as_params()[k] for k in RECIPE_PARAMS} == {**fast, **given}  # logged as it trained


def test_the_resume_guard_and_the_search_space_come_from_the_declarations():
    flags = {p.name: (p.resume, p.search) for p in params_of(TrainConfig)}
    assert set(RESUME_MUST_MATCH) == {n for n, (resume, _) in flags.items() if resume}
    assert set(SEARCHABLE) == {n for n, (_, search) in flags.items() if search}
    # how a run is launched is never logged, never searched, and a resume may change it
    for name in ("resume", "nproc", "quiet", "device", "num_workers"):
        assert name not in RESUME_MUST_MATCH and name not in SEARCHABLE
        assert name not in TrainConfig().as_params() or name in ("device", "num_workers")


def test_help_lists_every_entry_point_and_each_option_with_default_and_choices():
    top = subprocess.run([sys.executable, "-m", "sceneml", "--help"], capture_output=True, text=True, cwd=REPO,
                         timeout=60)
    assert top.returncode == 0
    for name in ENTRY_POINTS:
        assert f"  {name} " in top.stdout
    train = subprocess.run([sys.executable, "-X", "importtime", "-m", "sceneml", "train", "--help"],
                           capture_output=True, text=True, cwd=REPO, timeout=60)
    assert train.returncode == 0
    text = " ".join(train.stdout.split())  # click wraps lines
    assert "--optimizer TEXT" in text and "[default: adamw]" in text
    assert ("(one of: resnet18, resnet34, resnet50, googlenet, mobilenet_v3_small, efficientnet_b0, "
            "efficientnet_lite0, or timm/<name> (any model of timm's zoo))") in text
    assert "--resume TEXT" in text and "[default: none]" in text
    imported = {line.split("|")[-1].strip() for line in train.stderr.splitlines() if line.startswith("import time:")}
    assert "sceneml.config" in imported
    assert not {m for m in imported if m.split(".")[0] in ("torch", "torchvision", "mlflow")}


def test_a_bad_value_is_one_line_from_sceneml_or_from_click_and_starts_nothing(tmp_path):
    lion = "error: unknown optimizer 'lion'; choose one of adamw, adam, rmsprop, sgd"
    cases = [(["train", "--optimizer", "lion"], lion),
             (["train", "--epochs", "x"], "error: Invalid value for '--epochs': 'x' is not a valid integer."),
             (["predict"], "error: Missing option '--input'."),
             (["nosuch"], "error: No such command 'nosuch'.")]
    for args, line in cases:
        proc = subprocess.run([sys.executable, "-m", "sceneml", *args], capture_output=True, text=True, cwd=tmp_path,
                              timeout=60)
        assert proc.returncode == 2, (args, proc.stderr)
        assert proc.stderr.strip().splitlines() == [line]
    assert not (tmp_path / "mlflow.db").exists()


def test_a_sweep_that_names_one_configuration_twice_is_refused_before_training(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "sceneml", "main", "--lrs", "0.001,1e-3", "--optimizers", "adamw"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: lrs='0.001,1e-3' names 0.001 twice; give each value once"]
    assert not (tmp_path / "mlflow.db").exists()
    from sceneml.config import StudyConfig
    from sceneml.errors import SceneMLError

    with pytest.raises(SceneMLError, match="optimizers='sgd,adamw,sgd' names sgd twice"):
        StudyConfig("sgd,adamw,sgd")
    assert len(StudyConfig("sgd,adamw", "0.01,0.001").children()) == 4
