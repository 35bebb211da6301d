"""Explanation maps through the Python API: every method on two backbone families, shapes, ranges, and that
explaining leaves the model exactly as it was."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from mpoxscope.config import ModelConfig
from mpoxscope.errors import MpoxscopeError
from mpoxscope.explain import METHODS, attention_grid, explain, overlay
from mpoxscope.explain.methods import default_target_layer, get_method, parse_methods
from mpoxscope.models import create_model

SIZE = 64  # 2 x 2 feature grid: enough to exercise every method, cheap enough for Score-CAM on CPU


pytestmark = pytest.mark.usefixtures("one_thread")


def _model(backbone: str, head: str = "agfn") -> torch.nn.Module:
    torch.manual_seed(0)
    pretrained = "auto" if backbone.startswith("tf_efficientnet_lite") else "none"
    cfg = ModelConfig(backbone=backbone, head=head, pretrained=pretrained, image_size=SIZE, d_model=32,
                      num_heads=4)
    return create_model(cfg, 6).eval()


@pytest.fixture(scope="module", params=["tf_efficientnet_lite0", "resnet18"])
def model(request) -> torch.nn.Module:
    return _model(request.param)


@pytest.fixture(scope="module")
def lite0() -> torch.nn.Module:
    return _model("tf_efficientnet_lite0")


@pytest.fixture()
def batch() -> torch.Tensor:
    return torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))


def _hooks(model: torch.nn.Module) -> int:
    modules = [*model.modules(), *getattr(model, "stages", [])]  # stages hold wrappers outside modules()
    return sum(len(m._forward_hooks) + len(m._backward_hooks) + len(m._forward_pre_hooks)
               for m in modules)


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_gives_maps_of_input_size_in_unit_range(model, batch, method):
    x = batch[:1] if method == "scorecam" else batch  # Score-CAM: one forward pass per channel
    maps = explain(model, x, method)
    assert maps.shape == (len(x), SIZE, SIZE)
    assert maps.dtype == np.float32
    assert np.isfinite(maps).all() and maps.min() >= 0.0 and maps.max() <= 1.0
    assert maps.max() > 0.5, "min-max scaled maps should reach 1 unless the map is degenerate"
    assert _hooks(model) == 0


def test_attention_sums_to_one_over_the_grid_before_upsampling(lite0, batch):
    grid = attention_grid(lite0, batch)
    assert grid.shape == (2, 4, 2, 2)  # (N, heads, H, W)
    assert torch.allclose(grid.sum(dim=(2, 3)), torch.ones(2, 4), atol=1e-5)
    assert (grid >= 0).all()


def test_explain_leaves_model_unchanged(lite0, batch):
    model = lite0
    for p in model.backbone.parameters():
        p.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    marker = torch.full_like(model.head.classifier.weight, 3.0)
    model.head.classifier.weight.grad = marker
    model.head.train()  # a mixed train/eval state must come back as it was
    modes = {n: m.training for n, m in model.named_modules()}
    with torch.no_grad():
        model.eval()
        before = model(batch)
        model.head.train()
    for method in METHODS:
        explain(model, batch[:1] if method == "scorecam" else batch, method)
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert model.head.classifier.weight.grad is marker and torch.all(marker == 3.0)
    assert all(p.grad is None for n, p in model.named_parameters() if n != "head.classifier.weight")
    assert _hooks(model) == 0
    with torch.no_grad():
        model.eval()
        assert torch.equal(model(batch), before)
    model.head.classifier.weight.grad = None
    for p in model.parameters():
        p.requires_grad_(True)


def test_explain_works_inside_inference_mode(lite0, batch):
    with torch.inference_mode():  # as a web service would call it, with an inference-mode batch
        frozen_batch = batch.clone()
        maps = explain(lite0, frozen_batch, "gradcam")
        attention = explain(lite0, frozen_batch, "attention")
    assert maps.shape == attention.shape == (2, SIZE, SIZE) and maps.max() > 0


def test_concurrent_explanations_do_not_mix(lite0, batch):
    from concurrent.futures import ThreadPoolExecutor

    expected = {m: explain(lite0, batch, m) for m in ("gradcam", "hirescam", "attention")}
    with ThreadPoolExecutor(3) as pool:
        got = dict(zip(expected, pool.map(lambda m: explain(lite0, batch, m), expected), strict=True))
    for m in expected:
        np.testing.assert_array_equal(got[m], expected[m])
    assert _hooks(lite0) == 0 and all(p.requires_grad for p in lite0.parameters())


def test_target_class_changes_the_gradient_maps(lite0, batch):
    a = explain(lite0, batch, "gradcam", target_classes=[0, 0])
    b = explain(lite0, batch, "gradcam", target_classes=[3, 3])
    assert not np.allclose(a, b)
    with pytest.raises(MpoxscopeError, match="class index"):
        explain(lite0, batch, "gradcam", target_classes=[0, 9])
    with pytest.raises(MpoxscopeError, match="2 images"):
        explain(lite0, batch, "gradcam", target_classes=[0])


def test_default_target_layer_is_the_stage_the_model_calls(lite0, batch):
    layer = default_target_layer(lite0)
    seen = []
    handle = layer.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    try:
        with torch.no_grad():
            lite0(batch)
    finally:
        handle.remove()
    assert seen and seen[0][1] == 1280  # conv_head + bn2 of EfficientNet-Lite0


def test_target_layer_by_module_name(lite0, batch):
    default = explain(lite0, batch, "gradcam")
    earlier = explain(lite0, batch, "gradcam", target_layer="backbone.blocks.5")
    assert earlier.shape == default.shape and not np.allclose(earlier, default)
    with pytest.raises(MpoxscopeError, match="--target-layer"):
        explain(lite0, batch, "gradcam", target_layer="backbone.nope")


def test_linear_head_has_no_attention(batch):
    with pytest.raises(MpoxscopeError, match="no attention"):
        explain(_model("resnet18", head="linear"), batch, "attention")


def test_method_names():
    assert set(METHODS) == {"gradcam", "gradcam++", "hirescam", "xgradcam", "layercam", "eigencam",
                            "scorecam", "attention"}
    assert get_method("Grad-CAM").name == "gradcam" and get_method("score-cam").name == "scorecam"
    assert parse_methods("all") == [m for m in METHODS if m != "scorecam"]  # Score-CAM only when named
    assert parse_methods("all,scorecam") == [m for m in METHODS if m != "scorecam"] + ["scorecam"]
    assert parse_methods("gradcam, gradcam++,gradcam") == ["gradcam", "gradcam++"]
    with pytest.raises(MpoxscopeError, match="unknown method"):
        get_method("saliency")


def test_overlay_is_rgb_at_the_image_size():
    image = Image.new("RGB", (100, 70), (200, 150, 120))
    cam = np.zeros((8, 8), dtype=np.float32)
    cam[2:4, 5:7] = 1.0
    out = overlay(image, cam)
    assert out.mode == "RGB" and out.size == (100, 70)
    arr = np.asarray(out).astype(int)
    assert (arr[:, :, 0] != 200).any()  # the heat map is visible
    assert overlay(image.convert("L"), np.ones((70, 100), np.float32)).size == (100, 70)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_explain_on_cuda(batch):
    model = _model("resnet18").cuda()
    for method in ("gradcam", "eigencam", "attention"):
        maps = explain(model, batch.cuda(), method)
        assert maps.shape == (2, SIZE, SIZE) and maps.dtype == np.float32
    assert _hooks(model) == 0
