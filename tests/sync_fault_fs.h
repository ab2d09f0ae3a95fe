// A RocksDB file system, for tests, whose write-ahead-log syncs can be held
// open (until released) or made to fail, and whose memtable flushes can be
// held: the journal's durability contract seen from the disk's side.
#ifndef CALLSESSION_TESTS_SYNC_FAULT_FS_H_
#define CALLSESSION_TESTS_SYNC_FAULT_FS_H_

#include <pthread.h>

#include <memory>
#include <string>
#include <utility>

#include "absl/base/thread_annotations.h"
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
      *result = std::make_unique<WalFile>(std::move(*result), this);
    }
    return status;
  }

 private:
  class WalFile final : public rocksdb::FSWritableFileOwnerWrapper {
   public:
    WalFile(std::unique_ptr<rocksdb::FSWritableFile> file, SyncFaultFileSystem* fs)
        : FSWritableFileOwnerWrapper(std::move(file)), fs_(*fs) {}
    rocksdb::IOStatus Sync(const rocksdb::IOOptions& options,
                           rocksdb::IODebugContext* debug) override {
      if (rocksdb::IOStatus status = fs_.BeforeSync(); !status.ok()) return status;
      return target()->Sync(options, debug);
    }
    rocksdb::IOStatus Fsync(const rocksdb::IOOptions& options,
                            rocksdb::IODebugContext* debug) override {
      if (rocksdb::IOStatus status = fs_.BeforeSync(); !status.ok()) return status;
      return target()->Fsync(options, debug);
    }

   private:
    SyncFaultFileSystem& fs_;
  };

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
};

}  // namespace callsession

#endif  // CALLSESSION_TESTS_SYNC_FAULT_FS_H_
