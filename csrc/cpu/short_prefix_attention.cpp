// The sdpa backend's short-sequence CPU path (fastpeft/ops/backends/sdpa_short.py) in C++: one op call per direction
// instead of ~25 ATen calls from Python each.
//
// At the sizes this path takes (a whole score matrix of at most 2^20 elements), each ATen call costs a few
// microseconds of Python and dispatch against tens of microseconds of arithmetic; issued from C++ the calls keep
// their arithmetic and lose most of that (benchmarks/NOTES.md). Layout and formulas are the Python module's (its
// docstring explains them):
//   * the query group folded into the query axis: q as [B, Hkv, R = group * L, D], no kv head repeated;
//   * scores kept transposed (keys on the rows): sk [B, Hkv, S, R], sp [B, Hkv, n, R];
//   * base-2 scores (q scaled by softmax_scale * log2(e)), unnormalized exponentials saved for the backward.
// Decoding without a gradient takes a per-query kernel instead (attend_each_query), which also reads a paged KV pool
// through block tables in place (_cpu_paged_prefix_decode).
//
// Private kernel ops of the sdpa backend (importing fastpeft._cpu registers them under torch.ops.fastpeft):
//   _short_prefix_attention_fwd(q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, key_padding_mask?,
//                               causal_bias?, softmax_scale, prefix_n, padded, ragged, keep_for_backward) -> Tensor[]
//     canonical arguments (fastpeft.ops.arguments) plus the host plan (prefix_n: entries attended, ragged: some row
//     sees fewer, padded: key_padding_mask holds padding); causal_bias: the causal mask of the transposed folded key
//     block [S, group * L] (0 / -inf), None when not causal or L == 1. Returns [out [B, Hq, L, D] in q's dtype], and
//     with keep_for_backward also lse [B, Hq, L] (natural log, float32/64, -inf for a query that sees nothing) and
//     the 9 tensors the backward reads. CPU key only: the forward of a call without a gradient, and of the public
//     custom op's (whose backward runs the split's from this lse).
//   _cpu_paged_prefix_decode(q, key_cache, value_cache, block_table, seq_lens, prefix_k, prefix_v, prefix_index,
//                            prefix_lengths, softmax_scale) -> out
//     the canonical arguments of fastpeft.ops.paged_prefix_decode (the sdpa backend's paged decode on CPU, float32/64):
//     row b's seq_lens[b] keys read in place from the pool [num_blocks, Hkv, block_size, D] (unit head stride), key j
//     in block block_table[b, j / block_size] at offset j % block_size; returns [B, Hq, 1, D].
//   _short_prefix_attention(<the same, without keep_for_backward>) -> out
//     the forward with its backward in C++ (Autograd key; ShortPrefixAttentionFunction): what an eager call with a
//     gradient runs, so that its backward runs no Python (an autograd.Function around the two kernels costs ~100 us
//     per layer and training step at the training suite's shape, a tenth of the attention's time there).
// Arguments are validated by fastpeft.prefix_attention; the checks here only guard the layout.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <Python.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <vector>

