// CallSessionServer: the core plus its gRPC services (CallSessionService,
// ProviderService, AdminService, grpc.health.v1.Health, and reflection
// unless turned off) on one address, and optionally Prometheus metrics on
// another; with a store (ServerOptions::open_journal), the durable journal
// the core recovers from at start. What callsessiond runs, and what the
// tests start on port 0.
#ifndef CALLSESSION_SERVER_SERVER_H_
#define CALLSESSION_SERVER_SERVER_H_

#include <functional>
#include <memory>
#include <string>
#include <thread>

#include "absl/status/statusor.h"
#include "absl/synchronization/notification.h"
#include "absl/time/time.h"
#include "grpcpp/server.h"
#include "server/admin_service.h"
#include "server/async_serving.h"
#include "server/call_session_service.h"
#include "server/core/call_session_core.h"
#include "server/core/journal.h"
#include "server/core/leadership.h"
#include "server/health_service.h"
#include "server/metrics.h"
#include "server/provider_service.h"
#include "server/serving_core.h"
#include "server/tenants_watcher.h"

namespace callsession {

// PEM files. No cert: plaintext. A client CA: mutual TLS (clients must
// present a certificate signed by it).
struct TlsFiles {
  std::string cert_file;
  std::string key_file;
  std::string client_ca_file;
};

struct ServerOptions {
  // host:port; port 0 picks a free port (see CallSessionServer::port()).
  std::string listen_address = "127.0.0.1:50051";
  // core.journal is set by Start from open_journal.
  CoreOptions core;
  // Opens the durable store the core recovers from and journals to; empty
  // keeps all state in memory (--store=memory). Called by Start after the
  // server listens, so health answers NOT_SERVING while it runs.
  std::function<absl::StatusOr<std::unique_ptr<Journal>>()> open_journal;
  // With a replicated store: its gate (open_journal then returns only once
  // this process leads). RPCs answer NOT_LEADER while it says so.
  std::shared_ptr<LeaderGate> leader_gate;
  // Called with host:port once the server listens, before the store is
  // loaded (for tests that watch a recovery).
  std::function<void(const std::string& address)> on_listening;
  // The AdminService's bearer token; empty refuses every admin call.
  std::string admin_token;
  // The tenants file (protos/callsession/config/v1/tenants.proto); empty:
  // open mode (core.tenants stays null; a warning is logged). Start loads
  // it into core.tenants, and the server re-reads it when it changes,
  // checking every tenants_check_interval.
  std::string tenants_file;
  absl::Duration tenants_check_interval = absl::Seconds(1);
  // Requests larger than this fail with RESOURCE_EXHAUSTED in the transport.
  // The largest valid request is well under 1 KiB.
  int max_receive_message_bytes = 16 * 1024;
  // Concurrent RPCs (HTTP/2 streams) per client connection.
  int max_concurrent_streams = 1024;
  // Threads serving the RPCs (see AsyncServing); 0: one per CPU this
  // process may run on (its affinity mask).
  int serving_threads = 0;
  // Server reflection (for grpcurl, ghz, buf curl).
  bool reflection = true;
  // host:port for /metrics; empty: no metrics endpoint, no per-RPC metrics.
  std::string metrics_address;
  TlsFiles tls;
  // The server pings an idle connection this often and drops it if no
  // answer comes within keepalive_timeout: dead clients' streams are freed.
  absl::Duration keepalive_time = absl::Seconds(60);
  absl::Duration keepalive_timeout = absl::Seconds(20);
  // Clients may ping no more often than this (without calls in flight too).
  absl::Duration min_client_ping_interval = absl::Seconds(10);
  // Zero: never. State is per process, so forcing reconnects buys no load
  // balancing; set them only behind a proxy that needs it.
  absl::Duration max_connection_idle = absl::ZeroDuration();
  absl::Duration max_connection_age = absl::ZeroDuration();
  absl::Duration max_connection_age_grace = absl::ZeroDuration();
};

// Thread-safe; Shutdown may be called from any thread, once.
class CallSessionServer {
 public:
  // Starts listening with health NOT_SERVING (every RPC answers
  // UNAVAILABLE; with a replicated store, a standby reports the overall
  // status "" SERVING once it follows the leader, and its services stay
  // NOT_SERVING until it leads), opens the store and recovers the core from
  // it (logging
  // `recovering` with the address, then `recovered` with the counts and the
  // time taken), and only then serves: health SERVING. Errors:
  // INVALID_ARGUMENT for bad options, unreadable TLS files or a tenants file
  // that is unreadable or wrong (naming its line), UNAVAILABLE if an address
  // cannot be bound; opening or recovering the store: its error (see
  // OpenRocksDbJournal and CallSessionCore::Recover).
  static absl::StatusOr<std::unique_ptr<CallSessionServer>> Start(ServerOptions options);

