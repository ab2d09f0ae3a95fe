// CallSessionCore: TAPI 2.2 call-handle semantics, independent of transport.
//
// Each public method is one RPC of callsession.v1 (see the protos for the
// contract of each), takes the request and fills the response, and returns
// an absl::Status built by TapiError() (see tapi_error.h) on failure. A
// failed call changes nothing. Application methods take the bearer token the
// request carried; a missing, malformed or unknown token is UNAUTHENTICATED
// (LINEERR_UNINITIALIZED) before any other check. A handle that belongs to
// another application is treated exactly as one that never existed.
//
// Durability: with a journal (CoreOptions::journal), every change is
// appended to it as the effects it had (records written and deleted) while
// the locks of what changed are still held, and an event becomes
// deliverable only once its entry is durable. Methods still return at once;
// the caller must not acknowledge a change before it is durable: the gRPC
// adapters reply to a mutating RPC through WhenChangesDurable. Reads
// (GetCallInfo, GetCallStatus, ListCalls) never wait, so they may show a
// change whose own RPC has not been answered yet.
//
// Thread-safe: every method may be called concurrently from any thread. No
// method blocks on I/O; the lock order is documented in model.h.
#ifndef CALLSESSION_SERVER_CORE_CALL_SESSION_CORE_H_
#define CALLSESSION_SERVER_CORE_CALL_SESSION_CORE_H_

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/functional/any_invocable.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "callsession/v1/call_session_service.pb.h"
#include "callsession/v1/provider_service.pb.h"
#include "server/core/clock.h"
#include "server/core/event_queue.h"
#include "server/core/journal.h"
#include "server/core/model.h"
#include "server/core/session_store.h"
#include "server/core/tenants.h"

namespace callsession {

struct CoreOptions {
  // Devices are numbered 0 .. num_devices-1.
  uint32_t num_devices = 16;
  // Shards per handle table: a power of two.
  int shards = 64;
  // The token the provider service accepts for every device; empty: none.
  std::string provider_token;
  // The tenants in force (see tenants.h and SetTenants); null: open mode,
  // where Initialize needs no credential and every app may do everything.
  std::shared_ptr<const TenantDirectory> tenants;
  // Events buffered per application for delivery and replay (see
  // EventQueue).
  size_t event_buffer = 4096;
  // MakeCall request_ids remembered per application: at most this many
  // (oldest forgotten first), each for at most request_id_ttl.
  size_t request_id_cache = 1024;
  absl::Duration request_id_ttl = absl::Minutes(10);
  // An application with no event stream open and no RPC for this long is
  // shut down by ExpireIdleApps; zero turns leases off.
  absl::Duration app_ttl = absl::ZeroDuration();
  // Quotas; 0 means no limit.
  size_t max_apps = 0;
  size_t max_lines_per_app = 0;
  size_t max_call_handles_per_app = 0;
  // Not owned; must outlive the core.
  const Clock* clock = &RealClock();
  // Where changes are made durable; null keeps everything in memory only.
  // Not owned; must outlive the core. With a journal, call Recover() before
  // anything else.
  Journal* journal = nullptr;
};

// What Recover loaded.
struct RecoveryCounts {
  size_t apps = 0;
  size_t lines = 0;
  size_t calls = 0;
  size_t call_handles = 0;
  size_t events = 0;
  size_t request_ids = 0;
  // True if the journal was empty and Recover initialized it.
  bool created = false;
  // Taken away because the tenants in force no longer grant them.
  size_t apps_revoked = 0;
  size_t lines_revoked = 0;
};

// OK, or INVALID_ARGUMENT naming the first bad option.
absl::Status ValidateCoreOptions(const CoreOptions& options);

// Counters since start, and live entries. Approximate under concurrency.
struct CoreStats {
  StoreCounts live;
  size_t event_subscribers = 0;
  uint64_t calls_created = 0;
  uint64_t calls_freed = 0;
  uint64_t call_handles_created = 0;
  uint64_t call_handles_voided = 0;       // by any means
  uint64_t call_handles_deallocated = 0;  // by DeallocateCall
  uint64_t calls_dropped_by_line_close = 0;
  uint64_t forced_line_closes = 0;
  size_t events_buffered = 0;  // in registered apps' buffers
  bool journaled = false;      // the core has a journal; then:
  JournalStats journal;
  uint64_t events_lost = 0;       // by registered apps' consumers, since start
  uint64_t apps_expired = 0;      // shut down by ExpireIdleApps
  uint64_t quota_rejections = 0;  // requests refused by a quota
  // Failed authentications by AuthFailure.
  uint64_t auth_failures[kAuthFailureKinds] = {};
  uint64_t apps_revoked = 0;   // shut down by a tenants configuration
  uint64_t lines_revoked = 0;  // closed by a tenants configuration
};

// What one tenant's applications hold now.
struct TenantUsage {
  std::string tenant;
  size_t apps = 0;
  size_t lines = 0;
  size_t call_handles = 0;
};

// What SetTenants (or recovery) took away.
struct TenantsApplied {
  size_t apps_shut_down = 0;
  size_t lines_closed = 0;
};

class CallSessionCore;

// One stream's hold on an application's events, made by
// CallSessionCore::WatchEvents. Destroying it stops delivery to its sink;
// it must not outlive the core. Next() may be called from any thread.
class EventSubscription {
 public:
  EventSubscription(CallSessionCore* core, std::shared_ptr<App> app,
                    std::shared_ptr<EventSink> sink);
  ~EventSubscription();
  EventSubscription(const EventSubscription&) = delete;
  EventSubscription& operator=(const EventSubscription&) = delete;

