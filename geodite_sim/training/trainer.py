"""Train a Geodite model on labelled structures (energy, forces, stress).

:class:`Trainer` holds the model, AdamW, a warm-up + cosine learning-rate schedule, an EMA
of the weights and the data split; ``fit()`` runs the epochs, prints progress and a
validation table, and keeps ``<workdir>/last.ckpt`` up to date. Checkpoints are written in
the official Geodite-MP Lightning format (``save_checkpoint``): ``state_dict`` holds the raw
weights, ``optimizer_states[0]`` the AdamW state plus the EMA copy under ``"ema"`` (a tuple
in ``named_parameters()`` order), ``lr_schedulers`` the scheduler, and the key
``"geodite_training"`` everything else needed to continue bit for bit (full-precision
weights, RNG state, epoch and position in the epoch, split, normalisation, history).
``export()`` writes the model for inference: ``state_dict`` = the EMA weights.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from geodite_sim.model.checkpoint import _read_file, load_checkpoint, save_checkpoint
from geodite_sim.model.config import GeoditeConfig
from geodite_sim.model.geodite import Geodite
from geodite_sim.progress import eta_text
from geodite_sim.training.configs import TrainConfig
from geodite_sim.training.data import (
    Sample,
    collate,
    dataset_statistics,
    fit_e0,
    precompute_edges,
    split_indices,
)
from geodite_sim.training.loss import MetricAccumulator, loss_terms, total_loss

DTYPES = {"float32": torch.float32, "float64": torch.float64}
TRAINING_KEY = "geodite_training"


# ------------------------------------------------------------------ helpers
#: Universal ZBL screening (Ziegler, Biersack, Littmark 1985): a = 0.8854 a0 / (Z1^0.23 + Z2^0.23).
UNIVERSAL_ZBL = {"a_factor": 0.8854, "Z_power": 0.23, "screen_coefs": (0.18175, 0.50986, 0.28022, 0.02817),
                 "screen_exps": (3.19980, 0.94229, 0.40290, 0.20162)}


def init_weights(model: Geodite) -> None:
    """Spec §11 initialisation: xavier_uniform for the encoder's dense maps, N(0, 1) embeddings.

    The ZBL term starts from the universal ZBL parameters rather than the architecture's constant
    defaults (c_k = 0.1663, d_k = 0.0354), which screen so weakly that the repulsion reaches tens of
    eV/Å at ordinary bond lengths and the first hundreds of steps are spent undoing it.
    """
    zbl = model.decoder.repulsion_term
    with torch.no_grad():
        for name, value in UNIVERSAL_ZBL.items():
            getattr(zbl, name).copy_(torch.as_tensor(value, dtype=getattr(zbl, name).dtype))
    for mod in model.encoder.modules():
        if isinstance(mod, nn.Linear):
            nn.init.xavier_uniform_(mod.weight)
        elif isinstance(mod, nn.Embedding):
            nn.init.normal_(mod.weight)
            if mod.padding_idx is not None:
                with torch.no_grad():
                    mod.weight[mod.padding_idx].zero_()


class EMA:
    """Exponential moving average of the parameters, in ``named_parameters()`` order."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.shadow = [p.detach().clone() for p in model.parameters()]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        if self.decay <= 0:
            for s, p in zip(self.shadow, model.parameters()):
                s.copy_(p)
            return
        for s, p in zip(self.shadow, model.parameters()):
            s.lerp_(p.detach(), 1.0 - self.decay)

    @contextlib.contextmanager
    def applied(self, model: nn.Module):
        """Temporarily load the EMA weights into ``model``."""
        backup = [p.detach().clone() for p in model.parameters()]
        with torch.no_grad():
            for p, s in zip(model.parameters(), self.shadow):
                p.copy_(s)
        try:
            yield model
        finally:
            with torch.no_grad():
                for p, b in zip(model.parameters(), backup):
                    p.copy_(b)


