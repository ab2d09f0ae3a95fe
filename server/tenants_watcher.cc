#include "server/tenants_watcher.h"

#include <sys/stat.h>

#include <utility>

#include "server/core/log.h"
#include "server/core/tenants.h"

namespace callsession {

FileIdentity IdentifyFile(const std::string& path) {
  struct stat st;
  if (stat(path.c_str(), &st) != 0) return FileIdentity();
  FileIdentity identity;
  identity.device = st.st_dev;
  identity.inode = st.st_ino;
  identity.size = st.st_size;
  identity.modified_ns = static_cast<int64_t>(st.st_mtim.tv_sec) * 1000000000 + st.st_mtim.tv_nsec;
  return identity;
}

TenantsFileWatcher::TenantsFileWatcher(std::string path, FileIdentity loaded, std::string sha256,
                                       CallSessionCore* core, ServerMetrics* metrics,
                                       absl::Duration interval)
    : path_(std::move(path)), core_(core), metrics_(metrics) {
  {
    absl::MutexLock lock(&mu_);
    identity_ = loaded;
    sha256_ = std::move(sha256);
  }
  thread_ = std::thread([this, interval] { Watch(interval); });
}

TenantsFileWatcher::~TenantsFileWatcher() {
  stop_.Notify();
  thread_.join();
}

void TenantsFileWatcher::Watch(absl::Duration interval) {
  while (!stop_.WaitForNotificationWithTimeout(interval)) {
    const FileIdentity now = IdentifyFile(path_);
    {
      absl::MutexLock lock(&mu_);
      if (now == identity_) continue;
    }
    // Logged and counted by Reload; the configuration in force stays.
    (void)Reload();
  }
}

absl::Status TenantsFileWatcher::Reload() {
  absl::MutexLock lock(&mu_);
  // Taken first: a change after it is seen by the next check.
  identity_ = IdentifyFile(path_);
  absl::StatusOr<std::shared_ptr<const TenantDirectory>> loaded =
      TenantDirectory::Load(path_, core_->num_devices());
  if (!loaded.ok()) {
    Log(LogLevel::kError, "tenants_reload_failed",
        {{"tenants_file", path_},
         {"error", std::string(loaded.status().message())},
         {"in_force_sha256", sha256_}});
    if (metrics_ != nullptr) metrics_->RecordTenantsReload(false);
    return loaded.status();
  }
  if ((*loaded)->sha256() == sha256_) return absl::OkStatus();  // touched, not changed
  sha256_ = (*loaded)->sha256();
  const size_t tenants = (*loaded)->tenants().size();
  const TenantsApplied applied = core_->SetTenants(*std::move(loaded));
  Log(LogLevel::kInfo, "tenants_reloaded",
      {{"tenants_file", path_},
       {"sha256", sha256_},
       {"tenants", static_cast<uint64_t>(tenants)},
       {"apps_revoked", static_cast<uint64_t>(applied.apps_shut_down)},
       {"lines_revoked", static_cast<uint64_t>(applied.lines_closed)}});
  if (metrics_ != nullptr) metrics_->RecordTenantsReload(true);
  return absl::OkStatus();
}

}  // namespace callsession
