"""benchmarks/README.md, rendered from README.md.j2 and the results files (benchmarks/results/*.csv):
every figure on the page is a row of those files, shown with its date, machine, pace and command.

    python benchmarks/render.py           # rewrite README.md
    python benchmarks/render.py --check   # exit 1 if README.md is not what the results render

A test checks the page against this rendering, as docs/parameters.md is checked against --help.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

import jinja2

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from results import read  # noqa: E402  (benchmarks/ is not a package)

PAGE = HERE / "README.md"
Column = tuple[str, Callable[[dict], object]]


def field(name: str) -> Callable[[dict], object]:
    return lambda row: row.get(name, "")


def number(name: str, digits: int) -> Callable[[dict], object]:
    """A field rounded to ``digits`` decimals for reading (the CSV keeps what was measured)."""
    return lambda row: f"{float(row[name]):.{digits}f}" if row.get(name) else ""


def ratio(top: str, bottom: str, digits: int = 2) -> Callable[[dict], object]:
    """``top / bottom`` of a row, blank where either is missing."""
    def value(row: dict) -> str:
        a, b = row.get(top) or "", row.get(bottom) or ""
        return f"{float(a) / float(b):.{digits}f}" if a and b else ""
    return value


def when(row: dict) -> str:
    return f"{row['date']}, {row['machine']}, pace {row['pace'] or '—'}"


def table(rows: Iterable[dict], columns: list[Column]) -> str:
    """A markdown table, a row per result; a cell with nothing to show reads "—"."""
    lines = ["| " + " | ".join(header for header, _ in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = (str(get(row)).replace("|", "\\|") or "—" for _, get in columns)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def across(rows: list[dict], lines: list[Column]) -> str:
    """A markdown table with a column per row and a line per field: a curve read left to right."""
    out = [f"| {title} | " + " | ".join(str(get(r)) for r in rows) + " |" for title, get in lines]
    return "\n".join([out[0], "|" + "---|" * (len(rows) + 1), *out[1:]])


def command(row: dict) -> str:
    return f"`{row['command']}`"


def throughput() -> dict[str, str]:
    rows = read("train_throughput")
    epochs = [r for r in rows if r["epoch"] not in ("run", "whole process")]
    runs = [r for r in rows if r["epoch"] == "run"]
    whole = [r for r in rows if r["epoch"] == "whole process"]
    return {
        "throughput_epochs": table(epochs, [
            ("measured", when), ("command", command), ("setting", field("setting")), ("epoch", field("epoch")),
            ("limit", field("limit")), ("sceneml", field("sceneml")), ("+val+ckpt", field("with_val_ckpt")),
            ("naive", field("naive")), ("sceneml / limit", ratio("sceneml", "limit")),
            ("sceneml / naive", ratio("sceneml", "naive"))]),
        "throughput_runs": table(runs, [
            ("measured", when), ("command", command), ("setting", field("setting")),
            ("sceneml s", field("sceneml_s")), ("+val+ckpt s", field("with_val_ckpt_s")), ("naive s", field("naive_s")),
            ("MLflow logging s", field("log_s")), ("naive / sceneml", ratio("naive_s", "sceneml_s")),
            ("naive / (+val+ckpt)", ratio("naive_s", "with_val_ckpt_s"))]),
        "throughput_whole": table(whole, [
            ("measured", when), ("command", command), ("pairs", field("pairs")),
            ("`mlflow run -e train` min / median s", lambda r: f"{r['sceneml_min_s']} / {r['sceneml_median_s']}"),
            ("naive process min / median s", lambda r: f"{r['naive_min_s']} / {r['naive_median_s']}"),
            ("speed, sceneml / naive (medians)", ratio("naive_median_s", "sceneml_median_s"))]),
    }


def time_to_accuracy() -> dict[str, str]:
    rows = read("time_to_accuracy")
    trained = sorted((r for r in rows if r["contender"] != "naive"),
                     key=lambda r: (r["machine"], r["contender"].split()[0], r["contender"], float(r["budget_min"])))
    out = {"tta_runs": table(trained, [
        ("measured", when), ("contender", lambda r: f"`{r['contender']}`"), ("`time_budget`", field("budget_min")),
        ("minutes", number("minutes", 2)), ("epochs", field("epochs")), ("train img/s", field("img_per_s")),
        ("test accuracy", number("test_acc", 3)), ("test mAP", number("test_mAP", 3)),
        ("with flip TTA: accuracy", number("test_acc_tta", 3)), ("mAP", number("test_mAP_tta", 3))])}
    curves = []
    for key in sorted({(r["machine"], r["date"], r["command"]) for r in rows if r["contender"] == "naive"}):
        mine = (r for r in rows if r["contender"] == "naive" and (r["machine"], r["date"], r["command"]) == key)
        curve = sorted(mine, key=lambda r: float(r["minutes"]))
        header = f"{key[1]}, {key[0]}, pace {curve[0]['pace'] or '—'}: `{key[2]}`\n\n"
        curves.append(header + across(curve, [("minutes", number("minutes", 1)), ("epochs", field("epochs")),
                                              ("test accuracy", number("test_acc", 3))]))
    out["tta_naive"] = "\n\n".join(curves)
    return out


def smaller() -> dict[str, str]:
    return {
        "official_test": table(read("official_test"), [
            ("measured", when), ("command", command), ("photos", field("photos")),
            ("byte-identical in intel-train", field("identical_in_train")),
            ("nearest pHash bits", field("nearest_phash_bits")), ("accuracy", number("acc", 3)),
            ("mAP", number("mAP", 3)),
            ("mAP 95 % interval", lambda r: f"{float(r['mAP_low']):.3f}-{float(r['mAP_high']):.3f}"),
            ("with flip TTA: accuracy", number("acc_tta", 3)), ("mAP", number("mAP_tta", 3))]),
        "score_sizes": table(read("score_sizes"), [
            ("measured", when), ("command", command), ("model", field("model")), ("size (px)", field("size")),
            ("test accuracy", field("test_acc")), ("with flip TTA", field("test_acc_tta"))]),
        "optimizer_step": table(read("optimizer_step"), [
            ("measured", when), ("command", command), ("optimizer", field("optimizer")), ("kernel", field("kind")),
            ("threads", field("threads")), ("min ms", field("min_ms")), ("median ms", field("median_ms"))]),
        "startup": table(read("startup"), [
            ("measured", when), ("command", command), ("model", field("arch")), ("imports", field("imports")),
            ("rounds", field("rounds")), ("wall min / median s", lambda r: f"{r['wall_min_s']} / {r['wall_median_s']}"),
            ("CPU min / median s", lambda r: f"{r['cpu_min_s']} / {r['cpu_median_s']}")]),
        "analyze_memory": table(read("analyze_memory"), [
            ("measured", when), ("command", command), ("n_images", field("n_images")),
            ("peak RSS MiB", field("peak_mib")), ("growth during the statistics MiB", field("growth_mib")),
            ("seconds", field("seconds"))]),
        "study_time": table(read("study_time"), [
            ("measured", when), ("command", command), ("row", field("row")), ("images", field("images")),
            ("wall s", field("wall_s")), ("per unit", field("per_unit")), ("peak RSS MiB", field("peak_mib")),
            ("note", field("note"))]),
        "precision": table(read("precision"), [
            ("measured", when), ("command", command), ("architecture", field("arch")),
            ("size (px)", field("image_size")), ("batch", field("batch_size")), ("threads", field("threads")),
            ("fp32 img/s", field("fp32_img_s")), ("bf16 img/s", field("bf16_img_s")),
            ("bf16 / fp32", field("bf16_over_fp32"))]),
        "pace": table(read("pace"), [
            ("measured", when), ("command", command), ("tests s", field("tests_s")),
            ("budget at this pace s", field("budget_s"))]),
    }


def render() -> str:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE), keep_trailing_newline=True,
                             undefined=jinja2.StrictUndefined, autoescape=False)
    return env.get_template("README.md.j2").render(**throughput(), **time_to_accuracy(), **smaller())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="compare instead of writing")
    args = ap.parse_args()
    page = render()
    if args.check:
        if PAGE.read_text() != page:
            sys.exit(f"{PAGE} is not what the results render: run python benchmarks/render.py")
        return
    PAGE.write_text(page)
    print(f"wrote {PAGE}")


if __name__ == "__main__":
    main()
