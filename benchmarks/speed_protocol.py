"""The paper's speed protocol (Fig. 2A) and FLOP accounting, run by ``python benchmarks/speed_scaling.py``.

Cubic Si supercells of growing size at constant density; one MD step per
measurement with the neighbour list rebuilt every step; wall time per step
divided by atoms (µs/atom/step) after warm-up. Engines:

* ``run_md``          one system per call (velocity Verlet, skin 0 → list rebuilt every step)
* ``run_md batched``  the same total atoms as many 8-atom cells in one batch
* ``ase``             ASE ``VelocityVerlet`` with :class:`GeoditeCalculator`
* ``torch-sim``       ``ts.integrate`` (NVE) with :class:`TorchSimModel`
* ``chgnet``          CHGNet's own ASE calculator (a peer a user might pick), if installed

For ``run_md`` and torch-sim, per-step time is the difference of two runs of
different lengths divided by the step difference, so set-up cost cancels.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from ase import units
from ase.build import bulk
from benchmarking import best_time, count_flops, gemm_peak_gflops, machine_info

log = logging.getLogger(__name__)

REFERENCE_MFLOP_PER_ATOM = 191.3  # reference implementation, Si64 at 6 Å (issue text)


def silicon(n: int):
    """Cubic diamond Si supercell n×n×n of the 8-atom cell (a = 5.43 Å), rattled by 0.01 Å."""
    atoms = bulk("Si", "diamond", 5.43, cubic=True) * (n, n, n)
    atoms.rattle(0.01, seed=n)
    return atoms


def _maxwell(atoms, temperature=300.0, seed=0):
    """A copy of ``atoms`` with Maxwell-Boltzmann momenta at ``temperature`` K."""
    atoms = atoms.copy()
    sigma = np.sqrt(atoms.get_masses() * units.kB * temperature)[:, None]
    atoms.set_momenta(np.random.default_rng(seed).normal(size=(len(atoms), 3)) * sigma)
    return atoms


def time_run_md(model, structures, steps=(2, 12), accelerate: str = "auto") -> float:
    """Seconds per step of run_md (NVE, list rebuilt every step); ``accelerate`` as in run_md."""
    from geodite_sim.md import run_md

    def run(k):
        t0 = time.perf_counter()
        run_md(structures, model=model, ensemble="nve", temperature=300.0, timestep=1.0, steps=k, skin=0.0,
               progress=False, monitors=False, accelerate=accelerate)
        return time.perf_counter() - t0

    run(1)  # warm-up
    # best of 3 for each length: the difference of minima is far less noisy than of single runs
    t1 = min(run(steps[0]) for _ in range(3))
    t2 = min(run(steps[1]) for _ in range(3))
    return max(t2 - t1, 1e-9) / (steps[1] - steps[0])


def time_ase(calc, atoms, steps=5) -> float:
    from ase.md.verlet import VelocityVerlet

    atoms = _maxwell(atoms)
    atoms.calc = calc
    dyn = VelocityVerlet(atoms, timestep=1.0 * units.fs)
    dyn.run(1)
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        dyn.run(steps)
        best = min(best, (time.perf_counter() - t0) / steps)
    return best


def time_torch_sim(model, atoms, steps=(2, 12)) -> float:
    import torch_sim as ts

    from geodite_sim.calculators import TorchSimModel

    tsm = TorchSimModel(model, compute_stress=False)
    atoms = _maxwell(atoms)

    def run(k):
        t0 = time.perf_counter()
        ts.integrate(system=atoms, model=tsm, integrator=ts.Integrator.nve, n_steps=k, temperature=300.0,
                     timestep=0.001)
        return time.perf_counter() - t0

    run(1)
    t1 = min(run(steps[0]) for _ in range(3))
    t2 = min(run(steps[1]) for _ in range(3))
    return max(t2 - t1, 1e-9) / (steps[1] - steps[0])


def chgnet_calculator():
    try:
        from chgnet.model import CHGNet
        from chgnet.model.dynamics import CHGNetCalculator
    except ImportError:
        return None
    return CHGNetCalculator(model=CHGNet.load(verbose=False), use_device="cpu")


def layer_flops_by_hand(cfg, n_atoms: int, n_edges: int, edge_update: bool = True) -> int:
    """Forward matrix-product FLOPs (2·M·N·K each) of one interaction layer + equivariant coupling.

    Node side (N atoms, C channels): [W_q|W_k|γ_s0|γ_v0] C→4C, γ_s1 and γ_v1 C→3C, W_vu on 8N rows,
    γ_m0 2C→C, γ_m1 C→2C, and with an edge update W_vq (8N rows) and W_vk (3N + 5N rows).
    Edge side (E edges): [W_re|W_rs|γ_t0] C→5C (C→4C without edge update), density R→1,
    and with an edge update γ_t1 and W_edp, C→C each.
    """
    c, r, n, e = cfg.hidden_channels, cfg.n_rbf, n_atoms, n_edges
    node = 2 * n * c * 4 * c + 2 * (2 * n * c * 3 * c) + 2 * 8 * n * c * c + 2 * n * 2 * c * c + 2 * n * c * 2 * c
    edge = 2 * e * c * (5 if edge_update else 4) * c + 2 * e * r
    if edge_update:
        node += 2 * (2 * 8 * n * c * c)
        edge += 2 * (2 * e * c * c)
    return node + edge


def _layer_flops_counted(model, batch, edges) -> int:
    """FlopCounter's forward FLOPs of the first interaction layer + coupling, on the real inputs."""
    from geodite_sim.model.geodite import Edges
    from geodite_sim.model.radial import spherical_harmonics_l12
    from geodite_sim.model.strain import edge_vectors

    enc = model.encoder
    n = batch.n_atoms
    z = batch.numbers[:n]
    src, dst = edges.sender, edges.receiver
    with torch.no_grad():
        vec = edge_vectors(batch.positions[:n], batch.cell, batch.system_index[:n], Edges(*edges))
        dist = torch.linalg.vector_norm(vec, dim=-1)
        Y = spherical_harmonics_l12(vec / dist.unsqueeze(-1))
        phi = enc.radial_features(dist, z[dst], z[src])
        h = enc.node_init(enc.A_na(z), z, phi, src, dst)
        t = enc.edge_init(h, phi, src, dst)
        X = h.new_zeros(n, 8, h.shape[1])

        def layer():
            h2, X2, _ = enc.interaction_list[0](h, X, t, Y, phi, src, dst, fused=model.use_fused())
            enc.ec_list[0](h2, X2)

        return count_flops(layer)


