"""Batch augmentation of stored crops for another lab's microscope: stain, scale and optics, vectorised in torch.

Input: uint8 [B, S, S, 3] stored crops (a `zoom` times wider view than the served crop, same pixel grid).
Output: float [B, 3, C, C] in 0..1 with C = S / zoom (the CNN's crop side), what `crop_cells` produces in the served
graph.

What varies between labs, and what stands in for it here:
* geometry: any rotation and flip; the box's size and centre (scale 0.8-1.25, shift +-8%) as a localiser on
  another image would draw it;
* magnification and camera resolution: down-sampling to 45-100% and back (a 40x field's white cell is 30-60 px,
  a 100x oil crop's 300 px; both reach the CNN at its crop side);
* stain: HED (haematoxylin / eosin / DAB optical density) scale and shift, hue rotation, saturation, per-channel gain,
  brightness, contrast, gamma, grayscale;
* optics: Gaussian blur (focus), sensor noise, JPEG compression, vignetting;
* another lab's look as a whole (`amplitude_mix`, off by default): a crop's Fourier amplitude mixed with another
  crop's, often one from a lab whose cells carry no labels;
* another lab's texture and colour at once (`random_convolution`, off by default): a crop mixed with itself seen
  through a random convolution.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from leukograph.training.models import served_size

# RGB <-> HED stain matrices (Ruifrok & Johnston, as in scikit-image's rgb2hed).
_RGB_FROM_HED = torch.tensor([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])  # rows: stain OD
_HED_FROM_RGB = torch.linalg.inv(_RGB_FROM_HED)
_RGB_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_YIQ_TO_RGB = torch.linalg.inv(_RGB_TO_YIQ)
OD_FLOOR = 1.0 / 255.0
BLUR_REFERENCE_SIDE = 64  # blur sigmas are in pixels of a 64 px crop; a larger crop gets the same blur per cell


def _uniform(generator: torch.Generator, n: int, low: float, high: float) -> Tensor:
    return torch.rand(n, generator=generator) * (high - low) + low


def _chance(generator: torch.Generator, n: int, p: float) -> Tensor:
    return torch.rand(n, generator=generator) < p


def geometry(crops: Tensor, generator: torch.Generator, zoom: float, strength: float = 1.0) -> Tensor:
    """Random rotation, flip, scale and shift of [B,3,S,S] (a `zoom` times wider view) -> [B,3,C,C]."""
    n, size = crops.shape[0], served_size(crops.shape[-1], zoom)
    angle = _uniform(generator, n, 0.0, 2 * math.pi)
    scale = torch.exp(_uniform(generator, n, math.log(1 - 0.2 * strength), math.log(1 + 0.25 * strength)))
    flip = torch.where(_chance(generator, n, 0.5), -1.0, 1.0)
    shift = _uniform(generator, 2 * n, -0.08 * strength, 0.08 * strength).view(n, 2)
    cos, sin = torch.cos(angle), torch.sin(angle)
    base = scale / zoom  # the served view spans 1/zoom of the stored one
    theta = torch.stack([torch.stack([cos * base * flip, -sin * base, shift[:, 0] / zoom], 1),
                         torch.stack([sin * base * flip, cos * base, shift[:, 1] / zoom], 1)], 1)
    grid = F.affine_grid(theta, [n, 3, size, size], align_corners=False)
    return F.grid_sample(crops, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def centre(crops: Tensor, zoom: float) -> Tensor:
    """The served view of stored crops without augmentation (exact: same sampling grid)."""
    size = served_size(crops.shape[-1], zoom)
    pad = (crops.shape[-1] - size) // 2
    return crops[:, :, pad:pad + size, pad:pad + size]


def resolution(x: Tensor, generator: torch.Generator, p: float = 0.35, low: float = 0.45) -> Tensor:
    """Down-sample a random share of the batch to 45-100% and back up (lower magnification or camera resolution:
    a 40x field's white cell of 30-60 px fills ~45-90% of the crop's pixels)."""
    chosen = torch.nonzero(_chance(generator, x.shape[0], p)).flatten()
    if len(chosen) == 0:
        return x
    out = x.clone()
    for group in chosen.chunk(4):  # four factors per batch keep it vectorised
        factor = float(_uniform(generator, 1, low, 1.0))
        side = max(8, round(x.shape[-1] * factor))
        small = F.interpolate(x[group], size=(side, side), mode="area")
        out[group] = F.interpolate(small, size=x.shape[-2:], mode="bilinear", align_corners=False)
    return out


def stain(x: Tensor, generator: torch.Generator, strength: float = 1.0) -> Tensor:
    """Stain and colour jitter of float RGB [B,3,H,W] in 0..1 (strength scales every range; 0 = identity)."""
    n = x.shape[0]
    s = strength
    # HED: scale and shift each stain's optical density
    od = -torch.log(x.clamp(min=OD_FLOOR))
    hed = torch.einsum("bchw,cd->bdhw", od, _HED_FROM_RGB)
    use = _chance(generator, n, 0.8).float().view(n, 1, 1, 1)
    alpha = 1 + use * _uniform(generator, 3 * n, -0.35 * s, 0.35 * s).view(n, 3, 1, 1)
    beta = use * _uniform(generator, 3 * n, -0.04 * s, 0.04 * s).view(n, 3, 1, 1)
    od = torch.einsum("bdhw,dc->bchw", hed * alpha + beta, _RGB_FROM_HED)
    x = torch.exp(-od).clamp(0, 1)
    # hue rotation and saturation in YIQ
    yiq = torch.einsum("bchw,dc->bdhw", x, _RGB_TO_YIQ)
    hue = _uniform(generator, n, -0.6 * s, 0.6 * s) * _chance(generator, n, 0.7).float()  # radians (+-34 deg)
    sat = 1 + _uniform(generator, n, -0.5 * s, 0.5 * s) * _chance(generator, n, 0.7).float()
    cos, sin = torch.cos(hue) * sat, torch.sin(hue) * sat
    i, q = yiq[:, 1], yiq[:, 2]
    yiq = torch.stack([yiq[:, 0], cos.view(n, 1, 1) * i - sin.view(n, 1, 1) * q,
                       sin.view(n, 1, 1) * i + cos.view(n, 1, 1) * q], 1)
    x = torch.einsum("bdhw,cd->bchw", yiq, _YIQ_TO_RGB).clamp(0, 1)
    # per-channel gain (white balance), brightness / contrast, gamma
    gain = 1 + _uniform(generator, 3 * n, -0.25 * s, 0.3 * s).view(n, 3, 1, 1) * _chance(generator, n, 0.8).float(
    ).view(n, 1, 1, 1)
    x = (x * gain).clamp(0, 1)
    contrast = 1 + _uniform(generator, n, -0.3 * s, 0.3 * s).view(n, 1, 1, 1)
    brightness = _uniform(generator, n, -0.15 * s, 0.15 * s).view(n, 1, 1, 1)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = ((x - mean) * contrast + mean + brightness).clamp(0, 1)
    gamma = torch.exp(_uniform(generator, n, -0.45 * s, 0.45 * s)).view(n, 1, 1, 1)
    x = x.clamp(min=1e-4) ** gamma
    return greyed(x, _chance(generator, n, 0.1 * min(s, 1.0))).clamp(0, 1)


def greyed(x: Tensor, chosen: Tensor) -> Tensor:
    """The crops of float RGB [B,3,H,W] where `chosen` [B] is true turned grey (luma in all three channels)."""
    luma = (x * _RGB_TO_YIQ[0].view(1, 3, 1, 1)).sum(1, keepdim=True).expand_as(x)
    return torch.where(chosen.view(-1, 1, 1, 1), luma, x)


def _gaussian_kernel(sigma: float) -> Tensor:
    radius = max(1, math.ceil(2.5 * sigma))
    xs = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-(xs ** 2) / (2 * sigma ** 2))
    return kernel / kernel.sum()


def optics(x: Tensor, generator: torch.Generator, strength: float = 1.0) -> Tensor:
    """Blur, vignetting, noise and JPEG compression of float RGB [B,3,H,W] in 0..1."""
    n, _, h, w = x.shape
    blurred = _chance(generator, n, 0.3 * min(strength, 1.0))
    if blurred.any():
        sigma = float(_uniform(generator, 1, 0.5, 0.5 + 1.0 * strength)) * w / BLUR_REFERENCE_SIDE
        k = _gaussian_kernel(sigma)
        pad = len(k) // 2
        y = x[blurred]
        y = F.conv2d(F.pad(y, (pad, pad, 0, 0), mode="replicate"), k.view(1, 1, 1, -1).expand(3, 1, 1, -1), groups=3)
        y = F.conv2d(F.pad(y, (0, 0, pad, pad), mode="replicate"), k.view(1, 1, -1, 1).expand(3, 1, -1, 1), groups=3)
        x = x.clone()
        x[blurred] = y
    vignette = _chance(generator, n, 0.3).float() * _uniform(generator, n, 0.0, 0.35 * strength)
    ys = torch.linspace(-1, 1, h).view(1, h, 1)
    xs = torch.linspace(-1, 1, w).view(1, 1, w)
    offset = _uniform(generator, 2 * n, -0.5, 0.5).view(n, 2, 1, 1)
    radius2 = ((xs - offset[:, 0]) ** 2 + (ys - offset[:, 1]) ** 2) / 2
    x = x * (1 - vignette.view(n, 1, 1) * radius2).unsqueeze(1)
    noise = _chance(generator, n, 0.4).float() * _uniform(generator, n, 0.0, 0.04 * strength)
    x = (x + torch.randn(x.shape, generator=generator) * noise.view(n, 1, 1, 1)).clamp(0, 1)
    jpeg = torch.nonzero(_chance(generator, n, 0.3 * min(strength, 1.0))).flatten().tolist()
    if jpeg:
        qualities = _uniform(generator, len(jpeg), 20, 90).round().int().tolist()
        x = x.clone()
        for index, quality in zip(jpeg, qualities):
            image = (x[index].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
            bgr = np.ascontiguousarray(image[:, :, ::-1])
            ok, data = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, quality])
            if ok:
                decoded = cv2.imdecode(data, cv2.IMREAD_COLOR)[:, :, ::-1].copy()
                x[index] = torch.from_numpy(decoded).permute(2, 0, 1).float() / 255.0
    return x


def amplitude_mix(x: Tensor, donors: Tensor, generator: torch.Generator, p: float) -> Tensor:
    """Fourier amplitude mix (Xu et al., "A Fourier-based framework for domain generalization", CVPR 2021) of float
    RGB [B,3,H,W] in 0..1: with probability `p` per crop, its amplitude spectrum becomes a random convex mix (weight
    ~ U(0, 1) of the donor's) of its own and a random donor crop's [D,3,H,W], its phase is kept. Phase carries most
    of a cell's shape, amplitude most of a lab's stain, contrast, sharpness and noise."""
    if p <= 0:  # off: draws nothing, so the other augmentations' random streams stay as they were
        return x
    n = x.shape[0]
    chosen = _chance(generator, n, p)
    donor = donors[torch.randint(len(donors), (n,), generator=generator)]
    weight = (_uniform(generator, n, 0.0, 1.0) * chosen.float()).view(n, 1, 1, 1)
    spectrum = torch.fft.fft2(x)
    amplitude = (1 - weight) * spectrum.abs() + weight * torch.fft.fft2(donor).abs()
    return torch.fft.ifft2(torch.polar(amplitude, spectrum.angle())).real.clamp(0, 1).contiguous()


RANDOM_KERNEL_SIDES = (1, 3, 5)


def random_convolution(x: Tensor, generator: torch.Generator, p: float) -> Tensor:
    """RandConv (Xu et al., "Robust and generalizable visual representation learning via random convolutions", ICLR
    2021) of float RGB [B,3,H,W] in 0..1: with probability `p` per crop, the crop becomes a random convex mix (its own
    weight ~ U(0, 1)) of itself and itself through a 3->3 convolution with random weights (Kaiming-normal, a side of
    `RANDOM_KERNEL_SIDES` drawn per call; reflection padding). A 1x1 kernel remaps colour, a larger one texture and
    local contrast too, while the cell's shape stays. The convolved crop is given the crop's own per-channel mean and
    spread before the mix, so the result stays in the crop's range."""
    if p <= 0:  # off: draws nothing, so the other augmentations' random streams stay as they were
        return x
    n = x.shape[0]
    chosen = torch.nonzero(_chance(generator, n, p)).flatten()
    side = RANDOM_KERNEL_SIDES[int(torch.randint(len(RANDOM_KERNEL_SIDES), (1,), generator=generator))]
    weights = torch.randn(len(chosen) * 3, 3, side, side, generator=generator) / math.sqrt(3 * side * side)
    own = _uniform(generator, len(chosen), 0.0, 1.0).view(-1, 1, 1, 1)
    if len(chosen) == 0:
        return x
    picked = x[chosen]
    stacked = picked.reshape(1, -1, *x.shape[-2:])  # one grouped convolution: each crop its own kernel
    if side > 1:
        stacked = F.pad(stacked, [side // 2] * 4, mode="reflect")
    convolved = F.conv2d(stacked, weights, groups=len(chosen)).view_as(picked)
    mean, spread = picked.mean(dim=(2, 3), keepdim=True), picked.std(dim=(2, 3), keepdim=True)
    centred = convolved - convolved.mean(dim=(2, 3), keepdim=True)
    convolved = centred / (centred.std(dim=(2, 3), keepdim=True) + 1e-6) * spread + mean
    out = x.clone()
    out[chosen] = (own * picked + (1 - own) * convolved).clamp(0, 1)
    return out


def augment_batch(crops: np.ndarray, generator: torch.Generator, zoom: float, strength: float = 1.0,
                  grey: float = 0.0, random_conv: float = 0.0) -> Tensor:
    """uint8 stored crops [B,S,S,3] -> augmented float [B,3,C,C] in 0..1 (C = S / zoom). `grey`: the chance that a
    crop is also turned grey after the stain jitter, whatever the strength; `random_conv`: the chance that it is
    also mixed with a random convolution of itself (`random_convolution`). Each at 0 draws nothing: the random
    stream is then as without it."""
    x = torch.from_numpy(np.ascontiguousarray(crops)).permute(0, 3, 1, 2).to(torch.float32) / 255.0
    x = geometry(x, generator, zoom, strength)
    x = resolution(x, generator)
    x = stain(x, generator, strength)
    if grey > 0:
        x = greyed(x, _chance(generator, x.shape[0], grey))
    x = random_convolution(x, generator, random_conv)
    return optics(x, generator, strength).contiguous()


def stored_to_served(crops: np.ndarray, zoom: float) -> Tensor:
    """uint8 stored crops [B,S,S,3] -> float served view [B,3,C,C] (C = S / zoom), no augmentation."""
    x = torch.from_numpy(np.ascontiguousarray(crops)).permute(0, 3, 1, 2).to(torch.float32) / 255.0
    return centre(x, zoom).contiguous()


def stain_shift(crops: Tensor, strength: float, seed: int) -> Tensor:
    """A deterministic synthetic stain shift of served crops [B,3,S,S] (evaluation under shifts of growing strength)."""
    generator = torch.Generator().manual_seed(seed)
    return stain(crops, generator, strength)
