"""What each task is asked to do: every parameter of every entry point, declared once, as a field of a
plain config dataclass (:func:`sceneml.params.param`), and validated before any work starts.

``ENTRY_POINTS`` says which parameters each MLflow entry point takes. From these declarations come
the click options of ``python -m sceneml`` (:mod:`sceneml.cli`), ``MLproject`` and
``docs/parameters.md`` (:mod:`sceneml.mlproject`, checked by a test), the resume guard
(``resume=True``) and tune's searchable set (``search=True``). Adding a parameter is one field here.

This module imports neither torch nor torchvision nor mlflow, so ``--help`` answers at once.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass

from sceneml.architectures import ARCHS, is_timm_name
from sceneml.errors import SceneMLError
from sceneml.params import REQUIRED, Param, at_least, check_declared, param, param_text, params_of, within

OPTIMIZERS = ("adamw", "adam", "rmsprop", "sgd")
SCHEDULERS = ("none", "cosine", "step", "linear", "onecycle")
AUTO_AUGMENT = ("none", "trivial", "randaugment")  # torchvision's TrivialAugmentWide, RandAugment
# The metrics a "best epoch" and the champion can be chosen by; val_loss is the one where lower wins.
SELECT_METRICS = ("val_mean_class_acc", "val_mAP", "val_acc", "val_loss")
LOWER_IS_BETTER = frozenset({"val_loss"})
# Which epoch checkpoints a finished run keeps: its best one, every one that improved, or all.
KEEP_CHECKPOINTS = ("best", "improved", "all")
# Training arithmetic: auto = bf16 autocast on CUDA devices that support it, else fp16 with a
# GradScaler; on the CPU bf16 where it has AMX bf16 tiles and the network no depthwise convolution,
# else fp32 (sceneml/engine/precision.py). Validation and the logged checkpoints stay float32.
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
PRUNERS = ("median", "hyperband", "none")
DEDUPE = ("none", "cross_split")  # cross_split: drop val/test copies of training images
SPLITS = ("train", "val", "test")
FP16_NEEDS_CUDA = "precision=fp16 needs a CUDA device; on the CPU use bf16 or fp32"
ONECYCLE_WARMS_UP = "scheduler=onecycle warms up by itself (30 % of the steps): set warmup_epochs=0"

# A recipe: the values of the training parameters it sets, each overridden by the same parameter given
# explicitly. `classic` is the plain recipe (constant lr, flips only); `fast` the from-scratch recipe
# that reached the best test accuracy per minute on the 2-core CPU (docs/training.md says the
# measurement behind each value). Each recipe names every parameter declared with the default RECIPE.
RECIPE = "recipe"  # the declared default of those parameters: "whatever the recipe says"
RECIPES: dict[str, dict[str, object]] = {
    "classic": {"image_size": 0, "train_crop_size": 0, "batch_size": 32, "lr": 0.001, "weight_decay": 0.0001,
                "scheduler": "none", "label_smoothing": 0.0, "random_crop": False, "auto_augment": "none",
                "random_erase": 0.0, "mixup_alpha": 0.0, "cutmix_alpha": 0.0, "ema": 0.0, "backbone_lr_scale": 1.0,
                "freeze_epochs": 0},
    "fast": {"image_size": 128, "train_crop_size": 96, "batch_size": 32, "lr": 0.001, "weight_decay": 0.05,
             "scheduler": "linear", "label_smoothing": 0.1, "random_crop": True, "auto_augment": "none",
             "random_erase": 0.0, "mixup_alpha": 0.0, "cutmix_alpha": 0.0, "ema": 0.0, "backbone_lr_scale": 1.0,
             "freeze_epochs": 0},
    # fine-tuning an ImageNet backbone (weights=imagenet): a new head warmed up alone for an epoch, then every
    # layer, the pretrained body at a quarter of the head's lr; no label smoothing (a higher test mAP in both
    # paired 5-minute runs of docs/training.md)
    "finetune": {"image_size": 192, "train_crop_size": 160, "batch_size": 32, "lr": 0.002, "weight_decay": 0.01,
                 "scheduler": "linear", "label_smoothing": 0.0, "random_crop": True, "auto_augment": "none",
                 "random_erase": 0.0, "mixup_alpha": 0.0, "cutmix_alpha": 0.0, "ema": 0.0, "backbone_lr_scale": 0.25,
                 "freeze_epochs": 1},
}


def recipe_default(name: str) -> str:
    """How a recipe parameter's default reads in --help and docs/parameters.md."""
    return ", ".join(f"{recipe}: {param_text(values[name])}" for recipe, values in RECIPES.items())


