// Native CPU kernel of the same-location pair pass (see gpytorch_cnngp/native.py).
//
// The Python side lowers a layer tree to a short list of instructions on map "registers"
// ([h][w][VL] arrays); this file runs that list for one block of VL pairs at a time, every block
// through the whole network before the next, so each thread's maps stay in its own L1/L2 cache and
// no pass over memory waits for the other threads. Lanes are VL consecutive images of the second
// set (one SIMD vector), paired with one image of the first set.
//
// With the neural tangent kernel (the `ntk` argument), every register holds two maps, the NNGP's and
// the NTK's after it, and each instruction updates both: a window sum maps the NTK to
// scale * sum(ntk) + (its new NNGP), a (leaky) ReLU multiplies it by the expectation of the product of
// the derivatives, a sum adds both maps.
//
// Compiled once per machine by native.py with the system C++ compiler; plain C++17 loops written
// for the compiler's auto-vectoriser (no intrinsics), threads from std::thread (no OpenMP runtime
// next to PyTorch's).

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>
#include <thread>
#include <vector>

namespace {

enum Op : int32_t { OP_INPUT = 0, OP_CONV = 1, OP_NONLIN = 2, OP_ADD = 3, OP_OUTPUT = 4 };

// one instruction: 19 int32 fields (native.py builds them in this order)
struct Instr {
  int32_t op, dst, a, b, in_h, in_w, out_h, out_w, kh, kw, sh, sw, dh, dw, pt, pl, param, slot, flags;
};
constexpr int kFields = 19;
// flags: the source's NTK map is zero (the input's), so a window sum's NTK is its NNGP
constexpr int32_t kNtkInZero = 1;
static_assert(sizeof(Instr) == kFields * sizeof(int32_t), "Instr layout");

// Inputs are packed by native.py so that one block reads contiguous memory: the first set per image,
// the second set per group of VL images with the lanes innermost. The traces of all nonlinearities
// (slot after slot, each [h][w]) hold the standard deviation s and 1/s (0 where s = 0) side by side.
template <typename T>
struct Args {
  const Instr* prog;
  int n_instr, reg_area, tmp_area, n_regs;
  const T* x;  // [n1][H][W][C]
  const T* z;  // [n2 / VL][H][W][C][VL]
  int H, W, C, n1, n2;
  const T* tx;  // [n1][n_trace][2]
  const T* tz;  // [n2 / VL][n_trace][2][VL]
  const int32_t* slot_offset;  // first trace position of each slot
  int n_trace;
  const T* params;
  const T* coefs;  // R(a) / (2 pi), lowest degree first
  const T* dcoefs;  // A(a) / (2 pi), lowest degree first (the ReLU's derivative expectation)
  int n_coefs, n_dcoefs;
  T* out;  // [n1][n2], then with the NTK a second [n1][n2]
  int ntk;  // registers hold the NTK's map after the NNGP's
};

template <typename T, int VL>
void input_map(const Args<T>& g, int i, int jb, T* __restrict dst) {
  const int area = g.H * g.W, C = g.C;
  const T* xi = g.x + static_cast<int64_t>(i) * area * C;
  const T* zb = g.z + static_cast<int64_t>(jb) * area * C * VL;
  for (int p = 0; p < area; ++p) {
    T* __restrict d = dst + static_cast<int64_t>(p) * VL;
    for (int v = 0; v < VL; ++v) d[v] = T(0);
    for (int c = 0; c < C; ++c) {
      const T xv = xi[static_cast<int64_t>(p) * C + c];
      const T* __restrict zv = zb + (static_cast<int64_t>(p) * C + c) * VL;
#pragma omp simd
      for (int v = 0; v < VL; ++v) d[v] += xv * zv[v];
    }
    if (C > 1) {
      for (int v = 0; v < VL; ++v) d[v] /= static_cast<T>(C);
    }
  }
}

// Taps t in [lo, hi) of a window starting at input index `base` that fall inside [0, n).
inline void valid_taps(int base, int step, int taps, int n, int& lo, int& hi) {
  lo = 0;
  while (lo < taps && base + lo * step < 0) ++lo;
  hi = taps;
  while (hi > lo && base + (hi - 1) * step >= n) --hi;
}

// One block's lanes (64 bytes) as an array of the machine's own SIMD vectors (GCC/Clang vector types:
// explicit SIMD without intrinsics). A single 64-byte vector type would be split by the compiler on
// machines without AVX-512, and it moves such values through the stack, several times slower.
#if defined(__AVX512F__)
constexpr int kVectorBytes = 64;
#elif defined(__AVX__)
constexpr int kVectorBytes = 32;
#else
constexpr int kVectorBytes = 16;
#endif

template <typename T, int VL>
struct Lanes {
  static constexpr int kPer = kVectorBytes / static_cast<int>(sizeof(T));
  static constexpr int kParts = VL / kPer;
  static_assert(kParts * kPer == VL, "a block is a whole number of SIMD vectors");
  typedef T H __attribute__((vector_size(kVectorBytes)));
  // the integer vector of the same shape, for bit operations
  typedef typename std::conditional<sizeof(T) == 4, int32_t, int64_t>::type IT;
  typedef IT I __attribute__((vector_size(kVectorBytes)));
  static constexpr IT kMagnitude = std::numeric_limits<IT>::max();  // all bits but the sign
  struct V {
    H p[kParts];
  };
  static V zero() {
    V v;
    for (int k = 0; k < kParts; ++k) v.p[k] = H{};
    return v;
  }
  static void add(V& acc, const T* ptr) {
    for (int k = 0; k < kParts; ++k) {
      H h;
      std::memcpy(&h, ptr + k * kPer, sizeof(H));
      acc.p[k] += h;
    }
  }
  static void sub(V& acc, const T* ptr) {
    for (int k = 0; k < kParts; ++k) {
      H h;
      std::memcpy(&h, ptr + k * kPer, sizeof(H));
      acc.p[k] -= h;
    }
  }
  // ptr = v * scale + bias
  static void store_affine(T* ptr, const V& v, T scale, T bias) {
    for (int k = 0; k < kParts; ++k) {
      const H h = v.p[k] * scale + bias;
      std::memcpy(ptr + k * kPer, &h, sizeof(H));
    }
  }
  // ptr = v * scale + add[.]
  static void store_scaled_add(T* ptr, const V& v, T scale, const T* add) {
    for (int k = 0; k < kParts; ++k) {
      H a;
      std::memcpy(&a, add + k * kPer, sizeof(H));
      const H h = v.p[k] * scale + a;
      std::memcpy(ptr + k * kPer, &h, sizeof(H));
    }
  }
  // lane-wise square root (the vectoriser turns the loop into one vector instruction)
  static H sqrt(H h) {
    T t[kPer];
    std::memcpy(t, &h, sizeof(H));
#pragma omp simd
    for (int l = 0; l < kPer; ++l) t[l] = std::sqrt(t[l]);
    std::memcpy(&h, t, sizeof(H));
    return h;
  }
  static void store(T* ptr, const V& v) {
    for (int k = 0; k < kParts; ++k) std::memcpy(ptr + k * kPer, &v.p[k], sizeof(H));
  }
};

// Windows of at least this many taps, with stride 1 and no dilation, are summed as running sums: each
// output adds the tap entering the window and subtracts the one leaving it, two operations whatever the
// window's size (the ConvNet GP's 7x7 windows: 4 per output instead of 14).
constexpr int kRunningMin = 4;

// Running sums along W of rows [h0, h0 + R) of src into tmp (see conv). The accumulators are plain SIMD
// vectors in fully unrolled loops, so that they stay in registers.
template <typename T, int VL, int R>
inline void running_rows(const Instr& ins, const T* __restrict src, T* __restrict tmp, int h0) {
  using L = Lanes<T, VL>;
  using H = typename L::H;
  constexpr int P = L::kParts, N = R * P, kPer = L::kPer;
  const int in_w = ins.in_w, out_w = ins.out_w;
  const int64_t row = static_cast<int64_t>(in_w) * VL, out_row = static_cast<int64_t>(out_w) * VL;
  const T* in = src + h0 * row;
  T* out = tmp + h0 * out_row;
  // accumulator n: row n / P, part n % P
  auto at = [&](int n, int x) { return in + (n / P) * row + static_cast<int64_t>(x) * VL + (n % P) * kPer; };
  // the window of output ow is [ow - pl, ow - pl + kw), clipped to [0, in_w)
  H acc[N];
#pragma GCC unroll 32
  for (int n = 0; n < N; ++n) acc[n] = H{};
  for (int x = std::max(0, -ins.pl); x < std::min(in_w, ins.kw - ins.pl); ++x) {
#pragma GCC unroll 32
    for (int n = 0; n < N; ++n) {
      H h;
      std::memcpy(&h, at(n, x), sizeof(H));
      acc[n] += h;
    }
  }
  for (int ow = 0; ow < out_w; ++ow) {
    if (ow > 0) {
      const int enter = ow - ins.pl + ins.kw - 1, leave = ow - 1 - ins.pl;
      if (enter >= 0 && enter < in_w) {
#pragma GCC unroll 32
        for (int n = 0; n < N; ++n) {
          H h;
          std::memcpy(&h, at(n, enter), sizeof(H));
          acc[n] += h;
        }
      }
      if (leave >= 0 && leave < in_w) {
#pragma GCC unroll 32
        for (int n = 0; n < N; ++n) {
          H h;
          std::memcpy(&h, at(n, leave), sizeof(H));
          acc[n] -= h;
        }
      }
    }
#pragma GCC unroll 32
    for (int n = 0; n < N; ++n) {
      std::memcpy(out + (n / P) * out_row + static_cast<int64_t>(ow) * VL + (n % P) * kPer, &acc[n], sizeof(H));
    }
  }
}

// Running sums along H of tmp's SIMD vectors [e0, e0 + G) of each row (see conv), out = scale * sum + bias,
// or + add[.] with kAdd (then `bias` is the add map).
template <typename T, int VL, int G, bool kAdd, typename B>
inline void running_columns(const Instr& ins, const T* __restrict tmp, T* __restrict dst, int64_t e0, T scale,
                            B bias) {
  using L = Lanes<T, VL>;
  using H = typename L::H;
  constexpr int K = L::kPer;
  const int in_h = ins.in_h, out_h = ins.out_h;
  const int64_t width = static_cast<int64_t>(ins.out_w) * VL;
  const T* in = tmp + e0 * K;
  H acc[G];
#pragma GCC unroll 32
  for (int g = 0; g < G; ++g) acc[g] = H{};
  for (int y = std::max(0, -ins.pt); y < std::min(in_h, ins.kh - ins.pt); ++y) {
#pragma GCC unroll 32
    for (int g = 0; g < G; ++g) {
      H h;
      std::memcpy(&h, in + y * width + g * K, sizeof(H));
      acc[g] += h;
    }
  }
  for (int oh = 0; oh < out_h; ++oh) {
    if (oh > 0) {
      const int enter = oh - ins.pt + ins.kh - 1, leave = oh - 1 - ins.pt;
      if (enter >= 0 && enter < in_h) {
#pragma GCC unroll 32
        for (int g = 0; g < G; ++g) {
          H h;
          std::memcpy(&h, in + enter * width + g * K, sizeof(H));
          acc[g] += h;
        }
      }
      if (leave >= 0 && leave < in_h) {
#pragma GCC unroll 32
        for (int g = 0; g < G; ++g) {
          H h;
          std::memcpy(&h, in + leave * width + g * K, sizeof(H));
          acc[g] -= h;
        }
      }
    }
    const int64_t at = oh * width + e0 * K;
#pragma GCC unroll 32
    for (int g = 0; g < G; ++g) {
      H out;
      if constexpr (kAdd) {
        std::memcpy(&out, bias + at + g * K, sizeof(H));
        out += acc[g] * scale;
      } else {
        out = acc[g] * scale + bias;
      }
      std::memcpy(dst + at + g * K, &out, sizeof(H));
    }
  }
}

// running_columns over all `vectors` SIMD vectors of a row: strips of 8, then 4, 2, 1 (narrow maps still
// get several chains)
template <typename T, int VL, bool kAdd, typename B>
inline void column_strips(const Instr& ins, const T* __restrict tmp, T* __restrict dst, int64_t vectors, T scale,
                          B bias) {
  int64_t e = 0;
  for (; e + 8 <= vectors; e += 8) running_columns<T, VL, 8, kAdd>(ins, tmp, dst, e, scale, bias);
  for (; e + 4 <= vectors; e += 4) running_columns<T, VL, 4, kAdd>(ins, tmp, dst, e, scale, bias);
  for (; e + 2 <= vectors; e += 2) running_columns<T, VL, 2, kAdd>(ins, tmp, dst, e, scale, bias);
  for (; e < vectors; ++e) running_columns<T, VL, 1, kAdd>(ins, tmp, dst, e, scale, bias);
}

// Uniform-window sum, separable: along W into tmp [in_h][out_w], then along H; zero padding means
// out-of-range taps are skipped. out = bias + scale * sum. With `add` (a map of the output's shape),
// out = add + scale * sum instead: the NTK's window sum plus the layer's new NNGP.
template <typename T, int VL>
void conv(const Instr& ins, const T* __restrict src, T* __restrict dst, T* __restrict tmp, T scale, T bias,
          const T* __restrict add = nullptr) {
  using L = Lanes<T, VL>;
  using V = typename L::V;
  const int in_h = ins.in_h, in_w = ins.in_w, out_h = ins.out_h, out_w = ins.out_w;
  if (ins.sw == 1 && ins.dw == 1 && ins.kw >= kRunningMin) {
    // rows in groups: one row's running sum is a chain of dependent additions, several rows' chains
    // interleave and keep the adders busy
    int h = 0;
    for (; h + 4 <= in_h; h += 4) running_rows<T, VL, 4>(ins, src, tmp, h);
    for (; h + 2 <= in_h; h += 2) running_rows<T, VL, 2>(ins, src, tmp, h);
    for (; h < in_h; ++h) running_rows<T, VL, 1>(ins, src, tmp, h);
  } else {
    for (int ow = 0; ow < out_w; ++ow) {
      const int base = ow * ins.sw - ins.pl;
      int lo, hi;
      valid_taps(base, ins.dw, ins.kw, in_w, lo, hi);
      for (int h = 0; h < in_h; ++h) {
        const T* row = src + static_cast<int64_t>(h) * in_w * VL;
        V acc = L::zero();
        for (int b = lo; b < hi; ++b) L::add(acc, row + static_cast<int64_t>(base + b * ins.dw) * VL);
        L::store(tmp + (static_cast<int64_t>(h) * out_w + ow) * VL, acc);
      }
    }
  }
  const int64_t width = static_cast<int64_t>(out_w) * VL;  // one row of tmp or dst
  if (ins.sh == 1 && ins.dh == 1 && ins.kh >= kRunningMin) {
    // strips of columns, each strip's running sums in registers down all its output rows
    if (add != nullptr) {
      column_strips<T, VL, true>(ins, tmp, dst, width / L::kPer, scale, add);
    } else {
      column_strips<T, VL, false>(ins, tmp, dst, width / L::kPer, scale, bias);
    }
  } else {
    for (int oh = 0; oh < out_h; ++oh) {
      const int base = oh * ins.sh - ins.pt;
      int lo, hi;
      valid_taps(base, ins.dh, ins.kh, in_h, lo, hi);
      for (int ow = 0; ow < out_w; ++ow) {
        V acc = L::zero();
        for (int a = lo; a < hi; ++a) L::add(acc, tmp + ((static_cast<int64_t>(base) + a * ins.dh) * out_w + ow) * VL);
        const int64_t at = (static_cast<int64_t>(oh) * out_w + ow) * VL;
        if (add != nullptr) {
          L::store_scaled_add(dst + at, acc, scale, add + at);
        } else {
          L::store_affine(dst + at, acc, scale, bias);
        }
      }
    }
  }
}

// One SIMD vector of the (leaky) ReLU's NNGP, shared by nonlin_nngp and nonlin_ntk so that both give the
// same bits: k1 J + k2 c for covariances cv, right-side deviations sv and their inverses iv, with cf the
// coefficients of k1 R / (2 pi). Also returns a = |rho| (not clamped) and root = sqrt(|1 - a|). It is written
// for the multiply-add units, which bound it: max(c, 0) / 2 is (c + |c|) / 4, and 1 - a is taken as |1 - a|
// instead of clamping a to 1 (a exceeds 1 only by rounding in c, and then (1 - a)^(3/2) is that rounding to
// the power 3/2, far below it).
template <typename T, int VL, int NR, bool kLinearPart>
inline typename Lanes<T, VL>::H relu_vector(typename Lanes<T, VL>::H cv, typename Lanes<T, VL>::H sv,
                                            typename Lanes<T, VL>::H iv, T s1, T i1,
                                            const typename Lanes<T, VL>::H* cf, typename Lanes<T, VL>::H quarter_k1,
                                            T k2, typename Lanes<T, VL>::H& a, typename Lanes<T, VL>::H& root) {
  using L = Lanes<T, VL>;
  using H = typename L::H;
  using I = typename L::I;
  const I magnitude = I{} + L::kMagnitude;
  const H one = H{} + T(1);
  const H mag = reinterpret_cast<H>(reinterpret_cast<I>(cv) & magnitude);
  a = mag * iv * i1;
  H poly = cf[NR - 1];
#pragma GCC unroll 32
  for (int m = NR - 2; m >= 0; --m) poly = poly * a + cf[m];
  const H u = reinterpret_cast<H>(reinterpret_cast<I>(one - a) & magnitude);
  root = L::sqrt(u);
  poly *= (sv * s1) * (u * root);
  H out = (cv + mag) * quarter_k1 + poly;  // ReLU: k1 = 1, k2 = 0 gives J exactly
  if constexpr (kLinearPart) out += cv * k2;
  return out;
}

// The NNGP-only (leaky) ReLU of nonlin: relu_vector over each position's SIMD vectors.
template <typename T, int VL, int NR, bool kLinearPart>
void nonlin_nngp(const T* __restrict tx, const T* __restrict tz, const T* __restrict src, T* __restrict dst,
                 int area, T k1, T k2, const T* __restrict coefs) {
  using L = Lanes<T, VL>;
  using H = typename L::H;
  constexpr int P = L::kParts, K = L::kPer;
  H cf[NR];
  for (int k = 0; k < NR; ++k) cf[k] = H{} + coefs[k] * k1;
  const H quarter_k1 = H{} + T(0.25) * k1;
  for (int p = 0; p < area; ++p) {
    const T s1 = tx[2 * p], i1 = tx[2 * p + 1];
    const T* __restrict s2 = tz + static_cast<int64_t>(p) * 2 * VL;
    const T* __restrict i2 = s2 + VL;
    const T* __restrict c = src + static_cast<int64_t>(p) * VL;
    T* __restrict d = dst + static_cast<int64_t>(p) * VL;
#pragma GCC unroll 4
    for (int k = 0; k < P; ++k) {
      H cv, sv, iv, a, root;
      std::memcpy(&cv, c + k * K, sizeof(H));
      std::memcpy(&sv, s2 + k * K, sizeof(H));
      std::memcpy(&iv, i2 + k * K, sizeof(H));
      const H out = relu_vector<T, VL, NR, kLinearPart>(cv, sv, iv, s1, i1, cf, quarter_k1, k2, a, root);
      std::memcpy(d + k * K, &out, sizeof(H));
    }
  }
}

// nonlin with the NTK: the NNGP as nonlin_nngp (to the bit), and the derivative factor with a clamped to 1
// (its sqrt(1 - a) would turn a rounding excess of a into its square root).
template <typename T, int VL, int NR, int NA, bool kLinearPart>
void nonlin_ntk(const T* __restrict tx, const T* __restrict tz, const T* __restrict src, T* __restrict dst,
                const T* __restrict src_ntk, T* __restrict dst_ntk, int area, T k1, T k2, T k3, T k4,
                const T* __restrict coefs, const T* __restrict dcoefs) {
  using L = Lanes<T, VL>;
  using H = typename L::H;
  constexpr int P = L::kParts, K = L::kPer;
  H cf[NR], df[NA];
  for (int k = 0; k < NR; ++k) cf[k] = H{} + coefs[k] * k1;
  for (int k = 0; k < NA; ++k) df[k] = H{} + dcoefs[k] * k1;
  const H zero = H{}, one = zero + T(1), quarter_k1 = zero + T(0.25) * k1, half_k1 = zero + T(0.5) * k1;
  const H half_k3 = zero + T(0.5) * k3;
  for (int p = 0; p < area; ++p) {
    const T s1 = tx[2 * p], i1 = tx[2 * p + 1];
    const T left = i1 > T(0) ? T(1) : T(0);  // a zero variance on the left: no derivative term, h1 = 0
    const T base = left * T(0.5) * k3 + k4;
    const T* __restrict s2 = tz + static_cast<int64_t>(p) * 2 * VL;
    const T* __restrict i2 = s2 + VL;
    const T* __restrict c = src + static_cast<int64_t>(p) * VL;
    const T* __restrict t = src_ntk + static_cast<int64_t>(p) * VL;
    T* __restrict d = dst + static_cast<int64_t>(p) * VL;
    T* __restrict dt = dst_ntk + static_cast<int64_t>(p) * VL;
#pragma GCC unroll 4
    for (int k = 0; k < P; ++k) {
      H cv, sv, iv, tv, a, root;
      std::memcpy(&cv, c + k * K, sizeof(H));
      std::memcpy(&sv, s2 + k * K, sizeof(H));
      std::memcpy(&iv, i2 + k * K, sizeof(H));
      std::memcpy(&tv, t + k * K, sizeof(H));
      const H out = relu_vector<T, VL, NR, kLinearPart>(cv, sv, iv, s1, i1, cf, quarter_k1, k2, a, root);
      std::memcpy(d + k * K, &out, sizeof(H));
      H q = df[NA - 1];
#pragma GCC unroll 32
      for (int m = NA - 2; m >= 0; --m) q = q * a + df[m];
      q *= a < one ? root : zero;  // k1 sqrt(1 - a) A(a) / (2 pi), a clamped to 1
      const H deriv = (cv > zero ? half_k1 - q : q) * left;  // k1 D
      const H right = iv > zero ? deriv + half_k3 : zero;  // k1 D + k3 h2, zero for a zero variance
      const H ntk = tv * (right + base);
      std::memcpy(dt + k * K, &ntk, sizeof(H));
    }
  }
}

// (Leaky) ReLU expectation, the arccos-free form of ops.relu_expectation_poly:
//   J = max(c, 0) / 2 + s1 s2 (1 - a)^(3/2) R(a) / (2 pi),  a = min(|c| / (s1 s2), 1);
// the leaky unit gives k1 J + k2 c with k1 = (1 - alpha)^2, k2 = alpha.
// With the NTK (src_ntk, dst_ntk not null) its map is multiplied by the derivative expectation
//   k1 D + k3 (h1 + h2) + k4,  D = (pi - arccos rho) / (2 pi) = c > 0 ? 1/2 - q : q,  q = sqrt(1 - a) A(a) / (2 pi),
// D = 0 and h = 0 for a zero variance, else h = 1/2 (ReLU: k1 = 1, k3 = k4 = 0; leaky: (1 - alpha)^2,
// alpha (1 - alpha), alpha^2), as ReLU/LeakyReLU.pair_derivative_map.
template <typename T, int VL, int NR, int NA>
void nonlin(const Args<T>& g, const Instr& ins, int i, int jb, const T* __restrict src, T* __restrict dst,
            const T* __restrict src_ntk, T* __restrict dst_ntk) {
  const int area = ins.in_h * ins.in_w;
  const int64_t first = g.slot_offset[ins.slot];
  const T* tx = g.tx + (static_cast<int64_t>(i) * g.n_trace + first) * 2;
  const T* tz = g.tz + (static_cast<int64_t>(jb) * g.n_trace + first) * 2 * VL;
  const T k1 = g.params[ins.param], k2 = g.params[ins.param + 1];
  const T k3 = g.params[ins.param + 2], k4 = g.params[ins.param + 3];
  if (dst_ntk == nullptr) {
    if (k2 == T(0)) {  // a ReLU
      nonlin_nngp<T, VL, NR, false>(tx, tz, src, dst, area, k1, k2, g.coefs);
    } else {
      nonlin_nngp<T, VL, NR, true>(tx, tz, src, dst, area, k1, k2, g.coefs);
    }
    return;
  }
  if (k2 == T(0)) {
    nonlin_ntk<T, VL, NR, NA, false>(tx, tz, src, dst, src_ntk, dst_ntk, area, k1, k2, k3, k4, g.coefs, g.dcoefs);
  } else {
    nonlin_ntk<T, VL, NR, NA, true>(tx, tz, src, dst, src_ntk, dst_ntk, area, k1, k2, k3, k4, g.coefs, g.dcoefs);
  }
}

template <typename T, int VL, int NR, int NA>
void run_block(const Args<T>& g, int i, int jb, T* regs, T* tmp) {
  // a register: the NNGP's map, then (with the NTK) the NTK's map
  const int64_t map = static_cast<int64_t>(g.reg_area) * VL;
  const int64_t stride = g.ntk ? 2 * map : map;
  auto reg = [&](int r) { return regs + r * stride; };
  auto tangent = [&](int r) { return g.ntk ? regs + r * stride + map : nullptr; };
  for (int k = 0; k < g.n_instr; ++k) {
    const Instr& ins = g.prog[k];
    const int64_t area = static_cast<int64_t>(ins.out_h) * ins.out_w * VL;
    switch (ins.op) {
      case OP_INPUT:
        input_map<T, VL>(g, i, jb, reg(ins.dst));
        if (g.ntk) std::memset(tangent(ins.dst), 0, area * sizeof(T));  // the input has no parameters
        break;
      case OP_CONV: {
        const T scale = g.params[ins.param];
        conv<T, VL>(ins, reg(ins.a), reg(ins.dst), tmp, scale, g.params[ins.param + 1]);
        if (!g.ntk) break;
        if (ins.flags & kNtkInZero) {
          std::memcpy(tangent(ins.dst), reg(ins.dst), area * sizeof(T));
        } else {
          conv<T, VL>(ins, tangent(ins.a), tangent(ins.dst), tmp, scale, T(0), reg(ins.dst));
        }
        break;
      }
      case OP_NONLIN:
        nonlin<T, VL, NR, NA>(g, ins, i, jb, reg(ins.a), reg(ins.dst), tangent(ins.a), tangent(ins.dst));
        break;
      case OP_ADD: {
        for (int part = 0; part < (g.ntk ? 2 : 1); ++part) {
          const T* __restrict a = reg(ins.a) + part * map;
          const T* __restrict b = reg(ins.b) + part * map;
          T* __restrict d = reg(ins.dst) + part * map;
#pragma omp simd
          for (int64_t e = 0; e < area; ++e) d[e] = a[e] + b[e];
        }
        break;
      }
      case OP_OUTPUT: {
        if (g.out == nullptr) break;  // the VJP's forward keeps its maps, not the value
        T* o = g.out + static_cast<int64_t>(i) * g.n2 + static_cast<int64_t>(jb) * VL;
        const T* s = reg(ins.a);
        for (int v = 0; v < VL; ++v) o[v] = s[v];
        if (g.ntk) {
          const T* t = tangent(ins.a);
          o += static_cast<int64_t>(g.n1) * g.n2;
          for (int v = 0; v < VL; ++v) o[v] = t[v];
        }
        break;
      }
      default:
        break;
    }
  }
}

template <typename T, int VL, int NR, int NA>
int run(const Args<T>& g, int n_threads) {
  if (g.n2 % VL != 0) return 2;
  if (g.n_coefs != NR || g.n_dcoefs != NA) return 4;
  const int64_t n_blocks = static_cast<int64_t>(g.n1) * (g.n2 / VL);
  std::atomic<int64_t> next{0};
  std::atomic<int> failed{0};
  auto worker = [&]() {
    const size_t maps = static_cast<size_t>(g.n_regs) * g.reg_area * (g.ntk ? 2 : 1);
    const size_t bytes = (maps + g.tmp_area) * VL * sizeof(T);
    const size_t rounded = (bytes + 63) / 64 * 64;
    T* mem = static_cast<T*>(std::aligned_alloc(64, rounded));
    if (mem == nullptr) {
      failed.store(1);
      return;
    }
    T* tmp = mem + maps * VL;
    for (int64_t blk = next.fetch_add(1); blk < n_blocks; blk = next.fetch_add(1)) {
      // consecutive blocks share their lane group, whose packed traces then stay in cache
      run_block<T, VL, NR, NA>(g, static_cast<int>(blk % g.n1), static_cast<int>(blk / g.n1), mem, tmp);
    }
    std::free(mem);
  };
  n_threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(n_threads, n_blocks)));
  std::vector<std::thread> pool;
  for (int t = 1; t < n_threads; ++t) pool.emplace_back(worker);
  worker();
  for (auto& t : pool) t.join();
  return failed.load() ? 3 : 0;
}


