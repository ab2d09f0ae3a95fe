// CallSessionCore::Recover: rebuilds memory from the journal's records.
//
// Records are states, not commands, so recovery only loads and checks them:
// it never consults the clock (but to give every app a fresh lease), never
// allocates a handle, and never re-runs a TAPI rule. What it checks is that
// the records agree with one another (every line's app exists, every handle's
// line exists and is on the call's device, one handle per app per call, no
// IDLE call without a holder, each app's events consecutive); a record that
// does not is reported by key and nothing is served.
#include <algorithm>
#include <deque>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/notification.h"
#include "callsession/storage/v1/records.pb.h"
#include "server/core/call_session_core.h"
#include "server/core/journal_records.h"
#include "server/core/status_macros.h"

namespace callsession {
namespace {

constexpr size_t kMaxAddressBytes = 128;

absl::Status Corrupt(absl::string_view key, absl::string_view what) {
  return absl::DataLossError(absl::StrCat("record ", KeyForHumans(key), ": ", what));
}

template <typename Record>
absl::Status ParseRecord(absl::string_view key, absl::string_view value, Record* record) {
  if (!record->ParseFromArray(value.data(), static_cast<int>(value.size()))) {
    return Corrupt(key, absl::StrCat("is not a valid ", record->GetDescriptor()->name()));
  }
  return absl::OkStatus();
}

// One application's events, or its request ids, gathered while its keys go
// by (all apps' events come before all apps' request ids).
struct EventTail {
  std::shared_ptr<App> app;
  std::deque<v1::Event> events;
};
struct RequestTail {
  std::shared_ptr<App> app;
  std::vector<std::pair<std::string, IdempotentMakeCall>> requests;
};

}  // namespace

absl::Status CallSessionCore::RecoverFormat(absl::string_view value, bool* seen) {
  storage::v1::FormatRecord format;
  CS_RETURN_IF_ERROR(ParseRecord(FormatKey(), value, &format));
  if (format.version() == 0) return Corrupt(FormatKey(), "format version 0");
  if (format.version() > kStoreFormatVersion) {
    return absl::FailedPreconditionError(absl::StrCat(
        "the store has format version ", format.version(), " (written by ", format.created_by(),
        "); this callsessiond reads versions up to ", kStoreFormatVersion,
        ": run a callsessiond at least as new as the one that wrote it"));
  }
  *seen = true;
  return absl::OkStatus();
}

absl::Status CallSessionCore::RecoverApp(uint64_t handle, absl::string_view value) {
  const std::string key = AppKey(handle);
  storage::v1::AppRecord record;
  CS_RETURN_IF_ERROR(ParseRecord(key, value, &record));
  if (record.app_handle() != handle) return Corrupt(key, "app_handle differs from its key");
  Sha256Digest digest;
  if (record.secret_sha256().size() != digest.size()) {
    return Corrupt(key, "secret_sha256 is not 32 bytes");
  }
  std::copy(record.secret_sha256().begin(), record.secret_sha256().end(), digest.begin());
  // The tenant configuration in force is applied once everything is loaded.
  AppTenancy tenancy = TenancyOf(nullptr);
  tenancy.tenant = record.tenant();
  tenancy.credential = record.credential();
  auto app = std::make_shared<App>(handle, record.app_name(), digest, std::move(tenancy),
                                   options_.event_buffer, journal_);
  // Leases are not stored: every app gets a whole --app_ttl to come back.
  app->last_activity_ns.store(absl::ToUnixNanos(options_.clock->Now()), std::memory_order_relaxed);
  store_->RestoreApp(handle, app);
  absl::MutexLock lock(&apps_mu_);
  ++tenant_apps_[app->tenant];
  apps_.emplace(handle, std::move(app));
  return absl::OkStatus();
}

absl::Status CallSessionCore::RecoverLine(uint64_t handle, absl::string_view value,
                                          RecoveryCounts& counts) {
  const std::string key = LineKey(handle);
  storage::v1::LineRecord record;
  CS_RETURN_IF_ERROR(ParseRecord(key, value, &record));
  if (record.line_handle() != handle) return Corrupt(key, "line_handle differs from its key");
  std::shared_ptr<App> app = store_->FindApp(record.app_handle());
  if (app == nullptr) {
    return Corrupt(key, absl::StrCat("its app ", record.app_handle(), " does not exist"));
  }
  if (record.device_id() >= devices_.size()) {
    return absl::FailedPreconditionError(absl::StrCat(
        "line ", handle, " is open on device ", record.device_id(), " but --devices is ",
        devices_.size(), ": start with --devices of at least ", record.device_id() + 1));
  }
  Device& device = *devices_[record.device_id()];
  const DeviceRights rights =
      record.has_rights() ? static_cast<DeviceRights>(record.rights() & kAllRights) : kAllRights;
  auto line = std::make_shared<Line>(handle, app, &device, record.owner(), record.monitor(),
                                     record.open_order(), rights);
  store_->RestoreLine(handle, line);
  {
    absl::MutexLock lock(&app->mu);
    app->line_handles.insert(handle);
  }
  absl::MutexLock lock(&device.mu);
  if (!device.lines.emplace(record.open_order(), line).second) {
    return Corrupt(key, absl::StrCat("another line has open order ", record.open_order()));
  }
  if (record.owner()) device.owner_lines.emplace(record.open_order(), line.get());
  if (record.monitor()) device.monitor_lines.emplace(record.open_order(), line.get());
  device.next_open_order = std::max(device.next_open_order, record.open_order() + 1);
  ++counts.lines;
  return absl::OkStatus();
}

absl::Status CallSessionCore::RecoverCall(uint64_t call_id, absl::string_view value,
                                          RecoveryCounts& counts, uint64_t& highest_handle) {
  const std::string key = CallKey(call_id);
  storage::v1::CallRecord record;
  CS_RETURN_IF_ERROR(ParseRecord(key, value, &record));
  if (record.call_id() != call_id) return Corrupt(key, "call_id differs from its key");
  if (record.device_id() >= devices_.size()) {
    return absl::FailedPreconditionError(absl::StrCat(
        "call ", call_id, " is on device ", record.device_id(), " but --devices is ",
        devices_.size(), ": start with --devices of at least ", record.device_id() + 1));
  }
  if (record.caller_id().size() > kMaxAddressBytes ||
      record.called_id().size() > kMaxAddressBytes) {
    return Corrupt(key, "an address is over 128 bytes");
  }
  if (!v1::CallOrigin_IsValid(record.origin()) || record.origin() == v1::CALL_ORIGIN_UNSPECIFIED ||
      !v1::CallState_IsValid(record.state()) || record.state() == v1::CALL_STATE_UNSPECIFIED) {
    return Corrupt(key, "unknown origin or state");
  }
  if (record.holders().empty() && record.state() == v1::CALL_STATE_IDLE) {
    return Corrupt(key, "an IDLE call with no handle (it should have been freed)");
  }
  Device& device = *devices_[record.device_id()];
  CallRef call = CallRef::Make(call_id, record.device_id(), record.origin(), record.caller_id(),
                               record.called_id(), absl::FromUnixNanos(record.create_time_ns()),
                               record.state());
  {
    absl::MutexLock lock(&call->mu);
    call->state_entry_time_ns = record.state_entry_time_ns();
    call->connected = record.connected();
    for (const storage::v1::HolderRecord& holder : record.holders()) {
      std::shared_ptr<Line> line = store_->FindLine(holder.line_handle());
      if (line == nullptr) {
        return Corrupt(key, absl::StrCat("handle ", holder.call_handle(), " is on line ",
                                         holder.line_handle(), ", which does not exist"));
      }
      if (line->device != &device) {
        return Corrupt(key, absl::StrCat("handle ", holder.call_handle(), " is on line ",
                                         holder.line_handle(), " of another device"));
      }
      if (holder.privilege() != v1::CALL_PRIVILEGE_OWNER &&
          holder.privilege() != v1::CALL_PRIVILEGE_MONITOR) {
        return Corrupt(key, absl::StrCat("handle ", holder.call_handle(), " has no privilege"));
      }
      App& app = *line->app;
      if (std::any_of(call->holders.begin(), call->holders.end(),
                      [&app](const Holder& h) { return h.app() == &app; })) {
        return Corrupt(key, absl::StrCat("app ", app.handle, " holds two handles to it"));
      }
      if (holder.call_handle() == 0 || store_->FindCallHandle(holder.call_handle()) != nullptr) {
        return Corrupt(key, absl::StrCat("handle ", holder.call_handle(), " is used twice"));
      }
      store_->RestoreCallHandle(holder.call_handle(), call);
      call->holders.push_back(Holder(holder.call_handle(), line.get(), holder.privilege()));
      {
        absl::MutexLock line_lock(&line->mu);
        line->call_handles.insert(holder.call_handle());
      }
      app.call_handle_count.fetch_add(1, std::memory_order_relaxed);
      highest_handle = std::max(highest_handle, holder.call_handle());
      ++counts.call_handles;
    }
  }
  store_->RestoreCall(call_id, call);
  {
    absl::MutexLock lock(&device.mu);
    device.calls.insert(call.get());
  }
  ++counts.calls;
  return absl::OkStatus();
}

absl::StatusOr<RecoveryCounts> CallSessionCore::Recover() {
  if (journal_ == nullptr) return absl::FailedPreconditionError("Recover needs a journal");
  RecoveryCounts counts;
  bool format_seen = false;
  bool any_record = false;
  uint64_t floors[kHandleKinds] = {};
  uint64_t highest[kHandleKinds] = {};
  EventTail event_tail;
  RequestTail request_tail;
  absl::flat_hash_map<uint64_t, uint64_t> cursors;

  // Installs the gathered events of event_tail.app, with its cursor.
  auto finish_events = [&]() {
    if (event_tail.app == nullptr) return;
    App& app = *event_tail.app;
    counts.events += event_tail.events.size();
    auto cursor = cursors.find(app.handle);
    const uint64_t first = event_tail.events.front().sequence();
    app.events.Restore(std::move(event_tail.events),
                       cursor == cursors.end() ? first : cursor->second);
    event_tail = EventTail();
  };
  // Installs the gathered request ids of request_tail.app.
  auto finish_requests = [&]() {
    if (request_tail.app == nullptr) return;
    App& app = *request_tail.app;
    auto& requests = request_tail.requests;
    std::sort(requests.begin(), requests.end(),
              [](const auto& a, const auto& b) { return a.second.answered < b.second.answered; });
    // The newest --request_id_cache of them, as the cache would hold.
    const size_t skip = requests.size() > options_.request_id_cache
                            ? requests.size() - options_.request_id_cache
                            : 0;
    absl::MutexLock lock(&app.request_mu);
    for (size_t i = skip; i < requests.size(); ++i) {
      app.request_order.push_back(requests[i].first);
      app.recent_requests.emplace(std::move(requests[i].first), std::move(requests[i].second));
      ++counts.request_ids;
    }
    request_tail = RequestTail();
  };
  // The app `handle` (of the record at `key`) as `tail.app`, finishing the
  // previous app's tail first.
  auto switch_to = [&](auto& tail, auto finish, absl::string_view key,
                       uint64_t handle) -> absl::Status {
    if (tail.app != nullptr && tail.app->handle == handle) return absl::OkStatus();
    finish();
    tail.app = store_->FindApp(handle);
    if (tail.app == nullptr) {
      return Corrupt(key, absl::StrCat("its app ", handle, " does not exist"));
    }
    return absl::OkStatus();
  };

  CS_RETURN_IF_ERROR(journal_->Load([&](absl::string_view key,
                                        absl::string_view value) -> absl::Status {
    any_record = true;
    // The format record sorts first: without it, nothing else is read.
    if (!format_seen && key != FormatKey()) {
      return absl::DataLossError(
          "the store has no format record: it was not written by callsessiond");
    }
    CS_ASSIGN_OR_RETURN(const ParsedKey parsed, ParseKey(key));
    if (parsed.kind == RecordKind::kFormat) return RecoverFormat(value, &format_seen);
    switch (parsed.kind) {
      case RecordKind::kFormat:
        break;
      case RecordKind::kHandleFloor: {
        storage::v1::HandleFloorRecord record;
        CS_RETURN_IF_ERROR(ParseRecord(key, value, &record));
        floors[parsed.id] = record.reserved_below();
        return absl::OkStatus();
      }
      case RecordKind::kApp:
        highest[static_cast<int>(HandleKind::kApp)] = parsed.id;
        ++counts.apps;
        return RecoverApp(parsed.id, value);
      case RecordKind::kLine:
        highest[static_cast<int>(HandleKind::kLine)] = parsed.id;
        return RecoverLine(parsed.id, value, counts);
      case RecordKind::kCall:
        highest[static_cast<int>(HandleKind::kCall)] = parsed.id;
        return RecoverCall(parsed.id, value, counts,
                           highest[static_cast<int>(HandleKind::kCallHandle)]);
      case RecordKind::kCursor: {
        if (store_->FindApp(parsed.id) == nullptr) {
          return Corrupt(key, absl::StrCat("its app ", parsed.id, " does not exist"));
        }
        storage::v1::CursorRecord record;
        CS_RETURN_IF_ERROR(ParseRecord(key, value, &record));
        cursors[parsed.id] = record.next_sequence();
        return absl::OkStatus();
      }
      case RecordKind::kEvent: {
        CS_RETURN_IF_ERROR(switch_to(event_tail, finish_events, key, parsed.id));
        auto& tail = event_tail;
        v1::Event event;
        CS_RETURN_IF_ERROR(ParseRecord(key, value, &event));
        if (event.sequence() != parsed.sequence || parsed.sequence == 0) {
          return Corrupt(key, "the event's sequence differs from its key");
        }
        if (!tail.events.empty() && parsed.sequence != tail.events.back().sequence() + 1) {
          return Corrupt(key, absl::StrCat("app ", parsed.id, "'s events jump from ",
                                           tail.events.back().sequence(), " to ", parsed.sequence));
        }
        tail.events.push_back(std::move(event));
        return absl::OkStatus();
      }
      case RecordKind::kRequest: {
        finish_events();  // every app's events come before any request id
        CS_RETURN_IF_ERROR(switch_to(request_tail, finish_requests, key, parsed.id));
        auto& tail = request_tail;
        storage::v1::RequestRecord record;
        CS_RETURN_IF_ERROR(ParseRecord(key, value, &record));
        tail.requests.emplace_back(
            std::string(parsed.request_id),
            IdempotentMakeCall{record.line_handle(), record.dest_address(), record.call_handle(),
                               record.call_id(), absl::FromUnixNanos(record.answered_time_ns())});
        return absl::OkStatus();
      }
    }
    return Corrupt(key, "unknown kind");
  }));
  finish_events();
  finish_requests();

  // Handles continue above everything ever issued, stored or not.
  {
    absl::MutexLock lock(&journal_mu_);
    for (int kind = 0; kind < kHandleKinds; ++kind) {
      store_->RaiseHandleFloor(static_cast<HandleKind>(kind),
                               std::max(floors[kind], highest[kind]));
      handle_floor_[kind] = floors[kind];
    }
  }

  if (!any_record) {
    // A new store: its first entry says what wrote it.
    storage::v1::FormatRecord format;
    format.set_version(kStoreFormatVersion);
    format.set_created_by("callsessiond");
    uint64_t position = 0;
    {
      absl::MutexLock lock(&journal_mu_);
      position = journal_->Append([&](JournalWriter& writer, uint64_t) {
        writer.Put(FormatKey(), format.SerializeAsString());
      });
    }
    absl::Notification durable;
    journal_->WhenDurable(position, [&durable]() { durable.Notify(); });
    durable.WaitForNotification();
    counts.created = true;
  }
  // What was loaded meets the tenants in force now.
  const TenantsApplied applied = ApplyTenants(CurrentTenants());
  counts.apps_revoked = applied.apps_shut_down;
  counts.lines_revoked = applied.lines_closed;
  return counts;
}

}  // namespace callsession
