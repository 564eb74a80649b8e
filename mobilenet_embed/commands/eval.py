"""`mbembed eval`: verification metrics of a checkpoint or an exported model on pairs."""

from __future__ import annotations

from typing import Optional

import click

from mobilenet_embed.commands.options import config_options
from mobilenet_embed.config import Config


@click.command("eval")
@config_options
@click.option("--checkpoint", default=None, metavar="PATH",
              help="Checkpoint file or directory, or a run directory (its best checkpoint, else its latest).")
@click.option("--model", default=None, metavar="PATH",
              help="An exported model instead: SavedModel directory, .tflite or .keras file.")
@click.option("--pairs", default=None, metavar="FILE", help="Pairs file (default: eval.pairs).")
@click.option("--data", default=None, metavar="DIR",
              help="Image folder the pairs refer to (default: eval.data, else data.path).")
@click.option("--make-pairs", "make_pairs", default=None, type=click.IntRange(1), metavar="N",
              help="Draw N same and N different pairs from --data (seeded), write them as pairs.txt, evaluate.")
@click.option("--out", "out_dir", default=None, metavar="DIR",
              help="Where metrics.json, roc.png and pair_distances.csv go (default: RUN_DIR/eval).")
@click.option("--threads", default=None, type=click.IntRange(1), help="TFLite interpreter threads.")
def eval_command(cfg: Config, checkpoint: Optional[str], model: Optional[str], pairs: Optional[str],
                 data: Optional[str], make_pairs: Optional[int], out_dir: Optional[str],
                 threads: Optional[int]) -> None:
    """Face verification by the LFW protocol: 10-fold accuracy, VAL@FAR, AUC, EER, ROC plot."""
    from mobilenet_embed.evaluate import evaluate

    result = evaluate(cfg, checkpoint=checkpoint, model=model, pairs=pairs, data=data, out_dir=out_dir,
                      make_pairs=make_pairs, num_threads=threads, log=lambda line: click.echo(line, err=True))
    click.echo(result.table())
    click.echo(f"wrote {', '.join(result.files.values())}")
