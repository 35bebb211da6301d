"""Duplicate detection on generated images: exact copies, and near copies made by re-encoding, resizing, cropping,
flipping and recolouring, with few false alarms between distinct images."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import imagehash
import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageOps

from mpoxscope.audit.duplicates import find_near_duplicates, near_matrix
from mpoxscope.audit.hashing import FLIPS, N_VARIANTS, compute_record, image_records, phash_variants
from mpoxscope.data.classes import CANONICAL_CLASSES
from mpoxscope.data.synthetic import draw_lesion_image

SIZE = 160


def textured(rng: np.random.Generator, label: str, size: int = SIZE) -> Image.Image:
    """A natural-looking image: colour noise with a 1/f spectrum (like photographs) under a drawn lesion pattern."""
    fy, fx = np.fft.fftfreq(size)[:, None], np.fft.fftfreq(size)[None, :]
    f = np.hypot(fx, fy)
    f[0, 0] = 1.0
    chans = []
    for _ in range(3):
        field = np.real(np.fft.ifft2((rng.normal(size=(size, size)) + 1j * rng.normal(size=(size, size))) / f**1.2))
        chans.append((field - field.mean()) / field.std())
    arr = np.stack(chans, -1) @ (np.eye(3) + 0.4 * rng.normal(size=(3, 3)))
    noise = Image.fromarray(np.clip(128 + 40 * arr + rng.uniform(-40, 40, 3), 0, 255).astype(np.uint8))
    return Image.blend(noise, draw_lesion_image(label, rng, size), 0.5)


def jpeg(img: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def crop(img: Image.Image, rng: np.random.Generator, lo: float = 0.05, hi: float = 0.10) -> Image.Image:
    """Remove lo..hi of the width and of the height, split at random between the two sides."""
    w, h = img.size
    fx, fy = rng.uniform(lo, hi, 2)
    left, top = rng.uniform(0, fx), rng.uniform(0, fy)
    return img.crop((round(left * w), round(top * h), round(w - (fx - left) * w), round(h - (fy - top) * h)))


def recolour(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    img = ImageEnhance.Brightness(img).enhance(rng.uniform(0.88, 1.12))
    img = ImageEnhance.Contrast(img).enhance(rng.uniform(0.88, 1.12))
    img = ImageEnhance.Color(img).enhance(rng.uniform(0.8, 1.2))
    gains = rng.uniform(0.95, 1.05, 3)  # a mild white-balance shift
    return Image.merge("RGB", [ch.point(lambda v, g=g: min(255, int(v * g))) for ch, g in zip(img.split(), gains)])


EDITS = {
    "jpeg_q25": lambda im, r: jpeg(im, 25),
    "resize_0.5": lambda im, r: im.resize((im.width // 2, im.height // 2), Image.BILINEAR),
    "resize_1.5": lambda im, r: im.resize((im.width * 3 // 2, im.height * 3 // 2), Image.BICUBIC),
    "crop_5_10": crop,
    "hflip": lambda im, r: ImageOps.mirror(im),
    "vflip": lambda im, r: ImageOps.flip(im),
    "colour": recolour,
    "combined": lambda im, r: jpeg(recolour(crop(ImageOps.mirror(im), r, 0.05, 0.08), r).resize((128, 128)), 40),
}
N_BASES = 16


@pytest.fixture(scope="module")
def edited(tmp_path_factory) -> tuple[list[Path], list[Path], dict[str, list[Path]]]:
    """16 textured base images, 6 plain lesion images as distractors, and one edited copy of each base per edit."""
    root = tmp_path_factory.mktemp("dups")
    rng = np.random.default_rng(7)
    labels = [c for c in CANONICAL_CLASSES if c != "Healthy"]
    bases, distractors = [], []
    for i in range(N_BASES):
        p = root / f"base_{i:02d}.png"
        textured(rng, labels[i % len(labels)]).save(p)
        bases.append(p)
    for i, label in enumerate(CANONICAL_CLASSES):
        p = root / f"plain_{i}.png"
        draw_lesion_image(label, rng, SIZE).save(p)
        distractors.append(p)
    copies: dict[str, list[Path]] = {}
    for name, edit in EDITS.items():
        (root / name).mkdir()
        copies[name] = []
        for i, b in enumerate(bases):
            p = root / name / f"copy_{i:02d}.png"
            edit(Image.open(b).convert("RGB"), rng).save(p)
            copies[name].append(p)
    return bases, distractors, copies


def test_identity_variant_is_imagehash_phash(edited):
    bases, _, _ = edited
    for p in bases[:4]:
        img = Image.open(p).convert("RGB")
        bits = phash_variants(img.convert("L"))
        assert bits.shape == (N_VARIANTS, 64)
        assert np.array_equal(bits[0], imagehash.phash(img).hash.ravel())
        assert compute_record(p).phash_hex == str(imagehash.phash(img))


def test_flip_variants_equal_hashes_of_flipped_images(edited):
    grey = Image.open(edited[0][0]).convert("L")
    bits = phash_variants(grey)
    per_flip = N_VARIANTS // len(FLIPS)
    for k, flip in enumerate(FLIPS):
        img = ImageOps.mirror(grey) if flip in ("horizontal", "both") else grey
        img = ImageOps.flip(img) if flip in ("vertical", "both") else img
        assert np.array_equal(phash_variants(img)[:per_flip], bits[k * per_flip:(k + 1) * per_flip])


@pytest.mark.parametrize("edit", list(EDITS))
def test_near_duplicates_found_with_few_false_alarms(edited, edit):
    bases, distractors, copies = edited
    paths = bases + distractors + copies[edit]
    origin = list(range(N_BASES)) + [-1 - i for i in range(len(distractors))] + list(range(N_BASES))
    pairs = find_near_duplicates(paths)
    found = {(origin[p.a], origin[p.b]) for p in pairs}
    recall = sum((i, i) in found for i in range(N_BASES)) / N_BASES
    false_alarms = [(paths[p.a].name, paths[p.b].name) for p in pairs if origin[p.a] != origin[p.b]]
    assert recall >= 15 / 16, f"{edit}: recall {recall:.2f}"
    assert len(false_alarms) <= 1, f"{edit}: false alarms {false_alarms}"
    for p in pairs:
        if origin[p.a] == origin[p.b]:
            assert p.kind == "near" and 0 <= p.distance <= 10 and p.correlation >= 0.65


def test_same_layout_different_pixels_is_not_a_duplicate(tmp_path):
    """Plain generated skin (a lighting gradient, or one big dark eschar) gives many distinct images within a few
    pHash bits of each other; the aligned fine-detail check must reject all of them, yet keep a real copy."""
    rng = np.random.default_rng(11)
    paths = []
    for i in range(30):
        paths.append(tmp_path / f"plain_{i:02d}.png")
        draw_lesion_image(("Healthy", "Cowpox")[i % 2], rng, SIZE).save(paths[-1])
    copy = tmp_path / "plain_01_copy.jpg"
    jpeg(ImageOps.mirror(crop(Image.open(paths[1]).convert("RGB"), rng)), 40).save(copy)
    sym = near_matrix(image_records(paths)).symmetric()
    candidates = int((np.triu(sym, 1)[np.triu_indices(len(paths), 1)] <= 10).sum())
    assert candidates >= 5  # the hash alone would raise these false alarms
    pairs = find_near_duplicates([*paths, copy])
    assert [(p.a, p.b) for p in pairs] == [(1, 30)]


def test_exact_copies_by_bytes_and_by_pixels(edited, tmp_path):
    src = edited[0][0]
    shutil.copy(src, tmp_path / "same_bytes.png")
    Image.open(src).save(tmp_path / "same_pixels.bmp")  # other bytes, identical decoded pixels
    paths = [src, tmp_path / "same_bytes.png", tmp_path / "same_pixels.bmp", edited[0][1]]
    kinds = {(p.a, p.b): p.kind for p in find_near_duplicates(paths)}
    assert kinds == {(0, 1): "identical-file", (0, 2): "identical-pixels", (1, 2): "identical-pixels"}


def test_threshold_zero_keeps_only_hash_identical_pairs(edited):
    bases, _, copies = edited
    pairs = find_near_duplicates(bases + copies["crop_5_10"], threshold=0)
    assert all(p.distance == 0 for p in pairs)
    assert len(pairs) < N_BASES  # crops do not survive a zero threshold


def test_a_file_too_large_to_read_is_a_record_with_an_error_not_a_memory_spike(tmp_path, monkeypatch):
    from mpoxscope.audit import hashing

    p = tmp_path / "big.png"
    Image.new("RGB", (64, 64), (9, 9, 9)).save(p)
    assert compute_record(p).error is None
    monkeypatch.setattr(hashing, "MAX_FILE_BYTES", p.stat().st_size - 1)
    rec = compute_record(p)
    assert rec.error.startswith("file too large") and rec.sha256 == ""
