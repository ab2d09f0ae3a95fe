#include "server/core/call_session_core.h"

#include <sys/random.h>

#include <algorithm>
#include <cerrno>
#include <utility>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "callsession/storage/v1/records.pb.h"
#include "google/protobuf/duration.pb.h"
#include "google/protobuf/timestamp.pb.h"
#include "server/core/handle_table.h"
#include "server/core/journal_records.h"
#include "server/core/log.h"
#include "server/core/sha256.h"
#include "server/core/status_macros.h"
#include "server/core/tapi_error.h"

namespace callsession {
namespace {

using v1::CallPrivilege;
using v1::CallState;

constexpr size_t kMaxAddressBytes = 128;
constexpr size_t kMaxAppNameBytes = 128;
constexpr size_t kMaxRequestIdBytes = 128;
constexpr uint32_t kMaxDevices = 1 << 20;
// An app token is the app handle (16 hex digits) then a 128-bit secret (32).
constexpr size_t kTokenHandleDigits = 16;
constexpr size_t kTokenLength = kTokenHandleDigits + 32;

bool IsPrintableAscii(absl::string_view s) {
  return std::all_of(s.begin(), s.end(), [](char c) { return c >= 0x20 && c <= 0x7e; });
}

absl::Status CheckAddress(absl::string_view field, absl::string_view value, bool allow_empty) {
  if (value.empty() && !allow_empty) {
    return TapiError(TapiErrorCode::kInvalAddress, absl::StrCat(field, " is empty"));
  }
  if (value.size() > kMaxAddressBytes) {
    return TapiError(TapiErrorCode::kInvalAddress,
                     absl::StrCat(field, " is over ", kMaxAddressBytes, " bytes"));
  }
  if (!IsPrintableAscii(value)) {
    return TapiError(TapiErrorCode::kInvalAddress,
                     absl::StrCat(field, " has a byte that is not printable ASCII"));
  }
  return absl::OkStatus();
}

absl::Status InvalidCallHandle() {
  return TapiError(TapiErrorCode::kInvalCallHandle, "no such call handle");
}

absl::Status InvalidLineHandle() {
  return TapiError(TapiErrorCode::kInvalLineHandle, "no such line handle");
}

absl::Status Unauthenticated(absl::string_view why) {
  return TapiError(TapiErrorCode::kUninitialized, why);
}

int HexValue(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  return -1;
}

// Parses lower-case hex into `out` (out_size bytes); false on a bad digit.
bool ParseHex(absl::string_view hex, uint8_t* out, size_t out_size) {
  if (hex.size() != 2 * out_size) return false;
  for (size_t i = 0; i < out_size; ++i) {
    int hi = HexValue(hex[2 * i]);
    int lo = HexValue(hex[2 * i + 1]);
    if (hi < 0 || lo < 0) return false;
    out[i] = static_cast<uint8_t>(hi << 4 | lo);
  }
  return true;
}

void AppendHex(const uint8_t* data, size_t size, std::string* out) {
  static constexpr char kDigits[] = "0123456789abcdef";
  for (size_t i = 0; i < size; ++i) {
    out->push_back(kDigits[data[i] >> 4]);
    out->push_back(kDigits[data[i] & 0xf]);
  }
}

// An app token: the app handle (big-endian) then the secret, in hex.
std::string TokenOf(uint64_t handle, const std::array<uint8_t, 16>& secret) {
  uint8_t handle_bytes[8];
  for (int i = 0; i < 8; ++i) handle_bytes[i] = static_cast<uint8_t>(handle >> (56 - 8 * i));
  std::string token;
  token.reserve(kTokenLength);
  AppendHex(handle_bytes, sizeof(handle_bytes), &token);
  AppendHex(secret.data(), secret.size(), &token);
  return token;
}

absl::StatusOr<std::array<uint8_t, 16>> RandomSecret() {
  std::array<uint8_t, 16> secret;
  size_t filled = 0;
  while (filled < secret.size()) {
    ssize_t n = getrandom(secret.data() + filled, secret.size() - filled, 0);
    if (n < 0) {
      if (errno == EINTR) continue;
      return absl::InternalError("getrandom failed");
    }
    filled += static_cast<size_t>(n);
  }
  return secret;
}

void SetTimestamp(int64_t nanos, google::protobuf::Timestamp* out) {
  int64_t seconds = nanos / 1000000000;
  int64_t rest = nanos % 1000000000;
  if (rest < 0) {
    rest += 1000000000;
    --seconds;
  }
  out->set_seconds(seconds);
  out->set_nanos(static_cast<int32_t>(rest));
}

void SetDuration(absl::Duration duration, google::protobuf::Duration* out) {
  const int64_t nanos = absl::ToInt64Nanoseconds(duration);
  out->set_seconds(nanos / 1000000000);
  out->set_nanos(static_cast<int32_t>(nanos % 1000000000));
}

// The holder of `handle` if `app` holds it, else nullptr.
Holder* FindHolderLocked(Call& call, uint64_t handle, const App* app)
    ABSL_SHARED_LOCKS_REQUIRED(call.mu) {
  for (Holder& holder : call.holders) {
    if (holder.handle == handle) return holder.app() == app ? &holder : nullptr;
  }
  return nullptr;
}

bool HoldsLocked(const Call& call, const App* app) ABSL_SHARED_LOCKS_REQUIRED(call.mu) {
  return std::any_of(call.holders.begin(), call.holders.end(),
                     [app](const Holder& h) { return h.app() == app; });
}

size_t CountLocked(const Call& call, CallPrivilege privilege) ABSL_SHARED_LOCKS_REQUIRED(call.mu) {
  return std::count_if(call.holders.begin(), call.holders.end(),
                       [privilege](const Holder& h) { return h.privilege() == privilege; });
}

// True if `holder` is the call's only owner: then the call is its app's
// alone, and that app may not walk away from it while it is live.
bool IsSoleOwnerLocked(const Call& call, const Holder& holder) ABSL_SHARED_LOCKS_REQUIRED(call.mu) {
  return holder.privilege() == v1::CALL_PRIVILEGE_OWNER &&
         CountLocked(call, v1::CALL_PRIVILEGE_OWNER) == 1;
}

// Journal tuning. A handle floor is reserved this far ahead, so the floor
// record is rewritten about once per 65536 handles of a kind.
constexpr uint64_t kHandleFloorBlock = uint64_t{1} << 16;
// Evicted events are deleted from the journal in ranges of at least this.
constexpr uint64_t kEventDeleteBatch = 256;
// The delivery cursor is stored with an app's events once it moved this far.
constexpr uint64_t kCursorStoreLag = 64;

void AuditLineClosed(const Line& line, absl::string_view why) {
  Audit("line_closed", {{"tenant", line.app->tenant},
                        {"app_handle", line.app->handle},
                        {"line_handle", line.handle},
                        {"device_id", line.device->id},
                        {"reason", why}});
}

// The privileges a LineOpen asks for, for messages.
std::string PrivilegesText(bool owner, bool monitor) {
  if (owner && monitor) return "OWNER and MONITOR";
  if (owner) return "OWNER";
  if (monitor) return "MONITOR";
  return "no privilege";
}

std::string EncodeApp(const App& app) {
  storage::v1::AppRecord record;
  record.set_app_handle(app.handle);
  record.set_app_name(app.name);
  record.set_secret_sha256(app.secret_sha256.data(), app.secret_sha256.size());
  record.set_tenant(app.tenant);
  record.set_credential(app.credential);
  return record.SerializeAsString();
}

std::string EncodeLine(const Line& line) {
  storage::v1::LineRecord record;
  record.set_line_handle(line.handle);
  record.set_app_handle(line.app->handle);
  record.set_device_id(line.device->id);
  record.set_owner(line.owner);
  record.set_monitor(line.monitor);
  record.set_open_order(line.open_order);
  record.set_rights(line.rights);
  return record.SerializeAsString();
}

std::string EncodeCall(const Call& call) ABSL_SHARED_LOCKS_REQUIRED(call.mu) {
  storage::v1::CallRecord record;
  record.set_call_id(call.id);
  record.set_device_id(call.device_id);
  record.set_origin(call.origin());
  const absl::string_view caller = call.caller_id();
  const absl::string_view called = call.called_id();
  record.set_caller_id(caller.data(), caller.size());
  record.set_called_id(called.data(), called.size());
  record.set_create_time_ns(call.create_time_ns());
  record.set_state(call.state);
  record.set_state_entry_time_ns(call.state_entry_time_ns);
  record.set_connected(call.connected);
  for (const Holder& holder : call.holders) {
    storage::v1::HolderRecord* h = record.add_holders();
    h->set_call_handle(holder.handle);
    h->set_line_handle(holder.line()->handle);
    h->set_privilege(holder.privilege());
  }
  return record.SerializeAsString();
}

std::string EncodeRequest(const IdempotentMakeCall& entry) {
  storage::v1::RequestRecord record;
  record.set_line_handle(entry.line_handle);
  record.set_dest_address(entry.dest_address);
  record.set_call_handle(entry.call_handle);
  record.set_call_id(entry.call_id);
  record.set_answered_time_ns(absl::ToUnixNanos(entry.answered));
  return record.SerializeAsString();
}

std::string EncodeHandleFloor(uint64_t reserved_below) {
  storage::v1::HandleFloorRecord record;
  record.set_reserved_below(reserved_below);
  return record.SerializeAsString();
}

std::string EncodeCursor(uint64_t next_sequence) {
  storage::v1::CursorRecord record;
  record.set_next_sequence(next_sequence);
  return record.SerializeAsString();
}

}  // namespace

// ---------------------------------------------------------------------------
// Change: the effects of one change, appended to the journal as one entry.

// Collects what one change did under its locks (records written or deleted,
// handles issued, events raised) and, in Commit, appends it as one journal
// entry while those locks are still held: events get their sequence numbers
// there, in journal order. Without a journal, events go to their queues at
// once, records are not kept and Commit does nothing. Used on one thread.
class CallSessionCore::Change {
 public:
  Change(CallSessionCore& core, EventPublisher& publisher)
      : core_(core), journaled_(core.journal_ != nullptr), publisher_(publisher) {}
  Change(const Change&) = delete;
  Change& operator=(const Change&) = delete;

