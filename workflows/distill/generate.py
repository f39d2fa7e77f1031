"""Generate: the plan of base structures, and one candidate shard from its bases (teacher work batched).

The plan is a deterministic list of :class:`Base` items made from the spec alone (no teacher call),
shuffled with the spec's seed so every prefix of shards samples all sources and elements. A shard is a
run of consecutive bases worth ``structures_per_shard`` candidates; generating it relaxes its bases
with the teacher in **one** ``relax_many`` call and runs its MD bases in **one** ``run_md`` call, then
cuts variants (volume scans, strained + rattled supercells, expanded cells, MD frames) with a random
generator seeded by (spec seed, base key) — so a shard is the same whichever process makes it.

Held-out split, never by frame. Universal mode holds out a composition when ``sha256(seed, formula)``
falls below ``heldout_fraction``; elemental compositions and isolated atoms are always trained on. Domain
mode holds out whole teacher runs: per seed structure, one of its teacher MD runs (temperature x variant,
the one with the smallest hash; all its frames), and every static base (its strained/rattled cells
together) whose hash falls below ``heldout_fraction`` — so the student is measured on teacher-MD frames
of trajectories it never saw, while every composition of the domain (vacancy supercells included) is
also trained on. (Holding out a vacancy composition instead held out every vacancy structure of a seed
whose size range allows one supercell: 62 % of the sse-li data.)
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from ase import Atoms
from ase.data import atomic_numbers, covalent_radii
from geodite_sim.workflows.distill import sources
from geodite_sim.workflows.distill.shards import ShardData
from geodite_sim.workflows.distill.spec import DistillSpec

MOBILE_IONS = ("Li", "Na", "K", "Ag", "Cu", "Mg", "H", "F", "O")
#: Candidates made from one base, per kind.
PER_BASE = {"isolated": 1, "elemental": 8, "expanded": 3, "prototype": 6, "pyxtal": 6, "dimer": 8,
            "seed_static": 5}
VOLUME_SCAN_COMPOUND = (0.9, 1.12)
EXPANSIONS = (1.8, 2.6, 3.5)
DIMER_RANGE = (0.65, 2.8)  # x the covalent-radius sum


@dataclass(frozen=True)
class Base:
    """One base of the plan: a kind and the key that determines it (and its random stream)."""

    kind: str
    key: tuple

    @property
    def n_candidates(self) -> int:
        if self.kind == "seed_md":
            return self.key[-1]
        return PER_BASE[self.kind]

    def rng(self, seed: int) -> np.random.Generator:
        digest = hashlib.sha256(repr((seed, self.kind, self.key)).encode()).digest()
        return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def composition_hash(seed: int, formula: str) -> float:
    """A number in [0, 1) fixed by (seed, formula)."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{formula}".encode()).digest()[:8], "little") / 2**64


def reduced_formula(atoms: Atoms) -> str:
    from pymatgen.core import Composition

    return Composition(atoms.get_chemical_formula()).reduced_formula


# ---------------------------------------------------------------------------------------------- plan
def plan(spec: DistillSpec) -> list[Base]:
    """Every base of the data set, in generation order."""
    bases: list[Base] = []
    if spec.domain.elements:
        bases += _universal_plan(spec)
    if spec.domain.seeds:
        bases += _domain_plan(spec)
    return bases


