// Split-KV decode attention over [prefix table entry ; own keys] (see prefix_decode.h for the semantics).
//
// Layout. One CTA of 4 warps per (row b, kv head, head tile, split). The CTA handles a tile of up to 8 of
// the G = Hq / Hkv query heads that share the kv head, so every K/V row it loads serves all of them:
// decode is bound by the bytes of K/V read, and GQA/MQA reads them once per group instead of once per
// query head. A key row of D elements is read by a "key group" of TPK lanes, each loading 16-byte vectors
// (8 half/bf16 or 4 float) with consecutive lanes on consecutive vectors, so a warp reads 32 / TPK whole
// rows per load instruction, coalesced. Each key group runs its own online softmax (running max in the
// log2 domain, sum, unnormalized accumulator, all fp32, in registers) over the keys it is dealt; scores
// are reduced across the TPK lanes with xor shuffles. At the end the key groups of a warp are merged with
// shuffles, the warps through shared memory, and the CTA writes either the normalized output (one split)
// or its partial (max, sum, acc) to an fp32 workspace that the combine kernel reduces over the splits.
//
// The virtual key range of row b is [0, plen + S): positions below plen = prefix_lengths[prefix_index[b]]
// read the table entry in place, the rest read k[b] (skipping padding keys without loading them). The
// range is cut into num_splits chunks of chunk_len keys; chunks past a short row's end are empty and
// write an empty partial. Paged (kPaged): S is the row's seq_lens[b] and key j is read from the pool block
// block_table[b, j / block_size] at offset j % block_size; everything else is the same kernel.

#include "prefix_decode.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>

namespace fastpeft {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kUnroll = 2;  // keys per key group whose loads are issued before any is consumed
constexpr int kMaxGroupTile = 8;
constexpr int kMaxSplits = 128;
constexpr int kMinKeysPerSplit = 64;
constexpr int kCtasPerSm = 4;  // ~4 waves of CTAs per SM before splitting stops paying
constexpr float kLog2e = 1.4426950408889634f;
// Finite "minus infinity": exp2(kNegBig - kNegBig) = 1, not NaN, so empty states merge without branches
// (their sum is 0 and they contribute nothing).
constexpr float kNegBig = -1.0e30f;

__host__ __device__ constexpr int ceil_div(int a, int b) { return (a + b - 1) / b; }

// Element traits: a 16-byte vector of T, its conversion to float, and T's bit pattern for scalar loads.
template <typename T>
struct Elem;

template <>
struct Elem<half> {
  using Bits = uint16_t;
  static constexpr int kVec = 8;
  __device__ static void to_float(const uint4& raw, float* out) {
    const __half2* pairs = reinterpret_cast<const __half2*>(&raw);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 f = __half22float2(pairs[i]);
      out[2 * i] = f.x;
      out[2 * i + 1] = f.y;
    }
  }
  __device__ static half from_float(float x) { return __float2half_rn(x); }
};

template <>
struct Elem<__nv_bfloat16> {
  using Bits = uint16_t;
  static constexpr int kVec = 8;
  __device__ static void to_float(const uint4& raw, float* out) {
    const __nv_bfloat162* pairs = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 f = __bfloat1622float2(pairs[i]);
      out[2 * i] = f.x;
      out[2 * i + 1] = f.y;
    }
  }
  __device__ static __nv_bfloat16 from_float(float x) { return __float2bfloat16_rn(x); }
};

template <>
struct Elem<float> {
  using Bits = uint32_t;
  static constexpr int kVec = 4;
  __device__ static void to_float(const uint4& raw, float* out) {
    out[0] = __uint_as_float(raw.x);
    out[1] = __uint_as_float(raw.y);
    out[2] = __uint_as_float(raw.z);
    out[3] = __uint_as_float(raw.w);
  }
  __device__ static float from_float(float x) { return x; }
};

