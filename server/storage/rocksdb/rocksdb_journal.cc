#include "server/storage/rocksdb/rocksdb_journal.h"

#include <pthread.h>

#include <atomic>
#include <cstdlib>
#include <filesystem>
#include <iterator>
#include <memory>
#include <optional>
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
//
// A caller's WriteNow takes the writer's turn the same way. Without sync
// its batch is durable once written. With sync it writes without syncing:
// one SyncWAL covers every batch written before it began, while callers go
// on writing the next ones. A caller whose scope also syncs then syncs
// itself, unless a sync is under way; the syncing thread syncs again what
// was written meanwhile (a few rounds at most, then the writer threads take
// over), and only while syncs are fast. Otherwise the sync is the writer
// threads'.
class RocksDbJournal final : public Journal {
 public:
  RocksDbJournal(std::unique_ptr<rocksdb::DB> db, std::string dir, bool sync,
                 absl::Duration caller_sync_max_duration)
      : db_(std::move(db)),
        dir_(std::move(dir)),
        caller_sync_max_nanos_(absl::ToInt64Nanoseconds(caller_sync_max_duration)) {
    write_options_.sync = sync;
    // A caller writes; it syncs separately, if at all (SyncOnCaller).
    caller_write_options_.sync = false;
    caller_write_options_.no_slowdown = true;
    for (size_t i = 0; i < std::size(threads_); ++i) {
      threads_[i] = std::thread([this] { Run(); });
      // For top -H, perf and /proc/PID/task/*/comm.
      pthread_setname_np(threads_[i].native_handle(), absl::StrCat("journal-", i).c_str());
    }
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
    // Left for the caller's WriteNow: the writer threads are not woken.
    if (!CallerWritesScope::Active()) unclaimed_ = true;
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

  bool WriteNow() override {
    const uint64_t target = appended_.load(std::memory_order_acquire);
    if (waiters_.durable_position() >= target) return true;
    // A slow disk's syncs would hold the caller's other requests (reads
    // too): they stay the writer threads', whose syncs tell when it is fast
    // again.
    const bool syncs_here = write_options_.sync && CallerWritesScope::AlsoSyncs() && SyncsAreFast();
    Batch batch;
    {
      absl::MutexLock lock(&mu_);
      // Another caller's write is short (no sync, never a stall): wait for
      // it, rather than hand these entries to the writer threads.
      mu_.Await(absl::Condition(
          +[](bool* caller_writing) { return !*caller_writing; }, &caller_writing_));
      if (waiters_.durable_position() >= target) return true;
      if (writing_ || pending_entries_ == 0) {
        // A writer thread has the turn (and perhaps these entries): what is
        // pending goes in its next batch.
        unclaimed_ = pending_entries_ > 0;
        return false;
      }
      batch = TakePendingLocked(std::move(spare_));
      caller_writing_ = true;
      // Before the batch is written: the writer threads leave its sync to us.
      if (syncs_here) ++callers_to_sync_;
    }
    // A caller never waits for a write stall (a flush or compaction
    // behind): the batch goes to the writer threads, which do wait.
    std::optional<Callbacks> due = WriteBatch(batch, caller_write_options_);
    if (!due.has_value()) {
      absl::MutexLock lock(&mu_);
      stalled_ = std::move(batch);
      caller_writing_ = false;
      if (syncs_here) --callers_to_sync_;
      return false;
    }
    {
      absl::MutexLock lock(&mu_);
      spare_ = std::move(batch.records);
    }
    for (auto& done : *due) std::move(done)();
    if (!write_options_.sync) return true;
    if (syncs_here) SyncOnCaller();
    return waiters_.durable_position() >= target;
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

  void SetObserver(std::shared_ptr<JournalObserver> observer) override {
    absl::MutexLock lock(&mu_);
    observer_ = std::move(observer);
  }

  JournalStats Stats() const override {
    JournalStats stats;
    stats.entries = appended_.load(std::memory_order_relaxed);
    stats.batches = batches_.load(std::memory_order_relaxed);
    stats.bytes = bytes_.load(std::memory_order_relaxed);
    stats.syncs = syncs_.load(std::memory_order_relaxed);
    return stats;
  }

 private:
  using Callbacks = std::vector<absl::AnyInvocable<void() &&>>;

  // Syncs one caller's SyncOnCaller runs at most: its own and two for
  // others' writes, so its own queue never waits long.
  static constexpr int kCallerSyncRounds = 3;

  // Batches written by callers and not yet synced.
  struct Unsynced {
    uint64_t last = 0;  // position of the last entry
    uint64_t entries = 0;
    uint64_t bytes = 0;
    absl::Time first;  // when the first entry was appended
  };

  // The entries one writer took.
  struct Batch {
    std::unique_ptr<rocksdb::WriteBatch> records;
    uint64_t last = 0;  // position of its last entry
    uint64_t entries = 0;
    absl::Time first;  // when its first entry was appended
    std::shared_ptr<JournalObserver> observer;
  };

  // Takes the writer's turn and everything pending, leaving `empty` (a
  // cleared batch, or null for a new one) to collect what is appended next.
  Batch TakePendingLocked(std::unique_ptr<rocksdb::WriteBatch> empty)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    // Null when two callers' WriteNow overlapped (the first one's batch
    // is not back yet).
    if (empty == nullptr) empty = std::make_unique<rocksdb::WriteBatch>();
    writing_ = true;
    unclaimed_ = false;
    Batch batch;
    batch.records = std::exchange(pending_, std::move(empty));
    batch.entries = std::exchange(pending_entries_, 0);
    batch.first = first_pending_;
    batch.last = appended_.load(std::memory_order_relaxed);
    batch.observer = observer_;
    return batch;
  }

  // Writes the batch with `options`, hands the writer's turn back, and
  // returns the callbacks now due; leaves the batch cleared. The batch is
  // durable (and marked so) if it was synced or the journal does not sync;
  // otherwise it waits for the next SyncWAL. With `options.no_slowdown`,
  // returns nullopt instead of waiting out a write stall, having written
  // nothing and kept the turn. Exits the process if the write fails.
  std::optional<Callbacks> WriteBatch(Batch& batch, const rocksdb::WriteOptions& options) {
    const size_t bytes = batch.records->GetDataSize();
    const rocksdb::Status status = db_->Write(options, batch.records.get());
    if (status.IsIncomplete() && options.no_slowdown) return std::nullopt;
    if (!status.ok()) {
      // Memory is ahead of disk: stop before anything else is
      // acknowledged. The next start recovers what is on disk.
      Log(LogLevel::kError, "journal_write_failed",
          {{"data_dir", dir_}, {"error", status.ToString()}});
      std::_Exit(kJournalFailureExitCode);
    }
    batch.records->Clear();
    batches_.fetch_add(1, std::memory_order_relaxed);
    bytes_.fetch_add(bytes, std::memory_order_relaxed);
    if (options.sync) syncs_.fetch_add(1, std::memory_order_relaxed);

    if (write_options_.sync && !options.sync) {
      absl::MutexLock lock(&mu_);
      if (unsynced_.entries == 0) unsynced_.first = batch.first;
      unsynced_.last = batch.last;
      unsynced_.entries += batch.entries;
      unsynced_.bytes += bytes;
      writing_ = false;
      caller_writing_ = false;
      return Callbacks();
    }
    Callbacks due = waiters_.MarkDurable(batch.last);
    {
      // Another thread may write the next batch while this one runs the
      // callbacks. A sync also covers what callers wrote before.
      absl::MutexLock lock(&mu_);
      writing_ = false;
      caller_writing_ = false;
      if (unsynced_.last <= batch.last) unsynced_ = Unsynced();
    }
    if (batch.observer != nullptr) {
      batch.observer->OnBatchDurable(absl::Now() - batch.first, batch.entries, bytes);
    }
    return due;
  }

  bool SyncsAreFast() const {
    return last_sync_nanos_.load(std::memory_order_relaxed) <= caller_sync_max_nanos_;
  }

  // After a caller's write in a scope that also syncs (its claim counted in
  // callers_to_sync_): syncs what is written and unsynced, unless a sync is
  // under way, then what was written during the sync, and runs the
  // callbacks due. It stops after kCallerSyncRounds syncs, after a slow
  // one, or when another caller is about to sync; what is left then is the
  // writer threads'.
  void SyncOnCaller() {
    bool claimed = true;
    for (int round = 0; round < kCallerSyncRounds; ++round) {
      SyncTurn turn;
      {
        absl::MutexLock lock(&mu_);
        if (claimed) {
          --callers_to_sync_;
          claimed = false;
        }
        if (unsynced_.entries == 0 || syncing_) return;
        if (round > 0 && (callers_to_sync_ > 0 || !SyncsAreFast())) return;
        turn = TakeUnsyncedLocked();
      }
      for (auto& done : SyncWritten(turn)) std::move(done)();
    }
  }

  // What one sync covers: the batches written and not yet synced.
  struct SyncTurn {
    Unsynced written;
    std::shared_ptr<JournalObserver> observer;
  };

  // Takes the syncing turn and the batches it covers; the caller syncs
  // them with SyncWritten, which hands the turn back.
  SyncTurn TakeUnsyncedLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    syncing_ = true;
    return SyncTurn{std::exchange(unsynced_, Unsynced()), observer_};
  }

