// Stride-1 convolutions with zero padding for XLA:CPU, as FFI calls: the forward
// pass (which also gives the input gradient) and the kernel gradient. Both take
// rank-5 channels-last arrays, so a 2D convolution is a 3D one with depth 1:
//
//   x [B, D, H, W, C], k [KD, KH, KW, C, O] (DHWIO), y and g [B, D, H, W, O],
//   pads (pd, ph, pw) before each spatial axis; the output has the input's size.
//
// Forward ("UnetConv"):
//
//   y[b, z, y, x, o] = sum_{a, i, j, c} x[b, z + a - pd, y + i - ph, x + j - pw, c]
//                                       * k[a, i, j, c, o],
//
// where positions outside the input are zero. They are skipped, not read: no padded
// copy of the input is made. For each output row the kernel lists the (a, i) taps
// whose input row exists; pixels whose every tap j lies inside the row are computed
// in register tiles of up to kWide pixels x 2 vectors of output channels (or kNarrow
// x 1; 8 x 32 or 16 x 16 channels with AVX-512, 6 x 16 or 12 x 8 with AVX2), held in
// vector registers over the whole contraction (taps and a block of input channels)
// and stored once, and the few edge pixels one at a time with their taps clipped.
// The input gradient of this convolution is this forward pass on the output
// gradient with the kernel flipped in space, its channel axes swapped and the pads
// k - 1 - p (unet_jax/native_kernels.py).
//
// Kernel gradient ("UnetConvWgrad"):
//
//   dK[a, i, j, c, o] = sum_{b, z, y, x} x[b, z + a - pd, y + i - ph, x + j - pw, c]
//                                        * g[b, z, y, x, o].
//
// XLA:CPU computes this gradient as a convolution whose contraction per tap is the
// batch (4 in the U-Net's 2D benchmark), far below its matrix-product rate. Here it is
// a sum of small matrix products, one per output row and tap: for output row
// (b, z, y) and tap (a, i, j), dK[a, i, j] += X^T G, where X is the input row
// (b, z + a - pd, y + i - ph) shifted by j - pw along W ([W, C], contiguous) and G is
// row (b, z, y) of g ([W, O]). A register tile of up to kWide input channels x 2
// vectors of output channels (8 x 32 with AVX-512) is held in vector registers across
// the W pixels (across several rows' pixels when the kernel is too large for L2:
// `row_group`). Each chunk of rows sums
// into its own copy of dK; the copies are added in chunk order at the end, so the
// result is the same whichever thread ran a chunk.
//
// Both share rows out over XLA's intra-op thread pool. Built by
// unet_jax/native_kernels.py with the machine's C++ compiler (-O3 -march=native);
// the vectors are GCC/Clang vector extensions, not intrinsics, so the same source
// builds for AVX-512, AVX2 or NEON.

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// Vectors of kLanes floats: 16 (one 512-bit register) where the compiler targets
// AVX-512F, otherwise 8 (one 256-bit AVX2 register, or two NEON registers).
// -DUNET_JAX_LANES=8 or 16 chooses (unet_jax/ops/native.py, UNET_JAX_NATIVE_LANES).
#ifndef UNET_JAX_LANES
#if defined(__AVX512F__)
#define UNET_JAX_LANES 16
#else
#define UNET_JAX_LANES 8
#endif
#endif
constexpr int kLanes = UNET_JAX_LANES;
static_assert(kLanes == 8 || kLanes == 16, "UNET_JAX_LANES must be 8 or 16");
typedef float vec __attribute__((vector_size(4 * UNET_JAX_LANES)));
// The same vector, at any float-aligned address (unaligned loads and stores).
typedef float vecu __attribute__((vector_size(4 * UNET_JAX_LANES), aligned(4)));

inline vec loadv(const float* p) { return *reinterpret_cast<const vecu*>(p); }

inline void addv(float* p, vec v) { *reinterpret_cast<vecu*>(p) += v; }

// Register tiles: rows x NV vectors of accumulators, kWide rows with NV = 2 or
// kNarrow rows with NV = 1. With 32 vector registers (AVX-512) 8 x 2 or 16 x 1; with
// 16 (AVX2) 6 x 2 or 12 x 1, which leaves registers for the NV loaded vectors and the
// broadcast operand.
constexpr int kWide = kLanes == 16 ? 8 : 6;
constexpr int kNarrow = kLanes == 16 ? 16 : 12;

// Sizes of one call: batch, spatial sizes (of the input and of the output), channels
// in and out, kernel sizes and the pads before each spatial axis.
struct Geom {
  int64_t b, d, h, w, c, o, kd, kh, kw, pd, ph, pw;
  int64_t rows() const { return b * d * h; }
  // Input row (b, z, y), [W, C].
  int64_t row_offset(int64_t bi, int64_t z, int64_t y) const {
    return ((bi * d + z) * h + y) * w;
  }
};

// Rows computed together. A kernel larger than kKernelInL2 floats (1 MiB, about half
// an L2 cache) does not stay in L2 from one row to the next; then rows are grouped so
// that each block of the kernel (forward pass) or of its gradient, once in L1 or in
// registers, serves at least kGroupPixels output pixels: a 16-pixel row of a
// 256-channel layer would otherwise sweep 2.4 MB of kernel per row. Smaller kernels go
// row by row.
constexpr int64_t kKernelInL2 = 1 << 18;
constexpr int64_t kGroupPixels = 128;

int64_t row_group(const Geom& s) {
  if (s.kd * s.kh * s.kw * s.c * s.o <= kKernelInL2) return 1;
  return std::max<int64_t>(1, kGroupPixels / std::max<int64_t>(1, s.w));
}

// ---------------------------------------------------------------------------------
// Kernel gradient.

// acc[m][v] = sum_p xrow[p * c + m] * grow[p * o + kLanes v], p in [0, n): an MC x
// (kLanes NV) tile of X^T G, added into dk (row stride o).
template <int MC, int NV>
inline void tile(const float* xrow, const float* grow, int64_t n, int64_t c,
                 int64_t o, float* dk) {
  vec acc[MC][NV];
  for (int m = 0; m < MC; ++m)
    for (int v = 0; v < NV; ++v) acc[m][v] = vec{};
  for (int64_t p = 0; p < n; ++p) {
    vec gv[NV];
    for (int v = 0; v < NV; ++v) gv[v] = loadv(grow + p * o + kLanes * v);
    const float* xp = xrow + p * c;
    for (int m = 0; m < MC; ++m) {
      const float s = xp[m];
      for (int v = 0; v < NV; ++v) acc[m][v] += s * gv[v];
    }
  }
  for (int m = 0; m < MC; ++m)
    for (int v = 0; v < NV; ++v) addv(dk + m * o + kLanes * v, acc[m][v]);
}

// Channels [0, count) of rows with stride c: tiles of MC input channels, then the
// remainder in smaller tiles.
template <int MC, int NV>
inline void tiles_over_c(const float* xrow, const float* grow, int64_t n,
                         int64_t count, int64_t c, int64_t o, float* dk) {
  int64_t c0 = 0;
  for (; c0 + MC <= count; c0 += MC)
    tile<MC, NV>(xrow + c0, grow, n, c, o, dk + c0 * o);
  if constexpr (MC > 1) {
    if (c0 < count)
      tiles_over_c<MC / 2, NV>(xrow + c0, grow, n, count - c0, c, o, dk + c0 * o);
  }
}

// dk[c, o] += sum_p xrow[p, c] grow[p, o] over n pixels.
void row_product(const float* xrow, const float* grow, int64_t n, int64_t c,
                 int64_t o, float* dk) {
  int64_t o0 = 0;
  for (; o0 + 2 * kLanes <= o; o0 += 2 * kLanes)
    tiles_over_c<kWide, 2>(xrow, grow + o0, n, c, c, o, dk + o0);
  for (; o0 + kLanes <= o; o0 += kLanes)
    tiles_over_c<kNarrow, 1>(xrow, grow + o0, n, c, c, o, dk + o0);
  if (o0 < o) {  // fewer than kLanes output channels left: plain loops.
    for (int64_t p = 0; p < n; ++p)
      for (int64_t ci = 0; ci < c; ++ci) {
        const float s = xrow[p * c + ci];
        for (int64_t oi = o0; oi < o; ++oi) dk[ci * o + oi] += s * grow[p * o + oi];
      }
  }
}

// A run of pixels that contributes to one tap of the kernel gradient: n input pixels
// (stride c) against n output-gradient pixels (stride o).
struct Segment {
  const float* x;
  const float* g;
  int64_t n;
};