// ---------------------------------------------------------------------------------------------
// Reverse mode: the gradient of sum_ij G_ij K_ij with respect to the parameter vector (each window sum's
// scale and bias) and to the traces' standard deviations, one block at a time. The block's forward keeps
// every map (the program is lowered without register reuse); the adjoint maps are then swept backwards,
// through the same registers' second copies. Parameters are shared by all pairs, traces by all pairs of an
// image: each thread accumulates them in its own buffers, summed at the end.

template <typename T>
struct Grads {
  T* params;  // [n_params][VL]: per-lane partial sums
  T* tx;      // [n1][n_trace]
  T* tz;      // [n2 / VL][n_trace][VL]
};

// dst (=|+=) scale * src over n elements: the first write to an adjoint sets it, later ones add
template <typename T>
inline void accumulate(T* __restrict dst, const T* __restrict src, int64_t n, T scale, bool first) {
  if (first) {
#pragma omp simd
    for (int64_t e = 0; e < n; ++e) dst[e] = scale * src[e];
  } else {
#pragma omp simd
    for (int64_t e = 0; e < n; ++e) dst[e] += scale * src[e];
  }
}

// The transpose of a window sum: res[q] = sum of adj[o] over the outputs o whose window holds q, [in_h][in_w].
// With stride and dilation 1 that is itself a window sum (the same size, the padding mirrored), so conv()
// runs it with its running sums; otherwise the taps are scattered.
template <typename T, int VL>
void conv_transpose(const Instr& ins, const T* __restrict adj, T* __restrict res, T* __restrict tmp) {
  using L = Lanes<T, VL>;
  if (ins.sh == 1 && ins.sw == 1 && ins.dh == 1 && ins.dw == 1) {
    Instr tr = ins;
    tr.in_h = ins.out_h;
    tr.in_w = ins.out_w;
    tr.out_h = ins.in_h;
    tr.out_w = ins.in_w;
    tr.pt = ins.kh - 1 - ins.pt;
    tr.pl = ins.kw - 1 - ins.pl;
    conv<T, VL>(tr, adj, res, tmp, T(1), T(0));
    return;
  }
  const int in_h = ins.in_h, in_w = ins.in_w, out_h = ins.out_h, out_w = ins.out_w;
  // along H first (the forward summed along H last): tmp [in_h][out_w]
  const int64_t width = static_cast<int64_t>(out_w) * VL;
  std::memset(tmp, 0, in_h * width * sizeof(T));
  for (int oh = 0; oh < out_h; ++oh) {
    const int base = oh * ins.sh - ins.pt;
    int lo, hi;
    valid_taps(base, ins.dh, ins.kh, in_h, lo, hi);
    const T* __restrict r = adj + oh * width;
    for (int a = lo; a < hi; ++a) {
      T* __restrict t = tmp + (static_cast<int64_t>(base) + a * ins.dh) * width;
#pragma omp simd
      for (int64_t e = 0; e < width; ++e) t[e] += r[e];
    }
  }
  std::memset(res, 0, static_cast<size_t>(in_h) * in_w * VL * sizeof(T));
  for (int ow = 0; ow < out_w; ++ow) {
    const int base = ow * ins.sw - ins.pl;
    int lo, hi;
    valid_taps(base, ins.dw, ins.kw, in_w, lo, hi);
    for (int h = 0; h < in_h; ++h) {
      const T* src = tmp + (static_cast<int64_t>(h) * out_w + ow) * VL;
      for (int b = lo; b < hi; ++b) {
        T* d = res + (static_cast<int64_t>(h) * in_w + base + b * ins.dw) * VL;
        typename L::V acc = L::zero();
        L::add(acc, d);
        L::add(acc, src);
        L::store(d, acc);
      }
    }
  }
}

