// The gRPC adapter of ProviderService, served by AsyncServing: each method
// is one call into CallSessionCore, answered once its changes are durable.
#ifndef CALLSESSION_SERVER_PROVIDER_SERVICE_H_
#define CALLSESSION_SERVER_PROVIDER_SERVICE_H_

#include "callsession/v1/provider_service.grpc.pb.h"
#include "server/async_serving.h"
#include "server/core/call_session_core.h"

namespace callsession {

class ProviderGrpcService final : public v1::ProviderService::AsyncService {
 public:
  // Serves every method through `serving`. Before it starts.
  void ServeThrough(AsyncServing& serving);
};

}  // namespace callsession

#endif  // CALLSESSION_SERVER_PROVIDER_SERVICE_H_
