#include "server/core/call_session_core.h"

#include <sys/random.h>

#include <algorithm>
#include <cerrno>
#include <utility>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "google/protobuf/duration.pb.h"
#include "google/protobuf/timestamp.pb.h"
#include "server/core/handle_table.h"
#include "server/core/log.h"
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

// Compares without an early exit, so the time taken does not tell an
// attacker how much of a guessed secret was right.
bool ConstantTimeEquals(const uint8_t* a, const uint8_t* b, size_t size) {
  volatile uint8_t diff = 0;
  for (size_t i = 0; i < size; ++i) diff = diff | (a[i] ^ b[i]);
  return diff == 0;
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

}  // namespace

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
}

bool EventSubscription::Next(v1::Event* event) { return app_->events.Next(sink_.get(), event); }

CallSessionCore::CallSessionCore(CoreOptions options, std::unique_ptr<SessionStore> store)
    : options_(std::move(options)),
      store_(store != nullptr ? std::move(store) : NewShardedMemoryStore(options_.shards)) {
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
  if (token.size() != kTokenLength ||
      !ParseHex(token.substr(0, kTokenHandleDigits), handle_bytes, 8) ||
      !ParseHex(token.substr(kTokenHandleDigits), secret.data(), 16)) {
    return Unauthenticated("missing or malformed app token");
  }
  uint64_t handle = 0;
  for (uint8_t byte : handle_bytes) handle = handle << 8 | byte;
  std::shared_ptr<App> app = store_->FindApp(handle);
  if (app == nullptr || !ConstantTimeEquals(app->secret.data(), secret.data(), secret.size())) {
    return Unauthenticated("unknown app token");
  }
  if (options_.app_ttl > absl::ZeroDuration()) {
    app->last_activity_ns.store(absl::ToUnixNanos(options_.clock->Now()),
                                std::memory_order_relaxed);
  }
  return app;
}

absl::Status CallSessionCore::AuthenticateProvider(absl::string_view token) const {
  const std::string& expected = options_.provider_token;
  if (expected.empty()) {
    return Unauthenticated("this server has no provider token configured");
  }
  if (token.size() != expected.size() ||
      !ConstantTimeEquals(reinterpret_cast<const uint8_t*>(token.data()),
                          reinterpret_cast<const uint8_t*>(expected.data()), expected.size())) {
    return Unauthenticated("missing or wrong provider token");
  }
  return absl::OkStatus();
}

absl::StatusOr<Device*> CallSessionCore::FindDevice(uint32_t device_id) const {
  if (device_id >= devices_.size()) {
    return TapiError(TapiErrorCode::kBadDeviceId,
                     absl::StrCat("device_id ", device_id, " is not below ", devices_.size()));
  }
  return devices_[device_id].get();
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

uint64_t CallSessionCore::AddHolderLocked(const CallRef& call, Line& line,
                                          CallPrivilege privilege) {
  const uint64_t handle = store_->AddCallHandle(call);
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

void CallSessionCore::SetStateLocked(Call& call, CallState state, EventPublisher& events) {
  call.state = state;
  call.state_entry_time_ns = absl::ToUnixNanos(options_.clock->Now());
  if (state == v1::CALL_STATE_CONNECTED) call.connected = true;
  for (const Holder& holder : call.holders) {
    v1::Event event = NewEvent();
    v1::CallStateEvent* change = event.mutable_call_state();
    change->set_call_handle(holder.handle);
    change->set_call_state(state);
    events.Push(holder.app()->events, std::move(event));
  }
}

void CallSessionCore::PushNewCallLocked(const Call& call, const Holder& holder,
                                        EventPublisher& events) {
  v1::Event event = NewEvent();
  v1::AppNewCallEvent* new_call = event.mutable_app_new_call();
  new_call->set_line_handle(holder.line()->handle);
  new_call->set_call_handle(holder.handle);
  new_call->set_call_privilege(holder.privilege());
  new_call->set_call_id(call.id);
  events.Push(holder.app()->events, std::move(event));
}

void CallSessionCore::AddMonitorsLocked(const CallRef& call, Device& device,
                                        EventPublisher& events) {
  for (const auto& [order, monitor_line] : device.monitor_lines) {
    App& app = *monitor_line->app;
    if (HoldsLocked(*call, &app) || !ReserveCallHandles(app, 1)) continue;
    AddHolderLocked(call, *monitor_line, v1::CALL_PRIVILEGE_MONITOR);
    PushNewCallLocked(*call, call->holders.back(), events);
  }
}

bool CallSessionCore::ReserveCallHandles(App& app, uint64_t count) {
  const size_t limit = options_.max_call_handles_per_app;
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
      const bool drop = IsSoleOwnerLocked(*call, *it) && call->state != v1::CALL_STATE_IDLE;
      RemoveHolderLocked(*call, it - call->holders.begin(), *it->app());
      if (drop) {
        SetStateLocked(*call, v1::CALL_STATE_IDLE, events);
        calls_dropped_by_line_close_.fetch_add(1, std::memory_order_relaxed);
      }
      free_call = MarkFreedIfDoneLocked(*call);
    }
    if (free_call) FreeCall(*call);
  }
}

