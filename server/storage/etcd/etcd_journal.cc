#include "server/storage/etcd/etcd_journal.h"

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <map>
#include <thread>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
#include "grpcpp/client_context.h"
#include "server/core/log.h"
#include "server/storage/etcd/etcd_client.h"

namespace callsession {
namespace {

using etcdserverpb::Compare;
using etcdserverpb::RequestOp;
using etcdserverpb::TxnRequest;

// The end of the range of every key that starts with `prefix`.
std::string PrefixEnd(std::string prefix) {
  while (!prefix.empty()) {
    unsigned char last = static_cast<unsigned char>(prefix.back());
    if (last < 0xff) {
      prefix.back() = static_cast<char>(last + 1);
      return prefix;
    }
    prefix.pop_back();
  }
  return std::string(1, '\0');  // every key
}

[[noreturn]] void Stop(int code, const char* event, std::initializer_list<LogField> fields) {
  Log(LogLevel::kError, event, fields);
  std::_Exit(code);
}

// One entry's operations, as etcd requests.
class TxnOpsWriter final : public JournalWriter {
 public:
  TxnOpsWriter(const std::string& records_prefix, std::vector<RequestOp>& ops, size_t& bytes)
      : prefix_(records_prefix), ops_(ops), bytes_(bytes) {}
  void Put(absl::string_view key, absl::string_view value) override {
    auto* put = ops_.emplace_back().mutable_request_put();
    put->set_key(absl::StrCat(prefix_, key));
    put->set_value(std::string(value));
    bytes_ += prefix_.size() + key.size() + value.size();
  }
  void Delete(absl::string_view key) override {
    ops_.emplace_back().mutable_request_delete_range()->set_key(absl::StrCat(prefix_, key));
    bytes_ += prefix_.size() + key.size();
  }
  void DeleteRange(absl::string_view begin, absl::string_view end) override {
    auto* del = ops_.emplace_back().mutable_request_delete_range();
    del->set_key(absl::StrCat(prefix_, begin));
    del->set_range_end(absl::StrCat(prefix_, end));
    bytes_ += 2 * prefix_.size() + begin.size() + end.size();
  }

 private:
  const std::string& prefix_;
  std::vector<RequestOp>& ops_;
  size_t& bytes_;
};

class EtcdJournal final : public Journal {
 public:
  EtcdJournal(EtcdJournalOptions options, std::unique_ptr<EtcdClient> client, LeaderGate* gate)
      : options_(std::move(options)),
        client_(std::move(client)),
        gate_(gate),
        records_prefix_(options_.prefix + "r/"),
        intents_prefix_(options_.prefix + "intent/"),
        leader_key_(options_.prefix + "leader"),
        epoch_key_(options_.prefix + "epoch"),
        replica_key_(options_.prefix + "replicas/" + options_.member_name),
        renew_every_(options_.lease_ttl / 6) {}

  ~EtcdJournal() override {
    if (writer_.joinable()) {
      {
        absl::MutexLock lock(&mu_);
        stopping_ = true;
      }
      writer_.join();
    }
    StopWatching();
    const bool led = leading_.exchange(false);
    gate_->StopLeading();
    stop_.Notify();
    if (compactor_.joinable()) compactor_.join();
    if (renewer_.joinable()) renewer_.join();
    // Revoking the lease deletes P "leader": a standby takes over now
    // rather than after the TTL.
    const absl::Status revoked = client_->LeaseRevoke(lease_.load());
    Log(led ? LogLevel::kInfo : LogLevel::kWarning, led ? "handed_over" : "etcd_store_closed",
        {{"epoch", epoch_}, {"lease_revoked", revoked.ok()}});
  }

