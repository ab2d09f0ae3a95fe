#include "server/health_service.h"

#include <optional>

#include "absl/time/time.h"

namespace callsession {

using grpc::health::v1::HealthCheckResponse;

HealthService::HealthService() {
  absl::MutexLock lock(&mu_);
  serving_[""] = true;
}

void HealthService::Set(const std::string& service, bool serving) {
  absl::MutexLock lock(&mu_);
  if (shut_down_) return;
  serving_[service] = serving;
  ++version_;
}

void HealthService::SetAll(bool serving) {
  absl::MutexLock lock(&mu_);
  if (shut_down_) return;
  for (auto& [name, status] : serving_) status = serving;
  ++version_;
}

void HealthService::Shutdown() {
  absl::MutexLock lock(&mu_);
  for (auto& [name, status] : serving_) status = false;
  shut_down_ = true;
  ++version_;
}

HealthService::ServingStatus HealthService::StatusLocked(const std::string& service) const {
  auto it = serving_.find(service);
  if (it == serving_.end()) return HealthCheckResponse::SERVICE_UNKNOWN;
  return it->second ? HealthCheckResponse::SERVING : HealthCheckResponse::NOT_SERVING;
}

grpc::Status HealthService::Check(grpc::ServerContext* /*context*/,
                                  const grpc::health::v1::HealthCheckRequest* request,
                                  HealthCheckResponse* response) {
  absl::MutexLock lock(&mu_);
  const ServingStatus status = StatusLocked(request->service());
  if (status == HealthCheckResponse::SERVICE_UNKNOWN) {
    return grpc::Status(grpc::StatusCode::NOT_FOUND, "unknown service");
  }
  response->set_status(status);
  return grpc::Status::OK;
}

grpc::Status HealthService::Watch(grpc::ServerContext* context,
                                  const grpc::health::v1::HealthCheckRequest* request,
                                  grpc::ServerWriter<HealthCheckResponse>* writer) {
  // A cancelled call is noticed at the latest this long after.
  constexpr absl::Duration kCancellationCheck = absl::Milliseconds(200);
  std::optional<ServingStatus> sent;
  for (;;) {
    ServingStatus status;
    bool ending;
    uint64_t seen;
    {
      absl::MutexLock lock(&mu_);
      status = StatusLocked(request->service());
      ending = shut_down_;
      seen = version_;
    }
    if (sent != status) {
      HealthCheckResponse response;
      response.set_status(status);
      if (!writer->Write(response)) {
        return grpc::Status(grpc::StatusCode::CANCELLED, "the stream broke");
      }
      sent = status;
    }
    if (ending) return grpc::Status::OK;
    absl::MutexLock lock(&mu_);
    auto changed = [this, seen]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return version_ != seen; };
    while (!mu_.AwaitWithTimeout(absl::Condition(&changed), kCancellationCheck)) {
      if (context->IsCancelled()) {
        return grpc::Status(grpc::StatusCode::CANCELLED, "cancelled by the client");
      }
    }
  }
}

}  // namespace callsession
