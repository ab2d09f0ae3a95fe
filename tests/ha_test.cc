// High availability through the real binaries: a 3-member etcd cluster
// (Debian's etcd-server) and 3 callsessiond processes with --store=etcd on
// loopback. Clients (the client library following the leader) run outbound
// lifecycles with request_ids, inbound offers seen by an owner and a
// monitor, and event streams, and record every acknowledged result while
// faults hit: kill -9 of the leader (at least 20 times, each timed from the
// kill to the first successful call), SIGSTOP of the leader past its lease
// then SIGCONT (it must exit without acknowledging anything), kill -9 of an
// etcd member, and a rolling restart (each SIGTERM of the leader timed as a
// planned handover). Then a checker verifies: every acknowledged change is
// there; request_ids took effect once; no handle was issued twice; event
// streams were gapless and duplicate-free across leader changes; and, from
// the epochs the journal writes carry in etcd's history, no two leaders
// wrote in overlapping terms.
//
// Skips (exit 77) when etcd is not installed.
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <spawn.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "client/callsession_client.h"
#include "etcd/etcdserver/etcdserverpb/rpc.grpc.pb.h"
#include "grpcpp/create_channel.h"
#include "tests/test_support.h"

ABSL_FLAG(int, leader_kills, 20, "kill -9 of the leader, each timed");
ABSL_FLAG(int, handovers, 5, "planned handovers (SIGTERM of the leader), each timed");

namespace callsession {
namespace {

constexpr char kProviderToken[] = "ha-provider-token";
constexpr int kLeaseSeconds = 3;
constexpr uint32_t kInboundDevice = 9;

std::string FindInPath(const std::string& name) {
  const char* path = std::getenv("PATH");
  for (absl::string_view dir : absl::StrSplit(path ? path : "", ':')) {
    const std::string candidate = absl::StrCat(dir, "/", name);
    if (access(candidate.c_str(), X_OK) == 0) return candidate;
  }
  return "";
}

// A child process whose stdout and stderr go to a file.
class Child {
 public:
  Child() = default;
  Child(const std::vector<std::string>& argv, const std::vector<std::string>& env,
        const std::string& log_path) {
    posix_spawn_file_actions_t actions;
    posix_spawn_file_actions_init(&actions);
    posix_spawn_file_actions_addopen(&actions, STDOUT_FILENO, log_path.c_str(),
                                     O_WRONLY | O_CREAT | O_APPEND, 0644);
    posix_spawn_file_actions_adddup2(&actions, STDOUT_FILENO, STDERR_FILENO);
    std::vector<std::string> args = argv;
    std::vector<char*> arg_ptrs;
    for (std::string& arg : args) arg_ptrs.push_back(arg.data());
    arg_ptrs.push_back(nullptr);
    std::vector<std::string> environment = env;
    for (char** e = environ; *e != nullptr; ++e) environment.push_back(*e);
    std::vector<char*> env_ptrs;
    for (std::string& entry : environment) env_ptrs.push_back(entry.data());
    env_ptrs.push_back(nullptr);
    if (posix_spawn(&pid_, args[0].c_str(), &actions, nullptr, arg_ptrs.data(), env_ptrs.data()) !=
        0) {
      pid_ = -1;
    }
    posix_spawn_file_actions_destroy(&actions);
  }
  Child(Child&& other) noexcept : pid_(std::exchange(other.pid_, -1)) {}
  Child& operator=(Child&& other) noexcept {
    Reap(SIGKILL);
    pid_ = std::exchange(other.pid_, -1);
    return *this;
  }
  ~Child() { Reap(SIGKILL); }

  pid_t pid() const { return pid_; }
  bool running() const { return pid_ > 0; }
  void Signal(int signal) const {
    if (pid_ > 0) kill(pid_, signal);
  }
  // Sends `signal` (0: none) and waits for the exit; the exit status, or
  // 128+signal if it was killed; -1 if it does not end within `timeout`.
  int Reap(int signal, absl::Duration timeout = absl::Seconds(20)) {
    if (pid_ <= 0) return -1;
    if (signal != 0) kill(pid_, signal);
    const absl::Time give_up = absl::Now() + timeout;
    int status = 0;
    for (;;) {
      const pid_t done = waitpid(pid_, &status, WNOHANG);
      if (done == pid_) break;
      if (absl::Now() > give_up) return -1;
      absl::SleepFor(absl::Milliseconds(5));
    }
    pid_ = -1;
    return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  }

 private:
  pid_t pid_ = -1;
};

std::string ReadFile(const std::string& path) {
  std::ifstream in(path);
  std::stringstream text;
  text << in.rdbuf();
  return text.str();
}

// Three etcd members on loopback.
class EtcdCluster {
 public:
  explicit EtcdCluster(const std::string& dir) : dir_(dir) {
    std::vector<std::string> peers;
    for (int i = 0; i < 3; ++i) {
      client_ports_[i] = FreePort();
      peer_ports_[i] = FreePort();
      peers.push_back(absl::StrCat("m", i, "=http://127.0.0.1:", peer_ports_[i]));
    }
    initial_cluster_ = absl::StrJoin(peers, ",");
    for (int i = 0; i < 3; ++i) Start(i, "new");
  }