// Elements [d0, d0 + kVec) of a row as raw bits, zero past head_dim or when row is null (an invisible key
// is never read). vectorized: one 16-byte read-only load (the host checked alignment and D % kVec == 0);
// otherwise element by element.
template <typename T>
__device__ __forceinline__ uint4 load_vector(const T* row, int d0, int head_dim, bool vectorized) {
  constexpr int kVec = Elem<T>::kVec;
  using Bits = typename Elem<T>::Bits;
  if (row == nullptr || d0 >= head_dim) return make_uint4(0u, 0u, 0u, 0u);
  if (vectorized) return __ldg(reinterpret_cast<const uint4*>(row + d0));
  union {
    uint4 raw;
    Bits elems[kVec];
  } packed;
  packed.raw = make_uint4(0u, 0u, 0u, 0u);
  const Bits* bits = reinterpret_cast<const Bits*>(row);
#pragma unroll
  for (int e = 0; e < kVec; ++e) {
    if (d0 + e < head_dim) packed.elems[e] = bits[d0 + e];
  }
  return packed.raw;
}

// Scales that bring two online-softmax states (running max m, m_other) to their common max, which m becomes;
// the caller applies them to the sums and accumulators.
__device__ __forceinline__ void merge_scale(float& m, float m_other, float& self_scale, float& other_scale) {
  const float m_new = fmaxf(m, m_other);
  self_scale = exp2f(m - m_new);
  other_scale = exp2f(m_other - m_new);
  m = m_new;
}

