// SessionStore: where the core keeps applications, lines, calls and call
// handles, each addressed by a 64-bit handle the store issues.
//
// The core depends only on this interface; NewShardedMemoryStore() is the
// embedded in-memory implementation (lock-sharded tables). Handles issued by
// a store are non-zero and never reissued, so a voided handle can never
// address another entry.
//
// Thread-safe: every method may be called concurrently. Methods never call
// back into the core, so the core may call them while holding its own locks
// (the store's locks are leaves).
#ifndef CALLSESSION_SERVER_CORE_SESSION_STORE_H_
#define CALLSESSION_SERVER_CORE_SESSION_STORE_H_

#include <cstddef>
#include <cstdint>
#include <memory>

#include "absl/functional/function_ref.h"
#include "server/core/model.h"

namespace callsession {

// The four kinds of handle a store issues.
enum class HandleKind : uint8_t { kApp = 0, kLine = 1, kCall = 2, kCallHandle = 3 };
inline constexpr int kHandleKinds = 4;

struct StoreCounts {
  size_t apps = 0;
  size_t lines = 0;
  size_t calls = 0;
  size_t call_handles = 0;
};

class SessionStore {
 public:
  template <typename T>
  using Maker = absl::FunctionRef<std::shared_ptr<T>(uint64_t handle)>;

  virtual ~SessionStore() = default;

  // Each Add issues a handle, stores make(handle) under it and returns it.
  // Each Find returns the entry or nullptr. Each Remove returns the removed
  // entry, or nullptr if there was none (then another caller removed it).

  virtual uint64_t AddApp(Maker<App> make) = 0;
  virtual std::shared_ptr<App> FindApp(uint64_t app_handle) const = 0;
  virtual std::shared_ptr<App> RemoveApp(uint64_t app_handle) = 0;

  virtual uint64_t AddLine(Maker<Line> make) = 0;
  virtual std::shared_ptr<Line> FindLine(uint64_t line_handle) const = 0;
  virtual std::shared_ptr<Line> RemoveLine(uint64_t line_handle) = 0;

  // Calls are addressed by call id.
  virtual uint64_t AddCall(absl::FunctionRef<CallRef(uint64_t call_id)> make) = 0;
  virtual CallRef FindCall(uint64_t call_id) const = 0;
  virtual CallRef RemoveCall(uint64_t call_id) = 0;

  // A call handle maps to its call; which application holds it and through
  // which line is recorded in the call's holders.
  virtual uint64_t AddCallHandle(CallRef call) = 0;
  virtual CallRef FindCallHandle(uint64_t call_handle) const = 0;
  virtual CallRef RemoveCallHandle(uint64_t call_handle) = 0;

  // Recovery: each Restore stores an entry under the handle it had when it
  // was issued (the store must not hold that handle); RaiseHandleFloor then
  // makes every handle of `kind` issued from now on greater than `floor`.
  virtual void RestoreApp(uint64_t app_handle, std::shared_ptr<App> app) = 0;
  virtual void RestoreLine(uint64_t line_handle, std::shared_ptr<Line> line) = 0;
  virtual void RestoreCall(uint64_t call_id, CallRef call) = 0;
  virtual void RestoreCallHandle(uint64_t call_handle, CallRef call) = 0;
  virtual void RaiseHandleFloor(HandleKind kind, uint64_t floor) = 0;

  // Approximate under concurrent writes.
  virtual StoreCounts Counts() const = 0;
};

// The in-memory store: one ShardedHandleTable per kind of entry, each with
// `shard_count` shards (a power of two; see ShardedHandleTable).
std::unique_ptr<SessionStore> NewShardedMemoryStore(int shard_count);

}  // namespace callsession

#endif  // CALLSESSION_SERVER_CORE_SESSION_STORE_H_
