"""On-the-fly alignment for evaluation and export: raw photos -> the model's input batches.

`aligned_batches(data_cfg, paths, batch_size)` is the aligned counterpart of
`mobilenet_embed.data.images_dataset`: preprocessed float32 ``[B, S, S, 3]`` batches in the
order of `paths`, made by the code of `mbembed align` (`alignment.iter_aligned`: detect, choose
the face by `data.align_select`, warp to `data.align_template` at `data.align_size`) followed by
the one preprocessing function (`preprocess_images`: central `data.crop_fraction`, resize to
`data.image_size`, [-1, 1]). So a model trained on `mbembed align` output sees the same input
from raw photos. An image without a face cannot be left out of a pair: it is centre-cropped
(`AlignSpec.center_crop` of the shorter side) and counted in `AlignCounts`.

`aligned_source` is what `mbembed eval --align` and `export embeddings --align` call: the
batch function for a model's data config (or an error when the model records no alignment), and
`align_summary` what they report.

Flip test-time augmentation: mirror each yielded batch (`mobilenet_embed.data.flip_images`)
rather than asking twice, so each photo goes through the detector once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional, Sequence

import numpy as np

from mobilenet_embed.align.alignment import ALIGNED, AlignSpec, iter_aligned
from mobilenet_embed.align.detector import FaceDetector
from mobilenet_embed.errors import UserError


@dataclass
class AlignCounts:
    """What on-the-fly alignment did: images aligned, centre-cropped for want of a face, and
    images where several faces were found (the one `data.align_select` names was used)."""

    aligned: int = 0
    no_face: int = 0
    several_faces: int = 0
    no_face_paths: list = field(default_factory=list)

    def summary(self) -> str:
        return (f"aligned {self.aligned:,}, no face {self.no_face:,} (centre-cropped), "
                f"several faces {self.several_faces:,}")


def aligned_batches(data_cfg, paths: Sequence[str], batch_size: int = 64, detector: Optional[FaceDetector] = None,
                    counts: Optional[AlignCounts] = None, check: bool = True) -> Iterator[np.ndarray]:
    """Preprocessed float32 ``[B, S, S, 3]`` batches of the photos at `paths`, aligned as the
    config's data were (`AlignSpec.from_data_config`); see the module doc.

    Files are decode-checked first (cached by `data.check_cache`) unless ``check=False``: an
    unreadable file is a UserError naming it, as in `images_dataset`. `counts`, when given, is
    filled in as batches are produced.
    """
    from mobilenet_embed.data import check_files, decode, preprocess_images

    spec = AlignSpec.from_data_config(data_cfg, no_face="center")
    paths = [str(p) for p in paths]
    if batch_size < 1:
        raise UserError(f"batch_size: expected an integer >= 1, received {batch_size}")
    if check and paths:
        result = check_files(paths, getattr(data_cfg, "check_cache", None))
        bad = [(p, result.results[p].reason) for p in paths if not result.results[p].ok]
        if bad:
            more = f" (and {len(bad) - 1} more unreadable images)" if len(bad) > 1 else ""
            raise UserError(f"{bad[0][0]}: unreadable image: {bad[0][1]}{more}")
        pillow = [result.results[p].route == decode.ROUTE_PILLOW for p in paths]
    else:
        pillow = None
    counts = counts if counts is not None else AlignCounts()
    for batch_paths, results in iter_aligned(paths, spec, detector, batch_size, pillow):
        for p, r in zip(batch_paths, results):
            if r.status == ALIGNED:
                counts.aligned += 1
            else:
                counts.no_face += 1
                counts.no_face_paths.append(p)
            counts.several_faces += int(r.faces > 1)
        crops = np.stack([r.image for r in results])
        yield preprocess_images(crops, data_cfg.image_size, data_cfg.crop_fraction).numpy()


def aligned_source(data_cfg, align: bool, batch_size: int, log: Callable[[str], None], check: bool = True):
    """(`batches` for `verification.embed_paths`, `AlignCounts`) aligning raw photos to the model's
    template when `align` (files decode-checked first unless not `check`), else (None, None);
    UserError when the model records no alignment."""
    if not align:
        if data_cfg.align_template:
            log(f"note: the model expects faces aligned to {data_cfg.align_template} {data_cfg.align_size}: the "
                "images are taken as aligned already (mbembed align); pass --align for raw photos")
        return None, None
    if not data_cfg.align_template:
        raise UserError("--align: the model records no alignment (data.align_template: null); state the one "
                        "its training faces had, e.g. --set data.align_template=arcface --set data.align_size=112")
    from mobilenet_embed.align.detector import make_detector

    counts, detector = AlignCounts(), make_detector()
    return (lambda paths: aligned_batches(data_cfg, paths, batch_size, detector=detector, counts=counts,
                                          check=check)), counts


def align_summary(data_cfg, counts) -> dict:
    """What on-the-fly alignment did, for a results file (first 100 images without a face)."""
    return {"template": data_cfg.align_template, "size": int(data_cfg.align_size),
            "select": data_cfg.align_select, "aligned": counts.aligned, "no_face": counts.no_face,
            "no_face_handling": "center", "several_faces": counts.several_faces,
            "no_face_paths": [str(p) for p in counts.no_face_paths[:100]]}


def align_line(summary: dict) -> str:
    """The one line `eval --align` and `export embeddings --align` print from `align_summary`."""
    example = f", e.g. {summary['no_face_paths'][0]}" if summary["no_face_paths"] else ""
    return (f"alignment ({summary['template']} {summary['size']}): aligned {summary['aligned']:,}, "
            f"no face {summary['no_face']:,} (centre-cropped{example}), several faces {summary['several_faces']:,}")
