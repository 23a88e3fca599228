"""Screenshots of the MLflow UI on a study with repeats: the runs table and the charts grouped by the
tag ``sceneml.config``, as docs/study.md shows them.

    pip install playwright        # the Python package only: it drives the Chromium installed here
    python tools/ui_screenshots.py --tracking-uri sqlite:///mlflow.db --experiment sceneml --out docs/img

Starts ``mlflow ui`` on the store (read only), opens the experiment in headless Chromium, chooses
"Group by: sceneml.config" and a few columns with the mouse, as a user would, and writes
``ui-runs-grouped.png`` and ``ui-charts-grouped.png``.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

COLUMNS_ON = ("val_mean_class_acc_best", "val_acc_best", "seed")
COLUMNS_OFF = ("Dataset", "Source")  # shown by default


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ui(uri: str, port: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", "127.0.0.1",
                             "--port", str(port), "--workers", "1"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return proc
        except OSError:
            time.sleep(1)
    os.killpg(proc.pid, signal.SIGTERM)
    raise SystemExit("mlflow ui did not answer within 120 s")


def screenshots(url: str, out: Path, chromium: str) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1600, "height": 760})
        page.goto(url, wait_until="load")
        page.get_by_role("button", name="Group by", exact=True).click()
        page.get_by_text("sceneml.config", exact=True).click()
        page.keyboard.press("Escape")
        page.get_by_role("button", name="Columns", exact=True).click()
        menu = page.locator("[role=dialog], [role=menu]").last
        for name in (*COLUMNS_ON, *COLUMNS_OFF):
            menu.get_by_text(name, exact=True).first.click()
        page.keyboard.press("Escape")
        close = page.get_by_role("button", name="Close")  # the assistant's side panel, when it is open
        if close.count():
            close.first.click()
        page.wait_for_timeout(1500)
        page.screenshot(path=str(out / "ui-runs-grouped.png"))
        page.locator("label:has(input[name=runs-view-mode][value=CHART])").click()
        page.get_by_placeholder("Search metric charts").fill("val_mean_class_acc")
        page.wait_for_timeout(4000)
        page.screenshot(path=str(out / "ui-charts-grouped.png"))
        browser.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tracking-uri", default="sqlite:///mlflow.db")
    parser.add_argument("--experiment", default="sceneml")
    parser.add_argument("--out", type=Path, default=Path("docs/img"))
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    args = parser.parse_args()
    import mlflow

    experiment = mlflow.MlflowClient(args.tracking_uri).get_experiment_by_name(args.experiment)
    if experiment is None:
        raise SystemExit(f"no experiment {args.experiment!r} in {args.tracking_uri}")
    args.out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    ui = start_ui(args.tracking_uri, port)
    try:
        screenshots(f"http://127.0.0.1:{port}/#/experiments/{experiment.experiment_id}/runs", args.out, args.chromium)
    finally:
        os.killpg(ui.pid, signal.SIGTERM)
    print(f"wrote {args.out / 'ui-runs-grouped.png'} and {args.out / 'ui-charts-grouped.png'}")


if __name__ == "__main__":
    main()
