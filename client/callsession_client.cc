#include "client/callsession_client.h"

#include <algorithm>
#include <fstream>
#include <sstream>
#include <utility>

#include "absl/strings/cord.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "google/rpc/error_details.pb.h"
#include "google/rpc/status.pb.h"
#include "grpcpp/create_channel.h"
#include "grpcpp/support/sync_stream.h"

namespace callsession {
namespace {

constexpr char kErrorInfoTypeUrl[] = "type.googleapis.com/google.rpc.ErrorInfo";

// Calls one unary method of a stub with a deadline and the token.
template <typename Stub, typename Request, typename Response>
absl::StatusOr<Response> Invoke(
    Stub& stub, grpc::Status (Stub::*method)(grpc::ClientContext*, const Request&, Response*),
    const Request& request, absl::Duration deadline, const std::string& token) {
  grpc::ClientContext context;
  PrepareContext(&context, deadline, token);
  Response response;
  grpc::Status status = (stub.*method)(&context, request, &response);
  if (!status.ok()) return FromGrpcStatus(status);
  return response;
}

// Whether a failed call certainly did nothing: a replica refused it as not
// the leader, or it never reached a server.
bool NotExecuted(const absl::Status& status) {
  return TapiReason(status) == "NOT_LEADER" ||
         absl::StrContains(status.message(), "failed to connect");
}

// Invoke on the replica believed to lead, moving on as Replicas says.
template <typename Stub, typename Request, typename Response>
absl::StatusOr<Response> InvokeFollowing(Replicas& replicas,
                                         std::unique_ptr<Stub> Replicas::Replica::*stub_of,
                                         grpc::Status (Stub::*method)(grpc::ClientContext*,
                                                                      const Request&, Response*),
                                         const Request& request, const ClientOptions& options,
                                         const std::string& token, bool retry_safe) {
  const absl::Time give_up = absl::Now() + options.failover_timeout;
  absl::Duration pause = absl::Milliseconds(20);
  for (;;) {
    Replicas::Replica& replica = replicas.Current();
    absl::StatusOr<Response> result =
        Invoke(*(replica.*stub_of), method, request, options.deadline, token);
    if (result.ok()) return result;
    // A replica that does not answer in time may be paused or cut off: the
    // next call tries another (which names the leader if it is not one).
    const bool unreachable =
        absl::IsUnavailable(result.status()) || absl::IsDeadlineExceeded(result.status());
    if (!unreachable) return result;
    const std::string leader = LeaderHint(result.status());
    replicas.MoveOn(replica, leader);
    if (!retry_safe && !NotExecuted(result.status())) return result;
    if (absl::Now() >= give_up) return result;
    if (leader.empty() || leader == replica.target) {
      // No leader yet (a takeover under way): wait a little, longer each time.
      absl::SleepFor(pause);
      pause = std::min(pause * 2, absl::Milliseconds(200));
    }
  }
}

}  // namespace

std::string LeaderHint(const absl::Status& status) {
  auto payload = status.GetPayload(kErrorInfoTypeUrl);
  if (!payload.has_value()) return "";
  google::rpc::ErrorInfo info;
  if (!info.ParseFromString(std::string(*payload)) || info.reason() != "NOT_LEADER") return "";
  auto leader = info.metadata().find("leader");
  return leader == info.metadata().end() ? "" : leader->second;
}

Replicas::Replicas(std::vector<std::string> targets,
                   std::shared_ptr<grpc::ChannelCredentials> credentials,
                   const grpc::ChannelArguments& args)
    : credentials_(std::move(credentials)), args_(args) {
  absl::MutexLock lock(&mu_);
  for (const std::string& target : targets) AddLocked(target);
}

Replicas::Replica& Replicas::AddLocked(const std::string& target) {
  for (auto& replica : replicas_) {
    if (replica->target == target) return *replica;
  }
  auto replica = std::make_unique<Replica>();
  replica->target = target;
  grpc::ChannelArguments args = args_;
  // A replica that was down is tried again soon after it comes back.
  args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, 100);
  args.SetInt(GRPC_ARG_MIN_RECONNECT_BACKOFF_MS, 100);
  args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, 1000);
  replica->channel = grpc::CreateCustomChannel(target, credentials_, args);
  replica->app = v1::CallSessionService::NewStub(replica->channel);
  replica->provider = v1::ProviderService::NewStub(replica->channel);
  replicas_.push_back(std::move(replica));
  return *replicas_.back();
}

Replicas::Replica& Replicas::Current() {
  absl::MutexLock lock(&mu_);
  return *replicas_[current_];
}

