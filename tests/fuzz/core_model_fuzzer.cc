// Model-based fuzzing of CallSessionCore. The input is decoded into a
// sequence of operations by three applications and the provider; each runs
// against the core and against the reference model below, and after every
// step the harness checks that both returned the same result, that each
// live app's ListCalls equals the model's view of its handles (handle,
// call, line, privilege, state) and event count, that every handle the
// model knows to be void is refused, and that the core's live counts equal
// the model's. Leaks are caught by LeakSanitizer (fuzz builds) and by the
// store being empty once every app has shut down.
//
// Tenants: the input's first byte chooses open mode or tenants. With
// tenants, apps register with one of two tenants' keys (or a wrong one, or
// a provider-only tenant's), the provider acts with the all-devices token
// or a key scoped to devices 0-1, and an operation puts one of three
// configurations in force (tenants, keys, rights and quotas change; see
// kConfigs). After every step, isolation is checked independently of the
// model: every handle an app lists is on a device its tenant may see, with
// the right its privilege needs, and no app can read another's handles.
//
// The model is deliberately naive: plain maps and linear scans, written
// from the API contract in protos/, not from the core's code.
//
// Built with CALLSESSION_FUZZ_DURABLE (durable_model_fuzzer), the core
// journals to a RocksDB store in a temporary directory, every step waits
// until its changes are durable, and an opcode byte of 240 or more restarts:
// the core and the store are closed, reopened and recovered, and the next
// reconciliation must find everything as the model has it (tokens, handles,
// states, lines, event counts, request ids; every app gets a new lease).
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/notification.h"
#include "server/core/call_session_core.h"
#include "server/core/log.h"
#include "server/core/sha256.h"
#include "server/core/tapi_error.h"
#include "server/core/tenants.h"
#include "tests/test_support.h"
#ifdef CALLSESSION_FUZZ_DURABLE
#include <filesystem>

#include "server/storage/rocksdb/rocksdb_journal.h"
#endif

namespace callsession {
namespace {

constexpr char kProvider[] = "fuzz-provider";
constexpr int kApps = 3;
constexpr uint32_t kDevices = 4;
constexpr size_t kMaxLines = 3;
constexpr size_t kMaxHandles = 5;

// Tenant t0 (keys key-0 and, in some configurations, key-0b) and t1
// (key-1); "p" is a provider for devices 0-1 only (key-p), with no device.
// Rights per device as DeviceRights bits (1 place calls, 2 own, 4 monitor):
// t0 and t1 overlap on devices 1-2, and each has one of its own.
struct TenantsConfig {
  uint8_t rights[2][kDevices];
  bool t1_present;
  bool key_0b_present;
  // 0: the flags' limits.
  size_t t0_max_lines;
  size_t t0_max_handles;
  size_t t1_max_apps;
};
constexpr TenantsConfig kConfigs[] = {
    {{{7, 7, 4, 0}, {0, 3, 3, 7}}, true, true, 0, 0, 0},
    // t0 loses MONITOR on 2 and key-0b; t1 loses device 1 and OWNER on 2.
    {{{7, 7, 0, 0}, {0, 0, 1, 7}}, true, false, 2, 0, 1},
    // t1 is gone; t0 may monitor 2 and 3, with fewer handles.
    {{{7, 7, 4, 4}, {0, 0, 0, 0}}, false, true, 0, 3, 0},
};
constexpr int kConfigCount = 3;
const char* const kKeys[] = {"key-0", "key-0b", "key-1", "key-wrong", "key-p"};
constexpr absl::Duration kAppTtl = absl::Seconds(10);
constexpr absl::Duration kRequestIdTtl = absl::Seconds(30);

#define CHECK_THAT(cond, ...)                                                   \
  do {                                                                          \
    if (!(cond)) {                                                              \
      std::fprintf(stderr, "model mismatch at %s:%d: %s\n", __FILE__, __LINE__, \
                   absl::StrCat(__VA_ARGS__).c_str());                          \
      std::abort();                                                             \
    }                                                                           \
  } while (0)

// Reads the fuzz input a byte at a time; zeros once it runs out.
class Input {
 public:
  Input(const uint8_t* data, size_t size) : data_(data), size_(size) {}
  bool empty() const { return pos_ >= size_; }
  uint8_t Byte() { return pos_ < size_ ? data_[pos_++] : 0; }
  template <typename T>
  const T& Pick(const std::vector<T>& from) {
    return from[Byte() % from.size()];
  }

 private:
  const uint8_t* data_;
  size_t size_;
  size_t pos_ = 0;
};

// ---------------------------------------------------------------------------
// The reference model.

struct ModelLine {
  int app;
  uint32_t device;
  bool owner;
  bool monitor;
  uint64_t order;  // open order, for "earliest line" rules
  uint8_t rights;  // the app's rights on the device when it opened it
};

struct ModelHolder {
  int app;
  uint64_t line;
  bool owner;
};

struct ModelCall {
  uint32_t device;
  v1::CallState state;
  // Keyed by handle; 0-keyed entries are not possible: handles are learned
  // when issued (from responses or ListCalls).
  std::map<uint64_t, ModelHolder> holders;
};

struct ModelApp {
  bool alive = false;
  std::string token;
  int tenant = -1;  // 0 or 1; -1 in open mode
  std::string key;
  uint64_t events = 0;  // events queued so far
  struct Request {
    uint64_t line;
    std::string dest;
    uint64_t handle;
    uint64_t call_id;
    absl::Time answered;
  };
  std::map<std::string, Request> requests;
};

struct Model {
  ModelApp apps[kApps];
  std::map<uint64_t, ModelLine> lines;  // open lines
  std::map<uint64_t, ModelCall> calls;  // not freed, by call id
  std::set<uint64_t> void_handles;      // issued once, void now
  std::set<uint64_t> closed_lines;
  uint64_t next_order = 1;