// acc[m][v] = sum over the segments' pixels p of x[p * c + m] * g[p * o + kLanes v]:
// an MC x (kLanes NV) tile of X^T G, held in registers over all the segments, then added
// into dk (row stride o) once.
template <int MC, int NV>
inline void seg_tile(const Segment* segs, int64_t nseg, int64_t c0, int64_t o0,
                 int64_t c, int64_t o, float* dk) {
  vec acc[MC][NV];
  for (int m = 0; m < MC; ++m)
    for (int v = 0; v < NV; ++v) acc[m][v] = vec{};
  for (int64_t sg = 0; sg < nseg; ++sg) {
    const float* xrow = segs[sg].x + c0;
    const float* grow = segs[sg].g + o0;
    for (int64_t p = 0; p < segs[sg].n; ++p) {
      vec gv[NV];
      for (int v = 0; v < NV; ++v) gv[v] = loadv(grow + p * o + kLanes * v);
      const float* xp = xrow + p * c;
      for (int m = 0; m < MC; ++m) {
        const float s = xp[m];
        for (int v = 0; v < NV; ++v) acc[m][v] += s * gv[v];
      }
    }
  }
  for (int m = 0; m < MC; ++m)
    for (int v = 0; v < NV; ++v) addv(dk + (c0 + m) * o + o0 + kLanes * v, acc[m][v]);
}

// Input channels [c0, c1): tiles of MC channels, then the remainder in smaller tiles.
template <int MC, int NV>
inline void seg_tiles_over_c(const Segment* segs, int64_t nseg, int64_t c0, int64_t c1,
                         int64_t o0, int64_t c, int64_t o, float* dk) {
  for (; c0 + MC <= c1; c0 += MC) seg_tile<MC, NV>(segs, nseg, c0, o0, c, o, dk);
  if constexpr (MC > 1) {
    if (c0 < c1) seg_tiles_over_c<MC / 2, NV>(segs, nseg, c0, c1, o0, c, o, dk);
  }
}

// dk[c, o] += sum over the segments' pixels p of x[p, c] g[p, o].
void segments_product(const Segment* segs, int64_t nseg, int64_t c, int64_t o,
                      float* dk) {
  int64_t o0 = 0;
  for (; o0 + 2 * kLanes <= o; o0 += 2 * kLanes)
    seg_tiles_over_c<kWide, 2>(segs, nseg, 0, c, o0, c, o, dk);
  for (; o0 + kLanes <= o; o0 += kLanes)
    seg_tiles_over_c<kNarrow, 1>(segs, nseg, 0, c, o0, c, o, dk);
  if (o0 < o) {  // fewer than kLanes output channels left: plain loops.
    for (int64_t sg = 0; sg < nseg; ++sg)
      for (int64_t p = 0; p < segs[sg].n; ++p)
        for (int64_t ci = 0; ci < c; ++ci) {
          const float s = segs[sg].x[p * c + ci];
          for (int64_t oi = o0; oi < o; ++oi)
            dk[ci * o + oi] += s * segs[sg].g[p * o + oi];
        }
  }
}

// `wgrad_rows` for kernels too large for L2: rows in groups (`row_group`); for each
// tap, the group's rows are one list of segments, so each register tile of dK is
// loaded and stored once per group rather than once per row. (Row by row, the
// simpler loop of `wgrad_rows` measured faster.)
void wgrad_row_groups(const float* x, const float* g, const Geom& s, int64_t r0,
                      int64_t r1, int64_t group, float* dk) {
  std::vector<Segment> segs(std::min(group, r1 - r0));
  for (int64_t g0 = r0; g0 < r1; g0 += group) {
    const int64_t g1 = std::min(r1, g0 + group);
    for (int64_t a = 0; a < s.kd; ++a)
      for (int64_t i = 0; i < s.kh; ++i)
        for (int64_t j = 0; j < s.kw; ++j) {
          // Output pixels p with input column p + j - pw inside [0, W).
          const int64_t shift = j - s.pw;
          const int64_t p0 = std::max<int64_t>(0, -shift);
          const int64_t p1 = std::min<int64_t>(s.w, s.w - shift);
          if (p1 <= p0) continue;
          int64_t nseg = 0;
          for (int64_t r = g0; r < g1; ++r) {
            const int64_t bi = r / (s.d * s.h), z = r / s.h % s.d, y = r % s.h;
            const int64_t zz = z + a - s.pd, yy = y + i - s.ph;
            if (zz < 0 || zz >= s.d || yy < 0 || yy >= s.h) continue;
            segs[nseg++] = {x + (s.row_offset(bi, zz, yy) + p0 + shift) * s.c,
                            g + (r * s.w + p0) * s.o, p1 - p0};
          }
          if (nseg > 0)
            segments_product(segs.data(), nseg, s.c, s.o,
                             dk + ((a * s.kh + i) * s.kw + j) * s.c * s.o);
        }
  }
}