void Replicas::MoveOn(const Replica& failed, const std::string& leader) {
  absl::MutexLock lock(&mu_);
  if (replicas_[current_].get() != &failed) return;  // another thread moved on
  if (!leader.empty() && leader != failed.target) {
    Replica& named = AddLocked(leader);
    for (size_t i = 0; i < replicas_.size(); ++i) {
      if (replicas_[i].get() == &named) current_ = i;
    }
    return;
  }
  current_ = (current_ + 1) % replicas_.size();
}

absl::Status FromGrpcStatus(const grpc::Status& status) {
  if (status.ok()) return absl::OkStatus();
  absl::Status result(static_cast<absl::StatusCode>(status.error_code()), status.error_message());
  google::rpc::Status details;
  if (!status.error_details().empty() && details.ParseFromString(status.error_details())) {
    for (const google::protobuf::Any& detail : details.details()) {
      if (detail.type_url() == kErrorInfoTypeUrl) {
        result.SetPayload(kErrorInfoTypeUrl, absl::Cord(detail.value()));
        break;
      }
    }
  }
  return result;
}

std::string TapiReason(const absl::Status& status) {
  auto payload = status.GetPayload(kErrorInfoTypeUrl);
  if (!payload.has_value()) return "";
  google::rpc::ErrorInfo info;
  if (!info.ParseFromString(std::string(*payload))) return "";
  return info.reason();
}

namespace {

absl::StatusOr<std::string> ReadPem(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream contents;
  if (!in || !(contents << in.rdbuf())) {
    return absl::InvalidArgumentError(absl::StrCat("cannot read \"", path, "\""));
  }
  return contents.str();
}

}  // namespace

absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> ChannelCredentialsFrom(
    const ChannelTlsFiles& files) {
  if (files.ca_file.empty() && files.cert_file.empty() && files.key_file.empty()) {
    return grpc::InsecureChannelCredentials();
  }
  if (files.cert_file.empty() != files.key_file.empty()) {
    return absl::InvalidArgumentError(
        "a client certificate needs its key, and a key its certificate");
  }
  grpc::SslCredentialsOptions options;
  if (!files.ca_file.empty()) {
    absl::StatusOr<std::string> ca = ReadPem(files.ca_file);
    if (!ca.ok()) return ca.status();
    options.pem_root_certs = *std::move(ca);
  }
  if (!files.cert_file.empty()) {
    absl::StatusOr<std::string> cert = ReadPem(files.cert_file);
    if (!cert.ok()) return cert.status();
    absl::StatusOr<std::string> key = ReadPem(files.key_file);
    if (!key.ok()) return key.status();
    options.pem_cert_chain = *std::move(cert);
    options.pem_private_key = *std::move(key);
  }
  return grpc::SslCredentials(options);
}

void PrepareContext(grpc::ClientContext* context, absl::Duration deadline,
                    const std::string& token) {
  context->set_deadline(absl::ToChronoTime(absl::Now() + deadline));
  if (!token.empty()) context->AddMetadata("authorization", absl::StrCat("Bearer ", token));
}

// ---------------------------------------------------------------------------

EventStream::EventStream(v1::CallSessionService::Stub* stub, const std::string& token,
                         uint64_t from_sequence) {
  if (!token.empty()) context_.AddMetadata("authorization", absl::StrCat("Bearer ", token));
  reader_ = std::thread([this, stub, from_sequence] { ReadLoop(stub, from_sequence); });
}

EventStream::~EventStream() {
  Cancel();
  reader_.join();
}

void EventStream::Cancel() { context_.TryCancel(); }

void EventStream::ReadLoop(v1::CallSessionService::Stub* stub, uint64_t from_sequence) {
  v1::WatchEventsRequest request;
  request.set_from_sequence(from_sequence);
  std::unique_ptr<grpc::ClientReader<v1::WatchEventsResponse>> reader =
      stub->WatchEvents(&context_, request);
  v1::WatchEventsResponse response;
  while (reader->Read(&response)) {
    absl::MutexLock lock(&mu_);
    events_.push_back(std::move(*response.mutable_event()));
  }
  absl::Status status = FromGrpcStatus(reader->Finish());
  absl::MutexLock lock(&mu_);
  ended_ = true;
  end_status_ = std::move(status);
}

absl::StatusOr<v1::Event> EventStream::Next(absl::Duration timeout) {
  absl::MutexLock lock(&mu_);
  auto ready = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return !events_.empty() || ended_; };
  mu_.AwaitWithTimeout(absl::Condition(&ready), timeout);
  if (!events_.empty()) {
    v1::Event event = std::move(events_.front());
    events_.pop_front();
    return event;
  }
  if (!ended_) return absl::DeadlineExceededError("no event arrived in time");
  if (!end_status_.ok()) return end_status_;
  return absl::OutOfRangeError("the event stream ended");
}