  // Syncs the WAL, making the turn's batches durable, and hands the syncing
  // turn back; returns the callbacks now due. Exits the process if the sync
  // fails.
  Callbacks SyncWritten(const SyncTurn& turn) {
    const Unsynced& written = turn.written;
    const absl::Time start = absl::Now();
    const rocksdb::Status status = db_->SyncWAL();
    last_sync_nanos_.store(absl::ToInt64Nanoseconds(absl::Now() - start),
                           std::memory_order_relaxed);
    if (!status.ok()) {
      Log(LogLevel::kError, "journal_write_failed",
          {{"data_dir", dir_}, {"error", status.ToString()}});
      std::_Exit(kJournalFailureExitCode);
    }
    syncs_.fetch_add(1, std::memory_order_relaxed);
    Callbacks due = waiters_.MarkDurable(written.last);
    {
      absl::MutexLock lock(&mu_);
      syncing_ = false;
    }
    if (turn.observer != nullptr) {
      turn.observer->OnBatchDurable(absl::Now() - written.first, written.entries, written.bytes);
    }
    return due;
  }

  absl::Status FromRocksDb(const rocksdb::Status& status, absl::string_view doing) const {
    const std::string what =
        absl::StrCat(doing, " the data directory ", dir_, ": ", status.ToString());
    if (status.IsCorruption()) return absl::DataLossError(what);
    return absl::InternalError(what);
  }

