// ServingCore: the core the gRPC services call, once there is one. While
// the server loads its store it is empty and every RPC answers UNAVAILABLE;
// it is set once, when the core is ready, and stays set until the server is
// destroyed. Thread-safe.
#ifndef CALLSESSION_SERVER_SERVING_CORE_H_
#define CALLSESSION_SERVER_SERVING_CORE_H_

#include <atomic>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "server/core/call_session_core.h"

namespace callsession {

class ServingCore {
 public:
  // The core, or UNAVAILABLE until it is set. One atomic load.
  absl::StatusOr<CallSessionCore*> Get() const {
    CallSessionCore* core = core_.load(std::memory_order_acquire);
    if (core == nullptr) {
      return absl::UnavailableError("callsessiond is loading its state; retry shortly");
    }
    return core;
  }
  // The core, or nullptr.
  CallSessionCore* get() const { return core_.load(std::memory_order_acquire); }
  // `core` is not owned and must outlive every user of this object.
  void Set(CallSessionCore* core) { core_.store(core, std::memory_order_release); }

 private:
  std::atomic<CallSessionCore*> core_{nullptr};
};

}  // namespace callsession

#endif  // CALLSESSION_SERVER_SERVING_CORE_H_
