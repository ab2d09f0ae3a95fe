#include "server/core/journal_records.h"

#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"

namespace callsession {
namespace {

void AppendBigEndian(uint64_t value, std::string* out) {
  for (int shift = 56; shift >= 0; shift -= 8) out->push_back(static_cast<char>(value >> shift));
}

uint64_t ReadBigEndian(absl::string_view bytes) {
  uint64_t value = 0;
  for (int i = 0; i < 8; ++i) value = value << 8 | static_cast<uint8_t>(bytes[i]);
  return value;
}

std::string KeyWithId(RecordKind kind, uint64_t id) {
  std::string key(1, static_cast<char>(kind));
  AppendBigEndian(id, &key);
  return key;
}

}  // namespace

std::string FormatKey() { return std::string(1, static_cast<char>(RecordKind::kFormat)); }

std::string HandleFloorKey(HandleKind kind) {
  return {static_cast<char>(RecordKind::kHandleFloor), static_cast<char>(kind)};
}

std::string AppKey(uint64_t app_handle) { return KeyWithId(RecordKind::kApp, app_handle); }
std::string LineKey(uint64_t line_handle) { return KeyWithId(RecordKind::kLine, line_handle); }
std::string CallKey(uint64_t call_id) { return KeyWithId(RecordKind::kCall, call_id); }
std::string CursorKey(uint64_t app_handle) { return KeyWithId(RecordKind::kCursor, app_handle); }

std::string EventKey(uint64_t app_handle, uint64_t sequence) {
  std::string key = KeyWithId(RecordKind::kEvent, app_handle);
  AppendBigEndian(sequence, &key);
  return key;
}

std::string RequestKey(uint64_t app_handle, absl::string_view request_id) {
  return absl::StrCat(KeyWithId(RecordKind::kRequest, app_handle), request_id);
}

std::string AppRangeBegin(RecordKind kind, uint64_t app_handle) {
  return KeyWithId(kind, app_handle);
}

std::string AppRangeEnd(RecordKind kind, uint64_t app_handle) {
  // Past every key of this app: the app's prefix followed by more 0xff
  // bytes than any suffix (a sequence, or a request id of at most 128
  // printable bytes) can start with.
  return absl::StrCat(KeyWithId(kind, app_handle), std::string(9, '\xff'));
}

absl::StatusOr<ParsedKey> ParseKey(absl::string_view key) {
  auto bad = [&] { return absl::DataLossError(absl::StrCat("unknown key ", KeyForHumans(key))); };
  if (key.empty()) return bad();
  ParsedKey parsed;
  parsed.kind = static_cast<RecordKind>(key[0]);
  switch (parsed.kind) {
    case RecordKind::kFormat:
      if (key.size() != 1) return bad();
      return parsed;
    case RecordKind::kHandleFloor:
      if (key.size() != 2 || static_cast<uint8_t>(key[1]) >= kHandleKinds) return bad();
      parsed.id = static_cast<uint8_t>(key[1]);
      return parsed;
    case RecordKind::kApp:
    case RecordKind::kLine:
    case RecordKind::kCall:
    case RecordKind::kCursor:
      if (key.size() != 9) return bad();
      parsed.id = ReadBigEndian(key.substr(1));
      return parsed;
    case RecordKind::kEvent:
      if (key.size() != 17) return bad();
      parsed.id = ReadBigEndian(key.substr(1));
      parsed.sequence = ReadBigEndian(key.substr(9));
      return parsed;
    case RecordKind::kRequest:
      if (key.size() < 10) return bad();
      parsed.id = ReadBigEndian(key.substr(1));
      parsed.request_id = key.substr(9);
      return parsed;
  }
  return bad();
}

std::string KeyForHumans(absl::string_view key) { return absl::BytesToHexString(key); }

}  // namespace callsession
