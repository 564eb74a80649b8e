"""Detect, pick the face a dataset means, and align it to a template (or centre-crop).

The one code path of `mbembed align` (folder to folder) and of on-the-fly alignment in eval and
export (`iter_aligned` over files, `align_images` over decoded arrays):

1. the detector finds faces and 5 landmarks (`detector.FaceDetector`);
2. `choose_face` keeps one: ``center`` (box centre nearest the image centre: LFW's convention,
   where the named person is the central face) or ``largest`` (box area);
3. `align_face`: the least-squares similarity from its landmarks to the template
   (`similarity.estimate_similarity`), applied by `similarity.warp_affine`, gives a
   ``size`` x ``size`` uint8 crop;
4. no face: ``no_face="skip"`` returns no image, ``"center"`` the central square of
   `center_crop` x the shorter side, resized to ``size`` (the same warp, scale and shift only).
"""

from __future__ import annotations

import concurrent.futures
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional, Sequence

import numpy as np

from mobilenet_embed.align.detector import Face, FaceDetector, make_detector
from mobilenet_embed.align.similarity import estimate_similarity, warp_affine
from mobilenet_embed.align.templates import TEMPLATE_NAMES, template_points
from mobilenet_embed.errors import UserError

SELECT_CHOICES = ("center", "largest")
NO_FACE_CHOICES = ("skip", "center")
ALIGNED, CENTER, SKIPPED = "aligned", "center", "skipped"
DEFAULT_CENTER_CROP = 0.5


@dataclass(frozen=True)
class AlignSpec:
    """How to align: crop `size`, landmark `template`, which face (`select`), what to do without
    one (`no_face`), and the central fraction of the shorter side kept by ``no_face="center"``."""

    size: int = 112
    template: str = "arcface"
    select: str = "center"
    no_face: str = "center"
    center_crop: float = DEFAULT_CENTER_CROP

    def __post_init__(self) -> None:
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 16:
            raise UserError(f"align size: expected an integer >= 16, received {self.size!r}")
        if self.template not in TEMPLATE_NAMES:
            raise UserError(f"align template: expected one of {', '.join(TEMPLATE_NAMES)}, received {self.template!r}")
        if self.select not in SELECT_CHOICES:
            raise UserError(f"align select: expected one of {', '.join(SELECT_CHOICES)}, received {self.select!r}")
        if self.no_face not in NO_FACE_CHOICES:
            raise UserError(f"align no_face: expected one of {', '.join(NO_FACE_CHOICES)}, received {self.no_face!r}")
        if not 0.0 < float(self.center_crop) <= 1.0:
            raise UserError(f"align center_crop: expected a number > 0 and <= 1, received {self.center_crop!r}")

    @classmethod
    def from_data_config(cls, data_cfg, no_face: str = "center") -> "AlignSpec":
        """The alignment a config's data was made with (`data.align_template`, `data.align_size`,
        `data.align_select`); eval and export use it to align raw photos the same way. Raises
        UserError when the config says its data is not aligned (`data.align_template: null`)."""
        if not getattr(data_cfg, "align_template", None):
            raise UserError("data.align_template: null (the config's data is not aligned); set it, e.g. "
                            "--set data.align_template=arcface, to align raw photos on the fly")
        return cls(size=int(data_cfg.align_size), template=data_cfg.align_template,
                   select=data_cfg.align_select, no_face=no_face)

    def as_dict(self) -> dict:
        return {"size": self.size, "template": self.template, "select": self.select,
                "no_face": self.no_face, "center_crop": float(self.center_crop)}


@dataclass
class AlignResult:
    """Outcome for one image: the crop (None when skipped), status (aligned / center / skipped),
    number of faces found, and for aligned images the chosen face and the 2x3 image-to-crop matrix."""

    image: Optional[np.ndarray]
    status: str
    faces: int
    face: Optional[Face] = None
    matrix: Optional[np.ndarray] = None


def choose_face(faces: Sequence[Face], height: int, width: int, select: str = "center") -> Optional[int]:
    """Index of the face a dataset means: box centre nearest the image centre (``center``) or
    largest box (``largest``); ties go to the higher confidence; None when there is no face."""
    if not faces:
        return None
    if select == "largest":
        keys = [(-f.area, -f.confidence) for f in faces]
    elif select == "center":
        centre = np.array([(width - 1) / 2.0, (height - 1) / 2.0])
        keys = [(float(np.sum((f.centre - centre) ** 2)), -f.confidence) for f in faces]
    else:
        raise ValueError(f"select: expected one of {', '.join(SELECT_CHOICES)}, received {select!r}")
    return min(range(len(faces)), key=lambda i: keys[i])


def alignment_matrix(landmarks: np.ndarray, template: str, size: int) -> np.ndarray:
    """2x3 similarity taking the 5 `landmarks` [5, 2] to `template` at `size` (least squares)."""
    return estimate_similarity(landmarks, template_points(template, size))


