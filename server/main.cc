// callsessiond: parses flags, starts the server, and shuts it down
// gracefully on SIGINT or SIGTERM.
#include <pthread.h>
#include <signal.h>

#include <cstdio>
#include <cstdlib>
#include <string>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/time/time.h"
#include "server/server.h"

ABSL_FLAG(std::string, listen, "127.0.0.1:50051",
          "HOST:PORT to serve on; port 0 picks a free port");
ABSL_FLAG(uint32_t, devices, 16, "number of line devices (ids 0..N-1)");
ABSL_FLAG(int32_t, shards, 64, "shards per handle table, a power of two");
ABSL_FLAG(uint64_t, event_queue_limit, 10000,
          "undelivered events kept per application; the oldest are "
          "discarded past it");
ABSL_FLAG(uint64_t, request_id_cache, 1024, "MakeCall request_ids remembered per application");
ABSL_FLAG(absl::Duration, shutdown_grace, absl::Seconds(10),
          "how long in-flight RPCs may run after SIGTERM");

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "Tracks telephony call sessions with TAPI 2.2 call-handle semantics over "
      "gRPC.\nThe provider token is read from CALLSESSION_PROVIDER_TOKEN; "
      "without it the provider service refuses every call.");
  absl::ParseCommandLine(argc, argv);

  // Block the shutdown signals before any thread starts, so that only
  // sigwait below sees them.
  sigset_t shutdown_signals;
  sigemptyset(&shutdown_signals);
  sigaddset(&shutdown_signals, SIGINT);
  sigaddset(&shutdown_signals, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &shutdown_signals, nullptr);

  callsession::ServerOptions options;
  options.listen_address = absl::GetFlag(FLAGS_listen);
  options.core.num_devices = absl::GetFlag(FLAGS_devices);
  options.core.shards = absl::GetFlag(FLAGS_shards);
  options.core.event_queue_limit = absl::GetFlag(FLAGS_event_queue_limit);
  options.core.request_id_cache = absl::GetFlag(FLAGS_request_id_cache);
  if (const char* token = std::getenv("CALLSESSION_PROVIDER_TOKEN")) {
    options.core.provider_token = token;
  }

  auto server = callsession::CallSessionServer::Start(options);
  if (!server.ok()) {
    std::fprintf(stderr, "{\"level\":\"error\",\"event\":\"start_failed\",\"error\":\"%s\"}\n",
                 std::string(server.status().message()).c_str());
    return 1;
  }
  std::fprintf(stderr,
               "{\"level\":\"info\",\"event\":\"listening\",\"address\":\"%s\","
               "\"devices\":%u,\"shards\":%d,\"provider_service\":%s}\n",
               (*server)->address().c_str(), options.core.num_devices, options.core.shards,
               options.core.provider_token.empty() ? "false" : "true");

  int signal_number = 0;
  sigwait(&shutdown_signals, &signal_number);
  std::fprintf(stderr, "{\"level\":\"info\",\"event\":\"shutting_down\",\"signal\":%d}\n",
               signal_number);
  (*server)->Shutdown(absl::GetFlag(FLAGS_shutdown_grace));
  std::fprintf(stderr, "{\"level\":\"info\",\"event\":\"stopped\"}\n");
  return 0;
}
