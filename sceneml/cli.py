"""One command line: ``python -m sceneml <task>`` (and the ``sceneml`` script), a click group whose
subcommands are the MLflow entry points, their options read from the declarations in
:mod:`sceneml.config`. Also what every task shares when run from a shell: logging that reaches the
console, and one-line errors instead of tracebacks.

Torch-free: a task's module is imported only once its options are parsed, so ``--help`` and a bad
value answer at once.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import gc
import importlib
import logging
import os
import signal
import subprocess
import sys
import warnings
from collections.abc import Callable, Sequence

import click

from sceneml.config import ENTRY_POINTS, RECIPE, EntryPoint, recipe_default
from sceneml.errors import SceneMLError, StoreUnreachable
from sceneml.params import Param, build

_CLICK_TYPES = {str: str, int: int, float: float, bool: click.BOOL}


def none_is_empty(_ctx, _param, value):
    """MLproject writes "nothing" as ``none`` (an empty default would be logged as the literal '')."""
    if isinstance(value, str) and value.strip().lower() == "none":
        return ""
    return value


class RecipeOr(click.ParamType):
    """A recipe parameter's value: ``recipe`` (the recipe's value, filled in by the config) or one of
    ``kind``."""

    def __init__(self, kind: click.ParamType) -> None:
        self.kind, self.name = kind, f"{kind.name}|recipe"

    def convert(self, value, param, ctx):
        return value if value == RECIPE else self.kind.convert(value, param, ctx)


def option(p: Param) -> Callable:
    """The click option of a declared parameter: its default shown as MLproject spells it, its choices
    in the help. The values are checked when the config is built, the same check an in-process
    call gets, so a bad value reads the same wherever it comes from."""
    if p.required:
        return click.option(p.option, p.name, required=True, type=_CLICK_TYPES[p.type], help=p.help)
    more = f", or {p.valid[1]}" if p.choices and p.valid is not None else ""
    help_text = p.help + (f" (one of: {', '.join(p.choices)}{more})" if p.choices else "")
    # the default as MLproject spells it (none, true/false): click converts it through the type. A
    # boolean takes a value (MLproject passes `--quiet false`) or stands alone as a flag (`--quiet`).
    flag = {"is_flag": False, "flag_value": "true"} if p.type is bool else {}
    kind, names = click.types.convert_type(_CLICK_TYPES[p.type]), [p.option]
    if p.default == RECIPE:
        # MLproject leaves recipe parameters out of its list (sceneml.mlproject), so `mlflow run` passes
        # one only when it is given, spelt as -P wrote it: `--label_smoothing 0.1`
        kind, help_text = RecipeOr(kind), f"{help_text} [{recipe_default(p.name)}]"
        names += [f"--{p.name}"] if "_" in p.name else []
    return click.option(*names, p.name, type=kind, default=p.text(), show_default=True,
                        help=help_text, callback=none_is_empty if p.none_is_empty else None, **flag)


def command(entry: EntryPoint) -> click.Command:
    def run(**values) -> None:
        run_task(entry, values)

    for p in reversed(entry.params):
        run = option(p)(run)
    return click.command(name=entry.name, help=entry.doc, short_help=entry.doc)(run)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """sceneml: train, compare and inspect scene classifiers, tracked in MLflow.

    Each command is the MLflow entry point of the same name (`mlflow run . -e <command>`); the store
    is MLFLOW_TRACKING_URI, by default sqlite:///mlflow.db in the current folder."""


for _entry in ENTRY_POINTS.values():
    cli.add_command(command(_entry))


