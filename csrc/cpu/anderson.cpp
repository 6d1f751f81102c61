// Fused Anderson-acceleration ops for the DEQ solver engine (ldeq_fast/solvers/fused.py), CPU kernels.
//
// Per iteration the engine calls, in order:
//   anderson_update: one pass over D: F[:,s] = fx, G[:,s] = g = fx - x, and the per-sample sums
//                    <g, G_j> (new Gram row/column s), ||g||^2, ||fx||^2 and ||fx + 1e-5||^2 (the
//                    published relative residual's denominator);
//   anderson_step:   bookkeeping (residual, divergence, best, stop masks, stats: per sample, or on the
//                    batch mean under a published policy, see ldeq_fast/ops/anderson.py) and the
//                    Anderson weights from the Gram matrix (fp64 solve);
//   anderson_mix:    one pass over D: x = sum_j alpha_j (F_j - (1 - beta) G_j), best = F[:,s] (or the
//                    iterate x before the mix, best_from_x) where the residual improved.
// Only active samples are touched, so a frozen sample's state never changes.
//
// Work is split into fixed-size (sample, D-chunk) tasks whose partial sums are combined in a fixed
// order, so results do not depend on the number of threads.
//
// Vectorisation: the hot loops are `omp simd` loops (and GCC/Clang vector types where a reduction has
// several accumulators), compiled twice (x86-64 baseline and x86-64-v3 = AVX2 + FMA) with the clone
// picked at load time for the running CPU.  at::vec::Vectorized is not used: in an extension built
// without ATen's CPU_CAPABILITY flags it is the generic fallback, which GCC turns into scalar code with
// stack spills (measured: 3.6 GB/s for the update pass where a plain torch.add streams ~19 GB/s on one
// core of the development machine; these loops reach ~11 GB/s for the update, ~20 GB/s for the mix).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define LDEQ_SIMD_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define LDEQ_SIMD_CLONES
#endif

