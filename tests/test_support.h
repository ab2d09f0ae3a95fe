// Matchers and fakes shared by the tests.
#ifndef CALLSESSION_TESTS_TEST_SUPPORT_H_
#define CALLSESSION_TESTS_TEST_SUPPORT_H_

#include <cstdlib>
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
