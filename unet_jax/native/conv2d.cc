// Stride-1 2D convolutions for XLA:CPU, as FFI calls: the forward pass (which also
// gives the input gradient) and the kernel gradient.
//
// Forward ("UnetConv2d"), on an input already padded by the caller:
//
//   y[b, y, x, o] = sum_{i < kh, j < kw, c} xp[b, y + i, x + j, c] * k[i, j, c, o]
//
// with xp [B, H + kh - 1, W + kw - 1, C], k [kh, kw, C, O] (HWIO), y [B, H, W, O].
// Each output row is computed in register tiles of up to 8 pixels x 32 output
// channels (or 16 x 16), held in vector registers over the whole contraction (taps
// and input channels) and stored once. The input gradient of a 'same' convolution is
// this forward pass on the padded output gradient with the kernel flipped and its
// channel axes swapped (unet_jax/native_kernels.py).
//
// Kernel gradient ("UnetConvWgrad") of a stride-1 'same' convolution:
//
//   dK[i, j, c, o] = sum_{b, y, x} x[b, y + i - ph, x + j - pw, c] * g[b, y, x, o]
//
// with x [B, H, W, C], g [B, H, W, O] (channels last, float32), dK [kh, kw, C, O]
// (HWIO) and ph = (kh - 1) / 2, pw = (kw - 1) / 2 (XLA's 'SAME'); taps that fall
// outside the image contribute zero. XLA:CPU computes this gradient as a
// convolution whose contraction per tap is the batch (4 in the U-Net's 2D
// benchmark), far below its matrix-product rate. Here it is a sum of small matrix
// products, one per output row and tap: for output row (b, y) and tap (i, j),
// dK[i, j] += X^T G, where X is row y + i - ph of x shifted by j - pw along W
// ([W, C], contiguous) and G is row y of g ([W, O]). A register tile of up to 8
// input channels x 32 output channels is held in vector registers across the W
// pixels. Each chunk of rows sums into its own copy of dK; the copies are added in
// chunk order at the end, so the result is the same whichever thread ran a chunk.
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
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

typedef float v16 __attribute__((vector_size(64)));
// The same vector, at any float-aligned address (unaligned loads and stores).
typedef float v16u __attribute__((vector_size(64), aligned(4)));

struct Shape {
  int64_t b, h, w, c, o, kh, kw;
};

inline v16 load16(const float* p) { return *reinterpret_cast<const v16u*>(p); }

inline void add16(float* p, v16 v) { *reinterpret_cast<v16u*>(p) += v; }

// acc[m][v] = sum_p xrow[p * c + m] * grow[p * o + 16 v], p in [0, n): an MC x
// (16 NV) tile of X^T G, added into dk (row stride o).
template <int MC, int NV>
inline void tile(const float* xrow, const float* grow, int64_t n, int64_t c,
                 int64_t o, float* dk) {
  v16 acc[MC][NV];
  for (int m = 0; m < MC; ++m)
    for (int v = 0; v < NV; ++v) acc[m][v] = v16{};
  for (int64_t p = 0; p < n; ++p) {
    v16 gv[NV];
    for (int v = 0; v < NV; ++v) gv[v] = load16(grow + p * o + 16 * v);
    const float* xp = xrow + p * c;
    for (int m = 0; m < MC; ++m) {
      const float s = xp[m];
      for (int v = 0; v < NV; ++v) acc[m][v] += s * gv[v];
    }
  }
  for (int m = 0; m < MC; ++m)
    for (int v = 0; v < NV; ++v) add16(dk + m * o + 16 * v, acc[m][v]);
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

// Register tiles: 8 x 32 (16 accumulators) or 16 x 16 output values.
constexpr int MC2 = 8, MC1 = 16;
// dk[c, o] += sum_p xrow[p, c] grow[p, o] over n pixels.
void row_product(const float* xrow, const float* grow, int64_t n, int64_t c,
                 int64_t o, float* dk) {
  int64_t o0 = 0;
  for (; o0 + 32 <= o; o0 += 32) tiles_over_c<MC2, 2>(xrow, grow + o0, n, c, c, o, dk + o0);
  for (; o0 + 16 <= o; o0 += 16) tiles_over_c<MC1, 1>(xrow, grow + o0, n, c, c, o, dk + o0);
  if (o0 < o) {  // fewer than 16 output channels left: plain loops.
    for (int64_t p = 0; p < n; ++p)
      for (int64_t ci = 0; ci < c; ++ci) {
        const float s = xrow[p * c + ci];
        for (int64_t oi = o0; oi < o; ++oi) dk[ci * o + oi] += s * grow[p * o + oi];
      }
  }
}

// Adds the contribution of output rows [r0, r1) (row r = b * h + y) into dk.
void rows(const float* x, const float* g, const Shape& s, int64_t r0, int64_t r1,
          float* dk) {
  const int64_t ph = (s.kh - 1) / 2, pw = (s.kw - 1) / 2;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t b = r / s.h, y = r % s.h;
    const float* grow_all = g + (b * s.h + y) * s.w * s.o;
    for (int64_t i = 0; i < s.kh; ++i) {
      const int64_t yy = y + i - ph;
      if (yy < 0 || yy >= s.h) continue;
      const float* xrow_all = x + (b * s.h + yy) * s.w * s.c;
      for (int64_t j = 0; j < s.kw; ++j) {
        // Output pixels p with input column p + j - pw inside [0, W).
        const int64_t shift = j - pw;
        const int64_t p0 = std::max<int64_t>(0, -shift);
        const int64_t p1 = std::min<int64_t>(s.w, s.w - shift);
        if (p1 <= p0) continue;
        row_product(xrow_all + (p0 + shift) * s.c, grow_all + p0 * s.o, p1 - p0,
                    s.c, s.o, dk + (i * s.kw + j) * s.c * s.o);
      }
    }
  }
}