// Adds the contribution of output rows [r0, r1) (row r = (b * D + z) * H + y) into dk.
void wgrad_rows(const float* x, const float* g, const Geom& s, int64_t r0, int64_t r1,
                float* dk) {
  const int64_t group = row_group(s);
  if (group > 1) return wgrad_row_groups(x, g, s, r0, r1, group, dk);
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t bi = r / (s.d * s.h), z = r / s.h % s.d, y = r % s.h;
    const float* grow_all = g + r * s.w * s.o;
    for (int64_t a = 0; a < s.kd; ++a) {
      const int64_t zz = z + a - s.pd;
      if (zz < 0 || zz >= s.d) continue;
      for (int64_t i = 0; i < s.kh; ++i) {
        const int64_t yy = y + i - s.ph;
        if (yy < 0 || yy >= s.h) continue;
        const float* xrow_all = x + s.row_offset(bi, zz, yy) * s.c;
        for (int64_t j = 0; j < s.kw; ++j) {
          // Output pixels p with input column p + j - pw inside [0, W).
          const int64_t shift = j - s.pw;
          const int64_t p0 = std::max<int64_t>(0, -shift);
          const int64_t p1 = std::min<int64_t>(s.w, s.w - shift);
          if (p1 <= p0) continue;
          row_product(xrow_all + (p0 + shift) * s.c, grow_all + p0 * s.o, p1 - p0,
                      s.c, s.o, dk + ((a * s.kh + i) * s.kw + j) * s.c * s.o);
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------
// Forward pass.

// An input row that exists for the output row being computed, and the kernel slice
// k[a, i] ([KW, C, O]) it meets.
struct RowTap {
  const float* x;
  const float* k;
};

// Output pixels [p, p + MP) of one row, channels [o0, o0 + kLanes NV) (y and each tap's
// k already point there), summed over the row taps, the column taps j < KW and
// input channels [c0, c1); pixel p + m, tap j reads input column p + m + j - pw. The
// first channel block writes y, the others add to it.
template <int MP, int NV>
inline void fwd_tile(const RowTap* taps, int64_t ntaps, int64_t p, const Geom& s,
                     int64_t c0, int64_t c1, float* y) {
  vec acc[MP][NV];
  for (int m = 0; m < MP; ++m)
    for (int v = 0; v < NV; ++v)
      acc[m][v] = c0 == 0 ? vec{} : loadv(y + m * s.o + kLanes * v);
  for (int64_t t = 0; t < ntaps; ++t)
    for (int64_t j = 0; j < s.kw; ++j) {
      // Pixels in groups of 8, each from its own base pointer, so that the groups
      // share the offsets m * c (m < 8) and these fit in general registers.
      const float* xr[(MP + 7) / 8];
      for (int q = 0; q < (MP + 7) / 8; ++q)
        xr[q] = taps[t].x + (p + 8 * q + j - s.pw) * s.c;
      const float* kr = taps[t].k + j * s.c * s.o;
      for (int64_t ci = c0; ci < c1; ++ci) {
        vec kv[NV];
        for (int v = 0; v < NV; ++v) kv[v] = loadv(kr + ci * s.o + kLanes * v);
        for (int m = 0; m < MP; ++m) {
          const float xv = xr[m / 8][(m % 8) * s.c + ci];
          for (int v = 0; v < NV; ++v) acc[m][v] += xv * kv[v];
        }
      }
    }
  for (int m = 0; m < MP; ++m)
    for (int v = 0; v < NV; ++v)
      *reinterpret_cast<vecu*>(y + m * s.o + kLanes * v) = acc[m][v];
}

// Pixels [p, p + count) of one row, every column tap of which lies inside the row
// the taps point to: tiles of MP pixels, then smaller ones.
template <int MP, int NV>
inline void fwd_pixels(const RowTap* taps, int64_t ntaps, int64_t p, int64_t count,
                       const Geom& s, int64_t c0, int64_t c1, float* yrow) {
  int64_t done = 0;
  for (; done + MP <= count; done += MP)
    fwd_tile<MP, NV>(taps, ntaps, p + done, s, c0, c1,
                     yrow + (p + done) * s.o);
  if constexpr (MP > 1) {
    if (done < count)
      fwd_pixels<MP / 2, NV>(taps, ntaps, p + done, count - done, s, c0, c1, yrow);
  }
}

// Output pixels at each end of a row computed from a zero-padded copy of the input
// they see (`EdgeRows`): at least one full register tile (kNarrow pixels), so that
// edge pixels run in full tiles too.
constexpr int64_t kEdge = 16;
static_assert(kEdge >= kNarrow, "an edge region holds a whole register tile");

// The input a row's edge pixels see, zero-padded: for each row tap, the columns
// [q0 - pw, q0 + n + kw - 1 - pw) of output pixels [q0, q0 + n), copied with zeros
// where they fall outside [0, W). `taps` points into the copies, so that pixel
// p' in [0, n) of the region reads them with the same indexing as the whole row.
struct EdgeRows {
  std::vector<float> data;
  std::vector<RowTap> taps;

  void fill(const RowTap* row_taps, int64_t ntaps, int64_t q0, int64_t n,
            const Geom& s) {
    const int64_t cols = n + s.kw - 1;
    data.resize(ntaps * cols * s.c);
    taps.resize(ntaps);
    for (int64_t t = 0; t < ntaps; ++t) {
      float* dst = data.data() + t * cols * s.c;
      for (int64_t col = 0; col < cols; ++col) {
        const int64_t src = q0 - s.pw + col;
        if (src < 0 || src >= s.w)
          std::memset(dst + col * s.c, 0, sizeof(float) * s.c);
        else
          std::memcpy(dst + col * s.c, row_taps[t].x + src * s.c, sizeof(float) * s.c);
      }
      taps[t] = {dst + s.pw * s.c, row_taps[t].k};
    }
  }
};

// One output row's pixel regions: the left edge [0, left), the interior [left,
// right), whose every column tap lies inside the row, and the right edge [right, W).
struct RowRegions {
  int64_t left, right;
  explicit RowRegions(const Geom& s)
      : left(std::min(s.w, kEdge)), right(std::max(left, s.w - kEdge)) {}
};

// One row, output channels [o0, o0 + kLanes NV), input channels [c0, c1).
template <int NV>
void fwd_row_block(const RowTap* taps, int64_t ntaps, const EdgeRows& left,
                   const EdgeRows& right, const RowRegions& regions, const Geom& s,
                   int64_t c0, int64_t c1, float* yrow, int64_t o0,
                   std::vector<RowTap>& shifted) {
  constexpr int MP = NV == 2 ? kWide : kNarrow;
  shifted.resize(ntaps);
  auto shift = [&](const RowTap* from) {  // each tap's kernel at channel o0
    for (int64_t t = 0; t < ntaps; ++t) shifted[t] = {from[t].x, from[t].k + o0};
    return shifted.data();
  };
  fwd_pixels<MP, NV>(shift(left.taps.data()), ntaps, 0, regions.left, s, c0, c1,
                     yrow + o0);
  fwd_pixels<MP, NV>(shift(taps), ntaps, regions.left, regions.right - regions.left,
                     s, c0, c1, yrow + o0);
  fwd_pixels<MP, NV>(shift(right.taps.data()), ntaps, 0, s.w - regions.right, s, c0,
                     c1, yrow + regions.right * s.o + o0);
}

// Input channels per block of the forward pass: the block's kernel slice for one
// tile of output channels (taps x block x tile floats) stays within kBlockFloats
// (36 KiB: 32 input channels of a 3 x 3 kernel and a 32-wide tile, 64 of a 16-wide
// one), so in L1 while a
// whole row of pixels uses it.
constexpr int64_t kBlockFloats = 9 * 32 * 32;

// (block size, number of blocks) over c channels for taps x tile kernel slices; a
// last block of fewer than half a block joins the one before it.
std::pair<int64_t, int64_t> channel_blocks(int64_t c, int64_t taps, int64_t tile) {
  const int64_t block = std::max<int64_t>(8, kBlockFloats / (taps * tile));
  return {block, std::max<int64_t>(1, (c + block / 2) / block)};
}


// What one output row reads: its row taps and the padded copies of its edges.
struct RowInput {
  std::vector<RowTap> taps;
  int64_t ntaps = 0;
  EdgeRows left, right;
};

void fwd_row_input(const float* x, const float* k, const Geom& s,
                   const RowRegions& regions, int64_t r, RowInput* in) {
  const int64_t bi = r / (s.d * s.h), z = r / s.h % s.d, yy = r % s.h;
  in->taps.resize(s.kd * s.kh);
  in->ntaps = 0;
  for (int64_t a = 0; a < s.kd; ++a) {
    const int64_t zz = z + a - s.pd;
    if (zz < 0 || zz >= s.d) continue;
    for (int64_t i = 0; i < s.kh; ++i) {
      const int64_t y2 = yy + i - s.ph;
      if (y2 < 0 || y2 >= s.h) continue;
      in->taps[in->ntaps++] = {x + s.row_offset(bi, zz, y2) * s.c,
                               k + (a * s.kh + i) * s.kw * s.c * s.o};
    }
  }
  if (s.o >= kLanes) {
    in->left.fill(in->taps.data(), in->ntaps, 0, regions.left, s);
    in->right.fill(in->taps.data(), in->ntaps, regions.right, s.w - regions.right, s);
  }
}

// Output channels [o0, s.o) of one row, fewer than kLanes: plain loops.
void fwd_row_rest(const RowInput& in, const Geom& s, int64_t o0, float* yrow) {
  for (int64_t p = 0; p < s.w; ++p) {
    const int64_t j0 = std::max<int64_t>(0, s.pw - p);
    const int64_t j1 = std::min<int64_t>(s.kw, s.w + s.pw - p);
    for (int64_t oi = o0; oi < s.o; ++oi) {
      float acc = 0.0f;
      for (int64_t t = 0; t < in.ntaps; ++t)
        for (int64_t j = j0; j < j1; ++j) {
          const float* xv = in.taps[t].x + (p + j - s.pw) * s.c;
          const float* kv = in.taps[t].k + j * s.c * s.o + oi;
          for (int64_t ci = 0; ci < s.c; ++ci) acc += xv[ci] * kv[ci * s.o];
        }
      yrow[p * s.o + oi] = acc;
    }
  }
}

void fwd_rows(const float* x, const float* k, float* y, const Geom& s, int64_t r0,
              int64_t r1) {
  const RowRegions regions(s);
  const int64_t group = row_group(s);
  std::vector<RowInput> inputs(std::min(group, r1 - r0));
  std::vector<RowTap> shifted;
  const int64_t taps_per_pixel = s.kd * s.kh * s.kw;
  for (int64_t g0 = r0; g0 < r1; g0 += group) {
    const int64_t g1 = std::min(r1, g0 + group);
    for (int64_t r = g0; r < g1; ++r) fwd_row_input(x, k, s, regions, r, &inputs[r - g0]);
    // Each block of the kernel serves every row of the group before the next.
    int64_t o0 = 0;
    for (int64_t tile; o0 + kLanes <= s.o; o0 += tile) {
      tile = o0 + 2 * kLanes <= s.o ? 2 * kLanes : kLanes;
      const auto [block, nblocks] = channel_blocks(s.c, taps_per_pixel, tile);
      for (int64_t cb = 0; cb < nblocks; ++cb) {
        const int64_t c0 = cb * block, c1 = cb + 1 == nblocks ? s.c : c0 + block;
        for (int64_t r = g0; r < g1; ++r) {
          const RowInput& in = inputs[r - g0];
          float* yrow = y + r * s.w * s.o;
          if (tile == 2 * kLanes)
            fwd_row_block<2>(in.taps.data(), in.ntaps, in.left, in.right, regions, s,
                             c0, c1, yrow, o0, shifted);
          else
            fwd_row_block<1>(in.taps.data(), in.ntaps, in.left, in.right, regions, s,
                             c0, c1, yrow, o0, shifted);
        }
      }
    }
    if (o0 < s.o)
      for (int64_t r = g0; r < g1; ++r)
        fwd_row_rest(inputs[r - g0], s, o0, y + r * s.w * s.o);
  }
}

// ---------------------------------------------------------------------------------
// Threads.

// Runs body(k, r0, r1) for the chunks k in [0, nchunks) of rows [0, nrows), on the
// calling thread and up to num_threads - 1 pool workers. Which thread runs a chunk
// varies, but each chunk's work, and so the result, does not. State is held by
// shared_ptr, so a worker that starts after the work is done finds nothing to do.
template <typename Body>
void parallel_rows(ffi::ThreadPool& pool, int64_t nrows, int64_t nchunks,
                   Body body) {
  struct State {
    int64_t chunk, nchunks;
    std::atomic<int64_t> next_chunk{0};
    std::mutex mu;
    std::condition_variable cv;
    int active = 0;       // helpers inside work(), guarded by mu
    bool closed = false;  // set once the caller has no chunk left; guarded by mu
  };
  if (nrows <= 0) return;  // an empty operand: nothing to do
  auto st = std::make_shared<State>();
  st->chunk = (nrows + nchunks - 1) / nchunks;
  st->nchunks = (nrows + st->chunk - 1) / st->chunk;
  auto work = [st, nrows, body]() {
    for (int64_t k = st->next_chunk.fetch_add(1); k < st->nchunks;
         k = st->next_chunk.fetch_add(1)) {
      const int64_t r0 = k * st->chunk;
      body(k, r0, std::min(r0 + st->chunk, nrows));
    }
  };
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t helpers = std::min<int64_t>(threads, st->nchunks) - 1;
  for (int64_t t = 0; t < helpers; ++t) {
    pool.Schedule([st, work] {
      {
        std::lock_guard<std::mutex> lock(st->mu);
        if (st->closed) return;  // started too late: the caller did the work.
        ++st->active;
      }
      work();
      std::lock_guard<std::mutex> lock(st->mu);
      if (--st->active == 0) st->cv.notify_all();
    });
  }
  work();
  // Every chunk is claimed. Wait only for helpers that have started (and so will
  // finish); one still queued behind busy pool threads never runs work(), so this
  // cannot deadlock when every pool thread is itself waiting here.
  std::unique_lock<std::mutex> lock(st->mu);
  st->closed = true;
  st->cv.wait(lock, [&] { return st->active == 0; });
}

// Chunks per pool thread: enough that an uneven start still balances.
constexpr int64_t kChunksPerThread = 4;

int64_t num_threads(ffi::ThreadPool& pool) {
  return std::max<int64_t>(1, pool.num_threads());
}

// Forward pass: chunks of rows write disjoint outputs, so they can be small.
int64_t num_chunks(ffi::ThreadPool& pool, int64_t nrows) {
  return std::max<int64_t>(1, std::min<int64_t>(nrows, kChunksPerThread * num_threads(pool)));
}

// Kernel gradient: each chunk zeroes, fills and hands back its own copy of dK, so a
// chunk should hold enough pixels (kPixelsPerChunk) for that to cost little next to
// its products; and there should be no fewer chunks than threads.
constexpr int64_t kPixelsPerChunk = 2048;

int64_t num_wgrad_chunks(ffi::ThreadPool& pool, int64_t nrows, int64_t width) {
  const int64_t threads = num_threads(pool);
  const int64_t by_size = (nrows * width + kPixelsPerChunk - 1) / kPixelsPerChunk;
  const int64_t chunks = std::clamp<int64_t>(by_size, threads, kChunksPerThread * threads);
  return std::max<int64_t>(1, std::min<int64_t>(nrows, chunks));
}

// Runs body(r0, r1, partial) for the chunks of rows [0, nrows), each adding into its
// own zeroed partial sum of `size` floats, then sets out to the sum of the partials
// in chunk order: the result does not depend on which thread ran which chunk, so
// repeated runs are bit-identical (the kernel gradients). The sum runs over the pool
// too, in slices of `out` (a 512 x 256 Winograd gradient has 2M floats a partial).
template <typename Body>
void sum_over_chunks(ffi::ThreadPool& pool, int64_t nrows, int64_t nchunks,
                     int64_t size, float* out, Body body) {
  std::vector<std::vector<float>> partial(nchunks);
  parallel_rows(pool, nrows, nchunks, [&](int64_t k, int64_t r0, int64_t r1) {
    partial[k].assign(size, 0.0f);
    body(r0, r1, partial[k].data());
  });
  parallel_rows(pool, size, num_chunks(pool, size), [&](int64_t, int64_t q0, int64_t q1) {
    std::fill(out + q0, out + q1, 0.0f);
    for (const std::vector<float>& p : partial) {
      if (p.empty()) continue;  // a chunk that did not run (not every one may)
      for (int64_t q = q0; q < q1; ++q) out[q] += p[q];
    }
  });
}

// ---------------------------------------------------------------------------------
// Forward pass by Winograd's minimal filtering F(M x M, 3 x 3), M = 4 or 2
// (`forward_tile`) (Lavin and Gray, "Fast Algorithms for Convolutional Neural
// Networks", 2016), for 3 x 3 kernels in H and W with pads (1, 1) there ('same'); any
// depth taps are summed. Each M x M block of output pixels ("tile") reads the (M + 2)
// x (M + 2) input pixels around it. With, for M = 4,
//
//   B^T = [[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
//          [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]],
//   G = [[1/4, 0, 0], [-1/6, -1/6, -1/6], [-1/6, 1/6, -1/6], [1/24, 1/12, 1/6],
//        [1/24, -1/12, 1/6], [0, 0, 1]],
//   A^T = [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0],
//          [0, 1, -1, 8, -8, 1]]
//
// (for M = 2 see the kernel gradient below), the tile's output is y = A^T [sum_c
// (B^T x_c B) * (G k_c G^T)] A (elementwise product inside), for each output channel.
// So the sum over input channels becomes (M + 2)^2 matrix products, one per position
// xi of the transformed tile: M[xi] = V[xi] U[xi], with V[xi] [tiles, C] the
// transformed input and U[xi] [C, O] the transformed kernel. For M = 4 they take 36
// multiply-adds per input and output channel for 16 output pixels, where the direct
// kernel takes 144: 4 times fewer; for M = 2, 16 for 4 pixels: 2.25 times fewer. The
// products run in the direct kernel's register tiles (kWide tiles x 2 vectors of
// output channels, or kNarrow x 1). Tiles that overhang the image read zeros and
// store only their pixels inside. The kernel gradient shares the input pass
// (`winograd_input`).

// Positions of a transformed tile of M x M output pixels (M + 2 input pixels a side).
template <int M>
constexpr int kPositions = (M + 2) * (M + 2);
constexpr int64_t kWinoTiles = 64;  // tiles per block of products (at least)

// The distance between two positions of a transformed array (U, V, M, W and the
// kernel gradient's sums), for n floats a position: n and a cache line more. The
// transforms read or write all 16 or 36 positions of a tile at once; were they a
// power of two floats apart (n = tiles x 64 channels, or C x O), every one would map
// to the same set of the L1 and L2 caches, more lines than a set holds.
inline int64_t position_stride(int64_t n) { return n + 16; }

// G g for one column of three kernel taps (the G of F(M x M, 3 x 3)).
template <int M>
inline void kernel_column(float a, float b, float c, float (&out)[M + 2]) {
  if constexpr (M == 2) {
    out[0] = a;
    out[1] = 0.5f * (a + b + c);
    out[2] = 0.5f * (a - b + c);
    out[3] = c;
  } else {
    static_assert(M == 4, "Winograd tiles are 2 x 2 or 4 x 4");
    constexpr float k4 = 1.0f / 4, k6 = 1.0f / 6, k12 = 1.0f / 12, k24 = 1.0f / 24;
    const float ac = k24 * a + k6 * c, bb = k12 * b;
    out[0] = k4 * a;
    out[1] = -k6 * (a + b + c);
    out[2] = -k6 * (a - b + c);
    out[3] = ac + bb;
    out[4] = ac - bb;
    out[5] = c;
  }
}

// U[a][xi][c][o] = (G k[a, :, :, c, o] G^T)[xi] for the depth taps a, entries
// [q0, q1) of each [C, O] slice.
template <int M>
void winograd_kernel(const float* k, const Geom& s, int64_t q0, int64_t q1, float* u) {
  constexpr int N = M + 2;
  const int64_t co = s.c * s.o, ps = position_stride(co);
  for (int64_t a = 0; a < s.kd; ++a) {
    const float* ka = k + a * 9 * co;
    float* ua = u + a * kPositions<M> * ps;
    for (int64_t q = q0; q < q1; ++q) {
      float t[3][N], r[N];
      for (int j = 0; j < 3; ++j)  // columns: G k
        kernel_column<M>(ka[j * co + q], ka[(3 + j) * co + q], ka[(6 + j) * co + q], t[j]);
      for (int i = 0; i < N; ++i) {  // rows: (G k) G^T
        kernel_column<M>(t[0][i], t[1][i], t[2][i], r);
        for (int j = 0; j < N; ++j) ua[(i * N + j) * ps + q] = r[j];
      }
    }
  }
}

// Sizes of a Winograd pass with tiles of m x m output pixels: tiles per row and tile
// rows per plane, and how many tile rows of one plane make a block.
// An image without pixels (H or W zero) has no blocks.
struct WinoGeom {
  int64_t nt, nty, rows_per_block, blocks_per_plane;
  WinoGeom(const Geom& s, int64_t m)
      : nt((s.w + m - 1) / m), nty((s.h + m - 1) / m),
        rows_per_block(std::max<int64_t>(
            1, std::min(nty, (kWinoTiles + nt - 1) / std::max<int64_t>(1, nt)))),
        blocks_per_plane(nt == 0 ? 0 : (nty + rows_per_block - 1) / rows_per_block) {}
};

// Per-thread scratch, kept from call to call: the zero-padded input rows of a block,
// V, M, the kernel gradient's W and a pixel for the forward pass's overhang.
struct WinoScratch {
  std::vector<float> rows, v, m, w, spare;
};

// One float or one vector of kLanes at p (T: float or vec), and its store: the transforms
// below run on whole vectors of channels, then on the remainder one at a time.
template <typename T>
inline T lanes(const float* p) {
  if constexpr (sizeof(T) == 4) return *p; else return loadv(p);
}
template <typename T>
inline void put_lanes(float* p, T v) {
  if constexpr (sizeof(T) == 4) *p = v; else *reinterpret_cast<vecu*>(p) = v;
}

// B^T d for one column of M + 2 input pixels (the B^T of F(M x M, 3 x 3)).
template <int M, typename T>
inline void input_column(const T (&d)[M + 2], T (&v)[M + 2]) {
  if constexpr (M == 2) {
    v[0] = d[0] - d[2];
    v[1] = d[1] + d[2];
    v[2] = d[2] - d[1];
    v[3] = d[1] - d[3];
  } else {
    static_assert(M == 4, "Winograd tiles are 2 x 2 or 4 x 4");
    const T a = d[4] - 4.0f * d[2], b = d[3] - 4.0f * d[1];
    const T c = d[4] - d[2], e = 2.0f * (d[3] - d[1]);
    v[0] = 4.0f * d[0] - 5.0f * d[2] + d[4];
    v[1] = a + b;
    v[2] = a - b;
    v[3] = c + e;
    v[4] = c - e;
    v[5] = 4.0f * d[1] - 5.0f * d[3] + d[5];
  }
}

// B^T d B for channels [ci, ci + L) of one tile: d[i][j] points at input pixel (i, j)
// of the tile, out at V[0][tile] (positions xi_stride apart). T is a vec or a float.
template <int M, typename T>
inline void input_transform(const float* const (&d)[M + 2][M + 2], int64_t ci,
                            int64_t xi_stride, float* out) {
  constexpr int N = M + 2;
  T r[N][N];
  for (int j = 0; j < N; ++j) {  // columns: B^T d
    T col[N], v[N];
    for (int i = 0; i < N; ++i) col[i] = lanes<T>(d[i][j] + ci);
    input_column<M, T>(col, v);
    for (int i = 0; i < N; ++i) r[i][j] = v[i];
  }
  for (int i = 0; i < N; ++i) {  // rows: (B^T d) B
    T v[N];
    input_column<M, T>(r[i], v);
    for (int j = 0; j < N; ++j) put_lanes<T>(out + (i * N + j) * xi_stride + ci, v[j]);
  }
}

// V[xi][t][c] for the tiles (of M x M pixels) of tile rows [ty0, ty1) of input plane
// (bi, zz): the block's input rows, zero-padded by one pixel (and to whole tiles),
// then B^T d B.
template <int M>
void winograd_input(const float* x, const Geom& s, const WinoGeom& wg, int64_t bi,
                    int64_t zz, int64_t ty0, int64_t ty1, WinoScratch* sc) {
  constexpr int N = M + 2;
  const int64_t wp = M * wg.nt + 2, nrows = M * (ty1 - ty0) + 2;
  const int64_t tiles = (ty1 - ty0) * wg.nt, c = s.c;
  sc->rows.resize(nrows * wp * c);
  for (int64_t r = 0; r < nrows; ++r) {
    const int64_t yy = M * ty0 - 1 + r;
    float* row = sc->rows.data() + r * wp * c;
    if (yy < 0 || yy >= s.h) {
      std::memset(row, 0, sizeof(float) * wp * c);
      continue;
    }
    std::memset(row, 0, sizeof(float) * c);
    std::memcpy(row + c, x + s.row_offset(bi, zz, yy) * c, sizeof(float) * s.w * c);
    std::memset(row + (s.w + 1) * c, 0, sizeof(float) * (wp - s.w - 1) * c);
  }
  const int64_t xi_stride = position_stride(tiles * c);
  sc->v.resize(kPositions<M> * xi_stride);
  for (int64_t ty = ty0; ty < ty1; ++ty)
    for (int64_t t = 0; t < wg.nt; ++t) {
      const int64_t tile = (ty - ty0) * wg.nt + t;
      const float* d[N][N];
      for (int i = 0; i < N; ++i)
        for (int j = 0; j < N; ++j)
          d[i][j] = sc->rows.data() + ((M * (ty - ty0) + i) * wp + M * t + j) * c;
      float* out = sc->v.data() + tile * c;
      int64_t ci = 0;
      for (; ci + kLanes <= c; ci += kLanes)
        input_transform<M, vec>(d, ci, xi_stride, out);
      for (; ci < c; ++ci) input_transform<M, float>(d, ci, xi_stride, out);
    }
}

// m[t][o0 + kLanes v] (+)= sum_c v[t * c + ci] u[ci * o + o0 + kLanes v] for MP
// tiles t: the direct kernel's register tile with one tap.
template <int MP, int NV>
inline void wino_tile(const float* v, const float* u, int64_t c, int64_t o, bool add,
                      float* m) {
  vec acc[MP][NV];
  for (int p = 0; p < MP; ++p)
    for (int q = 0; q < NV; ++q) acc[p][q] = add ? loadv(m + p * o + kLanes * q) : vec{};
  const float* vr[(MP + 7) / 8];
  for (int g = 0; g < (MP + 7) / 8; ++g) vr[g] = v + 8 * g * c;
  for (int64_t ci = 0; ci < c; ++ci) {
    vec uv[NV];
    for (int q = 0; q < NV; ++q) uv[q] = loadv(u + ci * o + kLanes * q);
    for (int p = 0; p < MP; ++p) {
      const float xv = vr[p / 8][(p % 8) * c + ci];
      for (int q = 0; q < NV; ++q) acc[p][q] += xv * uv[q];
    }
  }
  for (int p = 0; p < MP; ++p)
    for (int q = 0; q < NV; ++q)
      *reinterpret_cast<vecu*>(m + p * o + kLanes * q) = acc[p][q];
}

template <int MP, int NV>
void wino_tiles(const float* v, const float* u, int64_t tiles, int64_t c, int64_t o,
                bool add, float* m) {
  int64_t t = 0;
  for (; t + MP <= tiles; t += MP) wino_tile<MP, NV>(v + t * c, u, c, o, add, m + t * o);
  if constexpr (MP > 1) {
    if (t < tiles) wino_tiles<MP / 2, NV>(v + t * c, u, tiles - t, c, o, add, m + t * o);
  }
}

// M[xi] (+)= V[xi] U[xi] for the block's tiles, xi in [0, positions).
void winograd_products(const float* v, const float* u, int64_t tiles, int positions,
                       const Geom& s, bool add, float* m) {
  const int64_t c = s.c, o = s.o;
  for (int xi = 0; xi < positions; ++xi) {
    const float* vx = v + xi * position_stride(tiles * c);
    const float* ux = u + xi * position_stride(c * o);
    float* mx = m + xi * position_stride(tiles * o);
    int64_t o0 = 0;
    for (; o0 + 2 * kLanes <= o; o0 += 2 * kLanes)
      wino_tiles<kWide, 2>(vx, ux + o0, tiles, c, o, add, mx + o0);
    for (; o0 + kLanes <= o; o0 += kLanes)
      wino_tiles<kNarrow, 1>(vx, ux + o0, tiles, c, o, add, mx + o0);
    for (int64_t t = 0; t < tiles; ++t)  // fewer than kLanes channels left
      for (int64_t oi = o0; oi < o; ++oi) {
        float acc = add ? mx[t * o + oi] : 0.0f;
        for (int64_t ci = 0; ci < c; ++ci) acc += vx[t * c + ci] * ux[ci * o + oi];
        mx[t * o + oi] = acc;
      }
  }
}

// A^T m for one column of the (M + 2) x (M + 2) product m (the A^T of F(M x M, 3 x 3)).
template <int M, typename T>
inline void output_column(const T (&m)[M + 2], T (&y)[M]) {
  if constexpr (M == 2) {
    y[0] = m[0] + m[1] + m[2];
    y[1] = m[1] - m[2] - m[3];
  } else {
    const T s12 = m[1] + m[2], d12 = m[1] - m[2];
    const T s34 = m[3] + m[4], d34 = m[3] - m[4];
    y[0] = m[0] + s12 + s34;
    y[1] = d12 + 2.0f * d34;
    y[2] = s12 + 4.0f * s34;
    y[3] = d12 + 8.0f * d34 + m[5];
  }
}

// A^T m A for channels [oi, oi + L) of one tile: m at M[0][tile] (positions
// xi_stride apart), y[i][j] at output pixel (i, j) of the tile. T: vec or float.
template <int M, typename T>
inline void output_transform(const float* m, int64_t oi, int64_t xi_stride,
                             float* const (&y)[M][M]) {
  constexpr int N = M + 2;
  T r[M][N];
  for (int j = 0; j < N; ++j) {  // columns: A^T m
    T col[N], out[M];
    for (int i = 0; i < N; ++i) col[i] = lanes<T>(m + (i * N + j) * xi_stride + oi);
    output_column<M, T>(col, out);
    for (int i = 0; i < M; ++i) r[i][j] = out[i];
  }
  for (int i = 0; i < M; ++i) {  // rows: (A^T m) A
    T out[M];
    output_column<M, T>(r[i], out);
    for (int j = 0; j < M; ++j) put_lanes<T>(y[i][j] + oi, out[j]);
  }
}

// y = A^T M A for the block's tiles, the pixels inside the image (those outside go
// to a scratch pixel).
template <int M>
void winograd_output(const float* m, const Geom& s, const WinoGeom& wg, int64_t bi,
                     int64_t z, int64_t ty0, int64_t ty1, float* y, float* spare) {
  const int64_t o = s.o, tiles = (ty1 - ty0) * wg.nt;
  const int64_t xi_stride = position_stride(tiles * o);
  for (int64_t ty = ty0; ty < ty1; ++ty)
    for (int64_t t = 0; t < wg.nt; ++t) {
      const float* mt = m + ((ty - ty0) * wg.nt + t) * o;
      float* yp[M][M];
      for (int i = 0; i < M; ++i)
        for (int j = 0; j < M; ++j) {
          const int64_t yy = M * ty + i, xx = M * t + j;
          yp[i][j] = yy < s.h && xx < s.w ? y + (s.row_offset(bi, z, yy) + xx) * o
                                          : spare;
        }
      int64_t oi = 0;
      for (; oi + kLanes <= o; oi += kLanes)
        output_transform<M, vec>(mt, oi, xi_stride, yp);
      for (; oi < o; ++oi) output_transform<M, float>(mt, oi, xi_stride, yp);
    }
}

// Blocks [k0, k1) (block k: plane k / blocks_per_plane, tile rows from k %
// blocks_per_plane), summed over the depth taps whose plane exists.
template <int M>
void winograd_blocks(const float* x, const float* u, float* y, const Geom& s,
                     const WinoGeom& wg, int64_t k0, int64_t k1) {
  constexpr int kP = kPositions<M>;
  thread_local WinoScratch sc;
  for (int64_t k = k0; k < k1; ++k) {
    const int64_t plane = k / wg.blocks_per_plane, bi = plane / s.d, z = plane % s.d;
    const int64_t ty0 = k % wg.blocks_per_plane * wg.rows_per_block;
    const int64_t ty1 = std::min(wg.nty, ty0 + wg.rows_per_block);
    const int64_t tiles = (ty1 - ty0) * wg.nt;
    sc.m.resize(kP * position_stride(tiles * s.o));
    bool add = false;
    for (int64_t a = 0; a < s.kd; ++a) {
      const int64_t zz = z + a - s.pd;
      if (zz < 0 || zz >= s.d) continue;
      winograd_input<M>(x, s, wg, bi, zz, ty0, ty1, &sc);
      winograd_products(sc.v.data(), u + a * kP * position_stride(s.c * s.o), tiles, kP,
                        s, add,
                        sc.m.data());
      add = true;
    }
    if (!add) std::fill(sc.m.begin(), sc.m.end(), 0.0f);
    sc.spare.resize(s.o);
    winograd_output<M>(sc.m.data(), s, wg, bi, z, ty0, ty1, y, sc.spare.data());
  }
}

// Kernel gradient by Winograd's F(3x3, 4x4) or F(3x3, 2x2) (`wgrad_tile`), the same
// idea turned round: for each M x M tile of the output gradient g and the (M + 2) x
// (M + 2) input pixels x around it, the tile's share of the 3 x 3 kernel gradient is
//
//   dK_tile = G^T [(B^T x B) * (A g A^T)] G,
//
// with the B^T and G of F(M x M, 3 x 3) and A the transpose of its A^T; for M = 2
//
//   B^T = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]],
//   A = [[1, 0], [1, 1], [1, -1], [0, -1]],
//   G^T = [[1, 1/2, 1/2, 0], [0, 1/2, -1/2, 0], [0, 1/2, 1/2, 1]],
//
// and for M = 4 the forward pass's matrices above. Summed over tiles, that is (M +
// 2)^2 products M[xi] += V[xi]^T W[xi] (V [tiles, C] the transformed input, W [tiles,
// O] the transformed output gradient), in the direct kernel gradient's register tiles
// (`row_product`), then one transform of M into dK: 36 multiply-adds per input and
// output channel for 16 output pixels (M = 4) or 16 for 4 (M = 2), against 144 or 36.

// A g for one column of M output-gradient pixels (A: the transpose of the A^T of
// F(M x M, 3 x 3)).
template <int M, typename T>
inline void grad_column(const T (&g)[M], T (&w)[M + 2]) {
  if constexpr (M == 2) {
    w[0] = g[0];
    w[1] = g[0] + g[1];
    w[2] = g[0] - g[1];
    w[3] = -g[1];
  } else {
    const T e = g[0] + g[2], o = g[1] + g[3];
    const T e4 = g[0] + 4.0f * g[2], o8 = 2.0f * g[1] + 8.0f * g[3];
    w[0] = g[0];
    w[1] = e + o;
    w[2] = e - o;
    w[3] = e4 + o8;
    w[4] = e4 - o8;
    w[5] = g[3];
  }
}

// A g A^T for channels [oi, oi + L) of one tile: g[i][j] at output-gradient pixel
// (i, j) of the tile (a row of zeros outside the image), out at W[0][tile]
// (positions xi_stride apart). T: vec or float.
template <int M, typename T>
inline void grad_transform(const float* const (&g)[M][M], int64_t oi,
                           int64_t xi_stride, float* out) {
  constexpr int N = M + 2;
  T r[N][M];
  for (int j = 0; j < M; ++j) {  // columns: A g
    T col[M], w[N];
    for (int i = 0; i < M; ++i) col[i] = lanes<T>(g[i][j] + oi);
    grad_column<M, T>(col, w);
    for (int i = 0; i < N; ++i) r[i][j] = w[i];
  }
  for (int i = 0; i < N; ++i) {  // rows: (A g) A^T
    T w[N];
    grad_column<M, T>(r[i], w);
    for (int j = 0; j < N; ++j) put_lanes<T>(out + (i * N + j) * xi_stride + oi, w[j]);
  }
}

// W[xi][t][o] = (A g_t A^T)[xi] for the tiles of tile rows [ty0, ty1) of output
// plane (bi, z); g pixels outside the image read `zeros` (o floats).
template <int M>
void winograd_grad_output(const float* g, const Geom& s, const WinoGeom& wg,
                          int64_t bi, int64_t z, int64_t ty0, int64_t ty1,
                          const float* zeros, std::vector<float>* w) {
  const int64_t o = s.o, tiles = (ty1 - ty0) * wg.nt;
  const int64_t xi_stride = position_stride(tiles * o);
  w->resize(kPositions<M> * xi_stride);
  for (int64_t ty = ty0; ty < ty1; ++ty)
    for (int64_t t = 0; t < wg.nt; ++t) {
      const float* gp[M][M];
      for (int i = 0; i < M; ++i)
        for (int j = 0; j < M; ++j) {
          const int64_t yy = M * ty + i, xx = M * t + j;
          gp[i][j] = yy < s.h && xx < s.w ? g + (s.row_offset(bi, z, yy) + xx) * o
                                          : zeros;
        }
      float* out = w->data() + ((ty - ty0) * wg.nt + t) * o;
      int64_t oi = 0;
      for (; oi + kLanes <= o; oi += kLanes)
        grad_transform<M, vec>(gp, oi, xi_stride, out);
      for (; oi < o; ++oi) grad_transform<M, float>(gp, oi, xi_stride, out);
    }
}

// m[a][xi] ([C, O]) += V[xi]^T W[xi] over the tiles of blocks [k0, k1), for each depth
// tap a whose input plane exists.
template <int M>
void winograd_wgrad_blocks(const float* x, const float* g, const Geom& s,
                           const WinoGeom& wg, int64_t k0, int64_t k1, float* m) {
  constexpr int kP = kPositions<M>;
  thread_local WinoScratch sc;
  const int64_t co = s.c * s.o;
  sc.spare.assign(s.o, 0.0f);
  for (int64_t k = k0; k < k1; ++k) {
    const int64_t plane = k / wg.blocks_per_plane, bi = plane / s.d, z = plane % s.d;
    const int64_t ty0 = k % wg.blocks_per_plane * wg.rows_per_block;
    const int64_t ty1 = std::min(wg.nty, ty0 + wg.rows_per_block);
    const int64_t tiles = (ty1 - ty0) * wg.nt;
    winograd_grad_output<M>(g, s, wg, bi, z, ty0, ty1, sc.spare.data(), &sc.w);
    for (int64_t a = 0; a < s.kd; ++a) {
      const int64_t zz = z + a - s.pd;
      if (zz < 0 || zz >= s.d) continue;
      winograd_input<M>(x, s, wg, bi, zz, ty0, ty1, &sc);
      for (int xi = 0; xi < kP; ++xi)
        row_product(sc.v.data() + xi * position_stride(tiles * s.c),
                    sc.w.data() + xi * position_stride(tiles * s.o), tiles, s.c, s.o,
                    m + (a * kP + xi) * position_stride(co));
    }
  }
}

// G^T m for one column of the (M + 2) x (M + 2) sum m (G: that of F(M x M, 3 x 3)).
template <int M>
inline void wgrad_column(const float (&m)[M + 2], float (&r)[3]) {
  if constexpr (M == 2) {
    r[0] = m[0] + 0.5f * (m[1] + m[2]);
    r[1] = 0.5f * (m[1] - m[2]);
    r[2] = 0.5f * (m[1] + m[2]) + m[3];
  } else {
    constexpr float k4 = 1.0f / 4, k6 = 1.0f / 6, k12 = 1.0f / 12, k24 = 1.0f / 24;
    const float s12 = m[1] + m[2], d12 = m[1] - m[2];
    const float s34 = m[3] + m[4], d34 = m[3] - m[4];
    r[0] = k4 * m[0] - k6 * s12 + k24 * s34;
    r[1] = k12 * d34 - k6 * d12;
    r[2] = k6 * (s34 - s12) + m[5];
  }
}

// dK[a, i, j] = (G^T M[a] G)[i, j], entries [q0, q1) of each [C, O] slice.
template <int M>
void winograd_wgrad_output(const float* m, const Geom& s, int64_t q0, int64_t q1,
                           float* dk) {
  constexpr int N = M + 2;
  const int64_t co = s.c * s.o, ms = position_stride(co);
  for (int64_t a = 0; a < s.kd; ++a) {
    const float* ma = m + a * kPositions<M> * ms;
    float* da = dk + a * 9 * co;
    for (int64_t q = q0; q < q1; ++q) {
      float r[3][N];
      for (int j = 0; j < N; ++j) {  // columns: G^T M
        float col[N], out[3];
        for (int i = 0; i < N; ++i) col[i] = ma[(i * N + j) * ms + q];
        wgrad_column<M>(col, out);
        for (int i = 0; i < 3; ++i) r[i][j] = out[i];
      }
      for (int i = 0; i < 3; ++i) {  // rows: (G^T M) G
        float out[3];
        wgrad_column<M>(r[i], out);
        for (int j = 0; j < 3; ++j) da[(i * 3 + j) * co + q] = out[j];
      }
    }
  }
}

// ---------------------------------------------------------------------------------
// Max pooling over windows (wd, wh, ww) that tile the input exactly, with the index
// of each window's first maximum in row-major order (nn.max_pool's gradient rule),
// so that the gradient is a scatter of g to those positions. A NaN is the maximum
// of any window it is in (the first NaN, as lax.max propagates it).

struct PoolGeom {
  int64_t b, d, h, w, c, wd, wh, ww;
  int64_t od() const { return d / wd; }
  int64_t oh() const { return h / wh; }
  int64_t ow() const { return w / ww; }
  int64_t out_rows() const { return b * od() * oh(); }
  // Input pixel (window position q of output pixel (r, xo)), as an offset in pixels.
  int64_t in_pixel(int64_t r, int64_t xo, int64_t q) const {
    const int64_t bi = r / (od() * oh()), zo = r / oh() % od(), yo = r % oh();
    const int64_t a = q / (wh * ww), i = q / ww % wh, j = q % ww;
    return ((bi * d + zo * wd + a) * h + yo * wh + i) * w + xo * ww + j;
  }
};

void pool_rows(const float* x, float* y, uint8_t* idx, const PoolGeom& s, int64_t r0,
               int64_t r1) {
  const int64_t window = s.wd * s.wh * s.ww;
  for (int64_t r = r0; r < r1; ++r)
    for (int64_t xo = 0; xo < s.ow(); ++xo) {
      float* best = y + (r * s.ow() + xo) * s.c;
      uint8_t* arg = idx + (r * s.ow() + xo) * s.c;
      const float* first = x + s.in_pixel(r, xo, 0) * s.c;
      for (int64_t ci = 0; ci < s.c; ++ci) {
        best[ci] = first[ci];
        arg[ci] = 0;
      }
      for (int64_t q = 1; q < window; ++q) {
        const float* v = x + s.in_pixel(r, xo, q) * s.c;
        for (int64_t ci = 0; ci < s.c; ++ci) {
          const bool take = best[ci] == best[ci] && (v[ci] > best[ci] || v[ci] != v[ci]);
          best[ci] = take ? v[ci] : best[ci];
          arg[ci] = take ? static_cast<uint8_t>(q) : arg[ci];
        }
      }
    }
}

void pool_grad_rows(const float* g, const uint8_t* idx, float* dx, const PoolGeom& s,
                    int64_t r0, int64_t r1) {
  const int64_t window = s.wd * s.wh * s.ww;
  for (int64_t r = r0; r < r1; ++r)
    for (int64_t xo = 0; xo < s.ow(); ++xo) {
      const float* gv = g + (r * s.ow() + xo) * s.c;
      const uint8_t* arg = idx + (r * s.ow() + xo) * s.c;
      for (int64_t q = 0; q < window; ++q) {
        float* out = dx + s.in_pixel(r, xo, q) * s.c;
        for (int64_t ci = 0; ci < s.c; ++ci) out[ci] = arg[ci] == q ? gv[ci] : 0.0f;
      }
    }
}

// ---------------------------------------------------------------------------------
// FFI handlers.

// The call's sizes from x [B, D, H, W, C], the kernel [KD, KH, KW, C, O] and the
// output-like operand out [B, D, H, W, O]; an error names what disagrees.
ffi::Error geometry(const char* name, ffi::Span<const int64_t> xd,
                    ffi::Span<const int64_t> kd, ffi::Span<const int64_t> od,
                    int64_t pd, int64_t ph, int64_t pw, Geom* s) {
  if (xd.size() != 5 || kd.size() != 5 || od.size() != 5)
    return ffi::Error::InvalidArgument(std::string(name) + ": operands must be rank 5");
  *s = Geom{xd[0], xd[1], xd[2], xd[3], xd[4], od[4], kd[0], kd[1], kd[2], pd, ph, pw};
  if (od[0] != s->b || od[1] != s->d || od[2] != s->h || od[3] != s->w ||
      kd[3] != s->c || kd[4] != s->o)
    return ffi::Error::InvalidArgument(std::string(name) + ": shapes do not agree");
  if (pd < 0 || ph < 0 || pw < 0 || pd >= s->kd || ph >= s->kh || pw >= s->kw)
    return ffi::Error::InvalidArgument(std::string(name) +
                                       ": each pad must be in [0, kernel size)");
  return ffi::Error::Success();
}

ffi::Error ConvWgradImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                         ffi::Buffer<ffi::F32> g, ffi::ResultBuffer<ffi::F32> dk,
                         int64_t pad_d, int64_t pad_h, int64_t pad_w) {
  Geom s;
  ffi::Error error = geometry("conv_wgrad", x.dimensions(), dk->dimensions(),
                              g.dimensions(), pad_d, pad_h, pad_w, &s);
  if (error.failure()) return error;
  const float* xv = x.typed_data();
  const float* gv = g.typed_data();
  sum_over_chunks(pool, s.rows(), num_wgrad_chunks(pool, s.rows(), s.w),
                  s.kd * s.kh * s.kw * s.c * s.o, dk->typed_data(),
                  [&](int64_t r0, int64_t r1, float* partial) {
                    wgrad_rows(xv, gv, s, r0, r1, partial);
                  });
  return ffi::Error::Success();
}

ffi::Error ConvImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                    ffi::Buffer<ffi::F32> k, ffi::ResultBuffer<ffi::F32> y,
                    int64_t pad_d, int64_t pad_h, int64_t pad_w) {
  Geom s;
  ffi::Error error = geometry("conv", x.dimensions(), k.dimensions(), y->dimensions(),
                              pad_d, pad_h, pad_w, &s);
  if (error.failure()) return error;
  const float* xv = x.typed_data();
  const float* kv = k.typed_data();
  float* yv = y->typed_data();
  parallel_rows(pool, s.rows(), num_chunks(pool, s.rows()),
                [&](int64_t, int64_t r0, int64_t r1) { fwd_rows(xv, kv, yv, s, r0, r1); });
  return ffi::Error::Success();
}

// The forward pass's tile, 4 x 4 or 2 x 2. F(4x4, 3x3) does 1.78 times fewer
// multiply-adds than F(2x2, 3x3), but its transformed kernel U (36 C O floats a depth
// tap) is 2.25 times larger, and each block of tiles reads all of it: so 4 x 4 where a
// plane holds a whole block of 4 x 4 tiles (kWinoTiles), or where one tap's U fits in
// half an L2 cache (1 MiB, 7,281 channel pairs: 64 x 64 does); 2 x 2 for the small
// planes of many channels deep in a U-Net (16 x 16 x 256 in 2D, 8 x 8 x 8 x 128 in
// 3D), where U's traffic, not the multiply-adds, sets the pace.
int forward_tile(const Geom& s) {
  const int64_t tiles4 = (s.h + 3) / 4 * ((s.w + 3) / 4);
  const bool u_in_l2 = kPositions<4> * s.c * s.o * int64_t{4} <= (int64_t{1} << 20);
  return tiles4 >= kWinoTiles || u_in_l2 ? 4 : 2;
}

template <int M>
void winograd_forward(ffi::ThreadPool& pool, const float* x, const float* k, float* y,
                      const Geom& s) {
  const int64_t co = s.c * s.o;
  std::vector<float> u(s.kd * kPositions<M> * position_stride(co));
  parallel_rows(pool, co, num_chunks(pool, co), [&](int64_t, int64_t q0, int64_t q1) {
    winograd_kernel<M>(k, s, q0, q1, u.data());
  });
  const WinoGeom wg(s, M);
  const int64_t blocks = s.b * s.d * wg.blocks_per_plane;
  parallel_rows(pool, blocks, num_chunks(pool, blocks),
                [&](int64_t, int64_t k0, int64_t k1) {
                  winograd_blocks<M>(x, u.data(), y, s, wg, k0, k1);
                });
}

// `geometry` for the Winograd kernels, which take 3 x 3 kernels in H and W with pads
// (1, 1) there, and a `tile` of 0 (the kernel's choice), 2 or 4.
ffi::Error winograd_geometry(const char* name, ffi::Span<const int64_t> xd,
                             ffi::Span<const int64_t> kd, ffi::Span<const int64_t> od,
                             int64_t pd, int64_t ph, int64_t pw, int64_t tile, Geom* s) {
  if (tile != 0 && tile != 2 && tile != 4)
    return ffi::Error::InvalidArgument(std::string(name) + ": tile must be 0, 2 or 4");
  ffi::Error error = geometry(name, xd, kd, od, pd, ph, pw, s);
  if (error.failure()) return error;
  if (s->kh != 3 || s->kw != 3 || s->ph != 1 || s->pw != 1)
    return ffi::Error::InvalidArgument(
        std::string(name) + ": takes 3 x 3 kernels in H and W with pads (1, 1) there");
  return ffi::Error::Success();
}

// `tile` 0: `forward_tile`'s choice; 2 or 4: that tile ("UnetConvWinogradTile", for
// tests and A/Bs).
ffi::Error ConvWinogradTileImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                                ffi::Buffer<ffi::F32> k, ffi::ResultBuffer<ffi::F32> y,
                                int64_t pad_d, int64_t pad_h, int64_t pad_w,
                                int64_t tile) {
  Geom s;
  ffi::Error error = winograd_geometry("conv_winograd", x.dimensions(), k.dimensions(),
                                       y->dimensions(), pad_d, pad_h, pad_w, tile, &s);
  if (error.failure()) return error;
  if ((tile == 0 ? forward_tile(s) : tile) == 4)
    winograd_forward<4>(pool, x.typed_data(), k.typed_data(), y->typed_data(), s);
  else
    winograd_forward<2>(pool, x.typed_data(), k.typed_data(), y->typed_data(), s);
  return ffi::Error::Success();
}

ffi::Error ConvWinogradImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                            ffi::Buffer<ffi::F32> k, ffi::ResultBuffer<ffi::F32> y,
                            int64_t pad_d, int64_t pad_h, int64_t pad_w) {
  return ConvWinogradTileImpl(pool, x, k, y, pad_d, pad_h, pad_w, 0);
}