  size_t HandlesOf(int app) const {
    size_t n = 0;
    for (const auto& [id, call] : calls) {
      for (const auto& [h, holder] : call.holders) n += holder.app == app;
    }
    return n;
  }
  // App `app`'s open line `handle`, or nullptr (another app's, closed, or
  // never issued: all LINEERR_INVALLINEHANDLE).
  const ModelLine* OwnLine(uint64_t handle, int app) const {
    auto it = lines.find(handle);
    return it != lines.end() && it->second.app == app ? &it->second : nullptr;
  }
  size_t LinesOf(int app) const {
    size_t n = 0;
    for (const auto& [h, line] : lines) n += line.app == app;
    return n;
  }
  static bool Holds(const ModelCall& call, int app) {
    for (const auto& [h, holder] : call.holders) {
      if (holder.app == app) return true;
    }
    return false;
  }
  // Lines on `device` with the property, in open order.
  std::vector<uint64_t> LinesOn(uint32_t device, bool owner) const {
    std::vector<std::pair<uint64_t, uint64_t>> found;
    for (const auto& [h, line] : lines) {
      if (line.device == device && (owner ? line.owner : line.monitor)) {
        found.emplace_back(line.order, h);
      }
    }
    std::sort(found.begin(), found.end());
    std::vector<uint64_t> handles;
    for (const auto& [order, h] : found) handles.push_back(h);
    return handles;
  }
  void Event(int app) {
    if (apps[app].alive) ++apps[app].events;
  }
  void SetState(ModelCall& call, v1::CallState state) {
    call.state = state;
    for (const auto& [h, holder] : call.holders) Event(holder.app);
  }
  void FreeIfDone(uint64_t call_id) {
    auto it = calls.find(call_id);
    if (it->second.state == v1::CALL_STATE_IDLE && it->second.holders.empty()) calls.erase(it);
  }
  // Voids `handle` of a closing line: a sole owner's live call is dropped.
  void VoidForClose(uint64_t call_id, uint64_t handle) {
    ModelCall& call = calls.at(call_id);
    const bool owner = call.holders.at(handle).owner;
    call.holders.erase(handle);
    void_handles.insert(handle);
    if (owner && call.state != v1::CALL_STATE_IDLE) SetState(call, v1::CALL_STATE_IDLE);
    FreeIfDone(call_id);
  }
  void CloseLine(uint64_t line_handle) {
    lines.erase(line_handle);
    closed_lines.insert(line_handle);
    std::vector<std::pair<uint64_t, uint64_t>> voided;
    for (const auto& [id, call] : calls) {
      for (const auto& [h, holder] : call.holders) {
        if (holder.line == line_handle) voided.emplace_back(id, h);
      }
    }
    for (const auto& [id, h] : voided) VoidForClose(id, h);
  }
};

// ---------------------------------------------------------------------------

// The tenants file of kConfigs[config].
std::string ConfigText(const TenantsConfig& config) {
  auto tenant = [](const char* name, std::vector<const char*> keys, const uint8_t* rights,
                   const std::string& quotas) {
    std::string text = absl::StrCat("tenants {\n  name: \"", name, "\"\n");
    for (const char* key : keys)
      absl::StrAppend(&text, "  api_key_sha256: \"", Sha256Hex(key), "\"\n");
    for (uint32_t device = 0; device < kDevices; ++device) {
      if (rights[device] == 0) continue;
      absl::StrAppend(&text, "  devices { first: ", device, " last: ", device, " privileges: [");
      const char* separator = "";
      for (auto [bit, privilege] : {std::pair<int, const char*>{1, "DEVICE_PRIVILEGE_NONE"},
                                    {2, "DEVICE_PRIVILEGE_OWNER"},
                                    {4, "DEVICE_PRIVILEGE_MONITOR"}}) {
        if (rights[device] & bit) {
          absl::StrAppend(&text, separator, privilege);
          separator = ", ";
        }
      }
      absl::StrAppend(&text, "] }\n");
    }
    return absl::StrCat(text, quotas, "}\n");
  };
  std::string text;
  std::vector<const char*> t0_keys = {"key-0"};
  if (config.key_0b_present) t0_keys.push_back("key-0b");
  std::string t0_quotas;
  if (config.t0_max_lines != 0) {
    absl::StrAppend(&t0_quotas, "  quotas { max_lines_per_app: ", config.t0_max_lines, " }\n");
  }
  if (config.t0_max_handles != 0) {
    absl::StrAppend(&t0_quotas, "  quotas { max_call_handles_per_app: ", config.t0_max_handles,
                    " }\n");
  }
  absl::StrAppend(&text, tenant("t0", t0_keys, config.rights[0], t0_quotas));
  if (config.t1_present) {
    absl::StrAppend(&text,
                    tenant("t1", {"key-1"}, config.rights[1],
                           config.t1_max_apps != 0
                               ? absl::StrCat("  quotas { max_apps: ", config.t1_max_apps, " }\n")
                               : ""));
  }
  absl::StrAppend(&text, "tenants {\n  name: \"p\"\n  api_key_sha256: \"", Sha256Hex("key-p"),
                  "\"\n  provider { devices { first: 0 last: 1 } }\n}\n");
  return text;
}

std::shared_ptr<const TenantDirectory> Directory(int config) {
  static const std::vector<std::shared_ptr<const TenantDirectory>>* directories = [] {
    auto* built = new std::vector<std::shared_ptr<const TenantDirectory>>();
    for (const TenantsConfig& config : kConfigs) {
      absl::StatusOr<std::shared_ptr<const TenantDirectory>> parsed =
          TenantDirectory::Parse(ConfigText(config), kDevices);
      CHECK_THAT(parsed.ok(), "tenants config: ", parsed.status().ToString());
      built->push_back(*std::move(parsed));
    }
    return built;
  }();
  return (*directories)[config];
}

class Harness {
 public:
  explicit Harness(bool tenants) : tenants_(tenants) { Open(); }

