"""Registries: a new head, runtime, explanation method or dataset layout is one entry, and the CLI runs it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from mpoxscope.cli import main
from mpoxscope.registry import HEADS, register_head

# A tiny, fast recipe for training through the CLI on the synthetic images.
FAST = ["--preset", "lite0", "--split-file", "none", "--folds", "3", "--image-size", "64", "--epochs", "1",
        "--batch-size", "16", "--cache-views", "1", "--freeze", "--warmup-epochs", "0", "--tta", "none", "--quiet"]


@pytest.fixture
def toy_head():
    @register_head("toyhead", "toy head for the registry test: max pooling, linear classifier")
    class ToyHead(nn.Module):
        seen: dict = {}

        def __init__(self, in_channels: int, num_classes: int, dropout: float = 0.0) -> None:
            super().__init__()
            ToyHead.seen = {"in_channels": in_channels, "dropout": dropout}
            self.num_classes = num_classes
            self.fc = nn.Linear(in_channels, num_classes)

        def forward(self, features: torch.Tensor, return_attention: bool = False):
            logits = self.fc(features.amax(dim=(2, 3)))
            return (logits, {}) if return_attention else logits

    yield ToyHead
    HEADS.remove("toyhead")


def test_toy_head_trains_through_the_cli(toy_head, synthetic_root, tmp_path, capsys):
    assert HEADS.get("toyhead").options == ("dropout",)  # AGFN's d_model, num_heads... are not passed
    run = tmp_path / "run"
    assert main(["train", str(synthetic_root), "--out", str(run), "--head", "toyhead", *FAST]) == 0
    assert toy_head.seen["dropout"] == pytest.approx(0.3)  # the ModelConfig option it asked for
    assert json.loads((run / "model.json").read_text())["model"]["head"] == "toyhead"
    assert "best epoch 1 of 1" in capsys.readouterr().out
    from mpoxscope.card.card import _head_line

    assert "max pooling" in _head_line("toyhead")


def test_unknown_head_is_a_usage_error(synthetic_root, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["train", str(synthetic_root), "--out", str(tmp_path / "r"), "--head", "nohead"])
    assert "agfn" in capsys.readouterr().err


@pytest.fixture
def toy_runtime():
    from mpoxscope.engine.predict import Predictor
    from mpoxscope.registry import RUNTIMES, register_runtime

    loaded: list = []

    @register_runtime("toy", "toy runtime for the registry test: the torch predictor, counted")
    def load(run_dir, device, onnx_file):
        loaded.append(run_dir)
        return Predictor.from_run(run_dir, device="cpu")

    yield loaded
    RUNTIMES.remove("toy")


def test_toy_runtime_predicts_through_the_cli(toy_runtime, tiny_run, synthetic_root, capsys):
    image = sorted((synthetic_root / "Mpox").iterdir())[0]
    assert main(["predict", str(tiny_run), str(image), "--runtime", "toy", "--format", "csv"]) == 0
    assert toy_runtime == [tiny_run]
    assert str(image) in capsys.readouterr().out


def test_runtime_choices_come_from_the_registry(capsys):
    from mpoxscope.registry import RUNTIMES

    assert {"torch", "onnx", "onnx-int8", "onnx-lite"} <= set(RUNTIMES)
    with pytest.raises(SystemExit):
        main(["predict", "run", "x.jpg", "--runtime", "onnx-lite"])  # serves decoded images only
    assert "choose from 'torch', 'onnx', 'onnx-int8')" in capsys.readouterr().err


@pytest.fixture
def toy_method():
    import numpy as np

    from mpoxscope.registry import METHODS, MethodSpec, register_method

    seen: list = []

    def compute(spec, model, batch, targets, layer, batch_size):
        seen.append((targets, layer))
        maps = np.zeros((len(batch), *batch.shape[-2:]), np.float32)
        maps[:, : batch.shape[-2] // 2] = 1.0  # top half
        return maps

    register_method(MethodSpec("toymethod", "toy method for the registry test: the top half", compute,
                               class_specific=False, needs_layer=False))
    yield seen
    METHODS.remove("toymethod")


def test_toy_method_explains_through_the_cli(toy_method, tiny_run, synthetic_root, tmp_path, capsys):
    import numpy as np

    image = sorted((synthetic_root / "Mpox").iterdir())[0]
    out = tmp_path / "ex"
    assert main(["explain", str(tiny_run), str(image), "--out", str(out), "--method", "toymethod",
                 "--no-attention"]) == 0
    assert toy_method == [(None, None)]  # class-agnostic, no target layer: capabilities honoured
    cam = np.load(out / image.stem / "toymethod.npy")
    assert cam.shape == (128, 128) and cam[:64].min() == 1.0 and cam[64:].max() == 0.0
    from mpoxscope.explain.methods import parse_methods

    assert "toymethod" in parse_methods("all")
    from mpoxscope.cli import build_parser

    help_text = build_parser()._subparsers._group_actions[0].choices["explain"].format_help()
    assert "toymethod" in help_text.replace("\n", " ")


@pytest.fixture
def toy_layout(synthetic_root, tmp_path):
    """A flat folder of images plus labels.txt ('file class' per line): a layout the tool did not know."""
    import shutil

    from mpoxscope.data.samples import Sample
    from mpoxscope.registry import LAYOUTS, register_layout

    root = tmp_path / "flat"
    root.mkdir()
    lines = []
    for cls in ("Mpox", "Measles"):
        for f in sorted((synthetic_root / cls).iterdir())[:4]:
            shutil.copy(f, root / f.name)
            lines.append(f"{f.name} {cls}")
    (root / "labels.txt").write_text("\n".join(lines) + "\n")

    @register_layout("toy-flat", "flat folder + labels.txt", lambda r: (r / "labels.txt").is_file())
    def scan(r, groups):
        rows = [ln.split() for ln in (r / "labels.txt").read_text().splitlines() if ln.strip()]
        return [Sample(r / name, cls, name) for name, cls in rows]

    yield root
    LAYOUTS.remove("toy-flat")


def test_toy_layout_through_the_cli(toy_layout, tmp_path, capsys):
    from mpoxscope.data.samples import detect_layout

    assert detect_layout(toy_layout).name == "toy-flat"
    assert main(["audit", str(toy_layout), "--out", str(tmp_path / "audit"), "--no-split"]) == 0
    assert "(8 images, 8 patients, 2 classes, 0 unreadable)" in capsys.readouterr().out


def test_builtin_layouts_detected(synthetic_root, tmp_path):
    from mpoxscope.data.samples import detect_layout

    assert detect_layout(synthetic_root).name == "class-folders"
    (tmp_path / "images" / "Mpox").mkdir(parents=True)
    assert detect_layout(tmp_path).name == "images-folder"


@pytest.mark.parametrize("backbone", ["vit_tiny_patch16_224"])
def test_vit_backbone_trains_with_agfn_and_explains(backbone, synthetic_root, tmp_path, capsys):
    """A ViT (random weights): stages from feature_info, tokens turned into a grid for AGFN and the CAMs."""
    from mpoxscope.engine.predict import Predictor
    from mpoxscope.explain import explain
    from mpoxscope.models.backbones import backbone_stages, create_backbone, tokens_to_grid

    vit = create_backbone(backbone, 64).eval()
    stages = backbone_stages(vit)
    assert len(stages) == 14  # stem, 12 blocks (feature_info), token-to-grid tail
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        y = x
        for stage in stages:
            y = stage(y)
        assert torch.allclose(y, tokens_to_grid(vit.forward_features(x), 1), atol=1e-5)
    assert y.shape == (2, 192, 4, 4)

    run = tmp_path / "vit"
    args = [a for a in FAST if a not in ("--freeze",)]
    assert main(["train", str(synthetic_root), "--out", str(run), "--backbone", backbone, "--pretrained", "none",
                 "--head", "agfn", "--d-model", "32", "--num-heads", "4", "--finetune", "2", *args]) == 0
    assert "best epoch 1 of 1" in capsys.readouterr().out
    predictor = Predictor.from_run(run, device="cpu")
    batch = predictor.preprocess([img for img in _images(synthetic_root, 2)])
    model = predictor.explain_model
    for method in ("gradcam", "attention"):
        maps = explain(model, batch, method)
        assert maps.shape == (2, 64, 64) and maps.dtype == np.float32
        assert np.isfinite(maps).all() and maps.max() > 0  # a real map, not all zeros
    from mpoxscope.explain import attention_grid

    assert tuple(attention_grid(model, batch).shape) == (2, 4, 4, 4)  # (N, heads, H, W): the 4 x 4 patch grid
    token_layer = explain(model, batch, "gradcam", target_layer="backbone.blocks.11")  # tokens, reshaped
    assert token_layer.shape == (2, 64, 64)


def _images(root, n):
    from mpoxscope.data.images import load_image

    return [load_image(p) for p in sorted((root / "Mpox").iterdir())[:n]]


def test_num_heads_and_the_deprecated_spellings(capsys):
    from mpoxscope.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["train", "d", "--out", "o", "--num-heads", "2"]).num_heads == 2
    assert parser.parse_args(["train", "d", "--out", "o", "--heads", "4"]).num_heads == 4  # one release more
    assert "--heads is deprecated; use --num-heads" in capsys.readouterr().err
    assert parser.parse_args(["explain", "r", "x.jpg", "--out", "o", "--heads"]).per_head is True
    assert "use --per-head" in capsys.readouterr().err


@pytest.fixture
def toy_family():
    """ResNet-18 cut in two halves instead of the built-in stem + four layers: a family the tool did not know."""
    from mpoxscope.registry import BACKBONE_FAMILIES, register_backbone_family

    calls = []

    @register_backbone_family("toy-halves", "ResNet-18 in two halves",
                              lambda m: type(m).__name__ == "ResNet" and len(m.layer1) == 2)
    def halves(model):
        calls.append(1)
        stem = nn.Sequential(model.conv1, model.bn1, model.act1, model.maxpool, model.layer1, model.layer2)
        return [stem, nn.Sequential(model.layer3, model.layer4)]

    yield calls
    BACKBONE_FAMILIES.remove("toy-halves")


def test_toy_backbone_family_through_the_cli(toy_family, synthetic_root, tmp_path):
    from mpoxscope.config import ModelConfig
    from mpoxscope.models import create_model
    from mpoxscope.models.backbones import backbone_stages, create_backbone

    assert len(backbone_stages(create_backbone("resnet18"))) == 2 and toy_family
    net = create_model(ModelConfig(backbone="resnet18", pretrained="none", image_size=64, d_model=32, num_heads=2), 6)
    assert len(net.stages) == 2
    fast = [a for a in FAST if a != "--freeze"]
    run = tmp_path / "run"
    # --finetune 1: the second half trains, the first is the cached frozen trunk
    assert main(["train", str(synthetic_root), "--out", str(run), "--backbone", "resnet18", "--pretrained", "none",
                 "--finetune", "1", *fast]) == 0
    assert json.loads((run / "model.json").read_text())["model"]["backbone"] == "resnet18"
    assert len(backbone_stages(create_backbone("tf_efficientnet_lite0"))) == 9  # built-ins untouched