def main(args: Sequence[str] | None = None) -> None:
    """``python -m sceneml``: click's own usage errors are one line too, like sceneml's."""
    try:
        cli.main(args=list(args) if args is not None else None, prog_name="sceneml", standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.exceptions.NoArgsIsHelpError as exc:  # a bare group or command prints its help
        click.echo(exc.ctx.get_help() if exc.ctx else "", err=False)
        sys.exit(0)
    except click.ClickException as exc:
        print(f"error: {exc.format_message()}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        sys.exit(130)


def entry_point(name: str) -> None:
    """What ``entrypoints/<name>.py`` (the scripts MLproject calls) run."""
    main([name, *sys.argv[1:]])


def run_task(entry: EntryPoint, values: dict) -> None:
    """The one wrapper of every task: build and check its config, import the task, run it, and turn
    user errors and signals into one line and an exit status (:func:`user_errors_as_one_line`)."""
    user_errors_as_one_line(_run_task)(entry, values)


def _run_task(entry: EntryPoint, values: dict) -> None:
    cfg = build(entry.config, values, entry.params)
    if entry.name == "train" and cfg.nproc > 1 and "LOCAL_RANK" not in os.environ:
        sys.exit(torchrun(entry, values, cfg.nproc))
    setup_logging(bool(values.get("quiet", False)))
    module, _, function = entry.task.partition(":")
    result = getattr(import_for_good(module), function)(cfg)  # torch and mlflow load only now
    print_summary(entry.name, result)


def import_for_good(module: str):
    """Import ``module`` for the rest of the process, inside :func:`frozen_imports`."""
    with frozen_imports():
        return importlib.import_module(module)


@contextlib.contextmanager
def frozen_imports():
    """Imports made for the rest of the process, outside the cyclic garbage collector's view.

    Importing torch, torchvision and MLflow makes about 600,000 objects that live as long as the process.
    The collector would walk them at every full collection, during the imports and again while the task
    runs (benchmarks/startup.py measures what that costs a short run). The imports run with the collector
    off; one collection then frees what they left, and ``gc.freeze`` moves the survivors out of its sight
    (they stay alive, as they would have)."""
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
    gc.collect()
    gc.freeze()


def torchrun(entry: EntryPoint, values: dict, nproc: int) -> int:
    """``train`` again under ``torchrun --standalone`` with ``nproc`` processes, same parameters."""
    # every parameter but nproc (torchrun's argparse would read --nproc as its own --nproc-per-node)
    args = [f"{p.option}={p.text(values[p.name])}" for p in entry.params if p.name != "nproc"]
    return subprocess.call([sys.executable, "-m", "torch.distributed.run", "--standalone",
                            f"--nproc_per_node={nproc}", "-m", "sceneml", entry.name, *args])


_HEADLINE = ("acc", "mAP", "mean_class_acc", "ece", "loss")


def print_summary(task: str, result: object) -> None:
    """What a task prints last, for a person and for scripts that read it."""
    if task == "train" and result:  # "" on the other ranks of a torchrun launch
        print(f"run {result} finished")
    elif task == "evaluate":
        split = next(k for k in result if k.endswith("_mAP")).removesuffix("_mAP")
        print("  ".join(f"{split}_{k} = {result[f'{split}_{k}']:.4f}" for k in _HEADLINE), flush=True)
    elif task == "analyze":
        for key, value in sorted(result.items()):
            print(f"{key} = {value:.4f}")
    elif task == "report":
        print(f"report: {result['html']}\nmarkdown: {result['markdown']}")


def setup_logging(quiet: bool = False) -> None:
    """sceneml's records go to stderr through a handler of its own, whatever the root logger says:
    importing ``mlflow.pytorch`` calls ``logging.basicConfig(level=ERROR)``, which would otherwise
    swallow every warning (e.g. "training from RANDOM initialisation")."""
    logger = logging.getLogger("sceneml")
    logger.handlers.clear()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING if quiet else logging.INFO)
    logger.propagate = False
    # MLflow's own chatter (pickle advice, pip inference) would bury the training output
    for name in ("mlflow.pytorch", "mlflow.models.model", "mlflow.utils.requirements_utils", "mlflow.tracking.fluent"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=UserWarning, module="mlflow")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


class Terminated(KeyboardInterrupt):
    """SIGTERM (``docker stop``, Slurm, Kubernetes, ``mlflow run`` cancelling): handled as Ctrl-C is."""


def stop_on_signals() -> None:
    """SIGTERM and SIGINT raise (Terminated / KeyboardInterrupt) in the main thread, so the task's run
    ends KILLED with its last finished epoch's checkpoint kept. Once stopping, further signals are
    ignored: ``mlflow run`` answers the Ctrl-C it got too by sending SIGTERM here, and dying of that
    before the run is marked would leave MLflow to mark it FAILED."""
    stopping = []
    owner = os.getpid()

    def handler(signum, _frame):
        if os.getpid() != owner:  # a forked worker (e.g. a multiprocessing pool) dies as it would have
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        if stopping:
            return
        stopping.append(signum)
        if signum == signal.SIGTERM:
            raise Terminated("SIGTERM")
        raise KeyboardInterrupt

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, handler)


def user_errors_as_one_line(fn: Callable) -> Callable:
    """Print a SceneMLError as ``error: <message>`` and exit 2 (the error also tagged on the run
    ``mlflow run`` created, when the task had not taken it over yet); Ctrl-C and SIGTERM say how to
    resume and exit 130 and 143; anything else keeps its traceback (a bug, not a user error)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        stop_on_signals()
        try:
            return fn(*args, **kwargs)
        except SceneMLError as exc:
            print(f"error: {exc}", file=sys.stderr)
            if not isinstance(exc, StoreUnreachable):
                _tag_launch(str(exc))
            sys.exit(2)
        except OSError as exc:
            if exc.errno not in _DISK_ERRORS:
                raise
            # a full disk or quota, a file too large, a read-only place: the user's to fix, in one line
            message = f"{exc.filename or 'a file'}: {exc.strerror}; free space there or point SCENEML_CACHE " \
                      "(and the MLflow store) at another disk"
            print(f"error: {message}", file=sys.stderr)
            _tag_launch(message)
            sys.exit(2)
        except KeyboardInterrupt as exc:
            what = "terminated (SIGTERM)" if isinstance(exc, Terminated) else "interrupted"
            print(f"{what}: the run is marked KILLED; continue it with resume=<run_id>", file=sys.stderr)
            sys.exit(143 if isinstance(exc, Terminated) else 130)

    return wrapper


_DISK_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}


def _tag_launch(error: str) -> None:
    """An error before the task adopted ``mlflow run``'s run: say why on that run (MLflow marks it FAILED)."""
    run_id = os.environ.get("MLFLOW_RUN_ID")
    if not run_id:
        return
    try:
        from sceneml.tracking.runs import TAG_ERROR, set_tags

        set_tags(run_id, {TAG_ERROR: error[:5000]})
    except Exception:  # the store itself may be what failed
        pass
