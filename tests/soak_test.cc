// Soak: many applications and the provider at once, through real gRPC on a
// loopback port, for --seconds. Applications place and receive calls, answer,
// drop and deallocate them, open and close lines, reconnect their event
// streams with resume, shut down and start over, or go quiet and let their
// lease expire; the provider offers calls, moves them through states and
// force-closes lines. Every RPC must succeed or fail with an error the
// concurrent changes explain; every application must see its events without
// a gap or a loss across reconnects. At the end, with every app gone and the
// provider's calls ended, the counters must balance, the store be empty and
// RSS be back near its level after warm-up. With --store=rocksdb the server
// journals every change to a store in a temporary directory, and at the end
// that store, reopened, must hold nothing either.
//
//   soak_test --seconds=60 [--store=rocksdb]        (ctest, CI)
//   soak_test --seconds=1800 --apps=16
#include <malloc.h>
#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/container/flat_hash_set.h"
#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/random/random.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "client/callsession_client.h"
#include "grpcpp/create_channel.h"
#include "server/core/log.h"
#include "server/server.h"
#include "server/storage/rocksdb/rocksdb_journal.h"
#include "tests/test_support.h"

ABSL_FLAG(int, seconds, 45, "how long the load runs");
ABSL_FLAG(int, apps, 6, "concurrent application workers");
ABSL_FLAG(std::string, store, "memory", "memory, or rocksdb (in a temporary directory)");

namespace callsession {
namespace {

constexpr char kProviderToken[] = "soak-provider";
constexpr uint32_t kDevices = 4;
constexpr absl::Duration kAppTtl = absl::Seconds(1);

std::atomic<uint64_t> operations{0};
std::atomic<uint64_t> unexpected_errors{0};
std::atomic<uint64_t> events_checked{0};
std::atomic<uint64_t> sequence_breaks{0};
std::atomic<uint64_t> reconnects{0};
std::atomic<uint64_t> abandoned_apps{0};

// Counts the RPC; an error not in `allowed` is unexpected.
void Expect(const absl::Status& status, std::initializer_list<absl::string_view> allowed,
            absl::string_view what) {
  operations.fetch_add(1, std::memory_order_relaxed);
  if (status.ok()) return;
  const std::string reason = TapiReason(status);
  for (absl::string_view name : allowed) {
    if (reason == name) return;
  }
  if (unexpected_errors.fetch_add(1) < 20) {
    std::fprintf(stderr, "unexpected: %s: %s\n", std::string(what).c_str(),
                 status.ToString().c_str());
  }
}

size_t ResidentBytes() {
  std::ifstream statm("/proc/self/statm");
  size_t pages = 0, resident = 0;
  statm >> pages >> resident;
  return resident * static_cast<size_t>(sysconf(_SC_PAGESIZE));
}

// One application at a time per worker, replaced when it shuts down or is
// abandoned.
class Worker {
 public:
  Worker(std::shared_ptr<grpc::Channel> channel, absl::Time deadline, int id)
      : channel_(std::move(channel)), deadline_(deadline), id_(id) {}

  void Run() {
    while (absl::Now() < deadline_) {
      app_ = std::make_unique<CallSessionClient>(channel_);
      auto init = app_->Initialize(absl::StrCat("soak-", id_));
      Expect(init.status(), {}, "Initialize");
      if (!init.ok()) return;
      last_sequence_ = 0;
      lines_.clear();
      calls_.clear();
      stream_ = app_->WatchEvents();
      RunOneApp();
    }
  }

