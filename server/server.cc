#include "server/server.h"

#include <sched.h>

#include <algorithm>
#include <fstream>
#include <sstream>
#include <utility>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "grpc/grpc.h"
#include "grpcpp/ext/proto_server_reflection_plugin.h"
#include "grpcpp/impl/server_builder_option.h"
#include "grpcpp/impl/server_builder_plugin.h"
#include "grpcpp/security/server_credentials.h"
#include "grpcpp/server_builder.h"
#include "server/core/log.h"
#include "server/core/status_macros.h"

namespace callsession {
namespace {

// Splits "host:port" ("[::1]:port" for IPv6) at the last colon.
absl::Status SplitHostPort(const std::string& address, std::string* host) {
  const size_t colon = address.rfind(':');
  int port = 0;
  if (colon == std::string::npos || colon == 0 ||
      !absl::SimpleAtoi(address.substr(colon + 1), &port) || port < 0 || port > 65535) {
    return absl::InvalidArgumentError(
        absl::StrCat("listen address must be HOST:PORT, got \"", address, "\""));
  }
  *host = address.substr(0, colon);
  return absl::OkStatus();
}

absl::StatusOr<std::string> ReadFile(const std::string& path, const char* what) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream contents;
  if (!in || !(contents << in.rdbuf())) {
    return absl::InvalidArgumentError(absl::StrCat("cannot read ", what, " \"", path, "\""));
  }
  return contents.str();
}

absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> ServerCredentialsFrom(
    const TlsFiles& tls) {
  if (tls.cert_file.empty() && tls.key_file.empty()) {
    if (!tls.client_ca_file.empty()) {
      return absl::InvalidArgumentError("a TLS client CA needs a TLS certificate and key");
    }
    return grpc::InsecureServerCredentials();
  }
  if (tls.cert_file.empty() || tls.key_file.empty()) {
    return absl::InvalidArgumentError("TLS needs both a certificate and a key");
  }
  grpc::SslServerCredentialsOptions options(
      tls.client_ca_file.empty() ? GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE
                                 : GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY);
  grpc::SslServerCredentialsOptions::PemKeyCertPair pair;
  CS_ASSIGN_OR_RETURN(pair.cert_chain, ReadFile(tls.cert_file, "TLS certificate"));
  CS_ASSIGN_OR_RETURN(pair.private_key, ReadFile(tls.key_file, "TLS key"));
  options.pem_key_cert_pairs.push_back(std::move(pair));
  if (!tls.client_ca_file.empty()) {
    CS_ASSIGN_OR_RETURN(options.pem_root_certs, ReadFile(tls.client_ca_file, "TLS client CA"));
  }
  return grpc::SslServerCredentials(options);
}

// Linking grpc++_reflection registers its plugin for every server in the
// process; this option takes it out again when reflection is off.
class WithoutReflection final : public grpc::ServerBuilderOption {
 public:
  void UpdateArguments(grpc::ChannelArguments* args) override {}
  void UpdatePlugins(std::vector<std::unique_ptr<grpc::ServerBuilderPlugin>>* plugins) override {
    plugins->erase(std::remove_if(plugins->begin(), plugins->end(),
                                  [](const std::unique_ptr<grpc::ServerBuilderPlugin>& plugin) {
                                    return plugin->name() == "proto_server_reflection";
                                  }),
                   plugins->end());
  }
};

// The CPUs this process may run on (taskset, a cpuset); at least 1.
int CpusAvailable() {
  cpu_set_t cpus;
  if (sched_getaffinity(0, sizeof(cpus), &cpus) == 0 && CPU_COUNT(&cpus) > 0) {
    return CPU_COUNT(&cpus);
  }
  return std::max(1, static_cast<int>(std::thread::hardware_concurrency()));
}

int Millis(absl::Duration d) {
  return static_cast<int>(std::min<int64_t>(absl::ToInt64Milliseconds(d), INT32_MAX));
}

absl::Status ValidateServerOptions(const ServerOptions& options) {
  if (options.max_receive_message_bytes < 1024) {
    return absl::InvalidArgumentError("max_receive_message_bytes must be at least 1024");
  }
  if (options.max_concurrent_streams < 1) {
    return absl::InvalidArgumentError("max_concurrent_streams must be at least 1");
  }
  for (absl::Duration d : {options.keepalive_time, options.keepalive_timeout,
                           options.min_client_ping_interval, options.max_connection_idle,
                           options.max_connection_age, options.max_connection_age_grace}) {
    if (d < absl::ZeroDuration()) return absl::InvalidArgumentError("durations must be >= 0");
  }
  if (options.keepalive_time <= absl::ZeroDuration()) {
    return absl::InvalidArgumentError("keepalive_time must be positive");
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::unique_ptr<CallSessionServer>> CallSessionServer::Start(ServerOptions options) {
  CS_RETURN_IF_ERROR(ValidateCoreOptions(options.core));
  CS_RETURN_IF_ERROR(ValidateServerOptions(options));
  std::string host;
  CS_RETURN_IF_ERROR(SplitHostPort(options.listen_address, &host));
  CS_ASSIGN_OR_RETURN(std::shared_ptr<grpc::ServerCredentials> credentials,
                      ServerCredentialsFrom(options.tls));

  if (options.tenants_check_interval <= absl::ZeroDuration()) {
    return absl::InvalidArgumentError("tenants_check_interval must be positive");
  }
  FileIdentity tenants_identity;
  if (!options.tenants_file.empty()) {
    // Before reading: a change from here on is seen by the watcher.
    tenants_identity = IdentifyFile(options.tenants_file);
    CS_ASSIGN_OR_RETURN(options.core.tenants,
                        TenantDirectory::Load(options.tenants_file, options.core.num_devices));
    Log(LogLevel::kInfo, "tenants_loaded",
        {{"tenants_file", options.tenants_file},
         {"sha256", options.core.tenants->sha256()},
         {"tenants", static_cast<uint64_t>(options.core.tenants->tenants().size())}});
  } else if (options.core.tenants == nullptr) {
    Log(LogLevel::kWarning, "open_mode",
        {{"detail",
          "no --tenants_file: any client may Initialize and open every device with every "
          "privilege; for development only"}});
  }

  std::unique_ptr<CallSessionServer> server(new CallSessionServer());
  server->leader_gate_ = options.leader_gate;
  if (server->leader_gate_ != nullptr) server->serving_.SetGate(server->leader_gate_.get());
  server->call_session_service_ = std::make_unique<CallSessionGrpcService>(&server->serving_);
  server->provider_service_ = std::make_unique<ProviderGrpcService>();
  server->admin_service_ =
      std::make_unique<AdminGrpcService>(&server->serving_, options.admin_token);

  // Ours instead of gRPC's built-in one (see health_service.h).
  grpc::EnableDefaultHealthCheckService(false);
  server->health_service_ = std::make_unique<HealthService>();
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  if (!options.reflection) builder.SetOption(std::make_unique<WithoutReflection>());
  builder.AddListeningPort(options.listen_address, credentials, &server->port_);
  builder.SetMaxReceiveMessageSize(options.max_receive_message_bytes);
  builder.AddChannelArgument(GRPC_ARG_MAX_CONCURRENT_STREAMS, options.max_concurrent_streams);
  builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_TIME_MS, Millis(options.keepalive_time));
  builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_TIMEOUT_MS, Millis(options.keepalive_timeout));
  builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_PERMIT_WITHOUT_CALLS, 1);
  builder.AddChannelArgument(GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS,
                             Millis(options.min_client_ping_interval));
  if (options.max_connection_idle > absl::ZeroDuration()) {
    builder.AddChannelArgument(GRPC_ARG_MAX_CONNECTION_IDLE_MS,
                               Millis(options.max_connection_idle));
  }
  if (options.max_connection_age > absl::ZeroDuration()) {
    builder.AddChannelArgument(GRPC_ARG_MAX_CONNECTION_AGE_MS, Millis(options.max_connection_age));
    builder.AddChannelArgument(GRPC_ARG_MAX_CONNECTION_AGE_GRACE_MS,
                               Millis(options.max_connection_age_grace));
  }
  builder.RegisterService(server->call_session_service_.get());
  builder.RegisterService(server->provider_service_.get());
  builder.RegisterService(server->admin_service_.get());
  builder.RegisterService(server->health_service_.get());
  server->async_serving_ = std::make_unique<AsyncServing>(
      &server->serving_, options.serving_threads > 0 ? options.serving_threads : CpusAvailable());
  server->call_session_service_->ServeThrough(*server->async_serving_);
  server->provider_service_->ServeThrough(*server->async_serving_);
  server->async_serving_->AddCompletionQueues(builder);

