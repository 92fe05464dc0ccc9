// The instruction sets this build holds, best first, and finding one by name. Adding an ISA:
// its file, and one line here.
#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <string>
#include <vector>

#include "kernel_table.h"

namespace autotp {

const std::vector<const KernelTable*>& kernel_tables() {
  static const std::vector<const KernelTable*> tables{
#if AUTOTP_X86_TABLES
      &amx_table(),
      &avx512_bf16_table(),
      &avx512_vnni_table(),
      &avx512_table(),
      &avx2_table(),
#endif
      &generic_table(),
  };
  return tables;
}

const std::vector<const KernelTable*>& runnable_tables() {
  static const std::vector<const KernelTable*> runnable = [] {  // asked of the CPU once, not per call
    std::vector<const KernelTable*> out;
    for (const KernelTable* t : kernel_tables())
      if (t->supported()) out.push_back(t);
    return out;
  }();
  return runnable;
}

const KernelTable& kernel_table(const std::string& name) {
  for (const KernelTable* t : runnable_tables())
    if (name.empty() || name == t->name) return *t;
  for (const KernelTable* t : kernel_tables())
    TORCH_CHECK(name != t->name, "autotp: this CPU cannot run the ", name, " kernels; choose a lower AUTOTP_ISA");
  TORCH_CHECK(false, "autotp: no kernels called '", name, "' in this build (it has ",
              [] {
                std::string names;
                for (const KernelTable* t : kernel_tables()) names += std::string(names.empty() ? "" : ", ") + t->name;
                return names;
              }(), ")");
}

namespace {
// AMD CPUs without AVX-512 (Zen 1-3): their AVX2 tiles gain from a short prefetch (kernel_table.h)
bool amd_without_avx512() {
#if defined(__x86_64__)
  __builtin_cpu_init();
  return __builtin_cpu_is("amd") && !__builtin_cpu_supports("avx512f");
#else
  return false;
#endif
}

bool default_weight_prefetch() {
#if defined(__x86_64__)
  __builtin_cpu_init();
  return !__builtin_cpu_is("amd") || amd_without_avx512();
#else
  return true;
#endif
}

std::atomic<bool>& prefetch_setting() {
  static std::atomic<bool> on{default_weight_prefetch()};  // the CPU's default, asked once
  return on;
}

std::atomic<int64_t>& prefetch_pairs_setting() {
  static std::atomic<int64_t> pairs{amd_without_avx512() ? 4 : 16};
  return pairs;
}
}  // namespace

bool weight_prefetch() { return prefetch_setting().load(std::memory_order_relaxed); }

void set_weight_prefetch(bool on) { prefetch_setting().store(on, std::memory_order_relaxed); }

int64_t weight_prefetch_pairs() { return prefetch_pairs_setting().load(std::memory_order_relaxed); }

void set_weight_prefetch_pairs(int64_t pairs) { prefetch_pairs_setting().store(pairs, std::memory_order_relaxed); }

const KernelTable& serving_table(const KernelTable& start, CallKind kind, int64_t M) {
  const auto& tables = runnable_tables();
  auto it = std::find(tables.begin(), tables.end(), &start);
  TORCH_CHECK(it != tables.end(), "autotp: the ", start.name, " kernels do not run on this CPU");
  for (; it != tables.end(); ++it) {
    const KernelTable& t = **it;
    const bool serves = kind == CallKind::kAttention ? t.attend_bf16 != nullptr
                        : kind == CallKind::kInt8   ? t.int8_tile != nullptr && M >= t.int8_min_rows
                        : kind == CallKind::kInt4 ? t.int4_tile != nullptr
                        : kind == CallKind::kInt4Bf16X ? t.int4_tile != nullptr || t.int4x_tile != nullptr
                        : t.bf16_tile != nullptr || (kind == CallKind::kBf16Bf16X && takes_bf16x(t, M));
    if (serves) return t;
  }
  return generic_table();  // unreachable: the generic table serves every call and is always runnable
}

}  // namespace autotp
