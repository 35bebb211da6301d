"""Backbones from timm, exposed as an ordered list of stages so a frozen trunk and a trainable tail can be split.

Every stage list ends in a (B, C, H, W) feature grid, which the heads and the CAMs read: token models (ViT,
DeiT, Swin, ...) end in a stage that turns their tokens into that grid.
"""

from __future__ import annotations

import math

import timm
import torch
from torch import nn

from mpoxscope.errors import MpoxscopeError
from mpoxscope.registry import BACKBONE_FAMILIES, register_backbone_family


def create_backbone(name: str, image_size: int | None = None, drop_path: float = 0.0) -> nn.Module:
    """A timm model by name, without classifier or pooling. ``image_size``: a model whose position embedding
    is built for one input size (ViT, DeiT, Swin: ``patch_embed.img_size``) is rebuilt for this one; any
    other model is created exactly as before (same call, same random initialisation). ``drop_path``: timm's
    stochastic depth rate (only while training; passed only when > 0 so that the default call is unchanged)."""
    kwargs = {"pretrained": False, "num_classes": 0, "global_pool": ""}
    if drop_path > 0:
        kwargs["drop_path_rate"] = drop_path
    try:
        model = timm.create_model(name, **kwargs)
        fixed = getattr(getattr(model, "patch_embed", None), "img_size", None)
        if image_size is not None and fixed is not None and tuple(fixed) != (image_size, image_size):
            model = timm.create_model(name, img_size=image_size, **kwargs)
        return model
    except RuntimeError as e:  # timm: "Unknown model (...)"
        raise MpoxscopeError(f"unknown backbone {name!r}: {e}") from None
    except TypeError as e:  # a model family without stochastic depth
        raise MpoxscopeError(f"--drop-path: backbone {name!r} does not support it ({e})") from None


def backbone_stages(model: nn.Module) -> list[nn.Module]:
    """Modules that, applied in order, compute the backbone's (B, C, H, W) feature grid: those of the
    last-registered family in :data:`mpoxscope.registry.BACKBONE_FAMILIES` that claims ``model``, else one
    indivisible stage.

    Convolutional families whose split was fixed before (EfficientNet/MobileNet, ResNet/ResNeXt, ConvNeXt,
    RegNet) keep it, so ``--finetune K`` means what it meant. Token models are split at the stages their
    ``feature_info`` names (ViT/DeiT blocks, Swin layers), between a stem and a token-to-grid tail.
    """
    for _, family in reversed(BACKBONE_FAMILIES.items()):
        if family.detect(model):
            return list(family.stages(model))
    return [_ForwardFeatures(model)]


def _children(model: nn.Module) -> set[str]:
    return {n for n, _ in model.named_children()}


@register_backbone_family("feature-info", "token models split at their feature_info stages (ViT, DeiT, Swin)",
                          lambda m: _feature_info_stages(m) is not None)
def _token_stages(model: nn.Module) -> list[nn.Module]:
    return _feature_info_stages(model) or [_ForwardFeatures(model)]


@register_backbone_family("stem-stages", "ConvNeXt, RegNet and other stem + stages models",
                          lambda m: {"stem", "stages"} <= _children(m))
def _stem_stages(model: nn.Module) -> list[nn.Module]:
    tail = [model.norm_pre] if hasattr(model, "norm_pre") else []
    return [model.stem, *model.stages, *tail]


@register_backbone_family("resnet", "ResNet, ResNeXt: stem, layer1..layer4",
                          lambda m: {"conv1", "bn1", "layer4"} <= _children(m))
def _resnet_stages(model: nn.Module) -> list[nn.Module]:
    return [nn.Sequential(model.conv1, model.bn1, model.act1, model.maxpool), model.layer1, model.layer2,
            model.layer3, model.layer4]


@register_backbone_family("efficientnet", "EfficientNet, EfficientNet-Lite, MobileNetV3: stem, blocks, head conv",
                          lambda m: {"conv_stem", "bn1", "blocks"} <= _children(m))
def _efficientnet_stages(model: nn.Module) -> list[nn.Module]:
    head = [nn.Sequential(model.conv_head, model.bn2)] if "conv_head" in _children(model) else []
    return [nn.Sequential(model.conv_stem, model.bn1), *model.blocks, *head]


