#include "server/metrics.h"

#include <microhttpd.h>
#include <netdb.h>
#include <sys/socket.h>

#include <array>
#include <cstring>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "google/protobuf/descriptor.h"
#include "prometheus/collectable.h"
#include "prometheus/counter.h"
#include "prometheus/gauge.h"
#include "prometheus/histogram.h"
#include "prometheus/registry.h"
#include "prometheus/text_serializer.h"
#include "server/core/log.h"

namespace callsession {

constexpr int kStatusCodes = 17;  // grpc::StatusCode 0..16

struct MethodMetrics {
  prometheus::Counter* started = nullptr;
  std::array<prometheus::Counter*, kStatusCodes> handled{};
  prometheus::Histogram* handling_seconds = nullptr;
  std::string service;
  std::string method;
};

namespace {

const char* const kCodeNames[kStatusCodes] = {
    "OK",       "Canceled",       "Unknown",          "InvalidArgument",   "DeadlineExceeded",
    "NotFound", "AlreadyExists",  "PermissionDenied", "ResourceExhausted", "FailedPrecondition",
    "Aborted",  "OutOfRange",     "Unimplemented",    "Internal",          "Unavailable",
    "DataLoss", "Unauthenticated"};

const char* RpcTypeName(grpc::experimental::ServerRpcInfo::Type type) {
  switch (type) {
    case grpc::experimental::ServerRpcInfo::Type::UNARY:
      return "unary";
    case grpc::experimental::ServerRpcInfo::Type::SERVER_STREAMING:
      return "server_stream";
    case grpc::experimental::ServerRpcInfo::Type::CLIENT_STREAMING:
      return "client_stream";
    case grpc::experimental::ServerRpcInfo::Type::BIDI_STREAMING:
      return "bidi_stream";
  }
  return "unary";
}

// Times one RPC from its arrival to its status. An interceptor is also made
// for each call the server had asked for and never got (at shutdown):
// those never receive metadata, and are not counted.
class MetricsInterceptor final : public grpc::experimental::Interceptor {
 public:
  explicit MetricsInterceptor(MethodMetrics& metrics) : metrics_(metrics) {}

  void Intercept(grpc::experimental::InterceptorBatchMethods* methods) override {
    if (methods->QueryInterceptionHookPoint(
            grpc::experimental::InterceptionHookPoints::POST_RECV_INITIAL_METADATA)) {
      start_ = absl::Now();
      metrics_.started->Increment();
    }
    if (methods->QueryInterceptionHookPoint(
            grpc::experimental::InterceptionHookPoints::PRE_SEND_STATUS)) {
      const int code = static_cast<int>(methods->GetSendStatus().error_code());
      if (code >= 0 && code < kStatusCodes) metrics_.handled[code]->Increment();
      metrics_.handling_seconds->Observe(absl::ToDoubleSeconds(absl::Now() - start_));
    }
    methods->Proceed();
  }

 private:
  MethodMetrics& metrics_;
  absl::Time start_ = absl::Now();
};

class MetricsInterceptorFactory final
    : public grpc::experimental::ServerInterceptorFactoryInterface {
 public:
  explicit MetricsInterceptorFactory(ServerMetrics* metrics) : metrics_(*metrics) {}
  grpc::experimental::Interceptor* CreateServerInterceptor(
      grpc::experimental::ServerRpcInfo* info) override {
    return new MetricsInterceptor(metrics_.ForMethod(info->method(), info->type()));
  }

 private:
  ServerMetrics& metrics_;
};

// Journal batches as they become durable.
// Shares the registry: the journal's threads may report after the server's
// metrics are gone.
class JournalMetrics final : public JournalObserver {
 public:
  explicit JournalMetrics(std::shared_ptr<prometheus::Registry> registry)
      : registry_(std::move(registry)),
        commit_seconds_(prometheus::BuildHistogram()
                            .Name("callsession_journal_commit_seconds")
                            .Help("From a journal batch's first entry to the batch being durable "
                                  "(queueing, write and sync).")
                            .Register(*registry_)
                            .Add({}, prometheus::Histogram::BucketBoundaries{
                                         0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005,
                                         0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1})) {}

  void OnBatchDurable(absl::Duration latency, uint64_t entries, uint64_t bytes) override {
    commit_seconds_.Observe(absl::ToDoubleSeconds(latency));
  }

