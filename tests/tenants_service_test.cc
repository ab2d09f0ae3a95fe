// Tenants through a real gRPC server on a loopback port: isolation of calls
// between tenants (devices, MONITOR, offers, GetNewCalls, guessed handles),
// credentials (wrong, absent, revoked keys; client certificates made by
// openssl), reloads while apps are connected, provider scoping, quotas, and
// a restart on the durable store with a tenant gone.
#include <sys/stat.h>

#include <cstdio>
#include <fstream>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "client/callsession_client.h"
#include "grpcpp/create_channel.h"
#include "grpcpp/security/credentials.h"
#include "server/core/sha256.h"
#include "server/server.h"
#include "server/storage/rocksdb/rocksdb_journal.h"
#include "tests/test_support.h"

namespace callsession {
namespace {

using ::testing::ElementsAre;
using ::testing::IsEmpty;
using ::testing::SizeIs;

constexpr char kProviderToken[] = "all-devices-provider";
constexpr uint32_t kDevices = 16;
constexpr v1::CallPrivilege kOwner = v1::CALL_PRIVILEGE_OWNER;
constexpr v1::CallPrivilege kMonitor = v1::CALL_PRIVILEGE_MONITOR;

MATCHER_P2(IsRpcError, code, name, "") {
  const absl::Status& status = StatusOf(arg);
  *result_listener << "status is " << status << ", reason \"" << TapiReason(status) << "\"";
  return status.code() == code && absl::StartsWith(status.message(), absl::StrCat(name, ": ")) &&
         TapiReason(status) == name;
}
auto BadDevice() { return IsRpcError(absl::StatusCode::kNotFound, "LINEERR_BADDEVICEID"); }
auto InvalidCallHandle() {
  return IsRpcError(absl::StatusCode::kNotFound, "LINEERR_INVALCALLHANDLE");
}
auto Uninitialized() {
  return IsRpcError(absl::StatusCode::kUnauthenticated, "LINEERR_UNINITIALIZED");
}
auto Unavailable() {
  return IsRpcError(absl::StatusCode::kPermissionDenied, "LINEERR_OPERATIONUNAVAIL");
}

// alpha: devices 0-3, every right; MONITOR on 4 too (it may watch beta's
//        device 4), and a second key.
// beta:  devices 4-7, every right; device 3 (alpha's) to place calls only.
// gamma: device 8 to monitor only; at most 1 line per app and 2 apps.
// switch: no devices; provider for devices 0-3.
std::string TenantsFile(bool with_beta = true, bool alpha_key2 = true, bool alpha_monitors_4 = true,
                        bool with_delta = false) {
  std::string text = absl::StrCat(
      R"(
tenants {
  name: "alpha"
  api_key_sha256: ")",
      Sha256Hex("alpha-key"), "\"\n",
      alpha_key2 ? absl::StrCat("  api_key_sha256: \"", Sha256Hex("alpha-key-2"), "\"\n") : "",
      R"(  devices { first: 0 last: 3 privileges: [DEVICE_PRIVILEGE_NONE, DEVICE_PRIVILEGE_OWNER, DEVICE_PRIVILEGE_MONITOR] }
)",
      alpha_monitors_4 ? "  devices { first: 4 last: 4 privileges: "
                         "DEVICE_PRIVILEGE_MONITOR }\n"
                       : "",
      "}\n");
  if (with_beta) {
    absl::StrAppend(&text, R"(
tenants {
  name: "beta"
  api_key_sha256: ")",
                    Sha256Hex("beta-key"), R"("
  devices { first: 4 last: 7 privileges: [DEVICE_PRIVILEGE_NONE, DEVICE_PRIVILEGE_OWNER, DEVICE_PRIVILEGE_MONITOR] }
  devices { first: 3 last: 3 privileges: DEVICE_PRIVILEGE_NONE }
}
)");
  }
  absl::StrAppend(&text, R"(
tenants {
  name: "gamma"
  api_key_sha256: ")",
                  Sha256Hex("gamma-key"), R"("
  devices { first: 8 last: 8 privileges: DEVICE_PRIVILEGE_MONITOR }
  quotas { max_apps: 2 max_lines_per_app: 1 }
}
tenants {
  name: "switch"
  api_key_sha256: ")",
                  Sha256Hex("switch-key"), R"("
  provider { devices { first: 0 last: 3 } }
}
)");
  if (with_delta) {
    absl::StrAppend(&text, R"(
tenants {
  name: "delta"
  api_key_sha256: ")",
                    Sha256Hex("delta-key"), R"("
  devices { first: 9 last: 9 privileges: DEVICE_PRIVILEGE_NONE }
}
)");
  }
  return text;
}

void WriteFile(const std::string& path, const std::string& text) {
  // Replaced, not rewritten in place: a reader never sees half a file.
  const std::string temporary = path + ".tmp";
  {
    std::ofstream out(temporary);
    out << text;
  }
  ASSERT_EQ(std::rename(temporary.c_str(), path.c_str()), 0);
}

class TenantsServiceTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = MakeTempDir("callsession-tenants");
    ASSERT_FALSE(dir_.empty());
    tenants_file_ = dir_ + "/tenants.textproto";
    WriteFile(tenants_file_, TenantsFile());
  }

