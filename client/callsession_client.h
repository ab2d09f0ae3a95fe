// Client library for callsession: the generated stubs behind methods that
// return absl::Status / absl::StatusOr, set a deadline on every call and
// attach the bearer token.
//
// Errors come back with the server's code and message; TapiReason() gives
// the TAPI error name from the google.rpc.ErrorInfo the server attached,
// which is what callers should switch on (never the message text).
//
// High availability (--store=etcd): give a client the Replicas of the
// deployment instead of one channel and it follows the leader. A call a
// replica refused because it does not lead (UNAVAILABLE, reason NOT_LEADER:
// it did nothing) goes to the leader it named, or the next replica; so
// does a call that could not connect. A call cut off in flight (the leader
// died after receiving it) or unanswered within its deadline (the leader
// is paused or cut off) sends the next call to another replica, and is
// retried only when repeating it is safe:
// reads (GetCallInfo, GetCallStatus, ListCalls), KeepAlive, and MakeCall
// with a request_id; otherwise its UNAVAILABLE comes back to the caller,
// whose next call goes to the new leader. Retries stop after
// ClientOptions::failover_timeout. An event stream ends with the old
// leader: open a new one from the last sequence seen plus one.
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
#include "grpcpp/support/channel_arguments.h"
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
  // Following the leader (Replicas): how long a call may keep trying
  // replicas before its last error is returned.
  absl::Duration failover_timeout = absl::Seconds(10);
};

// "leader" from a NOT_LEADER error's ErrorInfo: the host:port of the leader
// the refusing replica knows of, or "".
std::string LeaderHint(const absl::Status& status);

// The replicas of a deployment with a leader: a channel to each, and the
// one this client believes leads. Thread-safe; replicas are only added
// (a leader named by another is added if it was not listed).
class Replicas {
 public:
  struct Replica {
    std::string target;
    std::shared_ptr<grpc::Channel> channel;
    std::unique_ptr<v1::CallSessionService::Stub> app;
    std::unique_ptr<v1::ProviderService::Stub> provider;
  };

  // `targets`: host:port of each replica (at least one). `args` apply to
  // every channel (e.g. a TLS target name override).
  Replicas(std::vector<std::string> targets, std::shared_ptr<grpc::ChannelCredentials> credentials,
           const grpc::ChannelArguments& args = grpc::ChannelArguments());

  // The replica believed to lead; it lives as long as this object.
  Replica& Current();
  // `failed` could not serve: use `leader` (a NOT_LEADER hint) if not
  // empty, else the replica after `failed`.
  void MoveOn(const Replica& failed, const std::string& leader);

 private:
  Replica& AddLocked(const std::string& target) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const std::shared_ptr<grpc::ChannelCredentials> credentials_;
  const grpc::ChannelArguments args_;
  absl::Mutex mu_;
  std::vector<std::unique_ptr<Replica>> replicas_ ABSL_GUARDED_BY(mu_);
  size_t current_ ABSL_GUARDED_BY(mu_) = 0;
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
  // Follows the leader among `replicas`.
  explicit CallSessionClient(std::shared_ptr<Replicas> replicas, ClientOptions options = {});

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

  // The raw stub (of the replica believed to lead), for calls this class
  // does not wrap.
  v1::CallSessionService::Stub& stub() { return replicas_ ? *replicas_->Current().app : *stub_; }
  const ClientOptions& options() const { return options_; }

 private:
  template <typename Request, typename Response>
  absl::StatusOr<Response> Call(grpc::Status (v1::CallSessionService::Stub::*method)(
                                    grpc::ClientContext*, const Request&, Response*),
                                const Request& request, const std::string& token, bool retry_safe);

  const ClientOptions options_;
  std::unique_ptr<v1::CallSessionService::Stub> stub_;
  std::shared_ptr<Replicas> replicas_;
  std::string token_;
};

// ProviderService: the telephony side.
class ProviderClient {
 public:
  ProviderClient(std::shared_ptr<grpc::ChannelInterface> channel, std::string provider_token,
                 ClientOptions options = {});
  // Follows the leader among `replicas`.
  ProviderClient(std::shared_ptr<Replicas> replicas, std::string provider_token,
                 ClientOptions options = {});

  absl::StatusOr<uint64_t> OfferCall(uint32_t device_id, absl::string_view caller_id,
                                     absl::string_view called_id);
  absl::Status SetCallState(uint64_t call_id, v1::CallState state);
  absl::Status ForceLineClose(uint32_t device_id);

  v1::ProviderService::Stub& stub() { return replicas_ ? *replicas_->Current().provider : *stub_; }

 private:
  template <typename Request, typename Response>
  absl::StatusOr<Response> Call(grpc::Status (v1::ProviderService::Stub::*method)(
                                    grpc::ClientContext*, const Request&, Response*),
                                const Request& request);

  const ClientOptions options_;
  std::unique_ptr<v1::ProviderService::Stub> stub_;
  std::shared_ptr<Replicas> replicas_;
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
