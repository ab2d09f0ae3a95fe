#include <memory>
#include <utility>

#include "server/core/handle_table.h"
#include "server/core/session_store.h"

namespace callsession {
namespace {

template <typename Pointer>
Pointer ValueOrNull(std::optional<Pointer> value) {
  return value.has_value() ? *std::move(value) : Pointer();
}

class ShardedMemoryStore final : public SessionStore {
 public:
  explicit ShardedMemoryStore(int shard_count)
      : apps_(shard_count), lines_(shard_count), calls_(shard_count), call_handles_(shard_count) {}

  uint64_t AddApp(Maker<App> make) override { return apps_.Insert(make); }
  std::shared_ptr<App> FindApp(uint64_t handle) const override {
    return ValueOrNull(apps_.Find(handle));
  }
  std::shared_ptr<App> RemoveApp(uint64_t handle) override {
    return ValueOrNull(apps_.Erase(handle));
  }

  uint64_t AddLine(Maker<Line> make) override { return lines_.Insert(make); }
  std::shared_ptr<Line> FindLine(uint64_t handle) const override {
    return ValueOrNull(lines_.Find(handle));
  }
  std::shared_ptr<Line> RemoveLine(uint64_t handle) override {
    return ValueOrNull(lines_.Erase(handle));
  }

  uint64_t AddCall(absl::FunctionRef<CallRef(uint64_t)> make) override {
    return calls_.Insert(make);
  }
  CallRef FindCall(uint64_t call_id) const override { return ValueOrNull(calls_.Find(call_id)); }
  CallRef RemoveCall(uint64_t call_id) override { return ValueOrNull(calls_.Erase(call_id)); }

  uint64_t AddCallHandle(CallRef call) override {
    return call_handles_.Insert([&](uint64_t) { return std::move(call); });
  }
  CallRef FindCallHandle(uint64_t handle) const override {
    return ValueOrNull(call_handles_.Find(handle));
  }
  CallRef RemoveCallHandle(uint64_t handle) override {
    return ValueOrNull(call_handles_.Erase(handle));
  }

  void RestoreApp(uint64_t handle, std::shared_ptr<App> app) override {
    apps_.InsertAt(handle, std::move(app));
  }
  void RestoreLine(uint64_t handle, std::shared_ptr<Line> line) override {
    lines_.InsertAt(handle, std::move(line));
  }
  void RestoreCall(uint64_t call_id, CallRef call) override {
    calls_.InsertAt(call_id, std::move(call));
  }
  void RestoreCallHandle(uint64_t handle, CallRef call) override {
    call_handles_.InsertAt(handle, std::move(call));
  }
  void RaiseHandleFloor(HandleKind kind, uint64_t floor) override {
    switch (kind) {
      case HandleKind::kApp:
        return apps_.RaiseFloor(floor);
      case HandleKind::kLine:
        return lines_.RaiseFloor(floor);
      case HandleKind::kCall:
        return calls_.RaiseFloor(floor);
      case HandleKind::kCallHandle:
        return call_handles_.RaiseFloor(floor);
    }
  }

  StoreCounts Counts() const override {
    return StoreCounts{apps_.size(), lines_.size(), calls_.size(), call_handles_.size()};
  }

 private:
  ShardedHandleTable<std::shared_ptr<App>> apps_;
  ShardedHandleTable<std::shared_ptr<Line>> lines_;
  ShardedHandleTable<CallRef> calls_;
  ShardedHandleTable<CallRef> call_handles_;
};

}  // namespace

std::unique_ptr<SessionStore> NewShardedMemoryStore(int shard_count) {
  return std::make_unique<ShardedMemoryStore>(shard_count);
}

}  // namespace callsession