  // See EventQueue::Next.
  bool Next(v1::Event* event);

 private:
  friend class CallSessionCore;
  CallSessionCore* const core_;
  const std::shared_ptr<App> app_;
  const std::shared_ptr<EventSink> sink_;
};

class CallSessionCore {
 public:
  friend class EventSubscription;

  // `options` must pass ValidateCoreOptions. `store` defaults to the
  // sharded in-memory store.
  explicit CallSessionCore(CoreOptions options, std::unique_ptr<SessionStore> store = nullptr);
  ~CallSessionCore();

  CallSessionCore(const CallSessionCore&) = delete;
  CallSessionCore& operator=(const CallSessionCore&) = delete;

  // CallSessionService. Initialize takes the credentials the request
  // carried (a tenant's, with a tenants file; ignored in open mode).
  absl::Status Initialize(const Credentials& credentials, const v1::InitializeRequest& request,
                          v1::InitializeResponse* response);
  absl::Status Shutdown(absl::string_view token, const v1::ShutdownRequest& request,
                        v1::ShutdownResponse* response);
  absl::Status LineOpen(absl::string_view token, const v1::LineOpenRequest& request,
                        v1::LineOpenResponse* response);
  absl::Status LineClose(absl::string_view token, const v1::LineCloseRequest& request,
                         v1::LineCloseResponse* response);
  absl::Status MakeCall(absl::string_view token, const v1::MakeCallRequest& request,
                        v1::MakeCallResponse* response);
  absl::Status Answer(absl::string_view token, const v1::AnswerRequest& request,
                      v1::AnswerResponse* response);
  absl::Status Drop(absl::string_view token, const v1::DropRequest& request,
                    v1::DropResponse* response);
  absl::Status GetCallInfo(absl::string_view token, const v1::GetCallInfoRequest& request,
                           v1::GetCallInfoResponse* response);
  absl::Status GetCallStatus(absl::string_view token, const v1::GetCallStatusRequest& request,
                             v1::GetCallStatusResponse* response);
  absl::Status DeallocateCall(absl::string_view token, const v1::DeallocateCallRequest& request,
                              v1::DeallocateCallResponse* response);
  absl::Status GetNewCalls(absl::string_view token, const v1::GetNewCallsRequest& request,
                           v1::GetNewCallsResponse* response);
  absl::Status ListCalls(absl::string_view token, const v1::ListCallsRequest& request,
                         v1::ListCallsResponse* response);
  absl::Status KeepAlive(absl::string_view token, const v1::KeepAliveRequest& request,
                         v1::KeepAliveResponse* response);

  // Makes `sink` the consumer of the application's events from
  // request.from_sequence() on, ending any previous consumer with ABORTED.
  // Events come through the returned subscription; the sink is told when to
  // pull (see EventSink). While the subscription lives the application's
  // lease does not run out.
  absl::StatusOr<std::unique_ptr<EventSubscription>> WatchEvents(
      absl::string_view token, const v1::WatchEventsRequest& request,
      std::shared_ptr<EventSink> sink);

  // Shuts down, exactly as Shutdown would, every application whose lease
  // ran out: no event stream open and no RPC for options.app_ttl. Returns
  // how many. Does nothing when leases are off. Called periodically by the
  // server (any thread); tests call it after advancing their clock.
  size_t ExpireIdleApps();

