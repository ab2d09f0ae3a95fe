// The entities the core tracks, and the locks that guard them.
//
// Lock order (a thread may only take locks further down this list than any
// it holds):
//   1. App::request_mu     one app's MakeCall idempotency cache
//   2. Device::mu          a device's lines and calls; Line::open
//   3. Call::mu            a call's state and holders
//   4. Line::mu            a line's set of call handles
//   5. App::mu
//   6. the core's app registry (apps_mu_)
//   7. the core's journal lock (journal_mu_): a change is appended to the
//      journal while the locks of what it changed are still held
//   8. leaves              store shards, EventQueue, the tenants in force
//                          (tenants_mu_), the journal's own
// Nothing blocks or does I/O under any of them: events are pushed to queues
// (a leaf), journal entries are queued for the journal's writer thread, and
// sinks are woken after every lock is released (with a journal, once the
// entries they wait for are durable).
//
// Lifetimes: the store owns Apps, Lines and Calls through shared_ptr. A Line
// holds its App; a Call's holders point at their Line (and so App) without
// owning them, which is safe because a Line is kept alive until every handle
// opened through it has been voided, and voiding takes the Call's mutex.
#ifndef CALLSESSION_SERVER_CORE_MODEL_H_
#define CALLSESSION_SERVER_CORE_MODEL_H_

#include <array>
#include <atomic>
#include <cstdint>
#include <deque>
#include <memory>
#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/container/btree_map.h"
#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/container/inlined_vector.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "callsession/v1/types.pb.h"
#include "server/core/event_queue.h"
#include "server/core/journal.h"
#include "server/core/ref_ptr.h"
#include "server/core/sha256.h"
#include "server/core/tenants.h"

namespace callsession {

struct Call;
struct Line;

// A MakeCall answered earlier, kept for replays of its request_id.
struct IdempotentMakeCall {
  uint64_t line_handle;
  std::string dest_address;
  uint64_t call_handle;
  uint64_t call_id;
  absl::Time answered;
};

// Whose an application is, and the quotas that follow from it.
struct AppTenancy {
  std::string tenant;      // "" in open mode
  std::string credential;  // TenantMatch::credential
  std::shared_ptr<const Tenant> config;
  uint64_t max_lines = 0;  // 0: no limit
  uint64_t max_call_handles = 0;
};

// A registered application.
struct App {
  App(uint64_t handle, std::string name, const Sha256Digest& secret_sha256, AppTenancy tenancy,
      size_t event_queue_capacity, const Journal* journal)
      : handle(handle),
        name(std::move(name)),
        secret_sha256(secret_sha256),
        tenant(std::move(tenancy.tenant)),
        credential(std::move(tenancy.credential)),
        events(event_queue_capacity, journal),
        max_lines(tenancy.max_lines),
        max_call_handles(tenancy.max_call_handles),
        tenant_config(std::move(tenancy.config)) {}

  // Constant after construction.
  const uint64_t handle;
  const std::string name;
  // SHA-256 of the token's secret half: the secret itself is kept nowhere,
  // in memory or on disk.
  const Sha256Digest secret_sha256;
  // The tenant the app belongs to ("" without a tenants file) and the
  // credential it registered with (TenantMatch::credential): a
  // configuration without either shuts the app down.
  const std::string tenant;
  const std::string credential;

  EventQueue events;

  // When the app last made an RPC or closed its event stream (Unix ns): the
  // start of its lease.
  std::atomic<int64_t> last_activity_ns{0};
  // Call handles the app holds, for its quota: reserved before a handle is
  // issued, released when one is voided.
  std::atomic<uint64_t> call_handle_count{0};
  // Its quotas (0: no limit): the server's flags or its tenant's; a reload
  // may change them.
  std::atomic<uint64_t> max_lines{0};
  std::atomic<uint64_t> max_call_handles{0};

  absl::Mutex request_mu ABSL_ACQUIRED_BEFORE(mu);
  absl::flat_hash_map<std::string, IdempotentMakeCall> recent_requests ABSL_GUARDED_BY(request_mu);
  // recent_requests' keys, oldest first.
  std::deque<std::string> request_order ABSL_GUARDED_BY(request_mu);

  absl::Mutex mu;
  bool shut_down ABSL_GUARDED_BY(mu) = false;
  absl::flat_hash_set<uint64_t> line_handles ABSL_GUARDED_BY(mu);
  // Lines detached from it whose closing (handles voided, record deleted)
  // is still under way on some thread: its own removal waits for them.
  int lines_closing ABSL_GUARDED_BY(mu) = 0;
  bool NoLinesClosing() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) { return lines_closing == 0; }
  // Its tenant in the configuration in force (it keeps that directory
  // alive); null without a tenants file: every device, every right.
  std::shared_ptr<const Tenant> tenant_config ABSL_GUARDED_BY(mu);
};

// A line device: the lines open on it and the calls on it.
struct Device {
  explicit Device(uint32_t id) : id(id) {}