  void PutApp(const App& app) {
    if (journaled_) Put(AppKey(app.handle), EncodeApp(app));
  }
  void PutLine(const Line& line) {
    if (journaled_) Put(LineKey(line.handle), EncodeLine(line));
  }
  void DeleteLine(uint64_t line_handle) {
    if (journaled_) records_.push_back({Record::kDelete, LineKey(line_handle), {}});
  }
  // Call with the call's final state for this change (once, last).
  void PutCall(const Call& call) ABSL_SHARED_LOCKS_REQUIRED(call.mu) {
    if (journaled_) Put(CallKey(call.id), EncodeCall(call));
  }
  void DeleteCall(uint64_t call_id) {
    if (journaled_) records_.push_back({Record::kDelete, CallKey(call_id), {}});
  }
  void PutRequest(uint64_t app_handle, const std::string& request_id,
                  const IdempotentMakeCall& entry) {
    if (journaled_) Put(RequestKey(app_handle, request_id), EncodeRequest(entry));
  }
  void DeleteRequest(uint64_t app_handle, const std::string& request_id) {
    if (journaled_) {
      records_.push_back({Record::kDelete, RequestKey(app_handle, request_id), {}});
    }
  }
  // A handle of `kind` was issued: the handle floor must cover it.
  void Issued(HandleKind kind, uint64_t handle) {
    if (journaled_) issued_.push_back({kind, handle});
  }
  void PushEvent(App& app, v1::Event event) {
    if (journaled_) {
      events_.push_back({&app, std::move(event)});
    } else {
      publisher_.Push(app.events, std::move(event));
    }
  }
  // The app is gone: its record, events, request ids and cursor are
  // deleted, its queue closed and its stream ended (once durable).
  void RemoveApp(App& app) {
    if (journaled_) {
      removed_app_ = &app;
    } else if (std::shared_ptr<EventSink> sink = app.events.Close()) {
      publisher_.End(std::move(sink), 0);
    }
  }
  // Stores the app's delivery cursor.
  void PutCursor(App& app) {
    if (journaled_) cursor_app_ = &app;
  }

  // Appends everything as one entry. Call once, with the locks of
  // everything the change touched still held.
  void Commit() {
    if (!journaled_ || (records_.empty() && issued_.empty() && events_.empty() &&
                        removed_app_ == nullptr && cursor_app_ == nullptr)) {
      return;
    }
    absl::MutexLock lock(&core_.journal_mu_);
    core_.journal_->Append([&](JournalWriter& writer, uint64_t position) {
      core_.journal_mu_.AssertHeld();
      for (const auto& [kind, handle] : issued_) {
        uint64_t& floor = core_.handle_floor_[static_cast<int>(kind)];
        if (handle >= floor) {
          floor = handle + kHandleFloorBlock;
          writer.Put(HandleFloorKey(kind), EncodeHandleFloor(floor));
        }
      }
      for (const Record& record : records_) {
        if (record.kind == Record::kPut) {
          writer.Put(record.key, record.value);
        } else {
          writer.Delete(record.key);
        }
      }
      absl::InlinedVector<App*, 4> touched;
      std::string stored;
      for (auto& [app, event] : events_) {
        EventQueue::Pushed pushed = app->events.Push(std::move(event), position, &stored);
        if (pushed.sequence == 0) continue;  // the app is gone
        writer.Put(EventKey(app->handle, pushed.sequence), stored);
        if (pushed.wake != nullptr) publisher_.Wake(std::move(pushed.wake), position);
        if (std::find(touched.begin(), touched.end(), app) == touched.end()) touched.push_back(app);
      }
      for (App* app : touched) {
        if (auto evicted = app->events.TakeEvictedRange(kEventDeleteBatch)) {
          writer.DeleteRange(EventKey(app->handle, evicted->first),
                             EventKey(app->handle, evicted->second));
        }
        if (auto cursor = app->events.TakeCursorToStore(kCursorStoreLag)) {
          writer.Put(CursorKey(app->handle), EncodeCursor(*cursor));
        }
      }
      if (cursor_app_ != nullptr) {
        if (auto cursor = cursor_app_->events.TakeCursorToStore(1)) {
          writer.Put(CursorKey(cursor_app_->handle), EncodeCursor(*cursor));
        }
      }
      if (removed_app_ != nullptr) {
        const uint64_t handle = removed_app_->handle;
        writer.Delete(AppKey(handle));
        writer.Delete(CursorKey(handle));
        writer.DeleteRange(AppRangeBegin(RecordKind::kEvent, handle),
                           AppRangeEnd(RecordKind::kEvent, handle));
        writer.DeleteRange(AppRangeBegin(RecordKind::kRequest, handle),
                           AppRangeEnd(RecordKind::kRequest, handle));
        if (std::shared_ptr<EventSink> sink = removed_app_->events.Close()) {
          publisher_.End(std::move(sink), position);
        }
      }
    });
  }

 private:
  struct Record {
    enum Kind { kPut, kDelete } kind;
    std::string key;
    std::string value;
  };
  void Put(std::string key, std::string value) {
    records_.push_back({Record::kPut, std::move(key), std::move(value)});
  }

  CallSessionCore& core_;
  const bool journaled_;
  EventPublisher& publisher_;
  absl::InlinedVector<Record, 2> records_;
  absl::InlinedVector<std::pair<HandleKind, uint64_t>, 2> issued_;
  absl::InlinedVector<std::pair<App*, v1::Event>, 2> events_;
  App* removed_app_ = nullptr;
  App* cursor_app_ = nullptr;
};

absl::Status ValidateCoreOptions(const CoreOptions& options) {
  if (options.num_devices < 1 || options.num_devices > kMaxDevices) {
    return absl::InvalidArgumentError(
        absl::StrCat("devices must be between 1 and ", kMaxDevices, ", got ", options.num_devices));
  }
  if (options.shards < 1 || options.shards > (1 << 16) ||
      (options.shards & (options.shards - 1)) != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("shards must be a power of two between 1 and 65536, got ", options.shards));
  }
  if (options.event_buffer < 1) {
    return absl::InvalidArgumentError("event_buffer must be at least 1");
  }
  if (options.request_id_ttl < absl::ZeroDuration()) {
    return absl::InvalidArgumentError("request_id_ttl must not be negative");
  }
  if (options.app_ttl < absl::ZeroDuration()) {
    return absl::InvalidArgumentError("app_ttl must not be negative");
  }
  if (options.clock == nullptr) {
    return absl::InvalidArgumentError("clock must be set");
  }
  return absl::OkStatus();
}

EventSubscription::EventSubscription(CallSessionCore* core, std::shared_ptr<App> app,
                                     std::shared_ptr<EventSink> sink)
    : core_(core), app_(std::move(app)), sink_(std::move(sink)) {
  absl::MutexLock lock(&core_->subscriptions_mu_);
  core_->subscriptions_.insert(this);
}

EventSubscription::~EventSubscription() {
  {
    absl::MutexLock lock(&core_->subscriptions_mu_);
    core_->subscriptions_.erase(this);
  }
  app_->events.Detach(sink_.get());
  // The lease runs from the moment the stream ends.
  app_->last_activity_ns.store(absl::ToUnixNanos(core_->options_.clock->Now()),
                               std::memory_order_relaxed);
  core_->StoreCursor(*app_);
}

bool EventSubscription::Next(v1::Event* event) {
  uint64_t blocked_at = 0;
  if (app_->events.Next(sink_.get(), event, &blocked_at)) return true;
  if (blocked_at != 0) {
    // The next event waits for its journal entry; WhenDurable never runs
    // this on our thread, which may hold the stream's own lock.
    core_->journal_->WhenDurable(blocked_at, [sink = sink_]() { sink->OnEventsAvailable(); });
  }
  return false;
}

CallSessionCore::CallSessionCore(CoreOptions options, std::unique_ptr<SessionStore> store)
    : options_(std::move(options)),
      journal_(options_.journal),
      store_(store != nullptr ? std::move(store) : NewShardedMemoryStore(options_.shards)),
      tenants_(options_.tenants) {
  devices_.reserve(options_.num_devices);
  for (uint32_t id = 0; id < options_.num_devices; ++id) {
    devices_.push_back(std::make_unique<Device>(id));
  }
}

