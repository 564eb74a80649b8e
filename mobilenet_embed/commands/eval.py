"""`mbembed eval`: verification metrics of a checkpoint or an exported model on pairs."""

from __future__ import annotations

from typing import Optional

import click

from mobilenet_embed.commands.options import config_options
from mobilenet_embed.config import Config
from mobilenet_embed.errors import UserError
from mobilenet_embed.out_folder import check_out_folder


@click.command("eval")
@config_options
@click.option("--checkpoint", default=None, metavar="PATH",
              help="Checkpoint file or directory, or a run directory (its best checkpoint, else its latest).")
@click.option("--model", default=None, metavar="PATH",
              help="An exported model instead: SavedModel directory, .tflite or .keras file.")
@click.option("--pairs", default=None, metavar="FILE", help="Pairs file (default: eval.pairs).")
@click.option("--pairs-root", default=None, metavar="DIR",
              help="Image folder the pairs (or the identification protocol) refer to, and --make-pairs draws from "
                   "(default: eval.data, else data.path).")
@click.option("--data", "old_data", default=None, metavar="DIR", hidden=True,
              help="Deprecated name of --pairs-root.")
@click.option("--make-pairs", "make_pairs", default=None, type=click.IntRange(1), metavar="N",
              help="Draw N same and N different pairs from --pairs-root (seeded), write them as pairs.txt, evaluate.")
@click.option("--strict-pairs", is_flag=True,
              help="Refuse a pairs file that names an unreadable image (default: skip those pairs, counted).")
@click.option("--out", "out_dir", default=None, metavar="DIR",
              help="Where metrics.json, roc.png and pair_distances.csv go (default: RUN_DIR/eval).")
@click.option("--threads", default=None, type=click.IntRange(1), help="TFLite interpreter threads.")
@click.option("--align", is_flag=True,
              help="The images are raw photos: detect and align each face as `mbembed align` does, to the "
                   "model's template (data.align_template / data.align_size); no face: centre-cropped, counted.")
@click.option("--protocol", default="verification", show_default=True,
              type=click.Choice(("verification", "identification")),
              help="verification: pairs (LFW); identification: gallery search (rank-k, DIR@FPIR).")
@click.option("--id-protocol", default=None, metavar="DIR",
              help="identification: folder with gallery.txt, probes.txt, distractors.txt.")
@click.option("--make-id-protocol", is_flag=True,
              help="identification: draw the protocol from --pairs-root (seeded), write it to OUT/protocol.")
@click.option("--gallery-per-identity", default=None, type=click.IntRange(1),
              help="identification, --make-id-protocol: gallery images per identity [1].")
@click.option("--gallery-mode", default=None, type=click.Choice(("images", "templates")),
              help="identification: keep each gallery image, or one averaged template per identity [images].")
def eval_command(cfg: Config, checkpoint: Optional[str], model: Optional[str], pairs: Optional[str],
                 pairs_root: Optional[str], old_data: Optional[str], make_pairs: Optional[int], strict_pairs: bool,
                 out_dir: Optional[str], threads: Optional[int], align: bool, protocol: str, id_protocol: Optional[str],
                 make_id_protocol: bool,
                 gallery_per_identity: Optional[int], gallery_mode: Optional[str]) -> None:
    """Face verification by the LFW protocol: 10-fold accuracy, VAL@FAR, AUC, EER, ROC plot.

    With --protocol identification: closed-set rank-1/5/10 and CMC, open-set DIR at FPIR
    1e-3/1e-2/1e-1 with distractors, DET plot (see mbembed.evaluate_identification).
    """
    if old_data is not None:
        if pairs_root is not None:
            raise UserError("mbembed eval: give --pairs-root only (--data is its old name)")
        click.echo("note: mbembed eval --data is now --pairs-root (the old name still works for now)", err=True)
        pairs_root = old_data
    if out_dir is not None:
        check_out_folder(out_dir)
    id_options = {"--id-protocol": id_protocol, "--make-id-protocol": make_id_protocol,
                  "--gallery-per-identity": gallery_per_identity, "--gallery-mode": gallery_mode}
    if protocol == "identification":
        from mobilenet_embed.evaluate_identification import evaluate_identification

        given = [k for k, v in (("--pairs", pairs), ("--make-pairs", make_pairs), ("--threads", threads),
                                ("--strict-pairs", strict_pairs)) if v]
        if given:
            raise UserError(f"--protocol identification: {', '.join(given)} only apply to verification")
        if gallery_per_identity is not None and not make_id_protocol:
            raise UserError("--gallery-per-identity: only with --make-id-protocol")
        result = evaluate_identification(cfg, checkpoint=checkpoint, model=model, protocol=id_protocol, data=pairs_root,
                                         out_dir=out_dir, make_protocol=make_id_protocol,
                                         gallery_per_identity=gallery_per_identity or 1,
                                         gallery_mode=gallery_mode or "images", align=align,
                                         log=lambda line: click.echo(line, err=True))
        click.echo(result.table())
        click.echo(f"wrote {', '.join(result.files.values())}")
        return
    given = [k for k, v in id_options.items() if v]
    if given:
        raise UserError(f"{', '.join(given)}: only with --protocol identification")
    from mobilenet_embed.evaluate import evaluate

    result = evaluate(cfg, checkpoint=checkpoint, model=model, pairs=pairs, pairs_root=pairs_root, out_dir=out_dir,
                      make_pairs=make_pairs, num_threads=threads, align=align, strict_pairs=strict_pairs,
                      log=lambda line: click.echo(line, err=True))
    click.echo(result.table())
    click.echo(f"wrote {', '.join(result.files.values())}")