  ~Harness() {
    core_.reset();
#ifdef CALLSESSION_FUZZ_DURABLE
    journal_.reset();
    std::error_code ignored;
    std::filesystem::remove_all(data_dir_, ignored);
#endif
  }

  void Run(Input& in) {
    for (int step = 0; step < 200 && !in.empty(); ++step) {
      Step(in);
      WaitUntilDurable();
      Reconcile();
    }
    // Everyone leaves: the store must be empty but for unheld inbound calls.
    for (int a = 0; a < kApps; ++a) {
      if (!model_.apps[a].alive) continue;
      v1::ShutdownResponse response;
      CHECK_THAT(core_->Shutdown(model_.apps[a].token, {}, &response).ok(), "final shutdown");
    }
    const CoreStats stats = core_->Stats();
    CHECK_THAT(stats.live.apps == 0 && stats.live.lines == 0 && stats.live.call_handles == 0,
               "store not empty after every app shut down");
    // Counters start again at each restart; what a core recovered, an
    // earlier one created.
    CHECK_THAT(stats.call_handles_created + carried_.call_handles_created ==
                   stats.call_handles_voided + carried_.call_handles_voided,
               "handles leaked");
    CHECK_THAT(stats.calls_created + carried_.calls_created ==
                   stats.calls_freed + carried_.calls_freed + stats.live.calls,
               "calls leaked");
  }

 private:
  // A new core (and, durable, its store, recovered).
  void Open() {
    CoreOptions options = Options();
#ifdef CALLSESSION_FUZZ_DURABLE
    if (data_dir_.empty()) {
      static const std::string base = MakeTempDir("callsession-fuzz");
      static int inputs = 0;
      data_dir_ = absl::StrCat(base, "/", inputs++);
    }
    RocksDbJournalOptions journal;
    journal.data_dir = data_dir_;
    journal.sync = false;  // the process does not crash here; recovery logic is what is tested
    absl::StatusOr<std::unique_ptr<Journal>> opened = OpenRocksDbJournal(journal);
    CHECK_THAT(opened.ok(), "opening the store: ", opened.status().ToString());
    journal_ = *std::move(opened);
    options.journal = journal_.get();
#endif
    core_ = std::make_unique<CallSessionCore>(options);
#ifdef CALLSESSION_FUZZ_DURABLE
    absl::StatusOr<RecoveryCounts> recovered = core_->Recover();
    CHECK_THAT(recovered.ok(), "recovery: ", recovered.status().ToString());
#endif
  }

  // Closes the core and its store and opens them again: nothing the model
  // knows may change, but the leases, which start again.
  void Restart() {
    const CoreStats before = core_->Stats();
    carried_.call_handles_created += before.call_handles_created;
    carried_.call_handles_voided += before.call_handles_voided;
    carried_.calls_created += before.calls_created;
    carried_.calls_freed += before.calls_freed;
    core_.reset();
#ifdef CALLSESSION_FUZZ_DURABLE
    journal_.reset();
#endif
    Open();
    for (int a = 0; a < kApps; ++a) last_activity_[a] = clock_.Now();
  }

  // Returns once every change so far is durable (at once without a store).
  void WaitUntilDurable() {
    absl::Notification durable;
    core_->WhenChangesDurable([&durable] { durable.Notify(); });
    durable.WaitForNotification();
  }
  CoreOptions Options() {
    CoreOptions options;
    options.num_devices = kDevices;
    options.shards = 4;
    options.provider_token = kProvider;
    options.event_buffer = 1 << 20;  // no loss: events are counted
    options.request_id_ttl = kRequestIdTtl;
    options.app_ttl = kAppTtl;
    options.max_lines_per_app = kMaxLines;
    options.max_call_handles_per_app = kMaxHandles;
    options.clock = &clock_;
    if (tenants_) options.tenants = Directory(config_);
    return options;
  }

  const TenantsConfig& Config() const { return kConfigs[config_]; }
  // App `a`'s rights on `device` now.
  uint8_t RightsOf(int a, uint32_t device) const {
    if (!tenants_) return 7;
    return device < kDevices ? Config().rights[model_.apps[a].tenant][device] : 0;
  }
  size_t HandleLimit(int a) const {
    if (tenants_ && model_.apps[a].tenant == 0 && Config().t0_max_handles != 0) {
      return Config().t0_max_handles;
    }
    return kMaxHandles;
  }
  size_t LineLimit(int a) const {
    if (tenants_ && model_.apps[a].tenant == 0 && Config().t0_max_lines != 0) {
      return Config().t0_max_lines;
    }
    return kMaxLines;
  }
  // Provider 0: the all-devices token; 1: key-p, a tenant's key for
  // devices 0-1 (no provider without tenants); 2: a wrong token.
  static const char* ProviderCredential(int provider) {
    return provider == 0 ? kProvider : provider == 1 ? "key-p" : "not-a-provider";
  }
  bool ProviderAccepted(int provider) const { return provider == 0 || (provider == 1 && tenants_); }
  static bool ProviderCovers(int provider, uint32_t device) { return provider != 1 || device <= 1; }

  // The token to use for app slot `a`: its live one, its stale one, or none.
  std::string TokenOf(int a) { return model_.apps[a].token; }

