// callctl: drives a callsession server from the command line.
//
//   callctl [flags] COMMAND [ARGS...]
//
// --tls_ca (and --tls_cert/--tls_key for mutual TLS) select a TLS channel.
//
// Application commands use the app token from --token (or
// CALLSESSION_APP_TOKEN), which `init` prints; `init` presents the tenant's
// API key from --api_key (or CALLSESSION_API_KEY) to a server with tenants;
// provider commands use --provider_token (or CALLSESSION_PROVIDER_TOKEN),
// which may also be a tenant's API key with provider access. Results are printed as
// JSON; errors as "error: CODE REASON: message" on stderr, exit status 1.
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <iostream>
#include <map>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "client/callsession_client.h"
#include "google/protobuf/util/json_util.h"
#include "grpcpp/create_channel.h"
#include "grpcpp/security/credentials.h"

ABSL_FLAG(std::string, server, "127.0.0.1:50051",
          "HOST:PORT of callsessiond; with several, comma-separated (the replicas of an HA "
          "deployment), calls follow the leader");
ABSL_FLAG(std::string, token, "", "app token (default: $CALLSESSION_APP_TOKEN)");
ABSL_FLAG(std::string, api_key, "",
          "the tenant's API key for init and demo, on a server with tenants (default: "
          "$CALLSESSION_API_KEY; prefer the variable: flags show in ps)");
ABSL_FLAG(std::string, provider_token, "", "provider token (default: $CALLSESSION_PROVIDER_TOKEN)");
ABSL_FLAG(std::string, admin_token, "", "admin token (default: $CALLSESSION_ADMIN_TOKEN)");
ABSL_FLAG(absl::Duration, deadline, absl::Seconds(5), "deadline of each call");
ABSL_FLAG(std::string, tls_ca, "", "PEM CA bundle to verify a TLS server (enables TLS)");
ABSL_FLAG(std::string, tls_cert, "", "PEM client certificate, for mutual TLS");
ABSL_FLAG(std::string, tls_key, "", "PEM key of --tls_cert");
ABSL_FLAG(std::string, tls_server_name, "",
          "name to verify in the server certificate (default: the host of --server)");
ABSL_FLAG(uint64_t, from_sequence, 0,
          "watch: resume from this event sequence (0: where the last stream stopped)");
ABSL_FLAG(int32_t, count, 0, "watch: stop after this many events (0: until the stream ends)");
ABSL_FLAG(absl::Duration, idle_timeout, absl::InfiniteDuration(),
          "watch: stop after this long without an event");