namespace {

constexpr double kLog2e = 1.4426950408889634;
constexpr double kLn2 = 0.6931471805599453;
constexpr double kNegInf = -std::numeric_limits<double>::infinity();

// Inside the ops every ATen call skips autograd (ShortPrefixAttentionFunction, or the caller, owns the graph) and
// autocast (the math runs in float32/64 whatever the ambient autocast; under it matmuls would run in bfloat16 and mix
// dtypes).
struct PlainComputeGuard {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  c10::impl::ExcludeDispatchKeyGuard no_autocast{c10::DispatchKey::AutocastCPU};
};

at::ScalarType accumulation_type(at::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

// [T, Hkv, P, D] -> the rows' first n entries in the accumulation dtype: [1, Hkv, n, D] for a shared prefix
// (broadcast by the matmuls), else one gather [B, Hkv, n, D].
at::Tensor prefix_rows(const at::Tensor& prefix, const at::Tensor& prefix_index, int64_t n, at::ScalarType acc) {
  at::Tensor rows = prefix.narrow(2, 0, n).to(acc);
  return rows.size(0) == 1 ? rows : rows.index_select(0, prefix_index);
}

// ---- Inference without a gradient: one pass per query, no ATen calls ------------------------------------------
//
// Decoding (L = 1) runs here when nothing is kept for a backward: each (row, kv head) task scores its prefix entries
// and visible keys for the group's query heads into a small buffer, takes the softmax and sums the values, all in
// cache. At decode sizes the matmul formulation below spends most of its time in its ~25 ATen calls (the serving
// benchmark's decode step, B=8, Hq=8, Hkv=2, S=24, P=8, D=32, one thread: 57 us there, 28 us here, 45 us for
// PyTorch's SDPA over the concatenation).

// The per-query path's arguments, as raw pointers and strides (the head dimension contiguous).
template <typename T>
struct QueryTask {
  const T *q, *k, *v, *prefix_k, *prefix_v;
  // [batch (paged: block), head, position]; prefix_v shares prefix_k's
  int64_t q_stride[3], k_stride[3], v_stride[3], prefix_stride[3];
  const int64_t *index, *lengths;
  const bool* keep;  // key padding [B, S], or nullptr
  T* out;            // [B, Hq, L, D] contiguous
  int64_t Hq, L, D, S, group, entries_total, prefix_n;  // S: the keys of a row (paged: the most a block table holds)
  bool causal, ragged;
  T scale;
  // Paged (attend_query<T, true>): row b's seq_lens[b] keys, key j in block block_table[b, j / block_size].
  const int32_t* block_table = nullptr;  // [B, max_blocks], row stride block_table_stride, unit column stride
  const int32_t* seq_lens = nullptr;     // [B]
  int64_t block_table_stride = 0, block_size = 1, num_blocks = 1;
};

// One (row, kv head, query position): the group's query heads together, so each key and value row is read once
// for all of them. `scores` holds group * (prefix_n + S) entries, `acc` group * D. The head-dimension loops are
// `omp simd` (-fopenmp-simd enables only these pragmas, no OpenMP runtime) and the AVX2 clone runs where the CPU
// has it.
#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
#define FASTPEFT_SIMD_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define FASTPEFT_SIMD_CLONES
#endif

template <typename T, bool kPaged>
FASTPEFT_SIMD_CLONES void attend_query(const QueryTask<T>& t, int64_t b, int64_t kv_head, int64_t i, T* scores,
                                       T* acc) {
  const int64_t D = t.D, G = t.group, width = t.prefix_n + t.S;
  constexpr T kNoKey = -std::numeric_limits<T>::infinity();
  // The row's table entry (clamped: values are validated before any kernel, except under torch.compile), how many of
  // its entries it sees, and the keys up to its causal position (bottom-right aligned; paged: its seq_lens, clamped
  // like the block numbers below, which keeps unchecked values inside the pool).
  const int64_t entry = std::min(std::max<int64_t>(t.index[b], 0), t.entries_total - 1);
  const int64_t entries = t.ragged ? std::min(std::max<int64_t>(t.lengths[entry], 0), t.prefix_n) : t.prefix_n;
  const int64_t keys = kPaged ? std::min(std::max<int64_t>(t.seq_lens[b], 0), t.S)
                              : (t.causal ? t.S - t.L + i + 1 : t.S);
  const T* queries = t.q + b * t.q_stride[0] + kv_head * G * t.q_stride[1] + i * t.q_stride[2];
  T top[64];  // G <= 64 (checked by the caller)
  for (int64_t g = 0; g < G; ++g) top[g] = kNoKey;
  auto score_row = [&](const T* key, int64_t column) {
    for (int64_t g = 0; g < G; ++g) {
      const T* query = queries + g * t.q_stride[1];
      T total = 0;
#pragma omp simd reduction(+ : total)
      for (int64_t d = 0; d < D; ++d) total += query[d] * key[d];
      total *= t.scale;
      scores[g * width + column] = total;
      top[g] = std::max(top[g], total);
    }
  };
  const T* prefix_k = t.prefix_k + entry * t.prefix_stride[0] + kv_head * t.prefix_stride[1];
  const T* prefix_v = t.prefix_v + entry * t.prefix_stride[0] + kv_head * t.prefix_stride[1];
  // Dense: the row's keys start at k[b]. Paged: each key's row is found through the row's block table.
  const T* k = t.k + (kPaged ? 0 : b * t.k_stride[0]) + kv_head * t.k_stride[1];
  const T* v = t.v + (kPaged ? 0 : b * t.v_stride[0]) + kv_head * t.v_stride[1];
  const int32_t* blocks = kPaged ? t.block_table + b * t.block_table_stride : nullptr;
  const auto key_row = [&](const T* base, const int64_t* stride, int64_t j) -> const T* {
    if constexpr (kPaged) {
      const int64_t block = std::min(std::max<int64_t>(blocks[j / t.block_size], 0), t.num_blocks - 1);
      return base + block * stride[0] + (j % t.block_size) * stride[2];
    } else {
      return base + j * stride[2];
    }
  };
  for (int64_t j = 0; j < entries; ++j) score_row(prefix_k + j * t.prefix_stride[2], j);
  for (int64_t j = 0; j < keys; ++j) {
    if (t.keep != nullptr && !t.keep[b * t.S + j]) {
      for (int64_t g = 0; g < G; ++g) scores[g * width + t.prefix_n + j] = kNoKey;
    } else {
      score_row(key_row(k, t.k_stride, j), t.prefix_n + j);
    }
  }
  T total[64];
  for (int64_t g = 0; g < G; ++g) total[g] = 0;
  for (int64_t x = 0; x < G * D; ++x) acc[x] = 0;
  auto add_value_row = [&](const T* value, int64_t column) {
    for (int64_t g = 0; g < G; ++g) {
      if (top[g] == kNoKey) continue;  // this query sees nothing: zeros
      const T p = std::exp(scores[g * width + column] - top[g]);  // 0 for a padding key
      total[g] += p;
      T* row = acc + g * D;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) row[d] += p * value[d];
    }
  };
  for (int64_t j = 0; j < entries; ++j) add_value_row(prefix_v + j * t.prefix_stride[2], j);
  for (int64_t j = 0; j < keys; ++j) add_value_row(key_row(v, t.v_stride, j), t.prefix_n + j);
  for (int64_t g = 0; g < G; ++g) {
    const T inv = total[g] > 0 ? T(1) / total[g] : T(0);
    T* target = t.out + (((b * t.Hq + kv_head * G + g) * t.L) + i) * D;
    for (int64_t d = 0; d < D; ++d) target[d] = acc[g * D + d] * inv;
  }
}

// One task per (row, kv head, query position), in parallel chunks of about 32K multiply-adds.
template <typename T, bool kPaged>
void run_query_tasks(const QueryTask<T>& task, int64_t tasks, int64_t Hkv) {
  const int64_t L = task.L, width = task.prefix_n + task.S;
  const int64_t work = std::max<int64_t>(1, task.group * width * task.D);
  at::parallel_for(0, tasks, std::max<int64_t>(1, 32768 / work), [&](int64_t begin, int64_t end) {
    std::vector<T> scores(task.group * width), acc(task.group * task.D);
    for (int64_t n = begin; n < end; ++n) {
      attend_query<T, kPaged>(task, n / (Hkv * L), n / L % Hkv, n % L, scores.data(), acc.data());
    }
  });
}

// Decoding (one query position) without a gradient, in float32/64. With more query positions the matmuls win on one
// thread (each position here reads every key row again), measured on the 2-core CPU (benchmarks/NOTES.md).
bool per_query_path(const at::Tensor& q, int64_t group, bool keep_for_backward) {
  return !keep_for_backward && q.size(2) == 1 && group <= 64 &&
         (q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble);
}

template <typename T>
at::Tensor attend_each_query(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& prefix_k,
                             const at::Tensor& prefix_v, const at::Tensor& prefix_index,
                             const at::Tensor& prefix_lengths, const std::optional<at::Tensor>& key_padding_mask,
                             bool causal, double softmax_scale, int64_t prefix_n, bool padded, bool ragged) {
  const int64_t B = q.size(0), Hq = q.size(1), L = q.size(2), D = q.size(3), Hkv = k.size(1), S = k.size(2);
  // Contiguous head dimension for the inner loops (models' transposed views already have it; copies otherwise);
  // prefix_v laid out like prefix_k, so one set of strides serves both.
  const auto rows_of = [](const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); };
  const at::Tensor qc = rows_of(q), kc = k.contiguous(), vc = v.contiguous();
  const at::Tensor pkc = prefix_k.contiguous(), pvc = prefix_v.contiguous();
  const at::Tensor index = prefix_index.to(at::kLong).contiguous(), lengths = prefix_lengths.to(at::kLong).contiguous();
  const at::Tensor keep = padded ? key_padding_mask->to(at::kBool).contiguous() : at::Tensor();
  at::Tensor out = at::empty({B, Hq, L, D}, q.options());
  QueryTask<T> task{qc.data_ptr<T>(), kc.data_ptr<T>(), vc.data_ptr<T>(), pkc.data_ptr<T>(), pvc.data_ptr<T>(),
                    {qc.stride(0), qc.stride(1), qc.stride(2)}, {kc.stride(0), kc.stride(1), kc.stride(2)},
                    {vc.stride(0), vc.stride(1), vc.stride(2)}, {pkc.stride(0), pkc.stride(1), pkc.stride(2)},
                    index.data_ptr<int64_t>(), lengths.data_ptr<int64_t>(), padded ? keep.data_ptr<bool>() : nullptr,
                    out.data_ptr<T>(), Hq, L, D, S, Hq / Hkv, prefix_k.size(0), prefix_n, causal, ragged,
                    static_cast<T>(softmax_scale)};
  run_query_tasks<T, false>(task, B * Hkv * L, Hkv);
  return out;
}