template <int M>
void winograd_wgrad(ffi::ThreadPool& pool, const float* x, const float* g, float* dk,
                    const Geom& s) {
  const WinoGeom wg(s, M);
  const int64_t co = s.c * s.o, size = s.kd * kPositions<M> * position_stride(co);
  const int64_t blocks = s.b * s.d * wg.blocks_per_plane;
  std::vector<float> m(size);
  sum_over_chunks(pool, blocks, num_wgrad_chunks(pool, blocks, kWinoTiles * M * M), size,
                  m.data(), [&](int64_t k0, int64_t k1, float* partial) {
                    winograd_wgrad_blocks<M>(x, g, s, wg, k0, k1, partial);
                  });
  parallel_rows(pool, co, num_chunks(pool, co), [&](int64_t, int64_t q0, int64_t q1) {
    winograd_wgrad_output<M>(m.data(), s, q0, q1, dk);
  });
}

// The kernel gradient's tile: F(3x3, 4x4) where a plane holds a whole block of 4 x 4
// tiles, else F(3x3, 2x2). Unlike the forward pass, a small plane of few channels
// keeps 2 x 2 (16³ x 64 in 3D: 0.91x with 4 x 4): the products, one per position and
// block, are V^T W over the block's tiles, too few in a small plane to fill the
// register tiles' loop.
int wgrad_tile(const Geom& s) {
  return (s.h + 3) / 4 * ((s.w + 3) / 4) >= kWinoTiles ? 4 : 2;
}