// ---------------------------------------------------------------------------

CallSessionClient::CallSessionClient(std::shared_ptr<grpc::ChannelInterface> channel,
                                     ClientOptions options)
    : options_(options), stub_(v1::CallSessionService::NewStub(channel)) {}

CallSessionClient::CallSessionClient(std::shared_ptr<Replicas> replicas, ClientOptions options)
    : options_(options), replicas_(std::move(replicas)) {}

template <typename Request, typename Response>
absl::StatusOr<Response> CallSessionClient::Call(
    grpc::Status (v1::CallSessionService::Stub::*method)(grpc::ClientContext*, const Request&,
                                                         Response*),
    const Request& request, const std::string& token, bool retry_safe) {
  if (replicas_ == nullptr) return Invoke(*stub_, method, request, options_.deadline, token);
  return InvokeFollowing(*replicas_, &Replicas::Replica::app, method, request, options_, token,
                         retry_safe);
}

absl::StatusOr<v1::InitializeResponse> CallSessionClient::Initialize(absl::string_view app_name) {
  v1::InitializeRequest request;
  request.set_app_name(std::string(app_name));
  absl::StatusOr<v1::InitializeResponse> response =
      Call(&v1::CallSessionService::Stub::Initialize, request, options_.api_key, false);
  if (response.ok()) token_ = response->app_token();
  return response;
}

absl::Status CallSessionClient::Shutdown() {
  return Call(&v1::CallSessionService::Stub::Shutdown, v1::ShutdownRequest(), token_, false)
      .status();
}

absl::StatusOr<uint64_t> CallSessionClient::LineOpen(
    uint32_t device_id, const std::vector<v1::CallPrivilege>& privileges) {
  v1::LineOpenRequest request;
  request.set_device_id(device_id);
  for (v1::CallPrivilege privilege : privileges) request.add_privileges(privilege);
  absl::StatusOr<v1::LineOpenResponse> response =
      Call(&v1::CallSessionService::Stub::LineOpen, request, token_, false);
  if (!response.ok()) return response.status();
  return response->line_handle();
}

absl::Status CallSessionClient::LineClose(uint64_t line_handle) {
  v1::LineCloseRequest request;
  request.set_line_handle(line_handle);
  return Call(&v1::CallSessionService::Stub::LineClose, request, token_, false).status();
}

absl::StatusOr<v1::MakeCallResponse> CallSessionClient::MakeCall(uint64_t line_handle,
                                                                 absl::string_view dest_address,
                                                                 absl::string_view request_id) {
  v1::MakeCallRequest request;
  request.set_line_handle(line_handle);
  request.set_dest_address(std::string(dest_address));
  request.set_request_id(std::string(request_id));
  return Call(&v1::CallSessionService::Stub::MakeCall, request, token_,
              !request.request_id().empty());
}

absl::Status CallSessionClient::Answer(uint64_t call_handle) {
  v1::AnswerRequest request;
  request.set_call_handle(call_handle);
  return Call(&v1::CallSessionService::Stub::Answer, request, token_, false).status();
}

absl::Status CallSessionClient::Drop(uint64_t call_handle) {
  v1::DropRequest request;
  request.set_call_handle(call_handle);
  return Call(&v1::CallSessionService::Stub::Drop, request, token_, false).status();
}

absl::StatusOr<v1::CallInfo> CallSessionClient::GetCallInfo(uint64_t call_handle) {
  v1::GetCallInfoRequest request;
  request.set_call_handle(call_handle);
  absl::StatusOr<v1::GetCallInfoResponse> response =
      Call(&v1::CallSessionService::Stub::GetCallInfo, request, token_, true);
  if (!response.ok()) return response.status();
  return std::move(*response->mutable_info());
}

absl::StatusOr<v1::CallStatus> CallSessionClient::GetCallStatus(uint64_t call_handle) {
  v1::GetCallStatusRequest request;
  request.set_call_handle(call_handle);
  absl::StatusOr<v1::GetCallStatusResponse> response =
      Call(&v1::CallSessionService::Stub::GetCallStatus, request, token_, true);
  if (!response.ok()) return response.status();
  return std::move(*response->mutable_status());
}

absl::Status CallSessionClient::DeallocateCall(uint64_t call_handle) {
  v1::DeallocateCallRequest request;
  request.set_call_handle(call_handle);
  return Call(&v1::CallSessionService::Stub::DeallocateCall, request, token_, false).status();
}

