// Fused multi-head attention core for XLA:CPU, called through jax.ffi (see cpu_attention.py).
//
// Why hand-written: XLA:CPU (jaxlib 0.10.2) runs the batched score and context matmuls on one core
// at 40-55 GFLOP/s, and its oneDNN path for them corrupts the heap. Here each (example, head) pair is
// one work item on XLA's intra-op thread pool; its scores stay in L1/L2 (computed four query rows
// at a time), padded keys are skipped (they contribute exact zeros), and q, k, v and the context
// keep the token-major [B, L, heads, d] layout of the dense layers (no transposes).
//
// ctx[b, i, h, :] = sum_j softmax_j(q[b, i, h, :] . k[b, j, h, :] + bias[h, i, j] over kept j) v[b, j, h, :];
// a query whose row has no kept key gets a zero context (as the einsum path in bert.py). Two entry
// points share the code: MkdmAttention (no bias: BERT) and MkdmAttentionBias (an fp32 score bias
// [heads, L, L] shared by the batch: MPNet's relative positions).

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

typedef float v8 __attribute__((vector_size(32)));

inline v8 Load(const float* p) {
  v8 r;
  std::memcpy(&r, p, sizeof(r));
  return r;
}
inline void Store(float* p, v8 v) { std::memcpy(p, &v, sizeof(v)); }

constexpr int kRows = 4;             // query rows per block (register blocking)
constexpr float kMasked = -1e30f;    // score of the padding columns up to a multiple of 16

struct Problem {
  const float* q;
  const float* k;
  const float* v;
  const float* keep;
  const float* bias;  // [heads, L, L], or nullptr
  float* out;
  int64_t batch, length, heads, dim;
};

// Work space of one thread: kept keys as rows [cols][dim] and transposed [dim][cols], kept values
// [cols][dim], a block of scores [kRows][cols], the kept key positions.
struct Scratch {
  explicit Scratch(const Problem& p)
      : cols(((p.length + 15) / 16) * 16),
        kt(p.dim * cols), kr(cols * p.dim), vk(cols * p.dim), s(kRows * cols), kept(cols) {}
  int64_t cols;
  std::vector<float> kt, kr, vk, s;
  std::vector<int64_t> kept;
};

// Scores of R query rows against n16 (a multiple of 16) transposed keys: 2 x R accumulators stay in
// registers while the dot runs over dim.
template <int R>
void Scores(const float* const* qrow, const float* kt, int64_t n16, int64_t dim, float* s) {
  for (int64_t j = 0; j < n16; j += 16) {
    v8 a0[R] = {}, a1[R] = {};
    for (int64_t c = 0; c < dim; ++c) {
      v8 k0 = Load(kt + c * n16 + j), k1 = Load(kt + c * n16 + j + 8);
      asm("" : "+x"(k0), "+x"(k1));  // keep them in registers: GCC re-loaded them for every row
      for (int r = 0; r < R; ++r) {
        a0[r] += qrow[r][c] * k0;
        a1[r] += qrow[r][c] * k1;
      }
    }
    for (int r = 0; r < R; ++r) {
      Store(s + r * n16 + j, a0[r]);
      Store(s + r * n16 + j + 8, a1[r]);
    }
  }
}

// Context of R rows of unnormalised probabilities p [R][n16] with n kept values vk [n][dim]
// (dim % 8 == 0), 16 columns at a time where they fit.
template <int R>
void Context(const float* p, int64_t n, int64_t n16, const float* vk, int64_t dim,
             const float* scale, float* const* orow) {
  int64_t c = 0;
  for (; c + 16 <= dim; c += 16) {
    v8 a0[R] = {}, a1[R] = {};
    for (int64_t j = 0; j < n; ++j) {
      v8 v0 = Load(vk + j * dim + c), v1 = Load(vk + j * dim + c + 8);
      asm("" : "+x"(v0), "+x"(v1));  // as in Scores
      for (int r = 0; r < R; ++r) {
        a0[r] += p[r * n16 + j] * v0;
        a1[r] += p[r * n16 + j] * v1;
      }
    }
    for (int r = 0; r < R; ++r) {
      Store(orow[r] + c, a0[r] * scale[r]);
      Store(orow[r] + c + 8, a1[r] * scale[r]);
    }
  }
  for (; c < dim; c += 8) {
    v8 a[R] = {};
    for (int64_t j = 0; j < n; ++j) {
      const v8 vv = Load(vk + j * dim + c);
      for (int r = 0; r < R; ++r) a[r] += p[r * n16 + j] * vv;
    }
    for (int r = 0; r < R; ++r) Store(orow[r] + c, a[r] * scale[r]);
  }
}

// Adds a query's bias row to its n kept scores: contiguous when the kept keys are a prefix (right
// padding: cols is null), else gathered at the kept positions cols.
void AddBias(float* row, const float* bias, const int64_t* cols, int64_t n) {
  if (cols == nullptr) {
    for (int64_t j = 0; j < n; ++j) row[j] += bias[j];
  } else {
    for (int64_t j = 0; j < n; ++j) row[j] += bias[cols[j]];
  }
}

// Context of R query rows: scores (plus their bias rows brow, if any), softmax over the n kept
// columns (padding columns n..n16 become 0), times the kept values.
template <int R>
void Block(const float* const* qrow, const float* const* brow, const int64_t* cols, float* const* orow,
           const Scratch& w, int64_t n, int64_t n16, int64_t dim, float* s) {
  float scale[R];
  Scores<R>(qrow, w.kt.data(), n16, dim, s);
  for (int r = 0; r < R; ++r) {
    float* row = s + r * n16;
    if (brow != nullptr) AddBias(row, brow[r], cols, n);
    for (int64_t j = n; j < n16; ++j) row[j] = kMasked;
    float m = row[0];
    for (int64_t j = 1; j < n; ++j) m = std::max(m, row[j]);
    float total = 0.0f;
    for (int64_t j = 0; j < n16; ++j) {  // vectorised through libmvec (-ffast-math)
      row[j] = std::exp(row[j] - m);
      total += row[j];
    }
    scale[r] = 1.0f / total;
  }
  Context<R>(s, n, n16, w.vk.data(), dim, scale, orow);
}