  // Grants the lease, loads the copy and starts following; then campaigns
  // until this process leads and has applied everything before its epoch.
  absl::Status Start() {
    for (;;) {
      const int64_t sent = LeaderGate::MonotonicNanos();
      auto granted = client_->LeaseGrant(options_.lease_ttl);
      if (granted.ok()) {
        lease_.store(granted->id());
        lease_valid_until_.store(sent + ValidFor(granted->ttl()));
        break;
      }
      Unreachable(granted.status());
      absl::SleepFor(absl::Milliseconds(500));
    }
    renewer_ = std::thread([this] { Renew(); });
    watcher_ = std::thread([this] { Follow(); });
    Campaign();
    writer_ = std::thread([this] { Write(); });
    compactor_ = std::thread([this] { Compact(); });
    return absl::OkStatus();
  }

  absl::Status Load(Visitor visit) override {
    std::map<std::string, std::string> records;
    {
      absl::MutexLock lock(&copy_mu_);
      records.swap(records_);
    }
    for (const auto& [key, value] : records) {
      absl::Status status = visit(key, value);
      if (!status.ok()) {
        return absl::Status(status.code(),
                            absl::StrCat("etcd store ", options_.prefix, ": ", status.message()));
      }
    }
    return absl::OkStatus();
  }

  uint64_t Append(absl::FunctionRef<void(JournalWriter&, uint64_t)> write) override {
    absl::MutexLock lock(&mu_);
    const uint64_t position = appended_.load(std::memory_order_relaxed) + 1;
    Entry& entry = pending_.emplace_back();
    TxnOpsWriter writer(records_prefix_, entry.ops, entry.bytes);
    write(writer, position);
    entry.position = position;
    entry.appended = absl::Now();
    appended_.store(position, std::memory_order_release);
    return position;
  }

  uint64_t appended_position() const override { return appended_.load(std::memory_order_acquire); }
  uint64_t durable_position() const override { return waiters_.durable_position(); }

  void WhenDurable(uint64_t position, absl::AnyInvocable<void() &&> done) override {
    done = waiters_.WaitFor(position, std::move(done));
    if (done == nullptr) return;
    // Already durable: still never on the caller's thread.
    absl::MutexLock lock(&mu_);
    ready_.push_back(std::move(done));
  }

  absl::Status Checkpoint(const std::string& dir) override {
    return absl::FailedPreconditionError(
        "the etcd store is backed up with etcd's own tools: etcdctl snapshot save");
  }

  void SetObserver(std::shared_ptr<JournalObserver> observer) override {
    absl::MutexLock lock(&mu_);
    observer_ = std::move(observer);
  }

  JournalStats Stats() const override {
    JournalStats stats;
    stats.entries = appended_.load(std::memory_order_relaxed);
    stats.batches = batches_.load(std::memory_order_relaxed);
    // Each Txn is durable on a quorum when it returns.
    stats.syncs = stats.batches;
    stats.bytes = bytes_.load(std::memory_order_relaxed);
    return stats;
  }

 private:
  struct Entry {
    uint64_t position = 0;
    std::vector<RequestOp> ops;
    size_t bytes = 0;
    absl::Time appended;
  };
  using Callbacks = std::vector<absl::AnyInvocable<void() &&>>;

  // How long a renewal answered with `ttl_seconds` lets the leader serve:
  // 90% of it, for clock rate differences and etcd's own timing.
  static int64_t ValidFor(int64_t ttl_seconds) { return ttl_seconds * 900'000'000; }

  void Unreachable(const absl::Status& status) {
    const int64_t now = LeaderGate::MonotonicNanos();
    if (now - last_unreachable_log_.load() > 5'000'000'000) {
      last_unreachable_log_.store(now);
      Log(LogLevel::kWarning, "etcd_unreachable", {{"error", std::string(status.message())}});
    }
  }

