// A RocksDB file system, for tests, whose write-ahead-log syncs can be held
// open (until released) or made to fail, and whose memtable flushes can be
// held: the journal's durability contract seen from the disk's side. It also
// keeps, per WAL file, how far a completed sync covers it: what a power cut
// would leave of the log (SyncedWalSizes).
#ifndef CALLSESSION_TESTS_SYNC_FAULT_FS_H_
#define CALLSESSION_TESTS_SYNC_FAULT_FS_H_

#include <pthread.h>

#include <cstdint>
#include <memory>
#include <string>
#include <utility>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/strings/match.h"
#include "absl/synchronization/mutex.h"
#include "rocksdb/env.h"
#include "rocksdb/file_system.h"

namespace callsession {

class SyncFaultFileSystem final : public rocksdb::FileSystemWrapper {
 public:
  SyncFaultFileSystem() : FileSystemWrapper(rocksdb::FileSystem::Default()) {}

  static const char* kClassName() { return "SyncFaultFileSystem"; }
  const char* Name() const override { return kClassName(); }

  // From now on, WAL syncs wait until Release().
  void Hold() {
    absl::MutexLock lock(&mu_);
    held_ = true;
  }
  void Release() {
    absl::MutexLock lock(&mu_);
    held_ = false;
  }
  // From now on, creating a table file (a memtable flush) waits until
  // ReleaseTableFiles(): writes then stall once the memtables are full.
  void HoldTableFiles() {
    absl::MutexLock lock(&mu_);
    tables_held_ = true;
  }
  void ReleaseTableFiles() {
    absl::MutexLock lock(&mu_);
    tables_held_ = false;
  }
  // Table files waiting in HoldTableFiles.
  int tables_waiting() {
    absl::MutexLock lock(&mu_);
    return tables_waiting_;
  }
  // From now on, WAL syncs fail with an I/O error.
  void FailSyncs() {
    absl::MutexLock lock(&mu_);
    failing_ = true;
  }
  // Syncs waiting in Hold, and syncs done so far.
  int waiting() {
    absl::MutexLock lock(&mu_);
    return waiting_;
  }
  int syncs() {
    absl::MutexLock lock(&mu_);
    return syncs_;
  }
  // Per WAL file (by file name, without directory): the bytes a completed
  // sync covers. A sync covers what was appended before it began, so after
  // a power cut the log holds at least this much; an acknowledgement that
  // waited for its sync is within it.
  absl::flat_hash_map<std::string, uint64_t> SyncedWalSizes() {
    absl::MutexLock lock(&mu_);
    absl::flat_hash_map<std::string, uint64_t> synced;
    for (const auto& [name, sizes] : wal_sizes_) synced[name] = sizes.synced;
    return synced;
  }
  // The name (pthread_setname_np) of the thread that last began a sync.
  std::string last_syncing_thread() {
    absl::MutexLock lock(&mu_);
    return last_syncing_thread_;
  }

  rocksdb::IOStatus NewWritableFile(const std::string& name, const rocksdb::FileOptions& options,
                                    std::unique_ptr<rocksdb::FSWritableFile>* result,
                                    rocksdb::IODebugContext* debug) override {
    if (absl::EndsWith(name, ".sst")) {
      absl::MutexLock lock(&mu_);
      ++tables_waiting_;
      mu_.Await(absl::Condition(
          +[](bool* held) { return !*held; }, &tables_held_));
      --tables_waiting_;
    }
    rocksdb::IOStatus status = target()->NewWritableFile(name, options, result, debug);
    if (status.ok() && absl::EndsWith(name, ".log")) {
      const std::string base = name.substr(name.find_last_of('/') + 1);
      {
        absl::MutexLock lock(&mu_);
        wal_sizes_[base] = WalSizes{};
      }
      *result = std::make_unique<WalFile>(std::move(*result), this, base);
    }
    return status;
  }

 private:
  struct WalSizes {
    uint64_t appended = 0;
    uint64_t synced = 0;
  };

  class WalFile final : public rocksdb::FSWritableFileOwnerWrapper {
   public:
    WalFile(std::unique_ptr<rocksdb::FSWritableFile> file, SyncFaultFileSystem* fs,
            std::string name)
        : FSWritableFileOwnerWrapper(std::move(file)), fs_(*fs), name_(std::move(name)) {}
    rocksdb::IOStatus Append(const rocksdb::Slice& data, const rocksdb::IOOptions& options,
                             rocksdb::IODebugContext* debug) override {
      return Counted(target()->Append(data, options, debug), data.size());
    }
    rocksdb::IOStatus Append(const rocksdb::Slice& data, const rocksdb::IOOptions& options,
                             const rocksdb::DataVerificationInfo& verification,
                             rocksdb::IODebugContext* debug) override {
      return Counted(target()->Append(data, options, verification, debug), data.size());
    }
    rocksdb::IOStatus Sync(const rocksdb::IOOptions& options,
                           rocksdb::IODebugContext* debug) override {
      return SyncWith([&] { return target()->Sync(options, debug); });
    }
    rocksdb::IOStatus Fsync(const rocksdb::IOOptions& options,
                            rocksdb::IODebugContext* debug) override {
      return SyncWith([&] { return target()->Fsync(options, debug); });
    }

   private:
    rocksdb::IOStatus Counted(rocksdb::IOStatus status, uint64_t bytes) {
      if (status.ok()) fs_.Appended(name_, bytes);
      return status;
    }
    template <typename SyncFn>
    rocksdb::IOStatus SyncWith(SyncFn sync) {
      if (rocksdb::IOStatus status = fs_.BeforeSync(); !status.ok()) return status;
      const uint64_t covered = fs_.AppendedSize(name_);
      rocksdb::IOStatus status = sync();
      if (status.ok()) fs_.Synced(name_, covered);
      return status;
    }

    SyncFaultFileSystem& fs_;
    const std::string name_;
  };

  void Appended(const std::string& name, uint64_t bytes) {
    absl::MutexLock lock(&mu_);
    wal_sizes_[name].appended += bytes;
  }
  uint64_t AppendedSize(const std::string& name) {
    absl::MutexLock lock(&mu_);
    return wal_sizes_[name].appended;
  }
  void Synced(const std::string& name, uint64_t covered) {
    absl::MutexLock lock(&mu_);
    WalSizes& sizes = wal_sizes_[name];
    if (covered > sizes.synced) sizes.synced = covered;
  }

  rocksdb::IOStatus BeforeSync() {
    char name[16] = {};
    pthread_getname_np(pthread_self(), name, sizeof(name));
    absl::MutexLock lock(&mu_);
    last_syncing_thread_ = name;
    ++waiting_;
    mu_.Await(absl::Condition(
        +[](bool* held) { return !*held; }, &held_));
    --waiting_;
    ++syncs_;
    if (failing_) return rocksdb::IOStatus::IOError("injected: the disk refused the sync");
    return rocksdb::IOStatus::OK();
  }

  absl::Mutex mu_;
  bool held_ ABSL_GUARDED_BY(mu_) = false;
  bool failing_ ABSL_GUARDED_BY(mu_) = false;
  bool tables_held_ ABSL_GUARDED_BY(mu_) = false;
  int tables_waiting_ ABSL_GUARDED_BY(mu_) = 0;
  int waiting_ ABSL_GUARDED_BY(mu_) = 0;
  int syncs_ ABSL_GUARDED_BY(mu_) = 0;
  std::string last_syncing_thread_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_map<std::string, WalSizes> wal_sizes_ ABSL_GUARDED_BY(mu_);
};

}  // namespace callsession

#endif  // CALLSESSION_TESTS_SYNC_FAULT_FS_H_