  // A line handle worth trying for app `a`: one of its own open lines, a
  // closed one, another app's, or garbage.
  uint64_t PickLine(Input& in, int a) {
    std::vector<uint64_t> candidates = {0, 999999};
    for (const auto& [h, line] : model_.lines) candidates.push_back(h);
    for (uint64_t h : model_.closed_lines) candidates.push_back(h);
    for (const auto& [h, line] : model_.lines) {
      if (line.app == a) candidates.insert(candidates.end(), 3, h);  // favour own
    }
    return in.Pick(candidates);
  }

  uint64_t PickHandle(Input& in, int a) {
    std::vector<uint64_t> candidates = {0, 999999};
    for (const auto& [id, call] : model_.calls) {
      for (const auto& [h, holder] : call.holders) {
        candidates.push_back(h);
        if (holder.app == a) candidates.insert(candidates.end(), 3, h);
      }
    }
    for (uint64_t h : model_.void_handles) candidates.push_back(h);
    return in.Pick(candidates);
  }

  uint64_t PickCallId(Input& in) {
    std::vector<uint64_t> candidates = {0, 999999};
    for (const auto& [id, call] : model_.calls) candidates.insert(candidates.end(), 2, id);
    return in.Pick(candidates);
  }

  // The holder of `handle` if app `a` holds it.
  const ModelHolder* Held(uint64_t handle, int a, uint64_t* call_id) {
    for (auto& [id, call] : model_.calls) {
      auto it = call.holders.find(handle);
      if (it != call.holders.end()) {
        if (it->second.app != a) return nullptr;
        *call_id = id;
        return &it->second;
      }
    }
    return nullptr;
  }

  static void Expect(const absl::Status& got, absl::string_view want, absl::string_view op) {
    const std::string name = got.ok() ? "OK" : std::string(TapiErrorName(got));
    CHECK_THAT(name == want, op, ": core says ", got.ToString(), ", model says ", want);
  }

  // Adds the holders the model expects for a new call; the core chose the
  // handle values, which Reconcile learns from ListCalls.
  void ExpectMonitors(uint64_t call_id) {
    ModelCall& call = model_.calls.at(call_id);
    for (uint64_t line_handle : model_.LinesOn(call.device, false)) {
      const ModelLine& line = model_.lines.at(line_handle);
      if (Model::Holds(call, line.app) || model_.HandlesOf(line.app) >= HandleLimit(line.app)) {
        continue;
      }
      AddPending(call_id, line.app, line_handle, false);
      model_.Event(line.app);  // AppNewCallEvent
    }
  }

  void AddPending(uint64_t call_id, int app, uint64_t line, bool owner) {
    // A placeholder key until Reconcile learns the real handle.
    const uint64_t placeholder = kPlaceholderBase + next_placeholder_++;
    model_.calls.at(call_id).holders[placeholder] = ModelHolder{app, line, owner};
  }

