// Durability (issue: nothing acknowledged is lost) through a real gRPC
// server on a loopback port with the real RocksDB store in a temporary
// directory: a restart recovers every application, line, call, handle,
// request id and event exactly; nothing is served while the store loads; no
// reply and no event leaves before its journal entry is synced (by the
// journal's threads, or by the serving thread that ran it); a failed
// sync ends the process; checkpoints taken under load restore; after a
// simulated power cut (each WAL file cut back to what its syncs covered, the
// last unsynced write torn) nothing acknowledged is missing.
// (Killing the real binary at random moments is crash_test.cc.)
#include <algorithm>
#include <atomic>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/notification.h"
#include "callsession/admin/v1/admin_service.grpc.pb.h"
#include "client/callsession_client.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "grpcpp/create_channel.h"
#include "grpcpp/security/credentials.h"
#include "rocksdb/env.h"
#include "server/server.h"
#include "server/storage/rocksdb/rocksdb_journal.h"
#include "tests/sync_fault_fs.h"
#include "tests/test_support.h"

namespace callsession {
namespace {

using grpc::health::v1::HealthCheckRequest;
using grpc::health::v1::HealthCheckResponse;

constexpr char kProviderToken[] = "provider-token-for-durability";
constexpr char kAdminToken[] = "admin-token-for-durability";
constexpr v1::CallPrivilege kOwner = v1::CALL_PRIVILEGE_OWNER;
constexpr v1::CallPrivilege kMonitor = v1::CALL_PRIVILEGE_MONITOR;

MATCHER_P(HasCode, code, "") {
  *result_listener << "status is " << StatusOf(arg);
  return StatusOf(arg).code() == code;
}

class DurabilityTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = MakeTempDir("callsession-durability");
    ASSERT_FALSE(dir_.empty());
    data_dir_ = dir_ + "/data";
  }
  void TearDown() override {
    clients_.clear();
    StopServer();
    std::error_code ignored;
    std::filesystem::remove_all(dir_, ignored);
  }

  ServerOptions Options(const std::string& data_dir, bool sync = true) {
    ServerOptions options;
    options.listen_address = "127.0.0.1:0";
    options.core.num_devices = 4;
    options.core.provider_token = kProviderToken;
    options.core.request_id_cache = 16;
    options.core.event_buffer = 64;
    options.admin_token = kAdminToken;
    RocksDbJournalOptions journal;
    journal.data_dir = data_dir;
    journal.sync = sync;
    journal.env = env_.get();
    // Which thread syncs is asserted: a slow sync on a loaded machine must
    // not hand serving threads' syncs to the journal threads.
    journal.caller_sync_max_duration = absl::Seconds(1);
    options.open_journal = [journal] { return OpenRocksDbJournal(journal); };
    return options;
  }

  void StartServer(ServerOptions options) {
    absl::StatusOr<std::unique_ptr<CallSessionServer>> server =
        CallSessionServer::Start(std::move(options));
    ASSERT_THAT(server, IsOk());
    server_ = *std::move(server);
    channel_ = grpc::CreateChannel(server_->address(), grpc::InsecureChannelCredentials());
    provider_ = std::make_unique<ProviderClient>(channel_, kProviderToken);
  }
  void StartServer() { StartServer(Options(data_dir_)); }

  void ExpectNoReplyAndNoEventLeavesBeforeItsSyncCompletes(int serving_threads);

  // A graceful stop: what a crash adds is crash_test's.
  void StopServer() {
    provider_.reset();
    if (server_ != nullptr) server_->Shutdown(absl::ZeroDuration());
    server_.reset();
    channel_.reset();
  }

  CallSessionClient& NewApp(const std::string& name) {
    clients_.push_back(std::make_unique<CallSessionClient>(channel_));
    EXPECT_THAT(clients_.back()->Initialize(name), IsOk());
    return *clients_.back();
  }

  // A client of the current server holding an earlier token.
  CallSessionClient& Reconnect(const std::string& token) {
    clients_.push_back(std::make_unique<CallSessionClient>(channel_));
    clients_.back()->set_token(token);
    return *clients_.back();
  }

