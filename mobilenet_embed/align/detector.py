"""The face detector behind one small interface, so that another detector can replace MTCNN.

A detector is any object with ``detect(images) -> list[list[Face]]``: for a list of uint8
``[H, W, 3]`` RGB arrays, the faces found in each (see `FaceDetector`). `make_detector(name)`
builds a registered one; today ``mtcnn`` (the `mtcnn` package, MIT, TensorFlow-native, its P/R/O
network weights inside the wheel), run through its batch interface.

`MtcnnDetector` calls ``MTCNN.detect_faces`` once per group of images of the same shape (the
package pads a mixed batch to its largest image, which costs time for nothing) with
``output_type="numpy"`` (landmarks as floats: the JSON output rounds them to integers).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Protocol, Sequence

import numpy as np


@dataclass(frozen=True)
class Face:
    """One detection: box ``[x1, y1, x2, y2]``, confidence in [0, 1], landmarks ``[5, 2]`` (x, y):
    left eye, right eye, nose, left and right mouth corners (left = smaller x in the image)."""

    box: np.ndarray
    confidence: float
    landmarks: np.ndarray

    @property
    def area(self) -> float:
        return float(max(0.0, self.box[2] - self.box[0]) * max(0.0, self.box[3] - self.box[1]))

    @property
    def centre(self) -> np.ndarray:
        return np.array([(self.box[0] + self.box[2]) / 2.0, (self.box[1] + self.box[3]) / 2.0])


class FaceDetector(Protocol):
    """What `mobilenet_embed.align` needs of a detector."""

    name: str

    def detect(self, images: Sequence[np.ndarray]) -> list[list[Face]]:
        """Faces of each uint8 ``[H, W, 3]`` image, in input order (an empty list: no face)."""


def faces_from_mtcnn_rows(rows: np.ndarray, count: int) -> list[list[Face]]:
    """Faces per image from MTCNN's numpy output: rows ``[image, x1, y1, x2, y2, confidence,
    x_1..x_5, y_1..y_5]`` (landmark x's then y's) for `count` images."""
    out: list[list[Face]] = [[] for _ in range(count)]
    rows = np.asarray(rows, dtype=np.float64).reshape(-1, 16)
    for row in rows:
        landmarks = np.stack([row[6:11], row[11:16]], axis=1)
        out[int(row[0])].append(Face(box=row[1:5].copy(), confidence=float(row[5]), landmarks=landmarks))
    return out


class MtcnnDetector:
    """MTCNN (`mtcnn` package): face boxes, confidences and 5 landmarks.

    `min_face_size`: smallest face searched for, in pixels (MTCNN's default 20); `device`:
    TensorFlow device ("CPU:0", "GPU:0"; default: the first GPU if any, else the CPU).
    Images smaller than 2 x 12 pixels on a side are reported without faces (below MTCNN's
    smallest pyramid level).
    """

    name = "mtcnn"
    MIN_SIDE = 24

    def __init__(self, min_face_size: int = 20, device: Optional[str] = None):
        import tensorflow as tf
        from mtcnn import MTCNN

        if device is None:
            device = "GPU:0" if tf.config.list_physical_devices("GPU") else "CPU:0"
        self.min_face_size = int(min_face_size)
        self.device = device
        self._mtcnn = MTCNN(device=device)

    @property
    def settings(self) -> dict:
        """What changes its detections (recorded by `align_folder`'s journal)."""
        return {"min_face_size": self.min_face_size}

    def detect(self, images: Sequence[np.ndarray]) -> list[list[Face]]:
        images = [np.asarray(im) for im in images]
        out: list[list[Face]] = [[] for _ in images]
        groups: dict[tuple, list[int]] = {}
        for i, im in enumerate(images):
            if min(im.shape[:2]) >= self.MIN_SIDE:
                groups.setdefault(tuple(im.shape), []).append(i)
        for members in groups.values():
            rows = self._mtcnn.detect_faces([images[i] for i in members], box_format="xyxy",
                                            output_type="numpy", min_face_size=self.min_face_size)
            for i, faces in zip(members, faces_from_mtcnn_rows(rows, len(members))):
                out[i] = faces
        return out


DETECTORS: dict[str, Callable[..., FaceDetector]] = {"mtcnn": MtcnnDetector}


def make_detector(name: str = "mtcnn", **kwargs) -> FaceDetector:
    """A registered detector by name (``mtcnn``); keyword arguments go to its constructor."""
    if name not in DETECTORS:
        raise ValueError(f"unknown face detector {name!r}; expected one of {', '.join(DETECTORS)}")
    return DETECTORS[name](**kwargs)