def _universal_plan(spec: DistillSpec) -> list[Base]:
    els = spec.domain.elements
    rng = np.random.default_rng([spec.seed, 1])
    budget = spec.data.structures
    share = spec.data.sources
    out: list[Base] = []

    def take(kind: str, candidates: list[tuple]) -> None:
        n = math.ceil(budget * share.get(kind, 0.0) / PER_BASE[kind]) if candidates else 0
        if n <= 0:
            return
        order = rng.permutation(len(candidates))
        picks = [candidates[order[i % len(order)]] + ((i // len(order),) if i >= len(order) else ())
                 for i in range(n)]
        out.extend(Base(kind, k) for k in picks)

    take("elemental", [(el, lat) for el in els for lat in sources.LATTICES])
    take("expanded", [(el, lat) for el in els for lat in ("fcc", "bcc", "sc")])
    protos = sources.prototype_names(spec.data.max_atoms) if len(els) >= 2 and share.get("prototype") else []
    take("prototype", [(p,) for p in protos])
    allowed = set(els)
    comps = [i for i, c in enumerate(sources.experimental_compositions())
             if set(c) <= allowed and len(c) >= 2] if share.get("pyxtal") else []
    take("pyxtal", [(i,) for i in comps])
    take("dimer", [(a, b) for i, a in enumerate(els) for b in els[i:]])
    order = np.random.default_rng([spec.seed, 2]).permutation(len(out))
    shuffled = [out[i] for i in order]
    return [Base("isolated", (el,)) for el in els] + shuffled


def mobile_ion(atoms: Atoms, preferred: str = "") -> str:
    """The mobile ion of a seed: ``preferred`` when present, else the first of :data:`MOBILE_IONS` it holds."""
    symbols = set(atoms.get_chemical_symbols())
    if preferred in symbols:
        return preferred
    for el in MOBILE_IONS:
        if el in symbols:
            return el
    return max(symbols, key=atoms.get_chemical_symbols().count)


def supercell_repeats(atoms: Atoms, lo: int, hi: int, limit: int = 4) -> list[tuple[int, int, int]]:
    """Up to ``limit`` near-cubic diagonal repeats with lo <= atoms <= hi, distinct sizes, small to large."""
    n = len(atoms)
    lengths = atoms.cell.lengths()
    found: dict[int, tuple[int, int, int]] = {}
    for total in range(1, hi // n + 1):
        if n * total < lo:
            continue
        best = None
        for a in range(1, total + 1):
            for b in range(1, total // a + 1):
                if total % (a * b):
                    continue
                c = total // (a * b)
                ls = lengths * (a, b, c)
                score = ls.max() / ls.min()
                if best is None or score < best[0]:
                    best = (score, (a, b, c))
        if best is not None and best[0] < 2.0:
            found[n * total] = best[1]
    sizes = sorted(found)
    if len(sizes) > limit:
        sizes = [sizes[round(i * (len(sizes) - 1) / (limit - 1))] for i in range(limit)]
    return [found[s] for s in sizes] or [(1, 1, 1)]


def _domain_plan(spec: DistillSpec) -> list[Base]:
    d = spec.data
    frames = max(1, d.md_steps // d.md_frame_every)
    n_seeds, temps = len(spec.domain.seeds), spec.domain.temperatures
    n_md = math.ceil(d.structures * d.md_fraction / frames)
    n_static = math.ceil(d.structures * (1 - d.md_fraction) / PER_BASE["seed_static"])
    out: list[Base] = []
    # variant v: 0 = the seed's composition, 1.. = one mobile-ion vacancy in supercell size v-1
    for i in range(n_md):
        seed_i = i % n_seeds
        t = temps[(i // n_seeds) % len(temps)]
        variant = (i // (n_seeds * len(temps))) % 5
        out.append(Base("seed_md", (seed_i, float(t), variant, i, frames)))
    for i in range(n_static):
        out.append(Base("seed_static", (i % n_seeds, (i // n_seeds) % 5, i)))
    order = np.random.default_rng([spec.seed, 3]).permutation(len(out))
    return [out[i] for i in order]


def shards_of(bases: list[Base], per_shard: int) -> list[list[Base]]:
    """Consecutive runs of bases worth about ``per_shard`` candidates each."""
    out, cur, n = [], [], 0
    for b in bases:
        cur.append(b)
        n += b.n_candidates
        if n >= per_shard:
            out.append(cur)
            cur, n = [], 0
    if cur:
        out.append(cur)
    return out


# ---------------------------------------------------------------------------------------------- variants
def strain_rattle(atoms: Atoms, rng: np.random.Generator, strain: float, rattle: tuple[float, float]) -> Atoms:
    """A copy under a random symmetric strain (each component uniform in ±strain) and a Gaussian rattle
    of log-uniform standard deviation in ``rattle`` (Å)."""
    a = atoms.copy()
    if a.pbc.all():
        eps = rng.uniform(-strain, strain, (3, 3))
        eps = 0.5 * (eps + eps.T)
        a.set_cell(a.cell.array @ (np.eye(3) + eps), scale_atoms=True)
    sigma = math.exp(rng.uniform(math.log(rattle[0]), math.log(rattle[1])))
    a.positions = a.positions + rng.normal(0.0, sigma, a.positions.shape)
    return a


def scaled(atoms: Atoms, volume_factor: float) -> Atoms:
    a = atoms.copy()
    a.set_cell(a.cell.array * volume_factor ** (1 / 3), scale_atoms=True)
    return a


def supercell_within(atoms: Atoms, max_atoms: int, rng: np.random.Generator) -> Atoms:
    """A random diagonal supercell with at most ``max_atoms`` atoms (the cell itself if none fits)."""
    reps = [r for r in supercell_repeats(atoms, len(atoms), max_atoms, limit=8)]
    return atoms.repeat(reps[int(rng.integers(len(reps)))])


def too_close(atoms: Atoms, factor: float = 0.6) -> bool:
    """Whether two atoms sit closer than ``factor`` x their covalent-radius sum (such a candidate is dropped)."""
    from ase.neighborlist import neighbor_list

    if len(atoms) < 2:
        return False
    i, j, d = neighbor_list("ijd", atoms, 3.5)
    z = atoms.numbers
    return bool(len(d) and np.any(d < factor * (covalent_radii[z[i]] + covalent_radii[z[j]])))


def vacancy(atoms: Atoms, element: str, rng: np.random.Generator) -> Atoms:
    """``atoms`` without one randomly chosen ``element`` atom."""
    idx = [i for i, s in enumerate(atoms.get_chemical_symbols()) if s == element]
    a = atoms.copy()
    del a[int(idx[int(rng.integers(len(idx)))])]
    return a


# ---------------------------------------------------------------------------------------------- split
class Split:
    """Held-out structures (see the module docstring)."""

    def __init__(self, spec: DistillSpec, relaxed_seeds: list[Atoms] | None = None, bases: list[Base] | None = None):
        self.seed = spec.seed
        self.fraction = spec.data.heldout_fraction
        self.domain = relaxed_seeds is not None and len(relaxed_seeds) > 0
        self.md_heldout: set[str] = set()
        if self.domain and self.fraction > 0:
            runs: dict[int, set[str]] = {}
            for b in bases if bases is not None else plan(spec):
                if b.kind == "seed_md":
                    runs.setdefault(b.key[0], set()).add(md_run_tag(b))
            for tags in runs.values():
                self.md_heldout.add(min(sorted(tags), key=lambda t: composition_hash(self.seed, t)))

    def heldout(self, formula: str, n_elements: int, tag: str = "") -> bool:
        if self.domain and tag.startswith("seed_md:"):
            return tag.rsplit(":", 1)[0] in self.md_heldout
        if self.domain and tag.startswith("seed_static:"):
            return composition_hash(self.seed, tag.rsplit(":", 1)[0]) < self.fraction
        if n_elements < 2:
            return False
        return composition_hash(self.seed, formula) < self.fraction


def md_run_tag(base: Base) -> str:
    """Tag prefix of a teacher MD run's frames: ``seed_md:<seed>:<T>:<variant>`` (frames add ``:f<k>``)."""
    return "seed_md:" + ":".join(str(k) for k in base.key[:3])


def make_shard_data(atoms: list[Atoms], tags: list[str], split: Split, failures: list[dict]) -> ShardData:
    comps = [reduced_formula(a) for a in atoms]
    held = [split.heldout(c, len(set(a.numbers)), t) for a, c, t in zip(atoms, comps, tags)]
    return ShardData(atoms, tags, comps, held, failures=failures)


def base_structure(base: Base, spec: DistillSpec, relaxed_seeds: list[Atoms]) -> Atoms | None:
    """The unrelaxed structure of a base (None when the library cannot make one)."""
    rng = base.rng(spec.seed)
    if base.kind in ("elemental", "expanded"):
        return sources.elemental(base.key[0], base.key[1])
    if base.kind == "prototype":  # a refine base's key names the element it must contain: (name, element, ...)
        include = base.key[1] if len(base.key) > 1 and isinstance(base.key[1], str) else None
        return sources.decorate_prototype(base.key[0], spec.domain.elements, rng, include=include)
    if base.kind == "pyxtal":
        comp = sources.experimental_compositions()[base.key[0]]
        return sources.pyxtal_crystal(comp, spec.data.max_atoms, rng)
    if base.kind in ("seed_static", "seed_md"):
        return relaxed_seeds[base.key[0]]
    return None


def atomic_number(symbol: str) -> int:
    return atomic_numbers[symbol]


def output_path(workdir: Path, index: int) -> Path:
    from geodite_sim.workflows.distill.shards import shard_name

    return workdir / "candidates" / shard_name(index)