  // Every event of the app from `from` on, until `count` have come.
  static std::vector<v1::Event> Events(CallSessionClient& app, uint64_t from, size_t count) {
    std::vector<v1::Event> events;
    auto stream = app.WatchEvents(from);
    while (events.size() < count) {
      absl::StatusOr<v1::Event> event = stream->Next(absl::Seconds(5));
      if (!event.ok()) {
        ADD_FAILURE() << "after " << events.size() << " of " << count << ": " << event.status();
        break;
      }
      events.push_back(*std::move(event));
    }
    return events;
  }

  static std::vector<std::string> Listing(CallSessionClient& app) {
    absl::StatusOr<v1::ListCallsResponse> all = app.ListAllCalls();
    EXPECT_THAT(all, IsOk());
    std::vector<std::string> entries;
    if (all.ok()) {
      for (const v1::CallHandleEntry& entry : all->calls()) {
        entries.push_back(entry.SerializeAsString());
      }
    }
    return entries;
  }

  HealthCheckResponse::ServingStatus Health(const std::string& address) {
    auto channel = grpc::CreateChannel(address, grpc::InsecureChannelCredentials());
    auto stub = grpc::health::v1::Health::NewStub(channel);
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
    HealthCheckResponse response;
    const grpc::Status status = stub->Check(&context, HealthCheckRequest(), &response);
    return status.ok() ? response.status() : HealthCheckResponse::UNKNOWN;
  }

  absl::Status Checkpoint(const std::string& directory, const std::string& token = kAdminToken) {
    auto stub = admin::v1::AdminService::NewStub(channel_);
    grpc::ClientContext context;
    PrepareContext(&context, absl::Seconds(30), token);
    admin::v1::CreateCheckpointRequest request;
    request.set_directory(directory);
    admin::v1::CreateCheckpointResponse response;
    return FromGrpcStatus(stub->CreateCheckpoint(&context, request, &response));
  }

  // How far one call of the power-cut load got: the last step acknowledged
  // and the last step asked for (one further when its reply never came).
  enum class Step { kMade, kDropped, kDeallocated };
  struct CallProgress {
    uint64_t handle = 0;
    Step acknowledged = Step::kMade;
    Step asked = Step::kMade;
  };
  struct PowerCut {
    std::string token;
    std::vector<CallProgress> calls;  // each acknowledged made before the cut
    uint64_t wal_bytes_synced = 0;
    uint64_t wal_bytes_dropped = 0;  // written but not synced at the cut
  };

  // Three clients of one app make calls, and drop every second and third and
  // deallocate every third, so that every step's loss would show; after `load`
  // the power is cut: `copy` gets the data directory as the disk would keep
  // it, each WAL file up to what its completed syncs covered plus half of
  // the unsynced rest (the last write torn). RocksDB's other files
  // (manifest, options) are written at open, before the load, and not again
  // in so short a load (no memtable flush), so they are copied whole.
  // Returns what was acknowledged before the cut.
  PowerCut LoadAndCutThePower(const std::string& copy, absl::Duration load) {
    CallSessionClient& app = NewApp("busy");
    const uint64_t line = *app.LineOpen(0, {kOwner});
    std::atomic<bool> cut{false};
    std::vector<std::vector<CallProgress>> progress(3);
    std::vector<std::thread> workers;
    for (size_t w = 0; w < progress.size(); ++w) {
      workers.emplace_back([&, w] {
        CallSessionClient worker(channel_);
        worker.set_token(app.token());
        // A reply counts only if it came before the cut: then its sync
        // completed before SyncedWalSizes() below.
        for (int i = 0; !cut.load(); ++i) {
          auto call = worker.MakeCall(line, "+15550100", absl::StrCat("w", w, "-", i));
          if (!call.ok() || cut.load()) return;
          CallProgress& step = progress[w].emplace_back();
          step.handle = call->call_handle();
          if (i % 3 == 0) continue;
          step.asked = Step::kDropped;
          if (!worker.Drop(step.handle).ok() || cut.load()) return;
          step.acknowledged = Step::kDropped;
          if (i % 3 == 1) continue;
          step.asked = Step::kDeallocated;
          if (!worker.DeallocateCall(step.handle).ok() || cut.load()) return;
          step.acknowledged = Step::kDeallocated;
        }
      });
    }
    absl::SleepFor(load);
    // The disk stalls just before the cut, so that writes pile up unsynced:
    // any reply sent before its sync would be caught.
    fs_->Hold();
    absl::SleepFor(absl::Milliseconds(20));
    cut = true;
    PowerCut result;
    result.token = app.token();
    CopyAsThePowerCutLeavesIt(copy, result);
    fs_->Release();
    for (std::thread& worker : workers) worker.join();
    for (const auto& calls : progress) {
      result.calls.insert(result.calls.end(), calls.begin(), calls.end());
    }
    return result;
  }