// Adjoint of a (leaky) ReLU: out = k1 J(c, s1, s2) + k2 c, so
//   d/dc = k1 D + k2 (D = (pi - arccos rho) / (2 pi), not masked: ops' autograd takes 1/4 at a zero variance),
//   d/ds1 = k1 s2 sqrt(1 - rho^2) / (2 pi), d/ds2 = k1 s1 sqrt(1 - rho^2) / (2 pi).
template <typename T, int VL, int NR, int NA>
void nonlin_adjoint(const Args<T>& g, const Instr& ins, int i, int jb, const T* __restrict c_map,
                    const T* __restrict adj_out, T* __restrict adj_in, bool first, const Grads<T>& gr) {
  const int area = ins.in_h * ins.in_w;
  const int64_t off = g.slot_offset[ins.slot];
  const T* tx = g.tx + (static_cast<int64_t>(i) * g.n_trace + off) * 2;
  const T* tz = g.tz + (static_cast<int64_t>(jb) * g.n_trace + off) * 2 * VL;
  T* gx = gr.tx + static_cast<int64_t>(i) * g.n_trace + off;
  T* gz = gr.tz + (static_cast<int64_t>(jb) * g.n_trace + off) * VL;
  const T k1 = g.params[ins.param], k2 = g.params[ins.param + 1];
  const T inv_2pi = T(0.15915494309189533577);
  T df[NA];
  for (int k = 0; k < NA; ++k) df[k] = g.dcoefs[k];
  for (int p = 0; p < area; ++p) {
    const T s1 = tx[2 * p], i1 = tx[2 * p + 1];
    const T* __restrict s2 = tz + static_cast<int64_t>(p) * 2 * VL;
    const T* __restrict i2 = s2 + VL;
    const T* __restrict c = c_map + static_cast<int64_t>(p) * VL;
    const T* __restrict ad = adj_out + static_cast<int64_t>(p) * VL;
    T* __restrict ai = adj_in + static_cast<int64_t>(p) * VL;
    T* __restrict gzp = gz + static_cast<int64_t>(p) * VL;
    T a[VL], q[VL], sine[VL];
#pragma omp simd
    for (int v = 0; v < VL; ++v) {
      const T x = std::fabs(c[v]) * i1 * i2[v];
      a[v] = x < T(1) ? x : T(1);
    }
#pragma omp simd
    for (int v = 0; v < VL; ++v) q[v] = df[NA - 1];
    for (int k = NA - 2; k >= 0; --k) {
#pragma omp simd
      for (int v = 0; v < VL; ++v) q[v] = q[v] * a[v] + df[k];
    }
#pragma omp simd
    for (int v = 0; v < VL; ++v) {
      const T root = std::sqrt(T(1) - a[v]);
      q[v] *= root;
      sine[v] = root * std::sqrt(T(1) + a[v]) * inv_2pi * k1 * ad[v];  // k1 sqrt(1 - rho^2) / (2 pi) adj
    }
    using L = Lanes<T, VL>;
    using H = typename L::H;
    for (int k = 0; k < L::kParts; ++k) {
      H cv, qv, av;
      std::memcpy(&cv, c + k * L::kPer, sizeof(H));
      std::memcpy(&qv, q + k * L::kPer, sizeof(H));
      std::memcpy(&av, ad + k * L::kPer, sizeof(H));
      const H zero = H{};
      const H half = zero + T(0.5);
      const H deriv = cv > zero ? half - qv : qv;
      H out = av * (deriv * k1 + k2);
      if (!first) {
        H prev;
        std::memcpy(&prev, ai + k * L::kPer, sizeof(H));
        out += prev;
      }
      std::memcpy(ai + k * L::kPer, &out, sizeof(H));
    }
    T sx = T(0);
#pragma omp simd reduction(+ : sx)
    for (int v = 0; v < VL; ++v) {
      sx += sine[v] * s2[v];
      gzp[v] += sine[v] * s1;
    }
    gx[p] += sx;
  }
}