  // Something for a thread to do: write (if no other thread is writing),
  // sync what callers wrote (if no other thread is syncing), run ready
  // callbacks, or stop.
  bool HasWorkLocked() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    return (!writing_ && unclaimed_) || stalled_.has_value() || SyncDueLocked() ||
           !ready_.empty() || stopping_;
  }

  bool SyncDueLocked() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    return unsynced_.entries > 0 && !syncing_ && callers_to_sync_ == 0;
  }

  void Run() {
    auto empty = std::make_unique<rocksdb::WriteBatch>();
    for (;;) {
      Batch batch;
      std::optional<SyncTurn> to_sync;
      Callbacks ready;
      {
        absl::MutexLock lock(&mu_);
        mu_.Await(absl::Condition(this, &RocksDbJournal::HasWorkLocked));
        ready.swap(ready_);
        if (stalled_.has_value()) {  // the turn came with it
          batch = std::move(*stalled_);
          stalled_.reset();
        } else if (!writing_ && pending_entries_ > 0 && (unclaimed_ || stopping_)) {
          batch = TakePendingLocked(std::move(empty));
        } else if (SyncDueLocked()) {
          to_sync = TakeUnsyncedLocked();
        } else if (ready.empty() && stopping_ && !writing_ && !syncing_) {
          return;  // everything appended is durable, every callback run
        }
      }
      for (auto& done : ready) std::move(done)();
      Callbacks due;
      if (batch.entries > 0) {
        due = *WriteBatch(batch, write_options_);
        empty = std::move(batch.records);
      } else if (to_sync.has_value()) {
        due = SyncWritten(*to_sync);
      }
      for (auto& callback : due) std::move(callback)();
    }
  }

  const std::unique_ptr<rocksdb::DB> db_;
  const std::string dir_;
  // RocksDbJournalOptions::caller_sync_max_duration.
  const int64_t caller_sync_max_nanos_;
  rocksdb::WriteOptions write_options_;
  rocksdb::WriteOptions caller_write_options_;

  absl::Mutex mu_;
  // Entries appended but not yet taken by a writer.
  std::unique_ptr<rocksdb::WriteBatch> pending_ ABSL_GUARDED_BY(mu_) =
      std::make_unique<rocksdb::WriteBatch>();
  uint64_t pending_entries_ ABSL_GUARDED_BY(mu_) = 0;
  absl::Time first_pending_ ABSL_GUARDED_BY(mu_);
  // Pending entries no caller will write (see CallerWritesScope): the
  // writer threads' cue.
  bool unclaimed_ ABSL_GUARDED_BY(mu_) = false;
  // A cleared batch for WriteNow to leave in pending_'s place.
  std::unique_ptr<rocksdb::WriteBatch> spare_ ABSL_GUARDED_BY(mu_) =
      std::make_unique<rocksdb::WriteBatch>();
  // A thread has the writer's turn; a caller's WriteNow has it.
  bool writing_ ABSL_GUARDED_BY(mu_) = false;
  bool caller_writing_ ABSL_GUARDED_BY(mu_) = false;
  // With sync: what callers wrote since the last sync began, and whether a
  // thread is syncing.
  Unsynced unsynced_ ABSL_GUARDED_BY(mu_);
  bool syncing_ ABSL_GUARDED_BY(mu_) = false;
  // Callers that have taken or written a batch and will sync it themselves
  // (SyncOnCaller): until they have tried, the writer threads do not sync.
  int callers_to_sync_ ABSL_GUARDED_BY(mu_) = 0;
  // A batch a caller's WriteNow could not write without waiting for a
  // stall, with the writer's turn: for the writer threads.
  std::optional<Batch> stalled_ ABSL_GUARDED_BY(mu_);
  // Callbacks of positions already durable when registered.
  Callbacks ready_ ABSL_GUARDED_BY(mu_);
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::shared_ptr<JournalObserver> observer_ ABSL_GUARDED_BY(mu_);

  DurableWaiters waiters_;

  // Written under mu_, read anywhere.
  std::atomic<uint64_t> appended_{0};
  std::atomic<uint64_t> batches_{0};
  std::atomic<uint64_t> bytes_{0};
  std::atomic<uint64_t> syncs_{0};
  // How long the last SyncWAL took.
  std::atomic<int64_t> last_sync_nanos_{0};

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
  return std::make_unique<RocksDbJournal>(std::unique_ptr<rocksdb::DB>(raw), dir, options.sync,
                                          options.caller_sync_max_duration);
}

}  // namespace callsession