CallSessionCore::~CallSessionCore() = default;

// ---------------------------------------------------------------------------
// Lookups.

absl::StatusOr<std::shared_ptr<App>> CallSessionCore::Authenticate(absl::string_view token) const {
  uint8_t handle_bytes[8];
  std::array<uint8_t, 16> secret;
  if (token.empty()) {
    return AuthenticationFailed(AuthFailure::kMissingCredential, "missing app token");
  }
  if (token.size() != kTokenLength ||
      !ParseHex(token.substr(0, kTokenHandleDigits), handle_bytes, 8) ||
      !ParseHex(token.substr(kTokenHandleDigits), secret.data(), 16)) {
    return AuthenticationFailed(AuthFailure::kMalformedToken, "malformed app token");
  }
  uint64_t handle = 0;
  for (uint8_t byte : handle_bytes) handle = handle << 8 | byte;
  std::shared_ptr<App> app = store_->FindApp(handle);
  if (app == nullptr) return AuthenticationFailed(AuthFailure::kUnknownToken, "unknown app token");
  const Sha256Digest digest =
      Sha256(absl::string_view(reinterpret_cast<const char*>(secret.data()), secret.size()));
  if (!ConstantTimeEquals(app->secret_sha256.data(), digest.data(), digest.size())) {
    return AuthenticationFailed(AuthFailure::kUnknownToken, "unknown app token");
  }
  if (options_.app_ttl > absl::ZeroDuration()) {
    app->last_activity_ns.store(absl::ToUnixNanos(options_.clock->Now()),
                                std::memory_order_relaxed);
  }
  return app;
}

absl::Status CallSessionCore::AuthenticationFailed(AuthFailure why,
                                                   absl::string_view message) const {
  auth_failures_[static_cast<int>(why)].fetch_add(1, std::memory_order_relaxed);
  return Unauthenticated(message);
}

std::shared_ptr<const TenantDirectory> CallSessionCore::CurrentTenants() const {
  absl::ReaderMutexLock lock(&tenants_mu_);
  return tenants_;
}

absl::StatusOr<CallSessionCore::ProviderScope> CallSessionCore::AuthenticateProvider(
    const Credentials& provider) const {
  const std::string& expected = options_.provider_token;
  const absl::string_view token = provider.bearer;
  // The provider token first: the usual provider pays for nothing else.
  if (!expected.empty() && token.size() == expected.size() &&
      ConstantTimeEquals(reinterpret_cast<const uint8_t*>(token.data()),
                         reinterpret_cast<const uint8_t*>(expected.data()), expected.size())) {
    return ProviderScope{};
  }
  std::shared_ptr<const TenantDirectory> tenants = CurrentTenants();
  if (tenants != nullptr && (!token.empty() || !provider.identities.empty())) {
    AuthFailure failure;
    absl::StatusOr<TenantMatch> match = tenants->Identify(provider, &failure);
    if (match.ok() && match->tenant->is_provider()) {
      return ProviderScope{match->tenant, std::move(tenants)};
    }
  }
  if (token.empty() && provider.identities.empty()) {
    return AuthenticationFailed(AuthFailure::kMissingCredential, "missing provider credential");
  }
  return AuthenticationFailed(AuthFailure::kNotProvider,
                              "not a provider credential (the provider token, or a tenant's "
                              "with provider access)");
}

absl::StatusOr<Device*> CallSessionCore::FindDevice(uint32_t device_id) const {
  if (device_id >= devices_.size()) return NoSuchDevice(device_id);
  return devices_[device_id].get();
}

absl::Status CallSessionCore::NoSuchDevice(uint32_t device_id) const {
  if (options_.tenants == nullptr) {
    return TapiError(TapiErrorCode::kBadDeviceId,
                     absl::StrCat("device_id ", device_id, " is not below ", devices_.size()));
  }
  // With tenants the server's device count is nobody's business.
  return TapiError(TapiErrorCode::kBadDeviceId, absl::StrCat("no device ", device_id));
}

DeviceRights CallSessionCore::RightsLocked(const App& app, uint32_t device_id) {
  if (app.tenant_config == nullptr) return kAllRights;
  return app.tenant_config->RightsOn(device_id);
}

AppTenancy CallSessionCore::TenancyOf(std::shared_ptr<const Tenant> tenant) const {
  AppTenancy tenancy;
  tenancy.max_lines = options_.max_lines_per_app;
  tenancy.max_call_handles = options_.max_call_handles_per_app;
  if (tenant != nullptr) {
    tenancy.max_lines = tenant->quotas().max_lines_per_app.value_or(tenancy.max_lines);
    tenancy.max_call_handles =
        tenant->quotas().max_call_handles_per_app.value_or(tenancy.max_call_handles);
  }
  tenancy.config = std::move(tenant);
  return tenancy;
}

void CallSessionCore::SetTenantLocked(App& app, std::shared_ptr<const Tenant> tenant) {
  AppTenancy tenancy = TenancyOf(std::move(tenant));
  app.max_lines.store(tenancy.max_lines, std::memory_order_relaxed);
  app.max_call_handles.store(tenancy.max_call_handles, std::memory_order_relaxed);
  app.tenant_config = std::move(tenancy.config);
}

absl::StatusOr<std::shared_ptr<Line>> CallSessionCore::FindOwnLine(const App& app,
                                                                   uint64_t line_handle) const {
  std::shared_ptr<Line> line = line_handle == 0 ? nullptr : store_->FindLine(line_handle);
  if (line == nullptr || line->app.get() != &app) return InvalidLineHandle();
  return line;
}

absl::StatusOr<CallRef> CallSessionCore::FindCallOfHandle(uint64_t call_handle) const {
  CallRef call = call_handle == 0 ? nullptr : store_->FindCallHandle(call_handle);
  if (call == nullptr) return InvalidCallHandle();
  return call;
}

// ---------------------------------------------------------------------------
// Helpers that change calls and lines.

v1::Event CallSessionCore::NewEvent() const {
  v1::Event event;
  SetTimestamp(absl::ToUnixNanos(options_.clock->Now()), event.mutable_time());
  return event;
}

uint64_t CallSessionCore::AddHolderLocked(const CallRef& call, Line& line, CallPrivilege privilege,
                                          Change& change) {
  const uint64_t handle = store_->AddCallHandle(call);
  change.Issued(HandleKind::kCallHandle, handle);
  call->holders.push_back(Holder(handle, &line, privilege));
  {
    absl::MutexLock lock(&line.mu);
    line.call_handles.insert(handle);
  }
  call_handles_created_.fetch_add(1, std::memory_order_relaxed);
  return handle;
}

void CallSessionCore::RemoveHolderLocked(Call& call, size_t index, App& app) {
  ReleaseCallHandles(app, 1);
  store_->RemoveCallHandle(call.holders[index].handle);
  call.holders.erase(call.holders.begin() + index);
  call_handles_voided_.fetch_add(1, std::memory_order_relaxed);
}

void CallSessionCore::SetStateLocked(Call& call, CallState state, Change& change) {
  call.state = state;
  call.state_entry_time_ns = absl::ToUnixNanos(options_.clock->Now());
  if (state == v1::CALL_STATE_CONNECTED) call.connected = true;
  for (const Holder& holder : call.holders) {
    v1::Event event = NewEvent();
    v1::CallStateEvent* state_change = event.mutable_call_state();
    state_change->set_call_handle(holder.handle);
    state_change->set_call_state(state);
    change.PushEvent(*holder.app(), std::move(event));
  }
}

void CallSessionCore::PushNewCallLocked(const Call& call, const Holder& holder, Change& change) {
  v1::Event event = NewEvent();
  v1::AppNewCallEvent* new_call = event.mutable_app_new_call();
  new_call->set_line_handle(holder.line()->handle);
  new_call->set_call_handle(holder.handle);
  new_call->set_call_privilege(holder.privilege());
  new_call->set_call_id(call.id);
  change.PushEvent(*holder.app(), std::move(event));
}

void CallSessionCore::AddMonitorsLocked(const CallRef& call, Device& device, Change& change) {
  for (const auto& [order, monitor_line] : device.monitor_lines) {
    App& app = *monitor_line->app;
    if (HoldsLocked(*call, &app) || !ReserveCallHandles(app, 1)) continue;
    AddHolderLocked(call, *monitor_line, v1::CALL_PRIVILEGE_MONITOR, change);
    PushNewCallLocked(*call, call->holders.back(), change);
  }
}

bool CallSessionCore::ReserveCallHandles(App& app, uint64_t count) {
  const uint64_t limit = app.max_call_handles.load(std::memory_order_relaxed);
  uint64_t held = app.call_handle_count.load(std::memory_order_relaxed);
  do {
    if (limit != 0 && held + count > limit) return false;
  } while (
      !app.call_handle_count.compare_exchange_weak(held, held + count, std::memory_order_relaxed));
  return true;
}

void CallSessionCore::ReleaseCallHandles(App& app, uint64_t count) {
  app.call_handle_count.fetch_sub(count, std::memory_order_relaxed);
}

absl::Status CallSessionCore::QuotaExceeded(absl::string_view what) {
  quota_rejections_.fetch_add(1, std::memory_order_relaxed);
  return TapiError(TapiErrorCode::kResourceUnavail, what);
}