# ------------------------------------------------------------- parameters several tasks share

def _data(default: str = "synthetic"):
    return param(default, "synthetic[:N], an image folder, a Kaggle Intel folder or a .zip"
                 + ("" if default else "; none = the data the model was trained on"), resume=True)


def _device():
    return param("auto", "auto, cpu, cuda or cuda:<index>")


def _model_uri():
    return param("models:/sceneml@champion", "the model: models:/<name>@<alias>, models:/<name>/<version>, "
                 "models:/<model_id> or runs:/<run_id>/<path>")


def _select_metric():
    return param("val_mean_class_acc", "what 'best epoch' and the champion mean (val_loss: lowest wins)",
                 choices=SELECT_METRICS, resume=True)


def _model_name():
    return param("sceneml", "registered model that holds the champion")


def _experiment(default: str = "sceneml"):
    return param(default, "MLflow experiment; none = the launch's (an explicit --experiment-name of mlflow run wins)",
                 none_is_empty=True)


def _storage(alone: str = ""):
    return param("", "Optuna storage the workers share: an SQLAlchemy URL or a journal file; none = optuna.journal "
                     "beside the MLflow store" + alone)


def _study_name(entry: str, alone: str = ""):
    return param("", f"the search's name, shared by its workers; none = {entry}-<arch>-<data>" + alone)


def _search_name(entry: str, given: str, train: TrainConfig) -> str:
    return given or re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{entry}-{train.arch}-{train.data}")


def _tta():
    return param(False, "horizontal-flip test-time augmentation: each image's probabilities are the mean of the "
                        "softmax of the image and of its mirror image")


def _n_images():
    return param(200, "images per data set for activation statistics and spectra",
                 valid=at_least(2, " (a covariance needs two images)"))


def _compare():
    return param("", "comma list of name=path data sets whose feature spectra are compared")


