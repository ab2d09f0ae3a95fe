#include "server/storage/rocksdb/rocksdb_journal.h"

#include <atomic>
#include <cstdlib>
#include <filesystem>
#include <system_error>
#include <thread>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "rocksdb/db.h"
#include "rocksdb/env.h"
#include "rocksdb/memtablerep.h"
#include "rocksdb/options.h"
#include "rocksdb/utilities/checkpoint.h"
#include "rocksdb/utilities/table_properties_collectors.h"
#include "rocksdb/write_batch.h"
#include "server/core/log.h"

namespace callsession {
namespace {

namespace fs = std::filesystem;

rocksdb::Slice ToSlice(absl::string_view s) { return rocksdb::Slice(s.data(), s.size()); }

// Appends an entry's records to the pending batch.
class BatchWriter final : public JournalWriter {
 public:
  explicit BatchWriter(rocksdb::WriteBatch& batch) : batch_(batch) {}
  void Put(absl::string_view key, absl::string_view value) override {
    Check(batch_.Put(ToSlice(key), ToSlice(value)));
  }
  void Delete(absl::string_view key) override { Check(batch_.Delete(ToSlice(key))); }
  void DeleteRange(absl::string_view begin, absl::string_view end) override {
    Check(batch_.DeleteRange(ToSlice(begin), ToSlice(end)));
  }

 private:
  // A batch only refuses a record past its size limit, which is unset.
  static void Check(const rocksdb::Status& status) {
    if (!status.ok()) {
      Log(LogLevel::kError, "journal_write_failed", {{"error", status.ToString()}});
      std::_Exit(kJournalFailureExitCode);
    }
  }
  rocksdb::WriteBatch& batch_;
};

// Group commit with two threads that take turns as the writer
// (leader/follower): the writer takes everything appended, writes it as one
// batch and syncs, marks it durable, hands the writer's turn over, and only
// then runs the callbacks of what it wrote, while the other thread is
// already writing the next batch. Batches are written strictly one after
// another, in append order.
class RocksDbJournal final : public Journal {
 public:
  RocksDbJournal(std::unique_ptr<rocksdb::DB> db, std::string dir, bool sync)
      : db_(std::move(db)), dir_(std::move(dir)) {
    write_options_.sync = sync;
    for (std::thread& thread : threads_) thread = std::thread([this] { Run(); });
  }

  // Writes what is queued, runs every callback, then closes the store.
  ~RocksDbJournal() override {
    {
      absl::MutexLock lock(&mu_);
      stopping_ = true;
    }
    for (std::thread& thread : threads_) thread.join();
    const rocksdb::Status closed = db_->Close();
    if (!closed.ok()) {
      Log(LogLevel::kWarning, "journal_close_failed",
          {{"data_dir", dir_}, {"error", closed.ToString()}});
    }
  }

  absl::Status Load(Visitor visit) override {
    rocksdb::ReadOptions options;
    // A one-time scan: do not evict what the cache is for.
    options.fill_cache = false;
    options.readahead_size = 2 << 20;
    std::unique_ptr<rocksdb::Iterator> it(db_->NewIterator(options));
    for (it->SeekToFirst(); it->Valid(); it->Next()) {
      const rocksdb::Slice key = it->key();
      const rocksdb::Slice value = it->value();
      absl::Status status = visit(absl::string_view(key.data(), key.size()),
                                  absl::string_view(value.data(), value.size()));
      if (!status.ok()) {
        return absl::Status(status.code(),
                            absl::StrCat("data directory ", dir_, ": ", status.message()));
      }
    }
    if (!it->status().ok()) return FromRocksDb(it->status(), "reading");
    return absl::OkStatus();
  }

  uint64_t Append(absl::FunctionRef<void(JournalWriter&, uint64_t)> write) override {
    absl::MutexLock lock(&mu_);
    const uint64_t position = appended_.load(std::memory_order_relaxed) + 1;
    BatchWriter writer(*pending_);
    write(writer, position);
    if (pending_entries_++ == 0) first_pending_ = absl::Now();
    appended_.store(position, std::memory_order_release);
    return position;
  }

  uint64_t appended_position() const override { return appended_.load(std::memory_order_acquire); }
  uint64_t durable_position() const override { return waiters_.durable_position(); }

  void WhenDurable(uint64_t position, absl::AnyInvocable<void() &&> done) override {
    done = waiters_.WaitFor(position, std::move(done));
    if (done == nullptr) return;
    // Already durable: still never on the caller's thread.
    absl::MutexLock lock(&mu_);
    ready_.push_back(std::move(done));
  }