  if (!options.metrics_address.empty()) {
    CS_ASSIGN_OR_RETURN(server->metrics_,
                        ServerMetrics::Start(options.metrics_address, &server->serving_,
                                             {v1::CallSessionService::service_full_name(),
                                              v1::ProviderService::service_full_name(),
                                              admin::v1::AdminService::service_full_name()}));
    std::vector<std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface>> factories;
    factories.push_back(server->metrics_->NewInterceptorFactory());
    builder.experimental().SetInterceptorCreators(std::move(factories));
  }

  server->server_ = builder.BuildAndStart();
  if (server->server_ == nullptr || server->port_ == 0) {
    return absl::UnavailableError(absl::StrCat("cannot listen on ", options.listen_address));
  }
  server->async_serving_->Start();
  server->address_ = absl::StrCat(host, ":", server->port_);
  // The overall status ("") and each service's: probes may ask for either.
  // NOT_SERVING until the core is loaded.
  HealthService* health = server->health_service_.get();
  const char* const services[] = {v1::CallSessionService::service_full_name(),
                                  v1::ProviderService::service_full_name()};
  health->Set("", false);
  for (const char* service : services) health->Set(service, false);
  if (options.on_listening) options.on_listening(server->address_);
  if (server->leader_gate_ != nullptr) {
    // A standby that follows the leader is healthy (the overall status, for
    // liveness probes) while its services stay NOT_SERVING (readiness: only
    // the leader takes traffic).
    ServerMetrics* metrics = server->metrics_.get();
    server->leader_gate_->SetOnFollowing([health, metrics] {
      health->Set("", true);
      if (metrics != nullptr) metrics->SetStandby(true);
    });
  }