  // Keeps the lease alive. A leader whose lease ends exits; a standby's is
  // granted anew.
  void Renew() {
    while (!stop_.WaitForNotificationWithTimeout(renew_every_)) {
      const int64_t sent = LeaderGate::MonotonicNanos();
      absl::StatusOr<int64_t> ttl = client_->LeaseKeepAliveOnce(lease_.load());
      if (ttl.ok() && *ttl > 0) {
        lease_valid_until_.store(sent + ValidFor(*ttl));
        if (leading_.load()) {
          gate_->LeadUntil(sent + ValidFor(*ttl));
        } else {
          PublishApplied();
        }
        continue;
      }
      if (ttl.ok()) {  // the lease is gone
        if (leading_.load()) {
          gate_->StopLeading();
          Stop(kLeadershipLostExitCode, "leadership_lost",
               {{"epoch", epoch_}, {"reason", "the lease expired"}});
        }
        auto granted = client_->LeaseGrant(options_.lease_ttl);
        if (granted.ok()) {
          lease_.store(granted->id());
          lease_valid_until_.store(sent + ValidFor(granted->ttl()));
          Log(LogLevel::kWarning, "lease_renewed", {{"reason", "the standby's lease expired"}});
        } else {
          Unreachable(granted.status());
        }
        continue;
      }
      Unreachable(ttl.status());
      if (leading_.load() && LeaderGate::MonotonicNanos() >= lease_valid_until_.load()) {
        gate_->StopLeading();
        Stop(kLeadershipLostExitCode, "leadership_lost",
             {{"epoch", epoch_},
              {"reason", "etcd did not renew the lease in time"},
              {"error", std::string(ttl.status().message())}});
      }
    }
  }

  // --- The standby's copy -------------------------------------------------

  // Tells the leader how far this standby's copy is (for retention), when
  // it moved.
  void PublishApplied() {
    int64_t applied;
    {
      absl::MutexLock lock(&copy_mu_);
      applied = applied_;
    }
    if (applied == 0 || applied == published_) return;
    TxnRequest txn;
    auto* put = txn.add_success()->mutable_request_put();
    put->set_key(replica_key_);
    put->set_value(absl::StrCat(applied));
    put->set_lease(lease_.load());
    if (client_->Txn(txn).ok()) published_ = applied;
  }

  // Loads every key under the prefix (in pages, at one revision) into the
  // copy. False if etcd could not be read.
  bool Bootstrap() {
    etcdserverpb::RangeRequest request;
    request.set_key(options_.prefix);
    request.set_range_end(PrefixEnd(options_.prefix));
    request.set_limit(2000);
    std::map<std::string, std::string> records;
    std::map<std::string, std::string> intents;
    int64_t revision = 0;
    std::string leader;
    int64_t leader_epoch = 0;
    for (;;) {
      auto page = client_->Range(request);
      if (!page.ok()) {
        Unreachable(page.status());
        return false;
      }
      if (revision == 0) revision = page->header().revision();
      for (const mvccpb::KeyValue& kv : page->kvs()) {
        if (kv.key().rfind(records_prefix_, 0) == 0) {
          records.emplace(kv.key().substr(records_prefix_.size()), kv.value());
        } else if (kv.key().rfind(intents_prefix_, 0) == 0) {
          intents.emplace(kv.key(), kv.value());
        } else if (kv.key() == leader_key_) {
          leader = kv.value();
          leader_epoch = kv.create_revision();
        }
      }
      if (!page->more() || page->kvs().empty()) break;
      request.set_key(page->kvs().rbegin()->key() + std::string(1, '\0'));
      request.set_revision(revision);
    }
    absl::MutexLock lock(&copy_mu_);
    records_.swap(records);
    intents_.swap(intents);
    applied_ = revision;
    leader_epoch_ = leader_epoch;
    gate_->SetLeaderAddress(leader);
    bootstrapped_ = true;
    Log(LogLevel::kInfo, "standby_loaded",
        {{"records", static_cast<uint64_t>(records_.size())},
         {"revision", revision},
         {"leader", leader}});
    gate_->Following();
    return true;
  }