// Forward pass: y row (b, y), MP pixels, channels [o0, o0 + 16 NV), summed over
// the taps and input channels [c0, c1); the first channel block writes y, the
// others add to it.
template <int MP, int NV>
inline void fwd_tile(const float* xp, const float* k, float* y, int64_t wp,
                     int64_t c, int64_t o, int64_t kh, int64_t kw, int64_t c0,
                     int64_t c1) {
  v16 acc[MP][NV];
  for (int m = 0; m < MP; ++m)
    for (int v = 0; v < NV; ++v)
      acc[m][v] = c0 == 0 ? v16{} : load16(y + m * o + 16 * v);
  for (int64_t i = 0; i < kh; ++i)
    for (int64_t j = 0; j < kw; ++j) {
      const float* xr = xp + (i * wp + j) * c;
      const float* kr = k + (i * kw + j) * c * o;
      for (int64_t ci = c0; ci < c1; ++ci) {
        v16 kv[NV];
        for (int v = 0; v < NV; ++v) kv[v] = load16(kr + ci * o + 16 * v);
        for (int m = 0; m < MP; ++m) {
          const float s = xr[m * c + ci];
          for (int v = 0; v < NV; ++v) acc[m][v] += s * kv[v];
        }
      }
    }
  for (int m = 0; m < MP; ++m)
    for (int v = 0; v < NV; ++v)
      *reinterpret_cast<v16u*>(y + m * o + 16 * v) = acc[m][v];
}

// Pixels [0, count) of one output row: tiles of MP pixels, then smaller ones.
template <int MP, int NV>
inline void fwd_pixels(const float* xp, const float* k, float* y, int64_t count,
                       int64_t wp, int64_t c, int64_t o, int64_t kh, int64_t kw,
                       int64_t c0, int64_t c1) {
  int64_t p = 0;
  for (; p + MP <= count; p += MP)
    fwd_tile<MP, NV>(xp + p * c, k, y + p * o, wp, c, o, kh, kw, c0, c1);
  if constexpr (MP > 1) {
    if (p < count)
      fwd_pixels<MP / 2, NV>(xp + p * c, k, y + p * o, count - p, wp, c, o, kh, kw,
                             c0, c1);
  }
}

// Input channels per block of the forward pass: the block's kernel slice for one
// tile of output channels (kh * kw * 32 * 32 floats, 36 KiB for 3 x 3) stays in L1
// while a whole row of pixels uses it.
constexpr int64_t kChannelBlock = 32;

struct ConvShape {
  int64_t b, h, w, c, o, kh, kw;  // output H, W; the input is padded to H+kh-1, W+kw-1
};

