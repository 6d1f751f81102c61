// Fused heatmap head on CPU: softargmax normalisation and the expected-coordinate read-out, forward
// and backward.  One task per (batch, keypoint) heatmap, which stays in L1/L2 across its passes.
//
//   hm = exp(beta_k * (h - max h))                                   (peak exactly 1)
//   d = 1e-4 + sum hm,  p = hm / d,  P = sum p
//   mx = sum p * col,  my = sum p * row                               keypoints = (mx, my) / H
//   vx = sum p (col - mx)^2,  vy = sum p (row - my)^2                 spread = sqrt(vx/2 + vy/2) / H
//   pvx = sum p (col - mx/H)^2 (the published formula)                published = sqrt(pvx/2 + pvy/2) / H
//
// softargmax_heatmaps: the max, then hm.  heatmap_keypoints, per heatmap: the mass and first moments; the
// central second moment vx + vy about the means (no cancellation).  The published terms follow
// exactly: pvx = vx + 2 (mx - ax) mx (1 - P) + (mx - ax)^2 P with ax = mx / H (same for y).
//
// Backward: every output is a function of the moments, so dL/dhm[r, c] = c0 + fy[r] + fx[c] with
// fx, fy quadratics in (col - mx), (row - my).  The softargmax backward is dh = beta * g * hm with
// -beta * sum(g * hm) sent to the max position(s), split evenly among ties like torch.amax.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

#include "vec_io.h"  // last: opens the vector-ISA region of the kernels

namespace ldeq_fast {
namespace cpu {
namespace {

constexpr double kMassEps = 1e-4;     // the 1e-4 of p = hm / (1e-4 + sum hm)
constexpr int64_t kTaskElems = 16384;  // heatmap elements per parallel task
constexpr int64_t kFoldElems = 512;    // vector-lane partial sums fold into double this often

struct KeypointStats {
  double kx, ky, spread, published, mass;
};

// Coefficients of dL/dhm[r, c] = c0 + fy[r] + fx[c] for the gradients of one heatmap's outputs.
struct KeypointGrad {
  double c0 = 0.0;
  double ax = 0.0, ay = 0.0, quad = 0.0;  // fx[c] = (ax u + quad u^2) / d with u = c - mx (same for y)
  double mx = 0.0, my = 0.0, d = 1.0;

  KeypointGrad(int64_t H, const KeypointStats& s, double gkx, double gky, double gs, double gp) {
    const double Hd = static_cast<double>(H);
    d = kMassEps + s.mass;
    mx = s.kx * Hd;
    my = s.ky * Hd;
    const double P = s.mass / d;
    const double ex = mx - mx / Hd, ey = my - my / Hd;  // mean minus the published "centre" mx / H
    // d spread / d(vx + vy) = 1 / (4 H^2 spread); a zero incoming gradient contributes nothing even
    // where spread is 0 (autograd would not run that branch at all).
    const double Gs = gs == 0.0 ? 0.0 : gs / (4.0 * Hd * Hd * s.spread);
    const double Gp = gp == 0.0 ? 0.0 : gp / (4.0 * Hd * Hd * s.published);
    ax = gkx / Hd - 2.0 * Gs * mx * (1.0 - P) + Gp * (2.0 * ex - 2.0 * (mx - P * mx / Hd) / Hd);
    ay = gky / Hd - 2.0 * Gs * my * (1.0 - P) + Gp * (2.0 * ey - 2.0 * (my - P * my / Hd) / Hd);
    quad = Gs + Gp;
    // (vx + vy) = 2 H^2 spread^2 and (pvx + pvy) = 2 H^2 published^2
    const double cs = gs == 0.0 ? 0.0 : -0.5 * gs * s.spread;
    const double cp = gp == 0.0 ? 0.0 : -0.5 * gp * s.published + Gp * (ex * ex + ey * ey);
    c0 = (cs + cp) / d;
  }
  double fx(int64_t c) const {
    const double u = static_cast<double>(c) - mx;
    return (ax * u + quad * u * u) / d;
  }
  double fy(int64_t r) const {
    const double v = static_cast<double>(r) - my;
    return (ay * v + quad * v * v) / d;
  }
};

template <typename scalar_t>
struct Heat {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using Vec = typename IO::Vec;
  static constexpr int64_t kSize = IO::kSize;

