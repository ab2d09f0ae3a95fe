#include "server/provider_service.h"

#include "server/grpc_edge.h"

namespace callsession {

grpc::ServerUnaryReactor* ProviderGrpcService::OfferCall(grpc::CallbackServerContext* context,
                                                         const v1::OfferCallRequest* request,
                                                         v1::OfferCallResponse* response) {
  return FinishUnary(context, core_.OfferCall(BearerToken(*context), *request, response));
}

grpc::ServerUnaryReactor* ProviderGrpcService::SetCallState(grpc::CallbackServerContext* context,
                                                            const v1::SetCallStateRequest* request,
                                                            v1::SetCallStateResponse* response) {
  return FinishUnary(context, core_.SetCallState(BearerToken(*context), *request, response));
}

grpc::ServerUnaryReactor* ProviderGrpcService::ForceLineClose(
    grpc::CallbackServerContext* context, const v1::ForceLineCloseRequest* request,
    v1::ForceLineCloseResponse* response) {
  return FinishUnary(context, core_.ForceLineClose(BearerToken(*context), *request, response));
}

}  // namespace callsession
