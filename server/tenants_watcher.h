// TenantsFileWatcher: keeps the core's tenants in step with the tenants
// file (--tenants_file). A thread checks the file's identity (device,
// inode, size, modification time) every `interval`, which catches an edit
// in place and a Kubernetes Secret update (an atomic swap of the symlinked
// directory the file sits in); Reload() reads it at once (SIGHUP). A file
// whose text changed is parsed and, if good, put in force with
// CallSessionCore::SetTenants; a bad one is logged (`tenants_reload_failed`,
// with the line) and counted, and the configuration in force stays.
//
// Thread-safe. The core and metrics must outlive the watcher.
#ifndef CALLSESSION_SERVER_TENANTS_WATCHER_H_
#define CALLSESSION_SERVER_TENANTS_WATCHER_H_

#include <string>
#include <thread>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "absl/time/time.h"
#include "server/core/call_session_core.h"
#include "server/metrics.h"

namespace callsession {

// Which file a path names now, and which version of it.
struct FileIdentity {
  uint64_t device = 0;
  uint64_t inode = 0;
  int64_t size = -1;
  int64_t modified_ns = 0;
  bool operator==(const FileIdentity& other) const {
    return device == other.device && inode == other.inode && size == other.size &&
           modified_ns == other.modified_ns;
  }
  bool operator!=(const FileIdentity& other) const { return !(*this == other); }
};

// The identity of what `path` names (following symlinks); all zero/-1 if
// it cannot be read.
FileIdentity IdentifyFile(const std::string& path);

class TenantsFileWatcher {
 public:
  // `loaded` is the identity the file had just before the configuration in
  // force was read from it; `sha256` that configuration's
  // (TenantDirectory::sha256). `metrics` may be null.
  TenantsFileWatcher(std::string path, FileIdentity loaded, std::string sha256,
                     CallSessionCore* core, ServerMetrics* metrics, absl::Duration interval);
  // Stops the thread.
  ~TenantsFileWatcher();

  TenantsFileWatcher(const TenantsFileWatcher&) = delete;
  TenantsFileWatcher& operator=(const TenantsFileWatcher&) = delete;

  // Reads the file now and puts it in force if its text changed. Returns
  // the parse error (INVALID_ARGUMENT naming the file and line) if it is
  // refused; the configuration in force then stays.
  absl::Status Reload();

 private:
  void Watch(absl::Duration interval);

  const std::string path_;
  CallSessionCore* const core_;
  ServerMetrics* const metrics_;
  absl::Mutex mu_;  // serializes reloads
  FileIdentity identity_ ABSL_GUARDED_BY(mu_);
  std::string sha256_ ABSL_GUARDED_BY(mu_);
  absl::Notification stop_;
  std::thread thread_;
};

}  // namespace callsession

#endif  // CALLSESSION_SERVER_TENANTS_WATCHER_H_