  void ApplyLocked(const mvccpb::Event& event) ABSL_EXCLUSIVE_LOCKS_REQUIRED(copy_mu_) {
    const mvccpb::KeyValue& kv = event.kv();
    const bool put = event.type() == mvccpb::Event::PUT;
    if (kv.key().rfind(records_prefix_, 0) == 0) {
      std::string key = kv.key().substr(records_prefix_.size());
      if (put) {
        records_[std::move(key)] = kv.value();
      } else {
        records_.erase(key);
      }
    } else if (kv.key().rfind(intents_prefix_, 0) == 0) {
      if (put) {
        intents_[kv.key()] = kv.value();
      } else {
        intents_.erase(kv.key());
      }
    } else if (kv.key() == leader_key_) {
      leader_epoch_ = put ? kv.create_revision() : 0;
      gate_->SetLeaderAddress(put ? kv.value() : "");
    }
    applied_ = std::max(applied_, kv.mod_revision());
  }

  // Keeps the copy current until StopWatching: a watch from the revision
  // after the last one applied; reloads the copy when etcd compacted past it.
  void Follow() {
    bool need_bootstrap = true;
    while (!stop_watching_.HasBeenNotified()) {
      if (need_bootstrap) {
        if (!Bootstrap()) {
          stop_watching_.WaitForNotificationWithTimeout(absl::Milliseconds(200));
          continue;
        }
        need_bootstrap = false;
      }
      size_t endpoint = 0;
      etcdserverpb::Watch::Stub& stub = client_->watch_stub(&endpoint);
      grpc::ClientContext context;
      {
        absl::MutexLock lock(&copy_mu_);
        if (stop_watching_.HasBeenNotified()) return;
        watch_context_ = &context;
      }
      auto stream = stub.Watch(&context);
      etcdserverpb::WatchRequest request;
      auto* create = request.mutable_create_request();
      create->set_key(options_.prefix);
      create->set_range_end(PrefixEnd(options_.prefix));
      {
        absl::MutexLock lock(&copy_mu_);
        create->set_start_revision(applied_ + 1);
      }
      bool failed = !stream->Write(request);
      etcdserverpb::WatchResponse response;
      while (!failed && stream->Read(&response)) {
        if (response.compact_revision() > 0) {
          Log(LogLevel::kWarning, "standby_behind_retention",
              {{"compact_revision", response.compact_revision()}});
          need_bootstrap = true;
          break;
        }
        if (response.canceled()) {
          failed = true;
          break;
        }
        absl::MutexLock lock(&copy_mu_);
        for (const mvccpb::Event& event : response.events()) ApplyLocked(event);
      }
      {
        absl::MutexLock lock(&copy_mu_);
        watch_context_ = nullptr;
      }
      context.TryCancel();
      const grpc::Status finished = stream->Finish();
      if (stop_watching_.HasBeenNotified()) return;
      if (!need_bootstrap) {
        client_->Failed(endpoint);
        Unreachable(absl::UnavailableError(absl::StrCat(
            "watch on ", client_->endpoint_name(endpoint), ": ", finished.error_message())));
        stop_watching_.WaitForNotificationWithTimeout(absl::Milliseconds(100));
      }
    }
  }

  void StopWatching() {
    {
      absl::MutexLock lock(&copy_mu_);
      if (!stop_watching_.HasBeenNotified()) stop_watching_.Notify();
      if (watch_context_ != nullptr) watch_context_->TryCancel();
    }
    if (watcher_.joinable()) watcher_.join();
  }

  bool LeaderAbsentLocked() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(copy_mu_) {
    return bootstrapped_ && leader_epoch_ == 0;
  }

  bool CaughtUpLocked() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(copy_mu_) { return applied_ >= epoch_; }

