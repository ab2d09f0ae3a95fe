// Reliability through a real gRPC server on a loopback port: event resume
// and loss reporting, ListCalls, leases with the real clock, quotas, and
// faults (cancelled and expired RPCs, a consumer that never reads, forged
// and malformed credentials). Every fault test ends by checking that a
// healthy application is still served correctly and that, once every app
// has shut down, the server's counters balance (nothing leaked).
#include <atomic>
#include <cstdio>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/container/flat_hash_set.h"
#include "absl/strings/str_cat.h"
#include "client/callsession_client.h"
#include "grpcpp/client_context.h"
#include "grpcpp/create_channel.h"
#include "grpcpp/security/credentials.h"
#include "server/server.h"
#include "tests/test_support.h"

namespace callsession {
namespace {

constexpr char kProviderToken[] = "provider-secret-for-reliability";
constexpr absl::Duration kEventWait = absl::Seconds(5);
constexpr v1::CallPrivilege kOwner = v1::CALL_PRIVILEGE_OWNER;
constexpr v1::CallPrivilege kMonitor = v1::CALL_PRIVILEGE_MONITOR;

MATCHER_P2(IsRpcError, code, name, "") {
  const absl::Status& status = StatusOf(arg);
  *result_listener << "status is " << status << ", reason \"" << TapiReason(status) << "\"";
  return status.code() == code && TapiReason(status) == name;
}

class ReliabilityTest : public ::testing::Test {
 protected:
  void Start(const std::function<void(ServerOptions&)>& configure = nullptr) {
    ServerOptions options;
    options.listen_address = "127.0.0.1:0";
    options.core.num_devices = 4;
    options.core.provider_token = kProviderToken;
    if (configure) configure(options);
    auto server = CallSessionServer::Start(std::move(options));
    ASSERT_THAT(server, IsOk());
    server_ = *std::move(server);
    channel_ = grpc::CreateChannel(server_->address(), grpc::InsecureChannelCredentials());
    provider_ = std::make_unique<ProviderClient>(channel_, kProviderToken);
  }

  // Owned by the fixture.
  CallSessionClient* NewApp(const std::string& name = "app") {
    apps_.push_back(std::make_unique<CallSessionClient>(channel_));
    EXPECT_THAT(apps_.back()->Initialize(name), IsOk());
    return apps_.back().get();
  }

  static v1::Event NextEvent(EventStream& stream) {
    absl::StatusOr<v1::Event> event = stream.Next(kEventWait);
    EXPECT_THAT(event, IsOk());
    return event.value_or(v1::Event());
  }

  // A fresh application can still do a whole lifecycle, with its events.
  void ExpectHealthyServiceForOthers() {
    auto app = NewApp("bystander");
    auto events = app->WatchEvents();
    absl::StatusOr<uint64_t> line = app->LineOpen(3);
    ASSERT_THAT(line, IsOk());
    auto call = app->MakeCall(*line, "+15550100");
    ASSERT_THAT(call, IsOk());
    EXPECT_EQ(NextEvent(*events).call_state().call_state(), v1::CALL_STATE_DIALING);
    ASSERT_THAT(app->Drop(call->call_handle()), IsOk());
    EXPECT_EQ(NextEvent(*events).call_state().call_state(), v1::CALL_STATE_IDLE);
    ASSERT_THAT(app->DeallocateCall(call->call_handle()), IsOk());
  }

  // Shuts every app made by NewApp down (ignoring those already gone) and
  // checks that nothing is left and every counter balances.
  void ExpectNothingLeakedAfterShutdown() {
    for (const auto& app : apps_) app->Shutdown().IgnoreError();
    const CoreStats stats = server_->core().Stats();
    EXPECT_EQ(stats.live.apps, 0u);
    EXPECT_EQ(stats.live.lines, 0u);
    EXPECT_EQ(stats.live.call_handles, 0u);
    EXPECT_EQ(stats.call_handles_created, stats.call_handles_voided);
    // Inbound calls nobody held stay tracked until the provider ends them.
    EXPECT_EQ(stats.calls_created, stats.calls_freed + stats.live.calls);
    EXPECT_EQ(stats.events_buffered, 0u);
  }