void CallSessionCore::FillCallInfoLocked(const Call& call, const Holder& holder,
                                         v1::CallInfo* info) const {
  info->set_line_handle(holder.line()->handle);
  info->set_line_device_id(call.device_id);
  info->set_call_id(call.id);
  info->set_origin(call.origin());
  const absl::string_view caller = call.caller_id();
  const absl::string_view called = call.called_id();
  info->set_caller_id(caller.data(), caller.size());
  info->set_called_id(called.data(), called.size());
  if (call.connected) {
    const absl::string_view connected = call.origin() == v1::CALL_ORIGIN_OUTBOUND ? called : caller;
    info->set_connected_id(connected.data(), connected.size());
  }
  info->set_num_owners(CountLocked(call, v1::CALL_PRIVILEGE_OWNER));
  info->set_num_monitors(CountLocked(call, v1::CALL_PRIVILEGE_MONITOR));
  SetTimestamp(call.create_time_ns(), info->mutable_create_time());
}

void CallSessionCore::FillCallStatusLocked(const Call& call, const Holder& holder,
                                           v1::CallStatus* status) const {
  status->set_call_state(call.state);
  status->set_call_privilege(holder.privilege());
  SetTimestamp(call.state_entry_time_ns, status->mutable_state_entry_time());
}

bool CallSessionCore::MarkFreedIfDoneLocked(Call& call) {
  if (call.freed || call.state != v1::CALL_STATE_IDLE || !call.holders.empty()) {
    return false;
  }
  call.freed = true;
  return true;
}

void CallSessionCore::FreeCall(const Call& call) {
  Device& device = *devices_[call.device_id];
  {
    absl::MutexLock lock(&device.mu);
    device.calls.erase(const_cast<Call*>(&call));
    ShrinkIfSparse(device.calls);
  }
  store_->RemoveCall(call.id);
  calls_freed_.fetch_add(1, std::memory_order_relaxed);
}

bool CallSessionCore::DetachLineLocked(Line& line, std::vector<uint64_t>* handles) {
  if (!line.open) return false;
  line.open = false;
  line.device->owner_lines.erase(line.open_order);
  line.device->monitor_lines.erase(line.open_order);
  {
    absl::MutexLock lock(&line.mu);
    handles->assign(line.call_handles.begin(), line.call_handles.end());
    line.call_handles.clear();
  }
  {
    absl::MutexLock lock(&line.app->mu);
    line.app->line_handles.erase(line.handle);
    ++line.app->lines_closing;
  }
  store_->RemoveLine(line.handle);
  // Last: this may hold the only other reference to the line.
  line.device->lines.erase(line.open_order);
  return true;
}

void CallSessionCore::VoidHandlesOfClosedLine(const std::vector<uint64_t>& handles,
                                              EventPublisher& events) {
  for (uint64_t handle : handles) {
    CallRef call = store_->FindCallHandle(handle);
    if (call == nullptr) continue;  // deallocated meanwhile
    bool free_call = false;
    {
      absl::MutexLock lock(&call->mu);
      auto it = std::find_if(call->holders.begin(), call->holders.end(),
                             [handle](const Holder& h) { return h.handle == handle; });
      if (it == call->holders.end()) continue;
      Change change(*this, events);
      const bool drop = IsSoleOwnerLocked(*call, *it) && call->state != v1::CALL_STATE_IDLE;
      RemoveHolderLocked(*call, it - call->holders.begin(), *it->app());
      if (drop) {
        SetStateLocked(*call, v1::CALL_STATE_IDLE, change);
        calls_dropped_by_line_close_.fetch_add(1, std::memory_order_relaxed);
      }
      free_call = MarkFreedIfDoneLocked(*call);
      if (free_call) {
        change.DeleteCall(call->id);
      } else {
        change.PutCall(*call);
      }
      change.Commit();
    }
    if (free_call) FreeCall(*call);
  }
}

void CallSessionCore::FinishClosingLine(Line& line, const std::vector<uint64_t>& handles,
                                        bool forced, EventPublisher& events) {
  VoidHandlesOfClosedLine(handles, events);
  Change change(*this, events);
  change.DeleteLine(line.handle);
  if (forced) {
    v1::Event event = NewEvent();
    event.mutable_line_close()->set_line_handle(line.handle);
    change.PushEvent(*line.app, std::move(event));
  }
  change.Commit();
  absl::MutexLock lock(&line.app->mu);
  --line.app->lines_closing;
}

bool CallSessionCore::CloseLine(Line& line, bool forced, absl::string_view why,
                                EventPublisher& events) {
  std::vector<uint64_t> handles;
  {
    absl::MutexLock lock(&line.device->mu);
    if (!DetachLineLocked(line, &handles)) return false;
  }
  FinishClosingLine(line, handles, forced, events);
  AuditLineClosed(line, why);
  return true;
}

// ---------------------------------------------------------------------------
// CallSessionService.

absl::Status CallSessionCore::Initialize(const Credentials& credentials,
                                         const v1::InitializeRequest& request,
                                         v1::InitializeResponse* response) {
  EventPublisher events(journal_);
  uint64_t handle = 0;
  std::shared_ptr<const Tenant> tenant;
  const std::string& name = request.app_name();
  {
    // Held from reading the tenants in force to the app's registration:
    // SetTenants replaces them first and then walks the apps (see tenants_).
    absl::MutexLock lock(&apps_mu_);
    std::shared_ptr<const TenantDirectory> tenants = CurrentTenants();
    TenantMatch match;
    if (tenants != nullptr) {
      AuthFailure failure;
      absl::StatusOr<TenantMatch> identified = tenants->Identify(credentials, &failure);
      if (!identified.ok()) {
        auth_failures_[static_cast<int>(failure)].fetch_add(1, std::memory_order_relaxed);
        return identified.status();
      }
      match = *std::move(identified);
      if (match.tenant->grants().empty()) {
        return TapiError(TapiErrorCode::kOperationUnavail,
                         absl::StrCat("tenant \"", match.tenant->name(),
                                      "\" is granted no device: it may not register applications"));
      }
    }
    if (name.size() > kMaxAppNameBytes || !IsPrintableAscii(name)) {
      return TapiError(
          TapiErrorCode::kInvalAppName,
          absl::StrCat("app_name must be at most ", kMaxAppNameBytes, " printable ASCII bytes"));
    }
    if (options_.max_apps != 0 && apps_.size() >= options_.max_apps) {
      return QuotaExceeded(absl::StrCat("the server has its maximum of ", options_.max_apps,
                                        " applications (--max_apps)"));
    }
    const std::string tenant_name = match.tenant != nullptr ? match.tenant->name() : "";
    if (match.tenant != nullptr && match.tenant->quotas().max_apps.value_or(0) != 0) {
      const uint64_t limit = *match.tenant->quotas().max_apps;
      auto registered = tenant_apps_.find(tenant_name);
      if (registered != tenant_apps_.end() && registered->second >= limit) {
        return QuotaExceeded(absl::StrCat("tenant \"", tenant_name, "\" has its maximum of ", limit,
                                          " applications (max_apps)"));
      }
    }
    if (match.tenant != nullptr) tenant = std::shared_ptr<const Tenant>(tenants, match.tenant);
    CS_ASSIGN_OR_RETURN(const auto secret, RandomSecret());
    const Sha256Digest secret_sha256 =
        Sha256(absl::string_view(reinterpret_cast<const char*>(secret.data()), secret.size()));
    AppTenancy tenancy = TenancyOf(tenant);
    tenancy.tenant = tenant_name;
    tenancy.credential = std::move(match.credential);
    std::shared_ptr<App> app;
    handle = store_->AddApp([&](uint64_t handle) {
      app = std::make_shared<App>(handle, name, secret_sha256, std::move(tenancy),
                                  options_.event_buffer, journal_);
      app->last_activity_ns.store(absl::ToUnixNanos(options_.clock->Now()),
                                  std::memory_order_relaxed);
      return app;
    });
    // Under apps_mu_: nothing can shut the app down (and journal its
    // removal) before its record is appended.
    Change change(*this, events);
    change.Issued(HandleKind::kApp, handle);
    change.PutApp(*app);
    change.Commit();
    apps_.emplace(handle, std::move(app));
    ++tenant_apps_[tenant_name];
    response->set_app_token(TokenOf(handle, secret));
  }
  response->set_app_handle(handle);
  if (tenant == nullptr) {
    response->set_num_devices(options_.num_devices);
    v1::DeviceAccess* all = response->add_devices();
    all->set_first_device_id(0);
    all->set_last_device_id(options_.num_devices - 1);
    all->set_place_calls(true);
    all->set_own(true);
    all->set_monitor(true);
  } else {
    response->set_num_devices(tenant->device_limit());
    for (const DeviceGrant& grant : tenant->grants()) {
      v1::DeviceAccess* access = response->add_devices();
      access->set_first_device_id(grant.first);
      access->set_last_device_id(grant.last);
      access->set_place_calls((grant.rights & kRightDial) != 0);
      access->set_own((grant.rights & kRightOwn) != 0);
      access->set_monitor((grant.rights & kRightMonitor) != 0);
    }
  }
  SetDuration(options_.app_ttl, response->mutable_app_ttl());
  Audit("app_initialized", {{"tenant", tenant != nullptr ? tenant->name() : std::string()},
                            {"app_handle", handle},
                            {"app_name", name}});
  return absl::OkStatus();
}

