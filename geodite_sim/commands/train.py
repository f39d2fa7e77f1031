"""``geodite-sim train DATA --config small --out model.ckpt``: see :mod:`geodite_sim.training.cli`."""

from __future__ import annotations

import argparse

from geodite_sim.training.cli import add_train_parser


def add_parser(sub: argparse._SubParsersAction) -> None:
    add_train_parser(sub)
