"""Train geodite-mini on the CHGNet-labelled set made by generate.py.

    OMP_NUM_THREADS=1 python workflows/distill/train.py                 # config.json next to this file
    OMP_NUM_THREADS=1 python workflows/distill/train.py --resume        # continue an interrupted run
    OMP_NUM_THREADS=1 python workflows/distill/train.py --epochs 30     # override the epoch count

It is the same trainer as ``geodite-sim train`` (geodite_sim.training); this script only
reads config.json, trains on data/train.extxyz (5 % held back for validation by a fixed
seed) and exports the EMA weights to data/run/geodite-mini.ckpt. Copy that file to
geodite_sim/models_data/ after evaluate.py has checked it.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import replace
from pathlib import Path

import torch

from geodite_sim.training import Trainer, get_preset, read_samples
from geodite_sim.training.configs import TrainConfig

HERE = Path(__file__).resolve().parent


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(HERE / "config.json"))
    ap.add_argument("--data", default=str(HERE / "data" / "train.extxyz"))
    ap.add_argument("--workdir", default=str(HERE / "data" / "run"))
    ap.add_argument("--out", default=None, help="default: <workdir>/geodite-mini.ckpt")
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--resume", action="store_true", help="continue from <workdir>/last.ckpt")
    args = ap.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    cfg = json.loads(Path(args.config).read_text())
    t0 = time.time()
    samples = read_samples(args.data)
    print(f"read {len(samples)} structures ({sum(s.n_atoms for s in samples)} atoms) in {time.time() - t0:.0f} s",
          flush=True)
    workdir = Path(args.workdir)
    if args.resume:
        trainer = Trainer.resume(workdir / "last.ckpt", samples, workdir=workdir, epochs=args.epochs)
    else:
        model_cfg, _ = get_preset(cfg["preset"], cfg.get("model"))
        train_cfg = TrainConfig.from_dict(cfg["train"])
        if args.epochs:
            train_cfg = replace(train_cfg, epochs=args.epochs)
        trainer = Trainer(samples, model_cfg, train_cfg, workdir=workdir, preset=cfg["preset"])
    trainer.fit()
    out = Path(args.out) if args.out else workdir / "geodite-mini.ckpt"
    trainer.export(out)
    wall = time.time() - t0
    (workdir / "train_summary.json").write_text(json.dumps({
        "wall_s_this_run": wall, "epochs": trainer.epoch, "steps": trainer.global_step,
        "n_train": len(trainer.train_samples), "n_val": len(trainer.val_samples),
        "n_parameters": trainer.model.n_parameters(), "final_val": trainer.history[-1] if trainer.history else None,
    }, indent=1))
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB); {wall / 3600:.2f} h this run", flush=True)


if __name__ == "__main__":
    main()
