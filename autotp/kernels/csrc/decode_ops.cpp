// The KV-cache ops of a decoding step, registered in the autotp namespace (ops.cpp holds the
// library's definition and the GEMMs):
//   reorder_rows_(tensors, sources, length, starts?)   (beam search's cache reorder, in place)
//   decode_attention(q, key, value, bias?, scale, isa)  (one query position over a bf16 cache, fp32 math)
#include <ATen/EmptyTensor.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <optional>
#include <string>
#include <vector>

#include "kernel_table.h"
#include "op_clock.h"
#include "ops.h"

namespace autotp {

// Beam search's cache reorder, in place: row b (dim 0) of every tensor [B, H, L, D] becomes
// what row sources[b] held, over the first `length` positions of dim 2; the rest and the rows
// that keep their own content are not touched. Beam search mostly keeps rows or copies one
// row into a few others, so this moves a fraction of what gathering every row into new tensors
// does (transformers' reorder), and the tensors keep their addresses (a static cache's). A row
// is overwritten only after every copy that reads it; rows that take each other's content
// (a cycle) go through a saved copy. With `starts`, row b is copied from position starts[b] on
// only: the caller knows the two rows hold the same content before it (beams share a prompt
// and the tokens up to where they parted).
void reorder_rows_(at::TensorList tensors, const at::Tensor& sources, int64_t length,
                   const std::optional<at::Tensor>& starts) {
  const char* op = "autotp::reorder_rows_";
  TORCH_CHECK(sources.dim() == 1 && !sources.is_floating_point() && sources.device().is_cpu(),
              op, ": sources must be a 1-D integer CPU tensor, got ", sources.scalar_type(), " ", sources.sizes());
  const at::Tensor src_t = sources.to(at::kLong).contiguous();
  const int64_t B = src_t.numel();
  const int64_t* src = src_t.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(src[b] >= 0 && src[b] < B, op, ": source ", src[b], " of row ", b, " is not a row of ", B);
  std::vector<int64_t> first(B, 0);  // the first position each row takes
  if (starts.has_value() && starts->defined()) {
    TORCH_CHECK(starts->dim() == 1 && starts->numel() == B && !starts->is_floating_point() &&
                    starts->device().is_cpu(),
                op, ": starts must be a 1-D integer CPU tensor of ", B, " entries, got ", starts->scalar_type(), " ",
                starts->sizes());
    const at::Tensor st = starts->to(at::kLong).contiguous();
    for (int64_t b = 0; b < B; ++b) {
      first[b] = st.data_ptr<int64_t>()[b];
      TORCH_CHECK(first[b] >= 0 && first[b] <= length, op, ": start ", first[b], " of row ", b,
                  " is outside [0, ", length, "]");
    }
  }
  const int64_t lowest = B ? *std::min_element(first.begin(), first.end()) : 0;  // saved copies start here
  for (const at::Tensor& t : tensors)
    TORCH_CHECK(t.device().is_cpu() && t.dim() == 4 && t.size(0) == B && t.is_contiguous() && length >= 0 &&
                    length <= t.size(2),
                op, ": each tensor must be a contiguous CPU [", B, ", heads, >= ", length, ", dim] tensor, got ",
                t.sizes(), t.is_contiguous() ? "" : " (not contiguous)");
  // The plan: steps (save row r into saved copy s) and (row d <- row r or saved copy s).
  struct Step { bool save; int64_t row, from; };  // from: a row (>= 0) or saved copy -1 - s
  std::vector<Step> steps;
  std::vector<int64_t> from(src, src + B);
  std::vector<bool> pending(B);
  int64_t left = 0, saved = 0;
  for (int64_t b = 0; b < B; ++b) left += pending[b] = from[b] != b;
  while (left > 0) {
    int64_t free_row = -1;
    for (int64_t d = 0; d < B && free_row < 0; ++d) {
      if (!pending[d]) continue;
      bool read = false;
      for (int64_t j = 0; j < B && !read; ++j) read = pending[j] && j != d && from[j] == d;
      if (!read) free_row = d;
    }
    if (free_row < 0) {  // every pending row is read by another: a cycle; save one of them
      int64_t d = 0;
      while (!pending[d]) ++d;
      steps.push_back({true, d, -1 - saved});
      for (int64_t j = 0; j < B; ++j)
        if (pending[j] && j != d && from[j] == d) from[j] = -1 - saved;
      ++saved;
      continue;
    }
    steps.push_back({false, free_row, from[free_row]});
    pending[free_row] = false;
    --left;
  }
  for (const at::Tensor& t : tensors) {
    const int64_t H = t.size(1), row = t.size(1) * t.size(2) * t.size(3) * t.element_size();
    const int64_t pos = t.size(3) * t.element_size(), head = t.size(2) * pos;
    const int64_t piece = (length - lowest) * pos;  // a saved copy: positions [lowest, length)
    char* base = static_cast<char*>(t.data_ptr());
    std::vector<char> copies(saved * H * piece);
    for (const Step& s : steps) {
      for (int64_t h = 0; h < H; ++h) {
        char* at_row = base + s.row * row + h * head;
        if (s.save) {
          std::memcpy(copies.data() + ((-1 - s.from) * H + h) * piece, at_row + lowest * pos, piece);
        } else {
          const int64_t from_pos = first[s.row];
          const char* in = s.from >= 0 ? base + s.from * row + h * head + from_pos * pos
                                       : copies.data() + ((-1 - s.from) * H + h) * piece + (from_pos - lowest) * pos;
          std::memcpy(at_row + from_pos * pos, in, (length - from_pos) * pos);
        }
      }
    }
  }
}

// Decode attention (one query position) over a bf16 KV cache, fp32 math (attention_tiles.h):
// q [B, KVH, G, D] fp32 or bf16 (a bf16 model's, taken as it is: a compiled step would
// otherwise hand over its rotary embedding's fp32 values, never rounded to the model's bf16),
// key / value [B, KVH, L, D] bf16 contiguous, bias [B, 1 or KVH * G, L] fp32 (additive) or
// empty; -> [B, KVH, G, D] fp32. Threads over (batch row, KV head).
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& key, const at::Tensor& value,
                            const std::optional<at::Tensor>& bias, double scale, const std::string& isa) {
  OpTimer timer(kOpAttention);
  const char* op = "autotp::decode_attention";
  TORCH_CHECK(q.device().is_cpu() && (q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16) &&
                  q.dim() == 4,
              op, ": q must be a float32 or bfloat16 CPU tensor [batch, kv_heads, group, dim], got ", q.scalar_type(),
              " ", q.sizes());
  const int64_t B = q.size(0), KVH = q.size(1), G = q.size(2), D = q.size(3);
  for (const at::Tensor* t : {&key, &value})
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kBFloat16 && t->dim() == 4 && t->size(0) == B &&
                    t->size(1) == KVH && t->size(3) == D && t->size(2) == key.size(2),
                op, ": key and value must be bfloat16 CPU tensors [", B, ", ", KVH, ", length, ", D, "], got ",
                t->scalar_type(), " ", t->sizes());
  const int64_t L = key.size(2);
  // The bias as it lies where its positions are contiguous (the model's mask is a slice of a
  // larger one), its rows found by its strides; else a float32 contiguous copy.
  at::Tensor b;
  int64_t heads_b = 0, stride_row = 0, stride_head = 0;
  if (bias.has_value() && bias->defined()) {
    const at::Tensor& given = *bias;
    TORCH_CHECK(given.dim() == 3 && given.size(0) == B && (given.size(1) == 1 || given.size(1) == KVH * G) &&
                    given.size(2) == L,
                op, ": bias must be [", B, ", 1 or ", KVH * G, ", ", L, "], got ", given.sizes());
    b = given.scalar_type() == at::kFloat && (L <= 1 || given.stride(2) == 1) ? given
                                                                             : given.to(at::kFloat).contiguous();
    heads_b = b.size(1), stride_row = b.stride(0), stride_head = b.stride(1);
  }
  // The query in fp32 as the kernel reads it: a contiguous bf16 query widened here into this
  // thread's buffer. (at::Tensor::to's copy, a TensorIterator, took 50-150 us a call on a Xeon
  // with AMX when a GEMM's weight stream had just evicted its code: more than the attention.)
  const float* qp = nullptr;
  at::Tensor qc;
  if (q.scalar_type() == at::kFloat && q.is_contiguous()) {
    qp = q.data_ptr<float>();
  } else if (q.scalar_type() == at::kBFloat16 && q.is_contiguous()) {
    thread_local std::vector<float> widened;
    if (widened.size() < static_cast<size_t>(q.numel())) widened.resize(q.numel());
    const auto* src = reinterpret_cast<const uint16_t*>(q.data_ptr<at::BFloat16>());
    for (int64_t i = 0; i < q.numel(); ++i) widened[i] = bf16_to_float(src[i]);
    qp = widened.data();
  } else {
    qc = q.to(at::kFloat).contiguous();
    qp = qc.data_ptr<float>();
  }
  const at::Tensor kc = key.contiguous(), vc = value.contiguous();
  at::Tensor out = at::detail::empty_cpu({B, KVH, G, D}, at::kFloat);  // (begin_linear's reason, ops.cpp)
  if (out.numel() == 0) return out;
  const auto attend = serving_table(kernel_table(isa), CallKind::kAttention, 0).attend_bf16;
  const uint16_t* kp = reinterpret_cast<const uint16_t*>(kc.data_ptr<at::BFloat16>());
  const uint16_t* vp = reinterpret_cast<const uint16_t*>(vc.data_ptr<at::BFloat16>());
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  float* op_out = out.data_ptr<float>();
  at::parallel_for(0, B * KVH, 1, [&](int64_t begin, int64_t end) {
    // attend_bf16_rows' scratch (scores, query, sums, a byte per position), kept by each thread
    thread_local std::vector<float> scratch;
    const size_t need = G * L + 2 * G * D + L;
    if (scratch.size() < need) scratch.resize(need);
    std::vector<const float*> rows(G);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t bi = i / KVH, h = i % KVH;
      for (int64_t g = 0; g < G; ++g)
        rows[g] = bp ? bp + bi * stride_row + (heads_b == 1 ? 0 : (h * G + g) * stride_head) : nullptr;
      attend(qp + i * G * D, kp + i * L * D, vp + i * L * D, rows.data(), static_cast<float>(scale),
             op_out + i * G * D, scratch.data(), G, L, D, i + 1 < end ? kp + (i + 1) * L * D : nullptr);
    }
  });
  return out;
}

}  // namespace autotp

TORCH_LIBRARY_FRAGMENT(autotp, m) {
  m.def("reorder_rows_(Tensor(a!)[] tensors, Tensor sources, int length, Tensor? starts=None) -> ()");
  m.def("decode_attention(Tensor q, Tensor key, Tensor value, Tensor? bias, float scale, str isa=\"\") -> Tensor");
}

TORCH_LIBRARY_IMPL(autotp, CPU, m) {
  m.impl("reorder_rows_", &autotp::reorder_rows_);
  m.impl("decode_attention", &autotp::decode_attention);
}

