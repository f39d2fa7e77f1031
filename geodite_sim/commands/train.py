"""``geodite-sim train DATA --config small --out model.ckpt``: see :mod:`geodite_sim.training.cli`."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    from geodite_sim.training.cli import add_train_parser

    add_train_parser(sub)