  void StartServer(TlsFiles tls = {}) {
    ServerOptions options;
    options.listen_address = "127.0.0.1:0";
    options.core.num_devices = kDevices;
    options.core.provider_token = kProviderToken;
    options.tenants_file = tenants_file_;
    options.tenants_check_interval = absl::Hours(1);  // reloads are explicit here
    options.tls = std::move(tls);
    if (!data_dir_.empty()) {
      RocksDbJournalOptions journal;
      journal.data_dir = data_dir_;
      journal.sync = false;
      options.open_journal = [journal] { return OpenRocksDbJournal(journal); };
    }
    absl::StatusOr<std::unique_ptr<CallSessionServer>> server =
        CallSessionServer::Start(std::move(options));
    ASSERT_THAT(server, IsOk());
    server_ = *std::move(server);
    channel_ = grpc::CreateChannel(server_->address(), grpc::InsecureChannelCredentials());
  }

  std::unique_ptr<CallSessionClient> Client(const std::string& api_key) {
    ClientOptions options;
    options.api_key = api_key;
    return std::make_unique<CallSessionClient>(channel_, options);
  }

  std::unique_ptr<CallSessionClient> NewApp(const std::string& api_key,
                                            v1::InitializeResponse* init = nullptr) {
    auto app = Client(api_key);
    absl::StatusOr<v1::InitializeResponse> response = app->Initialize(api_key);
    EXPECT_THAT(response, IsOk()) << api_key;
    if (init != nullptr && response.ok()) *init = *response;
    return app;
  }

  static uint64_t Open(CallSessionClient& app, uint32_t device,
                       std::vector<v1::CallPrivilege> privileges = {}) {
    absl::StatusOr<uint64_t> line = app.LineOpen(device, privileges);
    EXPECT_THAT(line, IsOk()) << "device " << device;
    return line.value_or(0);
  }

  static std::vector<uint64_t> CallIdsOf(CallSessionClient& app) {
    absl::StatusOr<v1::ListCallsResponse> listed = app.ListAllCalls();
    EXPECT_THAT(listed, IsOk());
    std::vector<uint64_t> ids;
    if (listed.ok()) {
      for (const v1::CallHandleEntry& entry : listed->calls())
        ids.push_back(entry.info().call_id());
    }
    return ids;
  }

  // The events that arrive within `wait`.
  static std::vector<v1::Event> Drain(EventStream& stream,
                                      absl::Duration wait = absl::Milliseconds(300)) {
    std::vector<v1::Event> events;
    for (;;) {
      absl::StatusOr<v1::Event> event = stream.Next(wait);
      if (!event.ok()) return events;
      events.push_back(*std::move(event));
    }
  }

  absl::Status Reload(const std::string& text) {
    WriteFile(tenants_file_, text);
    return server_->ReloadTenants();
  }

  std::string dir_;
  std::string tenants_file_;
  std::string data_dir_;  // set: the durable store
  std::unique_ptr<CallSessionServer> server_;
  std::shared_ptr<grpc::Channel> channel_;
};

TEST_F(TenantsServiceTest, InitializeNeedsATenantKey) {
  StartServer();
  EXPECT_THAT(Client("")->Initialize("nobody"), Uninitialized());
  EXPECT_THAT(Client("alpha-key-x")->Initialize("guess"), Uninitialized());
  EXPECT_THAT(Client(Sha256Hex("alpha-key"))->Initialize("the hash is not the key"),
              Uninitialized());
  // An app token is no tenant key.
  auto alpha = NewApp("alpha-key");
  EXPECT_THAT(Client(alpha->token())->Initialize("token as key"), Uninitialized());
  // A tenant granted no device (a provider only) registers no application.
  EXPECT_THAT(Client("switch-key")->Initialize("switch"), Unavailable());
  // Both keys of alpha work.
  EXPECT_THAT(Client("alpha-key-2")->Initialize("second key"), IsOk());
  const CoreStats stats = server_->core().Stats();
  EXPECT_EQ(stats.auth_failures[static_cast<int>(AuthFailure::kMissingCredential)], 1u);
  EXPECT_EQ(stats.auth_failures[static_cast<int>(AuthFailure::kUnknownApiKey)], 3u);
}

