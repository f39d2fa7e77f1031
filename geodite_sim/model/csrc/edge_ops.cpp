// Fused per-edge operations of the Geodite interaction layer (CPU).
//
// The operations read node tensors [N, 8, C] (small: they stay in cache) and edge tensors
// [E, C], and never materialise an [E, 8, C] tensor, in the forward or the backward pass.
// Any edge order is valid. Loops that scatter into nodes run serially in edge order (see
// scatter_loop), so a system's results do not depend on the rest of the batch.
//
// message:   out[dst] += o_d (x) Y + o_t * X[src]                    (paper Eq. 7, l = 1, 2)
// attention: o = silu(q_i . (k_j * a)) per head * v_j + f * x_j   (node inputs gathered in-kernel)
// invariant: w = sum_m Q[dst]_m K[src]_m - sum_l (Y_l . Q[dst]_l)(Y_l . K[src]_l)
//            (the inner product of the components of Q_i and K_j orthogonal to Y, per degree)
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

constexpr int64_t kRows = 8;  // 3 (l = 1) + 5 (l = 2)
constexpr int64_t kGrain = 64;  // edges per thread chunk in loops without scatters

// Loops that scatter into node tensors run on one thread, in edge order: the sum into a node is then
// the same, bit for bit, whatever else shares the batch (results must not depend on batch
// composition: relaxations and MD resumed in other batches reproduce uninterrupted ones exactly).
// Per-thread buffers would make the summation order depend on where thread chunks fall.
template <typename F>
void scatter_loop(int64_t E, F&& f) { f(int64_t{0}, E); }

// Calls f(scalar) for float32 / float64 (the pragmas below cannot sit inside AT_DISPATCH's macro).
template <typename F>
void dispatch(at::ScalarType type, F&& f) {
  if (type == at::kFloat) f(float{});
  else if (type == at::kDouble) f(double{});
  else TORCH_CHECK(false, "geodite edge_ops: float32 or float64 tensors only");
}

// Rows of an [E, C] tensor may be strided (a column block of a wider tensor); columns must be unit-stride.
at::Tensor rows(const at::Tensor& x) { return x.stride(-1) == 1 ? x : x.contiguous(); }


void check_inputs(const at::Tensor& node, const at::Tensor& y, const at::Tensor& src, const at::Tensor& dst) {
  TORCH_CHECK(node.device().is_cpu(), "geodite edge_ops: CPU tensors only");
  TORCH_CHECK(node.dim() == 3 && node.size(1) == kRows, "node tensor must be [N, 8, C]");
  TORCH_CHECK(y.dim() == 2 && y.size(1) == kRows, "Y must be [E, 8]");
  TORCH_CHECK(src.scalar_type() == at::kLong && dst.scalar_type() == at::kLong, "indices must be int64");
  TORCH_CHECK(src.numel() == y.size(0) && dst.numel() == y.size(0), "index / Y length mismatch");
}

}  // namespace

at::Tensor message_forward(at::Tensor X, at::Tensor od, at::Tensor ot, at::Tensor Y, at::Tensor src, at::Tensor dst) {
  check_inputs(X, Y, src, dst);
  X = X.contiguous(); od = rows(od); ot = rows(ot); Y = Y.contiguous();
  src = src.contiguous(); dst = dst.contiguous();
  const int64_t E = src.numel(), C = X.size(2), sd = od.stride(0), st = ot.stride(0);
  auto out = at::zeros_like(X);
  
  dispatch(X.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* x = X.data_ptr<scalar_t>();
    const scalar_t* pd = od.data_ptr<scalar_t>();
    const scalar_t* pt = ot.data_ptr<scalar_t>();
    const scalar_t* py = Y.data_ptr<scalar_t>();
    const int64_t* ps = src.data_ptr<int64_t>();
    const int64_t* pr = dst.data_ptr<int64_t>();
    scatter_loop(E, [&](int64_t begin, int64_t end) {
      scalar_t* acc = out.data_ptr<scalar_t>();
      for (int64_t e = begin; e < end; ++e) {
        const scalar_t* xs = x + ps[e] * kRows * C;
        const scalar_t* d = pd + e * sd;
        const scalar_t* t = pt + e * st;
        scalar_t* o = acc + pr[e] * kRows * C;
        for (int64_t m = 0; m < kRows; ++m) {
          const scalar_t ym = py[e * kRows + m];
          scalar_t* om = o + m * C;
          const scalar_t* xm = xs + m * C;
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) om[c] += d[c] * ym + t[c] * xm[c];
        }
      }
    });
  });
  return out;
}