namespace callsession {
namespace {

constexpr char kUsage[] = R"(callctl [flags] COMMAND [ARGS...]

Application commands (need --token or $CALLSESSION_APP_TOKEN, except init):
  init [APP_NAME]                  register (with --api_key or $CALLSESSION_API_KEY
                                   on a server with tenants); prints app_handle,
                                   app_token and the devices it may open
  shutdown                         end the application
  line-open DEVICE [PRIVILEGES]    PRIVILEGES: owner, monitor or owner,monitor
  line-close LINE
  make-call LINE DEST [REQUEST_ID]
  answer CALL | drop CALL | deallocate CALL
  info CALL | status CALL
  new-calls LINE
  list-calls                       every call handle held, with info and status
  keepalive                        renew the application's lease
  watch                            print events as JSON lines (see --count,
                                   --from_sequence)
Provider commands (need --provider_token or $CALLSESSION_PROVIDER_TOKEN):
  offer DEVICE [CALLER] [CALLED]
  set-state CALL_ID STATE          STATE: e.g. connected, CALL_STATE_IDLE
  force-close DEVICE
Admin commands (need --admin_token or $CALLSESSION_ADMIN_TOKEN):
  checkpoint DIR                   write a consistent copy of the server's
                                   store to DIR (absolute, new) on the
                                   server's file system: an online backup
Other:
  demo [DEVICE]                    run a whole call lifecycle step by step
                                   (needs the provider token))";

using Args = std::vector<std::string>;

struct Context {
  CallSessionClient app;
  ProviderClient provider;
  AdminClient admin;
};

std::string ToJson(const google::protobuf::Message& message) {
  std::string json;
  google::protobuf::util::JsonPrintOptions options;
  options.preserve_proto_field_names = true;
  options.always_print_primitive_fields = true;
  (void)google::protobuf::util::MessageToJsonString(message, &json, options);
  return json;
}

std::string Describe(const absl::Status& status) {
  std::string reason = TapiReason(status);
  return absl::StrCat(absl::StatusCodeToString(status.code()), " ", status.message(),
                      reason.empty() ? "" : absl::StrCat(" [reason ", reason, "]"));
}

int Fail(const absl::Status& status) {
  std::cerr << "error: " << Describe(status) << "\n";
  return 1;
}

int Usage(const std::string& problem) {
  std::cerr << "callctl: " << problem << "\n\n" << kUsage << "\n";
  return 2;
}

absl::StatusOr<uint64_t> ParseHandle(const std::string& text) {
  uint64_t value = 0;
  if (!absl::SimpleAtoi(text, &value)) {
    return absl::InvalidArgumentError(absl::StrCat("not a number: \"", text, "\""));
  }
  return value;
}

absl::StatusOr<std::vector<v1::CallPrivilege>> ParsePrivileges(const std::string& text) {
  std::vector<v1::CallPrivilege> privileges;
  for (absl::string_view part : absl::StrSplit(text, ',', absl::SkipEmpty())) {
    const std::string name = absl::AsciiStrToLower(part);
    if (name == "owner") {
      privileges.push_back(v1::CALL_PRIVILEGE_OWNER);
    } else if (name == "monitor") {
      privileges.push_back(v1::CALL_PRIVILEGE_MONITOR);
    } else if (name != "none") {
      return absl::InvalidArgumentError(absl::StrCat("unknown privilege \"", part, "\""));
    }
  }
  return privileges;
}

absl::StatusOr<v1::CallState> ParseCallState(const std::string& text) {
  std::string name = absl::AsciiStrToUpper(text);
  if (name.rfind("CALL_STATE_", 0) != 0) name = absl::StrCat("CALL_STATE_", name);
  v1::CallState state;
  if (!v1::CallState_Parse(name, &state)) {
    return absl::InvalidArgumentError(absl::StrCat("unknown call state \"", text, "\""));
  }
  return state;
}

// Prints a message or fails: the shape of most commands.
template <typename T>
int PrintOr(const absl::StatusOr<T>& result) {
  if (!result.ok()) return Fail(result.status());
  std::cout << ToJson(*result) << "\n";
  return 0;
}

int PrintOk(const absl::Status& status) {
  if (!status.ok()) return Fail(status);
  std::cout << "{}\n";
  return 0;
}

int Watch(Context& ctx) {
  std::unique_ptr<EventStream> stream = ctx.app.WatchEvents(absl::GetFlag(FLAGS_from_sequence));
  const int limit = absl::GetFlag(FLAGS_count);
  const absl::Duration idle = absl::GetFlag(FLAGS_idle_timeout);
  for (int seen = 0; limit == 0 || seen < limit; ++seen) {
    absl::StatusOr<v1::Event> event = stream->Next(idle);
    if (absl::IsOutOfRange(event.status())) return 0;
    if (absl::IsDeadlineExceeded(event.status())) return 0;
    if (!event.ok()) return Fail(event.status());
    std::cout << ToJson(*event) << std::endl;
  }
  return 0;
}

// demo: one whole lifecycle, printing each step and checking each result.
class Demo {
 public:
  explicit Demo(Context& ctx) : ctx_(ctx) {}

