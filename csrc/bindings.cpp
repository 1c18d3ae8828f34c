// Torch binding of the CUDA kernels: registers the private kernel op torch.ops.fastpeft._cuda_prefix_decode (CUDA
// implementation), which the cuda backend (fastpeft/ops/backends/cuda.py) calls from the public op
// fastpeft::prefix_decode, and the Python module fastpeft._C whose import loads the registration.
//
// The op takes the canonical arguments of fastpeft.prefix_attention for one query per row:
//   q [B, Hq, 1, D], k/v [B, Hkv, S, D], prefix_k/prefix_v [T, Hkv, P, D], prefix_index [B] int32,
//   prefix_lengths [T] int32, key_padding_mask [B, S] bool or None, causal, softmax_scale
// and returns [B, Hq, 1, D] in q's dtype. With L == 1 the query sits at key position S - 1, so causal
// hides no key; the flag is accepted for the common signature. Values of prefix_index / prefix_lengths
// are not checked here (that would synchronize with the device); the kernel clamps them so that nothing
// out of bounds is read, and fastpeft.prefix_attention validates them before calling.

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include <cmath>
#include <limits>
#include <mutex>
#include <optional>
#include <unordered_map>

#include "prefix_decode.h"

namespace {

void check_float_tensor(const at::Tensor& t, const char* name, const at::Tensor& q, int64_t dim) {
  TORCH_CHECK(t.dim() == dim, "prefix_decode: ", name, " must be ", dim, "-D, got shape ", t.sizes());
  TORCH_CHECK(t.scalar_type() == q.scalar_type(), "prefix_decode: ", name, " has dtype ", t.scalar_type(),
              " but q has ", q.scalar_type(), "; all inputs must share one dtype");
  TORCH_CHECK(t.device() == q.device(), "prefix_decode: ", name, " is on ", t.device(), " but q is on ",
              q.device());
}

void check_int32_tensor(const at::Tensor& t, const char* name, const at::Tensor& q, int64_t length) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == length, "prefix_decode: ", name, " must have shape [", length,
              "], got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == at::kInt, "prefix_decode: ", name, " must be int32, got ", t.scalar_type());
  TORCH_CHECK(t.device() == q.device(), "prefix_decode: ", name, " is on ", t.device(), " but q is on ",
              q.device());
}

// SM count of a device, queried once per device (the split heuristic needs it on every call).
int multiprocessor_count(c10::DeviceIndex device) {
  static std::mutex mutex;
  static std::unordered_map<int, int> counts;
  const std::lock_guard<std::mutex> lock(mutex);
  auto found = counts.find(device);
  if (found != counts.end()) return found->second;
  int count = 0;
  const cudaError_t status = cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device);
  TORCH_CHECK(status == cudaSuccess, "prefix_decode: cannot query the SM count: ", cudaGetErrorString(status));
  counts.emplace(device, count);
  return count;
}

