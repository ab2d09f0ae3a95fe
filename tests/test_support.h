// Matchers and fakes shared by the tests.
#ifndef CALLSESSION_TESTS_TEST_SUPPORT_H_
#define CALLSESSION_TESTS_TEST_SUPPORT_H_

#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstdlib>
#include <set>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "server/core/clock.h"

namespace callsession {

inline const absl::Status& StatusOf(const absl::Status& status) { return status; }
template <typename T>
const absl::Status& StatusOf(const absl::StatusOr<T>& status_or) {
  return status_or.status();
}

// The status (or StatusOr) is OK.
MATCHER(IsOk, "is OK") {
  const absl::Status& status = StatusOf(arg);
  *result_listener << "status is " << status;
  return status.ok();
}

// The status has `code`, its message starts with "<name>: ", and, if it came
// through the client library, the server's ErrorInfo reason is `name` too.
MATCHER_P2(IsTapiError, code, name,
           absl::StrCat("is ", absl::StatusCodeToString(code), " ", name)) {
  const absl::Status& status = StatusOf(arg);
  *result_listener << "status is " << status;
  if (status.code() != code) return false;
  if (!absl::StartsWith(status.message(), absl::StrCat(name, ": "))) return false;
  return true;
}

// A new empty directory under $TMPDIR (or /tmp); "" if none could be made.
inline std::string MakeTempDir(const std::string& prefix = "callsession-test") {
  const char* base = std::getenv("TMPDIR");
  std::string pattern = std::string(base != nullptr ? base : "/tmp") + "/" + prefix + ".XXXXXX";
  return mkdtemp(pattern.data()) != nullptr ? pattern : "";
}

// A loopback TCP port nothing is bound to right now and that this process has
// not handed out before; 0 if none could be found. The kernel may pick the
// same free port twice, and a child started on an earlier port may not have
// bound it yet, so ports are remembered rather than trusted (a duplicate once
// gave an etcd cluster the same peer URL twice). Another process can still
// take the port before the caller binds it. Any thread.
inline int FreePort() {
  ABSL_CONST_INIT static absl::Mutex mu(absl::kConstInit);
  static std::set<int>* const handed_out = new std::set<int>;
  absl::MutexLock lock(&mu);
  for (int attempt = 0; attempt < 1000; ++attempt) {
    const int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0) return 0;
    sockaddr_in address{};
    address.sin_family = AF_INET;
    address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t length = sizeof(address);
    int port = 0;
    if (bind(fd, reinterpret_cast<sockaddr*>(&address), sizeof(address)) == 0 &&
        getsockname(fd, reinterpret_cast<sockaddr*>(&address), &length) == 0) {
      port = ntohs(address.sin_port);
    }
    close(fd);
    if (port != 0 && handed_out->insert(port).second) return port;
  }
  return 0;
}

// A clock that moves only when told to.
class FakeClock final : public Clock {
 public:
  absl::Time Now() const override {
    absl::MutexLock lock(&mu_);
    return now_;
  }
  void Advance(absl::Duration by) {
    absl::MutexLock lock(&mu_);
    now_ += by;
  }

 private:
  mutable absl::Mutex mu_;
  absl::Time now_ ABSL_GUARDED_BY(mu_) = absl::FromUnixSeconds(1'700'000'000);
};

}  // namespace callsession

#endif  // CALLSESSION_TESTS_TEST_SUPPORT_H_