  const uint32_t id;
  absl::Mutex mu;
  uint64_t next_open_order ABSL_GUARDED_BY(mu) = 1;
  // Keyed by open order (Line::open_order), so begin() is the earliest.
  absl::btree_map<uint64_t, std::shared_ptr<Line>> lines ABSL_GUARDED_BY(mu);
  absl::btree_map<uint64_t, Line*> owner_lines ABSL_GUARDED_BY(mu);
  absl::btree_map<uint64_t, Line*> monitor_lines ABSL_GUARDED_BY(mu);
  // Calls not yet freed. A Call is removed here before the store drops it.
  absl::flat_hash_set<Call*> calls ABSL_GUARDED_BY(mu);
};

// An open line: one application's use of one device.
struct Line {
  Line(uint64_t handle, std::shared_ptr<App> app, Device* device, bool owner, bool monitor,
       uint64_t open_order, DeviceRights rights)
      : handle(handle),
        app(std::move(app)),
        device(device),
        owner(owner),
        monitor(monitor),
        open_order(open_order),
        rights(rights) {}

  // Constant after construction.
  const uint64_t handle;
  const std::shared_ptr<App> app;
  Device* const device;
  const bool owner;
  const bool monitor;
  const uint64_t open_order;
  // The app's rights on the device when the line was opened: what it may
  // do through it (MakeCall needs kRightDial, GetNewCalls kRightMonitor). A
  // configuration that takes any of them away closes the line.
  const DeviceRights rights;

  // Set under the device lock by whoever closes the line; a closed line gets
  // no new call handles.
  bool open ABSL_GUARDED_BY(device->mu) = true;

  absl::Mutex mu;
  absl::flat_hash_set<uint64_t> call_handles ABSL_GUARDED_BY(mu);
};

// One application's handle to a call, in 16 bytes: the privilege rides in
// the low bit of the (8-aligned) line pointer. Its app is line()->app: a
// holder never outlives its line (see "Lifetimes" above).
class Holder {
 public:
  Holder(uint64_t handle, Line* line, v1::CallPrivilege privilege)
      : handle(handle),
        tagged_line_(reinterpret_cast<uintptr_t>(line) |
                     (privilege == v1::CALL_PRIVILEGE_OWNER ? kOwnerBit : 0)) {}

  uint64_t handle;
  Line* line() const { return reinterpret_cast<Line*>(tagged_line_ & ~kOwnerBit); }
  v1::CallPrivilege privilege() const {
    return (tagged_line_ & kOwnerBit) != 0 ? v1::CALL_PRIVILEGE_OWNER : v1::CALL_PRIVILEGE_MONITOR;
  }
  App* app() const { return line()->app.get(); }

 private:
  static constexpr uintptr_t kOwnerBit = 1;
  uintptr_t tagged_line_;
};

// One call, shared by every application holding a handle to it. Laid out
// compactly, fields ordered to pack: a live call with one handle is the unit
// of the service's memory (see BENCHMARKS.md, Memory). Owned through RefPtr.
struct Call {
  Call(uint64_t id, uint32_t device_id, v1::CallOrigin origin, absl::string_view caller_id,
       absl::string_view called_id, absl::Time create_time, v1::CallState state)
      : id(id),
        device_id(device_id),
        state(state),
        origin_(static_cast<uint8_t>(origin)),
        caller_length_(static_cast<uint8_t>(caller_id.size())),
        state_entry_time_ns(absl::ToUnixNanos(create_time)),
        create_time_ns_(state_entry_time_ns),
        parties_(absl::StrCat(caller_id, called_id)) {}

  // Constant after construction.
  const uint64_t id;
  const uint32_t device_id;
  v1::CallOrigin origin() const { return static_cast<v1::CallOrigin>(origin_); }
  absl::string_view caller_id() const { return {parties_.data(), caller_length_}; }
  absl::string_view called_id() const { return absl::string_view(parties_).substr(caller_length_); }
  int64_t create_time_ns() const { return create_time_ns_; }

  // RefPtr's count.
  std::atomic<uint32_t> refs{0};

  mutable absl::Mutex mu;
  v1::CallState state ABSL_GUARDED_BY(mu);

 private:
  const uint8_t origin_;
  const uint8_t caller_length_;  // addresses are at most 128 bytes

 public:
  bool connected ABSL_GUARDED_BY(mu) = false;  // has been CONNECTED
  // Set once, when the call is IDLE with no holder left; a freed call is
  // gone from the API even while a stale pointer to it is still around.
  bool freed ABSL_GUARDED_BY(mu) = false;
  int64_t state_entry_time_ns ABSL_GUARDED_BY(mu);  // Unix time

 private:
  const int64_t create_time_ns_;
  // Both party addresses in one string.
  const std::string parties_;

 public:
  // Room for an owner and one monitor without a heap allocation.
  absl::InlinedVector<Holder, 2> holders ABSL_GUARDED_BY(mu);
};

using CallRef = RefPtr<Call>;

}  // namespace callsession

#endif  // CALLSESSION_SERVER_CORE_MODEL_H_