TEST_F(TenantsServiceTest, InitializeTellsWhichDevicesAndRights) {
  StartServer();
  v1::InitializeResponse alpha;
  NewApp("alpha-key", &alpha);
  EXPECT_EQ(alpha.num_devices(), 5u);
  ASSERT_THAT(alpha.devices(), SizeIs(2));
  EXPECT_EQ(alpha.devices(0).first_device_id(), 0u);
  EXPECT_EQ(alpha.devices(0).last_device_id(), 3u);
  EXPECT_TRUE(alpha.devices(0).place_calls() && alpha.devices(0).own() &&
              alpha.devices(0).monitor());
  EXPECT_EQ(alpha.devices(1).first_device_id(), 4u);
  EXPECT_TRUE(!alpha.devices(1).place_calls() && !alpha.devices(1).own() &&
              alpha.devices(1).monitor());
  v1::InitializeResponse gamma;
  NewApp("gamma-key", &gamma);
  EXPECT_EQ(gamma.num_devices(), 9u);
  ASSERT_THAT(gamma.devices(), SizeIs(1));
  EXPECT_EQ(gamma.devices(0).first_device_id(), 8u);
}

TEST_F(TenantsServiceTest, ADeviceOutsideTheTenantIsOneThatDoesNotExist) {
  StartServer();
  auto alpha = NewApp("alpha-key");
  const absl::Status others = alpha->LineOpen(5).status();
  const absl::Status beyond = alpha->LineOpen(kDevices + 100).status();
  EXPECT_THAT(others, BadDevice());
  EXPECT_THAT(beyond, BadDevice());
  // The same words, but for the number: nothing tells them apart.
  EXPECT_EQ(absl::StrReplaceAll(others.message(), {{"5", "N"}}),
            absl::StrReplaceAll(beyond.message(), {{absl::StrCat(kDevices + 100), "N"}}));
  // Checked before the privileges: a bad privilege on another's device is
  // still no device.
  EXPECT_THAT(alpha->LineOpen(6, {static_cast<v1::CallPrivilege>(9)}), BadDevice());
  EXPECT_THAT(alpha->LineOpen(6, {kOwner}), BadDevice());
}

TEST_F(TenantsServiceTest, APrivilegeTheTenantLacksIsDenied) {
  StartServer();
  auto beta = NewApp("beta-key");
  const uint64_t dial_line = Open(*beta, 3);  // NONE on alpha's device 3
  EXPECT_THAT(beta->LineOpen(3, {kOwner}), Unavailable());
  EXPECT_THAT(beta->LineOpen(3, {kMonitor}), Unavailable());
  EXPECT_THAT(beta->LineOpen(3, {kOwner, kMonitor}), Unavailable());
  // Its line there may place calls, but not list others' calls.
  EXPECT_THAT(beta->MakeCall(dial_line, "+1555"), IsOk());
  EXPECT_THAT(beta->GetNewCalls(dial_line), Unavailable());

  auto gamma = NewApp("gamma-key");
  const uint64_t monitor_line = Open(*gamma, 8, {kMonitor});
  EXPECT_THAT(gamma->LineOpen(8), Unavailable());  // no placing calls
  EXPECT_THAT(gamma->MakeCall(monitor_line, "+1555"), Unavailable());
  EXPECT_THAT(gamma->GetNewCalls(monitor_line), IsOk());
  EXPECT_EQ(server_->core().Stats().live.calls, 1u) << "nothing changed on failure";
}

