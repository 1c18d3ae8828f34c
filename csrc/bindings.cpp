// Torch binding of the CUDA kernels: registers the private kernel ops torch.ops.fastpeft._cuda_prefix_decode and
// torch.ops.fastpeft._cuda_paged_prefix_decode (CUDA implementations), which the cuda backend
// (fastpeft/ops/backends/cuda.py) calls from the public ops fastpeft::prefix_decode and
// fastpeft::paged_prefix_decode, and the Python module fastpeft._C whose import loads the registration.
//
// _cuda_prefix_decode takes the canonical arguments of fastpeft.prefix_attention for one query per row:
//   q [B, Hq, 1, D], k/v [B, Hkv, S, D], prefix_k/prefix_v [T, Hkv, P, D], prefix_index [B] int32,
//   prefix_lengths [T] int32, key_padding_mask [B, S] bool or None, causal, softmax_scale
// and returns [B, Hq, 1, D] in q's dtype. With L == 1 the query sits at key position S - 1, so causal
// hides no key; the flag is accepted for the common signature.
// _cuda_paged_prefix_decode takes those of fastpeft.ops.paged_prefix_decode:
//   q [B, Hq, 1, D], key_cache/value_cache [num_blocks, Hkv, block_size, D], block_table [B, max_blocks] int32,
//   seq_lens [B] int32, prefix_k/prefix_v [T, Hkv, P, D], prefix_index [B] int32, prefix_lengths [T] int32,
//   softmax_scale
// and returns [B, Hq, 1, D] in q's dtype.
// Values of the integer tensors are not checked here (that would synchronize with the device); the kernel clamps
// them so that nothing out of bounds is read, and the Python ops validate them before calling.

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

// The prefix table, its index and lengths, against q and the kv heads / head size of the K/V.
void check_prefix_table(const at::Tensor& q, const at::Tensor& prefix_k, const at::Tensor& prefix_v,
                        const at::Tensor& prefix_index, const at::Tensor& prefix_lengths, int64_t Hkv) {
  check_float_tensor(prefix_k, "prefix_k", q, 4);
  check_float_tensor(prefix_v, "prefix_v", q, 4);
  const int64_t T = prefix_k.size(0), D = q.size(3);
  TORCH_CHECK(prefix_k.sizes() == prefix_v.sizes(), "prefix_decode: prefix_k and prefix_v must have the same shape");
  TORCH_CHECK(T >= 1 && prefix_k.size(1) == Hkv && prefix_k.size(3) == D,
              "prefix_decode: prefix_k must be [T >= 1, Hkv=", Hkv, ", P, D=", D, "], got ", prefix_k.sizes());
  check_int32_tensor(prefix_index, "prefix_index", q, q.size(0));
  check_int32_tensor(prefix_lengths, "prefix_lengths", q, T);
}

// The head counts of q and its K/V (Hkv kv heads), and q's head size.
void check_heads(const at::Tensor& q, int64_t Hkv) {
  const int64_t Hq = q.size(1), D = q.size(3);
  TORCH_CHECK(Hkv > 0 && Hq % Hkv == 0, "prefix_decode: the query heads (", Hq,
              ") must be a multiple of the kv heads (", Hkv, ")");
  TORCH_CHECK(D >= 1 && D <= 256, "prefix_decode: head size D=", D, " is not supported (1..256)");
}

