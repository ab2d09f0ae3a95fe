#include "server/grpc_edge.h"

#include <iterator>
#include <string>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "google/rpc/error_details.pb.h"
#include "google/rpc/status.pb.h"
#include "grpc/grpc_security_constants.h"
#include "grpcpp/security/auth_context.h"
#include "server/core/log.h"
#include "server/core/tapi_error.h"

namespace callsession {

namespace {
constexpr char kErrorInfoTypeUrl[] = "type.googleapis.com/google.rpc.ErrorInfo";
}  // namespace

grpc::Status ToGrpcStatus(const absl::Status& status) {
  if (status.ok()) return grpc::Status::OK;
  // absl::StatusCode and grpc::StatusCode share the canonical numbering.
  const auto code = static_cast<grpc::StatusCode>(status.code());
  std::string message(status.message());
  google::rpc::ErrorInfo info;
  if (auto payload = status.GetPayload(kErrorInfoTypeUrl); payload.has_value()) {
    if (!info.ParseFromString(std::string(*payload))) return grpc::Status(code, message);
  } else {
    const absl::string_view reason = TapiErrorName(status);
    if (reason.empty()) return grpc::Status(code, message);
    info.set_reason(std::string(reason));
    info.set_domain("callsession.v1");
  }
  google::rpc::Status details;
  details.set_code(static_cast<int32_t>(code));
  details.set_message(message);
  details.add_details()->PackFrom(info);
  return grpc::Status(code, std::move(message), details.SerializeAsString());
}

absl::string_view BearerToken(const grpc::ServerContextBase& context) {
  constexpr absl::string_view kScheme = "Bearer ";
  const auto& metadata = context.client_metadata();
  auto [it, end] = metadata.equal_range("authorization");
  // None, or several: ambiguous credentials are no credentials.
  if (it == end || std::next(it) != end) return {};
  absl::string_view value(it->second.data(), it->second.size());
  if (value.size() <= kScheme.size() ||
      !absl::EqualsIgnoreCase(value.substr(0, kScheme.size()), kScheme)) {
    return {};
  }
  return value.substr(kScheme.size());
}

Credentials CallerCredentials(const grpc::ServerContextBase& context) {
  Credentials credentials(BearerToken(context));
  const std::shared_ptr<const grpc::AuthContext> auth = context.auth_context();
  // Only a verified client certificate: the server requires and checks
  // them whenever it has a client CA.
  if (auth == nullptr || !auth->IsPeerAuthenticated()) return credentials;
  auto add = [&](const char* property, absl::string_view prefix) {
    for (const grpc::string_ref& value : auth->FindPropertyValues(property)) {
      credentials.identities.push_back(
          absl::StrCat(prefix, absl::string_view(value.data(), value.size())));
    }
  };
  add(GRPC_X509_SUBJECT_PROPERTY_NAME, "subject:");
  add(GRPC_PEER_URI_PROPERTY_NAME, "uri:");
  add(GRPC_PEER_DNS_PROPERTY_NAME, "dns:");
  return credentials;
}

void LogAuthenticationFailure(const grpc::ServerContextBase& context, const absl::Status& status) {
  static LogRateLimiter* const limiter = new LogRateLimiter(10, 20);
  uint64_t suppressed = 0;
  if (!limiter->Allow(&suppressed)) return;
  Log(LogLevel::kWarning, "authentication_failed",
      {{"peer", context.peer()}, {"reason", status.message()}, {"suppressed", suppressed}});
}

}  // namespace callsession