  // Shuts down with no grace if Shutdown was not called.
  ~CallSessionServer();

  CallSessionServer(const CallSessionServer&) = delete;
  CallSessionServer& operator=(const CallSessionServer&) = delete;

  // The port actually bound, and host:port.
  int port() const { return port_; }
  const std::string& address() const { return address_; }
  // The metrics port, 0 if metrics are off.
  int metrics_port() const { return metrics_ != nullptr ? metrics_->port() : 0; }

  // Leases stop being enforced; health goes NOT_SERVING; every WatchEvents
  // stream ends with UNAVAILABLE;
  // new RPCs are refused; in-flight ones may finish for up to `grace`, then
  // the rest are cancelled; once none is left, the connections still open
  // are closed (idle clients that have not read the GOAWAY do not hold the
  // shutdown). Returns when all are done.
  void Shutdown(absl::Duration grace);

  CallSessionCore& core() { return *core_; }

  // Re-reads the tenants file now (SIGHUP); see TenantsFileWatcher::Reload.
  // FAILED_PRECONDITION without a tenants file.
  absl::Status ReloadTenants();
  // Null with the memory store.
  Journal* journal() { return journal_.get(); }
  // Null if metrics are off.
  ServerMetrics* metrics() { return metrics_.get(); }

 private:
  CallSessionServer() = default;

  // Calls of the services that have arrived and not yet ended (reflection
  // and health aside).
  int64_t CallsInProgress() const;

  // From the start of grpc::Server::Shutdown until `drained`: once no call
  // has been in progress for a few checks in a row, closes every connection
  // left, so that idle clients do not hold the shutdown.
  void CloseConnectionsOnceQuiet(absl::Notification& drained);

  // Runs CallSessionCore::ExpireIdleApps every `period` until stop_leases_.
  void EnforceLeases(absl::Duration period);

  // Opens the store and recovers the core; then serves it.
  absl::Status LoadCore(ServerOptions& options);

  // Declared first, destroyed last: the server refers to all of these (the
  // core to the journal).
  std::shared_ptr<LeaderGate> leader_gate_;
  std::unique_ptr<Journal> journal_;
  std::unique_ptr<CallSessionCore> core_;
  ServingCore serving_;
  std::unique_ptr<ServerMetrics> metrics_;
  std::unique_ptr<CallSessionGrpcService> call_session_service_;
  std::unique_ptr<ProviderGrpcService> provider_service_;
  std::unique_ptr<AdminGrpcService> admin_service_;
  std::unique_ptr<HealthService> health_service_;
  // Its queues outlive the server, which is shut down before them.
  std::unique_ptr<AsyncServing> async_serving_;
  std::unique_ptr<grpc::Server> server_;
  int port_ = 0;
  std::string address_;
  bool shut_down_ = false;
  absl::Notification stop_leases_;
  std::thread lease_thread_;  // runs EnforceLeases when leases are on
  // With a tenants file; destroyed before the core it feeds.
  std::unique_ptr<TenantsFileWatcher> tenants_watcher_;
};

}  // namespace callsession

#endif  // CALLSESSION_SERVER_SERVER_H_