namespace {

constexpr int64_t kChunk = 8192;  // elements per task: a chunk of g stays in L2 while it is dotted with G_j
constexpr int64_t kSub = 256;     // SIMD lanes accumulate at most this many elements before widening to double
constexpr int64_t kMaxM = 64;     // history length bound (stack arrays in the small solve)
constexpr double kPublishedEps = 1e-5;  // the published residuals' eps
enum Policy : int64_t { kPerSample = 0, kPublishedAnderson = 1, kPublishedFpi = 2 };

// One update chunk: F = fx, G = g = fx - x; returns sum g^2, sum fx^2 and sum (fx + 1e-5)^2 (fx + 1e-5
// rounded in T, as the published code adds it).
template <typename T>
LDEQ_SIMD_CLONES void update_chunk(const T* __restrict fx, const T* __restrict x, T* __restrict Fs,
                                   T* __restrict Gs, int64_t len, double* gg, double* ff, double* fe) {
  double sg = 0, sf = 0, se = 0;
  const T eps = static_cast<T>(kPublishedEps);
  for (int64_t start = 0; start < len; start += kSub) {
    const int64_t stop = std::min(len, start + kSub);
    T ag = 0, af = 0, ae = 0;
#pragma omp simd reduction(+ : ag, af, ae)
    for (int64_t i = start; i < stop; ++i) {
      const T f = fx[i];
      const T g = f - x[i];
      const T e = f + eps;
      Fs[i] = f;
      Gs[i] = g;
      ag += g * g;
      af += f * f;
      ae += e * e;
    }
    sg += ag;
    sf += af;
    se += ae;
  }
  *gg = sg;
  *ff = sf;
  *fe = se;
}

// sum_i a[i] * b[i]: SIMD lanes accumulate in T over sub-blocks, sub-block sums are added in double.
template <typename T>
LDEQ_SIMD_CLONES double dot(const T* __restrict a, const T* __restrict b, int64_t len) {
  double total = 0;
  for (int64_t start = 0; start < len; start += kSub) {
    const int64_t stop = std::min(len, start + kSub);
    T acc = 0;
#pragma omp simd reduction(+ : acc)
    for (int64_t i = start; i < stop; ++i) acc += a[i] * b[i];
    total += acc;
  }
  return total;
}

// out[j] = <g, G_j> for the N ring rows G_j = G + j * D at once: N concurrent streams keep more memory
// requests in flight than N separate dot products (1.3-1.5x on the development machine).  Explicit
// 32-byte vectors (GCC/Clang vector extensions): `omp simd` does not vectorise an array reduction.
template <typename T, int N>
LDEQ_SIMD_CLONES void multi_dot(const T* __restrict g, const T* __restrict G, int64_t D, int64_t len, double* out) {
  typedef T V __attribute__((vector_size(32)));
  constexpr int64_t W = 32 / sizeof(T);
  static_assert(kSub % W == 0, "sub-blocks hold whole vectors");
  double total[N] = {};
  for (int64_t start = 0; start < len; start += kSub) {
    const int64_t stop = std::min(len, start + kSub);
    V acc[N];
    for (int j = 0; j < N; ++j) acc[j] = V{};
    int64_t i = start;
    for (; i + W <= stop; i += W) {
      V gv;
      std::memcpy(&gv, g + i, sizeof(V));
#pragma GCC unroll 16
      for (int j = 0; j < N; ++j) {
        V row;
        std::memcpy(&row, G + j * D + i, sizeof(V));
        acc[j] += gv * row;
      }
    }
    for (int j = 0; j < N; ++j) {
      T sub = 0;
      for (int64_t l = 0; l < W; ++l) sub += acc[j][l];
      for (int64_t k = i; k < stop; ++k) sub += g[k] * G[j * D + k];
      total[j] += sub;
    }
  }
  for (int j = 0; j < N; ++j) out[j] = total[j];
}

// out[j] = <g, G_j> for j < n (row `slot` is g itself and is skipped by the generic path).
template <typename T>
void ring_dots(const T* g, const T* G, int64_t D, int64_t n, int64_t slot, int64_t len, double* out) {
  switch (n) {
    case 1: return multi_dot<T, 1>(g, G, D, len, out);
    case 2: return multi_dot<T, 2>(g, G, D, len, out);
    case 3: return multi_dot<T, 3>(g, G, D, len, out);
    case 4: return multi_dot<T, 4>(g, G, D, len, out);
    case 5: return multi_dot<T, 5>(g, G, D, len, out);
    case 6: return multi_dot<T, 6>(g, G, D, len, out);
    case 7: return multi_dot<T, 7>(g, G, D, len, out);
    case 8: return multi_dot<T, 8>(g, G, D, len, out);
    default:
      for (int64_t j = 0; j < n; ++j)
        if (j != slot) out[j] = dot<T>(g, G + j * D, len);
  }
}

// One mix chunk: out = sum_j a_j F_j (+ sum_j c_j G_j if UseG), ring slots D apart.  With the history
// length N known at compile time all 2N rows stream at once and `out` is written once (1.3-1.5x faster
// than row by row on the development machine).
template <typename T, int N, bool UseG>
LDEQ_SIMD_CLONES void mix_chunk_n(const T* __restrict F, const T* __restrict G, int64_t D, const T* a, const T* c,
                                  T* __restrict out, int64_t len) {
  T aa[N], cc[N];
  for (int j = 0; j < N; ++j) {
    aa[j] = a[j];
    cc[j] = c[j];
  }
#pragma omp simd
  for (int64_t i = 0; i < len; ++i) {
    T acc = aa[0] * F[i];
#pragma GCC unroll 16
    for (int j = 1; j < N; ++j) acc += aa[j] * F[j * D + i];
    if constexpr (UseG) {
#pragma GCC unroll 16
      for (int j = 0; j < N; ++j) acc += cc[j] * G[j * D + i];
    }
    out[i] = acc;
  }
}

// Any history length: rows one after another over L1-sized sub-blocks of `out`, same summation order.
template <typename T>
LDEQ_SIMD_CLONES void mix_chunk_any(const T* __restrict F, const T* __restrict G, int64_t D, const T* a, const T* c,
                                    int64_t n, bool use_g, T* __restrict out, int64_t len) {
  constexpr int64_t kBlock = 4 * kSub;
  for (int64_t start = 0; start < len; start += kBlock) {
    const int64_t stop = std::min(len, start + kBlock);
    const T a0 = a[0];
#pragma omp simd
    for (int64_t i = start; i < stop; ++i) out[i] = a0 * F[i];
    for (int64_t j = 1; j < n; ++j) {
      const T aj = a[j];
      const T* Fj = F + j * D;
#pragma omp simd
      for (int64_t i = start; i < stop; ++i) out[i] += aj * Fj[i];
    }
    if (!use_g) continue;
    for (int64_t j = 0; j < n; ++j) {
      const T cj = c[j];
      const T* Gj = G + j * D;
#pragma omp simd
      for (int64_t i = start; i < stop; ++i) out[i] += cj * Gj[i];
    }
  }
}

template <typename T, bool UseG>
void mix_chunk(const T* F, const T* G, int64_t D, const T* a, const T* c, int64_t n, T* out, int64_t len) {
  switch (n) {
    case 1: return mix_chunk_n<T, 1, UseG>(F, G, D, a, c, out, len);
    case 2: return mix_chunk_n<T, 2, UseG>(F, G, D, a, c, out, len);
    case 3: return mix_chunk_n<T, 3, UseG>(F, G, D, a, c, out, len);
    case 4: return mix_chunk_n<T, 4, UseG>(F, G, D, a, c, out, len);
    case 5: return mix_chunk_n<T, 5, UseG>(F, G, D, a, c, out, len);
    case 6: return mix_chunk_n<T, 6, UseG>(F, G, D, a, c, out, len);
    case 7: return mix_chunk_n<T, 7, UseG>(F, G, D, a, c, out, len);
    case 8: return mix_chunk_n<T, 8, UseG>(F, G, D, a, c, out, len);
    default: return mix_chunk_any<T>(F, G, D, a, c, n, UseG, out, len);
  }
}

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

std::vector<int64_t> selected(const at::Tensor& mask) {
  std::vector<int64_t> idx;
  const bool* p = mask.data_ptr<bool>();
  for (int64_t b = 0; b < mask.numel(); ++b)
    if (p[b]) idx.push_back(b);
  return idx;
}

void check_ring(const at::Tensor& F, const at::Tensor& G, const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.dim() == 2, op, ": x must be (B, D), got shape ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, op,
              ": supports float32 and float64 state, got ", x.scalar_type());
  const int64_t B = x.size(0), D = x.size(1);
  TORCH_CHECK(F.dim() == 3 && F.size(0) == B && F.size(2) == D && F.size(1) >= 1, op, ": F must be (B, m, D) = (", B,
              ", m, ", D, "), got ", F.sizes());
  TORCH_CHECK(G.sizes() == F.sizes(), op, ": G must have F's shape ", F.sizes(), ", got ", G.sizes());
  TORCH_CHECK(F.scalar_type() == x.scalar_type() && G.scalar_type() == x.scalar_type(), op,
              ": F, G and x must share a dtype, got ", F.scalar_type(), ", ", G.scalar_type(), ", ", x.scalar_type());
  TORCH_CHECK(x.is_contiguous() && F.is_contiguous() && G.is_contiguous(), op, ": x, F and G must be contiguous");
  TORCH_CHECK(x.device().is_cpu() && F.device().is_cpu() && G.device().is_cpu(), op, ": CPU kernel got a non-CPU tensor");
}