absl::StatusOr<std::vector<uint64_t>> CallSessionClient::GetNewCalls(uint64_t line_handle) {
  v1::GetNewCallsRequest request;
  request.set_line_handle(line_handle);
  absl::StatusOr<v1::GetNewCallsResponse> response =
      Call(&v1::CallSessionService::Stub::GetNewCalls, request, token_, false);
  if (!response.ok()) return response.status();
  return std::vector<uint64_t>(response->call_handles().begin(), response->call_handles().end());
}

absl::StatusOr<v1::ListCallsResponse> CallSessionClient::ListCalls(absl::string_view page_token,
                                                                   uint32_t page_size) {
  v1::ListCallsRequest request;
  request.set_page_token(std::string(page_token));
  request.set_page_size(page_size);
  return Call(&v1::CallSessionService::Stub::ListCalls, request, token_, true);
}

absl::StatusOr<v1::ListCallsResponse> CallSessionClient::ListAllCalls() {
  v1::ListCallsResponse all;
  std::string page_token;
  bool first = true;
  do {
    absl::StatusOr<v1::ListCallsResponse> page = ListCalls(page_token);
    if (!page.ok()) return page.status();
    if (first) all.set_resume_sequence(page->resume_sequence());
    first = false;
    for (v1::CallHandleEntry& entry : *page->mutable_calls()) {
      *all.add_calls() = std::move(entry);
    }
    page_token = page->next_page_token();
  } while (!page_token.empty());
  return all;
}

absl::Status CallSessionClient::KeepAlive() {
  return Call(&v1::CallSessionService::Stub::KeepAlive, v1::KeepAliveRequest(), token_, true)
      .status();
}

std::unique_ptr<EventStream> CallSessionClient::WatchEvents(uint64_t from_sequence) {
  return std::make_unique<EventStream>(&stub(), token_, from_sequence);
}

// ---------------------------------------------------------------------------

AdminClient::AdminClient(std::shared_ptr<grpc::ChannelInterface> channel, std::string admin_token,
                         ClientOptions options)
    : options_(options),
      stub_(admin::v1::AdminService::NewStub(channel)),
      token_(std::move(admin_token)) {}

absl::StatusOr<admin::v1::CreateCheckpointResponse> AdminClient::CreateCheckpoint(
    absl::string_view directory) {
  admin::v1::CreateCheckpointRequest request;
  request.set_directory(std::string(directory));
  return Invoke(*stub_, &admin::v1::AdminService::Stub::CreateCheckpoint, request,
                std::max(options_.deadline, absl::Minutes(1)), token_);
}

template <typename Request, typename Response>
absl::StatusOr<Response> ProviderClient::Call(grpc::Status (v1::ProviderService::Stub::*method)(
                                                  grpc::ClientContext*, const Request&, Response*),
                                              const Request& request) {
  if (replicas_ == nullptr) return Invoke(*stub_, method, request, options_.deadline, token_);
  return InvokeFollowing(*replicas_, &Replicas::Replica::provider, method, request, options_,
                         token_, /*retry_safe=*/false);
}

ProviderClient::ProviderClient(std::shared_ptr<Replicas> replicas, std::string provider_token,
                               ClientOptions options)
    : options_(options), replicas_(std::move(replicas)), token_(std::move(provider_token)) {}

ProviderClient::ProviderClient(std::shared_ptr<grpc::ChannelInterface> channel,
                               std::string provider_token, ClientOptions options)
    : options_(options),
      stub_(v1::ProviderService::NewStub(channel)),
      token_(std::move(provider_token)) {}

absl::StatusOr<uint64_t> ProviderClient::OfferCall(uint32_t device_id, absl::string_view caller_id,
                                                   absl::string_view called_id) {
  v1::OfferCallRequest request;
  request.set_device_id(device_id);
  request.set_caller_id(std::string(caller_id));
  request.set_called_id(std::string(called_id));
  absl::StatusOr<v1::OfferCallResponse> response =
      Call(&v1::ProviderService::Stub::OfferCall, request);
  if (!response.ok()) return response.status();
  return response->call_id();
}

absl::Status ProviderClient::SetCallState(uint64_t call_id, v1::CallState state) {
  v1::SetCallStateRequest request;
  request.set_call_id(call_id);
  request.set_call_state(state);
  return Call(&v1::ProviderService::Stub::SetCallState, request).status();
}

absl::Status ProviderClient::ForceLineClose(uint32_t device_id) {
  v1::ForceLineCloseRequest request;
  request.set_device_id(device_id);
  return Call(&v1::ProviderService::Stub::ForceLineClose, request).status();
}

}  // namespace callsession
