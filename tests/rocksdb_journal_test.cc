// The RocksDB journal's group commit, driven directly: callbacks run once,
// only after their entry is durable and never inside WhenDurable; nothing
// is durable before its sync and no caller waits for it; no caller blocks
// on a write stall; a caller in a CallerWritesScope writes its own entries
// (without sync) and no other thread does; one whose scope also syncs syncs
// them too, never waits for another's sync, and leaves its syncs to the
// writer threads after a slow one; entries nobody waits for are
// written too; closing drains, reporting to an observer its owner let go;
// everything durable is in the store when it is opened again.
#include "server/storage/rocksdb/rocksdb_journal.h"

#include <atomic>
#include <filesystem>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "gtest/gtest.h"
#include "rocksdb/env.h"
#include "server/core/journal.h"
#include "tests/sync_fault_fs.h"

namespace callsession {
namespace {

// WhenDurable's callers may hold locks its callbacks take: a callback must
// never run inside the call.
thread_local bool inside_when_durable = false;

class RocksDbJournalTest : public ::testing::TestWithParam<bool> {
 protected:
  void SetUp() override {
    dir_ = ::testing::TempDir() + "rocksdb_journal_test_" +
           std::to_string(reinterpret_cast<uintptr_t>(this)) + "_" +
           std::to_string(absl::ToUnixNanos(absl::Now()));
  }
  void TearDown() override {
    fs_->Release();
    fs_->ReleaseTableFiles();
    journal_.reset();
    std::error_code ignored;
    std::filesystem::remove_all(dir_, ignored);
  }

  bool sync() const { return GetParam(); }

  // Callers' syncs count as fast up to `caller_sync_max` (high by default:
  // a loaded machine's sync must not move a sync a test expects on its
  // caller).
  Journal& Open(size_t memtable_bytes = kRocksDbMemtableBytes,
                absl::Duration caller_sync_max = absl::Seconds(1)) {
    RocksDbJournalOptions options;
    options.data_dir = dir_;
    options.sync = sync();
    options.env = env_.get();
    options.memtable_bytes = memtable_bytes;
    options.caller_sync_max_duration = caller_sync_max;
    auto journal = OpenRocksDbJournal(options);
    EXPECT_TRUE(journal.ok()) << journal.status();
    journal_ = std::move(*journal);
    return *journal_;
  }

  // The records in the store, opened afresh.
  std::vector<std::string> Reopen() {
    journal_.reset();
    Journal& journal = Open();
    std::vector<std::string> keys;
    EXPECT_TRUE(journal
                    .Load([&](absl::string_view key, absl::string_view) {
                      keys.emplace_back(key);
                      return absl::OkStatus();
                    })
                    .ok());
    return keys;
  }

  void ExpectAWriteStallNeverBlocksTheCaller(bool caller_writes);

  static uint64_t Put(Journal& journal, const std::string& key, size_t value_bytes = 16) {
    return journal.Append(
        [&](JournalWriter& writer, uint64_t) { writer.Put(key, std::string(value_bytes, 'v')); });
  }

  std::string dir_;
  std::shared_ptr<SyncFaultFileSystem> fs_ = std::make_shared<SyncFaultFileSystem>();
  std::unique_ptr<rocksdb::Env> env_ = rocksdb::NewCompositeEnv(fs_);
  std::unique_ptr<Journal> journal_;
};

INSTANTIATE_TEST_SUITE_P(Sync, RocksDbJournalTest, ::testing::Bool(),
                         [](const auto& info) { return info.param ? "Sync" : "NoSync"; });

TEST_P(RocksDbJournalTest, EveryCallbackRunsOnceAfterItsEntryIsDurable) {
  Journal& journal = Open();
  constexpr int kThreads = 4;
  constexpr int kEntries = 3000;
  const uint64_t total = kThreads * kEntries;
  // Indexed by position (1..total).
  std::vector<std::atomic<int>> runs(total + 1);
  std::atomic<int> early{0};
  std::atomic<int> inside_call{0};
  std::atomic<int> registered{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      // Half the threads write their own entries, as serving threads do;
      // one of them syncs them too.
      std::optional<CallerWritesScope> caller_writes;
      if (t % 2 == 1) caller_writes.emplace(/*also_sync=*/t % 4 == 3);
      for (int i = 0; i < kEntries; ++i) {
        if (caller_writes.has_value() && i % 5 == 4) journal.WriteNow();
        const uint64_t position = Put(journal, absl::StrCat("k/", t, "/", i));
        auto done = [&, position] {
          if (journal.durable_position() < position) early.fetch_add(1);
          if (inside_when_durable) inside_call.fetch_add(1);
          runs[position].fetch_add(1);
        };
        if (i % 4 == 0) continue;  // a change nobody waits for (lease expiry, ...)
        registered.fetch_add(1);
        inside_when_durable = true;
        journal.WhenDurable(position, done);
        inside_when_durable = false;
      }
      if (caller_writes.has_value()) journal.WriteNow();
    });
  }
  for (std::thread& thread : threads) thread.join();