  const std::string tenants_sha256 =
      options.core.tenants != nullptr ? options.core.tenants->sha256() : "";
  CS_RETURN_IF_ERROR(server->LoadCore(options));
  if (!options.tenants_file.empty()) {
    server->tenants_watcher_ = std::make_unique<TenantsFileWatcher>(
        options.tenants_file, tenants_identity, tenants_sha256, server->core_.get(),
        server->metrics_.get(), options.tenants_check_interval);
  }
  health->SetAll(true);
  if (server->metrics_ != nullptr) {
    server->metrics_->SetStandby(false);
    server->metrics_->SetServing(true);
  }

  const absl::Duration app_ttl = server->core_->options().app_ttl;
  if (app_ttl > absl::ZeroDuration()) {
    // An app outlives its lease by at most a quarter of it (and a second).
    const absl::Duration period =
        std::max(absl::Milliseconds(10), std::min(app_ttl / 4, absl::Seconds(1)));
    CallSessionServer* raw = server.get();
    server->lease_thread_ = std::thread([raw, period] { raw->EnforceLeases(period); });
  }
  return server;
}

absl::Status CallSessionServer::LoadCore(ServerOptions& options) {
  options.core.journal = nullptr;
  if (options.open_journal) {
    Log(LogLevel::kInfo, "recovering", {{"address", address_}});
    absl::Time start = absl::Now();
    CS_ASSIGN_OR_RETURN(journal_, options.open_journal());
    // A replicated store returns once this process leads: the time it
    // waited as a standby is not recovery.
    const absl::Duration waited =
        leader_gate_ != nullptr ? absl::Now() - start : absl::ZeroDuration();
    start += waited;
    if (metrics_ != nullptr) journal_->SetObserver(metrics_->journal_observer());
    options.core.journal = journal_.get();
    core_ = std::make_unique<CallSessionCore>(std::move(options.core));
    CS_ASSIGN_OR_RETURN(const RecoveryCounts counts, core_->Recover());
    const double seconds = absl::ToDoubleSeconds(absl::Now() - start);
    if (metrics_ != nullptr) metrics_->SetRecoverySeconds(seconds);
    Log(LogLevel::kInfo, "recovered",
        {{"apps", static_cast<uint64_t>(counts.apps)},
         {"lines", static_cast<uint64_t>(counts.lines)},
         {"calls", static_cast<uint64_t>(counts.calls)},
         {"call_handles", static_cast<uint64_t>(counts.call_handles)},
         {"events", static_cast<uint64_t>(counts.events)},
         {"request_ids", static_cast<uint64_t>(counts.request_ids)},
         {"apps_revoked", static_cast<uint64_t>(counts.apps_revoked)},
         {"lines_revoked", static_cast<uint64_t>(counts.lines_revoked)},
         {"new_store", counts.created},
         {"seconds", seconds},
         {"waited_to_lead_seconds", absl::ToDoubleSeconds(waited)}});
  } else {
    core_ = std::make_unique<CallSessionCore>(std::move(options.core));
  }
  serving_.Set(core_.get());
  return absl::OkStatus();
}

