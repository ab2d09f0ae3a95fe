// The journal's central property, checked at every crash point rather than at
// a few random ones: threads drive the core concurrently (apps opening and
// closing lines, placing, answering, dropping and deallocating calls with
// request ids, monitors, GetNewCalls, shutdowns; the provider offering,
// changing and force-closing) through a MemoryJournal; then the records
// after every prefix of the journal (every entry boundary, sampled when the
// journal is long) must recover without error and hold the invariants that
// recovery cannot check alone: no live outbound call without its owner's
// handle. The whole journal must recover to exactly the live core.
//
// Runs in the core-only build too, so ThreadSanitizer sees the journaled
// paths (Change::Commit, event delivery gated on durability).
#include <atomic>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/random/random.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "callsession/storage/v1/records.pb.h"
#include "server/core/call_session_core.h"
#include "server/core/journal_records.h"
#include "server/core/log.h"
#include "tests/memory_journal.h"
#include "tests/test_support.h"

namespace callsession {
namespace {

constexpr char kProvider[] = "prefix-provider";
constexpr uint32_t kDevices = 3;

CoreOptions Options(Journal* journal) {
  CoreOptions options;
  options.num_devices = kDevices;
  options.shards = 8;
  options.provider_token = kProvider;
  options.event_buffer = 32;  // small, so trimming is journaled too
  options.request_id_cache = 8;
  options.journal = journal;
  return options;
}

// One application's random walk through the API; errors are expected
// (handles another thread voided, calls already IDLE) and ignored: only
// the journal's consistency matters here.
void AppWorker(CallSessionCore& core, int seed, int steps, absl::Mutex* tokens_mu,
               std::vector<std::string>* tokens) {
  absl::BitGen random(std::seed_seq{seed});
  std::string token;
  std::vector<uint64_t> lines;
  std::vector<uint64_t> calls;
  int request = 0;
  for (int step = 0; step < steps; ++step) {
    if (token.empty()) {
      v1::InitializeResponse init;
      if (!core.Initialize({}, v1::InitializeRequest(), &init).ok()) continue;
      token = init.app_token();
      lines.clear();
      calls.clear();
      absl::MutexLock lock(tokens_mu);
      tokens->push_back(token);
    }
    const int op = absl::Uniform(random, 0, 100);
    if (op < 12 || lines.empty()) {
      v1::LineOpenRequest open;
      open.set_device_id(absl::Uniform<uint32_t>(random, 0, kDevices));
      const int privileges = absl::Uniform(random, 0, 4);
      if (privileges & 1) open.add_privileges(v1::CALL_PRIVILEGE_OWNER);
      if (privileges & 2) open.add_privileges(v1::CALL_PRIVILEGE_MONITOR);
      v1::LineOpenResponse opened;
      if (core.LineOpen(token, open, &opened).ok()) lines.push_back(opened.line_handle());
    } else if (op < 40) {
      v1::MakeCallRequest make;
      make.set_line_handle(lines[absl::Uniform<size_t>(random, 0, lines.size())]);
      make.set_dest_address("+15550100");
      // Some ids are retried, some new.
      make.set_request_id(
          absl::StrCat("r", absl::Uniform(random, 0, 3) == 0 ? request : ++request));
      v1::MakeCallResponse made;
      if (core.MakeCall(token, make, &made).ok()) calls.push_back(made.call_handle());
    } else if (op < 50) {
      v1::ListCallsResponse listed;
      if (core.ListCalls(token, v1::ListCallsRequest(), &listed).ok()) {
        calls.clear();
        for (const auto& entry : listed.calls()) calls.push_back(entry.call_handle());
      }
    } else if (op < 80 && !calls.empty()) {
      const uint64_t handle = calls[absl::Uniform<size_t>(random, 0, calls.size())];
      const int which = absl::Uniform(random, 0, 3);
      if (which == 0) {
        v1::AnswerRequest answer;
        answer.set_call_handle(handle);
        v1::AnswerResponse answered;
        (void)core.Answer(token, answer, &answered);
      } else if (which == 1) {
        v1::DropRequest drop;
        drop.set_call_handle(handle);
        v1::DropResponse dropped;
        (void)core.Drop(token, drop, &dropped);
      } else {
        v1::DeallocateCallRequest deallocate;
        deallocate.set_call_handle(handle);
        v1::DeallocateCallResponse deallocated;
        (void)core.DeallocateCall(token, deallocate, &deallocated);
      }
    } else if (op < 88) {
      v1::GetNewCallsRequest get;
      get.set_line_handle(lines[absl::Uniform<size_t>(random, 0, lines.size())]);
      v1::GetNewCallsResponse got;
      (void)core.GetNewCalls(token, get, &got);
    } else if (op < 97) {
      v1::LineCloseRequest close;
      const size_t index = absl::Uniform<size_t>(random, 0, lines.size());
      close.set_line_handle(lines[index]);
      v1::LineCloseResponse closed;
      (void)core.LineClose(token, close, &closed);
      lines.erase(lines.begin() + index);
    } else {
      v1::ShutdownResponse shut;
      (void)core.Shutdown(token, v1::ShutdownRequest(), &shut);
      token.clear();
    }
  }
}

void ProviderWorker(CallSessionCore& core, int steps) {
  absl::BitGen random(std::seed_seq{99});
  std::vector<uint64_t> calls;
  for (int step = 0; step < steps; ++step) {
    const int op = absl::Uniform(random, 0, 100);
    if (op < 40 || calls.empty()) {
      v1::OfferCallRequest offer;
      offer.set_device_id(absl::Uniform<uint32_t>(random, 0, kDevices));
      offer.set_caller_id("+15550111");
      v1::OfferCallResponse offered;
      if (core.OfferCall(kProvider, offer, &offered).ok()) calls.push_back(offered.call_id());
    } else if (op < 95) {
      v1::SetCallStateRequest set;
      set.set_call_id(calls[absl::Uniform<size_t>(random, 0, calls.size())]);
      set.set_call_state(static_cast<v1::CallState>(absl::Uniform(random, 1, 17)));
      v1::SetCallStateResponse done;
      (void)core.SetCallState(kProvider, set, &done);
    } else {
      v1::ForceLineCloseRequest force;
      force.set_device_id(absl::Uniform<uint32_t>(random, 0, kDevices));
      v1::ForceLineCloseResponse forced;
      (void)core.ForceLineClose(kProvider, force, &forced);
    }
  }
}

// What recovery cannot check on its own: a live outbound call always has
// its owner's handle (the owner may void it only once the call is IDLE; a
// line close that voids it drops the call in the same entry).
std::string CheckInvariants(const MemoryJournal::Records& records) {
  for (const auto& [key, value] : records) {
    absl::StatusOr<ParsedKey> parsed = ParseKey(key);
    if (!parsed.ok() || parsed->kind != RecordKind::kCall) continue;
    storage::v1::CallRecord call;
    call.ParseFromString(value);
    if (call.origin() != v1::CALL_ORIGIN_OUTBOUND || call.state() == v1::CALL_STATE_IDLE) continue;
    bool owned = false;
    for (const auto& holder : call.holders())
      owned |= holder.privilege() == v1::CALL_PRIVILEGE_OWNER;
    if (!owned) return absl::StrCat("live outbound call ", call.call_id(), " has no owner");
  }
  return "";
}

TEST(JournalPrefixTest, EveryPrefixOfTheJournalRecoversToAConsistentState) {
  SetLogLevel(LogLevel::kError);
  MemoryJournal journal;
  CallSessionCore core(Options(&journal));
  ASSERT_THAT(core.Recover(), IsOk());

  absl::Mutex tokens_mu;
  std::vector<std::string> tokens;
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back(AppWorker, std::ref(core), t + 1, 400, &tokens_mu, &tokens);
  }
  threads.emplace_back(ProviderWorker, std::ref(core), 400);
  for (std::thread& thread : threads) thread.join();
  journal.WaitUntilDurable();

