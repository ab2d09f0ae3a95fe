// Every semantic rule of the API (issue: core service, rules 1-12), plus
// identity, error details and the event stream, through a real gRPC server
// on a loopback port, driven by the client library.
#include <memory>
#include <string>
#include <vector>

#include "absl/container/flat_hash_set.h"
#include "client/callsession_client.h"
#include "google/rpc/error_details.pb.h"
#include "google/rpc/status.pb.h"
#include "grpcpp/create_channel.h"
#include "grpcpp/security/credentials.h"
#include "server/server.h"
#include "tests/test_support.h"

namespace callsession {
namespace {

using ::testing::ElementsAre;
using ::testing::IsEmpty;
using ::testing::SizeIs;
using ::testing::UnorderedElementsAre;
using v1::CallState;

constexpr char kProviderToken[] = "provider-secret-for-tests";
constexpr uint32_t kDevices = 4;
constexpr v1::CallPrivilege kOwner = v1::CALL_PRIVILEGE_OWNER;
constexpr v1::CallPrivilege kMonitor = v1::CALL_PRIVILEGE_MONITOR;
constexpr absl::Duration kEventWait = absl::Seconds(5);

MATCHER_P(IsStatusCode, code, "") {
  *result_listener << "status is " << StatusOf(arg);
  return StatusOf(arg).code() == code;
}

// IsTapiError, and the ErrorInfo reason from the trailer names the same error.
MATCHER_P2(IsRpcError, code, name, "") {
  const absl::Status& status = StatusOf(arg);
  *result_listener << "status is " << status << ", reason \"" << TapiReason(status) << "\"";
  return status.code() == code && absl::StartsWith(status.message(), absl::StrCat(name, ": ")) &&
         TapiReason(status) == name;
}

auto NotFound(absl::string_view name) { return IsRpcError(absl::StatusCode::kNotFound, name); }
auto InvalidCallHandle() { return NotFound("LINEERR_INVALCALLHANDLE"); }
auto InvalidLineHandle() { return NotFound("LINEERR_INVALLINEHANDLE"); }
auto InvalidCallState() {
  return IsRpcError(absl::StatusCode::kFailedPrecondition, "LINEERR_INVALCALLSTATE");
}
auto NotOwner() { return IsRpcError(absl::StatusCode::kPermissionDenied, "LINEERR_NOTOWNER"); }
auto Uninitialized() {
  return IsRpcError(absl::StatusCode::kUnauthenticated, "LINEERR_UNINITIALIZED");
}
auto InvalidArgument(absl::string_view name) {
  return IsRpcError(absl::StatusCode::kInvalidArgument, name);
}

class ServiceTest : public ::testing::Test {
 protected:
  void SetUp() override { StartServer(kProviderToken); }

  void StartServer(const std::string& provider_token) {
    ServerOptions options;
    options.listen_address = "127.0.0.1:0";
    options.core.num_devices = kDevices;
    options.core.provider_token = provider_token;
    options.core.request_id_cache = 4;
    absl::StatusOr<std::unique_ptr<CallSessionServer>> server =
        CallSessionServer::Start(std::move(options));
    ASSERT_THAT(server, IsOk());
    server_ = *std::move(server);
    channel_ = grpc::CreateChannel(server_->address(), grpc::InsecureChannelCredentials());
    provider_ = std::make_unique<ProviderClient>(channel_, kProviderToken);
  }

  std::unique_ptr<CallSessionClient> NewApp(const std::string& name = "app") {
    auto app = std::make_unique<CallSessionClient>(channel_);
    absl::StatusOr<v1::InitializeResponse> init = app->Initialize(name);
    EXPECT_THAT(init, IsOk());
    return app;
  }

  static uint64_t Open(CallSessionClient& app, uint32_t device,
                       std::vector<v1::CallPrivilege> privileges = {}) {
    absl::StatusOr<uint64_t> line = app.LineOpen(device, privileges);
    EXPECT_THAT(line, IsOk());
    return line.value_or(0);
  }

  static v1::MakeCallResponse Make(CallSessionClient& app, uint64_t line,
                                   const std::string& dest = "+15550100") {
    absl::StatusOr<v1::MakeCallResponse> call = app.MakeCall(line, dest);
    EXPECT_THAT(call, IsOk());
    return call.value_or(v1::MakeCallResponse());
  }

  uint64_t Offer(uint32_t device, const std::string& caller = "+15550111",
                 const std::string& called = "+15550199") {
    absl::StatusOr<uint64_t> call_id = provider_->OfferCall(device, caller, called);
    EXPECT_THAT(call_id, IsOk());
    return call_id.value_or(0);
  }

  static CallState StateOf(CallSessionClient& app, uint64_t call) {
    absl::StatusOr<v1::CallStatus> status = app.GetCallStatus(call);
    EXPECT_THAT(status, IsOk());
    return status.ok() ? status->call_state() : v1::CALL_STATE_UNSPECIFIED;
  }

  // Waits for the next event on `stream`; fails the test if none comes.
  static v1::Event NextEvent(EventStream& stream) {
    absl::StatusOr<v1::Event> event = stream.Next(kEventWait);
    EXPECT_THAT(event, IsOk());
    return event.value_or(v1::Event());
  }

  // True if no event arrives within a short wait. Only used after a later
  // event has been checked for, so it cannot race a slow delivery.
  static bool NoMoreEvents(EventStream& stream) {
    return absl::IsDeadlineExceeded(stream.Next(absl::Milliseconds(200)).status());
  }

  // An owner app with an outbound call on device 0, and a monitor app whose
  // MONITOR line on device 0 gave it a handle to the call.
  struct MonitoredCall {
    std::unique_ptr<CallSessionClient> owner;
    std::unique_ptr<CallSessionClient> monitor;
    std::unique_ptr<EventStream> monitor_events;
    v1::MakeCallResponse call;
    uint64_t monitor_handle = 0;
  };
  MonitoredCall MakeMonitoredCall() {
    MonitoredCall m;
    m.owner = NewApp("owner");
    m.monitor = NewApp("monitor");
    Open(*m.monitor, 0, {kMonitor});
    m.monitor_events = m.monitor->WatchEvents();
    m.call = Make(*m.owner, Open(*m.owner, 0));
    m.monitor_handle = NextEvent(*m.monitor_events).app_new_call().call_handle();
    return m;
  }