// Decode over a paged pool (_cpu_paged_prefix_decode): the per-query kernel with each row's keys read in place
// through its block table. The pool is never copied: its head dimension must be contiguous (the caller checks).
template <typename T>
at::Tensor attend_paged(const at::Tensor& q, const at::Tensor& key_cache, const at::Tensor& value_cache,
                        const at::Tensor& block_table, const at::Tensor& seq_lens, const at::Tensor& prefix_k,
                        const at::Tensor& prefix_v, const at::Tensor& prefix_index, const at::Tensor& prefix_lengths,
                        double softmax_scale) {
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(3), Hkv = key_cache.size(1);
  const at::Tensor qc = q.stride(-1) == 1 ? q : q.contiguous();
  const at::Tensor pkc = prefix_k.contiguous(), pvc = prefix_v.contiguous();
  const at::Tensor index = prefix_index.to(at::kLong).contiguous(), lengths = prefix_lengths.to(at::kLong).contiguous();
  const at::Tensor table = block_table.to(at::kInt).contiguous(), rows = seq_lens.to(at::kInt).contiguous();
  at::Tensor out = at::empty({B, Hq, 1, D}, q.options());
  QueryTask<T> task{qc.data_ptr<T>(), key_cache.data_ptr<T>(), value_cache.data_ptr<T>(), pkc.data_ptr<T>(),
                    pvc.data_ptr<T>(), {qc.stride(0), qc.stride(1), qc.stride(2)},
                    {key_cache.stride(0), key_cache.stride(1), key_cache.stride(2)},
                    {value_cache.stride(0), value_cache.stride(1), value_cache.stride(2)},
                    {pkc.stride(0), pkc.stride(1), pkc.stride(2)}, index.data_ptr<int64_t>(),
                    lengths.data_ptr<int64_t>(), nullptr, out.data_ptr<T>(), Hq, 1, D,
                    table.size(1) * key_cache.size(2), Hq / Hkv, prefix_k.size(0), prefix_k.size(2), false, true,
                    static_cast<T>(softmax_scale), table.data_ptr<int32_t>(), rows.data_ptr<int32_t>(),
                    table.stride(0), key_cache.size(2), key_cache.size(0)};
  run_query_tasks<T, true>(task, B * Hkv, Hkv);
  return out;
}