  // Copies the data directory as a power cut now would leave it (see
  // LoadAndCutThePower), adding the WAL bytes kept and dropped to `cut`.
  void CopyAsThePowerCutLeavesIt(const std::string& copy, PowerCut& cut) {
    const absl::flat_hash_map<std::string, uint64_t> synced = fs_->SyncedWalSizes();
    std::filesystem::create_directories(copy);
    for (const auto& entry : std::filesystem::directory_iterator(data_dir_)) {
      const std::string name = entry.path().filename().string();
      if (name == "LOCK") continue;
      const std::string to = copy + "/" + name;
      if (!absl::EndsWith(name, ".log")) {
        std::filesystem::copy_file(entry.path(), to);
        continue;
      }
      std::ifstream in(entry.path(), std::ios::binary);
      const std::string written((std::istreambuf_iterator<char>(in)),
                                std::istreambuf_iterator<char>());
      const auto it = synced.find(name);
      const uint64_t kept_synced =
          std::min<uint64_t>(it == synced.end() ? 0 : it->second, written.size());
      const uint64_t kept = kept_synced + (written.size() - kept_synced) / 2;
      std::ofstream(to, std::ios::binary).write(written.data(), static_cast<std::streamsize>(kept));
      cut.wal_bytes_synced += kept_synced;
      cut.wal_bytes_dropped += written.size() - kept_synced;
    }
  }

  static std::string Describe(const PowerCut& cut) {
    return absl::StrCat(cut.calls.size(), " calls acknowledged before the cut; WAL bytes synced ",
                        cut.wal_bytes_synced, ", written but not synced ", cut.wal_bytes_dropped,
                        " (half of them kept, the last write torn)");
  }

  // On a server recovered from a power cut: the calls whose state is not
  // one the acknowledged and asked steps allow (an acknowledged step lost).
  int LostAfterThePowerCut(const PowerCut& cut) {
    CallSessionClient& app = Reconnect(cut.token);
    int lost = 0;
    for (const CallProgress& call : cut.calls) {
      absl::StatusOr<v1::CallStatus> status = app.GetCallStatus(call.handle);
      const bool present = status.ok();
      const bool idle = present && status->call_state() == v1::CALL_STATE_IDLE;
      const bool gone = StatusOf(status).code() == absl::StatusCode::kNotFound;
      bool allowed = false;
      switch (call.acknowledged) {
        case Step::kMade:
          allowed = (present && !idle) || (call.asked == Step::kDropped && idle);
          break;
        case Step::kDropped:
          allowed = idle || (call.asked == Step::kDeallocated && gone);
          break;
        case Step::kDeallocated:
          allowed = gone;
          break;
      }
      if (!allowed) ++lost;
    }
    return lost;
  }

  std::string dir_;
  std::string data_dir_;
  std::shared_ptr<SyncFaultFileSystem> fs_ = std::make_shared<SyncFaultFileSystem>();
  std::unique_ptr<rocksdb::Env> env_ = rocksdb::NewCompositeEnv(fs_);
  std::unique_ptr<CallSessionServer> server_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<ProviderClient> provider_;
  std::vector<std::unique_ptr<CallSessionClient>> clients_;
};