void Item(const Problem& p, int64_t item, Scratch& w) {
  const int64_t b = item / p.heads, h = item % p.heads, L = p.length, D = p.dim;
  const int64_t stride = p.heads * D;  // between tokens
  const float* base_q = p.q + b * L * stride + h * D;
  const float* base_k = p.k + b * L * stride + h * D;
  const float* base_v = p.v + b * L * stride + h * D;
  float* base_o = p.out + b * L * stride + h * D;
  const float* base_b = p.bias == nullptr ? nullptr : p.bias + h * L * L;
  int64_t n = 0;
  for (int64_t j = 0; j < L; ++j) n += p.keep[b * L + j] != 0.0f;
  if (n == 0) {
    for (int64_t i = 0; i < L; ++i) std::memset(base_o + i * stride, 0, D * sizeof(float));
    return;
  }
  const int64_t n16 = ((n + 15) / 16) * 16;
  std::fill(w.kt.begin(), w.kt.begin() + D * n16, 0.0f);
  for (int64_t j = 0, col = 0; j < L; ++j) {
    if (p.keep[b * L + j] == 0.0f) continue;
    std::memcpy(w.kr.data() + col * D, base_k + j * stride, D * sizeof(float));
    std::memcpy(w.vk.data() + col * D, base_v + j * stride, D * sizeof(float));
    w.kept[col++] = j;
  }
  const int64_t* cols = w.kept[n - 1] == n - 1 ? nullptr : w.kept.data();
  // Transposed from the contiguous copy: strided loads straight from k stalled on every element.
  for (int64_t c = 0; c < D; ++c) {
    for (int64_t j = 0; j < n; ++j) w.kt[c * n16 + j] = w.kr[j * D + c];
  }
  const float* qrow[kRows];
  const float* brow_data[kRows];
  const float* const* brow = base_b == nullptr ? nullptr : brow_data;
  float* orow[kRows];
  for (int64_t i0 = 0; i0 < L; i0 += kRows) {
    const int rows = static_cast<int>(std::min<int64_t>(kRows, L - i0));
    for (int r = 0; r < rows; ++r) {
      qrow[r] = base_q + (i0 + r) * stride;
      orow[r] = base_o + (i0 + r) * stride;
      if (brow != nullptr) brow_data[r] = base_b + (i0 + r) * L;
    }
    switch (rows) {
      case 4: Block<4>(qrow, brow, cols, orow, w, n, n16, D, w.s.data()); break;
      case 3: Block<3>(qrow, brow, cols, orow, w, n, n16, D, w.s.data()); break;
      case 2: Block<2>(qrow, brow, cols, orow, w, n, n16, D, w.s.data()); break;
      default: Block<1>(qrow, brow, cols, orow, w, n, n16, D, w.s.data());
    }
  }
}

struct Shared {
  Problem problem;
  int64_t items;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
};

// Claims items until none is left. A pool task that starts after all items are claimed returns
// without touching the buffers (which XLA may already reuse).
void Drain(Shared& sh) {
  std::unique_ptr<Scratch> w;
  for (int64_t i; (i = sh.next.fetch_add(1, std::memory_order_relaxed)) < sh.items;) {
    if (!w) w = std::make_unique<Scratch>(sh.problem);
    Item(sh.problem, i, *w);
    sh.done.fetch_add(1, std::memory_order_release);
  }
}

// Both entry points: bias is null or [heads, L, L].
ffi::Error Run(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
               ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::F32> keep, const float* bias,
               ffi::ResultBuffer<ffi::F32> out) {
  const auto dims = q.dimensions();
  if (dims.size() != 4 || dims[3] % 8 != 0) {
    return ffi::Error::InvalidArgument("mkdm_attention: q must be [batch, length, heads, d], d % 8 == 0");
  }
  auto sh = std::make_shared<Shared>();
  sh->problem = {q.typed_data(), k.typed_data(), v.typed_data(), keep.typed_data(), bias,
                 out->typed_data(), dims[0], dims[1], dims[2], dims[3]};
  sh->items = dims[0] * dims[2];
  // The caller drains too, so it never waits on a task that has not started (no deadlock when
  // the pool is busy or absent: Schedule then runs the task inline).
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), sh->items) - 1;
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule([sh] { Drain(*sh); });
  Drain(*sh);
  while (sh->done.load(std::memory_order_acquire) < sh->items) std::this_thread::yield();
  return ffi::Error::Success();
}

ffi::Error Attention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                     ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::F32> keep,
                     ffi::ResultBuffer<ffi::F32> out) {
  return Run(pool, q, k, v, keep, nullptr, out);
}

ffi::Error BiasedAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                           ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::F32> keep,
                           ffi::Buffer<ffi::F32> bias, ffi::ResultBuffer<ffi::F32> out) {
  const auto dims = q.dimensions(), b = bias.dimensions();
  if (dims.size() == 4 && (b.size() != 3 || b[0] != dims[2] || b[1] != dims[1] || b[2] != dims[1])) {
    return ffi::Error::InvalidArgument("mkdm_attention: bias must be [heads, length, length]");
  }
  return Run(pool, q, k, v, keep, bias.typed_data(), out);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MkdmAttention, Attention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(MkdmAttentionBias, BiasedAttention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