  void Start(int i, const std::string& state) {
    const std::string client = absl::StrCat("http://127.0.0.1:", client_ports_[i]);
    const std::string peer = absl::StrCat("http://127.0.0.1:", peer_ports_[i]);
    members_[i] = Child(
        {FindInPath("etcd"), absl::StrCat("--name=m", i),
         absl::StrCat("--data-dir=", dir_, "/m", i), absl::StrCat("--listen-client-urls=", client),
         absl::StrCat("--advertise-client-urls=", client),
         absl::StrCat("--listen-peer-urls=", peer),
         absl::StrCat("--initial-advertise-peer-urls=", peer),
         absl::StrCat("--initial-cluster=", initial_cluster_),
         absl::StrCat("--initial-cluster-state=", state),
         "--initial-cluster-token=callsession-ha-test", "--log-level=warn"},
        {}, absl::StrCat(dir_, "/etcd-m", i, ".log"));
  }
  void Kill(int i) { members_[i].Reap(SIGKILL); }
  void Restart(int i) { Start(i, "existing"); }

  std::vector<std::string> endpoints() const {
    std::vector<std::string> out;
    for (int port : client_ports_) out.push_back(absl::StrCat("127.0.0.1:", port));
    return out;
  }

 private:
  const std::string dir_;
  int client_ports_[3];
  int peer_ports_[3];
  std::string initial_cluster_;
  Child members_[3];
};

// The etcd v3 API on one member, for the checks.
class EtcdProbe {
 public:
  explicit EtcdProbe(const std::vector<std::string>& endpoints) {
    for (const std::string& endpoint : endpoints) {
      auto channel = grpc::CreateChannel(endpoint, grpc::InsecureChannelCredentials());
      kv_.push_back(etcdserverpb::KV::NewStub(channel));
      watch_.push_back(etcdserverpb::Watch::NewStub(channel));
    }
  }

  // The value of `key`, "" if absent; tries each member.
  absl::StatusOr<std::string> Get(const std::string& key) {
    for (auto& kv : kv_) {
      grpc::ClientContext context;
      context.set_deadline(absl::ToChronoTime(absl::Now() + absl::Seconds(2)));
      etcdserverpb::RangeRequest request;
      request.set_key(key);
      etcdserverpb::RangeResponse response;
      if (!kv->Range(&context, request, &response).ok()) continue;
      return response.kvs().empty() ? "" : response.kvs(0).value();
    }
    return absl::UnavailableError("no etcd member answered");
  }

  // How many keys start with `prefix`; -1 if no member answered.
  int64_t CountPrefix(const std::string& prefix) {
    for (auto& kv : kv_) {
      grpc::ClientContext context;
      context.set_deadline(absl::ToChronoTime(absl::Now() + absl::Seconds(2)));
      etcdserverpb::RangeRequest request;
      request.set_key(prefix);
      std::string end = prefix;
      end.back() = static_cast<char>(end.back() + 1);
      request.set_range_end(end);
      request.set_count_only(true);
      etcdserverpb::RangeResponse response;
      if (kv->Range(&context, request, &response).ok()) return response.count();
    }
    return -1;
  }

  // Every version of `key` since revision 1 as (mod_revision, value): a
  // watch from revision 1 replays them, up to the key's latest.
  std::vector<std::pair<int64_t, std::string>> History(const std::string& key) {
    std::vector<std::pair<int64_t, std::string>> versions;
    int64_t latest = 0;
    {
      grpc::ClientContext context;
      etcdserverpb::RangeRequest request;
      request.set_key(key);
      etcdserverpb::RangeResponse response;
      if (!kv_[0]->Range(&context, request, &response).ok() || response.kvs().empty()) {
        return versions;
      }
      latest = response.kvs(0).mod_revision();
    }
    grpc::ClientContext context;
    context.set_deadline(absl::ToChronoTime(absl::Now() + absl::Seconds(60)));
    auto stream = watch_[0]->Watch(&context);
    etcdserverpb::WatchRequest request;
    request.mutable_create_request()->set_key(key);
    request.mutable_create_request()->set_start_revision(1);
    stream->Write(request);
    etcdserverpb::WatchResponse response;
    int64_t seen = 0;
    while (seen < latest && stream->Read(&response)) {
      if (response.compact_revision() > 0) {
        ADD_FAILURE() << "etcd's history was compacted at " << response.compact_revision();
        break;
      }
      for (const mvccpb::Event& event : response.events()) {
        versions.emplace_back(event.kv().mod_revision(), event.kv().value());
        seen = event.kv().mod_revision();
      }
    }
    context.TryCancel();
    (void)stream->Finish();
    return versions;
  }

