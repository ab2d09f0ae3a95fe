// Tests of the call model through CallSessionCore directly, with no gRPC.
// The full list of semantic rules is tested through a real channel in
// service_test.cc; these cover what is easier to see from inside: the
// injected clock, counters, and concurrency.
#include <algorithm>
#include <atomic>
#include <functional>
#include <string>
#include <thread>
#include <vector>

#include "absl/random/random.h"
#include "absl/strings/str_cat.h"
#include "server/core/call_session_core.h"
#include "server/core/tapi_error.h"
#include "tests/test_support.h"

namespace callsession {
namespace {

constexpr char kProviderToken[] = "provider-secret";

class CoreTest : public ::testing::Test {
 protected:
  explicit CoreTest(std::function<void(CoreOptions&)> configure = nullptr)
      : core_(Options(configure)) {}

  CoreOptions Options(const std::function<void(CoreOptions&)>& configure) {
    CoreOptions options;
    options.num_devices = 4;
    options.shards = 8;
    options.provider_token = kProviderToken;
    options.clock = &clock_;
    if (configure) configure(options);
    return options;
  }

  std::string Init(const std::string& name) {
    v1::InitializeRequest request;
    request.set_app_name(name);
    v1::InitializeResponse response;
    EXPECT_THAT(core_.Initialize({}, request, &response), IsOk());
    return response.app_token();
  }

  uint64_t Open(const std::string& token, uint32_t device,
                std::vector<v1::CallPrivilege> privileges = {}) {
    v1::LineOpenRequest request;
    request.set_device_id(device);
    for (auto p : privileges) request.add_privileges(p);
    v1::LineOpenResponse response;
    EXPECT_THAT(core_.LineOpen(token, request, &response), IsOk());
    return response.line_handle();
  }

  absl::StatusOr<v1::MakeCallResponse> Make(const std::string& token, uint64_t line,
                                            const std::string& dest = "100") {
    v1::MakeCallRequest request;
    request.set_line_handle(line);
    request.set_dest_address(dest);
    v1::MakeCallResponse response;
    absl::Status status = core_.MakeCall(token, request, &response);
    if (!status.ok()) return status;
    return response;
  }

  absl::StatusOr<v1::CallStatus> Status(const std::string& token, uint64_t call) {
    v1::GetCallStatusRequest request;
    request.set_call_handle(call);
    v1::GetCallStatusResponse response;
    absl::Status status = core_.GetCallStatus(token, request, &response);
    if (!status.ok()) return status;
    return response.status();
  }

  absl::Status SetState(uint64_t call_id, v1::CallState state) {
    v1::SetCallStateRequest request;
    request.set_call_id(call_id);
    request.set_call_state(state);
    v1::SetCallStateResponse response;
    return core_.SetCallState(kProviderToken, request, &response);
  }

  absl::Status Drop(const std::string& token, uint64_t call) {
    v1::DropRequest request;
    request.set_call_handle(call);
    v1::DropResponse response;
    return core_.Drop(token, request, &response);
  }

  absl::Status Deallocate(const std::string& token, uint64_t call) {
    v1::DeallocateCallRequest request;
    request.set_call_handle(call);
    v1::DeallocateCallResponse response;
    return core_.DeallocateCall(token, request, &response);
  }

  absl::Status Close(const std::string& token, uint64_t line) {
    v1::LineCloseRequest request;
    request.set_line_handle(line);
    v1::LineCloseResponse response;
    return core_.LineClose(token, request, &response);
  }

  absl::StatusOr<uint64_t> Offer(uint32_t device) {
    v1::OfferCallRequest request;
    request.set_device_id(device);
    v1::OfferCallResponse response;
    absl::Status status = core_.OfferCall(kProviderToken, request, &response);
    if (!status.ok()) return status;
    return response.call_id();
  }

  absl::StatusOr<v1::ListCallsResponse> List(const std::string& token,
                                             const std::string& page_token = "",
                                             uint32_t page_size = 0) {
    v1::ListCallsRequest request;
    request.set_page_token(page_token);
    request.set_page_size(page_size);
    v1::ListCallsResponse response;
    absl::Status status = core_.ListCalls(token, request, &response);
    if (!status.ok()) return status;
    return response;
  }

  absl::Status KeepAlive(const std::string& token) {
    v1::KeepAliveResponse response;
    return core_.KeepAlive(token, v1::KeepAliveRequest(), &response);
  }

