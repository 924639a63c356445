"""A folder of images as sample data: every image in it and its subfolders, read with Pillow,
converted to RGB, resized so the shorter side is ``resize`` (default ``image_size / 0.875``),
center-cropped to ``image_size`` and normalised as ``(pixel / 255 − mean) / std`` (ImageNet
defaults). Images are read batch by batch."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from bnfold.calibrate.sources import SampleSource, check_positive
from bnfold.errors import LoadError, UsageError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
#: Default resize: the shorter side becomes ``image_size / CROP_FRACTION`` before the crop.
CROP_FRACTION = 0.875


@dataclass(frozen=True)
class ImageOptions:
    """How each image becomes a ``(3, size, size)`` tensor."""

    size: int
    resize: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def make(
        cls, size: int, resize: int | None, mean: Sequence[float], std: Sequence[float]
    ) -> ImageOptions:
        check_positive("image_size", size)
        resize = round(size / CROP_FRACTION) if resize is None else resize
        check_positive("resize", resize)
        if resize < size:
            raise UsageError(f"resize ({resize}) must be at least image_size ({size})")
        mean, std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
        if len(mean) not in (1, 3) or len(std) not in (1, 3):
            raise UsageError("mean and std take 1 or 3 values (one per RGB channel)")
        if any(v <= 0 for v in std):
            raise UsageError(f"std values must be > 0, got {std}")
        return cls(size, resize, mean, std)


class ImageFolder(SampleSource):
    def __init__(self, root: Path, options: ImageOptions, *, batch_size: int, seed: int) -> None:
        self.files = sorted(
            p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
        )
        if not self.files:
            raise LoadError(
                f"{root}: no images found (looked for {' '.join(IMAGE_EXTENSIONS)} in the "
                "folder and its subfolders)"
            )
        description = f"{root} ({len(self.files)} images)"
        super().__init__(len(self.files), description, batch_size, seed)
        self.options = options

    def _take(self, index: torch.Tensor) -> torch.Tensor:
        return torch.stack([read_image(self.files[i], self.options) for i in index.tolist()])


def read_image(path: Path, options: ImageOptions) -> torch.Tensor:
    """One image as a normalised float32 ``(3, size, size)`` tensor."""
    try:
        from PIL import Image
    except ImportError as exc:
        raise LoadError("reading an image folder needs Pillow: pip install pillow") from exc
    size = options.size
    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
            scale = options.resize / min(image.size)
            width, height = (max(size, round(side * scale)) for side in image.size)
            image = image.resize((width, height), Image.Resampling.BILINEAR)
            left, top = (width - size) // 2, (height - size) // 2
            image = image.crop((left, top, left + size, top + size))
            pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    except (OSError, ValueError) as exc:
        raise LoadError(f"{path}: cannot read the image: {exc}") from exc
    tensor = pixels.view(size, size, 3).permute(2, 0, 1).float().div_(255.0)
    mean = torch.tensor(options.mean).view(-1, 1, 1)
    std = torch.tensor(options.std).view(-1, 1, 1)
    return tensor.sub_(mean).div_(std)