 private:
  std::vector<std::unique_ptr<etcdserverpb::KV::Stub>> kv_;
  std::vector<std::unique_ptr<etcdserverpb::Watch::Stub>> watch_;
};

// The three callsessiond processes.
class Replicas3 {
 public:
  // `retained_revisions`: --etcd_retained_revisions (the epoch check reads
  // the whole history, so by default none is compacted).
  Replicas3(const std::string& dir, const std::vector<std::string>& etcd,
            int64_t retained_revisions = 1'000'000'000)
      : dir_(dir), retained_revisions_(retained_revisions) {
    etcd_endpoints_ = absl::StrJoin(etcd, ",");
    for (int i = 0; i < 3; ++i) {
      ports_[i] = FreePort();
      Start(i);
    }
  }

  void Start(int i) {
    const std::string address = this->address(i);
    processes_[i] = Child(
        {CALLSESSIOND_PATH, "--store=etcd", absl::StrCat("--etcd_endpoints=", etcd_endpoints_),
         absl::StrCat("--etcd_lease_ttl=", kLeaseSeconds, "s"), absl::StrCat("--listen=", address),
         absl::StrCat("--advertise_address=", address), absl::StrCat("--member_name=replica-", i),
         "--shutdown_grace=2s",
         // Every request_id stays remembered for the final check.
         "--request_id_cache=1000000",
         absl::StrCat("--etcd_retained_revisions=", retained_revisions_)},
        {absl::StrCat("CALLSESSION_PROVIDER_TOKEN=", kProviderToken)}, log_path(i));
  }

  std::string address(int i) const { return absl::StrCat("127.0.0.1:", ports_[i]); }
  std::string log_path(int i) const { return absl::StrCat(dir_, "/callsessiond-", i, ".log"); }
  std::vector<std::string> addresses() const { return {address(0), address(1), address(2)}; }
  Child& process(int i) { return processes_[i]; }

  // The index of the process whose address P "leader" holds, -1 if none.
  int Leader(EtcdProbe& etcd) const {
    absl::StatusOr<std::string> leader = etcd.Get("/callsession/leader");
    if (!leader.ok()) return -1;
    for (int i = 0; i < 3; ++i) {
      if (*leader == address(i)) return i;
    }
    return -1;
  }

  // Waits until process i logged `event` at least `count` times.
  bool WaitForLog(int i, const std::string& event, int count,
                  absl::Duration timeout = absl::Seconds(30)) {
    const std::string needle = absl::StrCat("\"event\":\"", event, "\"");
    const absl::Time give_up = absl::Now() + timeout;
    while (absl::Now() < give_up) {
      const std::string log = ReadFile(log_path(i));
      int found = 0;
      for (size_t at = log.find(needle); at != std::string::npos; at = log.find(needle, at + 1)) {
        ++found;
      }
      if (found >= count) return true;
      absl::SleepFor(absl::Milliseconds(20));
    }
    return false;
  }
  int standby_loads(int i) const {
    const std::string log = ReadFile(log_path(i));
    int found = 0;
    for (size_t at = log.find("\"standby_loaded\""); at != std::string::npos;
         at = log.find("\"standby_loaded\"", at + 1)) {
      ++found;
    }
    return found;
  }

 private:
  const std::string dir_;
  const int64_t retained_revisions_;
  std::string etcd_endpoints_;
  int ports_[3];
  Child processes_[3];
};

// What the clients were told, and what they saw go wrong.
struct Acknowledged {
  absl::Mutex mu;
  // request_id -> call handle, per worker.
  std::map<std::string, uint64_t> made ABSL_GUARDED_BY(mu);
  std::map<std::string, int> made_by ABSL_GUARDED_BY(mu);
  std::set<uint64_t> dropped ABSL_GUARDED_BY(mu);
  std::set<uint64_t> deallocated ABSL_GUARDED_BY(mu);
  std::set<uint64_t> maybe_deallocated ABSL_GUARDED_BY(mu);
  std::set<uint64_t> offered ABSL_GUARDED_BY(mu);  // call ids
  std::vector<std::string> violations ABSL_GUARDED_BY(mu);
  uint64_t events ABSL_GUARDED_BY(mu) = 0;
  uint64_t stream_resumes ABSL_GUARDED_BY(mu) = 0;
  uint64_t ambiguous ABSL_GUARDED_BY(mu) = 0;