TEST_F(DurabilityTest, ARestartRecoversEveryAppLineCallHandleRequestIdAndEvent) {
  StartServer();
  CallSessionClient& monitor = NewApp("monitor");
  CallSessionClient& caller = NewApp("caller");
  CallSessionClient& callee = NewApp("callee");
  CallSessionClient& leaver = NewApp("leaver");
  const uint64_t monitor_line = *monitor.LineOpen(0, {kMonitor});
  const uint64_t caller_line = *caller.LineOpen(0, {kOwner});
  const uint64_t callee_line = *callee.LineOpen(1, {kOwner});
  ASSERT_THAT(monitor.LineOpen(1, {kMonitor}), IsOk());

  // Outbound calls: one live, one dropped and kept for its log, one
  // deallocated; a replayable request id on each.
  auto live = caller.MakeCall(caller_line, "+15550100", "req-live");
  auto idle = caller.MakeCall(caller_line, "+15550101", "req-idle");
  auto gone = caller.MakeCall(caller_line, "+15550102", "req-gone");
  ASSERT_THAT(live, IsOk());
  ASSERT_THAT(idle, IsOk());
  ASSERT_THAT(gone, IsOk());
  ASSERT_THAT(provider_->SetCallState(live->call_id(), v1::CALL_STATE_CONNECTED), IsOk());
  ASSERT_THAT(caller.Drop(idle->call_handle()), IsOk());
  ASSERT_THAT(caller.Drop(gone->call_handle()), IsOk());
  ASSERT_THAT(caller.DeallocateCall(gone->call_handle()), IsOk());
  // An inbound call, answered.
  absl::StatusOr<uint64_t> inbound = provider_->OfferCall(1, "+15550111", "+15550199");
  ASSERT_THAT(inbound, IsOk());
  auto callee_view = callee.ListAllCalls();
  ASSERT_THAT(callee_view, IsOk());
  ASSERT_EQ(callee_view->calls_size(), 1);
  const uint64_t inbound_handle = callee_view->calls(0).call_handle();
  ASSERT_THAT(callee.Answer(inbound_handle), IsOk());
  // A line closed with a call on it: both handles void.
  const uint64_t leaver_line = *leaver.LineOpen(2);
  auto closed = leaver.MakeCall(leaver_line, "+15550103");
  ASSERT_THAT(closed, IsOk());
  ASSERT_THAT(leaver.LineClose(leaver_line), IsOk());
  // An app that left: its token is void.
  CallSessionClient& quitter = NewApp("quitter");
  const std::string quitter_token = quitter.token();
  ASSERT_THAT(quitter.Shutdown(), IsOk());
  // Many events for one app, so its buffer (64) has evicted some.
  for (int i = 0; i < 40; ++i) {
    auto call = caller.MakeCall(caller_line, "+15550104");
    ASSERT_THAT(call, IsOk());
    ASSERT_THAT(caller.Drop(call->call_handle()), IsOk());
    ASSERT_THAT(caller.DeallocateCall(call->call_handle()), IsOk());
  }

  struct Before {
    std::string token;
    std::vector<std::string> listing;
    uint64_t next_sequence;
    std::vector<v1::Event> events;
  };
  std::vector<Before> before;
  uint64_t highest_handle = 0;
  for (CallSessionClient* app : {&monitor, &caller, &callee, &leaver}) {
    auto view = app->ListAllCalls();
    ASSERT_THAT(view, IsOk());
    for (const auto& entry : view->calls()) {
      highest_handle = std::max(highest_handle, entry.call_handle());
    }
    const uint64_t next = view->resume_sequence();
    const uint64_t from = next > 64 ? next - 64 : 1;  // what the buffer holds
    before.push_back({app->token(), Listing(*app), next, Events(*app, from, next - from)});
  }
  const CoreStats stats = server_->core().Stats();

  StopServer();
  StartServer();

  const CoreStats recovered = server_->core().Stats();
  EXPECT_EQ(recovered.live.apps, stats.live.apps);
  EXPECT_EQ(recovered.live.lines, stats.live.lines);
  EXPECT_EQ(recovered.live.calls, stats.live.calls);
  EXPECT_EQ(recovered.live.call_handles, stats.live.call_handles);
  for (const Before& app : before) {
    CallSessionClient& again = Reconnect(app.token);
    EXPECT_THAT(again.KeepAlive(), IsOk()) << "the same token works";
    EXPECT_EQ(Listing(again), app.listing) << "the same handles, info and status";
    const uint64_t from = app.events.empty() ? 1 : app.events.front().sequence();
    std::vector<v1::Event> replayed = Events(again, from, app.events.size());
    ASSERT_EQ(replayed.size(), app.events.size());
    for (size_t i = 0; i < replayed.size(); ++i) {
      EXPECT_EQ(replayed[i].SerializeAsString(), app.events[i].SerializeAsString())
          << "event " << i << ": " << replayed[i].DebugString() << " vs "
          << app.events[i].DebugString();
    }
    auto view = again.ListAllCalls();
    ASSERT_THAT(view, IsOk());
    EXPECT_EQ(view->resume_sequence(), app.next_sequence) << "numbering continues";
  }
  CallSessionClient& caller_again = Reconnect(before[1].token);
  // Void handles stay void.
  EXPECT_THAT(caller_again.GetCallInfo(gone->call_handle()), HasCode(absl::StatusCode::kNotFound));
  EXPECT_THAT(Reconnect(before[3].token).GetCallInfo(closed->call_handle()),
              HasCode(absl::StatusCode::kNotFound));
  EXPECT_THAT(Reconnect(quitter_token).KeepAlive(), HasCode(absl::StatusCode::kUnauthenticated));
  // Replays return the first response, also for a deallocated handle.
  auto replay_live = caller_again.MakeCall(caller_line, "+15550100", "req-live");
  ASSERT_THAT(replay_live, IsOk());
  EXPECT_EQ(replay_live->call_handle(), live->call_handle());
  EXPECT_EQ(replay_live->call_id(), live->call_id());
  auto replay_gone = caller_again.MakeCall(caller_line, "+15550102", "req-gone");
  ASSERT_THAT(replay_gone, IsOk());
  EXPECT_EQ(replay_gone->call_handle(), gone->call_handle());
  // The provider addresses calls by the same ids.
  EXPECT_THAT(provider_->SetCallState(inbound.value(), v1::CALL_STATE_DISCONNECTED), IsOk());
  EXPECT_THAT(Reconnect(before[2].token).GetCallStatus(inbound_handle), IsOk());
  // New handles are new: above every one issued before the restart (the
  // deallocated and closed ones included).
  auto fresh = caller_again.MakeCall(caller_line, "+15550105");
  ASSERT_THAT(fresh, IsOk());
  EXPECT_GT(fresh->call_handle(), highest_handle);
  EXPECT_GT(fresh->call_handle(), gone->call_handle());
  EXPECT_GT(fresh->call_handle(), closed->call_handle());
  EXPECT_GT(fresh->call_id(), inbound.value());
  auto fresh_line = caller_again.LineOpen(3);
  ASSERT_THAT(fresh_line, IsOk());
  EXPECT_GT(*fresh_line, leaver_line);
  EXPECT_GT(*fresh_line, monitor_line);
  EXPECT_GT(*fresh_line, callee_line);
}

