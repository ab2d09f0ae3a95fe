// MemoryJournal: a Journal kept in memory, for tests of the core's
// journaling that must not depend on an engine (the ThreadSanitizer build has
// no RocksDB). It keeps every entry it was given, so a test can rebuild the
// records as they were after any prefix of the journal: the state a crash at
// that point would have left.
//
// Entries become durable on a thread of its own, in order, a few at a time;
// callbacks run there (never on the appender's thread), as with a real
// engine.
#ifndef CALLSESSION_TESTS_MEMORY_JOURNAL_H_
#define CALLSESSION_TESTS_MEMORY_JOURNAL_H_

#include <algorithm>
#include <atomic>
#include <map>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "server/core/journal.h"

namespace callsession {

class MemoryJournal final : public Journal {
 public:
  using Records = std::map<std::string, std::string>;

  // Starts with `records` stored (as if loaded from disk).
  explicit MemoryJournal(Records records = {}) : initial_(std::move(records)) {
    syncer_ = std::thread([this] { SyncLoop(); });
  }
  ~MemoryJournal() override {
    {
      absl::MutexLock lock(&mu_);
      stopping_ = true;
    }
    syncer_.join();
  }

  absl::Status Load(Visitor visit) override {
    for (const auto& [key, value] : initial_) {
      if (absl::Status status = visit(key, value); !status.ok()) return status;
    }
    return absl::OkStatus();
  }

  uint64_t Append(absl::FunctionRef<void(JournalWriter&, uint64_t)> write) override {
    absl::MutexLock lock(&mu_);
    Entry entry;
    EntryWriter writer(entry);
    write(writer, entries_.size() + 1);
    entries_.push_back(std::move(entry));
    appended_.store(entries_.size(), std::memory_order_release);
    return entries_.size();
  }

  // Lock-free, as the interface requires: the core reads them under its
  // own locks.
  uint64_t appended_position() const override { return appended_.load(std::memory_order_acquire); }
  uint64_t durable_position() const override { return durable_.load(std::memory_order_acquire); }

  void WhenDurable(uint64_t position, absl::AnyInvocable<void() &&> done) override {
    absl::MutexLock lock(&mu_);
    waiting_.emplace_back(position, std::move(done));
  }

  absl::Status Checkpoint(const std::string& dir) override {
    return absl::FailedPreconditionError("MemoryJournal takes no checkpoints");
  }
  void SetObserver(std::shared_ptr<JournalObserver> observer) override {}
  JournalStats Stats() const override {
    absl::MutexLock lock(&mu_);
    JournalStats stats;
    stats.entries = entries_.size();
    return stats;
  }

  // Blocks until everything appended so far is durable.
  void WaitUntilDurable() {
    absl::MutexLock lock(&mu_);
    mu_.Await(absl::Condition(this, &MemoryJournal::AllDurableLocked));
  }

  size_t entries() const {
    absl::MutexLock lock(&mu_);
    return entries_.size();
  }

  // The records after the first `count` entries, applied on top of the
  // initial ones: what a crash right after entry `count` would leave.
  Records RecordsAfter(size_t count) const {
    absl::MutexLock lock(&mu_);
    Records records = initial_;
    for (size_t i = 0; i < count && i < entries_.size(); ++i) {
      for (const Op& op : entries_[i]) {
        switch (op.kind) {
          case Op::kPut:
            records[op.key] = op.value;
            break;
          case Op::kDelete:
            records.erase(op.key);
            break;
          case Op::kDeleteRange:
            records.erase(records.lower_bound(op.key), records.lower_bound(op.value));
            break;
        }
      }
    }
    return records;
  }

 private:
  struct Op {
    enum Kind { kPut, kDelete, kDeleteRange } kind;
    std::string key;
    std::string value;  // the end of the range for kDeleteRange
  };
  using Entry = std::vector<Op>;

  class EntryWriter final : public JournalWriter {
   public:
    explicit EntryWriter(Entry& entry) : entry_(entry) {}
    void Put(absl::string_view key, absl::string_view value) override {
      entry_.push_back({Op::kPut, std::string(key), std::string(value)});
    }
    void Delete(absl::string_view key) override {
      entry_.push_back({Op::kDelete, std::string(key), {}});
    }
    void DeleteRange(absl::string_view begin, absl::string_view end) override {
      entry_.push_back({Op::kDeleteRange, std::string(begin), std::string(end)});
    }

   private:
    Entry& entry_;
  };

  bool AllDurableLocked() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    return durable_.load(std::memory_order_relaxed) >= entries_.size();
  }
  bool HasWorkLocked() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    return durable_.load(std::memory_order_relaxed) < entries_.size() || !waiting_.empty() ||
           stopping_;
  }

  // Makes entries durable a few at a time and runs the callbacks due.
  void SyncLoop() {
    for (;;) {
      std::vector<absl::AnyInvocable<void() &&>> due;
      {
        absl::MutexLock lock(&mu_);
        mu_.Await(absl::Condition(this, &MemoryJournal::HasWorkLocked));
        const uint64_t durable = durable_.load(std::memory_order_relaxed);
        if (stopping_ && durable == entries_.size() && waiting_.empty()) return;
        const uint64_t now_durable = std::min<uint64_t>(entries_.size(), durable + 3);
        durable_.store(now_durable, std::memory_order_release);
        for (auto it = waiting_.begin(); it != waiting_.end();) {
          if (it->first <= now_durable) {
            due.push_back(std::move(it->second));
            it = waiting_.erase(it);
          } else {
            ++it;
          }
        }
      }
      for (auto& done : due) std::move(done)();
    }
  }

  const Records initial_;
  mutable absl::Mutex mu_;
  std::vector<Entry> entries_ ABSL_GUARDED_BY(mu_);
  // Written under mu_, read anywhere.
  std::atomic<uint64_t> appended_{0};
  std::atomic<uint64_t> durable_{0};
  std::vector<std::pair<uint64_t, absl::AnyInvocable<void() &&>>> waiting_ ABSL_GUARDED_BY(mu_);
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::thread syncer_;
};

}  // namespace callsession

#endif  // CALLSESSION_TESTS_MEMORY_JOURNAL_H_
