// The gRPC adapter of ProviderService: each method is one call into
// CallSessionCore, answered once its changes are durable. Thread-safe.
#ifndef CALLSESSION_SERVER_PROVIDER_SERVICE_H_
#define CALLSESSION_SERVER_PROVIDER_SERVICE_H_

#include "callsession/v1/provider_service.grpc.pb.h"
#include "server/core/call_session_core.h"
#include "server/serving_core.h"

namespace callsession {

class ProviderGrpcService final : public v1::ProviderService::CallbackService {
 public:
  // `serving` is not owned and must outlive the service.
  explicit ProviderGrpcService(const ServingCore* serving) : serving_(*serving) {}

  grpc::ServerUnaryReactor* OfferCall(grpc::CallbackServerContext* context,
                                      const v1::OfferCallRequest* request,
                                      v1::OfferCallResponse* response) override;
  grpc::ServerUnaryReactor* SetCallState(grpc::CallbackServerContext* context,
                                         const v1::SetCallStateRequest* request,
                                         v1::SetCallStateResponse* response) override;
  grpc::ServerUnaryReactor* ForceLineClose(grpc::CallbackServerContext* context,
                                           const v1::ForceLineCloseRequest* request,
                                           v1::ForceLineCloseResponse* response) override;

 private:
  const ServingCore& serving_;
};

}  // namespace callsession

#endif  // CALLSESSION_SERVER_PROVIDER_SERVICE_H_
