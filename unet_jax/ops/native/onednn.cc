// Stride-1 'same' 2D and 3D convolutions for XLA:CPU by oneDNN's convolution
// primitives (the library PyTorch's CPU convolutions use), as FFI calls:
//
//   "UnetOnednnConv":      x [N, (D,) H, W, C], k [(KD,) KH, KW, C, O] -> y [N, (D,) H, W, O]
//   "UnetOnednnInputGrad": g [N, (D,) H, W, O], k                      -> dx [N, (D,) H, W, C]
//   "UnetOnednnWgrad":     x, g                                        -> dk [(KD,) KH, KW, C, O]
//
// Channels-last activations and HWIO (DHWIO) kernels, as the project stores them;
// float32. With the `act_block` attribute b (8 or 16) the activations come and go
// in channel blocks instead, [N, C / b, (D,) H, W, b] (oneDNN's nChw8c, nCdhw8c and
// their 16 forms), read and written as they are; unet_jax/ops/onednn.py transposes
// them in the XLA program around the call. The padding is XLA's 'SAME' for stride
// 1: (k - 1) / 2 before and the rest after each spatial axis, so even kernel sizes
// are asymmetric, as in XLA.
//
// oneDNN chooses the kernel's memory layout for each primitive when
// `blocked_weights` is 1 (format_tag::any: blocked layouts its AVX2/AVX-512 kernels
// read fastest); the kernel, or the kernel gradient, is then reordered from or to
// HWIO on every call. With 0 the primitives read and write HWIO directly (which
// usually selects oneDNN's slower gemm-based implementation). Likewise
// `blocked_activations` 1 lets it choose the activations' layout (for example
// nChw8c), reordered from and to channels-last around the call; unet_jax/ops/onednn.py
// says where that pays.
//
// Every primitive is created with oneDNN's deterministic attribute: the same inputs
// give bitwise the same outputs on every call, which exact resume relies on.
//
// Creating a primitive costs milliseconds (it generates machine code), so each
// (operation, shapes, layout choice) gets one, created on first use and kept in a
// process-wide map under a mutex. Executing a primitive from several threads at
// once is allowed by oneDNN; each call allocates its own reorder buffer.
//
// Threads: oneDNN runs each primitive on its own threading runtime (TBB or OpenMP,
// `dnnl_config.h`), over the cores the process may use; XLA's intra-op pool waits
// meanwhile. Built by unet_jax/ops/onednn.py against the installed oneDNN wheel.

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using dnnl::memory;
using tag = dnnl::memory::format_tag;
using dt = dnnl::memory::data_type;

enum Op : int64_t { kForward = 0, kInputGrad = 1, kWgrad = 2 };

// One problem: spatial rank, the sizes and the layout choice.
struct Problem {
  int64_t op, ndim, n, c, o, blocked, blocked_act, act_block;
  int64_t size[3];    // D, H, W (D = 1 in 2D)
  int64_t kernel[3];  // KD, KH, KW (KD = 1 in 2D)
  bool operator<(const Problem& b) const {
    return std::memcmp(this, &b, sizeof(Problem)) < 0;
  }
};

struct Compiled {
  dnnl::primitive prim;
  memory::desc x_md, k_md, y_md;  // what the primitive reads and writes
  memory::desc x_plain, y_plain;  // the activations as stored (channels-last)
  bool x_reorder = false, y_reorder = false;
  dnnl::primitive x_reorder_prim, y_reorder_prim;
  memory::desc k_plain;           // the kernel as HWIO (DHWIO)
  bool reorder = false;           // k_md differs from k_plain
  dnnl::primitive reorder_prim;   // k_plain -> k_md, or k_md -> k_plain (wgrad)
  std::string impl;
};

dnnl::engine& engine() {
  static dnnl::engine* eng = new dnnl::engine(dnnl::engine::kind::cpu, 0);
  return *eng;
}

dnnl::stream& stream() {
  thread_local dnnl::stream s(engine());
  return s;
}

memory::dims dims_of(const Problem& p, int64_t channels) {
  if (p.ndim == 2) return {p.n, channels, p.size[1], p.size[2]};
  return {p.n, channels, p.size[0], p.size[1], p.size[2]};
}

memory::dims kernel_dims(const Problem& p) {
  if (p.ndim == 2) return {p.o, p.c, p.kernel[1], p.kernel[2]};
  return {p.o, p.c, p.kernel[0], p.kernel[1], p.kernel[2]};
}

// The activations' layout as stored: channels-last, or channel blocks of 8 or 16
// ([N, C / b, (D,) H, W, b], oneDNN's nChw8c / nCdhw8c and their 16 forms).
tag stored_layout(const Problem& p) {
  if (p.act_block == 8) return p.ndim == 2 ? tag::nChw8c : tag::nCdhw8c;
  if (p.act_block == 16) return p.ndim == 2 ? tag::nChw16c : tag::nCdhw16c;
  return p.ndim == 2 ? tag::nhwc : tag::ndhwc;
}

