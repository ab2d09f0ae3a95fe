// EtcdClient: etcd's v3 API (KV, Watch, Lease) over gRPC, on several
// endpoints. A call that fails with UNAVAILABLE or DEADLINE_EXCEEDED moves
// to the next endpoint for the calls after it (a member that is down or cut
// off from its cluster answers so); the caller decides whether to retry.
// Errors keep etcd's code and message, prefixed with the endpoint.
//
// Thread-safe: the stubs are, and the endpoint in use is an atomic index.
#ifndef CALLSESSION_SERVER_STORAGE_ETCD_ETCD_CLIENT_H_
#define CALLSESSION_SERVER_STORAGE_ETCD_ETCD_CLIENT_H_

#include <atomic>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "etcd/etcdserver/etcdserverpb/rpc.grpc.pb.h"
#include "grpcpp/channel.h"

namespace callsession {

struct EtcdClientOptions {
  // host:port of each member (a DNS name or an address).
  std::vector<std::string> endpoints;
  // PEM files; an empty ca_file: plaintext. cert_file and key_file: the
  // client certificate an etcd with --client-cert-auth asks for.
  std::string ca_file;
  std::string cert_file;
  std::string key_file;
  // Deadline of each unary call.
  absl::Duration timeout = absl::Seconds(2);
};

class EtcdClient {
 public:
  // INVALID_ARGUMENT for no endpoint or an unreadable TLS file. Connects
  // lazily.
  static absl::StatusOr<std::unique_ptr<EtcdClient>> Create(const EtcdClientOptions& options);

  absl::StatusOr<etcdserverpb::TxnResponse> Txn(const etcdserverpb::TxnRequest& request);
  // Linearizable unless the request says serializable.
  absl::StatusOr<etcdserverpb::RangeResponse> Range(const etcdserverpb::RangeRequest& request);
  absl::StatusOr<etcdserverpb::LeaseGrantResponse> LeaseGrant(absl::Duration ttl);
  absl::Status LeaseRevoke(int64_t lease);
  // One renewal (a keep-alive stream with one message): the TTL etcd
  // answered, 0 if the lease is gone.
  absl::StatusOr<int64_t> LeaseKeepAliveOnce(int64_t lease);
  absl::Status Compact(int64_t revision);

  // The Watch stub of the endpoint in use (streams are managed by the
  // caller), and that endpoint's name.
  etcdserverpb::Watch::Stub& watch_stub(size_t* endpoint);
  const std::string& endpoint_name(size_t endpoint) const { return endpoints_[endpoint].name; }
  // After a stream on `endpoint` failed: use the next one.
  void Failed(size_t endpoint);

 private:
  struct Endpoint {
    std::string name;
    std::shared_ptr<grpc::Channel> channel;
    std::unique_ptr<etcdserverpb::KV::Stub> kv;
    std::unique_ptr<etcdserverpb::Watch::Stub> watch;
    std::unique_ptr<etcdserverpb::Lease::Stub> lease;
  };

  explicit EtcdClient(absl::Duration timeout) : timeout_(timeout) {}

  // Runs `call` on the endpoint in use; moves on after a transport error.
  template <typename Call>
  absl::Status Invoke(const char* what, Call&& call);

  const absl::Duration timeout_;
  std::vector<Endpoint> endpoints_;
  std::atomic<size_t> current_{0};
};

}  // namespace callsession

#endif  // CALLSESSION_SERVER_STORAGE_ETCD_ETCD_CLIENT_H_
