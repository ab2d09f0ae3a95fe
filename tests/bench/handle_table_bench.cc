// Microbenchmarks of the handle table (issue: performance), against
//   GlobalMutexTable  the same map behind one process-wide mutex (baseline),
//   flat_hash_map     one unlocked absl::flat_hash_map (the limit; 1 thread).
// Workloads: lookup, insert, erase, and mixed (90% lookup, 5% insert, 5%
// erase), at 1e3, 1e5 and 1e6 live entries, 1 and 2 threads. Every table
// holds the same 8-byte value under 64-bit handles.
//
//   handle_table_bench --benchmark_repetitions=5 --benchmark_report_aggregates_only=true
// (.ci/bench runs it, in a Release build.)
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <optional>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/synchronization/mutex.h"
#include "benchmark/benchmark.h"
#include "server/core/handle_table.h"

namespace callsession {
namespace {

// The baseline: one map, one mutex, handles from one counter.
class GlobalMutexTable {
 public:
  uint64_t Insert(uint64_t value) {
    absl::MutexLock lock(&mu_);
    const uint64_t handle = next_++;
    map_.emplace(handle, value);
    return handle;
  }
  std::optional<uint64_t> Find(uint64_t handle) const {
    absl::ReaderMutexLock lock(&mu_);
    auto it = map_.find(handle);
    if (it == map_.end()) return std::nullopt;
    return it->second;
  }
  std::optional<uint64_t> Erase(uint64_t handle) {
    absl::MutexLock lock(&mu_);
    auto it = map_.find(handle);
    if (it == map_.end()) return std::nullopt;
    const uint64_t value = it->second;
    map_.erase(it);
    return value;
  }

 private:
  mutable absl::Mutex mu_;
  uint64_t next_ ABSL_GUARDED_BY(mu_) = 1;
  absl::flat_hash_map<uint64_t, uint64_t> map_ ABSL_GUARDED_BY(mu_);
};

class ShardedTable {
 public:
  uint64_t Insert(uint64_t value) {
    return table_.Insert([value](uint64_t) { return value; });
  }
  std::optional<uint64_t> Find(uint64_t handle) const { return table_.Find(handle); }
  std::optional<uint64_t> Erase(uint64_t handle) { return table_.Erase(handle); }

 private:
  ShardedHandleTable<uint64_t> table_{64};
};

// Single-threaded only.
class PlainMap {
 public:
  uint64_t Insert(uint64_t value) {
    const uint64_t handle = next_++;
    map_.emplace(handle, value);
    return handle;
  }
  std::optional<uint64_t> Find(uint64_t handle) const {
    auto it = map_.find(handle);
    if (it == map_.end()) return std::nullopt;
    return it->second;
  }
  std::optional<uint64_t> Erase(uint64_t handle) {
    auto it = map_.find(handle);
    if (it == map_.end()) return std::nullopt;
    const uint64_t value = it->second;
    map_.erase(it);
    return value;
  }

