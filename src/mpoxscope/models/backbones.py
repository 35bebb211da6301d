"""Backbones from timm, exposed as an ordered list of stages so a frozen trunk and a trainable tail can be split."""

from __future__ import annotations

import timm
from torch import nn

from mpoxscope.errors import MpoxscopeError


def create_backbone(name: str) -> nn.Module:
    """A timm model by name, without classifier or pooling: ``forward_features`` gives (B, C, H, W)."""
    try:
        return timm.create_model(name, pretrained=False, num_classes=0, global_pool="")
    except RuntimeError as e:  # timm: "Unknown model (...)"
        raise MpoxscopeError(f"unknown backbone {name!r}: {e}") from None


def backbone_stages(model: nn.Module) -> list[nn.Module]:
    """Modules that, applied in order, compute ``model.forward_features``.

    Known families (EfficientNet/MobileNet, ResNet/ResNeXt, ConvNeXt, RegNet) are split at their stages, so the
    last ``k`` can be fine-tuned; any other timm model is one indivisible stage.
    """
    names = {n for n, _ in model.named_children()}
    if {"conv_stem", "bn1", "blocks"} <= names:  # EfficientNet, MobileNetV3 (timm _gen_efficientnet family)
        stem = nn.Sequential(model.conv_stem, model.bn1)
        head = [nn.Sequential(model.conv_head, model.bn2)] if "conv_head" in names else []
        return [stem, *model.blocks, *head]
    if {"conv1", "bn1", "layer4"} <= names:  # ResNet family
        stem = nn.Sequential(model.conv1, model.bn1, model.act1, model.maxpool)
        return [stem, model.layer1, model.layer2, model.layer3, model.layer4]
    if {"stem", "stages"} <= names:  # ConvNeXt, RegNet, ...
        tail = [model.norm_pre] if hasattr(model, "norm_pre") else []
        return [model.stem, *model.stages, *tail]
    return [_ForwardFeatures(model)]


class _ForwardFeatures(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model.forward_features(x)


def stage_count(model: nn.Module) -> int:
    return len(backbone_stages(model))


def target_layer(model: nn.Module) -> nn.Module:
    """The last convolutional stage: where Grad-CAM and friends read activations and gradients.

    ``model`` is a :class:`SkinLesionNet` (its own stage list, the modules its forward pass really calls) or a
    bare timm backbone (for which the stage wrappers are built anew, so hook them only on that backbone).
    """
    stages = getattr(model, "stages", None)
    return stages[-1] if isinstance(stages, list) and stages else backbone_stages(model)[-1]