// The forward; with keep_for_backward also the lse (undefined unless with_lse) and the backward's 9 tensors. The C++
// autograd Function reads only the 9 (its lse would cost ~9 us a call at the training suite's size, for nothing).
std::vector<at::Tensor> attend_short(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& prefix_k,
    const at::Tensor& prefix_v, const at::Tensor& prefix_index, const at::Tensor& prefix_lengths,
    const std::optional<at::Tensor>& key_padding_mask, const std::optional<at::Tensor>& causal_bias,
    double softmax_scale, int64_t prefix_n, bool padded, bool ragged, bool keep_for_backward, bool with_lse) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.sizes() == k.sizes() && prefix_k.dim() == 4,
              "short_prefix_attention_fwd: expects canonical q [B, Hq, L, D], k/v [B, Hkv, S, D], "
              "prefix_k/prefix_v [T, Hkv, P, D]");
  const PlainComputeGuard plain;
  const int64_t B = q.size(0), Hq = q.size(1), L = q.size(2), D = q.size(3);
  const int64_t Hkv = k.size(1), S = k.size(2), group = Hq / Hkv, R = group * L;
  const at::ScalarType acc = accumulation_type(q.scalar_type());
  const auto options = q.options().dtype(acc);
  if (per_query_path(q, group, keep_for_backward)) {
    return {AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "short_prefix_attention_infer", [&] {
      return attend_each_query<scalar_t>(q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, key_padding_mask,
                                         causal_bias.has_value(), softmax_scale, prefix_n, padded, ragged);
    })};
  }

  // One pass: scaled, contiguous and in base 2; viewed folded.
  at::Tensor qs = at::empty({B, Hq, L, D}, options);
  at::mul_out(qs, q.to(acc), softmax_scale * kLog2e);  // (the cast is a copy only for 16-bit inputs)
  qs = qs.view({B, Hkv, R, D});
  const at::Tensor qt = qs.transpose(-1, -2);
  // Contiguous once (models hand over transposed views): every matmul of both directions reads them as is.
  const at::Tensor kk = k.to(acc).contiguous(), vv = v.to(acc).contiguous();
  at::Tensor sk;
  if (causal_bias.has_value()) {  // the causal mask is the score matmul's initial value
    sk = at::baddbmm(*causal_bias, kk.view({B * Hkv, S, D}), qs.view({B * Hkv, R, D}).transpose(1, 2))
             .view({B, Hkv, S, R});
  } else {
    sk = at::matmul(kk, qt);
  }
  if (padded) {
    sk.add_(at::zeros({B, 1, S, 1}, options)
                .masked_fill_(key_padding_mask->logical_not().view({B, 1, S, 1}), kNegInf));
  }
  at::Tensor m = sk.amax(-2);  // [B, Hkv, R]
  at::Tensor pk, pv, sp;
  if (prefix_n > 0) {
    pk = prefix_rows(prefix_k, prefix_index, prefix_n, acc);
    pv = prefix_rows(prefix_v, prefix_index, prefix_n, acc);
    sp = at::matmul(pk, qt);  // [B, Hkv, n, R]
    if (ragged) {
      const at::Tensor visible = at::arange(prefix_n, prefix_index.options().dtype(at::kLong)).view({1, prefix_n})
                                     .lt(prefix_lengths.index_select(0, prefix_index).view({B, 1}));
      sp.masked_fill_(visible.logical_not().view({B, 1, prefix_n, 1}), kNegInf);
    }
    m = at::maximum(m, sp.amax(-2));
  }
  const bool may_be_blind = padded || ragged;
  if (may_be_blind) {  // a query that sees nothing: every score -inf; with m = 0 every exp2 is 0
    m.masked_fill_(m.eq(kNegInf), 0.0);
  }
  const at::Tensor shift = m.unsqueeze(-2);
  sk.sub_(shift).exp2_();
  at::Tensor total = sk.sum(-2);
  if (prefix_n > 0) {
    sp.sub_(shift).exp2_();
    total.add_(sp.sum(-2));
  }
  // The log-sum-exp in natural log, before the blind queries' total is set to 1: log2(0) + 0 = -inf for them.
  const at::Tensor lse = keep_for_backward && with_lse ? total.log2().add_(m).mul_(kLn2) : at::Tensor();
  if (may_be_blind) {
    total.masked_fill_(total.eq(0), 1.0);
  }
  const at::Tensor inv = total.reciprocal_();  // [B, Hkv, R]
  at::Tensor out = at::matmul(sk.transpose(-1, -2), vv);  // [B, Hkv, R, D]
  if (prefix_n > 0) {
    out.add_(at::matmul(sp.transpose(-1, -2), pv));
  }
  out.mul_(inv.unsqueeze(-1));
  std::vector<at::Tensor> result{out.view({B, Hq, L, D}).to(q.scalar_type())};
  if (keep_for_backward) {
    if (prefix_n == 0) {  // empty stand-ins: the backward tests pk.size(2)
      pk = pv = at::empty({1, Hkv, 0, D}, options);
      sp = at::empty({B, Hkv, 0, R}, options);
    }
    result.insert(result.end(), {with_lse ? lse.view({B, Hq, L}) : lse, qs, kk, vv, pk, pv, sk, sp, out, inv});
  }
  return result;
}