  int Run(uint32_t device) {
    absl::StatusOr<v1::InitializeResponse> init = ctx_.app.Initialize("callctl-demo");
    if (!Step("Initialize", init.status())) return 1;
    std::cout << "    app_handle " << init->app_handle() << ", " << init->num_devices()
              << " devices\n";
    std::unique_ptr<EventStream> events = ctx_.app.WatchEvents();

    absl::StatusOr<uint64_t> line = ctx_.app.LineOpen(device, {v1::CALL_PRIVILEGE_OWNER});
    if (!Step(absl::StrCat("LineOpen device ", device, " (owner)"), line.status())) return 1;
    std::cout << "    line_handle " << *line << "\n";

    absl::StatusOr<v1::MakeCallResponse> call = ctx_.app.MakeCall(*line, "+15550100");
    if (!Step("MakeCall +15550100", call.status())) return 1;
    std::cout << "    " << ToJson(*call) << "\n";
    const uint64_t handle = call->call_handle();

    if (!ShowInfo("GetCallInfo", handle) ||
        !ExpectState("GetCallStatus", handle, v1::CALL_STATE_DIALING)) {
      return 1;
    }
    if (!Step("provider SetCallState CONNECTED",
              ctx_.provider.SetCallState(call->call_id(), v1::CALL_STATE_CONNECTED))) {
      return 1;
    }
    if (!ExpectState("GetCallStatus", handle, v1::CALL_STATE_CONNECTED)) return 1;
    if (!Step("Drop", ctx_.app.Drop(handle))) return 1;
    if (!ShowInfo("GetCallInfo on the IDLE call", handle) ||
        !ExpectState("GetCallStatus on the IDLE call", handle, v1::CALL_STATE_IDLE)) {
      return 1;
    }
    if (!Step("DeallocateCall", ctx_.app.DeallocateCall(handle))) return 1;
    absl::StatusOr<v1::CallInfo> gone = ctx_.app.GetCallInfo(handle);
    if (gone.ok() || TapiReason(gone.status()) != "LINEERR_INVALCALLHANDLE") {
      return Broken(
          "GetCallInfo on the deallocated handle should fail with "
          "LINEERR_INVALCALLHANDLE");
    }
    std::cout << "ok  GetCallInfo on the deallocated handle: " << Describe(gone.status()) << "\n";
    if (!Step("LineClose", ctx_.app.LineClose(*line))) return 1;

    std::cout << "events received:\n";
    std::vector<v1::CallState> states;
    for (int i = 0; i < 3; ++i) {
      absl::StatusOr<v1::Event> event = events->Next(absl::Seconds(5));
      if (!event.ok()) return Broken(absl::StrCat("event stream: ", Describe(event.status())));
      std::cout << "    " << ToJson(*event) << "\n";
      if (event->has_call_state()) states.push_back(event->call_state().call_state());
    }
    if (states != std::vector<v1::CallState>{v1::CALL_STATE_DIALING, v1::CALL_STATE_CONNECTED,
                                             v1::CALL_STATE_IDLE}) {
      return Broken("expected CallStateEvents DIALING, CONNECTED, IDLE");
    }
    if (!Step("Shutdown", ctx_.app.Shutdown())) return 1;
    std::cout << "demo complete\n";
    return 0;
  }

 private:
  bool Step(const std::string& what, const absl::Status& status) {
    if (!status.ok()) {
      std::cout << "FAIL " << what << ": " << Describe(status) << "\n";
      return false;
    }
    std::cout << "ok  " << what << "\n";
    return true;
  }

  bool ShowInfo(const std::string& what, uint64_t handle) {
    absl::StatusOr<v1::CallInfo> info = ctx_.app.GetCallInfo(handle);
    if (!Step(what, info.status())) return false;
    std::cout << "    " << ToJson(*info) << "\n";
    return true;
  }

  bool ExpectState(const std::string& what, uint64_t handle, v1::CallState expected) {
    absl::StatusOr<v1::CallStatus> status = ctx_.app.GetCallStatus(handle);
    if (!Step(what, status.status())) return false;
    std::cout << "    " << ToJson(*status) << "\n";
    if (status->call_state() != expected) {
      Broken(absl::StrCat("expected ", v1::CallState_Name(expected)));
      return false;
    }
    return true;
  }

  int Broken(const std::string& what) {
    std::cout << "FAIL " << what << "\n";
    return 1;
  }

