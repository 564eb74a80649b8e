"""`mbembed train`: a thin layer over `mobilenet_embed.train.train`.

    mbembed train --config configs/quickstart.yaml [--set train.epochs=3] [--run-dir DIR] [--fresh [--force]]

Starting again on a run directory that holds a checkpoint resumes it; ``--fresh`` starts over and
refuses to overwrite a run without ``--force``. Exit codes: 0 finished, 2 user error (bad config,
bad data, non-finite loss), 130 interrupted (Ctrl-C / SIGTERM; a checkpoint was written).
"""

from __future__ import annotations

from typing import Optional

import click

from mobilenet_embed.commands.options import config_options
from mobilenet_embed.config import Config


@click.command("train")
@config_options
@click.option("--run-dir", default=None, type=click.Path(file_okay=False),
              help="Run directory (default: run_dir of the config).")
@click.option("--fresh", is_flag=True, help="Start over instead of resuming the run directory's checkpoint.")
@click.option("--force", is_flag=True, help="With --fresh: overwrite an existing run directory.")
def train(cfg: Config, run_dir: Optional[str], fresh: bool, force: bool) -> None:
    """Train the embedding model with a triplet loss or a margin head (resumes a run directory's checkpoint)."""
    from mobilenet_embed.train import train as run_training

    if force and not fresh:
        raise click.UsageError("--force only applies with --fresh")
    try:
        result = run_training(cfg, run_dir=run_dir, fresh=fresh, force=force)
    except KeyboardInterrupt:
        click.echo("aborted (the last checkpoint written is intact)", err=True)
        click.get_current_context().exit(130)
    click.echo("")
    for line in result.summary_lines():
        click.echo(line)
    if result.interrupted:
        click.get_current_context().exit(130)