TEST_F(DurabilityTest, EveryAppKeepsItsOwnEventsAndRequestIds) {
  // Apps' events are stored apart from their request ids, and apps'
  // handles do not follow their creation order: each app must get back
  // exactly its own, whichever order recovery meets them in.
  StartServer();
  struct Kept {
    std::string token;
    uint64_t line;
    std::vector<v1::MakeCallResponse> calls;
    uint64_t next_sequence;
  };
  std::vector<Kept> kept;
  for (int a = 0; a < 12; ++a) {
    CallSessionClient& app = NewApp(absl::StrCat("app-", a));
    Kept k{app.token(), *app.LineOpen(a % 4, {kOwner}), {}, 0};
    for (int c = 0; c <= a % 3; ++c) {
      auto call = app.MakeCall(k.line, "+15550100", absl::StrCat("app-", a, "-call-", c));
      ASSERT_THAT(call, IsOk());
      k.calls.push_back(*call);
    }
    k.next_sequence = app.ListAllCalls()->resume_sequence();
    kept.push_back(std::move(k));
  }
  StopServer();
  StartServer();
  for (size_t a = 0; a < kept.size(); ++a) {
    CallSessionClient& app = Reconnect(kept[a].token);
    auto view = app.ListAllCalls();
    ASSERT_THAT(view, IsOk());
    EXPECT_EQ(view->resume_sequence(), kept[a].next_sequence) << "app " << a;
    EXPECT_EQ(static_cast<size_t>(view->calls_size()), kept[a].calls.size()) << "app " << a;
    EXPECT_EQ(Events(app, 1, kept[a].next_sequence - 1).size(), kept[a].next_sequence - 1);
    for (size_t c = 0; c < kept[a].calls.size(); ++c) {
      auto replay = app.MakeCall(kept[a].line, "+15550100", absl::StrCat("app-", a, "-call-", c));
      ASSERT_THAT(replay, IsOk());
      EXPECT_EQ(replay->call_handle(), kept[a].calls[c].call_handle()) << "app " << a;
    }
  }
}

