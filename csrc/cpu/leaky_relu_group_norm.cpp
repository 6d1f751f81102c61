// Fused LeakyReLU -> GroupNorm on CPU, forward and backward.
//
//   y = leaky_relu(x, slope);  out = (y - mean_g) * rstd_g * weight_c + bias_c
//
// The activation is recomputed from x wherever it is needed (never stored).  Statistics are fp32
// (fp64 for double inputs) in vector lanes, folded into double every few hundred elements, about a
// per-task shift (the mean of a few leading values) so the sum of squares does not cancel; partial
// results of tasks are merged with Chan's formula.  Work is split into tasks of ~kTaskElems elements:
// NCHW statistics over chunks of each (image, group) block (contiguous), NCHW elementwise passes and
// gradient sums over chunks of each (image, channel) row, channels_last passes over row chunks of each
// image; so a single image with one group still spreads over all cores.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <type_traits>
#include <vector>

#include "vec_io.h"  // last: opens the vector-ISA region of the kernels

namespace ldeq_fast {
namespace cpu {
namespace {

constexpr int64_t kTaskElems = 16384;  // elements per parallel task
constexpr int64_t kFoldElems = 512;    // vector-lane partial sums fold into double this often (NCHW)
constexpr int64_t kFoldRows = 64;      // same, in rows (channels_last)

struct Moments {
  double n = 0.0, mean = 0.0, m2 = 0.0;
};

// Chan et al. parallel merge of (count, mean, sum of squared deviations).
inline void merge(Moments& a, const Moments& b) {
  if (b.n == 0.0) return;
  const double n = a.n + b.n;
  const double d = b.mean - a.mean;
  a.mean += d * (b.n / n);
  a.m2 += b.m2 + d * d * (a.n * b.n / n);
  a.n = n;
}

// Geometry of a 4-D input: N images, C channels in G groups of Cg, HW spatial positions.
struct Shape {
  bool channels_last;
  int64_t N, C, HW, G, Cg;

  Shape(const at::Tensor& x, int64_t groups)
      : channels_last(!x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast)),
        N(x.size(0)), C(x.size(1)), HW(x.size(2) * x.size(3)), G(groups), Cg(x.size(1) / groups) {}
};

// `units` independent pieces of `len` items (an item is `item_elems` elements) cut into parallel
// tasks of about kTaskElems elements: task k covers items [begin(k % parts), end(k % parts)) of
// unit k / parts.
struct Split {
  int64_t units, len, parts, span, item_elems;

  Split(int64_t units_, int64_t len_, int64_t item_elems_) : units(units_), len(len_), item_elems(item_elems_) {
    parts = std::max<int64_t>(1, (len * item_elems + kTaskElems - 1) / kTaskElems);
    span = std::max<int64_t>(1, (len + parts - 1) / parts);
    parts = std::max<int64_t>(1, (len + span - 1) / span);
  }
  int64_t tasks() const { return units * parts; }
  // Tasks per at::parallel_for chunk, so short units are batched together.
  int64_t grain() const { return std::max<int64_t>(1, kTaskElems / std::max<int64_t>(1, span * item_elems)); }
  int64_t begin(int64_t part) const { return part * span; }
  int64_t end(int64_t part) const { return std::min(len, (part + 1) * span); }
};

template <typename scalar_t>
struct Kernels {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using Vec = typename IO::Vec;
  static constexpr int64_t kSize = IO::kSize;

  // x > 0 ? x : x * slope, like torch (NaN stays NaN).
  static Vec lrelu(const Vec& x, const Vec& slope) {
    return Vec::blendv(x * slope, x, x > Vec(acc_t(0)));
  }
  static acc_t lrelu(acc_t x, acc_t slope) { return x > acc_t(0) ? x : x * slope; }