def check_device_name(name: str) -> None:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:<index>``; checked before any work starts."""
    if name not in ("auto", "cpu", "cuda") and not re.fullmatch(r"cuda:\d+", name):
        raise SceneMLError(f"unknown device {name!r}; choose auto, cpu or cuda")


def check_model_name(name: str) -> None:
    """A registered model name that every MLflow store and URI accepts."""
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise SceneMLError(f"model_name {name!r} may only use letters, digits, '.', '_' and '-'")


# ------------------------------------------------------------------------------------- train

@dataclass(frozen=True)
class TrainConfig:
    """`train`: one torchvision CNN trained as one MLflow run."""

    recipe: str = param("classic", "the preset of the parameters whose default is `recipe` (docs/training.md#recipes); "
                                   "each of them given explicitly overrides it", choices=tuple(RECIPES), resume=True)
    optimizer: str = param("adamw", "adamw, adam, rmsprop, or sgd (Nesterov momentum)", choices=OPTIMIZERS,
                           resume=True, search=True)
    lr: float = param(RECIPE, "learning rate", resume=True, search=True, valid=within(lambda v: v > 0, "must be > 0"))
    data: str = _data()
    arch: str = param("resnet18", "the network: a torchvision one, EfficientNet-Lite0 (timm) or any model of timm's "
                                  "zoo as timm/<name> (docs/training.md#pretrained-backbones)", choices=ARCHS,
                      valid=within(is_timm_name, "timm/<name> (any model of timm's zoo)"), resume=True, search=True)
    weights: str = param("auto", "auto (ImageNet if the weight set is there), imagenet, none, or a state-dict path",
                         resume=True)
    momentum: float = param(0.9, "momentum of sgd and rmsprop", resume=True, search=True, valid=at_least(0))
    weight_decay: float = param(RECIPE, "decoupled for adamw, L2 for the others", resume=True, search=True,
                                valid=at_least(0))
    label_smoothing: float = param(RECIPE, "share of each training target spread evenly over all classes, as "
                                        "torchvision's --label-smoothing; validation losses stay unsmoothed",
                                   resume=True, search=True, valid=within(lambda v: 0 <= v < 1, "must be in [0, 1)"))
    scheduler: str = param(RECIPE, "learning-rate schedule over the epochs after the warmup: cosine to 0, a tenth "
                                   "every third of them (step), linear to 0 at the end, or onecycle (per step: up "
                                   "from lr/25 over 30 % of the steps, then down to lr/25e4; its own warmup)",
                           choices=SCHEDULERS,
                           resume=True, search=True)
    warmup_epochs: int = param(0, "epochs whose lr rises linearly from lr/100 to lr before the schedule, as "
                                  "torchvision's --lr-warmup-epochs", resume=True, search=True)
    epochs: int = param(3, "training epochs", resume=True, search=True, valid=at_least(1))
    time_budget: float = param(0.0, "minutes the training may take (0 = off): the first epoch measures (the first "
                                    "that trains every layer, after freeze_epochs), then the epochs are set so that "
                                    "training, validation and checkpoints fit, again after "
                                    "every epoch (epochs is ignored; metric epochs_planned, param epochs_resolved) "
                                    "and the lr falls linearly to 0 when the last one ends (budgeted training)",
                                resume=True, valid=within(lambda v: v >= 0, "is in minutes, >= 0 (0 = off)"))
    ema: float = param(RECIPE, "decay of an exponential moving average of the weights, updated after every optimizer "
                            "step, as torchvision's --model-ema-decay (0 = off; e.g. 0.99): validation, the logged "
                            "checkpoints and so the champion are the averaged weights", resume=True, search=True,
                            valid=within(lambda v: 0 <= v < 1, "is a decay in [0, 1) (0 = off)"))
    early_stop: int = param(0, "patience in epochs: training stops once select_metric's best epoch (the rule select "
                               "uses) is this many epochs behind, and logs stopped_epoch; 0 = off", resume=True,
                               valid=at_least(0, " (0 = off)"))
    batch_size: int = param(RECIPE, "images per optimizer step of each process (under torchrun a step sees nproc "
                                    "times as many)", resume=True, search=True,
                            valid=at_least(2, " (BatchNorm cannot train on one image)"))
    image_size: int = param(RECIPE, "pixels per side; 0 = native (64 synthetic, 150 folder data)", resume=True,
                            search=True, valid=within(lambda v: v == 0 or v >= 32, "must be 0 (native) or >= 32"))
    seed: int = param(42, "seeds the split, the initialisation, the batch order and the augmentation", resume=True,
                      valid=within(lambda v: 0 <= v < 2**32, "must be in 0 .. 2**32 - 1 (4294967295)"))
    split_seed: int = param(-1, "seeds the test split and limit_per_class instead of seed (-1: seed); the repeats of "
                                "a study share it, so they are tested on the same images", resume=True,
                                valid=within(lambda v: -1 <= v < 2**32, "must be -1 (the seed) or in 0 .. 2**32 - 1"))
    val_fraction: float = param(0.15, "share of each class held out for validation", resume=True)
    test_fraction: float = param(0.15, "share held out for test (unused when the data bring seg_test)", resume=True)
    limit_per_class: int = param(0, "a seeded subset of at most this many images per class and pool; 0 = all",
                                 resume=True, valid=at_least(0))
    freeze_backbone: bool = param(False, "train the classifier head only (features computed once)", resume=True,
                                  search=True)
    backbone_lr_scale: float = param(RECIPE, "the lr of every layer but the head, as a share of lr (discriminative "
                                             "lrs, as fastai's fine_tune and timm's --layer-decay): a pretrained body "
                                             "moves less than its new head", resume=True, search=True,
                                     valid=within(lambda v: 0 < v <= 1, "must be in (0, 1]"))
    freeze_epochs: int = param(RECIPE, "epochs that train the head alone before every layer trains (fastai's "
                                       "freeze_epochs, Lightning's BackboneFinetuning)", resume=True, search=True,
                               valid=at_least(0))
    random_crop: bool = param(RECIPE, "random-resized crops on top of flips", resume=True, search=True)
    train_crop_size: int = param(RECIPE, "pixels per side of the random-resized crops, as torchvision's "
                                         "--train-crop-size (0 = image_size); validation, test and serving stay at "
                                         "image_size", resume=True, search=True)
    auto_augment: str = param(RECIPE, "an automatic augmentation policy on each training image, as torchvision's "
                                      "--auto-augment: trivial (TrivialAugmentWide) or randaugment (RandAugment)",
                              choices=AUTO_AUGMENT, resume=True, search=True)
    random_erase: float = param(RECIPE, "probability per training image of erasing a random box (2-33 % of the "
                                     "area) to mid-grey, as torchvision's --random-erase", resume=True, search=True,
                                     valid=within(lambda v: 0 <= v <= 1, "is a probability in [0, 1]"))
    mixup_alpha: float = param(RECIPE, "MixUp of each training batch with lambda ~ Beta(alpha, alpha), as "
                                       "torchvision's --mixup-alpha (0 = off; with cutmix_alpha, each batch draws one "
                                       "of the two)",
                               resume=True, search=True, valid=at_least(0, " (0 = off)"))
    cutmix_alpha: float = param(RECIPE, "CutMix of each training batch with lambda ~ Beta(alpha, alpha), as "
                                     "torchvision's --cutmix-alpha (0 = off)", resume=True, search=True,
                                     valid=at_least(0, " (0 = off)"))
    device: str = _device()
    num_workers: str = param("auto", "image-decode threads: auto (CPU cores, at most 8) or a number",
                             valid=within(lambda v: v == "auto" or (str(v).isdigit() and int(v) >= 1),
                                          "must be 'auto' or a positive integer"))
    select_metric: str = _select_metric()
    keep_checkpoints: str = param("best", "checkpoints a finished run keeps", choices=KEEP_CHECKPOINTS)
    precision: str = param("auto", "training arithmetic (auto: bf16 on CUDA, and on AMX CPUs for networks "
                           "without depthwise convolutions; else fp16 on CUDA, fp32 on the CPU); fp16 needs CUDA",
                           choices=PRECISIONS)
    compile: bool = param(False, "torch.compile the model for training")
    dedupe: str = param("none", "cross_split: drop val/test copies of training images", choices=DEDUPE, resume=True)
    dup_distance: int = param(6, "near duplicates: perceptual hashes at most this many bits apart", resume=True,
                              valid=within(lambda v: 0 <= v <= 64, "must be in 0..64 (bits of a 64-bit pHash)"))
    resume: str = param("", "run id of an interrupted training run to continue", logged=False)
    nproc: int = param(1, "processes under torchrun (one per GPU; gloo on CPU); 1 = no torchrun", logged=False,
                       valid=at_least(1))
    dist_timeout: int = param(1800, "seconds a torchrun rank waits for the others (rank 0 decodes, validates and "
                                    "logs meanwhile) before it stops with an error", valid=at_least(1, " second"))
    quiet: bool = param(False, "no progress bars or per-epoch lines", logged=False)

    def __post_init__(self) -> None:
        """Built resolved and checked: the recipe's value for each recipe parameter not given (still ``RECIPE``),
        then every value checked (one line naming the valid choices on the first bad one)."""
        preset = RECIPES.get(self.recipe, RECIPES["classic"])  # _check refuses an unknown recipe
        for name in RECIPE_PARAMS:
            if getattr(self, name) == RECIPE:
                object.__setattr__(self, name, preset[name])
        self._check()

    def _check(self) -> None:
        check_declared(self)
        if self.precision == "fp16" and self.device == "cpu":
            raise SceneMLError(FP16_NEEDS_CUDA)  # before any work; device=auto on a CPU is refused where it resolves
        if self.time_budget > 0 and (self.scheduler not in ("none", "linear") or self.warmup_epochs):
            raise SceneMLError("time_budget shapes the lr schedule itself (linear to 0 when the budget ends): leave "
                               "scheduler none or linear and warmup_epochs=0")
        if self.scheduler == "onecycle" and self.warmup_epochs:
            raise SceneMLError(ONECYCLE_WARMS_UP)
        if not 0 <= self.warmup_epochs < max(self.epochs, 1):
            raise SceneMLError(f"warmup_epochs must be in 0 .. epochs - 1 ({self.epochs - 1}), "
                               f"got {self.warmup_epochs}")
        if self.freeze_backbone and self.freeze_epochs:
            raise SceneMLError("freeze_backbone=true trains the head alone for every epoch: leave freeze_epochs=0")
        if self.freeze_backbone and not self.random_crop and (self.random_erase or self.mixup_alpha or
                                                              self.cutmix_alpha or self.auto_augment != "none"):
            raise SceneMLError("auto_augment, random_erase, mixup_alpha and cutmix_alpha act on images, which "
                               "freeze_backbone replaces by cached features; add random_crop=true to train on images")
        if self.train_crop_size and (self.train_crop_size < 32 or not self.random_crop):
            raise SceneMLError(f"train_crop_size is the side of the random-resized crops: >= 32 with random_crop=true "
                               f"(0 = image_size), got {self.train_crop_size} with random_crop={self.random_crop}")
        check_device_name(self.device)

    def decode_workers(self) -> int:
        return min(os.cpu_count() or 1, 8) if self.num_workers == "auto" else int(self.num_workers)

    def as_params(self) -> dict[str, object]:
        """What a run logs as params: everything that defines the run (not how it was launched)."""
        return {p.name: getattr(self, p.name) for p in params_of(TrainConfig) if p.logged}


# what a resume must keep and what a `tune` space may vary: read from the declarations above
RESUME_MUST_MATCH = tuple(p.name for p in params_of(TrainConfig) if p.resume)
SEARCHABLE = tuple(p.name for p in params_of(TrainConfig) if p.search)
RECIPE_PARAMS = tuple(p.name for p in params_of(TrainConfig) if p.default == RECIPE)  # what a recipe sets


# ----------------------------------------------------------------------- evaluate, predict ...

@dataclass(frozen=True)
class EvaluateConfig:
    """`evaluate`: score a model on a split its training run recorded."""

    model_uri: str = _model_uri()
    data: str = _data("")
    split: str = param("test", "which split of the training run's manifest", choices=SPLITS)
    device: str = _device()
    quiet: bool = False
    tta: bool = _tta()

    def __post_init__(self) -> None:
        check_declared(self)
        check_device_name(self.device)


@dataclass(frozen=True)
class PredictConfig:
    """`predict`: class and probabilities of each image of a file or folder, as CSV."""

    model_uri: str = _model_uri()
    input: str = param(REQUIRED, "an image file or a folder of images")
    output: str = param("predictions.csv", "CSV path (relative paths: to the current folder)")
    device: str = _device()
    quiet: bool = False
    tta: bool = _tta()

    def __post_init__(self) -> None:
        check_device_name(self.device)


@dataclass(frozen=True)
class SelectConfig:
    """`select`: register the best epoch checkpoint of a study's runs and point an alias at it."""

    experiment: str = param("", "MLflow experiment of the runs to compare; none = parent_run_id's, else the launch's",
                            none_is_empty=True)
    parent_run_id: str = param("", "only the children of this study run")
    select_metric: str = _select_metric()
    model_name: str = _model_name()
    alias: str = param("champion", "the alias moved to the new champion")

    def __post_init__(self) -> None:
        check_declared(self)
        check_model_name(self.model_name)


