// callsessiond: parses flags (each also settable as CALLSESSION_<FLAG>),
// starts the server, and on SIGTERM or SIGINT shuts it down gracefully.
#include <pthread.h>
#include <signal.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <string>
#include <thread>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/reflection.h"
#include "absl/flags/usage.h"
#include "absl/flags/usage_config.h"
#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "server/core/log.h"
#include "server/server.h"
#include "server/storage/etcd/etcd_journal.h"
#include "server/storage/rocksdb/rocksdb_journal.h"

ABSL_FLAG(std::string, listen, "127.0.0.1:50051",
          "HOST:PORT to serve gRPC on; port 0 picks a free port");
ABSL_FLAG(std::string, store, "rocksdb",
          "where state lives: rocksdb (durable, in --data_dir), etcd (replicated, with a leader "
          "and hot standbys: --etcd_endpoints) or memory (lost on exit)");
ABSL_FLAG(std::string, data_dir, "callsession-data",
          "the durable store's directory (created if missing); one process at a time");
ABSL_FLAG(bool, sync, true,
          "sync the journal before acknowledging (survives a power loss); false survives a "
          "process crash only");
ABSL_FLAG(std::string, etcd_endpoints, "",
          "with --store=etcd: HOST:PORT of each etcd member, comma-separated");
ABSL_FLAG(std::string, etcd_prefix, "/callsession/",
          "with --store=etcd: the key prefix of this deployment (ends with /)");
ABSL_FLAG(absl::Duration, etcd_lease_ttl, absl::Seconds(3),
          "with --store=etcd: the leader's lease; a killed leader is replaced within about this");
ABSL_FLAG(uint64_t, etcd_max_txn_ops, 128,
          "with --store=etcd: operations per etcd transaction, at most etcd's --max-txn-ops");
ABSL_FLAG(int64_t, etcd_retained_revisions, 100000,
          "with --store=etcd: etcd history kept behind the slowest replica; older is compacted");
ABSL_FLAG(std::string, etcd_ca, "", "with --store=etcd: PEM CA bundle; enables TLS to etcd");
ABSL_FLAG(std::string, etcd_cert, "", "with --store=etcd: PEM client certificate for etcd");
ABSL_FLAG(std::string, etcd_key, "", "with --store=etcd: PEM private key of --etcd_cert");
ABSL_FLAG(std::string, advertise_address, "",
          "with --store=etcd: HOST:PORT clients reach this process on, named to them by the "
          "standbys; default: --listen, if it names a host");
ABSL_FLAG(std::string, member_name, "",
          "with --store=etcd: this process's name among the replicas; default: the host name");
ABSL_FLAG(uint32_t, devices, 16, "number of line devices (ids 0..N-1)");
ABSL_FLAG(int32_t, shards, 64, "shards per handle table, a power of two");
ABSL_FLAG(uint64_t, event_buffer, 4096,
          "events kept per application for delivery and WatchEvents replay; a consumer further "
          "behind loses the oldest and is told so (EventsLostEvent)");
ABSL_FLAG(uint64_t, request_id_cache, 1024, "MakeCall request_ids remembered per application");
ABSL_FLAG(absl::Duration, request_id_ttl, absl::Minutes(10),
          "how long a MakeCall request_id is remembered");
ABSL_FLAG(absl::Duration, app_ttl, absl::Seconds(60),
          "shut down an application with no event stream open and no RPC for this long; "
          "0 never");
ABSL_FLAG(uint64_t, max_apps, 1000, "registered applications at most; 0 no limit");
ABSL_FLAG(uint64_t, max_lines_per_app, 1000, "open lines per application at most; 0 no limit");
ABSL_FLAG(uint64_t, max_call_handles_per_app, 100000,
          "call handles per application at most; 0 no limit");
