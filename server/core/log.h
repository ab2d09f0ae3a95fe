// Structured logs: one JSON object per line on stderr, e.g.
//   {"time":"2026-11-21T13:22:17.274Z","level":"info","event":"app_initialized",
//    "app_handle":90,"app_name":"dialer"}
// Callers pass ids, never secrets: no token is ever a field.
//
// Thread-safe: each line is written with a single write(2), so lines from
// different threads never interleave. Call with no core lock held (a full
// stderr pipe may block).
#ifndef CALLSESSION_SERVER_CORE_LOG_H_
#define CALLSESSION_SERVER_CORE_LOG_H_

#include <cstdint>
#include <initializer_list>
#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"

namespace callsession {

enum class LogLevel { kDebug = 0, kInfo = 1, kWarning = 2, kError = 3 };

// "debug", "info", "warning" or "error"; INVALID_ARGUMENT otherwise.
absl::StatusOr<LogLevel> ParseLogLevel(absl::string_view name);

// Lines below `level` are dropped. Default: info.
void SetLogLevel(LogLevel level);
bool LogEnabled(LogLevel level);

// One key and its value, rendered as a JSON string, number or boolean.
class LogField {
 public:
  LogField(absl::string_view key, absl::string_view value);
  LogField(absl::string_view key, const char* value);
  LogField(absl::string_view key, const std::string& value);
  LogField(absl::string_view key, uint64_t value);
  LogField(absl::string_view key, int64_t value);
  LogField(absl::string_view key, int value);
  LogField(absl::string_view key, uint32_t value);
  LogField(absl::string_view key, double value);
  LogField(absl::string_view key, bool value);

  // Appends `"key":value` to `out`.
  void AppendTo(std::string* out) const;

 private:
  std::string key_;
  std::string json_value_;
};

void Log(LogLevel level, absl::string_view event, std::initializer_list<LogField> fields = {});

// An audit line: who did what (registrations, lines opened and closed,
// shutdowns, forced closes, revocations), with the tenant and the app.
// Written whatever the log level, as level "info" with "audit":true.
void Audit(absl::string_view event, std::initializer_list<LogField> fields);

// Lets a recurring line through at most `per_second` times a second on
// average (bursts of up to `burst`), so that a flood of failures cannot
// flood the log. Thread-safe.
class LogRateLimiter {
 public:
  LogRateLimiter(double per_second, double burst);
  // True if a line may be written now; then `*suppressed` is how many were
  // held back since the last one let through.
  bool Allow(uint64_t* suppressed);

 private:
  const double per_second_;
  const double burst_;
  absl::Mutex mu_;
  double tokens_ ABSL_GUARDED_BY(mu_);
  absl::Time refilled_ ABSL_GUARDED_BY(mu_);
  uint64_t suppressed_ ABSL_GUARDED_BY(mu_) = 0;
};

// Appends `text` as a JSON string literal (with quotes) to `out`.
void AppendJsonString(absl::string_view text, std::string* out);

}  // namespace callsession

#endif  // CALLSESSION_SERVER_CORE_LOG_H_