  void Violation(std::string what) {
    absl::MutexLock lock(&mu);
    violations.push_back(std::move(what));
  }
};

ClientOptions FollowingOptions() {
  ClientOptions options;
  options.deadline = absl::Seconds(3);
  options.failover_timeout = absl::Seconds(30);
  return options;
}

// Retries `call` until it succeeds (for set-up steps whose duplicates are
// harmless: an extra app or line).
template <typename Call>
auto Eventually(Call&& call) {
  for (int attempt = 0;; ++attempt) {
    auto result = call();
    if (result.ok() || attempt > 100) return result;
    absl::SleepFor(absl::Milliseconds(100));
  }
}

// Reads an app's events across leader changes: each stream resumes from the
// last sequence seen plus one; every event must be exactly the next one.
void FollowEvents(CallSessionClient& app, std::atomic<bool>& stop, Acknowledged& acked,
                  const std::string& who) {
  uint64_t last = 0;
  bool first = true;
  while (!stop.load()) {
    std::unique_ptr<EventStream> stream = app.WatchEvents(first ? 0 : last + 1);
    for (;;) {
      absl::StatusOr<v1::Event> event = stream->Next(absl::Milliseconds(200));
      if (stop.load()) return;
      if (absl::IsDeadlineExceeded(event.status())) continue;
      if (!event.ok()) break;
      if (event->has_events_lost()) {
        acked.Violation(absl::StrCat(who, ": events lost ", event->events_lost().first_sequence(),
                                     "..", event->events_lost().last_sequence()));
      }
      if (!first && event->sequence() != last + 1) {
        acked.Violation(
            absl::StrCat(who, ": event ", event->sequence(), " after ", last, " (gap or repeat)"));
      }
      first = false;
      last = event->sequence();
      absl::MutexLock lock(&acked.mu);
      ++acked.events;
    }
    {
      absl::MutexLock lock(&acked.mu);
      ++acked.stream_resumes;
    }
    absl::SleepFor(absl::Milliseconds(50));
  }
}

class HaTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (FindInPath("etcd").empty()) GTEST_SKIP() << "etcd is not installed (etcd-server)";
    dir_ = MakeTempDir("callsession-ha");
    etcd_ = std::make_unique<EtcdCluster>(dir_);
    probe_ = std::make_unique<EtcdProbe>(etcd_->endpoints());
    absl::SleepFor(absl::Seconds(2));
    replicas_ = std::make_unique<Replicas3>(dir_, etcd_->endpoints(), RetainedRevisions());
    following_ =
        std::make_shared<Replicas>(replicas_->addresses(), grpc::InsecureChannelCredentials());
  }
  virtual int64_t RetainedRevisions() const { return 1'000'000'000; }

  void TearDown() override {
    replicas_.reset();
    etcd_.reset();
    if (!HasFailure() && !dir_.empty()) std::filesystem::remove_all(dir_);
    if (HasFailure()) std::fprintf(stderr, "logs kept in %s\n", dir_.c_str());
  }

  int WaitForLeader(absl::Duration timeout = absl::Seconds(30)) {
    const absl::Time give_up = absl::Now() + timeout;
    while (absl::Now() < give_up) {
      const int leader = replicas_->Leader(*probe_);
      if (leader >= 0) return leader;
      absl::SleepFor(absl::Milliseconds(20));
    }
    return -1;
  }

  // From now until a call through the client library succeeds.
  absl::Duration TimeToFirstSuccess(CallSessionClient& probe) {
    const absl::Time start = absl::Now();
    while (!probe.KeepAlive().ok()) {
      if (absl::Now() - start > absl::Seconds(60)) break;
    }
    return absl::Now() - start;
  }

  // Restarts process i and waits until it follows as a standby.
  void RestartAsStandby(int i) {
    const int loads = replicas_->standby_loads(i);
    replicas_->Start(i);
    ASSERT_TRUE(replicas_->WaitForLog(i, "standby_loaded", loads + 1))
        << ReadFile(replicas_->log_path(i));
  }

  std::string dir_;
  std::unique_ptr<EtcdCluster> etcd_;
  std::unique_ptr<EtcdProbe> probe_;
  std::unique_ptr<Replicas3> replicas_;
  std::shared_ptr<Replicas> following_;
};

absl::Duration Percentile(std::vector<absl::Duration> values, double p) {
  std::sort(values.begin(), values.end());
  const size_t index =
      std::min(values.size() - 1, static_cast<size_t>(p * static_cast<double>(values.size())));
  return values[index];
}

TEST_F(HaTest, NothingAcknowledgedIsLostAcrossLeaderKillsPausesEtcdFailuresAndRollingRestarts) {
  ASSERT_GE(WaitForLeader(), 0) << ReadFile(replicas_->log_path(0));
  Acknowledged acked;
  std::atomic<bool> stop{false};

  // A probe app whose KeepAlive times each failover.
  CallSessionClient probe(following_, FollowingOptions());
  ASSERT_THAT(Eventually([&] { return probe.Initialize("probe"); }), IsOk());

  // Inbound: an owner and a monitor on one device, a provider offering.
  CallSessionClient owner(following_, FollowingOptions());
  CallSessionClient monitor(following_, FollowingOptions());
  ASSERT_THAT(Eventually([&] { return owner.Initialize("owner"); }), IsOk());
  ASSERT_THAT(Eventually([&] { return monitor.Initialize("monitor"); }), IsOk());
  ASSERT_THAT(
      Eventually([&] { return owner.LineOpen(kInboundDevice, {v1::CALL_PRIVILEGE_OWNER}); }),
      IsOk());
  ASSERT_THAT(
      Eventually([&] { return monitor.LineOpen(kInboundDevice, {v1::CALL_PRIVILEGE_MONITOR}); }),
      IsOk());
  ProviderClient provider(following_, kProviderToken, FollowingOptions());

  std::vector<std::thread> threads;
  threads.emplace_back([&] { FollowEvents(owner, stop, acked, "owner"); });
  threads.emplace_back([&] { FollowEvents(monitor, stop, acked, "monitor"); });
  threads.emplace_back([&] {
    while (!stop.load()) {
      absl::StatusOr<uint64_t> call_id = provider.OfferCall(kInboundDevice, "100", "200");
      if (call_id.ok()) {
        absl::MutexLock lock(&acked.mu);
        acked.offered.insert(*call_id);
      }
      absl::SleepFor(absl::Milliseconds(30));
    }
  });

  // Outbound workers: MakeCall with a request_id (retried with the same id
  // until it is answered), then Drop, and every third call DeallocateCall.
  constexpr int kWorkers = 2;
  std::vector<std::unique_ptr<CallSessionClient>> workers;
  std::vector<uint64_t> worker_lines(kWorkers);
  for (int w = 0; w < kWorkers; ++w) {
    workers.push_back(std::make_unique<CallSessionClient>(following_, FollowingOptions()));
    ASSERT_THAT(Eventually([&] { return workers[w]->Initialize(absl::StrCat("worker", w)); }),
                IsOk());
    auto line = Eventually([&] { return workers[w]->LineOpen(w, {v1::CALL_PRIVILEGE_OWNER}); });
    ASSERT_THAT(line, IsOk());
    worker_lines[w] = *line;
  }
  for (int w = 0; w < kWorkers; ++w) {
    threads.emplace_back([&, w] {
      CallSessionClient& app = *workers[w];
      for (int n = 0; !stop.load(); ++n) {
        const std::string request_id = absl::StrCat("w", w, "-", n);
        absl::StatusOr<v1::MakeCallResponse> made;
        for (int attempt = 0; attempt < 20 && !stop.load(); ++attempt) {
          made = app.MakeCall(worker_lines[w], "5551234", request_id);
          if (made.ok() || !absl::IsUnavailable(made.status())) break;
        }
        if (!made.ok()) continue;
        const uint64_t handle = made->call_handle();
        {
          absl::MutexLock lock(&acked.mu);
          acked.made[request_id] = handle;
          acked.made_by[request_id] = w;
        }
        if (absl::Status dropped = app.Drop(handle); dropped.ok()) {
          absl::MutexLock lock(&acked.mu);
          acked.dropped.insert(handle);
        } else {
          absl::MutexLock lock(&acked.mu);
          ++acked.ambiguous;
          continue;
        }
        if (n % 3 == 0) {
          const absl::Status deallocated = app.DeallocateCall(handle);
          absl::MutexLock lock(&acked.mu);
          if (deallocated.ok()) {
            acked.deallocated.insert(handle);
          } else {
            // Cut off in flight: it may or may not have taken effect.
            acked.maybe_deallocated.insert(handle);
            ++acked.ambiguous;
          }
        }
      }
    });
  }

  std::vector<absl::Duration> kill_failovers;
  std::vector<absl::Duration> handovers;
  // 1. kill -9 of the leader.
  for (int k = 0; k < absl::GetFlag(FLAGS_leader_kills); ++k) {
    absl::SleepFor(absl::Milliseconds(300));
    const int leader = WaitForLeader();
    ASSERT_GE(leader, 0);
    replicas_->process(leader).Reap(SIGKILL);
    kill_failovers.push_back(TimeToFirstSuccess(probe));
    RestartAsStandby(leader);
    if (HasFatalFailure()) break;
  }

  // 2. SIGSTOP of the leader past its lease, then SIGCONT: another process
  // leads meanwhile, and the paused one must exit without acknowledging.
  {
    const int leader = WaitForLeader();
    ASSERT_GE(leader, 0);
    replicas_->process(leader).Signal(SIGSTOP);
    const absl::Duration paused_failover = TimeToFirstSuccess(probe);
    absl::SleepFor(absl::Seconds(kLeaseSeconds));
    int successor = WaitForLeader();
    for (int i = 0; i < 100 && successor == leader; ++i) {
      absl::SleepFor(absl::Milliseconds(200));
      successor = WaitForLeader();
    }
    EXPECT_NE(successor, leader) << "no other process leads "
                                 << absl::ToDoubleSeconds(paused_failover)
                                 << " s after the pause; leader key "
                                 << probe_->Get("/callsession/leader").value_or("?");
    replicas_->process(leader).Signal(SIGCONT);
    EXPECT_EQ(replicas_->process(leader).Reap(0, absl::Seconds(10)), 75)
        << "a paused leader must exit with kLeadershipLostExitCode once resumed";
    EXPECT_TRUE(absl::StrContains(ReadFile(replicas_->log_path(leader)), "leadership_lost"));
    RestartAsStandby(leader);
  }

  // 3. kill -9 of an etcd member, and back. If it was etcd's leader, etcd
  // elects another (about a second) while the lease runs: a leader that
  // cannot renew in time steps down (exit 75) and another takes over; that
  // is counted, not failed.
  etcd_->Kill(1);
  absl::SleepFor(absl::Seconds(3));
  EXPECT_THAT(probe.KeepAlive(), IsOk()) << "two of three etcd members keep serving";
  etcd_->Restart(1);
  absl::SleepFor(absl::Seconds(2));
  int stepped_down = 0;
  for (int i = 0; i < 3; ++i) {
    if (replicas_->process(i).Reap(0, absl::ZeroDuration()) == 75) {
      ++stepped_down;
      RestartAsStandby(i);
    }
  }

  // 4. A rolling restart: each standby, then the leader (a planned
  // handover); and more planned handovers, each timed.
  {
    const int leader = WaitForLeader();
    for (int i = 0; i < 3; ++i) {
      if (i == leader) continue;
      EXPECT_EQ(replicas_->process(i).Reap(SIGTERM), 0);
      RestartAsStandby(i);
    }
  }
  for (int h = 0; h < absl::GetFlag(FLAGS_handovers); ++h) {
    absl::SleepFor(absl::Milliseconds(300));
    const int leader = WaitForLeader();
    ASSERT_GE(leader, 0);
    const absl::Time start = absl::Now();
    replicas_->process(leader).Signal(SIGTERM);
    // Until another process leads and a call succeeds (the old leader may
    // still answer the first calls, before it handles the signal).
    for (;;) {
      const int now_leading = replicas_->Leader(*probe_);
      if (now_leading >= 0 && now_leading != leader && probe.KeepAlive().ok()) break;
      if (absl::Now() - start > absl::Seconds(60)) break;
    }
    handovers.push_back(absl::Now() - start);
    EXPECT_EQ(replicas_->process(leader).Reap(0), 0);
    EXPECT_TRUE(absl::StrContains(ReadFile(replicas_->log_path(leader)), "handed_over"));
    RestartAsStandby(leader);
  }

  absl::SleepFor(absl::Milliseconds(500));
  stop.store(true);
  for (std::thread& thread : threads) thread.join();

  // --- The checker ---------------------------------------------------------
  absl::MutexLock lock(&acked.mu);
  for (const std::string& violation : acked.violations) ADD_FAILURE() << violation;

  // No handle was issued twice.
  std::set<uint64_t> handles;
  for (const auto& [request_id, handle] : acked.made) {
    EXPECT_TRUE(handles.insert(handle).second) << "handle " << handle << " issued twice";
  }
  // Every acknowledged change is there; request_ids took effect once.
  size_t checked = 0;
  for (const auto& [request_id, handle] : acked.made) {
    if (acked.maybe_deallocated.count(handle) > 0) continue;
    CallSessionClient& app = *workers[acked.made_by[request_id]];
    absl::StatusOr<v1::CallStatus> status = app.GetCallStatus(handle);
    if (acked.deallocated.count(handle) > 0) {
      EXPECT_THAT(status, IsTapiError(absl::StatusCode::kNotFound, "LINEERR_INVALCALLHANDLE"))
          << request_id << " was deallocated";
      continue;
    }
    ASSERT_THAT(status, IsOk()) << request_id;
    if (acked.dropped.count(handle) > 0) {
      EXPECT_EQ(status->call_state(), v1::CALL_STATE_IDLE) << request_id << " was dropped";
    }
    absl::StatusOr<v1::MakeCallResponse> again =
        app.MakeCall(worker_lines[acked.made_by[request_id]], "5551234", request_id);
    ASSERT_THAT(again, IsOk()) << request_id;
    EXPECT_EQ(again->call_handle(), handle) << request_id << " took effect twice";
    ++checked;
  }
  // Every acknowledged offer reached the owner.
  absl::StatusOr<v1::ListCallsResponse> owned = owner.ListAllCalls();
  ASSERT_THAT(owned, IsOk());
  std::set<uint64_t> owned_calls;
  for (const v1::CallHandleEntry& entry : owned->calls())
    owned_calls.insert(entry.info().call_id());
  for (uint64_t call_id : acked.offered) {
    EXPECT_EQ(owned_calls.count(call_id), 1u) << "offered call " << call_id << " is missing";
  }

  // No two leaders wrote in overlapping terms: in etcd's history of P
  // "epoch", every write of epoch e comes after e (the creation of its
  // leader key) and after every write of an older epoch, and no write of an
  // older epoch comes after e.
  std::vector<std::pair<int64_t, std::string>> history = probe_->History("/callsession/epoch");
  std::set<int64_t> epochs;
  int64_t last_epoch = 0;
  int64_t last_revision = 0;
  for (const auto& [revision, value] : history) {
    int64_t epoch = 0;
    ASSERT_TRUE(absl::SimpleAtoi(value.substr(0, value.find(' ')), &epoch)) << value;
    EXPECT_GT(revision, epoch) << "a write before its leader's term began";
    EXPECT_GE(epoch, last_epoch) << "epoch " << last_epoch << " wrote at " << last_revision
                                 << ", then the older epoch " << epoch << " at " << revision;
    if (epoch != last_epoch) {
      EXPECT_LT(last_revision, epoch) << "epoch " << last_epoch << " still wrote at "
                                      << last_revision << " after epoch " << epoch << " began";
    }
    epochs.insert(epoch);
    last_epoch = epoch;
    last_revision = revision;
  }

  std::fprintf(stderr,
               "ha: %zu calls made and checked (%zu dropped, %zu deallocated), %zu offers, "
               "%llu events in order across %llu stream resumptions, %llu calls cut off in flight, "
               "%zu journal writes by %zu leaders\n",
               checked, acked.dropped.size(), acked.deallocated.size(), acked.offered.size(),
               static_cast<unsigned long long>(acked.events),
               static_cast<unsigned long long>(acked.stream_resumes),
               static_cast<unsigned long long>(acked.ambiguous), history.size(), epochs.size());
  std::fprintf(stderr,
               "ha: failover after kill -9 of the leader (%zu): p50 %.2f s, p99 %.2f s, max "
               "%.2f s; planned handover (%zu): p50 %.2f s, max %.2f s (lease %d s); leaders "
               "stepping down during the etcd member kill: %d\n",
               kill_failovers.size(), absl::ToDoubleSeconds(Percentile(kill_failovers, 0.5)),
               absl::ToDoubleSeconds(Percentile(kill_failovers, 0.99)),
               absl::ToDoubleSeconds(Percentile(kill_failovers, 1.0)), handovers.size(),
               absl::ToDoubleSeconds(Percentile(handovers, 0.5)),
               absl::ToDoubleSeconds(Percentile(handovers, 1.0)), kLeaseSeconds, stepped_down);
  EXPECT_GT(checked, 0u);
  EXPECT_GT(acked.offered.size(), 0u);
  EXPECT_GE(epochs.size(), static_cast<size_t>(absl::GetFlag(FLAGS_leader_kills)));
}

// Without an etcd quorum: the leader cannot renew its lease, stops serving
// (reads too) and exits; every replica answers UNAVAILABLE NOT_LEADER with
// no leader named; once a quorum is back, a leader serves every
// acknowledged change.
TEST_F(HaTest, WithoutAQuorumNothingIsServedAndEverythingComesBack) {
  const int leader = WaitForLeader();
  ASSERT_GE(leader, 0) << ReadFile(replicas_->log_path(0));
  CallSessionClient app(following_, FollowingOptions());
  ASSERT_THAT(Eventually([&] { return app.Initialize("quorum"); }), IsOk());
  auto line = Eventually([&] { return app.LineOpen(5, {v1::CALL_PRIVILEGE_OWNER}); });
  ASSERT_THAT(line, IsOk());
  absl::StatusOr<v1::MakeCallResponse> made = app.MakeCall(*line, "5550100", "before");
  ASSERT_THAT(made, IsOk());

  etcd_->Kill(1);
  etcd_->Kill(2);
  EXPECT_EQ(replicas_->process(leader).Reap(0, absl::Seconds(15)), 75)
      << "a leader that cannot renew its lease exits";
  EXPECT_TRUE(absl::StrContains(ReadFile(replicas_->log_path(leader)), "leadership_lost"));
  for (int i = 0; i < 3; ++i) {
    if (i == leader) continue;
    CallSessionClient direct(
        grpc::CreateChannel(replicas_->address(i), grpc::InsecureChannelCredentials()));
    direct.set_token(app.token());
    absl::StatusOr<v1::CallInfo> refused = direct.GetCallInfo(made->call_handle());
    EXPECT_TRUE(absl::IsUnavailable(refused.status())) << refused.status();
    EXPECT_EQ(TapiReason(refused.status()), "NOT_LEADER");
  }

  etcd_->Restart(1);
  etcd_->Restart(2);
  replicas_->Start(leader);
  absl::StatusOr<v1::CallStatus> status =
      Eventually([&] { return app.GetCallStatus(made->call_handle()); });
  ASSERT_THAT(status, IsOk());
  EXPECT_EQ(status->call_state(), v1::CALL_STATE_DIALING);
  absl::StatusOr<v1::MakeCallResponse> again = app.MakeCall(*line, "5550100", "before");
  ASSERT_THAT(again, IsOk());
  EXPECT_EQ(again->call_handle(), made->call_handle());
}

// A call on a device that many monitors watch writes one entry with an
// event for each (more records than one etcd transaction may hold): it is
// written as an intent, acknowledged whole, and survives a leader kill
// whole.
TEST_F(HaTest, AnEntryLargerThanATransactionIsWrittenWhole) {
  ASSERT_GE(WaitForLeader(), 0) << ReadFile(replicas_->log_path(0));
  CallSessionClient owner(following_, FollowingOptions());
  ASSERT_THAT(Eventually([&] { return owner.Initialize("owner"); }), IsOk());
  auto line = Eventually([&] { return owner.LineOpen(3, {v1::CALL_PRIVILEGE_OWNER}); });
  ASSERT_THAT(line, IsOk());
  // More monitors than --etcd_max_txn_ops (128).
  constexpr int kMonitors = 150;
  std::vector<std::unique_ptr<CallSessionClient>> monitors;
  for (int i = 0; i < kMonitors; ++i) {
    monitors.push_back(std::make_unique<CallSessionClient>(following_, FollowingOptions()));
    ASSERT_THAT(Eventually([&] { return monitors.back()->Initialize("monitor"); }), IsOk());
    ASSERT_THAT(
        Eventually([&] { return monitors.back()->LineOpen(3, {v1::CALL_PRIVILEGE_MONITOR}); }),
        IsOk());
  }
  absl::StatusOr<v1::MakeCallResponse> made = owner.MakeCall(*line, "5550100", "big");
  ASSERT_THAT(made, IsOk());

  const int leader = WaitForLeader();
  ASSERT_GE(leader, 0);
  EXPECT_TRUE(absl::StrContains(ReadFile(replicas_->log_path(leader)), "large_entry_written"))
      << "the call was not one entry larger than a transaction";
  replicas_->process(leader).Reap(SIGKILL);
  ASSERT_THAT(Eventually([&] { return owner.KeepAlive(); }), IsOk());
  EXPECT_NE(WaitForLeader(), leader);

  absl::StatusOr<v1::CallInfo> info = owner.GetCallInfo(made->call_handle());
  ASSERT_THAT(info, IsOk());
  EXPECT_EQ(info->num_monitors(), static_cast<uint32_t>(kMonitors));
  for (auto& monitor : monitors) {
    absl::StatusOr<v1::ListCallsResponse> seen = monitor->ListAllCalls();
    ASSERT_THAT(seen, IsOk());
    ASSERT_EQ(seen->calls_size(), 1);
    EXPECT_EQ(seen->calls(0).info().call_id(), info->call_id());
  }
  // No intent is left behind.
  EXPECT_EQ(probe_->CountPrefix("/callsession/intent/"), 0);
}

// Retention: the leader compacts etcd's history behind its replicas. A
// standby paused while the history it needed was compacted away reloads its
// copy when it resumes (standby_behind_retention), and can then take over
// with every acknowledged change.
class HaRetentionTest : public HaTest {
 protected:
  int64_t RetainedRevisions() const override { return 1; }
};

TEST_F(HaRetentionTest, AStandbyBehindTheRetainedHistoryReloadsAndTakesOverWhole) {
  int leader = WaitForLeader();
  ASSERT_GE(leader, 0) << ReadFile(replicas_->log_path(0));
  const int paused = (leader + 1) % 3;
  ASSERT_TRUE(replicas_->WaitForLog(paused, "standby_loaded", 1));
  replicas_->process(paused).Signal(SIGSTOP);
  // Its watch is on the first etcd member: that member goes away, so on
  // resuming it must watch again, from where it was, elsewhere.
  etcd_->Kill(0);

  CallSessionClient app(following_, FollowingOptions());
  ASSERT_THAT(Eventually([&] { return app.Initialize("retention"); }), IsOk());
  auto line = Eventually([&] { return app.LineOpen(4, {v1::CALL_PRIVILEGE_OWNER}); });
  ASSERT_THAT(line, IsOk());
  // Well over a thousand journal writes, then time for a compaction pass
  // (every 10 s) to go past the paused standby (its lease, and with it its
  // published position, expired).
  std::vector<uint64_t> handles;
  for (int i = 0; i < 700; ++i) {
    absl::StatusOr<v1::MakeCallResponse> made = app.MakeCall(*line, "5550100");
    ASSERT_THAT(made, IsOk());
    ASSERT_THAT(app.Drop(made->call_handle()), IsOk());
    handles.push_back(made->call_handle());
  }
  leader = WaitForLeader();
  ASSERT_GE(leader, 0);
  ASSERT_NE(leader, paused);
  const int other = 3 - leader - paused;
  ASSERT_TRUE(replicas_->WaitForLog(leader, "etcd_compacted", 1, absl::Seconds(40)))
      << ReadFile(replicas_->log_path(leader));
  replicas_->process(paused).Signal(SIGCONT);
  ASSERT_TRUE(replicas_->WaitForLog(paused, "standby_behind_retention", 1))
      << ReadFile(replicas_->log_path(paused));
  ASSERT_TRUE(replicas_->WaitForLog(paused, "standby_loaded", 2));

  // Only the resumed standby is left to take over.
  replicas_->process(other).Reap(SIGKILL);
  replicas_->process(leader).Reap(SIGKILL);
  ASSERT_THAT(Eventually([&] { return app.KeepAlive(); }), IsOk());
  EXPECT_EQ(WaitForLeader(), paused);
  for (uint64_t handle : handles) {
    absl::StatusOr<v1::CallStatus> status = app.GetCallStatus(handle);
    ASSERT_THAT(status, IsOk()) << handle;
    EXPECT_EQ(status->call_state(), v1::CALL_STATE_IDLE) << handle;
  }
}

// TLS to etcd: an etcd that requires client certificates (made by
// openssl) is reached with --etcd_ca, --etcd_cert and --etcd_key; without a
// client certificate it refuses, and the process never leads.
TEST(HaTlsTest, EtcdOverMutualTls) {
  if (FindInPath("etcd").empty()) GTEST_SKIP() << "etcd is not installed (etcd-server)";
  const std::string dir = MakeTempDir("callsession-ha-tls");
  {
    std::ofstream script(dir + "/certs.sh");
    script << "set -e\ncd " << dir << "\n"
           << "key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out $1; }\n"
           << "key ca.key\n"
           << "openssl req -x509 -new -key ca.key -subj /CN=etcd-ca -days 1 -out ca.pem\n"
           << "cert() {\n  key $1.key\n"
           << "  openssl req -new -key $1.key -subj /CN=$1 -out $1.csr\n"
           << "  printf 'subjectAltName=%s\\nextendedKeyUsage=serverAuth,clientAuth\\n' $2 > "
              "$1.ext\n"
           << "  openssl x509 -req -in $1.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 1 "
              "-extfile $1.ext -out $1.pem\n}\n"
           << "cert server IP:127.0.0.1,DNS:localhost\ncert client DNS:callsessiond\n";
  }
  ASSERT_EQ(std::system(absl::StrCat("bash ", dir, "/certs.sh >", dir, "/certs.log 2>&1").c_str()),
            0)
      << ReadFile(dir + "/certs.log");

  const int client_port = FreePort();
  const int peer_port = FreePort();
  const std::string client_url = absl::StrCat("https://127.0.0.1:", client_port);
  Child etcd({FindInPath("etcd"), "--name=tls", absl::StrCat("--data-dir=", dir, "/etcd"),
              absl::StrCat("--listen-client-urls=", client_url),
              absl::StrCat("--advertise-client-urls=", client_url),
              absl::StrCat("--listen-peer-urls=http://127.0.0.1:", peer_port),
              absl::StrCat("--initial-advertise-peer-urls=http://127.0.0.1:", peer_port),
              absl::StrCat("--initial-cluster=tls=http://127.0.0.1:", peer_port),
              absl::StrCat("--cert-file=", dir, "/server.pem"),
              absl::StrCat("--key-file=", dir, "/server.key"), "--client-cert-auth",
              absl::StrCat("--trusted-ca-file=", dir, "/ca.pem"), "--log-level=warn"},
             {}, absl::StrCat(dir, "/etcd.log"));
  absl::SleepFor(absl::Seconds(2));

  auto start = [&](const std::string& name, std::vector<std::string> tls) {
    const int port = FreePort();
    std::vector<std::string> argv = {CALLSESSIOND_PATH,
                                     "--store=etcd",
                                     absl::StrCat("--etcd_endpoints=127.0.0.1:", client_port),
                                     absl::StrCat("--listen=127.0.0.1:", port),
                                     absl::StrCat("--advertise_address=127.0.0.1:", port),
                                     absl::StrCat("--member_name=", name)};
    argv.insert(argv.end(), tls.begin(), tls.end());
    return std::make_pair(port, Child(argv, {}, absl::StrCat(dir, "/", name, ".log")));
  };
  auto wait_for = [&](const std::string& name, const std::string& event, int tries = 200) {
    const std::string needle = absl::StrCat("\"event\":\"", event, "\"");
    for (int i = 0; i < tries; ++i) {
      if (absl::StrContains(ReadFile(absl::StrCat(dir, "/", name, ".log")), needle)) return true;
      absl::SleepFor(absl::Milliseconds(50));
    }
    return false;
  };

  // Without a client certificate: refused, never leads.
  auto [refused_port, refused] =
      start("no-client-cert", {absl::StrCat("--etcd_ca=", dir, "/ca.pem")});
  EXPECT_TRUE(wait_for("no-client-cert", "etcd_unreachable"))
      << ReadFile(absl::StrCat(dir, "/no-client-cert.log"));
  EXPECT_FALSE(wait_for("no-client-cert", "leading", 40));
  refused.Reap(SIGTERM);

  auto [port, mutual] = start("mutual", {absl::StrCat("--etcd_ca=", dir, "/ca.pem"),
                                         absl::StrCat("--etcd_cert=", dir, "/client.pem"),
                                         absl::StrCat("--etcd_key=", dir, "/client.key")});
  ASSERT_TRUE(wait_for("mutual", "leading")) << ReadFile(absl::StrCat(dir, "/mutual.log"));
  CallSessionClient app(
      grpc::CreateChannel(absl::StrCat("127.0.0.1:", port), grpc::InsecureChannelCredentials()));
  ASSERT_THAT(Eventually([&] { return app.Initialize("over-tls"); }), IsOk());
  auto line = app.LineOpen(0, {v1::CALL_PRIVILEGE_OWNER});
  ASSERT_THAT(line, IsOk());
  EXPECT_THAT(app.MakeCall(*line, "5550100"), IsOk());
  EXPECT_EQ(mutual.Reap(SIGTERM), 0);
  if (!::testing::Test::HasFailure()) std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace callsession

int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  absl::ParseCommandLine(argc, argv);
  return RUN_ALL_TESTS();
}