absl::Status CallSessionCore::Shutdown(absl::string_view token, const v1::ShutdownRequest& request,
                                       v1::ShutdownResponse* response) {
  CS_ASSIGN_OR_RETURN(std::shared_ptr<App> app, Authenticate(token));
  if (!ShutdownApp(app, false, "shutdown")) return Unauthenticated("unknown app token");
  return absl::OkStatus();
}

bool CallSessionCore::LeaseExpiredLocked(const App& app, absl::Time now) const {
  if (options_.app_ttl <= absl::ZeroDuration() || app.events.has_consumer()) return false;
  const absl::Time last = absl::FromUnixNanos(app.last_activity_ns.load(std::memory_order_relaxed));
  return now - last >= options_.app_ttl;
}

bool CallSessionCore::ShutdownApp(const std::shared_ptr<App>& app, bool only_if_expired,
                                  absl::string_view why) {
  {
    // Destroyed last: wakes the other apps' streams, then ends this one.
    EventPublisher events(journal_);
    std::vector<uint64_t> line_handles;
    {
      absl::MutexLock lock(&app->mu);
      if (app->shut_down) return false;
      if (only_if_expired && !LeaseExpiredLocked(*app, options_.clock->Now())) return false;
      app->shut_down = true;
      line_handles.assign(app->line_handles.begin(), app->line_handles.end());
    }
    store_->RemoveApp(app->handle);
    {
      absl::MutexLock lock(&apps_mu_);
      apps_.erase(app->handle);
      auto registered = tenant_apps_.find(app->tenant);
      if (registered != tenant_apps_.end() && --registered->second == 0) {
        tenant_apps_.erase(registered);
      }
    }
    for (uint64_t line_handle : line_handles) {
      if (std::shared_ptr<Line> line = store_->FindLine(line_handle)) {
        CloseLine(*line, false, why, events);
      }
    }
    // Last in the journal, so every prefix holds the app with its lines:
    // after the lines this thread closed, and after those another closer
    // (LineClose, ForceLineClose) detached and is still finishing.
    app->mu.LockWhen(absl::Condition(app.get(), &App::NoLinesClosing));
    app->mu.Unlock();
    Change change(*this, events);
    change.RemoveApp(*app);
    change.Commit();
    events_lost_by_departed_apps_.fetch_add(app->events.lost(), std::memory_order_relaxed);
  }
  Audit("app_shut_down", {{"tenant", app->tenant},
                          {"app_handle", app->handle},
                          {"app_name", app->name},
                          {"reason", why}});
  return true;
}

size_t CallSessionCore::ExpireIdleApps() {
  if (options_.app_ttl <= absl::ZeroDuration()) return 0;
  const int64_t deadline_ns = absl::ToUnixNanos(options_.clock->Now() - options_.app_ttl);
  std::vector<std::shared_ptr<App>> candidates;
  {
    absl::MutexLock lock(&apps_mu_);
    for (const auto& [handle, app] : apps_) {
      if (app->last_activity_ns.load(std::memory_order_relaxed) <= deadline_ns) {
        candidates.push_back(app);
      }
    }
  }
  size_t expired = 0;
  for (const std::shared_ptr<App>& app : candidates) {
    if (ShutdownApp(app, true, "lease_expired")) ++expired;
  }
  apps_expired_.fetch_add(expired, std::memory_order_relaxed);
  return expired;
}

absl::Status CallSessionCore::LineOpen(absl::string_view token, const v1::LineOpenRequest& request,
                                       v1::LineOpenResponse* response) {
  CS_ASSIGN_OR_RETURN(std::shared_ptr<App> app, Authenticate(token));
  CS_ASSIGN_OR_RETURN(Device* const device, FindDevice(request.device_id()));
  {
    // First: to an app, a device it may not open is one that does not exist.
    absl::MutexLock lock(&app->mu);
    if (RightsLocked(*app, device->id) == 0) return NoSuchDevice(device->id);
  }
  bool owner = false;
  bool monitor = false;
  for (int privilege : request.privileges()) {
    switch (privilege) {
      case v1::CALL_PRIVILEGE_OWNER:
        owner = true;
        break;
      case v1::CALL_PRIVILEGE_MONITOR:
        monitor = true;
        break;
      default:
        return TapiError(TapiErrorCode::kInvalPrivSelect,
                         absl::StrCat("unknown privilege ", privilege));
    }
  }

  const DeviceRights needed =
      owner || monitor ? (owner ? kRightOwn : 0) | (monitor ? kRightMonitor : 0) : kRightDial;
  EventPublisher events(journal_);
  uint64_t handle = 0;
  DeviceRights rights = 0;
  {
    absl::MutexLock lock(&device->mu);
    std::shared_ptr<Line> line;
    {
      // Checked under the app's lock, where SetTenants changes its tenant:
      // a line is either checked against the new grants or seen by the
      // SetTenants that takes them away.
      absl::MutexLock app_lock(&app->mu);
      if (app->shut_down) return Unauthenticated("unknown app token");
      rights = RightsLocked(*app, device->id);
      if (rights == 0) return NoSuchDevice(device->id);
      if ((needed & ~rights) != 0) {
        return TapiError(TapiErrorCode::kOperationUnavail,
                         absl::StrCat("the application's tenant may not open device ", device->id,
                                      " with ", PrivilegesText(owner, monitor)));
      }
      const uint64_t max_lines = app->max_lines.load(std::memory_order_relaxed);
      if (max_lines != 0 && app->line_handles.size() >= max_lines) {
        return QuotaExceeded(absl::StrCat("the application has its maximum of ", max_lines,
                                          " lines open (max_lines_per_app)"));
      }
      const uint64_t open_order = device->next_open_order++;
      handle = store_->AddLine([&](uint64_t handle) {
        line = std::make_shared<Line>(handle, app, device, owner, monitor, open_order, rights);
        return line;
      });
      app->line_handles.insert(handle);
    }
    const uint64_t open_order = line->open_order;
    device->lines.emplace(open_order, line);
    if (owner) device->owner_lines.emplace(open_order, line.get());
    if (monitor) device->monitor_lines.emplace(open_order, line.get());
    Change change(*this, events);
    change.Issued(HandleKind::kLine, handle);
    change.PutLine(*line);
    change.Commit();
  }
  response->set_line_handle(handle);
  Audit("line_opened", {{"tenant", app->tenant},
                        {"app_handle", app->handle},
                        {"line_handle", handle},
                        {"device_id", device->id},
                        {"owner", owner},
                        {"monitor", monitor}});
  return absl::OkStatus();
}

absl::Status CallSessionCore::LineClose(absl::string_view token,
                                        const v1::LineCloseRequest& request,
                                        v1::LineCloseResponse* response) {
  CS_ASSIGN_OR_RETURN(std::shared_ptr<App> app, Authenticate(token));
  EventPublisher events(journal_);
  CS_ASSIGN_OR_RETURN(std::shared_ptr<Line> line, FindOwnLine(*app, request.line_handle()));
  if (!CloseLine(*line, false, "line_close", events)) return InvalidLineHandle();
  return absl::OkStatus();
}

absl::Status CallSessionCore::MakeCall(absl::string_view token, const v1::MakeCallRequest& request,
                                       v1::MakeCallResponse* response) {
  CS_ASSIGN_OR_RETURN(std::shared_ptr<App> app, Authenticate(token));
  const std::string& request_id = request.request_id();
  if (request_id.size() > kMaxRequestIdBytes) {
    return TapiError(TapiErrorCode::kInvalParam,
                     absl::StrCat("request_id is over ", kMaxRequestIdBytes, " bytes"));
  }
  EventPublisher events(journal_);
  if (request_id.empty() || options_.request_id_cache == 0) {
    return PlaceOutboundCall(*app, request.line_handle(), request.dest_address(),
                             RequestIdUpdate{nullptr, absl::InfinitePast(), nullptr}, response,
                             events);
  }

  // Held across the call's creation, so that concurrent retries of one
  // request_id create one call.
  absl::MutexLock lock(&app->request_mu);
  // Keys are in answer order, so the expired ones are at the front.
  const absl::Time now = options_.clock->Now();
  {
    Change ageing(*this, events);
    while (!app->request_order.empty()) {
      auto oldest = app->recent_requests.find(app->request_order.front());
      if (now - oldest->second.answered < options_.request_id_ttl) break;
      ageing.DeleteRequest(app->handle, oldest->first);
      app->recent_requests.erase(oldest);
      app->request_order.pop_front();
    }
    ageing.Commit();
  }
  auto seen = app->recent_requests.find(request_id);
  if (seen != app->recent_requests.end()) {
    const IdempotentMakeCall& first = seen->second;
    if (first.line_handle != request.line_handle() ||
        first.dest_address != request.dest_address()) {
      return TapiError(TapiErrorCode::kInvalParam,
                       "request_id was already used with other parameters");
    }
    response->set_call_handle(first.call_handle);
    response->set_call_id(first.call_id);
    return absl::OkStatus();
  }
  // The oldest id this one pushes out of the cache: deleted in the same
  // journal entry as the new one is written.
  const std::string* evicted = app->request_order.size() >= options_.request_id_cache
                                   ? &app->request_order.front()
                                   : nullptr;
  CS_RETURN_IF_ERROR(PlaceOutboundCall(*app, request.line_handle(), request.dest_address(),
                                       RequestIdUpdate{&request_id, now, evicted}, response,
                                       events));
  if (evicted != nullptr) {
    app->recent_requests.erase(*evicted);
    app->request_order.pop_front();
  }
  app->recent_requests.emplace(
      request_id, IdempotentMakeCall{request.line_handle(), request.dest_address(),
                                     response->call_handle(), response->call_id(), now});
  app->request_order.push_back(request_id);
  return absl::OkStatus();
}