void check_slots(int64_t slot, int64_t n, int64_t m, const char* op) {
  TORCH_CHECK(m <= kMaxM, op, ": history length m=", m, " exceeds the supported maximum ", kMaxM);
  TORCH_CHECK(slot >= 0 && slot < m, op, ": slot ", slot, " out of range for m=", m);
  TORCH_CHECK(n >= 1 && n <= m && slot < n, op, ": need 1 <= n <= m and slot < n, got n=", n, ", slot=", slot,
              ", m=", m);
}

void check_flags(const at::Tensor& flags, int64_t B, const char* op) {
  TORCH_CHECK(flags.scalar_type() == at::kBool && flags.dim() == 2 && flags.size(0) == 4 && flags.size(1) == B &&
                  flags.is_contiguous(),
              op, ": flags must be a contiguous bool (4, B=", B, ") tensor [active, converged, diverged, improved], got ",
              flags.scalar_type(), " ", flags.sizes());
}

// ---------------------------------------------------------------------------------------------------------
// anderson_update

template <typename T>
void update_kernel(const T* fx, const T* x, T* F, T* G, double* part, const std::vector<int64_t>& act, int64_t m,
                   int64_t D, int64_t slot, int64_t n, int64_t nchunk) {
  const int64_t ntask = static_cast<int64_t>(act.size()) * nchunk;
  at::parallel_for(0, ntask, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = act[t / nchunk], c = t % nchunk;
      const int64_t c0 = c * kChunk, len = std::min(kChunk, D - c0);
      const T* fxp = fx + b * D + c0;
      const T* xp = x + b * D + c0;
      T* Fs = F + (b * m + slot) * D + c0;
      T* Gs = G + (b * m + slot) * D + c0;
      double gg, ff, fe;
      update_chunk<T>(fxp, xp, Fs, Gs, len, &gg, &ff, &fe);
      double* out = part + t * (m + 2);
      ring_dots<T>(Gs, G + b * m * D + c0, D, n, slot, len, out);
      out[slot] = gg;
      out[m] = ff;
      out[m + 1] = fe;
    }
  });
}