  static acc_t max_of(const scalar_t* h, int64_t n) {
    Vec m(-std::numeric_limits<acc_t>::infinity());
    int64_t i = 0;
    for (; i + kSize <= n; i += kSize) m = at::vec::maximum(m, IO::load(h + i));
    alignas(64) acc_t buf[kSize];
    m.store(buf);
    acc_t r = -std::numeric_limits<acc_t>::infinity();
    for (int64_t j = 0; j < kSize; ++j) r = (std::isnan(buf[j]) || buf[j] > r) ? buf[j] : r;
    for (; i < n; ++i) {
      const acc_t v = static_cast<acc_t>(h[i]);
      r = (std::isnan(v) || v > r) ? v : r;
    }
    return r;
  }

  // hm = exp(beta * (h - hmax)) over n elements.
  static void normalize(const scalar_t* h, scalar_t* hm, int64_t n, acc_t beta, acc_t hmax) {
    const Vec vb(beta), vm(hmax);
    for (int64_t i = 0; i < n; i += kSize) {
      const int64_t m = std::min(kSize, n - i);
      IO::store(hm + i, (vb * (IO::load(h + i, m) - vm)).exp(), m);
    }
  }

  // Keypoint statistics of one H x W heatmap `hm`.  `wx` is scratch of W values.  Vector lanes accumulate
  // at most kFoldElems elements before folding into double.
  static KeypointStats keypoints(const scalar_t* hm, int64_t H, int64_t W, acc_t* wx) {
    const Vec step(static_cast<acc_t>(kSize)), iota = Vec::arange(acc_t(0), acc_t(1));
    const int64_t fold = std::max<int64_t>(1, kFoldElems / W);
    double S0 = 0.0, Sx = 0.0, Sy = 0.0;
    for (int64_t r0 = 0; r0 < H; r0 += fold) {
      Vec s(acc_t(0)), sx(acc_t(0)), sy(acc_t(0));
      for (int64_t r = r0; r < std::min(H, r0 + fold); ++r) {
        Vec rs(acc_t(0)), col = iota;
        for (int64_t c = 0; c < W; c += kSize) {
          const int64_t m = std::min(kSize, W - c);
          const Vec v = IO::load(hm + r * W + c, m);
          rs = rs + v;
          sx = at::vec::fmadd(v, col, sx);
          col = col + step;
        }
        s = s + rs;
        sy = at::vec::fmadd(rs, Vec(static_cast<acc_t>(r)), sy);
      }
      S0 += IO::sum(s);
      Sx += IO::sum(sx);
      Sy += IO::sum(sy);
    }
    const double d = kMassEps + S0;
    const double mx = Sx / d, my = Sy / d, P = S0 / d;
    for (int64_t c = 0; c < W; ++c) {
      const double u = static_cast<double>(c) - mx;
      wx[c] = static_cast<acc_t>(u * u);
    }
    // q = sum hm * ((col - mx)^2 + (row - my)^2): only vx + vy enters the outputs
    double q = 0.0;
    for (int64_t r0 = 0; r0 < H; r0 += fold) {
      Vec a(acc_t(0));
      for (int64_t r = r0; r < std::min(H, r0 + fold); ++r) {
        const double v = static_cast<double>(r) - my;
        const Vec wy(static_cast<acc_t>(v * v));
        for (int64_t c = 0; c < W; c += kSize) {
          const int64_t m = std::min(kSize, W - c);
          a = at::vec::fmadd(IO::load(hm + r * W + c, m), Vec::loadu(wx + c, m) + wy, a);
        }
      }
      q += IO::sum(a);
    }
    const double Hd = static_cast<double>(H);
    const double var = q / d;  // vx + vy
    const double ex = mx - mx / Hd, ey = my - my / Hd;
    const double pvar = var + 2.0 * (ex * mx + ey * my) * (1.0 - P) + (ex * ex + ey * ey) * P;
    return {mx / Hd, my / Hd, std::sqrt(0.5 * var) / Hd, std::sqrt(std::max(0.0, 0.5 * pvar)) / Hd, S0};
  }

  // dhm[r, c] = c0 + fy[r] + fx[c]: the keypoint-output gradient of one heatmap.
  static void keypoint_grad_map(scalar_t* dhm, int64_t H, int64_t W, double c0, const acc_t* fx, const acc_t* fy) {
    for (int64_t r = 0; r < H; ++r) {
      const Vec row(static_cast<acc_t>(c0 + static_cast<double>(fy[r])));
      for (int64_t c = 0; c < W; c += kSize) {
        const int64_t m = std::min(kSize, W - c);
        IO::store(dhm + r * W + c, row + Vec::loadu(fx + c, m), m);
      }
    }
  }