std::vector<at::Tensor> message_backward(at::Tensor G, at::Tensor X, at::Tensor od, at::Tensor ot, at::Tensor Y,
                                         at::Tensor src, at::Tensor dst) {
  check_inputs(X, Y, src, dst);
  G = G.contiguous(); X = X.contiguous(); od = rows(od); ot = rows(ot); Y = Y.contiguous();
  src = src.contiguous(); dst = dst.contiguous();
  const int64_t E = src.numel(), C = X.size(2), sd = od.stride(0), st = ot.stride(0);
  auto gX = at::zeros_like(X);
  auto gd = at::empty({E, C}, X.options());
  auto gt = at::empty({E, C}, X.options());
  auto gY = at::empty_like(Y);
  
  dispatch(X.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* g = G.data_ptr<scalar_t>();
    const scalar_t* x = X.data_ptr<scalar_t>();
    const scalar_t* pd = od.data_ptr<scalar_t>();
    const scalar_t* pt = ot.data_ptr<scalar_t>();
    const scalar_t* py = Y.data_ptr<scalar_t>();
    const int64_t* ps = src.data_ptr<int64_t>();
    const int64_t* pr = dst.data_ptr<int64_t>();
    scalar_t* qd = gd.data_ptr<scalar_t>();
    scalar_t* qt = gt.data_ptr<scalar_t>();
    scalar_t* qy = gY.data_ptr<scalar_t>();
    scatter_loop(E, [&](int64_t begin, int64_t end) {
      scalar_t* acc = gX.data_ptr<scalar_t>();
      for (int64_t e = begin; e < end; ++e) {
        const scalar_t* gi = g + pr[e] * kRows * C;
        const scalar_t* xs = x + ps[e] * kRows * C;
        const scalar_t* d = pd + e * sd;
        const scalar_t* t = pt + e * st;
        scalar_t* ad = qd + e * C;
        scalar_t* at_ = qt + e * C;
        scalar_t* ax = acc + ps[e] * kRows * C;
        for (int64_t c = 0; c < C; ++c) { ad[c] = 0; at_[c] = 0; }
        for (int64_t m = 0; m < kRows; ++m) {
          const scalar_t ym = py[e * kRows + m];
          const scalar_t* gm = gi + m * C;
          const scalar_t* xm = xs + m * C;
          scalar_t* axm = ax + m * C;
          scalar_t s = 0;
#pragma omp simd reduction(+ : s)
          for (int64_t c = 0; c < C; ++c) {
            const scalar_t gv = gm[c];
            ad[c] += gv * ym;
            at_[c] += gv * xm[c];
            axm[c] += gv * t[c];
            s += gv * d[c];
          }
          qy[e * kRows + m] = s;
        }
      }
    });
  });
  return {gX, gd, gt, gY};
}

