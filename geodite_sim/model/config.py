"""Geodite architecture hyperparameters, read from / written to the checkpoint's ``hyper_parameters``."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

SUPPORTED_EDGE_UPDATES = ("linw_mlpa_ln",)


@dataclass(frozen=True)
class GeoditeConfig:
    """Architecture of a Geodite model (defaults: Geodite-MP)."""

    hidden_channels: int = 192
    num_layers: int = 4
    n_rbf: int = 12
    cutoff: float = 6.0
    max_z: int = 100
    epsilon: float = 1e-6
    num_heads: int = 8
    attn_dropout: float = 0.2
    lmax: int = 2
    edge_updates: str = "linw_mlpa_ln"

    def __post_init__(self) -> None:
        if self.edge_updates not in SUPPORTED_EDGE_UPDATES:
            raise ValueError(f"edge_updates={self.edge_updates!r} is not supported (only {SUPPORTED_EDGE_UPDATES})")
        if self.lmax != 2:
            raise ValueError(f"lmax={self.lmax} is not supported (only 2)")
        if self.hidden_channels % self.num_heads:
            raise ValueError("hidden_channels must be divisible by num_heads")

    @classmethod
    def from_encoder_args(cls, args: dict[str, Any]) -> GeoditeConfig:
        """Build from ``hyper_parameters['encoder']['args']`` of an official checkpoint."""
        names = {f.name for f in fields(cls)}
        kwargs = {k: args[k] for k in names if k in args}
        for k in ("evec_dim", "emlp_dim"):
            if k in args and args[k] != args.get("hidden_channels", cls.hidden_channels):
                raise ValueError(f"{k}={args[k]} differs from hidden_channels; not supported")
        if not args.get("distance_weighting", True):
            raise ValueError("distance_weighting=False is not supported")
        if args.get("radial_basis", "besselbasis").lower() != "besselbasis":
            raise ValueError(f"radial_basis={args['radial_basis']!r} is not supported")
        if args.get("activation", "silu").lower() != "silu":
            raise ValueError(f"activation={args['activation']!r} is not supported")
        return cls(**kwargs)

    def to_encoder_args(self) -> dict[str, Any]:
        """The ``encoder.args`` block written into checkpoints (official key names)."""
        d = asdict(self)
        d.update(
            radial_basis="besselbasis",
            trainable_radial=False,
            activation="silu",
            weight_init="xavier_uniform",
            aggr="add",
            evec_dim=self.hidden_channels,
            emlp_dim=self.hidden_channels,
            distance_weighting=True,
            distance_weighting_trainable=True,
        )
        return d