  // ProviderService. `provider` is what the request carried: the provider
  // token, or a tenant credential with provider access for some devices.
  absl::Status OfferCall(const Credentials& provider, const v1::OfferCallRequest& request,
                         v1::OfferCallResponse* response);
  absl::Status SetCallState(const Credentials& provider, const v1::SetCallStateRequest& request,
                            v1::SetCallStateResponse* response);
  absl::Status ForceLineClose(const Credentials& provider, const v1::ForceLineCloseRequest& request,
                              v1::ForceLineCloseResponse* response);

  // Puts `tenants` in force (a reload of the tenants file) and takes away
  // at once what it no longer grants: apps whose tenant or registration
  // credential is gone are shut down exactly as Shutdown does; each line
  // opened with a right its app's tenant no longer has on the device is
  // closed as ForceLineClose closes it (LineCloseEvent); quotas change for
  // new requests. Each is an audit log line. The core must have been
  // created with tenants (no switch to or from open mode): `tenants` must
  // not be null. Any thread; concurrent calls are serialized.
  TenantsApplied SetTenants(std::shared_ptr<const TenantDirectory> tenants);

  // Live apps, lines and call handles per tenant in force (every tenant of
  // the directory, with zeros), for metrics. Empty in open mode. Walks
  // every app: for scrapes, not hot paths.
  std::vector<TenantUsage> TenantUsages() const;

  // Ends every event subscription with `why` (server shutdown).
  void EndAllSubscriptions(const absl::Status& why);

  // Loads the journal's records into this new core: applications (their
  // tokens work again), lines, calls with every handle, each application's
  // buffered events and request ids, and where handle numbering continues,
  // so no handle is ever issued twice. An empty journal is initialized with
  // the format record. Never re-runs a TAPI rule: what is loaded is what
  // was there. Then the tenants in force apply to what was loaded as
  // SetTenants says (an app of a tenant no longer configured is shut down),
  // as new changes. Call once, before any other method, from one thread; blocks
  // on I/O. Errors: FAILED_PRECONDITION if the store was written by a newer
  // format, or does not fit the options (a line on a device >= num_devices);
  // DATA_LOSS for a record that does not parse or contradicts another (the
  // message names its key); an engine's own error for I/O. On error the
  // core must be discarded.
  absl::StatusOr<RecoveryCounts> Recover();

  // Runs `done` once every change made so far, by any thread, is durable:
  // at once (on this thread) without a journal or if they already are,
  // otherwise on the journal's writer thread. A mutating RPC calls this
  // after the core returned, and replies from `done`. Must not be called
  // with a core lock held.
  void WhenChangesDurable(absl::AnyInvocable<void() &&> done);

  // The same in parts, for a serving thread that answers a burst of
  // requests together (see CallerWritesScope in journal.h): the barrier
  // covering every change made so far (0 without a journal), whether a
  // barrier is durable, writing what is appended on this thread if the
  // journal can (Journal::WriteNow; true if everything appended is durable
  // now; it may run due callbacks here, so no core lock may be held), and
  // running `done` on a journal thread once a barrier is durable.
  uint64_t ChangesBarrier() const;
  bool IsDurable(uint64_t barrier) const;
  bool WriteChangesNow();
  void WhenDurable(uint64_t barrier, absl::AnyInvocable<void() &&> done);

  // Writes a consistent copy of the stored state to `dir` (see
  // Journal::Checkpoint). FAILED_PRECONDITION without a journal. Blocks on
  // I/O.
  absl::Status Checkpoint(const std::string& dir);

  CoreStats Stats() const;
  uint32_t num_devices() const { return options_.num_devices; }
  const CoreOptions& options() const { return options_; }

 private:
  class Change;

  // Who may act as the provider, and for which devices.
  struct ProviderScope {
    // Null: every device (the provider token).
    const Tenant* tenant = nullptr;
    // Keeps `tenant` alive.
    std::shared_ptr<const TenantDirectory> directory;
    bool Covers(uint32_t device_id) const {
      return tenant == nullptr || tenant->ProvidesFor(device_id);
    }
  };