  // Returns once this process leads and its copy holds every record written
  // before its epoch.
  void Campaign() {
    for (;;) {
      {
        absl::MutexLock lock(&copy_mu_);
        copy_mu_.AwaitWithTimeout(absl::Condition(this, &EtcdJournal::LeaderAbsentLocked),
                                  absl::Seconds(1));
        if (!bootstrapped_ || leader_epoch_ != 0) continue;
      }
      TxnRequest txn;
      Compare* absent = txn.add_compare();
      absent->set_key(leader_key_);
      absent->set_target(Compare::CREATE);
      absent->set_result(Compare::EQUAL);
      absent->set_create_revision(0);
      auto* put = txn.add_success()->mutable_request_put();
      put->set_key(leader_key_);
      put->set_value(options_.advertise_address);
      put->set_lease(lease_.load());
      auto won = client_->Txn(txn);
      if (!won.ok()) {
        Unreachable(won.status());
        absl::SleepFor(absl::Milliseconds(100));
        continue;
      }
      if (!won->succeeded()) continue;  // another process was faster
      epoch_ = won->header().revision();
      break;
    }
    const absl::Time won_at = absl::Now();
    // The watch delivers this process's own P "leader" put at the epoch;
    // everything before it is then in the copy, and nothing can follow it
    // but this process's own writes.
    {
      absl::MutexLock lock(&copy_mu_);
      copy_mu_.Await(absl::Condition(this, &EtcdJournal::CaughtUpLocked));
    }
    StopWatching();
    leading_.store(true);
    FinishIntents();
    gate_->LeadUntil(lease_valid_until_.load());
    gate_->SetLeaderAddress(options_.advertise_address);
    Log(LogLevel::kInfo, "leading",
        {{"epoch", epoch_},
         {"address", options_.advertise_address},
         {"catch_up_seconds", absl::ToDoubleSeconds(absl::Now() - won_at)}});
  }

  // --- The leader's writes ------------------------------------------------

  bool HasWorkLocked() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    return !pending_.empty() || !ready_.empty() || stopping_;
  }

  TxnRequest FencedTxn() const {
    TxnRequest txn;
    Compare* ours = txn.add_compare();
    ours->set_key(leader_key_);
    ours->set_target(Compare::CREATE);
    ours->set_result(Compare::EQUAL);
    ours->set_create_revision(epoch_);
    auto* epoch = txn.add_success()->mutable_request_put();
    epoch->set_key(epoch_key_);
    epoch->set_value(absl::StrCat(epoch_, " ", options_.advertise_address));
    return txn;
  }

  // Writes `txn` (retrying while etcd is unreachable, as long as the lease
  // holds); exits the process if it cannot. The revision it was written at.
  int64_t WriteFenced(const TxnRequest& txn) {
    const int64_t revision = WriteFencedOnce(txn);
    written_revision_.store(revision);
    return revision;
  }

  int64_t WriteFencedOnce(const TxnRequest& txn) {
    for (;;) {
      auto written = client_->Txn(txn);
      if (written.ok()) {
        if (!written->succeeded()) {
          gate_->StopLeading();
          Stop(kLeadershipLostExitCode, "leadership_lost",
               {{"epoch", epoch_}, {"reason", "another process leads (the write was fenced)"}});
        }
        return written->header().revision();
      }
      const absl::Status& error = written.status();
      if (!absl::IsUnavailable(error) && !absl::IsDeadlineExceeded(error)) {
        Stop(kJournalFailureExitCode, "journal_write_failed",
             {{"store", "etcd"}, {"error", std::string(error.message())}});
      }
      Unreachable(error);
      if (LeaderGate::MonotonicNanos() >= lease_valid_until_.load()) {
        gate_->StopLeading();
        Stop(kLeadershipLostExitCode, "leadership_lost",
             {{"epoch", epoch_},
              {"reason", "etcd took the writes for longer than the lease"},
              {"error", std::string(error.message())}});
      }
      absl::SleepFor(absl::Milliseconds(50));
    }
  }