TEST_F(DurabilityTest, NothingIsServedWhileTheStoreLoads) {
  absl::Notification listening;
  absl::Notification open_store;
  std::string address;
  ServerOptions options = Options(data_dir_);
  options.on_listening = [&](const std::string& bound) {
    address = bound;
    listening.Notify();
  };
  auto open = std::move(options.open_journal);
  options.open_journal = [&open_store, open] {
    open_store.WaitForNotification();
    return open();
  };
  absl::StatusOr<std::unique_ptr<CallSessionServer>> started;
  std::thread starter([&] { started = CallSessionServer::Start(std::move(options)); });
  listening.WaitForNotification();

  EXPECT_EQ(Health(address), HealthCheckResponse::NOT_SERVING);
  auto channel = grpc::CreateChannel(address, grpc::InsecureChannelCredentials());
  CallSessionClient early(channel);
  EXPECT_THAT(early.Initialize("early"), HasCode(absl::StatusCode::kUnavailable));
  ProviderClient provider(channel, kProviderToken);
  EXPECT_THAT(provider.OfferCall(0, "", ""), HasCode(absl::StatusCode::kUnavailable));
  auto stream = early.WatchEvents();
  EXPECT_THAT(stream->Next(absl::Seconds(5)), HasCode(absl::StatusCode::kUnavailable));

  open_store.Notify();
  starter.join();
  ASSERT_THAT(started, IsOk());
  EXPECT_EQ(Health(address), HealthCheckResponse::SERVING);
  EXPECT_THAT(early.Initialize("on time"), IsOk());
  (*started)->Shutdown(absl::ZeroDuration());
}

// With one serving thread the journal's threads sync; with several, the
// serving thread that ran the change syncs it itself.
void DurabilityTest::ExpectNoReplyAndNoEventLeavesBeforeItsSyncCompletes(int serving_threads) {
  ServerOptions options = Options(data_dir_);
  options.serving_threads = serving_threads;
  StartServer(std::move(options));
  CallSessionClient& monitor = NewApp("monitor");
  CallSessionClient& caller = NewApp("caller");
  ASSERT_THAT(monitor.LineOpen(0, {kMonitor}), IsOk());
  const uint64_t line = *caller.LineOpen(0, {kOwner});
  auto events = monitor.WatchEvents();
  ASSERT_THAT(events->Next(absl::Milliseconds(200)), HasCode(absl::StatusCode::kDeadlineExceeded))
      << "no event yet";

  fs_->Hold();
  absl::Notification replied;
  absl::StatusOr<v1::MakeCallResponse> call;
  std::thread making([&] {
    call = caller.MakeCall(line, "+15550100", "held");
    replied.Notify();
  });
  // The change is made and its entry written; only the sync is pending.
  for (int i = 0; i < 500 && fs_->waiting() == 0; ++i) absl::SleepFor(absl::Milliseconds(2));
  ASSERT_GT(fs_->waiting(), 0) << "the journal never reached its sync";
  EXPECT_TRUE(
      absl::StartsWith(fs_->last_syncing_thread(), serving_threads > 1 ? "serving-" : "journal-"))
      << "synced on thread \"" << fs_->last_syncing_thread() << "\"";
  EXPECT_FALSE(replied.WaitForNotificationWithTimeout(absl::Milliseconds(300)))
      << "a reply left before its journal entry was synced";
  EXPECT_THAT(events->Next(absl::Milliseconds(300)), HasCode(absl::StatusCode::kDeadlineExceeded))
      << "an event left before its journal entry was synced";
  // A stream that starts now, and so pulls at once, gets nothing either.
  CallSessionClient& other_view = Reconnect(monitor.token());
  auto late = other_view.WatchEvents(1);
  EXPECT_THAT(late->Next(absl::Milliseconds(300)), HasCode(absl::StatusCode::kDeadlineExceeded))
      << "a new stream was given an event before its journal entry was synced";
  if (serving_threads == 1) {
    // (A serving thread held in its sync holds its queue too: a request it
    // took would wait for the release.)
    auto view = caller.ListAllCalls();
    ASSERT_THAT(view, IsOk());
    EXPECT_EQ(view->resume_sequence(), 1u)
        << "ListCalls may show the call, but resumes streams before what is not durable";
  }

  fs_->Release();
  ASSERT_TRUE(replied.WaitForNotificationWithTimeout(absl::Seconds(10)));
  making.join();
  ASSERT_THAT(call, IsOk());
  // The late stream replaced the first; it gets the event now.
  absl::StatusOr<v1::Event> first = late->Next(absl::Seconds(5));
  ASSERT_THAT(first, IsOk());
  EXPECT_TRUE(first->has_app_new_call());
  EXPECT_EQ(first->app_new_call().call_id(), call->call_id());
}

