"""The `mbembed` command line: a thin click layer over the library.

Each command parses its options, loads the config, calls one library function and prints a
summary. A `UserError` anywhere becomes one line `Error: <message>` and exit code 2.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import click

from mobilenet_embed import __version__
from mobilenet_embed.commands.align import align
from mobilenet_embed.commands.data import data_group, prepare
from mobilenet_embed.commands.eval import eval_command
from mobilenet_embed.commands.export import export
from mobilenet_embed.commands.gallery import enroll_command, gallery_group, search_command
from mobilenet_embed.commands.options import config_options
from mobilenet_embed.commands.train import train
from mobilenet_embed.config import Config, dump_yaml
from mobilenet_embed.errors import UserError


class ErrorHandlingGroup(click.Group):
    """A click group that turns UserError into `Error: ...` on stderr and exit code 2."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except UserError as exc:
            click.echo(f"Error: {exc}", err=True)
            ctx.exit(2)


def quiet_tensorflow() -> None:
    """Import TensorFlow without its C++ start-up chatter, unless the user set TF_CPP_MIN_LOG_LEVEL.

    TF 2.21 prints its oneDNN/CUDA notices through absl before logging is initialised, where
    TF_CPP_MIN_LOG_LEVEL has no effect, so stderr is muted for the duration of the import.
    Errors of the import itself still surface as Python exceptions afterwards.
    """
    if "TF_CPP_MIN_LOG_LEVEL" in os.environ or "tensorflow" in sys.modules:
        return
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    from mobilenet_embed.quiet import captured_fd2

    with captured_fd2():
        try:
            import tensorflow  # noqa: F401
        except Exception:  # pragma: no cover - shown again when the command imports it
            pass


@click.group(cls=ErrorHandlingGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mbembed")
@click.pass_context
def main(ctx: click.Context) -> None:
    """mbembed: train, evaluate and export MobileNet face-embedding models."""
    if ctx.invoked_subcommand not in (None, "config"):
        quiet_tensorflow()


@main.group()
def config() -> None:
    """Inspect configurations."""


@config.command("show")
@config_options
def config_show(cfg: Config) -> None:
    """Print the resolved config (defaults, file, --set) as YAML."""
    click.echo(dump_yaml(cfg), nl=False)


@main.group()
def model() -> None:
    """Inspect the embedding model."""


@model.command("summary")
@config_options
@click.option("--image-size", type=int, default=None,
              help="Input size (default: data.image_size of the config).")
@click.option("--layers/--no-layers", "show_layers", default=True, help="Print the layer table.")
def model_summary(cfg: Config, image_size: int | None, show_layers: bool) -> None:
    """Print layers, parameter count and multiply-adds of the configured model."""
    from mobilenet_embed.model import build_model_from_config, multiply_adds

    size = image_size if image_size is not None else cfg.data.image_size
    if size < 32:
        raise UserError(f"--image-size: expected an integer >= 32, received {size}")
    net = build_model_from_config(cfg.model, size)
    if show_layers:
        net.summary(print_fn=lambda line, **_: click.echo(line))
    trainable = sum(int(w.numpy().size) for w in net.trainable_weights)
    click.echo(f"input: {size}x{size}x3, alpha {cfg.model.alpha:g}, depth_multiplier "
               f"{cfg.model.depth_multiplier}, embedding {cfg.model.embedding_size}")
    click.echo(f"parameters: {net.count_params():,} ({trainable:,} trainable)")
    click.echo(f"multiply-adds: {multiply_adds(net):,}")


main.add_command(train)
main.add_command(export)
main.add_command(data_group)
main.add_command(prepare)
main.add_command(eval_command)

main.add_command(align)
main.add_command(enroll_command)
main.add_command(search_command)
main.add_command(gallery_group)


def run() -> None:
    """Console-script entry point."""
    main(prog_name="mbembed")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(run())