  // Everything appended becomes durable, the unwaited entries included.
  const absl::Time deadline = absl::Now() + absl::Seconds(30);
  while (journal.durable_position() < total && absl::Now() < deadline) {
    absl::SleepFor(absl::Milliseconds(1));
  }
  ASSERT_EQ(journal.durable_position(), total);
  int ran = 0;
  while (absl::Now() < deadline) {
    ran = 0;
    for (const auto& count : runs) ran += count.load();
    if (ran == registered.load()) break;
    absl::SleepFor(absl::Milliseconds(1));
  }
  EXPECT_EQ(ran, registered.load());
  for (uint64_t position = 1; position <= total; ++position) {
    ASSERT_LE(runs[position].load(), 1) << "a callback ran twice, position " << position;
  }
  EXPECT_EQ(early.load(), 0) << "callbacks ran before their entry was durable";
  EXPECT_EQ(inside_call.load(), 0) << "WhenDurable ran a callback inside the call";
  const JournalStats stats = journal.Stats();
  EXPECT_EQ(stats.entries, total);
  EXPECT_GE(stats.batches, 1u);
  EXPECT_LE(stats.batches, total);
  if (sync()) {
    EXPECT_GE(stats.syncs, 1u);
  } else {
    EXPECT_EQ(stats.syncs, 0u);
  }

  EXPECT_EQ(Reopen().size(), total);
}

TEST_P(RocksDbJournalTest, NothingIsDurableBeforeItsSyncAndNoCallerWaitsForIt) {
  if (!sync()) GTEST_SKIP() << "without sync a write is durable at once";
  Journal& journal = Open();
  const uint64_t first = Put(journal, "before");
  absl::Notification first_durable;
  journal.WhenDurable(first, [&] { first_durable.Notify(); });
  ASSERT_TRUE(first_durable.WaitForNotificationWithTimeout(absl::Seconds(10)));

  fs_->Hold();
  const uint64_t held = Put(journal, "held");
  absl::Notification durable;
  absl::Notification returned;
  std::thread caller([&] {
    journal.WhenDurable(held, [&] { durable.Notify(); });
    returned.Notify();
  });
  EXPECT_TRUE(returned.WaitForNotificationWithTimeout(absl::Seconds(10)))
      << "the caller waited for the sync";
  for (int i = 0; i < 500 && fs_->waiting() == 0; ++i) absl::SleepFor(absl::Milliseconds(2));
  ASSERT_GT(fs_->waiting(), 0) << "the journal never reached its sync";
  EXPECT_FALSE(durable.WaitForNotificationWithTimeout(absl::Milliseconds(200)));
  EXPECT_LT(journal.durable_position(), held);

  // A caller that writes its own entries writes them, and does not wait
  // for their sync either.
  uint64_t written = 0;
  absl::Notification written_durable;
  absl::Notification written_returned;
  std::thread writer([&] {
    CallerWritesScope scope;
    written = Put(journal, "written-by-caller");
    EXPECT_FALSE(journal.WriteNow());
    journal.WhenDurable(written, [&] { written_durable.Notify(); });
    written_returned.Notify();
  });
  EXPECT_TRUE(written_returned.WaitForNotificationWithTimeout(absl::Seconds(10)))
      << "a caller waited for the sync";
  EXPECT_FALSE(written_durable.WaitForNotificationWithTimeout(absl::Milliseconds(200)));
  EXPECT_LT(journal.durable_position(), held);

  fs_->Release();
  EXPECT_TRUE(durable.WaitForNotificationWithTimeout(absl::Seconds(10)));
  EXPECT_TRUE(written_durable.WaitForNotificationWithTimeout(absl::Seconds(10)));
  EXPECT_GE(journal.durable_position(), written);
  caller.join();
  writer.join();
  EXPECT_EQ(Reopen().size(), 3u);
}