at::Tensor invariant_forward(at::Tensor Q, at::Tensor K, at::Tensor Y, at::Tensor src, at::Tensor dst) {
  check_inputs(Q, Y, src, dst);
  Q = Q.contiguous(); K = K.contiguous(); Y = Y.contiguous(); src = src.contiguous(); dst = dst.contiguous();
  const int64_t E = src.numel(), C = Q.size(2);
  auto w = at::empty({E, C}, Q.options());
  dispatch(Q.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* pq = Q.data_ptr<scalar_t>();
    const scalar_t* pk = K.data_ptr<scalar_t>();
    const scalar_t* py = Y.data_ptr<scalar_t>();
    const int64_t* ps = src.data_ptr<int64_t>();
    const int64_t* pr = dst.data_ptr<int64_t>();
    scalar_t* pw = w.data_ptr<scalar_t>();
    at::parallel_for(0, E, kGrain, [&](int64_t begin, int64_t end) {
      for (int64_t e = begin; e < end; ++e) {
        const scalar_t* q = pq + pr[e] * kRows * C;
        const scalar_t* k = pk + ps[e] * kRows * C;
        const scalar_t* y = py + e * kRows;
        scalar_t* we = pw + e * C;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) {
          scalar_t dot = 0, qy1 = 0, ky1 = 0, qy2 = 0, ky2 = 0;
          for (int64_t m = 0; m < 3; ++m) {
            const scalar_t a = q[m * C + c], b = k[m * C + c];
            dot += a * b; qy1 += y[m] * a; ky1 += y[m] * b;
          }
          for (int64_t m = 3; m < kRows; ++m) {
            const scalar_t a = q[m * C + c], b = k[m * C + c];
            dot += a * b; qy2 += y[m] * a; ky2 += y[m] * b;
          }
          we[c] = dot - qy1 * ky1 - qy2 * ky2;
        }
      }
    });
  });
  return w;
}

std::vector<at::Tensor> invariant_backward(at::Tensor G, at::Tensor Q, at::Tensor K, at::Tensor Y, at::Tensor src,
                                           at::Tensor dst) {
  check_inputs(Q, Y, src, dst);
  G = G.contiguous(); Q = Q.contiguous(); K = K.contiguous(); Y = Y.contiguous();
  src = src.contiguous(); dst = dst.contiguous();
  const int64_t E = src.numel(), C = Q.size(2);
  auto gQ = at::zeros_like(Q);
  auto gK = at::zeros_like(K);
  auto gY = at::empty_like(Y);
  dispatch(Q.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* g = G.data_ptr<scalar_t>();
    const scalar_t* pq = Q.data_ptr<scalar_t>();
    const scalar_t* pk = K.data_ptr<scalar_t>();
    const scalar_t* py = Y.data_ptr<scalar_t>();
    const int64_t* ps = src.data_ptr<int64_t>();
    const int64_t* pr = dst.data_ptr<int64_t>();
    scalar_t* qy_out = gY.data_ptr<scalar_t>();
    scatter_loop(E, [&](int64_t begin, int64_t end) {
      scalar_t* aq_base = gQ.data_ptr<scalar_t>();
      scalar_t* ak_base = gK.data_ptr<scalar_t>();
      for (int64_t e = begin; e < end; ++e) {
        const scalar_t* q = pq + pr[e] * kRows * C;
        const scalar_t* k = pk + ps[e] * kRows * C;
        const scalar_t* y = py + e * kRows;
        const scalar_t* ge = g + e * C;
        scalar_t* aq = aq_base + pr[e] * kRows * C;
        scalar_t* ak = ak_base + ps[e] * kRows * C;
        scalar_t y0 = 0, y1 = 0, y2 = 0, y3 = 0, y4 = 0, y5 = 0, y6 = 0, y7 = 0;
#pragma omp simd reduction(+ : y0, y1, y2, y3, y4, y5, y6, y7)
        for (int64_t c = 0; c < C; ++c) {
          scalar_t qy1 = 0, ky1 = 0, qy2 = 0, ky2 = 0;
          for (int64_t m = 0; m < 3; ++m) { qy1 += y[m] * q[m * C + c]; ky1 += y[m] * k[m * C + c]; }
          for (int64_t m = 3; m < kRows; ++m) { qy2 += y[m] * q[m * C + c]; ky2 += y[m] * k[m * C + c]; }
          const scalar_t gc = ge[c];
          scalar_t gy[kRows];
          for (int64_t m = 0; m < kRows; ++m) {
            const scalar_t qyl = m < 3 ? qy1 : qy2, kyl = m < 3 ? ky1 : ky2;
            const scalar_t a = q[m * C + c], b = k[m * C + c];
            aq[m * C + c] += gc * (b - y[m] * kyl);
            ak[m * C + c] += gc * (a - y[m] * qyl);
            gy[m] = -gc * (a * kyl + qyl * b);
          }
          y0 += gy[0]; y1 += gy[1]; y2 += gy[2]; y3 += gy[3];
          y4 += gy[4]; y5 += gy[5]; y6 += gy[6]; y7 += gy[7];
        }
        scalar_t* oy = qy_out + e * kRows;
        oy[0] = y0; oy[1] = y1; oy[2] = y2; oy[3] = y3; oy[4] = y4; oy[5] = y5; oy[6] = y6; oy[7] = y7;
      }
    });
  });
  return {gQ, gK, gY};
}