template <typename T, int kHeadDimBucket, int kGroupTile, bool kPaged>
__global__ void __launch_bounds__(kThreads)
    prefix_decode_split_kernel(const PrefixDecodeParams p, int chunk_len, int head_chunks, bool vectorized) {
  constexpr int kVec = Elem<T>::kVec;
  constexpr int kLanesPerKey = (kHeadDimBucket / kVec < 32) ? kHeadDimBucket / kVec : 32;
  constexpr int kElems = kHeadDimBucket / kLanesPerKey;  // head dims owned by one lane
  constexpr int kVecs = kElems / kVec;                    // 16-byte vectors per lane and row
  constexpr int kKeysPerWarp = 32 / kLanesPerKey;         // rows one warp load instruction covers
  constexpr int kKeysPerWarpStep = kKeysPerWarp * kUnroll;

  __shared__ float shared_m[kWarps][kGroupTile];
  __shared__ float shared_l[kWarps][kGroupTile];
  __shared__ float shared_acc[kWarps][kGroupTile][kHeadDimBucket];

  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int key_group = lane / kLanesPerKey;
  const int lane_in_key = lane % kLanesPerKey;
  const int split = blockIdx.y;
  const int head_chunk = blockIdx.x % head_chunks;
  const int kv_head = (blockIdx.x / head_chunks) % p.kv_heads;
  const int b = blockIdx.x / head_chunks / p.kv_heads;
  const int group = p.q_heads / p.kv_heads;
  const int first_in_group = head_chunk * kGroupTile;
  const int head_dim = p.head_dim;

  // Clamped so that a bad index or length never addresses outside the table; the Python layer validates.
  const int entry = min(max(p.prefix_index[b], 0), p.table_size - 1);
  const int prefix_len = min(max(p.prefix_lengths[entry], 0), p.prefix_capacity);
  const int seq_len = kPaged ? min(max(p.seq_lens[b], 0), p.seq_len) : p.seq_len;
  const int chunk_start = split * chunk_len;
  const int chunk_end = min(chunk_start + chunk_len, prefix_len + seq_len);

  // This lane's dims: vector j covers [(j * kLanesPerKey + lane_in_key) * kVec, + kVec).
  float q[kGroupTile][kElems];
  const float qk_scale = p.softmax_scale * kLog2e;
  const T* q_base = static_cast<const T*>(p.q) + b * p.stride_q_b;
#pragma unroll
  for (int g = 0; g < kGroupTile; ++g) {
    const int in_group = first_in_group + g;
    const T* q_row = in_group < group ? q_base + (kv_head * group + in_group) * p.stride_q_h : nullptr;
#pragma unroll
    for (int j = 0; j < kVecs; ++j) {
      const uint4 raw = load_vector(q_row, (j * kLanesPerKey + lane_in_key) * kVec, head_dim, vectorized);
      Elem<T>::to_float(raw, &q[g][j * kVec]);
    }
#pragma unroll
    for (int i = 0; i < kElems; ++i) q[g][i] *= qk_scale;
  }

  float m[kGroupTile], l[kGroupTile], acc[kGroupTile][kElems];
#pragma unroll
  for (int g = 0; g < kGroupTile; ++g) {
    m[g] = kNegBig;
    l[g] = 0.f;
#pragma unroll
    for (int i = 0; i < kElems; ++i) acc[g][i] = 0.f;
  }

  const T* prefix_k_base = static_cast<const T*>(p.prefix_k) + entry * p.stride_pk_t + kv_head * p.stride_pk_h;
  const T* prefix_v_base = static_cast<const T*>(p.prefix_v) + entry * p.stride_pv_t + kv_head * p.stride_pv_h;
  // Dense: the row's keys start at k[b]. Paged: each key's block is looked up below.
  const T* k_base = static_cast<const T*>(p.k) + (kPaged ? 0 : b * p.stride_k_b) + kv_head * p.stride_k_h;
  const T* v_base = static_cast<const T*>(p.v) + (kPaged ? 0 : b * p.stride_v_b) + kv_head * p.stride_v_h;
  const uint8_t* mask_row = p.key_padding_mask ? p.key_padding_mask + b * p.stride_mask_b : nullptr;
  const int32_t* block_row = kPaged ? p.block_table + b * p.stride_bt_b : nullptr;

  // The loop bound depends on the warp only, so every lane reaches the shuffles below.
  for (int base = chunk_start + warp * kKeysPerWarpStep; base < chunk_end; base += kWarps * kKeysPerWarpStep) {
    uint4 k_raw[kUnroll][kVecs], v_raw[kUnroll][kVecs];
    bool visible[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int pos = base + u * kKeysPerWarp + key_group;
      const T* k_row = nullptr;
      const T* v_row = nullptr;
      if (pos < chunk_end) {
        if (pos < prefix_len) {
          k_row = prefix_k_base + pos * p.stride_pk_p;
          v_row = prefix_v_base + pos * p.stride_pv_p;
        } else {
          const int j = pos - prefix_len;
          if (kPaged) {
            const int block = min(max(block_row[j / p.block_size], 0), p.num_blocks - 1);
            const int offset = j % p.block_size;
            k_row = k_base + block * p.stride_k_b + offset * p.stride_k_s;
            v_row = v_base + block * p.stride_v_b + offset * p.stride_v_s;
          } else if (mask_row == nullptr || mask_row[j * p.stride_mask_s] != 0) {
            k_row = k_base + j * p.stride_k_s;
            v_row = v_base + j * p.stride_v_s;
          }
        }
      }
      visible[u] = k_row != nullptr;
#pragma unroll
      for (int j = 0; j < kVecs; ++j) {
        const int d0 = (j * kLanesPerKey + lane_in_key) * kVec;
        k_raw[u][j] = load_vector(k_row, d0, head_dim, vectorized);
        v_raw[u][j] = load_vector(v_row, d0, head_dim, vectorized);
      }
    }

    float scores[kUnroll][kGroupTile];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      float k_row[kElems];
#pragma unroll
      for (int j = 0; j < kVecs; ++j) Elem<T>::to_float(k_raw[u][j], &k_row[j * kVec]);
#pragma unroll
      for (int g = 0; g < kGroupTile; ++g) {
        float dot = 0.f;
#pragma unroll
        for (int i = 0; i < kElems; ++i) dot = fmaf(q[g][i], k_row[i], dot);
        scores[u][g] = dot;
      }
    }
#pragma unroll
    for (int offset = kLanesPerKey / 2; offset > 0; offset /= 2) {
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
#pragma unroll
        for (int g = 0; g < kGroupTile; ++g) scores[u][g] += __shfl_xor_sync(0xffffffffu, scores[u][g], offset);
      }
    }

    float v_rows[kUnroll][kElems];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
