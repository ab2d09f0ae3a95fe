// The gRPC adapter of CallSessionService: every unary method is one call
// into CallSessionCore, whose reply waits for the journal if the call may
// change state (see Respond); WatchEvents is a write reactor draining the
// app's event queue. Every RPC answers UNAVAILABLE while the server is still
// loading its store. Thread-safe; gRPC calls it from its own threads.
#ifndef CALLSESSION_SERVER_CALL_SESSION_SERVICE_H_
#define CALLSESSION_SERVER_CALL_SESSION_SERVICE_H_

#include "callsession/v1/call_session_service.grpc.pb.h"
#include "server/core/call_session_core.h"
#include "server/serving_core.h"

namespace callsession {

class CallSessionGrpcService final : public v1::CallSessionService::CallbackService {
 public:
  // `serving` is not owned and must outlive the service.
  explicit CallSessionGrpcService(const ServingCore* serving) : serving_(*serving) {}

  grpc::ServerUnaryReactor* Initialize(grpc::CallbackServerContext* context,
                                       const v1::InitializeRequest* request,
                                       v1::InitializeResponse* response) override;
  grpc::ServerUnaryReactor* Shutdown(grpc::CallbackServerContext* context,
                                     const v1::ShutdownRequest* request,
                                     v1::ShutdownResponse* response) override;
  grpc::ServerUnaryReactor* LineOpen(grpc::CallbackServerContext* context,
                                     const v1::LineOpenRequest* request,
                                     v1::LineOpenResponse* response) override;
  grpc::ServerUnaryReactor* LineClose(grpc::CallbackServerContext* context,
                                      const v1::LineCloseRequest* request,
                                      v1::LineCloseResponse* response) override;
  grpc::ServerUnaryReactor* MakeCall(grpc::CallbackServerContext* context,
                                     const v1::MakeCallRequest* request,
                                     v1::MakeCallResponse* response) override;
  grpc::ServerUnaryReactor* Answer(grpc::CallbackServerContext* context,
                                   const v1::AnswerRequest* request,
                                   v1::AnswerResponse* response) override;
  grpc::ServerUnaryReactor* Drop(grpc::CallbackServerContext* context,
                                 const v1::DropRequest* request,
                                 v1::DropResponse* response) override;
  grpc::ServerUnaryReactor* GetCallInfo(grpc::CallbackServerContext* context,
                                        const v1::GetCallInfoRequest* request,
                                        v1::GetCallInfoResponse* response) override;
  grpc::ServerUnaryReactor* GetCallStatus(grpc::CallbackServerContext* context,
                                          const v1::GetCallStatusRequest* request,
                                          v1::GetCallStatusResponse* response) override;
  grpc::ServerUnaryReactor* DeallocateCall(grpc::CallbackServerContext* context,
                                           const v1::DeallocateCallRequest* request,
                                           v1::DeallocateCallResponse* response) override;
  grpc::ServerUnaryReactor* GetNewCalls(grpc::CallbackServerContext* context,
                                        const v1::GetNewCallsRequest* request,
                                        v1::GetNewCallsResponse* response) override;
  grpc::ServerUnaryReactor* ListCalls(grpc::CallbackServerContext* context,
                                      const v1::ListCallsRequest* request,
                                      v1::ListCallsResponse* response) override;
  grpc::ServerUnaryReactor* KeepAlive(grpc::CallbackServerContext* context,
                                      const v1::KeepAliveRequest* request,
                                      v1::KeepAliveResponse* response) override;
  grpc::ServerWriteReactor<v1::WatchEventsResponse>* WatchEvents(
      grpc::CallbackServerContext* context, const v1::WatchEventsRequest* request) override;

 private:
  const ServingCore& serving_;
};

}  // namespace callsession

#endif  // CALLSESSION_SERVER_CALL_SESSION_SERVICE_H_
