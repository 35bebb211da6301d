"""Faithfulness: ROAD scores, the model-randomisation sanity check on a quickly trained head, the report."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mpoxscope.config import ModelConfig
from mpoxscope.data.images import load_image
from mpoxscope.data.samples import load_samples
from mpoxscope.data.transforms import eval_transform
from mpoxscope.explain.faithfulness import (
    FaithfulnessConfig,
    evaluate_faithfulness,
    randomized_copy,
    road_scores,
    spearman,
)
from mpoxscope.explain.methods import explain
from mpoxscope.models import create_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained(synthetic_root):
    """AGFN head trained (to ~100% train accuracy) on frozen Lite0 features of the synthetic images, 128 px.
    Returns (model, images (N, 3, 128, 128), labels (N,))."""
    data = load_samples(synthetic_root)
    torch.manual_seed(0)
    model = create_model(ModelConfig(image_size=128, d_model=64, num_heads=4), len(data.classes)).eval()
    tf = eval_transform(128, model.mean, model.std)
    x = torch.stack([tf(load_image(s.path)) for s in data.samples])
    y = torch.tensor(data.targets)
    with torch.no_grad():
        feats = model.forward_features(x)  # frozen backbone: its features once
    opt = torch.optim.AdamW(model.head.parameters(), lr=3e-3)
    model.head.train()
    for _ in range(40):
        loss = torch.nn.functional.cross_entropy(model.head(feats), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        assert (model.head(feats).argmax(1) == y).float().mean() > 0.9, "the tiny head did not train"
    return model, x, y


def test_spearman():
    a = np.arange(16, dtype=np.float32).reshape(4, 4)
    assert spearman(a, a) == pytest.approx(1.0)
    assert spearman(a, -a) == pytest.approx(-1.0)
    assert spearman(a, np.zeros_like(a)) == 0.0


def test_randomized_copy_touches_only_the_chosen_part(trained):
    model, _, _ = trained
    before = {k: v.clone() for k, v in model.state_dict().items()}
    clone, count = randomized_copy(model, "head", seed=0)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # original untouched
    assert count == sum(1 for _ in model.head.parameters())
    for (name, p), q in zip(model.named_parameters(), clone.parameters(), strict=True):
        changed = not torch.equal(p, q)
        assert changed == name.startswith("head."), name
    deeper, _ = randomized_copy(model, "head+stage", seed=0)
    last = dict(deeper.named_parameters())
    assert not torch.equal(last["backbone.conv_head.weight"], model.backbone.conv_head.weight)
    assert torch.equal(last["backbone.blocks.0.0.conv_dw.weight"], model.backbone.blocks[0][0].conv_dw.weight)


def test_sanity_check_passes_for_gradcam_and_fails_for_class_agnostic_eigencam(trained):
    model, x, _ = trained
    images = x[::12]  # one per class
    cfg = FaithfulnessConfig(methods=("gradcam", "eigencam"), percentiles=(50,), baseline=False, batch_size=6)
    report = evaluate_faithfulness(model, images, cfg)
    scores = {s.method: s for s in report.scores}
    assert scores["gradcam"].sanity_pass and scores["gradcam"].sanity_rho < 0.5
    # EigenCAM ignores the classifier: re-initialising the head cannot change it
    assert not scores["eigencam"].sanity_pass and scores["eigencam"].sanity_rho > 0.99
    for s in report.scores:
        assert s.n_images == 6 and s.seconds_per_image > 0
        assert -1 <= s.road_morf <= 1 and -1 <= s.road_lerf <= 1
        assert s.road_combined == pytest.approx((s.road_lerf - s.road_morf) / 2, abs=1e-6)
    md = report.to_markdown()
    assert "| gradcam |" in md and "FAIL" in md and "pass" in md
    assert json.loads(json.dumps(report.to_dict()))["scores"][0]["method"] in ("gradcam", "eigencam")


def test_road_removing_relevant_pixels_hurts_more_than_removing_irrelevant_ones(trained):
    model, x, y = trained
    images, targets = x[::12], [int(k) for k in y[::12]]
    maps = explain(model, images, "gradcam", targets)
    morf, lerf = road_scores(model, images, maps, targets, percentiles=(50,), batch_size=6)
    assert morf.shape == lerf.shape == (6,)
    # opposite maps: what Grad-CAM calls most relevant becomes least relevant
    morf_inv, _ = road_scores(model, images, 1 - maps, targets, percentiles=(50,), batch_size=6)
    assert morf.mean() < lerf.mean()
    assert morf.mean() < morf_inv.mean()