at::Tensor anderson_update_cpu(const at::Tensor& fx, const at::Tensor& x, at::Tensor& F, at::Tensor& G,
                               at::Tensor& gram, const at::Tensor& active, int64_t slot, int64_t n) {
  check_ring(F, G, x, "anderson_update");
  const int64_t B = x.size(0), D = x.size(1), m = F.size(1);
  check_slots(slot, n, m, "anderson_update");
  TORCH_CHECK(fx.sizes() == x.sizes(), "anderson_update: fx must have x's shape ", x.sizes(), ", got ", fx.sizes());
  TORCH_CHECK(fx.scalar_type() == x.scalar_type(), "anderson_update: fx dtype ", fx.scalar_type(),
              " differs from the solver state's ", x.scalar_type());
  TORCH_CHECK(fx.is_contiguous() && fx.device().is_cpu(), "anderson_update: fx must be a contiguous CPU tensor");
  const auto acc = acc_type(x.scalar_type());
  TORCH_CHECK(gram.scalar_type() == acc && gram.dim() == 3 && gram.size(0) == B && gram.size(1) == m &&
                  gram.size(2) == m && gram.is_contiguous(),
              "anderson_update: gram must be a contiguous ", acc, " (B, m, m) = (", B, ", ", m, ", ", m, ") tensor, got ",
              gram.scalar_type(), " ", gram.sizes());
  TORCH_CHECK(active.scalar_type() == at::kBool && active.dim() == 1 && active.size(0) == B && active.is_contiguous(),
              "anderson_update: active must be a contiguous bool (B,) tensor");

  const auto act = selected(active);
  const int64_t nchunk = std::max<int64_t>(1, (D + kChunk - 1) / kChunk);
  std::vector<double> part(act.size() * nchunk * (m + 2));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "anderson_update", [&] {
    update_kernel<scalar_t>(fx.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), F.data_ptr<scalar_t>(),
                            G.data_ptr<scalar_t>(), part.data(), act, m, D, slot, n, nchunk);
  });

  at::Tensor norms = at::zeros({B, 3}, x.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES(acc, "anderson_update_gram", [&] {
    scalar_t* gp = gram.data_ptr<scalar_t>();
    scalar_t* np = norms.data_ptr<scalar_t>();
    for (size_t a = 0; a < act.size(); ++a) {
      const int64_t b = act[a];
      std::vector<double> row(m + 2, 0.0);
      for (int64_t c = 0; c < nchunk; ++c)  // fixed order: deterministic across thread counts
        for (int64_t q = 0; q <= m + 1; ++q) row[q] += part[(a * nchunk + c) * (m + 2) + q];
      for (int64_t j = 0; j < n; ++j) {
        gp[(b * m + slot) * m + j] = static_cast<scalar_t>(row[j]);
        gp[(b * m + j) * m + slot] = static_cast<scalar_t>(row[j]);
      }
      np[b * 3] = static_cast<scalar_t>(row[slot]);
      np[b * 3 + 1] = static_cast<scalar_t>(row[m]);
      np[b * 3 + 2] = static_cast<scalar_t>(row[m + 1]);
    }
  });
  return norms;
}