def align_face(image: np.ndarray, landmarks: np.ndarray, template: str = "arcface",
               size: int = 112) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 ``[size, size, 3]`` crop, 2x3 matrix) of `image` aligned by its 5 `landmarks`."""
    matrix = alignment_matrix(landmarks, template, size)
    return warp_affine(image, matrix, size), matrix


def center_crop_matrix(height: int, width: int, size: int, fraction: float) -> np.ndarray:
    """2x3 matrix mapping the central square of ``fraction`` x the shorter side onto ``size``."""
    side = max(float(fraction) * min(height, width), 1.0)
    scale = size / side
    return np.array([[scale, 0.0, (size - 1) / 2.0 - scale * (width - 1) / 2.0],
                     [0.0, scale, (size - 1) / 2.0 - scale * (height - 1) / 2.0]])


def center_crop(image: np.ndarray, size: int, fraction: float = DEFAULT_CENTER_CROP) -> np.ndarray:
    """uint8 ``[size, size, 3]``: the central square of `fraction` x the shorter side, resized."""
    h, w = np.asarray(image).shape[:2]
    return warp_affine(image, center_crop_matrix(h, w, size, fraction), size)


def align_decoded(image: np.ndarray, faces: Sequence[Face], spec: AlignSpec) -> AlignResult:
    """Align one decoded image given its detections (steps 2-4 of the module doc)."""
    h, w = image.shape[:2]
    chosen = choose_face(faces, h, w, spec.select)
    if chosen is not None:
        try:
            crop, matrix = align_face(image, faces[chosen].landmarks, spec.template, spec.size)
            return AlignResult(crop, ALIGNED, len(faces), faces[chosen], matrix)
        except (ValueError, np.linalg.LinAlgError):  # degenerate landmarks: treat as no usable face
            pass
    if spec.no_face == "center":
        return AlignResult(center_crop(image, spec.size, spec.center_crop), CENTER, len(faces))
    return AlignResult(None, SKIPPED, len(faces))


def align_images(images: Sequence[np.ndarray], spec: AlignSpec,
                 detector: Optional[FaceDetector] = None) -> list[AlignResult]:
    """Detect (one batched detector call) and align decoded uint8 ``[H, W, 3]`` images."""
    images = [np.asarray(im) for im in images]
    if not images:
        return []
    detector = detector or make_detector()
    detections = detector.detect(images)
    return [align_decoded(im, faces, spec) for im, faces in zip(images, detections)]


def decode_file(path: str, pillow: bool = False) -> np.ndarray:
    """uint8 ``[H, W, 3]`` of an image file, decoded as the data pipeline decodes it (TensorFlow,
    or Pillow for formats TensorFlow lacks); UserError naming the file when it cannot be read."""
    from mobilenet_embed.data import decode

    if pillow:
        try:
            return decode.pillow_decode_file(path)
        except Exception as exc:  # noqa: BLE001 - any decode failure is the file's fault
            raise UserError(f"{path}: unreadable image ({exc})") from None
    import tensorflow as tf

    try:
        return decode.decode_image_bytes(tf.io.read_file(path)).numpy()
    except (tf.errors.OpError, ValueError) as exc:
        raise UserError(f"{path}: unreadable image ({decode.clean_tf_message(exc)})") from None


def iter_aligned(paths: Sequence[str], spec: AlignSpec, detector: Optional[FaceDetector] = None,
                 batch_size: int = 16, pillow: Optional[Sequence[bool]] = None
                 ) -> Iterator[tuple[list[str], list[AlignResult]]]:
    """(paths, results) per batch of `batch_size` files, in order: decode (the next batch is decoded
    in a background thread while the detector runs), one detector call, align.

    `pillow`: per path, True to decode with Pillow (from `decode.check_files`; default: by
    extension). A file that cannot be decoded is a UserError naming it: check files first
    (`mobilenet_embed.data.check_files`) to skip bad ones instead.
    """
    from mobilenet_embed.data import decode

    if batch_size < 1:
        raise UserError(f"batch size: expected an integer >= 1, received {batch_size}")
    paths = [str(p) for p in paths]
    if pillow is None:
        pillow = [decode.route_by_extension(p) == decode.ROUTE_PILLOW for p in paths]
    if paths and detector is None:
        detector = make_detector()
    batches = [list(range(i, min(i + batch_size, len(paths)))) for i in range(0, len(paths), batch_size)]

    def load(rows: list[int]) -> list[np.ndarray]:
        return [decode_file(paths[r], bool(pillow[r])) for r in rows]

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(load, batches[0]) if batches else None
        for n, rows in enumerate(batches):
            images = pending.result()
            pending = pool.submit(load, batches[n + 1]) if n + 1 < len(batches) else None
            yield [paths[r] for r in rows], align_images(images, spec, detector)


def stack_crops(results: Iterable[AlignResult]) -> np.ndarray:
    """uint8 ``[N, S, S, 3]`` of the crops of `results` (skipped images left out)."""
    crops = [r.image for r in results if r.image is not None]
    if not crops:
        raise UserError("no image could be aligned")
    return np.stack(crops)