ABSL_FLAG(std::string, tenants_file, "",
          "the tenants file (protobuf text, callsession.config.v1.TenantsFile): who may "
          "Initialize, open which devices with which privileges, act as provider; re-read when "
          "it changes and on SIGHUP. Empty: open mode, for development only");
ABSL_FLAG(absl::Duration, tenants_check_interval, absl::Seconds(1),
          "how often the tenants file is checked for a change");
ABSL_FLAG(std::string, metrics_listen, "",
          "HOST:PORT to serve Prometheus /metrics on; empty turns metrics off");
ABSL_FLAG(bool, reflection, true, "serve gRPC server reflection (grpcurl, ghz, buf curl)");
ABSL_FLAG(std::string, log_level, "info", "debug, info, warning or error");
ABSL_FLAG(absl::Duration, shutdown_grace, absl::Seconds(10),
          "after SIGTERM, how long in-flight RPCs may finish before they are cancelled");
ABSL_FLAG(std::string, tls_cert, "", "PEM server certificate (chain); enables TLS");
ABSL_FLAG(std::string, tls_key, "", "PEM private key of --tls_cert");
ABSL_FLAG(std::string, tls_client_ca, "",
          "PEM CA bundle; if set, clients must present a certificate it signed (mutual TLS)");
ABSL_FLAG(int32_t, max_receive_message_bytes, 16 * 1024,
          "largest request accepted; larger ones fail with RESOURCE_EXHAUSTED");
ABSL_FLAG(int32_t, max_concurrent_streams, 1024, "concurrent RPCs per client connection");
ABSL_FLAG(int32_t, serving_threads, 0,
          "threads serving the RPCs, each with its own completion queue; 0: one per CPU this "
          "process may run on");
ABSL_FLAG(absl::Duration, keepalive_time, absl::Seconds(60),
          "ping idle connections this often to detect dead clients");
ABSL_FLAG(absl::Duration, keepalive_timeout, absl::Seconds(20),
          "drop a connection whose ping is not answered within this");
ABSL_FLAG(absl::Duration, min_client_ping_interval, absl::Seconds(10),
          "shortest client keepalive interval tolerated");
ABSL_FLAG(absl::Duration, max_connection_idle, absl::ZeroDuration(),
          "close connections idle this long; 0 never");
ABSL_FLAG(absl::Duration, max_connection_age, absl::ZeroDuration(),
          "close connections this old (ends their event streams); 0 never");
ABSL_FLAG(bool, mutex_deadlock_detection, false,
          "check every absl::Mutex acquisition for lock-order cycles (slow; for debugging)");
ABSL_FLAG(absl::Duration, max_connection_age_grace, absl::ZeroDuration(),
          "time given to RPCs on a connection closed for its age");