template <typename T, int VL, int NR, int NA>
void vjp_block(const Args<T>& g, const T* gout, int i, int jb, T* regs, T* adjs, T* tmp, T* res, bool* touched,
               const Grads<T>& gr) {
  run_block<T, VL, NR, NA>(g, i, jb, regs, tmp);
  const int64_t map = static_cast<int64_t>(g.reg_area) * VL;
  auto reg = [&](int r) { return regs + r * map; };
  auto adj = [&](int r) { return adjs + r * map; };
  for (int r = 0; r < g.n_regs; ++r) touched[r] = false;
  for (int k = g.n_instr - 1; k >= 0; --k) {
    const Instr& ins = g.prog[k];
    if (ins.op == OP_OUTPUT) {
      const T* go = gout + static_cast<int64_t>(i) * g.n2 + static_cast<int64_t>(jb) * VL;
      T* d = adj(ins.a);
      for (int v = 0; v < VL; ++v) d[v] = touched[ins.a] ? d[v] + go[v] : go[v];
      touched[ins.a] = true;
      continue;
    }
    if (ins.op == OP_INPUT || !touched[ins.dst]) continue;  // images' gradients stay with autograd
    const T* ad = adj(ins.dst);
    const int64_t in_area = static_cast<int64_t>(ins.in_h) * ins.in_w * VL;
    switch (ins.op) {
      case OP_CONV: {
        const int64_t out_area = static_cast<int64_t>(ins.out_h) * ins.out_w * VL;
        T* gs = gr.params + static_cast<int64_t>(ins.param) * VL;
        T* gb = gs + VL;
        for (int64_t e = 0; e < out_area; e += VL) {
#pragma omp simd
          for (int v = 0; v < VL; ++v) gb[v] += ad[e + v];
        }
        conv_transpose<T, VL>(ins, ad, res, tmp);  // S^T adj
        const T* src = reg(ins.a);
        for (int64_t e = 0; e < in_area; e += VL) {
#pragma omp simd
          for (int v = 0; v < VL; ++v) gs[v] += src[e + v] * res[e + v];
        }
        accumulate(adj(ins.a), res, in_area, g.params[ins.param], !touched[ins.a]);
        touched[ins.a] = true;
        break;
      }
      case OP_NONLIN:
        nonlin_adjoint<T, VL, NR, NA>(g, ins, i, jb, reg(ins.a), ad, adj(ins.a), !touched[ins.a], gr);
        touched[ins.a] = true;
        break;
      case OP_ADD:
        accumulate(adj(ins.a), ad, in_area, T(1), !touched[ins.a]);
        touched[ins.a] = true;
        accumulate(adj(ins.b), ad, in_area, T(1), !touched[ins.b]);
        touched[ins.b] = true;
        break;
      default:
        break;
    }
  }
}