absl::Status CallSessionCore::PlaceOutboundCall(App& app, uint64_t line_handle,
                                                const std::string& dest_address,
                                                const RequestIdUpdate& request_id,
                                                v1::MakeCallResponse* response,
                                                EventPublisher& events) {
  CS_RETURN_IF_ERROR(CheckAddress("dest_address", dest_address, false));
  CS_ASSIGN_OR_RETURN(std::shared_ptr<Line> line, FindOwnLine(app, line_handle));
  Device& device = *line->device;
  if ((line->rights & kRightDial) == 0) {
    return TapiError(
        TapiErrorCode::kOperationUnavail,
        absl::StrCat("the application's tenant may not place calls on device ", device.id));
  }

  if (!ReserveCallHandles(app, 1)) {
    return QuotaExceeded(absl::StrCat("the application holds its maximum of ",
                                      app.max_call_handles.load(std::memory_order_relaxed),
                                      " call handles (max_call_handles_per_app)"));
  }
  absl::MutexLock device_lock(&device.mu);
  line->device->mu.AssertHeld();  // the same mutex, for the analysis
  if (!line->open) {
    ReleaseCallHandles(app, 1);
    return InvalidLineHandle();
  }
  CallRef call;
  const uint64_t call_id = store_->AddCall([&](uint64_t id) {
    call = CallRef::Make(id, device.id, v1::CALL_ORIGIN_OUTBOUND, "", dest_address,
                         options_.clock->Now(), v1::CALL_STATE_DIALING);
    return call;
  });
  device.calls.insert(call.get());
  calls_created_.fetch_add(1, std::memory_order_relaxed);

  absl::MutexLock call_lock(&call->mu);
  Change change(*this, events);
  change.Issued(HandleKind::kCall, call_id);
  const uint64_t call_handle = AddHolderLocked(call, *line, v1::CALL_PRIVILEGE_OWNER, change);
  AddMonitorsLocked(call, device, change);
  SetStateLocked(*call, v1::CALL_STATE_DIALING, change);
  if (request_id.request_id != nullptr) {
    change.PutRequest(
        app.handle, *request_id.request_id,
        IdempotentMakeCall{line_handle, dest_address, call_handle, call_id, request_id.answered});
    if (request_id.evicted != nullptr) change.DeleteRequest(app.handle, *request_id.evicted);
  }
  change.PutCall(*call);
  change.Commit();

  response->set_call_handle(call_handle);
  response->set_call_id(call_id);
  return absl::OkStatus();
}

absl::Status CallSessionCore::Answer(absl::string_view token, const v1::AnswerRequest& request,
                                     v1::AnswerResponse* response) {
  CS_ASSIGN_OR_RETURN(std::shared_ptr<App> app, Authenticate(token));
  EventPublisher events(journal_);
  CS_ASSIGN_OR_RETURN(CallRef call, FindCallOfHandle(request.call_handle()));
  absl::MutexLock lock(&call->mu);
  const Holder* holder = FindHolderLocked(*call, request.call_handle(), app.get());
  if (holder == nullptr) return InvalidCallHandle();
  if (holder->privilege() != v1::CALL_PRIVILEGE_OWNER) {
    return TapiError(TapiErrorCode::kNotOwner, "Answer needs an owner handle");
  }
  if (call->state != v1::CALL_STATE_OFFERING && call->state != v1::CALL_STATE_ACCEPTED) {
    return TapiError(TapiErrorCode::kInvalCallState,
                     absl::StrCat("cannot answer a call in ", v1::CallState_Name(call->state)));
  }
  Change change(*this, events);
  SetStateLocked(*call, v1::CALL_STATE_CONNECTED, change);
  change.PutCall(*call);
  change.Commit();
  return absl::OkStatus();
}

absl::Status CallSessionCore::Drop(absl::string_view token, const v1::DropRequest& request,
                                   v1::DropResponse* response) {
  CS_ASSIGN_OR_RETURN(std::shared_ptr<App> app, Authenticate(token));
  EventPublisher events(journal_);
  CS_ASSIGN_OR_RETURN(CallRef call, FindCallOfHandle(request.call_handle()));
  absl::MutexLock lock(&call->mu);
  const Holder* holder = FindHolderLocked(*call, request.call_handle(), app.get());
  if (holder == nullptr) return InvalidCallHandle();
  if (holder->privilege() != v1::CALL_PRIVILEGE_OWNER) {
    return TapiError(TapiErrorCode::kNotOwner, "Drop needs an owner handle");
  }
  if (call->state == v1::CALL_STATE_IDLE) {
    return TapiError(TapiErrorCode::kInvalCallState, "the call is already IDLE");
  }
  Change change(*this, events);
  SetStateLocked(*call, v1::CALL_STATE_IDLE, change);
  change.PutCall(*call);
  change.Commit();
  return absl::OkStatus();
}

absl::Status CallSessionCore::GetCallInfo(absl::string_view token,
                                          const v1::GetCallInfoRequest& request,
                                          v1::GetCallInfoResponse* response) {
  CS_ASSIGN_OR_RETURN(std::shared_ptr<App> app, Authenticate(token));
  CS_ASSIGN_OR_RETURN(CallRef call, FindCallOfHandle(request.call_handle()));
  absl::ReaderMutexLock lock(&call->mu);
  const Holder* holder = FindHolderLocked(*call, request.call_handle(), app.get());
  if (holder == nullptr) return InvalidCallHandle();
  FillCallInfoLocked(*call, *holder, response->mutable_info());
  return absl::OkStatus();
}

absl::Status CallSessionCore::GetCallStatus(absl::string_view token,
                                            const v1::GetCallStatusRequest& request,
                                            v1::GetCallStatusResponse* response) {
  CS_ASSIGN_OR_RETURN(std::shared_ptr<App> app, Authenticate(token));
  CS_ASSIGN_OR_RETURN(CallRef call, FindCallOfHandle(request.call_handle()));
  absl::ReaderMutexLock lock(&call->mu);
  const Holder* holder = FindHolderLocked(*call, request.call_handle(), app.get());
  if (holder == nullptr) return InvalidCallHandle();
  FillCallStatusLocked(*call, *holder, response->mutable_status());
  return absl::OkStatus();
}

absl::Status CallSessionCore::DeallocateCall(absl::string_view token,
                                             const v1::DeallocateCallRequest& request,
                                             v1::DeallocateCallResponse* response) {
  CS_ASSIGN_OR_RETURN(std::shared_ptr<App> app, Authenticate(token));
  CS_ASSIGN_OR_RETURN(CallRef call, FindCallOfHandle(request.call_handle()));
  EventPublisher events(journal_);
  bool free_call = false;
  {
    absl::MutexLock lock(&call->mu);
    Holder* holder = FindHolderLocked(*call, request.call_handle(), app.get());
    if (holder == nullptr) return InvalidCallHandle();
    if (IsSoleOwnerLocked(*call, *holder) && call->state != v1::CALL_STATE_IDLE) {
      return TapiError(TapiErrorCode::kInvalCallState,
                       "the sole owner of a call that is not IDLE must drop it "
                       "before deallocating");
    }
    // Erasing the handle from its line is the last use of the line: until
    // then a closer of the line either has not snapshotted its handles (and
    // will include this one) or has, and then finds this handle in the store
    // and waits for the call's lock; so the line is alive. After it, a closer
    // may skip this handle and free the line at once.
    {
      Line& line = *holder->line();
      absl::MutexLock line_lock(&line.mu);
      line.call_handles.erase(request.call_handle());
      ShrinkIfSparse(line.call_handles);
    }
    RemoveHolderLocked(*call, holder - call->holders.data(), *app);
    free_call = MarkFreedIfDoneLocked(*call);
    Change change(*this, events);
    if (free_call) {
      change.DeleteCall(call->id);
    } else {
      change.PutCall(*call);
    }
    change.Commit();
  }
  if (free_call) FreeCall(*call);
  call_handles_deallocated_.fetch_add(1, std::memory_order_relaxed);
  return absl::OkStatus();
}

