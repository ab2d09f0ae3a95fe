#include "server/admin_service.h"

#include "server/core/log.h"
#include "server/core/sha256.h"
#include "server/grpc_edge.h"

namespace callsession {
namespace {

absl::Status Authorize(absl::string_view token, const std::string& expected) {
  if (expected.empty()) {
    return absl::UnauthenticatedError("this server has no admin token (CALLSESSION_ADMIN_TOKEN)");
  }
  if (token.size() != expected.size() ||
      !ConstantTimeEquals(reinterpret_cast<const uint8_t*>(token.data()),
                          reinterpret_cast<const uint8_t*>(expected.data()), expected.size())) {
    return absl::UnauthenticatedError("missing or wrong admin token");
  }
  return absl::OkStatus();
}

}  // namespace

grpc::Status AdminGrpcService::CreateCheckpoint(grpc::ServerContext* context,
                                                const admin::v1::CreateCheckpointRequest* request,
                                                admin::v1::CreateCheckpointResponse* response) {
  in_progress_.fetch_add(1, std::memory_order_relaxed);
  struct Done {
    std::atomic<int64_t>& in_progress;
    ~Done() { in_progress.fetch_sub(1, std::memory_order_relaxed); }
  } done{in_progress_};
  if (absl::Status status = Authorize(BearerToken(*context), admin_token_); !status.ok()) {
    return ToGrpcStatus(status);
  }
  absl::StatusOr<CallSessionCore*> core = serving_.Get();
  if (!core.ok()) return ToGrpcStatus(core.status());
  const absl::Status status = (*core)->Checkpoint(request->directory());
  if (status.ok()) {
    response->set_directory(request->directory());
    Log(LogLevel::kInfo, "checkpoint_created", {{"directory", request->directory()}});
  } else {
    Log(LogLevel::kWarning, "checkpoint_failed",
        {{"directory", request->directory()}, {"error", std::string(status.message())}});
  }
  return ToGrpcStatus(status);
}

}  // namespace callsession