  std::unique_ptr<CallSessionServer> server_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<ProviderClient> provider_;
  std::vector<std::unique_ptr<CallSessionClient>> apps_;
};

// Event resume.

TEST_F(ReliabilityTest, AReconnectingClientResumesFromItsLastSequenceAndLosesNothing) {
  Start();
  auto app = NewApp();
  const uint64_t line = *app->LineOpen(0, {kOwner});
  auto first = app->WatchEvents();
  std::vector<uint64_t> call_ids;
  for (int i = 0; i < 3; ++i) call_ids.push_back(*provider_->OfferCall(0, "", "1"));
  // The client reads the first two events, then its connection breaks with
  // the rest written to it but unread.
  uint64_t last_seen = 0;
  for (int i = 0; i < 2; ++i) last_seen = NextEvent(*first).sequence();
  first.reset();
  // Changes while no stream is open.
  for (uint64_t id : call_ids) {
    ASSERT_THAT(provider_->SetCallState(id, v1::CALL_STATE_IDLE), IsOk());
  }
  auto second = app->WatchEvents(last_seen + 1);
  // 3 calls x (AppNewCall, OFFERING) + 3 IDLE = 9 events in all.
  for (uint64_t expected = last_seen + 1; expected <= 9; ++expected) {
    const v1::Event event = NextEvent(*second);
    ASSERT_FALSE(event.has_events_lost());
    EXPECT_EQ(event.sequence(), expected);
  }
  EXPECT_THAT(second->Next(absl::Milliseconds(200)),
              IsRpcError(absl::StatusCode::kDeadlineExceeded, ""));
  EXPECT_EQ(server_->core().Stats().events_lost, 0u);
  EXPECT_THAT(app->LineClose(line), IsOk());
  ExpectNothingLeakedAfterShutdown();
}

TEST_F(ReliabilityTest, AResumePointNoLongerBufferedIsReportedAndListCallsRebuildsTheView) {
  Start([](ServerOptions& o) { o.core.event_buffer = 4; });
  auto app = NewApp();
  const uint64_t line = *app->LineOpen(0);
  std::vector<uint64_t> handles;
  for (int i = 0; i < 5; ++i) handles.push_back(app->MakeCall(line, "100")->call_handle());
  ASSERT_THAT(app->Drop(handles[0]), IsOk());
  ASSERT_THAT(app->Drop(handles[3]), IsOk());  // events 1..7; 4..7 buffered

  auto stream = app->WatchEvents(1);
  const v1::Event lost = NextEvent(*stream);
  ASSERT_TRUE(lost.has_events_lost()) << lost.DebugString();
  EXPECT_EQ(lost.sequence(), 0u);
  EXPECT_EQ(lost.events_lost().first_sequence(), 1u);
  EXPECT_EQ(lost.events_lost().last_sequence(), 3u);
  for (uint64_t expected = 4; expected <= 7; ++expected) {
    EXPECT_EQ(NextEvent(*stream).sequence(), expected);
  }
  stream.reset();

  // Rebuild: every handle with its state, then follow from resume_sequence.
  auto view = app->ListAllCalls();
  ASSERT_THAT(view, IsOk());
  ASSERT_EQ(view->calls_size(), 5);
  for (const v1::CallHandleEntry& entry : view->calls()) {
    const bool dropped = entry.call_handle() == handles[0] || entry.call_handle() == handles[3];
    EXPECT_EQ(entry.status().call_state(), dropped ? v1::CALL_STATE_IDLE : v1::CALL_STATE_DIALING);
    EXPECT_EQ(entry.info().line_handle(), line);
  }
  EXPECT_EQ(view->resume_sequence(), 8u);
  auto follow = app->WatchEvents(view->resume_sequence());
  ASSERT_THAT(app->Drop(handles[1]), IsOk());
  const v1::Event next = NextEvent(*follow);
  EXPECT_EQ(next.sequence(), 8u);
  EXPECT_EQ(next.call_state().call_handle(), handles[1]);
  EXPECT_THAT(app->WatchEvents(100)->Next(kEventWait),
              IsRpcError(absl::StatusCode::kInvalidArgument, "LINEERR_INVALPARAM"));
  ExpectNothingLeakedAfterShutdown();
}

// A consumer that opens WatchEvents and never reads: the server's memory
// for it stays within the buffer, everyone else is served, and when it
// finally reads it is told exactly how much it lost.
TEST_F(ReliabilityTest, AConsumerThatNeverReadsCostsABoundedBufferAndIsToldWhatItLost) {
  constexpr size_t kBuffer = 64;
  constexpr int kCalls = 3000;
  Start([](ServerOptions& o) { o.core.event_buffer = kBuffer; });
  auto stalled = NewApp("stalled");
  const uint64_t stalled_line = *stalled->LineOpen(1, {kMonitor});
  // Its own connection, with HTTP/2 windows left at their 64 KiB default
  // (no BDP probing), so that gRPC's buffers fill and the server's
  // buffer is what overflows.
  grpc::ChannelArguments args;
  args.SetInt(GRPC_ARG_HTTP2_BDP_PROBE, 0);
  args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
  auto stalled_stub = v1::CallSessionService::NewStub(
      grpc::CreateCustomChannel(server_->address(), grpc::InsecureChannelCredentials(), args));
  grpc::ClientContext stalled_context;
  stalled_context.AddMetadata("authorization", absl::StrCat("Bearer ", stalled->token()));
  v1::WatchEventsRequest request;
  auto reader = stalled_stub->WatchEvents(&stalled_context, request);

  auto busy = NewApp("busy");
  const uint64_t line = *busy->LineOpen(1);
  for (int i = 0; i < kCalls; ++i) {
    auto call = busy->MakeCall(line, "100");
    ASSERT_THAT(call, IsOk());
    ASSERT_THAT(busy->Drop(call->call_handle()), IsOk());
    ASSERT_THAT(busy->DeallocateCall(call->call_handle()), IsOk());
  }
  // Each call gave the monitor 3 events; it was never read.
  EXPECT_LE(server_->core().Stats().events_buffered, 2 * kBuffer)
      << "the stalled app's buffer plus the busy app's";
  ExpectHealthyServiceForOthers();

  // Now it reads: some events were in flight in gRPC's buffers, then a
  // notice of the loss, then the newest buffered ones, ending at the last.
  v1::WatchEventsResponse response;
  uint64_t delivered = 0;
  uint64_t lost = 0;
  uint64_t last_sequence = 0;
  const uint64_t total = 3 * kCalls;
  while (last_sequence < total && reader->Read(&response)) {
    if (response.event().has_events_lost()) {
      const v1::EventsLostEvent& gap = response.event().events_lost();
      EXPECT_EQ(gap.first_sequence(), last_sequence + 1);
      lost += gap.last_sequence() - gap.first_sequence() + 1;
      last_sequence = gap.last_sequence();
    } else {
      EXPECT_EQ(response.event().sequence(), last_sequence + 1) << "no silent gap";
      last_sequence = response.event().sequence();
      ++delivered;
    }
  }
  EXPECT_EQ(delivered + lost, total) << "every event delivered or reported lost";
  EXPECT_GT(lost, 0u);
  EXPECT_EQ(server_->core().Stats().events_lost, lost);
  stalled_context.TryCancel();
  reader->Finish().IgnoreError();
  EXPECT_THAT(stalled->LineClose(stalled_line), IsOk());
  ExpectNothingLeakedAfterShutdown();
}

// Leases, with the real clock and the server's own enforcement thread.

TEST_F(ReliabilityTest, AnAppThatGoesQuietIsShutDownAndOthersSeeItsCallsEnd) {
  Start([](ServerOptions& o) { o.core.app_ttl = absl::Milliseconds(400); });
  auto monitor = NewApp("monitor");
  auto monitor_events = monitor->WatchEvents();  // keeps the monitor's lease
  ASSERT_THAT(monitor->LineOpen(0, {kMonitor}), IsOk());
  auto quiet = std::make_unique<CallSessionClient>(channel_);
  auto init = quiet->Initialize("quiet");
  ASSERT_THAT(init, IsOk());
  EXPECT_EQ(init->app_ttl().nanos(), 400000000);
  auto call = quiet->MakeCall(*quiet->LineOpen(0), "100");
  ASSERT_THAT(call, IsOk());
  auto poller = NewApp("poller");  // renews with KeepAlive only

  const v1::Event new_call = NextEvent(*monitor_events);
  ASSERT_TRUE(new_call.has_app_new_call());
  const uint64_t monitor_handle = new_call.app_new_call().call_handle();
  EXPECT_EQ(NextEvent(*monitor_events).call_state().call_state(), v1::CALL_STATE_DIALING);
  for (int i = 0; i < 12; ++i) {
    ASSERT_THAT(poller->KeepAlive(), IsOk());
    absl::SleepFor(absl::Milliseconds(100));
  }
  // By now (1.2 s) the quiet app's lease ran out and it was shut down.
  const v1::Event idle = NextEvent(*monitor_events);
  EXPECT_EQ(idle.call_state().call_handle(), monitor_handle);
  EXPECT_EQ(idle.call_state().call_state(), v1::CALL_STATE_IDLE);
  EXPECT_THAT(quiet->KeepAlive(),
              IsRpcError(absl::StatusCode::kUnauthenticated, "LINEERR_UNINITIALIZED"));
  EXPECT_THAT(poller->KeepAlive(), IsOk());
  EXPECT_THAT(monitor->GetCallStatus(monitor_handle), IsOk());
  EXPECT_EQ(server_->core().Stats().apps_expired, 1u);
  ExpectNothingLeakedAfterShutdown();
}

// Quotas.

TEST_F(ReliabilityTest, QuotasFailWithResourceUnavailAndChangeNothing) {
  Start([](ServerOptions& o) {
    o.core.max_apps = 2;
    o.core.max_lines_per_app = 1;
    o.core.max_call_handles_per_app = 1;
  });
  auto app = NewApp();
  NewApp();
  CallSessionClient third(channel_);
  EXPECT_THAT(third.Initialize("third"),
              IsRpcError(absl::StatusCode::kResourceExhausted, "LINEERR_RESOURCEUNAVAIL"));
  const uint64_t line = *app->LineOpen(0);
  EXPECT_THAT(app->LineOpen(1),
              IsRpcError(absl::StatusCode::kResourceExhausted, "LINEERR_RESOURCEUNAVAIL"));
  ASSERT_THAT(app->MakeCall(line, "100"), IsOk());
  EXPECT_THAT(app->MakeCall(line, "101"),
              IsRpcError(absl::StatusCode::kResourceExhausted, "LINEERR_RESOURCEUNAVAIL"));
  const CoreStats stats = server_->core().Stats();
  EXPECT_EQ(stats.live.apps, 2u);
  EXPECT_EQ(stats.live.lines, 1u);
  EXPECT_EQ(stats.calls_created, 1u);
  EXPECT_EQ(stats.quota_rejections, 3u);
  ExpectNothingLeakedAfterShutdown();
}

// Faults.

TEST_F(ReliabilityTest, RpcsCancelledMidFlightLeaveAConsistentTable) {
  Start();
  auto app = NewApp();
  const uint64_t line = *app->LineOpen(0);
  auto stub = v1::CallSessionService::NewStub(channel_);
  std::atomic<int> cancelled{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 2; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < 300; ++i) {
        grpc::ClientContext context;
        context.AddMetadata("authorization", absl::StrCat("Bearer ", app->token()));
        v1::MakeCallRequest request;
        request.set_line_handle(line);
        request.set_dest_address("100");
        request.set_request_id(absl::StrCat("r", t, "-", i));
        v1::MakeCallResponse response;
        std::thread canceller([&context, i] {
          absl::SleepFor(absl::Microseconds(i % 50 * 10));
          context.TryCancel();
        });
        const grpc::Status status = stub->MakeCall(&context, request, &response);
        canceller.join();
        if (status.error_code() == grpc::StatusCode::CANCELLED) ++cancelled;
      }
    });
  }
  for (std::thread& thread : threads) thread.join();
  EXPECT_GT(cancelled.load(), 0) << "the test did cancel RPCs";
  std::printf("faults injected: %d of 600 MakeCalls cancelled mid-flight\n", cancelled.load());
  // Each retry of a request_id answers with its call if the first attempt
  // created one, or creates it now: one call per request_id either way.
  absl::flat_hash_set<uint64_t> handles;
  for (int t = 0; t < 2; ++t) {
    for (int i = 0; i < 300; ++i) {
      auto retry = app->MakeCall(line, "100", absl::StrCat("r", t, "-", i));
      ASSERT_THAT(retry, IsOk());
      EXPECT_TRUE(handles.insert(retry->call_handle()).second);
    }
  }
  auto view = app->ListAllCalls();
  ASSERT_THAT(view, IsOk());
  EXPECT_EQ(view->calls_size(), 600);
  EXPECT_EQ(server_->core().Stats().calls_created, 600u);
  ExpectHealthyServiceForOthers();
  ExpectNothingLeakedAfterShutdown();
}