// With `caller_writes`, the caller appends in a CallerWritesScope and calls
// WriteNow after each entry (a serving thread's burst of one).
void RocksDbJournalTest::ExpectAWriteStallNeverBlocksTheCaller(bool caller_writes) {
  // Two 64 KiB memtables and a flush that cannot start: once both are
  // full, RocksDB stops writes.
  Journal& journal = Open(64 << 10);
  fs_->HoldTableFiles();
  std::atomic<int> appended{0};
  std::atomic<int> durable{0};
  absl::Notification all_returned;
  std::thread caller([&] {
    std::optional<CallerWritesScope> scope;
    if (caller_writes) scope.emplace();
    auto append = [&] {
      const uint64_t position = Put(journal, absl::StrCat("big/", appended.load()), 1024);
      journal.WhenDurable(position, [&] { durable.fetch_add(1); });
      appended.fetch_add(1);
      if (caller_writes) journal.WriteNow();
    };
    // In small batches until the first memtable is full and its flush held.
    for (int i = 0; i < 5000 && fs_->tables_waiting() == 0; ++i) {
      append();
      if (i % 8 == 7) absl::SleepFor(absl::Milliseconds(1));
    }
    // Then past the second memtable: the writes stop, the callers must not.
    for (int i = 0; i < 200; ++i) {
      append();
      if (i % 8 == 7) absl::SleepFor(absl::Milliseconds(1));
    }
    all_returned.Notify();
  });
  const bool returned = all_returned.WaitForNotificationWithTimeout(absl::Seconds(30));
  EXPECT_TRUE(returned) << "a caller blocked on the write stall";
  EXPECT_GT(fs_->tables_waiting(), 0) << "no flush was held: the test proves nothing";
  absl::SleepFor(absl::Milliseconds(200));
  EXPECT_LT(durable.load(), appended.load()) << "every entry was written despite the stall";

  fs_->ReleaseTableFiles();
  caller.join();
  const absl::Time deadline = absl::Now() + absl::Seconds(30);
  while (durable.load() < appended.load() && absl::Now() < deadline) {
    absl::SleepFor(absl::Milliseconds(2));
  }
  EXPECT_EQ(durable.load(), appended.load());
  EXPECT_EQ(Reopen().size(), static_cast<size_t>(appended.load()));
}

TEST_P(RocksDbJournalTest, AWriteStallNeverBlocksTheCaller) {
  ExpectAWriteStallNeverBlocksTheCaller(false);
}

TEST_P(RocksDbJournalTest, AWriteStallNeverBlocksACallerThatWrites) {
  ExpectAWriteStallNeverBlocksTheCaller(true);
}

TEST_P(RocksDbJournalTest, ACallerWritesWhatItAppendsInItsScope) {
  Journal& journal = Open();
  CallerWritesScope scope;
  std::thread::id ran_on;
  uint64_t last = 0;
  for (int i = 0; i < 10; ++i) last = Put(journal, absl::StrCat("burst/", i));
  absl::Notification ran;
  journal.WhenDurable(last, [&] {
    ran_on = std::this_thread::get_id();
    ran.Notify();
  });
  if (!sync()) {
    // Left for this thread: the writer threads are not woken for them.
    absl::SleepFor(absl::Milliseconds(200));
    EXPECT_LT(journal.durable_position(), last);
    EXPECT_FALSE(ran.HasBeenNotified());
    EXPECT_TRUE(journal.WriteNow());
    EXPECT_GE(journal.durable_position(), last);
    ASSERT_TRUE(ran.HasBeenNotified()) << "WriteNow did not run the callback it made due";
    EXPECT_EQ(ran_on, std::this_thread::get_id());
    EXPECT_EQ(journal.Stats().batches, 1u) << "the burst was not one batch";
  } else {
    // The caller writes the burst; the sync is the writer threads'.
    EXPECT_FALSE(journal.WriteNow());
    ASSERT_TRUE(ran.WaitForNotificationWithTimeout(absl::Seconds(10)));
    EXPECT_NE(ran_on, std::this_thread::get_id());
    EXPECT_EQ(journal.Stats().batches, 1u) << "the burst was not one batch";
    EXPECT_GE(journal.Stats().syncs, 1u);
  }
  EXPECT_TRUE(journal.WriteNow()) << "everything is durable now";
  EXPECT_EQ(Reopen().size(), 10u);
}

