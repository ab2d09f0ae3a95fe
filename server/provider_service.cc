#include "server/provider_service.h"

#include "server/grpc_edge.h"

namespace callsession {

void ProviderGrpcService::ServeThrough(AsyncServing& serving) {
  serving.AddUnary(this, &ProviderGrpcService::RequestOfferCall, Reply::kWhenDurable,
                   [](CallSessionCore& core, grpc::ServerContext& context,
                      const v1::OfferCallRequest& request, v1::OfferCallResponse* response) {
                     return core.OfferCall(CallerCredentials(context), request, response);
                   });
  serving.AddUnary(this, &ProviderGrpcService::RequestSetCallState, Reply::kWhenDurable,
                   [](CallSessionCore& core, grpc::ServerContext& context,
                      const v1::SetCallStateRequest& request, v1::SetCallStateResponse* response) {
                     return core.SetCallState(CallerCredentials(context), request, response);
                   });
  serving.AddUnary(
      this, &ProviderGrpcService::RequestForceLineClose, Reply::kWhenDurable,
      [](CallSessionCore& core, grpc::ServerContext& context,
         const v1::ForceLineCloseRequest& request, v1::ForceLineCloseResponse* response) {
        return core.ForceLineClose(CallerCredentials(context), request, response);
      });
}

}  // namespace callsession
