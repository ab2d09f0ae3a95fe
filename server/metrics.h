// Prometheus metrics on their own HTTP port (GET /metrics, served by
// libmicrohttpd; "[::]:PORT" listens on IPv6 and IPv4 alike):
//  - per RPC, with go-grpc-prometheus names and labels (grpc_type,
//    grpc_service, grpc_method, and grpc_code where it applies):
//    grpc_server_started_total, grpc_server_handled_total,
//    grpc_server_handling_seconds (histogram);
//  - the service's own state, read from CallSessionCore::Stats() at scrape
//    time: callsession_live_{apps,lines,calls,call_handles,event_subscribers}
//    and callsession_{calls_created,calls_freed,call_handles_created,
//    call_handles_voided,call_handles_deallocated,calls_dropped_by_line_close,
//    forced_line_closes}_total;
//  - with a durable store: callsession_journal_{entries,batches,bytes}_total,
//    callsession_journal_commit_seconds (histogram: from a batch's first
//    entry to its being durable) and callsession_recovery_seconds;
//  - callsession_serving: 1 while health reports SERVING, 0 while the store
//    loads and from the moment shutdown begins;
//  - authentication: callsession_auth_failures_total{reason} (reason: see
//    AuthFailureName);
//  - with a tenants file: callsession_tenant_{apps,lines,call_handles}
//    {tenant} (one series per tenant in force: label values come only from
//    the file), callsession_tenants_configured,
//    callsession_tenants_reloads_total{result="ok"|"error"}, and
//    callsession_{apps,lines}_revoked_total.
//
// The per-RPC series of every method of the given services are created up
// front (as go-grpc-prometheus's InitializeMetrics does), so recording an RPC
// takes no lock but the method's histogram's own.
#ifndef CALLSESSION_SERVER_METRICS_H_
#define CALLSESSION_SERVER_METRICS_H_

#include <memory>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "grpcpp/support/server_interceptor.h"
#include "server/core/call_session_core.h"
#include "server/core/journal.h"
#include "server/serving_core.h"

namespace prometheus {
class Collectable;
class Counter;
class Gauge;
class Histogram;
class Registry;
}  // namespace prometheus

namespace callsession {

struct MethodMetrics;
class CoreCollector;
class MetricsEndpoint;

// RPCs the server accepted (its handler ran) and how they ended.
struct RpcTotals {
  uint64_t started = 0;
  uint64_t ok = 0;
  uint64_t failed = 0;
};

class ServerMetrics {
 public:
  // Serves /metrics on `address` (host:port; port 0 picks one). `serving`
  // must outlive the metrics; the core's metrics appear once it is set.
  // Errors: UNAVAILABLE if the address cannot be bound.
  static absl::StatusOr<std::unique_ptr<ServerMetrics>> Start(
      const std::string& address, const ServingCore* serving,
      const std::vector<std::string>& service_names);
  ~ServerMetrics();

  // Records every RPC of the server it is installed in. The factory keeps a
  // pointer to this object, which must outlive the server.
  std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface> NewInterceptorFactory();

  int port() const { return port_; }

  // Records journal commits (see Journal::SetObserver).
  std::shared_ptr<JournalObserver> journal_observer();
  void SetRecoverySeconds(double seconds);
  // Follows the health service's overall status.
  void SetServing(bool serving);
  // Whether this process is a standby that follows the leader.
  void SetStandby(bool standby);
  // Counts a reload of the tenants file that was put in force (`ok`) or
  // refused.
  void RecordTenantsReload(bool ok);

  // Sums of grpc_server_started_total and grpc_server_handled_total.
  RpcTotals Totals();

  // For the interceptor: the series of a method ("/pkg.Service/Method").
  MethodMetrics& ForMethod(const char* full_method, grpc::experimental::ServerRpcInfo::Type type);

 private:
  ServerMetrics() = default;
  // Registers the series of one method. The registry is thread-safe.
  std::unique_ptr<MethodMetrics> NewMethodMetrics(const std::string& full_method,
                                                  const char* rpc_type);

  std::shared_ptr<prometheus::Registry> registry_;
  std::shared_ptr<CoreCollector> core_collector_;
  std::shared_ptr<JournalObserver> journal_observer_;
  prometheus::Gauge* recovery_seconds_ = nullptr;
  prometheus::Gauge* serving_ = nullptr;
  prometheus::Gauge* standby_ = nullptr;
  prometheus::Counter* tenants_reloads_ok_ = nullptr;
  prometheus::Counter* tenants_reloads_failed_ = nullptr;
  std::unique_ptr<MetricsEndpoint> endpoint_;
  int port_ = 0;
  // Built in Start and never changed afterwards: read without a lock.
  absl::flat_hash_map<std::string, std::unique_ptr<MethodMetrics>> methods_;
  // Methods not known up front (e.g. health, reflection), added on first use.
  absl::Mutex unknown_mu_;
  absl::flat_hash_map<std::string, std::unique_ptr<MethodMetrics>> unknown_methods_
      ABSL_GUARDED_BY(unknown_mu_);
};

}  // namespace callsession

#endif  // CALLSESSION_SERVER_METRICS_H_
