// The one place where core results cross into gRPC.
#ifndef CALLSESSION_SERVER_GRPC_EDGE_H_
#define CALLSESSION_SERVER_GRPC_EDGE_H_

#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "grpcpp/server_context.h"
#include "grpcpp/support/server_callback.h"
#include "grpcpp/support/status.h"

namespace callsession {

// The gRPC status for a core status: same code and message, and for TAPI
// errors a google.rpc.Status in the details (grpc-status-details-bin) whose
// ErrorInfo has the TAPI name as reason and "callsession.v1" as domain.
grpc::Status ToGrpcStatus(const absl::Status& status);

// Finishes a unary callback RPC with ToGrpcStatus(status).
grpc::ServerUnaryReactor* FinishUnary(grpc::CallbackServerContext* context,
                                      const absl::Status& status);

// The token of an `authorization: Bearer <token>` header ("Bearer" in any
// case), or "" if there is none or more than one. Points into the
// context's metadata.
absl::string_view BearerToken(const grpc::ServerContextBase& context);

}  // namespace callsession

#endif  // CALLSESSION_SERVER_GRPC_EDGE_H_