// `tile` as in ConvWinogradTileImpl: F(3x3, 4x4) or F(3x3, 2x2), `wgrad_tile`'s choice
// for 0.
ffi::Error ConvWinogradWgradTileImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                                     ffi::Buffer<ffi::F32> g,
                                     ffi::ResultBuffer<ffi::F32> dk, int64_t pad_d,
                                     int64_t pad_h, int64_t pad_w, int64_t tile) {
  Geom s;
  ffi::Error error =
      winograd_geometry("conv_winograd_wgrad", x.dimensions(), dk->dimensions(),
                        g.dimensions(), pad_d, pad_h, pad_w, tile, &s);
  if (error.failure()) return error;
  if ((tile == 0 ? wgrad_tile(s) : tile) == 4)
    winograd_wgrad<4>(pool, x.typed_data(), g.typed_data(), dk->typed_data(), s);
  else
    winograd_wgrad<2>(pool, x.typed_data(), g.typed_data(), dk->typed_data(), s);
  return ffi::Error::Success();
}

ffi::Error ConvWinogradWgradImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                                 ffi::Buffer<ffi::F32> g, ffi::ResultBuffer<ffi::F32> dk,
                                 int64_t pad_d, int64_t pad_h, int64_t pad_w) {
  return ConvWinogradWgradTileImpl(pool, x, g, dk, pad_d, pad_h, pad_w, 0);
}

