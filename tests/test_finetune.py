"""The fine-tuning path: images decoded once, batch tensor augmentation, TTA views stored in the run, ensembles,
and exact resume after a kill at any point."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from mpoxscope.config import ModelConfig, TrainConfig
from mpoxscope.data.batch_augment import BatchAugment, normalise
from mpoxscope.data.images import load_image
from mpoxscope.data.protocol import resolve_folds
from mpoxscope.data.samples import load_samples
from mpoxscope.data.transforms import AugmentConfig
from mpoxscope.engine import rundir
from mpoxscope.engine import train as train_mod
from mpoxscope.engine.checkpoint import read_meta
from mpoxscope.engine.ensemble import MemberSpec, member_configs, parse_member, train_ensemble
from mpoxscope.engine.imagecache import build_image_cache
from mpoxscope.engine.predict import Predictor, calibrated_softmax
from mpoxscope.engine.train import train
from mpoxscope.errors import MpoxscopeError
from mpoxscope.models.ensemble import EnsembleNet
from mpoxscope.models.tta import VIEWS, TTAModel, resolve_views

SMALL = ModelConfig(image_size=64, d_model=32, num_heads=4)
E2E = TrainConfig(epochs=3, batch_size=16, trainable_stages=-1, cache_views=0, warmup_epochs=1, lr=3e-3,
                  backbone_lr=1e-3, patience=10, precision="fp32", tta="auto")


@pytest.fixture(scope="module")
def data_and_fold(synthetic_root):
    data = load_samples(synthetic_root)
    folds, _ = resolve_folds(data, None, n_folds=3)
    return data, folds[0]


def test_batch_augment_identity_when_every_strength_is_zero():
    aug = BatchAugment(16, AugmentConfig(scale_min=1.0, rotation=0, vflip=False, brightness=0, contrast=0,
                                         saturation=0, hue=0, skin_tone_p=0), (0.0,) * 3, (1.0,) * 3, log_ratio=0)
    x = torch.randint(0, 256, (6, 3, 16, 16), dtype=torch.uint8)
    out = aug(x, torch.Generator().manual_seed(1))
    ref = x.float() / 255
    for i in range(6):  # horizontal flips stay random: each output is the image or its mirror, exactly
        assert min(float((out[i] - ref[i]).abs().max()), float((out[i] - ref[i].flip(2)).abs().max())) < 1e-5


def test_batch_augment_is_seeded_and_varies():
    aug = BatchAugment(32, AugmentConfig(), (0.5,) * 3, (0.5,) * 3)
    x = torch.randint(0, 256, (4, 3, 40, 40), dtype=torch.uint8)
    a = aug(x, torch.Generator().manual_seed(3))
    b = aug(x, torch.Generator().manual_seed(3))
    c = aug(x, torch.Generator().manual_seed(4))
    assert a.shape == (4, 3, 32, 32) and torch.equal(a, b) and not torch.allclose(a, c)
    assert torch.isfinite(a).all() and a.min() >= -1.0001 and a.max() <= 1.0001


def test_image_cache_matches_the_predictor_preprocessing(tiny_run, data_and_fold):
    data, fold = data_and_fold
    predictor = Predictor.from_run(tiny_run, device="cpu")
    idx = list(fold.validation[:4])
    cache = build_image_cache(data, idx, predictor.image_size, workers=2, progress_bar=False)
    mean, std = predictor.meta["normalization"]["mean"], predictor.meta["normalization"]["std"]
    got = normalise(cache.clean.index_select(0, cache.index(idx)), mean, std)
    ref = predictor.preprocess([load_image(data.samples[i].path) for i in idx])
    assert torch.allclose(got, ref, atol=1e-6)
    assert cache.train.shape[-1] == int(np.ceil(predictor.image_size * 1.15))


def test_tta_model_averages_the_views_logits():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(5)).eval()
    x = torch.randn(2, 3, 8, 8)
    views = resolve_views("d4")
    assert len(set(views)) == 8
    expected = torch.stack([net(VIEWS[v](x)) for v in views]).mean(0)
    assert torch.allclose(TTAModel(net, views)(x), expected, atol=1e-5)
    assert torch.equal(TTAModel(net, ("id",))(x), net(x))
    with pytest.raises(MpoxscopeError, match="unknown test-time"):
        resolve_views("spin")


def test_ensemble_net_is_the_mean_of_calibrated_probabilities():
    a, b = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    x = torch.randn(5, 4)
    out = EnsembleNet([a, b], [0.5, 2.0])(x)
    expected = (torch.softmax(a(x) / 0.5, 1) + torch.softmax(b(x) / 2.0, 1)) / 2
    assert torch.allclose(torch.softmax(out, 1), expected, atol=1e-6)


def test_end_to_end_run_stores_tta_and_predictor_reproduces_validation(tmp_path, data_and_fold):
    data, fold = data_and_fold
    result = train(data, fold, SMALL, E2E, tmp_path / "run", {"dataset": "synthetic"}, progress=False)
    meta = read_meta(tmp_path / "run")
    assert meta["tta"]["chosen_on"] == "validation" and set(meta["tta"]["candidates"]) == {"none", "flips", "d4"}
    assert meta["trainable_stages_resolved"]["cached"] is False
    predictor = Predictor.from_run(tmp_path / "run", device="cpu")
    probs = predictor.predict_images([load_image(data.samples[i].path) for i in fold.validation])
    targets = np.array([data.targets[i] for i in fold.validation])
    assert abs(float(np.mean(probs.argmax(1) == targets)) - result.validation["accuracy"]) < 1e-9
    records = [json.loads(line) for line in (tmp_path / "run" / rundir.METRICS).read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3]


def test_weight_average_is_what_is_validated_kept_and_predicted(tmp_path, data_and_fold):
    """With --ema-decay the averaged network is selected and saved (best/last), not the raw training weights,
    and the Predictor reproduces the validation score from it; mixed batches train through the same path."""
    data, fold = data_and_fold
    cfg = dataclasses.replace(E2E, tta="none", **EMA_MIX)
    result = train(data, fold, SMALL, cfg, tmp_path / "run", progress=False)
    ckpt = torch.load(tmp_path / "run" / rundir.RESUME, map_location="cpu", weights_only=True)
    last = load_file(str(tmp_path / "run" / rundir.LAST))
    key = "head.classifier.weight" if "head.classifier.weight" in last else next(iter(last))
    assert torch.equal(last[key], ckpt["ema"][key]) and not torch.equal(last[key], ckpt["model"][key])
    predictor = Predictor.from_run(tmp_path / "run", device="cpu")
    probs = predictor.predict_images([load_image(data.samples[i].path) for i in fold.validation])
    targets = np.array([data.targets[i] for i in fold.validation])
    assert abs(float(np.mean(probs.argmax(1) == targets)) - result.validation["accuracy"]) < 1e-9


@pytest.mark.parametrize("stages", [3])
def test_partial_finetune_on_images_keeps_the_trunk_frozen(tmp_path, data_and_fold, stages):
    """Frozen stages on the image path (no cache) run without gradients: their weights do not move."""
    data, fold = data_and_fold
    cfg = dataclasses.replace(E2E, epochs=1, trainable_stages=stages, tta="none")
    train(data, fold, SMALL, cfg, tmp_path / "run", progress=False)
    last = load_file(str(tmp_path / "run" / rundir.LAST))
    from mpoxscope.models import create_model

    fresh = create_model(SMALL, len(data.classes)).state_dict()
    assert torch.equal(last["backbone.conv_stem.weight"], fresh["backbone.conv_stem.weight"])
    assert not torch.equal(last["backbone.conv_head.weight"], fresh["backbone.conv_head.weight"])


def test_freeze_bn_stats_keeps_pretrained_statistics_while_scale_and_shift_learn(tmp_path, data_and_fold, capsys):
    """--freeze-bn-stats: after end-to-end training every BatchNorm running statistic is the pretrained one while
    the layers' scale and shift (and the convolutions) moved; without it the statistics move. The option reaches
    the trained ensemble member only, and is refused on a frozen trunk in one line."""
    import argparse

    from mpoxscope.cli import main
    from mpoxscope.engine.cli import add_model_options, configs_from_args
    from mpoxscope.models import create_model

    data, fold = data_and_fold
    fresh = create_model(SMALL, len(data.classes)).state_dict()
    moved = {}
    for frozen in (True, False):
        cfg = dataclasses.replace(E2E, epochs=1, tta="none", freeze_bn_stats=frozen)
        train(data, fold, SMALL, cfg, tmp_path / f"run{frozen}", progress=False)
        last = load_file(str(tmp_path / f"run{frozen}" / rundir.LAST))
        stats = [k for k in last if k.startswith("backbone.") and k.endswith(("running_mean", "running_var"))]
        assert stats
        moved[frozen] = sum(not torch.equal(last[k], fresh[k]) for k in stats)
        assert not torch.equal(last["backbone.bn1.weight"], fresh["backbone.bn1.weight"])
        assert read_meta(tmp_path / f"run{frozen}")["train"]["freeze_bn_stats"] is frozen
    assert moved[True] == 0 and moved[False] > 0
    p = argparse.ArgumentParser()
    add_model_options(p)
    m, t = configs_from_args(p.parse_args(["--freeze-bn-stats"]))
    (_, _, lite0), (_, _, probe) = member_configs(t.ensemble, m, t)
    assert lite0.freeze_bn_stats and not probe.freeze_bn_stats
    assert main(["train", "no-such-data", "--out", "x", "--freeze-bn-stats", "--preset", "frozen"]) == 2
    err = capsys.readouterr().err
    assert "frozen" in err and len(err.strip().splitlines()) == 1


class _Kill(Exception):
    pass


#: The recipe-search regularisers: a weight average and mixed batches (their draws must resume exactly too).
EMA_MIX = dict(ema_decay=0.99, mixup=0.4, cutmix=1.0)


@pytest.mark.parametrize("where,extra", [("after_best", {}), ("after_resume_file", {}), ("before_finish", {}),
                                         ("after_best", EMA_MIX), ("after_resume_file", EMA_MIX),
                                         ("after_last_resume_file", {}), ("after_last_resume_file", EMA_MIX)])
def test_kill_at_any_point_then_resume_ends_as_an_uninterrupted_run(tmp_path, data_and_fold, monkeypatch, where,
                                                                     extra):
    data, fold = data_and_fold
    cfg = dataclasses.replace(E2E, tta="none", **extra)
    train(data, fold, SMALL, cfg, tmp_path / "ref", progress=False)

    calls = {"n": 0}
    real_save, real_commit = train_mod.save_weights, rundir.commit_epoch

    def save_then_kill(model, path):  # killed right after writing best.safetensors, before the epoch's commit
        real_save(model, path)
        calls["n"] += 1
        raise _Kill

    kill_epoch = cfg.epochs if where == "after_last_resume_file" else 2  # the last: nothing left to retrain

    def commit_then_kill(run_dir, model, optimizer, scheduler, state, ema=None):  # resume.pt only, then killed
        if state.epoch == kill_epoch:
            from mpoxscope.fileio import atomic_path

            payload = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                       "scheduler": scheduler.state_dict(), "rng": {"cpu": torch.get_rng_state()},
                       "epoch": state.epoch, "best_epoch": state.best_epoch, "bad_epochs": state.bad_epochs,
                       "best_score": list(state.best_score), "history": json.dumps(state.history)}
            if ema is not None:
                payload["ema"] = ema.module.state_dict()
            with atomic_path(run_dir / rundir.RESUME) as tmp:
                torch.save(payload, tmp)
            raise _Kill
        real_commit(run_dir, model, optimizer, scheduler, state, ema=ema)

    def kill_before_finish(*a, **k):
        raise _Kill

    target = {"after_best": (train_mod, "save_weights", save_then_kill),
              "after_resume_file": (rundir, "commit_epoch", commit_then_kill),
              "after_last_resume_file": (rundir, "commit_epoch", commit_then_kill),
              "before_finish": (train_mod, "finish_run", kill_before_finish)}[where]
    monkeypatch.setattr(*target)
    with pytest.raises(_Kill):
        train(data, fold, SMALL, cfg, tmp_path / "run", progress=False)
    monkeypatch.undo()
    (tmp_path / "run" / ".resume.pt.abc123.tmp").write_bytes(b"half a checkpoint")  # a write the kill cut
    train(data, fold, SMALL, cfg, tmp_path / "run", progress=False)
    for name in (rundir.BEST, rundir.LAST):
        ref, got = load_file(str(tmp_path / "ref" / name)), load_file(str(tmp_path / "run" / name))
        assert all(torch.allclose(ref[k], got[k], atol=1e-6) for k in ref), name
    ref_m = [json.loads(x) for x in (tmp_path / "ref" / rundir.METRICS).read_text().splitlines()]
    got_m = [json.loads(x) for x in (tmp_path / "run" / rundir.METRICS).read_text().splitlines()]
    assert [r["epoch"] for r in got_m] == [1, 2, 3]
    assert [round(r["val_loss"], 5) for r in got_m] == [round(r["val_loss"], 5) for r in ref_m]
    assert not list((tmp_path / "run").glob(".*.tmp"))


def test_auto_precision_needs_native_bf16_kernels(monkeypatch):
    """`--precision auto` picks bf16 on an x86 CPU only with AVX-512 BF16 or AMX: on plain AVX-512, where oneDNN
    emulates bf16 (its own check says yes), a training step is slower than in fp32."""
    from mpoxscope.engine import device as dev

    cpu = torch.device("cpu")
    monkeypatch.setattr(dev.platform, "machine", lambda: "x86_64")
    for avx512_bf16, amx, expected in ((False, False, "fp32"), (True, False, "bf16"), (False, True, "bf16")):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v, raising=False)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v, raising=False)
        assert dev.resolve_precision(cpu, "auto") == expected
        assert dev.resolve_precision(cpu, "fp32") == "fp32" and dev.resolve_precision(cpu, "bf16") == "bf16"
        for recorded in ("fp32", "bf16"):  # a run resumed or refit keeps the precision it trained in
            assert dev.resolve_precision(cpu, "auto", recorded) == recorded
        assert dev.resolve_precision(cpu, "auto", "fp16") == expected


def test_run_resumed_on_a_machine_with_another_auto_precision_keeps_its_own(tmp_path, data_and_fold, monkeypatch):
    """Started where `auto` means bf16, killed after epoch 2, resumed where it means fp32: the resumed epochs still
    run in bf16, so the run ends as the uninterrupted bf16 run, and model.json says bf16."""
    from mpoxscope.engine import device as dev

    data, fold = data_and_fold
    cfg = dataclasses.replace(E2E, tta="none", precision="auto")
    monkeypatch.setattr(dev, "cpu_supports_bf16", lambda: True)
    train(data, fold, SMALL, cfg, tmp_path / "ref", progress=False)
    real_commit = rundir.commit_epoch

    def commit_then_kill(run_dir, model, optimizer, scheduler, state, ema=None):
        real_commit(run_dir, model, optimizer, scheduler, state, ema=ema)
        if state.epoch == 2:
            raise _Kill

    monkeypatch.setattr(rundir, "commit_epoch", commit_then_kill)
    with pytest.raises(_Kill):
        train(data, fold, SMALL, cfg, tmp_path / "run", progress=False)
    monkeypatch.setattr(rundir, "commit_epoch", real_commit)
    monkeypatch.setattr(dev, "cpu_supports_bf16", lambda: False)  # "another machine"
    train(data, fold, SMALL, cfg, tmp_path / "run", progress=False)
    assert read_meta(tmp_path / "run")["trainable_stages_resolved"]["precision"] == "bf16"
    ref, got = load_file(str(tmp_path / "ref" / rundir.LAST)), load_file(str(tmp_path / "run" / rundir.LAST))
    assert all(torch.allclose(ref[k], got[k], atol=1e-6) for k in ref)
    train(data, fold, SMALL, cfg, tmp_path / "fresh", progress=False)  # a new run here: fp32
    assert read_meta(tmp_path / "fresh")["trainable_stages_resolved"]["precision"] == "fp32"


def test_resume_file_that_is_not_ours_is_refused_in_one_line(tmp_path, data_and_fold):
    data, fold = data_and_fold
    cfg = dataclasses.replace(E2E, epochs=1, tta="none")
    train(data, fold, SMALL, cfg, tmp_path / "run", progress=False)
    (tmp_path / "run" / rundir.STATE).write_text('{"status": "running"}')
    torch.save({"epoch": "x"}, tmp_path / "run" / rundir.RESUME)
    with pytest.raises(MpoxscopeError, match="not a resumable"):
        train(data, fold, SMALL, cfg, tmp_path / "run", progress=False)


@pytest.fixture(scope="module")
def ensemble_run(tmp_path_factory, data_and_fold):
    """Two one-epoch Lite0 members; the first with flips as its test-time views (a TTA ensemble)."""
    data, fold = data_and_fold
    out = tmp_path_factory.mktemp("ens") / "run"
    cfg = dataclasses.replace(E2E, epochs=1, tta="flips")
    train_ensemble(data, fold, SMALL, cfg, ("tf_efficientnet_lite0:0", "tf_efficientnet_lite0:1"), out,
                   {"dataset": "synthetic"}, progress=False)
    return out


def test_ensemble_run_predicts_the_mean_of_its_members(ensemble_run, data_and_fold):
    data, fold = data_and_fold
    cfg = dataclasses.replace(E2E, epochs=1)
    assert [n for n, _, _ in member_configs(("tf_efficientnet_lite0:0", "x:1"), SMALL, cfg)] == [
        "tf_efficientnet_lite0-seed0", "x-seed1"]
    meta = read_meta(ensemble_run)
    assert meta["kind"] == "ensemble" and len(meta["members"]) == 2 and "members" in meta["validation"]
    assert read_meta(ensemble_run / meta["members"][0]["dir"])["tta"]["views"] == ["id", "hflip", "vflip"]
    images = [load_image(data.samples[i].path) for i in fold.test[:5]]
    ens = Predictor.from_run(ensemble_run, device="cpu")
    members = [Predictor.from_run(ensemble_run / m["dir"], device="cpu") for m in meta["members"]]
    mean = np.mean([m.predict_images(images) for m in members], axis=0)
    expected = calibrated_softmax(torch.as_tensor(np.log(mean)), meta["calibration"])
    assert np.allclose(ens.predict_images(images), expected, atol=1e-5)
    from mpoxscope.explain import explain

    batch = ens.preprocess(images[:2])
    maps = explain(ens.explain_model, batch, "gradcam")  # each member's map on the input grid, averaged
    assert maps.shape == (2, 64, 64) and np.isfinite(maps).all() and maps.max() > 0
    with pytest.raises(MpoxscopeError, match="no attention"):
        explain(ens.explain_model, batch, "attention")
    with pytest.raises(MpoxscopeError, match="given twice"):
        member_configs(("a:1", "a:1"), SMALL, cfg)
    # BACKBONE@PRESET: that member follows the preset's recipe, at the ensemble's image size and precision
    (_, m0, t0), (name, m1, t1) = member_configs(("tf_efficientnet_lite0", "x:2@frozen"), SMALL, cfg)
    assert name == "x-seed2-frozen" and m1.backbone == "x" and m1.image_size == SMALL.image_size
    assert t1.trainable_stages == 0 and t0.trainable_stages == cfg.trainable_stages and t1.seed == 2
    assert t1.precision == cfg.precision and t1.ensemble == ()
    with pytest.raises(MpoxscopeError, match="unknown recipe"):
        member_configs(("x@fast",), SMALL, cfg)


def test_tta_ensemble_gives_the_same_probabilities_in_predict_serve_and_onnx(ensemble_run, data_and_fold, tmp_path):
    """The acceptance check of the accuracy issue: max |dp| < 1e-4 across the three runtimes."""
    import io

    from fastapi.testclient import TestClient

    from mpoxscope.export.onnx import OnnxPredictor, export_onnx
    from mpoxscope.serve import create_app

    data, fold = data_and_fold
    paths = [data.samples[i].path for i in fold.test[:4]]
    torch_probs = np.array([list(r.probabilities.values())
                            for r in Predictor.from_run(ensemble_run, device="cpu").predict_paths(paths)])
    export_onnx(ensemble_run, tmp_path / "ens.onnx", parity_images=[str(p) for p in paths])
    onnx_probs = np.array([list(r.probabilities.values())
                           for r in OnnxPredictor.from_run(ensemble_run, onnx_file=tmp_path / "ens.onnx")
                           .predict_paths(paths)])
    with TestClient(create_app(ensemble_run, device="cpu")) as client:
        served = []
        for p in paths:
            r = client.post("/api/predict", files={"file": (p.name, io.BytesIO(p.read_bytes()), "image/png")})
            assert r.status_code == 200, r.text
            served.append(list(r.json()["probabilities"].values()))
    assert np.abs(torch_probs - onnx_probs).max() < 1e-4
    assert np.abs(torch_probs - np.array(served)).max() < 1e-4


def test_an_ensemble_export_is_stale_once_a_member_temperature_changes(ensemble_run, data_and_fold, tmp_path):
    """A member's temperature is inside the ensemble's ONNX graph: a new one (same weights) makes the export
    stale — an explicit file is refused in one line, the default file is exported again."""
    import shutil

    from mpoxscope.export.onnx import OnnxPredictor, export_onnx

    data, fold = data_and_fold
    run = shutil.copytree(ensemble_run, tmp_path / "ens")
    for extra in ("model.onnx", "model.int8.onnx"):
        (run / extra).unlink(missing_ok=True)
    export_onnx(run, tmp_path / "old.onnx")
    before = rundir.weights_sha256(run)
    member = run / read_meta(run)["members"][0]["dir"]
    meta = read_meta(member)
    meta["calibration"] = {**(meta.get("calibration") or {}), "temperature": 2.5}
    (member / rundir.META).write_text(json.dumps(meta))
    assert rundir.weights_sha256(run) != before
    with pytest.raises(MpoxscopeError, match="re-export"):
        OnnxPredictor.from_run(run, onnx_file=tmp_path / "old.onnx")
    paths = [data.samples[i].path for i in fold.test[:2]]
    fresh = OnnxPredictor.from_run(run).predict_paths(paths)
    torch_probs = Predictor.from_run(run, device="cpu").predict_paths(paths)
    for a, b in zip(fresh, torch_probs):
        assert max(abs(a.probabilities[k] - b.probabilities[k]) for k in a.probabilities) < 1e-4


def test_ensemble_net_resizes_the_batch_for_a_member_with_its_own_size():
    seen = []

    class Probe(torch.nn.Module):
        def forward(self, x):
            seen.append(tuple(x.shape[-2:]))
            return x.mean((2, 3))

    x = torch.rand(2, 3, 40, 40)
    out = EnsembleNet([Probe(), Probe()], [1.0, 1.0], [None, 24])(x)
    assert seen == [(40, 40), (24, 24)]
    small = torch.nn.functional.interpolate(x, size=(24, 24), mode="bilinear", antialias=True)
    expected = (torch.softmax(x.mean((2, 3)), 1) + torch.softmax(small.mean((2, 3)), 1)) / 2
    assert torch.allclose(torch.softmax(out, 1), expected, atol=1e-6)


def test_member_spec_may_name_its_own_image_size():
    cfg = dataclasses.replace(E2E, epochs=1)
    (n0, m0, _), (n1, m1, _) = member_configs(("a", "a@frozen/96"), SMALL, cfg)
    assert (n0, m0.image_size) == ("a-seed0", SMALL.image_size) and (n1, m1.image_size) == ("a-seed0-frozen-96px", 96)
    for bad in ("a/x", "a/8", "a/"):
        with pytest.raises(MpoxscopeError, match="image size of"):
            member_configs((bad,), SMALL, cfg)


def test_member_spec_may_name_its_own_epochs():
    cfg = dataclasses.replace(E2E, epochs=5)
    (n0, _, t0), (n1, m1, t1) = member_configs(("a", "a@frozen/96,epochs=3"), SMALL, cfg)
    assert (n0, t0.epochs) == ("a-seed0", 5)
    assert (n1, m1.image_size, t1.epochs, t1.trainable_stages) == ("a-seed0-frozen-96px-3ep", 96, 3, 0)
    assert parse_member("a:2,epochs=7", 0) == MemberSpec("a", 2, None, None, 7)
    assert parse_member("a,refit=no", 0) == MemberSpec("a", 0, refit=False)
    assert parse_member("a,epochs=2,refit=yes", 0).name == "a-seed0-2ep-refit"
    for bad, match in (("a,epochs=0", "epochs of"), ("a,epochs=x", "epochs of"), ("a,lr=1", "unknown option"),
                       ("a,epochs", "unknown option"), ("a,refit=maybe", "refit of .* must be yes or no"),
                       ("a,epochs=2,epochs=3", "epochs given twice")):
        with pytest.raises(MpoxscopeError, match=match):
            member_configs((bad,), SMALL, cfg)


def test_ensemble_of_two_input_sizes_is_one_model_in_every_runtime(tmp_path, data_and_fold):
    """A 64-px member and a 96-px one: the run reads 96-px images and gives the 64-px member its own size;
    predict and the ONNX runtime agree (max |dp| < 1e-4) and explanations cover both members."""
    from mpoxscope.explain import explain
    from mpoxscope.export.onnx import OnnxPredictor, export_onnx

    data, fold = data_and_fold
    out = tmp_path / "run"
    cfg = dataclasses.replace(E2E, epochs=1, tta="none")
    train_ensemble(data, fold, SMALL, cfg, ("tf_efficientnet_lite0", "tf_efficientnet_lite0:1/96"), out,
                   {"dataset": "synthetic"}, progress=False)
    meta = read_meta(out)
    assert meta["image_size"] == 96
    assert [read_meta(out / m["dir"])["image_size"] for m in meta["members"]] == [64, 96]
    ens = Predictor.from_run(out, device="cpu")
    assert ens.model.sizes == [64, 96]
    paths = [data.samples[i].path for i in fold.test[:4]]
    torch_probs = np.array([list(r.probabilities.values()) for r in ens.predict_paths(paths)])
    export_onnx(out, tmp_path / "ens.onnx", parity_images=[str(p) for p in paths])
    onnx_probs = np.array([list(r.probabilities.values())
                           for r in OnnxPredictor.from_run(out, onnx_file=tmp_path / "ens.onnx").predict_paths(paths)])
    assert np.abs(torch_probs - onnx_probs).max() < 1e-4
    maps = explain(ens.explain_model, ens.preprocess([load_image(p) for p in paths[:2]]), "gradcam")
    assert maps.shape == (2, 96, 96) and np.isfinite(maps).all()


def test_assembling_an_ensembles_members_gives_back_the_same_model(ensemble_run, data_and_fold, tmp_path, capsys,
                                                                   synthetic_root):
    """`mpoxscope ensemble` on the members of a trained ensemble: the same calibration, screening threshold and
    probabilities as the run `train --ensemble` wrote; what cannot form one ensemble is refused in one line."""
    import json
    import shutil

    from mpoxscope.cli import main

    data, fold = data_and_fold
    meta = read_meta(ensemble_run)
    members = [str(ensemble_run / m["dir"]) for m in meta["members"]]
    out = tmp_path / "assembled"
    assert main(["ensemble", *members, "--out", str(out), "--quiet"]) == 2  # the fixture recorded no data folder
    assert "--data" in capsys.readouterr().err
    data_args = ["--data", str(synthetic_root), "--split-file", "none", "--folds", "3"]  # the fixture's folds
    assert main(["ensemble", *members, "--out", str(out), *data_args, "--quiet"]) == 0
    assert "ensemble of 2: [" in capsys.readouterr().out
    again = read_meta(out)
    def rule(m):  # the protocol text differs: the fixture recorded only the dataset's name
        return {k: v for k, v in m["screening"].items() if k != "source"}

    assert again["calibration"] == meta["calibration"] and rule(again) == rule(meta)
    assert len(again["assembled_from"]) == 2 and not (out / again["members"][0]["dir"] / "resume.pt").exists()
    paths = [data.samples[i].path for i in fold.test[:4]]
    a = [r.probabilities for r in Predictor.from_run(ensemble_run, device="cpu").predict_paths(paths)]
    b = [r.probabilities for r in Predictor.from_run(out, device="cpu").predict_paths(paths)]
    assert np.abs(np.array([list(p.values()) for p in a]) - np.array([list(p.values()) for p in b])).max() < 1e-6

    other = tmp_path / "other_fold"
    shutil.copytree(members[1], other)
    m = json.loads((other / "model.json").read_text())
    m["data"]["fold"] = "fold2"
    (other / "model.json").write_text(json.dumps(m))
    for argv, message in (([members[0]], "at least two"), ([members[0], str(other)], "same fold"),
                          ([str(ensemble_run), members[0]], "is an ensemble"),
                          ([members[0], members[0] + "/"], "given twice")):
        assert main(["ensemble", *argv, "--out", str(tmp_path / "x")]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1
    assert main(["ensemble", *members, "--out", str(out), *data_args]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    # a device that does not exist: refused before --out is made (it used to leave an uncalibrated run there that
    # predict then served)
    assert main(["ensemble", *members, "--out", str(tmp_path / "y"), *data_args, "--device", "bogus"]) == 2
    assert "unknown device" in capsys.readouterr().err and not (tmp_path / "y").exists()
    # --overwrite replaces an ensemble run, never a single model's (it used to delete its weights)
    single = tmp_path / "single"
    shutil.copytree(members[0], single)
    before = (single / "model.json").read_bytes()
    assert main(["ensemble", *members, "--out", str(single), *data_args, "--overwrite"]) == 2
    assert "single-model run" in capsys.readouterr().err and (single / "model.json").read_bytes() == before


def test_feature_cache_is_reused_only_while_its_inputs_are_unchanged(tmp_path, data_and_fold, monkeypatch):
    from mpoxscope.engine import features
    from mpoxscope.models import create_model

    data, fold = data_and_fold
    model = create_model(SMALL, len(data.classes))
    stop = model.trunk_stop(1)
    idx = list(fold.train[:6])
    path = tmp_path / rundir.FEATURE_CACHE
    aug = AugmentConfig()
    first = features.cached_feature_bank(path, model, stop, data, idx, 2, 0, aug, torch.device("cpu"),
                                         progress=False)

    def no_rebuild(*a, **k):
        raise AssertionError("rebuilt although the cache matched")

    monkeypatch.setattr(features, "build_feature_bank", no_rebuild)
    again = features.cached_feature_bank(path, model, stop, data, idx, 2, 0, aug, torch.device("cpu"),
                                         progress=False)
    assert torch.equal(first.views, again.views) and first.rows == again.rows
    assert features.load_bank(path, features.bank_key(model, stop, 3, 0, aug), data, idx) is None  # other key
    import os

    victim = data.samples[idx[0]].path
    os.utime(victim, ns=(0, 0))  # the file changed (as far as the cache can tell): never reused
    assert features.load_bank(path, features.bank_key(model, stop, 2, 0, aug), data, idx) is None


def test_ensemble_preset_and_backbone_means_one_model():
    """The default preset trains the ensemble chosen on validation; `--preset lite0` its first member alone;
    naming a backbone asks for one model of it."""
    import argparse

    from mpoxscope.engine.cli import add_model_options, configs_from_args

    p = argparse.ArgumentParser()
    add_model_options(p)
    _, t = configs_from_args(p.parse_args(["--preset", "lite0"]))
    assert t.ensemble == () and t.trainable_stages == -1 and t.epochs == 20
    _, t = configs_from_args(p.parse_args([]))
    assert t.ensemble == ("tf_efficientnet_lite0", "tf_efficientnet_lite2@probe/260") and t.trainable_stages == -1
    assert t.refit and t.refit_trained
    _, t = configs_from_args(p.parse_args(["--no-refit"]))  # the default without its refit: validation only
    assert not t.refit and not t.refit_trained
    _, t = configs_from_args(p.parse_args(["--preset", "pair"]))
    assert t.ensemble == ("tf_efficientnet_lite0", "tf_efficientnet_lite2@frozen") and not t.refit
    m, t = configs_from_args(p.parse_args(["--backbone", "resnet18"]))
    assert m.backbone == "resnet18" and t.ensemble == ()
    _, t = configs_from_args(p.parse_args(["--ensemble", "none"]))
    assert t.ensemble == ()
    m, t = configs_from_args(p.parse_args(["--preset", "accurate"]))  # pair's members + Lite2 at 260 px
    assert t.ensemble[:2] == ("tf_efficientnet_lite0", "tf_efficientnet_lite2@frozen")
    from mpoxscope.engine.ensemble import input_size, member_configs

    assert input_size(t.ensemble, m, t) == 260
    names = [name for name, _, _ in member_configs(t.ensemble, m, t)]
    assert names[2] == "tf_efficientnet_lite2-seed0-260px-16ep"  # the folder recipe_search #32 trained


def test_building_a_feature_bank_leaves_the_global_rng_as_it_was(data_and_fold):
    """Its per-image seeds must not leak into training: a run that builds its bank, one that reads it from the
    cache file (resumed) and one given cv's shared bank must then draw the same random numbers."""
    from mpoxscope.engine import features
    from mpoxscope.models import create_model

    data, fold = data_and_fold
    model = create_model(SMALL, len(data.classes))
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    bank = features.build_feature_bank(model, model.trunk_stop(1), data, list(fold.train[:3]), 2, 0,
                                       AugmentConfig(), torch.device("cpu"), progress=False)
    assert bank.views.shape[0] == 2 and torch.equal(torch.rand(3), expected)


