#include "server/core/handle_table.h"

#include <atomic>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/container/flat_hash_set.h"
#include "absl/random/random.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace callsession {
namespace {

using ::testing::Optional;

TEST(ShardedHandleTableTest, InsertFindErase) {
  ShardedHandleTable<std::string> table(8);
  const uint64_t a = table.Insert([](uint64_t) { return std::string("a"); });
  const uint64_t b = table.Insert([](uint64_t) { return std::string("b"); });
  EXPECT_NE(a, b);
  EXPECT_THAT(table.Find(a), Optional(std::string("a")));
  EXPECT_THAT(table.Find(b), Optional(std::string("b")));
  EXPECT_EQ(table.size(), 2u);

  EXPECT_THAT(table.Erase(a), Optional(std::string("a")));
  EXPECT_EQ(table.Find(a), std::nullopt);
  EXPECT_EQ(table.Erase(a), std::nullopt) << "a second erase finds nothing";
  EXPECT_THAT(table.Find(b), Optional(std::string("b")));
  EXPECT_EQ(table.size(), 1u);
}

TEST(ShardedHandleTableTest, MakeSeesItsOwnHandle) {
  ShardedHandleTable<uint64_t> table(4);
  const uint64_t handle = table.Insert([](uint64_t h) { return h; });
  EXPECT_THAT(table.Find(handle), Optional(handle));
}

TEST(ShardedHandleTableTest, ZeroIsNeverAHandleAndNeverFound) {
  ShardedHandleTable<int> table(1);
  for (int i = 0; i < 1000; ++i) EXPECT_NE(table.Insert([i](uint64_t) { return i; }), 0u);
  EXPECT_EQ(table.Find(0), std::nullopt);
  EXPECT_EQ(table.Erase(0), std::nullopt);
}

TEST(ShardedHandleTableTest, HandlesAreNeverReissuedAfterErase) {
  ShardedHandleTable<int> table(4);
  absl::flat_hash_set<uint64_t> issued;
  std::vector<uint64_t> erased;
  for (int round = 0; round < 2000; ++round) {
    const uint64_t h = table.Insert([round](uint64_t) { return round; });
    ASSERT_TRUE(issued.insert(h).second) << "handle " << h << " issued twice";
    ASSERT_TRUE(table.Erase(h).has_value());
    erased.push_back(h);
  }
  // A stale handle never addresses a newer entry.
  for (int i = 0; i < 100; ++i) table.Insert([](uint64_t) { return -1; });
  for (uint64_t h : erased) ASSERT_EQ(table.Find(h), std::nullopt);
}

TEST(ShardedHandleTableTest, ShardComesFromTheHandleAndInsertsSpread) {
  ShardedHandleTable<int> table(16);
  EXPECT_EQ(table.shard_count(), 16);
  std::vector<int> per_shard(16, 0);
  for (int i = 0; i < 1600; ++i) {
    const uint64_t h = table.Insert([i](uint64_t) { return i; });
    EXPECT_EQ(table.ShardIndexOf(h), static_cast<int>(h & 15));
    ++per_shard[table.ShardIndexOf(h)];
  }
  for (int count : per_shard) EXPECT_EQ(count, 100) << "one thread walks the shards evenly";
}

TEST(ShardedHandleTableTest, ValidShardCounts) {
  EXPECT_TRUE(ShardedHandleTable<int>::IsValidShardCount(1));
  EXPECT_TRUE(ShardedHandleTable<int>::IsValidShardCount(64));
  EXPECT_FALSE(ShardedHandleTable<int>::IsValidShardCount(0));
  EXPECT_FALSE(ShardedHandleTable<int>::IsValidShardCount(48));
  EXPECT_FALSE(ShardedHandleTable<int>::IsValidShardCount(1 << 17));
}

TEST(ShardedHandleTableTest, ErasedValuesAreReleased) {
  ShardedHandleTable<std::shared_ptr<int>> table(2);
  auto value = std::make_shared<int>(7);
  std::vector<uint64_t> handles;
  for (int i = 0; i < 1000; ++i) handles.push_back(table.Insert([&](uint64_t) { return value; }));
  EXPECT_EQ(value.use_count(), 1001);
  for (uint64_t h : handles) table.Erase(h);
  EXPECT_EQ(value.use_count(), 1) << "voiding a handle releases what it held";
  EXPECT_EQ(table.size(), 0u);
}

// Several threads insert, look up and erase at once, and race to erase a
// shared set of handles. Invariants: every handle is unique, a live handle
// always finds its own value, an erased one never finds anything, and each
// shared handle is erased by exactly one thread.
TEST(ShardedHandleTableTest, ConcurrentStressKeepsInvariants) {
  constexpr int kThreads = 4;
  constexpr int kOpsPerThread = 50000;
  ShardedHandleTable<uint64_t> table(8);

  std::vector<uint64_t> shared;
  for (int i = 0; i < 20000; ++i) shared.push_back(table.Insert([](uint64_t h) { return h; }));
  std::atomic<int> shared_erased{0};
  std::atomic<int> failures{0};
  std::vector<std::vector<uint64_t>> issued(kThreads);

  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      absl::BitGen random;
      std::vector<uint64_t> live;
      for (int op = 0; op < kOpsPerThread; ++op) {
        const int dice = absl::Uniform(random, 0, 100);
        if (dice < 40 || live.empty()) {
          const uint64_t h = table.Insert([](uint64_t h) { return h; });
          live.push_back(h);
          issued[t].push_back(h);
        } else if (dice < 80) {
          const uint64_t h = live[absl::Uniform<size_t>(random, 0, live.size())];
          if (table.Find(h) != std::optional<uint64_t>(h)) ++failures;
        } else if (dice < 90) {
          const size_t i = absl::Uniform<size_t>(random, 0, live.size());
          const uint64_t h = live[i];
          live[i] = live.back();
          live.pop_back();
          if (table.Erase(h) != std::optional<uint64_t>(h)) ++failures;
          if (table.Find(h).has_value()) ++failures;
        } else {
          const uint64_t h = shared[absl::Uniform<size_t>(random, 0, shared.size())];
          if (std::optional<uint64_t> v = table.Erase(h)) {
            if (*v != h) ++failures;
            ++shared_erased;
          }
        }
      }
      for (uint64_t h : live) {
        if (table.Erase(h) != std::optional<uint64_t>(h)) ++failures;
      }
    });
  }
  for (std::thread& thread : threads) thread.join();

  EXPECT_EQ(failures.load(), 0);
  absl::flat_hash_set<uint64_t> all(shared.begin(), shared.end());
  for (const auto& handles : issued) {
    for (uint64_t h : handles) ASSERT_TRUE(all.insert(h).second) << "duplicate handle " << h;
  }
  int shared_left = 0;
  for (uint64_t h : shared) {
    if (table.Erase(h).has_value()) ++shared_left;
  }
  EXPECT_EQ(shared_erased.load() + shared_left, static_cast<int>(shared.size()))
      << "each shared handle erased exactly once";
  EXPECT_EQ(table.size(), 0u);
}

}  // namespace
}  // namespace callsession