  FakeClock clock_;
  CallSessionCore core_;
};

// A sink that only records; the tests pull with Next.
class NullSink final : public EventSink {
 public:
  void OnEventsAvailable() override {}
  void OnSubscriptionEnded(const absl::Status& why) override {}
};

TEST_F(CoreTest, StateEntryTimeComesFromTheInjectedClock) {
  const std::string app = Init("a");
  const uint64_t line = Open(app, 0);
  auto call = Make(app, line);
  ASSERT_THAT(call, IsOk());
  const absl::Time created = clock_.Now();
  clock_.Advance(absl::Seconds(42));
  ASSERT_THAT(SetState(call->call_id(), v1::CALL_STATE_CONNECTED), IsOk());
  auto status = Status(app, call->call_handle());
  ASSERT_THAT(status, IsOk());
  EXPECT_EQ(status->state_entry_time().seconds(), absl::ToUnixSeconds(created) + 42);

  v1::GetCallInfoRequest request;
  request.set_call_handle(call->call_handle());
  v1::GetCallInfoResponse info;
  ASSERT_THAT(core_.GetCallInfo(app, request, &info), IsOk());
  EXPECT_EQ(info.info().create_time().seconds(), absl::ToUnixSeconds(created));
}

TEST_F(CoreTest, ErrorsCarryTheTapiNameAndCode) {
  const std::string app = Init("a");
  absl::Status status = Drop(app, 12345);
  EXPECT_THAT(status, IsTapiError(absl::StatusCode::kNotFound, "LINEERR_INVALCALLHANDLE"));
  EXPECT_EQ(TapiErrorName(status), "LINEERR_INVALCALLHANDLE");
  EXPECT_THAT(Drop("not-a-token", 1),
              IsTapiError(absl::StatusCode::kUnauthenticated, "LINEERR_UNINITIALIZED"));
}

TEST_F(CoreTest, TokenWithRightHandleButWrongSecretIsRejected) {
  std::string app = Init("a");
  app.back() = app.back() == '0' ? '1' : '0';
  v1::LineOpenRequest request;
  v1::LineOpenResponse response;
  EXPECT_THAT(core_.LineOpen(app, request, &response),
              IsTapiError(absl::StatusCode::kUnauthenticated, "LINEERR_UNINITIALIZED"));
}

TEST_F(CoreTest, CountersTrackALifecycleAndTheStoreEmpties) {
  const std::string app = Init("a");
  const uint64_t line = Open(app, 1);
  auto call = Make(app, line);
  ASSERT_THAT(call, IsOk());
  CoreStats stats = core_.Stats();
  EXPECT_EQ(stats.live.calls, 1u);
  EXPECT_EQ(stats.live.call_handles, 1u);
  EXPECT_EQ(stats.calls_created, 1u);

  ASSERT_THAT(Drop(app, call->call_handle()), IsOk());
  EXPECT_EQ(core_.Stats().live.calls, 1u) << "an IDLE call stays while a handle holds it";
  ASSERT_THAT(Deallocate(app, call->call_handle()), IsOk());
  stats = core_.Stats();
  EXPECT_EQ(stats.live.calls, 0u);
  EXPECT_EQ(stats.live.call_handles, 0u);
  EXPECT_EQ(stats.calls_freed, 1u);
  EXPECT_EQ(stats.call_handles_voided, 1u);
}

TEST_F(CoreTest, LineCloseDropsOwnedCallsAndCountsThem) {
  const std::string app = Init("a");
  const uint64_t line = Open(app, 1);
  ASSERT_THAT(Make(app, line), IsOk());
  ASSERT_THAT(Make(app, line), IsOk());
  ASSERT_THAT(Close(app, line), IsOk());
  const CoreStats stats = core_.Stats();
  EXPECT_EQ(stats.calls_dropped_by_line_close, 2u);
  EXPECT_EQ(stats.live.calls, 0u) << "dropped, IDLE and unheld: freed";
  EXPECT_EQ(stats.live.lines, 0u);
}

TEST_F(CoreTest, ListCallsPagesThroughEveryHandleInOrder) {
  const std::string app = Init("a");
  const uint64_t line_a = Open(app, 0);
  const uint64_t line_b = Open(app, 1, {v1::CALL_PRIVILEGE_OWNER});
  std::vector<uint64_t> handles;
  for (int i = 0; i < 4; ++i) {
    auto call = Make(app, i % 2 == 0 ? line_a : line_b, absl::StrCat("10", i));
    ASSERT_THAT(call, IsOk());
    handles.push_back(call->call_handle());
  }
  ASSERT_THAT(Drop(app, handles[1]), IsOk());
  std::sort(handles.begin(), handles.end());

  std::vector<uint64_t> listed;
  std::string page_token;
  int pages = 0;
  do {
    auto page = List(app, page_token, 3);
    ASSERT_THAT(page, IsOk());
    ++pages;
    // Every event raised so far: 4 DIALING and 1 IDLE.
    EXPECT_EQ(page->resume_sequence(), 6u);
    for (const v1::CallHandleEntry& entry : page->calls()) {
      listed.push_back(entry.call_handle());
      auto status = Status(app, entry.call_handle());
      ASSERT_THAT(status, IsOk());
      EXPECT_EQ(entry.status().call_state(), status->call_state());
      EXPECT_EQ(entry.info().call_id() != 0, true);
      EXPECT_TRUE(entry.info().line_handle() == line_a || entry.info().line_handle() == line_b);
    }
    page_token = page->next_page_token();
  } while (!page_token.empty());
  EXPECT_EQ(pages, 2);
  EXPECT_EQ(listed, handles);
  EXPECT_THAT(List(app, "not-a-token"),
              IsTapiError(absl::StatusCode::kInvalidArgument, "LINEERR_INVALPARAM"));
  auto other = List(Init("b"));
  ASSERT_THAT(other, IsOk());
  EXPECT_EQ(other->calls_size(), 0) << "only the caller's own handles";
}

TEST_F(CoreTest, OptionsAreValidated) {
  CoreOptions options;
  EXPECT_THAT(ValidateCoreOptions(options), IsOk());
  options.shards = 48;
  EXPECT_EQ(ValidateCoreOptions(options).code(), absl::StatusCode::kInvalidArgument);
  options.shards = 64;
  options.num_devices = 0;
  EXPECT_EQ(ValidateCoreOptions(options).code(), absl::StatusCode::kInvalidArgument);
}

class LeaseTest : public CoreTest {
 protected:
  LeaseTest() : CoreTest([](CoreOptions& o) { o.app_ttl = absl::Seconds(60); }) {}
};

TEST_F(LeaseTest, AnIdleAppIsShutDownAsIfItHadCalledShutdown) {
  const std::string owner = Init("owner");
  const std::string monitor = Init("monitor");
  const uint64_t owner_line = Open(owner, 0);
  const uint64_t monitor_line = Open(monitor, 0, {v1::CALL_PRIVILEGE_MONITOR});
  auto call = Make(owner, owner_line);
  ASSERT_THAT(call, IsOk());
  v1::GetNewCallsRequest request;
  request.set_line_handle(monitor_line);
  v1::GetNewCallsResponse response;
  ASSERT_THAT(core_.GetNewCalls(monitor, request, &response), IsOk());
  auto listed = List(monitor);
  ASSERT_THAT(listed, IsOk());
  ASSERT_EQ(listed->calls_size(), 1);
  const uint64_t monitor_handle = listed->calls(0).call_handle();

  clock_.Advance(absl::Seconds(40));
  ASSERT_THAT(KeepAlive(monitor), IsOk());
  clock_.Advance(absl::Seconds(19));
  EXPECT_EQ(core_.ExpireIdleApps(), 0u) << "59 s idle is within the lease";
  clock_.Advance(absl::Seconds(1));
  EXPECT_EQ(core_.ExpireIdleApps(), 1u) << "the owner, idle 60 s; not the monitor";

  EXPECT_THAT(KeepAlive(owner),
              IsTapiError(absl::StatusCode::kUnauthenticated, "LINEERR_UNINITIALIZED"));
  auto status = Status(monitor, monitor_handle);
  ASSERT_THAT(status, IsOk());
  EXPECT_EQ(status->call_state(), v1::CALL_STATE_IDLE) << "its sole-owned call was dropped";
  const CoreStats stats = core_.Stats();
  EXPECT_EQ(stats.apps_expired, 1u);
  EXPECT_EQ(stats.live.apps, 1u);
  EXPECT_EQ(stats.live.lines, 1u);
  EXPECT_EQ(stats.live.call_handles, 1u) << "only the monitor's handle is left";
}

TEST_F(LeaseTest, AnOpenEventStreamKeepsTheLeaseAndItRunsFromTheStreamsEnd) {
  const std::string app = Init("a");
  auto subscription =
      core_.WatchEvents(app, v1::WatchEventsRequest(), std::make_shared<NullSink>());
  ASSERT_THAT(subscription, IsOk());
  clock_.Advance(absl::Hours(2));
  EXPECT_EQ(core_.ExpireIdleApps(), 0u);
  subscription->reset();
  clock_.Advance(absl::Seconds(59));
  EXPECT_EQ(core_.ExpireIdleApps(), 0u);
  clock_.Advance(absl::Seconds(1));
  EXPECT_EQ(core_.ExpireIdleApps(), 1u);
}

TEST_F(CoreTest, LeasesAreOffUnlessConfigured) {
  const std::string app = Init("a");
  clock_.Advance(absl::Hours(24 * 365));
  EXPECT_EQ(core_.ExpireIdleApps(), 0u);
  EXPECT_THAT(KeepAlive(app), IsOk());
}

class QuotaTest : public CoreTest {
 protected:
  QuotaTest()
      : CoreTest([](CoreOptions& o) {
          o.max_apps = 3;
          o.max_lines_per_app = 2;
          o.max_call_handles_per_app = 2;
          o.request_id_ttl = absl::Minutes(1);
        }) {}
};

TEST_F(QuotaTest, AppsPastTheLimitAreRefusedUntilOneLeaves) {
  const std::string a = Init("a");
  Init("b");
  Init("c");
  v1::InitializeRequest request;
  v1::InitializeResponse response;
  EXPECT_THAT(core_.Initialize({}, request, &response),
              IsTapiError(absl::StatusCode::kResourceExhausted, "LINEERR_RESOURCEUNAVAIL"));
  EXPECT_EQ(core_.Stats().live.apps, 3u);
  v1::ShutdownResponse shut;
  ASSERT_THAT(core_.Shutdown(a, v1::ShutdownRequest(), &shut), IsOk());
  EXPECT_THAT(core_.Initialize({}, request, &response), IsOk());
  EXPECT_EQ(core_.Stats().quota_rejections, 1u);
}

TEST_F(QuotaTest, LinesPastTheLimitAreRefusedAndNothingChanges) {
  const std::string app = Init("a");
  const uint64_t first = Open(app, 0);
  Open(app, 1);
  v1::LineOpenRequest request;
  request.set_device_id(2);
  v1::LineOpenResponse response;
  EXPECT_THAT(core_.LineOpen(app, request, &response),
              IsTapiError(absl::StatusCode::kResourceExhausted, "LINEERR_RESOURCEUNAVAIL"));
  EXPECT_EQ(core_.Stats().live.lines, 2u);
  const std::string other = Init("b");
  Open(other, 2);  // the quota is per application
  ASSERT_THAT(Close(app, first), IsOk());
  EXPECT_THAT(core_.LineOpen(app, request, &response), IsOk());
}

TEST_F(QuotaTest, MakeCallPastTheHandleLimitCreatesNothing) {
  const std::string app = Init("a");
  const uint64_t line = Open(app, 0);
  auto first = Make(app, line);
  ASSERT_THAT(first, IsOk());
  ASSERT_THAT(Make(app, line), IsOk());
  const CoreStats before = core_.Stats();
  EXPECT_THAT(Make(app, line),
              IsTapiError(absl::StatusCode::kResourceExhausted, "LINEERR_RESOURCEUNAVAIL"));
  const CoreStats after = core_.Stats();
  EXPECT_EQ(after.calls_created, before.calls_created);
  EXPECT_EQ(after.live.call_handles, 2u);
  ASSERT_THAT(Drop(app, first->call_handle()), IsOk());
  ASSERT_THAT(Deallocate(app, first->call_handle()), IsOk());
  EXPECT_THAT(Make(app, line), IsOk()) << "a voided handle gives its quota back";
}

TEST_F(QuotaTest, AnOwnerAtItsLimitIsSkippedWhenCallsAreOffered) {
  const std::string first = Init("first");
  const std::string second = Init("second");
  Open(first, 0, {v1::CALL_PRIVILEGE_OWNER});
  Open(second, 0, {v1::CALL_PRIVILEGE_OWNER});
  for (int i = 0; i < 3; ++i) ASSERT_THAT(Offer(0), IsOk());
  auto first_calls = List(first);
  auto second_calls = List(second);
  ASSERT_THAT(first_calls, IsOk());
  ASSERT_THAT(second_calls, IsOk());
  EXPECT_EQ(first_calls->calls_size(), 2);
  EXPECT_EQ(second_calls->calls_size(), 1) << "the third call went to the next owner line";
}

TEST_F(QuotaTest, GetNewCallsPastTheLimitIssuesNothing) {
  for (int i = 0; i < 3; ++i) ASSERT_THAT(Offer(0), IsOk());
  const std::string app = Init("a");
  const uint64_t line = Open(app, 0, {v1::CALL_PRIVILEGE_MONITOR});
  v1::GetNewCallsRequest request;
  request.set_line_handle(line);
  v1::GetNewCallsResponse response;
  EXPECT_THAT(core_.GetNewCalls(app, request, &response),
              IsTapiError(absl::StatusCode::kResourceExhausted, "LINEERR_RESOURCEUNAVAIL"));
  EXPECT_EQ(response.call_handles_size(), 0);
  EXPECT_EQ(core_.Stats().live.call_handles, 0u);
}

TEST_F(QuotaTest, ARequestIdIsForgottenAfterItsTtl) {
  const std::string app = Init("a");
  const uint64_t line = Open(app, 0);
  v1::MakeCallRequest request;
  request.set_line_handle(line);
  request.set_dest_address("100");
  request.set_request_id("retry-me");
  v1::MakeCallResponse first;
  ASSERT_THAT(core_.MakeCall(app, request, &first), IsOk());
  clock_.Advance(absl::Seconds(59));
  v1::MakeCallResponse retry;
  ASSERT_THAT(core_.MakeCall(app, request, &retry), IsOk());
  EXPECT_EQ(retry.call_handle(), first.call_handle()) << "a retry within the TTL";
  clock_.Advance(absl::Seconds(1));
  v1::MakeCallResponse later;
  ASSERT_THAT(core_.MakeCall(app, request, &later), IsOk());
  EXPECT_NE(later.call_handle(), first.call_handle()) << "past the TTL the key is new";
  EXPECT_EQ(core_.Stats().calls_created, 2u);
}

// Regression (found by ThreadSanitizer in ConcurrentLifecyclesLeaveNothingBehind):
// DeallocateCall touched its handle's line after removing the handle from the
// store, so a ForceLineClose voiding that line could skip the handle, finish
// and free the line first. Under TSan or ASan this fails within a few hundred
// rounds if the order is wrong.
TEST_F(CoreTest, DeallocateRacingForceLineCloseNeverTouchesAFreedLine) {
  constexpr int kRounds = 3000;
  std::atomic<bool> done{false};
  std::thread closer([&] {
    v1::ForceLineCloseRequest request;
    request.set_device_id(2);
    v1::ForceLineCloseResponse response;
    while (!done.load())
      ASSERT_THAT(core_.ForceLineClose(kProviderToken, request, &response), IsOk());
  });
  const std::string app = Init("a");
  int deallocated = 0;
  for (int i = 0; i < kRounds; ++i) {
    const uint64_t line = Open(app, 2);
    auto call = Make(app, line);
    if (!call.ok()) continue;  // the line was force-closed already
    if (!Drop(app, call->call_handle()).ok()) continue;
    deallocated += Deallocate(app, call->call_handle()).ok();
  }
  done = true;
  closer.join();
  EXPECT_GT(deallocated, 0);
  v1::ShutdownResponse response;
  ASSERT_THAT(core_.Shutdown(app, v1::ShutdownRequest(), &response), IsOk());
  const CoreStats stats = core_.Stats();
  EXPECT_EQ(stats.live.call_handles, 0u);
  EXPECT_EQ(stats.calls_created, stats.calls_freed);
}

// Many apps at once place, read, drop and deallocate calls, while the
// provider offers calls and force-closes lines and apps close lines and shut
// down. Every operation must either succeed or fail with an expected TAPI
// error; at the end, with everyone shut down, every counter balances and the
// store is empty.
TEST_F(CoreTest, ConcurrentLifecyclesLeaveNothingBehind) {
  constexpr int kThreads = 4;
  constexpr int kIterations = 3000;
  std::atomic<int> unexpected{0};
  auto expect_ok_or = [&](const absl::Status& status,
                          std::initializer_list<absl::string_view> allowed) {
    if (status.ok()) return;
    for (absl::string_view name : allowed) {
      if (TapiErrorName(status) == name) return;
    }
    ++unexpected;
    ADD_FAILURE() << status;
  };

  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&] {
      absl::BitGen random;
      std::string app = Init("worker");
      std::vector<uint64_t> lines;
      std::vector<uint64_t> calls;
      for (int i = 0; i < kIterations; ++i) {
        const uint32_t device = absl::Uniform<uint32_t>(random, 0, 2);
        const int dice = absl::Uniform(random, 0, 100);
        if (lines.empty() || dice < 5) {
          lines.push_back(
              Open(app, device, {v1::CALL_PRIVILEGE_OWNER, v1::CALL_PRIVILEGE_MONITOR}));
        } else if (dice < 40) {
          auto call = Make(app, lines[absl::Uniform<size_t>(random, 0, lines.size())]);
          expect_ok_or(call.status(), {"LINEERR_INVALLINEHANDLE"});
          if (call.ok()) calls.push_back(call->call_handle());
        } else if (dice < 55 && !calls.empty()) {
          expect_ok_or(Drop(app, calls[absl::Uniform<size_t>(random, 0, calls.size())]),
                       {"LINEERR_INVALCALLHANDLE", "LINEERR_INVALCALLSTATE", "LINEERR_NOTOWNER"});
        } else if (dice < 70 && !calls.empty()) {
          const size_t k = absl::Uniform<size_t>(random, 0, calls.size());
          absl::Status status = Deallocate(app, calls[k]);
          expect_ok_or(status, {"LINEERR_INVALCALLHANDLE", "LINEERR_INVALCALLSTATE"});
          if (status.ok() || absl::IsNotFound(status)) {
            calls[k] = calls.back();
            calls.pop_back();
          }
        } else if (dice < 80) {
          v1::OfferCallRequest request;
          request.set_device_id(device);
          v1::OfferCallResponse response;
          expect_ok_or(core_.OfferCall(kProviderToken, request, &response), {});
          expect_ok_or(SetState(response.call_id(), v1::CALL_STATE_IDLE),
                       {"LINEERR_INVALCALLHANDLE", "LINEERR_INVALCALLSTATE"});
        } else if (dice < 88 && !calls.empty()) {
          expect_ok_or(Status(app, calls[0]).status(), {"LINEERR_INVALCALLHANDLE"});
        } else if (dice < 94) {
          const size_t k = absl::Uniform<size_t>(random, 0, lines.size());
          expect_ok_or(Close(app, lines[k]), {"LINEERR_INVALLINEHANDLE"});
          lines.erase(lines.begin() + k);
        } else if (dice < 96) {
          v1::ForceLineCloseRequest request;
          request.set_device_id(device);
          v1::ForceLineCloseResponse response;
          expect_ok_or(core_.ForceLineClose(kProviderToken, request, &response), {});
        } else if (dice < 97) {
          v1::ShutdownResponse response;
          expect_ok_or(core_.Shutdown(app, v1::ShutdownRequest(), &response), {});
          app = Init("worker");
          lines.clear();
          calls.clear();
        }
      }
      v1::ShutdownResponse response;
      expect_ok_or(core_.Shutdown(app, v1::ShutdownRequest(), &response), {});
    });
  }
  for (std::thread& thread : threads) thread.join();

  EXPECT_EQ(unexpected.load(), 0);
  // Inbound calls nobody held and the provider did not end are still
  // tracked (as on a real switch); end them so that everything balances.
  CoreStats stats = core_.Stats();
  EXPECT_EQ(stats.live.apps, 0u);
  EXPECT_EQ(stats.live.lines, 0u);
  EXPECT_EQ(stats.live.call_handles, 0u);
  EXPECT_EQ(stats.call_handles_created, stats.call_handles_voided);
  EXPECT_EQ(stats.calls_created, stats.calls_freed + stats.live.calls);
  EXPECT_GT(stats.calls_created, 1000u) << "the test did real work";
}

}  // namespace
}  // namespace callsession