@dataclass(frozen=True)
class ReportConfig:
    """`report`: rebuild the HTML and Markdown write-up of a study run."""

    study_run_id: str = param(REQUIRED, "the parent run that `main` or `tune` created")


@dataclass(frozen=True)
class AnalyzeConfig:
    """`analyze`: galleries, activation statistics and eigen-spectra of one model."""

    model_uri: str = _model_uri()
    data: str = _data("")
    split: str = param("test", "which split of the training run's manifest", choices=SPLITS)
    classes: str = param("", "comma list of classes for the galleries; none = all")
    k: int = param(10, "images per gallery", valid=at_least(1))
    modules: str = param("", "comma list of module names; none = five spread over the depth of the network")
    n_images: int = _n_images()
    compare: str = _compare()
    top_eigen: int = param(15, "eigenvalues shown per spectrum", valid=at_least(1))
    device: str = _device()
    batch_size: int = 64
    seed: int = 0
    quiet: bool = False

    def __post_init__(self) -> None:
        check_declared(self)
        if self.batch_size < 1:
            raise SceneMLError(f"batch_size must be >= 1, got {self.batch_size}")
        check_device_name(self.device)
        parse_compare(self.compare)


# --------------------------------------------------------------------------- main and tune

@dataclass(frozen=True)
class Child:
    """One training run of a study: repeat ``repeat`` of configuration ``config``."""

    name: str  # the run name: ``<optimizer>-lr<lr>``, with ``-r<repeat>`` when the study repeats
    config: str  # ``<optimizer>-lr<lr>``, tagged ``sceneml.config`` on the run
    repeat: int
    train: TrainConfig


