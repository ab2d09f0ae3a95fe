// ServingCore: the core the gRPC services call, once there is one. While
// the server loads its store it is empty and every RPC answers UNAVAILABLE;
// it is set once, when the core is ready, and stays set until the server is
// destroyed. With a replicated store, a LeaderGate also decides: a process
// that does not lead (or whose lease lapsed) answers UNAVAILABLE with a
// google.rpc.ErrorInfo (reason NOT_LEADER, domain callsession.v1, metadata
// "leader": the leader's host:port when known) as the status payload, which
// the edge sends as details and clients follow. Thread-safe.
#ifndef CALLSESSION_SERVER_SERVING_CORE_H_
#define CALLSESSION_SERVER_SERVING_CORE_H_

#include <atomic>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "server/core/call_session_core.h"
#include "server/core/leadership.h"

namespace callsession {

class ServingCore {
 public:
  // The core, or UNAVAILABLE until it is set (and, with a gate, while this
  // process may not serve). One atomic load; with a gate, two and a clock
  // read.
  absl::StatusOr<CallSessionCore*> Get() const {
    CallSessionCore* core = core_.load(std::memory_order_acquire);
    if (gate_ != nullptr && (core == nullptr || !gate_->MayServe())) return NotLeader();
    if (core == nullptr) {
      return absl::UnavailableError("callsessiond is loading its state; retry shortly");
    }
    return core;
  }

  // Before the server starts: the gate of a replicated store (not owned;
  // outlives this object).
  void SetGate(const LeaderGate* gate) { gate_ = gate; }
  // The core, or nullptr.
  CallSessionCore* get() const { return core_.load(std::memory_order_acquire); }
  // `core` is not owned and must outlive every user of this object.
  void Set(CallSessionCore* core) { core_.store(core, std::memory_order_release); }

 private:
  // UNAVAILABLE with the NOT_LEADER ErrorInfo payload.
  absl::Status NotLeader() const;

  std::atomic<CallSessionCore*> core_{nullptr};
  const LeaderGate* gate_ = nullptr;
};

}  // namespace callsession

#endif  // CALLSESSION_SERVER_SERVING_CORE_H_
