// Arbitrary bytes as request messages. The input is a series of records
// [rpc byte][length byte][length bytes]; each record's bytes are parsed as
// the request message of the RPC it names (whatever the parser makes of
// them, even when it reports failure) and sent, with a valid app or
// provider token, into a core that already holds apps, lines and calls.
// Nothing may crash, hang or leak; after every request the core's counters
// must agree with its live entries, and once every app has shut down the
// store must be empty.
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "google/protobuf/stubs/logging.h"
#include "server/core/call_session_core.h"
#include "server/core/log.h"
#include "tests/test_support.h"

namespace callsession {
namespace {

constexpr char kProvider[] = "fuzz-provider";

void Check(bool ok, const std::string& what) {
  if (!ok) {
    std::fprintf(stderr, "invariant broken: %s\n", what.c_str());
    std::abort();
  }
}

void CheckCounters(const CallSessionCore& core) {
  const CoreStats stats = core.Stats();
  Check(stats.call_handles_created - stats.call_handles_voided == stats.live.call_handles,
        absl::StrCat("handles: created ", stats.call_handles_created, ", voided ",
                     stats.call_handles_voided, ", live ", stats.live.call_handles));
  Check(stats.calls_created - stats.calls_freed == stats.live.calls,
        absl::StrCat("calls: created ", stats.calls_created, ", freed ", stats.calls_freed,
                     ", live ", stats.live.calls));
}

template <typename Request, typename Response, typename Method>
void Send(CallSessionCore& core, Method method, const std::string& token, const uint8_t* data,
          size_t size) {
  Request request;
  (void)request.ParseFromArray(data, static_cast<int>(size));
  Response response;
  (void)(core.*method)(token, request, &response);
}

class World {
 public:
  World() : core_(Options()) {
    for (int i = 0; i < 2; ++i) {
      v1::InitializeRequest request;
      request.set_app_name("fuzz");
      v1::InitializeResponse response;
      Check(core_.Initialize({}, request, &response).ok(), "Initialize");
      tokens_.push_back(response.app_token());
      for (uint32_t device = 0; device < 2; ++device) {
        v1::LineOpenRequest open;
        open.set_device_id(device);
        open.add_privileges(v1::CALL_PRIVILEGE_OWNER);
        if (i == 1) open.add_privileges(v1::CALL_PRIVILEGE_MONITOR);
        v1::LineOpenResponse line;
        Check(core_.LineOpen(tokens_.back(), open, &line).ok(), "LineOpen");
        v1::MakeCallRequest make;
        make.set_line_handle(line.line_handle());
        make.set_dest_address("100");
        v1::MakeCallResponse call;
        Check(core_.MakeCall(tokens_.back(), make, &call).ok(), "MakeCall");
      }
    }
    for (uint32_t device = 0; device < 2; ++device) {
      v1::OfferCallRequest offer;
      offer.set_device_id(device);
      v1::OfferCallResponse response;
      Check(core_.OfferCall(kProvider, offer, &response).ok(), "OfferCall");
    }
  }