#pragma unroll
      for (int j = 0; j < kVecs; ++j) Elem<T>::to_float(v_raw[u][j], &v_rows[u][j * kVec]);
    }
#pragma unroll
    for (int g = 0; g < kGroupTile; ++g) {
      float m_new = m[g];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if (visible[u]) m_new = fmaxf(m_new, scores[u][g]);
      }
      const float alpha = exp2f(m[g] - m_new);
      float weight[kUnroll];
      float weight_sum = 0.f;
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        weight[u] = visible[u] ? exp2f(scores[u][g] - m_new) : 0.f;
        weight_sum += weight[u];
      }
      l[g] = l[g] * alpha + weight_sum;
#pragma unroll
      for (int i = 0; i < kElems; ++i) {
        float a = acc[g][i] * alpha;
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) a = fmaf(weight[u], v_rows[u][i], a);
        acc[g][i] = a;
      }
      m[g] = m_new;
    }
  }

  // Merge the key groups of the warp: lanes lane and lane ^ offset own the same dims of two key groups.
#pragma unroll
  for (int offset = kLanesPerKey; offset < 32; offset *= 2) {
#pragma unroll
    for (int g = 0; g < kGroupTile; ++g) {
      const float m_other = __shfl_xor_sync(0xffffffffu, m[g], offset);
      const float l_other = __shfl_xor_sync(0xffffffffu, l[g], offset);
      float self_scale, other_scale;
      merge_scale(m[g], m_other, self_scale, other_scale);
      l[g] = l[g] * self_scale + l_other * other_scale;
#pragma unroll
      for (int i = 0; i < kElems; ++i) {
        const float acc_other = __shfl_xor_sync(0xffffffffu, acc[g][i], offset);
        acc[g][i] = acc[g][i] * self_scale + acc_other * other_scale;
      }
    }
  }

  // Merge the warps through shared memory; key group 0 of each warp holds the warp's state.
  if (key_group == 0) {
#pragma unroll
    for (int g = 0; g < kGroupTile; ++g) {
      if (lane_in_key == 0) {
        shared_m[warp][g] = m[g];
        shared_l[warp][g] = l[g];
      }
#pragma unroll
      for (int j = 0; j < kVecs; ++j) {
#pragma unroll
        for (int e = 0; e < kVec; ++e) {
          shared_acc[warp][g][(j * kLanesPerKey + lane_in_key) * kVec + e] = acc[g][j * kVec + e];
        }
      }
    }
  }
  __syncthreads();

  const int num_splits = p.num_splits;
  for (int idx = threadIdx.x; idx < kGroupTile * kHeadDimBucket; idx += kThreads) {
    const int g = idx / kHeadDimBucket;
    const int d = idx % kHeadDimBucket;
    const int in_group = first_in_group + g;
    if (in_group >= group || d >= head_dim) continue;
    float m_max = kNegBig;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) m_max = fmaxf(m_max, shared_m[w][g]);
    float sum = 0.f, value = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      const float scale = exp2f(shared_m[w][g] - m_max);
      sum += shared_l[w][g] * scale;
      value += shared_acc[w][g][d] * scale;
    }
    const int head = kv_head * group + in_group;
    if (num_splits == 1) {
      T* out = static_cast<T*>(p.out) + b * p.stride_o_b + head * p.stride_o_h;
      out[d] = Elem<T>::from_float(sum > 0.f ? value / sum : 0.f);
    } else {
      // Workspace: m [B*Hq*splits], l [B*Hq*splits], acc [B*Hq*splits, D].
      const int64_t partials = static_cast<int64_t>(p.batch) * p.q_heads * num_splits;
      const int64_t row_split = (static_cast<int64_t>(b) * p.q_heads + head) * num_splits + split;
      p.workspace[2 * partials + row_split * head_dim + d] = value;
      if (d == 0) {
        p.workspace[row_split] = m_max;
        p.workspace[partials + row_split] = sum;
      }
    }
  }
}