// x [B, D, H, W, C] and the pooled shape [B, D/wd, H/wh, W/ww, C] of y, idx or g.
ffi::Error pool_geometry(const char* name, ffi::Span<const int64_t> xd,
                         ffi::Span<const int64_t> yd, int64_t wd, int64_t wh,
                         int64_t ww, PoolGeom* s) {
  if (xd.size() != 5 || yd.size() != 5)
    return ffi::Error::InvalidArgument(std::string(name) + ": operands must be rank 5");
  if (wd < 1 || wh < 1 || ww < 1 || wd * wh * ww > 255)
    return ffi::Error::InvalidArgument(std::string(name) +
                                       ": windows of 1 to 255 positions");
  *s = PoolGeom{xd[0], xd[1], xd[2], xd[3], xd[4], wd, wh, ww};
  if (s->d % wd || s->h % wh || s->w % ww || yd[0] != s->b || yd[1] != s->od() ||
      yd[2] != s->oh() || yd[3] != s->ow() || yd[4] != s->c)
    return ffi::Error::InvalidArgument(std::string(name) + ": shapes do not agree");
  return ffi::Error::Success();
}

ffi::Error MaxPoolImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                       ffi::ResultBuffer<ffi::F32> y, ffi::ResultBuffer<ffi::U8> idx,
                       int64_t wd, int64_t wh, int64_t ww) {
  PoolGeom s;
  ffi::Error error = pool_geometry("max_pool", x.dimensions(), y->dimensions(), wd, wh,
                                   ww, &s);
  if (error.failure()) return error;
  const float* xv = x.typed_data();
  float* yv = y->typed_data();
  uint8_t* iv = idx->typed_data();
  parallel_rows(pool, s.out_rows(), num_chunks(pool, s.out_rows()),
                [&](int64_t, int64_t r0, int64_t r1) { pool_rows(xv, yv, iv, s, r0, r1); });
  return ffi::Error::Success();
}

