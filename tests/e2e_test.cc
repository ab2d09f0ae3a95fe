// End to end: the real callsessiond binary, driven by the real callctl.
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
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

}  // namespace
}  // namespace callsession