// attention (paper Eq. 5-6), with a = silu(a_pre):
//   alpha[e, h] = silu(sum_{c in h} q[dst, c] k[src, c] a[e, c]) * scale
//   o[e]        = alpha[e, head] * v[src] + f[e] * xs[src]                          [3C]
// The first C columns of o (the scalar message) are summed into receivers here (hmsg [N, C]);
// the other 2C are returned per edge as o_d [E, C] and o_t [E, C]. logits [E, H] are kept for the backward.
std::vector<at::Tensor> attention_forward(at::Tensor q, at::Tensor k, at::Tensor v, at::Tensor xs, at::Tensor a_pre,
                                          at::Tensor f, at::Tensor src, at::Tensor dst, int64_t heads, double scale) {
  TORCH_CHECK(q.device().is_cpu(), "geodite edge_ops: CPU tensors only");
  q = q.contiguous(); k = k.contiguous(); v = v.contiguous(); xs = xs.contiguous();
  a_pre = rows(a_pre); f = rows(f); src = src.contiguous(); dst = dst.contiguous();
  const int64_t E = src.numel(), N = q.size(0), C = q.size(1), C3 = v.size(1);
  const int64_t sa = a_pre.stride(0), sf = f.stride(0);
  TORCH_CHECK(C % heads == 0 && C3 == 3 * C && xs.size(1) == C3 && f.size(1) == C3 && a_pre.size(1) == C,
              "attention: inconsistent shapes");
  const int64_t dk = C / heads, dv = C3 / heads;
  auto od = at::empty({E, C}, q.options()), ot = at::empty({E, C}, q.options());
  auto logits = at::empty({E, heads}, q.options());
  auto hmsg = at::zeros({N, C}, q.options());
  
  dispatch(q.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t *pq = q.data_ptr<scalar_t>(), *pk = k.data_ptr<scalar_t>(), *pv = v.data_ptr<scalar_t>();
    const scalar_t *px = xs.data_ptr<scalar_t>(), *pa = a_pre.data_ptr<scalar_t>(), *pf = f.data_ptr<scalar_t>();
    const int64_t *ps = src.data_ptr<int64_t>(), *pr = dst.data_ptr<int64_t>();
    scalar_t *pod = od.data_ptr<scalar_t>(), *pot = ot.data_ptr<scalar_t>(), *pl = logits.data_ptr<scalar_t>();
    const scalar_t sc = static_cast<scalar_t>(scale);
    scatter_loop(E, [&](int64_t begin, int64_t end) {
      scalar_t* hacc = hmsg.data_ptr<scalar_t>();
      for (int64_t e = begin; e < end; ++e) {
        const scalar_t *qi = pq + pr[e] * C, *kj = pk + ps[e] * C, *ae = pa + e * sa;
        const scalar_t *vj = pv + ps[e] * C3, *xj = px + ps[e] * C3, *fe = pf + e * sf;
        // column blocks of o: [0, C) summed into the receiver, [C, 2C) -> o_d[e], [2C, 3C) -> o_t[e]
        scalar_t* hi = hacc + pr[e] * C;
        scalar_t* ode = pod + e * C;
        scalar_t* ote = pot + e * C;
        for (int64_t h = 0; h < heads; ++h) {
          scalar_t s = 0;
#pragma omp simd reduction(+ : s)
          for (int64_t c = h * dk; c < (h + 1) * dk; ++c) {
            const scalar_t x = ae[c];
            s += qi[c] * kj[c] * (x / (1 + std::exp(-x)));
          }
          pl[e * heads + h] = s;
          const scalar_t alpha = s / (1 + std::exp(-s)) * sc;
          const int64_t j0 = h * dv, j1 = (h + 1) * dv;
          const int64_t b1 = std::min(std::max(j0, C), j1), b2 = std::min(std::max(j0, 2 * C), j1);
#pragma omp simd
          for (int64_t j = j0; j < b1; ++j) hi[j] += alpha * vj[j] + fe[j] * xj[j];
#pragma omp simd
          for (int64_t j = b1; j < b2; ++j) ode[j - C] = alpha * vj[j] + fe[j] * xj[j];
#pragma omp simd
          for (int64_t j = b2; j < j1; ++j) ote[j - 2 * C] = alpha * vj[j] + fe[j] * xj[j];
        }
      }
    });
  });
  return {hmsg, od, ot, logits};
}

