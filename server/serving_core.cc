#include "server/serving_core.h"

#include <string>

#include "absl/strings/cord.h"
#include "absl/strings/str_cat.h"
#include "google/rpc/error_details.pb.h"

namespace callsession {
namespace {
constexpr char kErrorInfoTypeUrl[] = "type.googleapis.com/google.rpc.ErrorInfo";
}  // namespace

absl::Status ServingCore::NotLeader() const {
  const std::string leader = gate_->leader_address();
  absl::Status status = absl::UnavailableError(
      leader.empty() ? std::string("this callsessiond does not lead and no leader is known yet; "
                                   "retry shortly")
                     : absl::StrCat("this callsessiond does not lead; the leader is ", leader));
  google::rpc::ErrorInfo info;
  info.set_reason("NOT_LEADER");
  info.set_domain("callsession.v1");
  if (!leader.empty()) (*info.mutable_metadata())["leader"] = leader;
  status.SetPayload(kErrorInfoTypeUrl, absl::Cord(info.SerializeAsString()));
  return status;
}

}  // namespace callsession
