"""Named training presets: a model architecture plus the optimisation settings that go with it.

``PRESETS[name]`` is a plain dict ``{"model": {...GeoditeConfig fields...}, "train": {...TrainConfig fields...}}``;
:func:`get_preset` returns ``(GeoditeConfig, TrainConfig)`` with command-line overrides applied.

- ``tiny``: a few thousand parameters, for tests and smoke runs (seconds per epoch).
- ``small``: the architecture of the packaged ``geodite-mini`` model (C = 48, 2 layers, 5 Å),
  fast enough to train on one CPU core in a few hours.
- ``medium``: C = 96, 3 layers, 5.5 Å, for a GPU or a long CPU run.
- ``mp``: the Geodite-MP architecture and the paper's stage-1 optimisation settings (spec §11).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from geodite_sim.model.config import GeoditeConfig


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings (units: energies eV, lengths Å; steps count optimizer updates)."""

    epochs: int = 100
    batch_size: int = 8  # structures per step
    lr: float = 1e-3  # peak learning rate of AdamW
    lr_min_factor: float = 0.01  # final lr = lr * lr_min_factor (cosine decay after warm-up)
    warmup_steps: int = 100
    weight_decay: float = 1e-5
    betas: tuple[float, float] = (0.9, 0.999)
    ema_decay: float = 0.99  # per step; 0 disables the EMA
    energy_weight: float = 1.0  # lambda_E
    forces_weight: float = 1.0  # lambda_F
    stress_weight: float = 1.0  # lambda_sigma
    huber_delta: float = 0.01  # on the normalised residuals
    grad_clip: float = 10.0  # max global gradient norm (0: off)
    val_fraction: float = 0.05
    seed: int = 0
    dtype: str = "float32"
    log_every: int = 50  # steps between progress lines
    checkpoint_every: int = 0  # steps between mid-epoch checkpoints (0: at epoch ends only)
    scale: str = "force_rms"  # e_scale from the data: "force_rms" or "energy_rms"
    reinit_weights: bool = True  # spec §11 init (xavier_uniform dense, N(0,1) embeddings) for fresh models

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        if "betas" in kw:
            kw["betas"] = tuple(kw["betas"])
        return cls(**kw)


PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "tiny": {
        "model": dict(hidden_channels=16, num_layers=2, num_heads=2, n_rbf=6, cutoff=4.0, attn_dropout=0.0),
        "train": dict(epochs=50, batch_size=4, lr=3e-3, warmup_steps=10, ema_decay=0.9, log_every=10),
    },
    "small": {
        "model": dict(hidden_channels=48, num_layers=2, num_heads=4, n_rbf=10, cutoff=5.0, attn_dropout=0.0),
        "train": dict(epochs=40, batch_size=8, lr=2e-3, warmup_steps=200, ema_decay=0.995,
                      energy_weight=1.0, forces_weight=1.0, stress_weight=1.0),
    },
    "medium": {
        "model": dict(hidden_channels=96, num_layers=3, num_heads=4, n_rbf=12, cutoff=5.5, attn_dropout=0.0),
        "train": dict(epochs=100, batch_size=8, lr=1e-3, warmup_steps=500, ema_decay=0.995),
    },
    "mp": {
        "model": {},  # GeoditeConfig defaults = Geodite-MP
        "train": dict(epochs=100, batch_size=6, lr=4.5e-4, warmup_steps=2000, ema_decay=0.995,
                      lr_min_factor=0.0, grad_clip=10.0),
    },
}


def get_preset(name: str, model_overrides: dict | None = None, train_overrides: dict | None = None
               ) -> tuple[GeoditeConfig, TrainConfig]:
    """(GeoditeConfig, TrainConfig) of preset ``name`` with overrides (None values are ignored)."""
    if name not in PRESETS:
        raise KeyError(f"unknown config preset {name!r}; presets: {sorted(PRESETS)}")
    p = PRESETS[name]
    mcfg = GeoditeConfig(**{**p["model"], **{k: v for k, v in (model_overrides or {}).items() if v is not None}})
    tcfg = TrainConfig(**p["train"])
    tcfg = replace(tcfg, **{k: v for k, v in (train_overrides or {}).items() if v is not None})
    return mcfg, tcfg
