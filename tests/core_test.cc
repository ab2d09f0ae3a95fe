// Tests of the call model through CallSessionCore directly, with no gRPC.
// The full list of semantic rules is tested through a real channel in
// service_test.cc; these cover what is easier to see from inside: the
// injected clock, counters, and concurrency.
#include <atomic>
#include <string>
#include <thread>
#include <vector>

#include "absl/random/random.h"
#include "server/core/call_session_core.h"
#include "server/core/tapi_error.h"
#include "tests/test_support.h"

namespace callsession {
namespace {

constexpr char kProviderToken[] = "provider-secret";

class CoreTest : public ::testing::Test {
 protected:
  CoreTest() : core_(Options()) {}

  CoreOptions Options() {
    CoreOptions options;
    options.num_devices = 4;
    options.shards = 8;
    options.provider_token = kProviderToken;
    options.clock = &clock_;
    return options;
  }

  std::string Init(const std::string& name) {
    v1::InitializeRequest request;
    request.set_app_name(name);
    v1::InitializeResponse response;
    EXPECT_THAT(core_.Initialize(request, &response), IsOk());
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

  FakeClock clock_;
  CallSessionCore core_;
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

TEST_F(CoreTest, OptionsAreValidated) {
  CoreOptions options;
  EXPECT_THAT(ValidateCoreOptions(options), IsOk());
  options.shards = 48;
  EXPECT_EQ(ValidateCoreOptions(options).code(), absl::StatusCode::kInvalidArgument);
  options.shards = 64;
  options.num_devices = 0;
  EXPECT_EQ(ValidateCoreOptions(options).code(), absl::StatusCode::kInvalidArgument);
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