ffi::Error MaxPoolGradImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> g,
                           ffi::Buffer<ffi::U8> idx, ffi::ResultBuffer<ffi::F32> dx,
                           int64_t wd, int64_t wh, int64_t ww) {
  PoolGeom s;
  ffi::Error error = pool_geometry("max_pool_grad", dx->dimensions(), g.dimensions(),
                                   wd, wh, ww, &s);
  if (error.failure()) return error;
  const float* gv = g.typed_data();
  const uint8_t* iv = idx.typed_data();
  float* dv = dx->typed_data();
  parallel_rows(pool, s.out_rows(), num_chunks(pool, s.out_rows()),
                [&](int64_t, int64_t r0, int64_t r1) { pool_grad_rows(gv, iv, dv, s, r0, r1); });
  return ffi::Error::Success();
}

}  // namespace

// Both convolution kernels: two float32 operands, one result, the pads.
static auto ConvBinding() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Ret<ffi::Buffer<ffi::F32>>()
      .Attr<int64_t>("pad_d")
      .Attr<int64_t>("pad_h")
      .Attr<int64_t>("pad_w");
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(UnetConv, ConvImpl, ConvBinding());

XLA_FFI_DEFINE_HANDLER_SYMBOL(UnetConvWgrad, ConvWgradImpl, ConvBinding());

XLA_FFI_DEFINE_HANDLER_SYMBOL(UnetConvWinograd, ConvWinogradImpl, ConvBinding());

XLA_FFI_DEFINE_HANDLER_SYMBOL(UnetConvWinogradTile, ConvWinogradTileImpl,
                              ConvBinding().Attr<int64_t>("tile"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(UnetConvWinogradWgradTile, ConvWinogradWgradTileImpl,
                              ConvBinding().Attr<int64_t>("tile"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(UnetConvWinogradWgrad, ConvWinogradWgradImpl,
                              ConvBinding());

XLA_FFI_DEFINE_HANDLER_SYMBOL(UnetMaxPool, MaxPoolImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::U8>>()
                                  .Attr<int64_t>("wd")
                                  .Attr<int64_t>("wh")
                                  .Attr<int64_t>("ww"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(UnetMaxPoolGrad, MaxPoolGradImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("wd")
                                  .Attr<int64_t>("wh")
                                  .Attr<int64_t>("ww"));