// One CTA per (row, query head): weights of the splits from warp 0, then every thread a slice of D.
template <typename T>
__global__ void __launch_bounds__(kThreads) prefix_decode_combine_kernel(const PrefixDecodeParams p) {
  __shared__ float split_weight[kMaxSplits];
  __shared__ float denominator;
  const int num_splits = p.num_splits;
  const int head_dim = p.head_dim;
  const int64_t partials = static_cast<int64_t>(p.batch) * p.q_heads * num_splits;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * num_splits;
  const float* part_m = p.workspace + first;
  const float* part_l = p.workspace + partials + first;
  const float* part_acc = p.workspace + 2 * partials + first * head_dim;

  if (threadIdx.x < 32) {
    float m_max = kNegBig;
    for (int s = threadIdx.x; s < num_splits; s += 32) m_max = fmaxf(m_max, part_m[s]);
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) m_max = fmaxf(m_max, __shfl_xor_sync(0xffffffffu, m_max, offset));
    float sum = 0.f;
    for (int s = threadIdx.x; s < num_splits; s += 32) {
      const float w = exp2f(part_m[s] - m_max);
      split_weight[s] = w;
      sum += w * part_l[s];
    }
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
    if (threadIdx.x == 0) denominator = sum;
  }
  __syncthreads();

  const int b = blockIdx.x / p.q_heads;
  const int head = blockIdx.x % p.q_heads;
  T* out = static_cast<T*>(p.out) + b * p.stride_o_b + head * p.stride_o_h;
  const float den = denominator;
  for (int d = threadIdx.x; d < head_dim; d += kThreads) {
    float value = 0.f;
    for (int s = 0; s < num_splits; ++s) value = fmaf(split_weight[s], part_acc[s * head_dim + d], value);
    out[d] = Elem<T>::from_float(den > 0.f ? value / den : 0.f);
  }
}

int group_tile_for(int group) {
  if (group <= 1) return 1;
  if (group <= 2) return 2;
  if (group <= 4) return 4;
  return kMaxGroupTile;
}

bool aligned_16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

// 16-byte loads are legal when every row start is 16-byte aligned: aligned bases, row strides that are
// multiples of the vector, and D a multiple of it (so no vector straddles the end of a row).
bool can_vectorize(const PrefixDecodeParams& p, int vec) {
  const int64_t strides[] = {p.stride_q_b,  p.stride_q_h,  p.stride_k_b,  p.stride_k_h,  p.stride_k_s,
                             p.stride_v_b,  p.stride_v_h,  p.stride_v_s,  p.stride_pk_t, p.stride_pk_h,
                             p.stride_pk_p, p.stride_pv_t, p.stride_pv_h, p.stride_pv_p};
  for (int64_t s : strides) {
    if (s % vec != 0) return false;
  }
  return p.head_dim % vec == 0 && aligned_16(p.q) && aligned_16(p.k) && aligned_16(p.v) &&
         aligned_16(p.prefix_k) && aligned_16(p.prefix_v);
}

template <typename T, int kHeadDimBucket, int kGroupTile>
cudaError_t launch_split(const PrefixDecodeParams& p, int chunk_len, cudaStream_t stream) {
  const int group = p.q_heads / p.kv_heads;
  const int head_chunks = ceil_div(group, kGroupTile);
  const dim3 grid(static_cast<unsigned>(p.batch) * p.kv_heads * head_chunks, p.num_splits);
  const bool vectorized = can_vectorize(p, Elem<T>::kVec);
  if (p.block_table != nullptr) {
    prefix_decode_split_kernel<T, kHeadDimBucket, kGroupTile, true>
        <<<grid, kThreads, 0, stream>>>(p, chunk_len, head_chunks, vectorized);
  } else {
    prefix_decode_split_kernel<T, kHeadDimBucket, kGroupTile, false>
        <<<grid, kThreads, 0, stream>>>(p, chunk_len, head_chunks, vectorized);
  }
  return cudaGetLastError();
}

