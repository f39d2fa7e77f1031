"""Generate and label the CHGNet distillation set (train / held-out test).

For every prototype x element combination of ``prototypes.py``:

1. build the primitive cell at a radius-based size, scan the volume (CHGNet), relax it
   (ASE FIRE + FrechetCellFilter, fmax 0.1 eV/Å, <= 40 steps);
2. sample supercells (8-32 atoms), random symmetric strain (+-5 %), rattle
   (per-component std log-uniform in 0.02-0.15 Å), label with CHGNet;
3. for a subset, run a short Langevin MD with CHGNet (300-1500 K, 50 steps of 2 fs,
   1 fs with H) on a 12-24-atom strained supercell and keep 4 snapshots (steps 20-50).

Held-out test set: all samples of ~18 % of the combinations (stratified per prototype,
never trained on) plus samples of the training combinations drawn with different seeds.
Labels come from CHGNet's ASE calculator (energy eV, forces eV/Å, stress eV/Å^3 with
ASE's sign, checked against finite differences of the energy). Work is stored per
combination under ``data/shards`` so an interrupted run resumes where it stopped.

    OMP_NUM_THREADS=1 python workflows/distill/generate.py --out workflows/distill/data
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from prototypes import build, combo_id, combos, heldout_split  # noqa: E402

warnings.filterwarnings("ignore")

N_STATIC_TRAIN = 10
N_STATIC_TEST_SEEN = 1  # new-seed test samples of each training combination
N_STATIC_TEST_HELD = 5
P_MD_TRAIN = 0.2
P_MD_TEST_SEEN = 0.05
P_MD_TEST_HELD = 0.4
MD_STEPS = 50
MD_SNAPSHOTS = (20, 30, 40, 50)
MD_TEMPS = (300, 600, 900, 1200, 1500)


def seed_of(*parts) -> int:
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:4], "little")


class Labeller:
    """CHGNet through its ASE calculator; returns labelled copies with a SinglePointCalculator."""

    def __init__(self):
        import torch

        torch.set_num_threads(1)
        from chgnet.model import CHGNet
        from chgnet.model.dynamics import CHGNetCalculator

        self.calc = CHGNetCalculator(model=CHGNet.load(verbose=False), use_device="cpu")
        self.n_calls = 0

    def label(self, atoms, **info):
        from ase.calculators.singlepoint import SinglePointCalculator

        a = atoms.copy()
        a.calc = self.calc
        e = a.get_potential_energy()
        f = a.get_forces()
        s = a.get_stress(voigt=True)
        self.n_calls += 1
        out = atoms.copy()
        out.info.update(info)
        out.calc = SinglePointCalculator(out, energy=float(e), forces=f.copy(), stress=s.copy())
        return out


def min_distance(atoms) -> float:
    from ase.neighborlist import neighbor_list

    d = neighbor_list("d", atoms, 2.0)
    return float(d.min()) if len(d) else 2.0


def relax_prim(proto, els, calc):
    """Volume scan + short FIRE/FrechetCellFilter relaxation with CHGNet. Returns (atoms, info)."""
    from ase.filters import FrechetCellFilter
    from ase.optimize import FIRE

    best = None
    for s in (0.84, 0.90, 0.96, 1.02, 1.08, 1.15):
        a = build(proto, els, scale=s)
        a.calc = calc
        e = a.get_potential_energy() / len(a)
        if best is None or e < best[0]:
            best = (e, s)
    a = build(proto, els, scale=best[1])
    a.calc = calc
    opt = FIRE(FrechetCellFilter(a), logfile=None)
    opt.run(fmax=0.1, steps=40)
    a.calc = None
    return a, {"scan_scale": best[1], "relax_steps": opt.nsteps}


def choose_supercell(prim, rng, lo: int, hi: int):
    """Diagonal supercell with a random target size in [lo, hi] atoms (closest achievable, widest cell)."""
    n = len(prim)
    target = rng.integers(max(lo, n), max(hi, n) + 1)
    best = None
    for r1 in range(1, 5):
        for r2 in range(1, 5):
            for r3 in range(1, 5):
                m = n * r1 * r2 * r3
                if m > max(hi, n):
                    continue
                cell = prim.cell[:] * np.array([r1, r2, r3])[:, None]
                vol = abs(np.linalg.det(cell))
                heights = [vol / np.linalg.norm(np.cross(cell[(i + 1) % 3], cell[(i + 2) % 3])) for i in range(3)]
                key = (abs(m - target), -min(heights))
                if best is None or key < best[0]:
                    best = (key, (r1, r2, r3))
    return prim.repeat(best[1])


def random_strain(atoms, rng, amount: float):
    eps = rng.uniform(-amount, amount, (3, 3))
    eps = 0.5 * (eps + eps.T)
    eps[np.triu_indices(3, 1)] *= 0.6
    eps[np.tril_indices(3, -1)] *= 0.6
    a = atoms.copy()
    a.set_cell(a.cell[:] @ (np.eye(3) + eps), scale_atoms=True)
    return a


def static_samples(prim, lab, rng, n, info):
    out = []
    for _k in range(n):
        a = choose_supercell(prim, rng, 8, 32)
        a = random_strain(a, rng, 0.05)
        sigma = float(np.exp(rng.uniform(np.log(0.02), np.log(0.15))))
        a.rattle(stdev=sigma, seed=int(rng.integers(2**31)))
        if min_distance(a) < 0.6:
            continue
        out.append(lab.label(a, kind="static", rattle=sigma, **info))
    return out


def md_samples(prim, lab, rng, info):
    from ase import units
    from ase.md.langevin import Langevin
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution

    a = choose_supercell(prim, rng, 12, 24)
    a = random_strain(a, rng, 0.03)
    a.rattle(stdev=0.05, seed=int(rng.integers(2**31)))
    temp = float(rng.choice(MD_TEMPS))
    dt = 1.0 if "H" in a.get_chemical_symbols() else 2.0
    MaxwellBoltzmannDistribution(a, temperature_K=temp, rng=np.random.default_rng(int(rng.integers(2**31))))
    a.calc = lab.calc
    dyn = Langevin(a, timestep=dt * units.fs, temperature_K=temp, friction=0.02 / units.fs,
                   rng=np.random.default_rng(int(rng.integers(2**31))))
    out = []
    for step in range(1, MD_STEPS + 1):
        dyn.run(1)
        lab.n_calls += 1
        if step in MD_SNAPSHOTS:
            snap = a.copy()
            snap.calc = None
            if min_distance(snap) < 0.6 or not np.isfinite(a.get_positions()).all():
                break
            out.append(lab.label(snap, kind="md", temperature=temp, md_step=step, **info))
    return out


def process_combo(proto, els, held: bool, lab, shard_dir: Path, relaxed_dir: Path):
    from ase.io import write

    cid = combo_id(proto, els)
    shard = shard_dir / f"{cid}.extxyz"
    if shard.exists():
        return "cached"
    t0 = time.time()
    prim, rinfo = relax_prim(proto, els, lab.calc)
    vpa = prim.get_volume() / len(prim)
    if not (4.0 < vpa < 120.0) or min_distance(prim) < 0.9:
        (shard_dir / f"{cid}.failed").write_text(json.dumps({"vpa": vpa, **rinfo}))
        return "failed"
    relaxed = lab.label(prim, combo=cid, prototype=proto, heldout_combo=held, **rinfo)
    write(relaxed_dir / f"{cid}.extxyz", relaxed, format="extxyz")
    base = dict(combo=cid, prototype=proto, heldout_combo=held)
    frames = []
    if held:
        rng = np.random.default_rng(seed_of(cid, "test"))
        frames += static_samples(prim, lab, rng, N_STATIC_TEST_HELD, dict(split="test", **base))
        if rng.random() < P_MD_TEST_HELD:
            frames += md_samples(prim, lab, rng, dict(split="test", **base))
    else:
        rng = np.random.default_rng(seed_of(cid, "train"))
        frames += static_samples(prim, lab, rng, N_STATIC_TRAIN, dict(split="train", **base))
        if rng.random() < P_MD_TRAIN:
            frames += md_samples(prim, lab, rng, dict(split="train", **base))
        rng = np.random.default_rng(seed_of(cid, "test"))
        frames += static_samples(prim, lab, rng, N_STATIC_TEST_SEEN, dict(split="test", **base))
        if rng.random() < P_MD_TEST_SEEN:
            frames += md_samples(prim, lab, rng, dict(split="test", **base))
    tmp = shard.with_suffix(".tmp")
    write(tmp, frames, format="extxyz")
    os.replace(tmp, shard)
    return f"{len(frames)} frames, {time.time() - t0:.0f} s"


def merge(out: Path, all_combos, held):
    from ase.io import read, write

    frames = {"train": [], "test": []}
    failed = []
    for proto, els in all_combos:
        cid = combo_id(proto, els)
        shard = out / "shards" / f"{cid}.extxyz"
        if not shard.exists():
            failed.append(cid)
            continue
        for a in read(shard, ":"):
            frames[a.info["split"]].append(a)
    for split, fr in frames.items():
        write(out / f"{split}.extxyz", fr, format="extxyz")
    summary = {
        split: {
            "structures": len(fr),
            "atoms": int(sum(len(a) for a in fr)),
            "md_snapshots": int(sum(a.info.get("kind") == "md" for a in fr)),
            "heldout_combo_structures": int(sum(bool(a.info.get("heldout_combo")) for a in fr)),
        }
        for split, fr in frames.items()
    }
    summary["combinations"] = len(all_combos)
    summary["heldout_combinations"] = sorted(held)
    summary["failed_combinations"] = failed
    return summary


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "data"))
    ap.add_argument("--limit", type=int, default=None, help="only the first N combinations (smoke test)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    (out / "shards").mkdir(parents=True, exist_ok=True)
    (out / "relaxed").mkdir(parents=True, exist_ok=True)
    all_combos = combos()
    held = heldout_split(all_combos)
    if args.limit:
        all_combos = all_combos[: args.limit]
    lab = Labeller()
    t0 = time.time()
    for i, (proto, els) in enumerate(all_combos):
        cid = combo_id(proto, els)
        try:
            status = process_combo(proto, els, cid in held, lab, out / "shards", out / "relaxed")
        except Exception as exc:  # one bad combination must not stop the set
            status = f"error: {type(exc).__name__}: {exc}"
            (out / "shards" / f"{cid}.failed").write_text(status)
        print(f"[{i + 1}/{len(all_combos)} {time.time() - t0:7.0f} s] {cid}{' (held out)' if cid in held else ''}: "
              f"{status}", flush=True)
    summary = merge(out, all_combos, held)
    summary["generation_wall_s_this_run"] = round(time.time() - t0, 1)
    summary["chgnet_calls_this_run"] = lab.n_calls
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps({k: v for k, v in summary.items() if k != "heldout_combinations"}, indent=1))


if __name__ == "__main__":
    main()