TEST_F(DurabilityTest, NoReplyAndNoEventLeavesBeforeTheJournalThreadsSync) {
  ExpectNoReplyAndNoEventLeavesBeforeItsSyncCompletes(1);
}

TEST_F(DurabilityTest, NoReplyAndNoEventLeavesBeforeAServingThreadSyncs) {
  ExpectNoReplyAndNoEventLeavesBeforeItsSyncCompletes(3);
}

// The shutdown closes the connections left once no call is in progress; a
// call waiting for its sync is in progress, and is answered first.
TEST_F(DurabilityTest, AShutdownLetsACallWaitingForItsSyncFinish) {
  ServerOptions options = Options(data_dir_);
  options.serving_threads = 1;
  StartServer(std::move(options));
  CallSessionClient& caller = NewApp("caller");
  const uint64_t line = *caller.LineOpen(0, {kOwner});
  fs_->Hold();
  absl::StatusOr<v1::MakeCallResponse> call;
  std::thread making([&] { call = caller.MakeCall(line, "+15550100", "held"); });
  for (int i = 0; i < 500 && fs_->waiting() == 0; ++i) absl::SleepFor(absl::Milliseconds(2));
  ASSERT_GT(fs_->waiting(), 0) << "the journal never reached its sync";

  absl::Notification stopped;
  std::thread stopping([&] {
    server_->Shutdown(absl::Seconds(60));
    stopped.Notify();
  });
  EXPECT_FALSE(stopped.WaitForNotificationWithTimeout(absl::Milliseconds(300)))
      << "the shutdown ended with a call in progress";
  fs_->Release();
  making.join();
  EXPECT_THAT(call, IsOk()) << "the call in progress was cut";
  EXPECT_TRUE(stopped.WaitForNotificationWithTimeout(absl::Seconds(30)));
  stopping.join();
  server_.reset();
}

TEST_F(DurabilityTest, WithoutSyncRepliesDoNotWaitForTheDisk) {
  StartServer(Options(data_dir_, /*sync=*/false));
  CallSessionClient& caller = NewApp("caller");
  const uint64_t line = *caller.LineOpen(0, {kOwner});
  fs_->Hold();  // would stall any sync
  EXPECT_THAT(caller.MakeCall(line, "+15550100"), IsOk());
  EXPECT_EQ(fs_->waiting(), 0);
  fs_->Release();
}

TEST_F(DurabilityTest, AFailedSyncEndsTheProcess) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  EXPECT_EXIT(
      {
        StartServer();
        CallSessionClient& caller = NewApp("caller");
        const uint64_t line = *caller.LineOpen(0, {kOwner});
        fs_->FailSyncs();
        // Never answered: the process ends first.
        (void)caller.MakeCall(line, "+15550100");
        std::exit(0);
      },
      ::testing::ExitedWithCode(kJournalFailureExitCode), "journal_write_failed");
  // What was acknowledged before the failure is on disk.
}

