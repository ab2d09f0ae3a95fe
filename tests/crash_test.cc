// Crash test (issue: durability): the real callsessiond on its RocksDB store
// is SIGKILLed at random moments, some during its recovery, while clients
// run outbound and inbound call lifecycles, monitors, GetNewCalls, line
// closes and event streams through the client library. Clients count a
// change only when its RPC answered OK; an RPC that failed because the
// server died is retried (MakeCall with the same request_id) or resolved
// by what the restarted server shows (OfferCall by its unique caller id).
//
// After every restart, with the clients paused, a checker verifies against
// what was acknowledged:
//  - every acknowledged change is present, with its state; nothing else is
//    (an app's handles are exactly those it learned of);
//  - nothing is half-applied: every live call has its owner's handle, every
//    handle its (open) line;
//  - voided handles stay void, and no handle value ever names a second call;
//  - each request_id took effect once (a retry returns the first call);
//  - every event stream, resumed from the last sequence seen, is gapless and
//    has no duplicate, and events seen before a crash come back identical.
//
// CALLSESSION_CRASH_KILLS sets the number of kills (default 24).
#include <netinet/in.h>
#include <sys/socket.h>

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "client/callsession_client.h"
#include "grpcpp/create_channel.h"
#include "grpcpp/security/credentials.h"
#include "grpcpp/support/channel_arguments.h"
#include "tests/daemon.h"
#include "tests/test_support.h"

namespace callsession {
namespace {

constexpr char kProviderToken[] = "crash-test-provider";
constexpr v1::CallPrivilege kOwner = v1::CALL_PRIVILEGE_OWNER;
constexpr v1::CallPrivilege kMonitor = v1::CALL_PRIVILEGE_MONITOR;
// Events kept per stream to compare with what comes back after a restart.
constexpr size_t kOverlap = 8;

int KillsWanted() {
  const char* value = std::getenv("CALLSESSION_CRASH_KILLS");
  int kills = 24;
  if (value != nullptr && (!absl::SimpleAtoi(value, &kills) || kills < 1)) kills = 24;
  return kills;
}

// The server died or is restarting: the outcome of the RPC is unknown.
bool Unanswered(const absl::Status& status) {
  switch (status.code()) {
    case absl::StatusCode::kUnavailable:
    case absl::StatusCode::kDeadlineExceeded:
    case absl::StatusCode::kCancelled:
    case absl::StatusCode::kUnknown:
    case absl::StatusCode::kInternal:
    case absl::StatusCode::kAborted:
      return true;
    default:
      return false;
  }
}

// What the checker found wrong, and counts for the report.
class Findings {
 public:
  void Violation(std::string what) {
    absl::MutexLock lock(&mu_);
    if (violations_.size() < 50) violations_.push_back(std::move(what));
    ++violation_count_;
  }
  void Count(const std::string& what, uint64_t n = 1) {
    absl::MutexLock lock(&mu_);
    counts_[what] += n;
  }
  // A handle value and the call it names: never a second call.
  void SawHandle(uint64_t handle, uint64_t call_id, const char* where) {
    absl::MutexLock lock(&mu_);
    auto [it, inserted] = handle_calls_.emplace(handle, call_id);
    if (!inserted && it->second != call_id) {
      violations_.push_back(absl::StrCat("handle ", handle, " named call ", it->second,
                                         " and now call ", call_id, " (", where, ")"));
      ++violation_count_;
    }
  }
  void Report() {
    absl::MutexLock lock(&mu_);
    std::printf("crash test:");
    for (const auto& [what, n] : counts_)
      std::printf(" %s=%llu", what.c_str(), (unsigned long long)n);
    std::printf("\n");
    for (const std::string& v : violations_) std::printf("VIOLATION: %s\n", v.c_str());
    std::fflush(stdout);
  }
  uint64_t violations() {
    absl::MutexLock lock(&mu_);
    return violation_count_;
  }