bool CallSessionCore::CloseLine(Line& line, EventPublisher& events) {
  std::vector<uint64_t> handles;
  {
    absl::MutexLock lock(&line.device->mu);
    if (!DetachLineLocked(line, &handles)) return false;
  }
  VoidHandlesOfClosedLine(handles, events);
  return true;
}

// ---------------------------------------------------------------------------
// CallSessionService.

absl::Status CallSessionCore::Initialize(const v1::InitializeRequest& request,
                                         v1::InitializeResponse* response) {
  const std::string& name = request.app_name();
  if (name.size() > kMaxAppNameBytes || !IsPrintableAscii(name)) {
    return TapiError(
        TapiErrorCode::kInvalAppName,
        absl::StrCat("app_name must be at most ", kMaxAppNameBytes, " printable ASCII bytes"));
  }
  CS_ASSIGN_OR_RETURN(const auto secret, RandomSecret());
  uint64_t handle = 0;
  {
    absl::MutexLock lock(&apps_mu_);
    if (options_.max_apps != 0 && apps_.size() >= options_.max_apps) {
      return QuotaExceeded(absl::StrCat("the server has its maximum of ", options_.max_apps,
                                        " applications (--max_apps)"));
    }
    std::shared_ptr<App> app;
    handle = store_->AddApp([&](uint64_t handle) {
      app = std::make_shared<App>(handle, name, secret, options_.event_buffer);
      app->last_activity_ns.store(absl::ToUnixNanos(options_.clock->Now()),
                                  std::memory_order_relaxed);
      return app;
    });
    apps_.emplace(handle, std::move(app));
  }
  uint8_t handle_bytes[8];
  for (int i = 0; i < 8; ++i) handle_bytes[i] = static_cast<uint8_t>(handle >> (56 - 8 * i));
  std::string token;
  token.reserve(kTokenLength);
  AppendHex(handle_bytes, sizeof(handle_bytes), &token);
  AppendHex(secret.data(), secret.size(), &token);

  response->set_app_handle(handle);
  response->set_app_token(std::move(token));
  response->set_num_devices(options_.num_devices);
  SetDuration(options_.app_ttl, response->mutable_app_ttl());
  Log(LogLevel::kInfo, "app_initialized", {{"app_handle", handle}, {"app_name", name}});
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
  std::shared_ptr<EventSink> sink;
  {
    EventPublisher events;
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
    }
    for (uint64_t line_handle : line_handles) {
      if (std::shared_ptr<Line> line = store_->FindLine(line_handle)) {
        CloseLine(*line, events);
      }
    }
    sink = app->events.Close();
    events_lost_by_departed_apps_.fetch_add(app->events.lost(), std::memory_order_relaxed);
  }
  if (sink != nullptr) sink->OnSubscriptionEnded(absl::OkStatus());
  Log(LogLevel::kInfo, "app_shut_down",
      {{"app_handle", app->handle}, {"app_name", app->name}, {"reason", why}});
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

  uint64_t handle = 0;
  {
    absl::MutexLock lock(&device->mu);
    const uint64_t open_order = device->next_open_order++;
    std::shared_ptr<Line> line;
    handle = store_->AddLine([&](uint64_t handle) {
      line = std::make_shared<Line>(handle, app, device, owner, monitor, open_order);
      return line;
    });
    {
      absl::MutexLock app_lock(&app->mu);
      if (app->shut_down) {
        store_->RemoveLine(handle);
        return Unauthenticated("unknown app token");
      }
      if (options_.max_lines_per_app != 0 &&
          app->line_handles.size() >= options_.max_lines_per_app) {
        store_->RemoveLine(handle);
        return QuotaExceeded(absl::StrCat("the application has its maximum of ",
                                          options_.max_lines_per_app,
                                          " lines open (--max_lines_per_app)"));
      }
      app->line_handles.insert(handle);
    }
    device->lines.emplace(open_order, line);
    if (owner) device->owner_lines.emplace(open_order, line.get());
    if (monitor) device->monitor_lines.emplace(open_order, line.get());
  }
  response->set_line_handle(handle);
  Log(LogLevel::kDebug, "line_opened",
      {{"app_handle", app->handle},
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
  EventPublisher events;
  CS_ASSIGN_OR_RETURN(std::shared_ptr<Line> line, FindOwnLine(*app, request.line_handle()));
  if (!CloseLine(*line, events)) return InvalidLineHandle();
  Log(LogLevel::kDebug, "line_closed",
      {{"app_handle", app->handle},
       {"line_handle", line->handle},
       {"device_id", line->device->id}});
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
  EventPublisher events;
  if (request_id.empty() || options_.request_id_cache == 0) {
    return PlaceOutboundCall(*app, request.line_handle(), request.dest_address(), response, events);
  }

  // Held across the call's creation, so that concurrent retries of one
  // request_id create one call.
  absl::MutexLock lock(&app->request_mu);
  // Keys are in answer order, so the expired ones are at the front.
  const absl::Time now = options_.clock->Now();
  while (!app->request_order.empty()) {
    auto oldest = app->recent_requests.find(app->request_order.front());
    if (now - oldest->second.answered < options_.request_id_ttl) break;
    app->recent_requests.erase(oldest);
    app->request_order.pop_front();
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
  CS_RETURN_IF_ERROR(
      PlaceOutboundCall(*app, request.line_handle(), request.dest_address(), response, events));
  app->recent_requests.emplace(
      request_id, IdempotentMakeCall{request.line_handle(), request.dest_address(),
                                     response->call_handle(), response->call_id(), now});
  app->request_order.push_back(request_id);
  if (app->request_order.size() > options_.request_id_cache) {
    app->recent_requests.erase(app->request_order.front());
    app->request_order.pop_front();
  }
  return absl::OkStatus();
}

absl::Status CallSessionCore::PlaceOutboundCall(App& app, uint64_t line_handle,
                                                const std::string& dest_address,
                                                v1::MakeCallResponse* response,
                                                EventPublisher& events) {
  CS_RETURN_IF_ERROR(CheckAddress("dest_address", dest_address, false));
  CS_ASSIGN_OR_RETURN(std::shared_ptr<Line> line, FindOwnLine(app, line_handle));
  Device& device = *line->device;

  if (!ReserveCallHandles(app, 1)) {
    return QuotaExceeded(absl::StrCat("the application holds its maximum of ",
                                      options_.max_call_handles_per_app,
                                      " call handles (--max_call_handles_per_app)"));
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
  const uint64_t call_handle = AddHolderLocked(call, *line, v1::CALL_PRIVILEGE_OWNER);
  AddMonitorsLocked(call, device, events);
  SetStateLocked(*call, v1::CALL_STATE_DIALING, events);

  response->set_call_handle(call_handle);
  response->set_call_id(call_id);
  return absl::OkStatus();
}

absl::Status CallSessionCore::Answer(absl::string_view token, const v1::AnswerRequest& request,
                                     v1::AnswerResponse* response) {
  CS_ASSIGN_OR_RETURN(std::shared_ptr<App> app, Authenticate(token));
  EventPublisher events;
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
  SetStateLocked(*call, v1::CALL_STATE_CONNECTED, events);
  return absl::OkStatus();
}

absl::Status CallSessionCore::Drop(absl::string_view token, const v1::DropRequest& request,
                                   v1::DropResponse* response) {
  CS_ASSIGN_OR_RETURN(std::shared_ptr<App> app, Authenticate(token));
  EventPublisher events;
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
  SetStateLocked(*call, v1::CALL_STATE_IDLE, events);
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
                                      options_.max_call_handles_per_app,
                                      " (--max_call_handles_per_app)"));
  }
  size_t issued = 0;
  for (const CallRef& call : candidates) {
    absl::MutexLock call_lock(&call->mu);
    if (call->freed || call->state == v1::CALL_STATE_IDLE || HoldsLocked(*call, app.get())) {
      continue;
    }
    response->add_call_handles(AddHolderLocked(call, *line, v1::CALL_PRIVILEGE_MONITOR));
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
  response->set_resume_sequence(app->events.next_sequence());

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

absl::Status CallSessionCore::OfferCall(absl::string_view provider_token,
                                        const v1::OfferCallRequest& request,
                                        v1::OfferCallResponse* response) {
  CS_RETURN_IF_ERROR(AuthenticateProvider(provider_token));
  CS_ASSIGN_OR_RETURN(Device* const device, FindDevice(request.device_id()));
  CS_RETURN_IF_ERROR(CheckAddress("caller_id", request.caller_id(), true));
  CS_RETURN_IF_ERROR(CheckAddress("called_id", request.called_id(), true));
  EventPublisher events;

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
  // The earliest OWNER line whose app has room for another handle.
  for (const auto& [order, owner_line] : device->owner_lines) {
    if (!ReserveCallHandles(*owner_line->app, 1)) continue;
    AddHolderLocked(call, *owner_line, v1::CALL_PRIVILEGE_OWNER);
    PushNewCallLocked(*call, call->holders.back(), events);
    break;
  }
  AddMonitorsLocked(call, *device, events);
  SetStateLocked(*call, v1::CALL_STATE_OFFERING, events);
  response->set_call_id(call_id);
  return absl::OkStatus();
}

absl::Status CallSessionCore::SetCallState(absl::string_view provider_token,
                                           const v1::SetCallStateRequest& request,
                                           v1::SetCallStateResponse* response) {
  CS_RETURN_IF_ERROR(AuthenticateProvider(provider_token));
  const CallState state = request.call_state();
  if (!v1::CallState_IsValid(state) || state == v1::CALL_STATE_UNSPECIFIED) {
    return TapiError(TapiErrorCode::kInvalParam,
                     absl::StrCat("unknown call_state ", static_cast<int>(state)));
  }
  EventPublisher events;
  CallRef call = request.call_id() == 0 ? nullptr : store_->FindCall(request.call_id());
  if (call == nullptr) {
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
    SetStateLocked(*call, state, events);
    free_call = MarkFreedIfDoneLocked(*call);
  }
  if (free_call) FreeCall(*call);
  return absl::OkStatus();
}

absl::Status CallSessionCore::ForceLineClose(absl::string_view provider_token,
                                             const v1::ForceLineCloseRequest& request,
                                             v1::ForceLineCloseResponse* response) {
  CS_RETURN_IF_ERROR(AuthenticateProvider(provider_token));
  CS_ASSIGN_OR_RETURN(Device* const device, FindDevice(request.device_id()));
  EventPublisher events;
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
    VoidHandlesOfClosedLine(handles, events);
    v1::Event event = NewEvent();
    event.mutable_line_close()->set_line_handle(line->handle);
    events.Push(line->app->events, std::move(event));
    forced_line_closes_.fetch_add(1, std::memory_order_relaxed);
  }
  Log(LogLevel::kInfo, "forced_line_close",
      {{"device_id", device->id}, {"lines_closed", static_cast<uint64_t>(closed.size())}});
  return absl::OkStatus();
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
  stats.apps_expired = apps_expired_.load(std::memory_order_relaxed);
  stats.quota_rejections = quota_rejections_.load(std::memory_order_relaxed);
  return stats;
}

}  // namespace callsession