// A reorder from the primitive's layout to the stored one (`to_plain`), or back.
dnnl::primitive between(const memory::desc& prim, const memory::desc& plain,
                        bool to_plain) {
  auto& eng = engine();
  return to_plain ? dnnl::reorder(dnnl::reorder::primitive_desc(eng, prim, eng, plain))
                  : dnnl::reorder(dnnl::reorder::primitive_desc(eng, plain, eng, prim));
}

std::unique_ptr<Compiled> compile(const Problem& p) {
  const int64_t first = 3 - p.ndim;
  memory::dims strides(p.ndim, 1), pad_l(p.ndim), pad_r(p.ndim);
  for (int64_t i = 0; i < p.ndim; ++i) {
    const int64_t k = p.kernel[first + i];
    pad_l[i] = (k - 1) / 2;
    pad_r[i] = k - 1 - pad_l[i];
  }
  const tag act = stored_layout(p);
  const tag ker = p.ndim == 2 ? tag::hwio : tag::dhwio;
  // Activations stored blocked are read and written as they are; channels-last ones
  // may be reordered to the layout oneDNN chooses (`blocked_activations`).
  const tag act_want = p.blocked_act && !p.act_block ? tag::any : act;
  memory::desc x_plain(dims_of(p, p.c), dt::f32, act);
  memory::desc y_plain(dims_of(p, p.o), dt::f32, act);
  memory::desc x_md(dims_of(p, p.c), dt::f32, act_want);
  memory::desc y_md(dims_of(p, p.o), dt::f32, act_want);
  memory::desc k_plain(kernel_dims(p), dt::f32, ker);
  memory::desc k_want(kernel_dims(p), dt::f32, p.blocked ? tag::any : ker);
  auto algo = dnnl::algorithm::convolution_direct;
  auto& eng = engine();
  // Bitwise the same result on every call (exact resume compares runs bit by bit).
  dnnl::primitive_attr attr;
  attr.set_deterministic(true);
  dnnl::convolution_forward::primitive_desc fwd(
      eng, dnnl::prop_kind::forward_training, algo, x_md, k_want, y_md, strides,
      pad_l, pad_r, attr);
  auto out = std::make_unique<Compiled>();
  out->x_plain = x_plain;
  out->y_plain = y_plain;
  out->k_plain = k_plain;
  if (p.op == kForward) {
    out->prim = dnnl::convolution_forward(fwd);
    out->k_md = fwd.weights_desc();
    out->x_md = fwd.src_desc();
    out->y_md = fwd.dst_desc();
    out->impl = fwd.impl_info_str();
  } else if (p.op == kInputGrad) {
    dnnl::convolution_backward_data::primitive_desc bwd(
        eng, algo, x_md, k_want, y_md, strides, pad_l, pad_r, fwd, attr);
    out->prim = dnnl::convolution_backward_data(bwd);
    out->k_md = bwd.weights_desc();
    out->x_md = bwd.diff_src_desc();
    out->y_md = bwd.diff_dst_desc();
    out->impl = bwd.impl_info_str();
  } else {
    dnnl::convolution_backward_weights::primitive_desc bwd(
        eng, algo, x_md, k_want, y_md, strides, pad_l, pad_r, fwd, attr);
    out->prim = dnnl::convolution_backward_weights(bwd);
    out->k_md = bwd.diff_weights_desc();
    out->x_md = bwd.src_desc();
    out->y_md = bwd.diff_dst_desc();
    out->impl = bwd.impl_info_str();
  }
  // Blocked activations: reordered from channels-last before the primitive (its
  // inputs) or back after it (its output: the forward result, the input gradient).
  out->x_reorder = out->x_md != x_plain;
  out->y_reorder = out->y_md != y_plain;
  if (out->x_reorder)
    out->x_reorder_prim = between(out->x_md, x_plain, p.op == kInputGrad);
  if (out->y_reorder)
    out->y_reorder_prim = between(out->y_md, y_plain, p.op == kForward);
  out->reorder = out->k_md != k_plain;
  if (out->reorder) out->reorder_prim = between(out->k_md, k_plain, p.op == kWgrad);
  return out;
}

std::mutex cache_mutex;
std::map<Problem, std::unique_ptr<Compiled>>& cache() {
  static auto* m = new std::map<Problem, std::unique_ptr<Compiled>>();
  return *m;
}

const Compiled& lookup(const Problem& p) {
  std::lock_guard<std::mutex> lock(cache_mutex);
  auto& entry = cache()[p];
  if (!entry) entry = compile(p);
  return *entry;
}

