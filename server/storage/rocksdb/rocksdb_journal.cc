#include "server/storage/rocksdb/rocksdb_journal.h"

#include <algorithm>
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

// Group commit on the callers' threads. The RPC thread that finds no write
// under way takes the writer's turn (WhenDurableOnCaller): it writes
// everything appended as one batch, to the OS, then writes again while more
// is pending, a few rounds at most. With sync=false that makes the batch
// durable, and the writer runs the callbacks now due (its own reply and
// other waiters') itself: the replies leave from gRPC's own threads, with
// no hand-off to another thread. With sync=true a journal thread syncs the
// log (each sync covers every write before it), back to back while writes
// come in, and a notifier thread runs the callbacks each sync made due, so
// the next sync does not wait for the replies to be sent. No RPC thread
// waits on a sync, nor on a RocksDB write stall: a write that would stall
// is handed to the journal thread. The journal thread also writes what no
// caller writes (changes made outside RPCs), within about 2 ms.
class RocksDbJournal final : public Journal {
 public:
  RocksDbJournal(std::unique_ptr<rocksdb::DB> db, std::string dir, bool sync)
      : db_(std::move(db)), dir_(std::move(dir)), sync_(sync) {
    // Durability comes from SyncWAL on the journal thread, never from a
    // caller's write.
    caller_write_options_.no_slowdown = true;
    thread_ = std::thread([this] { Run(); });
    if (sync_) notifier_ = std::thread([this] { Notify(); });
  }

  // Writes and syncs what is queued, runs every callback, then closes the
  // store.
  ~RocksDbJournal() override {
    {
      absl::MutexLock lock(&mu_);
      stopping_ = true;
    }
    thread_.join();
    if (notifier_.joinable()) {
      {
        absl::MutexLock lock(&waiters_mu_);
        notifier_stopping_ = true;
      }
      notifier_.join();
    }
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
    if (pending_entries_++ == 0) {
      first_pending_ = absl::Now();
      first_pending_position_ = position;
    }
    appended_.store(position, std::memory_order_release);
    return position;
  }

  uint64_t appended_position() const override { return appended_.load(std::memory_order_acquire); }
  uint64_t durable_position() const override { return durable_.load(std::memory_order_acquire); }

  void WhenDurable(uint64_t position, absl::AnyInvocable<void() &&> done) override {
    {
      absl::MutexLock lock(&waiters_mu_);
      // durable_ is raised under this lock before the waiters are looked
      // at, so a waiter is either seen or sees the new value.
      if (position > durable_.load(std::memory_order_acquire)) {
        waiting_.push_back(Waiter{position, std::move(done)});
        return;
      }
    }
    // Already durable: still never on the caller's thread.
    absl::MutexLock lock(&mu_);
    ready_.push_back(std::move(done));
  }