  // body(c, m) over the channel vectors of a channels_last row: whole vectors with m = kSize known at
  // compile time (loads and stores without partial-count branches; ~6% on the forward at (8,224,64,64)),
  // then the tail.
  template <typename F>
  static void over_channels(int64_t C, F&& body) {
    const int64_t full = C - C % kSize;
    for (int64_t c = 0; c < full; c += kSize) body(c, std::integral_constant<int64_t, kSize>());
    if (full < C) body(full, C - full);
  }

  // Moments of lrelu(p[0..n)) (NCHW: a group is contiguous).
  static Moments span_moments(const scalar_t* p, int64_t n, acc_t slope) {
    const int64_t lead = std::min<int64_t>(n, 16);
    acc_t shift = 0;
    for (int64_t i = 0; i < lead; ++i) shift += lrelu(static_cast<acc_t>(p[i]), slope);
    shift /= static_cast<acc_t>(lead);
    const Vec vs(slope), vk(shift);
    double s = 0.0, q = 0.0;
    for (int64_t f = 0; f < n; f += kFoldElems) {
      const int64_t fe = std::min(n, f + kFoldElems);
      Vec s0(acc_t(0)), s1(acc_t(0)), q0(acc_t(0)), q1(acc_t(0));
      int64_t i = f;
      for (; i + 2 * kSize <= fe; i += 2 * kSize) {
        const Vec y0 = lrelu(IO::load(p + i), vs) - vk;
        const Vec y1 = lrelu(IO::load(p + i + kSize), vs) - vk;
        s0 = s0 + y0;
        q0 = at::vec::fmadd(y0, y0, q0);
        s1 = s1 + y1;
        q1 = at::vec::fmadd(y1, y1, q1);
      }
      for (; i < fe; i += kSize) {
        const int64_t m = std::min(kSize, fe - i);
        const Vec y = IO::head(lrelu(IO::load(p + i, m), vs) - vk, m);
        s0 = s0 + y;
        q0 = at::vec::fmadd(y, y, q0);
      }
      s += IO::sum(s0 + s1);
      q += IO::sum(q0 + q1);
    }
    const double dn = static_cast<double>(n);
    return {dn, static_cast<double>(shift) + s / dn, std::max(0.0, q - s * s / dn)};
  }

  // Per-channel moments of lrelu over `rows` rows of a (rows, C) row-major block (channels_last);
  // count = rows.  Rows are streamed in order with the per-channel accumulators in L1.
  static void rows_moments(const scalar_t* p, int64_t rows, int64_t C, acc_t slope, double* mean, double* m2) {
    const Vec vs(slope);
    const int64_t lead = std::min<int64_t>(rows, 4);
    std::vector<acc_t> K(C, acc_t(0)), S(C), Q(C);
    std::vector<double> SD(C, 0.0), QD(C, 0.0);
    acc_t* __restrict__ Kp = K.data();
    acc_t* __restrict__ Sp = S.data();
    acc_t* __restrict__ Qp = Q.data();
    over_channels(C, [&](int64_t c, auto m) {
      Vec k(acc_t(0));
      for (int64_t r = 0; r < lead; ++r) k = k + lrelu(IO::load(p + r * C + c, m), vs);
      (k / Vec(static_cast<acc_t>(lead))).store(Kp + c, m);
    });
    for (int64_t r = 0; r < rows; r += kFoldRows) {
      const int64_t re = std::min(rows, r + kFoldRows);
      std::fill(S.begin(), S.end(), acc_t(0));
      std::fill(Q.begin(), Q.end(), acc_t(0));
      int64_t rr = r;
      for (; rr + 4 <= re; rr += 4) {  // four rows per accumulator load/store
        const scalar_t* row = p + rr * C;
        over_channels(C, [&](int64_t c, auto m) {
          const Vec k = Vec::loadu(Kp + c, m);
          const Vec y0 = lrelu(IO::load(row + c, m), vs) - k;
          const Vec y1 = lrelu(IO::load(row + C + c, m), vs) - k;
          const Vec y2 = lrelu(IO::load(row + 2 * C + c, m), vs) - k;
          const Vec y3 = lrelu(IO::load(row + 3 * C + c, m), vs) - k;
          (Vec::loadu(Sp + c, m) + ((y0 + y1) + (y2 + y3))).store(Sp + c, m);
          const Vec q = at::vec::fmadd(y0, y0, at::vec::fmadd(y1, y1, y2 * y2));
          (Vec::loadu(Qp + c, m) + at::vec::fmadd(y3, y3, q)).store(Qp + c, m);
        });
      }
      for (; rr < re; ++rr) {
        const scalar_t* row = p + rr * C;
        over_channels(C, [&](int64_t c, auto m) {
          const Vec y = lrelu(IO::load(row + c, m), vs) - Vec::loadu(Kp + c, m);
          (Vec::loadu(Sp + c, m) + y).store(Sp + c, m);
          at::vec::fmadd(y, y, Vec::loadu(Qp + c, m)).store(Qp + c, m);
        });
      }
      for (int64_t c = 0; c < C; ++c) {
        SD[c] += S[c];
        QD[c] += Q[c];
      }
    }
    const double dn = static_cast<double>(rows);
    for (int64_t c = 0; c < C; ++c) {
      mean[c] = static_cast<double>(K[c]) + SD[c] / dn;
      m2[c] = std::max(0.0, QD[c] - SD[c] * SD[c] / dn);
    }
  }

