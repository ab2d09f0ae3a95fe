// ShardedHandleTable: a map from 64-bit handles it issues to values, split
// into independently locked shards so that operations on different handles
// rarely contend.
//
// Handle layout: the low `shard_bits` bits select the shard; the high bits
// are that shard's sequence number at insertion, which only ever increases
// (the handle's generation). So a handle is never issued twice in the life
// of the table, a voided handle can never address a newer entry, and 0 is
// never a handle (sequences start at 1). With 64 shards the sequence has 58
// bits: at a billion inserts per second it would last nine years per shard.
//
// Every operation takes exactly one shard lock, for O(1) expected work, and
// never calls out while holding it (except `make` in Insert, which must not
// touch the table). A shard's memory shrinks again when most of its entries
// are erased, so a burst of handles does not pin memory forever.
//
// Thread-safe: all methods may be called concurrently from any thread.
#ifndef CALLSESSION_SERVER_CORE_HANDLE_TABLE_H_
#define CALLSESSION_SERVER_CORE_HANDLE_TABLE_H_

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <utility>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/functional/function_ref.h"
#include "absl/synchronization/mutex.h"

namespace callsession {

// Shrinks an absl hash container that has become mostly empty: they never
// shrink by themselves, and rehash(0) shrinks to fit. Doing it only below
// 1/8 full keeps the cost amortised O(1) per erase.
template <typename Container>
void ShrinkIfSparse(Container& container) {
  const size_t capacity = container.capacity();
  if (capacity > 64 && container.size() < capacity / 8) container.rehash(0);
}

template <typename V>
class ShardedHandleTable {
 public:
  // `shard_count` must be a power of two between 1 and 2^16.
  explicit ShardedHandleTable(int shard_count)
      : shard_bits_(BitsFor(shard_count)),
        shard_mask_((uint64_t{1} << shard_bits_) - 1),
        shards_(std::make_unique<Shard[]>(size_t{1} << shard_bits_)) {}

  ShardedHandleTable(const ShardedHandleTable&) = delete;
  ShardedHandleTable& operator=(const ShardedHandleTable&) = delete;

  static bool IsValidShardCount(int n) { return n >= 1 && n <= (1 << 16) && (n & (n - 1)) == 0; }

  // Issues a new handle, stores make(handle) under it and returns it. The
  // value is built under the shard lock, so it is never visible half made.
  uint64_t Insert(absl::FunctionRef<V(uint64_t)> make) {
    const uint64_t shard_index = NextInsertShard();
    Shard& shard = shards_[shard_index];
    absl::MutexLock lock(&shard.mu);
    const uint64_t handle = (shard.next_sequence++ << shard_bits_) | shard_index;
    shard.entries.emplace(handle, make(handle));
    return handle;
  }

  // Stores `value` under `handle`, issued earlier (by this table or one
  // before a restart). Returns false, storing nothing, if it is present.
  // Does not move the shard's sequence: see RaiseFloor.
  bool InsertAt(uint64_t handle, V value) {
    Shard& shard = ShardOf(handle);
    absl::MutexLock lock(&shard.mu);
    return shard.entries.emplace(handle, std::move(value)).second;
  }

  // Every handle issued from now on is greater than `floor`, whatever the
  // shard count was when handles up to `floor` were issued.
  void RaiseFloor(uint64_t floor) {
    const uint64_t sequence = (floor >> shard_bits_) + 1;
    for (size_t i = 0; i <= shard_mask_; ++i) {
      absl::MutexLock lock(&shards_[i].mu);
      shards_[i].next_sequence = std::max(shards_[i].next_sequence, sequence);
    }
  }

  // A copy of the value stored under `handle`, or nullopt.
  std::optional<V> Find(uint64_t handle) const {
    const Shard& shard = ShardOf(handle);
    absl::ReaderMutexLock lock(&shard.mu);
    auto it = shard.entries.find(handle);
    if (it == shard.entries.end()) return std::nullopt;
    return it->second;
  }

  // Removes `handle` and returns its value, or nullopt if it was not there.
  // Exactly one of several concurrent Erase calls for a handle gets the value.
  std::optional<V> Erase(uint64_t handle) {
    Shard& shard = ShardOf(handle);
    absl::MutexLock lock(&shard.mu);
    auto it = shard.entries.find(handle);
    if (it == shard.entries.end()) return std::nullopt;
    std::optional<V> value(std::move(it->second));
    shard.entries.erase(it);
    ShrinkIfSparse(shard.entries);
    return value;
  }

  // The number of entries. Each shard is read under its own lock, so under
  // concurrent writes the sum is approximate.
  size_t size() const {
    size_t total = 0;
    for (size_t i = 0; i <= shard_mask_; ++i) {
      absl::ReaderMutexLock lock(&shards_[i].mu);
      total += shards_[i].entries.size();
    }
    return total;
  }

  int shard_count() const { return static_cast<int>(shard_mask_ + 1); }

  // The shard a handle belongs to (for tests and diagnostics).
  int ShardIndexOf(uint64_t handle) const { return static_cast<int>(handle & shard_mask_); }

 private:
  // A shard on its own cache lines, so that two cores working on
  // neighbouring shards do not bounce one line between them.
  struct alignas(64) Shard {
    mutable absl::Mutex mu;
    uint64_t next_sequence ABSL_GUARDED_BY(mu) = 1;
    absl::flat_hash_map<uint64_t, V> entries ABSL_GUARDED_BY(mu);
  };

  static int BitsFor(int shard_count) {
    int bits = 0;
    while ((1 << bits) < shard_count) ++bits;
    return bits;
  }

  Shard& ShardOf(uint64_t handle) { return shards_[handle & shard_mask_]; }
  const Shard& ShardOf(uint64_t handle) const { return shards_[handle & shard_mask_]; }

  // Spreads inserts over shards without a shared counter: each thread walks
  // the shards from its own starting point.
  uint64_t NextInsertShard() const {
    thread_local uint64_t cursor = reinterpret_cast<uintptr_t>(&cursor) >> 6;
    return cursor++ & shard_mask_;
  }

  const int shard_bits_;
  const uint64_t shard_mask_;
  const std::unique_ptr<Shard[]> shards_;
};

}  // namespace callsession

#endif  // CALLSESSION_SERVER_CORE_HANDLE_TABLE_H_