TEST_F(ReliabilityTest, ExpiredDeadlinesLeaveAConsistentTable) {
  Start();
  auto app = NewApp();
  const uint64_t line = *app->LineOpen(0);
  // gRPC rounds deadlines up to whole milliseconds, so one of a few
  // microseconds expires in flight only now and then; one already past
  // always expires (before sending). Either way the table stays consistent.
  std::vector<std::unique_ptr<CallSessionClient>> hurried;
  for (int micros : {-1000, 50, 500, 1000}) {
    hurried.push_back(std::make_unique<CallSessionClient>(
        channel_, ClientOptions{absl::Microseconds(micros), {}}));
    hurried.back()->set_token(app->token());
  }
  int expired = 0;
  int created = 0;
  for (int i = 0; i < 500; ++i) {
    auto call = hurried[i % hurried.size()]->MakeCall(line, "100");
    if (call.ok()) {
      ++created;
    } else {
      EXPECT_EQ(call.status().code(), absl::StatusCode::kDeadlineExceeded) << call.status();
      ++expired;
    }
  }
  EXPECT_GT(expired, 0);
  std::printf("faults injected: %d of 500 MakeCalls past their deadline\n", expired);
  // A call whose response missed its deadline may still have been created:
  // ListCalls finds every one, and each is a valid, droppable handle.
  auto view = app->ListAllCalls();
  ASSERT_THAT(view, IsOk());
  EXPECT_GE(view->calls_size(), created);
  EXPECT_EQ(static_cast<uint64_t>(view->calls_size()), server_->core().Stats().calls_created);
  for (const v1::CallHandleEntry& entry : view->calls()) {
    ASSERT_THAT(app->Drop(entry.call_handle()), IsOk());
  }
  ExpectHealthyServiceForOthers();
  ExpectNothingLeakedAfterShutdown();
}