// The op _short_prefix_attention_fwd: with keep_for_backward, the lse too.
std::vector<at::Tensor> short_prefix_attention_fwd(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& prefix_k,
    const at::Tensor& prefix_v, const at::Tensor& prefix_index, const at::Tensor& prefix_lengths,
    const std::optional<at::Tensor>& key_padding_mask, const std::optional<at::Tensor>& causal_bias,
    double softmax_scale, int64_t prefix_n, bool padded, bool ragged, bool keep_for_backward) {
  return attend_short(q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, key_padding_mask, causal_bias,
                      softmax_scale, prefix_n, padded, ragged, keep_for_backward, /*with_lse=*/keep_for_backward);
}

// Per-row prefix gradients [B|1, Hkv, n, D] -> [T, Hkv, P, D] summed per table entry, in the prefix's dtype.
at::Tensor reduce_prefix(const at::Tensor& rows, const at::Tensor& prefix, const at::Tensor& prefix_index) {
  const int64_t T = prefix.size(0), P = prefix.size(2), n = rows.size(2);
  if (T == 1 && n == P) {  // shared and whole: the batch sum is the gradient
    return rows.sum(0, /*keepdim=*/true).to(prefix.scalar_type());
  }
  at::Tensor total = at::zeros(prefix.sizes(), rows.options());
  if (T == 1) {
    total.narrow(2, 0, n).select(0, 0).copy_(rows.sum(0));
  } else {  // CPU: index_add_ is deterministic here
    total.narrow(2, 0, n).index_add_(0, prefix_index, rows);
  }
  return total.to(prefix.scalar_type());
}