  // Group statistics (N, G) -> mean, rstd (acc_t).
  static void group_stats(const scalar_t* xp, const Shape& t, double eps, acc_t slope, acc_t* mean_out,
                          acc_t* rstd_out) {
    std::vector<Moments> groups(t.N * t.G);
    if (!t.channels_last) {
      const int64_t D = t.Cg * t.HW;
      const Split sp(t.N * t.G, D, 1);
      std::vector<Moments> part(sp.tasks());
      at::parallel_for(0, sp.tasks(), sp.grain(), [&](int64_t b, int64_t e) {
        for (int64_t k = b; k < e; ++k) {
          const int64_t unit = k / sp.parts, pi = k % sp.parts;
          const int64_t s0 = sp.begin(pi), s1 = sp.end(pi);
          part[k] = span_moments(xp + unit * D + s0, s1 - s0, slope);
        }
      });
      for (int64_t k = 0; k < sp.tasks(); ++k) merge(groups[k / sp.parts], part[k]);
    } else {
      const Split sp(t.N, t.HW, t.C);
      std::vector<double> pmean(sp.tasks() * t.C), pm2(sp.tasks() * t.C);
      at::parallel_for(0, sp.tasks(), sp.grain(), [&](int64_t b, int64_t e) {
        for (int64_t k = b; k < e; ++k) {
          const int64_t n = k / sp.parts, pi = k % sp.parts;
          const int64_t r0 = sp.begin(pi), r1 = sp.end(pi);
          rows_moments(xp + (n * t.HW + r0) * t.C, r1 - r0, t.C, slope, &pmean[k * t.C], &pm2[k * t.C]);
        }
      });
      // Merge the (task, channel) partials of each group: mean of the means weighted by counts, then
      // the within-partial sums of squares plus the between-partial spread (no per-item division).
      const double group_n = static_cast<double>(t.Cg * t.HW);
      for (int64_t k = 0; k < sp.tasks(); ++k) {
        const int64_t n = k / sp.parts, pi = k % sp.parts;
        const double cnt = static_cast<double>(sp.end(pi) - sp.begin(pi));
        for (int64_t g = 0; g < t.G; ++g) {
          double acc = 0.0;
          for (int64_t c = g * t.Cg; c < (g + 1) * t.Cg; ++c) acc += pmean[k * t.C + c];
          groups[n * t.G + g].mean += cnt * acc;
        }
      }
      for (auto& gr : groups) {
        gr.n = group_n;
        gr.mean /= group_n;
      }
      for (int64_t k = 0; k < sp.tasks(); ++k) {
        const int64_t n = k / sp.parts, pi = k % sp.parts;
        const double cnt = static_cast<double>(sp.end(pi) - sp.begin(pi));
        for (int64_t g = 0; g < t.G; ++g) {
          const double gm = groups[n * t.G + g].mean;
          double acc = 0.0;
          for (int64_t c = g * t.Cg; c < (g + 1) * t.Cg; ++c) {
            const double d = pmean[k * t.C + c] - gm;
            acc += pm2[k * t.C + c] + cnt * d * d;
          }
          groups[n * t.G + g].m2 += acc;
        }
      }
    }
    for (int64_t i = 0; i < t.N * t.G; ++i) {
      const double var = groups[i].n > 0.0 ? groups[i].m2 / groups[i].n : 0.0;
      mean_out[i] = static_cast<acc_t>(groups[i].mean);
      rstd_out[i] = static_cast<acc_t>(1.0 / std::sqrt(var + eps));
    }
  }