  CoreStats Stats() { return server_->core().Stats(); }

  std::unique_ptr<CallSessionServer> server_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<ProviderClient> provider_;
};

// --- Rule 1: devices --------------------------------------------------------

TEST_F(ServiceTest, DevicesAreZeroToNumDevicesMinusOne) {
  auto app = std::make_unique<CallSessionClient>(channel_);
  absl::StatusOr<v1::InitializeResponse> init = app->Initialize("devices");
  ASSERT_THAT(init, IsOk());
  EXPECT_EQ(init->num_devices(), kDevices);
  EXPECT_NE(init->app_handle(), 0u);
  for (uint32_t device = 0; device < kDevices; ++device) {
    EXPECT_THAT(app->LineOpen(device), IsOk());
  }
  EXPECT_THAT(app->LineOpen(kDevices), NotFound("LINEERR_BADDEVICEID"));
  EXPECT_THAT(app->LineOpen(0xffffffffu), NotFound("LINEERR_BADDEVICEID"));
}

TEST_F(ServiceTest, OneDeviceOpenedBySeveralAppsAndSeveralTimesByOne) {
  auto a = NewApp("a");
  auto b = NewApp("b");
  const uint64_t a1 = Open(*a, 2, {kOwner});
  const uint64_t a2 = Open(*a, 2, {kMonitor});
  const uint64_t b1 = Open(*b, 2);
  EXPECT_EQ(absl::flat_hash_set<uint64_t>({a1, a2, b1}).size(), 3u);
  EXPECT_THAT(a->MakeCall(a1, "1"), IsOk());
  EXPECT_THAT(a->MakeCall(a2, "2"), IsOk());
  EXPECT_THAT(b->MakeCall(b1, "3"), IsOk());
}

// --- Rule 2: MakeCall -------------------------------------------------------

TEST_F(ServiceTest, MakeCallCreatesAnOutboundDialingCallOwnedByTheCaller) {
  auto app = NewApp();
  const uint64_t line = Open(*app, 1);
  const v1::MakeCallResponse call = Make(*app, line, "sip:bob@example.com");
  EXPECT_NE(call.call_handle(), 0u);
  EXPECT_NE(call.call_id(), 0u);

  absl::StatusOr<v1::CallInfo> info = app->GetCallInfo(call.call_handle());
  ASSERT_THAT(info, IsOk());
  EXPECT_EQ(info->called_id(), "sip:bob@example.com");
  EXPECT_EQ(info->origin(), v1::CALL_ORIGIN_OUTBOUND);
  EXPECT_EQ(info->line_handle(), line);
  EXPECT_EQ(info->line_device_id(), 1u);
  EXPECT_EQ(info->call_id(), call.call_id());
  EXPECT_EQ(info->num_owners(), 1u);
  EXPECT_EQ(info->num_monitors(), 0u);

  absl::StatusOr<v1::CallStatus> status = app->GetCallStatus(call.call_handle());
  ASSERT_THAT(status, IsOk());
  EXPECT_EQ(status->call_state(), v1::CALL_STATE_DIALING);
  EXPECT_EQ(status->call_privilege(), kOwner);
  EXPECT_GT(status->state_entry_time().seconds(), 0);
}

// --- Rule 3: monitors and state events --------------------------------------

TEST_F(ServiceTest, MonitorsGetTheirOwnHandleThenStateEvents) {
  auto caller = NewApp("caller");
  auto monitor = NewApp("monitor");
  auto elsewhere = NewApp("elsewhere");
  Open(*monitor, 1, {kMonitor});
  Open(*elsewhere, 2, {kMonitor});
  std::unique_ptr<EventStream> caller_events = caller->WatchEvents();
  std::unique_ptr<EventStream> monitor_events = monitor->WatchEvents();
  std::unique_ptr<EventStream> elsewhere_events = elsewhere->WatchEvents();

  const uint64_t line = Open(*caller, 1);
  const v1::MakeCallResponse call = Make(*caller, line);

  const v1::Event new_call = NextEvent(*monitor_events);
  ASSERT_TRUE(new_call.has_app_new_call()) << new_call.DebugString();
  const uint64_t monitor_handle = new_call.app_new_call().call_handle();
  EXPECT_NE(monitor_handle, call.call_handle());
  EXPECT_EQ(new_call.app_new_call().call_privilege(), kMonitor);
  const v1::Event dialing = NextEvent(*monitor_events);
  ASSERT_TRUE(dialing.has_call_state());
  EXPECT_EQ(dialing.call_state().call_handle(), monitor_handle);
  EXPECT_EQ(dialing.call_state().call_state(), v1::CALL_STATE_DIALING);
  EXPECT_GT(dialing.sequence(), new_call.sequence());

  const v1::Event caller_dialing = NextEvent(*caller_events);
  EXPECT_EQ(caller_dialing.call_state().call_handle(), call.call_handle());
  EXPECT_EQ(caller_dialing.call_state().call_state(), v1::CALL_STATE_DIALING);

  // Every holder sees every change.
  ASSERT_THAT(provider_->SetCallState(call.call_id(), v1::CALL_STATE_RINGBACK), IsOk());
  ASSERT_THAT(caller->Drop(call.call_handle()), IsOk());
  for (auto* stream : {caller_events.get(), monitor_events.get()}) {
    const uint64_t handle = stream == caller_events.get() ? call.call_handle() : monitor_handle;
    for (CallState expected : {v1::CALL_STATE_RINGBACK, v1::CALL_STATE_IDLE}) {
      const v1::Event event = NextEvent(*stream);
      EXPECT_EQ(event.call_state().call_handle(), handle);
      EXPECT_EQ(event.call_state().call_state(), expected);
    }
  }
  absl::StatusOr<v1::CallStatus> status = monitor->GetCallStatus(monitor_handle);
  ASSERT_THAT(status, IsOk());
  EXPECT_EQ(status->call_privilege(), kMonitor);
  EXPECT_EQ(status->call_state(), v1::CALL_STATE_IDLE);

  // A monitor of another device saw nothing of it.
  Offer(2);
  EXPECT_TRUE(NextEvent(*elsewhere_events).has_app_new_call());
  EXPECT_EQ(NextEvent(*elsewhere_events).call_state().call_state(), v1::CALL_STATE_OFFERING);
  EXPECT_TRUE(NoMoreEvents(*elsewhere_events));
}

TEST_F(ServiceTest, AnAppWithOwnerAndMonitorLinesGetsOneHandlePerCall) {
  auto app = NewApp();
  const uint64_t line = Open(*app, 0, {kOwner});
  Open(*app, 0, {kMonitor});
  const uint64_t call_id = Offer(0);
  absl::StatusOr<std::vector<uint64_t>> fresh = app->GetNewCalls(line);
  ASSERT_THAT(fresh, IsOk());
  EXPECT_THAT(*fresh, IsEmpty()) << "the app already holds the call";
  EXPECT_EQ(Stats().live.call_handles, 1u) << "call " << call_id;
}

// --- Rule 4: inbound calls --------------------------------------------------

TEST_F(ServiceTest, OfferGoesToTheEarliestStillOpenOwnerLine) {
  auto first = NewApp("first");
  auto second = NewApp("second");
  auto watcher = NewApp("watcher");
  const uint64_t first_line = Open(*first, 3, {kOwner});
  Open(*second, 3, {kOwner});
  Open(*watcher, 3, {kMonitor});
  auto first_events = first->WatchEvents();
  auto second_events = second->WatchEvents();
  auto watcher_events = watcher->WatchEvents();

  const uint64_t call_id = Offer(3, "+15550111", "+15550199");
  v1::Event offered = NextEvent(*first_events);
  ASSERT_TRUE(offered.has_app_new_call());
  EXPECT_EQ(offered.app_new_call().call_privilege(), kOwner);
  EXPECT_EQ(offered.app_new_call().line_handle(), first_line);
  EXPECT_EQ(offered.app_new_call().call_id(), call_id);
  const uint64_t handle = offered.app_new_call().call_handle();
  EXPECT_EQ(NextEvent(*first_events).call_state().call_state(), v1::CALL_STATE_OFFERING);

  absl::StatusOr<v1::CallInfo> info = first->GetCallInfo(handle);
  ASSERT_THAT(info, IsOk());
  EXPECT_EQ(info->origin(), v1::CALL_ORIGIN_INBOUND);
  EXPECT_EQ(info->caller_id(), "+15550111");
  EXPECT_EQ(info->called_id(), "+15550199");
  EXPECT_EQ(info->num_owners(), 1u);
  EXPECT_EQ(info->num_monitors(), 1u);
  EXPECT_EQ(StateOf(*first, handle), v1::CALL_STATE_OFFERING);

  v1::Event watched = NextEvent(*watcher_events);
  EXPECT_EQ(watched.app_new_call().call_privilege(), kMonitor);
  EXPECT_EQ(watched.app_new_call().call_id(), call_id);

  // Once the first owner line closes, the next offer goes to the second.
  ASSERT_THAT(first->LineClose(first_line), IsOk());
  const uint64_t next_id = Offer(3);
  v1::Event next = NextEvent(*second_events);
  EXPECT_EQ(next.app_new_call().call_privilege(), kOwner);
  EXPECT_EQ(next.app_new_call().call_id(), next_id);
}

TEST_F(ServiceTest, ACallNobodyHoldsIsTrackedAndReachableThroughGetNewCalls) {
  const uint64_t call_id = Offer(1, "+15550111", "+15550199");
  EXPECT_EQ(Stats().live.calls, 1u);
  ASSERT_THAT(provider_->SetCallState(call_id, v1::CALL_STATE_ACCEPTED), IsOk())
      << "tracked although unheld";

  auto late = NewApp("late");
  const uint64_t line = Open(*late, 1);
  absl::StatusOr<std::vector<uint64_t>> calls = late->GetNewCalls(line);
  ASSERT_THAT(calls, IsOk());
  ASSERT_THAT(*calls, SizeIs(1));
  absl::StatusOr<v1::CallInfo> info = late->GetCallInfo((*calls)[0]);
  ASSERT_THAT(info, IsOk());
  EXPECT_EQ(info->call_id(), call_id);
  EXPECT_EQ(info->caller_id(), "+15550111");
  absl::StatusOr<v1::CallStatus> status = late->GetCallStatus((*calls)[0]);
  ASSERT_THAT(status, IsOk());
  EXPECT_EQ(status->call_privilege(), kMonitor);
  EXPECT_EQ(status->call_state(), v1::CALL_STATE_ACCEPTED);

  absl::StatusOr<std::vector<uint64_t>> again = late->GetNewCalls(line);
  ASSERT_THAT(again, IsOk());
  EXPECT_THAT(*again, IsEmpty()) << "only calls the app does not hold yet";
}

// --- Rule 5: handle values ---------------------------------------------------

TEST_F(ServiceTest, HoldersHaveDistinctHandlesToTheSameCallId) {
  auto owner = NewApp("owner");
  auto monitor = NewApp("monitor");
  Open(*owner, 0, {kOwner});
  Open(*monitor, 0, {kMonitor});
  auto owner_events = owner->WatchEvents();
  auto monitor_events = monitor->WatchEvents();
  const uint64_t call_id = Offer(0);
  const uint64_t owner_handle = NextEvent(*owner_events).app_new_call().call_handle();
  const uint64_t monitor_handle = NextEvent(*monitor_events).app_new_call().call_handle();
  EXPECT_NE(owner_handle, monitor_handle);
  absl::StatusOr<v1::CallInfo> a = owner->GetCallInfo(owner_handle);
  absl::StatusOr<v1::CallInfo> b = monitor->GetCallInfo(monitor_handle);
  ASSERT_THAT(a, IsOk());
  ASSERT_THAT(b, IsOk());
  EXPECT_EQ(a->call_id(), call_id);
  EXPECT_EQ(b->call_id(), call_id);
}

TEST_F(ServiceTest, HandlesAreNonZeroAndNeverReused) {
  auto app = NewApp();
  const uint64_t line = Open(*app, 0);
  absl::flat_hash_set<uint64_t> seen;
  std::vector<uint64_t> deallocated;
  for (int i = 0; i < 300; ++i) {
    const v1::MakeCallResponse call = Make(*app, line);
    ASSERT_NE(call.call_handle(), 0u);
    ASSERT_TRUE(seen.insert(call.call_handle()).second) << "reused " << call.call_handle();
    ASSERT_THAT(app->Drop(call.call_handle()), IsOk());
    ASSERT_THAT(app->DeallocateCall(call.call_handle()), IsOk());
    deallocated.push_back(call.call_handle());
  }
  for (int i = 0; i < 50; ++i) Make(*app, line);
  for (uint64_t handle : deallocated) {
    ASSERT_THAT(app->GetCallInfo(handle), InvalidCallHandle())
        << "a deallocated handle never addresses another call";
  }
}

// --- Rule 6: Answer, Drop, SetCallState -------------------------------------

TEST_F(ServiceTest, AnswerIsForOwnersOfOfferingOrAcceptedCalls) {
  auto owner = NewApp("owner");
  auto monitor = NewApp("monitor");
  Open(*owner, 0, {kOwner});
  Open(*monitor, 0, {kMonitor});
  auto owner_events = owner->WatchEvents();
  auto monitor_events = monitor->WatchEvents();

  Offer(0);
  const uint64_t handle = NextEvent(*owner_events).app_new_call().call_handle();
  const uint64_t monitor_handle = NextEvent(*monitor_events).app_new_call().call_handle();
  EXPECT_THAT(monitor->Answer(monitor_handle), NotOwner());
  EXPECT_EQ(StateOf(*owner, handle), v1::CALL_STATE_OFFERING) << "a failed Answer changes nothing";
  ASSERT_THAT(owner->Answer(handle), IsOk());
  EXPECT_EQ(StateOf(*owner, handle), v1::CALL_STATE_CONNECTED);
  EXPECT_THAT(owner->Answer(handle), InvalidCallState());

  // ACCEPTED may be answered too.
  auto second = NewApp("second");
  Open(*second, 1, {kOwner});
  auto second_events = second->WatchEvents();
  const uint64_t accepted_id = Offer(1);
  const uint64_t accepted_handle = NextEvent(*second_events).app_new_call().call_handle();
  ASSERT_THAT(provider_->SetCallState(accepted_id, v1::CALL_STATE_ACCEPTED), IsOk());
  EXPECT_THAT(second->Answer(accepted_handle), IsOk());
  EXPECT_EQ(StateOf(*second, accepted_handle), v1::CALL_STATE_CONNECTED);

  // An outbound call in DIALING cannot be answered.
  const uint64_t line = Open(*owner, 2);
  const v1::MakeCallResponse outbound = Make(*owner, line);
  EXPECT_THAT(owner->Answer(outbound.call_handle()), InvalidCallState());
}

TEST_F(ServiceTest, DropIsForOwnersOfCallsThatAreNotIdle) {
  auto owner = NewApp("owner");
  auto monitor = NewApp("monitor");
  const uint64_t line = Open(*owner, 0);
  const uint64_t monitor_line = Open(*monitor, 0, {kMonitor});
  const v1::MakeCallResponse call = Make(*owner, line);
  absl::StatusOr<std::vector<uint64_t>> held = monitor->GetNewCalls(monitor_line);
  ASSERT_THAT(held, IsOk());
  EXPECT_THAT(*held, IsEmpty()) << "already held through the monitor line";
  auto monitor_events = monitor->WatchEvents();
  const uint64_t monitor_handle = NextEvent(*monitor_events).app_new_call().call_handle();

  EXPECT_THAT(monitor->Drop(monitor_handle), NotOwner());
  EXPECT_EQ(StateOf(*owner, call.call_handle()), v1::CALL_STATE_DIALING);
  ASSERT_THAT(owner->Drop(call.call_handle()), IsOk());
  EXPECT_EQ(StateOf(*owner, call.call_handle()), v1::CALL_STATE_IDLE);
  EXPECT_THAT(owner->Drop(call.call_handle()), InvalidCallState());
}

TEST_F(ServiceTest, ProviderMovesCallsToAnyStateButNothingLeavesIdle) {
  auto app = NewApp();
  const uint64_t line = Open(*app, 0);
  const v1::MakeCallResponse call = Make(*app, line);
  for (int state = v1::CALL_STATE_OFFERING; state <= v1::CALL_STATE_UNKNOWN; ++state) {
    ASSERT_THAT(provider_->SetCallState(call.call_id(), static_cast<CallState>(state)), IsOk());
    EXPECT_EQ(StateOf(*app, call.call_handle()), state);
  }
  ASSERT_THAT(provider_->SetCallState(call.call_id(), v1::CALL_STATE_IDLE), IsOk());
  EXPECT_THAT(provider_->SetCallState(call.call_id(), v1::CALL_STATE_CONNECTED),
              InvalidCallState());
  EXPECT_THAT(provider_->SetCallState(call.call_id(), v1::CALL_STATE_IDLE), InvalidCallState());
  EXPECT_EQ(StateOf(*app, call.call_handle()), v1::CALL_STATE_IDLE);

  EXPECT_THAT(provider_->SetCallState(987654321, v1::CALL_STATE_CONNECTED), InvalidCallHandle());
  ASSERT_THAT(app->DeallocateCall(call.call_handle()), IsOk());
  EXPECT_THAT(provider_->SetCallState(call.call_id(), v1::CALL_STATE_CONNECTED),
              InvalidCallHandle())
      << "a freed call is no longer tracked";
}

TEST_F(ServiceTest, SettingTheCurrentStateSendsNoEvent) {
  auto app = NewApp();
  auto events = app->WatchEvents();
  const v1::MakeCallResponse call = Make(*app, Open(*app, 0));
  EXPECT_EQ(NextEvent(*events).call_state().call_state(), v1::CALL_STATE_DIALING);
  ASSERT_THAT(provider_->SetCallState(call.call_id(), v1::CALL_STATE_DIALING), IsOk());
  ASSERT_THAT(provider_->SetCallState(call.call_id(), v1::CALL_STATE_PROCEEDING), IsOk());
  EXPECT_EQ(NextEvent(*events).call_state().call_state(), v1::CALL_STATE_PROCEEDING);
}

// --- Rule 7: IDLE handles stay readable --------------------------------------

TEST_F(ServiceTest, IdleCallsStayReadableUntilDeallocated) {
  auto app = NewApp();
  const uint64_t line = Open(*app, 0);
  const v1::MakeCallResponse call = Make(*app, line, "+15550123");
  ASSERT_THAT(provider_->SetCallState(call.call_id(), v1::CALL_STATE_CONNECTED), IsOk());
  ASSERT_THAT(app->Drop(call.call_handle()), IsOk());

  absl::StatusOr<v1::CallInfo> info = app->GetCallInfo(call.call_handle());
  ASSERT_THAT(info, IsOk());
  EXPECT_EQ(info->called_id(), "+15550123");
  EXPECT_EQ(info->connected_id(), "+15550123");
  EXPECT_EQ(StateOf(*app, call.call_handle()), v1::CALL_STATE_IDLE);
  EXPECT_EQ(Stats().live.calls, 1u);

  ASSERT_THAT(app->DeallocateCall(call.call_handle()), IsOk());
  EXPECT_THAT(app->GetCallInfo(call.call_handle()), InvalidCallHandle());
  EXPECT_THAT(app->GetCallStatus(call.call_handle()), InvalidCallHandle());
}

// --- Rule 8: DeallocateCall --------------------------------------------------

TEST_F(ServiceTest, DeallocateVoidsOnlyThatAppsHandle) {
  MonitoredCall m = MakeMonitoredCall();
  // A monitor may deallocate at any time, even while the call is live.
  ASSERT_THAT(m.monitor->DeallocateCall(m.monitor_handle), IsOk());
  EXPECT_THAT(m.monitor->GetCallInfo(m.monitor_handle), InvalidCallHandle());
  EXPECT_THAT(m.monitor->DeallocateCall(m.monitor_handle), InvalidCallHandle());
  absl::StatusOr<v1::CallInfo> info = m.owner->GetCallInfo(m.call.call_handle());
  ASSERT_THAT(info, IsOk());
  EXPECT_EQ(info->num_monitors(), 0u);
  EXPECT_EQ(StateOf(*m.owner, m.call.call_handle()), v1::CALL_STATE_DIALING);
}

TEST_F(ServiceTest, SoleOwnerCannotDeallocateALiveCall) {
  auto app = NewApp();
  const v1::MakeCallResponse call = Make(*app, Open(*app, 0));
  EXPECT_THAT(app->DeallocateCall(call.call_handle()), InvalidCallState());
  EXPECT_EQ(StateOf(*app, call.call_handle()), v1::CALL_STATE_DIALING) << "untouched";
  EXPECT_EQ(Stats().live.call_handles, 1u);
  ASSERT_THAT(app->Drop(call.call_handle()), IsOk());
  EXPECT_THAT(app->DeallocateCall(call.call_handle()), IsOk());
}

TEST_F(ServiceTest, CallRecordIsFreedWhenIdleAndItsLastHandleIsGone) {
  MonitoredCall m = MakeMonitoredCall();
  ASSERT_THAT(m.owner->Drop(m.call.call_handle()), IsOk());
  ASSERT_THAT(m.owner->DeallocateCall(m.call.call_handle()), IsOk());
  EXPECT_EQ(Stats().live.calls, 1u) << "the monitor still holds it";
  EXPECT_THAT(m.monitor->GetCallInfo(m.monitor_handle), IsOk());
  ASSERT_THAT(m.monitor->DeallocateCall(m.monitor_handle), IsOk());
  EXPECT_EQ(Stats().live.calls, 0u);
  EXPECT_EQ(Stats().live.call_handles, 0u);
  EXPECT_THAT(provider_->SetCallState(m.call.call_id(), v1::CALL_STATE_CONNECTED),
              InvalidCallHandle());
}

// --- Rule 9: LineClose, ForceLineClose, Shutdown ----------------------------

TEST_F(ServiceTest, LineCloseVoidsTheLineAndEveryHandleOnIt) {
  auto app = NewApp("app");
  auto other = NewApp("other");
  const uint64_t line = Open(*app, 0);
  const uint64_t keep_line = Open(*app, 1);
  const uint64_t other_line = Open(*other, 0, {kMonitor});
  auto other_events = other->WatchEvents();

  const v1::MakeCallResponse live = Make(*app, line);
  const v1::MakeCallResponse idle = Make(*app, line);
  ASSERT_THAT(app->Drop(idle.call_handle()), IsOk());
  const v1::MakeCallResponse kept = Make(*app, keep_line);
  const uint64_t other_handle = NextEvent(*other_events).app_new_call().call_handle();
  NextEvent(*other_events);  // DIALING of `live`

  ASSERT_THAT(app->LineClose(line), IsOk());
  EXPECT_THAT(app->LineClose(line), InvalidLineHandle());
  EXPECT_THAT(app->MakeCall(line, "1"), InvalidLineHandle());
  EXPECT_THAT(app->GetCallInfo(live.call_handle()), InvalidCallHandle());
  EXPECT_THAT(app->GetCallInfo(idle.call_handle()), InvalidCallHandle());
  EXPECT_THAT(app->GetCallStatus(kept.call_handle()), IsOk()) << "other lines untouched";

  // The live call it owned alone was dropped; the other holder sees IDLE and
  // keeps its handle.
  bool saw_idle = false;
  for (int i = 0; i < 4 && !saw_idle; ++i) {
    const v1::Event event = NextEvent(*other_events);
    saw_idle = event.has_call_state() && event.call_state().call_handle() == other_handle &&
               event.call_state().call_state() == v1::CALL_STATE_IDLE;
  }
  EXPECT_TRUE(saw_idle);
  EXPECT_EQ(StateOf(*other, other_handle), v1::CALL_STATE_IDLE);
  EXPECT_THAT(other->LineClose(other_line), IsOk());
}

TEST_F(ServiceTest, ForceLineCloseClosesEveryAppsLinesOnTheDeviceWithAnEvent) {
  auto a = NewApp("a");
  auto b = NewApp("b");
  const uint64_t a_line = Open(*a, 2, {kOwner});
  const uint64_t a_line2 = Open(*a, 2);
  const uint64_t b_line = Open(*b, 2, {kMonitor});
  const uint64_t b_other_device = Open(*b, 3);
  auto a_events = a->WatchEvents();
  auto b_events = b->WatchEvents();
  const v1::MakeCallResponse call = Make(*a, a_line2);
  const v1::MakeCallResponse survivor = Make(*b, b_other_device);

  ASSERT_THAT(provider_->ForceLineClose(2), IsOk());
  EXPECT_THAT(a->GetCallInfo(call.call_handle()), InvalidCallHandle());
  EXPECT_THAT(a->MakeCall(a_line, "1"), InvalidLineHandle());
  EXPECT_THAT(b->MakeCall(b_line, "1"), InvalidLineHandle());
  EXPECT_THAT(b->GetCallInfo(survivor.call_handle()), IsOk());

  auto closed_lines = [](EventStream& stream, int expected) {
    std::vector<uint64_t> lines;
    for (int i = 0; i < 10 && static_cast<int>(lines.size()) < expected; ++i) {
      const v1::Event event = NextEvent(stream);
      if (event.has_line_close()) lines.push_back(event.line_close().line_handle());
    }
    return lines;
  };
  EXPECT_THAT(closed_lines(*a_events, 2), UnorderedElementsAre(a_line, a_line2));
  EXPECT_THAT(closed_lines(*b_events, 1), ElementsAre(b_line));
  EXPECT_EQ(Stats().forced_line_closes, 3u);
  EXPECT_THAT(provider_->ForceLineClose(kDevices), NotFound("LINEERR_BADDEVICEID"));
}

TEST_F(ServiceTest, LineCloseByTheAppSendsItNoLineCloseEvent) {
  auto app = NewApp();
  auto events = app->WatchEvents();
  const uint64_t line = Open(*app, 0);
  ASSERT_THAT(app->LineClose(line), IsOk());
  Make(*app, Open(*app, 0));
  const v1::Event event = NextEvent(*events);
  EXPECT_TRUE(event.has_call_state()) << "the first event is the new call's, not a LINE_CLOSE";
}

TEST_F(ServiceTest, ShutdownClosesAllLinesAndVoidsTheToken) {
  auto app = NewApp("leaving");
  auto monitor = NewApp("monitor");
  Open(*monitor, 0, {kMonitor});
  auto monitor_events = monitor->WatchEvents();
  auto app_events = app->WatchEvents();
  const uint64_t line = Open(*app, 0);
  const v1::MakeCallResponse call = Make(*app, line);
  const uint64_t monitor_handle = NextEvent(*monitor_events).app_new_call().call_handle();
  // The stream is attached once its first event arrives (a stream that
  // reached the server only after Shutdown would rightly be refused).
  EXPECT_EQ(NextEvent(*app_events).call_state().call_state(), v1::CALL_STATE_DIALING);

  ASSERT_THAT(app->Shutdown(), IsOk());
  EXPECT_THAT(app->GetCallInfo(call.call_handle()), Uninitialized());
  EXPECT_THAT(app->LineOpen(0), Uninitialized());
  EXPECT_THAT(app->Shutdown(), Uninitialized());
  EXPECT_EQ(StateOf(*monitor, monitor_handle), v1::CALL_STATE_IDLE)
      << "the call the app owned alone was dropped";
  EXPECT_EQ(Stats().live.lines, 1u) << "only the monitor's line is left";

  // Its event stream ends cleanly.
  absl::Status end;
  for (int i = 0; i < 5 && end.ok(); ++i) end = app_events->Next(kEventWait).status();
  EXPECT_TRUE(absl::IsOutOfRange(end)) << end;
}

// --- Rule 10: other apps' handles --------------------------------------------

TEST_F(ServiceTest, AnotherAppsHandleAnswersExactlyAsAMissingOne) {
  auto owner = NewApp("owner");
  auto intruder = NewApp("intruder");
  const uint64_t line = Open(*owner, 0);
  const v1::MakeCallResponse call = Make(*owner, line);
  const uint64_t missing_call = call.call_handle() + (uint64_t{1} << 40);
  const uint64_t missing_line = line + (uint64_t{1} << 40);

  auto same = [](const absl::Status& foreign, const absl::Status& missing) {
    EXPECT_EQ(foreign.code(), missing.code());
    EXPECT_EQ(foreign.message(), missing.message());
    EXPECT_EQ(TapiReason(foreign), TapiReason(missing));
  };
  same(intruder->GetCallInfo(call.call_handle()).status(),
       intruder->GetCallInfo(missing_call).status());
  same(intruder->GetCallStatus(call.call_handle()).status(),
       intruder->GetCallStatus(missing_call).status());
  same(intruder->Answer(call.call_handle()), intruder->Answer(missing_call));
  same(intruder->Drop(call.call_handle()), intruder->Drop(missing_call));
  same(intruder->DeallocateCall(call.call_handle()), intruder->DeallocateCall(missing_call));
  same(intruder->LineClose(line), intruder->LineClose(missing_line));
  same(intruder->MakeCall(line, "1").status(), intruder->MakeCall(missing_line, "1").status());
  same(intruder->GetNewCalls(line).status(), intruder->GetNewCalls(missing_line).status());
  EXPECT_THAT(intruder->GetCallInfo(call.call_handle()), InvalidCallHandle());

  // And nothing of the owner's changed.
  EXPECT_EQ(StateOf(*owner, call.call_handle()), v1::CALL_STATE_DIALING);
  EXPECT_THAT(owner->MakeCall(line, "2"), IsOk());
}

// --- Rule 11: idempotent MakeCall ---------------------------------------------

TEST_F(ServiceTest, MakeCallWithASeenRequestIdReturnsTheFirstResponse) {
  auto app = NewApp();
  auto other = NewApp("other");
  const uint64_t line = Open(*app, 0);
  absl::StatusOr<v1::MakeCallResponse> first = app->MakeCall(line, "+1555", "req-1");
  ASSERT_THAT(first, IsOk());
  const uint64_t created = Stats().calls_created;
  absl::StatusOr<v1::MakeCallResponse> retry = app->MakeCall(line, "+1555", "req-1");
  ASSERT_THAT(retry, IsOk());
  EXPECT_EQ(retry->call_handle(), first->call_handle());
  EXPECT_EQ(retry->call_id(), first->call_id());
  EXPECT_EQ(Stats().calls_created, created) << "a retry creates nothing";

  EXPECT_THAT(app->MakeCall(line, "+1666", "req-1"), InvalidArgument("LINEERR_INVALPARAM"))
      << "a request_id reused for another call is refused";
  // Another app's request_ids are its own.
  absl::StatusOr<v1::MakeCallResponse> theirs = other->MakeCall(Open(*other, 0), "+1555", "req-1");
  ASSERT_THAT(theirs, IsOk());
  EXPECT_NE(theirs->call_id(), first->call_id());

  // The cache is bounded (4 per app in this test): old ids are forgotten.
  for (int i = 2; i <= 5; ++i)
    ASSERT_THAT(app->MakeCall(line, "+1555", absl::StrCat("req-", i)), IsOk());
  absl::StatusOr<v1::MakeCallResponse> forgotten = app->MakeCall(line, "+1555", "req-1");
  ASSERT_THAT(forgotten, IsOk());
  EXPECT_NE(forgotten->call_id(), first->call_id());
}

// --- Rule 12: bad input -------------------------------------------------------

TEST_F(ServiceTest, BadInputGetsItsPreciseErrorAndChangesNothing) {
  auto app = NewApp();
  const uint64_t line = Open(*app, 0);
  const v1::MakeCallResponse call = Make(*app, line);
  const CoreStats before = Stats();

  EXPECT_THAT(app->GetCallInfo(0), InvalidCallHandle());
  EXPECT_THAT(app->Drop(0), InvalidCallHandle());
  EXPECT_THAT(app->DeallocateCall(0), InvalidCallHandle());
  EXPECT_THAT(app->LineClose(0), InvalidLineHandle());
  EXPECT_THAT(app->MakeCall(0, "1"), InvalidLineHandle());
  EXPECT_THAT(app->GetNewCalls(0), InvalidLineHandle());
  EXPECT_THAT(app->GetCallStatus(~uint64_t{0}), InvalidCallHandle());
  EXPECT_THAT(app->LineOpen(kDevices), NotFound("LINEERR_BADDEVICEID"));
  EXPECT_THAT(provider_->OfferCall(kDevices, "", ""), NotFound("LINEERR_BADDEVICEID"));

  EXPECT_THAT(app->MakeCall(line, ""), InvalidArgument("LINEERR_INVALADDRESS"));
  EXPECT_THAT(app->MakeCall(line, std::string(129, '5')), InvalidArgument("LINEERR_INVALADDRESS"));
  EXPECT_THAT(app->MakeCall(line, std::string(128, '5')), IsOk()) << "128 bytes is allowed";
  EXPECT_THAT(app->MakeCall(line, "+1555\n"), InvalidArgument("LINEERR_INVALADDRESS"));
  EXPECT_THAT(app->MakeCall(line, std::string("12\0"
                                              "3",
                                              4)),
              InvalidArgument("LINEERR_INVALADDRESS"));
  EXPECT_THAT(app->MakeCall(line, "caf\xc3\xa9"), InvalidArgument("LINEERR_INVALADDRESS"));
  EXPECT_THAT(app->MakeCall(line, "1", std::string(129, 'r')),
              InvalidArgument("LINEERR_INVALPARAM"));
  EXPECT_THAT(provider_->OfferCall(0, std::string(200, '1'), ""),
              InvalidArgument("LINEERR_INVALADDRESS"));

  EXPECT_THAT(app->LineOpen(0, {static_cast<v1::CallPrivilege>(7)}),
              InvalidArgument("LINEERR_INVALPRIVSELECT"));
  EXPECT_THAT(app->LineOpen(0, {kOwner, v1::CALL_PRIVILEGE_UNSPECIFIED}),
              InvalidArgument("LINEERR_INVALPRIVSELECT"));
  EXPECT_THAT(provider_->SetCallState(call.call_id(), static_cast<CallState>(99)),
              InvalidArgument("LINEERR_INVALPARAM"));
  EXPECT_THAT(provider_->SetCallState(call.call_id(), v1::CALL_STATE_UNSPECIFIED),
              InvalidArgument("LINEERR_INVALPARAM"));
  EXPECT_THAT(app->Initialize(std::string(129, 'n')), InvalidArgument("LINEERR_INVALAPPNAME"));

  const CoreStats after = Stats();
  EXPECT_EQ(after.live.lines, before.live.lines);
  EXPECT_EQ(after.live.calls, before.live.calls + 1) << "only the 128-byte call";
  EXPECT_EQ(after.calls_created, before.calls_created + 1);
  EXPECT_EQ(StateOf(*app, call.call_handle()), v1::CALL_STATE_DIALING);
}

TEST_F(ServiceTest, OversizedMessagesAreRefusedByTheTransport) {
  auto app = NewApp();
  const uint64_t line = Open(*app, 0);
  const uint64_t calls_before = Stats().calls_created;
  EXPECT_THAT(app->MakeCall(line, std::string(64 * 1024, '1')),
              IsStatusCode(absl::StatusCode::kResourceExhausted));
  EXPECT_EQ(Stats().calls_created, calls_before);
  EXPECT_THAT(app->MakeCall(line, "1"), IsOk()) << "the connection still serves";
}

// --- Identity ------------------------------------------------------------------

TEST_F(ServiceTest, AppRpcsNeedAValidToken) {
  CallSessionClient anonymous(channel_);
  EXPECT_THAT(anonymous.LineOpen(0), Uninitialized());
  anonymous.set_token("0123456789abcdef0123456789abcdef0123456789abcdef");
  EXPECT_THAT(anonymous.LineOpen(0), Uninitialized());
  anonymous.set_token("short");
  EXPECT_THAT(anonymous.GetCallInfo(1), Uninitialized());

  auto app = NewApp();
  // A raw call with a malformed authorization header.
  grpc::ClientContext context;
  context.AddMetadata("authorization", "Basic " + app->token());
  v1::LineOpenResponse response;
  grpc::Status status = app->stub().LineOpen(&context, v1::LineOpenRequest(), &response);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::UNAUTHENTICATED);
}

TEST_F(ServiceTest, ProviderRpcsNeedTheProviderTokenNotAnAppToken) {
  auto app = NewApp();
  ProviderClient impostor(channel_, app->token());
  EXPECT_THAT(impostor.OfferCall(0, "", ""), Uninitialized());
  ProviderClient wrong(channel_, "provider-secret-for-test");
  EXPECT_THAT(wrong.ForceLineClose(0), Uninitialized());
  ProviderClient none(channel_, "");
  EXPECT_THAT(none.SetCallState(1, v1::CALL_STATE_IDLE), Uninitialized());
  EXPECT_EQ(Stats().calls_created, 0u);
}

TEST_F(ServiceTest, WithNoProviderTokenConfiguredTheProviderServiceAcceptsNothing) {
  server_->Shutdown(absl::ZeroDuration());
  StartServer("");
  ProviderClient empty(channel_, "");
  EXPECT_THAT(empty.OfferCall(0, "", ""), Uninitialized());
  ProviderClient guess(channel_, kProviderToken);
  EXPECT_THAT(guess.OfferCall(0, "", ""), Uninitialized());
}

// --- Error details ----------------------------------------------------------------

TEST_F(ServiceTest, ErrorsCarryGoogleRpcStatusWithErrorInfo) {
  auto app = NewApp();
  grpc::ClientContext context;
  PrepareContext(&context, absl::Seconds(5), app->token());
  v1::GetCallInfoRequest request;
  request.set_call_handle(42);
  v1::GetCallInfoResponse response;
  grpc::Status status = app->stub().GetCallInfo(&context, request, &response);
  ASSERT_EQ(status.error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_TRUE(absl::StartsWith(status.error_message(), "LINEERR_INVALCALLHANDLE: "));

  google::rpc::Status details;
  ASSERT_TRUE(details.ParseFromString(status.error_details()));
  EXPECT_EQ(details.code(), grpc::StatusCode::NOT_FOUND);
  ASSERT_EQ(details.details_size(), 1);
  google::rpc::ErrorInfo info;
  ASSERT_TRUE(details.details(0).UnpackTo(&info));
  EXPECT_EQ(info.reason(), "LINEERR_INVALCALLHANDLE");
  EXPECT_EQ(info.domain(), "callsession.v1");
}

// --- Event stream ---------------------------------------------------------------------

TEST_F(ServiceTest, EventsQueuedBeforeWatchingAreDeliveredInSequence) {
  auto app = NewApp();
  const v1::MakeCallResponse call = Make(*app, Open(*app, 0));
  ASSERT_THAT(provider_->SetCallState(call.call_id(), v1::CALL_STATE_CONNECTED), IsOk());
  ASSERT_THAT(app->Drop(call.call_handle()), IsOk());
  auto events = app->WatchEvents();
  uint64_t last_sequence = 0;
  for (CallState expected :
       {v1::CALL_STATE_DIALING, v1::CALL_STATE_CONNECTED, v1::CALL_STATE_IDLE}) {
    const v1::Event event = NextEvent(*events);
    EXPECT_EQ(event.call_state().call_state(), expected);
    EXPECT_GT(event.sequence(), last_sequence);
    EXPECT_GT(event.time().seconds(), 0);
    last_sequence = event.sequence();
  }
}

TEST_F(ServiceTest, ANewStreamReplacesTheOldOne) {
  auto app = NewApp();
  auto old_stream = app->WatchEvents();
  Make(*app, Open(*app, 0));
  EXPECT_TRUE(NextEvent(*old_stream).has_call_state()) << "the old stream is live";
  auto new_stream = app->WatchEvents();
  absl::Status ended;
  for (int i = 0; i < 3 && ended.ok(); ++i) ended = old_stream->Next(kEventWait).status();
  EXPECT_THAT(ended, IsStatusCode(absl::StatusCode::kAborted));
  Make(*app, Open(*app, 1));
  EXPECT_TRUE(NextEvent(*new_stream).has_call_state());
}

TEST_F(ServiceTest, WatchEventsNeedsAToken) {
  CallSessionClient anonymous(channel_);
  auto events = anonymous.WatchEvents();
  EXPECT_THAT(events->Next(kEventWait), Uninitialized());
}

TEST_F(ServiceTest, ServerShutdownEndsStreams) {
  auto app = NewApp();
  auto events = app->WatchEvents();
  Make(*app, Open(*app, 0));
  NextEvent(*events);
  server_->Shutdown(absl::Seconds(1));
  EXPECT_THAT(events->Next(kEventWait), IsStatusCode(absl::StatusCode::kUnavailable));
}

}  // namespace
}  // namespace callsession
