// All-reduce through shared memory for the ranks of one host.
//
// One POSIX shared-memory segment per process group, mapped by every rank: a header (per-rank
// arrival and departure counters, each on its own cache line) and two sets of per-rank slots
// used by alternate calls. A call copies its chunk into its slot, announces it, waits for every
// rank, sums all slots in rank order in fp32 (so every rank gets bit-identical results), and
// announces it is done reading; a slot is only overwritten once every rank has read it. An
// all-gather goes the same way, copying every slot into its columns instead of summing.
// Waiting ranks spin, then yield; a rank that does not arrive within the timeout, or whose
// process has exited, makes the others raise instead of hanging.
#pragma once

#include "kernel_table.h"

#include <ATen/core/Tensor.h>
#include <ATen/core/ivalue.h>  // torch::CustomClassHolder

#include <cstdint>
#include <string>

namespace autotp {

class ShmComm : public torch::CustomClassHolder {
 public:
  // Creates (create=true, one rank) or opens the segment `name` for `size` ranks with slots of
  // `slot_bytes`; `timeout_s` bounds every wait. `isa` names the kernel table whose sums reduce
  // ("" the best this CPU runs, "generic" the portable ones, so that they are tested anywhere).
  ShmComm(std::string name, int64_t rank, int64_t size, int64_t slot_bytes, bool create, double timeout_s,
          std::string isa);
  ~ShmComm() override;

  // Sums a contiguous float32 or bfloat16 CPU tensor over the ranks, in place; returns it.
  at::Tensor all_reduce(at::Tensor tensor);
  // The sum of `tensor` over the ranks written into `out` (contiguous, its dtype and size; may be
  // `tensor` itself); returns out. `tensor` is only read.
  at::Tensor all_reduce_into(const at::Tensor& tensor, at::Tensor out);
  // The concatenation along the last dim of every rank's `tensor` (rank r holds `sizes[r]`
  // columns, the leading dims alike on every rank): copied through the slots, not summed.
  at::Tensor all_gather_last_dim(const at::Tensor& tensor, at::IntArrayRef sizes);
  // Removes the segment's name (the mappings stay valid); called once every rank has it open.
  void unlink();
  std::string name() const { return name_; }
  // This handle's number in the process-wide registry the ops below look it up in (a compiled
  // graph passes numbers, not objects).
  int64_t id() const { return id_; }
  int64_t rank() const { return rank_; }
  int64_t size() const { return size_; }

  // The handle numbered `id` (alive while its ShmComm is); an error if there is none.
  static ShmComm& lookup(int64_t id);

 private:
  struct Header;
  void wait_all(int which, int64_t target);
  char* slot(int64_t buffer, int64_t rank) const;

  std::string name_;
  int64_t rank_, size_, slot_bytes_;
  double timeout_s_;
  const KernelTable* sums_;  // the reduction's code
  size_t bytes_ = 0;
  void* base_ = nullptr;
  Header* header_ = nullptr;
  int64_t seq_ = 0;
  bool unlinked_ = false;
  bool broken_ = false;
  int64_t id_ = -1;
};

// Ops for compiled graphs and the lm_head: the sum (a new tensor) of `tensor` over the ranks of
// handle `comm`; and the concatenation along the last dim of every rank's `tensor`, rank r
// holding `sizes[r]` columns (ShmComm::all_gather_last_dim).
at::Tensor shm_all_reduce(const at::Tensor& tensor, int64_t comm);
// In place (a contiguous tensor): what an eager step calls; an op costs less per call than the
// TorchScript class's method (on the AMD EPYC Zen 3, 2 ranks, 2048 bf16: 19 against 54 us a call).
at::Tensor shm_all_reduce_(at::Tensor tensor, int64_t comm);
at::Tensor shm_all_gather_last_dim(const at::Tensor& tensor, int64_t comm, at::IntArrayRef sizes);

}  // namespace autotp
