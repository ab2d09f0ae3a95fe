#include "server/core/tenants.h"

#include <algorithm>
#include <fstream>
#include <sstream>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "callsession/config/v1/tenants.pb.h"
#include "google/protobuf/descriptor.h"
#include "google/protobuf/io/tokenizer.h"
#include "google/protobuf/text_format.h"
#include "server/core/sha256.h"
#include "server/core/tapi_error.h"

namespace callsession {
namespace {

using config::v1::TenantsFile;
using google::protobuf::TextFormat;
using ParseInfoTree = TextFormat::ParseInfoTree;

constexpr size_t kMaxNameLength = 63;
constexpr size_t kMaxIdentityLength = 1024;
constexpr size_t kMaxFileBytes = 64 << 20;

// The 32 raw bytes of 64 hex digits (either case), or nullopt.
std::optional<std::string> ParseSha256Hex(absl::string_view hex) {
  if (hex.size() != 64) return std::nullopt;
  std::string bytes(32, '\0');
  for (size_t i = 0; i < 64; ++i) {
    const char c = absl::ascii_tolower(hex[i]);
    int digit = 0;
    if (c >= '0' && c <= '9') {
      digit = c - '0';
    } else if (c >= 'a' && c <= 'f') {
      digit = c - 'a' + 10;
    } else {
      return std::nullopt;
    }
    bytes[i / 2] = static_cast<char>(i % 2 == 0 ? digit << 4 : bytes[i / 2] | digit);
  }
  return bytes;
}

bool ValidName(absl::string_view name) {
  if (name.empty() || name.size() > kMaxNameLength) return false;
  return std::all_of(name.begin(), name.end(), [](char c) {
    return absl::ascii_isalnum(c) || c == '.' || c == '_' || c == '-';
  });
}

bool Printable(absl::string_view s) {
  return std::all_of(s.begin(), s.end(), [](char c) { return c >= 0x20 && c <= 0x7e; });
}

// "line N: " for a field of a message, from the parser's locations.
class Places {
 public:
  explicit Places(const ParseInfoTree* tree) : tree_(tree) {}

  // The place of `message`'s field `name` (element `index`, -1 if singular).
  std::string Of(const google::protobuf::Message& message, const char* name, int index = -1) const {
    const int line = Line(message, name, index);
    return line > 0 ? absl::StrCat("line ", line, ": ") : "";
  }
  int Line(const google::protobuf::Message& message, const char* name, int index = -1) const {
    if (tree_ == nullptr) return 0;
    const auto* field = message.GetDescriptor()->FindFieldByName(name);
    if (field == nullptr) return 0;
    const int line = tree_->GetLocation(field, index).line;
    return line < 0 ? 0 : line + 1;
  }
  // The places inside element `index` of `message`'s field `name`.
  Places Nested(const google::protobuf::Message& message, const char* name, int index = -1) const {
    if (tree_ == nullptr) return Places(nullptr);
    const auto* field = message.GetDescriptor()->FindFieldByName(name);
    return Places(field == nullptr ? nullptr : tree_->GetTreeForNested(field, index));
  }

 private:
  const ParseInfoTree* tree_;
};

// Collects the parser's first error with its line.
class FirstError final : public google::protobuf::io::ErrorCollector {
 public:
  void AddError(int line, google::protobuf::io::ColumnNumber column,
                const std::string& message) override {
    if (!error_.empty()) return;
    error_ = absl::StrCat("line ", line + 1, ", column ", column + 1, ": ", message);
  }
  const std::string& error() const { return error_; }

