// The gRPC adapter of callsession.admin.v1.AdminService: operator actions
// (backups), authorized by the admin token. Thread-safe.
#ifndef CALLSESSION_SERVER_ADMIN_SERVICE_H_
#define CALLSESSION_SERVER_ADMIN_SERVICE_H_

#include <atomic>
#include <cstdint>
#include <string>

#include "callsession/admin/v1/admin_service.grpc.pb.h"
#include "server/serving_core.h"

namespace callsession {

class AdminGrpcService final : public admin::v1::AdminService::Service {
 public:
  // `serving` is not owned and must outlive the service. An empty
  // `admin_token` refuses every call.
  AdminGrpcService(const ServingCore* serving, std::string admin_token)
      : serving_(*serving), admin_token_(std::move(admin_token)) {}

  // Runs the checkpoint (it flushes and links files) on one of gRPC's
  // synchronous-API threads, which only this service and reflection use:
  // it never holds up the serving threads.
  grpc::Status CreateCheckpoint(grpc::ServerContext* context,
                                const admin::v1::CreateCheckpointRequest* request,
                                admin::v1::CreateCheckpointResponse* response) override;

  // Calls whose handler is running. Any thread.
  int64_t CallsInProgress() const { return in_progress_.load(std::memory_order_relaxed); }

 private:
  const ServingCore& serving_;
  const std::string admin_token_;
  std::atomic<int64_t> in_progress_{0};
};

}  // namespace callsession

#endif  // CALLSESSION_SERVER_ADMIN_SERVICE_H_