// Gradients of attention_forward from g_hmsg [N, C], g_o_d [E, C] and g_o_t [E, C]:
// (g_q [N, C], g_k [N, C], g_v [N, 3C], g_xs [N, 3C], g_a_pre [E, C], g_f [E, 3C]).
std::vector<at::Tensor> attention_backward(at::Tensor gh, at::Tensor gd, at::Tensor gt, at::Tensor logits, at::Tensor q,
                                           at::Tensor k, at::Tensor v, at::Tensor xs, at::Tensor a_pre, at::Tensor f,
                                           at::Tensor src, at::Tensor dst, int64_t heads, double scale) {
  gh = gh.contiguous(); gd = gd.contiguous(); gt = gt.contiguous(); logits = logits.contiguous(); q = q.contiguous();
  k = k.contiguous(); v = v.contiguous(); xs = xs.contiguous(); a_pre = rows(a_pre); f = rows(f);
  src = src.contiguous(); dst = dst.contiguous();
  const int64_t E = src.numel(), C = q.size(1), C3 = v.size(1), sa = a_pre.stride(0), sf = f.stride(0);
  const int64_t dk = C / heads, dv = C3 / heads;
  auto gq = at::zeros_like(q), gk = at::zeros_like(k), gv = at::zeros_like(v), gx = at::zeros_like(xs);
  auto ga = at::empty({E, C}, q.options()), gf = at::empty({E, C3}, q.options());
  dispatch(q.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t *pgh = gh.data_ptr<scalar_t>(), *pgd = gd.data_ptr<scalar_t>(), *pgt = gt.data_ptr<scalar_t>();
    const scalar_t* pl = logits.data_ptr<scalar_t>();
    const scalar_t *pq = q.data_ptr<scalar_t>(), *pk = k.data_ptr<scalar_t>(), *pv = v.data_ptr<scalar_t>();
    const scalar_t *px = xs.data_ptr<scalar_t>(), *pa = a_pre.data_ptr<scalar_t>(), *pf = f.data_ptr<scalar_t>();
    const int64_t *ps = src.data_ptr<int64_t>(), *pr = dst.data_ptr<int64_t>();
    scalar_t *pga = ga.data_ptr<scalar_t>(), *pgf = gf.data_ptr<scalar_t>();
    const scalar_t sc = static_cast<scalar_t>(scale);
    scatter_loop(E, [&](int64_t begin, int64_t end) {
      scalar_t *aq = gq.data_ptr<scalar_t>(), *ak = gk.data_ptr<scalar_t>();
      scalar_t *av = gv.data_ptr<scalar_t>(), *ax = gx.data_ptr<scalar_t>();
      for (int64_t e = begin; e < end; ++e) {
        const int64_t i = pr[e], j = ps[e];
        const scalar_t *qi = pq + i * C, *kj = pk + j * C, *ae = pa + e * sa;
        const scalar_t *vj = pv + j * C3, *xj = px + j * C3, *fe = pf + e * sf;
        // gradient of column c of o: [0, C) from the receiver's g_hmsg, then g_o_d[e], g_o_t[e]
        const scalar_t *ghi = pgh + i * C, *gde = pgd + e * C, *gte = pgt + e * C;
        scalar_t *gae = pga + e * C, *gfe = pgf + e * C3;
        scalar_t *aqi = aq + i * C, *akj = ak + j * C, *avj = av + j * C3, *axj = ax + j * C3;
        for (int64_t h = 0; h < heads; ++h) {
          const scalar_t s = pl[e * heads + h];
          const scalar_t sig = 1 / (1 + std::exp(-s));
          const scalar_t alpha = s * sig * sc;
          const int64_t j0 = h * dv, j1 = (h + 1) * dv;
          const int64_t b1 = std::min(std::max(j0, C), j1), b2 = std::min(std::max(j0, 2 * C), j1);
          scalar_t galpha = 0;
          for (int blk = 0; blk < 3; ++blk) {
            const int64_t lo = blk == 0 ? j0 : blk == 1 ? b1 : b2, hi = blk == 0 ? b1 : blk == 1 ? b2 : j1;
            const scalar_t* gsrc = blk == 0 ? ghi : blk == 1 ? gde : gte;
            const int64_t off = blk * C;  // column c of o is element c - off of its block
#pragma omp simd reduction(+ : galpha)
            for (int64_t c = lo; c < hi; ++c) {
              const scalar_t g = gsrc[c - off];
              galpha += g * vj[c]; avj[c] += g * alpha; gfe[c] = g * xj[c]; axj[c] += g * fe[c];
            }
          }
          const scalar_t gs = galpha * sc * sig * (1 + s * (1 - sig));  // d silu(s) / ds
#pragma omp simd
          for (int64_t c = h * dk; c < (h + 1) * dk; ++c) {
            const scalar_t x = ae[c], sx = 1 / (1 + std::exp(-x)), act = x * sx;
            aqi[c] += gs * kj[c] * act;
            akj[c] += gs * qi[c] * act;
            gae[c] = gs * qi[c] * kj[c] * sx * (1 + x * (1 - sx));
          }
        }
      }
    });
  });
  return {gq, gk, gv, gx, ga, gf};
}

