// Split-KV decode attention over [prefix table entry ; own keys], one new query per row (L == 1).
//
// Plain C++/CUDA interface without torch types, so that prefix_decode.cu compiles with nvcc alone;
// bindings.cpp fills PrefixDecodeParams from tensors, allocates the workspace and launches.
//
// Semantics (those of fastpeft.prefix_attention with L == 1): row b uses table entry t = prefix_index[b]
// and attends over prefix_k[t, kv, 0:prefix_lengths[t]] followed by its own keys k[b, kv, 0:S] whose
// key_padding_mask[b, j] is nonzero. Query head h reads kv head h / (Hq / Hkv). The query sits at key
// position S - 1, so causal masking hides nothing. A query that sees no key gets zeros.
//
// Paged (block_table set; fastpeft.ops.paged_prefix_decode): k and v are one layer's block pool
// [num_blocks, Hkv, block_size, D] and row b's own keys are its first seq_lens[b] tokens, token j in block
// block_table[b, j / block_size] at offset j % block_size; there is no key padding mask.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime.h>

namespace fastpeft {

enum class DecodeDType : int { kFloat16 = 0, kBFloat16 = 1, kFloat32 = 2 };

// Strides are in elements. The last (head) dimension of q, k, v, prefix_k, prefix_v and out must have
// stride 1; every other stride is free (KV-cache views, fused projections).
struct PrefixDecodeParams {
  const void* q = nullptr;         // [B, Hq, 1, D]
  const void* k = nullptr;         // [B, Hkv, S, D]; paged: [num_blocks, Hkv, block_size, D]
  const void* v = nullptr;         // [B, Hkv, S, D]; paged: [num_blocks, Hkv, block_size, D]
  const void* prefix_k = nullptr;  // [T, Hkv, P, D]
  const void* prefix_v = nullptr;  // [T, Hkv, P, D]
  const int32_t* prefix_index = nullptr;    // [B], values in [0, T) (clamped in the kernel)
  const int32_t* prefix_lengths = nullptr;  // [T], values in [0, P] (clamped in the kernel)
  const uint8_t* key_padding_mask = nullptr;  // [B, S] bool bytes, nonzero = real key; nullptr = all real
  // Paged K/V: nullptr = dense. Entries are clamped into [0, num_blocks) and lengths into [0, seq_len] in the
  // kernel, so unchecked values never address outside the pool.
  const int32_t* block_table = nullptr;  // [B, max_blocks], unit column stride
  const int32_t* seq_lens = nullptr;     // [B], each row's number of own keys
  void* out = nullptr;             // [B, Hq, 1, D], dtype of q
  // fp32 scratch of prefix_decode_workspace_floats() floats; only read when num_splits > 1.
  float* workspace = nullptr;

  // seq_len: every row's key count (dense), or the most keys a row's block table can hold (paged:
  // max_blocks * block_size).
  int batch = 0, q_heads = 0, kv_heads = 0, seq_len = 0, prefix_capacity = 0, table_size = 0, head_dim = 0;
  int block_size = 0, num_blocks = 0;  // paged only

  int64_t stride_q_b = 0, stride_q_h = 0;
  int64_t stride_k_b = 0, stride_k_h = 0, stride_k_s = 0;
  int64_t stride_v_b = 0, stride_v_h = 0, stride_v_s = 0;
  int64_t stride_pk_t = 0, stride_pk_h = 0, stride_pk_p = 0;
  int64_t stride_pv_t = 0, stride_pv_h = 0, stride_pv_p = 0;
  int64_t stride_mask_b = 0, stride_mask_s = 0;
  int64_t stride_bt_b = 0;  // paged: block_table's row stride (stride_k_b / stride_v_b step over blocks)
  int64_t stride_o_b = 0, stride_o_h = 0;

  float softmax_scale = 1.0f;
  // Key-range splits (flash-decoding); set it with prefix_decode_num_splits() or force a value >= 1.
  int num_splits = 1;
};

// Split count that gives about four waves of CTAs on num_sms SMs without cutting the key range into
// chunks shorter than a few dozen keys. Depends only on the sizes in params.
int prefix_decode_num_splits(const PrefixDecodeParams& params, int num_sms);

// fp32 scratch (in floats) that prefix_decode_launch needs for params.num_splits; 0 when num_splits == 1.
size_t prefix_decode_workspace_floats(const PrefixDecodeParams& params);

// Launches the split kernel (and, with num_splits > 1, the combine kernel) on stream. Returns
// cudaErrorInvalidValue for sizes it does not support (head_dim outside 1..256, num_splits < 1, a missing
// workspace, a paged call without seq_lens or with an empty pool or block) and otherwise the launch status.
cudaError_t prefix_decode_launch(const PrefixDecodeParams& params, DecodeDType dtype, cudaStream_t stream);

}  // namespace fastpeft
