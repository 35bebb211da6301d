"""Augmentation of whole batches as tensors, on the training device: the fine-tuning fast path.

Images are decoded once per run into a uint8 cache (:mod:`mpoxscope.engine.imagecache`); every epoch draws new
augmentations from it here, vectorised over the batch, so neither JPEG decoding nor per-image PIL work sits in the
training loop. Geometry (random resized crop, flips, rotation) is one affine map per image, applied with
``affine_grid`` + ``grid_sample``; colour (brightness, contrast, saturation, hue, skin-tone shift) is a few
per-image multiplies and one 3x3 matrix per image (hue is a rotation in YIQ space, which is linear).

>>> import torch
>>> aug = BatchAugment(64, AugmentConfig(), mean=(0.5,) * 3, std=(0.5,) * 3)
>>> x = torch.randint(0, 256, (4, 3, 80, 80), dtype=torch.uint8)
>>> aug(x, torch.Generator().manual_seed(0)).shape
torch.Size([4, 3, 64, 64])
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mpoxscope.data.transforms import AugmentConfig

# RGB <-> YIQ: a hue change is a rotation of the (I, Q) plane.
_RGB2YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_YIQ2RGB = torch.linalg.inv(_RGB2YIQ)
_LUMA = torch.tensor([0.299, 0.587, 0.114])


def _uniform(n: int, lo: float, hi: float, g: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=g) * (hi - lo) + lo


class BatchAugment:
    """uint8 images (B, 3, H, W) -> normalised float (B, 3, S, S), randomly augmented per image.

    The draws come from the generator passed to each call (on the CPU), so a seeded run is reproducible on any
    device; ``log_ratio`` bounds the crop's aspect ratio as in torchvision's RandomResizedCrop (3/4 to 4/3).
    """

    def __init__(self, image_size: int, aug: AugmentConfig, mean: tuple, std: tuple,
                 log_ratio: float = math.log(4 / 3)) -> None:
        self.size, self.aug, self.log_ratio = image_size, aug, log_ratio
        self.mean = torch.tensor(mean).view(1, 3, 1, 1)
        self.std = torch.tensor(std).view(1, 3, 1, 1)

    def __call__(self, images: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        b = images.shape[0]
        theta = self._geometry(b, g).to(images.device)
        colour, scale, contrast = self._colour(b, g)
        x = images.float().div_(255)
        grid = F.affine_grid(theta, [b, 3, self.size, self.size], align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
        x = self._apply_colour(x, colour.to(x.device), scale.to(x.device), contrast.to(x.device))
        return (x - self.mean.to(x.device)) / self.std.to(x.device)

    def _geometry(self, b: int, g: torch.Generator) -> torch.Tensor:
        """(B, 2, 3) maps from output to input coordinates in [-1, 1]: crop (area fraction and aspect ratio),
        position, rotation and flips."""
        a = self.aug
        area = _uniform(b, a.scale_min, 1.0, g)
        ratio = torch.exp(_uniform(b, -self.log_ratio, self.log_ratio, g))
        sx = torch.sqrt(area * ratio).clamp(max=1.0)  # half-width of the crop, as a fraction of the image
        sy = torch.sqrt(area / ratio).clamp(max=1.0)
        tx = (torch.rand(b, generator=g) * 2 - 1) * (1 - sx)
        ty = (torch.rand(b, generator=g) * 2 - 1) * (1 - sy)
        angle = _uniform(b, -a.rotation, a.rotation, g) * math.pi / 180
        fx = torch.where(torch.rand(b, generator=g) < 0.5, -1.0, 1.0)
        fy = torch.where(torch.rand(b, generator=g) < 0.5, -1.0, 1.0) if a.vflip else torch.ones(b)
        cos, sin = torch.cos(angle), torch.sin(angle)
        theta = torch.zeros(b, 2, 3)
        theta[:, 0, 0], theta[:, 0, 1] = sx * cos * fx, -sx * sin * fy
        theta[:, 1, 0], theta[:, 1, 1] = sy * sin * fx, sy * cos * fy
        theta[:, 0, 2], theta[:, 1, 2] = tx, ty
        return theta

    def _colour(self, b: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per image: a 3x3 colour matrix (saturation and hue), a brightness factor and a contrast factor."""
        a = self.aug
        bright = _uniform(b, 1 - a.brightness, 1 + a.brightness, g)
        contrast = _uniform(b, 1 - a.contrast, 1 + a.contrast, g)
        sat = _uniform(b, 1 - a.saturation, 1 + a.saturation, g)
        hue = _uniform(b, -a.hue, a.hue, g) * 2 * math.pi
        # Skin-tone shift: darker-and-more-saturated or lighter-and-less-saturated together, as melanin does.
        tone = torch.where(torch.rand(b, generator=g) < a.skin_tone_p,
                           _uniform(b, -a.skin_tone_strength, a.skin_tone_strength, g), torch.zeros(b))
        bright = bright * (1 - tone)
        sat = sat * (1 + tone)
        eye = torch.eye(3).expand(b, 3, 3)
        gray = _LUMA.view(1, 1, 3).expand(b, 3, 3)
        saturation = sat.view(b, 1, 1) * eye + (1 - sat).view(b, 1, 1) * gray
        rot = torch.zeros(b, 3, 3)
        rot[:, 0, 0] = 1
        rot[:, 1, 1], rot[:, 1, 2] = torch.cos(hue), -torch.sin(hue)
        rot[:, 2, 1], rot[:, 2, 2] = torch.sin(hue), torch.cos(hue)
        hue_m = _YIQ2RGB @ rot @ _RGB2YIQ
        return hue_m @ saturation, bright, contrast

    @staticmethod
    def _apply_colour(x: torch.Tensor, colour: torch.Tensor, bright: torch.Tensor,
                      contrast: torch.Tensor) -> torch.Tensor:
        x = torch.einsum("bij,bjhw->bihw", colour, x).clamp_(0, 1)
        x = (x * bright.view(-1, 1, 1, 1)).clamp_(0, 1)
        mean = torch.einsum("c,bchw->bhw", _LUMA.to(x.device), x).mean((1, 2)).view(-1, 1, 1, 1)
        return (contrast.view(-1, 1, 1, 1) * (x - mean) + mean).clamp_(0, 1)


def normalise(images: torch.Tensor, mean: tuple, std: tuple) -> torch.Tensor:
    """uint8 (B, 3, S, S) -> normalised float, exactly as the evaluation transform does after its resize."""
    m = torch.tensor(mean, device=images.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=images.device).view(1, 3, 1, 1)
    return (images.float() / 255 - m) / s
