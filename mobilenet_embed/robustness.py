"""Re-cropped copies of an evaluation set: faces framed as other collections frame them.

A model that only verifies faces cropped exactly as its training set was is not done. These
functions make the same images framed differently, so that one pairs file measures how much
accuracy a change of crop costs: each variant cuts a square box out of the original image (its
side `scale` times the image's shorter side, its centre moved by `shift` of that side), pads with
the edge colour where the box leaves the image, and resizes back to the original size. `scale`
< 1 zooms in (the face fills more of the frame: a tighter crop), > 1 zooms out (a looser crop);
a shift moves the face off-centre.

Pure NumPy/Pillow, no model: `scripts/make_recrop_set.py` writes the variants of LFW's fold-10
images, and `mbembed eval` runs on each with the model's own preprocessing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class Recrop:
    """One framing: box side `scale` x the shorter side, centre moved by (`shift_x`, `shift_y`) x it."""

    name: str
    scale: float
    shift_x: float = 0.0
    shift_y: float = 0.0


#: The variants of the robustness set: tighter, looser, and shifted sideways and down.
RECROPS = (
    Recrop("tight", 0.75),
    Recrop("loose", 1.35),
    Recrop("shift", 1.0, shift_x=0.10, shift_y=0.08),
)


def recrop_box(height: int, width: int, crop: Recrop) -> tuple[int, int, int, int]:
    """The integer box ``(top, left, bottom, right)`` of `crop` in an image of that size (may
    reach outside the image, to be padded)."""
    side = crop.scale * min(height, width)
    cy = height / 2 + crop.shift_y * min(height, width)
    cx = width / 2 + crop.shift_x * min(height, width)
    top, left = int(round(cy - side / 2)), int(round(cx - side / 2))
    size = max(1, int(round(side)))
    return top, left, top + size, left + size


def recrop_image(image: np.ndarray, crop: Recrop) -> np.ndarray:
    """`image` [H, W, 3] uint8 re-framed by `crop` and resized back to [H, W] (edge-padded)."""
    height, width = image.shape[:2]
    top, left, bottom, right = recrop_box(height, width, crop)
    pad = max(0, -top, -left, bottom - height, right - width)
    padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)), mode="edge") if pad else image
    box = padded[top + pad:bottom + pad, left + pad:right + pad]
    return np.asarray(Image.fromarray(box).resize((width, height), Image.BILINEAR))