 private:
  void RunOneApp() {
    while (absl::Now() < deadline_) {
      DrainEvents(absl::ZeroDuration());
      const int dice = absl::Uniform(random_, 0, 1000);
      if (lines_.size() < 2 || dice < 20) {
        std::vector<v1::CallPrivilege> privileges;
        if (absl::Bernoulli(random_, 0.5)) privileges.push_back(v1::CALL_PRIVILEGE_OWNER);
        if (absl::Bernoulli(random_, 0.3)) privileges.push_back(v1::CALL_PRIVILEGE_MONITOR);
        auto line = app_->LineOpen(absl::Uniform<uint32_t>(random_, 0, kDevices), privileges);
        Expect(line.status(), {}, "LineOpen");
        if (line.ok()) lines_.push_back(*line);
      } else if (dice < 300) {
        const uint64_t line = Pick(lines_);
        const bool retry = absl::Bernoulli(random_, 0.2);
        const std::string request_id = retry ? absl::StrCat(id_, "-", ++requests_) : "";
        auto call = app_->MakeCall(line, "+15550100", request_id);
        Expect(call.status(), {"LINEERR_INVALLINEHANDLE"}, "MakeCall");
        if (call.ok()) calls_.insert(call->call_handle());
        if (call.ok() && retry) {
          // A client retrying after a lost response gets the same call.
          auto again = app_->MakeCall(line, "+15550100", request_id);
          Expect(again.status(), {}, "MakeCall retry");
          if (again.ok() && again->call_handle() != call->call_handle()) {
            Expect(absl::InternalError("a retried request_id placed a second call"), {},
                   "MakeCall retry");
          }
        }
      } else if (dice < 450 && !calls_.empty()) {
        Expect(app_->Drop(Pick(calls_)),
               {"LINEERR_INVALCALLHANDLE", "LINEERR_INVALCALLSTATE", "LINEERR_NOTOWNER"}, "Drop");
      } else if (dice < 550 && !calls_.empty()) {
        Expect(app_->Answer(Pick(calls_)),
               {"LINEERR_INVALCALLHANDLE", "LINEERR_INVALCALLSTATE", "LINEERR_NOTOWNER"}, "Answer");
      } else if (dice < 700 && !calls_.empty()) {
        const uint64_t handle = Pick(calls_);
        const absl::Status status = app_->DeallocateCall(handle);
        Expect(status, {"LINEERR_INVALCALLHANDLE", "LINEERR_INVALCALLSTATE"}, "DeallocateCall");
        if (status.ok() || absl::IsNotFound(status)) calls_.erase(handle);
      } else if (dice < 850 && !calls_.empty()) {
        Expect(app_->GetCallInfo(Pick(calls_)).status(), {"LINEERR_INVALCALLHANDLE"},
               "GetCallInfo");
      } else if (dice < 900) {
        auto view = app_->ListAllCalls();
        Expect(view.status(), {}, "ListCalls");
      } else if (dice < 940) {
        const size_t k = absl::Uniform<size_t>(random_, 0, lines_.size());
        Expect(app_->LineClose(lines_[k]), {"LINEERR_INVALLINEHANDLE"}, "LineClose");
        lines_.erase(lines_.begin() + k);
      } else if (dice < 975) {
        Reconnect();
      } else if (dice < 990) {
        DrainEvents(absl::Milliseconds(50));
        stream_.reset();
        Expect(app_->Shutdown(), {}, "Shutdown");
        return;
      } else {
        // Goes quiet: no stream, no RPC. The lease must reclaim it.
        stream_.reset();
        abandoned_apps.fetch_add(1);
        return;
      }
    }
    DrainEvents(absl::Milliseconds(50));
    stream_.reset();
    Expect(app_->Shutdown(), {}, "Shutdown at the end");
  }

  // Takes the events the stream has received; checks each sequence follows
  // the last one seen, across reconnects, and that none was lost.
  void DrainEvents(absl::Duration wait) {
    for (;;) {
      absl::StatusOr<v1::Event> event = stream_->Next(wait);
      if (!event.ok()) return;
      events_checked.fetch_add(1, std::memory_order_relaxed);
      if (event->has_events_lost() || event->sequence() != last_sequence_ + 1) {
        if (sequence_breaks.fetch_add(1) < 20) {
          std::fprintf(stderr, "event stream broke: after %llu got %s\n",
                       static_cast<unsigned long long>(last_sequence_),
                       event->ShortDebugString().c_str());
        }
      }
      if (event->sequence() != 0) last_sequence_ = event->sequence();
      if (event->has_app_new_call()) calls_.insert(event->app_new_call().call_handle());
    }
  }

  // Drops the stream as a broken connection would (whatever it had not
  // read yet is gone) and resumes after the last sequence seen.
  void Reconnect() {
    stream_.reset();
    stream_ = app_->WatchEvents(last_sequence_ + 1);
    reconnects.fetch_add(1, std::memory_order_relaxed);
  }

  template <typename Container>
  uint64_t Pick(const Container& from) {
    auto it = from.begin();
    std::advance(it, absl::Uniform<size_t>(random_, 0, from.size()));
    return *it;
  }