namespace {

constexpr const char* kFlagsFromEnvironment[] = {"listen",
                                                 "store",
                                                 "data_dir",
                                                 "sync",
                                                 "etcd_endpoints",
                                                 "etcd_prefix",
                                                 "etcd_lease_ttl",
                                                 "etcd_max_txn_ops",
                                                 "etcd_retained_revisions",
                                                 "etcd_ca",
                                                 "etcd_cert",
                                                 "etcd_key",
                                                 "advertise_address",
                                                 "member_name",
                                                 "devices",
                                                 "shards",
                                                 "event_buffer",
                                                 "request_id_cache",
                                                 "request_id_ttl",
                                                 "app_ttl",
                                                 "max_apps",
                                                 "max_lines_per_app",
                                                 "max_call_handles_per_app",
                                                 "tenants_file",
                                                 "tenants_check_interval",
                                                 "metrics_listen",
                                                 "reflection",
                                                 "log_level",
                                                 "shutdown_grace",
                                                 "tls_cert",
                                                 "tls_key",
                                                 "tls_client_ca",
                                                 "max_receive_message_bytes",
                                                 "max_concurrent_streams",
                                                 "serving_threads",
                                                 "keepalive_time",
                                                 "keepalive_timeout",
                                                 "min_client_ping_interval",
                                                 "max_connection_idle",
                                                 "max_connection_age",
                                                 "max_connection_age_grace"};

constexpr char kUsage[] =
    "tracks telephony call sessions with TAPI 2.2 call-handle "
    "semantics over gRPC.\n\n"
    "Every flag can also be set by the environment variable CALLSESSION_<FLAG> (e.g.\n"
    "CALLSESSION_LISTEN=0.0.0.0:50051); a flag on the command line wins. The\n"
    "provider token is read only from CALLSESSION_PROVIDER_TOKEN, the admin token\n"
    "(backups) only from CALLSESSION_ADMIN_TOKEN; without one, its service refuses\n"
    "every call. SIGTERM and SIGINT shut down gracefully; SIGHUP re-reads the\n"
    "tenants file.";

// Sets each flag whose CALLSESSION_<FLAG> variable is set. False (after
// logging why) if a value does not parse.
bool ApplyEnvironment() {
  for (const char* name : kFlagsFromEnvironment) {
    const std::string variable = absl::StrCat("CALLSESSION_", absl::AsciiStrToUpper(name));
    const char* value = std::getenv(variable.c_str());
    if (value == nullptr) continue;
    absl::CommandLineFlag* flag = absl::FindCommandLineFlag(name);
    std::string error;
    if (flag == nullptr || !flag->ParseFrom(value, &error)) {
      callsession::Log(callsession::LogLevel::kError, "invalid_configuration",
                       {{"variable", variable}, {"error", error}});
      return false;
    }
  }
  return true;
}

std::string HostName() {
  char name[256] = {};
  if (gethostname(name, sizeof(name) - 1) != 0) return "callsessiond";
  return name;
}

// --listen if it names a host; with a wildcard host, this host's name and
// the port.
std::string DefaultAdvertiseAddress(const std::string& listen) {
  const size_t colon = listen.rfind(':');
  if (colon == std::string::npos) return listen;
  const std::string host = listen.substr(0, colon);
  if (host == "0.0.0.0" || host == "[::]" || host == "::" || host.empty()) {
    return absl::StrCat(HostName(), listen.substr(colon));
  }
  return listen;
}

int Refuse(const absl::Status& status) {
  callsession::Log(callsession::LogLevel::kError, "start_failed",
                   {{"error", std::string(status.message())}});
  return 1;
}

}  // namespace

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(kUsage);
  // --help lists the flags of this file (absl looks for <binary>.cc by default).
  absl::FlagsUsageConfig usage;
  usage.contains_help_flags = [](absl::string_view file) {
    return absl::EndsWith(file, "server/main.cc");
  };
  usage.contains_helpshort_flags = usage.contains_help_flags;
  absl::SetFlagsUsageConfig(usage);
  if (!ApplyEnvironment()) return 1;
  absl::ParseCommandLine(argc, argv);

  absl::StatusOr<callsession::LogLevel> level =
      callsession::ParseLogLevel(absl::GetFlag(FLAGS_log_level));
  if (!level.ok()) return Refuse(level.status());
  callsession::SetLogLevel(*level);
  // Debian's Abseil is built without NDEBUG, so absl::Mutex checks every
  // acquisition against a process-wide lock graph (gRPC's own locks too):
  // measured at ~4x the CPU and ~580 bytes per live call. Tests keep it on.
  if (!absl::GetFlag(FLAGS_mutex_deadlock_detection)) {
    absl::SetMutexDeadlockDetectionMode(absl::OnDeadlockCycle::kIgnore);
  }

  // Block the shutdown signals before any thread starts, so that only
  // sigwait below sees them.
  sigset_t shutdown_signals;
  sigemptyset(&shutdown_signals);
  sigaddset(&shutdown_signals, SIGINT);
  sigaddset(&shutdown_signals, SIGTERM);
  sigaddset(&shutdown_signals, SIGHUP);
  pthread_sigmask(SIG_BLOCK, &shutdown_signals, nullptr);

  callsession::ServerOptions options;
  options.listen_address = absl::GetFlag(FLAGS_listen);
  const std::string store = absl::GetFlag(FLAGS_store);
  if (store == "rocksdb") {
    callsession::RocksDbJournalOptions journal;
    journal.data_dir = absl::GetFlag(FLAGS_data_dir);
    journal.sync = absl::GetFlag(FLAGS_sync);
    options.open_journal = [journal] { return callsession::OpenRocksDbJournal(journal); };
  } else if (store == "etcd") {
    callsession::EtcdJournalOptions journal;
    journal.endpoints =
        absl::StrSplit(absl::GetFlag(FLAGS_etcd_endpoints), ',', absl::SkipWhitespace());
    journal.prefix = absl::GetFlag(FLAGS_etcd_prefix);
    journal.lease_ttl = absl::GetFlag(FLAGS_etcd_lease_ttl);
    journal.max_txn_ops = absl::GetFlag(FLAGS_etcd_max_txn_ops);
    journal.retained_revisions = absl::GetFlag(FLAGS_etcd_retained_revisions);
    journal.ca_file = absl::GetFlag(FLAGS_etcd_ca);
    journal.cert_file = absl::GetFlag(FLAGS_etcd_cert);
    journal.key_file = absl::GetFlag(FLAGS_etcd_key);
    journal.advertise_address = absl::GetFlag(FLAGS_advertise_address);
    if (journal.advertise_address.empty()) {
      journal.advertise_address = DefaultAdvertiseAddress(options.listen_address);
    }
    journal.member_name = absl::GetFlag(FLAGS_member_name);
    if (journal.member_name.empty()) journal.member_name = HostName();
    if (journal.endpoints.empty()) {
      return Refuse(absl::InvalidArgumentError("--store=etcd needs --etcd_endpoints"));
    }
    auto gate = std::make_shared<callsession::LeaderGate>();
    options.leader_gate = gate;
    options.open_journal = [journal, gate] {
      return callsession::OpenEtcdJournal(journal, gate.get());
    };
  } else if (store != "memory") {
    return Refuse(absl::InvalidArgumentError(
        absl::StrCat("--store must be rocksdb, etcd or memory, got \"", store, "\"")));
  }
  options.core.num_devices = absl::GetFlag(FLAGS_devices);
  options.core.shards = absl::GetFlag(FLAGS_shards);
  options.core.event_buffer = absl::GetFlag(FLAGS_event_buffer);
  options.core.request_id_cache = absl::GetFlag(FLAGS_request_id_cache);
  options.core.request_id_ttl = absl::GetFlag(FLAGS_request_id_ttl);
  options.core.app_ttl = absl::GetFlag(FLAGS_app_ttl);
  options.core.max_apps = absl::GetFlag(FLAGS_max_apps);
  options.core.max_lines_per_app = absl::GetFlag(FLAGS_max_lines_per_app);
  options.core.max_call_handles_per_app = absl::GetFlag(FLAGS_max_call_handles_per_app);
  if (const char* token = std::getenv("CALLSESSION_PROVIDER_TOKEN")) {
    options.core.provider_token = token;
  }
  if (const char* token = std::getenv("CALLSESSION_ADMIN_TOKEN")) options.admin_token = token;
  options.tenants_file = absl::GetFlag(FLAGS_tenants_file);
  options.tenants_check_interval = absl::GetFlag(FLAGS_tenants_check_interval);
  options.metrics_address = absl::GetFlag(FLAGS_metrics_listen);
  options.reflection = absl::GetFlag(FLAGS_reflection);
  options.tls = {absl::GetFlag(FLAGS_tls_cert), absl::GetFlag(FLAGS_tls_key),
                 absl::GetFlag(FLAGS_tls_client_ca)};
  options.max_receive_message_bytes = absl::GetFlag(FLAGS_max_receive_message_bytes);
  options.max_concurrent_streams = absl::GetFlag(FLAGS_max_concurrent_streams);
  options.serving_threads = absl::GetFlag(FLAGS_serving_threads);
  if (options.serving_threads < 0) {
    return Refuse(absl::InvalidArgumentError("serving_threads must be >= 0"));
  }
  options.keepalive_time = absl::GetFlag(FLAGS_keepalive_time);
  options.keepalive_timeout = absl::GetFlag(FLAGS_keepalive_timeout);
  options.min_client_ping_interval = absl::GetFlag(FLAGS_min_client_ping_interval);
  options.max_connection_idle = absl::GetFlag(FLAGS_max_connection_idle);
  options.max_connection_age = absl::GetFlag(FLAGS_max_connection_age);
  options.max_connection_age_grace = absl::GetFlag(FLAGS_max_connection_age_grace);
  const absl::Duration grace = absl::GetFlag(FLAGS_shutdown_grace);
  if (grace < absl::ZeroDuration()) {
    return Refuse(absl::InvalidArgumentError("shutdown_grace must be >= 0"));
  }

  // One thread takes the signals from here on, so that a process still
  // loading its store, or waiting as a standby to lead, stops at once (it
  // has acknowledged nothing).
  absl::Mutex signal_mu;
  callsession::CallSessionServer* running = nullptr;
  int signal_number = 0;
  std::thread([&] {
    for (;;) {
      int received = 0;
      sigwait(&shutdown_signals, &received);
      absl::MutexLock lock(&signal_mu);
      if (received == SIGHUP) {
        // Logged (and counted) by the reload itself.
        if (running != nullptr) (void)running->ReloadTenants();
        continue;
      }
      if (running == nullptr) {
        callsession::Log(callsession::LogLevel::kInfo, "stopped",
                         {{"signal", received}, {"detail", "before serving"}});
        std::_Exit(0);
      }
      signal_number = received;
      return;
    }
  }).detach();

  auto server = callsession::CallSessionServer::Start(options);
  if (!server.ok()) return Refuse(server.status());
  callsession::Log(callsession::LogLevel::kInfo, "listening",
                   {{"address", (*server)->address()},
                    {"metrics_port", (*server)->metrics_port()},
                    {"tls", !options.tls.cert_file.empty()},
                    {"mutual_tls", !options.tls.client_ca_file.empty()},
                    {"store", store},
                    {"data_dir", store == "rocksdb" ? absl::GetFlag(FLAGS_data_dir) : ""},
                    {"sync", store == "rocksdb" && absl::GetFlag(FLAGS_sync)},
                    {"devices", options.core.num_devices},
                    {"shards", options.core.shards},
                    {"app_ttl_seconds", absl::ToDoubleSeconds(options.core.app_ttl)},
                    {"tenants_file", options.tenants_file},
                    {"provider_token", !options.core.provider_token.empty()}});
  {
    absl::MutexLock lock(&signal_mu);
    running = server->get();
    signal_mu.Await(absl::Condition(
        +[](int* number) { return *number != 0; }, &signal_number));
  }
  callsession::Log(callsession::LogLevel::kInfo, "shutting_down",
                   {{"signal", signal_number}, {"grace_seconds", absl::ToDoubleSeconds(grace)}});
  (*server)->Shutdown(grace);
  if (callsession::ServerMetrics* metrics = (*server)->metrics()) {
    const callsession::RpcTotals totals = metrics->Totals();
    callsession::Log(
        callsession::LogLevel::kInfo, "stopped",
        {{"rpcs_started", totals.started}, {"rpcs_ok", totals.ok}, {"rpcs_failed", totals.failed}});
  } else {
    callsession::Log(callsession::LogLevel::kInfo, "stopped");
  }
  return 0;
}