TEST_F(DurabilityTest, ACheckpointTakenUnderLoadRestoresToAConsistentState) {
  StartServer();
  CallSessionClient& app = NewApp("busy");
  const uint64_t line = *app.LineOpen(0, {kOwner});
  // Calls acknowledged before the checkpoint: each must be in it.
  std::vector<v1::MakeCallResponse> before;
  for (int i = 0; i < 20; ++i) {
    auto call = app.MakeCall(line, "+15550100", absl::StrCat("before-", i));
    ASSERT_THAT(call, IsOk());
    before.push_back(*call);
  }
  std::atomic<bool> stop{false};
  std::atomic<int> during{0};
  std::thread load([&] {
    CallSessionClient worker(channel_);
    worker.set_token(app.token());
    while (!stop.load()) {
      auto call = worker.MakeCall(line, "+15550101");
      if (!call.ok()) continue;
      (void)worker.Drop(call->call_handle());
      (void)worker.DeallocateCall(call->call_handle());
      ++during;
    }
  });
  const std::string checkpoint = dir_ + "/checkpoint";
  ASSERT_THAT(Checkpoint(checkpoint), IsOk());
  stop = true;
  load.join();
  EXPECT_GT(during.load(), 0) << "the load ran";
  EXPECT_THAT(Checkpoint(checkpoint), HasCode(absl::StatusCode::kInvalidArgument))
      << "an existing directory is not overwritten";
  EXPECT_THAT(Checkpoint("relative/dir"), HasCode(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(Checkpoint(dir_ + "/other", "wrong"), HasCode(absl::StatusCode::kUnauthenticated));
  const std::string token = app.token();
  StopServer();

  // Restore: a server on the checkpoint.
  StartServer(Options(checkpoint));
  CallSessionClient& restored = Reconnect(token);
  auto view = restored.ListAllCalls();
  ASSERT_THAT(view, IsOk());
  absl::flat_hash_set<uint64_t> handles;
  for (const auto& entry : view->calls()) {
    handles.insert(entry.call_handle());
    // Each listed handle is whole: readable and on the app's line.
    EXPECT_EQ(entry.info().line_handle(), line);
    EXPECT_THAT(restored.GetCallInfo(entry.call_handle()), IsOk());
  }
  for (const auto& call : before) {
    EXPECT_TRUE(handles.contains(call.call_handle())) << "acknowledged before the checkpoint";
  }
  auto replay = restored.MakeCall(line, "+15550100", "before-7");
  ASSERT_THAT(replay, IsOk());
  EXPECT_EQ(replay->call_handle(), before[7].call_handle());
}

TEST_F(DurabilityTest, APowerCutLosesNothingAcknowledged) {
  StartServer();
  const std::string copy = dir_ + "/after-the-power-cut";
  const PowerCut cut = LoadAndCutThePower(copy, absl::Milliseconds(400));
  StopServer();
  ASSERT_GT(cut.calls.size(), 10u) << "the load ran";
  std::cout << Describe(cut) << "\n";

  StartServer(Options(copy));
  EXPECT_EQ(LostAfterThePowerCut(cut), 0);
  // And no handle is issued again.
  CallSessionClient& app = Reconnect(cut.token);
  const uint64_t line = *app.LineOpen(1, {kOwner});
  absl::flat_hash_set<uint64_t> issued;
  for (const CallProgress& call : cut.calls) issued.insert(call.handle);
  for (int i = 0; i < 20; ++i) {
    auto call = app.MakeCall(line, "+15550100");
    ASSERT_THAT(call, IsOk());
    EXPECT_FALSE(issued.contains(call->call_handle())) << call->call_handle();
  }
}

// The same cut without sync: the acknowledged changes were never synced and
// are gone, which shows the cut above drops what a power loss would.
TEST_F(DurabilityTest, WithoutSyncAPowerCutLosesAcknowledgedChanges) {
  StartServer(Options(data_dir_, /*sync=*/false));
  const std::string copy = dir_ + "/after-the-power-cut";
  const PowerCut cut = LoadAndCutThePower(copy, absl::Milliseconds(200));
  StopServer();
  ASSERT_GT(cut.calls.size(), 10u) << "the load ran";
  EXPECT_GT(cut.wal_bytes_dropped, 0u);

  StartServer(Options(copy));
  const int lost = LostAfterThePowerCut(cut);
  std::cout << Describe(cut) << "; " << lost << " of them lost\n";
  EXPECT_GT(lost, 0);
}

TEST_F(DurabilityTest, CheckpointsNeedADurableStore) {
  ServerOptions options = Options(data_dir_);
  options.open_journal = nullptr;
  StartServer(std::move(options));
  EXPECT_THAT(Checkpoint(dir_ + "/checkpoint"), HasCode(absl::StatusCode::kFailedPrecondition));
}

}  // namespace
}  // namespace callsession