  // dh (and this heatmap's share of dbeta) of hm = exp(beta * (h - max h)) given the gradient g of hm.
  static double softargmax_backward(const scalar_t* g, const scalar_t* h, const scalar_t* hm, scalar_t* dh, int64_t n,
                                    acc_t beta, acc_t hmax) {
    const Vec vm(hmax), vb(beta);
    // pass 1: S = sum g * hm, Sb = sum g * hm * (h - hmax), ties
    double S = 0.0, Sb = 0.0;
    int64_t ties = 0;
    for (int64_t i0 = 0; i0 < n; i0 += kFoldElems) {
      Vec s(acc_t(0)), sb(acc_t(0));
      for (int64_t i = i0; i < std::min(n, i0 + kFoldElems); i += kSize) {
        const int64_t m = std::min(kSize, n - i);
        const Vec hc = IO::load(h + i, m) - vm;
        const Vec t = IO::head(IO::load(g + i, m) * IO::load(hm + i, m), m);
        s = s + t;
        sb = at::vec::fmadd(t, hc, sb);
        ties += __builtin_popcount(static_cast<unsigned>(hc.zero_mask()) & ((1u << m) - 1u));
      }
      S += IO::sum(s);
      Sb += IO::sum(sb);
    }
    // pass 2: dh = beta * (g * hm - [h == hmax] * S / ties)
    const Vec share(static_cast<acc_t>(ties > 0 ? S / static_cast<double>(ties) : 0.0));
    const Vec zero(acc_t(0));
    for (int64_t i = 0; i < n; i += kSize) {
      const int64_t m = std::min(kSize, n - i);
      const Vec at_max = IO::load(h + i, m) == vm;
      const Vec t = IO::load(g + i, m) * IO::load(hm + i, m) - Vec::blendv(zero, share, at_max);
      IO::store(dh + i, vb * t, m);
    }
    return Sb;
  }
};

}  // namespace
}  // namespace cpu
}  // namespace ldeq_fast

LDEQ_FAST_VEC_END