 private:
  const std::shared_ptr<prometheus::Registry> registry_;
  prometheus::Histogram& commit_seconds_;
};

prometheus::ClientMetric Value(double value, bool counter) {
  prometheus::ClientMetric metric;
  if (counter) {
    metric.counter.value = value;
  } else {
    metric.gauge.value = value;
  }
  return metric;
}

}  // namespace

// GET /metrics over HTTP/1.1 (libmicrohttpd, one polling thread): the
// collectables' families in Prometheus's text format. A wildcard IPv6 host
// ("[::]") listens on IPv4 too.
class MetricsEndpoint {
 public:
  static absl::StatusOr<std::unique_ptr<MetricsEndpoint>> Start(
      const std::string& address,
      std::vector<std::shared_ptr<prometheus::Collectable>> collectables) {
    const size_t colon = address.rfind(':');
    if (colon == std::string::npos || colon == 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("metrics address must be HOST:PORT, got \"", address, "\""));
    }
    std::string host = address.substr(0, colon);
    const std::string port = address.substr(colon + 1);
    if (host.size() >= 2 && host.front() == '[' && host.back() == ']') {
      host = host.substr(1, host.size() - 2);
    }
    addrinfo hints{};
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
    addrinfo* found = nullptr;
    if (getaddrinfo(host.c_str(), port.c_str(), &hints, &found) != 0 || found == nullptr) {
      return absl::InvalidArgumentError(
          absl::StrCat("cannot resolve the metrics address \"", address, "\""));
    }
    std::unique_ptr<addrinfo, void (*)(addrinfo*)> resolved(found, freeaddrinfo);
    unsigned int flags = MHD_USE_INTERNAL_POLLING_THREAD;
    if (found->ai_family == AF_INET6) {
      const auto* v6 = reinterpret_cast<const sockaddr_in6*>(found->ai_addr);
      flags |= IN6_IS_ADDR_UNSPECIFIED(&v6->sin6_addr) ? MHD_USE_DUAL_STACK : MHD_USE_IPv6;
    }
    std::unique_ptr<MetricsEndpoint> endpoint(new MetricsEndpoint(std::move(collectables)));
    endpoint->daemon_ =
        MHD_start_daemon(flags, 0, nullptr, nullptr, &MetricsEndpoint::Handle, endpoint.get(),
                         MHD_OPTION_SOCK_ADDR, found->ai_addr, MHD_OPTION_CONNECTION_TIMEOUT, 10u,
                         MHD_OPTION_CONNECTION_LIMIT, 64u, MHD_OPTION_END);
    if (endpoint->daemon_ == nullptr) {
      return absl::UnavailableError(absl::StrCat("cannot serve metrics on ", address));
    }
    const MHD_DaemonInfo* info = MHD_get_daemon_info(endpoint->daemon_, MHD_DAEMON_INFO_BIND_PORT);
    endpoint->port_ = info != nullptr ? info->port : 0;
    return endpoint;
  }

  ~MetricsEndpoint() {
    if (daemon_ != nullptr) MHD_stop_daemon(daemon_);
  }

  int port() const { return port_; }

 private:
  explicit MetricsEndpoint(std::vector<std::shared_ptr<prometheus::Collectable>> collectables)
      : collectables_(std::move(collectables)) {}

  static MHD_Result Handle(void* self, MHD_Connection* connection, const char* url,
                           const char* method, const char* version, const char* upload_data,
                           size_t* upload_data_size, void** request_state) {
    const bool get = std::strcmp(method, "GET") == 0 || std::strcmp(method, "HEAD") == 0;
    const bool metrics = std::strcmp(url, "/metrics") == 0;
    std::string body = !get       ? "only GET\n"
                       : !metrics ? "not found: scrape /metrics\n"
                                  : static_cast<MetricsEndpoint*>(self)->Render();
    MHD_Response* response =
        MHD_create_response_from_buffer(body.size(), body.data(), MHD_RESPMEM_MUST_COPY);
    MHD_add_response_header(
        response, MHD_HTTP_HEADER_CONTENT_TYPE,
        metrics && get ? "text/plain; version=0.0.4; charset=utf-8" : "text/plain; charset=utf-8");
    const MHD_Result queued = MHD_queue_response(connection,
                                                 !get      ? MHD_HTTP_METHOD_NOT_ALLOWED
                                                 : metrics ? MHD_HTTP_OK
                                                           : MHD_HTTP_NOT_FOUND,
                                                 response);
    MHD_destroy_response(response);
    return queued;
  }

