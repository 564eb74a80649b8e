"""Reference positions of the 5 face landmarks in an aligned crop (pure NumPy).

Landmark order everywhere in mbembed: left eye, right eye, nose tip, left mouth corner, right
mouth corner, where left / right are as seen in the image (smaller x first); x, y in pixel-index
coordinates (pixel centres at integers, as OpenCV and insightface use).

- ``arcface``: insightface's 112x112 reference points (``arcface_dst`` of
  ``insightface/utils/face_align.py``), the framing of ArcFace / MS1M / glint crops: forehead to
  chin, little background.
- ``loose``: the same points shrunk by 0.8 about the crop centre, a wider view (more forehead,
  chin and cheeks). Its central 0.8 (``data.crop_fraction: 0.8``) is the ``arcface``
  framing to within half a pixel (the crop box is rounded to whole pixels), so random-crop
  augmentation inside it still keeps the whole face.

For a crop of ``size`` pixels the 112-pixel points are scaled by ``size / 112`` (insightface
itself shifts x by 8 px for its 128-pixel variant; mbembed scales uniformly at every size).
"""

from __future__ import annotations

import numpy as np

ARCFACE_112 = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                        [41.5493, 92.3655], [70.7299, 92.2041]], dtype=np.float64)
LOOSE_SCALE = 0.8
_CENTRE_112 = 55.5  # centre of a 112-pixel crop in pixel-index coordinates

TEMPLATES = {
    "arcface": ARCFACE_112,
    "loose": _CENTRE_112 + (ARCFACE_112 - _CENTRE_112) * LOOSE_SCALE,
}
TEMPLATE_NAMES = tuple(TEMPLATES)


def template_points(name: str, size: int = 112) -> np.ndarray:
    """float64 ``[5, 2]`` (x, y) reference landmarks of template `name` in a ``size`` x ``size`` crop.

    >>> template_points("arcface", 224)[0].round(2).tolist()
    [76.59, 103.39]
    """
    if name not in TEMPLATES:
        raise ValueError(f"unknown alignment template {name!r}; expected one of {', '.join(TEMPLATE_NAMES)}")
    if int(size) < 1:
        raise ValueError(f"alignment size must be >= 1, received {size}")
    return TEMPLATES[name] * (float(size) / 112.0)