// ---------------------------------------------------------------------------------------------------------
// anderson_step

// Anderson weights: solve (H + reg I) w = 1 over the n valid slots, alpha = w / sum(w) (the bordered
// system's solution).  H + reg I is symmetric positive definite for reg > 0, so elimination needs no
// pivoting; if it is not (reg = 0 and a rank-deficient history) fall back to the plain fixed-point step.
void anderson_weights(const double* H_in, int64_t m, int64_t n, int64_t slot, double lam, bool lam_scaled,
                      double* alpha) {
  std::fill(alpha, alpha + m, 0.0);
  if (n == 1) {
    alpha[0] = 1.0;
    return;
  }
  double A[kMaxM * kMaxM];
  double w[kMaxM];
  double maxdiag = 0;
  for (int64_t i = 0; i < n; ++i) maxdiag = std::max(maxdiag, H_in[i * m + i]);
  const double reg = lam_scaled ? lam * std::max(maxdiag, 1e-30) : lam;
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t j = 0; j < n; ++j) A[i * n + j] = H_in[i * m + j];
    A[i * n + i] += reg;
    w[i] = 1.0;
  }
  bool ok = true;
  for (int64_t p = 0; p < n && ok; ++p) {
    const double piv = A[p * n + p];
    if (!(piv > 0) || !std::isfinite(piv)) {
      ok = false;
      break;
    }
    for (int64_t r = p + 1; r < n; ++r) {
      const double f = A[r * n + p] / piv;
      for (int64_t c = p; c < n; ++c) A[r * n + c] -= f * A[p * n + c];
      w[r] -= f * w[p];
    }
  }
  double sum = 0;
  if (ok) {
    for (int64_t r = n - 1; r >= 0; --r) {
      double v = w[r];
      for (int64_t c = r + 1; c < n; ++c) v -= A[r * n + c] * w[c];
      w[r] = v / A[r * n + r];
      sum += w[r];
    }
    ok = std::isfinite(sum) && sum != 0;
  }
  if (!ok) {
    alpha[slot] = 1.0;
    return;
  }
  for (int64_t i = 0; i < n; ++i) alpha[i] = w[i] / sum;
}