  std::string Render() const {
    std::vector<prometheus::MetricFamily> families;
    for (const auto& collectable : collectables_) {
      std::vector<prometheus::MetricFamily> more = collectable->Collect();
      families.insert(families.end(), std::make_move_iterator(more.begin()),
                      std::make_move_iterator(more.end()));
    }
    return prometheus::TextSerializer().Serialize(families);
  }

  const std::vector<std::shared_ptr<prometheus::Collectable>> collectables_;
  MHD_Daemon* daemon_ = nullptr;
  int port_ = 0;
};

// The core's counters and live gauges, read at scrape time.
class CoreCollector final : public prometheus::Collectable {
 public:
  explicit CoreCollector(const ServingCore* serving) : serving_(*serving) {}

  std::vector<prometheus::MetricFamily> Collect() const override {
    std::vector<prometheus::MetricFamily> families;
    const CallSessionCore* core = serving_.get();
    if (core == nullptr) return families;  // still loading
    const CoreStats stats = core->Stats();
    auto add = [&families](const char* name, const char* help, double value, bool counter) {
      prometheus::MetricFamily family;
      family.name = name;
      family.help = help;
      family.type = counter ? prometheus::MetricType::Counter : prometheus::MetricType::Gauge;
      family.metric.push_back(Value(value, counter));
      families.push_back(std::move(family));
    };
    add("callsession_live_apps", "Registered applications.", stats.live.apps, false);
    add("callsession_live_lines", "Open lines.", stats.live.lines, false);
    add("callsession_live_calls", "Tracked call records.", stats.live.calls, false);
    add("callsession_live_call_handles", "Valid call handles.", stats.live.call_handles, false);
    add("callsession_live_event_subscribers", "Open WatchEvents streams.", stats.event_subscribers,
        false);
    add("callsession_events_buffered", "Events held in applications' replay buffers.",
        stats.events_buffered, false);
    add("callsession_events_lost_total",
        "Events evicted before a consumer got them (reported as EventsLostEvent).",
        stats.events_lost, true);
    add("callsession_apps_expired_total", "Applications shut down because their lease ran out.",
        stats.apps_expired, true);
    add("callsession_quota_rejections_total", "Requests refused by a quota (RESOURCE_EXHAUSTED).",
        stats.quota_rejections, true);
    add("callsession_calls_created_total", "Calls created (MakeCall and OfferCall).",
        stats.calls_created, true);
    add("callsession_calls_freed_total", "Call records freed (IDLE with no handle left).",
        stats.calls_freed, true);
    add("callsession_call_handles_created_total", "Call handles issued.",
        stats.call_handles_created, true);
    add("callsession_call_handles_voided_total",
        "Call handles voided (deallocated, line closed, app shut down).", stats.call_handles_voided,
        true);
    add("callsession_call_handles_deallocated_total", "Call handles voided by DeallocateCall.",
        stats.call_handles_deallocated, true);
    add("callsession_calls_dropped_by_line_close_total",
        "Live calls dropped because their sole owner's line closed.",
        stats.calls_dropped_by_line_close, true);
    add("callsession_forced_line_closes_total", "Lines closed by ForceLineClose.",
        stats.forced_line_closes, true);
    {
      prometheus::MetricFamily failures;
      failures.name = "callsession_auth_failures_total";
      failures.help =
          "Failed authentications (UNAUTHENTICATED), by reason: missing_credential, "
          "malformed_token, unknown_token, unknown_api_key, unknown_client_identity, "
          "conflicting_credentials, not_provider.";
      failures.type = prometheus::MetricType::Counter;
      for (int i = 0; i < kAuthFailureKinds; ++i) {
        prometheus::ClientMetric metric = Value(static_cast<double>(stats.auth_failures[i]), true);
        metric.label.push_back(
            {"reason", std::string(AuthFailureName(static_cast<AuthFailure>(i)))});
        failures.metric.push_back(std::move(metric));
      }
      families.push_back(std::move(failures));
    }
    if (core->options().tenants != nullptr) {
      const std::vector<TenantUsage> usages = core->TenantUsages();
      add("callsession_tenants_configured", "Tenants in the tenants file in force.",
          static_cast<double>(usages.size()), false);
      add("callsession_apps_revoked_total",
          "Applications shut down because the tenants file no longer has their tenant or "
          "credential.",
          stats.apps_revoked, true);
      add("callsession_lines_revoked_total",
          "Lines closed because the tenants file took away a right they were opened with.",
          stats.lines_revoked, true);
      auto per_tenant = [&](const char* name, const char* help, size_t TenantUsage::*field) {
        prometheus::MetricFamily family;
        family.name = name;
        family.help = help;
        family.type = prometheus::MetricType::Gauge;
        for (const TenantUsage& usage : usages) {
          prometheus::ClientMetric metric = Value(static_cast<double>(usage.*field), false);
          metric.label.push_back({"tenant", usage.tenant});
          family.metric.push_back(std::move(metric));
        }
        families.push_back(std::move(family));
      };
      per_tenant("callsession_tenant_apps", "Registered applications of each tenant.",
                 &TenantUsage::apps);
      per_tenant("callsession_tenant_lines", "Open lines of each tenant's applications.",
                 &TenantUsage::lines);
      per_tenant("callsession_tenant_call_handles",
                 "Call handles each tenant's applications hold (a call seen by two of its "
                 "applications counts twice).",
                 &TenantUsage::call_handles);
    }
    if (stats.journaled) {
      add("callsession_journal_entries_total", "Journal entries appended (one per change).",
          stats.journal.entries, true);
      add("callsession_journal_batches_total", "Atomic journal writes (group commits).",
          stats.journal.batches, true);
      add("callsession_journal_syncs_total",
          "Syncs of the journal to stable storage, each covering every write before it (none "
          "with --sync=false).",
          stats.journal.syncs, true);
      add("callsession_journal_bytes_total", "Bytes of journal batches written.",
          stats.journal.bytes, true);
    }
    return families;
  }

