// Native CPU kernel of the pair pass and the self pass (see gpytorch_cnngp/backends/native/).
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
// A pooled network's offsets outgrow L1 (a 28x28 map of 16 float32 lanes is 50 KB), so the pairs run a window
// sum and the ReLU that alone reads it row by row (conv_nonlin, flagged by the lowering), and the ReLU skips its
// polynomial where a deviation is zero (relu_linear), in pairs of images that have such black regions.
//
// Compiled once per machine by native.py with the system C++ compiler; plain C++17 loops written
// for the compiler's auto-vectoriser (no intrinsics). Threads come from the OpenMP runtime PyTorch
// has already loaded (libgomp.so.1, found by its name), so that its workers, which spin for a while
// after each torch operation, do this kernel's work instead of competing with it; without OpenMP,
// from std::thread.

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

#include <unistd.h>
#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

// the process that loaded the kernel: GNU OpenMP's thread pool does not survive fork(), and a forked child that
// entered a parallel region would wait for its parent's workers forever, so a child makes its own threads
const pid_t kLoader = getpid();

// work(t) for every t < n_threads, each on its own thread (if the runtime gives fewer, some take several)
template <typename F>
void parallel(int n_threads, F&& work) {
#ifdef _OPENMP
  if (getpid() == kLoader) {
#pragma omp parallel num_threads(n_threads)
    {
      for (int t = omp_get_thread_num(); t < n_threads; t += omp_get_num_threads()) work(t);
    }
    return;
  }
#endif
  std::vector<std::thread> pool;
  for (int t = 1; t < n_threads; ++t) pool.emplace_back(work, t);
  work(0);
  for (auto& th : pool) th.join();
}

enum Op : int32_t { OP_INPUT = 0, OP_CONV = 1, OP_NONLIN = 2, OP_ADD = 3, OP_OUTPUT = 4, OP_ZERO = 5, OP_POOL = 6 };

// one instruction: 22 int32 fields (native.py builds them in this order). A spatial offset's map covers only the
// rectangle of positions p where both p and p + d lie inside the layer's map: an input or a nonlinearity reads
// the first image's values from position xoff on and the second's from zoff on, rows full_w apart (the same-
// location map: xoff = zoff = 0 and full_w = its width). OP_ZERO clears a map; OP_POOL adds a window sum
// (scale params[param], no bias) to its destination: an average pool gathers its output offsets that way.
struct Instr {
  int32_t op, dst, a, b, in_h, in_w, out_h, out_w, kh, kw, sh, sw, dh, dw, pt, pl, param, slot, flags;
  int32_t xoff, zoff, full_w;
};
constexpr int kFields = 22;
// flags: the source's NTK map is zero (the input's), so a window sum's NTK is its NNGP
constexpr int32_t kNtkInZero = 1;
// flags: a window sum whose one reader is the nonlinearity right after it: the pair pass runs both row by row
// (conv_nonlin) and never writes the window sum's own map; the self pass runs them one after the other
constexpr int32_t kFuseNonlin = 2;
static_assert(sizeof(Instr) == kFields * sizeof(int32_t), "Instr layout");

// Inputs are packed by native.py so that one block reads contiguous memory: the first set per image,
// the second set per group of VL images with the lanes innermost. The traces of all nonlinearities
// (slot after slot, each [h][w]) hold the standard deviation s and 1/s (0 where s = 0) side by side.
template <typename T>
struct Args {
  const Instr* prog;
  int n_instr, reg_area, tmp_area, n_regs;
  const int64_t* reg_off;  // [n_regs + 1]: each register's first position (a register's maps hold its area's)
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
  // the self pass (run with kSelf) only: where its traces go, in the layouts of tx and tz (null: not wanted)
  T* self_left = nullptr;
  T* self_right = nullptr;
  // the pairs only (run sets them): whether image i of the first set has a zero deviation anywhere in its traces,
  // and whether group jb of the second set has a position where all VL have (see relu_linear)
  const uint8_t* zero_x = nullptr;
  const uint8_t* zero_z = nullptr;
  // the pairs only: the two sets are the same images (a square tile on the diagonal of K(X, X)), so only the
  // blocks with a pair j >= i run; the caller mirrors the rest (the forward) or folds their weights in (the VJP)
  int triangle = 0;
};

// whether block (i, group jb) has a pair at or above the diagonal (see Args::triangle)
template <typename T, int VL>
bool wanted(const Args<T>& g, int i, int jb) {
  return !g.triangle || (jb + 1) * VL > i;
}

