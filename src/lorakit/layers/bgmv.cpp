// BGMV (Punica's "batched gather matrix-vector") for serving steps on CPU, built by layers/bgmv.py.
//
// For token t of a slice of T tokens starting at row lo of x (N, in) and out (N, out):
//     out[lo + t] += (x[lo + t] · A[slot[t]]) · B[slot[t]]
// with A (cap, in, r) holding each slot's Aᵀ and B (cap, r, out) its (s·B)ᵀ (layers/pool.py). The
// factors are read where they lie in the pool: no gathered copy of T·(in·r + r·out) floats, which on
// CPU cost more than the two matmuls that used it (docs/benchmarks.md, serving). fp32 only; tokens
// are split over torch's intra-op threads.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

void bgmv_(torch::Tensor out, const torch::Tensor& x, const torch::Tensor& A, const torch::Tensor& B,
           const torch::Tensor& slot, int64_t lo) {
  TORCH_CHECK(out.device().is_cpu() && x.device().is_cpu() && A.device().is_cpu() && B.device().is_cpu(),
              "bgmv_: CPU tensors only");
  TORCH_CHECK(out.scalar_type() == at::kFloat && x.scalar_type() == at::kFloat && A.scalar_type() == at::kFloat &&
              B.scalar_type() == at::kFloat, "bgmv_: float32 tensors only");
  TORCH_CHECK(slot.scalar_type() == at::kLong && slot.dim() == 1 && slot.is_contiguous(), "bgmv_: slot must be int64 (T,)");
  TORCH_CHECK(A.dim() == 3 && B.dim() == 3 && A.is_contiguous() && B.is_contiguous(), "bgmv_: A, B must be contiguous (cap, ., .)");
  TORCH_CHECK(x.dim() == 2 && out.dim() == 2 && x.stride(1) == 1 && out.stride(1) == 1, "bgmv_: x, out must be (N, features) rows");
  const int64_t T = slot.size(0), cap = A.size(0), din = A.size(1), r = A.size(2), dout = B.size(2);
  TORCH_CHECK(B.size(0) == cap && B.size(1) == r && x.size(1) == din && out.size(1) == dout, "bgmv_: shapes disagree");
  TORCH_CHECK(lo >= 0 && lo + T <= x.size(0) && lo + T <= out.size(0), "bgmv_: tokens lo..lo+T outside the rows");
  const int64_t* sp = slot.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t) TORCH_CHECK(sp[t] >= 0 && sp[t] < cap, "bgmv_: slot out of range");
  const float* xp = x.data_ptr<float>();
  const float* Ap = A.data_ptr<float>();
  const float* Bp = B.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t xs = x.stride(0), os = out.stride(0);
  at::parallel_for(0, T, 8, [&](int64_t t0, int64_t t1) {
    std::vector<float> acc(r);  // (r,): x · A for one token
    for (int64_t t = t0; t < t1; ++t) {
      const float* xr = xp + (lo + t) * xs;
      const float* a = Ap + sp[t] * din * r;  // (in, r), row i: A[:, i] of the adapter
      const float* b = Bp + sp[t] * r * dout;  // (r, out)
      float* o = op + (lo + t) * os;
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t i = 0; i < din; ++i) {  // shrink: r lanes, contiguous in A
        const float xi = xr[i];
        const float* ai = a + i * r;
        for (int64_t j = 0; j < r; ++j) acc[j] += xi * ai[j];
      }
      for (int64_t j = 0; j < r; ++j) {  // expand: out lanes, contiguous in B
        const float c = acc[j];
        const float* bj = b + j * dout;
        for (int64_t k = 0; k < dout; ++k) o[k] += c * bj[k];
      }
    }
  });
  if (!out.is_inference()) out.unsafeGetTensorImpl()->bump_version();  // an in-place write, as add_ would record
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("bgmv_", &bgmv_, "out[lo+t] += (x[lo+t] @ A[slot[t]]) @ B[slot[t]], in place (fp32, CPU)");
}
