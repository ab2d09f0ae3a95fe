// The keys of the records in protos/callsession/storage/v1/records.proto.
//
// A key is one byte naming the kind of record, then fixed-width big-endian
// ids, so that keys sort by kind and then by id, and all of one
// application's events (or request ids) are one contiguous range:
//   01                          FormatRecord
//   02 kind                     HandleFloorRecord (kind: HandleKind)
//   03 app                      AppRecord
//   04 line                     LineRecord
//   05 call_id                  CallRecord
//   06 app                      CursorRecord
//   07 app sequence             callsession.v1.Event
//   08 app request_id           RequestRecord
// Recovery visits them in that order: lines after the apps they belong to,
// calls after the lines their handles were opened through, an app's cursor
// before its events.
#ifndef CALLSESSION_SERVER_CORE_JOURNAL_RECORDS_H_
#define CALLSESSION_SERVER_CORE_JOURNAL_RECORDS_H_

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "server/core/session_store.h"

namespace callsession {

// The format this build writes, and the newest it reads (see records.proto).
inline constexpr uint32_t kStoreFormatVersion = 1;

enum class RecordKind : uint8_t {
  kFormat = 1,
  kHandleFloor = 2,
  kApp = 3,
  kLine = 4,
  kCall = 5,
  kCursor = 6,
  kEvent = 7,
  kRequest = 8,
};

std::string FormatKey();
std::string HandleFloorKey(HandleKind kind);
std::string AppKey(uint64_t app_handle);
std::string LineKey(uint64_t line_handle);
std::string CallKey(uint64_t call_id);
std::string EventKey(uint64_t app_handle, uint64_t sequence);
std::string RequestKey(uint64_t app_handle, absl::string_view request_id);
std::string CursorKey(uint64_t app_handle);
// [begin, end) covering every key of `kind` (kEvent or kRequest) of one app.
std::string AppRangeBegin(RecordKind kind, uint64_t app_handle);
std::string AppRangeEnd(RecordKind kind, uint64_t app_handle);

// A key taken apart. `id` is the handle or call id after the kind byte (the
// HandleKind for kHandleFloor); `sequence` is set for events; `request_id`
// for request records (it points into the key).
struct ParsedKey {
  RecordKind kind;
  uint64_t id = 0;
  uint64_t sequence = 0;
  absl::string_view request_id;
};

// DATA_LOSS if the key is not one of the above.
absl::StatusOr<ParsedKey> ParseKey(absl::string_view key);

// A key as text for error messages: hex.
std::string KeyForHumans(absl::string_view key);

}  // namespace callsession

#endif  // CALLSESSION_SERVER_CORE_JOURNAL_RECORDS_H_