 private:
  const ServingCore& serving_;
};

absl::StatusOr<std::unique_ptr<ServerMetrics>> ServerMetrics::Start(
    const std::string& address, const ServingCore* serving,
    const std::vector<std::string>& service_names) {
  std::unique_ptr<ServerMetrics> metrics(new ServerMetrics());
  metrics->registry_ = std::make_shared<prometheus::Registry>();
  metrics->core_collector_ = std::make_shared<CoreCollector>(serving);
  metrics->journal_observer_ = std::make_shared<JournalMetrics>(metrics->registry_);
  metrics->recovery_seconds_ =
      &prometheus::BuildGauge()
           .Name("callsession_recovery_seconds")
           .Help("How long loading the store took at start (0 with the memory store).")
           .Register(*metrics->registry_)
           .Add({});
  metrics->serving_ = &prometheus::BuildGauge()
                           .Name("callsession_serving")
                           .Help(
                               "1 while health reports SERVING, 0 while the store loads and "
                               "from the moment shutdown begins.")
                           .Register(*metrics->registry_)
                           .Add({});
  metrics->standby_ = &prometheus::BuildGauge()
                           .Name("callsession_standby")
                           .Help(
                               "1 while this process is a standby following the leader "
                               "(--store=etcd), ready to take over; 0 otherwise.")
                           .Register(*metrics->registry_)
                           .Add({});
  auto& reloads = prometheus::BuildCounter()
                      .Name("callsession_tenants_reloads_total")
                      .Help(
                          "Reloads of the tenants file: put in force (ok) or refused (error, the "
                          "configuration in force stays).")
                      .Register(*metrics->registry_);
  metrics->tenants_reloads_ok_ = &reloads.Add({{"result", "ok"}});
  metrics->tenants_reloads_failed_ = &reloads.Add({{"result", "error"}});
  for (const std::string& name : service_names) {
    const google::protobuf::ServiceDescriptor* service =
        google::protobuf::DescriptorPool::generated_pool()->FindServiceByName(name);
    if (service == nullptr) continue;
    for (int i = 0; i < service->method_count(); ++i) {
      const google::protobuf::MethodDescriptor* method = service->method(i);
      const std::string full = absl::StrCat("/", service->full_name(), "/", method->name());
      const char* type = method->server_streaming()   ? "server_stream"
                         : method->client_streaming() ? "client_stream"
                                                      : "unary";
      metrics->methods_.emplace(full, metrics->NewMethodMetrics(full, type));
    }
  }
  absl::StatusOr<std::unique_ptr<MetricsEndpoint>> endpoint =
      MetricsEndpoint::Start(address, {metrics->registry_, metrics->core_collector_});
  if (!endpoint.ok()) return endpoint.status();
  metrics->endpoint_ = *std::move(endpoint);
  metrics->port_ = metrics->endpoint_->port();
  return metrics;
}

