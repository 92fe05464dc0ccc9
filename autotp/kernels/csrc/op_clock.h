// Where a decoding step's time goes without a profiler: the time spent inside autotp's ops, by
// kind, summed while the clock is on (tools/profile_decode.py reads it per step; what is left
// of a step is everything else: the compiled graph's own code and fused loops, Python,
// generate). torch.profiler adds its own cost to every op it records (about a tenth of a
// llama-1b step) and so shifts the shares; this clock costs two reads of steady_clock per op
// while on and one relaxed load while off. Ops run on one thread per rank; the sums are atomic
// all the same.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>

namespace autotp {

enum OpKind : int { kOpGemm = 0, kOpCollective = 1, kOpAttention = 2, kOpKinds = 3 };

struct OpClockTotals {
  std::atomic<bool> on{false};
  std::atomic<int64_t> ns[kOpKinds] = {};
  std::atomic<int64_t> calls[kOpKinds] = {};
};

// One per process (constant-initialized: no guard on the ops' path).
inline OpClockTotals op_clock_totals;

// Adds the time from its construction to its destruction to `kind`'s sum while the clock is on.
class OpTimer {
 public:
  explicit OpTimer(OpKind kind) : kind_(kind), on_(op_clock_totals.on.load(std::memory_order_relaxed)) {
    if (on_) start_ = std::chrono::steady_clock::now();
  }
  ~OpTimer() {
    if (!on_) return;
    const auto ns = std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - start_);
    OpClockTotals& t = op_clock_totals;
    t.ns[kind_].fetch_add(ns.count(), std::memory_order_relaxed);
    t.calls[kind_].fetch_add(1, std::memory_order_relaxed);
  }
  OpTimer(const OpTimer&) = delete;
  OpTimer& operator=(const OpTimer&) = delete;

 private:
  OpKind kind_;
  bool on_;
  std::chrono::steady_clock::time_point start_;
};

}  // namespace autotp
