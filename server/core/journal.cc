#include "server/core/journal.h"

#include <algorithm>
#include <utility>

namespace callsession {
namespace {
thread_local bool t_caller_writes = false;
thread_local bool t_caller_syncs = false;
}  // namespace

CallerWritesScope::CallerWritesScope(bool also_sync) {
  t_caller_writes = true;
  t_caller_syncs = also_sync;
}
CallerWritesScope::~CallerWritesScope() {
  t_caller_writes = false;
  t_caller_syncs = false;
}
bool CallerWritesScope::Active() { return t_caller_writes; }
bool CallerWritesScope::AlsoSyncs() { return t_caller_syncs; }

DurableWaiters::Callback DurableWaiters::WaitFor(uint64_t position, Callback done) {
  absl::MutexLock lock(&mu_);
  if (position <= durable_.load(std::memory_order_acquire)) return done;
  waiting_.push_back(Waiter{position, std::move(done)});
  return nullptr;
}

std::vector<DurableWaiters::Callback> DurableWaiters::MarkDurable(uint64_t position) {
  std::vector<Callback> due;
  absl::MutexLock lock(&mu_);
  if (position <= durable_.load(std::memory_order_relaxed)) return due;
  durable_.store(position, std::memory_order_release);
  auto still_waiting =
      std::partition(waiting_.begin(), waiting_.end(),
                     [position](const Waiter& w) { return w.position > position; });
  due.reserve(waiting_.end() - still_waiting);
  for (auto it = still_waiting; it != waiting_.end(); ++it) due.push_back(std::move(it->done));
  waiting_.erase(still_waiting, waiting_.end());
  return due;
}

}  // namespace callsession
