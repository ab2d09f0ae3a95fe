// The one place where core results cross into gRPC.
#ifndef CALLSESSION_SERVER_GRPC_EDGE_H_
#define CALLSESSION_SERVER_GRPC_EDGE_H_

#include <utility>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "grpcpp/server_context.h"
#include "grpcpp/support/server_callback.h"
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

// Finishes a unary callback RPC with ToGrpcStatus(status).
grpc::ServerUnaryReactor* FinishUnary(grpc::CallbackServerContext* context,
                                      const absl::Status& status);

// Finishes a unary callback RPC with ToGrpcStatus(status) once every change
// the core has made so far is durable (see
// CallSessionCore::WhenChangesDurable); never blocks the calling thread.
grpc::ServerUnaryReactor* FinishWhenDurable(grpc::CallbackServerContext* context,
                                            CallSessionCore& core, absl::Status status);

// When a unary RPC's reply may leave.
enum class Reply {
  kAtOnce,       // reads: they acknowledge no change
  kWhenDurable,  // anything that may change state, whatever its outcome
};

// Logs a failed authentication (UNAUTHENTICATED `status`) with the peer's
// address and the reason, at most 10 lines a second (bursts of 20); the
// lines held back are counted in the next one's `suppressed`.
void LogAuthenticationFailure(const grpc::ServerContextBase& context, const absl::Status& status);

// Runs `call` (a callable taking CallSessionCore&, returning absl::Status)
// on the serving core and finishes the RPC with its status, as `reply`
// says. UNAVAILABLE, without running it, while the core is not ready.
template <typename Call>
grpc::ServerUnaryReactor* Respond(grpc::CallbackServerContext* context, const ServingCore& serving,
                                  Reply reply, Call&& call) {
  absl::StatusOr<CallSessionCore*> core = serving.Get();
  if (!core.ok()) return FinishUnary(context, core.status());
  absl::Status status = std::forward<Call>(call)(**core);
  if (status.code() == absl::StatusCode::kUnauthenticated) {
    LogAuthenticationFailure(*context, status);
  }
  if (reply == Reply::kAtOnce) return FinishUnary(context, status);
  return FinishWhenDurable(context, **core, std::move(status));
}

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