 private:
  absl::Mutex mu_;
  std::vector<std::string> violations_ ABSL_GUARDED_BY(mu_);
  uint64_t violation_count_ ABSL_GUARDED_BY(mu_) = 0;
  std::map<std::string, uint64_t> counts_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_map<uint64_t, uint64_t> handle_calls_ ABSL_GUARDED_BY(mu_);
};

// Lets the main thread stop every worker between two operations.
class PauseGate {
 public:
  explicit PauseGate(int workers) : workers_(workers) {}
  // Workers call this between operations.
  void Checkpoint() {
    absl::MutexLock lock(&mu_);
    if (!pause_) return;
    ++paused_;
    mu_.Await(absl::Condition(
        +[](bool* pause) { return !*pause; }, &pause_));
    --paused_;
  }
  void PauseAll() {
    absl::MutexLock lock(&mu_);
    pause_ = true;
    mu_.Await(absl::Condition(this, &PauseGate::AllPausedLocked));
  }
  void ResumeAll() {
    absl::MutexLock lock(&mu_);
    pause_ = false;
  }
  // A worker that ends no longer takes part.
  void Leave() {
    absl::MutexLock lock(&mu_);
    --workers_;
  }

 private:
  bool AllPausedLocked() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return paused_ == workers_; }
  absl::Mutex mu_;
  int workers_ ABSL_GUARDED_BY(mu_);
  int paused_ ABSL_GUARDED_BY(mu_) = 0;
  bool pause_ ABSL_GUARDED_BY(mu_) = false;
};

// The three workers below.
constexpr int kWorkers = 3;

struct Shared {
  std::shared_ptr<grpc::Channel> channel;
  Findings findings;
  PauseGate gate{kWorkers};
  std::atomic<bool> stop{false};
  // Every handle some app confirmed void (never valid again, for anyone).
  absl::Mutex void_mu;
  std::vector<uint64_t> void_handles ABSL_GUARDED_BY(void_mu);
};

// What one application knows for sure about its handles.
struct KnownHandle {
  uint64_t call_id = 0;
  uint64_t line = 0;
  v1::CallPrivilege privilege = kOwner;
  v1::CallState state = v1::CALL_STATE_UNSPECIFIED;
};

// One application: its token, lines and handles as acknowledged, and its
// event stream, checked for gaps and duplicates across restarts.
class App {
 public:
  App(Shared& shared, std::string name) : shared_(shared), name_(std::move(name)) {
    client_ =
        std::make_unique<CallSessionClient>(shared.channel, ClientOptions{absl::Seconds(2), {}});
  }

  const std::string& name() const { return name_; }
  CallSessionClient& client() { return *client_; }
  // What the worker does with each new event (set before the first drain).
  void set_on_event(std::function<void(const v1::Event&)> on_event) {
    on_event_ = std::move(on_event);
  }
  // Whether the app ever held `handle` (events may still name it after it
  // was voided: they were queued before).
  bool EverHeld(uint64_t handle) const { return ever_held_.contains(handle); }
  const absl::flat_hash_set<uint64_t>& ever_calls() const { return ever_calls_; }
  absl::flat_hash_map<uint64_t, KnownHandle>& handles() { return handles_; }

  // Retries `call` while the server cannot answer; its first answer.
  template <typename Call>
  auto Retry(Call&& call) -> decltype(call()) {
    for (;;) {
      auto result = call();
      if (!Unanswered(StatusOf(result)) || shared_.stop.load()) return result;
      shared_.findings.Count("retries");
      absl::SleepFor(absl::Milliseconds(20));
    }
  }

  bool Initialize() {
    auto init = Retry([&] { return client_->Initialize(name_); });
    if (!init.ok()) return false;
    // An unanswered Initialize may have registered an app nobody holds: it
    // is harmless (its lease would end it), and not this one.
    return true;
  }

  uint64_t OpenLine(uint32_t device, std::vector<v1::CallPrivilege> privileges) {
    auto line = Retry([&] { return client_->LineOpen(device, privileges); });
    if (!line.ok()) {
      shared_.findings.Violation(
          absl::StrCat(name_, ": LineOpen failed: ", line.status().ToString()));
      return 0;
    }
    return *line;
  }