// Op entry points (baseline ISA).
namespace ldeq_fast {
namespace cpu {
namespace {

int64_t grain_for(int64_t HW) { return std::max<int64_t>(1, kTaskElems / std::max<int64_t>(1, HW)); }

void check_maps(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), op, " (C++): ", name, " must be a CPU tensor");
  TORCH_CHECK(t.dim() == 4, op, ": ", name, " must be 4-D (B, K, H, W), got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, op, ": ", name,
              " must be float32 or float64, got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), op, " (C++): ", name, " must be contiguous");
}

void check_beta(const at::Tensor& h, const at::Tensor& beta, const char* op) {
  TORCH_CHECK(beta.dim() == 1 && beta.size(0) == h.size(1), op, ": beta must have shape (K,) = (", h.size(1),
              "), got ", beta.sizes());
  TORCH_CHECK(beta.scalar_type() == h.scalar_type() && beta.is_contiguous(), op,
              ": beta must be a contiguous tensor of h's dtype");
}

void check_same(const at::Tensor& t, const at::Tensor& like, const char* op, const char* name) {
  TORCH_CHECK(t.sizes() == like.sizes() && t.scalar_type() == like.scalar_type(), op, ": ", name,
              " must match the maps in shape and dtype, got ", t.sizes(), " ", t.scalar_type());
}

std::tuple<at::Tensor, at::Tensor> softargmax_heatmaps_cpu(const at::Tensor& h, const at::Tensor& beta) {
  const char* op = "softargmax_heatmaps";
  require_vector_isa(op);
  check_maps(h, op, "h");
  check_beta(h, beta, op);
  const int64_t B = h.size(0), K = h.size(1), HW = h.size(2) * h.size(3);
  auto hm = at::empty_like(h);
  auto hmax = at::empty({B, K}, h.options());
  if (h.numel() == 0) return {hm, hmax};
  AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "softargmax_heatmaps_cpu", [&] {
    using Kn = Heat<scalar_t>;
    const scalar_t* hp = h.const_data_ptr<scalar_t>();
    const scalar_t* bp = beta.const_data_ptr<scalar_t>();
    scalar_t* hmp = hm.data_ptr<scalar_t>();
    scalar_t* maxp = hmax.data_ptr<scalar_t>();
    at::parallel_for(0, B * K, grain_for(HW), [&](int64_t b0, int64_t b1) {
      for (int64_t i = b0; i < b1; ++i) {
        const auto m = Kn::max_of(hp + i * HW, HW);
        maxp[i] = m;
        Kn::normalize(hp + i * HW, hmp + i * HW, HW, bp[i % K], m);
      }
    });
  });
  return {hm, hmax};
}

std::tuple<at::Tensor, at::Tensor> softargmax_heatmaps_backward_cpu(const at::Tensor& g_hm, const at::Tensor& h,
                                                                    const at::Tensor& beta, const at::Tensor& hm,
                                                                    const at::Tensor& hmax) {
  const char* op = "softargmax_heatmaps_backward";
  require_vector_isa(op);
  check_maps(h, op, "h");
  check_beta(h, beta, op);
  check_same(hm, h, op, "hm");
  TORCH_CHECK(g_hm.sizes() == h.sizes(), op, ": the gradient must have h's shape ", h.sizes());
  const int64_t B = h.size(0), K = h.size(1), HW = h.size(2) * h.size(3);
  TORCH_CHECK(hmax.sizes() == at::IntArrayRef({B, K}), op, ": hmax must be (", B, ", ", K, ")");
  const auto g = g_hm.to(h.scalar_type()).contiguous();
  const auto hm_c = hm.contiguous();
  const auto hmax_c = hmax.to(h.scalar_type()).contiguous();
  auto dh = at::empty_like(h);
  std::vector<double> dbeta_part(B * K);
  AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "softargmax_heatmaps_backward_cpu", [&] {
    using Kn = Heat<scalar_t>;
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    const scalar_t* hp = h.const_data_ptr<scalar_t>();
    const scalar_t* hmp = hm_c.const_data_ptr<scalar_t>();
    const scalar_t* mp = hmax_c.const_data_ptr<scalar_t>();
    const scalar_t* bp = beta.const_data_ptr<scalar_t>();
    scalar_t* dp = dh.data_ptr<scalar_t>();
    at::parallel_for(0, B * K, grain_for(HW), [&](int64_t b0, int64_t b1) {
      for (int64_t i = b0; i < b1; ++i) {
        dbeta_part[i] = Kn::softargmax_backward(gp + i * HW, hp + i * HW, hmp + i * HW, dp + i * HW, HW, bp[i % K],
                                                mp[i]);
      }
    });
  });
  auto dbeta = at::zeros({K}, h.options().dtype(at::kDouble));
  double* dbp = dbeta.data_ptr<double>();
  for (int64_t i = 0; i < B * K; ++i) dbp[i % K] += dbeta_part[i];  // a fixed order: deterministic
  return {dh, dbeta.to(beta.scalar_type())};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> heatmap_keypoints_cpu(const at::Tensor& hm) {
  const char* op = "heatmap_keypoints";
  require_vector_isa(op);
  check_maps(hm, op, "hm");
  const int64_t B = hm.size(0), K = hm.size(1), H = hm.size(2), W = hm.size(3), HW = H * W;
  TORCH_CHECK(H > 0 && W > 0, op, ": heatmaps must have H, W >= 1, got ", hm.sizes());
  auto kpts = at::empty({B, K, 2}, hm.options());
  auto spread = at::empty({B, K}, hm.options()), published = at::empty({B, K}, hm.options());
  auto mass = at::empty({B, K}, hm.options());
  if (hm.numel() == 0) return {kpts, spread, published, mass};
  AT_DISPATCH_FLOATING_TYPES(hm.scalar_type(), "heatmap_keypoints_cpu", [&] {
    using Kn = Heat<scalar_t>;
    const scalar_t* hp = hm.const_data_ptr<scalar_t>();
    scalar_t *kp = kpts.data_ptr<scalar_t>(), *sp = spread.data_ptr<scalar_t>();
    scalar_t *pp = published.data_ptr<scalar_t>(), *mp = mass.data_ptr<scalar_t>();
    at::parallel_for(0, B * K, grain_for(HW), [&](int64_t b0, int64_t b1) {
      std::vector<typename Kn::acc_t> wx(W);
      for (int64_t i = b0; i < b1; ++i) {
        const KeypointStats s = Kn::keypoints(hp + i * HW, H, W, wx.data());
        kp[2 * i] = static_cast<scalar_t>(s.kx);
        kp[2 * i + 1] = static_cast<scalar_t>(s.ky);
        sp[i] = static_cast<scalar_t>(s.spread);
        pp[i] = static_cast<scalar_t>(s.published);
        mp[i] = static_cast<scalar_t>(s.mass);
      }
    });
  });
  return {kpts, spread, published, mass};
}

// Gradients of (kpts, spread, published) w.r.t. the heatmap, as per-heatmap coefficient sets.
std::vector<KeypointGrad> keypoint_grads(const at::Tensor& g_kpts, const at::Tensor& g_spread,
                                         const at::Tensor& g_pub, const at::Tensor& kpts, const at::Tensor& spread,
                                         const at::Tensor& published, const at::Tensor& mass, int64_t H) {
  const int64_t n = spread.numel();
  std::vector<KeypointGrad> out;
  out.reserve(n);
  auto gk = g_kpts.to(at::kDouble).contiguous(), gs = g_spread.to(at::kDouble).contiguous();
  auto gp = g_pub.to(at::kDouble).contiguous(), k = kpts.to(at::kDouble).contiguous();
  auto s = spread.to(at::kDouble).contiguous(), p = published.to(at::kDouble).contiguous();
  auto m = mass.to(at::kDouble).contiguous();
  const double *gkp = gk.const_data_ptr<double>(), *gsp = gs.const_data_ptr<double>();
  const double *gpp = gp.const_data_ptr<double>(), *kp = k.const_data_ptr<double>();
  const double *sp = s.const_data_ptr<double>(), *pp = p.const_data_ptr<double>(), *mp = m.const_data_ptr<double>();
  for (int64_t i = 0; i < n; ++i) {
    out.emplace_back(H, KeypointStats{kp[2 * i], kp[2 * i + 1], sp[i], pp[i], mp[i]}, gkp[2 * i], gkp[2 * i + 1],
                     gsp[i], gpp[i]);
  }
  return out;
}

template <typename acc_t>
void fill_terms(const KeypointGrad& kg, int64_t H, int64_t W, acc_t* fx, acc_t* fy) {
  for (int64_t c = 0; c < W; ++c) fx[c] = static_cast<acc_t>(kg.fx(c));
  for (int64_t r = 0; r < H; ++r) fy[r] = static_cast<acc_t>(kg.fy(r));
}

at::Tensor heatmap_keypoints_backward_cpu(const at::Tensor& g_kpts, const at::Tensor& g_spread,
                                          const at::Tensor& g_pub, const at::Tensor& hm, const at::Tensor& kpts,
                                          const at::Tensor& spread, const at::Tensor& published,
                                          const at::Tensor& mass) {
  require_vector_isa("heatmap_keypoints_backward");
  check_maps(hm, "heatmap_keypoints_backward", "hm");
  const int64_t B = hm.size(0), K = hm.size(1), H = hm.size(2), W = hm.size(3), HW = H * W;
  for (const auto* t : {&g_spread, &g_pub, &spread, &published, &mass}) {
    TORCH_CHECK(t->sizes() == at::IntArrayRef({B, K}), "heatmap_keypoints_backward: per-heatmap tensors must be (",
                B, ", ", K, "), got ", t->sizes());
  }
  TORCH_CHECK(g_kpts.sizes() == at::IntArrayRef({B, K, 2}) && kpts.sizes() == at::IntArrayRef({B, K, 2}),
              "heatmap_keypoints_backward: keypoint tensors must be (", B, ", ", K, ", 2)");
  const auto kg = keypoint_grads(g_kpts, g_spread, g_pub, kpts, spread, published, mass, H);
  auto dhm = at::empty_like(hm);
  AT_DISPATCH_FLOATING_TYPES(hm.scalar_type(), "heatmap_keypoints_backward_cpu", [&] {
    scalar_t* dp = dhm.data_ptr<scalar_t>();
    at::parallel_for(0, B * K, grain_for(HW), [&](int64_t b0, int64_t b1) {
      std::vector<scalar_t> fx(W), fy(H);
      for (int64_t i = b0; i < b1; ++i) {
        fill_terms(kg[i], H, W, fx.data(), fy.data());
        Heat<scalar_t>::keypoint_grad_map(dp + i * HW, H, W, kg[i].c0, fx.data(), fy.data());
      }
    });
  });
  return dhm;
}

}  // namespace
}  // namespace cpu
}  // namespace ldeq_fast

// Schemas: ldeq_fast/ops/heatmap.py (defined in Python so the Triton path needs no extension).
TORCH_LIBRARY_IMPL(ldeq_fast, CPU, m) {
  m.impl("softargmax_heatmaps", &ldeq_fast::cpu::softargmax_heatmaps_cpu);
  m.impl("softargmax_heatmaps_backward", &ldeq_fast::cpu::softargmax_heatmaps_backward_cpu);
  m.impl("heatmap_keypoints", &ldeq_fast::cpu::heatmap_keypoints_cpu);
  m.impl("heatmap_keypoints_backward", &ldeq_fast::cpu::heatmap_keypoints_backward_cpu);
}
