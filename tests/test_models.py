"""Models: AGFN shapes and attention, linear head, backbone stages, pretrained weight resolution."""

from __future__ import annotations

import pytest
import timm
import torch
from safetensors.torch import save_file

from mpoxscope.config import ModelConfig, preset
from mpoxscope.errors import MpoxscopeError
from mpoxscope.models import AGFNHead, LinearHead, backbone_stages, create_model
from mpoxscope.models.pretrained import load_pretrained, offline_weights_path


@pytest.mark.parametrize("fusion", ["concat", "gate"])
def test_agfn_head_shapes_and_attention(fusion):
    head = AGFNHead(64, 5, d_model=32, num_heads=4, grid_size=(6, 6), fusion=fusion).eval()
    feats = torch.randn(3, 64, 6, 6)
    logits, maps = head(feats, return_attention=True)
    assert logits.shape == (3, 5)
    assert maps["pool"].shape == (3, 4, 6, 6)
    torch.testing.assert_close(maps["pool"].sum(dim=(2, 3)), torch.ones(3, 4))
    assert maps["self"].shape == (3, 4, 36, 36)
    torch.testing.assert_close(head(feats), logits)  # attention output does not change the logits


def test_agfn_head_other_grid_size_interpolates_positions():
    head = AGFNHead(16, 3, d_model=16, num_heads=2, grid_size=(7, 7)).eval()
    logits, maps = head(torch.randn(2, 16, 9, 9), return_attention=True)
    assert logits.shape == (2, 3) and maps["pool"].shape == (2, 2, 9, 9)


def test_agfn_head_rejects_bad_config():
    with pytest.raises(ValueError, match="divisible"):
        AGFNHead(16, 3, d_model=30, num_heads=4)
    with pytest.raises(ValueError, match="fusion"):
        AGFNHead(16, 3, fusion="sum")


def test_linear_head():
    head = LinearHead(8, 4)
    assert head(torch.randn(2, 8, 3, 3)).shape == (2, 4)


def test_any_number_of_classes_and_offline_weights():
    model = create_model(ModelConfig(image_size=96, d_model=32, num_heads=4), num_classes=3).eval()
    assert model.pretrained_source.startswith("package:")
    assert model(torch.randn(1, 3, 96, 96)).shape == (1, 3)
    x = torch.randn(2, 3, 96, 96)
    staged = model.forward_features(x, 0, 4)
    torch.testing.assert_close(model.forward_features(staged, start=4), model.backbone.forward_features(x))


def test_packaged_weights_are_imagenet_weights():
    """Key-order loading must reproduce the package's tensors exactly (shapes checked, values equal)."""
    path = offline_weights_path("tf_efficientnet_lite0")
    assert path is not None and path.is_file()
    theirs = torch.load(path, map_location="cpu", weights_only=True)
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    load_pretrained(model, "tf_efficientnet_lite0", "auto")
    torch.testing.assert_close(model.conv_stem.weight, theirs["_conv_stem.weight"])
    torch.testing.assert_close(model.bn2.running_var, theirs["_bn1.running_var"])


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_local_weights_file(tmp_path, suffix):
    """ResNet weights from a local file (the offline route for the paper's backbone), torchvision-style names."""
    donor = timm.create_model("resnet18", pretrained=False)
    state = {k: v.clone() for k, v in donor.state_dict().items()}
    path = tmp_path / f"resnet18{suffix}"
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    model = create_model(ModelConfig(backbone="resnet18", pretrained=str(path), image_size=64, d_model=32,
                                     num_heads=4), 6)
    torch.testing.assert_close(model.backbone.conv1.weight, donor.conv1.weight)
    assert model.pretrained_source == f"file:{path}"


def test_weights_file_errors(tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"garbage")
    with pytest.raises(MpoxscopeError, match="bad.pth: cannot read weights"):
        create_model(ModelConfig(backbone="resnet18", pretrained=str(bad)), 6)
    with pytest.raises(MpoxscopeError, match="weights file not found"):
        create_model(ModelConfig(backbone="resnet18", pretrained=str(tmp_path / "nope.pth")), 6)


def test_no_network_gives_clear_message(monkeypatch):
    def offline(*args, **kwargs):
        if kwargs.get("pretrained"):
            raise OSError("no network")
        return real(*args, **kwargs)

    real = timm.create_model
    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(MpoxscopeError, match="--pretrained PATH"):
        create_model(ModelConfig(backbone="resnet18", pretrained="imagenet"), 6)


def test_unknown_backbone_and_head():
    with pytest.raises(MpoxscopeError, match="unknown backbone"):
        create_model(ModelConfig(backbone="no_such_net", pretrained="none"), 6)
    with pytest.raises(MpoxscopeError, match="unknown head"):
        create_model(ModelConfig(head="mlp", pretrained="none"), 6)


@pytest.mark.parametrize("name,expected", [("tf_efficientnet_lite0", 9), ("resnet18", 5)])
def test_backbone_stages_compose_forward_features(name, expected):
    model = timm.create_model(name, pretrained=False, num_classes=0, global_pool="").eval()
    stages = backbone_stages(model)
    assert len(stages) == expected
    x = torch.randn(1, 3, 64, 64)
    y = x
    for s in stages:
        y = s(y)
    torch.testing.assert_close(y, model.forward_features(x))


def test_paper_preset_is_resnet50_agfn():
    m, t = preset("paper")
    assert (m.backbone, m.head, m.num_heads, t.trainable_stages) == ("resnet50", "agfn", 8, -1)
