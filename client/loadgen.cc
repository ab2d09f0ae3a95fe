// callsession-loadgen: drives callsessiond with the generated stubs' callback
// API and reports throughput and latency.
//
//   callsession-loadgen --server=127.0.0.1:50051 --scenario=get-call-info
//       --concurrency=64 --channels=4 --duration=10s [--rate=20000] [--json=out.json]
//
// Scenarios:
//   get-call-info  GetCallInfo on a pool of --calls live handles (a hot read)
//   lifecycle      MakeCall, GetCallInfo, Drop, DeallocateCall, each on a fresh call
//   inbound        OfferCall (provider), Answer, Drop, DeallocateCall; the handle
//                  comes from the AppNewCallEvent on the owner's event stream
//   memory         server RSS (--server_pid) before, with --calls live calls,
//                  with one extra (monitor) handle per call, and after all are gone
//   populate       makes --calls live calls and leaves them (for recovery
//                  benchmarks); reports the app token
//   drain          drops and deallocates every call the app --token holds
// Closed loop by default (--concurrency RPCs in flight, spread over --channels
// connections); --rate=R sends R requests/s open loop instead, with latency
// measured from each request's scheduled time (no coordinated omission).
#include <algorithm>
#include <atomic>
#include <cinttypes>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "client/callsession_client.h"
#include "grpcpp/create_channel.h"

ABSL_FLAG(std::string, server, "127.0.0.1:50051", "HOST:PORT of callsessiond");
ABSL_FLAG(std::string, provider_token, "",
          "provider token for inbound (default: $CALLSESSION_PROVIDER_TOKEN)");
ABSL_FLAG(std::string, scenario, "get-call-info",
          "get-call-info, lifecycle, inbound, memory, populate or drain");
ABSL_FLAG(int32_t, concurrency, 64, "RPCs in flight (closed loop), or at most (open loop)");
ABSL_FLAG(int32_t, channels, 4, "client connections");
ABSL_FLAG(absl::Duration, duration, absl::Seconds(10), "measured time");
ABSL_FLAG(absl::Duration, warmup, absl::Seconds(2), "unmeasured time before it");
ABSL_FLAG(double, rate, 0, "requests per second, open loop; 0: closed loop");
ABSL_FLAG(int32_t, calls, 1000, "get-call-info: live handles read; memory: live calls made");
ABSL_FLAG(int32_t, devices, 16, "devices the load is spread over");
ABSL_FLAG(int32_t, server_pid, 0, "memory: the callsessiond process to read RSS from");
ABSL_FLAG(std::string, token, "", "drain: the app whose calls to drop and deallocate");
ABSL_FLAG(std::string, api_key, "",
          "the tenant's API key Initialize presents, on a server with tenants (default: "
          "$CALLSESSION_API_KEY)");
ABSL_FLAG(std::string, json, "", "also write the report as JSON to this file");
ABSL_FLAG(uint64_t, fixed_handle, 0,
          "get-call-info: read only this handle and skip all setup (for the empty-handler "
          "baseline server, which implements nothing else)");