  void Write() {
    for (;;) {
      std::vector<Entry> entries;
      Callbacks ready;
      std::shared_ptr<JournalObserver> observer;
      {
        absl::MutexLock lock(&mu_);
        mu_.Await(absl::Condition(this, &EtcdJournal::HasWorkLocked));
        ready.swap(ready_);
        entries.swap(pending_);
        observer = observer_;
        if (entries.empty() && ready.empty() && stopping_) return;
      }
      for (auto& done : ready) std::move(done)();
      size_t next = 0;
      while (next < entries.size()) {
        const absl::Time first = entries[next].appended;
        if (Large(entries[next])) {
          const size_t bytes = entries[next].bytes;
          WriteLarge(entries[next]);
          Durable(entries[next].position, first, 1, bytes, observer.get());
          ++next;
          continue;
        }
        // One Txn: whole entries, as many as fit.
        TxnRequest txn = FencedTxn();
        size_t bytes = 0;
        size_t taken = 0;
        while (next < entries.size() && !Large(entries[next])) {
          Entry& entry = entries[next];
          const size_t ops = static_cast<size_t>(txn.success_size()) + entry.ops.size();
          if (taken > 0 && ops > options_.max_txn_ops) break;
          for (RequestOp& op : entry.ops) *txn.add_success() = std::move(op);
          bytes += entry.bytes;
          ++taken;
          ++next;
        }
        WriteFenced(txn);
        Durable(entries[next - 1].position, first, taken, bytes, observer.get());
      }
    }
  }

  // Marks everything up to `last` durable and runs its callbacks.
  void Durable(uint64_t last, absl::Time first, size_t entries, size_t bytes,
               JournalObserver* observer) {
    batches_.fetch_add(1, std::memory_order_relaxed);
    bytes_.fetch_add(bytes, std::memory_order_relaxed);
    Callbacks done = waiters_.MarkDurable(last);
    if (observer != nullptr) observer->OnBatchDurable(absl::Now() - first, entries, bytes);
    for (auto& callback : done) std::move(callback)();
  }

  // --- Large entries --------------------------------------------------------
  //
  // An entry with more operations than one Txn may hold (an application
  // with many calls shutting down) cannot be one Txn. It is written as an
  // intent instead: its operations, serialized, in chunks under
  // P "intent/<epoch>-<position>/c<i>", then P ".../commit" (the entry is
  // durable from then on), then applied in Txns of at most max_txn_ops, and
  // the intent deleted. Nothing else is written meanwhile, so a committed
  // intent still present when a new leader takes over is the last thing
  // written: the new leader applies it (again: puts and deletes are
  // idempotent) to its copy and to etcd before it serves, and deletes an
  // uncommitted one.

  bool Large(const Entry& entry) const { return entry.ops.size() + 1 > options_.max_txn_ops; }

  static std::string Fixed(uint64_t value) {
    std::string digits = absl::StrCat(value);
    return std::string(20 - std::min<size_t>(20, digits.size()), '0') + digits;
  }

  void WriteLarge(Entry& entry) {
    TxnRequest bundle;
    for (RequestOp& op : entry.ops) *bundle.add_success() = std::move(op);
    const std::string blob = bundle.SerializeAsString();
    const std::string base =
        absl::StrCat(intents_prefix_, Fixed(epoch_), "-", Fixed(entry.position), "/");
    constexpr size_t kChunkBytes = 512 << 10;
    size_t chunks = 0;
    for (size_t at = 0; at < blob.size() || chunks == 0; at += kChunkBytes, ++chunks) {
      TxnRequest txn = FencedTxn();
      auto* put = txn.add_success()->mutable_request_put();
      put->set_key(absl::StrCat(base, "c", Fixed(chunks)));
      put->set_value(blob.substr(at, kChunkBytes));
      WriteFenced(txn);
    }
    TxnRequest commit = FencedTxn();
    auto* put = commit.add_success()->mutable_request_put();
    put->set_key(absl::StrCat(base, "commit"));
    put->set_value(absl::StrCat(chunks));
    WriteFenced(commit);
    Log(LogLevel::kInfo, "large_entry_written",
        {{"operations", bundle.success_size()}, {"chunks", static_cast<uint64_t>(chunks)}});
    ApplyIntent(base, bundle);
  }