TEST_F(TenantsServiceTest, TenantsSeeNoCallsOfDevicesTheyMayNotMonitor) {
  StartServer();
  ProviderClient provider(channel_, kProviderToken);
  auto alpha = NewApp("alpha-key");
  auto beta = NewApp("beta-key");
  auto gamma = NewApp("gamma-key");
  auto alpha_events = alpha->WatchEvents();
  auto gamma_events = gamma->WatchEvents();
  // alpha monitors and owns its devices and monitors beta's device 4;
  // gamma monitors device 8.
  const uint64_t alpha_monitor0 = Open(*alpha, 0, {kOwner, kMonitor});
  Open(*alpha, 4, {kMonitor});
  const uint64_t gamma_monitor = Open(*gamma, 8, {kMonitor});
  // beta: an owner line and calls on 5 and 6 (no one else may see them),
  // and a call on 4 (alpha may).
  Open(*beta, 5, {kOwner});
  const uint64_t beta5 = Open(*beta, 5);
  const uint64_t beta4 = Open(*beta, 4);
  const v1::MakeCallResponse hidden = *beta->MakeCall(beta5, "+1-hidden");
  const uint64_t offered_hidden = *provider.OfferCall(6, "+1-caller-hidden", "+1-called");
  const uint64_t offered_on_5 = *provider.OfferCall(5, "+1-caller-5", "+1-called");
  const v1::MakeCallResponse watched = *beta->MakeCall(beta4, "+1-watched");
  const uint64_t offered_alpha = *provider.OfferCall(0, "+1-for-alpha", "+1-called");

  // alpha got exactly: a monitor handle to the call on 4, the owner handle
  // of the offer on 0 (its MONITOR on the same line adds nothing).
  std::vector<uint64_t> alpha_calls = CallIdsOf(*alpha);
  std::sort(alpha_calls.begin(), alpha_calls.end());
  std::vector<uint64_t> expected = {watched.call_id(), offered_alpha};
  std::sort(expected.begin(), expected.end());
  EXPECT_EQ(alpha_calls, expected);
  size_t new_calls = 0;
  for (const v1::Event& event : Drain(*alpha_events)) {
    if (event.has_app_new_call()) {
      ++new_calls;
      EXPECT_NE(event.app_new_call().call_id(), hidden.call_id());
      EXPECT_NE(event.app_new_call().call_id(), offered_hidden);
      EXPECT_NE(event.app_new_call().call_id(), offered_on_5);
    }
  }
  EXPECT_EQ(new_calls, 2u);
  // GetNewCalls through alpha's lines finds nothing of beta's devices 5-6.
  absl::StatusOr<std::vector<uint64_t>> more = alpha->GetNewCalls(alpha_monitor0);
  ASSERT_THAT(more, IsOk());
  EXPECT_THAT(*more, IsEmpty());
  // gamma sees nothing at all.
  EXPECT_THAT(CallIdsOf(*gamma), IsEmpty());
  EXPECT_THAT(*gamma->GetNewCalls(gamma_monitor), IsEmpty());
  EXPECT_THAT(Drain(*gamma_events), IsEmpty());
  // The offer on 5 went to beta's owner line.
  EXPECT_THAT(CallIdsOf(*beta), SizeIs(3));

  // Guessed handles: every handle beta holds is no handle to alpha or gamma.
  absl::StatusOr<v1::ListCallsResponse> beta_calls = beta->ListAllCalls();
  ASSERT_THAT(beta_calls, IsOk());
  for (const v1::CallHandleEntry& entry : beta_calls->calls()) {
    for (CallSessionClient* other : {alpha.get(), gamma.get()}) {
      EXPECT_THAT(other->GetCallInfo(entry.call_handle()), InvalidCallHandle());
      EXPECT_THAT(other->GetCallStatus(entry.call_handle()), InvalidCallHandle());
      EXPECT_THAT(other->Drop(entry.call_handle()), InvalidCallHandle());
      EXPECT_THAT(other->DeallocateCall(entry.call_handle()), InvalidCallHandle());
    }
  }
}

