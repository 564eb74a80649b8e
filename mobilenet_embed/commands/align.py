"""`mbembed align`: a folder of raw photos -> a training-ready folder of aligned face crops.

    mbembed align --data RAW --out ALIGNED [--size 112] [--template arcface|loose]
                  [--select center|largest] [--no-face skip|center] [--center-crop F]
                  [--batch-size 16] [--min-face-size 20] [--config F] [--set k=v ...]
"""

from __future__ import annotations

from typing import Optional

import click

from mobilenet_embed.align.alignment import DEFAULT_CENTER_CROP, NO_FACE_CHOICES, SELECT_CHOICES
from mobilenet_embed.align.templates import TEMPLATE_NAMES
from mobilenet_embed.commands.options import config_options
from mobilenet_embed.config import Config
from mobilenet_embed.errors import UserError


@click.command("align")
@config_options
@click.option("--data", "data_dir", required=True, type=click.Path(file_okay=False),
              help="Identity folder of raw photos (one sub-folder per identity).")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Output folder (same identity/file layout); a run into it continues where the last stopped.")
@click.option("--size", type=click.IntRange(min=16), default=None,
              help="Crop size in pixels (default: data.align_size of the config, 112).")
@click.option("--template", type=click.Choice(TEMPLATE_NAMES), default=None,
              help="Landmark template (default: data.align_template of the config, else arcface).")
@click.option("--select", type=click.Choice(SELECT_CHOICES), default=None,
              help="Face kept when there are several: nearest the image centre (LFW) or largest "
                   "(default: data.align_select, center).")
@click.option("--no-face", "no_face", type=click.Choice(NO_FACE_CHOICES), default="center", show_default=True,
              help="Images without a face: leave out, or write their central crop (counted either way).")
@click.option("--center-crop", type=click.FloatRange(0.0, 1.0, min_open=True), default=None,
              help=f"--no-face center: central fraction of the shorter side kept [default: {DEFAULT_CENTER_CROP}].")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True,
              help="Images per detector call.")
@click.option("--min-face-size", type=click.IntRange(min=8), default=20, show_default=True,
              help="Smallest face searched for, in pixels.")
@click.option("--progress/--no-progress", default=True, help="Show a progress bar.")
def align(cfg: Config, data_dir: str, out_dir: str, size: Optional[int], template: Optional[str],
          select: Optional[str], no_face: str, center_crop: Optional[float], batch_size: int,
          min_face_size: int, progress: bool) -> None:
    """Detect faces (MTCNN), align each image's face by its 5 landmarks, write the same layout.

    Writes OUT/<identity>/<file> crops, OUT/align_journal.jsonl (what is done: a killed run,
    started again, skips it) and OUT/align_report.json (aligned, no face, several faces,
    unreadable, time). Unreadable files are listed and left out, as `mbembed data check` lists them.
    Exit code 2 for a missing or empty --data, --out inside --data, or an --out aligned with
    other settings; 130 when interrupted (run again to continue).
    """
    from mobilenet_embed.align.alignment import AlignSpec
    from mobilenet_embed.align.detector import make_detector
    from mobilenet_embed.align.folder import REPORT, align_folder

    if center_crop is not None and no_face != "center":
        raise UserError(f"--center-crop {center_crop:g}: only used with --no-face center (received --no-face {no_face})")
    spec = AlignSpec(size=size if size is not None else cfg.data.align_size,
                     template=template or cfg.data.align_template or "arcface",
                     select=select or cfg.data.align_select, no_face=no_face,
                     center_crop=center_crop if center_crop is not None else DEFAULT_CENTER_CROP)
    click.echo(f"settings: {spec.size}x{spec.size}, template {spec.template}, face {spec.select}, "
               f"no face: {spec.no_face}, batches of {batch_size}")
    try:
        report = align_folder(data_dir, out_dir, spec, make_detector("mtcnn", min_face_size=min_face_size),
                              batch_size=batch_size, check_cache=cfg.data.check_cache, progress=progress,
                              log=click.echo)
    except KeyboardInterrupt:
        click.echo(f"interrupted: what is done is kept in {out_dir}; run the same command again to continue",
                   err=True)
        raise SystemExit(130)
    run = report["this_run"]
    rate = run["processed"] / run["seconds"] if run["seconds"] else 0.0
    click.echo(f"this run: {run['processed']:,} images in {run['seconds']:.1f} s ({rate:.1f} img/s), "
               f"{run['resumed']:,} done before")
    click.echo(f"aligned {report['aligned']:,}, no face {report['no_face']:,} "
               f"({report['no_face_center_cropped']:,} centre-cropped, {report['no_face_skipped']:,} skipped), "
               f"several faces {report['several_faces']:,}, unreadable {report['unreadable']:,} "
               f"of {report['images']:,} images")
    click.echo(f"wrote {report['written']:,} crops to {out_dir}; report {out_dir}/{REPORT}")
    click.echo(f"train on them with: --set data.source=folder --set data.path={out_dir} "
               f"--set data.align_template={spec.template} --set data.align_size={spec.size} --set data.crop_fraction=1.0")