  // Applies a committed intent's operations to etcd, then deletes it.
  void ApplyIntent(const std::string& base, const TxnRequest& bundle) {
    int index = 0;
    while (index < bundle.success_size()) {
      TxnRequest txn = FencedTxn();
      while (index < bundle.success_size() &&
             static_cast<size_t>(txn.success_size()) < options_.max_txn_ops) {
        *txn.add_success() = bundle.success(index++);
      }
      WriteFenced(txn);
    }
    TxnRequest done = FencedTxn();
    auto* erase = done.add_success()->mutable_request_delete_range();
    erase->set_key(base);
    erase->set_range_end(PrefixEnd(base));
    WriteFenced(done);
  }

  // On taking over: finishes what a former leader left of large entries.
  void FinishIntents() {
    std::map<std::string, std::string> intents;
    {
      absl::MutexLock lock(&copy_mu_);
      intents.swap(intents_);
    }
    std::map<std::string, std::vector<const std::string*>> chunks;  // by base
    std::map<std::string, bool> committed;
    for (const auto& [key, value] : intents) {
      const size_t slash = key.rfind('/');
      const std::string base = key.substr(0, slash + 1);
      const std::string leaf = key.substr(slash + 1);
      if (leaf == "commit") {
        committed[base] = true;
      } else {
        chunks[base].push_back(&value);  // "c<i>" keys sort in order
        committed.emplace(base, false);
      }
    }
    for (const auto& [base, done] : committed) {
      TxnRequest bundle;
      std::string blob;
      for (const std::string* chunk : chunks[base]) blob += *chunk;
      if (done && bundle.ParseFromString(blob)) {
        Log(LogLevel::kWarning, "large_entry_redone",
            {{"intent", base}, {"operations", bundle.success_size()}});
        {
          absl::MutexLock lock(&copy_mu_);
          for (const RequestOp& op : bundle.success()) RedoLocked(op);
        }
        ApplyIntent(base, bundle);
      } else {
        // Never acknowledged: it did not happen.
        TxnRequest drop = FencedTxn();
        auto* erase = drop.add_success()->mutable_request_delete_range();
        erase->set_key(base);
        erase->set_range_end(PrefixEnd(base));
        WriteFenced(drop);
      }
    }
  }

  // One operation of a committed intent, on the copy.
  void RedoLocked(const RequestOp& op) ABSL_EXCLUSIVE_LOCKS_REQUIRED(copy_mu_) {
    auto record = [this](const std::string& key) { return key.substr(records_prefix_.size()); };
    if (op.has_request_put()) {
      records_[record(op.request_put().key())] = op.request_put().value();
    } else if (op.has_request_delete_range()) {
      const auto& del = op.request_delete_range();
      if (del.range_end().empty()) {
        records_.erase(record(del.key()));
      } else {
        records_.erase(records_.lower_bound(record(del.key())),
                       records_.lower_bound(record(del.range_end())));
      }
    }
  }

  // --- Retention ----------------------------------------------------------

  // Publishes this process's applied revision (a standby's: from its copy;
  // the leader's: its last write), and as the leader compacts etcd's
  // history up to what every live process has applied.
  void Compact() {
    int64_t compacted = 0;
    while (!stop_.WaitForNotificationWithTimeout(absl::Seconds(10))) {
      const int64_t written = written_revision_.load();
      if (written == 0) continue;
      etcdserverpb::RangeRequest replicas;
      replicas.set_key(options_.prefix + "replicas/");
      replicas.set_range_end(PrefixEnd(options_.prefix + "replicas/"));
      auto listed = client_->Range(replicas);
      if (!listed.ok()) continue;
      int64_t oldest = written;
      for (const mvccpb::KeyValue& kv : listed->kvs()) {
        if (kv.key() == replica_key_) continue;
        int64_t applied = 0;
        if (absl::SimpleAtoi(kv.value(), &applied)) oldest = std::min(oldest, applied);
      }
      const int64_t target = oldest - options_.retained_revisions;
      if (target <= compacted + 1000) continue;
      if (client_->Compact(target).ok()) {
        compacted = target;
        Log(LogLevel::kInfo, "etcd_compacted", {{"revision", target}});
      }
    }
  }