TEST_F(TenantsServiceTest, ProviderCredentialsAreScopedToTheirDevices) {
  StartServer();
  ProviderClient everything(channel_, kProviderToken);
  ProviderClient scoped(channel_, "switch-key");
  auto beta = NewApp("beta-key");
  auto alpha = NewApp("alpha-key");
  Open(*alpha, 1, {kOwner});
  const uint64_t beta_line = Open(*beta, 6);
  const v1::MakeCallResponse beta_call = *beta->MakeCall(beta_line, "+1555");

  absl::StatusOr<uint64_t> offered = scoped.OfferCall(1, "+1", "+2");
  ASSERT_THAT(offered, IsOk());
  EXPECT_THAT(scoped.SetCallState(*offered, v1::CALL_STATE_CONNECTED), IsOk());
  EXPECT_THAT(scoped.ForceLineClose(1), IsOk());
  // Beyond its devices: as if they did not exist, in the same words.
  const absl::Status outside = scoped.OfferCall(6, "+1", "+2").status();
  const absl::Status nowhere = scoped.OfferCall(999, "+1", "+2").status();
  EXPECT_THAT(outside, BadDevice());
  EXPECT_THAT(nowhere, BadDevice());
  EXPECT_EQ(absl::StrReplaceAll(outside.message(), {{"6", "N"}}),
            absl::StrReplaceAll(nowhere.message(), {{"999", "N"}}));
  EXPECT_THAT(scoped.SetCallState(beta_call.call_id(), v1::CALL_STATE_IDLE), InvalidCallHandle());
  EXPECT_THAT(scoped.SetCallState(987654, v1::CALL_STATE_IDLE), InvalidCallHandle());
  EXPECT_THAT(scoped.ForceLineClose(6), BadDevice());
  EXPECT_EQ(beta->GetCallStatus(beta_call.call_handle())->call_state(), v1::CALL_STATE_DIALING);
  EXPECT_THAT(beta->MakeCall(beta_line, "+1556"), IsOk()) << "the line is still open";

  // The provider token still acts for every device.
  EXPECT_THAT(everything.SetCallState(beta_call.call_id(), v1::CALL_STATE_CONNECTED), IsOk());
  EXPECT_THAT(everything.OfferCall(15, "+1", "+2"), IsOk());
  // Not providers: a tenant without provider access, an app token, nothing.
  EXPECT_THAT(ProviderClient(channel_, "alpha-key").OfferCall(1, "+1", "+2"), Uninitialized());
  EXPECT_THAT(ProviderClient(channel_, alpha->token()).OfferCall(1, "+1", "+2"), Uninitialized());
  EXPECT_THAT(ProviderClient(channel_, "").OfferCall(1, "+1", "+2"), Uninitialized());
  EXPECT_EQ(server_->core().Stats().auth_failures[static_cast<int>(AuthFailure::kNotProvider)], 2u);
}

TEST_F(TenantsServiceTest, TenantQuotasReplaceTheFlags) {
  StartServer();
  auto first = NewApp("gamma-key");
  auto second = NewApp("gamma-key");
  EXPECT_THAT(Client("gamma-key")->Initialize("third"),
              IsRpcError(absl::StatusCode::kResourceExhausted, "LINEERR_RESOURCEUNAVAIL"));
  Open(*first, 8, {kMonitor});
  EXPECT_THAT(first->LineOpen(8, {kMonitor}),
              IsRpcError(absl::StatusCode::kResourceExhausted, "LINEERR_RESOURCEUNAVAIL"));
  // Another tenant's apps are not counted against gamma's.
  NewApp("alpha-key");
  // A shut-down app frees its place.
  ASSERT_THAT(second->Shutdown(), IsOk());
  EXPECT_THAT(Client("gamma-key")->Initialize("third, now"), IsOk());
}