absl::Status CallSessionCore::GetNewCalls(absl::string_view token,
                                          const v1::GetNewCallsRequest& request,
                                          v1::GetNewCallsResponse* response) {
  CS_ASSIGN_OR_RETURN(std::shared_ptr<App> app, Authenticate(token));
  CS_ASSIGN_OR_RETURN(std::shared_ptr<Line> line, FindOwnLine(*app, request.line_handle()));
  Device& device = *line->device;
  if ((line->rights & kRightMonitor) == 0) {
    return TapiError(TapiErrorCode::kOperationUnavail,
                     absl::StrCat("the application's tenant may not monitor device ", device.id));
  }
  EventPublisher events(journal_);
  absl::MutexLock device_lock(&device.mu);
  line->device->mu.AssertHeld();  // the same mutex, for the analysis
  if (!line->open) return InvalidLineHandle();
  // Two passes, so that a request past the quota issues nothing. Calls are
  // only added under the device lock, which is held throughout; a call can
  // only leave the candidates (go IDLE, or gain a handle of this app through
  // a concurrent GetNewCalls on another of its lines) in between.
  std::vector<CallRef> candidates;
  for (const Call* listed : device.calls) {
    // Every call in device.calls is still in the store: FreeCall removes
    // it from the device before the store.
    CallRef call = store_->FindCall(listed->id);
    if (call == nullptr) continue;
    absl::ReaderMutexLock call_lock(&call->mu);
    if (call->freed || call->state == v1::CALL_STATE_IDLE || HoldsLocked(*call, app.get())) {
      continue;
    }
    candidates.push_back(std::move(call));
  }
  if (!ReserveCallHandles(*app, candidates.size())) {
    return QuotaExceeded(absl::StrCat(candidates.size(),
                                      " new call handles would take the application past its "
                                      "maximum of ",
                                      app->max_call_handles.load(std::memory_order_relaxed),
                                      " (max_call_handles_per_app)"));
  }
  size_t issued = 0;
  for (const CallRef& call : candidates) {
    absl::MutexLock call_lock(&call->mu);
    if (call->freed || call->state == v1::CALL_STATE_IDLE || HoldsLocked(*call, app.get())) {
      continue;
    }
    Change change(*this, events);
    response->add_call_handles(AddHolderLocked(call, *line, v1::CALL_PRIVILEGE_MONITOR, change));
    change.PutCall(*call);
    change.Commit();
    ++issued;
  }
  ReleaseCallHandles(*app, candidates.size() - issued);
  return absl::OkStatus();
}

absl::Status CallSessionCore::ListCalls(absl::string_view token,
                                        const v1::ListCallsRequest& request,
                                        v1::ListCallsResponse* response) {
  constexpr uint32_t kDefaultPageSize = 1000;
  constexpr uint32_t kMaxPageSize = 10000;
  CS_ASSIGN_OR_RETURN(std::shared_ptr<App> app, Authenticate(token));
  uint64_t after = 0;
  if (!request.page_token().empty() &&
      (!absl::SimpleAtoi(request.page_token(), &after) || after == 0)) {
    return TapiError(TapiErrorCode::kInvalParam, "page_token is not one ListCalls returned");
  }
  const size_t page_size = request.page_size() == 0
                               ? kDefaultPageSize
                               : std::min<uint32_t>(request.page_size(), kMaxPageSize);
  // Read before the calls: every change that raised an earlier event is
  // already visible to the reads below.
  // The first event not yet durable: what a crash could take back is
  // replayed rather than skipped.
  response->set_resume_sequence(app->events.first_undurable_sequence());

  std::vector<uint64_t> line_handles;
  {
    absl::MutexLock lock(&app->mu);
    line_handles.assign(app->line_handles.begin(), app->line_handles.end());
  }
  std::vector<uint64_t> handles;
  for (uint64_t line_handle : line_handles) {
    std::shared_ptr<Line> line = store_->FindLine(line_handle);
    if (line == nullptr) continue;
    absl::MutexLock lock(&line->mu);
    for (uint64_t handle : line->call_handles) {
      if (handle > after) handles.push_back(handle);
    }
  }
  const bool more = handles.size() > page_size;
  if (more) {
    std::nth_element(handles.begin(), handles.begin() + page_size, handles.end());
    handles.resize(page_size);
  }
  std::sort(handles.begin(), handles.end());
  for (uint64_t handle : handles) {
    CallRef call = store_->FindCallHandle(handle);
    if (call == nullptr) continue;  // voided meanwhile
    absl::ReaderMutexLock lock(&call->mu);
    const Holder* holder = FindHolderLocked(*call, handle, app.get());
    if (holder == nullptr) continue;
    v1::CallHandleEntry* entry = response->add_calls();
    entry->set_call_handle(handle);
    FillCallInfoLocked(*call, *holder, entry->mutable_info());
    FillCallStatusLocked(*call, *holder, entry->mutable_status());
  }
  if (more) response->set_next_page_token(absl::StrCat(handles.back()));
  return absl::OkStatus();
}