  const std::shared_ptr<grpc::Channel> channel_;
  const absl::Time deadline_;
  const int id_;
  absl::BitGen random_;
  std::unique_ptr<CallSessionClient> app_;
  std::unique_ptr<EventStream> stream_;
  uint64_t last_sequence_ = 0;
  uint64_t requests_ = 0;
  std::vector<uint64_t> lines_;
  absl::flat_hash_set<uint64_t> calls_;
};

void RunProvider(ProviderClient& provider, absl::Time deadline, std::vector<uint64_t>* offered) {
  absl::BitGen random;
  while (absl::Now() < deadline) {
    const int dice = absl::Uniform(random, 0, 1000);
    const uint32_t device = absl::Uniform<uint32_t>(random, 0, kDevices);
    if (dice < 400 || offered->empty()) {
      auto call = provider.OfferCall(device, "+15550111", "+15550199");
      Expect(call.status(), {}, "OfferCall");
      if (call.ok()) offered->push_back(*call);
    } else if (dice < 995) {
      static constexpr v1::CallState kStates[] = {v1::CALL_STATE_ACCEPTED, v1::CALL_STATE_CONNECTED,
                                                  v1::CALL_STATE_IDLE};
      const size_t k = absl::Uniform<size_t>(random, 0, offered->size());
      const absl::Status status =
          provider.SetCallState((*offered)[k], kStates[absl::Uniform<size_t>(random, 0, 3)]);
      Expect(status, {"LINEERR_INVALCALLHANDLE", "LINEERR_INVALCALLSTATE"}, "SetCallState");
      if (absl::IsNotFound(status)) {
        (*offered)[k] = offered->back();
        offered->pop_back();
      }
    } else {
      Expect(provider.ForceLineClose(device), {}, "ForceLineClose");
    }
    absl::SleepFor(absl::Microseconds(200));
  }
}

ServerOptions SoakOptions(const std::string& data_dir) {
  ServerOptions options;
  options.listen_address = "127.0.0.1:0";
  options.core.num_devices = kDevices;
  options.core.provider_token = kProviderToken;
  options.core.app_ttl = kAppTtl;
  if (!data_dir.empty()) {
    RocksDbJournalOptions journal;
    journal.data_dir = data_dir;
    options.open_journal = [journal] { return OpenRocksDbJournal(journal); };
  }
  return options;
}

size_t DirectoryBytes(const std::string& dir) {
  size_t bytes = 0;
  std::error_code error;
  for (const auto& entry : std::filesystem::recursive_directory_iterator(dir, error)) {
    if (entry.is_regular_file(error)) bytes += entry.file_size(error);
  }
  return bytes;
}

int Run() {
  const absl::Duration duration = absl::Seconds(absl::GetFlag(FLAGS_seconds));
  SetLogLevel(LogLevel::kWarning);
  const std::string store = absl::GetFlag(FLAGS_store);
  if (store != "memory" && store != "rocksdb") {
    std::fprintf(stderr, "--store must be memory or rocksdb\n");
    return 1;
  }
  const std::string temp_dir = store == "rocksdb" ? MakeTempDir("callsession-soak") : "";
  const std::string data_dir = temp_dir.empty() ? "" : temp_dir + "/data";
  auto server = CallSessionServer::Start(SoakOptions(data_dir));
  if (!server.ok()) {
    std::fprintf(stderr, "server: %s\n", server.status().ToString().c_str());
    return 1;
  }
  auto channel = grpc::CreateChannel((*server)->address(), grpc::InsecureChannelCredentials());
  ProviderClient provider(channel, kProviderToken);

  const absl::Time start = absl::Now();
  const absl::Time deadline = start + duration;
  std::vector<std::unique_ptr<Worker>> workers;
  std::vector<std::thread> threads;
  for (int i = 0; i < absl::GetFlag(FLAGS_apps); ++i) {
    workers.push_back(std::make_unique<Worker>(channel, deadline, i));
    threads.emplace_back([worker = workers.back().get()] { worker->Run(); });
  }
  std::vector<uint64_t> offered;
  std::thread provider_thread([&] { RunProvider(provider, deadline, &offered); });
  // RSS once the load is warm: every structure has grown to its working size.
  absl::SleepFor(duration / 5);
  malloc_trim(0);
  const size_t warm_rss = ResidentBytes();
  const CoreStats warm = (*server)->core().Stats();

  provider_thread.join();
  for (std::thread& thread : threads) thread.join();
  // Abandoned apps go when their lease runs out (checked every 250 ms).
  absl::SleepFor(kAppTtl + absl::Milliseconds(600));
  for (uint64_t call_id : offered) {
    Expect(provider.SetCallState(call_id, v1::CALL_STATE_IDLE),
           {"LINEERR_INVALCALLHANDLE", "LINEERR_INVALCALLSTATE"}, "ending offered calls");
  }
  malloc_trim(0);
  const size_t end_rss = ResidentBytes();
  const CoreStats stats = (*server)->core().Stats();
  (*server)->Shutdown(absl::Seconds(1));

  // Offered calls the provider moved to IDLE while unheld were freed; any
  // still live are held by nobody and not IDLE - impossible after the loop
  // above, so live calls must be 0.
  bool ok = true;
  auto check = [&ok](bool condition, const std::string& what) {
    if (!condition) {
      std::fprintf(stderr, "FAILED: %s\n", what.c_str());
      ok = false;
    }
  };
  check(unexpected_errors == 0, absl::StrCat(unexpected_errors.load(), " unexpected errors"));
  check(sequence_breaks == 0, absl::StrCat(sequence_breaks.load(), " lost or out-of-order events"));
  check(stats.events_lost == 0, absl::StrCat(stats.events_lost, " events evicted unread"));
  check(stats.live.apps == 0 && stats.live.lines == 0 && stats.live.call_handles == 0 &&
            stats.live.calls == 0,
        absl::StrCat("left behind: ", stats.live.apps, " apps, ", stats.live.lines, " lines, ",
                     stats.live.calls, " calls, ", stats.live.call_handles, " handles"));
  check(stats.call_handles_created == stats.call_handles_voided,
        absl::StrCat("handles created ", stats.call_handles_created, " != voided ",
                     stats.call_handles_voided));
  check(stats.calls_created == stats.calls_freed,
        absl::StrCat("calls created ", stats.calls_created, " != freed ", stats.calls_freed));
  check(stats.apps_expired >= abandoned_apps.load(),
        absl::StrCat(abandoned_apps.load(), " apps abandoned, ", stats.apps_expired, " expired"));
  // Back near the warm level: the load's peak state is gone. Slack for
  // allocator caches and gRPC's per-connection buffers, and RocksDB's
  // memtables (at most kMemtableBytes each, two of them).
  const size_t bound =
      warm_rss + warm_rss / 4 + (16u << 20) + (data_dir.empty() ? 0 : 2 * kRocksDbMemtableBytes);
  check(end_rss <= bound, absl::StrCat("RSS ", end_rss >> 20, " MiB after, bound ", bound >> 20,
                                       " MiB (warm ", warm_rss >> 20, " MiB)"));
  check(operations > 1000, "the soak did little work");
  size_t store_bytes = 0;
  if (!data_dir.empty()) {
    // What is on disk is what was in memory: nothing.
    server->reset();
    auto reopened = CallSessionServer::Start(SoakOptions(data_dir));
    if (!reopened.ok()) {
      check(false, absl::StrCat("reopening the store: ", reopened.status().ToString()));
    } else {
      const StoreCounts on_disk = (*reopened)->core().Stats().live;
      check(on_disk.apps == 0 && on_disk.lines == 0 && on_disk.calls == 0 &&
                on_disk.call_handles == 0,
            absl::StrCat("the reopened store holds ", on_disk.apps, " apps, ", on_disk.lines,
                         " lines, ", on_disk.calls, " calls, ", on_disk.call_handles, " handles"));
      (*reopened)->Shutdown(absl::ZeroDuration());
    }
    store_bytes = DirectoryBytes(data_dir);
    std::error_code ignored;
    std::filesystem::remove_all(temp_dir, ignored);
  }

  std::printf(
      "soak %s (%s store): %lld s, %d app workers; %llu operations, %llu calls, %llu call handles, "
      "%llu "
      "events checked across %llu reconnects, %llu apps abandoned and %llu expired by lease; "
      "unexpected errors %llu, lost events %llu, leaked handles %zu, leaked calls %zu; RSS warm "
      "%zu MiB (%zu live handles then), end %zu MiB; data directory %zu KiB at the end\n",
      ok ? "passed" : "FAILED", store.c_str(),
      static_cast<long long>(absl::ToInt64Seconds(duration)), absl::GetFlag(FLAGS_apps),
      static_cast<unsigned long long>(operations.load()),
      static_cast<unsigned long long>(stats.calls_created),
      static_cast<unsigned long long>(stats.call_handles_created),
      static_cast<unsigned long long>(events_checked.load()),
      static_cast<unsigned long long>(reconnects.load()),
      static_cast<unsigned long long>(abandoned_apps.load()),
      static_cast<unsigned long long>(stats.apps_expired),
      static_cast<unsigned long long>(unexpected_errors.load()),
      static_cast<unsigned long long>(sequence_breaks.load() + stats.events_lost),
      stats.live.call_handles, stats.live.calls, warm_rss >> 20, warm.live.call_handles,
      end_rss >> 20, store_bytes >> 10);
  return ok ? 0 : 1;
}

}  // namespace
}  // namespace callsession

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  return callsession::Run();
}
