// Tenants: who may use the server, and what each may do (the tenants file,
// protos/callsession/config/v1/tenants.proto).
//
// A TenantDirectory is one loaded, checked tenants file: immutable once
// built, shared by everything that uses it through
// std::shared_ptr<const TenantDirectory>, and replaced whole on a reload.
// Credentials are looked up by hash: an API key by the SHA-256 of what the
// caller presented (the file holds only hashes), a client certificate by
// its identities; every credential names at most one tenant.
//
// Thread-safe: a directory is read-only after Parse/Load.
#ifndef CALLSESSION_SERVER_CORE_TENANTS_H_
#define CALLSESSION_SERVER_CORE_TENANTS_H_

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace callsession {

// What a tenant may do on one device, as bits (see DevicePrivilege).
using DeviceRights = uint8_t;
inline constexpr DeviceRights kRightDial = 1;     // DEVICE_PRIVILEGE_NONE
inline constexpr DeviceRights kRightOwn = 2;      // DEVICE_PRIVILEGE_OWNER
inline constexpr DeviceRights kRightMonitor = 4;  // DEVICE_PRIVILEGE_MONITOR
inline constexpr DeviceRights kAllRights = kRightDial | kRightOwn | kRightMonitor;

// What a caller presented to prove who it is, as the transport saw it.
struct Credentials {
  Credentials() = default;
  // A bearer token alone (an API key or provider token).
  Credentials(absl::string_view bearer) : bearer(bearer) {}   // NOLINT: implicit on purpose
  Credentials(const char* bearer) : bearer(bearer) {}         // NOLINT
  Credentials(const std::string& bearer) : bearer(bearer) {}  // NOLINT

  // The `authorization: Bearer` token; empty if none. Never logged.
  absl::string_view bearer;
  // The verified client certificate's identities, each "subject:<RFC 2253
  // subject>", "uri:<URI SAN>" or "dns:<DNS SAN>"; empty without mutual TLS.
  std::vector<std::string> identities;
};

// Why an authentication failed: the label of
// callsession_auth_failures_total.
enum class AuthFailure {
  kMissingCredential,       // nothing presented
  kMalformedToken,          // an app token that is not one
  kUnknownToken,            // an app token of no (or no longer a) registered app
  kUnknownApiKey,           // a bearer key in no tenant
  kUnknownClientIdentity,   // a certificate whose identities are in no tenant
  kConflictingCredentials,  // a key and a certificate of different tenants
  kNotProvider,             // not the provider token, nor a tenant's with provider access
};
inline constexpr int kAuthFailureKinds = 7;
absl::string_view AuthFailureName(AuthFailure failure);

// Devices first..last (inclusive) with rights.
struct DeviceGrant {
  uint32_t first = 0;
  uint32_t last = 0;
  DeviceRights rights = 0;
};

struct TenantQuotas {
  std::optional<uint64_t> max_apps;
  std::optional<uint64_t> max_lines_per_app;
  std::optional<uint64_t> max_call_handles_per_app;
};

// One tenant of a directory.
class Tenant {
 public:
  const std::string& name() const { return name_; }
  // The tenant's rights on `device_id`; 0 if it may not open it.
  DeviceRights RightsOn(uint32_t device_id) const;
  // Disjoint, in device order; adjacent ranges with equal rights merged.
  const std::vector<DeviceGrant>& grants() const { return grants_; }
  // One past the highest device it may open; 0 if none.
  uint32_t device_limit() const { return grants_.empty() ? 0 : grants_.back().last + 1; }
  // Whether its credentials may call ProviderService for `device_id`.
  bool ProvidesFor(uint32_t device_id) const;
  bool is_provider() const { return !provider_ranges_.empty(); }
  const TenantQuotas& quotas() const { return quotas_; }
  // Whether `credential` (as TenantMatch::credential) is still one of its.
  bool HasCredential(absl::string_view credential) const {
    return credentials_.contains(credential);
  }

 private:
  friend class TenantDirectory;
  std::string name_;
  std::vector<DeviceGrant> grants_;
  // Disjoint, sorted, merged (rights unused).
  std::vector<DeviceGrant> provider_ranges_;
  TenantQuotas quotas_;
  absl::flat_hash_set<std::string> credentials_;
};

// The tenant a caller proved to be, and with which credential: "api_key:"
// and the key's SHA-256 in hex, or one of Credentials::identities.
struct TenantMatch {
  const Tenant* tenant = nullptr;
  std::string credential;
};

class TenantDirectory {
 public:
  // Parses and checks a tenants file's text for a server of `num_devices`
  // devices. INVALID_ARGUMENT, the message starting "line N: " when the
  // error has a place, for text that does not parse (unknown fields
  // included) or breaks a rule of tenants.proto: a bad or duplicate name, a
  // malformed or duplicate key hash, an empty or duplicate identity, a
  // device range that is reversed, past the server's devices or without
  // privileges, ranges of one tenant that overlap with different
  // privileges, provider access without devices.
  static absl::StatusOr<std::shared_ptr<const TenantDirectory>> Parse(absl::string_view text,
                                                                      uint32_t num_devices);
  // Reads `path` and parses it. INVALID_ARGUMENT naming the path, for an
  // unreadable file too.
  static absl::StatusOr<std::shared_ptr<const TenantDirectory>> Load(const std::string& path,
                                                                     uint32_t num_devices);

  // Who presented `credentials`, for Initialize: a bearer key must be a
  // tenant's; without one, the certificate's identities must name exactly
  // one tenant; with both, they must agree. On failure, `*failure` says why
  // and the status is UNAUTHENTICATED (LINEERR_UNINITIALIZED).
  absl::StatusOr<TenantMatch> Identify(const Credentials& credentials, AuthFailure* failure) const;

  // The tenant named `name`, or null.
  const Tenant* Find(absl::string_view name) const;
  const std::vector<std::unique_ptr<Tenant>>& tenants() const { return tenants_; }
  // SHA-256 of the text, in hex: which file is in force (for logs).
  const std::string& sha256() const { return sha256_; }

 private:
  TenantDirectory() = default;

  std::vector<std::unique_ptr<Tenant>> tenants_;
  absl::flat_hash_map<std::string, const Tenant*> by_name_;
  // By the 32 raw bytes of the key's SHA-256.
  absl::flat_hash_map<std::string, const Tenant*> by_key_sha256_;
  absl::flat_hash_map<std::string, const Tenant*> by_identity_;
  std::string sha256_;
};

}  // namespace callsession

#endif  // CALLSESSION_SERVER_CORE_TENANTS_H_
