"""Saliency maps: the CAM family through pytorch-grad-cam and the AGFN head's own attention, behind one call.

One mechanism serves every method (as in pytorch-grad-cam itself): the model runs through
:class:`LogitsOnly`, hooks live on one target layer only for the duration of a call, and :func:`frozen` puts
the model back exactly as it was (train/eval flags, ``requires_grad`` flags, existing ``.grad``). Each method
is one :class:`MethodSpec`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from pytorch_grad_cam import (
    EigenCAM,
    GradCAM,
    GradCAMPlusPlus,
    HiResCAM,
    LayerCAM,
    RandomCAM,
    ScoreCAM,
    XGradCAM,
)
from pytorch_grad_cam.base_cam import BaseCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from mpoxscope.errors import MpoxscopeError
from mpoxscope.explain.hooks import LOCK, LogitsOnly, frozen, model_device
from mpoxscope.registry import METHODS, MethodSpec, register_method

__all__ = ["BASELINES", "LOCK", "METHODS", "LogitsOnly", "MethodSpec", "explain", "explain_parts", "frozen",
           "get_method", "model_device", "parse_methods", "register_method", "resolve_target_layer",
           "slow_methods"]



class LeanScoreCAM(ScoreCAM):
    """Score-CAM (Wang et al., 2020) with the package's weighting, computed one image at a time.

    The package builds all C masked copies of every image at once ((B, C, 3, S, S): ~0.8 GB per image for 1280
    channels at 224 px) and prints progress bars; here masked copies are made ``batch_size`` at a time, and
    channels whose activation map is constant (their normalised mask is all zero, so the input is all zero)
    are scored once. The weights are identical to ``ScoreCAM.get_cam_weights``.
    """

    batch_size = 32

    def get_cam_weights(self, input_tensor, target_layer, targets, activations, grads) -> np.ndarray:
        weights = []
        with torch.no_grad():
            for image, target, acts in zip(input_tensor, targets, torch.from_numpy(activations), strict=True):
                up = F.interpolate(acts[None].to(self.device), size=input_tensor.shape[-2:], mode="bilinear",
                                   align_corners=True)[0]  # (C, S, S), as nn.UpsamplingBilinear2d
                flat = up.flatten(1)
                lo, hi = flat.min(dim=1).values, flat.max(dim=1).values
                masks = (up - lo[:, None, None]) / (hi - lo + 1e-8)[:, None, None]
                scores = torch.empty(len(masks))
                live = (hi - lo) > 0
                if not bool(live.all()):
                    scores[~live] = target(self.model(torch.zeros_like(image)[None])[0]).float().cpu()
                idx = torch.nonzero(live).flatten()
                for i in range(0, len(idx), self.batch_size):
                    chunk = idx[i:i + self.batch_size]
                    out = self.model(image[None] * masks[chunk.to(masks.device), None])
                    scores[chunk] = torch.stack([target(o) for o in out]).float().cpu()
                weights.append(torch.softmax(scores, dim=0))
        return torch.stack(weights).numpy()


def get_method(name: str) -> MethodSpec:
    """The method called ``name`` (case-insensitive; ``grad-cam`` style spellings accepted)."""
    key = name.strip().lower()
    return BASELINES[key] if key in BASELINES else METHODS.get(name)


def slow_methods() -> list[str]:
    """Methods left out of ``all`` unless named as well (``all,scorecam``): minutes per image on a CPU."""
    return METHODS.names(lambda spec: spec.slow)


def parse_methods(text: str) -> list[str]:
    """``"gradcam,scorecam"``, ``"all"`` (every method except the slow ones) or ``"all,scorecam"`` ->
    canonical method names, without duplicates."""
    names: list[str] = []
    for part in text.split(","):
        if not part.strip():
            continue
        chosen = METHODS.names(lambda spec: not spec.slow) if part.strip().lower() == "all" \
            else [get_method(part).name]
        names += [n for n in chosen if n not in names]
    if not names:
        raise MpoxscopeError("--method: no method given")
    return names


def default_target_layer(model: nn.Module) -> nn.Module | list[nn.Module]:
    """The last backbone stage as ``model.forward`` calls it; for an ensemble, each member's (pytorch-grad-cam
    then scales every member's map to the input and averages them: the ensemble's map on a common grid).

    Same stage as ``mpoxscope.models.target_layer(model.backbone)``, but taken from ``model.stages``: for
    EfficientNet that function builds a new ``Sequential(conv_head, bn2)`` wrapper that the model never calls,
    so hooks on it would never fire.
    """
    members = getattr(model, "members", None)
    if isinstance(members, nn.ModuleList):
        return [default_target_layer(m) for m in members]
    stages = getattr(model, "stages", None)
    if stages:
        return stages[-1]
    from mpoxscope.models import target_layer

    return target_layer(getattr(model, "backbone", model))


def resolve_target_layer(model: nn.Module, name: str | None = None) -> nn.Module:
    """The module to read activations from: ``name`` as in ``model.named_modules()`` (e.g.
    ``backbone.blocks.5``, ``backbone.layer3``), or by default the last convolutional stage."""
    if not name:
        return default_target_layer(model)
    modules = dict(model.named_modules())
    if name not in modules:
        near = [n for n in modules if n.startswith(name.rsplit(".", 1)[0])][:8] or list(modules)[1:9]
        raise MpoxscopeError(f"--target-layer: no module {name!r} in the model; e.g. {', '.join(near)}")
    return modules[name]


def check_targets(target_classes: list[int] | None, n: int, num_classes: int | None) -> list[int] | None:
    if target_classes is None:
        return None
    targets = [int(k) for k in target_classes]
    if len(targets) != n:
        raise MpoxscopeError(f"target_classes: {len(targets)} given for {n} images")
    bad = [k for k in targets if k < 0 or (num_classes is not None and k >= num_classes)]
    if bad:
        valid = f" (0..{num_classes - 1})" if num_classes else ""
        raise MpoxscopeError(f"target_classes: {bad[0]} is not a class index{valid}")
    return targets


def predicted_classes(model: nn.Module, batch: torch.Tensor, batch_size: int = 32) -> list[int]:
    """Arg-max class of each image in ``batch`` (N, 3, S, S)."""
    with frozen(model), torch.no_grad():
        dev = model_device(model)
        return [int(k) for i in range(0, len(batch), batch_size)
                for k in LogitsOnly(model)(batch[i:i + batch_size].to(dev)).argmax(dim=1).cpu()]


@contextlib.contextmanager
def cam_session(spec: MethodSpec, model: nn.Module, layer: nn.Module | list[nn.Module]) -> Iterator[BaseCAM]:
    """A CAM object hooked on ``layer`` (or on each of a list: an ensemble's members) of ``LogitsOnly(model)``;
    its hooks and saved tensors go on exit.

    (Not ``with cam:``: pytorch-grad-cam's ``__exit__`` prints and swallows IndexError.)
    """
    assert spec.cam is not None
    layers = list(layer) if isinstance(layer, (list, tuple)) else [layer]
    # Registered before the CAM's own hooks, so they see (and take gradients at) the re-rooted output.
    roots = [m.register_forward_hook(_grad_root) for m in layers] if spec.uses_gradients else []
    try:
        cam = spec.cam(model=LogitsOnly(model), target_layers=layers, reshape_transform=_grid_if_tokens)
        try:
            yield cam
        finally:
            cam.activations_and_grads.release()
            cam.outputs = None
    finally:
        for root in roots:
            root.remove()


def _grid_if_tokens(x: torch.Tensor) -> torch.Tensor:
    """A target layer of a token model (e.g. ``backbone.blocks.11`` of a ViT) outputs (B, N, C): the CAMs
    read it as the (B, C, H, W) grid of its patch tokens."""
    from mpoxscope.models.backbones import tokens_to_grid

    return tokens_to_grid(x) if x.ndim == 3 else x


def _grad_root(module: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor | None:
    """Start the autograd graph at the target layer: CAMs need gradients there only, so nothing is
    back-propagated through the layers below it (about half the cost of a gradient method)."""
    if torch.is_grad_enabled() and isinstance(output, torch.Tensor):
        return output.detach().requires_grad_(True)
    return None


def cam_maps(spec: MethodSpec, model: nn.Module, batch: torch.Tensor, targets: list[int] | None,
             layer: nn.Module, batch_size: int = 16) -> np.ndarray:
    """(N, S, S) float32 maps in [0, 1] of CAM method ``spec`` for class ``targets[i]`` of image i (None: a
    class-agnostic method; pytorch-grad-cam then takes the top class, which it does not use).

    The model must already be :func:`frozen`: gradients start at the target layer and never reach parameters.
    """
    dev = model_device(model)
    out = []
    with cam_session(spec, model, layer) as cam:
        if isinstance(cam, LeanScoreCAM):
            cam.batch_size = batch_size
        for i in range(0, len(batch), batch_size):
            x = batch[i:i + batch_size].detach().to(dev).clone()
            chunk_targets = None if targets is None else \
                [ClassifierOutputTarget(k) for k in targets[i:i + batch_size]]
            if spec.uses_gradients:
                with torch.enable_grad():
                    maps = cam(input_tensor=x, targets=chunk_targets)
            else:
                with torch.no_grad():
                    maps = cam(input_tensor=x, targets=chunk_targets)
            out.append(maps)
    maps = np.concatenate(out).astype(np.float32)
    return np.clip(np.nan_to_num(maps, nan=0.0), 0.0, 1.0)


def explain(model: nn.Module, batch: torch.Tensor, method: str = "gradcam",
            target_classes: list[int] | None = None, *, target_layer: str | nn.Module | None = None,
            batch_size: int = 16) -> np.ndarray:
    """Saliency maps of ``method`` for a normalised batch (N, 3, S, S) -> (N, S, S) float32 in [0, 1].

    ``target_classes[i]``: the class to explain for image i (default: the predicted class; ignored by the
    class-agnostic ``eigencam`` and ``attention``). ``target_layer``: module or its name in
    ``model.named_modules()`` (default: the last backbone stage). Runs on the model's device; the model is
    left exactly as it was (no hooks, same flags and gradients, same outputs).
    """
    return explain_parts(model, batch, method, target_classes, target_layer=target_layer,
                         batch_size=batch_size)[0]


def explain_parts(model: nn.Module, batch: torch.Tensor, method: str = "gradcam",
                  target_classes: list[int] | None = None, *, target_layer: str | nn.Module | None = None,
                  batch_size: int = 16) -> tuple[np.ndarray, np.ndarray | None]:
    """As :func:`explain`, plus the method's raw per-part grids (N, P, H, W) when it declares ``parts`` (e.g.
    one attention map per head), else None. Capabilities are checked here once, for every method."""
    spec = get_method(method)
    if batch.ndim != 4 or batch.shape[1] != 3:
        raise MpoxscopeError(f"batch: expected (N, 3, S, S), got {tuple(batch.shape)}")
    targets = check_targets(target_classes, len(batch), getattr(model, "num_classes", None))
    if len(batch) == 0:
        return np.zeros((0, *batch.shape[-2:]), dtype=np.float32), None
    with LOCK, torch.inference_mode(False), frozen(model):
        reason = spec.available(model) if spec.available else None
        if reason:
            raise MpoxscopeError(f"{spec.name}: {reason}")
        layer = None
        if spec.needs_layer:
            layer = target_layer if isinstance(target_layer, nn.Module) else \
                resolve_target_layer(model, target_layer)
        if spec.class_specific and targets is None:
            targets = predicted_classes(model, batch, batch_size)
        out = spec.compute(spec, model, batch, targets if spec.class_specific else None, layer, batch_size)
    return out if isinstance(out, tuple) else (out, None)


# ----- the CAM family: one entry each (attention registers itself in attention.py) -----------------

def _cam(name: str, cam: type[BaseCAM], uses_gradients: bool, summary: str, aliases: tuple[str, ...] = (),
         **capabilities: bool) -> MethodSpec:
    return register_method(MethodSpec(name, summary, cam_maps, uses_gradients=uses_gradients, cam=cam,
                                      **capabilities), aliases)


_cam("gradcam", GradCAM, True, "activations weighted by mean gradient (Selvaraju et al., 2017)", ("grad-cam",))
_cam("gradcam++", GradCAMPlusPlus, True, "higher-order gradient weights (Chattopadhyay+, 2018)",
     ("gradcampp", "grad-cam++", "gradcamplusplus"))
_cam("hirescam", HiResCAM, True, "element-wise gradient x activation (Draelos & Carin, 2020)", ("hires-cam",))
_cam("xgradcam", XGradCAM, True, "activation-normalised gradient weights (Fu et al., 2020)", ("xgrad-cam",))
_cam("layercam", LayerCAM, True, "positive gradient x activation per location (Jiang+, 2021)", ("layer-cam",))
_cam("eigencam", EigenCAM, False, "first principal component of the activations; class-agnostic", ("eigen-cam",),
     class_specific=False)
_cam("scorecam", LeanScoreCAM, False, "channel weights from masked-input scores; slow (one forward pass per "
                                      "channel)", ("score-cam",), slow=True)

#: Reference maps for the faithfulness table only (random channel weights): a method should beat them.
BASELINES: dict[str, MethodSpec] = {
    "random": MethodSpec("random", "random channel weights (baseline)", cam_maps, uses_gradients=True,
                         cam=RandomCAM, baseline=True),
}