  void Step(Input& in) {
    const int a = in.Byte() % kApps;
    ModelApp& app = model_.apps[a];
    const std::string token = TokenOf(a);
    const bool alive = app.alive;
    const std::string unauth = "LINEERR_UNINITIALIZED";
    const uint8_t opcode_byte = in.Byte();
#ifdef CALLSESSION_FUZZ_DURABLE
    if (opcode_byte >= 240) return Restart();
#endif
    const int opcode = opcode_byte % 16;
    switch (opcode) {
      case 0: {  // Initialize (replaces the slot's app, if any, with a new one)
        if (alive) return;
        v1::InitializeRequest request;
        const uint8_t choice = in.Byte();
        request.set_app_name(choice % 8 == 0 ? std::string("bad\n") : "fuzz");
        const std::string key = kKeys[(choice >> 3) % 5];
        v1::InitializeResponse response;
        const absl::Status status = core_->Initialize(Credentials(key), request, &response);
        int tenant = -1;
        if (tenants_) {
          if (key == "key-0" || (key == "key-0b" && Config().key_0b_present)) {
            tenant = 0;
          } else if (key == "key-1" && Config().t1_present) {
            tenant = 1;
          } else if (key == "key-p") {
            return Expect(status, "LINEERR_OPERATIONUNAVAIL", "Initialize (provider only)");
          } else {
            return Expect(status, unauth, "Initialize");
          }
        }
        if (request.app_name() != "fuzz") {
          return Expect(status, "LINEERR_INVALAPPNAME", "Initialize");
        }
        if (tenant == 1 && Config().t1_max_apps != 0) {
          size_t live = 0;
          for (const ModelApp& other : model_.apps) live += other.alive && other.tenant == 1;
          if (live >= Config().t1_max_apps) {
            return Expect(status, "LINEERR_RESOURCEUNAVAIL", "Initialize (tenant max_apps)");
          }
        }
        Expect(status, "OK", "Initialize");
        app = ModelApp();
        app.alive = true;
        app.token = response.app_token();
        app.tenant = tenant;
        app.key = key;
        return;
      }
      case 1: {  // LineOpen
        v1::LineOpenRequest request;
        const uint32_t device = in.Byte() % (kDevices + 1);
        request.set_device_id(device);
        const uint8_t privileges = in.Byte();
        const bool owner = privileges & 1;
        const bool monitor = privileges & 2;
        const bool bad = (privileges & 28) == 28;
        if (owner) request.add_privileges(v1::CALL_PRIVILEGE_OWNER);
        if (monitor) request.add_privileges(v1::CALL_PRIVILEGE_MONITOR);
        if (bad) request.add_privileges(static_cast<v1::CallPrivilege>(7));
        v1::LineOpenResponse response;
        const absl::Status status = core_->LineOpen(token, request, &response);
        if (!alive) return Expect(status, unauth, "LineOpen");
        if (device >= kDevices) return Expect(status, "LINEERR_BADDEVICEID", "LineOpen");
        const uint8_t rights = RightsOf(a, device);
        if (rights == 0) return Expect(status, "LINEERR_BADDEVICEID", "LineOpen (not its)");
        if (bad) return Expect(status, "LINEERR_INVALPRIVSELECT", "LineOpen");
        const uint8_t needed = owner || monitor ? (owner ? 2 : 0) | (monitor ? 4 : 0) : 1;
        if ((needed & ~rights) != 0) {
          return Expect(status, "LINEERR_OPERATIONUNAVAIL", "LineOpen (a right it lacks)");
        }
        if (model_.LinesOf(a) >= LineLimit(a))
          return Expect(status, "LINEERR_RESOURCEUNAVAIL", "LineOpen");
        Expect(status, "OK", "LineOpen");
        model_.lines[response.line_handle()] =
            ModelLine{a, device, owner, monitor, model_.next_order++, rights};
        return;
      }
      case 2: {  // LineClose
        const uint64_t line = PickLine(in, a);
        v1::LineCloseRequest request;
        request.set_line_handle(line);
        v1::LineCloseResponse response;
        const absl::Status status = core_->LineClose(token, request, &response);
        if (!alive) return Expect(status, unauth, "LineClose");
        const ModelLine* own = model_.OwnLine(line, a);
        if (own == nullptr) return Expect(status, "LINEERR_INVALLINEHANDLE", "LineClose");
        Expect(status, "OK", "LineClose");
        model_.CloseLine(line);
        return;
      }
      case 3: {  // MakeCall
        const uint64_t line = PickLine(in, a);
        const uint8_t choice = in.Byte();
        const std::string dest = choice % 8 == 0 ? "" : (choice % 2 ? "100" : "200");
        const std::string request_id =
            std::vector<std::string>{"", "", "r1", "r2"}[(choice >> 3) % 4];
        v1::MakeCallRequest request;
        request.set_line_handle(line);
        request.set_dest_address(dest);
        request.set_request_id(request_id);
        v1::MakeCallResponse response;
        const absl::Status status = core_->MakeCall(token, request, &response);
        if (!alive) return Expect(status, unauth, "MakeCall");
        if (!request_id.empty()) {
          auto seen = app.requests.find(request_id);
          if (seen != app.requests.end() && clock_.Now() - seen->second.answered >= kRequestIdTtl) {
            app.requests.erase(seen);
            seen = app.requests.end();
          }
          if (seen != app.requests.end()) {
            if (seen->second.line != line || seen->second.dest != dest) {
              return Expect(status, "LINEERR_INVALPARAM", "MakeCall replay");
            }
            Expect(status, "OK", "MakeCall replay");
            CHECK_THAT(response.call_handle() == seen->second.handle &&
                           response.call_id() == seen->second.call_id,
                       "a replay returns the first response");
            return;
          }
        }
        if (dest.empty()) return Expect(status, "LINEERR_INVALADDRESS", "MakeCall");
        const ModelLine* own = model_.OwnLine(line, a);
        if (own == nullptr) return Expect(status, "LINEERR_INVALLINEHANDLE", "MakeCall");
        if ((own->rights & 1) == 0) return Expect(status, "LINEERR_OPERATIONUNAVAIL", "MakeCall");
        if (model_.HandlesOf(a) >= HandleLimit(a)) {
          return Expect(status, "LINEERR_RESOURCEUNAVAIL", "MakeCall");
        }
        Expect(status, "OK", "MakeCall");
        CHECK_THAT(model_.calls.count(response.call_id()) == 0, "call id reused");
        ModelCall& call = model_.calls[response.call_id()];
        call.device = own->device;
        call.holders[response.call_handle()] = ModelHolder{a, line, true};
        ExpectMonitors(response.call_id());
        model_.SetState(call, v1::CALL_STATE_DIALING);
        if (!request_id.empty()) {
          app.requests[request_id] = {line, dest, response.call_handle(), response.call_id(),
                                      clock_.Now()};
        }
        return;
      }
      case 4:    // Drop
      case 5:    // Answer
      case 6: {  // DeallocateCall
        const uint64_t handle = PickHandle(in, a);
        return CallOp(a, token, alive, handle, opcode - 4);
      }
      case 7: {  // GetCallStatus / GetCallInfo through any handle
        const uint64_t handle = PickHandle(in, a);
        v1::GetCallStatusRequest request;
        request.set_call_handle(handle);
        v1::GetCallStatusResponse response;
        const absl::Status status = core_->GetCallStatus(token, request, &response);
        if (!alive) return Expect(status, unauth, "GetCallStatus");
        uint64_t call_id = 0;
        const ModelHolder* holder = Held(handle, a, &call_id);
        if (holder == nullptr) return Expect(status, "LINEERR_INVALCALLHANDLE", "GetCallStatus");
        Expect(status, "OK", "GetCallStatus");
        CHECK_THAT(response.status().call_state() == model_.calls.at(call_id).state, "state");
        return;
      }
      case 8: {  // GetNewCalls
        const uint64_t line = PickLine(in, a);
        v1::GetNewCallsRequest request;
        request.set_line_handle(line);
        v1::GetNewCallsResponse response;
        const absl::Status status = core_->GetNewCalls(token, request, &response);
        if (!alive) return Expect(status, unauth, "GetNewCalls");
        const ModelLine* own = model_.OwnLine(line, a);
        if (own == nullptr) return Expect(status, "LINEERR_INVALLINEHANDLE", "GetNewCalls");
        if ((own->rights & 4) == 0) {
          return Expect(status, "LINEERR_OPERATIONUNAVAIL", "GetNewCalls");
        }
        std::vector<uint64_t> candidates;
        for (const auto& [id, call] : model_.calls) {
          if (call.device == own->device && call.state != v1::CALL_STATE_IDLE &&
              !Model::Holds(call, a)) {
            candidates.push_back(id);
          }
        }
        if (model_.HandlesOf(a) + candidates.size() > HandleLimit(a)) {
          return Expect(status, "LINEERR_RESOURCEUNAVAIL", "GetNewCalls");
        }
        Expect(status, "OK", "GetNewCalls");
        CHECK_THAT(static_cast<size_t>(response.call_handles_size()) == candidates.size(),
                   "GetNewCalls count");
        // Which handle went to which call is learned by Reconcile.
        for (uint64_t id : candidates) AddPending(id, a, line, false);
        return;
      }
      case 9: {  // Shutdown
        v1::ShutdownResponse response;
        const absl::Status status = core_->Shutdown(token, {}, &response);
        if (!alive) return Expect(status, unauth, "Shutdown");
        Expect(status, "OK", "Shutdown");
        ShutDownInModel(a);
        return;
      }
      case 10: {  // provider OfferCall
        const uint8_t choice = in.Byte();
        const uint32_t device = choice % (kDevices + 1);
        const int provider = (choice >> 4) % 3;
        v1::OfferCallRequest request;
        request.set_device_id(device);
        request.set_caller_id("555");
        v1::OfferCallResponse response;
        const absl::Status status =
            core_->OfferCall(ProviderCredential(provider), request, &response);
        if (!ProviderAccepted(provider)) return Expect(status, unauth, "OfferCall");
        if (!ProviderCovers(provider, device)) {
          return Expect(status, "LINEERR_BADDEVICEID", "OfferCall (not its device)");
        }
        if (device >= kDevices) return Expect(status, "LINEERR_BADDEVICEID", "OfferCall");
        Expect(status, "OK", "OfferCall");
        ModelCall& call = model_.calls[response.call_id()];
        call.device = device;
        for (uint64_t line_handle : model_.LinesOn(device, true)) {
          const ModelLine& line = model_.lines.at(line_handle);
          if (model_.HandlesOf(line.app) >= HandleLimit(line.app)) continue;
          AddPending(response.call_id(), line.app, line_handle, true);
          model_.Event(line.app);
          break;
        }
        ExpectMonitors(response.call_id());
        model_.SetState(call, v1::CALL_STATE_OFFERING);
        return;
      }
      case 11: {  // provider SetCallState
        const uint64_t call_id = PickCallId(in);
        const uint8_t choice = in.Byte();
        const int state = choice % 18;  // 0 and 17 are invalid
        const int provider = (choice >> 5) % 3;
        v1::SetCallStateRequest request;
        request.set_call_id(call_id);
        request.set_call_state(static_cast<v1::CallState>(state));
        v1::SetCallStateResponse response;
        const absl::Status status =
            core_->SetCallState(ProviderCredential(provider), request, &response);
        if (!ProviderAccepted(provider)) return Expect(status, unauth, "SetCallState");
        if (state == 0 || state == 17) return Expect(status, "LINEERR_INVALPARAM", "SetCallState");
        auto it = model_.calls.find(call_id);
        if (it == model_.calls.end() || !ProviderCovers(provider, it->second.device))
          return Expect(status, "LINEERR_INVALCALLHANDLE", "SetCallState");
        if (it->second.state == v1::CALL_STATE_IDLE) {
          return Expect(status, "LINEERR_INVALCALLSTATE", "SetCallState");
        }
        Expect(status, "OK", "SetCallState");
        if (it->second.state == state) return;
        model_.SetState(it->second, static_cast<v1::CallState>(state));
        model_.FreeIfDone(call_id);
        return;
      }
      case 12: {  // provider ForceLineClose
        const uint8_t choice = in.Byte();
        const uint32_t device = choice % (kDevices + 1);
        const int provider = (choice >> 4) % 3;
        v1::ForceLineCloseRequest request;
        request.set_device_id(device);
        v1::ForceLineCloseResponse response;
        const absl::Status status =
            core_->ForceLineClose(ProviderCredential(provider), request, &response);
        if (!ProviderAccepted(provider)) return Expect(status, unauth, "ForceLineClose");
        if (!ProviderCovers(provider, device) || device >= kDevices) {
          return Expect(status, "LINEERR_BADDEVICEID", "ForceLineClose");
        }
        Expect(status, "OK", "ForceLineClose");
        std::vector<std::pair<uint64_t, uint64_t>> on_device;  // order, handle
        for (const auto& [h, line] : model_.lines) {
          if (line.device == device) on_device.emplace_back(line.order, h);
        }
        std::sort(on_device.begin(), on_device.end());
        for (const auto& [order, h] : on_device) {
          const int owner_app = model_.lines.at(h).app;
          model_.CloseLine(h);
          model_.Event(owner_app);  // LineCloseEvent
        }
        return;
      }
      case 13: {  // time passes; leases run out
        clock_.Advance(absl::Seconds(in.Byte() % 16));
        const size_t expired = core_->ExpireIdleApps();
        size_t model_expired = 0;
        for (int i = 0; i < kApps; ++i) {
          if (model_.apps[i].alive && clock_.Now() - last_activity_[i] >= kAppTtl) {
            ShutDownInModel(i);
            ++model_expired;
          }
        }
        CHECK_THAT(expired == model_expired, "ExpireIdleApps: core ", expired, ", model ",
                   model_expired);
        return;
      }
      case 14: {  // KeepAlive
        v1::KeepAliveResponse response;
        const absl::Status status = core_->KeepAlive(token, {}, &response);
        return Expect(status, alive ? "OK" : unauth, "KeepAlive");
      }
      case 15: {  // another tenants configuration is put in force
        if (!tenants_) return;
        config_ = in.Byte() % kConfigCount;
        const TenantsApplied applied = core_->SetTenants(Directory(config_));
        size_t shut_down = 0;
        for (int i = 0; i < kApps; ++i) {
          const ModelApp& other = model_.apps[i];
          if (!other.alive) continue;
          const bool kept = other.tenant == 0 ? other.key == "key-0" || Config().key_0b_present
                                              : Config().t1_present;
          if (!kept) {
            ShutDownInModel(i);
            ++shut_down;
          }
        }
        size_t closed = 0;
        std::vector<uint64_t> revoked;
        for (const auto& [h, line] : model_.lines) {
          if ((line.rights & ~RightsOf(line.app, line.device)) != 0) revoked.push_back(h);
        }
        for (uint64_t h : revoked) {
          const int owner_app = model_.lines.at(h).app;
          model_.CloseLine(h);
          model_.Event(owner_app);  // LineCloseEvent
          ++closed;
        }
        CHECK_THAT(applied.apps_shut_down == shut_down && applied.lines_closed == closed,
                   "SetTenants: core shut down ", applied.apps_shut_down, " apps and closed ",
                   applied.lines_closed, " lines; model ", shut_down, " and ", closed);
        // Which of an app's handles went first (its line, or the call's
        // owner) depends on the order the core visits apps in, and with it
        // whether the app was told of a drop: the states are the same, the
        // event counts are taken from the core (once durable: ListCalls
        // resumes from the first event a crash could take back).
        WaitUntilDurable();
        for (ModelApp& other : model_.apps) {
          if (!other.alive) continue;
          v1::ListCallsRequest list;
          list.set_page_size(1);
          v1::ListCallsResponse listed;
          CHECK_THAT(core_->ListCalls(other.token, list, &listed).ok(), "ListCalls");
          other.events = listed.resume_sequence() - 1;
        }
        return;
      }
    }
  }

