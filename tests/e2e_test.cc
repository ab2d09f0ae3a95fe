// End to end: the real callsessiond binary, driven by the real callctl.
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "tests/daemon.h"
#include "tests/test_support.h"

namespace callsession {
namespace {

constexpr char kProviderToken[] = "e2e-provider-token";

const std::vector<std::string> kEnvironment = {
    absl::StrCat("CALLSESSION_PROVIDER_TOKEN=", kProviderToken)};

// Runs callctl with `args` (shell words) and the provider token.
CommandResult Callctl(const std::string& args) {
  return RunCommand(
      absl::StrCat("CALLSESSION_PROVIDER_TOKEN=", kProviderToken, " ", CALLCTL_PATH, " ", args));
}

TEST(EndToEndTest, CallctlDemoRunsAWholeLifecycleAgainstCallsessiond) {
  Daemon daemon({"--listen=127.0.0.1:0", "--devices=4", "--shards=16"}, kEnvironment);
  ASSERT_TRUE(daemon.started());
  const std::string address = daemon.WaitUntilListening();
  ASSERT_FALSE(address.empty());

  CommandResult demo = Callctl(absl::StrCat("--server=", address, " demo 2"));
  EXPECT_EQ(demo.exit_code, 0) << demo.output;
  for (const char* step : {"ok  Initialize", "ok  MakeCall", "ok  provider SetCallState CONNECTED",
                           "ok  Drop", "ok  GetCallInfo on the IDLE call", "ok  DeallocateCall",
                           "ok  LineClose", "CALL_STATE_IDLE", "demo complete"}) {
    EXPECT_TRUE(absl::StrContains(demo.output, step)) << "missing \"" << step << "\" in\n"
                                                      << demo.output;
  }

  // A plain subcommand fails cleanly with the TAPI reason.
  CommandResult bad = Callctl(absl::StrCat("--server=", address, " --token=bogus info 1"));
  EXPECT_EQ(bad.exit_code, 1);
  EXPECT_TRUE(absl::StrContains(bad.output, "LINEERR_UNINITIALIZED")) << bad.output;

  EXPECT_EQ(daemon.StopWith(SIGTERM), 0) << "graceful shutdown exits 0";
}

// The documented backup: `callctl checkpoint DIR` while the server runs;
// restore by starting callsessiond on (a copy of) DIR.
TEST(EndToEndTest, ACheckpointTakenWithCallctlRestoresInANewServer) {
  const std::vector<std::string> environment = {
      absl::StrCat("CALLSESSION_PROVIDER_TOKEN=", kProviderToken),
      "CALLSESSION_ADMIN_TOKEN=e2e-admin-token"};
  Daemon daemon({"--listen=127.0.0.1:0"}, environment);
  const std::string address = daemon.WaitUntilListening();
  ASSERT_FALSE(address.empty()) << daemon.log();
  const std::string server = absl::StrCat("--server=", address);
  CommandResult init = Callctl(server + " init backed-up");
  ASSERT_EQ(init.exit_code, 0) << init.output;
  const std::string key = "\"app_token\":\"";
  const size_t at = init.output.find(key);
  ASSERT_NE(at, std::string::npos) << init.output;
  const std::string token =
      init.output.substr(at + key.size(), init.output.find('"', at + key.size()) - at - key.size());
  const std::string app = absl::StrCat(server, " --token=", token);
  CommandResult line = Callctl(app + " line-open 0 owner");
  ASSERT_EQ(line.exit_code, 0) << line.output;
  const std::string line_handle = Daemon::LogField(line.output, "line_handle");
  CommandResult call = Callctl(absl::StrCat(app, " make-call ", line_handle, " +15550100 r-1"));
  ASSERT_EQ(call.exit_code, 0) << call.output;

  const std::string backup = daemon.working_dir() + "/backup-1";
  CommandResult refused = Callctl(absl::StrCat(server, " checkpoint ", backup));
  EXPECT_EQ(refused.exit_code, 1) << "no admin token";
  EXPECT_TRUE(absl::StrContains(refused.output, "UNAUTHENTICATED")) << refused.output;
  CommandResult checkpoint =
      Callctl(absl::StrCat(server, " --admin_token=e2e-admin-token checkpoint ", backup));
  ASSERT_EQ(checkpoint.exit_code, 0) << checkpoint.output;
  EXPECT_EQ(daemon.WaitForEvent("checkpoint_created", "directory"), backup);
  EXPECT_EQ(daemon.StopWith(SIGTERM), 0);

  Daemon restored({"--listen=127.0.0.1:0", "--data_dir=" + backup}, environment);
  const std::string restored_address = restored.WaitUntilListening();
  ASSERT_FALSE(restored_address.empty()) << restored.log();
  CommandResult listing =
      Callctl(absl::StrCat("--server=", restored_address, " --token=", token, " list-calls"));
  ASSERT_EQ(listing.exit_code, 0) << listing.output;
  EXPECT_TRUE(absl::StrContains(listing.output, "+15550100")) << listing.output;
  EXPECT_EQ(restored.StopWith(SIGTERM), 0);
}

TEST(EndToEndTest, CallctlSubcommandsShareStateThroughTheToken) {
  Daemon daemon({"--listen=127.0.0.1:0"}, kEnvironment);
  const std::string address = daemon.WaitUntilListening();
  ASSERT_FALSE(address.empty());
  const std::string server = absl::StrCat("--server=", address);

  CommandResult init = Callctl(server + " init e2e");
  ASSERT_EQ(init.exit_code, 0) << init.output;
  const std::string key = "\"app_token\":\"";
  const size_t at = init.output.find(key);
  ASSERT_NE(at, std::string::npos) << init.output;
  const std::string token =
      init.output.substr(at + key.size(), init.output.find('"', at + key.size()) - at - key.size());
  const std::string app = absl::StrCat(server, " --token=", token);

  CommandResult open = Callctl(app + " line-open 0 owner");
  ASSERT_EQ(open.exit_code, 0) << open.output;
  CommandResult offer = Callctl(server + " offer 0 +15550111 +15550199");
  ASSERT_EQ(offer.exit_code, 0) << offer.output;
  CommandResult watch = Callctl(app + " --count=2 watch");
  EXPECT_EQ(watch.exit_code, 0) << watch.output;
  EXPECT_TRUE(absl::StrContains(watch.output, "CALL_PRIVILEGE_OWNER")) << watch.output;
  EXPECT_TRUE(absl::StrContains(watch.output, "CALL_STATE_OFFERING")) << watch.output;

  CommandResult usage = Callctl(app + " frobnicate");
  EXPECT_EQ(usage.exit_code, 2);
  EXPECT_EQ(daemon.StopWith(SIGINT), 0);
}

TEST(EndToEndTest, InvalidFlagsRefuseToStart) {
  Daemon daemon({"--listen=127.0.0.1:0", "--shards=48"}, kEnvironment);
  ASSERT_TRUE(daemon.started());
  EXPECT_EQ(daemon.Wait(), 1);
  EXPECT_TRUE(absl::StrContains(daemon.log(), "shards must be a power of two")) << daemon.log();
}

// The value of "key":"value" in callctl's JSON output, or "".
std::string JsonField(const std::string& json, const std::string& key) {
  const std::string prefix = absl::StrCat("\"", key, "\":\"");
  const size_t at = json.find(prefix);
  if (at == std::string::npos) return "";
  const size_t start = at + prefix.size();
  return json.substr(start, json.find('"', start) - start);
}

// A client process holding a line and a live call, kept alive by its event
// stream, is killed: once its lease runs out the server shuts it down, its
// call is dropped (a monitor sees IDLE) and its token stops working.
TEST(EndToEndTest, AKilledClientsLinesAndCallsAreReclaimedWhenItsLeaseRunsOut) {
  Daemon daemon({"--listen=127.0.0.1:0", "--app_ttl=2s"}, kEnvironment);
  ASSERT_TRUE(daemon.started());
  const std::string address = daemon.WaitUntilListening();
  ASSERT_FALSE(address.empty());
  const std::string server = absl::StrCat("--server=", address);

  const CommandResult monitor_init = Callctl(absl::StrCat(server, " init monitor"));
  ASSERT_EQ(monitor_init.exit_code, 0) << monitor_init.output;
  const std::string monitor =
      absl::StrCat(server, " --token=", JsonField(monitor_init.output, "app_token"));
  ASSERT_EQ(Callctl(absl::StrCat(monitor, " line-open 0 monitor")).exit_code, 0);
  // The monitor stays alive through its own event stream.
  const pid_t monitor_watcher = SpawnQuietly(
      {CALLCTL_PATH, server, "--token=" + JsonField(monitor_init.output, "app_token"), "watch"});
  ASSERT_GT(monitor_watcher, 0);

  const CommandResult init = Callctl(absl::StrCat(server, " init doomed"));
  ASSERT_EQ(init.exit_code, 0) << init.output;
  const std::string token = JsonField(init.output, "app_token");
  const std::string doomed = absl::StrCat(server, " --token=", token);
  const CommandResult line = Callctl(absl::StrCat(doomed, " line-open 0"));
  ASSERT_EQ(line.exit_code, 0) << line.output;
  const CommandResult call =
      Callctl(absl::StrCat(doomed, " make-call ", JsonField(line.output, "line_handle"), " 100"));
  ASSERT_EQ(call.exit_code, 0) << call.output;
  const std::string call_id = JsonField(call.output, "call_id");

  // The controlling process: an open event stream holds the lease.
  const pid_t watcher = SpawnQuietly({CALLCTL_PATH, server, "--token=" + token, "watch"});
  ASSERT_GT(watcher, 0);
  absl::SleepFor(absl::Seconds(3));
  const CommandResult held = Callctl(absl::StrCat(monitor, " list-calls"));
  EXPECT_TRUE(absl::StrContains(held.output, "CALL_STATE_DIALING")) << held.output;

  kill(watcher, SIGKILL);
  waitpid(watcher, nullptr, 0);
  // Lease 2 s, checked every 500 ms: gone within 2.5 s of the kill.
  absl::SleepFor(absl::Seconds(4));
  const CommandResult after = Callctl(absl::StrCat(monitor, " list-calls"));
  EXPECT_EQ(after.exit_code, 0) << after.output;
  EXPECT_TRUE(absl::StrContains(after.output, "CALL_STATE_IDLE")) << after.output;
  EXPECT_TRUE(absl::StrContains(after.output, absl::StrCat("\"call_id\":\"", call_id, "\"")))
      << after.output;
  const CommandResult revoked = Callctl(absl::StrCat(doomed, " keepalive"));
  EXPECT_NE(revoked.exit_code, 0);
  EXPECT_TRUE(absl::StrContains(revoked.output, "LINEERR_UNINITIALIZED")) << revoked.output;
  const CommandResult renewed = Callctl(absl::StrCat(monitor, " keepalive"));
  EXPECT_EQ(renewed.exit_code, 0) << renewed.output;
  kill(monitor_watcher, SIGKILL);
  waitpid(monitor_watcher, nullptr, 0);

  EXPECT_EQ(daemon.StopWith(SIGTERM), 0);
  EXPECT_TRUE(absl::StrContains(daemon.log(), "\"reason\":\"lease_expired\"")) << daemon.log();
}

}  // namespace
}  // namespace callsession
