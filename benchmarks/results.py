"""Where the benchmarks' figures live: one CSV per script in benchmarks/results/, a row per measured
thing, and on every row the date, the machine, its pace (a ResNet18 training step, benchmarks/pace.py,
measured in the same run; empty on rows measured before the probe existed) and the command that made
it. benchmarks/README.md is rendered from these files (`python benchmarks/render.py`); a script appends
its rows and never rewrites another run's."""

from __future__ import annotations

import csv
import os
import shlex
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
COMMON = ("date", "machine", "pace", "command")


def machine() -> str:
    """How the rows name the machine: cores, CPU model, and AMX when it has it (bf16 training runs on it,
    about twice as fast as fp32)."""
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")),
                 "CPU")
    return f"{os.cpu_count()}-core {model}" + (" with AMX" if " amx_bf16" in cpuinfo else "")


def command() -> str:
    """This process's command line, as a user would type it from the project folder."""
    script = Path(sys.argv[0]).resolve()
    here = script.relative_to(RESULTS.parents[1]) if RESULTS.parents[1] in script.parents else script
    return shlex.join(["python", str(here), *sys.argv[1:]])


def read(name: str) -> list[dict]:
    path = RESULTS / f"{name}.csv"
    if not path.exists():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def record(name: str, rows: list[dict], pace: float | None = None) -> Path:
    """Append ``rows`` to ``results/<name>.csv`` with today's date, this machine, the pace (measured now
    unless given) and this command. A field new to the file widens every earlier row with an empty value."""
    if pace is None:
        from pace import pace as measure

        pace = measure(seconds=5.0)
    stamp = {"date": time.strftime("%Y-%m-%d"), "machine": machine(), "pace": f"{pace:.0f}", "command": command()}
    old = read(name)
    fields = list(COMMON)
    for row in [*old, *rows]:
        fields += [k for k in row if k not in fields]
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.csv"
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fields, restval="", lineterminator="\n")
        writer.writeheader()
        writer.writerows([*old, *({**stamp, **row} for row in rows)])
    os.replace(tmp, path)  # the file holds every earlier run's rows: a crash mid-write must not cut it short
    print(f"{len(rows)} row(s) added to {path} (pace {pace:.0f} img/s)")
    return path