std::vector<at::Tensor> short_prefix_attention_bwd(const at::Tensor& dout, at::TensorList saved,
                                                   const at::Tensor& prefix_k, const at::Tensor& prefix_index,
                                                   double softmax_scale) {
  TORCH_CHECK(saved.size() == 9, "short_prefix_attention_bwd: saved must be the forward's 9 tensors, got ",
              saved.size());
  const PlainComputeGuard plain;
  const at::Tensor &qs = saved[0], &kk = saved[1], &vv = saved[2], &pk = saved[3], &pv = saved[4],
                   &pkeys = saved[5], &pprefix = saved[6], &out = saved[7], &inv = saved[8];
  const int64_t B = qs.size(0), Hkv = qs.size(1), R = qs.size(2), D = qs.size(3);
  const int64_t L = dout.size(2), group = R / L;
  // The saved exponentials are unnormalized (p = e * inv per query): dout scaled by inv first makes
  // dv = e @ dout' and dS = e * (v @ dout'^T - rowsum(dout' * out)) = p * (dP - delta).
  at::Tensor dout_scaled = at::empty({B, Hkv, R, D}, qs.options());
  at::Tensor dout_scaled_split = dout_scaled.view({B, Hkv, group, L, D});
  at::mul_out(dout_scaled_split, dout.view({B, Hkv, group, L, D}), inv.view({B, Hkv, group, L, 1}));
  const at::Tensor dout_t = dout_scaled.transpose(-1, -2);
  const at::Tensor delta = (dout_scaled * out).sum(-1).unsqueeze(-2);  // [B, Hkv, 1, R]
  at::Tensor ds = at::baddbmm(delta.neg().view({B * Hkv, 1, R}), vv.view({B * Hkv, -1, D}),
                              dout_t.reshape({B * Hkv, D, R}))
                      .view(pkeys.sizes())
                      .mul_(pkeys);  // dS / scale: [B, Hkv, S, R]
  at::Tensor dq = at::matmul(ds.transpose(-1, -2), kk);
  at::Tensor dk = at::matmul(ds, qs).mul_(kLn2);
  at::Tensor dv = at::matmul(pkeys, dout_scaled);
  at::Tensor dprefix_k, dprefix_v;
  if (pk.size(2) > 0) {
    at::Tensor dsp = at::matmul(pv, dout_t).sub_(delta).mul_(pprefix);
    dq.add_(at::matmul(dsp.transpose(-1, -2), pk));
    dprefix_k = reduce_prefix(at::matmul(dsp, qs).mul_(kLn2), prefix_k, prefix_index);
    dprefix_v = reduce_prefix(at::matmul(pprefix, dout_scaled), prefix_k, prefix_index);
  } else {  // no prefix entry visible to any row
    dprefix_k = at::zeros_like(prefix_k);
    dprefix_v = at::zeros_like(prefix_k);
  }
  const at::ScalarType dtype = dout.scalar_type();
  return {dq.mul_(softmax_scale).view(dout.sizes()).to(dtype), dk.to(dtype), dv.to(dtype), dprefix_k, dprefix_v};
}

}  // namespace