def test_feature_bank_is_the_same_with_worker_processes(data_and_fold):
    """Views are seeded per (seed, view, image), so augmenting them in DataLoader worker processes (used next to
    a GPU) gives the bank the main process builds alone, bit for bit, and leaves the global RNG alone too."""
    from mpoxscope.engine import features
    from mpoxscope.models import create_model

    data, fold = data_and_fold
    model = create_model(SMALL, len(data.classes))
    rows = list(fold.train[:5])
    alone = features.build_feature_bank(model, model.trunk_stop(1), data, rows, 2, 0, AugmentConfig(),
                                        torch.device("cpu"), batch_size=2, progress=False)
    torch.manual_seed(7)
    expected = torch.rand(2)
    torch.manual_seed(7)
    pooled = features.build_feature_bank(model, model.trunk_stop(1), data, rows, 2, 0, AugmentConfig(),
                                         torch.device("cpu"), batch_size=2, progress=False, workers=2)
    assert torch.equal(torch.rand(2), expected)
    assert torch.equal(alone.views, pooled.views) and torch.equal(alone.clean, pooled.clean)
    assert not torch.equal(alone.views[0], alone.views[1])  # two different draws per image
    assert features.bank_workers(torch.device("cpu"), 8) == 0 and features.bank_workers(torch.device("cuda"), 8) == 8



