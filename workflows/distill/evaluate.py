"""Evaluate a distilled Geodite against CHGNet on the held-out set; parity plot, metrics JSON.

    OMP_NUM_THREADS=1 python workflows/distill/evaluate.py --model workflows/distill/data/run/geodite-mini.ckpt

1. Errors on data/test.extxyz (CHGNet labels): energy MAE meV/atom, force MAE meV/Å, stress MAE
   eV/Å^3, overall and split into held-out combinations (never trained on) and new-seed samples
   of the training combinations, static vs MD.
2. Lattice constants: 20 held-out cubic crystals (round-robin over prototypes; relaxed CHGNet
   cells scaled by 1.03 as the start), relaxed by CHGNet and by the model with the same ASE FIRE + FrechetCellFilter settings
   (fmax 0.02 eV/Å, <= 300 steps); the cell lengths are compared.
3. Speed: µs/atom/step of the model vs the Geodite-MP architecture (random weights) for
   inference and for a training step, same structures, one thread.

Writes results/metrics.json and results/parity.png next to this script.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
warnings.filterwarnings("ignore")

from prototypes import SIMPLE  # noqa: E402

from geodite_sim.batch import Batch  # noqa: E402
from geodite_sim.model import load_model  # noqa: E402
from geodite_sim.training.data import collate, precompute_edges  # noqa: E402

FIRE_FMAX = 0.02
FIRE_STEPS = 300


def predict(model, samples, batch_size=16):
    precompute_edges(samples, model.cutoff)
    rows = []
    for i in range(0, len(samples), batch_size):
        chunk = samples[i : i + batch_size]
        data = collate(chunk, model.dtype)
        out = model(data.batch, edges=data.edges)
        off = data.batch.offsets.tolist()
        for k, _s in enumerate(chunk):
            rows.append({
                "energy": float(out["energy"][k]),
                "forces": out["forces"][off[k] : off[k + 1]].double().numpy(),
                "stress": out["stress"][k].double().numpy(),
            })
    return rows


def errors(samples, preds, mask):
    idx = [i for i in range(len(samples)) if mask[i]]
    if not idx:
        return None
    de = np.array([(preds[i]["energy"] - samples[i].energy) / samples[i].n_atoms for i in idx])
    df = np.concatenate([(preds[i]["forces"] - samples[i].forces).ravel() for i in idx])
    ds = np.concatenate([(preds[i]["stress"] - samples[i].stress).ravel() for i in idx if samples[i].stress is not None])
    return {
        "structures": len(idx),
        "atoms": int(sum(samples[i].n_atoms for i in idx)),
        "energy_mae_meV_per_atom": 1e3 * float(np.abs(de).mean()),
        "energy_rmse_meV_per_atom": 1e3 * float(np.sqrt((de**2).mean())),
        "forces_mae_meV_per_A": 1e3 * float(np.abs(df).mean()),
        "forces_rmse_meV_per_A": 1e3 * float(np.sqrt((df**2).mean())),
        "stress_mae_eV_per_A3": float(np.abs(ds).mean()),
        "stress_rmse_eV_per_A3": float(np.sqrt((ds**2).mean())),
    }


def parity_plot(samples, preds, held, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.8))
    groups = [(~held, "new seeds, trained combinations", "tab:blue"), (held, "held-out combinations", "tab:red")]
    for ax, key, label, unit in [(axes[0], "energy", "energy", "eV/atom"), (axes[1], "forces", "force component", "eV/Å"),
                                 (axes[2], "stress", "stress component", "eV/Å³")]:
        lo, hi = np.inf, -np.inf
        for m, name, color in groups:
            idx = np.nonzero(m)[0]
            if len(idx) == 0:
                continue
            if key == "energy":
                x = np.array([samples[i].energy / samples[i].n_atoms for i in idx])
                y = np.array([preds[i]["energy"] / samples[i].n_atoms for i in idx])
            elif key == "forces":
                x = np.concatenate([samples[i].forces.ravel() for i in idx])
                y = np.concatenate([preds[i]["forces"].ravel() for i in idx])
            else:
                idx = [i for i in idx if samples[i].stress is not None]
                x = np.concatenate([samples[i].stress.ravel() for i in idx])
                y = np.concatenate([preds[i]["stress"].ravel() for i in idx])
            mae = np.abs(y - x).mean()
            scale = {"energy": 1e3, "forces": 1e3, "stress": 1.0}[key]
            unit_mae = {"energy": "meV/atom", "forces": "meV/Å", "stress": "eV/Å³"}[key]
            fmt = ".4f" if key == "stress" else ".1f"
            ax.scatter(x, y, s=3, alpha=0.4, color=color, label=f"{name}: MAE {scale * mae:{fmt}} {unit_mae}")
            lo, hi = min(lo, x.min(), y.min()), max(hi, x.max(), y.max())
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
        ax.set_xlabel(f"CHGNet {label} ({unit})")
        ax.set_ylabel(f"geodite-mini {label} ({unit})")
        ax.legend(fontsize=7, loc="upper left")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def relax_cell(atoms, calc):
    from ase.filters import FrechetCellFilter
    from ase.optimize import FIRE

    a = atoms.copy()
    a.calc = calc
    opt = FIRE(FrechetCellFilter(a), logfile=None)
    converged = opt.run(fmax=FIRE_FMAX, steps=FIRE_STEPS)
    return a, bool(converged), opt.nsteps


def pick_simple(heldout, relaxed_dir: Path, n: int) -> list[str]:
    """``n`` held-out cubic crystals, taken round-robin over prototypes (sorted) for variety."""
    by_proto: dict[str, list[str]] = {}
    for c in sorted(heldout):
        if c.split("-")[0] in SIMPLE and (relaxed_dir / f"{c}.extxyz").exists():
            by_proto.setdefault(c.split("-")[0], []).append(c)
    names = []
    while len(names) < n and any(by_proto.values()):
        for proto in sorted(by_proto):
            if by_proto[proto] and len(names) < n:
                names.append(by_proto[proto].pop(0))
    return names


def lattice_test(model, relaxed_dir: Path, heldout: list[str], n: int = 20):
    from ase.io import read
    from chgnet.model import CHGNet
    from chgnet.model.dynamics import CHGNetCalculator

    from geodite_sim.calculators import GeoditeCalculator

    chg = CHGNetCalculator(model=CHGNet.load(verbose=False), use_device="cpu")
    geo = GeoditeCalculator(model)
    names = pick_simple(heldout, relaxed_dir, n)
    rows = []
    for name in names:
        start = read(relaxed_dir / f"{name}.extxyz")
        start.calc = None
        start.set_cell(start.cell[:] * 1.03, scale_atoms=True)
        ref, ok_ref, n_ref = relax_cell(start, chg)
        got, ok_got, n_got = relax_cell(start, geo)
        la, lb = ref.cell.cellpar()[:3], got.cell.cellpar()[:3]
        rel = (lb - la) / la
        vr = (got.get_volume() / ref.get_volume()) ** (1 / 3) - 1
        rows.append({"crystal": name, "chgnet_abc": la.round(4).tolist(), "geodite_abc": lb.round(4).tolist(),
                     "max_rel_dev_pct": 100 * float(np.abs(rel).max()), "vol_cuberoot_dev_pct": 100 * float(vr),
                     "chgnet_converged": ok_ref, "geodite_converged": ok_got, "steps": [n_ref, n_got]})
        print(f"  {name:28s} CHGNet a={la[0]:.3f} geodite a={lb[0]:.3f} dev {100 * np.abs(rel).max():5.2f} % "
              f"(steps {n_ref}/{n_got})", flush=True)
    devs = np.array([r["max_rel_dev_pct"] for r in rows])
    return {"fire": {"fmax": FIRE_FMAX, "max_steps": FIRE_STEPS, "filter": "FrechetCellFilter", "start": "CHGNet cell x 1.03"},
            "n": len(rows), "within_3pct": int((devs <= 3).sum()), "mean_abs_dev_pct": float(devs.mean()),
            "max_dev_pct": float(devs.max()), "crystals": rows}


def speed(model, n_repeat=3):
    """µs/atom/step, inference and training step, this model vs the Geodite-MP architecture."""
    from ase.build import bulk

    from geodite_sim.model import Geodite, GeoditeConfig
    from geodite_sim.neighbors import neighbor_list

    structs = []
    for k in range(4):
        a = bulk("NaCl", "rocksalt", a=5.64, cubic=True).repeat((2, 2, 2))  # 64 atoms
        a.rattle(0.05, seed=k)
        structs.append(a)
    out = {}
    for name, m in [("geodite-mini", model), ("Geodite-MP architecture", Geodite(GeoditeConfig()))]:
        m = m.float()
        batch = Batch.from_atoms(structs, dtype=torch.float32)
        edges = neighbor_list(batch, m.cutoff)
        for p in m.parameters():
            p.requires_grad_(False)
        m.eval()
        m(batch, edges=edges)
        t = time.perf_counter()
        for _ in range(n_repeat):
            m(batch, edges=edges)
        inf = (time.perf_counter() - t) / n_repeat / batch.n_atoms * 1e6
        for p in m.parameters():
            p.requires_grad_(True)
        m.train()
        t = time.perf_counter()
        for _ in range(n_repeat):
            r = m(batch, edges=edges, create_graph=True)
            (r["energy"].sum() + r["forces"].pow(2).sum() + r["stress"].pow(2).sum()).backward()
        tr = (time.perf_counter() - t) / n_repeat / batch.n_atoms * 1e6
        for p in m.parameters():
            p.requires_grad_(False)
        m.eval()
        out[name] = {"parameters": sum(p.numel() for p in m.parameters()), "edges_per_atom": len(edges[0]) / batch.n_atoms,
                     "inference_us_per_atom": inf, "train_step_us_per_atom": tr}
        print(f"  {name}: {out[name]}", flush=True)
    out["setup"] = f"4 x 64-atom rattled NaCl, float32, CPU, torch threads = {torch.get_num_threads()}"
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="geodite-mini")
    ap.add_argument("--data", default=str(HERE / "data"))
    ap.add_argument("--results", default=str(HERE / "results"))
    ap.add_argument("--skip-lattice", action="store_true")
    ap.add_argument("--skip-speed", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    data, res = Path(args.data), Path(args.results)
    res.mkdir(parents=True, exist_ok=True)
    model = load_model(args.model)
    summary = json.loads((data / "summary.json").read_text())

    from ase.io import read

    frames = read(data / "test.extxyz", ":")
    from geodite_sim.training.data import sample_from_atoms

    samples = [sample_from_atoms(a) for a in frames]
    held = np.array([bool(a.info.get("heldout_combo")) for a in frames])
    md = np.array([a.info.get("kind") == "md" for a in frames])
    t0 = time.time()
    preds = predict(model, samples)
    metrics = {
        "model": str(args.model),
        "reference": "CHGNet 0.3.0 (chgnet 0.4.2), ASE calculator labels",
        "test_set": {
            "all": errors(samples, preds, np.ones(len(samples), bool)),
            "heldout_combinations": errors(samples, preds, held),
            "trained_combinations_new_seeds": errors(samples, preds, ~held),
            "static": errors(samples, preds, ~md),
            "md_snapshots": errors(samples, preds, md),
        },
        "eval_wall_s": time.time() - t0,
    }
    train_path = data / "run" / "train_summary.json"
    if train_path.exists():
        metrics["training"] = json.loads(train_path.read_text())
    metrics["data"] = {k: v for k, v in summary.items() if k != "heldout_combinations"}
    metrics["heldout_combinations"] = summary["heldout_combinations"]
    print(json.dumps(metrics["test_set"], indent=1), flush=True)
    parity_plot(samples, preds, held, res / "parity.png",
                f"{Path(str(args.model)).name} vs CHGNet on {len(samples)} held-out structures")
    if not args.skip_lattice:
        metrics["lattice"] = lattice_test(model, data / "relaxed", summary["heldout_combinations"])
    if not args.skip_speed:
        metrics["speed"] = speed(model)
    a = metrics["test_set"]["all"]
    metrics["acceptance"] = {
        "energy_mae_le_30_meV_per_atom": a["energy_mae_meV_per_atom"] <= 30,
        "forces_mae_le_120_meV_per_A": a["forces_mae_meV_per_A"] <= 120,
        "stress_mae_le_0.01_eV_per_A3": a["stress_mae_eV_per_A3"] <= 0.01,
    }
    if "lattice" in metrics:
        metrics["acceptance"]["lattice_20_within_3pct"] = metrics["lattice"]["within_3pct"] == metrics["lattice"]["n"]
    (res / "metrics.json").write_text(json.dumps(metrics, indent=1))
    print(json.dumps(metrics["acceptance"], indent=1))


if __name__ == "__main__":
    main()
