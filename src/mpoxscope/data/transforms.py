"""Image transforms: dermatology-minded augmentation for training, a deterministic resize for evaluation."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torchvision.transforms import v2 as T

from mpoxscope.data.imagenet import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "AugmentConfig", "eval_transform", "parse_augment", "train_transform"]


@dataclass(frozen=True)
class AugmentConfig:
    """Augmentation strengths. Lesion photos have no canonical orientation, so flips and rotations are free;
    colour jitter and the skin-tone shift make the model less sensitive to camera and skin colour."""

    scale_min: float = 0.6
    rotation: float = 30.0
    vflip: bool = True
    brightness: float = 0.25
    contrast: float = 0.25
    saturation: float = 0.25
    hue: float = 0.03
    skin_tone_p: float = 0.5
    skin_tone_strength: float = 0.3

    def check(self) -> AugmentConfig:
        """Refuse a value the augmentation could only fail on, or silently misuse, naming the field."""
        from mpoxscope.errors import MpoxscopeError

        for name, (lo, hi) in _RANGES.items():
            value = getattr(self, name)
            if not lo <= value <= hi:
                raise MpoxscopeError(f"augment {name}: must be in [{lo}, {hi}], got {value}")
        if self.scale_min <= 0:
            raise MpoxscopeError(f"augment scale_min: must be above 0 (a crop keeps that share of the photo's "
                                 f"area at least), got {self.scale_min}")
        return self


#: Allowed values of AugmentConfig's numeric fields (RandomResizedCrop's area share, degrees, ColorJitter's factors).
_RANGES = {"scale_min": (0.0, 1.0), "rotation": (0.0, 180.0), "brightness": (0.0, 1.0), "contrast": (0.0, 1.0),
           "saturation": (0.0, 1.0), "hue": (0.0, 0.5), "skin_tone_p": (0.0, 1.0), "skin_tone_strength": (0.0, 0.9)}


def parse_augment(items: list[str], base: AugmentConfig | None = None) -> AugmentConfig:
    """``["scale_min=0.35", "vflip=no"]`` -> ``base`` (default: AugmentConfig()) with those fields replaced, checked.

    >>> parse_augment(["scale_min=0.35", "vflip=no"]).scale_min
    0.35
    """
    from mpoxscope.errors import MpoxscopeError

    fields = {f.name: f for f in dataclasses.fields(AugmentConfig)}
    changes: dict[str, float | bool] = {}
    for item in items:
        name, sep, text = item.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or name not in fields:
            raise MpoxscopeError(f"--augment {item!r}: expected NAME=VALUE with NAME one of {', '.join(fields)}")
        if name in changes:
            raise MpoxscopeError(f"--augment: {name} given twice")
        if fields[name].type in (bool, "bool"):
            if text.lower() not in ("yes", "no", "true", "false", "1", "0"):
                raise MpoxscopeError(f"--augment {name}: expected yes or no, got {text!r}")
            changes[name] = text.lower() in ("yes", "true", "1")
        else:
            try:
                changes[name] = float(text)
            except ValueError:
                raise MpoxscopeError(f"--augment {name}: not a number: {text!r}") from None
    return dataclasses.replace(base or AugmentConfig(), **changes).check()


class SkinToneShift(torch.nn.Module):
    """Shift brightness and saturation together, and hue slightly toward red/brown, as between skin tones.

    Works on PIL images (fast: PIL's own colour conversions) and on float tensors in [0, 1] of shape (3, H, W).
    """

    def __init__(self, p: float = 0.5, strength: float = 0.3) -> None:
        super().__init__()
        self.p, self.strength = p, strength

    def forward(self, img):
        if self.strength <= 0 or torch.rand(()) >= self.p:
            return img
        # One draw moves darker-and-more-saturated or lighter-and-less-saturated, as melanin does.
        t = float(torch.empty(()).uniform_(-self.strength, self.strength))
        img = T.functional.adjust_brightness(img, 1.0 - t)
        img = T.functional.adjust_saturation(img, 1.0 + t)
        img = T.functional.adjust_hue(img, float(torch.empty(()).uniform_(-0.02, 0.02)))
        return img.clamp(0, 1) if isinstance(img, torch.Tensor) else img


def train_transform(image_size: int, aug: AugmentConfig | None = None,
                    mean: tuple = IMAGENET_MEAN, std: tuple = IMAGENET_STD) -> T.Compose:
    """PIL RGB image -> normalised float tensor (3, image_size, image_size), randomly augmented.

    Geometry and colour run on the PIL image (several times faster than on tensors, hue especially)."""
    aug = aug or AugmentConfig()
    ops = [
        T.RandomResizedCrop(image_size, scale=(aug.scale_min, 1.0), antialias=True),
        T.RandomHorizontalFlip(),
    ]
    if aug.vflip:
        ops.append(T.RandomVerticalFlip())
    ops += [
        T.RandomRotation(aug.rotation),
        T.ColorJitter(aug.brightness, aug.contrast, aug.saturation, aug.hue),
        SkinToneShift(aug.skin_tone_p, aug.skin_tone_strength),
        T.PILToTensor(),
        T.ToDtype(torch.float32, scale=True),
        T.Normalize(mean, std),
    ]
    return T.Compose(ops)


def eval_transform(image_size: int, mean: tuple = IMAGENET_MEAN, std: tuple = IMAGENET_STD) -> T.Compose:
    """PIL RGB image -> normalised float tensor (3, image_size, image_size): resize the whole photo, no crop,
    so a lesion near the border is never cut away."""
    return T.Compose([
        T.PILToTensor(),
        T.Resize((image_size, image_size), antialias=True),
        T.ToDtype(torch.float32, scale=True),
        T.Normalize(mean, std),
    ])
