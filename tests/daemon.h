// Runs the real callsessiond (and callctl) for end-to-end tests.
#ifndef CALLSESSION_TESTS_DAEMON_H_
#define CALLSESSION_TESTS_DAEMON_H_

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <spawn.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <map>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "tests/test_support.h"

namespace callsession {

// callsessiond as a child process with its stderr (the JSON log) piped to
// the test. Killed on destruction if still running.
//
// It runs in `working_dir`, so its default store (callsession-data/) lands
// there; with none given, in a new temporary directory of its own that is
// removed afterwards.
class Daemon {
 public:
  // `environment` holds "NAME=value" entries: the child's whole environment.
  Daemon(const std::vector<std::string>& flags, const std::vector<std::string>& environment,
         std::string working_dir = "")
      : working_dir_(std::move(working_dir)) {
    if (working_dir_.empty()) {
      working_dir_ = MakeTempDir();
      owns_working_dir_ = true;
    }
    int err_pipe[2];
    if (pipe(err_pipe) != 0) return;
    posix_spawn_file_actions_t actions;
    posix_spawn_file_actions_init(&actions);
    posix_spawn_file_actions_addchdir_np(&actions, working_dir_.c_str());
    posix_spawn_file_actions_adddup2(&actions, err_pipe[1], STDERR_FILENO);
    posix_spawn_file_actions_addclose(&actions, err_pipe[0]);
    std::vector<std::string> args = {CALLSESSIOND_PATH};
    args.insert(args.end(), flags.begin(), flags.end());
    std::vector<char*> argv;
    for (std::string& arg : args) argv.push_back(arg.data());
    argv.push_back(nullptr);
    std::vector<std::string> env = environment;
    std::vector<char*> envp;
    for (std::string& entry : env) envp.push_back(entry.data());
    envp.push_back(nullptr);
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
    if (owns_working_dir_) {
      std::error_code ignored;
      std::filesystem::remove_all(working_dir_, ignored);
    }
  }

  const std::string& working_dir() const { return working_dir_; }

  Daemon(const Daemon&) = delete;
  Daemon& operator=(const Daemon&) = delete;

  bool started() const { return pid_ > 0; }
  pid_t pid() const { return pid_; }

  // The next line of the log, or "" at its end. Every line read is also kept
  // in log().
  std::string ReadLine() {
    char buffer[8192];
    if (stderr_ == nullptr || fgets(buffer, sizeof(buffer), stderr_) == nullptr) return "";
    log_ += buffer;
    return buffer;
  }

  // Reads the log up to the "listening" line and returns the value of
  // `field` in it (e.g. "address", "metrics_port"); "" if it never came.
  std::string WaitUntilListening(const std::string& field = "address") {
    return WaitForEvent("listening", field);
  }

  // Reads the log up to the first line of `event` and returns the value of
  // `field` in it; "" if it never came. Later Field() calls read that line.
  std::string WaitForEvent(const std::string& event, const std::string& field) {
    const std::string marker = absl::StrCat("\"event\":\"", event, "\"");
    for (std::string line = ReadLine(); !line.empty(); line = ReadLine()) {
      if (absl::StrContains(line, marker)) {
        listening_line_ = line;
        return Field(field);
      }
    }
    return "";
  }

  // A field of the line WaitForEvent found, as text (quotes stripped).
  std::string Field(const std::string& field) const { return LogField(listening_line_, field); }

  // A field of a JSON log line, as text (quotes stripped); "" if absent.
  static std::string LogField(const std::string& line, const std::string& field) {
    const std::string key = absl::StrCat("\"", field, "\":");
    const size_t at = line.find(key);
    if (at == std::string::npos) return "";
    size_t start = at + key.size();
    if (line[start] == '"') ++start;
    size_t end = line.find_first_of("\",}", start);
    return line.substr(start, end - start);
  }

  // Sends `signal`, waits, reads the rest of the log; returns the exit
  // code (-1 if killed by a signal).
  int StopWith(int signal) {
    kill(pid_, signal);
    return Wait();
  }

  int Wait() {
    int status = 0;
    waitpid(pid_, &status, 0);
    pid_ = -1;
    while (!ReadLine().empty()) {
    }
    return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  }

  const std::string& log() const { return log_; }

 private:
  std::string working_dir_;
  bool owns_working_dir_ = false;
  pid_t pid_ = -1;
  FILE* stderr_ = nullptr;
  std::string log_;
  std::string listening_line_;
};

struct CommandResult {
  int exit_code = -1;
  std::string output;
};

// Runs a shell command; captures stdout and stderr together.
inline CommandResult RunCommand(const std::string& command) {
  CommandResult result;
  FILE* pipe = popen((command + " 2>&1").c_str(), "r");
  if (pipe == nullptr) return result;
  char buffer[4096];
  size_t n;
  while ((n = fread(buffer, 1, sizeof(buffer), pipe)) > 0) result.output.append(buffer, n);
  const int status = pclose(pipe);
  result.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return result;
}

// Starts argv[0] (a path) with `argv`, the test's environment and output
// discarded; returns its pid, or -1. The caller kills and reaps it.
inline pid_t SpawnQuietly(std::vector<std::string> argv) {
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_addopen(&actions, STDOUT_FILENO, "/dev/null", O_WRONLY, 0);
  posix_spawn_file_actions_addopen(&actions, STDERR_FILENO, "/dev/null", O_WRONLY, 0);
  std::vector<char*> args;
  for (std::string& arg : argv) args.push_back(arg.data());
  args.push_back(nullptr);
  pid_t pid = -1;
  if (posix_spawn(&pid, args[0], &actions, nullptr, args.data(), environ) != 0) pid = -1;
  posix_spawn_file_actions_destroy(&actions);
  return pid;
}

// GET http://127.0.0.1:port/path; returns the body ("" on failure).
inline std::string HttpGet(int port, const std::string& path) {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(port));
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
    close(fd);
    return "";
  }
  const std::string request = absl::StrCat("GET ", path, " HTTP/1.0\r\nHost: localhost\r\n\r\n");
  if (write(fd, request.data(), request.size()) != static_cast<ssize_t>(request.size())) {
    close(fd);
    return "";
  }
  std::string response;
  char buffer[8192];
  ssize_t n;
  while ((n = read(fd, buffer, sizeof(buffer))) > 0) response.append(buffer, n);
  close(fd);
  const size_t body = response.find("\r\n\r\n");
  return body == std::string::npos ? "" : response.substr(body + 4);
}

// The value of the series `name` whose labels include every `labels` pair;
// -1 if there is none.
inline double MetricValue(const std::string& text, const std::string& name,
                          const std::map<std::string, std::string>& labels = {}) {
  for (absl::string_view line : absl::StrSplit(text, '\n')) {
    if (!absl::StartsWith(line, name)) continue;
    const char after = line.size() > name.size() ? line[name.size()] : '\0';
    if (after != '{' && after != ' ') continue;
    bool match = true;
    for (const auto& [key, value] : labels) {
      match = match && absl::StrContains(line, absl::StrCat(key, "=\"", value, "\""));
    }
    if (!match) continue;
    double parsed = 0;
    if (absl::SimpleAtod(line.substr(line.rfind(' ') + 1), &parsed)) return parsed;
  }
  return -1;
}

}  // namespace callsession

#endif  // CALLSESSION_TESTS_DAEMON_H_