  Context& ctx_;
};

int Dispatch(Context& ctx, const std::string& command, const Args& args) {
  auto need = [&](size_t min, size_t max) { return args.size() >= min && args.size() <= max; };
  auto handle_arg = [&](size_t i) { return ParseHandle(args[i]); };

  if (command == "init") {
    if (!need(0, 1)) return Usage("init takes [APP_NAME]");
    return PrintOr(ctx.app.Initialize(args.empty() ? "callctl" : args[0]));
  }
  if (command == "shutdown") return PrintOk(ctx.app.Shutdown());
  if (command == "line-open") {
    if (!need(1, 2)) return Usage("line-open takes DEVICE [PRIVILEGES]");
    absl::StatusOr<uint64_t> device = handle_arg(0);
    if (!device.ok()) return Fail(device.status());
    absl::StatusOr<std::vector<v1::CallPrivilege>> privileges =
        ParsePrivileges(args.size() > 1 ? args[1] : "");
    if (!privileges.ok()) return Fail(privileges.status());
    absl::StatusOr<uint64_t> line = ctx.app.LineOpen(static_cast<uint32_t>(*device), *privileges);
    if (!line.ok()) return Fail(line.status());
    std::cout << "{\"line_handle\":\"" << *line << "\"}\n";
    return 0;
  }
  if (command == "make-call") {
    if (!need(2, 3)) return Usage("make-call takes LINE DEST [REQUEST_ID]");
    absl::StatusOr<uint64_t> line = handle_arg(0);
    if (!line.ok()) return Fail(line.status());
    return PrintOr(ctx.app.MakeCall(*line, args[1], args.size() > 2 ? args[2] : ""));
  }
  if (command == "new-calls") {
    if (!need(1, 1)) return Usage("new-calls takes LINE");
    absl::StatusOr<uint64_t> line = handle_arg(0);
    if (!line.ok()) return Fail(line.status());
    absl::StatusOr<std::vector<uint64_t>> calls = ctx.app.GetNewCalls(*line);
    if (!calls.ok()) return Fail(calls.status());
    v1::GetNewCallsResponse response;
    for (uint64_t call : *calls) response.add_call_handles(call);
    std::cout << ToJson(response) << "\n";
    return 0;
  }
  if (command == "watch") return Watch(ctx);
  if (command == "list-calls") return PrintOr(ctx.app.ListAllCalls());
  if (command == "keepalive") return PrintOk(ctx.app.KeepAlive());

  // Commands taking one handle or id.
  const std::map<std::string, std::function<int(uint64_t)>> by_handle = {
      {"line-close", [&](uint64_t h) { return PrintOk(ctx.app.LineClose(h)); }},
      {"answer", [&](uint64_t h) { return PrintOk(ctx.app.Answer(h)); }},
      {"drop", [&](uint64_t h) { return PrintOk(ctx.app.Drop(h)); }},
      {"deallocate", [&](uint64_t h) { return PrintOk(ctx.app.DeallocateCall(h)); }},
      {"info", [&](uint64_t h) { return PrintOr(ctx.app.GetCallInfo(h)); }},
      {"status", [&](uint64_t h) { return PrintOr(ctx.app.GetCallStatus(h)); }},
      {"force-close",
       [&](uint64_t h) { return PrintOk(ctx.provider.ForceLineClose(static_cast<uint32_t>(h))); }},
  };
  if (auto it = by_handle.find(command); it != by_handle.end()) {
    if (!need(1, 1)) return Usage(absl::StrCat(command, " takes one argument"));
    absl::StatusOr<uint64_t> h = handle_arg(0);
    if (!h.ok()) return Fail(h.status());
    return it->second(*h);
  }

  if (command == "offer") {
    if (!need(1, 3)) return Usage("offer takes DEVICE [CALLER] [CALLED]");
    absl::StatusOr<uint64_t> device = handle_arg(0);
    if (!device.ok()) return Fail(device.status());
    absl::StatusOr<uint64_t> call_id =
        ctx.provider.OfferCall(static_cast<uint32_t>(*device), args.size() > 1 ? args[1] : "",
                               args.size() > 2 ? args[2] : "");
    if (!call_id.ok()) return Fail(call_id.status());
    std::cout << "{\"call_id\":\"" << *call_id << "\"}\n";
    return 0;
  }
  if (command == "set-state") {
    if (!need(2, 2)) return Usage("set-state takes CALL_ID STATE");
    absl::StatusOr<uint64_t> call_id = handle_arg(0);
    if (!call_id.ok()) return Fail(call_id.status());
    absl::StatusOr<v1::CallState> state = ParseCallState(args[1]);
    if (!state.ok()) return Fail(state.status());
    return PrintOk(ctx.provider.SetCallState(*call_id, *state));
  }
  if (command == "checkpoint") {
    if (!need(1, 1)) return Usage("checkpoint takes DIR");
    return PrintOr(ctx.admin.CreateCheckpoint(args[0]));
  }
  if (command == "demo") {
    if (!need(0, 1)) return Usage("demo takes [DEVICE]");
    uint64_t device = 0;
    if (!args.empty()) {
      absl::StatusOr<uint64_t> parsed = handle_arg(0);
      if (!parsed.ok()) return Fail(parsed.status());
      device = *parsed;
    }
    return Demo(ctx).Run(static_cast<uint32_t>(device));
  }
  return Usage(absl::StrCat("unknown command \"", command, "\""));
}

std::string FlagOrEnv(const std::string& flag, const char* env) {
  if (!flag.empty()) return flag;
  const char* value = std::getenv(env);
  return value != nullptr ? value : "";
}

}  // namespace
}  // namespace callsession

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(callsession::kUsage);
  std::vector<char*> positional = absl::ParseCommandLine(argc, argv);
  if (positional.size() < 2) return callsession::Usage("missing COMMAND");

  callsession::ClientOptions options;
  options.deadline = absl::GetFlag(FLAGS_deadline);
  callsession::ClientOptions app_options = options;
  app_options.api_key = callsession::FlagOrEnv(absl::GetFlag(FLAGS_api_key), "CALLSESSION_API_KEY");
  auto credentials = callsession::ChannelCredentialsFrom(
      {absl::GetFlag(FLAGS_tls_ca), absl::GetFlag(FLAGS_tls_cert), absl::GetFlag(FLAGS_tls_key)});
  if (!credentials.ok()) return callsession::Fail(credentials.status());
  grpc::ChannelArguments channel_args;
  if (!absl::GetFlag(FLAGS_tls_server_name).empty()) {
    channel_args.SetSslTargetNameOverride(absl::GetFlag(FLAGS_tls_server_name));
  }
  const std::vector<std::string> servers =
      absl::StrSplit(absl::GetFlag(FLAGS_server), ',', absl::SkipWhitespace());
  if (servers.empty()) return callsession::Usage("--server names no server");
  auto channel = grpc::CreateCustomChannel(servers.front(), *credentials, channel_args);
  const std::string provider_token =
      callsession::FlagOrEnv(absl::GetFlag(FLAGS_provider_token), "CALLSESSION_PROVIDER_TOKEN");
  std::shared_ptr<callsession::Replicas> replicas;
  if (servers.size() > 1) {
    replicas = std::make_shared<callsession::Replicas>(servers, *credentials, channel_args);
  }
  callsession::Context ctx{
      replicas ? callsession::CallSessionClient(replicas, app_options)
               : callsession::CallSessionClient(channel, app_options),
      replicas ? callsession::ProviderClient(replicas, provider_token, options)
               : callsession::ProviderClient(channel, provider_token, options),
      callsession::AdminClient(
          channel,
          callsession::FlagOrEnv(absl::GetFlag(FLAGS_admin_token), "CALLSESSION_ADMIN_TOKEN"),
          options)};
  ctx.app.set_token(callsession::FlagOrEnv(absl::GetFlag(FLAGS_token), "CALLSESSION_APP_TOKEN"));
  return callsession::Dispatch(ctx, positional[1],
                               callsession::Args(positional.begin() + 2, positional.end()));
}