void check_arguments(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& prefix_k,
                     const at::Tensor& prefix_v, const at::Tensor& prefix_index, const at::Tensor& prefix_lengths,
                     const std::optional<at::Tensor>& key_padding_mask) {
  TORCH_CHECK(q.dim() == 4 && q.size(2) == 1,
              "prefix_decode: q must be [B, Hq, 1, D] (one query per row), got shape ", q.sizes());
  check_float_tensor(k, "k", q, 4);
  check_float_tensor(v, "v", q, 4);
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(3), S = k.size(2), P = prefix_k.size(2);
  TORCH_CHECK(k.sizes() == v.sizes(), "prefix_decode: k and v must have the same shape, got ", k.sizes(), " and ",
              v.sizes());
  TORCH_CHECK(k.size(0) == B && k.size(3) == D, "prefix_decode: k must be [B=", B, ", Hkv, S, D=", D, "], got ",
              k.sizes());
  check_heads(q, k.size(1));
  TORCH_CHECK(S >= 1, "prefix_decode: k/v must hold the query's own key (S >= 1)");
  check_prefix_table(q, prefix_k, prefix_v, prefix_index, prefix_lengths, k.size(1));
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

void check_paged_arguments(const at::Tensor& q, const at::Tensor& key_cache, const at::Tensor& value_cache,
                           const at::Tensor& block_table, const at::Tensor& seq_lens, const at::Tensor& prefix_k,
                           const at::Tensor& prefix_v, const at::Tensor& prefix_index,
                           const at::Tensor& prefix_lengths) {
  TORCH_CHECK(q.dim() == 4 && q.size(2) == 1,
              "paged_prefix_decode: q must be [B, Hq, 1, D] (one query per row), got shape ", q.sizes());
  check_float_tensor(key_cache, "key_cache", q, 4);
  check_float_tensor(value_cache, "value_cache", q, 4);
  TORCH_CHECK(key_cache.sizes() == value_cache.sizes(),
              "paged_prefix_decode: key_cache and value_cache must have the same shape, got ", key_cache.sizes(),
              " and ", value_cache.sizes());
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(3);
  const int64_t num_blocks = key_cache.size(0), block_size = key_cache.size(2);
  TORCH_CHECK(key_cache.size(3) == D, "paged_prefix_decode: key_cache must be [num_blocks, Hkv, block_size, D=", D,
              "], got ", key_cache.sizes());
  check_heads(q, key_cache.size(1));
  TORCH_CHECK(num_blocks >= 1 && block_size >= 1,
              "paged_prefix_decode: key_cache must hold at least one block of at least one token, got ",
              key_cache.sizes());
  TORCH_CHECK(block_table.dim() == 2 && block_table.size(0) == B && block_table.size(1) >= 1,
              "paged_prefix_decode: block_table must have shape [B=", B, ", max_blocks >= 1], got ",
              block_table.sizes());
  TORCH_CHECK(block_table.scalar_type() == at::kInt, "paged_prefix_decode: block_table must be int32, got ",
              block_table.scalar_type());
  TORCH_CHECK(block_table.device() == q.device(), "paged_prefix_decode: block_table is on ", block_table.device(),
              " but q is on ", q.device());
  check_int32_tensor(seq_lens, "seq_lens", q, B);
  check_prefix_table(q, prefix_k, prefix_v, prefix_index, prefix_lengths, key_cache.size(1));
  const int64_t int_max = std::numeric_limits<int32_t>::max();
  TORCH_CHECK(B * Hq <= int_max && num_blocks <= int_max &&
                  prefix_k.size(2) + block_table.size(1) * block_size <= int_max,
              "paged_prefix_decode: sizes exceed the kernel's 32-bit indexing");
}

// The fields of both ops' parameters that q, the prefix table and out give; the K/V fields are the caller's.
fastpeft::PrefixDecodeParams common_params(const at::Tensor& q, const at::Tensor& prefix_k,
                                           const at::Tensor& prefix_v, const at::Tensor& index,
                                           const at::Tensor& lengths, const at::Tensor& out, int64_t kv_heads,
                                           double softmax_scale) {
  fastpeft::PrefixDecodeParams params;
  params.q = q.data_ptr();
  params.prefix_k = prefix_k.data_ptr();
  params.prefix_v = prefix_v.data_ptr();
  params.prefix_index = index.data_ptr<int32_t>();
  params.prefix_lengths = lengths.data_ptr<int32_t>();
  params.out = out.data_ptr();
  params.batch = static_cast<int>(q.size(0));
  params.q_heads = static_cast<int>(q.size(1));
  params.kv_heads = static_cast<int>(kv_heads);
  params.prefix_capacity = static_cast<int>(prefix_k.size(2));
  params.table_size = static_cast<int>(prefix_k.size(0));
  params.head_dim = static_cast<int>(q.size(3));
  params.stride_q_b = q.stride(0);
  params.stride_q_h = q.stride(1);
  params.stride_pk_t = prefix_k.stride(0);
  params.stride_pk_h = prefix_k.stride(1);
  params.stride_pk_p = prefix_k.stride(2);
  params.stride_pv_t = prefix_v.stride(0);
  params.stride_pv_h = prefix_v.stride(1);
  params.stride_pv_p = prefix_v.stride(2);
  params.stride_o_b = out.stride(0);
  params.stride_o_h = out.stride(1);
  params.softmax_scale = static_cast<float>(softmax_scale);
  return params;
}

// Split count, workspace and launch of filled parameters, on the current stream of q's device.
void launch(fastpeft::PrefixDecodeParams& params, const at::Tensor& q, fastpeft::DecodeDType dtype, const char* op) {
  params.num_splits = fastpeft::prefix_decode_num_splits(params, multiprocessor_count(q.get_device()));
  at::Tensor workspace;
  const size_t workspace_floats = fastpeft::prefix_decode_workspace_floats(params);
  if (workspace_floats > 0) {
    workspace = at::empty({static_cast<int64_t>(workspace_floats)}, q.options().dtype(at::kFloat));
    params.workspace = workspace.data_ptr<float>();
  }
  const cudaError_t status =
      fastpeft::prefix_decode_launch(params, dtype, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(status != cudaErrorNoKernelImageForDevice, op,
              ": fastpeft._C holds no kernel for this GPU; rebuild with its architecture in "
              "TORCH_CUDA_ARCH_LIST (e.g. TORCH_CUDA_ARCH_LIST=\"8.0;9.0a;10.0\" pip install --no-build-isolation -e .)");
  TORCH_CHECK(status == cudaSuccess, op, ": kernel launch failed: ", cudaGetErrorString(status));
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

  fastpeft::PrefixDecodeParams params =
      common_params(q, prefix_k, prefix_v, index, lengths, out, k.size(1), softmax_scale);
  params.k = k.data_ptr();
  params.v = v.data_ptr();
  params.seq_len = static_cast<int>(k.size(2));
  params.stride_k_b = k.stride(0);
  params.stride_k_h = k.stride(1);
  params.stride_k_s = k.stride(2);
  params.stride_v_b = v.stride(0);
  params.stride_v_h = v.stride(1);
  params.stride_v_s = v.stride(2);
  if (key_padding_mask.has_value()) {
    const at::Tensor& mask = *key_padding_mask;
    params.key_padding_mask = reinterpret_cast<const uint8_t*>(mask.data_ptr<bool>());
    params.stride_mask_b = mask.stride(0);
    params.stride_mask_s = mask.stride(1);
  }
  launch(params, q, dtype, "prefix_decode");
  return out;
}

at::Tensor paged_prefix_decode_cuda(const at::Tensor& q_in, const at::Tensor& key_cache_in,
                                    const at::Tensor& value_cache_in, const at::Tensor& block_table_in,
                                    const at::Tensor& seq_lens_in, const at::Tensor& prefix_k_in,
                                    const at::Tensor& prefix_v_in, const at::Tensor& prefix_index,
                                    const at::Tensor& prefix_lengths, double softmax_scale) {
  TORCH_CHECK(q_in.is_cuda(), "paged_prefix_decode: q must be a CUDA tensor");
  check_paged_arguments(q_in, key_cache_in, value_cache_in, block_table_in, seq_lens_in, prefix_k_in, prefix_v_in,
                        prefix_index, prefix_lengths);
  TORCH_CHECK(std::isfinite(softmax_scale) && softmax_scale > 0,
              "paged_prefix_decode: softmax_scale must be positive");
  const fastpeft::DecodeDType dtype = decode_dtype(q_in);
  const c10::cuda::CUDAGuard device_guard(q_in.device());

  const at::Tensor q = with_unit_last_stride(q_in);
  const at::Tensor key_cache = with_unit_last_stride(key_cache_in);
  const at::Tensor value_cache = with_unit_last_stride(value_cache_in);
  const at::Tensor prefix_k = with_unit_last_stride(prefix_k_in);
  const at::Tensor prefix_v = with_unit_last_stride(prefix_v_in);
  const at::Tensor index = prefix_index.contiguous();
  const at::Tensor lengths = prefix_lengths.contiguous();
  const at::Tensor block_table = block_table_in.contiguous();
  const at::Tensor seq_lens = seq_lens_in.contiguous();
  at::Tensor out = at::empty({q.size(0), q.size(1), 1, q.size(3)}, q.options());

  fastpeft::PrefixDecodeParams params =
      common_params(q, prefix_k, prefix_v, index, lengths, out, key_cache.size(1), softmax_scale);
  params.k = key_cache.data_ptr();
  params.v = value_cache.data_ptr();
  params.block_table = block_table.data_ptr<int32_t>();
  params.seq_lens = seq_lens.data_ptr<int32_t>();
  params.block_size = static_cast<int>(key_cache.size(2));
  params.num_blocks = static_cast<int>(key_cache.size(0));
  params.seq_len = static_cast<int>(block_table.size(1) * key_cache.size(2));
  params.stride_bt_b = block_table.stride(0);
  params.stride_k_b = key_cache.stride(0);
  params.stride_k_h = key_cache.stride(1);
  params.stride_k_s = key_cache.stride(2);
  params.stride_v_b = value_cache.stride(0);
  params.stride_v_h = value_cache.stride(1);
  params.stride_v_s = value_cache.stride(2);
  launch(params, q, dtype, "paged_prefix_decode");
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
  m.def(
      "_cuda_paged_prefix_decode(Tensor q, Tensor key_cache, Tensor value_cache, Tensor block_table, "
      "Tensor seq_lens, Tensor prefix_k, Tensor prefix_v, Tensor prefix_index, Tensor prefix_lengths, "
      "float softmax_scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastpeft, CUDA, m) {
  m.impl("_cuda_prefix_decode", &prefix_decode_cuda);
  m.impl("_cuda_paged_prefix_decode", &paged_prefix_decode_cuda);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() =
      "fastpeft CUDA kernels; importing this module registers torch.ops.fastpeft._cuda_prefix_decode and "
      "torch.ops.fastpeft._cuda_paged_prefix_decode";
}
