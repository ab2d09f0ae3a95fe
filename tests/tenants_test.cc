// The tenants file: what a good one means, and that each kind of mistake is
// refused with the line it is on (TenantDirectory; no server).
#include "server/core/tenants.h"

#include <fstream>
#include <string>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "server/core/sha256.h"
#include "tests/test_support.h"

namespace callsession {
namespace {

using ::testing::HasSubstr;
using ::testing::StartsWith;

constexpr uint32_t kDevices = 300;

// The error message of parsing `text`, or "" if it parsed.
std::string ErrorOf(const std::string& text) {
  absl::StatusOr<std::shared_ptr<const TenantDirectory>> parsed =
      TenantDirectory::Parse(text, kDevices);
  if (parsed.ok()) return "";
  EXPECT_EQ(parsed.status().code(), absl::StatusCode::kInvalidArgument);
  return std::string(parsed.status().message());
}

const std::string kGoodFile = absl::StrCat(R"(# callsession.config.v1.TenantsFile
tenants {
  name: "billing"
  api_key_sha256: ")",
                                           Sha256Hex("billing-key"), R"("
  api_key_sha256: ")",
                                           Sha256Hex("billing-key-2"), R"("
  client_identities { uri: "spiffe://example.org/billing" }
  client_identities { subject: "CN=billing,O=Example" }
  devices { first: 0 last: 99 privileges: [DEVICE_PRIVILEGE_NONE, DEVICE_PRIVILEGE_OWNER] }
  devices { first: 50 last: 120 privileges: [DEVICE_PRIVILEGE_OWNER, DEVICE_PRIVILEGE_NONE] }
  devices { first: 200 last: 209 privileges: DEVICE_PRIVILEGE_MONITOR }
  provider { devices { first: 0 last: 9 } devices { first: 5 last: 19 } }
  quotas { max_apps: 3 max_call_handles_per_app: 0 }
}
tenants {
  name: "support.team-2"
  client_identities { dns: "support.internal" }
  devices { first: 100 last: 100 privileges: DEVICE_PRIVILEGE_MONITOR }
}
)");

TEST(TenantsTest, AGoodFileMeansWhatItSays) {
  absl::StatusOr<std::shared_ptr<const TenantDirectory>> parsed =
      TenantDirectory::Parse(kGoodFile, kDevices);
  ASSERT_THAT(parsed, IsOk());
  const TenantDirectory& directory = **parsed;
  ASSERT_EQ(directory.tenants().size(), 2u);
  EXPECT_EQ(directory.sha256(), Sha256Hex(kGoodFile));

  const Tenant* billing = directory.Find("billing");
  ASSERT_NE(billing, nullptr);
  // 0..99 and 50..120 grant the same: merged into one range.
  ASSERT_EQ(billing->grants().size(), 2u);
  EXPECT_EQ(billing->grants()[0].first, 0u);
  EXPECT_EQ(billing->grants()[0].last, 120u);
  EXPECT_EQ(billing->RightsOn(0), kRightDial | kRightOwn);
  EXPECT_EQ(billing->RightsOn(120), kRightDial | kRightOwn);
  EXPECT_EQ(billing->RightsOn(121), 0);
  EXPECT_EQ(billing->RightsOn(199), 0);
  EXPECT_EQ(billing->RightsOn(200), kRightMonitor);
  EXPECT_EQ(billing->RightsOn(209), kRightMonitor);
  EXPECT_EQ(billing->RightsOn(210), 0);
  EXPECT_EQ(billing->device_limit(), 210u);
  EXPECT_TRUE(billing->is_provider());
  EXPECT_TRUE(billing->ProvidesFor(0));
  EXPECT_TRUE(billing->ProvidesFor(19));
  EXPECT_FALSE(billing->ProvidesFor(20));
  EXPECT_EQ(billing->quotas().max_apps, 3u);
  EXPECT_EQ(billing->quotas().max_call_handles_per_app, 0u);  // set: no limit
  EXPECT_FALSE(billing->quotas().max_lines_per_app.has_value());

  const Tenant* support = directory.Find("support.team-2");
  ASSERT_NE(support, nullptr);
  EXPECT_EQ(support->RightsOn(100), kRightMonitor);
  EXPECT_EQ(support->RightsOn(99), 0);
  EXPECT_FALSE(support->is_provider());
  EXPECT_EQ(directory.Find("nobody"), nullptr);
}

TEST(TenantsTest, CredentialsNameOneTenant) {
  auto directory = *TenantDirectory::Parse(kGoodFile, kDevices);
  const Tenant* billing = directory->Find("billing");
  AuthFailure failure;

  absl::StatusOr<TenantMatch> by_key = directory->Identify(Credentials("billing-key-2"), &failure);
  ASSERT_THAT(by_key, IsOk());
  EXPECT_EQ(by_key->tenant, billing);
  EXPECT_EQ(by_key->credential, absl::StrCat("api_key:", Sha256Hex("billing-key-2")));
  EXPECT_TRUE(billing->HasCredential(by_key->credential));

  Credentials certificate;
  certificate.identities = {"subject:CN=someone-else", "dns:support.internal"};
  absl::StatusOr<TenantMatch> by_certificate = directory->Identify(certificate, &failure);
  ASSERT_THAT(by_certificate, IsOk());
  EXPECT_EQ(by_certificate->tenant->name(), "support.team-2");
  EXPECT_EQ(by_certificate->credential, "dns:support.internal");

  // A key and a certificate of the same tenant agree; the key is the credential.
  Credentials both("billing-key");
  both.identities = {"uri:spiffe://example.org/billing"};
  absl::StatusOr<TenantMatch> agreed = directory->Identify(both, &failure);
  ASSERT_THAT(agreed, IsOk());
  EXPECT_EQ(agreed->credential, absl::StrCat("api_key:", Sha256Hex("billing-key")));

  auto refused = [&](const Credentials& credentials, AuthFailure why) {
    failure = AuthFailure::kMissingCredential;
    EXPECT_THAT(directory->Identify(credentials, &failure),
                IsTapiError(absl::StatusCode::kUnauthenticated, "LINEERR_UNINITIALIZED"));
    EXPECT_EQ(AuthFailureName(failure), AuthFailureName(why));
  };
  refused(Credentials(), AuthFailure::kMissingCredential);
  refused(Credentials("billing-key "), AuthFailure::kUnknownApiKey);
  // The hash is not the key.
  refused(Credentials(Sha256Hex("billing-key")), AuthFailure::kUnknownApiKey);
  Credentials stranger;
  stranger.identities = {"subject:CN=billing"};  // not the configured subject
  refused(stranger, AuthFailure::kUnknownClientIdentity);
  Credentials split;
  split.identities = {"uri:spiffe://example.org/billing", "dns:support.internal"};
  refused(split, AuthFailure::kConflictingCredentials);
  Credentials mixed("billing-key");
  mixed.identities = {"dns:support.internal"};
  refused(mixed, AuthFailure::kConflictingCredentials);
  // A known certificate does not rescue an unknown key.
  Credentials wrong_key("guess");
  wrong_key.identities = {"uri:spiffe://example.org/billing"};
  refused(wrong_key, AuthFailure::kUnknownApiKey);
}

TEST(TenantsTest, AnEmptyFileHasNoTenants) {
  absl::StatusOr<std::shared_ptr<const TenantDirectory>> parsed =
      TenantDirectory::Parse("# nobody yet\n", kDevices);
  ASSERT_THAT(parsed, IsOk());
  EXPECT_TRUE((*parsed)->tenants().empty());
}

TEST(TenantsTest, EachMistakeIsRefusedNamingItsLine) {
  const std::string key = Sha256Hex("k");
  struct Case {
    const char* what;
    std::string text;
    std::string line;    // the message starts with it
    std::string saying;  // and contains this
  };
  const Case cases[] = {
      {"unknown field", "tenants {\n  name: \"a\"\n  device { first: 1 }\n}\n", "line 3", "device"},
      {"not text format", "tenants {\n  name: \"a\"\n", "line 3", ""},
      {"bad name", "tenants {\n  name: \"no spaces\"\n}\n", "line 2: ", "tenant name"},
      {"empty name",
       "tenants {\n  devices { first: 0 last: 0 privileges: DEVICE_PRIVILEGE_NONE }\n}\n",
       "line 1: ", "tenant name"},
      {"duplicate name", "tenants { name: \"a\" }\n\ntenants {\n  name: \"a\"\n}\n",
       "line 4: ", "already defined (line 1)"},
      {"malformed hash", "tenants {\n  name: \"a\"\n  api_key_sha256: \"abc\"\n}\n",
       "line 3: ", "64 hex digits"},
      {"hash with a non-hex digit",
       absl::StrCat("tenants {\n  name: \"a\"\n  api_key_sha256: \"", std::string(63, 'a'),
                    "g\"\n}\n"),
       "line 3: ", "64 hex digits"},
      {"duplicate key across tenants",
       absl::StrCat("tenants {\n  name: \"a\"\n  api_key_sha256: \"", key,
                    "\"\n}\ntenants {\n  name: \"b\"\n  api_key_sha256: \"", key, "\"\n}\n"),
       "line 7: ", "already tenant \"a\"'s (line 3)"},
      {"duplicate key in one tenant (case differs)",
       absl::StrCat("tenants {\n  name: \"a\"\n  api_key_sha256: \"", key,
                    "\"\n  api_key_sha256: \"", absl::AsciiStrToUpper(key), "\"\n}\n"),
       "line 4: ", "already tenant \"a\"'s"},
      {"duplicate identity",
       "tenants {\n  name: \"a\"\n  client_identities { uri: \"spiffe://x\" }\n}\n"
       "tenants {\n  name: \"b\"\n  client_identities { uri: \"spiffe://x\" }\n}\n",
       "line 7: ", "already tenant \"a\"'s (line 3)"},
      {"empty identity", "tenants {\n  name: \"a\"\n  client_identities { }\n}\n",
       "line 3: ", "one of subject, uri or dns"},
      {"reversed range",
       "tenants {\n  name: \"a\"\n  devices { first: 5 last: 4 privileges: DEVICE_PRIVILEGE_NONE "
       "}\n}\n",
       "line 3: ", "reversed"},
      {"past the devices",
       "tenants {\n  name: \"a\"\n  devices { first: 0 last: 300 privileges: DEVICE_PRIVILEGE_NONE "
       "}\n}\n",
       "line 3: ", "--devices=300"},
      {"no privileges", "tenants {\n  name: \"a\"\n  devices { first: 0 last: 1 }\n}\n",
       "line 3: ", "needs privileges"},
      {"unspecified privilege",
       "tenants {\n  name: \"a\"\n  devices { first: 0 last: 1 privileges: "
       "DEVICE_PRIVILEGE_UNSPECIFIED }\n}\n",
       "line 3: ", "needs privileges"},
      {"overlapping grants that contradict",
       "tenants {\n  name: \"a\"\n"
       "  devices { first: 0 last: 10 privileges: DEVICE_PRIVILEGE_NONE }\n"
       "  devices { first: 10 last: 20 privileges: DEVICE_PRIVILEGE_MONITOR }\n}\n",
       "line 4: ", "(line 3): overlapping grants must agree"},
      {"provider without devices", "tenants {\n  name: \"a\"\n  provider { }\n}\n",
       "line 3: ", "provider access needs devices"},
      {"provider range past the devices",
       "tenants {\n  name: \"a\"\n  provider {\n    devices { first: 0 last: 1 }\n"
       "    devices { first: 2 last: 999 }\n  }\n}\n",
       "line 5: ", "reaches past"},
  };
  for (const Case& c : cases) {
    const std::string error = ErrorOf(c.text);
    EXPECT_THAT(error, StartsWith(c.line)) << c.what << "\n" << c.text;
    EXPECT_THAT(error, HasSubstr(c.saying)) << c.what;
  }
}

TEST(TenantsTest, LoadNamesTheFile) {
  const std::string dir = MakeTempDir();
  const std::string path = dir + "/tenants.textproto";
  absl::StatusOr<std::shared_ptr<const TenantDirectory>> missing =
      TenantDirectory::Load(path, kDevices);
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(missing.status().message()), HasSubstr(path));
  {
    std::ofstream out(path);
    out << "tenants {\n  name: \"a\"\n  bogus: 1\n}\n";
  }
  absl::StatusOr<std::shared_ptr<const TenantDirectory>> bad =
      TenantDirectory::Load(path, kDevices);
  EXPECT_THAT(std::string(bad.status().message()),
              StartsWith(absl::StrCat("tenants file ", path, ": line 3")));
  {
    std::ofstream out(path);
    out << kGoodFile;
  }
  EXPECT_THAT(TenantDirectory::Load(path, kDevices), IsOk());
}

// The dev overlay's example is a good file for the base's 16 devices, and
// its documented keys work.
TEST(TenantsTest, TheDeployedExampleIsValid) {
  const std::string path =
      absl::StrCat(CALLSESSION_SOURCE_DIR, "/deploy/k8s/overlays/dev/tenants.textproto");
  absl::StatusOr<std::shared_ptr<const TenantDirectory>> example = TenantDirectory::Load(path, 16);
  ASSERT_THAT(example, IsOk());
  AuthFailure failure;
  for (const char* key : {"dev-dialer-key", "dev-supervisor-key", "dev-switch-key"}) {
    EXPECT_THAT((*example)->Identify(Credentials(key), &failure), IsOk()) << key;
  }
  EXPECT_TRUE((*example)->Find("dev-switch")->is_provider());
  EXPECT_EQ((*example)->Find("dev-supervisor")->RightsOn(15), kRightMonitor);
}

}  // namespace
}  // namespace callsession
