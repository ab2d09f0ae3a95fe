#include "server/server.h"

#include <utility>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "grpcpp/security/server_credentials.h"
#include "grpcpp/server_builder.h"
#include "server/core/status_macros.h"

namespace callsession {
namespace {

// Splits "host:port" ("[::1]:port" for IPv6) at the last colon.
absl::Status SplitHostPort(const std::string& address, std::string* host) {
  const size_t colon = address.rfind(':');
  int port = 0;
  if (colon == std::string::npos || colon == 0 ||
      !absl::SimpleAtoi(address.substr(colon + 1), &port) || port < 0 || port > 65535) {
    return absl::InvalidArgumentError(
        absl::StrCat("listen address must be HOST:PORT, got \"", address, "\""));
  }
  *host = address.substr(0, colon);
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::unique_ptr<CallSessionServer>> CallSessionServer::Start(ServerOptions options) {
  CS_RETURN_IF_ERROR(ValidateCoreOptions(options.core));
  std::string host;
  CS_RETURN_IF_ERROR(SplitHostPort(options.listen_address, &host));
  if (options.max_receive_message_bytes < 1024) {
    return absl::InvalidArgumentError("max_receive_message_bytes must be at least 1024");
  }

  std::unique_ptr<CallSessionServer> server(new CallSessionServer());
  server->core_ = std::make_unique<CallSessionCore>(std::move(options.core));
  server->call_session_service_ = std::make_unique<CallSessionGrpcService>(server->core_.get());
  server->provider_service_ = std::make_unique<ProviderGrpcService>(server->core_.get());

  grpc::ServerBuilder builder;
  builder.AddListeningPort(options.listen_address, grpc::InsecureServerCredentials(),
                           &server->port_);
  builder.SetMaxReceiveMessageSize(options.max_receive_message_bytes);
  builder.RegisterService(server->call_session_service_.get());
  builder.RegisterService(server->provider_service_.get());
  server->server_ = builder.BuildAndStart();
  if (server->server_ == nullptr || server->port_ == 0) {
    return absl::UnavailableError(absl::StrCat("cannot listen on ", options.listen_address));
  }
  server->address_ = absl::StrCat(host, ":", server->port_);
  return server;
}

CallSessionServer::~CallSessionServer() {
  if (!shut_down_ && server_ != nullptr) Shutdown(absl::ZeroDuration());
}

void CallSessionServer::Shutdown(absl::Duration grace) {
  shut_down_ = true;
  core_->EndAllSubscriptions(absl::UnavailableError("the server is shutting down"));
  server_->Shutdown(absl::ToChronoTime(absl::Now() + grace));
  server_->Wait();
}

}  // namespace callsession
