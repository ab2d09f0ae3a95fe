// The transport's limit: a server with callsessiond's exact service and
// message shapes whose GetCallInfo returns a constant (every other method is
// UNIMPLEMENTED). Same threading (callback API), same builder settings, so
// the ratio callsessiond / baseline isolates what the service itself costs.
//
//   baseline_server --listen=127.0.0.1:50052
#include <pthread.h>
#include <signal.h>

#include <cstdio>
#include <string>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/synchronization/mutex.h"
#include "callsession/v1/call_session_service.grpc.pb.h"
#include "grpcpp/security/server_credentials.h"
#include "grpcpp/server_builder.h"

ABSL_FLAG(std::string, listen, "127.0.0.1:50052", "HOST:PORT to serve on");

namespace {

class ConstantService final : public callsession::v1::CallSessionService::CallbackService {
 public:
  ConstantService() {
    callsession::v1::CallInfo* info = constant_.mutable_info();
    info->set_line_handle(1234);
    info->set_line_device_id(3);
    info->set_call_id(5678);
    info->set_origin(callsession::v1::CALL_ORIGIN_OUTBOUND);
    info->set_called_id("+15550100");
    info->set_num_owners(1);
    info->mutable_create_time()->set_seconds(1700000000);
  }

  grpc::ServerUnaryReactor* GetCallInfo(grpc::CallbackServerContext* context,
                                        const callsession::v1::GetCallInfoRequest* request,
                                        callsession::v1::GetCallInfoResponse* response) override {
    *response = constant_;
    grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
    reactor->Finish(grpc::Status::OK);
    return reactor;
  }

 private:
  callsession::v1::GetCallInfoResponse constant_;
};

}  // namespace

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  // As callsessiond does: gRPC's locks are absl::Mutex too.
  absl::SetMutexDeadlockDetectionMode(absl::OnDeadlockCycle::kIgnore);
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGINT);
  sigaddset(&signals, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);

  ConstantService service;
  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort(absl::GetFlag(FLAGS_listen), grpc::InsecureServerCredentials(), &port);
  builder.SetMaxReceiveMessageSize(16 * 1024);
  builder.RegisterService(&service);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (server == nullptr || port == 0) {
    std::fprintf(stderr, "baseline_server: cannot listen\n");
    return 1;
  }
  std::fprintf(stderr, "{\"event\":\"listening\",\"port\":%d}\n", port);
  int signal_number = 0;
  sigwait(&signals, &signal_number);
  server->Shutdown();
  return 0;
}