  void Void(uint64_t handle) {
    handles_.erase(handle);
    absl::MutexLock lock(&shared_.void_mu);
    shared_.void_handles.push_back(handle);
  }

  void Learn(uint64_t handle, const KnownHandle& known, const char* where) {
    shared_.findings.SawHandle(handle, known.call_id, where);
    handles_[handle] = known;
    ever_held_.insert(handle);
    ever_calls_.insert(known.call_id);
  }

  // Takes what has arrived on the event stream (up to `until`, exclusive,
  // waiting for it if needed), reopening the stream after a restart, and
  // hands each new event, in order, to the worker's handler.
  void DrainEvents(uint64_t until) {
    const absl::Time give_up = absl::Now() + absl::Seconds(20);
    for (;;) {
      if (stream_ == nullptr) Reopen();
      const bool must_wait = next_sequence_ < until;
      absl::StatusOr<v1::Event> event =
          stream_->Next(must_wait ? absl::Milliseconds(200) : absl::ZeroDuration());
      if (!event.ok()) {
        if (event.status().code() != absl::StatusCode::kDeadlineExceeded) {
          stream_.reset();  // broken: reopen from where it stopped
          if (!must_wait) return;
          absl::SleepFor(absl::Milliseconds(20));
        } else if (!must_wait) {
          return;
        }
        if (absl::Now() > give_up) {
          shared_.findings.Violation(absl::StrCat(name_, ": events up to ", until,
                                                  " never came (at ", next_sequence_, ")"));
          return;
        }
        continue;
      }
      if (event->has_events_lost()) {
        shared_.findings.Violation(
            absl::StrCat(name_, ": events lost ", event->events_lost().ShortDebugString()));
        continue;
      }
      if (event->sequence() < next_sequence_) {
        // Replayed overlap after a reopen: must be what was seen.
        auto seen = recent_.find(event->sequence());
        if (seen != recent_.end()) {
          shared_.findings.Count("events_compared_after_restart");
          if (seen->second != event->SerializeAsString()) {
            shared_.findings.Violation(
                absl::StrCat(name_, ": event ", event->sequence(),
                             " changed across a restart: ", event->ShortDebugString()));
          }
        }
        continue;
      }
      if (event->sequence() != next_sequence_) {
        shared_.findings.Violation(absl::StrCat(name_, ": event ", event->sequence(), " after ",
                                                next_sequence_ - 1, " (a gap)"));
      }
      next_sequence_ = event->sequence() + 1;
      recent_[event->sequence()] = event->SerializeAsString();
      if (recent_.size() > kOverlap) recent_.erase(recent_.begin());
      shared_.findings.Count("events_checked");
      if (on_event_) on_event_(*event);
    }
  }

  uint64_t next_sequence() const { return next_sequence_; }

 private:
  void Reopen() {
    // Back up a little, to compare what comes again with what was seen.
    const uint64_t from = next_sequence_ > kOverlap ? next_sequence_ - kOverlap : 1;
    stream_ = client_->WatchEvents(from);
    shared_.findings.Count("stream_opens");
  }