template <typename T, int VL, int NR, int NA>
int run_vjp(const Args<T>& g, const T* gout, int n_params, T* g_params, T* g_tx, T* g_tz, int n_threads) {
  if (g.n2 % VL != 0) return 2;
  if (g.n_coefs != NR || g.n_dcoefs != NA) return 4;
  if (g.ntk) return 5;
  const int64_t n_blocks = static_cast<int64_t>(g.n1) * (g.n2 / VL);
  const int64_t groups = g.n2 / VL;
  const size_t tx_size = static_cast<size_t>(g.n1) * g.n_trace;
  const size_t tz_size = static_cast<size_t>(groups) * g.n_trace * VL;
  const size_t p_size = static_cast<size_t>(n_params) * VL;
  n_threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(n_threads, n_blocks)));
  std::vector<T*> buffers(n_threads, nullptr);
  std::atomic<int64_t> next{0};
  std::atomic<int> failed{0};
  auto worker = [&](int t) {
    const size_t maps = static_cast<size_t>(g.n_regs) * g.reg_area * VL;
    const size_t scratch = static_cast<size_t>(g.tmp_area) * VL + static_cast<size_t>(g.reg_area) * VL;
    const size_t total = 2 * maps + scratch + p_size + tx_size + tz_size;
    T* mem = static_cast<T*>(std::aligned_alloc(64, (total * sizeof(T) + 63) / 64 * 64));
    bool* touched = static_cast<bool*>(std::malloc(std::max(1, g.n_regs)));
    if (mem == nullptr || touched == nullptr) {
      failed.store(1);
      std::free(mem);
      std::free(touched);
      return;
    }
    T* regs = mem;
    T* adjs = regs + maps;
    T* tmp = adjs + maps;
    T* res = tmp + static_cast<size_t>(g.tmp_area) * VL;
    Grads<T> gr{res + static_cast<size_t>(g.reg_area) * VL, nullptr, nullptr};
    gr.tx = gr.params + p_size;
    gr.tz = gr.tx + tx_size;
    std::memset(gr.params, 0, (p_size + tx_size + tz_size) * sizeof(T));
    for (int64_t blk = next.fetch_add(1); blk < n_blocks; blk = next.fetch_add(1)) {
      vjp_block<T, VL, NR, NA>(g, gout, static_cast<int>(blk % g.n1), static_cast<int>(blk / g.n1), regs, adjs, tmp,
                           res, touched, gr);
    }
    std::free(touched);
    buffers[t] = mem;
  };
  std::vector<std::thread> pool;
  for (int t = 1; t < n_threads; ++t) pool.emplace_back(worker, t);
  worker(0);
  for (auto& th : pool) th.join();
  if (failed.load()) {
    for (T* b : buffers) std::free(b);
    return 3;
  }
  const size_t maps = static_cast<size_t>(g.n_regs) * g.reg_area * VL;
  const size_t offset = 2 * maps + static_cast<size_t>(g.tmp_area) * VL + static_cast<size_t>(g.reg_area) * VL;
  for (int p = 0; p < n_params; ++p) g_params[p] = T(0);
  std::memset(g_tx, 0, tx_size * sizeof(T));
  std::memset(g_tz, 0, tz_size * sizeof(T));
  for (T* b : buffers) {
    const T* bp = b + offset;
    for (int p = 0; p < n_params; ++p) {
      for (int v = 0; v < VL; ++v) g_params[p] += bp[static_cast<size_t>(p) * VL + v];
    }
    const T* bx = bp + p_size;
    for (size_t e = 0; e < tx_size; ++e) g_tx[e] += bx[e];
    const T* bz = bx + tx_size;
    for (size_t e = 0; e < tz_size; ++e) g_tz[e] += bz[e];
    std::free(b);
  }
  return 0;
}