TEST_F(ReliabilityTest, AnotherAppsTokenOrAForgedOneReachesNothing) {
  Start();
  auto victim = NewApp("victim");
  auto call = victim->MakeCall(*victim->LineOpen(0), "100");
  ASSERT_THAT(call, IsOk());
  auto intruder = NewApp("intruder");
  EXPECT_THAT(intruder->Drop(call->call_handle()),
              IsRpcError(absl::StatusCode::kNotFound, "LINEERR_INVALCALLHANDLE"));
  EXPECT_THAT(intruder->DeallocateCall(call->call_handle()),
              IsRpcError(absl::StatusCode::kNotFound, "LINEERR_INVALCALLHANDLE"));
  // The victim's handle (the token's first half) with a guessed secret.
  CallSessionClient forger(channel_);
  std::string forged = victim->token();
  forged.back() = forged.back() == 'a' ? 'b' : 'a';
  forger.set_token(forged);
  EXPECT_THAT(forger.Drop(call->call_handle()),
              IsRpcError(absl::StatusCode::kUnauthenticated, "LINEERR_UNINITIALIZED"));
  EXPECT_THAT(forger.Shutdown(),
              IsRpcError(absl::StatusCode::kUnauthenticated, "LINEERR_UNINITIALIZED"));
  auto status = victim->GetCallStatus(call->call_handle());
  ASSERT_THAT(status, IsOk());
  EXPECT_EQ(status->call_state(), v1::CALL_STATE_DIALING) << "untouched";
  ASSERT_THAT(victim->Drop(call->call_handle()), IsOk());
  ExpectNothingLeakedAfterShutdown();
}