@dataclass(frozen=True)
class StudyConfig:
    """`main`: one training run per optimizer x learning rate, then select, evaluate and analyze."""

    optimizers: str = param("adamw,rmsprop,sgd", "comma list of optimizers, one child each")
    lrs: str = param("0.001", "comma list of learning rates, crossed with the optimizers")
    model_name: str = _model_name()
    experiment: str = _experiment()
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    analyze: AnalyzeConfig = dataclasses.field(default_factory=AnalyzeConfig)
    repeats: int = param(1, "trainings per optimizer x lr; repeat r uses seed + r for the initialisation, the "
                            "batch order, the augmentation and the train/val division (the test split stays), "
                            "the same in every configuration, so repeats are paired and the study says whether "
                            "its best configuration is really better", valid=at_least(1))
    # with neither, the study runs in this process alone; with either, any number of workers started
    # with the same command share its grid
    study_name: str = _study_name("main", alone=" (with storage given; with neither, this process runs alone)")
    storage: str = _storage(alone=" (with study_name given; with neither, this process runs alone)")

    def children(self) -> list[Child]:
        """Every child's config, each validated before the first one trains. A configuration named
        twice (``lrs=0.001,1e-3``) would train two children of one name: refused."""
        optimizers, lrs = parse_list(self.optimizers), parse_list(self.lrs, float)
        for what, values, given in (("optimizers", optimizers, self.optimizers), ("lrs", lrs, self.lrs)):
            twice = sorted({f"{v:g}" if isinstance(v, float) else v for v in values if values.count(v) > 1})
            if twice:
                raise SceneMLError(f"{what}={given!r} names {', '.join(twice)} twice; give each value once")
        split_seed = self.train.split_seed if self.train.split_seed >= 0 else self.train.seed
        out = []
        for r in range(self.repeats):
            for o in optimizers:
                for lr in lrs:
                    config = f"{o}-lr{lr:g}"
                    train = dataclasses.replace(self.train, optimizer=o, lr=lr, seed=self.train.seed + r,
                                                split_seed=split_seed if self.repeats > 1 else self.train.split_seed)
                    out.append(Child(config if self.repeats == 1 else f"{config}-r{r}", config, r, train))
        return out

    def name(self) -> str:
        return _search_name("main", self.study_name, self.train)

    @property
    def shared(self) -> bool:
        return bool(self.study_name or self.storage)

    def __post_init__(self) -> None:
        check_declared(self)
        self.children()
        check_model_name(self.model_name)


