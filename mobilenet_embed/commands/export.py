"""`mbembed export`: SavedModel / TFLite files with a parity report, and `mbembed export embeddings`.

    mbembed export --config F --checkpoint C --out DIR [--format tflite_int8 ...] [--pairs P]
    mbembed export embeddings --config F --checkpoint C --data DIR --out PATH

`export` is a click group that runs the model export itself when no subcommand follows, so both
spellings work. The options of `embeddings` go after the word `embeddings`. Both hold the --out
folder's lock (`mobilenet_embed.runlock`, as `train` holds its run directory's): a second export
into the same folder stops with one line naming the first.
"""

from __future__ import annotations

from typing import Optional

import click

from mobilenet_embed.commands.options import config_file_option, config_options, set_option
from mobilenet_embed.config import Config, load_config
from mobilenet_embed.errors import UserError
from mobilenet_embed.export_formats import FORMATS
from mobilenet_embed.out_folder import check_out_folder
from mobilenet_embed.runlock import RunLock


def _out_lock(out: str) -> RunLock:
    """The --out folder's lock (after the check that --out is no file); its notes (a stale lock
    taken over) go to stderr."""
    check_out_folder(out)
    return RunLock(out, log=lambda line: click.echo(line, err=True))


@click.group("export", invoke_without_command=True)
@config_file_option
@set_option
@click.option("--checkpoint", default=None, metavar="PATH",
              help="Checkpoint file, checkpoint directory or run directory (its best checkpoint, "
                   "else its latest).")
@click.option("--out", "out_dir", default=None, metavar="DIR",
              help="Output folder: one export, replaced whole (new, empty or an earlier export).")
@click.option("--format", "formats", multiple=True, type=click.Choice(FORMATS),
              help="Format to write (repeatable; default: export.formats of the config).")
@click.option("--force", is_flag=True, help="Replace an earlier export in --out (all of it).")
@click.option("--allow-degraded", is_flag=True,
              help="Keep a format that misses its parity target (and exit 0).")
@click.option("--pairs", default=None, metavar="FILE",
              help="Pairs file: also report each format's verification accuracy.")
@click.option("--pairs-root", default=None, metavar="DIR",
              help="Image folder of --pairs (default: eval.data, else data.path).")
@click.option("--latency-runs", default=30, show_default=True, type=click.IntRange(1),
              help="Timed single-image calls per format (median reported).")
@click.pass_context
def export(ctx: click.Context, config_path: Optional[str], overrides: tuple[str, ...],
           checkpoint: Optional[str], out_dir: Optional[str], formats: tuple[str, ...], force: bool,
           allow_degraded: bool, pairs: Optional[str], pairs_root: Optional[str],
           latency_runs: int) -> None:
    """Export a checkpoint as SavedModel / TFLite files and check them against the Keras model.

    Writes the formats of export.formats (or --format) under --out, then export_report.json:
    size, cosine similarity to the Keras model on held-out images, latency (and with --pairs
    verification accuracy) of each format. --out is one export, replaced whole (--force).

    Exit codes: 0 done; 1 a format missed its parity target and was not written (a
    "Not written:" line; --allow-degraded keeps it and exits 0); 2 an Error: line (bad input).
    """
    if ctx.invoked_subcommand is not None:
        given = [name for name, value in (("--config", config_path), ("--set", overrides),
                                          ("--checkpoint", checkpoint), ("--out", out_dir),
                                          ("--format", formats), ("--pairs", pairs))
                 if value]
        if given:
            raise UserError(f"mbembed export {ctx.invoked_subcommand}: put {', '.join(given)} after "
                            f"'{ctx.invoked_subcommand}'")
        return
    missing = [name for name, value in (("--checkpoint", checkpoint), ("--out", out_dir)) if not value]
    if missing:
        raise UserError(f"mbembed export: {' and '.join(missing)} required "
                        "(mbembed export --help)")
    from mobilenet_embed.export import export_model

    cfg = load_config(config_path, overrides)
    with _out_lock(out_dir):
        report = export_model(cfg, checkpoint, out_dir, formats=list(formats) or None, force=force,
                              allow_degraded=allow_degraded, pairs=pairs, pairs_root=pairs_root,
                              latency_runs=latency_runs, log=lambda line: click.echo(line, err=True))
    click.echo(report.table())
    for line in report.input_notes():
        click.echo(line)
    click.echo(f"report: {report.report_path}")
    for line in report.parity_warnings():
        click.echo(line, err=True)
    if not report.passed and not allow_degraded:
        ctx.exit(1)


@export.command("embeddings")
@config_options
@click.option("--checkpoint", required=True, metavar="PATH",
              help="Checkpoint, run directory, exported SavedModel or .tflite file.")
@click.option("--data", "data_dir", required=True, metavar="DIR",
              help="Identity folder, TFRecord shards (file, glob or folder) or 'synthetic'.")
@click.option("--out", required=True, metavar="DIR",
              help="Output folder for embeddings.npy and index.csv.")
@click.option("--force", is_flag=True, help="Replace existing embeddings.npy / index.csv.")
@click.option("--chunk-size", default=1024, show_default=True, type=click.IntRange(1),
              help="Images per resumable chunk.")
@click.option("--batch-size", default=None, type=click.IntRange(1),
              help="Images per inference batch (default: the model kind's).")
@click.option("--threads", default=None, type=click.IntRange(1), help="TFLite interpreter threads.")
@click.option("--progress/--no-progress", default=True, help="Show a progress bar.")
@click.option("--align", is_flag=True,
              help="--data holds raw photos: detect and align each face as `mbembed align` does, to the model's "
                   "template (data.align_template / data.align_size); no face: centre-cropped, counted.")
def export_embeddings_command(cfg: Config, checkpoint: str, data_dir: str, out: str, force: bool,
                              chunk_size: int, batch_size: Optional[int], threads: Optional[int],
                              progress: bool, align: bool) -> None:
    """Embed every image of a folder: embeddings.npy (float32 [N, D]) + index.csv (row, path, identity).

    Resumable: a run that is killed continues where it stopped when run again (finished chunks
    of --chunk-size images are kept under OUT/.chunks/).
    """
    from mobilenet_embed.export_embeddings import export_embeddings

    with _out_lock(out):
        result = export_embeddings(cfg, checkpoint, data_dir, out, force=force, chunk_size=chunk_size,
                                   batch_size=batch_size, num_threads=threads,
                                   progress=progress, align=align, log=lambda line: click.echo(line, err=True))
    if result.align is not None:
        from mobilenet_embed.align.inference import align_line

        click.echo(align_line(result.align), err=True)
    if result.skipped:
        click.echo(f"Warning: {len(result.skipped)} unreadable image(s) left out, e.g. "
                   f"{result.skipped[0]}", err=True)
    reused = f", {result.reused_chunks} of {result.chunks} chunks reused" if result.reused_chunks else ""
    click.echo(f"embedded {result.n_images} images -> {result.embeddings_path} "
               f"[{result.n_images}, {result.embedding_size}] and {result.index_path} "
               f"({result.seconds:.1f} s{reused})")
