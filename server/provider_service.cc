#include "server/provider_service.h"

#include "server/grpc_edge.h"

namespace callsession {

grpc::ServerUnaryReactor* ProviderGrpcService::OfferCall(grpc::CallbackServerContext* context,
                                                         const v1::OfferCallRequest* request,
                                                         v1::OfferCallResponse* response) {
  return Respond(context, serving_, Reply::kWhenDurable, [&](CallSessionCore& core) {
    return core.OfferCall(CallerCredentials(*context), *request, response);
  });
}

grpc::ServerUnaryReactor* ProviderGrpcService::SetCallState(grpc::CallbackServerContext* context,
                                                            const v1::SetCallStateRequest* request,
                                                            v1::SetCallStateResponse* response) {
  return Respond(context, serving_, Reply::kWhenDurable, [&](CallSessionCore& core) {
    return core.SetCallState(CallerCredentials(*context), *request, response);
  });
}

grpc::ServerUnaryReactor* ProviderGrpcService::ForceLineClose(
    grpc::CallbackServerContext* context, const v1::ForceLineCloseRequest* request,
    v1::ForceLineCloseResponse* response) {
  return Respond(context, serving_, Reply::kWhenDurable, [&](CallSessionCore& core) {
    return core.ForceLineClose(CallerCredentials(*context), *request, response);
  });
}

}  // namespace callsession