 private:
  std::string error_;
};

absl::Status Invalid(absl::string_view place, absl::string_view what) {
  return absl::InvalidArgumentError(absl::StrCat(place, what));
}

DeviceRights RightsOf(const config::v1::DeviceGrant& grant) {
  DeviceRights rights = 0;
  for (int privilege : grant.privileges()) {
    switch (privilege) {
      case config::v1::DEVICE_PRIVILEGE_NONE:
        rights |= kRightDial;
        break;
      case config::v1::DEVICE_PRIVILEGE_OWNER:
        rights |= kRightOwn;
        break;
      case config::v1::DEVICE_PRIVILEGE_MONITOR:
        rights |= kRightMonitor;
        break;
      default:
        return 0;
    }
  }
  return rights;
}

std::string RightsText(DeviceRights rights) {
  std::vector<absl::string_view> names;
  if (rights & kRightDial) names.push_back("NONE");
  if (rights & kRightOwn) names.push_back("OWNER");
  if (rights & kRightMonitor) names.push_back("MONITOR");
  return absl::StrJoin(names, ",");
}

// A range with the line it was defined on, while checking.
struct PlacedGrant {
  DeviceGrant grant;
  int line;
};

// Checks one range: first <= last < num_devices.
absl::Status CheckRange(uint32_t first, uint32_t last, uint32_t num_devices,
                        absl::string_view place) {
  if (first > last) {
    return Invalid(place, absl::StrCat("device range ", first, "..", last, " is reversed"));
  }
  if (last >= num_devices) {
    return Invalid(
        place, absl::StrCat("device range ", first, "..", last,
                            " reaches past the server's devices (--devices=", num_devices, ")"));
  }
  return absl::OkStatus();
}

// Sorts and merges ranges into disjoint ones. With `same_rights`, ranges
// that overlap must grant the same rights (else the error names both lines).
absl::StatusOr<std::vector<DeviceGrant>> Merge(std::vector<PlacedGrant> ranges, bool same_rights,
                                               absl::string_view tenant) {
  std::sort(ranges.begin(), ranges.end(), [](const PlacedGrant& a, const PlacedGrant& b) {
    return a.grant.first < b.grant.first;
  });
  std::vector<DeviceGrant> merged;
  int last_line = 0;
  for (const PlacedGrant& placed : ranges) {
    const DeviceGrant& grant = placed.grant;
    if (!merged.empty() && grant.first <= merged.back().last) {
      DeviceGrant& previous = merged.back();
      if (same_rights && grant.rights != previous.rights) {
        return absl::InvalidArgumentError(absl::StrCat(
            "line ", placed.line, ": tenant \"", tenant, "\" is granted devices ", grant.first,
            "..", grant.last, " with ", RightsText(grant.rights), " but devices up to ",
            previous.last, " with ", RightsText(previous.rights), " (line ", last_line,
            "): overlapping grants must agree"));
      }
      previous.last = std::max(previous.last, grant.last);
      last_line = placed.line;
      continue;
    }
    if (!merged.empty() && grant.first == merged.back().last + 1 &&
        grant.rights == merged.back().rights) {
      merged.back().last = grant.last;
    } else {
      merged.push_back(grant);
    }
    last_line = placed.line;
  }
  return merged;
}

const DeviceGrant* FindRange(const std::vector<DeviceGrant>& ranges, uint32_t device_id) {
  auto it = std::upper_bound(ranges.begin(), ranges.end(), device_id,
                             [](uint32_t id, const DeviceGrant& g) { return id < g.first; });
  if (it == ranges.begin()) return nullptr;
  --it;
  return device_id <= it->last ? &*it : nullptr;
}

}  // namespace

absl::string_view AuthFailureName(AuthFailure failure) {
  switch (failure) {
    case AuthFailure::kMissingCredential:
      return "missing_credential";
    case AuthFailure::kMalformedToken:
      return "malformed_token";
    case AuthFailure::kUnknownToken:
      return "unknown_token";
    case AuthFailure::kUnknownApiKey:
      return "unknown_api_key";
    case AuthFailure::kUnknownClientIdentity:
      return "unknown_client_identity";
    case AuthFailure::kConflictingCredentials:
      return "conflicting_credentials";
    case AuthFailure::kNotProvider:
      return "not_provider";
  }
  return "unknown";
}

DeviceRights Tenant::RightsOn(uint32_t device_id) const {
  const DeviceGrant* grant = FindRange(grants_, device_id);
  return grant == nullptr ? 0 : grant->rights;
}

bool Tenant::ProvidesFor(uint32_t device_id) const {
  return FindRange(provider_ranges_, device_id) != nullptr;
}

absl::StatusOr<std::shared_ptr<const TenantDirectory>> TenantDirectory::Parse(
    absl::string_view text, uint32_t num_devices) {
  TenantsFile file;
  ParseInfoTree tree;
  FirstError errors;
  TextFormat::Parser parser;
  parser.RecordErrorsTo(&errors);
  parser.WriteLocationsTo(&tree);
  if (!parser.ParseFromString(std::string(text), &file)) {
    return absl::InvalidArgumentError(
        errors.error().empty() ? std::string("the text does not parse") : errors.error());
  }
  const Places places(&tree);

  std::shared_ptr<TenantDirectory> directory(new TenantDirectory());
  directory->sha256_ = Sha256Hex(text);
  // Where each credential was first seen, for duplicate errors.
  absl::flat_hash_map<std::string, std::pair<std::string, int>> seen_credentials;
  absl::flat_hash_map<std::string, int> seen_names;

  for (int t = 0; t < file.tenants_size(); ++t) {
    const config::v1::Tenant& config = file.tenants(t);
    const Places in_tenant = places.Nested(file, "tenants", t);
    const int tenant_line = places.Line(file, "tenants", t);
    const std::string tenant_place = in_tenant.Line(config, "name") > 0
                                         ? in_tenant.Of(config, "name")
                                         : absl::StrCat("line ", tenant_line, ": ");
    if (!ValidName(config.name())) {
      return Invalid(tenant_place, absl::StrCat("tenant name \"", absl::CHexEscape(config.name()),
                                                "\" must be 1 to ", kMaxNameLength,
                                                " characters of A-Z, a-z, 0-9, '.', '_' and '-'"));
    }
    if (auto [it, added] = seen_names.emplace(config.name(), tenant_line); !added) {
      return Invalid(tenant_place, absl::StrCat("tenant \"", config.name(),
                                                "\" is already defined (line ", it->second, ")"));
    }
    auto tenant = std::make_unique<Tenant>();
    tenant->name_ = config.name();

    auto claim = [&](const std::string& credential, const std::string& shown,
                     const std::string& place, int line) -> absl::Status {
      auto [it, added] = seen_credentials.emplace(credential, std::make_pair(config.name(), line));
      if (!added) {
        return Invalid(place,
                       absl::StrCat(shown, " is already tenant \"", it->second.first, "\"'s (line ",
                                    it->second.second, "): a credential names one tenant"));
      }
      tenant->credentials_.insert(credential);
      return absl::OkStatus();
    };
    for (int k = 0; k < config.api_key_sha256_size(); ++k) {
      const std::string place = in_tenant.Of(config, "api_key_sha256", k);
      const std::optional<std::string> raw = ParseSha256Hex(config.api_key_sha256(k));
      if (!raw.has_value()) {
        return Invalid(place,
                       "api_key_sha256 must be 64 hex digits (the key's SHA-256, as "
                       "`printf %s \"$KEY\" | sha256sum` prints it)");
      }
      const std::string credential = absl::StrCat("api_key:", absl::BytesToHexString(*raw));
      if (absl::Status claimed =
              claim(credential, absl::StrCat("api_key_sha256 ", absl::BytesToHexString(*raw)),
                    place, in_tenant.Line(config, "api_key_sha256", k));
          !claimed.ok()) {
        return claimed;
      }
      directory->by_key_sha256_.emplace(*raw, tenant.get());
    }
    for (int i = 0; i < config.client_identities_size(); ++i) {
      const config::v1::ClientIdentity& identity = config.client_identities(i);
      const std::string place = in_tenant.Of(config, "client_identities", i);
      std::string credential;
      switch (identity.identity_case()) {
        case config::v1::ClientIdentity::kSubject:
          credential = absl::StrCat("subject:", identity.subject());
          break;
        case config::v1::ClientIdentity::kUri:
          credential = absl::StrCat("uri:", identity.uri());
          break;
        case config::v1::ClientIdentity::kDns:
          credential = absl::StrCat("dns:", identity.dns());
          break;
        case config::v1::ClientIdentity::IDENTITY_NOT_SET:
          return Invalid(place, "a client identity needs one of subject, uri or dns");
      }
      const absl::string_view value =
          absl::string_view(credential).substr(credential.find(':') + 1);
      if (value.empty() || value.size() > kMaxIdentityLength || !Printable(value)) {
        return Invalid(place, absl::StrCat("a client identity must be 1 to ", kMaxIdentityLength,
                                           " printable ASCII characters"));
      }
      if (absl::Status claimed =
              claim(credential, absl::StrCat("client identity \"", credential, "\""), place,
                    in_tenant.Line(config, "client_identities", i));
          !claimed.ok()) {
        return claimed;
      }
      directory->by_identity_.emplace(credential, tenant.get());
    }

    std::vector<PlacedGrant> grants;
    for (int g = 0; g < config.devices_size(); ++g) {
      const config::v1::DeviceGrant& grant = config.devices(g);
      const std::string place = in_tenant.Of(config, "devices", g);
      if (absl::Status range = CheckRange(grant.first(), grant.last(), num_devices, place);
          !range.ok()) {
        return range;
      }
      const DeviceRights rights = RightsOf(grant);
      if (grant.privileges().empty() || rights == 0) {
        return Invalid(place,
                       "a device grant needs privileges: DEVICE_PRIVILEGE_NONE, "
                       "DEVICE_PRIVILEGE_OWNER and/or DEVICE_PRIVILEGE_MONITOR");
      }
      grants.push_back(
          {{grant.first(), grant.last(), rights}, in_tenant.Line(config, "devices", g)});
    }
    absl::StatusOr<std::vector<DeviceGrant>> merged =
        Merge(std::move(grants), /*same_rights=*/true, config.name());
    if (!merged.ok()) return merged.status();
    tenant->grants_ = *std::move(merged);

    if (config.has_provider()) {
      const Places in_provider = in_tenant.Nested(config, "provider");
      const std::string provider_place = in_tenant.Of(config, "provider");
      if (config.provider().devices().empty()) {
        return Invalid(provider_place,
                       "provider access needs devices (leave `provider` out for none)");
      }
      std::vector<PlacedGrant> ranges;
      for (int r = 0; r < config.provider().devices_size(); ++r) {
        const config::v1::DeviceRange& range = config.provider().devices(r);
        if (absl::Status checked = CheckRange(range.first(), range.last(), num_devices,
                                              in_provider.Of(config.provider(), "devices", r));
            !checked.ok()) {
          return checked;
        }
        ranges.push_back(
            {{range.first(), range.last(), 0}, in_provider.Line(config.provider(), "devices", r)});
      }
      absl::StatusOr<std::vector<DeviceGrant>> provider_ranges =
          Merge(std::move(ranges), /*same_rights=*/false, config.name());
      if (!provider_ranges.ok()) return provider_ranges.status();
      tenant->provider_ranges_ = *std::move(provider_ranges);
    }

    if (config.has_quotas()) {
      const config::v1::Quotas& quotas = config.quotas();
      if (quotas.has_max_apps()) tenant->quotas_.max_apps = quotas.max_apps();
      if (quotas.has_max_lines_per_app()) {
        tenant->quotas_.max_lines_per_app = quotas.max_lines_per_app();
      }
      if (quotas.has_max_call_handles_per_app()) {
        tenant->quotas_.max_call_handles_per_app = quotas.max_call_handles_per_app();
      }
    }
    directory->by_name_.emplace(tenant->name_, tenant.get());
    directory->tenants_.push_back(std::move(tenant));
  }
  return std::shared_ptr<const TenantDirectory>(std::move(directory));
}

absl::StatusOr<std::shared_ptr<const TenantDirectory>> TenantDirectory::Load(
    const std::string& path, uint32_t num_devices) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    return absl::InvalidArgumentError(absl::StrCat("cannot read the tenants file ", path));
  }
  std::string text;
  char buffer[64 << 10];
  while (in.read(buffer, sizeof(buffer)) || in.gcount() > 0) {
    text.append(buffer, static_cast<size_t>(in.gcount()));
    if (text.size() > kMaxFileBytes) {
      return absl::InvalidArgumentError(
          absl::StrCat("the tenants file ", path, " is over ", kMaxFileBytes >> 20, " MiB"));
    }
  }
  if (in.bad()) {
    return absl::InvalidArgumentError(absl::StrCat("cannot read the tenants file ", path));
  }
  absl::StatusOr<std::shared_ptr<const TenantDirectory>> directory = Parse(text, num_devices);
  if (!directory.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat("tenants file ", path, ": ", directory.status().message()));
  }
  return directory;
}