def flop_accounting(model, n: int = 2, repeats: int = 5) -> dict:
    """FLOPs (matrix products) of one energy+forces+stress evaluation of Si(8n³), its time and rate.

    Also cross-checks torch's FLOP counter against :func:`layer_flops_by_hand` for one layer.
    """
    from geodite_sim.batch import Batch
    from geodite_sim.evaluate import evaluate
    from geodite_sim.neighbors import neighbor_list

    atoms = silicon(n)
    batch = Batch.from_atoms([atoms], dtype=model.dtype, device=model.device)
    edges = neighbor_list(batch, model.cutoff)
    flops = count_flops(lambda: model(batch, edges=edges))
    seconds = best_time(lambda: evaluate([atoms], model), repeats=repeats, warmup=2, device=model.device)
    n_atoms, n_edges = len(atoms), int(edges.sender.shape[0])
    return {
        "atoms": n_atoms,
        "edges_per_atom": n_edges / n_atoms,
        "own_mflop_per_atom": flops / n_atoms / 1e6,
        "reference_mflop_per_atom": REFERENCE_MFLOP_PER_ATOM,
        "layer0_forward_mflop_counted": _layer_flops_counted(model, batch, edges) / 1e6,
        "layer0_forward_mflop_by_hand": layer_flops_by_hand(model.config, n_atoms, n_edges) / 1e6,
        "fused_kernels": bool(model.use_fused()),
        "evaluate_seconds": seconds,
        "achieved_gflops_reference_count": REFERENCE_MFLOP_PER_ATOM * 1e6 * n_atoms / seconds / 1e9,
        "achieved_gflops_own_count": flops / seconds / 1e9,
    }