TEST_P(RocksDbJournalTest, ACallerThatAlsoSyncsMakesItsBurstDurableItself) {
  Journal& journal = Open();
  CallerWritesScope scope(/*also_sync=*/true);
  uint64_t last = 0;
  for (int i = 0; i < 10; ++i) last = Put(journal, absl::StrCat("burst/", i));
  std::thread::id ran_on;
  absl::Notification ran;
  journal.WhenDurable(last, [&] {
    ran_on = std::this_thread::get_id();
    ran.Notify();
  });
  EXPECT_TRUE(journal.WriteNow()) << "the burst is not durable when WriteNow returns";
  EXPECT_GE(journal.durable_position(), last);
  EXPECT_TRUE(ran.HasBeenNotified()) << "WriteNow did not run the callback it made due";
  // Before `ran` goes out of scope, whoever runs it.
  ASSERT_TRUE(ran.WaitForNotificationWithTimeout(absl::Seconds(10)));
  EXPECT_EQ(ran_on, std::this_thread::get_id());
  const JournalStats stats = journal.Stats();
  EXPECT_EQ(stats.batches, 1u) << "the burst was not one batch";
  // The caller's own sync, and no writer thread's.
  EXPECT_EQ(stats.syncs, sync() ? 1u : 0u);
  EXPECT_EQ(Reopen().size(), 10u);
}

// Runs `body` on a thread in a scope that also syncs; false if it has not
// returned within `timeout` (the thread is then joined when it does).
class SyncingCaller {
 public:
  explicit SyncingCaller(std::function<void()> body)
      : thread_([this, body = std::move(body)] {
          CallerWritesScope scope(/*also_sync=*/true);
          body();
          returned_.Notify();
        }) {}
  ~SyncingCaller() { thread_.join(); }
  bool Returned(absl::Duration timeout) {
    return returned_.WaitForNotificationWithTimeout(timeout);
  }
  std::thread::id id() const { return thread_.get_id(); }

 private:
  absl::Notification returned_;
  std::thread thread_;
};

TEST_P(RocksDbJournalTest, ACallerThatAlsoSyncsNeverWaitsForAnotherThreadsSync) {
  if (!sync()) GTEST_SKIP() << "without sync there is nothing to sync";
  Journal& journal = Open();
  fs_->Hold();
  bool first_durable = false;
  SyncingCaller first([&] {
    Put(journal, "first");
    first_durable = journal.WriteNow();
  });
  for (int i = 0; i < 500 && fs_->waiting() == 0; ++i) absl::SleepFor(absl::Milliseconds(2));
  ASSERT_GT(fs_->waiting(), 0) << "the first caller never reached its sync";
  EXPECT_FALSE(first.Returned(absl::Milliseconds(100))) << "it returned before its sync";

  // Written during that sync: the second caller neither waits nor syncs.
  uint64_t second = 0;
  absl::Notification second_durable;
  bool second_durable_on_return = true;
  SyncingCaller second_caller([&] {
    second = Put(journal, "second");
    journal.WhenDurable(second, [&] { second_durable.Notify(); });
    second_durable_on_return = journal.WriteNow();
  });
  EXPECT_TRUE(second_caller.Returned(absl::Seconds(10))) << "a caller waited for another's sync";
  EXPECT_FALSE(second_durable_on_return);
  EXPECT_FALSE(second_durable.WaitForNotificationWithTimeout(absl::Milliseconds(200)));
  EXPECT_LT(journal.durable_position(), second);

  // Nothing is left behind: a later sync covers it.
  fs_->Release();
  EXPECT_TRUE(first.Returned(absl::Seconds(10)));
  EXPECT_TRUE(second_durable.WaitForNotificationWithTimeout(absl::Seconds(10)));
  EXPECT_TRUE(first_durable);
  EXPECT_EQ(Reopen().size(), 2u);
}