// The input's channel mean of x_c z_c for the pairs (i, group jb), or with kSelf of z_c^2 for group jb's images.
// A spatial offset's map (instruction ins) pairs x's positions from ins.xoff on with z's from ins.zoff on.
template <typename T, int VL, bool kSelf = false>
void input_map(const Args<T>& g, const Instr& ins, int i, int jb, T* __restrict dst) {
  const int area = g.H * g.W, C = g.C, rows = ins.out_h, cols = ins.out_w;
  const T* xi = kSelf ? nullptr : g.x + static_cast<int64_t>(i) * area * C;
  const T* zb = g.z + static_cast<int64_t>(jb) * area * C * VL;
  if (C == 1) {  // one product per lane, row by row (grey images: MNIST)
    for (int r = 0; r < rows; ++r) {
      const int64_t px = ins.xoff + static_cast<int64_t>(r) * g.W, pz = ins.zoff + static_cast<int64_t>(r) * g.W;
      T* __restrict d = dst + static_cast<int64_t>(r) * cols * VL;
      const T* __restrict zv = zb + pz * VL;
      if constexpr (kSelf) {
        const T* __restrict zx = zb + px * VL;
#pragma omp simd
        for (int64_t e = 0; e < static_cast<int64_t>(cols) * VL; ++e) d[e] = zx[e] * zv[e];
      } else {
        const T* __restrict xr = xi + px;
        for (int q = 0; q < cols; ++q) {
          const T xv = xr[q];
#pragma omp simd
          for (int v = 0; v < VL; ++v) d[q * VL + v] = xv * zv[q * VL + v];
        }
      }
    }
    return;
  }
  for (int r = 0; r < rows; ++r) {
    for (int q = 0; q < cols; ++q) {
      const int64_t p = static_cast<int64_t>(r) * cols + q;
      const int64_t px = ins.xoff + static_cast<int64_t>(r) * g.W + q, pz = ins.zoff + static_cast<int64_t>(r) * g.W + q;
      T* __restrict d = dst + p * VL;
      for (int v = 0; v < VL; ++v) d[v] = T(0);
      for (int c = 0; c < C; ++c) {
        const T* __restrict zv = zb + (pz * C + c) * VL;
        if constexpr (kSelf) {
          const T* __restrict zx = zb + (px * C + c) * VL;  // the same image at p (pz: at p + d)
#pragma omp simd
          for (int v = 0; v < VL; ++v) d[v] += zx[v] * zv[v];
        } else {
          const T xv = xi[px * C + c];
#pragma omp simd
          for (int v = 0; v < VL; ++v) d[v] += xv * zv[v];
        }
      }
      if (C > 1) {
        for (int v = 0; v < VL; ++v) d[v] /= static_cast<T>(C);
      }
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
  // ptr[0, kPer) += h
  static void add_to(T* ptr, H h) {
    H have;
    std::memcpy(&have, ptr, sizeof(H));
    h += have;
    std::memcpy(ptr, &h, sizeof(H));
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

// Running sums along H of tmp's SIMD vectors [e0, e0 + G) of each row (see window_sum): store(at, g, sum)
// receives each output vector's sum, g < G its position in the strip.
template <typename T, int VL, int G, typename Store>
__attribute__((always_inline)) inline void running_columns(const Instr& ins, const T* __restrict tmp, int64_t e0, Store& store) {
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
    for (int g = 0; g < G; ++g) store(at + g * K, g, acc[g]);
  }
}

// strip(G, e) over all `vectors` SIMD vectors of a row, e the first of each strip: strips of G = 8, then 4, 2, 1
// (narrow maps still get several chains); G comes as a std::integral_constant, a compile-time strip width
template <typename F>
__attribute__((always_inline)) inline void in_strips(int64_t vectors, F&& strip) {
  int64_t e = 0;
  for (; e + 8 <= vectors; e += 8) strip(std::integral_constant<int, 8>{}, e);
  for (; e + 4 <= vectors; e += 4) strip(std::integral_constant<int, 4>{}, e);
  for (; e + 2 <= vectors; e += 2) strip(std::integral_constant<int, 2>{}, e);
  for (; e < vectors; ++e) strip(std::integral_constant<int, 1>{}, e);
}

// Window sums along W by their taps (windows of fewer than kRunningMin taps, strides, dilations), rows of src
// into tmp [in_h][out_w]. Groups of kTapGroup outputs whose windows lie inside the row are summed together,
// their additions independent of each other (one output's taps form a chain of dependent additions).
constexpr int kTapGroup = 4;

// One output of a row by its taps inside [0, in_w): the row's edges, and windows that tap_rows cannot group.
template <typename T, int VL>
inline void tap_output(const Instr& ins, const T* __restrict row, T* __restrict out, int ow) {
  using L = Lanes<T, VL>;
  const int base = ow * ins.sw - ins.pl;
  int lo, hi;
  valid_taps(base, ins.dw, ins.kw, ins.in_w, lo, hi);
  typename L::V acc = L::zero();
  for (int b = lo; b < hi; ++b) L::add(acc, row + static_cast<int64_t>(base + b * ins.dw) * VL);
  L::store(out + static_cast<int64_t>(ow) * VL, acc);
}

template <typename T, int VL>
inline void tap_rows(const Instr& ins, const T* __restrict src, T* __restrict tmp) {
  using L = Lanes<T, VL>;
  using H = typename L::H;
  constexpr int P = L::kParts, K = L::kPer, N = kTapGroup * P;
  const int in_h = ins.in_h, in_w = ins.in_w, out_w = ins.out_w;
  for (int h = 0; h < in_h; ++h) {
    const T* row = src + static_cast<int64_t>(h) * in_w * VL;
    T* out = tmp + static_cast<int64_t>(h) * out_w * VL;
    int ow = 0;
    while (ow < out_w) {
      const int base = ow * ins.sw - ins.pl;
      if (base >= 0 && ow + kTapGroup <= out_w &&
          base + (kTapGroup - 1) * ins.sw + (ins.kw - 1) * ins.dw < in_w) {
        H acc[N];
#pragma GCC unroll 32
        for (int n = 0; n < N; ++n) acc[n] = H{};
        for (int b = 0; b < ins.kw; ++b) {
          const T* at = row + static_cast<int64_t>(base + b * ins.dw) * VL;
#pragma GCC unroll 32
          for (int n = 0; n < N; ++n) {
            H x;
            std::memcpy(&x, at + static_cast<int64_t>(n / P) * ins.sw * VL + (n % P) * K, sizeof(H));
            acc[n] += x;
          }
        }
#pragma GCC unroll 32
        for (int n = 0; n < N; ++n) std::memcpy(out + static_cast<int64_t>(ow) * VL + n * K, &acc[n], sizeof(H));
        ow += kTapGroup;
        continue;
      }
      tap_output<T, VL>(ins, row, out, ow);
      ++ow;
    }
  }
}

// Window sums along H by their taps, tmp's rows into store (see window_sum): an output row's taps are the same
// for all of its SIMD vectors, which are summed in strips of G, G independent chains.
template <typename T, int VL, int G, typename Store>
__attribute__((always_inline)) inline void tap_strip(const T* __restrict first, int64_t row_step, int taps,
                                                      int64_t at, Store& store) {
  using H = typename Lanes<T, VL>::H;
  constexpr int K = Lanes<T, VL>::kPer;
  H acc[G];
#pragma GCC unroll 32
  for (int g = 0; g < G; ++g) acc[g] = H{};
  for (int a = 0; a < taps; ++a) {
#pragma GCC unroll 32
    for (int g = 0; g < G; ++g) {
      H x;
      std::memcpy(&x, first + a * row_step + g * K, sizeof(H));
      acc[g] += x;
    }
  }
#pragma GCC unroll 32
  for (int g = 0; g < G; ++g) store(at + g * K, g, acc[g]);
}

template <typename T, int VL, typename Store>
__attribute__((always_inline)) inline void tap_columns(const Instr& ins, const T* __restrict tmp, Store& store) {
  constexpr int K = Lanes<T, VL>::kPer;
  const int in_h = ins.in_h, out_h = ins.out_h;
  const int64_t width = static_cast<int64_t>(ins.out_w) * VL, vectors = width / K;
  for (int oh = 0; oh < out_h; ++oh) {
    const int base = oh * ins.sh - ins.pt;
    int lo, hi;
    valid_taps(base, ins.dh, ins.kh, in_h, lo, hi);
    const T* first = tmp + (hi > lo ? (static_cast<int64_t>(base) + lo * ins.dh) * width : 0);
    const int64_t step = static_cast<int64_t>(ins.dh) * width, row = oh * width;
    in_strips(vectors, [&](auto strip, int64_t e) {
      tap_strip<T, VL, decltype(strip)::value>(first + e * K, step, hi - lo, row + e * K, store);
    });
  }
}

// Three-tap windows along H with stride and dilation 1: strips of G SIMD vectors go down the output rows with
// the two previous input rows in registers, one load and two additions per interior output (see three_rows).
template <typename T, int VL, int G, typename Store>
__attribute__((always_inline)) inline void three_columns(const Instr& ins, const T* __restrict tmp, int64_t e0, Store& store) {
  using L = Lanes<T, VL>;
  using H = typename L::H;
  constexpr int K = L::kPer;
  const int in_h = ins.in_h, out_h = ins.out_h, pt = ins.pt;
  const int64_t width = static_cast<int64_t>(ins.out_w) * VL;
  const T* in = tmp + e0 * K;
  const int first = std::min(out_h, std::max(0, pt)), last = std::max(first, std::min(out_h, in_h - 2 + pt));
  auto edge = [&](int oh) {
    int lo, hi;
    valid_taps(oh - pt, 1, 3, in_h, lo, hi);
    tap_strip<T, VL, G>(in + (oh - pt + lo) * width, width, hi - lo, oh * width + e0 * K, store);
  };
  for (int oh = 0; oh < first; ++oh) edge(oh);
  if (last > first) {
    H a[G], b[G];
    const int y0 = first - pt;
#pragma GCC unroll 32
    for (int g = 0; g < G; ++g) {
      std::memcpy(&a[g], in + y0 * width + g * K, sizeof(H));
      std::memcpy(&b[g], in + (y0 + 1) * width + g * K, sizeof(H));
    }
    for (int oh = first; oh < last; ++oh) {
      const T* next = in + (oh - pt + 2) * width;
      const int64_t at = oh * width + e0 * K;
#pragma GCC unroll 32
      for (int g = 0; g < G; ++g) {
        H c;
        std::memcpy(&c, next + g * K, sizeof(H));
        store(at + g * K, g, (a[g] + b[g]) + c);
        a[g] = b[g];
        b[g] = c;
      }
    }
  }
  for (int oh = last; oh < out_h; ++oh) edge(oh);
}

// Three-tap windows (the ResNets' 3x3 layers) with stride and dilation 1, along W: each input vector is loaded
// once and kept in registers for the three outputs that use it, so an interior output costs one load and two
// additions instead of three loads and three. Edge outputs (their windows cut by the padding) sum their taps.
template <typename T, int VL>
inline void three_rows(const Instr& ins, const T* __restrict src, T* __restrict tmp) {
  using L = Lanes<T, VL>;
  using H = typename L::H;
  constexpr int P = L::kParts, K = L::kPer;
  const int in_h = ins.in_h, in_w = ins.in_w, out_w = ins.out_w, pl = ins.pl;
  // interior outputs: the whole window [ow - pl, ow - pl + 3) inside the row
  const int first = std::min(out_w, std::max(0, pl)), last = std::max(first, std::min(out_w, in_w - 2 + pl));
  for (int h = 0; h < in_h; ++h) {
    const T* row = src + static_cast<int64_t>(h) * in_w * VL;
    T* out = tmp + static_cast<int64_t>(h) * out_w * VL;
    for (int ow = 0; ow < first; ++ow) tap_output<T, VL>(ins, row, out, ow);
    if (last > first) {
      const T* in = row + static_cast<int64_t>(first - pl) * VL;
      H a[P], b[P];
#pragma GCC unroll 8
      for (int k = 0; k < P; ++k) {
        std::memcpy(&a[k], in + k * K, sizeof(H));
        std::memcpy(&b[k], in + VL + k * K, sizeof(H));
      }
      for (int ow = first; ow < last; ++ow) {
        const T* next = row + static_cast<int64_t>(ow - pl + 2) * VL;
#pragma GCC unroll 8
        for (int k = 0; k < P; ++k) {
          H c;
          std::memcpy(&c, next + k * K, sizeof(H));
          const H sum = (a[k] + b[k]) + c;
          std::memcpy(out + static_cast<int64_t>(ow) * VL + k * K, &sum, sizeof(H));
          a[k] = b[k];
          b[k] = c;
        }
      }
    }
    for (int ow = last; ow < out_w; ++ow) tap_output<T, VL>(ins, row, out, ow);
  }
}

// The most SIMD vectors a strip of window_sum passes to its store (the index g it gives is below this).
constexpr int kStrip = 8;

// Uniform-window sum, separable: along W into tmp [in_h][out_w], then along H; zero padding means
// out-of-range taps are skipped. Each output SIMD vector's sum goes to store(at, g, sum), `at` its offset in
// the [out_h][out_w][VL] map and g < kStrip an index for accumulators kept by the store.
// kDirect sums every window tap by tap, never as running sums: the self pass's variances then stay exact
// zeros over black regions and keep their relative accuracy where they are small (a running sum leaves a
// residual of the size of the row's largest value, which a standard deviation would turn into its square
// root); the pairs' covariances enter the nonlinearities linearly, where such residuals stay residuals.
// window_sum's first pass: the sums along W of src's ins.in_h rows into tmp [in_h][out_w].
template <typename T, int VL, bool kDirect = false>
__attribute__((always_inline)) inline void row_sums(const Instr& ins, const T* __restrict src, T* __restrict tmp) {
  const int in_h = ins.in_h;
  if (!kDirect && ins.sw == 1 && ins.dw == 1 && ins.kw >= kRunningMin) {
    // rows in groups: one row's running sum is a chain of dependent additions, several rows' chains
    // interleave and keep the adders busy
    int h = 0;
    for (; h + 4 <= in_h; h += 4) running_rows<T, VL, 4>(ins, src, tmp, h);
    for (; h + 2 <= in_h; h += 2) running_rows<T, VL, 2>(ins, src, tmp, h);
    for (; h < in_h; ++h) running_rows<T, VL, 1>(ins, src, tmp, h);
  } else if (ins.sw == 1 && ins.dw == 1 && ins.kw == 3) {
    three_rows<T, VL>(ins, src, tmp);
  } else {
    tap_rows<T, VL>(ins, src, tmp);
  }
}

template <typename T, int VL, typename Store, bool kDirect = false>
__attribute__((always_inline)) inline void window_sum(const Instr& ins, const T* __restrict src, T* __restrict tmp, Store& store) {
  using L = Lanes<T, VL>;
  static_assert(L::kParts <= kStrip, "a block's vectors fit a strip");
  const int64_t vectors = static_cast<int64_t>(ins.out_w) * VL / L::kPer;  // of an output row
  row_sums<T, VL, kDirect>(ins, src, tmp);
  if (!kDirect && ins.sh == 1 && ins.dh == 1 && ins.kh >= kRunningMin) {
    // strips of columns, each strip's running sums in registers down all its output rows
    in_strips(vectors, [&](auto strip, int64_t e) {
      running_columns<T, VL, decltype(strip)::value>(ins, tmp, e, store);
    });
  } else if (ins.sh == 1 && ins.dh == 1 && ins.kh == 3) {
    // strips of columns going down with the two previous rows in registers
    in_strips(vectors, [&](auto strip, int64_t e) { three_columns<T, VL, decltype(strip)::value>(ins, tmp, e, store); });
  } else {
    tap_columns<T, VL>(ins, tmp, store);
  }
}

// A window sum: out = bias + scale * sum. With `add` (a map of the output's shape), out = add + scale * sum
// instead: the NTK's window sum plus the layer's new NNGP; with `branch`, out = branch + (bias + scale * sum):
// a sum of branches done in the store (the instruction's b), the same bits as the separate sum.
template <typename T, int VL, bool kDirect = false>
void conv(const Instr& ins, const T* __restrict src, T* __restrict dst, T* __restrict tmp, T scale, T bias,
          const T* __restrict add = nullptr, const T* __restrict branch = nullptr) {
  using H = typename Lanes<T, VL>::H;
  if (branch != nullptr) {
    auto store = [dst, branch, scale, bias](int64_t at, int, H sum) {
      H out;
      std::memcpy(&out, branch + at, sizeof(H));
      out += sum * scale + bias;
      std::memcpy(dst + at, &out, sizeof(H));
    };
    window_sum<T, VL, decltype(store), kDirect>(ins, src, tmp, store);
  } else if (add != nullptr) {
    auto store = [dst, add, scale](int64_t at, int, H sum) {
      H out;
      std::memcpy(&out, add + at, sizeof(H));
      out += sum * scale;
      std::memcpy(dst + at, &out, sizeof(H));
    };
    window_sum<T, VL, decltype(store), kDirect>(ins, src, tmp, store);
  } else {
    auto store = [dst, scale, bias](int64_t at, int, H sum) {
      const H out = sum * scale + bias;
      std::memcpy(dst + at, &out, sizeof(H));
    };
    window_sum<T, VL, decltype(store), kDirect>(ins, src, tmp, store);
  }
}

// An average pool's step (OP_POOL): out += scale * sum, a window sum of its own so that conv's paths stay as they were.
template <typename T, int VL, bool kDirect = false>
void pool_sum(const Instr& ins, const T* __restrict src, T* __restrict dst, T* __restrict tmp, T scale) {
  using H = typename Lanes<T, VL>::H;
  auto store = [dst, scale](int64_t at, int, H sum) {
    H out;
    std::memcpy(&out, dst + at, sizeof(H));
    out += sum * scale;
    std::memcpy(dst + at, &out, sizeof(H));
  };
  window_sum<T, VL, decltype(store), kDirect>(ins, src, tmp, store);
}

// sum_m cf[m] a^m by Estrin's scheme: neighbours paired as cf[2k] + cf[2k + 1] a, then pairs of those with a^2,
// and so on: a chain of about 2 log2(N) dependent operations instead of Horner's N - 1, for a few more
// multiplications. The ReLU's adjoint uses it (float64: 2-6% faster than Horner, bench_kernel_ab.py --grad);
// the forward keeps Horner, which was as fast there.
template <typename H, int N>
inline H polynomial(H a, const H* cf) {
  H t[N];
#pragma GCC unroll 32
  for (int m = 0; m < N; ++m) t[m] = cf[m];
  H x = a;
#pragma GCC unroll 8
  for (int n = N; n > 1; n = (n + 1) / 2) {
#pragma GCC unroll 32
    for (int k = 0; k < n / 2; ++k) t[k] = t[2 * k + 1] * x + t[2 * k];
    if (n % 2 == 1) t[n / 2] = t[n - 1];
    if (n > 2) x = x * x;
  }
  return t[0];
}

// One SIMD vector of the (leaky) ReLU's NNGP, shared by nonlin_nngp and nonlin_ntk so that both give the
// same bits: k1 J + k2 c for covariances cv, right-side deviations sv and their inverses iv, with cf the
// coefficients of k1 R / (2 pi). Also returns a = min(|rho|, 1) and root = sqrt(1 - a). It is written for the
// multiply-add units, which bound it: max(c, 0) / 2 is (c + |c|) / 4.
template <typename T, int VL, int NR, bool kLinearPart, typename S = T>
inline typename Lanes<T, VL>::H relu_vector(typename Lanes<T, VL>::H cv, typename Lanes<T, VL>::H sv,
                                            typename Lanes<T, VL>::H iv, S s1, S i1,
                                            const typename Lanes<T, VL>::H* cf, typename Lanes<T, VL>::H quarter_k1,
                                            T k2, typename Lanes<T, VL>::H& a, typename Lanes<T, VL>::H& root) {
  using L = Lanes<T, VL>;
  using H = typename L::H;
  using I = typename L::I;
  const I magnitude = I{} + L::kMagnitude;
  const H one = H{} + T(1);
  const H mag = reinterpret_cast<H>(reinterpret_cast<I>(cv) & magnitude);
  a = mag * iv * i1;
  // |rho| is at most 1, but running sums leave rounding residuals where a map is zero, and there
  // a residual covariance over residual deviations is any number: clamped, such positions give
  // max(c, 0) / 2, residual-sized, as the exact zeros of a direct sum would give 0 (a NaN from
  // 0 * inf compares false and becomes 1 as well).
  a = a < one ? a : one;
  H poly = cf[NR - 1];
#pragma GCC unroll 32
  for (int m = NR - 2; m >= 0; --m) poly = poly * a + cf[m];
  const H u = one - a;
  root = L::sqrt(u);
  poly *= (sv * s1) * (u * root);
  H out = (cv + mag) * quarter_k1 + poly;  // ReLU: k1 = 1, k2 = 0 gives J exactly
  if constexpr (kLinearPart) out += cv * k2;
  return out;
}

// Whether a position's VL deviations are all +0 (every bit clear).
template <typename T, int VL>
inline bool lanes_zero(const T* __restrict s) {
  uint64_t bits = 0;
#pragma GCC unroll 16
  for (int k = 0; k < static_cast<int>(VL * sizeof(T) / 8); ++k) {
    uint64_t w;
    std::memcpy(&w, reinterpret_cast<const char*>(s) + 8 * k, 8);
    bits |= w;
  }
  return bits == 0;
}

// Where a deviation is 0 (a black region of an image with no biases before it) the ReLU's arc-cosine term
// vanishes: relu_vector's s1 s2 factor is an exact zero and its polynomial finite, so its multiply-add returns
// max(c, 0) / 2 = (c + |c|) / 4 to the bit. Such a position (the first image's deviation 0, or all VL of the
// second's) skips the polynomial and the square root. The leaky unit keeps relu_vector: its two rounded terms
// could be contracted differently here.
template <typename T, int VL>
inline void relu_linear(const T* __restrict c, T* __restrict d, T quarter_k1) {
  using L = Lanes<T, VL>;
  using H = typename L::H;
  using I = typename L::I;
  constexpr int P = L::kParts, K = L::kPer;
  const I magnitude = I{} + L::kMagnitude;
#pragma GCC unroll 4
  for (int k = 0; k < P; ++k) {
    H cv;
    std::memcpy(&cv, c + k * K, sizeof(H));
    const H mag = reinterpret_cast<H>(reinterpret_cast<I>(cv) & magnitude);
    const H out = (cv + mag) * quarter_k1;
    std::memcpy(d + k * K, &out, sizeof(H));
  }
}

// The NNGP-only (leaky) ReLU of nonlin: relu_vector over each position's SIMD vectors; with kSkip (the ReLU, and
// images with zero deviations), relu_linear where a deviation is zero.
template <typename T, int VL, int NR, bool kLinearPart, bool kSkip = false>
void nonlin_nngp(const T* __restrict tx, const T* __restrict tz, const T* src, T* dst,
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
    const T* c = src + static_cast<int64_t>(p) * VL;
    T* d = dst + static_cast<int64_t>(p) * VL;
    if constexpr (kSkip && !kLinearPart) {
      if (s1 == T(0) || lanes_zero<T, VL>(s2)) {
        relu_linear<T, VL>(c, d, T(0.25) * k1);
        continue;
      }
    }
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
template <typename T, int VL, int NR, int NA, bool kLinearPart, bool kSkip = false>
void nonlin_ntk(const T* __restrict tx, const T* __restrict tz, const T* src, T* dst,
                const T* src_ntk, T* dst_ntk, int area, T k1, T k2, T k3, T k4,
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
    const T* c = src + static_cast<int64_t>(p) * VL;
    const T* t = src_ntk + static_cast<int64_t>(p) * VL;
    T* d = dst + static_cast<int64_t>(p) * VL;
    T* dt = dst_ntk + static_cast<int64_t>(p) * VL;
    if constexpr (kSkip && !kLinearPart) {
      if (s1 == T(0) || lanes_zero<T, VL>(s2)) {
        // the ReLU (k3 = k4 = 0) where a deviation is 0: D = 0 and h = 0, so the NTK's factor is an exact +0
        relu_linear<T, VL>(c, d, T(0.25) * k1);
#pragma GCC unroll 4
        for (int k = 0; k < P; ++k) {
          H tv;
          std::memcpy(&tv, t + k * K, sizeof(H));
          const H ntk = tv * zero;
          std::memcpy(dt + k * K, &ntk, sizeof(H));
        }
        continue;
      }
    }
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
void nonlin_rows(const Args<T>& g, const Instr& ins, const T* tx, const T* tz, const T* src, T* dst,
                 const T* src_ntk, T* dst_ntk, bool skip);

// Whether the pairs (i, group jb) may meet a zero deviation (Args::zero_x, zero_z): then the ReLU looks for them.
template <typename T>
inline bool zero_deviations(const Args<T>& g, int i, int jb) {
  return (g.zero_x != nullptr && g.zero_x[i]) || (g.zero_z != nullptr && g.zero_z[jb]);
}

template <typename T, int VL, int NR, int NA>
void nonlin(const Args<T>& g, const Instr& ins, int i, int jb, const T* src, T* dst,
            const T* src_ntk, T* dst_ntk) {
  const int64_t first = g.slot_offset[ins.slot];
  const T* tx = g.tx + (static_cast<int64_t>(i) * g.n_trace + first + ins.xoff) * 2;
  const T* tz = g.tz + (static_cast<int64_t>(jb) * g.n_trace + first + ins.zoff) * 2 * VL;
  const bool skip = zero_deviations(g, i, jb);
  if (ins.in_w != ins.full_w) {  // a spatial offset's rectangle: row by row, each row's traces full_w apart
    Instr row = ins;
    row.in_h = 1;
    row.xoff = row.zoff = 0;
    row.full_w = row.in_w;
    const int64_t step = static_cast<int64_t>(ins.in_w) * VL;
    for (int r = 0; r < ins.in_h; ++r) {
      const int64_t at = r * step;
      nonlin_rows<T, VL, NR, NA>(g, row, tx + static_cast<int64_t>(r) * ins.full_w * 2,
                                 tz + static_cast<int64_t>(r) * ins.full_w * 2 * VL, src + at, dst + at,
                                 src_ntk ? src_ntk + at : nullptr, dst_ntk ? dst_ntk + at : nullptr, skip);
    }
    return;
  }
  nonlin_rows<T, VL, NR, NA>(g, ins, tx, tz, src, dst, src_ntk, dst_ntk, skip);
}

template <typename T, int VL, int NR, int NA>
void nonlin_rows(const Args<T>& g, const Instr& ins, const T* tx, const T* tz, const T* src, T* dst,
                 const T* src_ntk, T* dst_ntk, bool skip) {
  const int area = ins.in_h * ins.in_w;
  const T k1 = g.params[ins.param], k2 = g.params[ins.param + 1];
  const T k3 = g.params[ins.param + 2], k4 = g.params[ins.param + 3];
  if (dst_ntk == nullptr) {
    if (k2 == T(0)) {  // a ReLU
      if (skip) {
        nonlin_nngp<T, VL, NR, false, true>(tx, tz, src, dst, area, k1, k2, g.coefs);
      } else {
        nonlin_nngp<T, VL, NR, false>(tx, tz, src, dst, area, k1, k2, g.coefs);
      }
    } else {
      nonlin_nngp<T, VL, NR, true>(tx, tz, src, dst, area, k1, k2, g.coefs);
    }
    return;
  }
  if (k2 == T(0)) {
    if (skip) {
      nonlin_ntk<T, VL, NR, NA, false, true>(tx, tz, src, dst, src_ntk, dst_ntk, area, k1, k2, k3, k4, g.coefs,
                                             g.dcoefs);
    } else {
      nonlin_ntk<T, VL, NR, NA, false>(tx, tz, src, dst, src_ntk, dst_ntk, area, k1, k2, k3, k4, g.coefs, g.dcoefs);
    }
  } else {
    nonlin_ntk<T, VL, NR, NA, true>(tx, tz, src, dst, src_ntk, dst_ntk, area, k1, k2, k3, k4, g.coefs, g.dcoefs);
  }
}

// ---------------------------------------------------------------------------------------------
// The self pass: the same program on single images, VL of them in the lanes (the second set's packing), so
// that a map holds each image's variances. A nonlinearity records their standard deviations s and inverses
// (as the traces' packing does) and maps v to E[phi(u)^2] = k1 v / 2 + k2 v, the pair formula at correlation 1;
// with the NTK, its factor is k1 / 2 + k3 + k4 where s > 0 (D = h = 1/2), else k4.

template <typename T, int VL>
void self_nonlin(const Args<T>& g, const Instr& ins, int jb, const T* src, T* dst,
                 const T* src_ntk, T* dst_ntk) {
  using L = Lanes<T, VL>;
  using H = typename L::H;
  using I = typename L::I;
  constexpr int P = L::kParts, K = L::kPer;
  const int area = ins.in_h * ins.in_w;
  const int64_t first = g.slot_offset[ins.slot];
  const T k1 = g.params[ins.param], k2 = g.params[ins.param + 1];
  const T k3 = g.params[ins.param + 2], k4 = g.params[ins.param + 3];
  const T factor = T(0.5) * k1 + k2, slope = T(0.5) * k1 + k3 + k4;
  const int lanes = std::min(VL, g.n2 - jb * VL);  // images in this group (the rest are padding)
  T* right = g.self_right ? g.self_right + (static_cast<int64_t>(jb) * g.n_trace + first) * 2 * VL : nullptr;
  T* left = g.self_left ? g.self_left + (static_cast<int64_t>(jb) * VL * g.n_trace + first) * 2 : nullptr;
  const H zero = H{}, one = zero + T(1);
  // padding lanes' traces are zero (black images, as the traces' packing): all bits set in the real images' lanes
  I keep[P];
  for (int k = 0; k < P; ++k) {
    for (int l = 0; l < K; ++l) keep[k][l] = k * K + l < lanes ? -1 : 0;
  }
  for (int p = 0; p < area; ++p) {
    const T* c = src + static_cast<int64_t>(p) * VL;
    T* d = dst + static_cast<int64_t>(p) * VL;
    H sd[P], inv[P];
#pragma GCC unroll 8
    for (int k = 0; k < P; ++k) {
      H cv;
      std::memcpy(&cv, c + k * K, sizeof(H));
      sd[k] = L::sqrt(cv);
      inv[k] = sd[k] > zero ? one / sd[k] : zero;
      const H out = cv * factor;
      std::memcpy(d + k * K, &out, sizeof(H));
      if (dst_ntk != nullptr) {
        H tv;
        std::memcpy(&tv, src_ntk + static_cast<int64_t>(p) * VL + k * K, sizeof(H));
        const H dt = tv * (sd[k] > zero ? zero + slope : zero + k4);
        std::memcpy(dst_ntk + static_cast<int64_t>(p) * VL + k * K, &dt, sizeof(H));
      }
      if (right != nullptr) {
        const H s_out = reinterpret_cast<H>(reinterpret_cast<I>(sd[k]) & keep[k]);
        const H i_out = reinterpret_cast<H>(reinterpret_cast<I>(inv[k]) & keep[k]);
        std::memcpy(right + static_cast<int64_t>(p) * 2 * VL + k * K, &s_out, sizeof(H));
        std::memcpy(right + static_cast<int64_t>(p) * 2 * VL + VL + k * K, &i_out, sizeof(H));
      }
    }
    if (left != nullptr) {
      T sv[VL], iv[VL];
      std::memcpy(sv, sd, sizeof(sv));
      std::memcpy(iv, inv, sizeof(iv));
      for (int v = 0; v < lanes; ++v) {
        T* __restrict o = left + (static_cast<int64_t>(v) * g.n_trace + p) * 2;
        o[0] = sv[v];
        o[1] = iv[v];
      }
    }
  }
}

// The self pass at a spatial offset d != 0: each lane's image with itself, its standard deviations at p and at
// p + d both per lane (t1, t2: the second set's trace layout, which the same-location map's nonlinearity of this
// layer has just written), the pair formulas of nonlin_nngp and nonlin_ntk otherwise.
template <typename T, int VL, int NR, int NA, bool kLinearPart>
void self_offset_rows(const T* __restrict t1, const T* __restrict t2, const T* src, T* dst, const T* src_ntk,
                      T* dst_ntk, int area, T k1, T k2, T k3, T k4, const T* __restrict coefs,
                      const T* __restrict dcoefs) {
  using L = Lanes<T, VL>;
  using H = typename L::H;
  constexpr int P = L::kParts, K = L::kPer;
  H cf[NR], df[NA];
  for (int k = 0; k < NR; ++k) cf[k] = H{} + coefs[k] * k1;
  for (int k = 0; k < NA; ++k) df[k] = H{} + dcoefs[k] * k1;
  const H zero = H{}, one = zero + T(1), quarter_k1 = zero + T(0.25) * k1, half_k1 = zero + T(0.5) * k1;
  const H half_k3 = zero + T(0.5) * k3, k4v = zero + k4;
  for (int p = 0; p < area; ++p) {
    const int64_t at = static_cast<int64_t>(p) * VL, tr = static_cast<int64_t>(p) * 2 * VL;
    for (int k = 0; k < P; ++k) {
      H cv, s1, i1, sv, iv, a, root;
      std::memcpy(&cv, src + at + k * K, sizeof(H));
      std::memcpy(&s1, t1 + tr + k * K, sizeof(H));
      std::memcpy(&i1, t1 + tr + VL + k * K, sizeof(H));
      std::memcpy(&sv, t2 + tr + k * K, sizeof(H));
      std::memcpy(&iv, t2 + tr + VL + k * K, sizeof(H));
      const H out = relu_vector<T, VL, NR, kLinearPart, H>(cv, sv, iv, s1, i1, cf, quarter_k1, k2, a, root);
      std::memcpy(dst + at + k * K, &out, sizeof(H));
      if (dst_ntk == nullptr) continue;
      H tv;
      std::memcpy(&tv, src_ntk + at + k * K, sizeof(H));
      H q = df[NA - 1];
      for (int m = NA - 2; m >= 0; --m) q = q * a + df[m];
      q *= a < one ? root : zero;
      const H left = i1 > zero ? one : zero;
      const H deriv = (cv > zero ? half_k1 - q : q) * left;
      const H right = iv > zero ? deriv + half_k3 : zero;
      const H ntk = tv * (right + left * half_k3 + k4v);
      std::memcpy(dst_ntk + at + k * K, &ntk, sizeof(H));
    }
  }
}

template <typename T, int VL, int NR, int NA>
void self_offset_nonlin(const Args<T>& g, const Instr& ins, int jb, const T* src, T* dst, const T* src_ntk,
                        T* dst_ntk) {
  const int64_t first = g.slot_offset[ins.slot];
  const T* base = g.self_right + (static_cast<int64_t>(jb) * g.n_trace + first) * 2 * VL;
  const T k1 = g.params[ins.param], k2 = g.params[ins.param + 1];
  const T k3 = g.params[ins.param + 2], k4 = g.params[ins.param + 3];
  const int64_t step = static_cast<int64_t>(ins.in_w) * VL;
  for (int r = 0; r < ins.in_h; ++r) {
    const T* t1 = base + (ins.xoff + static_cast<int64_t>(r) * ins.full_w) * 2 * VL;
    const T* t2 = base + (ins.zoff + static_cast<int64_t>(r) * ins.full_w) * 2 * VL;
    const int64_t at = r * step;
    const T* sn = src_ntk ? src_ntk + at : nullptr;
    T* dn = dst_ntk ? dst_ntk + at : nullptr;
    if (k2 == T(0)) {
      self_offset_rows<T, VL, NR, NA, false>(t1, t2, src + at, dst + at, sn, dn, ins.in_w, k1, k2, k3, k4, g.coefs,
                                             g.dcoefs);
    } else {
      self_offset_rows<T, VL, NR, NA, true>(t1, t2, src + at, dst + at, sn, dn, ins.in_w, k1, k2, k3, k4, g.coefs,
                                            g.dcoefs);
    }
  }
}

// A window sum with stride and dilation 1 and the nonlinearity that alone reads it (kFuseNonlin), for the pairs
// (i, group jb), row by row: each input row is summed along W once into a ring of kh rows, each output row
// summed along H from the ring into a row of its own and put through the nonlinearity into dst. The ring and
// the row stay in L1, where an offset's whole map (a 28x28 map is 50 KB of float32) would not, and the window
// sum's map is neither written nor read back. The same operations in the same order as conv then nonlin.
// the most window rows of a fused window sum (lowering.py's _FUSE_MAX_TAPS): below kRunningMin, so that the separate
// pass sums the same taps in the same order
constexpr int kMaxFusedTaps = 3;
static_assert(kMaxFusedTaps < kRunningMin, "fused window sums add their taps as the separate pass does");

template <typename T, int VL, int NR, int NA>
void conv_nonlin(const Args<T>& g, const Instr& cv, const Instr& nl, int i, int jb, const T* src,
                 const T* src_ntk, T* dst, T* dst_ntk, T* tmp) {
  using L = Lanes<T, VL>;
  using H = typename L::H;
  constexpr int K = L::kPer;
  const int kh = cv.kh, in_h = cv.in_h, out_h = cv.out_h, pt = cv.pt;
  const int64_t in_row = static_cast<int64_t>(cv.in_w) * VL, row = static_cast<int64_t>(cv.out_w) * VL;
  const int64_t vectors = row / K;
  const bool ntk = dst_ntk != nullptr, ntk_copy = ntk && (cv.flags & kNtkInZero);
  const T scale = g.params[cv.param], bias = g.params[cv.param + 1];
  // tmp: the NNGP's ring [kh][row], the NTK's ring, the NNGP's output row, the NTK's output row
  T* ring = tmp;
  T* ring_ntk = tmp + kh * row;
  T* line = tmp + 2 * kh * row;
  T* line_ntk = line + row;
  Instr one = cv;  // one input row's sum along W, as conv's window_sum sums each row
  one.in_h = 1;
  Instr nrow = nl;  // the nonlinearity on one row, its traces from the row's first position on
  nrow.in_h = 1;
  nrow.xoff = nrow.zoff = 0;
  nrow.full_w = nrow.in_w;
  const int64_t first = g.slot_offset[nl.slot];
  const T* tx = g.tx + (static_cast<int64_t>(i) * g.n_trace + first + nl.xoff) * 2;
  const T* tz = g.tz + (static_cast<int64_t>(jb) * g.n_trace + first + nl.zoff) * 2 * VL;
  const bool skip = zero_deviations(g, i, jb);
  int next = 0, next_slot = 0;  // the next input row to sum along W, and its slot in the ring (no divisions)
  for (int oh = 0; oh < out_h; ++oh) {
    const int base = oh - pt;
    int lo, hi;
    valid_taps(base, 1, kh, in_h, lo, hi);
    for (; next < base + hi; ++next) {
      row_sums<T, VL>(one, src + next * in_row, ring + next_slot * row);
      if (ntk && !ntk_copy) row_sums<T, VL>(one, src_ntk + next * in_row, ring_ntk + next_slot * row);
      next_slot = next_slot + 1 == kh ? 0 : next_slot + 1;
    }
    const T* taps[kMaxFusedTaps];
    const T* taps_ntk[kMaxFusedTaps];
    const int n_taps = hi > lo ? hi - lo : 0;
    for (int t = 0; t < n_taps; ++t) {
      int slot = next_slot - (next - (base + lo + t));  // the ring holds rows next - kh .. next - 1
      slot += slot < 0 ? kh : 0;
      taps[t] = ring + slot * row;
      taps_ntk[t] = ring_ntk + slot * row;
    }
    // the sum along H of n taps, as window_sum's strips add them: (t0 + t1) + t2 ...
    auto sum_taps = [&](const T* const* from, T* to, auto taps_c, const T* addend) {
      constexpr int N = decltype(taps_c)::value;
      const int n = N < 0 ? n_taps : N;
#pragma GCC unroll 4
      for (int64_t e = 0; e < vectors; ++e) {
        H acc;
        if constexpr (N > 0) {
          std::memcpy(&acc, from[0] + e * K, sizeof(H));
#pragma GCC unroll 16
          for (int t = 1; t < N; ++t) {
            H h;
            std::memcpy(&h, from[t] + e * K, sizeof(H));
            acc += h;
          }
        } else {
          acc = H{};
          for (int t = 0; t < n; ++t) {
            H h;
            std::memcpy(&h, from[t] + e * K, sizeof(H));
            acc += h;
          }
        }
        H out;
        if (addend == nullptr) {
          out = acc * scale + bias;
        } else {
          std::memcpy(&out, addend + e * K, sizeof(H));
          out += acc * scale;
        }
        std::memcpy(to + e * K, &out, sizeof(H));
      }
    };
    auto both = [&](auto taps_c) {
      sum_taps(taps, line, taps_c, nullptr);
      if (ntk && !ntk_copy) sum_taps(taps_ntk, line_ntk, taps_c, line);
    };
    if (n_taps == 3) {
      both(std::integral_constant<int, 3>{});
    } else if (n_taps == 2) {
      both(std::integral_constant<int, 2>{});
    } else {
      both(std::integral_constant<int, -1>{});
    }
    nonlin_rows<T, VL, NR, NA>(g, nrow, tx + static_cast<int64_t>(oh) * nl.full_w * 2,
                               tz + static_cast<int64_t>(oh) * nl.full_w * 2 * VL, line, dst + oh * row,
                               // the input's NTK is zero, so the window sum's NTK is its NNGP: the same row
                               ntk ? (ntk_copy ? line : line_ntk) : nullptr, ntk ? dst_ntk + oh * row : nullptr,
                               skip);
  }
}

// One instruction for the pairs (i, group jb), or with kSelf for the images of group jb on their own.
template <typename T, int VL, int NR, int NA, bool kSelf = false>
void run_block(const Args<T>& g, int i, int jb, T* regs, T* tmp) {
  // a register: the NNGP's map, then (with the NTK) the NTK's map
  const int64_t mult = g.ntk ? 2 : 1;
  auto reg = [&](int r) { return regs + g.reg_off[r] * mult * VL; };
  auto tangent = [&](int r) {
    return g.ntk ? regs + (g.reg_off[r] * 2 + (g.reg_off[r + 1] - g.reg_off[r])) * VL : nullptr;
  };
  for (int k = 0; k < g.n_instr; ++k) {
    const Instr& ins = g.prog[k];
    const int64_t area = static_cast<int64_t>(ins.out_h) * ins.out_w * VL;
    switch (ins.op) {
      case OP_INPUT:
        input_map<T, VL, kSelf>(g, ins, i, jb, reg(ins.dst));
        if (g.ntk) std::memset(tangent(ins.dst), 0, area * sizeof(T));  // the input has no parameters
        break;
      case OP_ZERO:
        std::memset(reg(ins.dst), 0, area * sizeof(T));
        if (g.ntk) std::memset(tangent(ins.dst), 0, area * sizeof(T));
        break;
      case OP_POOL: {  // both maps pooled alike: a pool has no parameters
        const T scale = g.params[ins.param];
        pool_sum<T, VL, kSelf>(ins, reg(ins.a), reg(ins.dst), tmp, scale);
        if (g.ntk) pool_sum<T, VL, kSelf>(ins, tangent(ins.a), tangent(ins.dst), tmp, scale);
        break;
      }
      case OP_CONV: {
        if constexpr (!kSelf) {
          if (ins.flags & kFuseNonlin) {
            const Instr& nl = g.prog[++k];
            conv_nonlin<T, VL, NR, NA>(g, ins, nl, i, jb, reg(ins.a), g.ntk ? tangent(ins.a) : nullptr,
                                       reg(nl.dst), tangent(nl.dst), tmp);
            break;
          }
        }
        const T scale = g.params[ins.param];
        // a sum of branches in the store (b >= 0) comes only in programs without the NTK (native.py)
        conv<T, VL, kSelf>(ins, reg(ins.a), reg(ins.dst), tmp, scale, g.params[ins.param + 1], nullptr,
                    ins.b >= 0 ? reg(ins.b) : nullptr);
        if (!g.ntk) break;
        if (ins.flags & kNtkInZero) {
          std::memcpy(tangent(ins.dst), reg(ins.dst), area * sizeof(T));
        } else {
          conv<T, VL, kSelf>(ins, tangent(ins.a), tangent(ins.dst), tmp, scale, T(0), reg(ins.dst));
        }
        break;
      }
      case OP_NONLIN:
        if constexpr (kSelf) {
          if (ins.xoff == ins.zoff) {  // offset (0, 0): records the standard deviations the other offsets read
            self_nonlin<T, VL>(g, ins, jb, reg(ins.a), reg(ins.dst), tangent(ins.a), tangent(ins.dst));
          } else {
            self_offset_nonlin<T, VL, NR, NA>(g, ins, jb, reg(ins.a), reg(ins.dst), tangent(ins.a), tangent(ins.dst));
          }
        } else {
          nonlin<T, VL, NR, NA>(g, ins, i, jb, reg(ins.a), reg(ins.dst), tangent(ins.a), tangent(ins.dst));
        }
        break;
      case OP_ADD: {
        for (int part = 0; part < (g.ntk ? 2 : 1); ++part) {
          const T* __restrict a = part ? tangent(ins.a) : reg(ins.a);
          const T* __restrict b = part ? tangent(ins.b) : reg(ins.b);
          T* __restrict d = part ? tangent(ins.dst) : reg(ins.dst);
#pragma omp simd
          for (int64_t e = 0; e < area; ++e) d[e] = a[e] + b[e];
        }
        break;
      }
      case OP_OUTPUT: {
        if (g.out == nullptr) break;  // the VJP's forward keeps its maps, not the value
        if constexpr (kSelf) {  // out: [n2] (then the NTK's [n2]), the images' own values
          const int lanes = std::min(VL, g.n2 - jb * VL);
          T* o = g.out + static_cast<int64_t>(jb) * VL;
          for (int v = 0; v < lanes; ++v) o[v] = reg(ins.a)[v];
          if (g.ntk) {
            for (int v = 0; v < lanes; ++v) o[g.n2 + v] = tangent(ins.a)[v];
          }
          break;
        }
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

// whether a window sum also adds a branch (the NNGP's forward only)
template <typename T>
bool has_fused_sums(const Args<T>& g) {
  for (int k = 0; k < g.n_instr; ++k) {
    if (g.prog[k].op == OP_CONV && g.prog[k].b >= 0) return true;
  }
  return false;
}

// Every block on n_threads threads, each with its own registers: the pairs (i, group jb) of the first set with
// the second, or with kSelf the second set's groups of images on their own.
template <typename T, int VL, int NR, int NA, bool kSelf = false>
int run(const Args<T>& given, int n_threads) {
  if (!kSelf && given.n2 % VL != 0) return 2;
  if (given.n_coefs != NR || given.n_dcoefs != NA) return 4;
  if (given.ntk && has_fused_sums(given)) return 6;
  Args<T> g = given;
  // which images have zero deviations (black regions without biases before them): only their pairs' ReLUs look
  // for them, the others keep the loop without that test; a window sum with a bias has no zero deviations after it,
  // so a program whose window sums all have biases needs no look at all
  std::vector<uint8_t> zero_x, zero_z;
  bool unbiased = false;
  for (int k = 0; !kSelf && k < g.n_instr; ++k) {
    unbiased |= g.prog[k].op == OP_CONV && g.params[g.prog[k].param + 1] == T(0);
  }
  if (unbiased) {
    const int n_groups = g.n2 / VL;
    zero_x.assign(g.n1, 0);
    zero_z.assign(n_groups, 0);
    // images, then groups, shared among the threads; each looks in runs of positions, stopping at the first zero
    auto look = [&](int t) {
      constexpr int kRun = 64;
      for (int u = t; u < g.n1 + n_groups; u += n_threads) {
        const bool left = u < g.n1;
        const T* tr = left ? g.tx + static_cast<int64_t>(u) * g.n_trace * 2
                           : g.tz + static_cast<int64_t>(u - g.n1) * g.n_trace * 2 * VL;
        bool found = false;
        for (int p0 = 0; p0 < g.n_trace && !found; p0 += kRun) {
          const int p1 = std::min(g.n_trace, p0 + kRun);
          int hits = 0;
          for (int p = p0; p < p1; ++p) {
            hits += left ? tr[2 * p] == T(0) : lanes_zero<T, VL>(tr + static_cast<int64_t>(p) * 2 * VL);
          }
          found = hits > 0;
        }
        (left ? zero_x[u] : zero_z[u - g.n1]) = found;
      }
    };
    n_threads = std::max(1, n_threads);
    parallel(n_threads, look);
    g.zero_x = zero_x.data();
    g.zero_z = zero_z.data();
  }
  const int64_t n_blocks = kSelf ? (g.n2 + VL - 1) / VL : static_cast<int64_t>(g.n1) * (g.n2 / VL);
  std::atomic<int64_t> next{0};
  std::atomic<int> failed{0};
  auto worker = [&](int) {
    const size_t maps = static_cast<size_t>(g.reg_off[g.n_regs]) * (g.ntk ? 2 : 1);
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
      if constexpr (kSelf) {
        run_block<T, VL, NR, NA, true>(g, 0, static_cast<int>(blk), mem, tmp);
      } else {
        const int i = static_cast<int>(blk % g.n1), jb = static_cast<int>(blk / g.n1);
        if (wanted<T, VL>(g, i, jb)) run_block<T, VL, NR, NA>(g, i, jb, mem, tmp);
      }
    }
    std::free(mem);
  };
  parallel(static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(n_threads, n_blocks))), worker);
  return failed.load() ? 3 : 0;
}


// ---------------------------------------------------------------------------------------------
// Reverse mode: the gradient of sum_ij G_ij K_ij with respect to the parameter vector (each window sum's
// scale and bias) and to the traces' standard deviations, one block at a time. The block's forward keeps
// every map (the program is lowered without register reuse); the adjoint maps are then swept backwards, in
// the few maps adjoint_slots shares among them, so that a block's working set stays near the forward's. A
// window sum's adjoint is one transposed window sum whose store also accumulates its scale's gradient, a
// ReLU's one pass over its vectors. Parameters are shared by all pairs, traces by all pairs of an image: each
// thread accumulates them in its own buffers, summed at the end.

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

// The sum of a map's SIMD vectors into g (one block's lanes; parameters' gradients are summed over all lanes in
// the end, so which lane holds a partial sum does not matter), four independent chains.
template <typename T, int VL>
inline void add_sum(const T* __restrict map, int64_t vectors, T* __restrict g) {
  using L = Lanes<T, VL>;
  using H = typename L::H;
  constexpr int K = L::kPer;
  H acc[4] = {H{}, H{}, H{}, H{}};
  int64_t e = 0;
  for (; e + 4 <= vectors; e += 4) {
#pragma GCC unroll 4
    for (int u = 0; u < 4; ++u) {
      H h;
      std::memcpy(&h, map + (e + u) * K, sizeof(H));
      acc[u] += h;
    }
  }
  for (; e < vectors; ++e) {
    H h;
    std::memcpy(&h, map + e * K, sizeof(H));
    acc[0] += h;
  }
  L::add_to(g, (acc[0] + acc[1]) + (acc[2] + acc[3]));
}

// The adjoint of a window sum out = scale * S src + bias, given adj = d/d out:
//   d/d bias = sum(adj), d/d scale = <src, S^T adj>, d/d src (=|+=) scale * S^T adj,
// where S^T adj at a position sums adj over the outputs whose window holds it. With stride and dilation 1, S^T
// is itself a window sum (the same size, the padding mirrored): window_sum runs it, and its store accumulates
// d/d scale and writes the source's adjoint in the same pass. Otherwise the taps are scattered into `res`.
// g_scale and g_bias are per-lane partial sums.
template <typename T, int VL>
void conv_adjoint(const Instr& ins, const T* __restrict adj, const T* __restrict src, T* __restrict adj_in,
                  bool first, T scale, T* __restrict tmp, T* __restrict res, T* __restrict g_scale,
                  T* __restrict g_bias) {
  using L = Lanes<T, VL>;
  using H = typename L::H;
  constexpr int K = L::kPer;
  const int in_h = ins.in_h, in_w = ins.in_w, out_h = ins.out_h, out_w = ins.out_w;
  add_sum<T, VL>(adj, static_cast<int64_t>(out_h) * out_w * VL / K, g_bias);
  const int64_t in_vectors = static_cast<int64_t>(in_h) * in_w * VL / K;
  if (ins.sh == 1 && ins.sw == 1 && ins.dh == 1 && ins.dw == 1) {
    Instr tr = ins;
    tr.in_h = out_h;
    tr.in_w = out_w;
    tr.out_h = in_h;
    tr.out_w = in_w;
    tr.pt = ins.kh - 1 - ins.pt;
    tr.pl = ins.kw - 1 - ins.pl;
    H gs[kStrip];
    for (int k = 0; k < kStrip; ++k) gs[k] = H{};
    auto store = [&gs, src, adj_in, first, scale](int64_t at, int g, H sum) {
      H x, out = sum * scale;
      std::memcpy(&x, src + at, sizeof(H));
      gs[g] += sum * x;
      if (!first) {
        H prev;
        std::memcpy(&prev, adj_in + at, sizeof(H));
        out += prev;
      }
      std::memcpy(adj_in + at, &out, sizeof(H));
    };
    window_sum<T, VL>(tr, adj, tmp, store);
    H total = H{};
    for (int k = 0; k < kStrip; ++k) total += gs[k];
    L::add_to(g_scale, total);
    return;
  }
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
      const T* from = tmp + (static_cast<int64_t>(h) * out_w + ow) * VL;
      for (int b = lo; b < hi; ++b) {
        T* d = res + (static_cast<int64_t>(h) * in_w + base + b * ins.dw) * VL;
        typename L::V acc = L::zero();
        L::add(acc, d);
        L::add(acc, from);
        L::store(d, acc);
      }
    }
  }
  H gs = H{};
  for (int64_t e = 0; e < in_vectors; ++e) {
    H x, r;
    std::memcpy(&x, src + e * K, sizeof(H));
    std::memcpy(&r, res + e * K, sizeof(H));
    gs += x * r;
  }
  L::add_to(g_scale, gs);
  accumulate(adj_in, res, in_vectors * K, scale, first);
}

// The adjoint of a window sum that reads the images' input map, whose own adjoint nothing reads (the images'
// gradients stay with autograd): only d/d scale = sum adj * window_sum(src), by the forward's window sum (its
// products summed in the store, no map written), and d/d bias. The transposed sum above would spread adj over the
// input's larger map, tap by tap for a strided window, for an adjoint thrown away.
template <typename T, int VL>
void conv_adjoint_params(const Instr& ins, const T* __restrict adj, const T* __restrict src, T* __restrict tmp,
                         T* __restrict g_scale, T* __restrict g_bias) {
  using L = Lanes<T, VL>;
  using H = typename L::H;
  add_sum<T, VL>(adj, static_cast<int64_t>(ins.out_h) * ins.out_w * VL / L::kPer, g_bias);
  H gs[kStrip];
  for (int k = 0; k < kStrip; ++k) gs[k] = H{};
  auto store = [&gs, adj](int64_t at, int g, H sum) {
    H a;
    std::memcpy(&a, adj + at, sizeof(H));
    gs[g] += sum * a;
  };
  window_sum<T, VL>(ins, src, tmp, store);
  H total = H{};
  for (int k = 0; k < kStrip; ++k) total += gs[k];
  L::add_to(g_scale, total);
}

// Adjoint of a (leaky) ReLU: out = k1 J(c, s1, s2) + k2 c, so
//   d/dc = k1 D + k2 (D = (pi - arccos rho) / (2 pi), not masked: ops' autograd takes 1/4 at a zero variance),
//   d/ds1 = k1 s2 sqrt(1 - rho^2) / (2 pi), d/ds2 = k1 s1 sqrt(1 - rho^2) / (2 pi),
// with D = c > 0 ? 1/2 - q : q, q = sqrt(1 - a) A(a) / (2 pi) as in nonlin_ntk, a = min(|rho|, 1), and
// sqrt(1 - rho^2) = sqrt(1 - a) sqrt(1 + a). One pass over each position's SIMD vectors.
template <typename T, int VL, int NR, int NA>
void nonlin_adjoint_rows(const Args<T>& g, const Instr& ins, int area, const T* tx, const T* tz, T* gx, T* gz,
                         const T* __restrict c_map, const T* __restrict adj_out, T* __restrict adj_in, bool first);

// A spatial offset's rectangle row by row, as nonlin: each row's traces and their gradients full_w apart.
template <typename T, int VL, int NR, int NA>
void nonlin_adjoint(const Args<T>& g, const Instr& ins, int i, int jb, const T* __restrict c_map,
                    const T* __restrict adj_out, T* __restrict adj_in, bool first, const Grads<T>& gr) {
  const int64_t off = g.slot_offset[ins.slot];
  const T* tx = g.tx + (static_cast<int64_t>(i) * g.n_trace + off + ins.xoff) * 2;
  const T* tz = g.tz + (static_cast<int64_t>(jb) * g.n_trace + off + ins.zoff) * 2 * VL;
  T* gx = gr.tx + static_cast<int64_t>(i) * g.n_trace + off + ins.xoff;
  T* gz = gr.tz + (static_cast<int64_t>(jb) * g.n_trace + off + ins.zoff) * VL;
  if (ins.in_w == ins.full_w) {
    nonlin_adjoint_rows<T, VL, NR, NA>(g, ins, ins.in_h * ins.in_w, tx, tz, gx, gz, c_map, adj_out, adj_in, first);
    return;
  }
  const int64_t step = static_cast<int64_t>(ins.in_w) * VL, full = ins.full_w;
  for (int r = 0; r < ins.in_h; ++r) {
    nonlin_adjoint_rows<T, VL, NR, NA>(g, ins, ins.in_w, tx + r * full * 2, tz + r * full * 2 * VL, gx + r * full,
                                       gz + r * full * VL, c_map + r * step, adj_out + r * step, adj_in + r * step,
                                       first);
  }
}

template <typename T, int VL, int NR, int NA>
void nonlin_adjoint_rows(const Args<T>& g, const Instr& ins, int area, const T* tx, const T* tz, T* gx, T* gz,
                         const T* __restrict c_map, const T* __restrict adj_out, T* __restrict adj_in, bool first) {
  using L = Lanes<T, VL>;
  using H = typename L::H;
  constexpr int P = L::kParts, K = L::kPer;
  const T k1 = g.params[ins.param], k2 = g.params[ins.param + 1];
  H df[NA];
  for (int k = 0; k < NA; ++k) df[k] = H{} + g.dcoefs[k];
  const H zero = H{}, one = zero + T(1), half = zero + T(0.5);
  const typename L::I magnitude = typename L::I{} + L::kMagnitude;
  const T sine_scale = k1 * T(0.15915494309189533577);  // k1 / (2 pi)
  for (int p = 0; p < area; ++p) {
    const T s1 = tx[2 * p], i1 = tx[2 * p + 1];
    const T* __restrict s2 = tz + static_cast<int64_t>(p) * 2 * VL;
    const T* __restrict i2 = s2 + VL;
    const T* __restrict c = c_map + static_cast<int64_t>(p) * VL;
    const T* __restrict ad = adj_out + static_cast<int64_t>(p) * VL;
    T* __restrict ai = adj_in + static_cast<int64_t>(p) * VL;
    T* __restrict gzp = gz + static_cast<int64_t>(p) * VL;
    H sx = zero;
#pragma GCC unroll 4
    for (int k = 0; k < P; ++k) {
      H cv, sv, iv, av;
      std::memcpy(&cv, c + k * K, sizeof(H));
      std::memcpy(&sv, s2 + k * K, sizeof(H));
      std::memcpy(&iv, i2 + k * K, sizeof(H));
      std::memcpy(&av, ad + k * K, sizeof(H));
      H a = reinterpret_cast<H>(reinterpret_cast<typename L::I>(cv) & magnitude) * iv * i1;
      a = a < one ? a : one;
      H q = polynomial<H, NA>(a, df);
      const H root = L::sqrt(one - a);
      q *= root;
      const H sine = root * L::sqrt(one + a) * (av * sine_scale);  // k1 sqrt(1 - rho^2) / (2 pi) adj
      const H deriv = cv > zero ? half - q : q;
      H out = av * (deriv * k1 + k2);
      if (!first) {
        H prev;
        std::memcpy(&prev, ai + k * K, sizeof(H));
        out += prev;
      }
      std::memcpy(ai + k * K, &out, sizeof(H));
      sx += sine * sv;
      L::add_to(gzp + k * K, sine * s1);
    }
    T lanes[K];
    std::memcpy(lanes, &sx, sizeof(H));
    T sum = T(0);
    for (int l = 0; l < K; ++l) sum += lanes[l];
    gx[p] += sum;
  }
}

// Adjoint maps share memory: the adjoint of a register is live from its first write (at its last reader, the
// sweep going backwards) to its definition, where it is read. slot[r] gets a map for each register the sweep
// reaches (-1 for the others), first-fit in that order; returns the number of maps. The program is lowered
// without register reuse, so every register is defined once.
template <typename T>
int adjoint_slots(const Args<T>& g, std::vector<int>& slot) {
  slot.assign(std::max(1, g.n_regs), -1);
  std::vector<int> free_slots;
  int n_slots = 0;
  auto take = [&](int r) {
    if (slot[r] >= 0) return;
    if (free_slots.empty()) {
      slot[r] = n_slots++;
    } else {
      slot[r] = free_slots.back();
      free_slots.pop_back();
    }
  };
  for (int k = g.n_instr - 1; k >= 0; --k) {
    const Instr& ins = g.prog[k];
    if (ins.op == OP_OUTPUT) {
      take(ins.a);
      continue;
    }
    if (ins.op == OP_INPUT || slot[ins.dst] < 0) continue;  // as vjp_block
    if (ins.op == OP_ZERO) {  // a pool's output: its adjoint was read by every OP_POOL into it
      free_slots.push_back(slot[ins.dst]);
      continue;
    }
    take(ins.a);
    if (ins.op == OP_ADD) take(ins.b);
    // read by this instruction, never written again (a pool's output is, until its OP_ZERO)
    if (ins.op != OP_POOL) free_slots.push_back(slot[ins.dst]);
  }
  return std::max(1, n_slots);
}

template <typename T, int VL, int NR, int NA>
void vjp_block(const Args<T>& g, const T* gout, int i, int jb, T* regs, T* adjs, const int* slot, T* tmp, T* res,
               bool* touched, const Grads<T>& gr, const uint8_t* input) {
  run_block<T, VL, NR, NA>(g, i, jb, regs, tmp);
  const int64_t map = static_cast<int64_t>(g.reg_area) * VL;
  auto reg = [&](int r) { return regs + g.reg_off[r] * VL; };
  auto adj = [&](int r) { return adjs + slot[r] * map; };
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
    // images' gradients stay with autograd; a pool's output map is zero before its first OP_POOL
    if (ins.op == OP_INPUT || ins.op == OP_ZERO || !touched[ins.dst]) continue;
    const T* ad = adj(ins.dst);
    const int64_t in_area = static_cast<int64_t>(ins.in_h) * ins.in_w * VL;
    switch (ins.op) {
      case OP_CONV: {
        T* gs = gr.params + static_cast<int64_t>(ins.param) * VL;
        if (input[ins.a]) {  // (its adjoint untouched: nothing reads it)
          conv_adjoint_params<T, VL>(ins, ad, reg(ins.a), tmp, gs, gs + VL);
          break;
        }
        conv_adjoint<T, VL>(ins, ad, reg(ins.a), adj(ins.a), !touched[ins.a], g.params[ins.param], tmp, res, gs,
                            gs + VL);
        touched[ins.a] = true;
        break;
      }
      case OP_POOL: {  // dst += scale S src: src's adjoint gets scale S^T adj (a constant scale: its gradient
                       // and the bias's go to the pool's own two constants, which no hyperparameter reads)
        T* gs = gr.params + static_cast<int64_t>(ins.param) * VL;
        conv_adjoint<T, VL>(ins, ad, reg(ins.a), adj(ins.a), !touched[ins.a], g.params[ins.param], tmp, res, gs,
                            gs + VL);
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
  if (has_fused_sums(g)) return 6;
  const int64_t n_blocks = static_cast<int64_t>(g.n1) * (g.n2 / VL);
  const int64_t groups = g.n2 / VL;
  const size_t tx_size = static_cast<size_t>(g.n1) * g.n_trace;
  const size_t tz_size = static_cast<size_t>(groups) * g.n_trace * VL;
  const size_t p_size = static_cast<size_t>(n_params) * VL;
  n_threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(n_threads, n_blocks)));
  std::vector<T*> buffers(n_threads, nullptr);
  std::vector<int> slot;
  const size_t adj_maps = static_cast<size_t>(adjoint_slots(g, slot)) * g.reg_area * VL;
  std::vector<uint8_t> input(std::max(1, g.n_regs), 0);  // the registers the images' input maps are made in
  for (int k = 0; k < g.n_instr; ++k) {
    if (g.prog[k].op == OP_INPUT) input[g.prog[k].dst] = 1;
  }
  std::atomic<int64_t> next{0};
  std::atomic<int> failed{0};
  auto worker = [&](int t) {
    const size_t maps = static_cast<size_t>(g.reg_off[g.n_regs]) * VL;
    const size_t scratch = static_cast<size_t>(g.tmp_area) * VL + static_cast<size_t>(g.reg_area) * VL;
    const size_t total = maps + adj_maps + scratch + p_size + tx_size + tz_size;
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
    T* tmp = adjs + adj_maps;
    T* res = tmp + static_cast<size_t>(g.tmp_area) * VL;
    Grads<T> gr{res + static_cast<size_t>(g.reg_area) * VL, nullptr, nullptr};
    gr.tx = gr.params + p_size;
    gr.tz = gr.tx + tx_size;
    std::memset(gr.params, 0, (p_size + tx_size + tz_size) * sizeof(T));
    for (int64_t blk = next.fetch_add(1); blk < n_blocks; blk = next.fetch_add(1)) {
      const int i = static_cast<int>(blk % g.n1), jb = static_cast<int>(blk / g.n1);
      if (!wanted<T, VL>(g, i, jb)) continue;
      vjp_block<T, VL, NR, NA>(g, gout, i, jb, regs, adjs, slot.data(), tmp, res, touched, gr, input.data());
    }
    std::free(touched);
    buffers[t] = mem;
  };
  parallel(n_threads, worker);
  if (failed.load()) {
    for (T* b : buffers) std::free(b);
    return 3;
  }
  const size_t maps = static_cast<size_t>(g.reg_off[g.n_regs]) * VL;
  const size_t offset = maps + adj_maps + static_cast<size_t>(g.tmp_area) * VL + static_cast<size_t>(g.reg_area) * VL;
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

// ---------------------------------------------------------------------------------------------
// Packing the traces: each slot's standard deviations arrive as rows of images ([area][n], row `stride` apart),
// and leave, with their inverses (0 where s = 0, as ops.inverse_std), in the layouts Args describes: the first
// set [n][n_trace][2], the second [n / VL][n_trace][2][VL] with the padding lanes zero. One pass, threads
// splitting the images.

template <typename T>
struct Slots {
  const T* const* rows;  // per slot: the first position's row
  const int64_t* stride;  // per slot: elements from one position's row to the next
  const int32_t* area;
  int n_slots, n;
};

template <typename T>
inline T inverse(T s) {
  return s > T(0) ? T(1) / s : T(0);
}

template <typename T>
void pack_left(const Slots<T>& sl, int64_t n_trace, T* __restrict out, int j0, int j1) {
  constexpr int kChunk = 64;  // positions per sweep over the images: their rows' cache lines stay in L1
  int64_t p0 = 0;
  for (int s = 0; s < sl.n_slots; ++s) {
    for (int q0 = 0; q0 < sl.area[s]; q0 += kChunk) {
      const int q1 = std::min(sl.area[s], q0 + kChunk);
      for (int j = j0; j < j1; ++j) {
        T* __restrict o = out + (static_cast<int64_t>(j) * n_trace + p0 + q0) * 2;
        for (int q = q0; q < q1; ++q) {
          const T v = sl.rows[s][q * sl.stride[s] + j];
          o[2 * (q - q0)] = v;
          o[2 * (q - q0) + 1] = inverse(v);
        }
      }
    }
    p0 += sl.area[s];
  }
}

template <typename T, int VL>
void pack_right(const Slots<T>& sl, int64_t n_trace, T* __restrict out, int g0, int g1) {
  for (int gi = g0; gi < g1; ++gi) {
    T* __restrict o = out + static_cast<int64_t>(gi) * n_trace * 2 * VL;
    const int lanes = std::min(VL, sl.n - gi * VL);
    for (int s = 0; s < sl.n_slots; ++s) {
      for (int q = 0; q < sl.area[s]; ++q, o += 2 * VL) {
        const T* __restrict r = sl.rows[s] + q * sl.stride[s] + static_cast<int64_t>(gi) * VL;
        if (lanes == VL) {
#pragma omp simd
          for (int v = 0; v < VL; ++v) {
            o[v] = r[v];
            o[VL + v] = inverse(r[v]);
          }
        } else {
          for (int v = 0; v < VL; ++v) {
            o[v] = v < lanes ? r[v] : T(0);
            o[VL + v] = v < lanes ? inverse(r[v]) : T(0);
          }
        }
      }
    }
  }
}

template <typename T, int VL>
int pack_traces(const Slots<T>& sl, int right, T* out, int n_threads) {
  int64_t n_trace = 0;
  for (int s = 0; s < sl.n_slots; ++s) n_trace += sl.area[s];
  const int units = right ? (sl.n + VL - 1) / VL : sl.n;  // groups or images
  n_threads = std::max(1, std::min(n_threads, units));
  auto work = [&](int t) {
    const int u0 = static_cast<int>(static_cast<int64_t>(units) * t / n_threads);
    const int u1 = static_cast<int>(static_cast<int64_t>(units) * (t + 1) / n_threads);
    if (right) {
      pack_right<T, VL>(sl, n_trace, out, u0, u1);
    } else {
      pack_left<T>(sl, n_trace, out, u0, u1);
    }
  };
  parallel(n_threads, work);
  return 0;
}

template <typename T>
Args<T> make_args(const int32_t* prog, int n_instr, int reg_area, int tmp_area, int n_regs, const int64_t* reg_off,
                  const T* x, const T* z, int H, int W, int C, int n1, int n2, const T* tx, const T* tz,
                  const int32_t* slot_offset, int n_trace, const T* params, const T* coefs, const T* dcoefs,
                  int n_coefs, int n_dcoefs, T* out, int ntk) {
  return Args<T>{reinterpret_cast<const Instr*>(prog), n_instr, reg_area, tmp_area, n_regs, reg_off, x, z, H, W, C,
                 n1, n2, tx, tz, slot_offset, n_trace, params, coefs, dcoefs, n_coefs, n_dcoefs, out, ntk};
}

}  // namespace

extern "C" {

int cnngp_fields() { return kFields; }

// lanes per block: 512 bits of each type (one AVX-512 vector, two AVX2 or four SSE vectors)
int cnngp_lanes(int is_double) { return is_double ? 8 : 16; }

#define CNNGP_ENTRY(NAME, T, VL, NR, NA)                                                                          \
  int NAME(const int32_t* prog, int n_instr, int reg_area, int tmp_area, int n_regs, const int64_t* reg_off, \
           const T* x, const T* z, \
           int H, int W, int C, int n1, int n2, const T* tx, const T* tz, const int32_t* slot_offset,          \
           int n_trace, const T* params, const T* coefs, const T* dcoefs, int n_coefs, int n_dcoefs, T* out,   \
           int ntk, int triangle, int n_threads) {                                                            \
    Args<T> g = make_args<T>(prog, n_instr, reg_area, tmp_area, n_regs, reg_off, x, z, H, W, C, n1, n2, tx, tz,     \
                             slot_offset, n_trace, params, coefs, dcoefs, n_coefs, n_dcoefs, out, ntk);          \
    g.triangle = triangle;                                                                                       \
    return run<T, VL, NR, NA>(g, n_threads);                                                                     \
  }

// lanes: 512 bits; NR, NA: coefficients of R and of A (float32: degrees 6 and 8, float64: 16 and 16; ops.py)
CNNGP_ENTRY(cnngp_run_f32, float, 16, 7, 9)
CNNGP_ENTRY(cnngp_run_f64, double, 8, 17, 17)

// the self pass of n images z (packed as the second set): final [n] (then the NTK's [n]), the traces in the
// layouts of tx (left, [n][n_trace][2]) and tz (right, [groups][n_trace][2][VL]); either may be null
#define CNNGP_SELF(NAME, T, VL, NR, NA)                                                                           \
  int NAME(const int32_t* prog, int n_instr, int reg_area, int tmp_area, int n_regs, const int64_t* reg_off, \
           const T* z, int H, int W, \
           int C, int n, const int32_t* slot_offset, int n_trace, const T* params, const T* coefs,            \
           const T* dcoefs, int n_coefs, int n_dcoefs, T* left, T* right, T* final, int ntk, int n_threads) {     \
    Args<T> g = make_args<T>(prog, n_instr, reg_area, tmp_area, n_regs, reg_off, nullptr, z, H, W, C, 0, n, nullptr,       \
                             nullptr, slot_offset, n_trace, params, coefs, dcoefs, n_coefs, n_dcoefs, final, ntk); \
    g.self_left = left;                                                                                          \
    g.self_right = right;                                                                                        \
    return run<T, VL, NR, NA, true>(g, n_threads);                                                               \
  }

CNNGP_SELF(cnngp_self_f32, float, 16, 7, 9)
CNNGP_SELF(cnngp_self_f64, double, 8, 17, 17)

// the VJP: gout [n1][n2] (zero in padding lanes); g_params [n_params], g_tx [n1][n_trace], g_tz [n2/VL][n_trace][VL]
#define CNNGP_VJP(NAME, T, VL, NR, NA)                                                                            \
  int NAME(const int32_t* prog, int n_instr, int reg_area, int tmp_area, int n_regs, const int64_t* reg_off, \
           const T* x, const T* z, \
           int H, int W, int C, int n1, int n2, const T* tx, const T* tz, const int32_t* slot_offset,          \
           int n_trace, const T* params, const T* coefs, const T* dcoefs, int n_coefs, int n_dcoefs,           \
           const T* gout, int n_params, T* g_params, T* g_tx, T* g_tz, int triangle, int n_threads) {           \
    Args<T> g = make_args<T>(prog, n_instr, reg_area, tmp_area, n_regs, reg_off, x, z, H, W, C, n1, n2, tx, tz,     \
                             slot_offset, n_trace, params, coefs, dcoefs, n_coefs, n_dcoefs, nullptr, 0);      \
    g.triangle = triangle;                                                                                       \
    return run_vjp<T, VL, NR, NA>(g, gout, n_params, g_params, g_tx, g_tz, n_threads);                          \
  }

CNNGP_VJP(cnngp_vjp_f32, float, 16, 7, 9)
CNNGP_VJP(cnngp_vjp_f64, double, 8, 17, 17)

// the traces' packing (pack_traces): rows [n_slots] pointers, stride and area per slot; out as Args' tx or tz
#define CNNGP_PACK(NAME, T, VL)                                                                                   \
  int NAME(const T* const* rows, const int64_t* stride, const int32_t* area, int n_slots, int n, int right,   \
           T* out, int n_threads) {                                                                           \
    return pack_traces<T, VL>(Slots<T>{rows, stride, area, n_slots, n}, right, out, n_threads);              \
  }

CNNGP_PACK(cnngp_pack_f32, float, 16)
CNNGP_PACK(cnngp_pack_f64, double, 8)

}  // extern "C"