TEST_F(TenantsServiceTest, AReloadRevokesTenantsAndKeysAtOnce) {
  StartServer();
  ProviderClient provider(channel_, kProviderToken);
  auto alpha = NewApp("alpha-key");
  auto alpha2 = NewApp("alpha-key-2");
  auto beta = NewApp("beta-key");
  auto alpha_events = alpha->WatchEvents();
  auto beta_events = beta->WatchEvents();
  // alpha watches beta's device 4 and its own device 3, where beta places
  // calls too.
  const uint64_t alpha_watch4 = Open(*alpha, 4, {kMonitor});
  Open(*alpha, 3, {kMonitor});
  const uint64_t alpha_own = Open(*alpha, 0, {kOwner});
  const v1::MakeCallResponse beta_on4 = *beta->MakeCall(Open(*beta, 4), "+1-four");
  const v1::MakeCallResponse beta_on3 = *beta->MakeCall(Open(*beta, 3), "+1-three");
  const uint64_t offer = *provider.OfferCall(0, "+1", "+2");
  Drain(*alpha_events);
  Drain(*beta_events);
  ASSERT_THAT(CallIdsOf(*alpha), SizeIs(3));

  // beta goes, alpha's second key goes, alpha loses device 4; delta comes.
  ASSERT_THAT(Reload(TenantsFile(/*with_beta=*/false, /*alpha_key2=*/false,
                                 /*alpha_monitors_4=*/false, /*with_delta=*/true)),
              IsOk());
  // beta and the app registered with the removed key: shut down, as by
  // Shutdown (token refused, stream ended with OK).
  EXPECT_THAT(beta->KeepAlive(), Uninitialized());
  EXPECT_THAT(alpha2->KeepAlive(), Uninitialized());
  std::vector<v1::Event> ended = Drain(*beta_events, absl::Seconds(1));
  absl::StatusOr<v1::Event> after = beta_events->Next(absl::Seconds(1));
  EXPECT_EQ(after.status().code(), absl::StatusCode::kOutOfRange) << after.status();
  // New keys of the tenant that stays are refused; its other key works.
  EXPECT_THAT(Client("beta-key")->Initialize("again"), Uninitialized());
  EXPECT_THAT(Client("alpha-key-2")->Initialize("again"), Uninitialized());
  EXPECT_THAT(Client("delta-key")->Initialize("new tenant"), IsOk());
  EXPECT_THAT(alpha->KeepAlive(), IsOk());

  // alpha's line on device 4 was closed as by ForceLineClose; its handle
  // to beta's call went with it. Its other lines stay, and beta's call on
  // 3 (beta's alone) was dropped when beta went: alpha's monitor saw IDLE.
  bool line_closed = false;
  bool saw_idle = false;
  for (const v1::Event& event : Drain(*alpha_events, absl::Seconds(1))) {
    if (event.has_line_close() && event.line_close().line_handle() == alpha_watch4) {
      line_closed = true;
    }
    if (event.has_call_state() && event.call_state().call_state() == v1::CALL_STATE_IDLE) {
      saw_idle = true;
    }
  }
  EXPECT_TRUE(line_closed);
  EXPECT_TRUE(saw_idle);
  absl::StatusOr<v1::ListCallsResponse> listed = alpha->ListAllCalls();
  ASSERT_THAT(listed, IsOk());
  std::vector<uint64_t> ids;
  for (const auto& entry : listed->calls()) {
    ids.push_back(entry.info().call_id());
    if (entry.info().call_id() == beta_on3.call_id()) {
      EXPECT_EQ(entry.status().call_state(), v1::CALL_STATE_IDLE);
    }
  }
  std::sort(ids.begin(), ids.end());
  std::vector<uint64_t> expected = {beta_on3.call_id(), offer};
  std::sort(expected.begin(), expected.end());
  EXPECT_EQ(ids, expected) << "beta's call on 4 is out of alpha's sight";
  EXPECT_THAT(alpha->LineOpen(4, {kMonitor}), BadDevice());
  EXPECT_THAT(alpha->MakeCall(alpha_own, "+1"), IsOk());
  (void)beta_on4;
  (void)ended;

  const CoreStats stats = server_->core().Stats();
  EXPECT_EQ(stats.apps_revoked, 2u);
  EXPECT_EQ(stats.lines_revoked, 1u);
}