def acceptance_checks(rows: list[dict], default_label: str | None) -> dict:
    """The issue's speed targets evaluated on ``rows`` (per model and size): ratios > 1 mean 'met'."""
    def t(model, engine, atoms):
        for r in rows:
            if r["model"] == model and r["engine"] == engine and r["atoms"] == atoms:
                return r["us_per_atom_step"]
        return None

    out: dict = {"batched_vs_single": [], "batched_vs_ase_small": [], "default_vs_chgnet": []}
    for model in sorted({r["model"] for r in rows}):
        for atoms in sorted({r["atoms"] for r in rows if r["model"] == model}):
            single, batched, ase = t(model, "run_md", atoms), t(model, "run_md_batched", atoms), t(model, "ase", atoms)
            one_cell = any(r["model"] == model and r["engine"] == "run_md_batched" and r["atoms"] == atoms
                           and r.get("systems", 2) == 1 for r in rows)
            if single and batched and not one_cell:  # one 8-atom cell: the same run as single-system run_md
                out["batched_vs_single"].append({"model": model, "atoms": atoms, "speedup": single / batched})
            # systems of <= 16 atoms: ASE runs them one at a time; run_md batches many of them (the
            # run_md_batched rows are made of 8-atom cells), compared at its best batch size
            batched_rows = [r for r in rows if r["model"] == model and r["engine"] == "run_md_batched"]
            if ase and atoms <= 16 and batched_rows:
                best = min(batched_rows, key=lambda r: r["us_per_atom_step"])
                out["batched_vs_ase_small"].append({"model": model, "atoms": atoms, "batch_atoms": best["atoms"],
                                                    "speedup": ase / best["us_per_atom_step"]})
    if default_label:
        for atoms in sorted({r["atoms"] for r in rows if r["engine"] == "chgnet"}):
            chg = t("CHGNet-0.3.0", "chgnet", atoms)
            ours = [x for x in (t(default_label, e, atoms) for e in ("run_md_batched", "run_md", "ase")) if x]
            if chg and ours:
                out["default_vs_chgnet"].append({"model": default_label, "atoms": atoms,
                                                 "speedup_best_engine": chg / min(ours),
                                                 "speedup_ase_vs_ase": chg / t(default_label, "ase", atoms)
                                                 if t(default_label, "ase", atoms) else None})
    out["met"] = {
        "batched_at_least_as_fast_as_single": all(x["speedup"] >= 1.0 for x in out["batched_vs_single"]),
        "batched_2x_faster_than_ase_small": all(x["speedup"] >= 2.0 for x in out["batched_vs_ase_small"]),
        "default_faster_than_chgnet": all(x["speedup_best_engine"] > 1.0 for x in out["default_vs_chgnet"]),
    }
    return out


