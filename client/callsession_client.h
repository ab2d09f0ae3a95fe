// Client library for callsession: the generated stubs behind methods that
// return absl::Status / absl::StatusOr, set a deadline on every call and
// attach the bearer token.
//
// Errors come back with the server's code and message; TapiReason() gives
// the TAPI error name from the google.rpc.ErrorInfo the server attached,
// which is what callers should switch on (never the message text).
//
// Thread-safety: a client may be used from several threads at once, except
// that Initialize and set_token must not race with other calls.
#ifndef CALLSESSION_CLIENT_CALLSESSION_CLIENT_H_
#define CALLSESSION_CLIENT_CALLSESSION_CLIENT_H_

#include <cstdint>
#include <deque>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "callsession/admin/v1/admin_service.grpc.pb.h"
#include "callsession/v1/call_session_service.grpc.pb.h"
#include "callsession/v1/provider_service.grpc.pb.h"
#include "grpcpp/channel.h"
#include "grpcpp/client_context.h"
#include "grpcpp/security/credentials.h"
#include "grpcpp/support/status.h"

namespace callsession {

// The absl::Status for a gRPC status. A google.rpc.ErrorInfo found in the
// details is kept as a payload (read it with TapiReason).
absl::Status FromGrpcStatus(const grpc::Status& status);

// The TAPI error name ("LINEERR_INVALCALLHANDLE") of a status returned by
// this library, or "" if the server sent none.
std::string TapiReason(const absl::Status& status);

struct ClientOptions {
  // Deadline of each unary call.
  absl::Duration deadline = absl::Seconds(5);
  // The tenant's API key Initialize presents (as its bearer token) to a
  // server with tenants; empty: none (open mode, or a client certificate
  // identifies the tenant). A secret: never log it.
  std::string api_key;
};

// The application's event stream. A thread reads the stream into a queue;
// Next() takes from it. Destroying the stream cancels it. To resume after a
// broken stream without losing events, open a new one from the last
// sequence seen plus one (see WatchEventsRequest.from_sequence).
class EventStream {
 public:
  EventStream(v1::CallSessionService::Stub* stub, const std::string& token,
              uint64_t from_sequence = 0);
  ~EventStream();
  EventStream(const EventStream&) = delete;
  EventStream& operator=(const EventStream&) = delete;

  // The next event, waiting up to `timeout`. DEADLINE_EXCEEDED if none came
  // in time. Once the stream has ended and every event was taken: the
  // server's status if it was an error, else OUT_OF_RANGE.
  absl::StatusOr<v1::Event> Next(absl::Duration timeout);

  // Cancels the stream (Next then returns CANCELLED once drained).
  void Cancel();

 private:
  void ReadLoop(v1::CallSessionService::Stub* stub, uint64_t from_sequence);

  grpc::ClientContext context_;
  absl::Mutex mu_;
  std::deque<v1::Event> events_ ABSL_GUARDED_BY(mu_);
  bool ended_ ABSL_GUARDED_BY(mu_) = false;
  absl::Status end_status_ ABSL_GUARDED_BY(mu_);
  std::thread reader_;
};

// CallSessionService: the application side.
class CallSessionClient {
 public:
  explicit CallSessionClient(std::shared_ptr<grpc::ChannelInterface> channel,
                             ClientOptions options = {});

  // Registers the application (with options().api_key, if set) and keeps
  // the returned token for later calls.
  absl::StatusOr<v1::InitializeResponse> Initialize(absl::string_view app_name);
  // Uses an existing app token (from an earlier Initialize).
  void set_token(std::string token) { token_ = std::move(token); }
  const std::string& token() const { return token_; }

  absl::Status Shutdown();
  // Empty privileges: outgoing calls only.
  absl::StatusOr<uint64_t> LineOpen(uint32_t device_id,
                                    const std::vector<v1::CallPrivilege>& privileges = {});
  absl::Status LineClose(uint64_t line_handle);
  absl::StatusOr<v1::MakeCallResponse> MakeCall(uint64_t line_handle,
                                                absl::string_view dest_address,
                                                absl::string_view request_id = "");
  absl::Status Answer(uint64_t call_handle);
  absl::Status Drop(uint64_t call_handle);
  absl::StatusOr<v1::CallInfo> GetCallInfo(uint64_t call_handle);
  absl::StatusOr<v1::CallStatus> GetCallStatus(uint64_t call_handle);
  absl::Status DeallocateCall(uint64_t call_handle);
  absl::StatusOr<std::vector<uint64_t>> GetNewCalls(uint64_t line_handle);
  // One page of ListCalls; page_token from the previous page's response.
  absl::StatusOr<v1::ListCallsResponse> ListCalls(absl::string_view page_token = "",
                                                  uint32_t page_size = 0);
  // Every page of ListCalls; resume_sequence is the first page's.
  absl::StatusOr<v1::ListCallsResponse> ListAllCalls();
  absl::Status KeepAlive();
  std::unique_ptr<EventStream> WatchEvents(uint64_t from_sequence = 0);

  // The raw stub, for calls this class does not wrap.
  v1::CallSessionService::Stub& stub() { return *stub_; }
  const ClientOptions& options() const { return options_; }

 private:
  const ClientOptions options_;
  std::unique_ptr<v1::CallSessionService::Stub> stub_;
  std::string token_;
};

// ProviderService: the telephony side.
class ProviderClient {
 public:
  ProviderClient(std::shared_ptr<grpc::ChannelInterface> channel, std::string provider_token,
                 ClientOptions options = {});

  absl::StatusOr<uint64_t> OfferCall(uint32_t device_id, absl::string_view caller_id,
                                     absl::string_view called_id);
  absl::Status SetCallState(uint64_t call_id, v1::CallState state);
  absl::Status ForceLineClose(uint32_t device_id);

  v1::ProviderService::Stub& stub() { return *stub_; }

 private:
  const ClientOptions options_;
  std::unique_ptr<v1::ProviderService::Stub> stub_;
  const std::string token_;
};

// AdminService: operator actions (backups). `admin_token` is the server's
// CALLSESSION_ADMIN_TOKEN.
class AdminClient {
 public:
  AdminClient(std::shared_ptr<grpc::ChannelInterface> channel, std::string admin_token,
              ClientOptions options = {});

  // A consistent copy of the server's store in `directory` on the server's
  // file system (see AdminService.CreateCheckpoint); it may take a while,
  // so the deadline is at least a minute.
  absl::StatusOr<admin::v1::CreateCheckpointResponse> CreateCheckpoint(absl::string_view directory);

 private:
  const ClientOptions options_;
  std::unique_ptr<admin::v1::AdminService::Stub> stub_;
  const std::string token_;
};

// PEM files for a TLS channel. Empty ca_file: plaintext. cert and key: a
// client certificate, for servers that require mutual TLS.
struct ChannelTlsFiles {
  std::string ca_file;
  std::string cert_file;
  std::string key_file;
};

// Credentials for CreateChannel. INVALID_ARGUMENT if a file cannot be read
// or a certificate comes without its key.
absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> ChannelCredentialsFrom(
    const ChannelTlsFiles& files);

// Sets `deadline` from now and, if `token` is not empty, the bearer token.
void PrepareContext(grpc::ClientContext* context, absl::Duration deadline,
                    const std::string& token);

}  // namespace callsession

#endif  // CALLSESSION_CLIENT_CALLSESSION_CLIENT_H_