def lr_lambda_factory(warmup: int, total: int, min_factor: float) -> Callable[[int], float]:
    """Linear warm-up from lr/warmup to lr over ``warmup`` steps, then cosine decay to lr * min_factor."""

    def f(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        span = max(total - warmup, 1)
        t = min(max(step - warmup, 0) / span, 1.0)
        return min_factor + (1.0 - min_factor) * 0.5 * (1.0 + math.cos(math.pi * t))

    return f


def data_fingerprint(samples: Sequence[Sample]) -> str:
    h = hashlib.sha256()
    for s in samples:
        h.update(np.asarray(s.atoms.numbers, np.int64).tobytes())
        h.update(np.float64(s.energy).tobytes())
    return h.hexdigest()[:16]


def _print(msg: str) -> None:
    print(msg, flush=True)


# ------------------------------------------------------------------ trainer
class Trainer:
    """Trains ``model`` on ``samples`` (split into train/validation by structure with ``config.seed``).

    Args:
        samples: labelled structures (all of them; the split is made here unless ``val_samples`` is given).
        model_config: architecture of a fresh model (ignored when ``init`` is given).
        config: optimisation settings.
        workdir: where ``last.ckpt`` and ``history.json`` go.
        init: a Geodite checkpoint (path) to start from instead of random weights; its E0 and
            e_scale are kept unless ``refit_e0``.
        val_samples: an explicit validation set.
        preset: name recorded in the checkpoint.
        e0: fixed per-element reference energies [119] (eV), e.g. a teacher's isolated atoms, instead of the
            least-squares fit (fresh models, or ``refit_e0`` with ``init``).
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        model_config: GeoditeConfig | None = None,
        config: TrainConfig | None = None,
        workdir: str | Path = "train_run",
        init: str | Path | None = None,
        val_samples: Sequence[Sample] | None = None,
        refit_e0: bool = False,
        preset: str | None = None,
        e0: np.ndarray | None = None,
        log: Callable[[str], None] = _print,
        _state: dict | None = None,
    ):
        self.config = config or TrainConfig()
        if _state is None:
            torch.manual_seed(self.config.seed)  # weight init and dropout are reproducible
        self.log = log
        self.preset = preset
        self.dtype = DTYPES[self.config.dtype]
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        samples = list(samples)
        if val_samples is None:
            tr, va = split_indices(len(samples), self.config.val_fraction, self.config.seed)
            self.train_samples = [samples[i] for i in tr]
            self.val_samples = [samples[i] for i in va]
            self.split = {"train": tr.tolist(), "val": va.tolist()}
        else:
            self.train_samples, self.val_samples = samples, list(val_samples)
            self.split = {"train": list(range(len(samples))), "val": "explicit"}
        if not self.train_samples:
            raise ValueError("no training structures")

        # ---- model
        if _state is not None:
            model = Geodite(_state["model_config"]).to(self.dtype)
        elif init is not None:
            model = load_checkpoint(init, dtype=self.dtype)
            for p in model.parameters():
                p.requires_grad_(True)
        else:
            model = Geodite(model_config or GeoditeConfig()).to(self.dtype)
            if self.config.reinit_weights:
                init_weights(model)
        self.model = model
        # Supported elements (saved in every checkpoint): the training set's, plus those of the initial
        # checkpoint when it declares them (an initial model with unknown elements keeps them unknown).
        elements = {int(z) for s in self.train_samples for z in s.atoms.numbers}
        if init is not None:
            model.supported_elements = (None if model.supported_elements is None
                                        else frozenset(elements | set(model.supported_elements)))
        else:
            model.supported_elements = frozenset(elements)
        self.cutoff = model.config.cutoff
        precompute_edges(self.train_samples, self.cutoff)
        precompute_edges(self.val_samples, self.cutoff)

        # ---- E0, scale, normalisation
        head = model.decoder
        if _state is not None:
            self.norm = dict(_state["norm"])
        elif init is not None and not refit_e0:
            e0 = head.e0.detach().double().cpu().numpy()
            self.norm = dataset_statistics(self.train_samples, e0)
        else:
            e0 = fit_e0(self.train_samples) if e0 is None else np.asarray(e0, dtype=np.float64).reshape(-1)
            self.norm = dataset_statistics(self.train_samples, e0)
            with torch.no_grad():
                head.e0.copy_(torch.as_tensor(e0, dtype=head.e0.dtype))
            scale = self.norm["force_std"] if self.config.scale == "force_rms" else self.norm["energy_rms"]
            head.e_scale = float(scale)
            # e_shift stays 0. With E0 fixed (a teacher's isolated atoms) the network's readout, which is exactly 0
            # for an atom without neighbours, must learn the cohesive energy (-1 ... -9 eV/atom) itself; a constant
            # e_shift would apply to isolated atoms too and move the dissociation limit by that much, which no
            # training can undo (the default model's first 8.6 epochs: dimers near the cutoff 2.5 eV/atom off).
            head.e_shift = 0.0
        self._set_constants()

        # ---- optimisation state
        model.train()
        self.steps_per_epoch = math.ceil(len(self.train_samples) / self.config.batch_size)
        self.total_steps = self.steps_per_epoch * self.config.epochs
        c = self.config
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=c.lr, betas=c.betas, weight_decay=c.weight_decay,
                                           foreach=True)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda_factory(c.warmup_steps, self.total_steps, c.lr_min_factor)
        )
        self.ema = EMA(model, c.ema_decay)
        self.epoch = 0
        self.step_in_epoch = 0
        self.global_step = 0
        self.history: list[dict] = []
        self.step_losses: list[float] = []
        self.fingerprint = data_fingerprint(samples)
        self.log(
            f"training on {len(self.train_samples)} structures ({sum(s.n_atoms for s in self.train_samples)} atoms), "
            f"validating on {len(self.val_samples)}; model {self.model.n_parameters():,} parameters "
            f"(C={model.config.hidden_channels}, L={model.config.num_layers}, cutoff {self.cutoff} Å); "
            f"{self.steps_per_epoch} steps/epoch x {c.epochs} epochs; e_scale {head.e_scale:.4f}, "
            f"sigma_E {self.norm['energy_std'] * 1e3:.1f} meV/atom, sigma_F {self.norm['force_std']:.3f} eV/Å, "
            f"sigma_S {self.norm['stress_std']:.4f} eV/Å^3"
        )

    # ------------------------------------------------------------------ constants
    def _set_constants(self) -> None:
        head = self.model.decoder
        entry = dict(head.constants.get(head.fidelity, {})) if head.constants else {}
        entry.update(
            e0=head.e0.detach().float().cpu().clone(),
            e_scale=float(head.e_scale),
            e_shift=float(head.e_shift),
            force_std=float(self.norm["force_std"]),
            stress_mean=float(self.norm["stress_mean"]),
            stress_std=float(self.norm["stress_std"]),
        )
        head.constants = {**(head.constants or {}), head.fidelity: entry}

    # ------------------------------------------------------------------ one step
    def _weights(self) -> tuple[float, float, float]:
        c = self.config
        return c.energy_weight, c.forces_weight, c.stress_weight

    def train_step(self, batch_samples: Sequence[Sample]) -> dict[str, float]:
        data = collate(batch_samples, self.dtype)
        out = self.model(data.batch, edges=data.edges, create_graph=True)
        terms = loss_terms(out, data, self.norm, self.config.huber_delta)
        loss = total_loss(terms, self._weights())
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.config.grad_clip > 0:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.ema.update(self.model)
        self.global_step += 1
        return {"loss": float(loss.detach()), **{k: float(v.detach()) for k, v in terms.items()}}

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, samples: Sequence[Sample], use_ema: bool = True, batch_size: int | None = None
                 ) -> dict[str, float]:
        """MAE/RMSE of ``samples`` (eV/atom, eV/Å, eV/Å^3) and the mean loss, with the EMA weights."""
        if not samples:
            return {}
        model = self.model
        was_training = model.training
        model.eval()
        flags = [p.requires_grad for p in model.parameters()]
        for p in model.parameters():
            p.requires_grad_(False)
        acc = MetricAccumulator()
        bs = batch_size or max(self.config.batch_size, 16)
        ctx = self.ema.applied(model) if use_ema else contextlib.nullcontext()
        try:
            with ctx:
                for i in range(0, len(samples), bs):
                    data = collate(samples[i : i + bs], self.dtype)
                    out = model(data.batch, edges=data.edges)
                    terms = loss_terms(out, data, self.norm, self.config.huber_delta)
                    acc.add(out, data, float(total_loss(terms, self._weights())))
        finally:
            for p, f in zip(model.parameters(), flags):
                p.requires_grad_(f)
            model.train(was_training)
        return acc.result()

    # ------------------------------------------------------------------ loop
    def _batches_of_epoch(self, epoch: int) -> list[list[int]]:
        perm = np.random.default_rng([self.config.seed, epoch]).permutation(len(self.train_samples))
        bs = self.config.batch_size
        return [perm[i : i + bs].tolist() for i in range(0, len(perm), bs)]

    @property
    def finished(self) -> bool:
        """Whether every epoch of the configuration has run."""
        return self.epoch >= self.config.epochs

    def fit(self, until_step: int | None = None, deadline: float | None = None) -> list[dict]:
        """Train to ``config.epochs``; stop early (checkpointed, resumable bit for bit) after global step
        ``until_step`` or once ``time.time()`` passes ``deadline`` (Unix seconds)."""
        c = self.config
        header = (f"{'epoch':>5} {'step':>7} {'lr':>9} {'train_loss':>10} {'val_loss':>9} "
                  f"{'E_MAE meV/at':>12} {'F_MAE meV/Å':>11} {'S_MAE eV/Å³':>11} {'time s':>7}")
        if self.epoch < c.epochs:
            self.log(header)
        run_start, steps_at_start = time.time(), self.global_step
        while self.epoch < c.epochs:
            t0 = time.time()
            batches = self._batches_of_epoch(self.epoch)
            run = {"loss": 0.0, "n": 0, "atoms": 0}
            for b in range(self.step_in_epoch, len(batches)):
                chunk = [self.train_samples[i] for i in batches[b]]
                r = self.train_step(chunk)
                self.step_in_epoch = b + 1
                self.step_losses.append(r["loss"])
                run["loss"] += r["loss"]
                run["n"] += 1
                run["atoms"] += sum(s.n_atoms for s in chunk)
                if c.log_every and self.global_step % c.log_every == 0:
                    dt = time.time() - t0
                    per_step = (time.time() - run_start) / max(self.global_step - steps_at_start, 1)
                    left = per_step * (self.total_steps - self.global_step)
                    self.log(f"  step {self.global_step:>7}/{self.total_steps} epoch {self.epoch} "
                             f"[{self.step_in_epoch}/{len(batches)}] "
                             f"loss {r['loss']:.5f} (E {r['energy']:.4f} F {r['forces']:.4f} S {r['stress']:.4f}) "
                             f"lr {self.scheduler.get_last_lr()[0]:.2e} {dt * 1e6 / max(run['atoms'], 1):.0f} µs/atom "
                             f"{eta_text(left)}")
                if c.checkpoint_every and self.global_step % c.checkpoint_every == 0:
                    self.save(self.workdir / "last.ckpt")
                if (until_step is not None and self.global_step >= until_step) or (
                        deadline is not None and time.time() >= deadline):
                    self.save(self.workdir / "last.ckpt")
                    return self.history
            val = self.evaluate(self.val_samples)
            row = {
                "epoch": self.epoch + 1,
                "step": self.global_step,
                "lr": self.scheduler.get_last_lr()[0],
                "train_loss": run["loss"] / max(run["n"], 1),
                "time_s": time.time() - t0,
                **{f"val_{k}": v for k, v in val.items()},
            }
            self.history.append(row)
            self.log(f"{row['epoch']:>5} {row['step']:>7} {row['lr']:>9.2e} {row['train_loss']:>10.5f} "
                     f"{val.get('loss', float('nan')):>9.5f} {val.get('energy_mae', float('nan')) * 1e3:>12.2f} "
                     f"{val.get('forces_mae', float('nan')) * 1e3:>11.1f} {val.get('stress_mae', float('nan')):>11.5f} "
                     f"{row['time_s']:>7.1f}")
            self.epoch += 1
            self.step_in_epoch = 0
            self.save(self.workdir / "last.ckpt")
            (self.workdir / "history.json").write_text(json.dumps(self.history, indent=1))
        return self.history

    # ------------------------------------------------------------------ checkpoints
    def _hyper_parameters(self) -> dict:
        c = self.config
        mc = self.model.config
        return {
            "decoder": {"in_channels": mc.hidden_channels, "num_residues": mc.num_layers,
                        "snapshot_weights": list(self._weights())},
            "optimizer": {"name": "AdamW", "lr": c.lr, "betas": list(c.betas), "weight_decay": c.weight_decay,
                          "scheduler": "warmup_cosine", "warmup_steps": c.warmup_steps,
                          "lr_min_factor": c.lr_min_factor, "ema_decay": c.ema_decay},
            "training": {**c.to_dict(), "preset": self.preset, "trainer": "geodite_sim.training"},
        }

    def save(self, path: str | Path) -> None:
        """Resumable training checkpoint (official format + full training state)."""
        self._set_constants()
        opt_state = self.optimizer.state_dict()
        opt_state["ema"] = tuple(s.detach().clone() for s in self.ema.shadow)
        state = {
            "version": 1,
            "train_config": self.config.to_dict(),
            "preset": self.preset,
            "model_state": {k: v.detach().clone() for k, v in self.model.state_dict().items()},
            "head": {"e_scale": float(self.model.decoder.e_scale), "e_shift": float(self.model.decoder.e_shift)},
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "global_step": self.global_step,
            "total_steps": self.total_steps,
            "torch_rng": torch.get_rng_state(),
            "norm": self.norm,
            "split": self.split,
            "fingerprint": self.fingerprint,
            "history": self.history,
            "step_losses": list(self.step_losses),
        }
        extra = {
            "epoch": self.epoch,
            "global_step": self.global_step,
            "optimizer_states": [opt_state],
            "lr_schedulers": [self.scheduler.state_dict()],
            TRAINING_KEY: state,
        }
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        save_checkpoint(self.model, tmp, hyper_parameters=self._hyper_parameters(), extra=extra)
        tmp.replace(path)

    def export(self, path: str | Path, use_ema: bool = True) -> None:
        """Inference checkpoint: ``state_dict`` = EMA weights (float32), EMA tuple kept, no optimizer moments."""
        self._set_constants()
        ctx = self.ema.applied(self.model) if use_ema else contextlib.nullcontext()
        with ctx:
            ema = tuple(p.detach().to("cpu", torch.float32).clone() for p in self.model.parameters())
            summary = {"preset": self.preset, "epoch": self.epoch, "global_step": self.global_step,
                       "norm": self.norm, "history": self.history, "weights": "ema" if use_ema else "raw",
                       "fingerprint": self.fingerprint}
            extra = {"epoch": self.epoch, "global_step": self.global_step,
                     "optimizer_states": [{"ema": ema}], TRAINING_KEY: summary}
            path = Path(path)
            tmp = path.with_name(path.name + ".tmp")
            save_checkpoint(self.model, tmp, hyper_parameters=self._hyper_parameters(), extra=extra)
            tmp.replace(path)

    @classmethod
    def resume(
        cls,
        path: str | Path,
        samples: Sequence[Sample],
        workdir: str | Path | None = None,
        val_samples: Sequence[Sample] | None = None,
        epochs: int | None = None,
        log: Callable[[str], None] = _print,
    ) -> Trainer:
        """Continue from a checkpoint written by :meth:`save` (same data, same settings)."""
        ck = _read_file(path)
        if TRAINING_KEY not in ck or "model_state" not in ck[TRAINING_KEY]:
            raise ValueError(f"{path} is not a resumable training checkpoint (use --init to start from its weights)")
        st = ck[TRAINING_KEY]
        config = TrainConfig.from_dict(st["train_config"])
        if epochs is not None:
            config = replace(config, epochs=epochs)
        model_config = GeoditeConfig.from_encoder_args(ck["hyper_parameters"]["encoder"]["args"])
        self = cls(samples, config=config, workdir=workdir or Path(path).parent, val_samples=val_samples,
                   preset=st.get("preset"), log=log, _state={"model_config": model_config, "norm": st["norm"]})
        if st["fingerprint"] != self.fingerprint:
            log(f"warning: the data differ from those of {path} "
                f"(fingerprint {st['fingerprint']} vs {self.fingerprint})")
        self.model.load_state_dict(st["model_state"])
        head = self.model.decoder
        head.e_scale, head.e_shift = st["head"]["e_scale"], st["head"]["e_shift"]
        if head.e_shift != 0.0 and head.e_shift == st["norm"].get("energy_mean"):  # made by the old fixed-E0 rule
            log(f"e_shift {head.e_shift:.4f} eV (the mean cohesive energy, an earlier trainer's start with fixed "
                f"E0) set to 0: it moved isolated atoms that far from their E0 (see the comment in __init__)")
            head.e_shift = 0.0
        self._set_constants()
        opt = dict(ck["optimizer_states"][0])
        ema = opt.pop("ema")
        self.optimizer.load_state_dict(opt)
        self.ema.shadow = [t.to(self.dtype).clone() for t in ema]
        self.scheduler.load_state_dict(ck["lr_schedulers"][0])
        if epochs is not None and epochs != st["train_config"]["epochs"]:
            self.scheduler.lr_lambdas = [lr_lambda_factory(config.warmup_steps, self.total_steps, config.lr_min_factor)]
        self.epoch, self.step_in_epoch, self.global_step = st["epoch"], st["step_in_epoch"], st["global_step"]
        self.history = list(st["history"])
        self.step_losses = list(st["step_losses"])
        torch.set_rng_state(st["torch_rng"])
        log(f"resumed from {path} at epoch {self.epoch}, step {self.global_step}")
        return self