  Shared& shared_;
  const std::string name_;
  std::unique_ptr<CallSessionClient> client_;
  absl::flat_hash_map<uint64_t, KnownHandle> handles_;
  absl::flat_hash_set<uint64_t> ever_held_;
  absl::flat_hash_set<uint64_t> ever_calls_;
  std::function<void(const v1::Event&)> on_event_;
  std::unique_ptr<EventStream> stream_;
  uint64_t next_sequence_ = 1;
  std::map<uint64_t, std::string> recent_;
};

// Checks an app's listing against what it knows, once the cluster is
// quiet and its events are drained.
void CheckApp(App& app, Findings& findings, const std::set<uint64_t>& open_lines) {
  auto listing = app.Retry([&] { return app.client().ListAllCalls(); });
  if (!listing.ok()) {
    findings.Violation(absl::StrCat(app.name(), ": ListCalls: ", listing.status().ToString()));
    return;
  }
  absl::flat_hash_set<uint64_t> listed;
  for (const v1::CallHandleEntry& entry : listing->calls()) {
    listed.insert(entry.call_handle());
    findings.SawHandle(entry.call_handle(), entry.info().call_id(), "listing");
    auto known = app.handles().find(entry.call_handle());
    if (known == app.handles().end()) {
      findings.Violation(absl::StrCat(app.name(), ": holds handle ", entry.call_handle(), " (call ",
                                      entry.info().call_id(),
                                      ") that no acknowledged change gave it"));
      continue;
    }
    if (entry.info().call_id() != known->second.call_id) {
      findings.Violation(absl::StrCat(app.name(), ": handle ", entry.call_handle(), " is call ",
                                      entry.info().call_id(), ", expected ",
                                      known->second.call_id));
    }
    if (entry.status().call_state() != known->second.state) {
      findings.Violation(absl::StrCat(app.name(), ": call ", entry.info().call_id(), " is ",
                                      v1::CallState_Name(entry.status().call_state()),
                                      ", acknowledged ", v1::CallState_Name(known->second.state)));
    }
    if (entry.status().call_privilege() != known->second.privilege ||
        entry.info().line_handle() != known->second.line) {
      findings.Violation(absl::StrCat(app.name(), ": handle ", entry.call_handle(),
                                      " has another line or privilege"));
    }
    if (!open_lines.count(entry.info().line_handle())) {
      findings.Violation(absl::StrCat(app.name(), ": handle ", entry.call_handle(), " is on line ",
                                      entry.info().line_handle(), ", which is not open"));
    }
    if (entry.status().call_state() != v1::CALL_STATE_IDLE && entry.info().num_owners() == 0 &&
        entry.info().origin() == v1::CALL_ORIGIN_OUTBOUND) {
      findings.Violation(
          absl::StrCat("call ", entry.info().call_id(), " is live without its owner's handle"));
    }
  }
  for (const auto& [handle, known] : app.handles()) {
    if (!listed.contains(handle)) {
      findings.Violation(absl::StrCat(app.name(), ": acknowledged handle ", handle, " (call ",
                                      known.call_id, ") is gone"));
    }
  }
  findings.Count("handles_checked", listed.size());
}

// Places outbound calls with request ids, drops and deallocates them, and
// now and then closes its line with calls on it.
void OutboundWorker(Shared& shared, App& app, uint32_t device, int seed,
                    std::set<uint64_t>* open_lines, absl::Mutex* lines_mu) {
  std::mt19937 random(seed);
  if (!app.Initialize()) return shared.gate.Leave();
  uint64_t line = app.OpenLine(device, {kOwner});
  {
    absl::MutexLock lock(lines_mu);
    open_lines->insert(line);
  }
  int request = 0;
  app.set_on_event([&](const v1::Event& event) {
    if (!event.has_call_state()) {
      shared.findings.Violation(
          absl::StrCat(app.name(), ": unexpected ", event.ShortDebugString()));
      return;
    }
    const uint64_t handle = event.call_state().call_handle();
    if (!app.EverHeld(handle)) {
      shared.findings.Violation(absl::StrCat(app.name(), ": event for a handle it never held ",
                                             event.ShortDebugString()));
    }
  });
  while (!shared.stop.load()) {
    shared.gate.Checkpoint();
    app.DrainEvents(0);
    const int choice = random() % 10;
    if (choice < 7 || app.handles().empty()) {
      // MakeCall: retried with the same request id until answered.
      const std::string request_id = absl::StrCat(app.name(), "-", request++);
      auto call = app.Retry([&] { return app.client().MakeCall(line, "+15550100", request_id); });
      if (!call.ok()) {
        shared.findings.Violation(
            absl::StrCat(app.name(), ": MakeCall ", call.status().ToString()));
        continue;
      }
      if (app.handles().count(call->call_handle())) {
        shared.findings.Violation(absl::StrCat(app.name(), ": request ", request_id,
                                               " returned a handle it already had"));
      }
      app.Learn(call->call_handle(), {call->call_id(), line, kOwner, v1::CALL_STATE_DIALING},
                "MakeCall");
      shared.findings.Count("acked_make_call");
      // The retry returns the first answer, never a second call.
      if (random() % 8 == 0) {
        auto again =
            app.Retry([&] { return app.client().MakeCall(line, "+15550100", request_id); });
        if (!again.ok() || again->call_handle() != call->call_handle()) {
          shared.findings.Violation(
              absl::StrCat(app.name(), ": replay of ", request_id, " differs"));
        }
        shared.findings.Count("replays_checked");
      }
    } else if (choice < 9) {
      // Drop then deallocate one call.
      const uint64_t handle = app.handles().begin()->first;
      KnownHandle& known = app.handles().begin()->second;
      if (known.state != v1::CALL_STATE_IDLE) {
        auto dropped = app.Retry([&] { return app.client().Drop(handle); });
        // INVALCALLSTATE: an unanswered earlier Drop took effect.
        if (!dropped.ok() && dropped.code() != absl::StatusCode::kFailedPrecondition) {
          shared.findings.Violation(absl::StrCat(app.name(), ": Drop ", dropped.ToString()));
          continue;
        }
        known.state = v1::CALL_STATE_IDLE;
        shared.findings.Count("acked_drop");
      }
      auto freed = app.Retry([&] { return app.client().DeallocateCall(handle); });
      if (!freed.ok() && freed.code() != absl::StatusCode::kNotFound) {
        shared.findings.Violation(absl::StrCat(app.name(), ": Deallocate ", freed.ToString()));
        continue;
      }
      app.Void(handle);
      shared.findings.Count("acked_deallocate");
    } else {
      // Close the line with its calls on it (the live ones are dropped, every
      // handle voided), then open another.
      auto closed = app.Retry([&] { return app.client().LineClose(line); });
      if (!closed.ok() && closed.code() != absl::StatusCode::kNotFound) {
        shared.findings.Violation(absl::StrCat(app.name(), ": LineClose ", closed.ToString()));
        continue;
      }
      std::vector<uint64_t> on_line;
      for (const auto& [handle, known] : app.handles()) {
        if (known.line == line) on_line.push_back(handle);
      }
      for (uint64_t handle : on_line) app.Void(handle);
      {
        absl::MutexLock lock(lines_mu);
        open_lines->erase(line);
      }
      shared.findings.Count("acked_line_close");
      line = app.OpenLine(device, {kOwner});
      absl::MutexLock lock(lines_mu);
      open_lines->insert(line);
    }
  }
  shared.gate.Leave();
}

// The provider offers calls on `device`; the owner app answers them, the
// provider disconnects them, the app drops and deallocates them. A monitor
// app on the device deallocates its handle once the call is IDLE, and now
// and then asks GetNewCalls.
void InboundWorker(Shared& shared, App& owner, App& monitor, uint32_t device, int seed,
                   std::set<uint64_t>* open_lines, std::vector<uint64_t>* acked_offers,
                   absl::Mutex* lines_mu) {
  std::mt19937 random(seed);
  ProviderClient provider(shared.channel, kProviderToken, ClientOptions{absl::Seconds(2), {}});
  if (!owner.Initialize() || !monitor.Initialize()) return shared.gate.Leave();
  const uint64_t owner_line = owner.OpenLine(device, {kOwner});
  const uint64_t monitor_line = monitor.OpenLine(device, {kMonitor});
  {
    absl::MutexLock lock(lines_mu);
    open_lines->insert(owner_line);
    open_lines->insert(monitor_line);
  }
  int offer = 0;
  owner.set_on_event([&](const v1::Event& event) {
    if (event.has_app_new_call()) {
      const auto& added = event.app_new_call();
      owner.Learn(added.call_handle(),
                  {added.call_id(), owner_line, kOwner, v1::CALL_STATE_OFFERING}, "event");
    } else if (event.has_call_state()) {
      auto it = owner.handles().find(event.call_state().call_handle());
      if (it != owner.handles().end()) {
        it->second.state = event.call_state().call_state();
      } else if (!owner.EverHeld(event.call_state().call_handle())) {
        shared.findings.Violation(absl::StrCat(owner.name(), ": event for a handle it never held ",
                                               event.ShortDebugString()));
      }
    }
  });
  std::vector<uint64_t> monitor_idle;
  monitor.set_on_event([&](const v1::Event& event) {
    if (event.has_app_new_call()) {
      const auto& added = event.app_new_call();
      monitor.Learn(added.call_handle(),
                    {added.call_id(), monitor_line, kMonitor, v1::CALL_STATE_UNSPECIFIED}, "event");
    } else if (event.has_call_state()) {
      auto it = monitor.handles().find(event.call_state().call_handle());
      if (it == monitor.handles().end()) {
        if (!monitor.EverHeld(event.call_state().call_handle())) {
          shared.findings.Violation(absl::StrCat(
              monitor.name(), ": event for a handle it never held ", event.ShortDebugString()));
        }
        return;
      }
      it->second.state = event.call_state().call_state();
      if (it->second.state == v1::CALL_STATE_IDLE) monitor_idle.push_back(it->first);
    }
  });

  while (!shared.stop.load()) {
    shared.gate.Checkpoint();
    owner.DrainEvents(0);
    monitor.DrainEvents(0);
    // The monitor lets go of ended calls.
    for (uint64_t handle : monitor_idle) {
      if (!monitor.handles().count(handle)) continue;
      auto freed = monitor.Retry([&] { return monitor.client().DeallocateCall(handle); });
      if (!freed.ok() && freed.code() != absl::StatusCode::kNotFound) {
        shared.findings.Violation(absl::StrCat(monitor.name(), ": Deallocate ", freed.ToString()));
        continue;
      }
      monitor.Void(handle);
      shared.findings.Count("acked_monitor_deallocate");
    }
    monitor_idle.clear();
    if (random() % 16 == 0) {
      auto fresh = monitor.Retry([&] { return monitor.client().GetNewCalls(monitor_line); });
      if (!fresh.ok()) {
        shared.findings.Violation(
            absl::StrCat(monitor.name(), ": GetNewCalls ", fresh.status().ToString()));
      } else {
        // It monitors the device already: nothing is new to it.
        for (uint64_t handle : *fresh) {
          shared.findings.Violation(absl::StrCat(monitor.name(), ": GetNewCalls gave ", handle));
        }
        shared.findings.Count("acked_get_new_calls");
      }
    }

    // Move the owner's calls along: answer, disconnect, drop, deallocate.
    bool acted = false;
    for (auto& [held, known] : owner.handles()) {
      const uint64_t handle = held;  // lambdas cannot capture a binding (C++17)
      if (known.state == v1::CALL_STATE_OFFERING) {
        auto answered = owner.Retry([&] { return owner.client().Answer(handle); });
        if (!answered.ok() && answered.code() != absl::StatusCode::kFailedPrecondition) {
          shared.findings.Violation(absl::StrCat(owner.name(), ": Answer ", answered.ToString()));
        }
        if (answered.ok()) shared.findings.Count("acked_answer");
        acted = true;
        break;  // its events tell the new state
      }
      if (known.state == v1::CALL_STATE_CONNECTED) {
        auto set = provider.SetCallState(known.call_id, v1::CALL_STATE_DISCONNECTED);
        while (Unanswered(set) && !shared.stop.load()) {
          absl::SleepFor(absl::Milliseconds(20));
          set = provider.SetCallState(known.call_id, v1::CALL_STATE_DISCONNECTED);
        }
        if (set.ok()) shared.findings.Count("acked_set_call_state");
        acted = true;
        break;
      }
      if (known.state == v1::CALL_STATE_DISCONNECTED) {
        auto dropped = owner.Retry([&] { return owner.client().Drop(handle); });
        if (!dropped.ok() && dropped.code() != absl::StatusCode::kFailedPrecondition) {
          shared.findings.Violation(absl::StrCat(owner.name(), ": Drop ", dropped.ToString()));
        }
        acted = true;
        break;
      }
      if (known.state == v1::CALL_STATE_IDLE) {
        auto freed = owner.Retry([&] { return owner.client().DeallocateCall(handle); });
        if (!freed.ok() && freed.code() != absl::StatusCode::kNotFound) {
          shared.findings.Violation(absl::StrCat(owner.name(), ": Deallocate ", freed.ToString()));
        }
        owner.Void(handle);
        shared.findings.Count("acked_deallocate");
        acted = true;
        break;
      }
    }
    if (acted || owner.handles().size() >= 4) continue;
    // A new inbound call, with a caller id that names this attempt.
    const std::string caller = absl::StrCat("+1555", 100000 + offer++);
    auto offered = provider.OfferCall(device, caller, "+15550199");
    if (offered.ok()) {
      shared.findings.Count("acked_offer");
      absl::MutexLock lock(lines_mu);
      acked_offers->push_back(*offered);
    } else if (Unanswered(offered.status())) {
      // OfferCall has no request id, so it is not retried: if it took
      // effect, the owner learns the call from its events like any other.
      shared.findings.Count("unanswered_offer");
    } else {
      shared.findings.Violation(absl::StrCat("OfferCall: ", offered.status().ToString()));
    }
  }
  shared.gate.Leave();
}

TEST(CrashTest, NothingAcknowledgedIsLostWhenTheServerIsKilledAtRandom) {
  const int kills = KillsWanted();
  const std::string dir = MakeTempDir("callsession-crash");
  ASSERT_FALSE(dir.empty());
  const int port = FreePort();
  ASSERT_GT(port, 0);
  const std::string address = absl::StrCat("127.0.0.1:", port);
  const std::vector<std::string> flags = {"--listen=" + address, "--data_dir=" + dir + "/data",
                                          "--devices=4", "--app_ttl=0",
                                          // Nothing may be evicted: every event is checked.
                                          "--event_buffer=1000000", "--request_id_cache=1000000",
                                          "--max_call_handles_per_app=0", "--max_lines_per_app=0"};
  const std::vector<std::string> environment = {
      absl::StrCat("CALLSESSION_PROVIDER_TOKEN=", kProviderToken)};

  std::unique_ptr<Daemon> daemon;
  double slowest_recovery = 0;
  // Starts the server and waits until it serves; false if it did not.
  auto start = [&]() {
    daemon = std::make_unique<Daemon>(flags, environment, dir);
    if (daemon->WaitUntilListening() != address) {
      ADD_FAILURE() << "callsessiond did not come back:\n" << daemon->log();
      return false;
    }
    double seconds = 0;
    if (absl::SimpleAtod(Daemon::LogField(daemon->log(), "seconds"), &seconds)) {
      slowest_recovery = std::max(slowest_recovery, seconds);
    }
    return true;
  };
  ASSERT_TRUE(start());

  Shared shared;
  grpc::ChannelArguments args;
  // Reconnect quickly after each restart.
  args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, 20);
  args.SetInt(GRPC_ARG_MIN_RECONNECT_BACKOFF_MS, 20);
  args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, 100);
  shared.channel = grpc::CreateCustomChannel(address, grpc::InsecureChannelCredentials(), args);

  App outbound_a(shared, "outbound-a");
  App outbound_b(shared, "outbound-b");
  App inbound_owner(shared, "inbound-owner");
  App inbound_monitor(shared, "inbound-monitor");
  std::vector<App*> apps = {&outbound_a, &outbound_b, &inbound_owner, &inbound_monitor};
  absl::Mutex lines_mu;
  std::set<uint64_t> open_lines;
  std::vector<uint64_t> acked_offers;

  std::vector<std::thread> workers;
  workers.emplace_back(OutboundWorker, std::ref(shared), std::ref(outbound_a), 0, 1, &open_lines,
                       &lines_mu);
  workers.emplace_back(OutboundWorker, std::ref(shared), std::ref(outbound_b), 2, 2, &open_lines,
                       &lines_mu);
  workers.emplace_back(InboundWorker, std::ref(shared), std::ref(inbound_owner),
                       std::ref(inbound_monitor), 1, 3, &open_lines, &acked_offers, &lines_mu);

  std::mt19937 random(12345);
  // With the workers paused between operations: drains every app's events
  // up to the server's next sequence (through the worker's own handler),
  // then checks every app, the acknowledged offers and the void handles.
  auto check = [&]() {
    const absl::Time began = absl::Now();
    shared.gate.PauseAll();
    shared.findings.Count("pause_ms", absl::ToInt64Milliseconds(absl::Now() - began));
    std::set<uint64_t> lines;
    std::vector<uint64_t> offers;
    {
      absl::MutexLock lock(&lines_mu);
      lines = open_lines;
      offers = acked_offers;
    }
    for (App* app : apps) {
      auto first_page = app->Retry([&] { return app->client().ListCalls("", 1); });
      if (!first_page.ok()) {
        shared.findings.Violation(
            absl::StrCat(app->name(), ": ListCalls ", first_page.status().ToString()));
        continue;
      }
      app->DrainEvents(first_page->resume_sequence());
      CheckApp(*app, shared.findings, lines);
    }
    for (uint64_t call_id : offers) {
      if (!inbound_owner.ever_calls().contains(call_id)) {
        shared.findings.Violation(
            absl::StrCat("acknowledged offer of call ", call_id, " never reached its owner"));
      }
    }
    std::vector<uint64_t> voids;
    {
      absl::MutexLock lock(&shared.void_mu);
      voids = shared.void_handles;
    }
    std::shuffle(voids.begin(), voids.end(), random);
    if (voids.size() > 100) voids.resize(100);
    for (uint64_t handle : voids) {
      for (App* app : apps) {
        auto info = app->Retry([&] { return app->client().GetCallInfo(handle); });
        if (info.status().code() != absl::StatusCode::kNotFound) {
          shared.findings.Violation(absl::StrCat("void handle ", handle, " answers ", app->name(),
                                                 ": ", info.status().ToString()));
        }
      }
    }
    shared.findings.Count("void_handles_checked", voids.size());
    shared.findings.Count("checks");
    shared.findings.Count("check_ms", absl::ToInt64Milliseconds(absl::Now() - began));
    shared.gate.ResumeAll();
  };

  for (int kill = 0; kill < kills && !HasFailure(); ++kill) {
    absl::SleepFor(absl::Milliseconds(150 + random() % 450));
    ::kill(daemon->pid(), SIGKILL);
    daemon->Wait();
    shared.findings.Count("kills");
    if (kill % 4 == 3) {
      // Killed again while it starts and recovers.
      Daemon again(flags, environment, dir);
      absl::SleepFor(absl::Milliseconds(random() % 20));
      ::kill(again.pid(), SIGKILL);
      again.Wait();
      shared.findings.Count("kills");
      if (!absl::StrContains(again.log(), "\"event\":\"listening\"")) {
        shared.findings.Count("kills_before_serving");
      }
    }
    if (!start()) break;
    check();
  }
  shared.stop = true;
  shared.gate.ResumeAll();
  for (std::thread& worker : workers) worker.join();
  shared.findings.Count("slowest_recovery_ms", static_cast<uint64_t>(slowest_recovery * 1000));
  EXPECT_EQ(daemon->StopWith(SIGTERM), 0);
  shared.findings.Report();
  EXPECT_EQ(shared.findings.violations(), 0u);
  std::error_code ignored;
  std::filesystem::remove_all(dir, ignored);
}

}  // namespace
}  // namespace callsession
