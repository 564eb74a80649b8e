"""`mbembed eval`: verification metrics of a checkpoint or an exported model on pairs."""

from __future__ import annotations

from typing import Optional

import click

from mobilenet_embed.commands.options import config_options
from mobilenet_embed.config import Config
from mobilenet_embed.errors import UserError


@click.command("eval")
@config_options
@click.option("--checkpoint", default=None, metavar="PATH",
              help="Checkpoint file or directory, or a run directory (its best checkpoint, else its latest).")
@click.option("--model", default=None, metavar="PATH",
              help="An exported model instead: SavedModel directory, .tflite or .keras file.")
@click.option("--pairs", default=None, metavar="FILE", help="Pairs file (default: eval.pairs).")
@click.option("--pairs-root", default=None, metavar="DIR",
              help="Image folder the pairs refer to, and --make-pairs draws from (default: eval.data, else data.path).")
@click.option("--data", "old_data", default=None, metavar="DIR", hidden=True,
              help="Deprecated name of --pairs-root.")
@click.option("--make-pairs", "make_pairs", default=None, type=click.IntRange(1), metavar="N",
              help="Draw N same and N different pairs from --pairs-root (seeded), write them as pairs.txt, evaluate.")
@click.option("--out", "out_dir", default=None, metavar="DIR",
              help="Where metrics.json, roc.png and pair_distances.csv go (default: RUN_DIR/eval).")
@click.option("--threads", default=None, type=click.IntRange(1), help="TFLite interpreter threads.")
def eval_command(cfg: Config, checkpoint: Optional[str], model: Optional[str], pairs: Optional[str],
                 pairs_root: Optional[str], old_data: Optional[str], make_pairs: Optional[int],
                 out_dir: Optional[str], threads: Optional[int]) -> None:
    """Face verification by the LFW protocol: 10-fold accuracy, VAL@FAR, AUC, EER, ROC plot."""
    from mobilenet_embed.evaluate import evaluate

    if old_data is not None:
        if pairs_root is not None:
            raise UserError("mbembed eval: give --pairs-root only (--data is its old name)")
        click.echo("note: mbembed eval --data is now --pairs-root (the old name still works for now)", err=True)
        pairs_root = old_data
    result = evaluate(cfg, checkpoint=checkpoint, model=model, pairs=pairs, pairs_root=pairs_root, out_dir=out_dir,
                      make_pairs=make_pairs, num_threads=threads, log=lambda line: click.echo(line, err=True))
    click.echo(result.table())
    click.echo(f"wrote {', '.join(result.files.values())}")
