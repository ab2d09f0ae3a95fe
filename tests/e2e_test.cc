// End to end: the real callsessiond binary, driven by the real callctl.
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "tests/test_support.h"

extern char** environ;

namespace callsession {
namespace {

constexpr char kProviderToken[] = "e2e-provider-token";

// callsessiond started on a free loopback port; SIGTERM on Stop().
class Daemon {
 public:
  explicit Daemon(std::vector<std::string> flags) {
    int err_pipe[2];
    if (pipe(err_pipe) != 0) return;
    posix_spawn_file_actions_t actions;
    posix_spawn_file_actions_init(&actions);
    posix_spawn_file_actions_adddup2(&actions, err_pipe[1], STDERR_FILENO);
    posix_spawn_file_actions_addclose(&actions, err_pipe[0]);
    std::vector<std::string> args = {CALLSESSIOND_PATH};
    args.insert(args.end(), flags.begin(), flags.end());
    std::vector<char*> argv;
    for (std::string& arg : args) argv.push_back(arg.data());
    argv.push_back(nullptr);
    std::string token_env = absl::StrCat("CALLSESSION_PROVIDER_TOKEN=", kProviderToken);
    std::vector<char*> envp = {token_env.data(), nullptr};
    if (posix_spawn(&pid_, CALLSESSIOND_PATH, &actions, nullptr, argv.data(), envp.data()) != 0) {
      pid_ = -1;
    }
    posix_spawn_file_actions_destroy(&actions);
    close(err_pipe[1]);
    stderr_ = fdopen(err_pipe[0], "r");
  }

  ~Daemon() {
    if (pid_ > 0) {
      kill(pid_, SIGKILL);
      waitpid(pid_, nullptr, 0);
    }
    if (stderr_ != nullptr) fclose(stderr_);
  }

  // The next line the daemon writes to stderr, or "" at end of file.
  std::string ReadLine() {
    char buffer[4096];
    if (stderr_ == nullptr || fgets(buffer, sizeof(buffer), stderr_) == nullptr) return "";
    return buffer;
  }

  // Reads stderr until the "listening" log line; returns its address.
  std::string WaitUntilListening() {
    for (std::string line = ReadLine(); !line.empty(); line = ReadLine()) {
      const std::string key = "\"address\":\"";
      const size_t at = line.find(key);
      if (absl::StrContains(line, "\"listening\"") && at != std::string::npos) {
        const size_t start = at + key.size();
        return line.substr(start, line.find('"', start) - start);
      }
    }
    return "";
  }

  // Sends `signal` and returns the exit status (-1 if it did not exit).
  int StopWith(int signal) {
    kill(pid_, signal);
    int status = 0;
    waitpid(pid_, &status, 0);
    pid_ = -1;
    return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  }

  // Waits for exit without signalling.
  int Wait() {
    int status = 0;
    waitpid(pid_, &status, 0);
    pid_ = -1;
    return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  }

  bool started() const { return pid_ > 0; }

 private:
  pid_t pid_ = -1;
  FILE* stderr_ = nullptr;
};

struct CommandResult {
  int exit_code = -1;
  std::string output;
};

// Runs callctl with `args` (shell words) and the provider token in its
// environment; captures stdout and stderr together.
CommandResult Callctl(const std::string& args) {
  const std::string command = absl::StrCat("CALLSESSION_PROVIDER_TOKEN=", kProviderToken, " ",
                                           CALLCTL_PATH, " ", args, " 2>&1");
  CommandResult result;
  FILE* pipe = popen(command.c_str(), "r");
  if (pipe == nullptr) return result;
  char buffer[4096];
  size_t n;
  while ((n = fread(buffer, 1, sizeof(buffer), pipe)) > 0) result.output.append(buffer, n);
  const int status = pclose(pipe);
  result.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return result;
}

TEST(EndToEndTest, CallctlDemoRunsAWholeLifecycleAgainstCallsessiond) {
  Daemon daemon({"--listen=127.0.0.1:0", "--devices=4", "--shards=16"});
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
  Daemon daemon({"--listen=127.0.0.1:0"});
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
  Daemon daemon({"--listen=127.0.0.1:0", "--shards=48"});
  ASSERT_TRUE(daemon.started());
  std::string log;
  for (std::string line = daemon.ReadLine(); !line.empty(); line = daemon.ReadLine()) log += line;
  EXPECT_TRUE(absl::StrContains(log, "shards must be a power of two")) << log;
  EXPECT_EQ(daemon.Wait(), 1);
}

}  // namespace
}  // namespace callsession