absl::StatusOr<TenantMatch> TenantDirectory::Identify(const Credentials& credentials,
                                                      AuthFailure* failure) const {
  auto fail = [failure](AuthFailure why, absl::string_view message) {
    *failure = why;
    return TapiError(TapiErrorCode::kUninitialized, message);
  };
  TenantMatch by_key;
  if (!credentials.bearer.empty()) {
    const Sha256Digest digest = Sha256(credentials.bearer);
    const std::string raw(reinterpret_cast<const char*>(digest.data()), digest.size());
    auto it = by_key_sha256_.find(raw);
    // The lookup compares hashes of the key, which tell nothing about it.
    if (it == by_key_sha256_.end()) return fail(AuthFailure::kUnknownApiKey, "unknown API key");
    by_key = {it->second, absl::StrCat("api_key:", absl::BytesToHexString(raw))};
  }
  TenantMatch by_certificate;
  for (const std::string& identity : credentials.identities) {
    auto it = by_identity_.find(identity);
    if (it == by_identity_.end()) continue;
    if (by_certificate.tenant != nullptr && by_certificate.tenant != it->second) {
      return fail(AuthFailure::kConflictingCredentials,
                  "the client certificate's identities belong to different tenants");
    }
    if (by_certificate.tenant == nullptr) by_certificate = {it->second, identity};
  }
  if (by_key.tenant != nullptr) {
    if (by_certificate.tenant != nullptr && by_certificate.tenant != by_key.tenant) {
      return fail(AuthFailure::kConflictingCredentials,
                  "the API key and the client certificate belong to different tenants");
    }
    return by_key;
  }
  if (by_certificate.tenant != nullptr) return by_certificate;
  if (!credentials.identities.empty()) {
    return fail(AuthFailure::kUnknownClientIdentity,
                "the client certificate is no tenant's (and no API key was presented)");
  }
  return fail(AuthFailure::kMissingCredential,
              "a tenant credential is required: an API key as `authorization: Bearer <key>`, or "
              "a client certificate");
}

const Tenant* TenantDirectory::Find(absl::string_view name) const {
  auto it = by_name_.find(name);
  return it == by_name_.end() ? nullptr : it->second;
}

}  // namespace callsession