void CallSessionServer::EnforceLeases(absl::Duration period) {
  while (!stop_leases_.WaitForNotificationWithTimeout(period)) {
    // A leader resumed after a pause past its lease must not expire apps
    // whose clients were served by its successor meanwhile.
    if (leader_gate_ != nullptr && !leader_gate_->MayServe()) continue;
    core_->ExpireIdleApps();
  }
}

CallSessionServer::~CallSessionServer() {
  if (!shut_down_ && server_ != nullptr) Shutdown(absl::ZeroDuration());
}

absl::Status CallSessionServer::ReloadTenants() {
  if (tenants_watcher_ == nullptr) {
    return absl::FailedPreconditionError("the server runs without a tenants file (open mode)");
  }
  return tenants_watcher_->Reload();
}

void CallSessionServer::Shutdown(absl::Duration grace) {
  shut_down_ = true;
  tenants_watcher_.reset();
  // Clients cannot renew leases while the server drains.
  stop_leases_.Notify();
  if (lease_thread_.joinable()) lease_thread_.join();
  health_service_->SetAll(false);
  if (metrics_ != nullptr) metrics_->SetServing(false);
  Log(LogLevel::kInfo, "health_not_serving");
  if (core_ != nullptr) {
    core_->EndAllSubscriptions(absl::UnavailableError("the server is shutting down"));
  }
  // Health watches end (their streams would hold the drain to its end).
  health_service_->Shutdown();
  // grpc::Server::Shutdown also waits for every connection to close, and a
  // connection with no call on it closes only once its client answers the
  // GOAWAY's ping: a C++ client reads an idle connection every 5 s (gRPC's
  // backup poller); one that does not read holds it for gRPC's 20 s ping
  // timeout. Once no call is left, close them.
  absl::Notification drained;
  std::thread closer([this, &drained] { CloseConnectionsOnceQuiet(drained); });
  server_->Shutdown(absl::ToChronoTime(absl::Now() + grace));
  drained.Notify();
  closer.join();
  server_->Wait();
  async_serving_->Shutdown();
}

int64_t CallSessionServer::CallsInProgress() const {
  return async_serving_->CallsInProgress() + admin_service_->CallsInProgress();
}

void CallSessionServer::CloseConnectionsOnceQuiet(absl::Notification& drained) {
  // A call gRPC has matched but no serving thread has taken yet is not
  // counted: a few quiet checks in a row give it time to be. They also put
  // the first cancel well after Shutdown has begun, as gRPC requires.
  constexpr absl::Duration kCheckEvery = absl::Milliseconds(10);
  constexpr int kQuietChecks = 3;
  int quiet = 0;
  while (!drained.WaitForNotificationWithTimeout(kCheckEvery)) {
    quiet = CallsInProgress() == 0 ? quiet + 1 : 0;
    if (quiet == kQuietChecks) {
      grpc_server_cancel_all_calls(server_->c_server());
      return;
    }
  }
}

}  // namespace callsession