  // The token's app; renews its lease.
  absl::StatusOr<std::shared_ptr<App>> Authenticate(absl::string_view token) const;
  absl::Status AuthenticationFailed(AuthFailure why, absl::string_view message) const;
  std::shared_ptr<const TenantDirectory> CurrentTenants() const;
  // The app's rights on `device_id` under its tenant in force.
  static DeviceRights RightsLocked(const App& app, uint32_t device_id)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(app.mu);
  // The tenant configuration and quotas of an app of `tenant` (null: open
  // mode); tenant and credential left empty.
  AppTenancy TenancyOf(std::shared_ptr<const Tenant> tenant) const;
  // Sets the app's tenant in force and the quotas that follow from it.
  void SetTenantLocked(App& app, std::shared_ptr<const Tenant> tenant)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(app.mu);
  // Takes away from every app what `tenants` does not grant (see SetTenants).
  TenantsApplied ApplyTenants(const std::shared_ptr<const TenantDirectory>& tenants);
  // What LineOpen answers for a device an app may not see: in open mode the
  // device does not exist; with tenants, the same for devices that do.
  absl::Status NoSuchDevice(uint32_t device_id) const;
  // Shutdown's work. With `only_if_expired`, does nothing unless the app's
  // lease has run out (checked under its lock). False if nothing was done.
  bool ShutdownApp(const std::shared_ptr<App>& app, bool only_if_expired, absl::string_view why);
  bool LeaseExpiredLocked(const App& app, absl::Time now) const ABSL_SHARED_LOCKS_REQUIRED(app.mu);
  // Reserves `count` call handles of the app's quota; false (nothing
  // reserved) if that would pass it.
  bool ReserveCallHandles(App& app, uint64_t count);
  void ReleaseCallHandles(App& app, uint64_t count);
  absl::Status QuotaExceeded(absl::string_view what);
  absl::StatusOr<ProviderScope> AuthenticateProvider(const Credentials& provider) const;
  absl::StatusOr<Device*> FindDevice(uint32_t device_id) const;
  // The app's open line, or NOT_FOUND (LINEERR_INVALLINEHANDLE).
  absl::StatusOr<std::shared_ptr<Line>> FindOwnLine(const App& app, uint64_t line_handle) const;
  // The call a handle addresses, or NOT_FOUND; the caller must still check,
  // under the call's lock, that the app holds it (FindHolderLocked).
  absl::StatusOr<CallRef> FindCallOfHandle(uint64_t call_handle) const;

  // The idempotency record a MakeCall with a request_id writes with its call.
  struct RequestIdUpdate {
    const std::string* request_id;  // null: none
    absl::Time answered;
    const std::string* evicted;  // the oldest one it pushes out, or null
  };
  absl::Status PlaceOutboundCall(App& app, uint64_t line_handle, const std::string& dest_address,
                                 const RequestIdUpdate& request_id, v1::MakeCallResponse* response,
                                 EventPublisher& events);

  // Voids the line: no new handles, gone from its device, app and the
  // store. Returns false if it was already closed; otherwise `*handles` gets
  // the call handles opened through it, for VoidHandlesOfClosedLine.
  bool DetachLineLocked(Line& line, std::vector<uint64_t>* handles)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(line.device->mu);
  // DetachLineLocked then FinishClosingLine (`forced`: with a
  // LineCloseEvent), with an audit line giving `why`. False if already
  // closed.
  bool CloseLine(Line& line, bool forced, absl::string_view why, EventPublisher& events);
  // After DetachLineLocked: voids the line's `handles`, then deletes the
  // line's record (with a LineCloseEvent to its app if `forced`). The
  // journal sees the handles voided first and the line go last, so every
  // prefix of it is a state with no handle on a missing line.
  void FinishClosingLine(Line& line, const std::vector<uint64_t>& handles, bool forced,
                         EventPublisher& events);
  // Voids each handle, dropping calls their app owned alone.
  void VoidHandlesOfClosedLine(const std::vector<uint64_t>& handles, EventPublisher& events);
  // Records where `app`'s from_sequence-0 streams resume (a stream ended).
  void StoreCursor(App& app);

