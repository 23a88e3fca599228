"""Models and weights: offline errors, state-dict files, GoogLeNet's aux heads, real ImageNet weights."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torchvision

from sceneml.config import ARCHS
from sceneml.engine.batches import Augmentation, iterate_batches, iterate_feature_batches
from sceneml.engine.loop import seed_everything, train_one_epoch
from sceneml.engine.optim import build_optimizer
from sceneml.errors import SceneMLError
from sceneml.models import (
    backbone_features,
    build_model,
    freeze_backbone,
    head_of,
    pick_device,
    split_logits,
)


def test_imagenet_offline_names_the_file_and_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch-home"))
    with pytest.raises(SceneMLError) as err:
        build_model("resnet18", 6, "imagenet")
    message = str(err.value)
    assert "resnet18-f37072fd.pth" in message
    assert str(tmp_path / "empty-torch-home" / "hub" / "checkpoints") in message
    assert "weights=none" in message


def test_auto_falls_back_to_random_init_and_says_so(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    _, resolved = build_model("resnet18", 6, "auto")
    assert resolved == "none"
    assert "RANDOM" in caplog.text


def test_state_dict_file_loads_backbone_and_replaces_head(tmp_path):
    source = torchvision.models.resnet18(num_classes=1000)
    torch.save(source.state_dict(), tmp_path / "r18.pth")
    model, resolved = build_model("resnet18", 6, str(tmp_path / "r18.pth"))
    assert resolved.startswith("file:")
    torch.testing.assert_close(model.layer3[0].conv1.weight, source.layer3[0].conv1.weight)
    assert model.fc.out_features == 6


def test_weights_of_another_arch_are_named_as_a_mismatch(tmp_path):
    torch.save(torchvision.models.resnet50().state_dict(), tmp_path / "r50.pth")
    with pytest.raises(SceneMLError, match="do not fit arch resnet18.*shape mismatch at"):
        build_model("resnet18", 6, str(tmp_path / "r50.pth"))


def test_unknown_arch_lists_the_choices():
    with pytest.raises(SceneMLError, match="choose one of resnet18, resnet34"):
        build_model("vgg16", 6, "none")


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
def test_every_listed_architecture_takes_a_training_step_on_six_classes(arch):
    """Built from the declared list, with a 6-class head; one SGD step moves the head, and eval mode
    gives plain (B, 6) logits (GoogLeNet's aux heads only train)."""
    seed_everything(0)
    model, resolved = build_model(arch, 6, "none")
    assert resolved == "none"
    head = list(head_of(arch, model).parameters())[-2]  # the main head's last weight matrix
    before = head.detach().clone()
    opt = build_optimizer("sgd", model.parameters(), 0.05, 0.9, 0.0)
    model.train()
    logits, _ = split_logits(model(torch.rand(4, 3, 64, 64)))
    loss = torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 2, 5]))
    loss.backward()
    opt.step()
    assert torch.isfinite(loss) and not torch.equal(before, head.detach())
    model.eval()
    with torch.no_grad():
        assert model(torch.rand(2, 3, 64, 64)).shape == (2, 6)


def test_googlenet_with_aux_heads_trains_one_epoch():
    seed_everything(0)
    model, _ = build_model("googlenet", 3, "none")
    model.train()
    x = torch.rand(4, 3, 64, 64)
    logits, aux = split_logits(model(x))
    assert logits.shape == (4, 3) and len(aux) == 2 and aux[0].shape == (4, 3)
    model.eval()
    with torch.no_grad():
        assert isinstance(model(x), torch.Tensor)  # plain logits in eval
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (24, 64, 64, 3), dtype=np.uint8)
    labels = rng.integers(0, 3, 24)
    opt = build_optimizer("sgd", model.parameters(), 0.01, 0.9, 0.0)
    before = model.aux1.fc2.weight.detach().clone()
    model.train()
    batches = iterate_batches(pixels, labels, 8, torch.device("cpu"), torch.Generator().manual_seed(0), Augmentation())
    loss = train_one_epoch(model, opt, batches, len(labels), progress=False)
    assert np.isfinite(loss.main) and loss.total > loss.main
    assert not torch.equal(before, model.aux1.fc2.weight), "aux heads must receive gradients"


