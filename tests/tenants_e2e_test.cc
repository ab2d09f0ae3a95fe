// Tenants through the real callsessiond binary: a bad file refuses to start
// naming its line, open mode warns, the file is re-read on change and on
// SIGHUP (a bad version is logged, counted and ignored), audit lines carry
// the tenant and app, failed authentications are logged with the peer and
// rate-limited, and the per-tenant metrics follow.
#include <signal.h>

#include <cstdio>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "client/callsession_client.h"
#include "grpcpp/create_channel.h"
#include "server/core/sha256.h"
#include "tests/daemon.h"
#include "tests/test_support.h"

namespace callsession {
namespace {

constexpr char kProviderToken[] = "e2e-provider-token";

std::string Tenant(const std::string& name, const std::string& key, int first, int last) {
  return absl::StrCat("tenants {\n  name: \"", name, "\"\n  api_key_sha256: \"", Sha256Hex(key),
                      "\"\n  devices { first: ", first, " last: ", last,
                      " privileges: [DEVICE_PRIVILEGE_NONE, DEVICE_PRIVILEGE_OWNER, "
                      "DEVICE_PRIVILEGE_MONITOR] }\n}\n");
}

void WriteFile(const std::string& path, const std::string& text) {
  const std::string temporary = path + ".tmp";
  {
    std::ofstream out(temporary);
    out << text;
  }
  ASSERT_EQ(std::rename(temporary.c_str(), path.c_str()), 0);
}

std::vector<std::string> Environment() {
  return {absl::StrCat("CALLSESSION_PROVIDER_TOKEN=", kProviderToken)};
}

std::unique_ptr<CallSessionClient> Client(const std::string& address, const std::string& key) {
  ClientOptions options;
  options.api_key = key;
  return std::make_unique<CallSessionClient>(
      grpc::CreateChannel(address, grpc::InsecureChannelCredentials()), options);
}

// The log lines of `event`.
std::vector<std::string> LinesOf(const std::string& log, const std::string& event) {
  std::vector<std::string> lines;
  for (absl::string_view line : absl::StrSplit(log, '\n')) {
    if (absl::StrContains(line, absl::StrCat("\"event\":\"", event, "\""))) {
      lines.emplace_back(line);
    }
  }
  return lines;
}

class TenantsE2eTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = MakeTempDir("callsession-tenants-e2e");
    path_ = dir_ + "/tenants.textproto";
  }
  std::string dir_;
  std::string path_;
};

TEST_F(TenantsE2eTest, ABadFileRefusesToStartNamingTheLine) {
  WriteFile(path_, absl::StrCat(Tenant("alpha", "k1", 0, 3), "tenants {\n  name: \"alpha\"\n}\n"));
  Daemon daemon({"--listen=127.0.0.1:0", "--store=memory", "--tenants_file=" + path_},
                Environment());
  EXPECT_EQ(daemon.Wait(), 1);
  const std::vector<std::string> failed = LinesOf(daemon.log(), "start_failed");
  ASSERT_EQ(failed.size(), 1u) << daemon.log();
  EXPECT_TRUE(absl::StrContains(failed[0], absl::StrCat("tenants file ", path_, ": line 7: ")))
      << failed[0];
  EXPECT_TRUE(absl::StrContains(failed[0], "already defined")) << failed[0];

  Daemon missing({"--listen=127.0.0.1:0", "--store=memory", "--tenants_file=" + dir_ + "/nope"},
                 Environment());
  EXPECT_EQ(missing.Wait(), 1);
  EXPECT_TRUE(absl::StrContains(missing.log(), "cannot read the tenants file")) << missing.log();
}

TEST_F(TenantsE2eTest, OpenModeWarnsAtStart) {
  Daemon daemon({"--listen=127.0.0.1:0", "--store=memory"}, Environment());
  ASSERT_FALSE(daemon.WaitUntilListening().empty()) << daemon.log();
  EXPECT_EQ(daemon.StopWith(SIGTERM), 0);
  const std::vector<std::string> warned = LinesOf(daemon.log(), "open_mode");
  ASSERT_EQ(warned.size(), 1u) << daemon.log();
  EXPECT_TRUE(absl::StrContains(warned[0], "\"level\":\"warning\"")) << warned[0];
}