  // Issues a handle to `call` for line.app through `line`; one handle of
  // line.app's quota must be reserved.
  uint64_t AddHolderLocked(const CallRef& call, Line& line, v1::CallPrivilege privilege,
                           Change& change) ABSL_EXCLUSIVE_LOCKS_REQUIRED(call->mu);
  // Removes holders[index], whose app is `app`, and its handle from the
  // store (not from its line's set: the caller does that, or the line is
  // closing). Does not touch the holder's line, which may already be gone.
  void RemoveHolderLocked(Call& call, size_t index, App& app)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(call.mu);
  void SetStateLocked(Call& call, v1::CallState state, Change& change)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(call.mu);
  void PushNewCallLocked(const Call& call, const Holder& holder, Change& change)
      ABSL_SHARED_LOCKS_REQUIRED(call.mu);
  // Gives every MONITOR line's app a monitor handle to a new call, unless it
  // holds one already or is at its quota.
  void AddMonitorsLocked(const CallRef& call, Device& device, Change& change)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(device.mu, call->mu);
  // What GetCallInfo and GetCallStatus return for `holder`.
  void FillCallInfoLocked(const Call& call, const Holder& holder, v1::CallInfo* info) const
      ABSL_SHARED_LOCKS_REQUIRED(call.mu);
  void FillCallStatusLocked(const Call& call, const Holder& holder, v1::CallStatus* status) const
      ABSL_SHARED_LOCKS_REQUIRED(call.mu);
  // Marks the call freed if it is IDLE with no holder; true if this call did.
  bool MarkFreedIfDoneLocked(Call& call) ABSL_EXCLUSIVE_LOCKS_REQUIRED(call.mu);
  // Removes a call marked freed from its device and the store.
  void FreeCall(const Call& call);

  v1::Event NewEvent() const;

  // Recovery of one record of each kind (see Recover).
  absl::Status RecoverFormat(absl::string_view value, bool* seen);
  absl::Status RecoverApp(uint64_t handle, absl::string_view value);
  absl::Status RecoverLine(uint64_t handle, absl::string_view value, RecoveryCounts& counts);
  absl::Status RecoverCall(uint64_t call_id, absl::string_view value, RecoveryCounts& counts,
                           uint64_t& highest_handle);

  const CoreOptions options_;
  Journal* const journal_;  // null: memory only
  const std::unique_ptr<SessionStore> store_;
  // One per device id; constant after construction.
  std::vector<std::unique_ptr<Device>> devices_;

  // Every live subscription, for EndAllSubscriptions. Touched only when a
  // stream starts or ends, never on a per-call path.
  mutable absl::Mutex subscriptions_mu_;
  absl::flat_hash_set<EventSubscription*> subscriptions_ ABSL_GUARDED_BY(subscriptions_mu_);

  // Every registered app, for leases and the app quota. Touched only on
  // Initialize, shutdown and the lease scan. A leaf lock.
  mutable absl::Mutex apps_mu_;
  absl::flat_hash_map<uint64_t, std::shared_ptr<App>> apps_ ABSL_GUARDED_BY(apps_mu_);
  // Registered apps per tenant, for tenants' max_apps.
  absl::flat_hash_map<std::string, size_t> tenant_apps_ ABSL_GUARDED_BY(apps_mu_);

  // The tenants in force (null: open mode). Initialize reads it under
  // apps_mu_, and SetTenants replaces it before it walks apps_, so no app
  // can register under a configuration SetTenants does not see.
  mutable absl::Mutex tenants_mu_ ABSL_ACQUIRED_AFTER(apps_mu_);
  std::shared_ptr<const TenantDirectory> tenants_ ABSL_GUARDED_BY(tenants_mu_);
  // Serializes SetTenants.
  absl::Mutex set_tenants_mu_ ABSL_ACQUIRED_BEFORE(apps_mu_);

  // Serializes journal appends (see Change::Commit), and what only
  // appends touch: for each handle kind, every handle below this value may
  // have been issued (the journal's HandleFloorRecord).
  absl::Mutex journal_mu_ ABSL_ACQUIRED_AFTER(apps_mu_);
  uint64_t handle_floor_[kHandleKinds] ABSL_GUARDED_BY(journal_mu_) = {};

  std::atomic<uint64_t> calls_created_{0};
  std::atomic<uint64_t> calls_freed_{0};
  std::atomic<uint64_t> call_handles_created_{0};
  std::atomic<uint64_t> call_handles_voided_{0};
  std::atomic<uint64_t> calls_dropped_by_line_close_{0};
  std::atomic<uint64_t> forced_line_closes_{0};
  std::atomic<uint64_t> call_handles_deallocated_{0};
  std::atomic<uint64_t> apps_expired_{0};
  std::atomic<uint64_t> events_lost_by_departed_apps_{0};
  std::atomic<uint64_t> quota_rejections_{0};
  mutable std::atomic<uint64_t> auth_failures_[kAuthFailureKinds] = {};
  std::atomic<uint64_t> apps_revoked_{0};
  std::atomic<uint64_t> lines_revoked_{0};
};

}  // namespace callsession

#endif  // CALLSESSION_SERVER_CORE_CALL_SESSION_CORE_H_