namespace callsession {
namespace {

// --api_key, else $CALLSESSION_API_KEY.
std::string ApiKey() {
  std::string key = absl::GetFlag(FLAGS_api_key);
  if (key.empty()) {
    if (const char* env = std::getenv("CALLSESSION_API_KEY")) key = env;
  }
  return key;
}

enum Rpc { kMakeCall, kGetCallInfo, kDrop, kDeallocateCall, kOfferCall, kAnswer, kRpcCount };
constexpr const char* kRpcNames[kRpcCount] = {"MakeCall",       "GetCallInfo", "Drop",
                                              "DeallocateCall", "OfferCall",   "Answer"};

using Stub = v1::CallSessionService::Stub;
using ProviderStub = v1::ProviderService::Stub;

// Latencies of one slot, merged at the end; no sharing while running.
struct Samples {
  std::vector<int64_t> nanos[kRpcCount];
  uint64_t errors[kRpcCount] = {};
  uint64_t lifecycles = 0;
};

struct Percentiles {
  uint64_t count = 0;
  uint64_t errors = 0;
  double p50 = 0, p90 = 0, p99 = 0, p999 = 0, max = 0;  // microseconds
};

Percentiles Summarize(std::vector<int64_t>& nanos, uint64_t errors) {
  Percentiles p;
  p.count = nanos.size();
  p.errors = errors;
  if (nanos.empty()) return p;
  std::sort(nanos.begin(), nanos.end());
  auto at = [&](double q) {
    const size_t index = std::min(nanos.size() - 1, static_cast<size_t>(q * nanos.size()));
    return nanos[index] / 1000.0;
  };
  p.p50 = at(0.50);
  p.p90 = at(0.90);
  p.p99 = at(0.99);
  p.p999 = at(0.999);
  p.max = nanos.back() / 1000.0;
  return p;
}

std::shared_ptr<grpc::Channel> NewConnection(const std::string& server) {
  grpc::ChannelArguments args;
  args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);  // a connection of its own
  args.SetMaxReceiveMessageSize(64 << 20);
  return grpc::CreateCustomChannel(server, grpc::InsecureChannelCredentials(), args);
}

void Authorize(grpc::ClientContext* context, const std::string& token) {
  context->AddMetadata("authorization", absl::StrCat("Bearer ", token));
}

// Delivers AppNewCallEvents to whoever waits for the call id.
class InboundRouter {
 public:
  using Callback = std::function<void(uint64_t call_handle)>;

  // Calls `then` with the handle once the event for `call_id` is in.
  void Await(uint64_t call_id, Callback then) {
    uint64_t handle = 0;
    {
      absl::MutexLock lock(&mu_);
      auto it = arrived_.find(call_id);
      if (it == arrived_.end()) {
        waiting_.emplace(call_id, std::move(then));
        return;
      }
      handle = it->second;
      arrived_.erase(it);
    }
    then(handle);
  }

  void Deliver(uint64_t call_id, uint64_t handle) {
    Callback then;
    {
      absl::MutexLock lock(&mu_);
      auto it = waiting_.find(call_id);
      if (it == waiting_.end()) {
        arrived_.emplace(call_id, handle);
        return;
      }
      then = std::move(it->second);
      waiting_.erase(it);
    }
    then(handle);
  }

 private:
  absl::Mutex mu_;
  absl::flat_hash_map<uint64_t, uint64_t> arrived_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_map<uint64_t, Callback> waiting_ ABSL_GUARDED_BY(mu_);
};

struct Setup {
  std::string scenario;
  std::string token;
  std::string provider_token;
  std::vector<uint64_t> lines;         // per device
  std::vector<uint64_t> read_handles;  // get-call-info pool
  InboundRouter router;
};

class Runner;

// One RPC at a time, chained: the closed loop's unit of concurrency.
class Slot {
 public:
  Slot(Runner& runner, int index, Stub* stub, ProviderStub* provider)
      : runner_(runner), index_(index), stub_(stub), provider_(provider) {}

  void Begin();
  Samples& samples() { return samples_; }
  // Open loop: issue one GetCallInfo scheduled for `intended`.
  void Issue(absl::Time intended);

 private:
  void StartGetCallInfo();
  void StartMakeCall();
  void StartGetInfoOf(uint64_t handle);
  void StartDrop(uint64_t handle);
  void StartDeallocate(uint64_t handle);
  void StartOffer();
  void StartAnswer(uint64_t handle);
  void Record(Rpc rpc, const grpc::Status& status);
  void Continue();
  grpc::ClientContext* NewContext(bool provider = false);

  Runner& runner_;
  const int index_;
  Stub* const stub_;
  ProviderStub* const provider_;
  std::unique_ptr<grpc::ClientContext> context_;
  absl::Time start_;
  uint64_t cursor_ = 0;
  Samples samples_;
  // Request and response buffers, one RPC at a time.
  v1::GetCallInfoRequest info_request_;
  v1::GetCallInfoResponse info_response_;
  v1::MakeCallRequest make_request_;
  v1::MakeCallResponse make_response_;
  v1::DropRequest drop_request_;
  v1::DropResponse drop_response_;
  v1::DeallocateCallRequest deallocate_request_;
  v1::DeallocateCallResponse deallocate_response_;
  v1::AnswerRequest answer_request_;
  v1::AnswerResponse answer_response_;
  v1::OfferCallRequest offer_request_;
  v1::OfferCallResponse offer_response_;
  uint64_t call_handle_ = 0;
};

class Runner {
 public:
  Runner(Setup& setup, int concurrency, int channels, const std::string& server) : setup_(setup) {
    for (int i = 0; i < channels; ++i) {
      auto channel = NewConnection(server);
      stubs_.push_back(v1::CallSessionService::NewStub(channel));
      providers_.push_back(v1::ProviderService::NewStub(channel));
    }
    for (int i = 0; i < concurrency; ++i) {
      slots_.push_back(std::make_unique<Slot>(*this, i, stubs_[i % channels].get(),
                                              providers_[i % channels].get()));
    }
  }