namespace fastpeft {

// The forward with its backward in C++: a training step's backward runs no Python at all, and the forward is one op
// call.
class ShortPrefixAttentionFunction : public torch::autograd::Function<ShortPrefixAttentionFunction> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k,
                            const at::Tensor& v, const at::Tensor& prefix_k, const at::Tensor& prefix_v,
                            const at::Tensor& prefix_index, const at::Tensor& prefix_lengths,
                            const std::optional<at::Tensor>& key_padding_mask,
                            const std::optional<at::Tensor>& causal_bias, double softmax_scale, int64_t prefix_n,
                            bool padded, bool ragged) {
    std::vector<at::Tensor> result =
        attend_short(q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, key_padding_mask, causal_bias,
                     softmax_scale, prefix_n, padded, ragged, /*keep_for_backward=*/true, /*with_lse=*/false);
    // [out, lse (undefined), the backward's 9], then prefix_k and prefix_index
    std::vector<at::Tensor> saved(result.begin() + 2, result.end());
    saved.push_back(prefix_k);
    saved.push_back(prefix_index);
    ctx->save_for_backward(saved);
    ctx->saved_data["softmax_scale"] = softmax_scale;
    return result[0];
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_outputs) {
    const std::vector<at::Tensor> saved = ctx->get_saved_variables();
    const size_t forward_saved = saved.size() - 2;  // then prefix_k, prefix_index
    std::vector<at::Tensor> grads = short_prefix_attention_bwd(
        grad_outputs[0], at::TensorList(saved.data(), forward_saved), saved[forward_saved], saved[forward_saved + 1],
        ctx->saved_data["softmax_scale"].toDouble());
    grads.resize(13);  // no gradient for prefix_index .. ragged
    return grads;
  }
};

}  // namespace fastpeft

namespace {

// CPU key (reached below autograd, e.g. under inference mode): the forward alone, nothing saved.
at::Tensor short_prefix_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                      const at::Tensor& prefix_k, const at::Tensor& prefix_v,
                                      const at::Tensor& prefix_index, const at::Tensor& prefix_lengths,
                                      const std::optional<at::Tensor>& key_padding_mask,
                                      const std::optional<at::Tensor>& causal_bias, double softmax_scale,
                                      int64_t prefix_n, bool padded, bool ragged) {
  return short_prefix_attention_fwd(q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, key_padding_mask,
                                    causal_bias, softmax_scale, prefix_n, padded, ragged, false)[0];
}

