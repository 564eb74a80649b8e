"""`mbembed enroll`, `mbembed search`, `mbembed gallery show|remove`: a gallery index of identities.

    mbembed enroll --model M --data GALLERY_DIR --out INDEX [--mode images|templates] [--align]
    mbembed enroll --model M --embeddings EXPORT_DIR --out INDEX
    mbembed search --index INDEX IMAGES... [--top-k 5] [--threshold T | --far F [--metrics FILE]
                   | --fpir F --identification FILE] [--align]
    mbembed gallery show --index INDEX
    mbembed gallery remove --index INDEX NAME...
"""

from __future__ import annotations

import csv
import io
import json
import sys
from typing import Optional

import click

from mobilenet_embed.commands.options import config_options
from mobilenet_embed.config import Config
from mobilenet_embed.errors import UserError

OUTPUT_FORMATS = ("auto", "table", "jsonl", "csv")


@click.command("enroll")
@config_options
@click.option("--model", required=True, metavar="PATH",
              help="Checkpoint, run directory, .keras, SavedModel or .tflite (as mbembed eval takes).")
@click.option("--data", default=None, metavar="DIR", help="Identity folder: one sub-folder of images per person.")
@click.option("--embeddings", default=None, metavar="DIR",
              help="Instead of --data: an `mbembed export embeddings` folder (embeddings.npy + index.csv) "
                   "made with --model.")
@click.option("--out", "index", required=True, metavar="INDEX",
              help="Gallery folder; an existing one is appended to (same model only).")
@click.option("--mode", type=click.Choice(("images", "templates")), default=None,
              help="images: keep every image (an identity scores by its best); templates: one averaged "
                   "embedding per identity. New galleries: images.")
@click.option("--align", is_flag=True,
              help="The images are raw photos: detect and align each face as `mbembed align` does, to the "
                   "model's template (data.align_template / data.align_size); no face: centre-cropped, counted.")
def enroll_command(cfg: Config, model: str, data: Optional[str], embeddings: Optional[str], index: str,
                   mode: Optional[str], align: bool) -> None:
    """Enrol people into a gallery index (embeddings, names, sources, model fingerprint)."""
    from mobilenet_embed.gallery import enroll

    result = enroll(cfg, model, index, data=data, embeddings=embeddings, mode=mode, align=align,
                    log=lambda line: click.echo(line, err=True))
    skipped = f", {result.skipped_duplicates} already enrolled (skipped)" if result.skipped_duplicates else ""
    click.echo(f"enrolled {result.added_images} images ({result.new_identities} new identities){skipped}; "
               f"{index}: {result.n_identities} identities, {result.n_rows} rows ({result.seconds:.1f} s)")


def _resolve_threshold(index: str, model: Optional[str], threshold: Optional[float], far: Optional[float],
                       metrics: Optional[str], fpir: Optional[float], identification: Optional[str]
                       ) -> tuple[Optional[float], str]:
    """(threshold, how it was chosen) from --threshold, --far with eval metrics, or --fpir with
    identification metrics."""
    from mobilenet_embed.gallery import (default_metrics_path, load_gallery, threshold_from_eval,
                                         threshold_from_identification)

    chosen = [k for k, v in (("--threshold", threshold), ("--far", far), ("--fpir", fpir)) if v is not None]
    if len(chosen) > 1:
        raise UserError(f"mbembed search: give one of --threshold, --far and --fpir, not {' and '.join(chosen)}")
    if metrics is not None and far is None:
        raise UserError("mbembed search: --metrics is only used with --far F")
    if (identification is None) != (fpir is None):
        raise UserError("mbembed search: --fpir F and --identification FILE go together")
    if far is None and fpir is None:
        return threshold, (f"threshold {threshold:g}" if threshold is not None else
                           "no threshold: closed set (give --threshold T, --far F or --fpir F to say unknown)")
    gallery = load_gallery(index)
    distance = gallery.model["distance"]
    if fpir is not None:
        found = threshold_from_identification(identification, fpir, distance)
        if found["model_sha256"] != gallery.model["sha256"]:
            raise UserError(f"--identification {identification}: measured with another model than the gallery's")
        if found["n_gallery_identities"] != len(gallery.identities()):
            click.echo(f"Warning: {identification}: measured with a gallery of {found['n_gallery_identities']} "
                       f"identities, this one has {len(gallery.identities())}; FPIR grows with the gallery", err=True)
        return found["threshold"], (f"threshold {found['threshold']:.4f} ({distance}) for FPIR {fpir:g} "
                                    f"(achieved {found['fpir']:.4f} on {found['n_distractors']} distractors of "
                                    f"{found['source']})")
    if metrics is None:
        metrics = default_metrics_path(model or gallery.model["path"])
        if metrics is None:
            raise UserError(f"--far: no eval metrics found for the model {model or gallery.model['path']} "
                            "(run mbembed eval on it, or give --metrics METRICS_JSON)")
    found = threshold_from_eval(metrics, far, distance)
    for key in ("image_size", "crop_fraction", "flip"):
        if found.get(key) is not None and found[key] != gallery.model[key]:
            click.echo(f"Warning: {metrics}: eval {key} {found[key]!r} differs from the gallery's "
                       f"{gallery.model[key]!r}; the threshold may not hold", err=True)
    return found["threshold"], (f"threshold {found['threshold']:.4f} ({distance}) for FAR {far:g} "
                                f"(achieved {found['far']:.4f} on {found['n_different']} different pairs of "
                                f"{found['source']})")