def _feature_info_stages(model: nn.Module) -> list[nn.Module] | None:
    """Stem, then the blocks between consecutive ``feature_info`` modules (all in one container such as
    ``blocks`` or ``layers``), then the tail that normalises and turns tokens into a grid; None when the model
    is not a token model of a known shape (ViT-like: ``_pos_embed``; Swin-like: ``layers``)."""
    info = [str(f.get("module", "")) for f in getattr(model, "feature_info", None) or []]
    prefixes = {n.rsplit(".", 1)[0] for n in info if "." in n}
    if not info or len(prefixes) != 1 or not all(n.rsplit(".", 1)[-1].isdigit() for n in info):
        return None
    container_name = prefixes.pop()
    if container_name == "blocks" and hasattr(model, "_pos_embed") and hasattr(model, "patch_embed"):
        stem: nn.Module = _ViTStem(model)
    elif container_name == "layers" and hasattr(model, "patch_embed"):
        stem = model.patch_embed
    else:
        return None
    blocks = list(model.get_submodule(container_name))
    ends = sorted({int(n.rsplit(".", 1)[1]) for n in info})
    ends[-1] = len(blocks) - 1  # every block runs, whatever feature_info leaves out
    stages, start = [], 0
    for end in ends:
        stages.append(blocks[start] if end == start else nn.Sequential(*blocks[start:end + 1]))
        start = end + 1
    return [stem, *stages, _TokenGrid(getattr(model, "norm", None) or nn.Identity(),
                                      int(getattr(model, "num_prefix_tokens", 0)))]


class _ViTStem(nn.Module):
    """What timm's ``VisionTransformer.forward_features`` does before its blocks."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x):
        m = self.model
        x = m._pos_embed(m.patch_embed(x))
        x = m.patch_drop(x) if hasattr(m, "patch_drop") else x
        return m.norm_pre(x) if hasattr(m, "norm_pre") else x


class _TokenGrid(nn.Module):
    """The backbone's final norm, then tokens -> (B, C, H, W): (B, N, C) without its prefix (class, register)
    tokens, or channels-last (B, H, W, C)."""

    def __init__(self, norm: nn.Module, prefix_tokens: int) -> None:
        super().__init__()
        self.norm, self.prefix_tokens = norm, prefix_tokens

    def forward(self, x):
        return tokens_to_grid(self.norm(x), self.prefix_tokens)


def tokens_to_grid(x: torch.Tensor, prefix_tokens: int | None = None) -> torch.Tensor:
    """(B, N, C) tokens of a square grid -> (B, C, H, W); ``prefix_tokens`` (class/register tokens) are
    dropped first (None: whatever is left over above the largest square). (B, H, W, C) -> (B, C, H, W).
    Also pytorch-grad-cam's ``reshape_transform`` for a target layer that outputs tokens."""
    if x.ndim == 4:
        return x.permute(0, 3, 1, 2)
    n = x.shape[1]
    if prefix_tokens is None:
        prefix_tokens = n - math.isqrt(n) ** 2
    side = math.isqrt(n - prefix_tokens)
    if side * side != n - prefix_tokens:
        raise MpoxscopeError(f"backbone: {n - prefix_tokens} tokens do not form a square grid")
    return x[:, prefix_tokens:].transpose(1, 2).reshape(x.shape[0], x.shape[2], side, side)


class _ForwardFeatures(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x):
        out = self.model.forward_features(x)
        return tokens_to_grid(out, getattr(self.model, "num_prefix_tokens", None)) if out.ndim == 3 else out


def stage_count(model: nn.Module) -> int:
    return len(backbone_stages(model))


def target_layer(model: nn.Module) -> nn.Module:
    """The last convolutional stage: where Grad-CAM and friends read activations and gradients.

    ``model`` is a :class:`SkinLesionNet` (its own stage list, the modules its forward pass really calls) or a
    bare timm backbone (for which the stage wrappers are built anew, so hook them only on that backbone).
    """
    stages = getattr(model, "stages", None)
    return stages[-1] if isinstance(stages, list) and stages else backbone_stages(model)[-1]
