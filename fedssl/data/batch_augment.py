"""Batched augmentation in torch: the weak and strong views of `fedssl.data.transforms`
for a whole uint8 batch at once, on whatever device the batch lives on.

The albumentations pipelines call Python once per image (about 3,000 strong views a
second on one CPU core), which bounds semi-supervised training; here each operation
is a few tensor kernels over the batch, with its own random parameters per image:

- ``weak``: horizontal flip (p 0.5) and a translation of up to 12.5% of the side on
  each axis with reflected borders, by whole pixels (FixMatch's pad-and-crop; Sohn
  et al., "FixMatch", NeurIPS 2020), done as one gather of the uint8 pixels.
- ``strong``: ``weak``, then 2 different RandAugment operations per image (Cubuk et
  al., CVPR Workshops 2020, in FixMatch's variant: magnitudes drawn per image) from
  the list below, then Cutout (one hole of 1 to half the side on each axis, gray).

The operations and ranges follow `fedssl.data.transforms` (FixMatch's list without
colour, so that they act alike on grayscale): identity, autocontrast, brightness
(factor 1 +- 0.45), contrast (1 +- 0.45, blended with the image's mean), equalize,
posterize (4-8 bits), solarize (threshold 0-255), sharpness (PIL's smoothing kernel,
blend 0.05-0.95 toward the sharpened image), rotate (+-30 degrees), shear x/y (+-0.3),
translate x/y (+-30%). Geometric ones sample bilinearly, the border mirrored with
its edge pixel repeated (`grid_sample`'s reflection). The
pixels differ from albumentations' (another library's kernels and draws), not the
distribution of views in kind; BENCHMARKS.md compares the accuracy both give.

Every random parameter is drawn on the CPU from the given generator, then moved to
the batch's device, so a seed gives the same views on the CPU and on a GPU (up to
the GPU's floating-point rounding in the geometric and blending ops).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

GRAY = 127  # Cutout fill, as fedssl.data.transforms
WEAK_SHIFT = 0.125
OPS = ("identity", "autocontrast", "brightness", "contrast", "equalize", "posterize", "solarize", "sharpness",
       "rotate", "shear_x", "shear_y", "translate_x", "translate_y")
OPS_PER_IMAGE = 2


def _reflect(index: torch.Tensor, size: int) -> torch.Tensor:
    """Indices reflected into [0, size) without repeating the edge (OpenCV's REFLECT_101)."""
    period = 2 * (size - 1) if size > 1 else 1
    index = index.remainder(period)
    return torch.where(index >= size, period - index, index)


def weak(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Flip and translate each image of a uint8 (N, C, H, W) batch (see the module docstring)."""
    n, _, height, width = images.shape
    device = images.device
    flip = (torch.rand(n, generator=generator) < 0.5).to(device)
    dy, dx = (torch.randint(-round(WEAK_SHIFT * side), round(WEAK_SHIFT * side) + 1, (n,), generator=generator).to(device)
              for side in (height, width))
    rows = _reflect(torch.arange(height, device=device)[None, :] - dy[:, None], height)  # (N, H)
    cols = _reflect(torch.arange(width, device=device)[None, :] - dx[:, None], width)  # (N, W)
    cols = torch.where(flip[:, None], width - 1 - cols, cols)
    batch = torch.arange(n, device=device)[:, None, None]
    return images.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2).contiguous()


def strong(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """`weak`, two RandAugment operations and Cutout on each image of a uint8 (N, C, H, W) batch."""
    n = len(images)
    x = weak(images, generator).float()
    chosen = torch.rand(n, len(OPS), generator=generator).argsort(1)[:, :OPS_PER_IMAGE]  # two different ops per image
    magnitude = torch.rand(n, OPS_PER_IMAGE, generator=generator)
    for slot in range(OPS_PER_IMAGE):
        for op, name in enumerate(OPS):
            picked = (chosen[:, slot] == op).nonzero().flatten()
            if name == "identity" or not len(picked):
                continue
            index = picked.to(x.device)
            x[index] = _OPS[name](x[index], magnitude[picked, slot].to(x.device)).clamp_(0, 255)
    return cutout(x.round_(), generator).to(torch.uint8)


def cutout(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One gray hole per image, each side 1 to half the image's, placed wholly inside."""
    n, _, height, width = x.shape
    sizes = []
    for side in (height, width):
        size = torch.randint(1, max(1, side // 2) + 1, (n,), generator=generator)
        start = (torch.rand(n, generator=generator) * (side - size + 1)).long()
        sizes.append((start.to(x.device), size.to(x.device)))
    (top, tall), (left, wide) = sizes
    rows = torch.arange(height, device=x.device)[None, :]
    cols = torch.arange(width, device=x.device)[None, :]
    inside_rows = (rows >= top[:, None]) & (rows < (top + tall)[:, None])
    inside_cols = (cols >= left[:, None]) & (cols < (left + wide)[:, None])
    hole = (inside_rows[:, :, None] & inside_cols[:, None, :])[:, None]
    return x.masked_fill_(hole, GRAY)


def _per_image(v: torch.Tensor) -> torch.Tensor:
    return v.view(-1, 1, 1, 1)


def _blend(degenerate: torch.Tensor, x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """PIL's ImageEnhance: degenerate + factor * (x - degenerate)."""
    return degenerate + _per_image(factor) * (x - degenerate)


def autocontrast(x: torch.Tensor, _: torch.Tensor) -> torch.Tensor:
    low = x.amin((2, 3), keepdim=True)
    high = x.amax((2, 3), keepdim=True)
    scale = torch.where(high > low, 255.0 / (high - low).clamp(min=1e-6), torch.ones_like(high))
    return torch.where(high > low, (x - low) * scale, x)


def brightness(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    return _blend(torch.zeros_like(x), x, 0.55 + 0.9 * m)


def contrast(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    return _blend(x.mean((1, 2, 3), keepdim=True).expand_as(x), x, 0.55 + 0.9 * m)


def equalize(x: torch.Tensor, _: torch.Tensor) -> torch.Tensor:
    """Histogram equalization per image and channel: each level to its share of the
    cumulative histogram below it, stretched over 0-255."""
    n, c, h, w = x.shape
    levels = x.round().long().clamp_(0, 255).view(n * c, h * w)
    hist = torch.zeros(n * c, 256, device=x.device).scatter_add_(1, levels, torch.ones_like(levels, dtype=torch.float32))
    cdf = hist.cumsum(1)
    lowest = cdf.gather(1, levels.amin(1, keepdim=True))  # count at the darkest level present
    span = cdf[:, -1:] - lowest
    lut = ((cdf - lowest) / span.clamp(min=1) * 255).clamp_(0, 255)
    # one level only (nothing to spread): PIL leaves the image as it is
    return torch.where(span > 0, lut.gather(1, levels), levels.float()).view(n, c, h, w)


def posterize(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    bits = (4 + (m * 5).floor().clamp(max=4))  # 4..8 bits kept
    step = _per_image(2 ** (8 - bits))
    return (x / step).floor() * step


def solarize(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    return torch.where(x >= _per_image(m * 255), 255 - x, x)


_SMOOTH = torch.tensor([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]]) / 13  # PIL's ImageFilter.SMOOTH


def sharpness(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Blend toward the image minus its PIL-smoothed version (edges kept, as PIL does)."""
    c = x.shape[1]
    kernel = _SMOOTH.to(x.device).expand(c, 1, 3, 3)
    smooth = x.clone()
    smooth[:, :, 1:-1, 1:-1] = F.conv2d(x, kernel, groups=c)
    sharpened = (2 * x - smooth).clamp(0, 255)
    return _blend(x, sharpened, 0.05 + 0.9 * m)


def _affine(x: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """Resample each image through its 2x3 matrix (normalized coordinates, output ->
    input), bilinear, borders reflected."""
    grid = F.affine_grid(matrix, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def _matrix(a, b, c, d, tx, ty) -> torch.Tensor:
    return torch.stack([torch.stack([a, b, tx], 1), torch.stack([c, d, ty], 1)], 1)


def rotate(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    angle = (m * 2 - 1) * math.radians(30)
    cos, sin, zero = angle.cos(), angle.sin(), torch.zeros_like(angle)
    return _affine(x, _matrix(cos, -sin, sin, cos, zero, zero))


def _shear(x: torch.Tensor, m: torch.Tensor, axis: int) -> torch.Tensor:
    s, one, zero = (m * 2 - 1) * 0.3, torch.ones_like(m), torch.zeros_like(m)
    return _affine(x, _matrix(one, s, zero, one, zero, zero) if axis == 0 else _matrix(one, zero, s, one, zero, zero))


def _translate(x: torch.Tensor, m: torch.Tensor, axis: int) -> torch.Tensor:
    t, one, zero = (m * 2 - 1) * 0.3 * 2, torch.ones_like(m), torch.zeros_like(m)  # 30% of the side; [-1, 1] spans 2
    return _affine(x, _matrix(one, zero, zero, one, t, zero) if axis == 0 else _matrix(one, zero, zero, one, zero, t))


_OPS = {
    "autocontrast": autocontrast, "brightness": brightness, "contrast": contrast, "equalize": equalize,
    "posterize": posterize, "solarize": solarize, "sharpness": sharpness, "rotate": rotate,
    "shear_x": lambda x, m: _shear(x, m, 0), "shear_y": lambda x, m: _shear(x, m, 1),
    "translate_x": lambda x, m: _translate(x, m, 0), "translate_y": lambda x, m: _translate(x, m, 1),
}


class TorchAugment:
    """One strength ("none", "weak" or "strong") over uint8 (N, C, H, W) batches, with
    its own seeded generator (`reseed`), like an albumentations pipeline of
    `fedssl.data.transforms` but a batch at a time."""

    def __init__(self, kind: str, seed: int | None = None):
        if kind not in ("eval", "none", "weak", "strong"):
            raise ValueError(f"unknown augmentation {kind!r}")
        self.kind = kind
        self.generator = torch.Generator()
        self.reseed(seed)

    def reseed(self, seed: int | None) -> None:
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(seed)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.dtype != torch.uint8:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        if self.kind == "weak":
            return weak(images, self.generator)
        if self.kind == "strong":
            return strong(images, self.generator)
        return images.clone()