  absl::Status Checkpoint(const std::string& dir) override {
    if (dir.empty() || dir[0] != '/') {
      return absl::InvalidArgumentError(
          absl::StrCat("the checkpoint directory must be an absolute path, got \"", dir, "\""));
    }
    std::error_code error;
    if (fs::exists(dir, error)) {
      return absl::InvalidArgumentError(absl::StrCat("\"", dir, "\" already exists"));
    }
    rocksdb::Checkpoint* raw = nullptr;
    rocksdb::Status status = rocksdb::Checkpoint::Create(db_.get(), &raw);
    std::unique_ptr<rocksdb::Checkpoint> checkpoint(raw);
    if (status.ok()) status = checkpoint->CreateCheckpoint(dir);
    if (!status.ok()) {
      return absl::InternalError(
          absl::StrCat("checkpoint to \"", dir, "\" failed: ", status.ToString()));
    }
    return absl::OkStatus();
  }

  void SetObserver(JournalObserver* observer) override {
    absl::MutexLock lock(&mu_);
    observer_ = observer;
  }

  JournalStats Stats() const override {
    JournalStats stats;
    stats.entries = appended_.load(std::memory_order_relaxed);
    stats.batches = batches_.load(std::memory_order_relaxed);
    stats.bytes = bytes_.load(std::memory_order_relaxed);
    // One sync per batch, with sync=true.
    stats.syncs = write_options_.sync ? stats.batches : 0;
    return stats;
  }

 private:
  using Callbacks = std::vector<absl::AnyInvocable<void() &&>>;

  absl::Status FromRocksDb(const rocksdb::Status& status, absl::string_view doing) const {
    const std::string what =
        absl::StrCat(doing, " the data directory ", dir_, ": ", status.ToString());
    if (status.IsCorruption()) return absl::DataLossError(what);
    return absl::InternalError(what);
  }

  // Something for a thread to do: write (if no other thread is writing),
  // run ready callbacks, or stop.
  bool HasWorkLocked() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    return (!writing_ && pending_entries_ > 0) || !ready_.empty() || stopping_;
  }

  void Run() {
    auto batch = std::make_unique<rocksdb::WriteBatch>();
    for (;;) {
      uint64_t last = 0;
      uint64_t entries = 0;
      absl::Time first;
      Callbacks ready;
      JournalObserver* observer = nullptr;
      {
        absl::MutexLock lock(&mu_);
        mu_.Await(absl::Condition(this, &RocksDbJournal::HasWorkLocked));
        ready.swap(ready_);
        if (!writing_ && pending_entries_ > 0) {
          writing_ = true;
          std::swap(batch, pending_);
          entries = std::exchange(pending_entries_, 0);
          first = first_pending_;
          last = appended_.load(std::memory_order_relaxed);
          observer = observer_;
        } else if (ready.empty() && stopping_ && !writing_) {
          return;  // everything appended is written, every callback run
        }
      }
      for (auto& done : ready) std::move(done)();
      if (entries == 0) continue;

      const size_t bytes = batch->GetDataSize();
      const rocksdb::Status status = db_->Write(write_options_, batch.get());
      if (!status.ok()) {
        // Memory is ahead of disk: stop before anything else is
        // acknowledged. The next start recovers what is on disk.
        Log(LogLevel::kError, "journal_write_failed",
            {{"data_dir", dir_}, {"error", status.ToString()}});
        std::_Exit(kJournalFailureExitCode);
      }
      batch->Clear();
      batches_.fetch_add(1, std::memory_order_relaxed);
      bytes_.fetch_add(bytes, std::memory_order_relaxed);

      Callbacks done = waiters_.MarkDurable(last);
      {
        // The other thread may write the next batch while this one runs
        // the callbacks.
        absl::MutexLock lock(&mu_);
        writing_ = false;
      }
      if (observer != nullptr) observer->OnBatchDurable(absl::Now() - first, entries, bytes);
      for (auto& callback : done) std::move(callback)();
    }
  }

  const std::unique_ptr<rocksdb::DB> db_;
  const std::string dir_;
  rocksdb::WriteOptions write_options_;

  absl::Mutex mu_;
  // Entries appended but not yet taken by a writer.
  std::unique_ptr<rocksdb::WriteBatch> pending_ ABSL_GUARDED_BY(mu_) =
      std::make_unique<rocksdb::WriteBatch>();
  uint64_t pending_entries_ ABSL_GUARDED_BY(mu_) = 0;
  absl::Time first_pending_ ABSL_GUARDED_BY(mu_);
  // A thread has the writer's turn.
  bool writing_ ABSL_GUARDED_BY(mu_) = false;
  // Callbacks of positions already durable when registered.
  Callbacks ready_ ABSL_GUARDED_BY(mu_);
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  JournalObserver* observer_ ABSL_GUARDED_BY(mu_) = nullptr;