template <typename A>
void step_kernel(const A* gram, const A* norms, bool* flags, A* stat, int64_t* nstep, A* trace, A* alpha, int64_t B,
                 int64_t m, int64_t k, int64_t n, double tol, bool stop_rel, double lam, bool lam_scaled,
                 double divergence_factor) {
  bool* active = flags;
  bool* converged = flags + B;
  bool* diverged = flags + 2 * B;
  bool* improved = flags + 3 * B;
  A* best_res = stat;
  A* best_abs = stat + B;
  A* best_rel = stat + 2 * B;
  A* first_res = stat + 3 * B;
  const A nan = std::numeric_limits<A>::quiet_NaN();
  const int64_t slot = k % m;
  double H[kMaxM * kMaxM];
  double w[kMaxM];
  for (int64_t b = 0; b < B; ++b) {
    improved[b] = false;
    A* al = alpha + b * m;
    std::fill(al, al + m, A(0));
    if (!active[b]) {
      trace[k * B + b] = nan;
      continue;
    }
    // residuals in the state's precision, as the reference computes them
    const A abs_r = std::sqrt(norms[b * 3]);
    const A rel_r = abs_r / (std::sqrt(norms[b * 3 + 1]) + A(1e-5));
    const A res = stop_rel ? rel_r : abs_r;
    if (k == 0) first_res[b] = res;
    const bool bad = !std::isfinite(res) || res > A(divergence_factor) * std::max(first_res[b], A(1e-30));
    const bool below = res < A(tol);
    if (!bad && res < best_res[b]) {
      improved[b] = true;
      best_res[b] = res;
      best_abs[b] = abs_r;
      best_rel[b] = rel_r;
    }
    nstep[b] += 1;
    trace[k * B + b] = res;
    diverged[b] = diverged[b] || bad;
    converged[b] = converged[b] || (!bad && below);
    active[b] = !bad && !below;
    if (!active[b]) continue;
    for (int64_t i = 0; i < m * m; ++i) H[i] = static_cast<double>(gram[b * m * m + i]);
    anderson_weights(H, m, n, slot, lam, lam_scaled, w);
    for (int64_t j = 0; j < m; ++j) al[j] = static_cast<A>(w[j]);
  }
}

// The published policies (ldeq_fast/ops/anderson.py): batch-mean residuals decide for the whole batch.
template <typename A>
void published_step_kernel(const A* gram, const A* norms, bool* flags, A* stat, int64_t* nstep, A* trace, A* alpha,
                           int64_t B, int64_t m, int64_t k, int64_t n, double tol, bool stop_rel, double lam,
                           bool lam_scaled, int64_t policy) {
  bool* active = flags;
  bool* converged = flags + B;
  bool* improved = flags + 3 * B;
  double sum_abs = 0, sum_rel = 0;  // batch means: summed and divided in double, then rounded to A
  for (int64_t b = 0; b < B; ++b) {
    const A abs_r = std::sqrt(norms[b * 3]);
    const A rel_r = policy == kPublishedAnderson ? abs_r / std::sqrt(norms[b * 3 + 2])
                                                 : abs_r / (std::sqrt(norms[b * 3 + 1]) + A(kPublishedEps));
    sum_abs += static_cast<double>(abs_r);
    sum_rel += static_cast<double>(rel_r);
  }
  const A mean_abs = static_cast<A>(sum_abs / static_cast<double>(B));
  const A mean_rel = static_cast<A>(sum_rel / static_cast<double>(B));
  const A mres = stop_rel ? mean_rel : mean_abs;
  const int64_t kfirst = policy == kPublishedAnderson ? 2 : 0;
  const bool first = k == kfirst;
  const A nan = std::numeric_limits<A>::quiet_NaN();
  const int64_t slot = k % m;
  double H[kMaxM * kMaxM];
  double w[kMaxM];
  for (int64_t b = 0; b < B; ++b) {
    const bool act = active[b];
    const bool counted = act && k >= kfirst;
    const bool best_mode = policy == kPublishedAnderson;
    // ties keep the earlier iterate; the first counted one is always taken (even NaN), as published
    const bool imp = counted && (!best_mode || mres < stat[b] || first);
    const bool imp_abs = counted && (!best_mode || mean_abs < stat[B + b] || first);
    const bool imp_rel = counted && (!best_mode || mean_rel < stat[2 * B + b] || first);
    if (imp) stat[b] = mres;
    if (imp_abs) stat[B + b] = mean_abs;
    if (imp_rel) stat[2 * B + b] = mean_rel;
    nstep[b] += act ? 1 : 0;
    trace[k * B + b] = counted ? mres : nan;
    const bool below = counted && mres < A(tol);
    converged[b] = converged[b] || below;
    active[b] = act && !below;
    improved[b] = imp;
    A* al = alpha + b * m;
    std::fill(al, al + m, A(0));
    if (!active[b]) continue;
    for (int64_t i = 0; i < m * m; ++i) H[i] = static_cast<double>(gram[b * m * m + i]);
    anderson_weights(H, m, n, slot, lam, lam_scaled, w);
    for (int64_t j = 0; j < m; ++j) al[j] = static_cast<A>(w[j]);
  }
}