def test_augment_option_sets_strengths_for_the_trained_members_and_refuses_bad_values(capsys):
    """`--augment NAME=VALUE` changes the training augmentation over the preset's, reaches the AdamW members of an
    ensemble (the probe reads clean views and keeps its preset), and bad values fail before any work."""
    import argparse

    from mpoxscope.cli import main
    from mpoxscope.data.transforms import AugmentConfig, parse_augment
    from mpoxscope.engine.cli import add_model_options, configs_from_args
    from mpoxscope.engine.ensemble import member_configs
    from mpoxscope.errors import MpoxscopeError

    p = argparse.ArgumentParser()
    add_model_options(p)
    m, t = configs_from_args(p.parse_args(["--augment", "scale_min=0.35", "vflip=no", "skin-tone-p=0"]))
    assert (t.augment.scale_min, t.augment.vflip, t.augment.skin_tone_p) == (0.35, False, 0.0)
    assert t.augment.rotation == AugmentConfig().rotation  # the rest as the preset had it
    lite0, probe = (tc.augment for _, _, tc in member_configs(t.ensemble, m, t))
    assert lite0.scale_min == 0.35 and probe.scale_min == AugmentConfig().scale_min
    assert parse_augment([]) == AugmentConfig()
    for bad, words in ((["scale_min=0"], "above 0"), (["rotation=200"], "rotation: must be in"),
                       (["hue=nan"], "hue: must be in"), (["vflip=2"], "yes or no"), (["colour=1"], "NAME=VALUE"),
                       (["rotation=5", "rotation=6"], "twice"), (["brightness=x"], "not a number")):
        with pytest.raises(MpoxscopeError, match=words):
            parse_augment(bad)
    assert main(["train", "no-such-data", "--out", "x", "--augment", "scale_min=1.5"]) == 2
    err = capsys.readouterr().err
    assert "scale_min" in err and len(err.strip().splitlines()) == 1