  // One vector of the elementwise pass (g: the incoming gradient in backward, the residual with kAdd):
  //   forward:               (lrelu(x) - mu) * k1 + k3          [+ residual, kAdd]
  //   backward (kGrad):      (k1 * g + k2 * (lrelu(x) - mu) + k3) * lrelu'(x), lrelu' = slope at x <= 0
  template <bool kGrad, bool kAdd>
  static void elem(const scalar_t* __restrict__ xp, const scalar_t* __restrict__ gp, scalar_t* __restrict__ op,
                   int64_t m, const Vec& vs, const Vec& mu, const Vec& k1, const Vec& k2, const Vec& k3) {
    const Vec x = IO::load(xp, m);
    const Vec pos = x > Vec(acc_t(0));
    const Vec yc = Vec::blendv(x * vs, x, pos) - mu;
    if constexpr (kGrad) {
      const Vec dy = at::vec::fmadd(k1, IO::load(gp, m), at::vec::fmadd(k2, yc, k3));
      IO::store(op, Vec::blendv(dy * vs, dy, pos), m);
    } else if constexpr (kAdd) {
      IO::store(op, at::vec::fmadd(yc, k1, k3) + IO::load(gp, m), m);
    } else {
      IO::store(op, at::vec::fmadd(yc, k1, k3), m);
    }
  }

  // Elementwise pass over the whole tensor with per-(n, c) coefficients (arrays of length N*C).
  template <bool kGrad, bool kAdd = false>
  static void apply(const Shape& t, const scalar_t* __restrict__ xp, const scalar_t* __restrict__ gp,
                    scalar_t* __restrict__ op, acc_t slope, const acc_t* mu, const acc_t* k1, const acc_t* k2,
                    const acc_t* k3) {
    const Vec vs(slope);
    const Vec zero(acc_t(0));
    const int64_t C = t.C, HW = t.HW;
    if (!t.channels_last) {
      const Split sp(t.N * C, HW, 1);
      at::parallel_for(0, sp.tasks(), sp.grain(), [&](int64_t b, int64_t e) {
        for (int64_t k = b; k < e; ++k) {
          const int64_t row = k / sp.parts, pi = k % sp.parts;
          const int64_t s0 = sp.begin(pi), s1 = sp.end(pi);
          const Vec vmu(mu[row]), v1(k1[row]), v2(kGrad ? k2[row] : acc_t(0)), v3(k3[row]);
          const int64_t base = row * HW;
          for (int64_t i = s0; i < s1; i += kSize) {
            elem<kGrad, kAdd>(xp + base + i, kGrad || kAdd ? gp + base + i : nullptr, op + base + i,
                              std::min(kSize, s1 - i), vs, vmu, v1, v2, v3);
          }
        }
      });
    } else {
      const Split sp(t.N, HW, C);
      at::parallel_for(0, sp.tasks(), sp.grain(), [&](int64_t b, int64_t e) {
        for (int64_t k = b; k < e; ++k) {
          const int64_t n = k / sp.parts, pi = k % sp.parts;
          const acc_t* mun = mu + n * C;
          const acc_t* k1n = k1 + n * C;
          const acc_t* k2n = kGrad ? k2 + n * C : nullptr;
          const acc_t* k3n = k3 + n * C;
          for (int64_t r = sp.begin(pi); r < sp.end(pi); ++r) {
            const int64_t off = (n * HW + r) * C;
            over_channels(C, [&](int64_t c, auto m) {
              elem<kGrad, kAdd>(xp + off + c, kGrad || kAdd ? gp + off + c : nullptr, op + off + c, m, vs,
                                Vec::loadu(mun + c, m), Vec::loadu(k1n + c, m),
                                kGrad ? Vec::loadu(k2n + c, m) : zero, Vec::loadu(k3n + c, m));
            });
          }
        }
      });
    }
  }