  const size_t entries = journal.entries();
  ASSERT_GT(entries, 500u) << "the workload did little";
  // Every boundary when short; else about 1500 of them, and the last.
  const size_t stride = std::max<size_t>(1, entries / 1500);
  size_t checked = 0;
  for (size_t count = 0; count <= entries; count += stride) {
    const MemoryJournal::Records records = journal.RecordsAfter(count);
    MemoryJournal replay(records);
    CallSessionCore recovered(Options(&replay));
    absl::StatusOr<RecoveryCounts> counts = recovered.Recover();
    ASSERT_THAT(counts, IsOk()) << "after entry " << count << " of " << entries;
    const std::string broken = CheckInvariants(records);
    ASSERT_EQ(broken, "") << "after entry " << count << " of " << entries;
    ++checked;
    if (count + stride > entries && count != entries) count = entries - stride;
  }
  std::printf("journal prefixes recovered: %zu of %zu entry boundaries\n", checked, entries + 1);

  // The whole journal is the live core, handle for handle.
  MemoryJournal replay(journal.RecordsAfter(entries));
  CallSessionCore recovered(Options(&replay));
  ASSERT_THAT(recovered.Recover(), IsOk());
  const StoreCounts live = core.Stats().live;
  const StoreCounts again = recovered.Stats().live;
  EXPECT_EQ(again.apps, live.apps);
  EXPECT_EQ(again.lines, live.lines);
  EXPECT_EQ(again.calls, live.calls);
  EXPECT_EQ(again.call_handles, live.call_handles);
  for (const std::string& token : tokens) {
    v1::ListCallsResponse before;
    v1::ListCallsResponse after;
    const absl::Status listed = core.ListCalls(token, v1::ListCallsRequest(), &before);
    EXPECT_EQ(recovered.ListCalls(token, v1::ListCallsRequest(), &after).code(), listed.code());
    if (!listed.ok()) continue;  // shut down: gone in both
    EXPECT_EQ(after.SerializeAsString(), before.SerializeAsString());
  }
}

}  // namespace
}  // namespace callsession
