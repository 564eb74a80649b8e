"""Face detection and landmark alignment (`mbembed align`, and on-the-fly alignment for eval/export).

Modules, one job each:

- `templates`: the 5-point reference templates (`arcface`, `loose`) at any crop size (NumPy only).
- `similarity`: least-squares similarity transform of 5 landmarks to a template (Umeyama), and
  the warp that applies it (TensorFlow's projective-transform op, insightface's pixel convention).
- `detector`: the face detector behind one small interface (`FaceDetector`); MTCNN today.
- `alignment`: detect, pick the face a dataset means, align or centre-crop: `align_images`,
  `iter_aligned` (files in, aligned uint8 crops out) - the one code path of `mbembed align`
  and of on-the-fly alignment.
- `folder`: `align_folder`, the resumable, reported folder-to-folder run behind `mbembed align`.

This package imports only NumPy at import time (the config reads `templates.TEMPLATE_NAMES`);
TensorFlow and the detector load when a function needs them.
"""

from mobilenet_embed.align.templates import TEMPLATE_NAMES, template_points

__all__ = ["TEMPLATE_NAMES", "template_points"]