@dataclass(frozen=True)
class TuneConfig:
    """`tune`: an Optuna search over `train` parameters, trials shared by any number of workers."""

    n_trials: int = param(20, "trials over all workers of the search", valid=at_least(1))
    space: str = param("", "YAML/JSON search space file; none = the default space (docs/search.md)")
    pruner: str = param("median", "stops trials that fall behind, per epoch", choices=PRUNERS)
    storage: str = _storage()
    study_name: str = _study_name("tune")
    model_name: str = _model_name()
    experiment: str = _experiment()
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    analyze: AnalyzeConfig = dataclasses.field(default_factory=AnalyzeConfig)

    def __post_init__(self) -> None:
        check_declared(self)
        check_model_name(self.model_name)

    def name(self) -> str:
        return _search_name("tune", self.study_name, self.train)


# ------------------------------------------------------------------------------ entry points

@dataclass(frozen=True)
class EntryPoint:
    """An MLflow entry point and the ``python -m sceneml`` subcommand of the same name."""

    name: str
    config: type  # what the task takes, built from the parameters (sceneml.params.build)
    params: tuple[Param, ...]
    task: str  # "module:function" of the task, imported only once the options are parsed
    script: str  # the script MLproject calls, in entrypoints/
    doc: str


# how one training run is launched (a search or a sweep launches its own), and what a sweep sets per child
_LAUNCH_ONLY = ("resume", "nproc", "dist_timeout")
_RUN_ONLY = ("optimizer", "lr", *_LAUNCH_ONLY)
# the analyze parameters main and tune take for their champion's analysis: all but where the model and
# data come from (the study's own) and how it runs
STUDY_ANALYSIS = ("classes", "k", "modules", "n_images", "compare", "top_eigen")


