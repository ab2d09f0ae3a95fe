// The embedded default store: the core's Journal on RocksDB (Debian's
// librocksdb). RocksDB's write-ahead log is the journal and its memtables
// and SST files are the snapshot; this adapter adds group commit and
// fail-stop on top.
//
// Group commit: Append only queues an entry (it never blocks on I/O). Two
// threads take turns as the writer: the writer takes everything queued,
// writes it as one atomic WriteBatch, syncs the log once (with `sync`),
// marks it durable, passes the writer's turn to the other thread, and then
// runs the WhenDurable callbacks waiting for it (the gRPC replies, event
// stream wake-ups) while the other writes the next batch. Batches are
// written one after another, in append order. With sync=false the log is
// written to the OS but not synced: it survives the process being killed,
// not a power loss.
//
// Fail-stop: if a write or sync fails (disk full, I/O error), the process
// logs `journal_write_failed` and exits with status 74 (EX_IOERR) at once:
// memory is then ahead of disk, and nothing not on disk may be
// acknowledged. The next start recovers what is on disk.
#ifndef CALLSESSION_SERVER_STORAGE_ROCKSDB_ROCKSDB_JOURNAL_H_
#define CALLSESSION_SERVER_STORAGE_ROCKSDB_ROCKSDB_JOURNAL_H_

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "server/core/journal.h"

namespace rocksdb {
class Env;
}

namespace callsession {

// RocksDB's memory beyond the serving copy: at most two memtables of this
// size (one filling, one being flushed). Reads never use its block cache
// but at recovery, which bypasses it.
inline constexpr size_t kRocksDbMemtableBytes = 32 << 20;

struct RocksDbJournalOptions {
  // Created (with its parents) if missing.
  std::string data_dir;
  // Sync the log before anything is acknowledged.
  bool sync = true;
  // The environment (file system) RocksDB uses; null: the default. Not
  // owned; for tests that inject faults.
  rocksdb::Env* env = nullptr;
  // Size of one memtable; tests make it small to reach a write stall.
  size_t memtable_bytes = kRocksDbMemtableBytes;
  // Callers (serving threads) sync their own writes only while the last
  // sync took no longer than this: a local SSD's fdatasync takes tens of
  // microseconds, a network volume's milliseconds, and a slow disk's syncs
  // must not hold a serving thread's reads. Tests that check where a sync
  // runs raise it, so that a loaded machine's slow sync does not move it.
  absl::Duration caller_sync_max_duration = absl::Microseconds(250);
};

// Opens the store in options.data_dir, replaying RocksDB's log. Errors, each
// naming the directory: FAILED_PRECONDITION if it is not a directory, is
// in use by another process (RocksDB's LOCK), or is not empty but holds no
// store (so it is never started over); DATA_LOSS if RocksDB finds it
// corrupt; INTERNAL for other I/O errors (e.g. unreadable).
absl::StatusOr<std::unique_ptr<Journal>> OpenRocksDbJournal(const RocksDbJournalOptions& options);

}  // namespace callsession

#endif  // CALLSESSION_SERVER_STORAGE_ROCKSDB_ROCKSDB_JOURNAL_H_