  // kind 0: Drop, 1: Answer, 2: DeallocateCall.
  void CallOp(int a, const std::string& token, bool alive, uint64_t handle, int kind) {
    absl::Status status;
    if (kind == 0) {
      v1::DropRequest request;
      request.set_call_handle(handle);
      v1::DropResponse response;
      status = core_->Drop(token, request, &response);
    } else if (kind == 1) {
      v1::AnswerRequest request;
      request.set_call_handle(handle);
      v1::AnswerResponse response;
      status = core_->Answer(token, request, &response);
    } else {
      v1::DeallocateCallRequest request;
      request.set_call_handle(handle);
      v1::DeallocateCallResponse response;
      status = core_->DeallocateCall(token, request, &response);
    }
    const char* op = kind == 0 ? "Drop" : kind == 1 ? "Answer" : "DeallocateCall";
    if (!alive) return Expect(status, "LINEERR_UNINITIALIZED", op);
    uint64_t call_id = 0;
    const ModelHolder* holder = Held(handle, a, &call_id);
    if (holder == nullptr) return Expect(status, "LINEERR_INVALCALLHANDLE", op);
    ModelCall& call = model_.calls.at(call_id);
    if (kind == 2) {
      if (holder->owner && call.state != v1::CALL_STATE_IDLE) {
        return Expect(status, "LINEERR_INVALCALLSTATE", op);
      }
      Expect(status, "OK", op);
      call.holders.erase(handle);
      model_.void_handles.insert(handle);
      model_.FreeIfDone(call_id);
      return;
    }
    if (!holder->owner) return Expect(status, "LINEERR_NOTOWNER", op);
    if (kind == 0) {
      if (call.state == v1::CALL_STATE_IDLE) return Expect(status, "LINEERR_INVALCALLSTATE", op);
      Expect(status, "OK", op);
      model_.SetState(call, v1::CALL_STATE_IDLE);
      return;
    }
    if (call.state != v1::CALL_STATE_OFFERING && call.state != v1::CALL_STATE_ACCEPTED) {
      return Expect(status, "LINEERR_INVALCALLSTATE", op);
    }
    Expect(status, "OK", op);
    model_.SetState(call, v1::CALL_STATE_CONNECTED);
  }