at::Tensor anderson_step_cpu(const at::Tensor& gram, const at::Tensor& norms, at::Tensor& flags, at::Tensor& stat,
                             at::Tensor& nstep, at::Tensor& trace, int64_t k, int64_t n, double tol, bool stop_rel,
                             double lam, bool lam_scaled, double divergence_factor, int64_t policy) {
  TORCH_CHECK(gram.dim() == 3 && gram.size(1) == gram.size(2) && gram.is_contiguous() && gram.device().is_cpu(),
              "anderson_step: gram must be a contiguous CPU (B, m, m) tensor, got ", gram.sizes());
  const int64_t B = gram.size(0), m = gram.size(1);
  const auto acc = gram.scalar_type();
  TORCH_CHECK(acc == at::kFloat || acc == at::kDouble, "anderson_step: gram must be float32 or float64, got ", acc);
  TORCH_CHECK(k >= 0, "anderson_step: iteration k must be >= 0, got ", k);
  check_slots(k % m, n, m, "anderson_step");
  TORCH_CHECK(lam >= 0 && std::isfinite(lam), "anderson_step: lam must be finite and >= 0, got ", lam);
  TORCH_CHECK(policy == kPerSample || policy == kPublishedAnderson || policy == kPublishedFpi,
              "anderson_step: policy must be 0 (per-sample), 1 (published anderson) or 2 (published fpi), got ", policy);
  check_flags(flags, B, "anderson_step");
  TORCH_CHECK(norms.scalar_type() == acc && norms.dim() == 2 && norms.size(0) == B && norms.size(1) == 3 &&
                  norms.is_contiguous(),
              "anderson_step: norms must be a contiguous ", acc, " (B, 3) tensor, got ", norms.sizes());
  TORCH_CHECK(stat.scalar_type() == acc && stat.dim() == 2 && stat.size(0) == 4 && stat.size(1) == B &&
                  stat.is_contiguous(),
              "anderson_step: stat must be a contiguous ", acc, " (4, B) tensor, got ", stat.sizes());
  TORCH_CHECK(nstep.scalar_type() == at::kLong && nstep.dim() == 1 && nstep.size(0) == B && nstep.is_contiguous(),
              "anderson_step: nstep must be a contiguous int64 (B,) tensor");
  TORCH_CHECK(trace.scalar_type() == acc && trace.dim() == 2 && trace.size(1) == B && trace.size(0) > k &&
                  trace.is_contiguous(),
              "anderson_step: trace must be a contiguous ", acc, " (T > k, B) tensor, got ", trace.sizes());
  at::Tensor alpha = at::empty({B, m}, gram.options());
  AT_DISPATCH_FLOATING_TYPES(acc, "anderson_step", [&] {
    if (policy != kPerSample) {
      published_step_kernel<scalar_t>(gram.data_ptr<scalar_t>(), norms.data_ptr<scalar_t>(), flags.data_ptr<bool>(),
                                      stat.data_ptr<scalar_t>(), nstep.data_ptr<int64_t>(), trace.data_ptr<scalar_t>(),
                                      alpha.data_ptr<scalar_t>(), B, m, k, n, tol, stop_rel, lam, lam_scaled, policy);
      return;
    }
    step_kernel<scalar_t>(gram.data_ptr<scalar_t>(), norms.data_ptr<scalar_t>(), flags.data_ptr<bool>(),
                          stat.data_ptr<scalar_t>(), nstep.data_ptr<int64_t>(), trace.data_ptr<scalar_t>(),
                          alpha.data_ptr<scalar_t>(), B, m, k, n, tol, stop_rel, lam, lam_scaled, divergence_factor);
  });
  return alpha;
}

// ---------------------------------------------------------------------------------------------------------
// anderson_mix

