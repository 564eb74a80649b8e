"""Options shared by the `mbembed` commands (here, not in `cli.py`, so that commands never import
the CLI module that imports them)."""

from __future__ import annotations

import functools
from typing import Any, Callable

import click

from mobilenet_embed.config import load_config

config_file_option = click.option(
    "--config", "-c", "config_path", type=click.Path(dir_okay=False), default=None,
    help="YAML config file (defaults in code when omitted).")
set_option = click.option(
    "--set", "overrides", multiple=True, metavar="KEY=VALUE",
    help="Override one config key, value parsed as YAML (repeatable): --set train.epochs=3")


def config_options(func: Callable) -> Callable:
    """Add `--config FILE` and repeatable `--set key=value`, passed on as `cfg: Config`."""

    @config_file_option
    @set_option
    @functools.wraps(func)
    def wrapper(*args: Any, config_path: str | None, overrides: tuple[str, ...], **kwargs: Any) -> Any:
        return func(*args, cfg=load_config(config_path, overrides), **kwargs)

    return wrapper