// The problem from the activations (channels-last [N, (D,) H, W, C], or blocked
// [N, C / b, (D,) H, W, b] when `act_block` is b), the kernel and the output
// channels; an error names what disagrees.
ffi::Error problem(const char* name, int64_t op, ffi::Span<const int64_t> xd,
                   ffi::Span<const int64_t> kd, ffi::Span<const int64_t> yd,
                   int64_t blocked, int64_t blocked_act, int64_t act_block, Problem* p) {
  const size_t krank = kd.size();
  const size_t rank = act_block ? krank + 1 : krank;
  if ((krank != 4 && krank != 5) || xd.size() != rank || yd.size() != rank)
    return ffi::Error::InvalidArgument(
        std::string(name) + ": operands must all be rank 4 (2D) or rank 5 (3D), the"
                            " activations one more when blocked");
  if (act_block != 0 && act_block != 8 && act_block != 16)
    return ffi::Error::InvalidArgument(std::string(name) + ": act_block must be 0, 8 or 16");
  std::memset(p, 0, sizeof(Problem));
  p->op = op;
  p->ndim = static_cast<int64_t>(krank) - 2;
  p->n = xd[0];
  const size_t first = act_block ? 2 : 1;  // the first spatial axis
  p->c = act_block ? xd[1] * xd[rank - 1] : xd[rank - 1];
  p->o = act_block ? yd[1] * yd[rank - 1] : yd[rank - 1];
  p->blocked = blocked ? 1 : 0;
  p->blocked_act = blocked_act ? 1 : 0;
  p->act_block = act_block;
  if (act_block && (xd[rank - 1] != act_block || yd[rank - 1] != act_block))
    return ffi::Error::InvalidArgument(std::string(name) +
                                       ": the last axis of blocked activations must be"
                                       " act_block");
  for (int64_t i = 0; i < 3; ++i) {
    p->size[i] = 1;
    p->kernel[i] = 1;
  }
  for (int64_t i = 0; i < p->ndim; ++i) {
    p->size[3 - p->ndim + i] = xd[first + i];
    p->kernel[3 - p->ndim + i] = kd[i];
    if (yd[first + i] != xd[first + i])
      return ffi::Error::InvalidArgument(std::string(name) +
                                         ": input and output sizes differ");
  }
  if (yd[0] != p->n || kd[krank - 2] != p->c || kd[krank - 1] != p->o)
    return ffi::Error::InvalidArgument(std::string(name) + ": shapes do not agree");
  return ffi::Error::Success();
}

// Runs the primitive of `p`: x and y are the activations (input and output side),
// k the kernel in HWIO; which of them are written depends on the operation.
ffi::Error run(const Problem& p, void* x, void* k, void* y) {
  try {
    const Compiled& c = lookup(p);
    auto& eng = engine();
    auto& s = stream();
    memory xplain(c.x_plain, eng, x), yplain(c.y_plain, eng, y), kplain(c.k_plain, eng, k);
    memory xm = c.x_reorder ? memory(c.x_md, eng) : xplain;
    memory ym = c.y_reorder ? memory(c.y_md, eng) : yplain;
    if (c.x_reorder && p.op != kInputGrad)
      c.x_reorder_prim.execute(s, {{DNNL_ARG_FROM, xplain}, {DNNL_ARG_TO, xm}});
    if (c.y_reorder && p.op != kForward)
      c.y_reorder_prim.execute(s, {{DNNL_ARG_FROM, yplain}, {DNNL_ARG_TO, ym}});
    const bool reorder = c.reorder;
    memory km = reorder ? memory(c.k_md, eng) : kplain;
    if (reorder && p.op != kWgrad)
      c.reorder_prim.execute(s, {{DNNL_ARG_FROM, kplain}, {DNNL_ARG_TO, km}});
    if (p.op == kForward) {
      c.prim.execute(s, {{DNNL_ARG_SRC, xm}, {DNNL_ARG_WEIGHTS, km}, {DNNL_ARG_DST, ym}});
    } else if (p.op == kInputGrad) {
      c.prim.execute(
          s, {{DNNL_ARG_DIFF_SRC, xm}, {DNNL_ARG_WEIGHTS, km}, {DNNL_ARG_DIFF_DST, ym}});
    } else {
      c.prim.execute(
          s, {{DNNL_ARG_SRC, xm}, {DNNL_ARG_DIFF_WEIGHTS, km}, {DNNL_ARG_DIFF_DST, ym}});
      if (reorder) c.reorder_prim.execute(s, {{DNNL_ARG_FROM, km}, {DNNL_ARG_TO, kplain}});
    }
    if (c.x_reorder && p.op == kInputGrad)
      c.x_reorder_prim.execute(s, {{DNNL_ARG_FROM, xm}, {DNNL_ARG_TO, xplain}});
    if (c.y_reorder && p.op == kForward)
      c.y_reorder_prim.execute(s, {{DNNL_ARG_FROM, ym}, {DNNL_ARG_TO, yplain}});
    s.wait();
  } catch (const dnnl::error& e) {
    return ffi::Error::Internal(std::string("oneDNN: ") + e.what());
  } catch (const std::exception& e) {
    return ffi::Error::Internal(std::string("oneDNN call: ") + e.what());
  }
  return ffi::Error::Success();
}