  // Runs warmup then the measured window; returns the measured seconds.
  double RunClosedLoop(absl::Duration warmup, absl::Duration duration) {
    active_ = static_cast<int>(slots_.size());
    for (auto& slot : slots_) slot->Begin();
    absl::SleepFor(warmup);
    recording_ = true;
    const absl::Time start = absl::Now();
    absl::SleepFor(duration);
    recording_ = false;
    const double seconds = absl::ToDoubleSeconds(absl::Now() - start);
    stopping_ = true;
    all_stopped_.WaitForNotification();
    return seconds;
  }

  // Open loop: a pacer issues GetCallInfo at `rate`; a request that finds no
  // free slot is counted as an error (the server fell behind).
  double RunOpenLoop(double rate, absl::Duration warmup, absl::Duration duration) {
    {
      absl::MutexLock lock(&free_mu_);
      for (auto& slot : slots_) free_.push_back(slot.get());
    }
    const absl::Duration interval = absl::Seconds(1.0 / rate);
    const absl::Time begin = absl::Now();
    const absl::Time record_from = begin + warmup;
    const absl::Time end = record_from + duration;
    absl::Time next = begin;
    while (next < end) {
      const absl::Time now = absl::Now();
      if (next > now) {
        absl::SleepFor(std::min(next - now, absl::Microseconds(200)));
        continue;
      }
      recording_ = next >= record_from;
      Slot* slot = nullptr;
      {
        absl::MutexLock lock(&free_mu_);
        if (!free_.empty()) {
          slot = free_.back();
          free_.pop_back();
        }
      }
      if (slot != nullptr) {
        slot->Issue(next);
      } else if (recording_) {
        late_.fetch_add(1);
      }
      next += interval;
    }
    recording_ = false;
    absl::MutexLock lock(&free_mu_);
    auto all_free = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(free_mu_) {
      return free_.size() == slots_.size();
    };
    free_mu_.Await(absl::Condition(&all_free));
    return absl::ToDoubleSeconds(duration);
  }

  void Release(Slot* slot) {
    absl::MutexLock lock(&free_mu_);
    free_.push_back(slot);
  }

  void SlotStopped() {
    if (--active_ == 0) all_stopped_.Notify();
  }

  bool recording() const { return recording_.load(std::memory_order_relaxed); }
  bool stopping() const { return stopping_.load(std::memory_order_relaxed); }
  Setup& setup() { return setup_; }
  uint64_t late() const { return late_.load(); }
  std::vector<std::unique_ptr<Slot>>& slots() { return slots_; }