TEST_P(RocksDbJournalTest, AfterASlowSyncCallersLeaveTheirSyncsToTheWriterThreads) {
  if (!sync()) GTEST_SKIP() << "without sync there is nothing to sync";
  // Slow: the 50 ms sync below; fast: any sync of this machine's disk.
  Journal& journal = Open(kRocksDbMemtableBytes, absl::Milliseconds(20));
  {
    // A sync that takes 50 ms: a slow disk.
    fs_->Hold();
    SyncingCaller slow([&] {
      Put(journal, "slow");
      journal.WriteNow();
    });
    for (int i = 0; i < 500 && fs_->waiting() == 0; ++i) absl::SleepFor(absl::Milliseconds(2));
    ASSERT_GT(fs_->waiting(), 0) << "the caller never reached its sync";
    absl::SleepFor(absl::Milliseconds(50));
    fs_->Release();
  }

  // The next caller writes, but the sync is a writer thread's: held here,
  // it holds neither the caller nor anything it wrote.
  fs_->Hold();
  uint64_t next = 0;
  std::thread::id ran_on;
  absl::Notification ran;
  SyncingCaller caller([&] {
    next = Put(journal, "next");
    journal.WhenDurable(next, [&] {
      ran_on = std::this_thread::get_id();
      ran.Notify();
    });
    EXPECT_FALSE(journal.WriteNow());
  });
  EXPECT_TRUE(caller.Returned(absl::Seconds(10))) << "the caller synced after a slow sync";
  for (int i = 0; i < 500 && fs_->waiting() == 0; ++i) absl::SleepFor(absl::Milliseconds(2));
  EXPECT_GT(fs_->waiting(), 0) << "no writer thread synced the caller's entry";
  EXPECT_FALSE(ran.HasBeenNotified());
  fs_->Release();
  ASSERT_TRUE(ran.WaitForNotificationWithTimeout(absl::Seconds(10)));
  EXPECT_NE(ran_on, caller.id());

  // Once syncs are fast again, callers sync their own writes again.
  bool synced_itself = false;
  for (int attempt = 0; attempt < 100 && !synced_itself; ++attempt) {
    SyncingCaller again([&] {
      Put(journal, absl::StrCat("again/", attempt));
      synced_itself = journal.WriteNow();
    });
    ASSERT_TRUE(again.Returned(absl::Seconds(10)));
    if (!synced_itself) absl::SleepFor(absl::Milliseconds(10));
  }
  EXPECT_TRUE(synced_itself) << "callers never synced again once syncs were fast";
}

TEST_P(RocksDbJournalTest, AnEntryNobodyWaitsForIsWrittenToo) {
  Journal& journal = Open();
  // An idle journal, then one just written: no WhenDurable call wakes it.
  for (int round = 0; round < 3; ++round) {
    const uint64_t position = Put(journal, absl::StrCat("lease-expiry/", round));
    const absl::Time deadline = absl::Now() + absl::Seconds(5);
    while (journal.durable_position() < position && absl::Now() < deadline) {
      absl::SleepFor(absl::Milliseconds(1));
    }
    EXPECT_GE(journal.durable_position(), position) << "round " << round;
  }
}

TEST_P(RocksDbJournalTest, ClosingWritesAndRunsEverythingPending) {
  Journal& journal = Open();
  std::atomic<int> ran{0};
  for (int i = 0; i < 100; ++i) {
    const uint64_t position = Put(journal, absl::StrCat("k/", i));
    journal.WhenDurable(position, [&] { ran.fetch_add(1); });
  }
  journal_.reset();
  EXPECT_EQ(ran.load(), 100);
  EXPECT_EQ(Reopen().size(), 100u);
}

// The server's metrics (the observer's owner) go before its journal: the
// batches still being written report to the observer they started with.
TEST_P(RocksDbJournalTest, AnObserverOutlivesItsOwnerUntilTheLastBatchIsReported) {
  struct CountingObserver final : JournalObserver {
    explicit CountingObserver(std::shared_ptr<std::atomic<uint64_t>> entries)
        : entries(std::move(entries)) {}
    void OnBatchDurable(absl::Duration, uint64_t batch_entries, uint64_t) override {
      entries->fetch_add(batch_entries);
    }
    std::shared_ptr<std::atomic<uint64_t>> entries;
  };
  auto reported = std::make_shared<std::atomic<uint64_t>>(0);
  auto observer = std::make_shared<CountingObserver>(reported);
  const std::weak_ptr<CountingObserver> watched = observer;
  Journal& journal = Open();
  journal.SetObserver(observer);
  observer.reset();
  for (int i = 0; i < 100; ++i) Put(journal, absl::StrCat("k/", i));
  EXPECT_FALSE(watched.expired());
  journal_.reset();
  EXPECT_EQ(reported->load(), 100u);
  EXPECT_TRUE(watched.expired()) << "the journal let go of it when it closed";
}

}  // namespace
}  // namespace callsession