ServerMetrics::~ServerMetrics() = default;

std::shared_ptr<JournalObserver> ServerMetrics::journal_observer() { return journal_observer_; }

void ServerMetrics::SetRecoverySeconds(double seconds) { recovery_seconds_->Set(seconds); }

void ServerMetrics::SetServing(bool serving) { serving_->Set(serving ? 1 : 0); }

void ServerMetrics::SetStandby(bool standby) { standby_->Set(standby ? 1 : 0); }

void ServerMetrics::RecordTenantsReload(bool ok) {
  (ok ? tenants_reloads_ok_ : tenants_reloads_failed_)->Increment();
}

std::unique_ptr<MethodMetrics> ServerMetrics::NewMethodMetrics(const std::string& full_method,
                                                               const char* rpc_type) {
  auto metrics = std::make_unique<MethodMetrics>();
  const size_t slash = full_method.rfind('/');
  metrics->service = full_method.substr(1, slash == std::string::npos ? 0 : slash - 1);
  metrics->method = slash == std::string::npos ? full_method : full_method.substr(slash + 1);
  const prometheus::Labels labels = {{"grpc_type", rpc_type},
                                     {"grpc_service", metrics->service},
                                     {"grpc_method", metrics->method}};

  auto& started = prometheus::BuildCounter()
                      .Name("grpc_server_started_total")
                      .Help("Total number of RPCs started on the server.")
                      .Register(*registry_);
  auto& handled = prometheus::BuildCounter()
                      .Name("grpc_server_handled_total")
                      .Help(
                          "Total number of RPCs completed on the server, regardless of success "
                          "or failure.")
                      .Register(*registry_);
  auto& seconds = prometheus::BuildHistogram()
                      .Name("grpc_server_handling_seconds")
                      .Help(
                          "Histogram of response latency (seconds) of gRPC that had been "
                          "application-level handled by the server.")
                      .Register(*registry_);
  metrics->started = &started.Add(labels);
  for (int code = 0; code < kStatusCodes; ++code) {
    prometheus::Labels with_code = labels;
    with_code["grpc_code"] = kCodeNames[code];
    metrics->handled[code] = &handled.Add(with_code);
  }
  metrics->handling_seconds =
      &seconds.Add(labels, prometheus::Histogram::BucketBoundaries{
                               0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
                               0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10});
  return metrics;
}

MethodMetrics& ServerMetrics::ForMethod(const char* full_method,
                                        grpc::experimental::ServerRpcInfo::Type type) {
  if (auto it = methods_.find(full_method); it != methods_.end()) return *it->second;
  absl::MutexLock lock(&unknown_mu_);
  if (auto it = unknown_methods_.find(full_method); it != unknown_methods_.end()) {
    return *it->second;
  }
  std::unique_ptr<MethodMetrics>& slot = unknown_methods_[full_method];
  slot = NewMethodMetrics(full_method, RpcTypeName(type));
  return *slot;
}

RpcTotals ServerMetrics::Totals() {
  RpcTotals totals;
  auto add = [&totals](const MethodMetrics& method) {
    totals.started += static_cast<uint64_t>(method.started->Value());
    for (int code = 0; code < kStatusCodes; ++code) {
      const auto count = static_cast<uint64_t>(method.handled[code]->Value());
      (code == 0 ? totals.ok : totals.failed) += count;
    }
  };
  for (const auto& [name, method] : methods_) add(*method);
  absl::MutexLock lock(&unknown_mu_);
  for (const auto& [name, method] : unknown_methods_) add(*method);
  return totals;
}

std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface>
ServerMetrics::NewInterceptorFactory() {
  return std::make_unique<MetricsInterceptorFactory>(this);
}

}  // namespace callsession