  void Run(const uint8_t* data, size_t size) {
    size_t pos = 0;
    while (pos + 2 <= size) {
      const uint8_t rpc = data[pos];
      const size_t length = std::min<size_t>(data[pos + 1], size - pos - 2);
      const uint8_t* body = data + pos + 2;
      pos += 2 + length;
      const std::string& token = tokens_[rpc >> 7];
      switch (rpc % 16) {
        case 0:
          Send<v1::LineOpenRequest, v1::LineOpenResponse>(core_, &CallSessionCore::LineOpen, token,
                                                          body, length);
          break;
        case 1:
          Send<v1::LineCloseRequest, v1::LineCloseResponse>(core_, &CallSessionCore::LineClose,
                                                            token, body, length);
          break;
        case 2:
          Send<v1::MakeCallRequest, v1::MakeCallResponse>(core_, &CallSessionCore::MakeCall, token,
                                                          body, length);
          break;
        case 3:
          Send<v1::AnswerRequest, v1::AnswerResponse>(core_, &CallSessionCore::Answer, token, body,
                                                      length);
          break;
        case 4:
          Send<v1::DropRequest, v1::DropResponse>(core_, &CallSessionCore::Drop, token, body,
                                                  length);
          break;
        case 5:
          Send<v1::GetCallInfoRequest, v1::GetCallInfoResponse>(
              core_, &CallSessionCore::GetCallInfo, token, body, length);
          break;
        case 6:
          Send<v1::GetCallStatusRequest, v1::GetCallStatusResponse>(
              core_, &CallSessionCore::GetCallStatus, token, body, length);
          break;
        case 7:
          Send<v1::DeallocateCallRequest, v1::DeallocateCallResponse>(
              core_, &CallSessionCore::DeallocateCall, token, body, length);
          break;
        case 8:
          Send<v1::GetNewCallsRequest, v1::GetNewCallsResponse>(
              core_, &CallSessionCore::GetNewCalls, token, body, length);
          break;
        case 9:
          Send<v1::ListCallsRequest, v1::ListCallsResponse>(core_, &CallSessionCore::ListCalls,
                                                            token, body, length);
          break;
        case 10:
          Send<v1::KeepAliveRequest, v1::KeepAliveResponse>(core_, &CallSessionCore::KeepAlive,
                                                            token, body, length);
          break;
        case 11:
          Send<v1::OfferCallRequest, v1::OfferCallResponse>(core_, &CallSessionCore::OfferCall,
                                                            kProvider, body, length);
          break;
        case 12:
          Send<v1::SetCallStateRequest, v1::SetCallStateResponse>(
              core_, &CallSessionCore::SetCallState, kProvider, body, length);
          break;
        case 13:
          Send<v1::ForceLineCloseRequest, v1::ForceLineCloseResponse>(
              core_, &CallSessionCore::ForceLineClose, kProvider, body, length);
          break;
        case 14: {
          v1::InitializeRequest request;
          (void)request.ParseFromArray(body, static_cast<int>(length));
          v1::InitializeResponse response;
          if (core_.Initialize({}, request, &response).ok())
            tokens_.push_back(response.app_token());
          break;
        }
        case 15: {
          // The token itself is attacker-controlled too.
          const std::string raw(reinterpret_cast<const char*>(body), length);
          v1::GetCallInfoRequest request;
          request.set_call_handle(1);
          v1::GetCallInfoResponse response;
          Check(!core_.GetCallInfo(raw, request, &response).ok() || raw == tokens_[0] ||
                    raw == tokens_[1],
                "a made-up token was accepted");
          Send<v1::ShutdownRequest, v1::ShutdownResponse>(core_, &CallSessionCore::Shutdown, raw,
                                                          body, 0);
          break;
        }
      }
      CheckCounters(core_);
    }
    for (const std::string& token : tokens_) {
      v1::ShutdownResponse response;
      (void)core_.Shutdown(token, {}, &response);
    }
    const CoreStats stats = core_.Stats();
    Check(stats.live.apps == 0 && stats.live.lines == 0 && stats.live.call_handles == 0,
          "store not empty after every app shut down");
    CheckCounters(core_);
  }

 private:
  static CoreOptions Options() {
    CoreOptions options;
    options.num_devices = 2;
    options.shards = 4;
    options.provider_token = kProvider;
    options.event_buffer = 16;
    options.max_lines_per_app = 8;
    options.max_call_handles_per_app = 16;
    return options;
  }

  CallSessionCore core_;
  std::vector<std::string> tokens_;
};

}  // namespace
}  // namespace callsession

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const bool quiet = [] {
    callsession::SetLogLevel(callsession::LogLevel::kError);
    // Invalid UTF-8 in string fields is logged by the parser on every input.
    google::protobuf::SetLogHandler(nullptr);
    return true;
  }();
  (void)quiet;
  callsession::World world;
  world.Run(data, size);
  return 0;
}