  void WhenDurableOnCaller(uint64_t position, absl::AnyInvocable<void() &&> done) override {
    {
      absl::MutexLock lock(&waiters_mu_);
      if (position > durable_.load(std::memory_order_acquire)) {
        waiting_.push_back(Waiter{position, std::move(done)});
        done = nullptr;
      }
    }
    if (done != nullptr) std::move(done)();
    WriteOnCaller();
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
    observer_.store(observer, std::memory_order_release);
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
  struct Waiter {
    uint64_t position;
    absl::AnyInvocable<void() &&> done;
  };
  using Callbacks = std::vector<absl::AnyInvocable<void() &&>>;
  using Batch = std::unique_ptr<rocksdb::WriteBatch>;

  // What a writer took with the writer's turn.
  struct Turn {
    uint64_t last = 0;  // position of its last entry
    uint64_t entries = 0;
    absl::Time first;  // when its first entry was appended
  };

  // Entries appended since the last durable point, for the observer.
  struct Unreported {
    uint64_t entries = 0;
    uint64_t bytes = 0;
    absl::Time first = absl::InfiniteFuture();
  };

  // More callers than this many rounds in a row would keep one RPC thread
  // writing for others: the journal thread takes over.
  static constexpr int kCallerRounds = 4;
  // Entries no caller wrote (changes made outside RPCs) are written by the
  // journal thread after at most about this long.
  static constexpr absl::Duration kBackgroundWriteDelay = absl::Milliseconds(2);

  absl::Status FromRocksDb(const rocksdb::Status& status, absl::string_view doing) const {
    const std::string what =
        absl::StrCat(doing, " the data directory ", dir_, ": ", status.ToString());
    if (status.IsCorruption()) return absl::DataLossError(what);
    return absl::InternalError(what);
  }

  // Memory is ahead of disk: stop before anything else is acknowledged.
  // The next start recovers what is on disk.
  [[noreturn]] void FailStop(const rocksdb::Status& status) {
    Log(LogLevel::kError, "journal_write_failed",
        {{"data_dir", dir_}, {"error", status.ToString()}});
    std::_Exit(kJournalFailureExitCode);
  }

  // Takes the writer's turn if it is free and something is pending:
  // swaps `batch` (empty) with the pending one.
  bool TakeTurnLocked(Batch& batch, Turn& turn) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (writing_ || pending_entries_ == 0) return false;
    writing_ = true;
    std::swap(batch, pending_);
    turn.entries = std::exchange(pending_entries_, 0);
    turn.first = first_pending_;
    turn.last = appended_.load(std::memory_order_relaxed);
    return true;
  }

  // After the turn's batch was written to the OS: counts it and, with
  // sync=false, marks it durable and returns the callbacks now due. The
  // caller then gives the turn back and runs them.
  Callbacks AfterWrite(rocksdb::WriteBatch& batch, const Turn& turn) {
    const uint64_t bytes = batch.GetDataSize();
    batch.Clear();
    batches_.fetch_add(1, std::memory_order_relaxed);
    bytes_.fetch_add(bytes, std::memory_order_relaxed);
    absl::MutexLock lock(&waiters_mu_);
    unreported_.entries += turn.entries;
    unreported_.bytes += bytes;
    unreported_.first = std::min(unreported_.first, turn.first);
    written_.store(turn.last, std::memory_order_release);
    if (sync_) return {};
    return MarkDurableLocked(turn.last);
  }

  // Raises durable_ to `position`, reports to the observer and returns the
  // callbacks of every waiter it covers.
  Callbacks MarkDurableLocked(uint64_t position) ABSL_EXCLUSIVE_LOCKS_REQUIRED(waiters_mu_) {
    durable_.store(position, std::memory_order_release);
    if (JournalObserver* observer = observer_.load(std::memory_order_acquire)) {
      // Cheap and non-blocking by contract (the metrics histogram).
      observer->OnBatchDurable(absl::Now() - unreported_.first, unreported_.entries,
                               unreported_.bytes);
    }
    unreported_ = Unreported();
    Callbacks done;
    auto still_waiting = std::partition(waiting_.begin(), waiting_.end(),
                                        [&](const Waiter& w) { return w.position > position; });
    done.reserve(waiting_.end() - still_waiting);
    for (auto it = still_waiting; it != waiting_.end(); ++it) done.push_back(std::move(it->done));
    waiting_.erase(still_waiting, waiting_.end());
    return done;
  }

  // The writer's turn on an RPC thread (see the class comment).
  void WriteOnCaller() {
    for (int round = 0;; ++round) {
      Turn turn;
      Batch batch;
      {
        absl::MutexLock lock(&mu_);
        if (round == kCallerRounds) {
          background_write_ = pending_entries_ > 0;
          return;
        }
        // spare_ is there whenever no caller has the turn.
        batch = std::move(spare_);
        if (!TakeTurnLocked(batch, turn)) {
          spare_ = std::move(batch);
          return;
        }
      }
      const rocksdb::Status status = db_->Write(caller_write_options_, batch.get());
      if (status.IsIncomplete()) {
        // RocksDB would stall this write (flushes behind): the journal
        // thread writes it, keeping the turn, and may wait.
        absl::MutexLock lock(&mu_);
        stalled_ = std::move(batch);
        stalled_turn_ = turn;
        return;
      }
      if (!status.ok()) FailStop(status);
      Callbacks done = AfterWrite(*batch, turn);
      {
        absl::MutexLock lock(&mu_);
        writing_ = false;
        spare_ = std::move(batch);
      }
      for (auto& callback : done) std::move(callback)();
    }
  }