// Autograd key: through the Function when a gradient is needed, else the CPU kernel.
at::Tensor short_prefix_attention_autograd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                           const at::Tensor& prefix_k, const at::Tensor& prefix_v,
                                           const at::Tensor& prefix_index, const at::Tensor& prefix_lengths,
                                           const std::optional<at::Tensor>& key_padding_mask,
                                           const std::optional<at::Tensor>& causal_bias, double softmax_scale,
                                           int64_t prefix_n, bool padded, bool ragged) {
  const bool needs_grad = at::GradMode::is_enabled() && (q.requires_grad() || k.requires_grad() ||
                                                         v.requires_grad() || prefix_k.requires_grad() ||
                                                         prefix_v.requires_grad());
  if (needs_grad) {
    return fastpeft::ShortPrefixAttentionFunction::apply(q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths,
                                                         key_padding_mask, causal_bias, softmax_scale, prefix_n,
                                                         padded, ragged);
  }
  return short_prefix_attention_cpu(q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, key_padding_mask,
                                    causal_bias, softmax_scale, prefix_n, padded, ragged);
}

// CPU key: the sdpa backend's paged decode in float32/64 (fastpeft.ops.paged_prefix_decode validated the arguments;
// the checks here only guard the layout).
at::Tensor cpu_paged_prefix_decode(const at::Tensor& q, const at::Tensor& key_cache, const at::Tensor& value_cache,
                                   const at::Tensor& block_table, const at::Tensor& seq_lens,
                                   const at::Tensor& prefix_k, const at::Tensor& prefix_v,
                                   const at::Tensor& prefix_index, const at::Tensor& prefix_lengths,
                                   double softmax_scale) {
  TORCH_CHECK(q.dim() == 4 && q.size(2) == 1 && key_cache.dim() == 4 && value_cache.sizes() == key_cache.sizes() &&
                  prefix_k.dim() == 4 && block_table.dim() == 2 && block_table.size(0) == q.size(0),
              "_cpu_paged_prefix_decode: expects canonical q [B, Hq, 1, D], key_cache/value_cache "
              "[num_blocks, Hkv, block_size, D], block_table [B, max_blocks], prefix_k/prefix_v [T, Hkv, P, D]");
  TORCH_CHECK(key_cache.stride(-1) == 1 && value_cache.stride(-1) == 1,
              "_cpu_paged_prefix_decode: the pool's head dimension must be contiguous (it is never copied)");
  TORCH_CHECK(per_query_path(q, q.size(1) / key_cache.size(1), false),
              "_cpu_paged_prefix_decode: takes float32/float64 and at most 64 query heads per kv head");
  const PlainComputeGuard plain;
  return AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "cpu_paged_prefix_decode", [&] {
    return attend_paged<scalar_t>(q, key_cache, value_cache, block_table, seq_lens, prefix_k, prefix_v, prefix_index,
                                  prefix_lengths, softmax_scale);
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastpeft, m) {
  m.def("_short_prefix_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor prefix_k, Tensor prefix_v, "
        "Tensor prefix_index, Tensor prefix_lengths, Tensor? key_padding_mask, Tensor? causal_bias, "
        "float softmax_scale, int prefix_n, bool padded, bool ragged, bool keep_for_backward) -> Tensor[]");
  m.def("_short_prefix_attention(Tensor q, Tensor k, Tensor v, Tensor prefix_k, Tensor prefix_v, "
        "Tensor prefix_index, Tensor prefix_lengths, Tensor? key_padding_mask, Tensor? causal_bias, "
        "float softmax_scale, int prefix_n, bool padded, bool ragged) -> Tensor");
  m.def("_cpu_paged_prefix_decode(Tensor q, Tensor key_cache, Tensor value_cache, Tensor block_table, "
        "Tensor seq_lens, Tensor prefix_k, Tensor prefix_v, Tensor prefix_index, Tensor prefix_lengths, "
        "float softmax_scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastpeft, CPU, m) {
  m.impl("_short_prefix_attention_fwd", &short_prefix_attention_fwd);
  m.impl("_short_prefix_attention", &short_prefix_attention_cpu);
  m.impl("_cpu_paged_prefix_decode", &cpu_paged_prefix_decode);
}

TORCH_LIBRARY_IMPL(fastpeft, Autograd, m) { m.impl("_short_prefix_attention", &short_prefix_attention_autograd); }

// A Python module without functions: importing fastpeft._cpu loads the library, whose static initializers above
// register the ops. (No pybind11: it would triple the compile time for nothing.)
PyMODINIT_FUNC PyInit__cpu(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "fastpeft._cpu", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
