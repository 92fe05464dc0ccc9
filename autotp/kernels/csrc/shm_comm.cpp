// Shared-memory all-reduce (see shm_comm.h).
#include "shm_comm.h"
#include "op_clock.h"

#include <ATen/EmptyTensor.h>
#include <ATen/ops/empty.h>


#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <mutex>
#include <unordered_map>
#include <vector>

namespace autotp {
namespace {

constexpr uint64_t kMagic = 0x6175746f74703031ull;  // "autotp01"
constexpr int64_t kMaxRanks = 512;
constexpr int kArrive = 0, kDepart = 1;

struct alignas(64) Counter {
  std::atomic<int64_t> value;
  char pad[64 - sizeof(std::atomic<int64_t>)];
};

int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

// Spin-wait hint: lets the sibling hyperthread run while this one polls.
inline void cpu_relax() {
#if defined(__x86_64__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

std::mutex registry_mutex;
std::unordered_map<int64_t, ShmComm*>& registry() {
  static std::unordered_map<int64_t, ShmComm*> handles;
  return handles;
}
int64_t next_id = 0;

}  // namespace

ShmComm& ShmComm::lookup(int64_t id) {
  std::lock_guard<std::mutex> lock(registry_mutex);
  auto it = registry().find(id);
  TORCH_CHECK(it != registry().end(), "autotp shared-memory all-reduce: no open handle numbered ", id,
              " (its group was closed)");
  return *it->second;
}

at::Tensor shm_all_reduce(const at::Tensor& tensor, int64_t comm) {
  const at::Tensor in = tensor.contiguous();
  // no clone of x first; at::detail::empty_cpu: begin_linear's reason (ops.cpp)
  return ShmComm::lookup(comm).all_reduce_into(in, at::detail::empty_cpu(in.sizes(), in.scalar_type()));
}

at::Tensor shm_all_reduce_(at::Tensor tensor, int64_t comm) { return ShmComm::lookup(comm).all_reduce(tensor); }

at::Tensor shm_all_gather_last_dim(const at::Tensor& tensor, int64_t comm, at::IntArrayRef sizes) {
  return ShmComm::lookup(comm).all_gather_last_dim(tensor, sizes);
}

struct ShmComm::Header {
  std::atomic<uint64_t> magic;
  int64_t size;
  int64_t slot_bytes;
  std::atomic<int64_t> pids[kMaxRanks];
  Counter counters[2][kMaxRanks];
};

ShmComm::ShmComm(std::string name, int64_t rank, int64_t size, int64_t slot_bytes, bool create, double timeout_s,
                 std::string isa)
    : name_(std::move(name)), rank_(rank), size_(size), slot_bytes_(slot_bytes), timeout_s_(timeout_s),
      sums_(&kernel_table(isa)) {
  TORCH_CHECK(size >= 1 && size <= kMaxRanks && rank >= 0 && rank < size, "autotp ShmComm: rank ", rank,
              " of ", size, " is out of range (at most ", kMaxRanks, " ranks)");
  TORCH_CHECK(slot_bytes >= 64 && slot_bytes % 64 == 0, "autotp ShmComm: slot_bytes must be a multiple of 64");
  const int64_t data = round_up(sizeof(Header), 4096);
  bytes_ = static_cast<size_t>(data + 2 * size * slot_bytes);
  const int fd = shm_open(name_.c_str(), create ? (O_CREAT | O_EXCL | O_RDWR) : O_RDWR, 0600);
  TORCH_CHECK(fd >= 0, "autotp ShmComm: shm_open(", name_, ") failed: ", std::strerror(errno));
  if (create && ftruncate(fd, static_cast<off_t>(bytes_)) != 0) {
    const int err = errno;
    close(fd);
    shm_unlink(name_.c_str());
    TORCH_CHECK(false, "autotp ShmComm: cannot size ", name_, " to ", bytes_, " bytes: ", std::strerror(err),
                " (is /dev/shm large enough?)");
  }
  struct stat st {};
  fstat(fd, &st);
  if (static_cast<size_t>(st.st_size) != bytes_) {
    close(fd);
    TORCH_CHECK(false, "autotp ShmComm: segment ", name_, " has ", st.st_size, " bytes, expected ", bytes_,
                "; was it made by a group of another size?");
  }
  base_ = mmap(nullptr, bytes_, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  close(fd);
  TORCH_CHECK(base_ != MAP_FAILED, "autotp ShmComm: mmap of ", name_, " failed: ", std::strerror(errno));
  header_ = static_cast<Header*>(base_);
  if (create) {
    header_->size = size;
    header_->slot_bytes = slot_bytes;
    header_->magic.store(kMagic, std::memory_order_release);
  } else {
    TORCH_CHECK(header_->magic.load(std::memory_order_acquire) == kMagic && header_->size == size &&
                    header_->slot_bytes == slot_bytes,
                "autotp ShmComm: segment ", name_, " was not made for this group");
  }
  header_->pids[rank].store(getpid(), std::memory_order_release);
  std::lock_guard<std::mutex> lock(registry_mutex);
  id_ = next_id++;
  registry()[id_] = this;
}

ShmComm::~ShmComm() {
  if (id_ >= 0) {
    std::lock_guard<std::mutex> lock(registry_mutex);
    registry().erase(id_);
  }
  if (base_ && base_ != MAP_FAILED) munmap(base_, bytes_);
}

void ShmComm::unlink() {
  if (!unlinked_) {
    shm_unlink(name_.c_str());
    unlinked_ = true;
  }
}

char* ShmComm::slot(int64_t buffer, int64_t rank) const {
  return static_cast<char*>(base_) + round_up(sizeof(Header), 4096) + (buffer * size_ + rank) * slot_bytes_;
}

void ShmComm::wait_all(int which, int64_t target) {
  using clock = std::chrono::steady_clock;
  const auto start = clock::now();
  auto next_check = start + std::chrono::milliseconds(100);
  for (int64_t r = 0; r < size_; ++r) {
    auto& counter = header_->counters[which][r].value;
    for (int64_t spins = 0; counter.load(std::memory_order_acquire) < target; ++spins) {
      if (spins < 2000) {
        cpu_relax();
        continue;
      }
      sched_yield();  // ranks may share cores: let the one we wait for run
      if ((spins & 255) != 0) continue;
      const auto now = clock::now();
      if (now < next_check) continue;
      next_check = now + std::chrono::milliseconds(100);
      const auto pid = header_->pids[r].load(std::memory_order_acquire);
      if (pid > 0 && kill(static_cast<pid_t>(pid), 0) != 0 && errno == ESRCH) {
        broken_ = true;
        TORCH_CHECK(false, "autotp shared-memory all-reduce: rank ", r, " (pid ", pid,
                    ") exited during all-reduce #", seq_, "; the group cannot continue");
      }
      const double waited = std::chrono::duration<double>(now - start).count();
      if (waited > timeout_s_) {
        broken_ = true;
        TORCH_CHECK(false, "autotp shared-memory all-reduce: rank ", r, " did not reach all-reduce #", seq_,
                    " within ", timeout_s_, " s (AUTOTP_COMM_TIMEOUT); is it stuck or running other work?");
      }
    }
  }
}

at::Tensor ShmComm::all_reduce(at::Tensor tensor) { return all_reduce_into(tensor, tensor); }

at::Tensor ShmComm::all_reduce_into(const at::Tensor& tensor, at::Tensor out) {
  OpTimer timer(kOpCollective);
  TORCH_CHECK(!broken_, "autotp shared-memory all-reduce: an earlier all-reduce of this group failed; "
              "the group cannot be used again");
  TORCH_CHECK(tensor.device().is_cpu() && tensor.is_contiguous() &&
                  (tensor.scalar_type() == at::kFloat || tensor.scalar_type() == at::kBFloat16),
              "autotp shared-memory all-reduce: needs a contiguous float32 or bfloat16 CPU tensor, got ",
              tensor.scalar_type(), tensor.is_contiguous() ? "" : " (not contiguous)");
  TORCH_CHECK(out.is_contiguous() && out.scalar_type() == tensor.scalar_type() && out.numel() == tensor.numel(),
              "autotp shared-memory all-reduce: the output must be contiguous and of the input's dtype and size");
  const bool bf16 = tensor.scalar_type() == at::kBFloat16;
  const int64_t elem = tensor.element_size(), total = tensor.numel(), per_chunk = slot_bytes_ / elem;
  const char* data = static_cast<const char*>(tensor.data_ptr());
  char* sums = static_cast<char*>(out.data_ptr());
  if (size_ == 1 || total == 0) {
    if (sums != data) std::memcpy(sums, data, total * elem);
    return out;
  }
  for (int64_t off = 0; off < total; off += per_chunk) {
    const int64_t n = std::min(per_chunk, total - off);
    const int64_t seq = ++seq_, buffer = seq & 1;
    if (seq > 2) wait_all(kDepart, seq - 2);  // everyone has read this buffer's last use
    std::memcpy(slot(buffer, rank_), data + off * elem, n * elem);
    header_->counters[kArrive][rank_].value.store(seq, std::memory_order_release);
    wait_all(kArrive, seq);
    const void* srcs[kMaxRanks];
    for (int64_t r = 0; r < size_; ++r) srcs[r] = slot(buffer, r);
    if (bf16)
      sums_->sum_bf16(reinterpret_cast<const uint16_t* const*>(srcs), size_, reinterpret_cast<uint16_t*>(sums) + off, n);
    else
      sums_->sum_f32(reinterpret_cast<const float* const*>(srcs), size_, reinterpret_cast<float*>(sums) + off, n);
    header_->counters[kDepart][rank_].value.store(seq, std::memory_order_release);
  }
  return out;
}

at::Tensor ShmComm::all_gather_last_dim(const at::Tensor& tensor, at::IntArrayRef sizes) {
  OpTimer timer(kOpCollective);
  TORCH_CHECK(!broken_, "autotp shared-memory all-gather: an earlier collective of this group failed; "
              "the group cannot be used again");
  TORCH_CHECK(static_cast<int64_t>(sizes.size()) == size_ && tensor.device().is_cpu() && tensor.dim() >= 1 &&
                  tensor.size(-1) == sizes[rank_],
              "autotp shared-memory all-gather: rank ", rank_, " holds ", tensor.dim() ? tensor.size(-1) : 0,
              " columns of a CPU tensor, sizes say ", sizes);
  std::vector<int64_t> offsets(size_ + 1, 0);
  int64_t widest = 0;
  for (int64_t r = 0; r < size_; ++r) {
    TORCH_CHECK(sizes[r] >= 0, "autotp shared-memory all-gather: negative size in ", sizes);
    offsets[r + 1] = offsets[r] + sizes[r];
    widest = std::max(widest, sizes[r]);
  }
  const int64_t total = offsets[size_], elem = tensor.element_size();
  auto shape = tensor.sizes().vec();
  shape.back() = total;
  at::Tensor out = at::detail::empty_cpu(shape, tensor.scalar_type());  // contiguous
  const at::Tensor part = tensor.contiguous();
  const int64_t rows = out.numel() / std::max<int64_t>(total, 1);
  if (size_ == 1 || widest * elem > slot_bytes_) {  // one rank, or a row wider than a slot: a zeroed whole, summed
    out.zero_();
    out.narrow(-1, offsets[rank_], sizes[rank_]).copy_(part);
    return size_ == 1 ? out : all_reduce(out);
  }
  // rows in chunks that fit a slot: each rank copies its block of the chunk into its slot, then
  // every rank copies every slot into its columns of the chunk's rows (nothing summed: exact)
  const int64_t per_chunk = slot_bytes_ / std::max<int64_t>(widest * elem, 1);
  const char* src = static_cast<const char*>(part.data_ptr());
  char* dst = static_cast<char*>(out.data_ptr());
  for (int64_t r0 = 0; r0 < rows; r0 += per_chunk) {
    const int64_t n = std::min(per_chunk, rows - r0);
    const int64_t seq = ++seq_, buffer = seq & 1;
    if (seq > 2) wait_all(kDepart, seq - 2);  // everyone has read this buffer's last use
    std::memcpy(slot(buffer, rank_), src + r0 * sizes[rank_] * elem, n * sizes[rank_] * elem);
    header_->counters[kArrive][rank_].value.store(seq, std::memory_order_release);
    wait_all(kArrive, seq);
    for (int64_t r = 0; r < size_; ++r) {
      const char* from = slot(buffer, r);
      const int64_t bytes = sizes[r] * elem;
      for (int64_t i = 0; i < n; ++i)
        std::memcpy(dst + ((r0 + i) * total + offsets[r]) * elem, from + i * bytes, bytes);
    }
    header_->counters[kDepart][rank_].value.store(seq, std::memory_order_release);
  }
  return out;
}

}  // namespace autotp