ffi::Error ConvImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> k,
                    ffi::ResultBuffer<ffi::F32> y, int64_t blocked_weights,
                    int64_t blocked_activations, int64_t act_block) {
  Problem p;
  ffi::Error error = problem("onednn_conv", kForward, x.dimensions(), k.dimensions(),
                             y->dimensions(), blocked_weights, blocked_activations,
                             act_block, &p);
  if (error.failure()) return error;
  return run(p, x.untyped_data(), k.untyped_data(), y->untyped_data());
}

ffi::Error InputGradImpl(ffi::Buffer<ffi::F32> g, ffi::Buffer<ffi::F32> k,
                         ffi::ResultBuffer<ffi::F32> dx, int64_t blocked_weights,
                         int64_t blocked_activations, int64_t act_block) {
  Problem p;
  ffi::Error error = problem("onednn_input_grad", kInputGrad, dx->dimensions(),
                             k.dimensions(), g.dimensions(), blocked_weights,
                             blocked_activations, act_block, &p);
  if (error.failure()) return error;
  return run(p, dx->untyped_data(), k.untyped_data(), g.untyped_data());
}

ffi::Error WgradImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> g,
                     ffi::ResultBuffer<ffi::F32> dk, int64_t blocked_weights,
                     int64_t blocked_activations, int64_t act_block) {
  Problem p;
  ffi::Error error = problem("onednn_wgrad", kWgrad, x.dimensions(), dk->dimensions(),
                             g.dimensions(), blocked_weights, blocked_activations,
                             act_block, &p);
  if (error.failure()) return error;
  return run(p, x.untyped_data(), dk->untyped_data(), g.untyped_data());
}

}  // namespace

static auto Binding() {
  return ffi::Ffi::Bind()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Ret<ffi::Buffer<ffi::F32>>()
      .Attr<int64_t>("blocked_weights")
      .Attr<int64_t>("blocked_activations")
      .Attr<int64_t>("act_block");
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(UnetOnednnConv, ConvImpl, Binding());

XLA_FFI_DEFINE_HANDLER_SYMBOL(UnetOnednnInputGrad, InputGradImpl, Binding());

XLA_FFI_DEFINE_HANDLER_SYMBOL(UnetOnednnWgrad, WgradImpl, Binding());

// Creates the CPU engine and one small primitive: "" when oneDNN works here, else
// the reason (for example no SYCL CPU device). Called once through ctypes before
// the FFI targets are registered, so a broken install is a warning, not a crash.
extern "C" const char* UnetOnednnProbe() {
  static std::string message;
  try {
    Problem p;
    std::memset(&p, 0, sizeof(Problem));
    p.op = kForward;
    p.ndim = 2;
    p.n = p.c = p.o = 1;
    p.blocked = 1;
    for (int i = 0; i < 3; ++i) p.size[i] = p.kernel[i] = 1;
    p.size[1] = p.size[2] = 4;
    p.kernel[1] = p.kernel[2] = 3;
    lookup(p);
    message.clear();
  } catch (const std::exception& e) {
    message = e.what();
    if (message.empty()) message = "unknown error";
  }
  return message.c_str();
}

// The implementation oneDNN chose for a problem (for benchmarks and logs), e.g.
// "brg_conv_fwd:avx2"; "" if it cannot be created.
extern "C" const char* UnetOnednnImpl(int64_t op, int64_t ndim, const int64_t* x_shape,
                                      const int64_t* kernel_spatial, int64_t out_channels,
                                      int64_t blocked, int64_t blocked_act,
                                      int64_t act_block) {
  static thread_local std::string impl;
  try {
    Problem p;
    std::memset(&p, 0, sizeof(Problem));
    p.op = op;
    p.ndim = ndim;
    p.n = x_shape[0];
    p.c = x_shape[ndim + 1];
    p.o = out_channels;
    p.blocked = blocked ? 1 : 0;
    p.blocked_act = blocked_act ? 1 : 0;
    p.act_block = act_block;
    for (int i = 0; i < 3; ++i) p.size[i] = p.kernel[i] = 1;
    for (int64_t i = 0; i < ndim; ++i) {
      p.size[3 - ndim + i] = x_shape[1 + i];
      p.kernel[3 - ndim + i] = kernel_spatial[i];
    }
    impl = lookup(p).impl;
  } catch (const std::exception&) {
    impl.clear();
  }
  return impl.c_str();
}