  void ShutDownInModel(int a) {
    std::vector<uint64_t> own;
    for (const auto& [h, line] : model_.lines) {
      if (line.app == a) own.push_back(h);
    }
    for (uint64_t h : own) model_.CloseLine(h);
    model_.apps[a].alive = false;
  }

  // Compares each live app's ListCalls with the model, learning the handle
  // values the core chose for holders the model only knew as pending.
  void Reconcile() {
    for (int a = 0; a < kApps; ++a) {
      ModelApp& app = model_.apps[a];
      if (!app.alive) continue;
      v1::ListCallsRequest request;
      request.set_page_size(2);  // pages, too
      std::vector<v1::CallHandleEntry> listed;
      uint64_t resume = 0;
      for (;;) {
        v1::ListCallsResponse response;
        CHECK_THAT(core_->ListCalls(app.token, request, &response).ok(), "ListCalls");
        if (resume == 0) resume = response.resume_sequence();
        for (const auto& entry : response.calls()) listed.push_back(entry);
        if (response.next_page_token().empty()) break;
        request.set_page_token(response.next_page_token());
      }
      last_activity_[a] = clock_.Now();
      CHECK_THAT(resume == app.events + 1, "app ", a, " has ", resume - 1,
                 " events, the model expects ", app.events);
      // The model's holders of this app, by call id.
      std::map<uint64_t, std::pair<uint64_t, ModelHolder>> expected;
      for (const auto& [id, call] : model_.calls) {
        for (const auto& [h, holder] : call.holders) {
          if (holder.app == a) {
            CHECK_THAT(expected.count(id) == 0, "two handles of one app to one call");
            expected[id] = {h, holder};
          }
        }
      }
      CHECK_THAT(listed.size() == expected.size(), "app ", a, " lists ", listed.size(),
                 " handles, the model expects ", expected.size());
      for (const v1::CallHandleEntry& entry : listed) {
        auto it = expected.find(entry.info().call_id());
        CHECK_THAT(it != expected.end(), "unexpected handle to call ", entry.info().call_id());
        const auto& [model_handle, holder] = it->second;
        const ModelCall& call = model_.calls.at(entry.info().call_id());
        CHECK_THAT(entry.info().line_handle() == holder.line, "line of handle");
        CHECK_THAT((entry.status().call_privilege() == v1::CALL_PRIVILEGE_OWNER) == holder.owner,
                   "privilege of handle");
        CHECK_THAT(entry.status().call_state() == call.state, "state of call ",
                   entry.info().call_id());
        CHECK_THAT(entry.info().line_device_id() == call.device, "device of call");
        if (model_handle >= kPlaceholderBase) {
          // Learn the real handle; it must be new.
          CHECK_THAT(!model_.void_handles.count(entry.call_handle()), "a void handle came back");
          ModelCall& mutable_call = model_.calls.at(entry.info().call_id());
          mutable_call.holders.erase(model_handle);
          mutable_call.holders[entry.call_handle()] = holder;
        } else {
          CHECK_THAT(entry.call_handle() == model_handle, "handle value");
        }
      }
    }
    // Isolation, whatever the model says: each handle an app holds is on a
    // device its tenant may see now, with the right its privilege needs;
    // and no app reaches another's handles.
    for (int a = 0; a < kApps; ++a) {
      if (!model_.apps[a].alive) continue;
      v1::ListCallsResponse listed;
      v1::ListCallsRequest all;
      all.set_page_size(1000);
      CHECK_THAT(core_->ListCalls(model_.apps[a].token, all, &listed).ok(), "ListCalls");
      for (const v1::CallHandleEntry& entry : listed.calls()) {
        const uint8_t rights = RightsOf(a, entry.info().line_device_id());
        const uint8_t needed = entry.status().call_privilege() == v1::CALL_PRIVILEGE_MONITOR ? 4
                               : entry.info().origin() == v1::CALL_ORIGIN_INBOUND            ? 2
                                                                                             : 1;
        CHECK_THAT((rights & needed) != 0, "isolation: app ", a, " (tenant ", model_.apps[a].tenant,
                   ") holds handle ", entry.call_handle(), " on device ",
                   entry.info().line_device_id(), " where its rights are ", int{rights});
      }
      for (const auto& [id, call] : model_.calls) {
        for (const auto& [h, holder] : call.holders) {
          if (holder.app == a || h >= kPlaceholderBase) continue;
          v1::GetCallInfoRequest request;
          request.set_call_handle(h);
          v1::GetCallInfoResponse response;
          const absl::Status status = core_->GetCallInfo(model_.apps[a].token, request, &response);
          CHECK_THAT(TapiErrorName(status) == "LINEERR_INVALCALLHANDLE", "app ", a, " reached app ",
                     holder.app, "'s handle ", h, ": ", status.ToString());
        }
      }
    }
    // Void handles stay void, for everyone.
    for (uint64_t h : model_.void_handles) {
      for (int a = 0; a < kApps; ++a) {
        if (!model_.apps[a].alive) continue;
        v1::GetCallInfoRequest request;
        request.set_call_handle(h);
        v1::GetCallInfoResponse response;
        const absl::Status status = core_->GetCallInfo(model_.apps[a].token, request, &response);
        CHECK_THAT(TapiErrorName(status) == "LINEERR_INVALCALLHANDLE", "void handle ", h,
                   " answered ", status.ToString());
      }
    }
    // Live counts.
    const CoreStats stats = core_->Stats();
    size_t live_apps = 0, handles = 0;
    for (const ModelApp& app : model_.apps) live_apps += app.alive;
    for (const auto& [id, call] : model_.calls) handles += call.holders.size();
    CHECK_THAT(stats.live.apps == live_apps, "apps");
    CHECK_THAT(stats.live.lines == model_.lines.size(), "lines");
    CHECK_THAT(stats.live.calls == model_.calls.size(), "calls: core ", stats.live.calls,
               ", model ", model_.calls.size());
    CHECK_THAT(stats.live.call_handles == handles, "handles");
  }

  static constexpr uint64_t kPlaceholderBase = uint64_t{1} << 62;
  uint64_t next_placeholder_ = 0;
  FakeClock clock_;
#ifdef CALLSESSION_FUZZ_DURABLE
  std::string data_dir_;
  std::unique_ptr<Journal> journal_;
#endif
  std::unique_ptr<CallSessionCore> core_;
  // Counters of the cores before the last restart.
  CoreStats carried_;
  Model model_;
  absl::Time last_activity_[kApps];
  // Tenants on (else open mode), and which of kConfigs is in force.
  const bool tenants_;
  int config_ = 0;
};

}  // namespace
}  // namespace callsession

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const bool quiet = [] {
    callsession::SetLogLevel(callsession::LogLevel::kError);
    return true;
  }();
  (void)quiet;
  callsession::Input input(data, size);
  callsession::Harness harness(/*tenants=*/(input.Byte() & 1) != 0);
  harness.Run(input);
  return 0;
}