  // Something for the journal thread to do.
  bool HasWorkLocked() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    return stopping_ || !ready_.empty() || stalled_ != nullptr || background_write_ ||
           (sync_ &&
            written_.load(std::memory_order_acquire) > durable_.load(std::memory_order_acquire)) ||
           (idle_ && pending_entries_ > 0);
  }

  // The journal thread: writes what callers left, syncs, runs callbacks.
  void Run() {
    Batch batch = std::make_unique<rocksdb::WriteBatch>();
    for (;;) {
      Callbacks ready;
      bool write = false;
      bool stopping = false;
      {
        absl::MutexLock lock(&mu_);
        const absl::Condition has_work(this, &RocksDbJournal::HasWorkLocked);
        // Idle, it sleeps until something is appended; otherwise it looks
        // every kBackgroundWriteDelay (never woken by each append).
        if (idle_) {
          mu_.Await(has_work);
        } else {
          mu_.AwaitWithTimeout(has_work, kBackgroundWriteDelay);
        }
        ready.swap(ready_);
        stopping = stopping_;
        // Pending since the last look and no caller wrote it.
        const uint64_t appended = appended_.load(std::memory_order_relaxed);
        const bool stale = pending_entries_ > 0 && first_pending_position_ <= looked_at_;
        write = std::exchange(background_write_, false) || stale || stopping || stalled_ != nullptr;
        idle_ = appended == looked_at_ && pending_entries_ == 0;
        looked_at_ = appended;
      }
      for (auto& done : ready) std::move(done)();
      if (write) WriteInBackground(batch);
      if (sync_) SyncWritten();
      if (stopping && Drained()) return;
    }
  }

  // Writes a stalled caller's batch, then everything pending while the
  // turn is free. Write stalls may block here.
  void WriteInBackground(Batch& batch) {
    for (;;) {
      Turn turn;
      {
        absl::MutexLock lock(&mu_);
        if (stalled_ != nullptr) {
          // The stalled caller kept the turn for this batch; its empty one
          // is in pending_ now, so this thread's becomes the spare.
          spare_ = std::move(batch);
          batch = std::move(stalled_);
          turn = stalled_turn_;
        } else if (!TakeTurnLocked(batch, turn)) {
          return;
        }
      }
      const rocksdb::Status status = db_->Write(write_options_, batch.get());
      if (!status.ok()) FailStop(status);
      Callbacks done = AfterWrite(*batch, turn);
      {
        absl::MutexLock lock(&mu_);
        writing_ = false;
      }
      for (auto& callback : done) std::move(callback)();
    }
  }

  // With sync=true: syncs the log if something was written since the last
  // sync, and hands the callbacks that made due to the notifier thread, so
  // the next sync need not wait for the replies to be sent.
  void SyncWritten() {
    const uint64_t target = written_.load(std::memory_order_acquire);
    if (target <= durable_.load(std::memory_order_acquire)) return;
    const rocksdb::Status status = db_->SyncWAL();
    if (!status.ok()) FailStop(status);
    syncs_.fetch_add(1, std::memory_order_relaxed);
    absl::MutexLock lock(&waiters_mu_);
    Callbacks due = MarkDurableLocked(target);
    if (notify_.empty()) {
      notify_.swap(due);
    } else {
      for (auto& callback : due) notify_.push_back(std::move(callback));
    }
  }

  bool HasNotificationsLocked() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(waiters_mu_) {
    return !notify_.empty() || notifier_stopping_;
  }

  // With sync=true: runs the callbacks of what the journal thread synced.
  void Notify() {
    Callbacks due;
    for (;;) {
      {
        absl::MutexLock lock(&waiters_mu_);
        waiters_mu_.Await(absl::Condition(this, &RocksDbJournal::HasNotificationsLocked));
        if (notify_.empty()) return;  // stopping, and everything run
        due.swap(notify_);
      }
      for (auto& callback : due) std::move(callback)();
      due.clear();
    }
  }

  // Stopping: true once everything appended is written (and synced) and
  // every callback has run.
  bool Drained() {
    {
      absl::MutexLock lock(&mu_);
      if (writing_ || pending_entries_ > 0 || stalled_ != nullptr || !ready_.empty()) {
        return false;
      }
    }
    absl::MutexLock lock(&waiters_mu_);
    return durable_.load(std::memory_order_acquire) == written_.load(std::memory_order_acquire);
  }

  const std::unique_ptr<rocksdb::DB> db_;
  const std::string dir_;
  const bool sync_;
  // Unsynced writes; callers' also refuse to stall.
  const rocksdb::WriteOptions write_options_;
  rocksdb::WriteOptions caller_write_options_;

  absl::Mutex mu_ ABSL_ACQUIRED_AFTER(waiters_mu_);
  // Entries appended but not yet taken by a writer.
  Batch pending_ ABSL_GUARDED_BY(mu_) = std::make_unique<rocksdb::WriteBatch>();
  uint64_t pending_entries_ ABSL_GUARDED_BY(mu_) = 0;
  absl::Time first_pending_ ABSL_GUARDED_BY(mu_);
  uint64_t first_pending_position_ ABSL_GUARDED_BY(mu_) = 0;
  // A thread has the writer's turn.
  bool writing_ ABSL_GUARDED_BY(mu_) = false;
  // The empty batch a caller swaps for the pending one.
  Batch spare_ ABSL_GUARDED_BY(mu_) = std::make_unique<rocksdb::WriteBatch>();
  // A caller's batch RocksDB would have stalled, for the journal thread
  // (which then holds the caller's turn).
  Batch stalled_ ABSL_GUARDED_BY(mu_);
  Turn stalled_turn_ ABSL_GUARDED_BY(mu_);
  // A caller left entries after its rounds: the journal thread writes them.
  bool background_write_ ABSL_GUARDED_BY(mu_) = false;
  // The journal thread's last look saw entries appended up to here; one
  // still pending at its next look, it writes. Idle: nothing was appended
  // between its last two looks.
  uint64_t looked_at_ ABSL_GUARDED_BY(mu_) = 0;
  bool idle_ ABSL_GUARDED_BY(mu_) = true;
  // Callbacks of positions already durable when registered.
  Callbacks ready_ ABSL_GUARDED_BY(mu_);
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;

  absl::Mutex waiters_mu_;
  std::vector<Waiter> waiting_ ABSL_GUARDED_BY(waiters_mu_);
  // Due callbacks for the notifier thread (sync=true).
  Callbacks notify_ ABSL_GUARDED_BY(waiters_mu_);
  bool notifier_stopping_ ABSL_GUARDED_BY(waiters_mu_) = false;
  Unreported unreported_ ABSL_GUARDED_BY(waiters_mu_);

  // appended_ is written under mu_, written_ and durable_ under
  // waiters_mu_; all are read anywhere.
  std::atomic<uint64_t> appended_{0};
  std::atomic<uint64_t> written_{0};
  std::atomic<uint64_t> durable_{0};
  std::atomic<JournalObserver*> observer_{nullptr};
  std::atomic<uint64_t> batches_{0};
  std::atomic<uint64_t> bytes_{0};
  std::atomic<uint64_t> syncs_{0};

  std::thread thread_;
  std::thread notifier_;
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