TEST_F(ReliabilityTest, MalformedAuthorizationMetadataIsUnauthenticated) {
  Start();
  auto app = NewApp();
  auto stub = v1::CallSessionService::NewStub(channel_);
  const std::vector<std::vector<std::string>> headers = {
      {},
      {"Bearer"},
      {"Bearer "},
      {"Basic " + app->token()},
      {"Bearer  " + app->token()},
      {"Bearer " + app->token() + " "},
      {"Bearer " + app->token().substr(1)},
      {"Bearer " + std::string(4000, 'f')},
      {"Bearer " + std::string(48, 'G')},
      {"Bearer " + app->token(), "Bearer " + app->token()},
  };
  for (const std::vector<std::string>& values : headers) {
    grpc::ClientContext context;
    for (const std::string& value : values) context.AddMetadata("authorization", value);
    v1::KeepAliveResponse response;
    const grpc::Status status = stub->KeepAlive(&context, v1::KeepAliveRequest(), &response);
    EXPECT_EQ(status.error_code(), grpc::StatusCode::UNAUTHENTICATED)
        << "header count " << values.size() << ": "
        << (values.empty() ? "" : values[0].substr(0, 20));
  }
  EXPECT_THAT(app->KeepAlive(), IsOk()) << "the well-formed token still works";
  grpc::ClientContext lower_case;  // the scheme is case-insensitive (RFC 7235)
  lower_case.AddMetadata("authorization", "bearer " + app->token());
  v1::KeepAliveResponse response;
  EXPECT_TRUE(stub->KeepAlive(&lower_case, v1::KeepAliveRequest(), &response).ok());
  ExpectHealthyServiceForOthers();
  ExpectNothingLeakedAfterShutdown();
}

}  // namespace
}  // namespace callsession