template <typename T>
Args<T> make_args(const int32_t* prog, int n_instr, int reg_area, int tmp_area, int n_regs, const T* x, const T* z,
                  int H, int W, int C, int n1, int n2, const T* tx, const T* tz, const int32_t* slot_offset,
                  int n_trace, const T* params, const T* coefs, const T* dcoefs, int n_coefs, int n_dcoefs, T* out,
                  int ntk) {
  return Args<T>{reinterpret_cast<const Instr*>(prog), n_instr, reg_area, tmp_area, n_regs, x, z, H, W, C, n1, n2,
                 tx, tz, slot_offset, n_trace, params, coefs, dcoefs, n_coefs, n_dcoefs, out, ntk};
}

}  // namespace

extern "C" {

int cnngp_fields() { return kFields; }

// lanes per block: 512 bits of each type (one AVX-512 vector, two AVX2 or four SSE vectors)
int cnngp_lanes(int is_double) { return is_double ? 8 : 16; }

#define CNNGP_ENTRY(NAME, T, VL, NR, NA)                                                                          \
  int NAME(const int32_t* prog, int n_instr, int reg_area, int tmp_area, int n_regs, const T* x, const T* z,  \
           int H, int W, int C, int n1, int n2, const T* tx, const T* tz, const int32_t* slot_offset,          \
           int n_trace, const T* params, const T* coefs, const T* dcoefs, int n_coefs, int n_dcoefs, T* out,   \
           int ntk, int n_threads) {                                                                          \
    return run<T, VL, NR, NA>(make_args<T>(prog, n_instr, reg_area, tmp_area, n_regs, x, z, H, W, C, n1, n2,  \
                                           tx, tz, slot_offset, n_trace, params, coefs, dcoefs, n_coefs,       \
                                           n_dcoefs, out, ntk),                                                \
                              n_threads);                                                                     \
  }

// lanes: 512 bits; NR, NA: coefficients of R and of A (float32: degrees 6 and 8, float64: 16 and 16; ops.py)
CNNGP_ENTRY(cnngp_run_f32, float, 16, 7, 9)
CNNGP_ENTRY(cnngp_run_f64, double, 8, 17, 17)

// the VJP: gout [n1][n2] (zero in padding lanes); g_params [n_params], g_tx [n1][n_trace], g_tz [n2/VL][n_trace][VL]
#define CNNGP_VJP(NAME, T, VL, NR, NA)                                                                            \
  int NAME(const int32_t* prog, int n_instr, int reg_area, int tmp_area, int n_regs, const T* x, const T* z,  \
           int H, int W, int C, int n1, int n2, const T* tx, const T* tz, const int32_t* slot_offset,          \
           int n_trace, const T* params, const T* coefs, const T* dcoefs, int n_coefs, int n_dcoefs,           \
           const T* gout, int n_params, T* g_params, T* g_tx, T* g_tz, int n_threads) {                         \
    return run_vjp<T, VL, NR, NA>(make_args<T>(prog, n_instr, reg_area, tmp_area, n_regs, x, z, H, W, C, n1,  \
                                               n2, tx, tz, slot_offset, n_trace, params, coefs, dcoefs,         \
                                               n_coefs, n_dcoefs, nullptr, 0),                                 \
                                  gout, n_params, g_params, g_tx, g_tz, n_threads);                            \
  }

CNNGP_VJP(cnngp_vjp_f32, float, 16, 7, 9)
CNNGP_VJP(cnngp_vjp_f64, double, 8, 17, 17)

}  // extern "C"