def _table(results, top_k: int) -> str:
    width = max([len("query")] + [len(r.query) for r in results])
    lines = [f"{'query':<{width}}  {'identity':<24} {'distance':>8}  top-{top_k}"]
    for r in results:
        best = f"{r.matches[0].distance:.4f}" if r.matches else "-"
        top = ", ".join(f"{m.identity} {m.distance:.3f}" for m in r.matches)
        lines.append(f"{r.query:<{width}}  {r.identity or 'unknown':<24} {best:>8}  {top}")
    return "\n".join(lines)


def _csv(results) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["query", "decision", "rank", "identity", "distance", "source"])
    for r in results:
        for rank, m in enumerate(r.matches, 1):
            writer.writerow([r.query, r.identity or "unknown", rank, m.identity, repr(m.distance), m.source])
    return buf.getvalue().rstrip("\n")


@click.command("search")
@config_options
@click.option("--index", required=True, metavar="INDEX", help="Gallery folder written by mbembed enroll.")
@click.argument("images", nargs=-1, required=True, metavar="IMAGES...")
@click.option("--model", default=None, metavar="PATH",
              help="The gallery's model at another path (default: the path recorded at enrolment); "
                   "any other model is refused.")
@click.option("--top-k", default=5, show_default=True, type=click.IntRange(1), help="Identities per query.")
@click.option("--threshold", default=None, type=float, help="Unknown when the best distance is >= T.")
@click.option("--far", default=None, type=click.FloatRange(0, 1),
              help="Threshold at this false-accept rate of mbembed eval's different pairs.")
@click.option("--metrics", default=None, metavar="FILE",
              help="eval metrics.json (or its folder) for --far (default: the model's run's eval/metrics.json).")
@click.option("--fpir", default=None, type=click.FloatRange(0, 1),
              help="Threshold at this false-positive identification rate of an identification eval "
                   "(open set: the rate at which strangers are named).")
@click.option("--identification", default=None, metavar="FILE",
              help="identification.json (or its folder) of mbembed eval --protocol identification, for --fpir.")
@click.option("--backend", default="numpy", show_default=True,
              type=click.Choice(("numpy", "tensorflow", "faiss-flat", "faiss-ivf", "faiss-hnsw")),
              help="Search backend (faiss-*: pip install 'mobilenet-embed[search]').")
@click.option("--format", "fmt", default="auto", show_default=True, type=click.Choice(OUTPUT_FORMATS),
              help="auto: a table on a terminal, JSON lines otherwise.")
@click.option("--align", is_flag=True,
              help="The images are raw photos: detect and align each face as `mbembed align` does, to the "
                   "model's template (data.align_template / data.align_size); no face: centre-cropped, counted.")
def search_command(cfg: Config, index: str, images: tuple[str, ...], model: Optional[str], top_k: int,
                   threshold: Optional[float], far: Optional[float], metrics: Optional[str], fpir: Optional[float],
                   identification: Optional[str], backend: str, fmt: str, align: bool) -> None:
    """Who is on each image: the top-k enrolled identities, or "unknown" above the threshold."""
    from mobilenet_embed.gallery import search_images

    t, how = _resolve_threshold(index, model, threshold, far, metrics, fpir, identification)
    results, _ = search_images(cfg, index, images, model=model, top_k=top_k, threshold=t, backend=backend,
                               align=align, log=lambda line: click.echo(line, err=True))
    if fmt == "auto":
        fmt = "table" if sys.stdout.isatty() else "jsonl"
    if fmt == "table":
        click.echo(_table(results, top_k))
        click.echo(how)
    elif fmt == "jsonl":
        for r in results:
            click.echo(json.dumps(r.to_dict()))
        click.echo(how, err=True)
    else:
        click.echo(_csv(results))
        click.echo(how, err=True)
    unknown = sum(r.identity is None for r in results)
    click.echo(f"{len(results)} queries, {len(results) - unknown} identified, {unknown} unknown", err=True)


@click.group("gallery")
def gallery_group() -> None:
    """Inspect or edit a gallery index."""


@gallery_group.command("show")
@click.option("--index", required=True, metavar="INDEX", help="Gallery folder.")
def gallery_show(index: str) -> None:
    """Identities, rows, mode and model of a gallery."""
    from mobilenet_embed.gallery import load_gallery

    g = load_gallery(index)
    m = g.model
    click.echo(f"gallery {index}: {len(g.identities())} identities, {len(g.rows)} rows ({g.mode}), "
               f"generation {g.generation}")
    click.echo(f"model {m['path']} ({m['kind']}, sha256 {m['sha256'][:12]}), {m['image_size']}x{m['image_size']}, "
               f"crop {m['crop_fraction']:g}, flip {str(m['flip']).lower()}, {m['embedding_size']}-d, {m['distance']}")


@gallery_group.command("remove")
@click.option("--index", required=True, metavar="INDEX", help="Gallery folder.")
@click.argument("names", nargs=-1, required=True, metavar="NAME...")
def gallery_remove(index: str, names: tuple[str, ...]) -> None:
    """Remove identities (all their rows) from a gallery."""
    from mobilenet_embed.gallery import remove_identities

    n_ids, n_rows = remove_identities(index, list(names))
    click.echo(f"removed {n_ids} identities ({n_rows} rows) from {index}")
