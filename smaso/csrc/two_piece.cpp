// Hand-written CPU kernels of the beta-VQ of a two-piece MASO {x, s x}, the maths of
// smaso.activations.two_piece_vq (Theorem 3 with R = 2, then Eq. 2) with the sigmoid
// weight (alpha = 1), and of its derivatives two_piece_vq_grads, on units as rows:
// x (M, L) contiguous, one eta per row (M).
//
//   forward:  y = x (s + c w(u)),             u = eta c x,  c = 1 - s,  w = sigmoid
//   backward: grad_x = g (s + c (w + u w')),  w' = w (1 - w),
//             grad_eta[r] = sum_j g (c x)^2 w'  (the row's part of the eta gradient)
//
// One pass over memory each way, like PyTorch's own SiLU kernels: vectorised with
// ATen's Vectorized (two vectors per step), and run in parallel by at::parallel_for
// (the extension is compiled with OpenMP, PyTorch's own thread pool: torch's thread
// count applies). The work is split into fixed chunks of CHUNK elements of a row
// (whole rows when L <= CHUNK), chosen by L alone: a row's grad_eta is the sum of its
// chunks' partial sums in chunk order, so every number is the same whatever the
// number of threads (bitwise). Built on first use by smaso/native.py
// (torch.utils.cpp_extension); smaso.fused falls back to kernels compiled by
// torch.compile where it cannot be built.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>
#include <torch/version.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

using at::vec::Vectorized;

// Elements per chunk: a multiple of two vectors of every width (so only a row's last
// chunk has a scalar tail), long enough to amortise a task, short enough that a few
// long rows still split across threads.
constexpr int64_t CHUNK = 8192;

// The chunks of (M, L) rows: chunk i is row i / per_row, elements [begin, end).
struct Chunks {
  int64_t L, per_row;
  explicit Chunks(int64_t L)
      : L(L), per_row(std::max<int64_t>(1, (L + CHUNK - 1) / CHUNK)) {}
  int64_t row(int64_t i) const { return i / per_row; }
  int64_t begin(int64_t i) const { return (i % per_row) * CHUNK; }
  int64_t end(int64_t i) const { return std::min(L, begin(i) + CHUNK); }
  // chunks per task: about 32768 elements (ATen's own grain size)
  int64_t grain() const {
    return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, std::min(L, CHUNK)));
  }
};

// exp of a vector: ATen's exp_u20 where there is one (float32 with AVX2 or AVX-512: a
// degree-5 polynomial within 20 ulp, as PyTorch's CPU flash attention uses; measured,
// outputs and gradients as close to float64 as PyTorch's own float32 maths), the
// exact exp otherwise (float64, no vector instructions, torch < 2.5).
template <typename T>
Vectorized<T> fast_exp(const Vectorized<T>& v) {
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 5)
  return v.exp_u20();
#else
  return v.exp();
#endif
}

// Plain: s = 0 (the ReLU), which skips the products by c = 1 and the sum with s = 0.
template <typename T, bool Plain>
void forward_rows(const T* x, const T* eta, T* y, int64_t M, int64_t L, T s) {
  using V = Vectorized<T>;
  const T c = T(1) - s;
  const Chunks chunks(L);
  const int64_t n = M * chunks.per_row;
  at::parallel_for(0, n, chunks.grain(), [&](int64_t first, int64_t last) {
    const V one(T(1)), sv(s), cv(c);
    for (int64_t i = first; i < last; ++i) {
      const int64_t r = chunks.row(i), stop = chunks.end(i);
      const V e(eta[r]);
      const T* xr = x + r * L;
      T* yr = y + r * L;
      int64_t j = chunks.begin(i);
      for (; j + 2 * V::size() <= stop; j += 2 * V::size()) {
        const V x0 = V::loadu(xr + j), x1 = V::loadu(xr + j + V::size());
        if constexpr (Plain) {  // x w(u) = x / (1 + exp(-u))
          (x0 / (one + fast_exp((e * x0).neg()))).store(yr + j);
          (x1 / (one + fast_exp((e * x1).neg()))).store(yr + j + V::size());
        } else {
          const V w0 = one / (one + fast_exp((e * (cv * x0)).neg()));
          const V w1 = one / (one + fast_exp((e * (cv * x1)).neg()));
          (x0 * (sv + cv * w0)).store(yr + j);
          (x1 * (sv + cv * w1)).store(yr + j + V::size());
        }
      }
      for (; j < stop; ++j) {
        const T w = T(1) / (T(1) + std::exp(-(eta[r] * (c * xr[j]))));
        yr[j] = xr[j] * (s + c * w);
      }
    }
  });
}

