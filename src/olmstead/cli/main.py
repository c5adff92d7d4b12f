"""The ``olmstead`` command."""

from __future__ import annotations

import logging

import click

__all__ = ["main"]


@click.group()
@click.option("-v", "--verbose", is_flag=True, help="Show olmstead's log as well.")
def main(verbose: bool) -> None:
    """olmstead: Matrix end-to-end encryption whose keys never drift silently."""
    logging.basicConfig(
        level=logging.INFO if verbose else logging.CRITICAL,
        format="%(levelname)s %(name)s: %(message)s",
    )


@main.command()
def demo() -> None:
    """Run a bot against a throwaway local Synapse, then break its keys three ways."""
    from olmstead.demo import run_demo

    run_demo(click.echo)
