// Journal: where the core writes the effects of its changes so that they
// survive a crash, and learns when they have.
//
// The core knows only this interface; each engine (the embedded RocksDB
// store in server/storage/rocksdb, and later a replicated one) implements
// it in its own folder. An entry is the records one change wrote or
// deleted; entries are made durable in the order they were appended, as
// atomic units (an engine may write several entries in one atomic batch:
// group commit). Positions number entries 1, 2, 3... within one process;
// everything loaded at start counts as position 0.
//
// Ordering contract: the caller appends an entry while it still holds the
// locks of everything the entry's records describe, and serializes Append
// calls itself (CallSessionCore holds its journal lock around them). So the
// journal's order is consistent with every lock, every prefix of it is a
// state memory could have been in, and a key's last record is its state.
#ifndef CALLSESSION_SERVER_CORE_JOURNAL_H_
#define CALLSESSION_SERVER_CORE_JOURNAL_H_

#include <atomic>
#include <cstdint>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/functional/any_invocable.h"
#include "absl/functional/function_ref.h"
#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"

namespace callsession {

// Exit status of the process after a failed journal write (EX_IOERR): every
// engine stops at once rather than acknowledge what it could not persist.
inline constexpr int kJournalFailureExitCode = 74;

// Receives the records of one entry.
class JournalWriter {
 public:
  virtual void Put(absl::string_view key, absl::string_view value) = 0;
  virtual void Delete(absl::string_view key) = 0;
  // Deletes every key in [begin, end).
  virtual void DeleteRange(absl::string_view begin, absl::string_view end) = 0;

 protected:
  ~JournalWriter() = default;
};

// Counters since the journal was opened. Approximate under concurrency.
struct JournalStats {
  uint64_t entries = 0;  // appended
  uint64_t batches = 0;  // atomic writes (each holds one or more entries)
  uint64_t bytes = 0;    // bytes of those writes
  uint64_t syncs = 0;    // syncs to stable storage (each covers every write before it)
};

// Told about each batch once it is durable (for metrics). Called on the
// journal's writer thread; must not block.
class JournalObserver {
 public:
  virtual ~JournalObserver() = default;
  // `latency`: from the batch's first entry being appended to its being
  // durable (queueing, write and sync).
  virtual void OnBatchDurable(absl::Duration latency, uint64_t entries, uint64_t bytes) = 0;
};

class Journal {
 public:
  using Visitor = absl::FunctionRef<absl::Status(absl::string_view key, absl::string_view value)>;

  virtual ~Journal() = default;

  // Calls `visit` for every stored record in key order, stopping at the
  // first error, which it returns. Called at start, before any Append.
  virtual absl::Status Load(Visitor visit) = 0;

  // Appends one entry: `write` puts its records and is told the entry's
  // position. Returns that position. Never blocks on I/O. Callers serialize
  // calls (see the ordering contract above).
  virtual uint64_t Append(
      absl::FunctionRef<void(JournalWriter& writer, uint64_t position)> write) = 0;

  // The position of the last entry appended, and of the last one durable
  // (it and every earlier one survive a crash). Any thread; they must not
  // block or take a lock that is held while a `write` runs: the core reads
  // them under its own locks (an event queue's among them).
  virtual uint64_t appended_position() const = 0;
  virtual uint64_t durable_position() const = 0;

  // Runs `done` once the entry at `position` is durable, on a journal
  // thread: never on the calling thread, which may hold locks `done` takes.
  // `done` must not block. Any thread.
  virtual void WhenDurable(uint64_t position, absl::AnyInvocable<void() &&> done) = 0;

  // Writes every entry appended so far on the calling thread, if the
  // engine can without waiting for a sync, a write stall or the network
  // (RocksDB: the write; its sync, with --sync=true, is left to the
  // engine's threads unless the caller's CallerWritesScope also syncs), and
  // runs the callbacks that become due here, other threads' among them. Returns
  // whether everything appended before the call is durable now. False at
  // once from engines that cannot write on the caller (etcd), or while
  // another thread is writing: then the engine's own threads write it, as
  // always. The caller must hold no lock a WhenDurable callback may take.
  // Any thread.
  //
  // Entries appended inside a CallerWritesScope are left for the caller's
  // WriteNow instead of waking the engine's threads for them: a serving
  // thread appends the changes of a whole burst of requests and writes them
  // as one batch before it sends their replies, with no thread in between.
  virtual bool WriteNow() { return durable_position() >= appended_position(); }

  // Writes a consistent copy of the stored records (a prefix of the
  // journal) to the directory `dir`, which must not exist yet; it can be
  // opened as a store of its own. Errors: INVALID_ARGUMENT if `dir` exists
  // or is not absolute, FAILED_PRECONDITION if the engine cannot copy,
  // INTERNAL on an I/O error. Any thread; may block on I/O.
  virtual absl::Status Checkpoint(const std::string& dir) = 0;

  // Sets the observer (null to stop). Shared: a batch already being written
  // keeps reporting to the observer it started with, however late it ends.
  // Any thread.
  virtual void SetObserver(std::shared_ptr<JournalObserver> observer) = 0;

  virtual JournalStats Stats() const = 0;
};

// While one exists on a thread, the entries that thread appends wait for its
// Journal::WriteNow (which it must call before it waits for anything, and
// before the scope ends), instead of waking the engine's writer. Engines
// that cannot write on the caller's thread ignore it. Not nestable.
//
// With `also_sync`, an engine that syncs (RocksDB with --sync=true) has the
// caller's WriteNow sync too, unless a sync is under way (whoever runs it
// then syncs what it missed), and run the callbacks that become due: the
// caller's replies leave without waking another thread. The sync blocks the
// caller, so a thread that is the only one serving should not ask for it.
class CallerWritesScope {
 public:
  explicit CallerWritesScope(bool also_sync = false);
  ~CallerWritesScope();
  CallerWritesScope(const CallerWritesScope&) = delete;
  CallerWritesScope& operator=(const CallerWritesScope&) = delete;

  // Whether the calling thread is inside one, and whether it also syncs.
  static bool Active();
  static bool AlsoSyncs();
};

// For engines: the callbacks waiting for positions to become durable, and
// the durable position. Thread-safe; never runs a callback itself.
class DurableWaiters {
 public:
  using Callback = absl::AnyInvocable<void() &&>;

  uint64_t durable_position() const { return durable_.load(std::memory_order_acquire); }

  // Keeps `done` until `position` is durable and returns null; if it already
  // is, returns `done` for the engine to run (on one of its own threads:
  // Journal::WhenDurable never runs it on its caller's).
  Callback WaitFor(uint64_t position, Callback done);

  // Raises the durable position to `position` (a lower one than it already
  // is changes nothing: a sync and a synced write may finish in either
  // order) and returns the callbacks it covers, for the engine to run.
  std::vector<Callback> MarkDurable(uint64_t position);

 private:
  struct Waiter {
    uint64_t position;
    Callback done;
  };

  absl::Mutex mu_;
  std::vector<Waiter> waiting_ ABSL_GUARDED_BY(mu_);
  // Raised under mu_ before the waiters are looked at, so a waiter is
  // either seen by MarkDurable or sees the new value; read anywhere.
  std::atomic<uint64_t> durable_{0};
};

}  // namespace callsession

#endif  // CALLSESSION_SERVER_CORE_JOURNAL_H_