def _entry(name: str, config: type, params: list[Param], task: str, script: str = "") -> EntryPoint:
    doc = (config.__doc__ or "").strip().removeprefix(f"`{name}`: ")
    return EntryPoint(name, config, tuple(params), task, script or f"{name}.py", doc[:1].upper() + doc[1:])


ENTRY_POINTS: dict[str, EntryPoint] = {e.name: e for e in (
    _entry("train", TrainConfig, params_of(TrainConfig), "sceneml.tasks.train:train"),
    _entry("main", StudyConfig, params_of(StudyConfig) + params_of(AnalyzeConfig, only=STUDY_ANALYSIS)
           + params_of(TrainConfig, exclude=_RUN_ONLY), "sceneml.tasks.study:study"),
    _entry("tune", TuneConfig, params_of(TuneConfig) + params_of(AnalyzeConfig, only=STUDY_ANALYSIS)
           + params_of(TrainConfig, exclude=_LAUNCH_ONLY), "sceneml.tasks.tune:tune"),
    _entry("select", SelectConfig, params_of(SelectConfig), "sceneml.tasks.select:select", "select_champion.py"),
    _entry("evaluate", EvaluateConfig, params_of(EvaluateConfig), "sceneml.tasks.evaluate:evaluate"),
    _entry("predict", PredictConfig, params_of(PredictConfig), "sceneml.tasks.predict:predict"),
    _entry("analyze", AnalyzeConfig, params_of(AnalyzeConfig), "sceneml.tasks.analyze:analyze"),
    _entry("report", ReportConfig, params_of(ReportConfig), "sceneml.tasks.report:report"),
)}
# `train` under torchrun: the same parameters, two processes by default (MLproject only)
TRAIN_DDP_DEFAULTS = {"nproc": 2}


# --------------------------------------------------------------------------------- parsing

def parse_list(text: str, kind=str) -> list:
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    if not items:
        raise SceneMLError(f"empty list: {text!r}")
    try:
        return [kind(t) for t in items]
    except ValueError:
        raise SceneMLError(f"cannot read {text!r} as a comma-separated list of {kind.__name__}") from None


def parse_compare(text: str) -> dict[str, str]:
    """``name=path,name2=path2`` -> {name: path}; names become metric keys, so they are kept simple."""
    out: dict[str, str] = {}
    for item in (t.strip() for t in text.split(",") if t.strip()):
        name, sep, path = item.partition("=")
        name, path = name.strip(), path.strip()
        if not sep or not name or not path:
            raise SceneMLError(f"compare: expected name=path, got {item!r}")
        if not re.fullmatch(r"[A-Za-z0-9_-]+", name):
            raise SceneMLError(f"compare: name {name!r} may only use letters, digits, _ and -")
        if name in out:
            raise SceneMLError(f"compare: name {name!r} given twice")
        out[name] = path
    return out