  DurableWaiters waiters_;

  // Written under mu_, read anywhere.
  std::atomic<uint64_t> appended_{0};
  std::atomic<uint64_t> batches_{0};
  std::atomic<uint64_t> bytes_{0};

  std::thread threads_[2];
};

// A directory is only ever opened as a store if it is one already (it has
// RocksDB's CURRENT file) or is empty or missing.
absl::Status CheckDataDir(const std::string& dir) {
  std::error_code error;
  const fs::file_status status = fs::status(dir, error);
  if (error && error != std::errc::no_such_file_or_directory) {
    return absl::InternalError(
        absl::StrCat("cannot read the data directory ", dir, ": ", error.message()));
  }
  if (!fs::exists(status)) {
    fs::create_directories(dir, error);
    if (error) {
      return absl::InternalError(
          absl::StrCat("cannot create the data directory ", dir, ": ", error.message()));
    }
    return absl::OkStatus();
  }
  if (!fs::is_directory(status)) {
    return absl::FailedPreconditionError(
        absl::StrCat("the data directory ", dir, " is not a directory"));
  }
  fs::directory_iterator entries(dir, error);
  if (error) {
    return absl::InternalError(
        absl::StrCat("cannot read the data directory ", dir, ": ", error.message()));
  }
  if (entries != fs::directory_iterator() && !fs::exists(fs::path(dir) / "CURRENT", error)) {
    return absl::FailedPreconditionError(absl::StrCat(
        "the data directory ", dir,
        " is not empty but holds no callsession store (no RocksDB CURRENT file); refusing to "
        "start over it: point --data_dir at an empty or missing directory"));
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::unique_ptr<Journal>> OpenRocksDbJournal(const RocksDbJournalOptions& options) {
  const std::string& dir = options.data_dir;
  if (dir.empty()) return absl::InvalidArgumentError("the data directory must not be empty");
  if (absl::Status checked = CheckDataDir(dir); !checked.ok()) return checked;

  rocksdb::Options db_options;
  db_options.create_if_missing = true;
  db_options.paranoid_checks = true;
  // A torn last record (the write a crash interrupted, never acknowledged)
  // is dropped; corruption anywhere else refuses to open rather than
  // silently losing what followed it.
  db_options.wal_recovery_mode = rocksdb::WALRecoveryMode::kTolerateCorruptedTailRecords;
  db_options.max_background_jobs = 2;
  db_options.write_buffer_size = options.memtable_bytes;
  db_options.max_write_buffer_number = 2;
  // The store is written all the time and read only at recovery (and by
  // flushes): an unsorted vector memtable takes inserts without comparing
  // keys and sorts once, in the background flush. The default skiplist spent
  // a third of the server's instructions on key comparisons. It takes one
  // writer at a time, which the writer's turn guarantees.
  db_options.memtable_factory = std::make_shared<rocksdb::VectorRepFactory>();
  db_options.allow_concurrent_memtable_write = false;
  // Every call record is deleted in the end: a file written mostly of
  // deletions is compacted soon, so their space comes back without waiting
  // for the levels above to fill.
  db_options.table_properties_collector_factories.push_back(
      rocksdb::NewCompactOnDeletionCollectorFactory(/*sliding_window_size=*/1024,
                                                    /*deletion_trigger=*/512));
  // RocksDB's own LOG files, in the data directory: bounded.
  db_options.keep_log_file_num = 4;
  db_options.max_log_file_size = 16 << 20;
  if (options.env != nullptr) db_options.env = options.env;

  rocksdb::DB* raw = nullptr;
  const rocksdb::Status status = rocksdb::DB::Open(db_options, dir, &raw);
  if (!status.ok()) {
    const std::string text = status.ToString();
    if (status.IsIOError() && absl::StrContains(text, "lock")) {
      return absl::FailedPreconditionError(
          absl::StrCat("the data directory ", dir,
                       " is in use by another process (its RocksDB LOCK file is held): ", text));
    }
    if (status.IsCorruption()) {
      return absl::DataLossError(absl::StrCat("the data directory ", dir, " is corrupt: ", text));
    }
    return absl::InternalError(absl::StrCat("cannot open the data directory ", dir, ": ", text));
  }
  return std::make_unique<RocksDbJournal>(std::unique_ptr<rocksdb::DB>(raw), dir, options.sync);
}

}  // namespace callsession