  const EtcdJournalOptions options_;
  const std::unique_ptr<EtcdClient> client_;
  LeaderGate* const gate_;
  const std::string records_prefix_;
  const std::string intents_prefix_;
  const std::string leader_key_;
  const std::string epoch_key_;
  const std::string replica_key_;
  const absl::Duration renew_every_;

  std::atomic<int64_t> lease_{0};
  std::atomic<int64_t> lease_valid_until_{0};
  std::atomic<int64_t> last_unreachable_log_{0};
  int64_t published_ = 0;  // Renew's thread only
  std::atomic<bool> leading_{false};
  // Set by Campaign before the writer starts; constant after.
  int64_t epoch_ = 0;
  std::atomic<int64_t> written_revision_{0};
  absl::Notification stop_;
  std::thread renewer_;
  std::thread compactor_;

  // The standby's copy of the records.
  absl::Mutex copy_mu_;
  std::map<std::string, std::string> records_ ABSL_GUARDED_BY(copy_mu_);
  // Large entries' intents (full etcd keys), see WriteLarge.
  std::map<std::string, std::string> intents_ ABSL_GUARDED_BY(copy_mu_);
  int64_t applied_ ABSL_GUARDED_BY(copy_mu_) = 0;
  int64_t leader_epoch_ ABSL_GUARDED_BY(copy_mu_) = 0;
  bool bootstrapped_ ABSL_GUARDED_BY(copy_mu_) = false;
  grpc::ClientContext* watch_context_ ABSL_GUARDED_BY(copy_mu_) = nullptr;
  absl::Notification stop_watching_;
  std::thread watcher_;

  // The leader's queue.
  absl::Mutex mu_;
  std::vector<Entry> pending_ ABSL_GUARDED_BY(mu_);
  Callbacks ready_ ABSL_GUARDED_BY(mu_);
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::shared_ptr<JournalObserver> observer_ ABSL_GUARDED_BY(mu_);
  DurableWaiters waiters_;
  std::atomic<uint64_t> appended_{0};
  std::atomic<uint64_t> batches_{0};
  std::atomic<uint64_t> bytes_{0};
  std::thread writer_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<Journal>> OpenEtcdJournal(const EtcdJournalOptions& options,
                                                         LeaderGate* gate) {
  if (options.advertise_address.empty()) {
    return absl::InvalidArgumentError(
        "--store=etcd needs --advertise_address (the host:port clients reach this process on)");
  }
  if (options.member_name.empty()) {
    return absl::InvalidArgumentError("--store=etcd needs --member_name (e.g. the pod name)");
  }
  if (options.prefix.empty() || options.prefix.back() != '/') {
    return absl::InvalidArgumentError("--etcd_prefix must end with '/'");
  }
  if (options.lease_ttl < absl::Seconds(2)) {
    return absl::InvalidArgumentError("--etcd_lease_ttl must be at least 2s");
  }
  if (options.max_txn_ops < 2) {
    return absl::InvalidArgumentError("--etcd_max_txn_ops must be at least 2");
  }
  EtcdClientOptions client_options;
  client_options.endpoints = options.endpoints;
  client_options.ca_file = options.ca_file;
  client_options.cert_file = options.cert_file;
  client_options.key_file = options.key_file;
  client_options.timeout = options.lease_ttl / 4;
  auto client = EtcdClient::Create(client_options);
  if (!client.ok()) return client.status();
  auto journal = std::make_unique<EtcdJournal>(options, *std::move(client), gate);
  if (absl::Status started = journal->Start(); !started.ok()) return started;
  return journal;
}

}  // namespace callsession