void fwd_rows(const float* xp, const float* k, float* y, const ConvShape& s,
              int64_t r0, int64_t r1) {
  const int64_t hp = s.h + s.kh - 1, wp = s.w + s.kw - 1;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t b = r / s.h, yy = r % s.h;
    const float* xrow = xp + (b * hp + yy) * wp * s.c;
    float* yrow = y + r * s.w * s.o;
    int64_t o0 = 0;
    // A last channel block of fewer than half a block joins the one before it.
    const int64_t nblocks =
        std::max<int64_t>(1, (s.c + kChannelBlock / 2) / kChannelBlock);
    for (; o0 + 32 <= s.o; o0 += 32)
      for (int64_t cb = 0; cb < nblocks; ++cb)
        fwd_pixels<8, 2>(xrow, k + o0, yrow + o0, s.w, wp, s.c, s.o, s.kh, s.kw,
                         cb * kChannelBlock,
                         cb + 1 == nblocks ? s.c : (cb + 1) * kChannelBlock);
    for (; o0 + 16 <= s.o; o0 += 16)
      for (int64_t cb = 0; cb < nblocks; ++cb)
        fwd_pixels<16, 1>(xrow, k + o0, yrow + o0, s.w, wp, s.c, s.o, s.kh, s.kw,
                          cb * kChannelBlock,
                          cb + 1 == nblocks ? s.c : (cb + 1) * kChannelBlock);
    if (o0 < s.o) {  // fewer than 16 output channels left: plain loops.
      for (int64_t p = 0; p < s.w; ++p)
        for (int64_t oi = o0; oi < s.o; ++oi) {
          float acc = 0.0f;
          for (int64_t i = 0; i < s.kh; ++i)
            for (int64_t j = 0; j < s.kw; ++j) {
              const float* xv = xrow + ((i * wp) + p + j) * s.c;
              const float* kv = k + (i * s.kw + j) * s.c * s.o + oi;
              for (int64_t ci = 0; ci < s.c; ++ci) acc += xv[ci] * kv[ci * s.o];
            }
          yrow[p * s.o + oi] = acc;
        }
    }
  }
}

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

ffi::Error ConvWgradImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                         ffi::Buffer<ffi::F32> g,
                         ffi::ResultBuffer<ffi::F32> dk) {
  auto xd = x.dimensions(), gd = g.dimensions(), kd = dk->dimensions();
  if (xd.size() != 4 || gd.size() != 4 || kd.size() != 4)
    return ffi::Error::InvalidArgument("conv_wgrad: x, g and dK must be rank 4");
  Shape s{xd[0], xd[1], xd[2], xd[3], gd[3], kd[0], kd[1]};
  if (gd[0] != s.b || gd[1] != s.h || gd[2] != s.w || kd[2] != s.c || kd[3] != s.o)
    return ffi::Error::InvalidArgument("conv_wgrad: shapes do not agree");
  const int64_t size = s.kh * s.kw * s.c * s.o;
  // One partial dK per chunk, summed in chunk order: the result does not depend on
  // which thread ran which chunk, so repeated runs are bit-identical.
  const int64_t nchunks = num_wgrad_chunks(pool, s.b * s.h, s.w);
  std::vector<std::vector<float>> partial(nchunks);
  const float* xv = x.typed_data();
  const float* gv = g.typed_data();
  parallel_rows(pool, s.b * s.h, nchunks, [&](int64_t k, int64_t r0, int64_t r1) {
    partial[k].assign(size, 0.0f);
    rows(xv, gv, s, r0, r1, partial[k].data());
  });
  float* out = dk->typed_data();
  std::memset(out, 0, sizeof(float) * size);
  for (const std::vector<float>& p : partial)
    for (int64_t k = 0; k < static_cast<int64_t>(p.size()); ++k) out[k] += p[k];
  return ffi::Error::Success();
}

ffi::Error Conv2dImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> xp,
                      ffi::Buffer<ffi::F32> k, ffi::ResultBuffer<ffi::F32> y) {
  auto xd = xp.dimensions(), kd = k.dimensions(), yd = y->dimensions();
  if (xd.size() != 4 || kd.size() != 4 || yd.size() != 4)
    return ffi::Error::InvalidArgument("conv2d: x, k and y must be rank 4");
  ConvShape s{yd[0], yd[1], yd[2], kd[2], kd[3], kd[0], kd[1]};
  if (xd[0] != s.b || xd[1] != s.h + s.kh - 1 || xd[2] != s.w + s.kw - 1 ||
      xd[3] != s.c || yd[3] != s.o)
    return ffi::Error::InvalidArgument("conv2d: shapes do not agree");
  const float* xv = xp.typed_data();
  const float* kv = k.typed_data();
  float* yv = y->typed_data();
  parallel_rows(pool, s.b * s.h, num_chunks(pool, s.b * s.h),
                [&](int64_t, int64_t r0, int64_t r1) { fwd_rows(xv, kv, yv, s, r0, r1); });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(UnetConv2d, Conv2dImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(UnetConvWgrad, ConvWgradImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
