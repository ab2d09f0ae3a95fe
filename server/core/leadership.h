// LeaderGate: what a replicated store tells the serving side about
// leadership, with no dependency on the store or on gRPC.
//
// Only the leader serves. A process that is not the leader (a standby, or
// one still taking over) refuses application and provider RPCs with
// UNAVAILABLE naming the leader it knows of. A leader holds its leadership
// for a lease: it may serve only while the lease is certainly still its own
// (until `serve_until`, a monotonic deadline the store extends each time
// the lease is renewed). A process that was paused (SIGSTOP, a long GC-like
// stall, a VM migration) past that deadline refuses every RPC at once when
// it resumes, before it can learn that another process leads now: no stale
// read leaves it. Writes are fenced by the store itself.
//
// Thread-safe: the store's threads write, every RPC thread reads.
#ifndef CALLSESSION_SERVER_CORE_LEADERSHIP_H_
#define CALLSESSION_SERVER_CORE_LEADERSHIP_H_

#include <time.h>

#include <atomic>
#include <cstdint>
#include <functional>
#include <string>
#include <utility>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"

namespace callsession {

class LeaderGate {
 public:
  // Whether this process may serve now: it leads and its lease holds. One
  // atomic load and a clock read.
  bool MayServe() const {
    const int64_t until = serve_until_ns_.load(std::memory_order_acquire);
    return until != 0 && MonotonicNanos() < until;
  }

  // This process leads until the monotonic deadline `until_ns` (see
  // MonotonicNanos), unless extended again. Called on each lease renewal.
  void LeadUntil(int64_t until_ns) { serve_until_ns_.store(until_ns, std::memory_order_release); }

  // This process stops serving at once (it hands over, or lost its lease).
  void StopLeading() { serve_until_ns_.store(0, std::memory_order_release); }

  // The address clients should use: the leader's, "" if none is known.
  void SetLeaderAddress(std::string address) {
    absl::MutexLock lock(&mu_);
    leader_address_ = std::move(address);
  }
  std::string leader_address() const {
    absl::MutexLock lock(&mu_);
    return leader_address_;
  }

  // `on_following` runs each time this process has loaded the records and
  // follows the leader as a standby, ready to take over (the server then
  // reports itself healthy, though not serving: see server.h).
  void SetOnFollowing(std::function<void()> on_following) {
    absl::MutexLock lock(&mu_);
    on_following_ = std::move(on_following);
  }
  void Following() {
    std::function<void()> on_following;
    {
      absl::MutexLock lock(&mu_);
      on_following = on_following_;
    }
    if (on_following) on_following();
  }

  // CLOCK_MONOTONIC in nanoseconds: it keeps counting while the process is
  // stopped, so a resumed process sees its deadline passed.
  static int64_t MonotonicNanos() {
    timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return int64_t{now.tv_sec} * 1'000'000'000 + now.tv_nsec;
  }

 private:
  std::atomic<int64_t> serve_until_ns_{0};
  mutable absl::Mutex mu_;
  std::string leader_address_ ABSL_GUARDED_BY(mu_);
  std::function<void()> on_following_ ABSL_GUARDED_BY(mu_);
};

}  // namespace callsession

#endif  // CALLSESSION_SERVER_CORE_LEADERSHIP_H_