absl::Status CallSessionCore::KeepAlive(absl::string_view token,
                                        const v1::KeepAliveRequest& request,
                                        v1::KeepAliveResponse* response) {
  CS_ASSIGN_OR_RETURN(std::shared_ptr<App> app, Authenticate(token));
  SetDuration(options_.app_ttl, response->mutable_app_ttl());
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<EventSubscription>> CallSessionCore::WatchEvents(
    absl::string_view token, const v1::WatchEventsRequest& request,
    std::shared_ptr<EventSink> sink) {
  CS_ASSIGN_OR_RETURN(std::shared_ptr<App> app, Authenticate(token));
  CS_ASSIGN_OR_RETURN(std::shared_ptr<EventSink> previous,
                      app->events.Attach(sink, request.from_sequence()));
  if (previous == sink) return Unauthenticated("unknown app token");
  if (previous != nullptr) {
    previous->OnSubscriptionEnded(
        absl::AbortedError("replaced by a newer WatchEvents stream of the same app"));
  }
  return std::make_unique<EventSubscription>(this, std::move(app), std::move(sink));
}

void CallSessionCore::EndAllSubscriptions(const absl::Status& why) {
  std::vector<std::pair<std::shared_ptr<App>, std::shared_ptr<EventSink>>> ends;
  {
    absl::MutexLock lock(&subscriptions_mu_);
    for (const EventSubscription* subscription : subscriptions_) {
      ends.emplace_back(subscription->app_, subscription->sink_);
    }
  }
  for (auto& [app, sink] : ends) {
    app->events.Detach(sink.get());
    sink->OnSubscriptionEnded(why);
  }
}

// ---------------------------------------------------------------------------
// ProviderService.

absl::Status CallSessionCore::OfferCall(const Credentials& provider,
                                        const v1::OfferCallRequest& request,
                                        v1::OfferCallResponse* response) {
  CS_ASSIGN_OR_RETURN(const ProviderScope scope, AuthenticateProvider(provider));
  if (!scope.Covers(request.device_id())) return NoSuchDevice(request.device_id());
  CS_ASSIGN_OR_RETURN(Device* const device, FindDevice(request.device_id()));
  CS_RETURN_IF_ERROR(CheckAddress("caller_id", request.caller_id(), true));
  CS_RETURN_IF_ERROR(CheckAddress("called_id", request.called_id(), true));
  EventPublisher events(journal_);

  absl::MutexLock device_lock(&device->mu);
  CallRef call;
  const uint64_t call_id = store_->AddCall([&](uint64_t id) {
    call = CallRef::Make(id, device->id, v1::CALL_ORIGIN_INBOUND, request.caller_id(),
                         request.called_id(), options_.clock->Now(), v1::CALL_STATE_OFFERING);
    return call;
  });
  device->calls.insert(call.get());
  calls_created_.fetch_add(1, std::memory_order_relaxed);

  absl::MutexLock call_lock(&call->mu);
  Change change(*this, events);
  change.Issued(HandleKind::kCall, call_id);
  // The earliest OWNER line whose app has room for another handle.
  for (const auto& [order, owner_line] : device->owner_lines) {
    if (!ReserveCallHandles(*owner_line->app, 1)) continue;
    AddHolderLocked(call, *owner_line, v1::CALL_PRIVILEGE_OWNER, change);
    PushNewCallLocked(*call, call->holders.back(), change);
    break;
  }
  AddMonitorsLocked(call, *device, change);
  SetStateLocked(*call, v1::CALL_STATE_OFFERING, change);
  change.PutCall(*call);
  change.Commit();
  response->set_call_id(call_id);
  return absl::OkStatus();
}

absl::Status CallSessionCore::SetCallState(const Credentials& provider,
                                           const v1::SetCallStateRequest& request,
                                           v1::SetCallStateResponse* response) {
  CS_ASSIGN_OR_RETURN(const ProviderScope scope, AuthenticateProvider(provider));
  const CallState state = request.call_state();
  if (!v1::CallState_IsValid(state) || state == v1::CALL_STATE_UNSPECIFIED) {
    return TapiError(TapiErrorCode::kInvalParam,
                     absl::StrCat("unknown call_state ", static_cast<int>(state)));
  }
  EventPublisher events(journal_);
  CallRef call = request.call_id() == 0 ? nullptr : store_->FindCall(request.call_id());
  // A call on a device the provider does not serve is no call of its.
  if (call == nullptr || !scope.Covers(call->device_id)) {
    return TapiError(TapiErrorCode::kInvalCallHandle, "no such call_id");
  }
  bool free_call = false;
  {
    absl::MutexLock lock(&call->mu);
    if (call->freed) {
      return TapiError(TapiErrorCode::kInvalCallHandle, "no such call_id");
    }
    if (call->state == v1::CALL_STATE_IDLE) {
      return TapiError(TapiErrorCode::kInvalCallState, "the call is IDLE; nothing leaves IDLE");
    }
    if (call->state == state) return absl::OkStatus();
    Change change(*this, events);
    SetStateLocked(*call, state, change);
    free_call = MarkFreedIfDoneLocked(*call);
    if (free_call) {
      change.DeleteCall(call->id);
    } else {
      change.PutCall(*call);
    }
    change.Commit();
  }
  if (free_call) FreeCall(*call);
  return absl::OkStatus();
}

absl::Status CallSessionCore::ForceLineClose(const Credentials& provider,
                                             const v1::ForceLineCloseRequest& request,
                                             v1::ForceLineCloseResponse* response) {
  CS_ASSIGN_OR_RETURN(const ProviderScope scope, AuthenticateProvider(provider));
  if (!scope.Covers(request.device_id())) return NoSuchDevice(request.device_id());
  CS_ASSIGN_OR_RETURN(Device* const device, FindDevice(request.device_id()));
  EventPublisher events(journal_);
  std::vector<std::pair<std::shared_ptr<Line>, std::vector<uint64_t>>> closed;
  {
    absl::MutexLock lock(&device->mu);
    while (!device->lines.empty()) {
      std::shared_ptr<Line> line = device->lines.begin()->second;
      line->device->mu.AssertHeld();  // the same mutex, for the analysis
      std::vector<uint64_t> handles;
      DetachLineLocked(*line, &handles);
      closed.emplace_back(std::move(line), std::move(handles));
    }
  }
  for (auto& [line, handles] : closed) {
    FinishClosingLine(*line, handles, true, events);
    forced_line_closes_.fetch_add(1, std::memory_order_relaxed);
    AuditLineClosed(*line, "forced");
  }
  Audit("forced_line_close", {{"provider", scope.tenant != nullptr ? scope.tenant->name()
                                                                   : std::string("provider_token")},
                              {"device_id", device->id},
                              {"lines_closed", static_cast<uint64_t>(closed.size())}});
  return absl::OkStatus();
}

// ---------------------------------------------------------------------------
// Tenants.

TenantsApplied CallSessionCore::SetTenants(std::shared_ptr<const TenantDirectory> tenants) {
  // Open mode stays open: with no tenants at start, the caller is wrong.
  if (tenants == nullptr || options_.tenants == nullptr) return {};
  absl::MutexLock serialize(&set_tenants_mu_);
  {
    absl::MutexLock lock(&tenants_mu_);
    tenants_ = tenants;
  }
  return ApplyTenants(tenants);
}

TenantsApplied CallSessionCore::ApplyTenants(
    const std::shared_ptr<const TenantDirectory>& tenants) {
  TenantsApplied applied;
  std::vector<std::shared_ptr<App>> apps;
  {
    // Every app registered under an earlier configuration is in apps_ by
    // now (see tenants_).
    absl::MutexLock lock(&apps_mu_);
    apps.reserve(apps_.size());
    for (const auto& [handle, app] : apps_) apps.push_back(app);
  }
  EventPublisher events(journal_);
  for (const std::shared_ptr<App>& app : apps) {
    const Tenant* tenant = tenants == nullptr ? nullptr : tenants->Find(app->tenant);
    if (tenants != nullptr && (tenant == nullptr || !tenant->HasCredential(app->credential))) {
      const char* why = app->tenant.empty() ? "no_tenant"
                        : tenant == nullptr ? "tenant_revoked"
                                            : "credential_revoked";
      if (ShutdownApp(app, false, why)) ++applied.apps_shut_down;
      continue;
    }
    std::vector<uint64_t> line_handles;
    {
      absl::MutexLock lock(&app->mu);
      if (app->shut_down) continue;
      SetTenantLocked(*app,
                      tenant == nullptr ? nullptr : std::shared_ptr<const Tenant>(tenants, tenant));
      line_handles.assign(app->line_handles.begin(), app->line_handles.end());
    }
    for (uint64_t line_handle : line_handles) {
      std::shared_ptr<Line> line = store_->FindLine(line_handle);
      if (line == nullptr) continue;
      const DeviceRights now = tenant == nullptr ? kAllRights : tenant->RightsOn(line->device->id);
      if ((line->rights & ~now) == 0) continue;
      if (CloseLine(*line, /*forced=*/true, "revoked", events)) ++applied.lines_closed;
    }
  }
  apps_revoked_.fetch_add(applied.apps_shut_down, std::memory_order_relaxed);
  lines_revoked_.fetch_add(applied.lines_closed, std::memory_order_relaxed);
  return applied;
}

std::vector<TenantUsage> CallSessionCore::TenantUsages() const {
  std::shared_ptr<const TenantDirectory> tenants = CurrentTenants();
  if (tenants == nullptr) return {};
  std::vector<std::shared_ptr<App>> apps;
  {
    absl::MutexLock lock(&apps_mu_);
    apps.reserve(apps_.size());
    for (const auto& [handle, app] : apps_) apps.push_back(app);
  }
  std::vector<TenantUsage> usages(tenants->tenants().size());
  absl::flat_hash_map<absl::string_view, TenantUsage*> by_name;
  for (size_t i = 0; i < usages.size(); ++i) {
    usages[i].tenant = tenants->tenants()[i]->name();
    by_name.emplace(usages[i].tenant, &usages[i]);
  }
  for (const std::shared_ptr<App>& app : apps) {
    auto it = by_name.find(app->tenant);
    if (it == by_name.end()) continue;
    TenantUsage& usage = *it->second;
    ++usage.apps;
    usage.call_handles += app->call_handle_count.load(std::memory_order_relaxed);
    absl::MutexLock lock(&app->mu);
    usage.lines += app->line_handles.size();
  }
  return usages;
}

// ---------------------------------------------------------------------------
// Durability.

void CallSessionCore::StoreCursor(App& app) {
  if (journal_ == nullptr) return;
  EventPublisher events(journal_);
  // Under app.mu: once the app is shut down (and its removal journaled,
  // or about to be), no cursor record may follow it.
  absl::MutexLock lock(&app.mu);
  if (app.shut_down) return;
  Change change(*this, events);
  change.PutCursor(app);
  change.Commit();
}

void CallSessionCore::WhenChangesDurable(absl::AnyInvocable<void() &&> done) {
  if (journal_ == nullptr) return std::move(done)();
  // Read after the change: covers it and anything it depended on.
  const uint64_t barrier = journal_->appended_position();
  if (barrier <= journal_->durable_position()) return std::move(done)();
  journal_->WhenDurable(barrier, std::move(done));
}

uint64_t CallSessionCore::ChangesBarrier() const {
  return journal_ == nullptr ? 0 : journal_->appended_position();
}

bool CallSessionCore::IsDurable(uint64_t barrier) const {
  return journal_ == nullptr || barrier <= journal_->durable_position();
}

bool CallSessionCore::WriteChangesNow() { return journal_ == nullptr || journal_->WriteNow(); }

void CallSessionCore::WhenDurable(uint64_t barrier, absl::AnyInvocable<void() &&> done) {
  if (journal_ == nullptr) return std::move(done)();
  journal_->WhenDurable(barrier, std::move(done));
}

absl::Status CallSessionCore::Checkpoint(const std::string& dir) {
  if (journal_ == nullptr) {
    return absl::FailedPreconditionError(
        "this server keeps its state in memory only (--store=memory): there is nothing to copy");
  }
  return journal_->Checkpoint(dir);
}

CoreStats CallSessionCore::Stats() const {
  CoreStats stats;
  stats.live = store_->Counts();
  {
    absl::MutexLock lock(&subscriptions_mu_);
    stats.event_subscribers = subscriptions_.size();
  }
  stats.calls_created = calls_created_.load(std::memory_order_relaxed);
  stats.calls_freed = calls_freed_.load(std::memory_order_relaxed);
  stats.call_handles_created = call_handles_created_.load(std::memory_order_relaxed);
  stats.call_handles_voided = call_handles_voided_.load(std::memory_order_relaxed);
  stats.calls_dropped_by_line_close = calls_dropped_by_line_close_.load(std::memory_order_relaxed);
  stats.forced_line_closes = forced_line_closes_.load(std::memory_order_relaxed);
  stats.call_handles_deallocated = call_handles_deallocated_.load(std::memory_order_relaxed);
  stats.events_lost = events_lost_by_departed_apps_.load(std::memory_order_relaxed);
  {
    absl::MutexLock lock(&apps_mu_);
    for (const auto& [handle, app] : apps_) {
      stats.events_buffered += app->events.buffered();
      stats.events_lost += app->events.lost();
    }
  }
  if (journal_ != nullptr) {
    stats.journaled = true;
    stats.journal = journal_->Stats();
  }
  stats.apps_expired = apps_expired_.load(std::memory_order_relaxed);
  stats.quota_rejections = quota_rejections_.load(std::memory_order_relaxed);
  for (int i = 0; i < kAuthFailureKinds; ++i) {
    stats.auth_failures[i] = auth_failures_[i].load(std::memory_order_relaxed);
  }
  stats.apps_revoked = apps_revoked_.load(std::memory_order_relaxed);
  stats.lines_revoked = lines_revoked_.load(std::memory_order_relaxed);
  return stats;
}

}  // namespace callsession
