"""``geodite-sim train``: train (or fine-tune, or resume) a Geodite model on labelled structures.

Wire into the main CLI with::

    from geodite_sim.training.cli import add_train_parser
    add_train_parser(subparsers)          # registers "train"; args.func(args) runs it

Until then: ``python -m geodite_sim.training DATA ... --out model.ckpt``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from geodite_sim.training.configs import PRESETS, get_preset

EXAMPLES = """examples:
  geodite-sim train data/train.extxyz --config small --out model.ckpt
  geodite-sim train train.extxyz --config tiny --epochs 5 --out tiny.ckpt          # smoke run
  geodite-sim train more.extxyz --init geodite-mini --out finetuned.ckpt --epochs 10 # fine-tune
  geodite-sim train train.extxyz --config small --out model.ckpt --resume model.ckpt.train/last.ckpt

Data: extxyz (energy/forces/stress as written by ASE's SinglePointCalculator) or HDF5
(see geodite_sim.training.data). Training state goes to --workdir (default <out>.train/):
last.ckpt (resumable, official checkpoint format) and history.json. --out receives the
EMA weights in the official format, loadable with geodite_sim.load_model(path).
"""


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("data", nargs="+", help="labelled structure files (extxyz or HDF5)")
    p.add_argument("--config", default="small", choices=sorted(PRESETS), help="named preset (default: small)")
    p.add_argument("--out", required=True, help="output checkpoint (EMA weights, official format)")
    p.add_argument("--init", default=None, help="start from this checkpoint or packaged model name (fine-tuning)")
    p.add_argument("--refit-e0", action="store_true", help="with --init: refit E0 on the new data")
    p.add_argument("--resume", default=None, help="continue from a training checkpoint (last.ckpt)")
    p.add_argument("--workdir", default=None, help="training state folder (default: <out>.train)")
    p.add_argument("--val-data", default=None, help="explicit validation file (default: a random split)")
    g = p.add_argument_group("training overrides")
    g.add_argument("--epochs", type=int)
    g.add_argument("--batch-size", type=int)
    g.add_argument("--lr", type=float)
    g.add_argument("--warmup-steps", type=int)
    g.add_argument("--ema-decay", type=float)
    g.add_argument("--energy-weight", type=float)
    g.add_argument("--forces-weight", type=float)
    g.add_argument("--stress-weight", type=float)
    g.add_argument("--val-fraction", type=float)
    g.add_argument("--seed", type=int)
    g.add_argument("--dtype", choices=["float32", "float64"])
    g.add_argument("--log-every", type=int)
    g.add_argument("--no-progress", action="store_true", help="no per-step progress lines (the per-epoch table stays)")
    g.add_argument("--checkpoint-every", type=int)
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: OMP_NUM_THREADS or torch's)")
    m = p.add_argument_group("architecture overrides (fresh models only)")
    m.add_argument("--hidden-channels", type=int)
    m.add_argument("--num-layers", type=int)
    m.add_argument("--num-heads", type=int)
    m.add_argument("--n-rbf", type=int)
    m.add_argument("--cutoff", type=float)


def add_train_parser(subparsers) -> argparse.ArgumentParser:
    """Register the ``train`` sub-command on an ``argparse`` subparsers object."""
    p = subparsers.add_parser(
        "train",
        help="train a Geodite model on labelled structures",
        description=__doc__.splitlines()[0],
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_train_arguments(p)
    p.set_defaults(func=run_train)
    return p


def _resolve_init(name: str) -> str:
    from geodite_sim.model.registry import PACKAGED_MODELS, packaged_model_path

    return str(packaged_model_path(name)) if name in PACKAGED_MODELS else name


def run_train(args: argparse.Namespace) -> int:
    """Handler of ``train``: returns the exit status."""
    import torch

    from geodite_sim.training.data import read_samples
    from geodite_sim.training.trainer import Trainer

    if args.threads:
        torch.set_num_threads(args.threads)
    elif os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    t0 = time.time()
    samples = []
    for path in args.data:
        got = read_samples(path)
        print(f"read {len(got)} structures from {path}", flush=True)
        samples += got
    val = read_samples(args.val_data) if args.val_data else None
    train_over = {k: getattr(args, k) for k in (
        "epochs", "batch_size", "lr", "warmup_steps", "ema_decay", "energy_weight", "forces_weight",
        "stress_weight", "val_fraction", "seed", "dtype", "log_every", "checkpoint_every")}
    if args.no_progress:
        train_over["log_every"] = 0
    model_over = {k: getattr(args, k) for k in ("hidden_channels", "num_layers", "num_heads", "n_rbf", "cutoff")}
    out = Path(args.out)
    workdir = Path(args.workdir) if args.workdir else out.with_name(out.name + ".train")
    if args.resume:
        trainer = Trainer.resume(args.resume, samples, workdir=workdir, val_samples=val, epochs=args.epochs)
    else:
        model_cfg, train_cfg = get_preset(args.config, model_over, train_over)
        trainer = Trainer(samples, model_cfg, train_cfg, workdir=workdir,
                          init=_resolve_init(args.init) if args.init else None, val_samples=val,
                          refit_e0=args.refit_e0, preset=args.config)
    trainer.fit()
    trainer.export(out)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB) after {time.time() - t0:.0f} s; "
          f"resumable state in {workdir / 'last.ckpt'}", flush=True)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m geodite_sim.training",
        description=__doc__.splitlines()[0],
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_train_arguments(parser)
    return run_train(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