template <typename T, int kHeadDimBucket>
cudaError_t launch_for_group(const PrefixDecodeParams& p, int chunk_len, cudaStream_t stream) {
  switch (group_tile_for(p.q_heads / p.kv_heads)) {
    case 1: return launch_split<T, kHeadDimBucket, 1>(p, chunk_len, stream);
    case 2: return launch_split<T, kHeadDimBucket, 2>(p, chunk_len, stream);
    case 4: return launch_split<T, kHeadDimBucket, 4>(p, chunk_len, stream);
    default: return launch_split<T, kHeadDimBucket, kMaxGroupTile>(p, chunk_len, stream);
  }
}

template <typename T>
cudaError_t launch_typed(const PrefixDecodeParams& p, cudaStream_t stream) {
  const int max_keys = p.prefix_capacity + p.seq_len;
  const int chunk_len = std::max(1, ceil_div(max_keys, p.num_splits));
  cudaError_t status;
  if (p.head_dim <= 64) {
    status = launch_for_group<T, 64>(p, chunk_len, stream);
  } else if (p.head_dim <= 128) {
    status = launch_for_group<T, 128>(p, chunk_len, stream);
  } else {
    status = launch_for_group<T, 256>(p, chunk_len, stream);
  }
  if (status != cudaSuccess || p.num_splits == 1) return status;
  prefix_decode_combine_kernel<T><<<static_cast<unsigned>(p.batch) * p.q_heads, kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

int prefix_decode_num_splits(const PrefixDecodeParams& p, int num_sms) {
  if (p.batch <= 0 || p.kv_heads <= 0 || p.q_heads <= 0) return 1;
  const int group = p.q_heads / p.kv_heads;
  const int64_t ctas_per_split = static_cast<int64_t>(p.batch) * p.kv_heads * ceil_div(group, group_tile_for(group));
  const int max_keys = std::max(1, p.prefix_capacity + p.seq_len);
  const int64_t target_ctas = static_cast<int64_t>(std::max(1, num_sms)) * kCtasPerSm;
  const int64_t wanted = (target_ctas + ctas_per_split - 1) / ctas_per_split;
  const int longest = std::min(kMaxSplits, ceil_div(max_keys, kMinKeysPerSplit));
  int splits = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(wanted, longest)));
  // Equal chunks; drop the splits that whole-chunk rounding would leave empty for every row.
  splits = ceil_div(max_keys, ceil_div(max_keys, splits));
  return splits;
}

size_t prefix_decode_workspace_floats(const PrefixDecodeParams& p) {
  if (p.num_splits <= 1) return 0;
  return static_cast<size_t>(p.batch) * p.q_heads * p.num_splits * (p.head_dim + 2);
}

cudaError_t prefix_decode_launch(const PrefixDecodeParams& p, DecodeDType dtype, cudaStream_t stream) {
  if (p.head_dim < 1 || p.head_dim > 256 || p.num_splits < 1 || p.num_splits > kMaxSplits ||
      p.kv_heads < 1 || p.q_heads % p.kv_heads != 0 || p.table_size < 1 ||
      (p.num_splits > 1 && p.workspace == nullptr) ||
      (p.block_table != nullptr && (p.seq_lens == nullptr || p.block_size < 1 || p.num_blocks < 1))) {
    return cudaErrorInvalidValue;
  }
  if (p.batch == 0 || p.q_heads == 0) return cudaSuccess;
  switch (dtype) {
    case DecodeDType::kFloat16: return launch_typed<half>(p, stream);
    case DecodeDType::kBFloat16: return launch_typed<__nv_bfloat16>(p, stream);
    case DecodeDType::kFloat32: return launch_typed<float>(p, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace fastpeft