// gated residual: out = t + silu(g) * u, elementwise over [E, C] (the edge update, paper Eq. 9).
at::Tensor gated_residual_forward(at::Tensor t, at::Tensor g, at::Tensor u) {
  t = t.contiguous(); g = g.contiguous(); u = u.contiguous();
  auto out = at::empty_like(t);
  const int64_t n = t.numel();
  dispatch(t.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t *pt = t.data_ptr<scalar_t>(), *pg = g.data_ptr<scalar_t>(), *pu = u.data_ptr<scalar_t>();
    scalar_t* po = out.data_ptr<scalar_t>();
    at::parallel_for(0, n, 4096, [&](int64_t begin, int64_t end) {
#pragma omp simd
      for (int64_t i = begin; i < end; ++i) po[i] = pt[i] + pg[i] / (1 + std::exp(-pg[i])) * pu[i];
    });
  });
  return out;
}

// Gradients of gated_residual_forward with respect to g and u (that of t is the incoming gradient).
std::vector<at::Tensor> gated_residual_backward(at::Tensor grad, at::Tensor g, at::Tensor u) {
  grad = grad.contiguous(); g = g.contiguous(); u = u.contiguous();
  auto gg = at::empty_like(g), gu = at::empty_like(u);
  const int64_t n = g.numel();
  dispatch(g.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t *pd = grad.data_ptr<scalar_t>(), *pg = g.data_ptr<scalar_t>(), *pu = u.data_ptr<scalar_t>();
    scalar_t *qg = gg.data_ptr<scalar_t>(), *qu = gu.data_ptr<scalar_t>();
    at::parallel_for(0, n, 4096, [&](int64_t begin, int64_t end) {
#pragma omp simd
      for (int64_t i = begin; i < end; ++i) {
        const scalar_t x = pg[i], sx = 1 / (1 + std::exp(-x));
        qu[i] = pd[i] * x * sx;
        qg[i] = pd[i] * pu[i] * sx * (1 + x * (1 - sx));
      }
    });
  });
  return {gg, gu};
}

