// The one place where core results cross into gRPC.
#ifndef CALLSESSION_SERVER_GRPC_EDGE_H_
#define CALLSESSION_SERVER_GRPC_EDGE_H_

#include <utility>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "grpcpp/server_context.h"
#include "grpcpp/support/status.h"
#include "server/core/call_session_core.h"
#include "server/serving_core.h"

namespace callsession {

// The gRPC status for a core status: same code and message, and for TAPI
// errors a google.rpc.Status in the details (grpc-status-details-bin) whose
// ErrorInfo has the TAPI name as reason and "callsession.v1" as domain; a
// status that carries an ErrorInfo payload (ServingCore's NOT_LEADER) sends
// that one.
grpc::Status ToGrpcStatus(const absl::Status& status);

// When a unary RPC's reply may leave.
enum class Reply {
  kAtOnce,       // reads: they acknowledge no change
  kWhenDurable,  // anything that may change state, whatever its outcome
};

// Logs a failed authentication (UNAUTHENTICATED `status`) with the peer's
// address and the reason, at most 10 lines a second (bursts of 20); the
// lines held back are counted in the next one's `suppressed`.
void LogAuthenticationFailure(const grpc::ServerContextBase& context, const absl::Status& status);

// The token of an `authorization: Bearer <token>` header ("Bearer" in any
// case), or "" if there is none or more than one. Points into the
// context's metadata.
absl::string_view BearerToken(const grpc::ServerContextBase& context);

// What the request carried to prove who sent it: its bearer token and,
// over mutual TLS, the verified client certificate's identities
// ("subject:", "uri:" and "dns:" each SAN). For Initialize and the provider
// service: it copies the identities.
Credentials CallerCredentials(const grpc::ServerContextBase& context);

}  // namespace callsession

#endif  // CALLSESSION_SERVER_GRPC_EDGE_H_
