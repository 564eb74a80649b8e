"""`mbembed data check` and `mbembed prepare`: thin layers over `mobilenet_embed.data`.

    mbembed data check --config F [--set data.path=DIR ...]
    mbembed prepare --data DIR --out PREFIX --shards N [--config F] [--force]
"""

from __future__ import annotations

import time
from typing import Optional

import click

from mobilenet_embed.commands.options import config_options
from mobilenet_embed.config import Config


@click.group("data")
def data_group() -> None:
    """Inspect training data."""


@data_group.command("check")
@config_options
@click.option("--max-list", type=click.IntRange(min=0), default=None,
              help="List at most this many unreadable files (default: all).")
@click.option("--full", is_flag=True,
              help="Decode every image again: folder, ignoring the check cache; tfrecord, every record of the "
                   "shards (default: trust the shards `prepare` wrote: checksum, sizes and counts verified).")
def data_check(cfg: Config, max_list: Optional[int], full: bool) -> None:
    """Count identities and images, decode every image, list unreadable files with reasons.

    Exit code 2 when the data path is missing or empty, no identity has two readable images,
    or more than data.max_bad_fraction of the images are unreadable (training would refuse).
    """
    from mobilenet_embed.data import inspect_data, validate_report

    t0 = time.perf_counter()
    _, report = inspect_data(cfg.data, check=True, full=full)
    for line in report.summary_lines(max_bad=max_list):
        click.echo(line)
    validate_report(report, cfg.data)
    click.echo(f"ok: ready to train ({time.perf_counter() - t0:.1f} s)")


@click.command("prepare")
@config_options
@click.option("--data", "data_dir", required=True, type=click.Path(file_okay=False),
              help="Identity folder (one sub-folder of images per identity).")
@click.option("--out", "out_prefix", required=True,
              help="Output prefix: writes PREFIX-NNNNN-of-NNNNN.tfrecord and PREFIX.manifest.json "
                   "(local or any tf.io.gfile path).")
@click.option("--shards", type=click.IntRange(min=1), default=16, show_default=True,
              help="Number of shard files (at least the number of training workers).")
@click.option("--force", is_flag=True, help="Overwrite existing shards and manifest of this prefix.")
@click.option("--progress/--no-progress", default=True, help="Show a progress bar.")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="Shards written at once, and processes reading and encoding their records (default: one per "
                   "CPU core, at least 2); same output for any number.")
def prepare(cfg: Config, data_dir: str, out_prefix: str, shards: int, force: bool, progress: bool,
            workers: Optional[int]) -> None:
    """Write an identity folder as sharded TFRecords plus a JSON manifest (data.source: tfrecord).

    Every image is decoded first; unreadable files are skipped, counted and listed in the
    manifest. Identities with fewer than data.min_images_per_identity images are not written;
    identity lists of the config are not applied here (they apply when training reads the shards).
    """
    from mobilenet_embed.data import prepare_tfrecords

    result = prepare_tfrecords(cfg.data, data_dir, out_prefix, shards, force=force, seed=cfg.seed,
                               progress=progress, log=click.echo, workers=workers)
    click.echo(f"wrote {result['images']:,} images of {result['identities']:,} identities into "
               f"{result['shards']} shards ({result['bytes'] / 1e6:,.1f} MB) in {result['seconds']:.1f} s ({result['workers']} at once); "
               f"skipped {result['bad_files']:,} unreadable files and {result['small_identities_skipped']:,} "
               f"identities with fewer than {result['min_images_per_identity']} images; re-encoded "
               f"{result['reencoded_png']:,} as PNG")
    click.echo(f"manifest: {result['manifest']}")
    click.echo(f"train with: --set data.source=tfrecord --set 'data.path={out_prefix}-*.tfrecord'")