template <typename T, bool Plain>
void backward_rows(const T* g, const T* x, const T* eta, T* gx, T* geta, int64_t M,
                   int64_t L, T s) {
  using V = Vectorized<T>;
  const T c = T(1) - s;
  const Chunks chunks(L);
  // one partial sum of grad_eta per chunk; with one chunk per row, the row's sum
  std::vector<T> partial(chunks.per_row > 1 ? M * chunks.per_row : 0);
  T* sums = chunks.per_row > 1 ? partial.data() : geta;
  const int64_t n = M * chunks.per_row;
  at::parallel_for(0, n, chunks.grain(), [&](int64_t first, int64_t last) {
    const V one(T(1)), sv(s), cv(c);
    for (int64_t i = first; i < last; ++i) {
      const int64_t r = chunks.row(i), stop = chunks.end(i);
      const V e(eta[r]);
      const T* xr = x + r * L;
      const T* gr = g + r * L;
      T* out = gx + r * L;
      V acc0(T(0)), acc1(T(0));
      int64_t j = chunks.begin(i);
      for (; j + 2 * V::size() <= stop; j += 2 * V::size()) {
        const V x0 = V::loadu(xr + j), x1 = V::loadu(xr + j + V::size());
        const V g0 = V::loadu(gr + j), g1 = V::loadu(gr + j + V::size());
        const V v0 = Plain ? x0 : cv * x0, v1 = Plain ? x1 : cv * x1;
        const V u0 = e * v0, u1 = e * v1;
        const V w0 = one / (one + fast_exp(u0.neg()));
        const V w1 = one / (one + fast_exp(u1.neg()));
        const V d0 = w0 * (one - w0), d1 = w1 * (one - w1);
        if constexpr (Plain) {
          (g0 * (w0 + u0 * d0)).store(out + j);
          (g1 * (w1 + u1 * d1)).store(out + j + V::size());
        } else {
          (g0 * (sv + cv * (w0 + u0 * d0))).store(out + j);
          (g1 * (sv + cv * (w1 + u1 * d1))).store(out + j + V::size());
        }
        acc0 = acc0 + g0 * (v0 * v0 * d0);
        acc1 = acc1 + g1 * (v1 * v1 * d1);
      }
      T acc = at::vec::vec_reduce_all<T>(
          [](V& a, V& b) { return a + b; }, acc0 + acc1);
      for (; j < stop; ++j) {
        const T v = c * xr[j], u = eta[r] * v;
        const T w = T(1) / (T(1) + std::exp(-u)), d = w * (T(1) - w);
        out[j] = gr[j] * (s + c * (w + u * d));
        acc += gr[j] * (v * v * d);
      }
      sums[i] = acc;
    }
  });
  if (chunks.per_row > 1) {  // each row's chunks in order: the same on any thread count
    for (int64_t r = 0; r < M; ++r) {
      T acc = T(0);
      for (int64_t k = 0; k < chunks.per_row; ++k) {
        acc += sums[r * chunks.per_row + k];
      }
      geta[r] = acc;
    }
  }
}

void check(const at::Tensor& x, const at::Tensor& eta) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2 && x.is_contiguous(),
              "two_piece: x must be a contiguous (M, L) CPU tensor");
  TORCH_CHECK(eta.dim() == 1 && eta.size(0) == x.size(0) && eta.is_contiguous() &&
                  eta.scalar_type() == x.scalar_type(),
              "two_piece: eta must be a contiguous (M,) tensor of x's dtype");
}

at::Tensor two_piece_forward(const at::Tensor& x, const at::Tensor& eta, double slope) {
  check(x, eta);
  auto y = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "two_piece_forward", [&] {
    auto run = slope == 0 ? forward_rows<scalar_t, true> : forward_rows<scalar_t, false>;
    run(x.data_ptr<scalar_t>(), eta.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(),
        x.size(0), x.size(1), static_cast<scalar_t>(slope));
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> two_piece_backward(const at::Tensor& g,
                                                      const at::Tensor& x,
                                                      const at::Tensor& eta,
                                                      double slope) {
  check(x, eta);
  TORCH_CHECK(g.sizes() == x.sizes() && g.is_contiguous() &&
                  g.scalar_type() == x.scalar_type(),
              "two_piece: g must be contiguous, of x's shape and dtype");
  auto gx = at::empty_like(x);
  auto geta = at::empty_like(eta);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "two_piece_backward", [&] {
    auto run =
        slope == 0 ? backward_rows<scalar_t, true> : backward_rows<scalar_t, false>;
    run(g.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), eta.data_ptr<scalar_t>(),
        gx.data_ptr<scalar_t>(), geta.data_ptr<scalar_t>(), x.size(0), x.size(1),
        static_cast<scalar_t>(slope));
  });
  return {gx, geta};
}

// How many threads at::parallel_for runs its tasks on here (tasks of one item, two per
// thread of torch's intra-op count): 1 when the extension was built without OpenMP.
int64_t parallel_threads() {
  const int64_t n = 2 * at::get_num_threads();
  std::vector<int> seen(n, -1);
  at::parallel_for(0, n, 1, [&](int64_t first, int64_t last) {
    for (int64_t i = first; i < last; ++i) seen[i] = at::get_thread_num();
  });
  std::sort(seen.begin(), seen.end());
  return std::unique(seen.begin(), seen.end()) - seen.begin();
}

}  // namespace

TORCH_LIBRARY(smaso_native, m) {
  m.def("two_piece_forward(Tensor x, Tensor eta, float slope) -> Tensor");
  m.def("two_piece_backward(Tensor g, Tensor x, Tensor eta, float slope) -> (Tensor, Tensor)");
  m.def("parallel_threads() -> int", &parallel_threads);
}

TORCH_LIBRARY_IMPL(smaso_native, CPU, m) {
  m.impl("two_piece_forward", &two_piece_forward);
  m.impl("two_piece_backward", &two_piece_backward);
}
