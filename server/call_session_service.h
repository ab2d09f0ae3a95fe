// The gRPC adapter of CallSessionService, served by AsyncServing: every
// unary method is one call into CallSessionCore, whose reply waits for the
// journal if the call may change state (Reply::kWhenDurable); WatchEvents
// streams the app's event queue, one write at a time. Every RPC answers
// UNAVAILABLE while the server is still loading its store.
#ifndef CALLSESSION_SERVER_CALL_SESSION_SERVICE_H_
#define CALLSESSION_SERVER_CALL_SESSION_SERVICE_H_

#include "callsession/v1/call_session_service.grpc.pb.h"
#include "server/async_serving.h"
#include "server/core/call_session_core.h"
#include "server/serving_core.h"

namespace callsession {

class CallSessionGrpcService final : public v1::CallSessionService::AsyncService {
 public:
  // `serving` is not owned and must outlive the service.
  explicit CallSessionGrpcService(const ServingCore* serving) : serving_(*serving) {}

  // Serves every method through `serving`. Before it starts.
  void ServeThrough(AsyncServing& serving);

 private:
  const ServingCore& serving_;
};

}  // namespace callsession

#endif  // CALLSESSION_SERVER_CALL_SESSION_SERVICE_H_
