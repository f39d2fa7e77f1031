"""The two per-edge equivariant operations of an interaction layer, eager and fused.

- :func:`message` — ``sum_{j->i} o_d (x) Y + o_t * X_j`` into receivers, [N, 8, C] (paper Eq. 7).
- :func:`attention` — gated attention + filter message (paper Eq. 5-6): scalar part summed into
  receivers [N, C], vector parts o_d, o_t per edge [E, C] each.
- :func:`gated_residual` — ``t + silu(g) * u``, the edge-feature update, [E, C].
- :func:`invariant` — ``w_ij = sum_l <reject_Y(Q_i)_l, reject_Y(K_j)_l>``, [E, C] (edge update).

Eager versions (plain torch, differentiable to any order: training uses them) materialise
[E, 8, C] tensors; on the CPU that memory traffic, not arithmetic, dominates a step. The
fused versions (``csrc/edge_ops.cpp``, compiled with the system C++ compiler on first use —
a line on stderr says so, every time a build runs — and cached per build configuration, see
:func:`build_config`)
loop over edges reading node tensors that stay in
cache, never form an [E, 8, C] tensor, and have hand-written backward passes checked by
``torch.autograd.gradcheck`` in the tests. They are first-order only (forces and stress,
not training on forces). ``GEODITE_FUSED=0`` disables them; a failed build warns once and
falls back to eager.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import platform
import sys
import sysconfig
import time
import warnings
from pathlib import Path

import torch
from torch.autograd.function import once_differentiable

log = logging.getLogger(__name__)

L1 = slice(0, 3)
L2 = slice(3, 8)

_EXT = None
_EXT_FAILED = False

#: Compiler flags of the fused kernels. -ffast-math lets GCC call glibc's vectorised exp (libmvec) in the
#: silu loops; the kernels do no NaN/Inf tests, and float64 results still match eager to ~1e-15 relative
#: (tests/model/test_edge_ops.py).
CFLAGS = ["-O3", "-march=native", "-fopenmp", "-ffast-math"]
LDFLAGS = ["-fopenmp"]
#: Seconds after which loading an existing build must have rebuilt it (a load of a built library takes < 1 s).
REBUILD_SECONDS = 5.0


def _cpu_model() -> str:
    """The CPU model name (``-march=native`` code is specific to it)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass

    return platform.processor() or platform.machine()


@contextlib.contextmanager
def _quiet_torch_builder():
    """torch's extension builder with its logger at ERROR ("No CUDA runtime is found" is expected on CPUs)."""
    quiet = logging.getLogger("torch.utils.cpp_extension")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        yield
    finally:
        quiet.setLevel(level)


def _source() -> Path:
    """The kernel source shipped with the package."""
    return Path(__file__).with_name("csrc") / "edge_ops.cpp"


def build_inputs() -> list[str]:
    """Everything besides the source text that enters torch's build file (build.ninja): compiler flags and
    compiler, torch and Python versions, the CPU model (``-march=native``) and the include paths of torch and
    Python (a second environment has other paths: its own build, never a silent rebuild of this one)."""

    with _quiet_torch_builder():
        from torch.utils.cpp_extension import include_paths

        includes = include_paths()
    return [*CFLAGS, "|", *LDFLAGS, "|", os.environ.get("CXX", "c++"), torch.__version__, sys.version.split()[0],
            _cpu_model(), "|", *includes, sysconfig.get_paths()["include"]]