def run_protocol(models: dict, sizes: list[int], engines: list[str], budget_s: float = 900.0,
                 accelerate: str = "auto") -> dict:
    """Time every engine on every size for every model; stops growing sizes past the time budget.
    ``accelerate`` goes to run_md (the run_md engines)."""
    start = time.perf_counter()
    rows = []
    chg = chgnet_calculator() if "chgnet" in engines else None
    for name, model in models.items():
        from geodite_sim.calculators import GeoditeCalculator

        calc = GeoditeCalculator(model)
        for n in sizes:
            atoms = silicon(n)
            n_atoms = len(atoms)
            for engine in engines:
                if engine == "chgnet" and (chg is None or name != next(iter(models))):
                    continue  # CHGNet is model-independent: time it once
                if time.perf_counter() - start > budget_s:
                    log.warning("time budget reached; skipping %s %s n=%d", name, engine, n_atoms)
                    continue
                if engine == "run_md":
                    sec = time_run_md(model, [atoms], accelerate=accelerate)
                elif engine == "run_md_batched":
                    sec = time_run_md(model, [silicon(1)] * (n**3), accelerate=accelerate)
                elif engine == "ase":
                    sec = time_ase(calc, atoms)
                elif engine == "torch-sim":
                    sec = time_torch_sim(model, atoms)
                elif engine == "chgnet":
                    sec = time_ase(chg, atoms)
                else:
                    raise ValueError(engine)
                row = {"model": name if engine != "chgnet" else "CHGNet-0.3.0", "engine": engine,
                       "atoms": n_atoms, "systems": n**3 if engine == "run_md_batched" else 1,
                       "us_per_atom_step": sec / n_atoms * 1e6}
                log.info("%s", row)
                rows.append(row)
    return {"rows": rows, "wall_s": time.perf_counter() - start}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    keys = sorted({(r["model"], r["engine"]) for r in result["rows"]})
    for model, engine in keys:
        pts = sorted((r["atoms"], r["us_per_atom_step"]) for r in result["rows"]
                     if r["model"] == model and r["engine"] == engine)
        ax.loglog(*zip(*pts), marker="o", label=f"{model} · {engine}")
    ax.set_xlabel("atoms")
    ax.set_ylabel("µs / atom / step")
    ax.set_title(f"MD step cost, cubic Si, neighbour list rebuilt every step ({result.get('device', 'cpu')})")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown(result: dict) -> str:
    lines = ["| model | engine | atoms | µs/atom/step |", "|---|---|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['model']} | {r['engine']} | {r['atoms']} | {r['us_per_atom_step']:.0f} |")
    fa = result.get("flops", {})
    if fa:
        lines += [
            "",
            f"GEMM peak (float32, same run): {result['gemm_peak_gflops']:.1f} GFLOP/s. "
            f"Geodite-MP evaluate(Si{fa['atoms']}): {fa['evaluate_seconds'] * 1e3:.0f} ms; "
            f"own count {fa['own_mflop_per_atom']:.1f} MFLOP/atom; "
            f"at the reference's {fa['reference_mflop_per_atom']} MFLOP/atom that is "
            f"{fa['achieved_gflops_reference_count']:.1f} GFLOP/s = "
            f"{100 * fa['fraction_of_peak_reference_count']:.0f}% of peak "
            f"(fused CPU kernels: {fa.get('fused_kernels')}).",
            f"FLOP counter vs hand count, layer 0 forward: {fa.get('layer0_forward_mflop_counted', 0):.1f} vs "
            f"{fa.get('layer0_forward_mflop_by_hand', 0):.1f} MFLOP.",
        ]
    checks = result.get("checks")
    if checks:
        lines += ["", "| target | model | atoms | ratio |", "|---|---|---:|---:|"]
        for x in checks["batched_vs_single"]:
            lines.append(f"| batched run_md vs single run_md (≥ 1) | {x['model']} | {x['atoms']} | "
                         f"{x['speedup']:.2f} |")
        for x in checks["batched_vs_ase_small"]:
            lines.append(f"| run_md, {x['batch_atoms']} atoms as 8-atom systems, vs GeoditeCalculator/ASE on one "
                         f"{x['atoms']}-atom system (≥ 2) | {x['model']} | {x['atoms']} | {x['speedup']:.2f} |")
        for x in checks["default_vs_chgnet"]:
            lines.append(f"| default model (best engine) vs CHGNet calculator (> 1) | {x['model']} | {x['atoms']} | "
                         f"{x['speedup_best_engine']:.2f} |")
        lines.append("")
        lines.append("The batched engine packs 8-atom cells, so at 8 atoms it is the single-system run itself "
                     "(not compared); the ASE target compares one ≤ 16-atom system under ASE with the same "
                     "8-atom systems batched by run_md at its best batch size.")
        lines.append("Targets met: " + ", ".join(f"{k}: {'yes' if v else 'NO'}" for k, v in checks["met"].items()))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from geodite_sim.model import load_model

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 3], help="supercell repeats n (8n³ atoms)")
    p.add_argument("--engines", nargs="+", default=["run_md", "run_md_batched", "ase", "torch-sim", "chgnet"])
    p.add_argument("--models", nargs="+", default=["geodite-reference-random", "default"],
                   help="packaged names or checkpoint paths ('default' = load_model())")
    p.add_argument("--budget", type=float, default=900.0, help="seconds; larger sizes are skipped past it")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="torch device of the models, e.g. cpu, cuda, cuda:1 (default: CUDA when available)")
    p.add_argument("--accelerate", default="auto", choices=["auto", "off", "eager", "compile", "cuda_graph"],
                   help="run_md's model-step mode (geodite_sim.accelerate; auto = CUDA graphs on CUDA, off on CPU)")
    p.add_argument("--out", default="benchmarks/results/speed_scaling")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    models, default_label = {}, None
    for name in args.models:
        m = load_model(None if name == "default" else name, device=args.device, dtype=torch.float32)
        label = getattr(m, "name", name)
        if name == "default":
            default_label = label
        if label in models:
            continue
        models[label] = m
    result = {"machine": machine_info(), "protocol": __doc__.strip().splitlines()[0], "device": args.device,
              "accelerate": args.accelerate}
    # The peak is measured right before and after the evaluation timing; the higher one is used.
    peak_before = gemm_peak_gflops(torch.float32, device=args.device)
    mp = load_model("geodite-reference-random", device=args.device, dtype=torch.float32)
    fa = flop_accounting(mp)
    result["gemm_peak_gflops"] = max(peak_before, gemm_peak_gflops(torch.float32, device=args.device))
    fa["fraction_of_peak_reference_count"] = fa["achieved_gflops_reference_count"] / result["gemm_peak_gflops"]
    fa["fraction_of_peak_own_count"] = fa["achieved_gflops_own_count"] / result["gemm_peak_gflops"]
    result["flops"] = fa
    result.update(run_protocol(models, args.sizes, args.engines, args.budget, args.accelerate))
    result["checks"] = acceptance_checks(result["rows"], default_label)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    out.with_suffix(".md").write_text(markdown(result))
    plot(result, out.with_suffix(".png"))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
