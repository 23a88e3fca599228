"""A logged checkpoint is an ordinary PyTorch model: loaded in a fresh process with MLflow's default
settings it is the eager torchvision module, with eval(), forward hooks on named modules, any batch
and any image size, and the logits of the network that was logged."""

from __future__ import annotations

import json
import subprocess
import sys

import mlflow
import numpy as np
import pytest
import torch

from sceneml.models import build_model
from sceneml.tracking.models import log_checkpoint

from .conftest import REPO, subprocess_env

SIZES = (32, 100, 150, 320)

LOAD_SCRIPT = """
import json, sys, torch, mlflow, torchvision
sizes = json.loads(sys.argv[2])
for uri, module, arch_class in json.loads(sys.argv[1]):
    m = mlflow.pytorch.load_model(uri)
    m.eval()
    m.train()
    m.eval()
    calls = []
    m.get_submodule(module).register_forward_hook(lambda mod, inp, out: calls.append(tuple(out.shape)))
    out = {"class": type(m).__name__, "is_torchvision": isinstance(m, getattr(torchvision.models, arch_class))}
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for size in sizes:
            x = torch.rand(3, 3, size, size, generator=g)
            out[str(size)] = m(x).tolist()
    out["one"] = list(m(torch.rand(1, 3, 100, 100)).shape)
    out["five"] = list(m(torch.rand(5, 3, 150, 150)).shape)
    out["hook_calls"] = len(calls)
    print(json.dumps(out))
"""


CASES = [("resnet18", "layer4.1.conv1", "ResNet"), ("googlenet", "inception4c.branch4.1.bn", "GoogLeNet")]


@pytest.mark.slow
def test_logged_checkpoints_load_as_the_eager_torchvision_modules(tracking_uri):
    """Both architectures' checkpoints, loaded by one fresh interpreter."""
    models, cases = [], []
    for arch, module, arch_class in CASES:
        torch.manual_seed(0)
        model, _ = build_model(arch, 6, "none")
        model.train()  # logging must not depend on the mode the trainer left the model in
        with mlflow.start_run():
            model_id = log_checkpoint(model, name=f"{arch}-e1", step=1, params={}, tags={},
                                      metadata={"sceneml": {"classes": [str(i) for i in range(6)], "image_size": 64,
                                                            "arch": arch}})
        models.append(model)
        cases.append((f"models:/{model_id}", module, arch_class))
    env = {k: v for k, v in subprocess_env().items() if k != "MLFLOW_ALLOW_PICKLE_DESERIALIZATION"}
    proc = subprocess.run([sys.executable, "-c", LOAD_SCRIPT, json.dumps(cases), json.dumps(SIZES)],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()[-len(CASES):]
    for model, (_, _, arch_class), line in zip(models, CASES, lines):
        loaded = json.loads(line)
        assert loaded["is_torchvision"] and loaded["class"] == arch_class
        assert loaded["hook_calls"] == len(SIZES) + 2  # once per forward
        assert loaded["one"] == [1, 6] and loaded["five"] == [5, 6]
        model.eval()
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for size in SIZES:
                expected = model(torch.rand(3, 3, size, size, generator=g)).numpy()
                np.testing.assert_allclose(np.array(loaded[str(size)]), expected, rtol=0, atol=1e-5)


def test_the_resumable_checkpoint_restores_the_fp16_loss_scale(tmp_path):
    """A scale shrunk by overflows during the run comes back on resume, not the initial 65536."""
    from sceneml.engine.checkpoint import load_checkpoint, restore_checkpoint, save_checkpoint

    def fresh():
        model = torch.nn.Linear(3, 2)
        return model, torch.optim.SGD(model.parameters(), lr=0.1), torch.amp.GradScaler("cpu")

    model, optimizer, scaler = fresh()
    scaler.scale(torch.tensor(1.0))  # the scale exists once used
    scaler.update(new_scale=512.0)
    save_checkpoint(tmp_path / "last.pt", model, optimizer, None, 3, {}, scaler)
    model2, optimizer2, scaler2 = fresh()
    assert scaler2.get_scale() != 512.0
    epoch = restore_checkpoint(load_checkpoint(tmp_path / "last.pt"), model2, optimizer2, None, scaler2)
    assert epoch == 3 and scaler2.get_scale() == 512.0
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