TEST_F(TenantsE2eTest, ReloadsAuditLinesAuthFailuresAndMetrics) {
  WriteFile(path_,
            absl::StrCat(Tenant("alpha", "alpha-key", 0, 3), Tenant("beta", "beta-key", 4, 7)));
  Daemon daemon({"--listen=127.0.0.1:0", "--store=memory", "--metrics_listen=127.0.0.1:0",
                 "--tenants_file=" + path_, "--tenants_check_interval=100ms", "--app_ttl=2s"},
                Environment());
  const std::string address = daemon.WaitUntilListening();
  ASSERT_FALSE(address.empty()) << daemon.log();
  const int metrics_port = std::stoi(daemon.Field("metrics_port"));

  auto alpha = Client(address, "alpha-key");
  ASSERT_THAT(alpha->Initialize("dialer"), IsOk());
  auto alpha_events = alpha->WatchEvents();  // keeps its lease
  auto beta = Client(address, "beta-key");
  ASSERT_THAT(beta->Initialize("agent"), IsOk());
  auto beta_events = beta->WatchEvents();
  const uint64_t alpha_line = *alpha->LineOpen(1, {v1::CALL_PRIVILEGE_OWNER});
  ASSERT_THAT(alpha->MakeCall(alpha_line, "+15550100"), IsOk());
  const uint64_t beta_line = *beta->LineOpen(5);
  ASSERT_THAT(beta->LineClose(beta_line), IsOk());
  ASSERT_THAT(beta->LineOpen(6), IsOk());
  ASSERT_THAT(ProviderClient(grpc::CreateChannel(address, grpc::InsecureChannelCredentials()),
                             kProviderToken)
                  .ForceLineClose(1),
              IsOk());

  // A flood of bad keys: every one counted, the log rate-limited.
  constexpr int kFailures = 60;
  for (int i = 0; i < kFailures; ++i) {
    EXPECT_THAT(Client(address, absl::StrCat("guess-", i))->Initialize("x"),
                IsTapiError(absl::StatusCode::kUnauthenticated, "LINEERR_UNINITIALIZED"));
  }
  absl::SleepFor(absl::Milliseconds(300));  // the bucket refills
  EXPECT_FALSE(Client(address, "")->Initialize("no key").ok());

  std::string metrics = HttpGet(metrics_port, "/metrics");
  EXPECT_EQ(
      MetricValue(metrics, "callsession_auth_failures_total", {{"reason", "unknown_api_key"}}),
      kFailures);
  EXPECT_EQ(
      MetricValue(metrics, "callsession_auth_failures_total", {{"reason", "missing_credential"}}),
      1);
  EXPECT_EQ(MetricValue(metrics, "callsession_tenants_configured"), 2);
  EXPECT_EQ(MetricValue(metrics, "callsession_tenant_apps", {{"tenant", "alpha"}}), 1);
  EXPECT_EQ(MetricValue(metrics, "callsession_tenant_apps", {{"tenant", "beta"}}), 1);
  EXPECT_EQ(MetricValue(metrics, "callsession_tenant_lines", {{"tenant", "alpha"}}), 0)
      << "closed by ForceLineClose";
  EXPECT_EQ(MetricValue(metrics, "callsession_tenant_lines", {{"tenant", "beta"}}), 1);
  EXPECT_EQ(MetricValue(metrics, "callsession_tenant_call_handles", {{"tenant", "alpha"}}), 0);

  // A broken file, by SIGHUP: refused, logged with its line, counted.
  WriteFile(path_, absl::StrCat(Tenant("alpha", "alpha-key", 0, 3), "tenants { nam: \"x\" }\n"));
  kill(daemon.pid(), SIGHUP);
  ASSERT_FALSE(daemon.WaitForEvent("tenants_reload_failed", "error").empty()) << daemon.log();
  EXPECT_TRUE(absl::StrContains(daemon.Field("error"), "line 6")) << daemon.Field("error");
  EXPECT_THAT(beta->KeepAlive(), IsOk()) << "the configuration in force stays";
  metrics = HttpGet(metrics_port, "/metrics");
  EXPECT_EQ(MetricValue(metrics, "callsession_tenants_reloads_total", {{"result", "error"}}), 1);

  // Without beta, noticed by the watcher: beta's apps are shut down.
  WriteFile(path_, Tenant("alpha", "alpha-key", 0, 3));
  ASSERT_FALSE(daemon.WaitForEvent("tenants_reloaded", "apps_revoked").empty()) << daemon.log();
  EXPECT_EQ(daemon.Field("apps_revoked"), "1");
  EXPECT_EQ(daemon.Field("lines_revoked"), "0");
  EXPECT_THAT(beta->KeepAlive(),
              IsTapiError(absl::StatusCode::kUnauthenticated, "LINEERR_UNINITIALIZED"));
  metrics = HttpGet(metrics_port, "/metrics");
  EXPECT_EQ(MetricValue(metrics, "callsession_tenants_reloads_total", {{"result", "ok"}}), 1);
  EXPECT_EQ(MetricValue(metrics, "callsession_apps_revoked_total"), 1);
  EXPECT_EQ(MetricValue(metrics, "callsession_tenants_configured"), 1);
  EXPECT_EQ(MetricValue(metrics, "callsession_tenant_apps", {{"tenant", "beta"}}), -1)
      << "a tenant gone from the file has no series";

  // beta again, and one of its apps lets its lease run out.
  WriteFile(path_,
            absl::StrCat(Tenant("alpha", "alpha-key", 0, 3), Tenant("beta", "beta-key", 4, 7)));
  kill(daemon.pid(), SIGHUP);
  ASSERT_FALSE(daemon.WaitForEvent("tenants_reloaded", "tenants").empty()) << daemon.log();
  auto idle = Client(address, "beta-key");
  ASSERT_THAT(idle->Initialize("idle"), IsOk());
  ASSERT_FALSE(daemon.WaitForEvent("app_shut_down", "reason").empty());
  while (daemon.Field("reason") != "lease_expired") {
    ASSERT_FALSE(daemon.WaitForEvent("app_shut_down", "reason").empty()) << daemon.log();
  }
  EXPECT_EQ(daemon.Field("tenant"), "beta");
  EXPECT_EQ(daemon.Field("app_name"), "idle");

  EXPECT_EQ(daemon.StopWith(SIGTERM), 0);
  const std::string& log = daemon.log();

  // Audit lines, each with its tenant and app.
  auto audited = [&](const std::string& event, const std::vector<std::string>& must) {
    for (const std::string& line : LinesOf(log, event)) {
      if (!absl::StrContains(line, "\"audit\":true")) continue;
      bool all = true;
      for (const std::string& part : must) all = all && absl::StrContains(line, part);
      if (all) return true;
    }
    return false;
  };
  EXPECT_TRUE(audited("app_initialized", {"\"tenant\":\"alpha\"", "\"app_name\":\"dialer\""}));
  EXPECT_TRUE(
      audited("line_opened", {"\"tenant\":\"alpha\"", "\"device_id\":1", "\"owner\":true"}));
  EXPECT_TRUE(audited("line_closed",
                      {"\"tenant\":\"beta\"", "\"device_id\":5", "\"reason\":\"line_close\""}));
  EXPECT_TRUE(
      audited("line_closed", {"\"tenant\":\"alpha\"", "\"device_id\":1", "\"reason\":\"forced\""}));
  EXPECT_TRUE(audited("forced_line_close", {"\"provider\":\"provider_token\"", "\"device_id\":1"}));
  EXPECT_TRUE(audited("app_shut_down", {"\"tenant\":\"beta\"", "\"app_name\":\"agent\"",
                                        "\"reason\":\"tenant_revoked\""}));
  EXPECT_TRUE(audited("line_closed",
                      {"\"tenant\":\"beta\"", "\"device_id\":6", "\"reason\":\"tenant_revoked\""}));
  EXPECT_TRUE(audited("app_shut_down", {"\"tenant\":\"beta\"", "\"reason\":\"lease_expired\""}));

  // Failed authentications: logged with the peer and why, at most a burst
  // of 20 and then 10 a second; the rest counted in the next line.
  const std::vector<std::string> failures = LinesOf(log, "authentication_failed");
  ASSERT_FALSE(failures.empty());
  EXPECT_LE(failures.size(), 25u);
  uint64_t logged_or_suppressed = failures.size();
  for (const std::string& line : failures) {
    EXPECT_TRUE(absl::StrContains(line, "\"peer\":\"ipv4:127.0.0.1:")) << line;
    uint64_t suppressed = 0;
    ASSERT_TRUE(absl::SimpleAtoi(Daemon::LogField(line, "suppressed"), &suppressed)) << line;
    logged_or_suppressed += suppressed;
  }
  EXPECT_TRUE(absl::StrContains(failures.front(), "unknown API key")) << failures.front();
  EXPECT_TRUE(absl::StrContains(failures[failures.size() - 2], "a tenant credential is required"))
      << failures[failures.size() - 2];
  EXPECT_TRUE(absl::StrContains(failures.back(), "unknown app token")) << failures.back();
  // The guesses, the missing key, and beta's token after its revocation.
  EXPECT_EQ(logged_or_suppressed, kFailures + 2u);
  // No key, nor its hash, is ever logged.
  for (const std::string& secret :
       {std::string("alpha-key"), std::string("guess-1"), Sha256Hex("alpha-key"), alpha->token()}) {
    EXPECT_FALSE(absl::StrContains(log, secret)) << secret;
  }
}

}  // namespace
}  // namespace callsession
