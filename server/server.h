// CallSessionServer: the core plus its two gRPC services, listening on one
// address. What callsessiond runs, and what the tests start on port 0.
#ifndef CALLSESSION_SERVER_SERVER_H_
#define CALLSESSION_SERVER_SERVER_H_

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "grpcpp/server.h"
#include "server/call_session_service.h"
#include "server/core/call_session_core.h"
#include "server/provider_service.h"

namespace callsession {

struct ServerOptions {
  // host:port; port 0 picks a free port (see CallSessionServer::port()).
  std::string listen_address = "127.0.0.1:50051";
  CoreOptions core;
  // Requests larger than this fail with RESOURCE_EXHAUSTED in the transport.
  // The largest valid request is well under 1 KiB.
  int max_receive_message_bytes = 16 * 1024;
};

// Thread-safe; Shutdown may be called from any thread, once.
class CallSessionServer {
 public:
  // Builds the core and services and starts serving. Errors:
  // INVALID_ARGUMENT for bad options, UNAVAILABLE if the address cannot be
  // bound.
  static absl::StatusOr<std::unique_ptr<CallSessionServer>> Start(ServerOptions options);

  // Shuts down with no grace if Shutdown was not called.
  ~CallSessionServer();

  CallSessionServer(const CallSessionServer&) = delete;
  CallSessionServer& operator=(const CallSessionServer&) = delete;

  // The port actually bound.
  int port() const { return port_; }
  // host:port actually bound.
  const std::string& address() const { return address_; }

  // Ends every WatchEvents stream with UNAVAILABLE, stops accepting RPCs,
  // lets in-flight ones finish for up to `grace`, then cancels the rest.
  void Shutdown(absl::Duration grace);

  CallSessionCore& core() { return *core_; }

 private:
  CallSessionServer() = default;

  std::unique_ptr<CallSessionCore> core_;
  std::unique_ptr<CallSessionGrpcService> call_session_service_;
  std::unique_ptr<ProviderGrpcService> provider_service_;
  std::unique_ptr<grpc::Server> server_;
  int port_ = 0;
  std::string address_;
  bool shut_down_ = false;
};

}  // namespace callsession

#endif  // CALLSESSION_SERVER_SERVER_H_
