// grpc.health.v1.Health, served by callsessiond itself rather than by gRPC's
// built-in service: that one runs on gRPC's callback API, whose threads
// would then poll the server's connections and hand every request to the
// serving threads (see async_serving.h). Check and Watch run on gRPC's
// synchronous-API threads; a Watch holds one for as long as it lasts.
//
// Statuses: "" (the server as a whole) and each name given to Set. Check
// answers NOT_FOUND for any other name; Watch sends SERVICE_UNKNOWN for it
// and keeps waiting. Thread-safe.
#ifndef CALLSESSION_SERVER_HEALTH_SERVICE_H_
#define CALLSESSION_SERVER_HEALTH_SERVICE_H_

#include <cstdint>
#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/synchronization/mutex.h"
#include "grpc/health/v1/health.grpc.pb.h"

namespace callsession {

class HealthService final : public grpc::health::v1::Health::Service {
 public:
  HealthService();

  // Sets one name's status ("" is the server's). Ignored after Shutdown.
  void Set(const std::string& service, bool serving);
  // Sets every name's status, the server's included. Ignored after Shutdown.
  void SetAll(bool serving);
  // Every status NOT_SERVING for good; every Watch sends that and ends.
  void Shutdown();

  grpc::Status Check(grpc::ServerContext* context,
                     const grpc::health::v1::HealthCheckRequest* request,
                     grpc::health::v1::HealthCheckResponse* response) override;
  grpc::Status Watch(grpc::ServerContext* context,
                     const grpc::health::v1::HealthCheckRequest* request,
                     grpc::ServerWriter<grpc::health::v1::HealthCheckResponse>* writer) override;

 private:
  using ServingStatus = grpc::health::v1::HealthCheckResponse::ServingStatus;

  ServingStatus StatusLocked(const std::string& service) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  mutable absl::Mutex mu_;
  absl::flat_hash_map<std::string, bool> serving_ ABSL_GUARDED_BY(mu_);
  // Raised by every change, for Watch.
  uint64_t version_ ABSL_GUARDED_BY(mu_) = 0;
  bool shut_down_ ABSL_GUARDED_BY(mu_) = false;
};

}  // namespace callsession

#endif  // CALLSESSION_SERVER_HEALTH_SERVICE_H_