 private:
  Setup& setup_;
  std::vector<std::unique_ptr<Stub>> stubs_;
  std::vector<std::unique_ptr<ProviderStub>> providers_;
  std::vector<std::unique_ptr<Slot>> slots_;
  std::atomic<bool> recording_{false};
  std::atomic<bool> stopping_{false};
  std::atomic<int> active_{0};
  std::atomic<uint64_t> late_{0};
  absl::Notification all_stopped_;
  absl::Mutex free_mu_;
  std::vector<Slot*> free_ ABSL_GUARDED_BY(free_mu_);
};

grpc::ClientContext* Slot::NewContext(bool provider) {
  context_ = std::make_unique<grpc::ClientContext>();
  context_->set_deadline(absl::ToChronoTime(absl::Now() + absl::Seconds(10)));
  Authorize(context_.get(), provider ? runner_.setup().provider_token : runner_.setup().token);
  return context_.get();
}

void Slot::Record(Rpc rpc, const grpc::Status& status) {
  if (!runner_.recording()) return;
  if (status.ok()) {
    samples_.nanos[rpc].push_back(absl::ToInt64Nanoseconds(absl::Now() - start_));
  } else {
    ++samples_.errors[rpc];
  }
}

void Slot::Begin() { Continue(); }

// Starts the scenario's next unit of work, or stops.
void Slot::Continue() {
  if (runner_.stopping()) {
    runner_.SlotStopped();
    return;
  }
  const std::string& scenario = runner_.setup().scenario;
  if (scenario == "get-call-info") {
    StartGetCallInfo();
  } else if (scenario == "lifecycle") {
    StartMakeCall();
  } else {
    StartOffer();
  }
}

void Slot::Issue(absl::Time intended) {
  start_ = intended;
  const auto& pool = runner_.setup().read_handles;
  info_request_.set_call_handle(pool[(index_ + cursor_++ * 7919) % pool.size()]);
  stub_->async()->GetCallInfo(NewContext(), &info_request_, &info_response_,
                              [this](grpc::Status status) {
                                Record(kGetCallInfo, status);
                                runner_.Release(this);
                              });
}

void Slot::StartGetCallInfo() {
  const auto& pool = runner_.setup().read_handles;
  info_request_.set_call_handle(pool[(index_ + cursor_++ * 7919) % pool.size()]);
  start_ = absl::Now();
  stub_->async()->GetCallInfo(NewContext(), &info_request_, &info_response_,
                              [this](grpc::Status status) {
                                Record(kGetCallInfo, status);
                                Continue();
                              });
}

void Slot::StartMakeCall() {
  const auto& lines = runner_.setup().lines;
  make_request_.set_line_handle(lines[index_ % lines.size()]);
  make_request_.set_dest_address("+15550100");
  start_ = absl::Now();
  stub_->async()->MakeCall(NewContext(), &make_request_, &make_response_,
                           [this](grpc::Status status) {
                             Record(kMakeCall, status);
                             if (!status.ok()) return Continue();
                             StartGetInfoOf(make_response_.call_handle());
                           });
}

void Slot::StartGetInfoOf(uint64_t handle) {
  call_handle_ = handle;
  info_request_.set_call_handle(handle);
  start_ = absl::Now();
  stub_->async()->GetCallInfo(NewContext(), &info_request_, &info_response_,
                              [this](grpc::Status status) {
                                Record(kGetCallInfo, status);
                                StartDrop(call_handle_);
                              });
}

void Slot::StartDrop(uint64_t handle) {
  drop_request_.set_call_handle(handle);
  start_ = absl::Now();
  stub_->async()->Drop(NewContext(), &drop_request_, &drop_response_, [this](grpc::Status status) {
    Record(kDrop, status);
    StartDeallocate(call_handle_);
  });
}

void Slot::StartDeallocate(uint64_t handle) {
  deallocate_request_.set_call_handle(handle);
  start_ = absl::Now();
  stub_->async()->DeallocateCall(NewContext(), &deallocate_request_, &deallocate_response_,
                                 [this](grpc::Status status) {
                                   Record(kDeallocateCall, status);
                                   if (status.ok() && runner_.recording()) ++samples_.lifecycles;
                                   Continue();
                                 });
}

void Slot::StartOffer() {
  offer_request_.set_device_id(index_ % runner_.setup().lines.size());
  offer_request_.set_caller_id("+15550111");
  start_ = absl::Now();
  provider_->async()->OfferCall(
      NewContext(true), &offer_request_, &offer_response_, [this](grpc::Status status) {
        Record(kOfferCall, status);
        if (!status.ok()) return Continue();
        runner_.setup().router.Await(offer_response_.call_id(),
                                     [this](uint64_t handle) { StartAnswer(handle); });
      });
}

void Slot::StartAnswer(uint64_t handle) {
  call_handle_ = handle;
  answer_request_.set_call_handle(handle);
  start_ = absl::Now();
  stub_->async()->Answer(NewContext(), &answer_request_, &answer_response_,
                         [this](grpc::Status status) {
                           Record(kAnswer, status);
                           StartDrop(call_handle_);
                         });
}

// --- Setup, memory scenario and report ----------------------------------------

int64_t RssBytes(int pid) {
  std::ifstream status(absl::StrCat("/proc/", pid, "/status"));
  std::string line;
  while (std::getline(status, line)) {
    if (line.rfind("VmRSS:", 0) == 0) {
      int64_t kib = 0;
      std::sscanf(line.c_str(), "VmRSS: %" SCNd64, &kib);
      return kib * 1024;
    }
  }
  return -1;
}

int Fail(const std::string& what, const absl::Status& status) {
  std::fprintf(stderr, "loadgen: %s: %s\n", what.c_str(), status.ToString().c_str());
  return 1;
}

// Creates `count` calls with `concurrency` synchronous workers.
absl::StatusOr<std::vector<uint64_t>> MakeCalls(const Setup& setup, int count, int workers) {
  std::vector<uint64_t> handles(count);
  std::atomic<int> next{0};
  std::atomic<bool> failed{false};
  absl::Mutex mu;
  absl::Status first_error;
  std::vector<std::thread> threads;
  for (int w = 0; w < workers; ++w) {
    threads.emplace_back([&] {
      CallSessionClient app(NewConnection(absl::GetFlag(FLAGS_server)));
      app.set_token(setup.token);
      for (int i = next++; i < count && !failed; i = next++) {
        absl::StatusOr<v1::MakeCallResponse> call =
            app.MakeCall(setup.lines[i % setup.lines.size()], "+15550100");
        if (!call.ok()) {
          absl::MutexLock lock(&mu);
          first_error = call.status();
          failed = true;
          return;
        }
        handles[i] = call->call_handle();
      }
    });
  }
  for (auto& thread : threads) thread.join();
  if (failed) return first_error;
  return handles;
}

// Runs `work(handle)` over all handles with `workers` threads.
absl::Status ForEachHandle(const std::vector<uint64_t>& handles, const std::string& token,
                           int workers,
                           std::function<absl::Status(CallSessionClient&, uint64_t)> work) {
  std::atomic<size_t> next{0};
  std::atomic<bool> failed{false};
  absl::Mutex mu;
  absl::Status first_error;
  std::vector<std::thread> threads;
  for (int w = 0; w < workers; ++w) {
    threads.emplace_back([&] {
      CallSessionClient app(NewConnection(absl::GetFlag(FLAGS_server)));
      app.set_token(token);
      for (size_t i = next++; i < handles.size() && !failed; i = next++) {
        absl::Status status = work(app, handles[i]);
        if (!status.ok()) {
          absl::MutexLock lock(&mu);
          first_error = status;
          failed = true;
        }
      }
    });
  }
  for (auto& thread : threads) thread.join();
  return failed ? first_error : absl::OkStatus();
}

int RunMemory(Setup& setup, std::shared_ptr<grpc::Channel> channel) {
  const int pid = absl::GetFlag(FLAGS_server_pid);
  const int calls = absl::GetFlag(FLAGS_calls);
  const int workers = std::max(1, absl::GetFlag(FLAGS_concurrency));
  if (pid <= 0) return Fail("memory", absl::InvalidArgumentError("--server_pid is required"));
  const int64_t before = RssBytes(pid);
  absl::StatusOr<std::vector<uint64_t>> handles = MakeCalls(setup, calls, workers);
  if (!handles.ok()) return Fail("MakeCall", handles.status());
  const int64_t with_calls = RssBytes(pid);

  // One extra handle per call: a monitor app takes them all with GetNewCalls.
  ClientOptions monitor_options;
  monitor_options.deadline = absl::Minutes(5);
  monitor_options.api_key = ApiKey();
  CallSessionClient monitor(channel, monitor_options);
  if (absl::StatusOr<v1::InitializeResponse> init = monitor.Initialize("monitor"); !init.ok()) {
    return Fail("Initialize", init.status());
  }
  std::vector<uint64_t> monitor_handles;
  for (size_t device = 0; device < setup.lines.size(); ++device) {
    absl::StatusOr<uint64_t> line = monitor.LineOpen(device);
    if (!line.ok()) return Fail("LineOpen", line.status());
    absl::StatusOr<std::vector<uint64_t>> got = monitor.GetNewCalls(*line);
    if (!got.ok()) return Fail("GetNewCalls", got.status());
    monitor_handles.insert(monitor_handles.end(), got->begin(), got->end());
  }
  const int64_t with_monitors = RssBytes(pid);

  absl::Status status =
      ForEachHandle(*handles, setup.token, workers, [](CallSessionClient& app, uint64_t handle) {
        absl::Status dropped = app.Drop(handle);
        if (!dropped.ok()) return dropped;
        return app.DeallocateCall(handle);
      });
  if (!status.ok()) return Fail("Drop/DeallocateCall", status);
  status = ForEachHandle(
      monitor_handles, monitor.token(), workers,
      [](CallSessionClient& app, uint64_t handle) { return app.DeallocateCall(handle); });
  if (!status.ok()) return Fail("DeallocateCall (monitor)", status);
  // The allocator returns freed pages over its decay time: take RSS once it
  // has stopped falling for a second (at most 10 s).
  int64_t after = RssBytes(pid);
  for (int still = 0, waited = 0; still < 4 && waited < 40; ++waited) {
    absl::SleepFor(absl::Milliseconds(250));
    const int64_t now = RssBytes(pid);
    still = now < after ? 0 : still + 1;
    after = std::min(after, now);
  }

  const double per_call = static_cast<double>(with_calls - before) / calls;
  const double per_handle =
      static_cast<double>(with_monitors - with_calls) / std::max<size_t>(1, monitor_handles.size());
  const double ratio = static_cast<double>(after) / before;
  std::printf(
      "memory: %d calls\n  rss before %.1f MiB, with calls %.1f MiB, with monitor handles "
      "%.1f MiB, after %.1f MiB\n  bytes per live call %.0f, per extra handle %.0f, "
      "after/before %.3f\n",
      calls, before / 1048576.0, with_calls / 1048576.0, with_monitors / 1048576.0,
      after / 1048576.0, per_call, per_handle, ratio);
  if (const std::string path = absl::GetFlag(FLAGS_json); !path.empty()) {
    std::ofstream out(path);
    out << absl::StrFormat(
        "{\"scenario\":\"memory\",\"calls\":%d,\"rss_before\":%d,\"rss_with_calls\":%d,"
        "\"rss_with_monitor_handles\":%d,\"rss_after\":%d,\"bytes_per_call\":%.1f,"
        "\"bytes_per_extra_handle\":%.1f,\"after_over_before\":%.4f}\n",
        calls, before, with_calls, with_monitors, after, per_call, per_handle, ratio);
  }
  return 0;
}

// Writes `json` to --json if set.
void WriteJson(const std::string& json) {
  if (const std::string path = absl::GetFlag(FLAGS_json); !path.empty()) {
    std::ofstream(path) << json << "\n";
  }
}

int RunPopulate(Setup& setup) {
  const int calls = absl::GetFlag(FLAGS_calls);
  const absl::Time start = absl::Now();
  absl::StatusOr<std::vector<uint64_t>> handles =
      MakeCalls(setup, calls, std::max(1, absl::GetFlag(FLAGS_concurrency)));
  if (!handles.ok()) return Fail("MakeCall", handles.status());
  const double seconds = absl::ToDoubleSeconds(absl::Now() - start);
  std::printf("populate: %d live calls in %.1f s (%.0f/s)\n", calls, seconds, calls / seconds);
  WriteJson(
      absl::StrFormat("{\"scenario\":\"populate\",\"calls\":%d,\"seconds\":%.3f,\"token\":\"%s\"}",
                      calls, seconds, setup.token));
  return 0;
}

int RunDrain(const std::string& token, std::shared_ptr<grpc::Channel> channel) {
  ClientOptions options;
  options.deadline = absl::Minutes(1);
  CallSessionClient app(channel, options);
  app.set_token(token);
  const absl::Time start = absl::Now();
  size_t drained = 0;
  // Page by page: each page's handles are gone before the next is asked for.
  std::string page_token;
  do {
    absl::StatusOr<v1::ListCallsResponse> page = app.ListCalls(page_token, 10000);
    if (!page.ok()) return Fail("ListCalls", page.status());
    std::vector<uint64_t> handles;
    for (const auto& entry : page->calls()) handles.push_back(entry.call_handle());
    absl::Status status = ForEachHandle(
        handles, token, std::max(1, absl::GetFlag(FLAGS_concurrency)),
        [](CallSessionClient& client, uint64_t handle) {
          absl::Status dropped = client.Drop(handle);
          if (!dropped.ok() && dropped.code() != absl::StatusCode::kFailedPrecondition) {
            return dropped;  // FAILED_PRECONDITION: already IDLE
          }
          return client.DeallocateCall(handle);
        });
    if (!status.ok()) return Fail("Drop/DeallocateCall", status);
    drained += handles.size();
    page_token = page->next_page_token();
  } while (!page_token.empty());
  const double seconds = absl::ToDoubleSeconds(absl::Now() - start);
  std::printf("drain: %zu calls dropped and deallocated in %.1f s\n", drained, seconds);
  WriteJson(
      absl::StrFormat("{\"scenario\":\"drain\",\"calls\":%d,\"seconds\":%.3f}", drained, seconds));
  return 0;
}

void ReadEvents(Stub* stub, const std::string& token, InboundRouter* router,
                grpc::ClientContext* context) {
  Authorize(context, token);
  auto reader = stub->WatchEvents(context, v1::WatchEventsRequest());
  v1::WatchEventsResponse response;
  while (reader->Read(&response)) {
    if (response.event().has_app_new_call()) {
      router->Deliver(response.event().app_new_call().call_id(),
                      response.event().app_new_call().call_handle());
    }
  }
}

int Main() {
  const std::string server = absl::GetFlag(FLAGS_server);
  Setup setup;
  setup.scenario = absl::GetFlag(FLAGS_scenario);
  setup.provider_token = absl::GetFlag(FLAGS_provider_token);
  if (setup.provider_token.empty()) {
    if (const char* env = std::getenv("CALLSESSION_PROVIDER_TOKEN")) setup.provider_token = env;
  }
  const bool known = setup.scenario == "get-call-info" || setup.scenario == "lifecycle" ||
                     setup.scenario == "inbound" || setup.scenario == "memory" ||
                     setup.scenario == "populate" || setup.scenario == "drain";
  if (!known) {
    return Fail("--scenario", absl::InvalidArgumentError(setup.scenario));
  }

  auto channel = NewConnection(server);
  if (setup.scenario == "drain") {
    if (absl::GetFlag(FLAGS_token).empty()) {
      return Fail("drain", absl::InvalidArgumentError("--token is required"));
    }
    return RunDrain(absl::GetFlag(FLAGS_token), channel);
  }
  ClientOptions app_options;
  app_options.api_key = ApiKey();
  CallSessionClient app(channel, app_options);
  const uint64_t fixed_handle = absl::GetFlag(FLAGS_fixed_handle);
  if (fixed_handle != 0) {
    if (setup.scenario != "get-call-info") {
      return Fail("--fixed_handle", absl::InvalidArgumentError("only with get-call-info"));
    }
    setup.read_handles = {fixed_handle};
    setup.lines = {0};
  } else {
    absl::StatusOr<v1::InitializeResponse> init = app.Initialize("loadgen");
    if (!init.ok()) return Fail("Initialize", init.status());
    setup.token = app.token();
    const int devices =
        std::min<int>(absl::GetFlag(FLAGS_devices), static_cast<int>(init->num_devices()));
    for (int device = 0; device < devices; ++device) {
      absl::StatusOr<uint64_t> line = app.LineOpen(device, {v1::CALL_PRIVILEGE_OWNER});
      if (!line.ok()) return Fail("LineOpen", line.status());
      setup.lines.push_back(*line);
    }
  }
  if (setup.scenario == "memory") return RunMemory(setup, channel);
  if (setup.scenario == "populate") return RunPopulate(setup);

  if (setup.scenario == "get-call-info" && fixed_handle == 0) {
    absl::StatusOr<std::vector<uint64_t>> handles = MakeCalls(setup, absl::GetFlag(FLAGS_calls), 8);
    if (!handles.ok()) return Fail("MakeCall", handles.status());
    setup.read_handles = *std::move(handles);
  }
  grpc::ClientContext events_context;
  std::thread events;
  if (setup.scenario == "inbound") {
    auto stub = v1::CallSessionService::NewStub(channel);
    events = std::thread([&, stub = std::move(stub)] {
      ReadEvents(stub.get(), setup.token, &setup.router, &events_context);
    });
  }

  const int concurrency = std::max(1, absl::GetFlag(FLAGS_concurrency));
  Runner runner(setup, concurrency, std::max(1, absl::GetFlag(FLAGS_channels)), server);
  const double rate = absl::GetFlag(FLAGS_rate);
  const bool open_loop = rate > 0 && setup.scenario == "get-call-info";
  const double seconds =
      open_loop
          ? runner.RunOpenLoop(rate, absl::GetFlag(FLAGS_warmup), absl::GetFlag(FLAGS_duration))
          : runner.RunClosedLoop(absl::GetFlag(FLAGS_warmup), absl::GetFlag(FLAGS_duration));
  if (events.joinable()) {
    events_context.TryCancel();
    events.join();
  }

  // Merge and report.
  Samples all;
  for (auto& slot : runner.slots()) {
    for (int rpc = 0; rpc < kRpcCount; ++rpc) {
      auto& source = slot->samples().nanos[rpc];
      all.nanos[rpc].insert(all.nanos[rpc].end(), source.begin(), source.end());
      all.errors[rpc] += slot->samples().errors[rpc];
    }
    all.lifecycles += slot->samples().lifecycles;
  }
  uint64_t total = 0;
  uint64_t errors = 0;  // failed RPCs; open-loop requests that found no free slot are "late"
  std::string rows;
  std::string json_rpcs;
  for (int rpc = 0; rpc < kRpcCount; ++rpc) {
    if (all.nanos[rpc].empty() && all.errors[rpc] == 0) continue;
    Percentiles p = Summarize(all.nanos[rpc], all.errors[rpc]);
    total += p.count;
    errors += p.errors;
    absl::StrAppendFormat(&rows, "  %-15s %10d %8d %10.0f %9.1f %9.1f %9.1f %9.1f\n",
                          kRpcNames[rpc], p.count, p.errors, p.count / seconds, p.p50, p.p90, p.p99,
                          p.p999);
    absl::StrAppendFormat(&json_rpcs,
                          "%s\"%s\":{\"count\":%d,\"errors\":%d,\"per_second\":%.1f,"
                          "\"p50_us\":%.1f,\"p90_us\":%.1f,\"p99_us\":%.1f,\"p999_us\":%.1f}",
                          json_rpcs.empty() ? "" : ",", kRpcNames[rpc], p.count, p.errors,
                          p.count / seconds, p.p50, p.p90, p.p99, p.p999);
  }
  std::printf("scenario %s, %s, %d in flight over %d connections, %.1f s measured\n",
              setup.scenario.c_str(),
              open_loop ? absl::StrFormat("open loop at %.0f/s", rate).c_str() : "closed loop",
              concurrency, absl::GetFlag(FLAGS_channels), seconds);
  std::printf("  requests/s %.0f, lifecycles/s %.0f, errors %" PRIu64 ", late %" PRIu64 "\n",
              total / seconds, all.lifecycles / seconds, errors, runner.late());
  std::printf("  %-15s %10s %8s %10s %9s %9s %9s %9s\n%s", "rpc", "count", "errors", "per_s",
              "p50_us", "p90_us", "p99_us", "p999_us", rows.c_str());
  if (const std::string path = absl::GetFlag(FLAGS_json); !path.empty()) {
    std::ofstream out(path);
    out << absl::StrFormat(
        "{\"scenario\":\"%s\",\"open_loop\":%s,\"rate\":%.1f,\"concurrency\":%d,\"channels\":%d,"
        "\"seconds\":%.3f,\"requests_per_second\":%.1f,\"lifecycles_per_second\":%.1f,"
        "\"errors\":%d,\"late\":%d,\"rpcs\":{%s}}\n",
        setup.scenario, open_loop ? "true" : "false", rate, concurrency,
        absl::GetFlag(FLAGS_channels), seconds, total / seconds, all.lifecycles / seconds, errors,
        runner.late(), json_rpcs);
  }
  if (fixed_handle == 0) (void)app.Shutdown();
  return errors == 0 ? 0 : 1;
}

}  // namespace
}  // namespace callsession

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage("drives callsessiond and reports throughput and latency");
  absl::ParseCommandLine(argc, argv);
  // gRPC's locks are absl::Mutex; Debian's Abseil would check each one for
  // deadlocks (see server/main.cc).
  absl::SetMutexDeadlockDetectionMode(absl::OnDeadlockCycle::kIgnore);
  return callsession::Main();
}