def test_googlenet_train_loss_is_the_main_head_and_the_total_adds_the_aux_heads():
    """lr = 0 keeps the weights, so a second forward pass under the same seed (dropout) recomputes
    both losses by hand: main = CE(logits), total = main + 0.3 * (CE(aux1) + CE(aux2))."""
    model, _ = build_model("googlenet", 3, "none")
    pixels = np.random.default_rng(1).integers(0, 256, (8, 64, 64, 3), dtype=np.uint8)
    labels = np.array([0, 1, 2, 0, 1, 2, 0, 1])
    x, y = next(iter(iterate_batches(pixels, labels, 8, torch.device("cpu"))))
    model.train()
    torch.manual_seed(0)
    loss = train_one_epoch(model, build_optimizer("sgd", model.parameters(), 0.0, 0.0, 0.0), [(x, y)], 8,
                           progress=False)
    torch.manual_seed(0)
    with torch.no_grad():
        out = model(x)
    ce = torch.nn.functional.cross_entropy
    main = ce(out.logits, y).item()
    assert loss.main == pytest.approx(main, rel=1e-5)
    assert loss.total == pytest.approx(main + 0.3 * (ce(out.aux_logits1, y) + ce(out.aux_logits2, y)).item(), rel=1e-5)


def test_freeze_backbone_leaves_only_the_head_trainable():
    model, _ = build_model("mobilenet_v3_small", 6, "none")
    freeze_backbone("mobilenet_v3_small", model)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in model.classifier.parameters()}  # torchvision's own head module


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v3_small"])
def test_cached_features_train_the_head_like_the_frozen_network(arch):
    """freeze_backbone: training the head on features computed once equals training the whole (frozen)
    network image by image, and leaves the backbone, BatchNorm statistics included, untouched."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (40, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 3, 40)
    seed_everything(0)
    direct, _ = build_model(arch, 3, "none")
    freeze_backbone(arch, direct)
    cached = copy.deepcopy(direct)
    backbone_before = {k: v.clone() for k, v in direct.state_dict().items() if not k.startswith(("fc",
                                                                                                "classifier"))}
    head_before = next(head_of(arch, direct).parameters()).detach().clone()
    cpu = torch.device("cpu")
    opt_direct = build_optimizer("adamw", direct.parameters(), 0.01, 0.9, 0.0)
    opt_cached = build_optimizer("adamw", cached.parameters(), 0.01, 0.9, 0.0)
    features = backbone_features(arch, cached, (x for x, _ in iterate_batches(pixels, labels, 16, cpu)))
    for epoch in (1, 2):
        torch.manual_seed(epoch)  # dropout in mobilenet's head draws from the global generator
        direct.eval()
        loss_direct = train_one_epoch(direct, opt_direct, iterate_batches(
            pixels, labels, 8, cpu, torch.Generator().manual_seed(epoch)), len(labels), progress=False)
        torch.manual_seed(epoch)
        cached.eval()
        loss_cached = train_one_epoch(head_of(arch, cached), opt_cached, iterate_feature_batches(
            features, labels, 8, cpu, torch.Generator().manual_seed(epoch)), len(labels), progress=False)
        assert loss_cached.main == pytest.approx(loss_direct.main, rel=1e-4)
    for (name, a), b in zip(direct.state_dict().items(), cached.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
    for name, before in backbone_before.items():
        assert torch.equal(before, direct.state_dict()[name]), f"{name} changed under freeze_backbone"
    assert not torch.equal(head_before, next(head_of(arch, direct).parameters()))  # the head did train


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("name", ["cuda", "cuda:1"])
def test_cuda_without_a_gpu_is_a_clear_error(name):
    with pytest.raises(SceneMLError, match=f"device={name} but no CUDA device is visible"):
        pick_device(name)
    assert pick_device("auto").type == "cpu"


def test_imagenet_weights_load_through_torchvision_like_plain_torchvision(tmp_path, monkeypatch):
    # no ImageNet file exists here: write a state dict under torchvision's exact file name, so the
    # real loading path (weights enum -> hub cache) runs, and compare with torchvision loading it
    weights = torchvision.models.ResNet18_Weights.DEFAULT
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    file = tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    file.parent.mkdir(parents=True)
    torch.manual_seed(3)
    torch.save(torchvision.models.resnet18(num_classes=1000).state_dict(), file)
    model, resolved = build_model("resnet18", 6, "imagenet")
    assert resolved == "imagenet"
    assert isinstance(model, torchvision.models.ResNet)  # the torchvision model itself, normalisation inside
    reference = torchvision.models.resnet18(num_classes=1000)
    reference.load_state_dict(torch.load(file, weights_only=True))
    reference.eval()
    model.eval()
    model.fc = reference.fc = torch.nn.Identity()  # compare the features: heads differ by design
    x = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    normalised = torchvision.transforms.functional.normalize(x, weights.transforms().mean, weights.transforms().std)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(normalised), rtol=1e-4, atol=1e-4)