 private:
  uint64_t next_ = 1;
  absl::flat_hash_map<uint64_t, uint64_t> map_;
};

// A table filled with `live` entries, shared by the benchmark's threads.
template <typename Table>
struct Filled {
  std::unique_ptr<Table> table;
  std::vector<uint64_t> handles;
};

template <typename Table>
Filled<Table>& Shared() {
  static Filled<Table> filled;
  return filled;
}

template <typename Table>
void Fill(benchmark::State& state) {
  if (state.thread_index() != 0) return;
  Filled<Table>& f = Shared<Table>();
  f.table = std::make_unique<Table>();
  f.handles.clear();
  const auto live = static_cast<size_t>(state.range(0));
  f.handles.reserve(live);
  for (size_t i = 0; i < live; ++i) f.handles.push_back(f.table->Insert(i));
}

// Thread 0 drops the table after the loop's closing barrier; no thread may
// touch it after its own loop (leftover entries go with the table).
template <typename Table>
void Release(benchmark::State& state) {
  if (state.thread_index() != 0) return;
  Shared<Table>().table.reset();
  Shared<Table>().handles = {};
}

// A cheap per-thread generator (xorshift): the benchmark measures the table.
struct Random {
  explicit Random(uint64_t seed) : x(seed * 0x9e3779b97f4a7c15ull | 1) {}
  uint64_t Next() {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    return x;
  }
  uint64_t x;
};

// Lookups of the first `working_set` live handles (all of them if 0).
template <typename Table>
void LookupLoop(benchmark::State& state, size_t working_set, uint64_t seed) {
  Fill<Table>(state);
  Filled<Table>& f = Shared<Table>();
  Random random(state.thread_index() + seed);
  // Read after the loop's start barrier: until then thread 0 may still be
  // filling the table.
  size_t span = 0;
  for (auto _ : state) {
    if (span == 0) {
      span = working_set == 0 ? f.handles.size() : std::min(working_set, f.handles.size());
    }
    benchmark::DoNotOptimize(f.table->Find(f.handles[random.Next() % span]));
  }
  state.SetItemsProcessed(state.iterations());
  Release<Table>(state);
}

// Uniformly random lookups over every live handle.
template <typename Table>
void BM_Lookup(benchmark::State& state) {
  LookupLoop<Table>(state, 0, 1);
}

// Lookups of 1000 handles only, however many are live: with the working set
// in cache, this isolates the table's own cost from memory latency (which a
// uniformly random lookup over 1e6 entries mostly measures).
template <typename Table>
void BM_LookupHot(benchmark::State& state) {
  LookupLoop<Table>(state, 1000, 3);
}

// Inserts in batches of 1000; the batch is erased (untimed) to keep the
// table at its size.
template <typename Table>
void BM_Insert(benchmark::State& state) {
  Fill<Table>(state);
  Filled<Table>& f = Shared<Table>();
  std::vector<uint64_t> batch;
  batch.reserve(1000);
  for (auto _ : state) {
    batch.push_back(f.table->Insert(1));
    if (batch.size() == 1000) {
      state.PauseTiming();
      for (uint64_t h : batch) f.table->Erase(h);
      batch.clear();
      state.ResumeTiming();
    }
  }
  state.SetItemsProcessed(state.iterations());
  Release<Table>(state);
}

// Erases in batches of 1000 inserted (untimed) just before.
template <typename Table>
void BM_Erase(benchmark::State& state) {
  Fill<Table>(state);
  Filled<Table>& f = Shared<Table>();
  std::vector<uint64_t> batch;
  size_t next = 0;
  for (auto _ : state) {
    if (next == batch.size()) {
      state.PauseTiming();
      batch.clear();
      for (int i = 0; i < 1000; ++i) batch.push_back(f.table->Insert(1));
      next = 0;
      state.ResumeTiming();
    }
    benchmark::DoNotOptimize(f.table->Erase(batch[next++]));
  }
  state.SetItemsProcessed(state.iterations());
  Release<Table>(state);
}

// 90% lookups of the shared live set; 5% inserts and 5% erases of this
// thread's own recent entries, so the size stays put.
template <typename Table>
void BM_Mixed(benchmark::State& state) {
  Fill<Table>(state);
  Filled<Table>& f = Shared<Table>();
  Random random(state.thread_index() + 7);
  std::vector<uint64_t> own;
  own.reserve(1024);
  for (auto _ : state) {
    const uint64_t dice = random.Next() % 100;
    if (dice < 90) {
      benchmark::DoNotOptimize(f.table->Find(f.handles[random.Next() % f.handles.size()]));
    } else if (dice < 95 || own.empty()) {
      own.push_back(f.table->Insert(dice));
    } else {
      benchmark::DoNotOptimize(f.table->Erase(own.back()));
      own.pop_back();
    }
  }
  state.SetItemsProcessed(state.iterations());
  Release<Table>(state);
}

void Sizes(benchmark::internal::Benchmark* b) {
  for (int64_t live : {1000, 100000, 1000000}) b->Arg(live);
  b->ArgName("live");
  b->UseRealTime();
}

#define CALLSESSION_TABLE_BENCH(workload)                                               \
  BENCHMARK_TEMPLATE(workload, ShardedTable)->Apply(Sizes)->Threads(1)->Threads(2);     \
  BENCHMARK_TEMPLATE(workload, GlobalMutexTable)->Apply(Sizes)->Threads(1)->Threads(2); \
  BENCHMARK_TEMPLATE(workload, PlainMap)->Apply(Sizes)->Threads(1)

CALLSESSION_TABLE_BENCH(BM_Lookup);
CALLSESSION_TABLE_BENCH(BM_LookupHot);
CALLSESSION_TABLE_BENCH(BM_Insert);
CALLSESSION_TABLE_BENCH(BM_Erase);
CALLSESSION_TABLE_BENCH(BM_Mixed);

}  // namespace
}  // namespace callsession

int main(int argc, char** argv) {
  // Debian's Abseil is a debug build: without this every lock would go
  // through the deadlock detector's global graph (see server/main.cc).
  absl::SetMutexDeadlockDetectionMode(absl::OnDeadlockCycle::kIgnore);
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