TEST_F(TenantsServiceTest, ABadReloadKeepsTheConfigurationInForce) {
  StartServer();
  auto beta = NewApp("beta-key");
  const absl::Status refused =
      Reload(absl::StrCat(TenantsFile(/*with_beta=*/false), "tenants { name: \"alpha\" }\n"));
  EXPECT_EQ(refused.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(absl::StrContains(refused.message(), "already defined")) << refused;
  EXPECT_TRUE(absl::StrContains(refused.message(), tenants_file_)) << refused;
  // Nothing of the refused file took effect.
  EXPECT_THAT(beta->KeepAlive(), IsOk());
  EXPECT_THAT(Client("beta-key")->Initialize("still"), IsOk());
  // A file that cannot be read at all: the same.
  ASSERT_EQ(std::remove(tenants_file_.c_str()), 0);
  EXPECT_EQ(server_->ReloadTenants().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(beta->KeepAlive(), IsOk());
}

TEST_F(TenantsServiceTest, TheWatcherNoticesTheFileChange) {
  // The real watcher, as a Kubernetes Secret update would drive it.
  ServerOptions options;
  options.listen_address = "127.0.0.1:0";
  options.core.num_devices = kDevices;
  options.tenants_file = tenants_file_;
  options.tenants_check_interval = absl::Milliseconds(50);
  absl::StatusOr<std::unique_ptr<CallSessionServer>> server =
      CallSessionServer::Start(std::move(options));
  ASSERT_THAT(server, IsOk());
  server_ = *std::move(server);
  channel_ = grpc::CreateChannel(server_->address(), grpc::InsecureChannelCredentials());
  auto beta = NewApp("beta-key");
  WriteFile(tenants_file_, TenantsFile(/*with_beta=*/false));
  const absl::Time deadline = absl::Now() + absl::Seconds(10);
  while (beta->KeepAlive().ok() && absl::Now() < deadline) absl::SleepFor(absl::Milliseconds(20));
  EXPECT_THAT(beta->KeepAlive(), Uninitialized());
}

TEST_F(TenantsServiceTest, ARestartWithoutTheTenantShutsItsAppsDown) {
  data_dir_ = dir_ + "/data";
  StartServer();
  auto alpha = NewApp("alpha-key");
  auto beta = NewApp("beta-key");
  Open(*alpha, 3, {kMonitor});
  const uint64_t beta_line = Open(*beta, 3);
  const v1::MakeCallResponse beta_call = *beta->MakeCall(beta_line, "+1");
  const std::string alpha_token = alpha->token();
  const std::string beta_token = beta->token();
  server_->Shutdown(absl::ZeroDuration());
  server_.reset();

  // The same file: everything is back.
  StartServer();
  CallSessionClient alpha_again(channel_);
  alpha_again.set_token(alpha_token);
  CallSessionClient beta_again(channel_);
  beta_again.set_token(beta_token);
  EXPECT_THAT(beta_again.KeepAlive(), IsOk());
  EXPECT_THAT(CallIdsOf(alpha_again), ElementsAre(beta_call.call_id()));
  server_->Shutdown(absl::ZeroDuration());
  server_.reset();

  // Without beta: its app is gone at start, its live call dropped for alpha.
  WriteFile(tenants_file_, TenantsFile(/*with_beta=*/false));
  StartServer();
  CallSessionClient alpha_third(channel_);
  alpha_third.set_token(alpha_token);
  CallSessionClient beta_third(channel_);
  beta_third.set_token(beta_token);
  EXPECT_THAT(beta_third.KeepAlive(), Uninitialized());
  EXPECT_THAT(alpha_third.KeepAlive(), IsOk());
  absl::StatusOr<v1::ListCallsResponse> listed = alpha_third.ListAllCalls();
  ASSERT_THAT(listed, IsOk());
  ASSERT_THAT(listed->calls(), SizeIs(1));
  EXPECT_EQ(listed->calls(0).status().call_state(), v1::CALL_STATE_IDLE);
  EXPECT_EQ(server_->core().Stats().live.apps, 1u);
}

// --- Client certificates ----------------------------------------------------

class TenantsTlsTest : public TenantsServiceTest {
 protected:
  static void SetUpTestSuite() {
    certs_ = new std::string(MakeTempDir("callsession-tenants-tls"));
    // One CA; a server certificate; clients identified by a URI SAN (a
    // SPIFFE ID), by subject, by a DNS SAN, and one no tenant knows.
    const std::string script = absl::StrCat(
        "set -e; cd ", *certs_, "; ",
        "key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out $1; }; ",
        "key ca.key; openssl req -x509 -new -key ca.key -subj /CN=test-ca -days 1 -out ca.pem; ",
        "cert() { key $1.key; openssl req -new -key $1.key -subj \"$2\" -out $1.csr; ",
        "  if [ -n \"$3\" ]; then printf 'subjectAltName=%s' \"$3\" > $1.ext; ",
        "  else : > $1.ext; fi; ",
        "  openssl x509 -req -in $1.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 1 ",
        "    -extfile $1.ext -out $1.pem 2>/dev/null; }; ",
        "cert server /CN=localhost DNS:localhost,IP:127.0.0.1; ",
        "cert spiffe /CN=anything URI:spiffe://test.example/alpha; ",
        "cert subject '/O=Example Corp/CN=beta-dialer' ''; ", "cert dns /CN=x DNS:gamma.internal; ",
        "cert stranger /CN=stranger URI:spiffe://test.example/nobody");
    const std::string command =
        absl::StrCat("bash -c '", absl::StrReplaceAll(script, {{"'", "'\\''"}}), "' 2>&1");
    FILE* pipe = popen(command.c_str(), "r");
    ASSERT_NE(pipe, nullptr);
    char buffer[4096];
    std::string output;
    while (fgets(buffer, sizeof(buffer), pipe) != nullptr) output += buffer;
    ASSERT_EQ(pclose(pipe), 0) << output;
  }

  static std::string Read(const std::string& name) {
    std::ifstream in(absl::StrCat(*certs_, "/", name));
    std::stringstream contents;
    contents << in.rdbuf();
    return contents.str();
  }

  void SetUp() override {
    TenantsServiceTest::SetUp();
    // The identities of alpha, beta and gamma by certificate.
    std::string text = TenantsFile();
    absl::StrReplaceAll({{"  name: \"alpha\"\n",
                          "  name: \"alpha\"\n  client_identities { uri: "
                          "\"spiffe://test.example/alpha\" }\n"},
                         {"  name: \"beta\"\n",
                          "  name: \"beta\"\n  client_identities { subject: "
                          "\"CN=beta-dialer,O=Example Corp\" }\n"},
                         {"  name: \"gamma\"\n",
                          "  name: \"gamma\"\n  client_identities { dns: \"gamma.internal\" }\n"}},
                        &text);
    WriteFile(tenants_file_, text);
    StartServer({*certs_ + "/server.pem", *certs_ + "/server.key", *certs_ + "/ca.pem"});
  }

  std::unique_ptr<CallSessionClient> WithCertificate(const std::string& name,
                                                     const std::string& api_key = "") {
    grpc::SslCredentialsOptions ssl;
    ssl.pem_root_certs = Read("ca.pem");
    ssl.pem_cert_chain = Read(name + ".pem");
    ssl.pem_private_key = Read(name + ".key");
    grpc::ChannelArguments args;
    args.SetSslTargetNameOverride("localhost");
    // A connection per client: each presents its own certificate.
    args.SetInt("grpc.use_local_subchannel_pool", 1);
    ClientOptions options;
    options.api_key = api_key;
    return std::make_unique<CallSessionClient>(
        grpc::CreateCustomChannel(server_->address(), grpc::SslCredentials(ssl), args), options);
  }

  static std::string* certs_;
};
std::string* TenantsTlsTest::certs_ = nullptr;

TEST_F(TenantsTlsTest, ClientCertificatesMapToTheirTenants) {
  struct Case {
    const char* certificate;
    uint32_t device;  // one of its tenant's
    uint32_t other;   // another tenant's
  };
  for (const Case& c : {Case{"spiffe", 0, 5}, Case{"subject", 5, 0}, Case{"dns", 8, 0}}) {
    auto app = WithCertificate(c.certificate);
    ASSERT_THAT(app->Initialize(c.certificate), IsOk()) << c.certificate;
    EXPECT_THAT(app->LineOpen(c.device, c.device == 8 ? std::vector{kMonitor}
                                                      : std::vector<v1::CallPrivilege>{}),
                IsOk())
        << c.certificate;
    EXPECT_THAT(app->LineOpen(c.other), BadDevice()) << c.certificate;
  }
  EXPECT_THAT(WithCertificate("stranger")->Initialize("stranger"), Uninitialized());
  // A key of one tenant with the certificate of another: refused.
  EXPECT_THAT(WithCertificate("spiffe", "beta-key")->Initialize("mixed"), Uninitialized());
  // A key with no certificate identity known: the key decides.
  auto keyed = WithCertificate("stranger", "gamma-key");
  ASSERT_THAT(keyed->Initialize("keyed"), IsOk());
  EXPECT_THAT(keyed->LineOpen(8, {kMonitor}), IsOk());
  const CoreStats stats = server_->core().Stats();
  EXPECT_EQ(stats.auth_failures[static_cast<int>(AuthFailure::kUnknownClientIdentity)], 1u);
  EXPECT_EQ(stats.auth_failures[static_cast<int>(AuthFailure::kConflictingCredentials)], 1u);
}

TEST_F(TenantsTlsTest, ACertificateIsAProviderCredentialToo) {
  // alpha is no provider: its certificate is refused by the provider service.
  grpc::SslCredentialsOptions ssl;
  ssl.pem_root_certs = Read("ca.pem");
  ssl.pem_cert_chain = Read("spiffe.pem");
  ssl.pem_private_key = Read("spiffe.key");
  grpc::ChannelArguments args;
  args.SetSslTargetNameOverride("localhost");
  auto channel = grpc::CreateCustomChannel(server_->address(), grpc::SslCredentials(ssl), args);
  EXPECT_THAT(ProviderClient(channel, "").OfferCall(0, "+1", "+2"), Uninitialized());
  // Given provider access for devices 0-3, the same certificate acts there.
  std::string text = TenantsFile();
  absl::StrReplaceAll({{"  name: \"alpha\"\n",
                        "  name: \"alpha\"\n  client_identities { uri: "
                        "\"spiffe://test.example/alpha\" }\n  provider { devices { first: 0 "
                        "last: 3 } }\n"}},
                      &text);
  ASSERT_THAT(Reload(text), IsOk());
  EXPECT_THAT(ProviderClient(channel, "").OfferCall(0, "+1", "+2"), IsOk());
  EXPECT_THAT(ProviderClient(channel, "").OfferCall(4, "+1", "+2"), BadDevice());
}

}  // namespace
}  // namespace callsession
