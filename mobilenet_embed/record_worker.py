"""`prepare`'s worker processes: image files read and encoded as records, without TensorFlow.

`mobilenet_embed.data.tfrecord_write` starts these with the 'spawn' context, so this module (and
`example_encode`) must import neither TensorFlow nor `mobilenet_embed.data` (whose package
imports TensorFlow, ~4 s and ~300 MB a process). Files Pillow must re-encode as PNG (PGM, TIFF,
...) are the exception: the first one a worker meets imports `mobilenet_embed.data.decode`.
"""

from __future__ import annotations

import io
from typing import NamedTuple

from mobilenet_embed.example_encode import encode_example


class RecordJob(NamedTuple):
    """One image file to write as a record."""

    path: str  # the file to read
    pillow: bool  # re-encode as PNG (a format TensorFlow does not decode)
    label: int
    identity: str
    relpath: str  # stored as the record's ``path``


def _image_bytes(path: str, pillow: bool) -> bytes:
    if not pillow:
        with open(path, "rb") as fh:
            return fh.read()
    from PIL import Image

    from mobilenet_embed.data import decode

    buf = io.BytesIO()
    Image.fromarray(decode.pillow_decode_file(path)).save(buf, "PNG")
    return buf.getvalue()


def encode_files(jobs: list[RecordJob]) -> list[tuple[bytes, int, int]]:
    """Each job's file as ``(serialized record, offset of the image bytes in it, image length)``."""
    out = []
    for job in jobs:
        image = _image_bytes(job.path, job.pillow)
        record, image_at = encode_example(image, job.label, job.identity, job.relpath)
        out.append((record, image_at, len(image)))
    return out