template <typename T>
void mix_kernel(const T* F, const T* G, const T* alpha, const bool* active, const bool* improved, T* x, T* best,
                const std::vector<int64_t>& rows, int64_t m, int64_t D, int64_t slot, int64_t n, double beta,
                bool mix, bool best_from_x) {
  const int64_t nchunk = std::max<int64_t>(1, (D + kChunk - 1) / kChunk);
  const int64_t ntask = static_cast<int64_t>(rows.size()) * nchunk;
  const bool use_g = beta != 1.0;
  at::parallel_for(0, ntask, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = rows[t / nchunk], c = t % nchunk;
      const int64_t c0 = c * kChunk, len = std::min(kChunk, D - c0);
      const T* Fb = F + b * m * D + c0;
      const T* Gb = G + b * m * D + c0;
      // best_from_x: the iterate before this chunk of x is overwritten by the mix below
      if (improved[b]) std::memcpy(best + b * D + c0, best_from_x ? x + b * D + c0 : Fb + slot * D, len * sizeof(T));
      if (!(mix && active[b])) continue;
      // x_j + beta g_j = F_j - (1 - beta) G_j
      T a[kMaxM], cg[kMaxM];
      for (int64_t j = 0; j < n; ++j) {
        a[j] = static_cast<T>(alpha[b * m + j]);
        cg[j] = static_cast<T>(-(1.0 - beta) * static_cast<double>(alpha[b * m + j]));
      }
      if (use_g)
        mix_chunk<T, true>(Fb, Gb, D, a, cg, n, x + b * D + c0, len);
      else
        mix_chunk<T, false>(Fb, Gb, D, a, cg, n, x + b * D + c0, len);
    }
  });
}

void anderson_mix_cpu(const at::Tensor& F, const at::Tensor& G, const at::Tensor& alpha, const at::Tensor& flags,
                      at::Tensor& x, at::Tensor& best, int64_t slot, int64_t n, double beta, bool mix,
                      bool best_from_x) {
  check_ring(F, G, x, "anderson_mix");
  const int64_t B = x.size(0), D = x.size(1), m = F.size(1);
  check_slots(slot, n, m, "anderson_mix");
  check_flags(flags, B, "anderson_mix");
  TORCH_CHECK(best.sizes() == x.sizes() && best.scalar_type() == x.scalar_type() && best.is_contiguous(),
              "anderson_mix: best must be a contiguous tensor like x ", x.sizes(), ", got ", best.sizes());
  const auto acc = acc_type(x.scalar_type());
  TORCH_CHECK(alpha.scalar_type() == acc && alpha.dim() == 2 && alpha.size(0) == B && alpha.size(1) == m &&
                  alpha.is_contiguous(),
              "anderson_mix: alpha must be a contiguous ", acc, " (B, m) = (", B, ", ", m, ") tensor, got ",
              alpha.scalar_type(), " ", alpha.sizes());
  TORCH_CHECK(std::isfinite(beta), "anderson_mix: beta must be finite, got ", beta);
  const bool* active = flags.data_ptr<bool>();
  const bool* improved = active + 3 * B;
  std::vector<int64_t> rows;
  for (int64_t b = 0; b < B; ++b)
    if (improved[b] || (mix && active[b])) rows.push_back(b);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "anderson_mix", [&] {
    mix_kernel<scalar_t>(F.data_ptr<scalar_t>(), G.data_ptr<scalar_t>(), alpha.data_ptr<scalar_t>(), active, improved,
                         x.data_ptr<scalar_t>(), best.data_ptr<scalar_t>(), rows, m, D, slot, n, beta, mix,
                         best_from_x);
  });
}

}  // namespace

// Schemas: ldeq_fast/ops/anderson.py (defined in Python so the Triton path needs no extension).
TORCH_LIBRARY_IMPL(ldeq_fast, CPU, m) {
  m.impl("anderson_update", &anderson_update_cpu);
  m.impl("anderson_step", &anderson_step_cpu);
  m.impl("anderson_mix", &anderson_mix_cpu);
}
