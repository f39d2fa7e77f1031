"""Stage 2 of the distillation data: the binding curve (isotropic expansion and compression).

The first generator (generate.py) samples volumes within ±5 % strain of each relaxed cell. A
model trained on it alone can find lower energy far from equilibrium (held-out bcc Al, simple
cubic Ca, antifluorite K2O expanded by 20-80 % in relaxation tests), because nothing in the data
says expansion costs energy. This script labels, for every *training* combination (held-out ones
are untouched), diagonal supercells of its relaxed cell scaled isotropically by a linear factor
in {0.93, 1.10, 1.20, 1.32} and rattled by 0.03 Å, with CHGNet, and writes
data/train_volume.extxyz (the fine-tuning set is train.extxyz + this file).

    OMP_NUM_THREADS=1 python workflows/distill/expand.py
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from generate import Labeller, choose_supercell, min_distance, seed_of  # noqa: E402

SCALES = (0.93, 1.10, 1.20, 1.32)


def main() -> int:
    from ase.io import read, write

    data = HERE / "data"
    held = set(json.loads((data / "summary.json").read_text())["heldout_combinations"])
    lab = Labeller()
    frames, t0 = [], time.time()
    files = sorted((data / "relaxed").glob("*.extxyz"))
    for k, path in enumerate(files):
        cid = path.stem
        if cid in held:
            continue
        prim = read(path)
        prim.calc = None
        rng = np.random.default_rng(seed_of(cid, "volume"))
        for s in SCALES:
            a = choose_supercell(prim, rng, 8, 24)
            a.set_cell(a.cell[:] * s, scale_atoms=True)
            a.rattle(stdev=0.03, seed=int(rng.integers(2**31)))
            if min_distance(a) < 0.8:
                continue
            frames.append(lab.label(a, kind="volume", scale=s, split="train", combo=cid,
                                    prototype=cid.split("-")[0], heldout_combo=False))
        if k % 40 == 0:
            print(f"{k}/{len(files)} combinations, {len(frames)} frames, {time.time() - t0:.0f} s", flush=True)
    write(data / "train_volume.extxyz", frames, format="extxyz")
    print(f"wrote {len(frames)} frames ({sum(len(a) for a in frames)} atoms), {lab.n_calls} CHGNet calls, "
          f"{time.time() - t0:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