def test_drop_path_option_reaches_the_trained_backbone_only_while_training(capsys):
    """`--drop-path RATE` builds the trained members' backbones with timm's stochastic depth (random while training,
    the identity in eval, so a checkpoint predicts deterministically), leaves @PRESET members as their preset has
    them, and bad values fail in one line before any work."""
    import argparse

    from mpoxscope.cli import main
    from mpoxscope.engine.cli import add_model_options, configs_from_args
    from mpoxscope.engine.ensemble import member_configs
    from mpoxscope.models.factory import create_model

    p = argparse.ArgumentParser()
    add_model_options(p)
    m, t = configs_from_args(p.parse_args(["--drop-path", "0.5"]))
    assert m.drop_path == 0.5
    (_, lite0, _), (_, probe, _) = member_configs(t.ensemble, m, t)
    assert lite0.drop_path == 0.5 and probe.drop_path == 0.0
    torch.manual_seed(0)
    model = create_model(dataclasses.replace(lite0, image_size=64, pretrained="none"), 3)
    x = torch.randn(2, 3, 64, 64)
    model.train()
    a, b = model(x), model(x)
    assert not torch.allclose(a, b)  # blocks dropped at random (dropout too; below, the trunk alone)
    trunk = model.forward_features(x), model.forward_features(x)
    assert not torch.allclose(*trunk)
    model.eval()
    assert torch.equal(model.forward_features(x), model.forward_features(x))
    plain = create_model(dataclasses.replace(lite0, image_size=64, pretrained="none", drop_path=0.0), 3).eval()
    plain.load_state_dict(model.state_dict())  # same parameters: a drop-path checkpoint loads anywhere
    assert torch.allclose(plain(x), model(x), atol=1e-5)
    for args, words in ((["--drop-path", "1"], "must be in"), (["--drop-path", "0.1", "--preset", "frozen"], "frozen")):
        assert main(["train", "no-such-data", "--out", "x", *args]) == 2
        err = capsys.readouterr().err
        assert words in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("args, words", [
    (["--num-heads", "0"], "--num-heads: must be at least 1"), (["--lr", "-1"], "--lr: must be above 0"),
    (["--lr", "nan"], "--lr"), (["--label-smoothing", "1.5"], "--label-smoothing"),
    (["--weight-decay", "-1"], "--weight-decay"), (["--patience", "0"], "--patience: must be at least 1"),
    (["--image-size", "5000"], "--image-size: must be from 32 to 4096"), (["--warmup-epochs", "-1"], "--warmup")])
def test_training_numbers_out_of_range_fail_in_one_line_before_any_work(args, words, capsys):
    """Values that would fail after minutes of caching (a traceback), or train silently wrong (a negative
    learning rate ascends the loss), are refused up front, naming the option."""
    from mpoxscope.cli import main

    assert main(["train", "no-such-data", "--out", "x", *args]) == 2
    err = capsys.readouterr().err
    assert words in err and len(err.strip().splitlines()) == 1