def build_config() -> tuple[str, Path]:
    """(extension name, build directory) for this build configuration.

    The name holds a hash of the kernel source text and :func:`build_inputs`, and the directory lives under
    the user's cache (``$GEODITE_SIM_CACHE``, else ``$XDG_CACHE_HOME/geodite_sim``, else ``~/.cache/geodite_sim``).
    The build compiles a copy of the source kept in that directory, so the checkout's path (a second checkout,
    a symlinked venv, a Ray worker) never enters the build: one configuration, one build, reused by all.
    """
    h = hashlib.sha256(_source().read_bytes())
    for part in build_inputs():
        h.update(part.encode())
    name = f"geodite_edge_ops_{h.hexdigest()[:16]}"
    base = os.environ.get("GEODITE_SIM_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "geodite_sim")
    return name, Path(base) / "torch_extensions" / name


def _source_copy(build_dir: Path) -> Path:
    """The source copy the build compiles (written once: its path and mtime stay those of the cache)."""
    src, copy = _source(), build_dir / "edge_ops.cpp"
    text = src.read_bytes()
    if not copy.exists() or copy.read_bytes() != text:
        tmp = copy.with_suffix(f".tmp{os.getpid()}")
        tmp.write_bytes(text)
        tmp.replace(copy)
    return copy


@contextlib.contextmanager
def _build_lock(build_dir: Path):
    """An OS lock on the build directory (released if its holder dies); says so while another process holds it."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - no fcntl (Windows): torch's own lock only
        yield
        return

    with open(build_dir / "geodite_build.lock", "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            print(f"geodite_sim: waiting for another process building the CPU kernels (lock {f.name})…",
                  file=sys.stderr, flush=True)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _load_extension():
    """Compile (first use of this build configuration) and import the C++ kernels; None if disabled or failed.

    A build is announced on stderr when it starts (the library is missing) and, should torch's builder rebuild
    an existing one, when it ends; a process waiting for another one's build says so.
    """
    global _EXT, _EXT_FAILED
    if _EXT is not None or _EXT_FAILED:
        return _EXT
    if os.environ.get("GEODITE_FUSED", "1") == "0":
        _EXT_FAILED = True
        return None

    try:
        with _quiet_torch_builder():
            from torch.utils.cpp_extension import load

        name, build_dir = build_config()
        build_dir.mkdir(parents=True, exist_ok=True)
        with _build_lock(build_dir):
            src = _source_copy(build_dir)
            announced = not (build_dir / f"{name}.so").exists()
            if announced:
                print(f"geodite_sim: building CPU kernels (once per configuration, ~1 min) in {build_dir}…",
                      file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            with _quiet_torch_builder():  # copies: torch's builder appends to the lists it is given
                _EXT = load(name=name, sources=[str(src)], extra_cflags=list(CFLAGS), extra_ldflags=list(LDFLAGS),
                            build_directory=str(build_dir), verbose=False)
            seconds = time.perf_counter() - t0
        if announced or seconds > REBUILD_SECONDS:
            print(f"geodite_sim: {'built' if announced else 'rebuilt'} the CPU kernels in {seconds:.0f} s "
                  f"({build_dir})", file=sys.stderr, flush=True)
    except Exception as exc:  # noqa: BLE001 - no compiler, headers missing, ...: eager still works
        _EXT_FAILED = True
        warnings.warn(f"geodite_sim: fused CPU edge kernels unavailable ({type(exc).__name__}: {exc}); "
                      "using the eager implementation", RuntimeWarning, stacklevel=2)
    return _EXT


def fused_available(device: torch.device | str) -> bool:
    """Whether the fused kernels can run on ``device`` (CPU, compiler present, not disabled)."""
    return torch.device(device).type == "cpu" and _load_extension() is not None


# ---------------------------------------------------------------------- eager reference
def message_eager(X, o_d, o_t, Y, src, dst) -> torch.Tensor:
    """sum_{e: dst_e = i} o_d[e] (x) Y[e] + o_t[e] * X[src_e]: X [N, 8, C], o_* [E, C], Y [E, 8] -> [N, 8, C]."""
    dX = torch.addcmul(o_d.unsqueeze(1) * Y.unsqueeze(-1), o_t.unsqueeze(1), X.index_select(0, src))
    return X.new_zeros(X.shape).index_add_(0, dst, dX)


def attention_eager(q, k, v, xs, a_pre, f, src, dst, heads: int, scale: float,
                    dropout: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gated attention + filter message (paper Eq. 5-6), split into its scalar and vector parts.

    o = alpha * v_j + f * xs_j with alpha[e, h] = silu(sum_{c in h} q_i k_j silu(a_pre))[e, h] * scale;
    q, k [N, C], v, xs [N, 3C], a_pre [E, C], f [E, 3C]. Returns (sum over j->i of o[:, :C] [N, C],
    o_d = o[:, C:2C] [E, C], o_t = o[:, 2C:] [E, C]). ``dropout`` acts on alpha (training).
    """
    n_edges, c = a_pre.shape
    a = torch.nn.functional.silu(a_pre)
    # Sender-side features in one gather, so the backward pass is one index_add.
    k_j, v_j, x_j = torch.cat([k, v, xs], dim=-1).index_select(0, src).split([c, 3 * c, 3 * c], dim=-1)
    logits = (q.index_select(0, dst) * k_j * a).view(n_edges, heads, c // heads).sum(-1)  # [E, H]
    alpha = torch.nn.functional.silu(logits) * scale
    if dropout > 0:
        alpha = torch.nn.functional.dropout(alpha, dropout)
    o = (alpha.unsqueeze(-1) * v_j.reshape(n_edges, heads, 3 * c // heads)).view(n_edges, 3 * c)
    o_s, o_d, o_t = torch.addcmul(o, f, x_j).split(c, dim=-1)
    return q.new_zeros(q.shape).index_add_(0, dst, o_s), o_d, o_t


def degree_blocks(Y: torch.Tensor) -> torch.Tensor:
    """[E, 8] -> [E, 2, 8]: row 0 holds the l = 1 components, row 1 the l = 2 components."""
    blocks = Y.new_zeros(Y.shape[0], 2, 8)
    blocks[:, 0, L1] = Y[:, L1]
    blocks[:, 1, L2] = Y[:, L2]
    return blocks


def invariant_eager(Q, K, Y, src, dst, Y_blocks=None) -> torch.Tensor:
    """sum_l <Q_i - (Q_i.y)y, K_j - (K_j.y)y>_l per channel: Q, K [N, 8, C], Y [E, 8] -> [E, C].

    With unit-norm Y per degree this equals Q.K - sum_l (Q.y)_l (K.y)_l, so the rejected
    vectors are never formed.
    """
    eq = Q.index_select(0, dst)
    ek = K.index_select(0, src)
    if Y_blocks is None:
        Y_blocks = degree_blocks(Y)
    qy = torch.bmm(Y_blocks, eq)  # [E, 2, C]
    ky = torch.bmm(Y_blocks, ek)
    return (eq * ek).sum(1) - (qy * ky).sum(1)


# ---------------------------------------------------------------------- fused (CPU)
class _Message(torch.autograd.Function):
    @staticmethod
    def forward(ctx, X, o_d, o_t, Y, src, dst):
        ctx.save_for_backward(X, o_d, o_t, Y, src, dst)
        return _EXT.message_forward(X, o_d, o_t, Y, src, dst)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        X, o_d, o_t, Y, src, dst = ctx.saved_tensors
        gX, gd, gt, gY = _EXT.message_backward(grad, X, o_d, o_t, Y, src, dst)
        return gX, gd, gt, gY, None, None


class _Invariant(torch.autograd.Function):
    @staticmethod
    def forward(ctx, Q, K, Y, src, dst):
        ctx.save_for_backward(Q, K, Y, src, dst)
        return _EXT.invariant_forward(Q, K, Y, src, dst)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        Q, K, Y, src, dst = ctx.saved_tensors
        gQ, gK, gY = _EXT.invariant_backward(grad, Q, K, Y, src, dst)
        return gQ, gK, gY, None, None


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, xs, a_pre, f, src, dst, heads, scale):
        hmsg, o_d, o_t, logits = _EXT.attention_forward(q, k, v, xs, a_pre, f, src, dst, heads, scale)
        ctx.save_for_backward(logits, q, k, v, xs, a_pre, f, src, dst)
        ctx.heads, ctx.scale = heads, scale
        return hmsg, o_d, o_t

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_h, grad_d, grad_t):
        logits, q, k, v, xs, a_pre, f, src, dst = ctx.saved_tensors
        grad_h = torch.zeros_like(q) if grad_h is None else grad_h
        grad_d = torch.zeros_like(a_pre) if grad_d is None else grad_d
        grad_t = torch.zeros_like(a_pre) if grad_t is None else grad_t
        grads = _EXT.attention_backward(grad_h, grad_d, grad_t, logits, q, k, v, xs, a_pre, f, src, dst,
                                        ctx.heads, ctx.scale)
        return (*grads, None, None, None, None)


def attention(q, k, v, xs, a_pre, f, src, dst, heads: int, scale: float, fused: bool = False,
              dropout: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """See :func:`attention_eager`; ``fused`` uses the CPU kernel (no dropout, first-order only)."""
    if fused and dropout == 0.0:
        return _Attention.apply(q, k, v, xs, a_pre, f, src, dst, heads, scale)
    return attention_eager(q, k, v, xs, a_pre, f, src, dst, heads, scale, dropout)


class _GatedResidual(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t, g, u):
        ctx.save_for_backward(g, u)
        return _EXT.gated_residual_forward(t, g, u)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        g, u = ctx.saved_tensors
        gg, gu = _EXT.gated_residual_backward(grad, g, u)
        return grad, gg, gu


def gated_residual(t, g, u, fused: bool = False) -> torch.Tensor:
    """t + silu(g) * u (the edge-feature update); ``fused``: one CPU pass each way (first-order only)."""
    if fused:
        return _GatedResidual.apply(t, g, u)
    return t + torch.nn.functional.silu(g) * u


def message(X, o_d, o_t, Y, src, dst, fused: bool = False) -> torch.Tensor:
    """See :func:`message_eager`; ``fused`` uses the CPU kernel (first-order autograd only)."""
    if fused:
        return _Message.apply(X, o_d, o_t, Y, src, dst)
    return message_eager(X, o_d, o_t, Y, src, dst)


def invariant(Q, K, Y, src, dst, fused: bool = False, Y_blocks=None) -> torch.Tensor:
    """See :func:`invariant_eager`; ``fused`` uses the CPU kernel (first-order autograd only)."""
    if fused:
        return _Invariant.apply(Q, K, Y, src, dst)
    return invariant_eager(Q, K, Y, src, dst, Y_blocks)