// The kernels need a unit stride along the head dimension; other strides are passed through.
at::Tensor with_unit_last_stride(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

fastpeft::DecodeDType decode_dtype(const at::Tensor& q) {
  switch (q.scalar_type()) {
    case at::kHalf: return fastpeft::DecodeDType::kFloat16;
    case at::kBFloat16: return fastpeft::DecodeDType::kBFloat16;
    case at::kFloat: return fastpeft::DecodeDType::kFloat32;
    default: TORCH_CHECK(false, "prefix_decode: q has dtype ", q.scalar_type(), "; supported: float16, bfloat16, float32");
  }
}

void check_arguments(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& prefix_k,
                     const at::Tensor& prefix_v, const at::Tensor& prefix_index, const at::Tensor& prefix_lengths,
                     const std::optional<at::Tensor>& key_padding_mask) {
  TORCH_CHECK(q.dim() == 4 && q.size(2) == 1,
              "prefix_decode: q must be [B, Hq, 1, D] (one query per row), got shape ", q.sizes());
  check_float_tensor(k, "k", q, 4);
  check_float_tensor(v, "v", q, 4);
  check_float_tensor(prefix_k, "prefix_k", q, 4);
  check_float_tensor(prefix_v, "prefix_v", q, 4);
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(3);
  const int64_t Hkv = k.size(1), S = k.size(2), T = prefix_k.size(0), P = prefix_k.size(2);
  TORCH_CHECK(k.sizes() == v.sizes(), "prefix_decode: k and v must have the same shape, got ", k.sizes(), " and ",
              v.sizes());
  TORCH_CHECK(k.size(0) == B && k.size(3) == D, "prefix_decode: k must be [B=", B, ", Hkv, S, D=", D, "], got ",
              k.sizes());
  TORCH_CHECK(Hkv > 0 && Hq % Hkv == 0, "prefix_decode: the query heads (", Hq,
              ") must be a multiple of the kv heads (", Hkv, ")");
  TORCH_CHECK(S >= 1, "prefix_decode: k/v must hold the query's own key (S >= 1)");
  TORCH_CHECK(D >= 1 && D <= 256, "prefix_decode: head size D=", D, " is not supported (1..256)");
  TORCH_CHECK(prefix_k.sizes() == prefix_v.sizes(), "prefix_decode: prefix_k and prefix_v must have the same shape");
  TORCH_CHECK(T >= 1 && prefix_k.size(1) == Hkv && prefix_k.size(3) == D,
              "prefix_decode: prefix_k must be [T >= 1, Hkv=", Hkv, ", P, D=", D, "], got ", prefix_k.sizes());
  check_int32_tensor(prefix_index, "prefix_index", q, B);
  check_int32_tensor(prefix_lengths, "prefix_lengths", q, T);
  if (key_padding_mask.has_value()) {
    const at::Tensor& mask = *key_padding_mask;
    TORCH_CHECK(mask.dim() == 2 && mask.size(0) == B && mask.size(1) == S,
                "prefix_decode: key_padding_mask must have shape [B=", B, ", S=", S, "], got ", mask.sizes());
    TORCH_CHECK(mask.scalar_type() == at::kBool, "prefix_decode: key_padding_mask must be bool, got ",
                mask.scalar_type());
    TORCH_CHECK(mask.device() == q.device(), "prefix_decode: key_padding_mask is on ", mask.device(),
                " but q is on ", q.device());
  }
  const int64_t int_max = std::numeric_limits<int32_t>::max();
  TORCH_CHECK(B * Hq <= int_max && P + S <= int_max, "prefix_decode: sizes exceed the kernel's 32-bit indexing");
}

at::Tensor prefix_decode_cuda(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                              const at::Tensor& prefix_k_in, const at::Tensor& prefix_v_in,
                              const at::Tensor& prefix_index, const at::Tensor& prefix_lengths,
                              const std::optional<at::Tensor>& key_padding_mask, bool causal, double softmax_scale) {
  (void)causal;  // one query at position S - 1: causal masking hides no key
  TORCH_CHECK(q_in.is_cuda(), "prefix_decode: q must be a CUDA tensor");
  check_arguments(q_in, k_in, v_in, prefix_k_in, prefix_v_in, prefix_index, prefix_lengths, key_padding_mask);
  TORCH_CHECK(std::isfinite(softmax_scale) && softmax_scale > 0, "prefix_decode: softmax_scale must be positive");
  const fastpeft::DecodeDType dtype = decode_dtype(q_in);
  const c10::cuda::CUDAGuard device_guard(q_in.device());

  const at::Tensor q = with_unit_last_stride(q_in);
  const at::Tensor k = with_unit_last_stride(k_in);
  const at::Tensor v = with_unit_last_stride(v_in);
  const at::Tensor prefix_k = with_unit_last_stride(prefix_k_in);
  const at::Tensor prefix_v = with_unit_last_stride(prefix_v_in);
  // The kernel indexes these with unit stride; they are tiny, so a copy of a strided view costs nothing.
  const at::Tensor index = prefix_index.contiguous();
  const at::Tensor lengths = prefix_lengths.contiguous();
  at::Tensor out = at::empty({q.size(0), q.size(1), 1, q.size(3)}, q.options());

  fastpeft::PrefixDecodeParams params;
  params.q = q.data_ptr();
  params.k = k.data_ptr();
  params.v = v.data_ptr();
  params.prefix_k = prefix_k.data_ptr();
  params.prefix_v = prefix_v.data_ptr();
  params.prefix_index = index.data_ptr<int32_t>();
  params.prefix_lengths = lengths.data_ptr<int32_t>();
  params.out = out.data_ptr();
  params.batch = static_cast<int>(q.size(0));
  params.q_heads = static_cast<int>(q.size(1));
  params.kv_heads = static_cast<int>(k.size(1));
  params.seq_len = static_cast<int>(k.size(2));
  params.prefix_capacity = static_cast<int>(prefix_k.size(2));
  params.table_size = static_cast<int>(prefix_k.size(0));
  params.head_dim = static_cast<int>(q.size(3));
  params.stride_q_b = q.stride(0);
  params.stride_q_h = q.stride(1);
  params.stride_k_b = k.stride(0);
  params.stride_k_h = k.stride(1);
  params.stride_k_s = k.stride(2);
  params.stride_v_b = v.stride(0);
  params.stride_v_h = v.stride(1);
  params.stride_v_s = v.stride(2);
  params.stride_pk_t = prefix_k.stride(0);
  params.stride_pk_h = prefix_k.stride(1);
  params.stride_pk_p = prefix_k.stride(2);
  params.stride_pv_t = prefix_v.stride(0);
  params.stride_pv_h = prefix_v.stride(1);
  params.stride_pv_p = prefix_v.stride(2);
  params.stride_o_b = out.stride(0);
  params.stride_o_h = out.stride(1);
  if (key_padding_mask.has_value()) {
    const at::Tensor& mask = *key_padding_mask;
    params.key_padding_mask = reinterpret_cast<const uint8_t*>(mask.data_ptr<bool>());
    params.stride_mask_b = mask.stride(0);
    params.stride_mask_s = mask.stride(1);
  }
  params.softmax_scale = static_cast<float>(softmax_scale);

  params.num_splits = fastpeft::prefix_decode_num_splits(params, multiprocessor_count(q.get_device()));
  at::Tensor workspace;
  const size_t workspace_floats = fastpeft::prefix_decode_workspace_floats(params);
  if (workspace_floats > 0) {
    workspace = at::empty({static_cast<int64_t>(workspace_floats)}, q.options().dtype(at::kFloat));
    params.workspace = workspace.data_ptr<float>();
  }
  const cudaError_t status = fastpeft::prefix_decode_launch(params, dtype, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(status != cudaErrorNoKernelImageForDevice,
              "prefix_decode: fastpeft._C holds no kernel for this GPU; rebuild with its architecture in "
              "TORCH_CUDA_ARCH_LIST (e.g. TORCH_CUDA_ARCH_LIST=\"8.0;9.0a;10.0\" pip install --no-build-isolation -e .)");
  TORCH_CHECK(status == cudaSuccess, "prefix_decode: kernel launch failed: ", cudaGetErrorString(status));
  return out;
}

}  // namespace

// A fragment, not TORCH_LIBRARY: the Python side registers the public ops (torch.library.custom_op) in the same
// "fastpeft" namespace, and a namespace can have only one defining TORCH_LIBRARY. The op is a backend's kernel, not a
// public op: torch.compile sees fastpeft::prefix_decode, whose fake implementation gives the output's metadata.
TORCH_LIBRARY_FRAGMENT(fastpeft, m) {
  m.def(
      "_cuda_prefix_decode(Tensor q, Tensor k, Tensor v, Tensor prefix_k, Tensor prefix_v, Tensor prefix_index, "
      "Tensor prefix_lengths, Tensor? key_padding_mask, bool causal, float softmax_scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastpeft, CUDA, m) { m.impl("_cuda_prefix_decode", &prefix_decode_cuda); }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "fastpeft CUDA kernels; importing this module registers torch.ops.fastpeft._cuda_prefix_decode";
}