// Nose-Hoover chain sweeps (ASE's integrate_nhc), one system per iteration: tloop x Suzuki-Yoshida weights,
// backward chain sweep, thermostat positions, momentum scale, forward chain sweep. Returns (p_eta', eta', scale).
std::vector<at::Tensor> nhc_chain(at::Tensor k2, at::Tensor n3kT, at::Tensor kT, at::Tensor Q, at::Tensor p_eta,
                                  at::Tensor eta, double delta, int64_t tloop) {
  k2 = k2.contiguous(); n3kT = n3kT.contiguous(); kT = kT.contiguous(); Q = Q.contiguous();
  auto pe_out = p_eta.contiguous().clone(), eta_out = eta.contiguous().clone(), scale_out = at::empty_like(k2);
  const int64_t S = Q.size(0), M = Q.size(1);
  const double c = std::pow(2.0, 1.0 / 3.0);  // as Python 2 ** (1 / 3)
  const double w1 = 1.0 / (2.0 - c), w0 = -c / (2.0 - c);
  const double weights[3] = {w1, w0, w1};
  dispatch(Q.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t *pk2 = k2.data_ptr<scalar_t>(), *pn = n3kT.data_ptr<scalar_t>(), *pkT = kT.data_ptr<scalar_t>();
    const scalar_t *pQ = Q.data_ptr<scalar_t>();
    scalar_t *pe_all = pe_out.data_ptr<scalar_t>(), *eta_all = eta_out.data_ptr<scalar_t>();
    scalar_t *psc = scale_out.data_ptr<scalar_t>();
    at::parallel_for(0, S, 64, [&](int64_t begin, int64_t end) {
      for (int64_t s = begin; s < end; ++s) {
        scalar_t *pe = pe_all + s * M, *et = eta_all + s * M;
        const scalar_t *q = pQ + s * M;
        scalar_t k = pk2[s], scale = 1;
        const scalar_t n3 = pn[s], kt = pkT[s];
        for (int64_t l = 0; l < tloop; ++l) {
          for (int w = 0; w < 3; ++w) {
            const scalar_t d = static_cast<scalar_t>(weights[w] * delta / static_cast<double>(tloop));
            const scalar_t d2 = d / 2, d4 = d / 4;
            auto update = [&](int64_t j) {
              scalar_t a = 1;
              if (j < M - 1) { a = std::exp(-d4 * pe[j + 1] / q[j + 1]); pe[j] = pe[j] * a; }
              const scalar_t g = (j == 0) ? k - n3 : pe[j - 1] * pe[j - 1] / q[j - 1] - kt;
              pe[j] = pe[j] + d2 * g;
              if (j < M - 1) pe[j] = pe[j] * a;
            };
            for (int64_t j = M - 1; j >= 0; --j) update(j);
            for (int64_t j = 0; j < M; ++j) et[j] = et[j] + d * pe[j] / q[j];
            const scalar_t f = std::exp(-d * pe[0] / q[0]);
            scale = scale * f;
            k = k * f * f;
            for (int64_t j = 0; j < M; ++j) update(j);
          }
        }
        psc[s] = scale;
      }
    });
  });
  return {pe_out, eta_out, scale_out};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("message_forward", &message_forward, "sum over edges of o_d (x) Y + o_t * X[src] into receivers");
  m.def("message_backward", &message_backward, "gradients of message_forward");
  m.def("invariant_forward", &invariant_forward, "per-edge Y-rejected inner product of Q[dst] and K[src]");
  m.def("invariant_backward", &invariant_backward, "gradients of invariant_forward");
  m.def("attention_forward", &attention_forward, "gated attention + filter message: (hmsg [N, C], o_d [E, C], o_t [E, C], logits [E, H])");
  m.def("attention_backward", &attention_backward, "gradients of attention_forward");
  m.def("gated_residual_forward", &gated_residual_forward, "t + silu(g) * u");
  m.def("gated_residual_backward", &gated_residual_backward, "gradients of gated_residual_forward (g, u)");
  m.def("nhc_chain", &nhc_chain, "Nose-Hoover chain sweeps of every system: (p_eta, eta, momentum scale)");
}