  // Per-(n, c) sums of g * (lrelu(x) - mu[n,c]) and of g, in double.
  static void channel_grad_sums(const Shape& t, const scalar_t* xp, const scalar_t* gp, acc_t slope,
                                const acc_t* mu, double* sdy, double* sg) {
    const Vec vs(slope);
    std::fill(sdy, sdy + t.N * t.C, 0.0);
    std::fill(sg, sg + t.N * t.C, 0.0);
    if (!t.channels_last) {
      const Split sp(t.N * t.C, t.HW, 1);
      std::vector<double> pa(sp.tasks()), pb(sp.tasks());
      at::parallel_for(0, sp.tasks(), sp.grain(), [&](int64_t b, int64_t e) {
        for (int64_t k = b; k < e; ++k) {
          const int64_t row = k / sp.parts, pi = k % sp.parts;
          const int64_t s0 = sp.begin(pi), s1 = sp.end(pi);
          const Vec vmu(mu[row]);
          const scalar_t* x = xp + row * t.HW;
          const scalar_t* g = gp + row * t.HW;
          double a = 0.0, c = 0.0;
          for (int64_t f = s0; f < s1; f += kFoldElems) {
            const int64_t fe = std::min(s1, f + kFoldElems);
            Vec va(acc_t(0)), vc(acc_t(0));
            for (int64_t i = f; i < fe; i += kSize) {
              const int64_t m = std::min(kSize, fe - i);
              const Vec gv = IO::load(g + i, m);  // zero tail lanes make both products vanish
              va = at::vec::fmadd(gv, lrelu(IO::load(x + i, m), vs) - vmu, va);
              vc = vc + gv;
            }
            a += IO::sum(va);
            c += IO::sum(vc);
          }
          pa[k] = a;
          pb[k] = c;
        }
      });
      for (int64_t k = 0; k < sp.tasks(); ++k) {
        sdy[k / sp.parts] += pa[k];
        sg[k / sp.parts] += pb[k];
      }
    } else {
      const Split sp(t.N, t.HW, t.C);
      std::vector<double> pa(sp.tasks() * t.C), pb(sp.tasks() * t.C);
      at::parallel_for(0, sp.tasks(), sp.grain(), [&](int64_t b, int64_t e) {
        std::vector<acc_t> A(t.C), B(t.C);
        acc_t* __restrict__ Ap = A.data();
        acc_t* __restrict__ Bp = B.data();
        for (int64_t k = b; k < e; ++k) {
          const int64_t n = k / sp.parts, pi = k % sp.parts;
          const acc_t* mun = mu + n * t.C;
          double* pak = &pa[k * t.C];
          double* pbk = &pb[k * t.C];
          std::fill(pak, pak + t.C, 0.0);
          std::fill(pbk, pbk + t.C, 0.0);
          for (int64_t r = sp.begin(pi); r < sp.end(pi); r += kFoldRows) {
            const int64_t re = std::min(sp.end(pi), r + kFoldRows);
            std::fill(A.begin(), A.end(), acc_t(0));
            std::fill(B.begin(), B.end(), acc_t(0));
            int64_t rr = r;
            for (; rr + 2 <= re; rr += 2) {  // two rows per accumulator load/store
              const int64_t base = (n * t.HW + rr) * t.C;
              over_channels(t.C, [&](int64_t c, auto m) {
                const Vec mc = Vec::loadu(mun + c, m);
                const Vec g0 = IO::load(gp + base + c, m);
                const Vec g1 = IO::load(gp + base + t.C + c, m);
                const Vec y0 = lrelu(IO::load(xp + base + c, m), vs) - mc;
                const Vec y1 = lrelu(IO::load(xp + base + t.C + c, m), vs) - mc;
                at::vec::fmadd(g0, y0, at::vec::fmadd(g1, y1, Vec::loadu(Ap + c, m))).store(Ap + c, m);
                (Vec::loadu(Bp + c, m) + (g0 + g1)).store(Bp + c, m);
              });
            }
            for (; rr < re; ++rr) {
              const int64_t base = (n * t.HW + rr) * t.C;
              over_channels(t.C, [&](int64_t c, auto m) {
                const Vec gv = IO::load(gp + base + c, m);
                const Vec yc = lrelu(IO::load(xp + base + c, m), vs) - Vec::loadu(mun + c, m);
                at::vec::fmadd(gv, yc, Vec::loadu(Ap + c, m)).store(Ap + c, m);
                (Vec::loadu(Bp + c, m) + gv).store(Bp + c, m);
              });
            }
            for (int64_t c = 0; c < t.C; ++c) {
              pak[c] += A[c];
              pbk[c] += B[c];
            }
          }
        }
      });
      for (int64_t k = 0; k < sp.tasks(); ++k) {
        const int64_t n = k / sp.parts;
        for (int64_t c = 0; c < t.C; ++c) {
          sdy[n * t.C + c] += pa[k * t.C + c];
          sg[n * t.C + c] += pb[k * t.C + c];
        }
      }
    }
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

void check_inputs(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, int64_t groups) {
  TORCH_CHECK(x.device().is_cpu(), "leaky_relu_group_norm (C++): x must be a CPU tensor");
  TORCH_CHECK(x.dim() == 4, "leaky_relu_group_norm: x must be 4-D (N, C, H, W), got ", x.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()),
              "leaky_relu_group_norm: x must be floating point, got ", x.scalar_type());
  TORCH_CHECK(x.is_contiguous() || x.is_contiguous(at::MemoryFormat::ChannelsLast),
              "leaky_relu_group_norm (C++): x must be contiguous or channels_last");
  const int64_t C = x.size(1);
  TORCH_CHECK(groups >= 1 && C % groups == 0, "leaky_relu_group_norm: num_groups=", groups,
              " must be >= 1 and divide the channel count C=", C);
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == C, "leaky_relu_group_norm: weight must have shape (",
              C, "), got ", weight.sizes());
  TORCH_CHECK(bias.dim() == 1 && bias.size(0) == C, "leaky_relu_group_norm: bias must have shape (", C,
              "), got ", bias.sizes());
  TORCH_CHECK(at::isFloatingType(weight.scalar_type()) && at::isFloatingType(bias.scalar_type()),
              "leaky_relu_group_norm: weight and bias must be floating point");
}

at::ScalarType stats_type(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// out = group_norm(leaky_relu(x)) [+ residual]: the residual connection rides on the output pass
std::tuple<at::Tensor, at::Tensor, at::Tensor> leaky_relu_group_norm_cpu(const at::Tensor& x,
                                                                         const at::Tensor& weight,
                                                                         const at::Tensor& bias,
                                                                         int64_t num_groups, double eps,
                                                                         double slope,
                                                                         const std::optional<at::Tensor>& residual) {
  require_vector_isa("leaky_relu_group_norm");
  check_inputs(x, weight, bias, num_groups);
  TORCH_CHECK(eps >= 0.0, "leaky_relu_group_norm: eps must be >= 0, got ", eps);
  const bool add = residual.has_value();
  if (add) {
    TORCH_CHECK(residual->sizes() == x.sizes() && residual->strides() == x.strides() &&
                    residual->scalar_type() == x.scalar_type() && residual->device() == x.device(),
                "leaky_relu_group_norm: residual must match x in shape, strides, dtype and device");
  }
  const Shape t(x, num_groups);
  const auto st = stats_type(x);
  auto out = at::empty_like(x);
  auto mean = at::empty({t.N, t.G}, x.options().dtype(st));
  auto rstd = at::empty({t.N, t.G}, x.options().dtype(st));
  if (x.numel() == 0) return {out, mean.fill_(0), rstd.fill_(1.0 / std::sqrt(eps))};
  const auto w = weight.to(st).contiguous();
  const auto b = bias.to(st).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "leaky_relu_group_norm_cpu", [&] {
    using K = Kernels<scalar_t>;
    using acc_t = typename K::acc_t;
    const acc_t s = static_cast<acc_t>(slope);
    acc_t* mp = mean.data_ptr<acc_t>();
    acc_t* rp = rstd.data_ptr<acc_t>();
    K::group_stats(x.const_data_ptr<scalar_t>(), t, eps, s, mp, rp);
    const acc_t* wp = w.const_data_ptr<acc_t>();
    const acc_t* bp = b.const_data_ptr<acc_t>();
    std::vector<acc_t> mu(t.N * t.C), a(t.N * t.C), bb(t.N * t.C);
    for (int64_t n = 0; n < t.N; ++n) {
      for (int64_t c = 0; c < t.C; ++c) {
        const int64_t g = n * t.G + c / t.Cg;
        mu[n * t.C + c] = mp[g];
        a[n * t.C + c] = rp[g] * wp[c];
        bb[n * t.C + c] = bp[c];
      }
    }
    if (add) {
      K::template apply<false, true>(t, x.const_data_ptr<scalar_t>(), residual->const_data_ptr<scalar_t>(),
                                     out.data_ptr<scalar_t>(), s, mu.data(), a.data(), nullptr, bb.data());
    } else {
      K::template apply<false>(t, x.const_data_ptr<scalar_t>(), nullptr, out.data_ptr<scalar_t>(), s, mu.data(),
                               a.data(), nullptr, bb.data());
    }
  });
  return {out, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> leaky_relu_group_norm_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& mean,
    const at::Tensor& rstd, int64_t num_groups, double slope) {
  require_vector_isa("leaky_relu_group_norm_backward");
  check_inputs(x, weight, weight, num_groups);
  TORCH_CHECK(grad_out.sizes() == x.sizes(), "leaky_relu_group_norm_backward: grad_out shape ",
              grad_out.sizes(), " does not match x ", x.sizes());
  TORCH_CHECK(grad_out.scalar_type() == x.scalar_type(), "leaky_relu_group_norm_backward: grad_out dtype ",
              grad_out.scalar_type(), " does not match x ", x.scalar_type());
  const Shape t(x, num_groups);
  const auto st = stats_type(x);
  TORCH_CHECK(mean.scalar_type() == st && rstd.scalar_type() == st && mean.numel() == t.N * t.G &&
                  rstd.numel() == t.N * t.G,
              "leaky_relu_group_norm_backward: mean/rstd must be (N, num_groups) ", st, " tensors");
  const auto g = grad_out.contiguous(t.channels_last ? at::MemoryFormat::ChannelsLast
                                                     : at::MemoryFormat::Contiguous);
  auto dx = at::empty_like(x);
  const auto w = weight.to(st).contiguous();
  const auto m_c = mean.contiguous();
  const auto r_c = rstd.contiguous();
  std::vector<double> sdy(t.N * t.C), sg(t.N * t.C);
  at::Tensor dw = at::zeros({t.C}, x.options().dtype(st));
  at::Tensor db = at::zeros({t.C}, x.options().dtype(st));
  if (x.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "leaky_relu_group_norm_bwd", [&] {
      using K = Kernels<scalar_t>;
      using acc_t = typename K::acc_t;
      const acc_t s = static_cast<acc_t>(slope);
      const acc_t* mp = m_c.const_data_ptr<acc_t>();
      const acc_t* rp = r_c.const_data_ptr<acc_t>();
      const acc_t* wp = w.const_data_ptr<acc_t>();
      std::vector<acc_t> mu(t.N * t.C), k1(t.N * t.C), k2(t.N * t.C), k3(t.N * t.C);
      for (int64_t n = 0; n < t.N; ++n) {
        for (int64_t c = 0; c < t.C; ++c) mu[n * t.C + c] = mp[n * t.G + c / t.Cg];
      }
      K::channel_grad_sums(t, x.const_data_ptr<scalar_t>(), g.const_data_ptr<scalar_t>(), s, mu.data(),
                           sdy.data(), sg.data());
      // d out / d yhat = g*w; with M elements per group and yhat = (y - mu) * rstd:
      //   dy = rstd * (g*w - mean(g*w) - yhat * mean(g*w*yhat))
      //      = k1 * g + k2 * (y - mu) + k3,  k1 = rstd*w, k2 = -rstd^3*A/M, k3 = -rstd*B/M
      // with A = sum_c w_c * sum g*(y - mu), B = sum_c w_c * sum g.
      const double M = static_cast<double>(t.Cg * t.HW);
      acc_t* dwp = dw.data_ptr<acc_t>();
      acc_t* dbp = db.data_ptr<acc_t>();
      std::vector<double> dwd(t.C, 0.0), dbd(t.C, 0.0);
      for (int64_t n = 0; n < t.N; ++n) {
        for (int64_t gi = 0; gi < t.G; ++gi) {
          const double r = static_cast<double>(rp[n * t.G + gi]);
          double A = 0.0, B = 0.0;
          for (int64_t c = gi * t.Cg; c < (gi + 1) * t.Cg; ++c) {
            A += static_cast<double>(wp[c]) * sdy[n * t.C + c];
            B += static_cast<double>(wp[c]) * sg[n * t.C + c];
            dwd[c] += r * sdy[n * t.C + c];
            dbd[c] += sg[n * t.C + c];
          }
          const double c2 = -r * r * r * A / M, c3 = -r * B / M;
          for (int64_t c = gi * t.Cg; c < (gi + 1) * t.Cg; ++c) {
            k1[n * t.C + c] = static_cast<acc_t>(r * static_cast<double>(wp[c]));
            k2[n * t.C + c] = static_cast<acc_t>(c2);
            k3[n * t.C + c] = static_cast<acc_t>(c3);
          }
        }
      }
      for (int64_t c = 0; c < t.C; ++c) {
        dwp[c] = static_cast<acc_t>(dwd[c]);
        dbp[c] = static_cast<acc_t>(dbd[c]);
      }
      K::template apply<true>(t, x.const_data_ptr<scalar_t>(), g.const_data_ptr<scalar_t>(),
                              dx.data_ptr<scalar_t>(), s, mu.data(), k1.data(), k2.data(), k3.data());
    });
  }
  return {dx, dw.to(weight.scalar_type()), db.to(weight.scalar_type())};
}

}  // namespace
}  // namespace cpu
}  // namespace ldeq_fast

// Schemas: ldeq_fast/ops/leaky_relu_group_norm.py (defined in Python so the Triton path needs no extension).
TORCH_LIBRARY_IMPL(ldeq_fast, CPU, m) {
  m.impl("leaky_relu_group_norm", &ldeq_fast::cpu::leaky_relu_group_norm_cpu);
  m.impl("leaky_relu_group_norm_backward", &ldeq_fast::cpu::leaky_relu_group_norm_backward_cpu);
}
