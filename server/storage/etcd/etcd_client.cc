#include "server/storage/etcd/etcd_client.h"

#include <fstream>
#include <sstream>
#include <utility>

#include "absl/strings/str_cat.h"
#include "grpcpp/client_context.h"
#include "grpcpp/create_channel.h"
#include "grpcpp/security/credentials.h"

namespace callsession {
namespace {

absl::StatusOr<std::string> ReadPem(const std::string& path) {
  std::ifstream in(path);
  if (!in) return absl::InvalidArgumentError(absl::StrCat("cannot read etcd TLS file ", path));
  std::stringstream text;
  text << in.rdbuf();
  return text.str();
}

absl::Status FromGrpc(const grpc::Status& status, absl::string_view endpoint,
                      absl::string_view what) {
  if (status.ok()) return absl::OkStatus();
  return absl::Status(static_cast<absl::StatusCode>(status.error_code()),
                      absl::StrCat("etcd ", endpoint, " ", what, ": ", status.error_message()));
}

bool MovesOn(const absl::Status& status) {
  return absl::IsUnavailable(status) || absl::IsDeadlineExceeded(status);
}

}  // namespace

absl::StatusOr<std::unique_ptr<EtcdClient>> EtcdClient::Create(const EtcdClientOptions& options) {
  if (options.endpoints.empty()) {
    return absl::InvalidArgumentError("--etcd_endpoints names no endpoint");
  }
  std::shared_ptr<grpc::ChannelCredentials> credentials = grpc::InsecureChannelCredentials();
  if (!options.ca_file.empty()) {
    grpc::SslCredentialsOptions ssl;
    auto ca = ReadPem(options.ca_file);
    if (!ca.ok()) return ca.status();
    ssl.pem_root_certs = *std::move(ca);
    if (!options.cert_file.empty() || !options.key_file.empty()) {
      auto cert = ReadPem(options.cert_file);
      if (!cert.ok()) return cert.status();
      auto key = ReadPem(options.key_file);
      if (!key.ok()) return key.status();
      ssl.pem_cert_chain = *std::move(cert);
      ssl.pem_private_key = *std::move(key);
    }
    credentials = grpc::SslCredentials(ssl);
  }
  std::unique_ptr<EtcdClient> client(new EtcdClient(options.timeout));
  for (const std::string& name : options.endpoints) {
    if (name.empty()) return absl::InvalidArgumentError("--etcd_endpoints has an empty entry");
    Endpoint endpoint;
    endpoint.name = name;
    grpc::ChannelArguments args;
    // Reconnect quickly to a member that comes back.
    args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, 100);
    args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, 1000);
    args.SetMaxReceiveMessageSize(64 << 20);
    endpoint.channel = grpc::CreateCustomChannel(name, credentials, args);
    endpoint.kv = etcdserverpb::KV::NewStub(endpoint.channel);
    endpoint.watch = etcdserverpb::Watch::NewStub(endpoint.channel);
    endpoint.lease = etcdserverpb::Lease::NewStub(endpoint.channel);
    client->endpoints_.push_back(std::move(endpoint));
  }
  return client;
}

template <typename Call>
absl::Status EtcdClient::Invoke(const char* what, Call&& call) {
  const size_t index = current_.load(std::memory_order_relaxed) % endpoints_.size();
  grpc::ClientContext context;
  context.set_deadline(absl::ToChronoTime(absl::Now() + timeout_));
  // A member that is down fails at once instead of waiting for it.
  context.set_wait_for_ready(false);
  absl::Status status = FromGrpc(call(endpoints_[index], &context), endpoints_[index].name, what);
  if (MovesOn(status)) Failed(index);
  return status;
}

void EtcdClient::Failed(size_t endpoint) {
  size_t expected = endpoint;
  current_.compare_exchange_strong(expected, (endpoint + 1) % endpoints_.size());
}

etcdserverpb::Watch::Stub& EtcdClient::watch_stub(size_t* endpoint) {
  *endpoint = current_.load(std::memory_order_relaxed) % endpoints_.size();
  return *endpoints_[*endpoint].watch;
}

absl::StatusOr<etcdserverpb::TxnResponse> EtcdClient::Txn(const etcdserverpb::TxnRequest& request) {
  etcdserverpb::TxnResponse response;
  absl::Status status = Invoke("txn", [&](Endpoint& e, grpc::ClientContext* context) {
    return e.kv->Txn(context, request, &response);
  });
  if (!status.ok()) return status;
  return response;
}

absl::StatusOr<etcdserverpb::RangeResponse> EtcdClient::Range(
    const etcdserverpb::RangeRequest& request) {
  etcdserverpb::RangeResponse response;
  absl::Status status = Invoke("range", [&](Endpoint& e, grpc::ClientContext* context) {
    return e.kv->Range(context, request, &response);
  });
  if (!status.ok()) return status;
  return response;
}

absl::StatusOr<etcdserverpb::LeaseGrantResponse> EtcdClient::LeaseGrant(absl::Duration ttl) {
  etcdserverpb::LeaseGrantRequest request;
  request.set_ttl(absl::ToInt64Seconds(ttl));
  etcdserverpb::LeaseGrantResponse response;
  absl::Status status = Invoke("lease grant", [&](Endpoint& e, grpc::ClientContext* context) {
    return e.lease->LeaseGrant(context, request, &response);
  });
  if (!status.ok()) return status;
  if (!response.error().empty()) {
    return absl::UnavailableError(absl::StrCat("etcd lease grant: ", response.error()));
  }
  return response;
}

absl::Status EtcdClient::LeaseRevoke(int64_t lease) {
  etcdserverpb::LeaseRevokeRequest request;
  request.set_id(lease);
  etcdserverpb::LeaseRevokeResponse response;
  return Invoke("lease revoke", [&](Endpoint& e, grpc::ClientContext* context) {
    return e.lease->LeaseRevoke(context, request, &response);
  });
}

absl::StatusOr<int64_t> EtcdClient::LeaseKeepAliveOnce(int64_t lease) {
  etcdserverpb::LeaseKeepAliveResponse response;
  absl::Status status = Invoke("lease keep-alive", [&](Endpoint& e, grpc::ClientContext* context) {
    auto stream = e.lease->LeaseKeepAlive(context);
    etcdserverpb::LeaseKeepAliveRequest request;
    request.set_id(lease);
    if (stream->Write(request) && stream->Read(&response)) {
      stream->WritesDone();
      context->TryCancel();
      (void)stream->Finish();
      return grpc::Status::OK;
    }
    stream->WritesDone();
    grpc::Status finished = stream->Finish();
    return finished.ok() ? grpc::Status(grpc::StatusCode::UNAVAILABLE, "stream ended") : finished;
  });
  if (!status.ok()) return status;
  return response.ttl() > 0 ? response.ttl() : 0;
}

absl::Status EtcdClient::Compact(int64_t revision) {
  etcdserverpb::CompactionRequest request;
  request.set_revision(revision);
  etcdserverpb::CompactionResponse response;
  return Invoke("compact", [&](Endpoint& e, grpc::ClientContext* context) {
    return e.kv->Compact(context, request, &response);
  });
}

}  // namespace callsession
