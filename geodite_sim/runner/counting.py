"""Counting what a step costs a GPU: dispatched tensor operations and operations that force a host sync.

:class:`OpCounter` is a ``TorchDispatchMode`` that counts every ATen operation dispatched while it is
active, and separately those that, on CUDA, make the host wait for the device:

* ``aten._local_scalar_dense`` (``.item()``, ``bool()``, ``int()``, ``float()`` of a tensor), ``aten.is_nonzero``;
* ``aten.nonzero``, ``aten.masked_select``, ``aten.unique*``, ``aten.bincount``, ``aten.equal``;
* ``aten.index`` / ``aten.index_put`` with a boolean mask index (boolean-mask indexing);
* ``aten.repeat_interleave`` without ``output_size``;
* ``aten._linalg_eigh`` (``torch.linalg.eigh``: it checks LAPACK's / cuSOLVER's error flag on the host; BFGS's step);

and, at the Python level, ``Tensor.numpy()``, ``Tensor.tolist()`` and ``Tensor.cpu()`` (patched while the
counter is active). Used by tests/runner/test_runner.py and benchmarks/gpu_check.py: the difference between a long
and a short run, divided by the difference in steps, is the per-step count with set-up cancelled.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_SYNC_OPS = {"_local_scalar_dense", "is_nonzero", "nonzero", "nonzero_static", "masked_select", "bincount", "equal",
             "_unique", "_unique2", "unique_dim", "unique_consecutive", "argwhere", "_linalg_eigh"}


#: Metadata-only operations (no kernel launch on a GPU): counted in ``ops`` but not in ``kernels``.
VIEW_OPS = {"view", "_unsafe_view", "unsqueeze", "squeeze", "expand", "permute", "select", "slice", "detach", "t",
            "transpose", "alias", "as_strided", "reshape", "unbind", "split", "split_with_sizes", "narrow",
            "lift_fresh", "_reshape_alias", "unfold", "diagonal", "view_as_real", "view_as_complex"}


def _name(func) -> str:
    return func.__name__.split(".")[0] if hasattr(func, "__name__") else str(func)


def _has_bool_index(args) -> bool:
    indices = args[1] if len(args) > 1 else None
    if isinstance(indices, (list, tuple)):
        return any(isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in indices)
    return False


class OpCounter(TorchDispatchMode):
    """Counts ``ops`` (all dispatched operations), ``kernels`` (ops that are not metadata-only views, i.e. kernel
    launches on a GPU) and ``syncs`` (those listed in the module docstring)."""

    def __init__(self):
        super().__init__()
        self.ops = 0
        self.kernels = 0
        self.syncs = 0
        self.sync_names: Counter[str] = Counter()
        self.op_names: Counter[str] = Counter()
        self._saved = {}

    def _sync(self, name: str) -> None:
        self.syncs += 1
        self.sync_names[name] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = _name(func)
        self.ops += 1
        self.op_names[name] += 1
        if name not in VIEW_OPS:
            self.kernels += 1
        if name in _SYNC_OPS or name.startswith("unique"):
            self._sync(name)
        elif name in ("index", "index_put", "index_put_", "_index_put_impl_") and _has_bool_index(args):
            self._sync(name + "[bool]")
        elif name == "repeat_interleave" and kwargs.get("output_size") is None and not (
                len(args) > 2 and isinstance(args[2], int)):
            if not (len(args) > 1 and isinstance(args[1], int)):
                self._sync(name)
        return func(*args, **kwargs)

    def __enter__(self):
        counter = self
        for attr in ("numpy", "tolist", "cpu"):
            original = getattr(torch.Tensor, attr)
            self._saved[attr] = original

            def patched(t, *a, _orig=original, _attr=attr, **k):
                counter._sync("Tensor." + _attr)
                return _orig(t, *a, **k)

            setattr(torch.Tensor, attr, patched)
        return super().__enter__()

    def __exit__(self, *exc):
        for attr, original in self._saved.items():
            setattr(torch.Tensor, attr, original)
        self._saved = {}
        return super().__exit__(*exc)


__all__ = ["OpCounter"]
