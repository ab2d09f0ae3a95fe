// The operational behaviour of the real callsessiond binary: health,
// reflection, metrics, structured logs, configuration, TLS and mutual TLS,
// limits, and graceful shutdown under load.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sched.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "client/callsession_client.h"
#include "google/protobuf/descriptor.pb.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "grpc/reflection/v1alpha/reflection.grpc.pb.h"
#include "grpcpp/create_channel.h"
#include "grpcpp/security/credentials.h"
#include "tests/daemon.h"
#include "tests/test_support.h"

namespace callsession {
namespace {

using grpc::health::v1::HealthCheckRequest;
using grpc::health::v1::HealthCheckResponse;

constexpr char kProviderToken[] = "ops-provider-token";

std::vector<std::string> Environment(std::vector<std::string> extra = {}) {
  extra.push_back(absl::StrCat("CALLSESSION_PROVIDER_TOKEN=", kProviderToken));
  return extra;
}

std::shared_ptr<grpc::Channel> Insecure(const std::string& address) {
  return grpc::CreateChannel(address, grpc::InsecureChannelCredentials());
}

HealthCheckResponse::ServingStatus Health(const std::shared_ptr<grpc::Channel>& channel,
                                          const std::string& service) {
  auto stub = grpc::health::v1::Health::NewStub(channel);
  grpc::ClientContext context;
  context.set_deadline(absl::ToChronoTime(absl::Now() + absl::Seconds(5)));
  HealthCheckRequest request;
  request.set_service(service);
  HealthCheckResponse response;
  grpc::Status status = stub->Check(&context, request, &response);
  if (!status.ok()) return HealthCheckResponse::UNKNOWN;
  return response.status();
}

// --- Health ------------------------------------------------------------------

TEST(OpsTest, HealthIsServingThenNotServingFromTheMomentShutdownBegins) {
  Daemon daemon({"--listen=127.0.0.1:0", "--shutdown_grace=2s"}, Environment());
  const std::string address = daemon.WaitUntilListening();
  ASSERT_FALSE(address.empty()) << daemon.log();
  auto channel = Insecure(address);
  EXPECT_EQ(Health(channel, ""), HealthCheckResponse::SERVING);
  EXPECT_EQ(Health(channel, "callsession.v1.CallSessionService"), HealthCheckResponse::SERVING);

  auto stub = grpc::health::v1::Health::NewStub(channel);
  grpc::ClientContext context;
  context.set_deadline(absl::ToChronoTime(absl::Now() + absl::Seconds(10)));
  auto watch = stub->Watch(&context, HealthCheckRequest());
  HealthCheckResponse update;
  ASSERT_TRUE(watch->Read(&update));
  EXPECT_EQ(update.status(), HealthCheckResponse::SERVING);
  kill(daemon.pid(), SIGTERM);
  ASSERT_TRUE(watch->Read(&update)) << "the watch sees the change before the server goes";
  EXPECT_EQ(update.status(), HealthCheckResponse::NOT_SERVING);
  EXPECT_EQ(daemon.Wait(), 0);
}

// --- Reflection ---------------------------------------------------------------

std::vector<std::string> ReflectedServices(const std::string& address, grpc::Status* status) {
  auto stub = grpc::reflection::v1alpha::ServerReflection::NewStub(Insecure(address));
  grpc::ClientContext context;
  context.set_deadline(absl::ToChronoTime(absl::Now() + absl::Seconds(5)));
  auto stream = stub->ServerReflectionInfo(&context);
  grpc::reflection::v1alpha::ServerReflectionRequest request;
  request.set_list_services("");
  stream->Write(request);
  stream->WritesDone();
  std::vector<std::string> names;
  grpc::reflection::v1alpha::ServerReflectionResponse response;
  while (stream->Read(&response)) {
    for (const auto& service : response.list_services_response().service()) {
      names.push_back(service.name());
    }
  }
  *status = stream->Finish();
  return names;
}

// What grpcurl and buf curl ask before calling a method: the file that
// defines a symbol. Returns the serialized FileDescriptorProtos (empty on an
// error, with the reflection service's error message in *error).
std::vector<std::string> FilesContaining(const std::string& address, const std::string& symbol,
                                         std::string* error) {
  auto stub = grpc::reflection::v1alpha::ServerReflection::NewStub(Insecure(address));
  grpc::ClientContext context;
  context.set_deadline(absl::ToChronoTime(absl::Now() + absl::Seconds(5)));
  auto stream = stub->ServerReflectionInfo(&context);
  grpc::reflection::v1alpha::ServerReflectionRequest request;
  request.set_file_containing_symbol(symbol);
  stream->Write(request);
  stream->WritesDone();
  std::vector<std::string> files;
  grpc::reflection::v1alpha::ServerReflectionResponse response;
  while (stream->Read(&response)) {
    if (response.has_error_response()) *error = response.error_response().error_message();
    for (const std::string& file : response.file_descriptor_response().file_descriptor_proto()) {
      files.push_back(file);
    }
  }
  (void)stream->Finish();
  return files;
}

TEST(OpsTest, ReflectionDescribesEveryServiceItListsHealthIncluded) {
  Daemon daemon({"--listen=127.0.0.1:0"}, Environment());
  const std::string address = daemon.WaitUntilListening();
  ASSERT_FALSE(address.empty()) << daemon.log();
  grpc::Status status;
  for (const std::string& service : ReflectedServices(address, &status)) {
    std::string error;
    const std::vector<std::string> files = FilesContaining(address, service, &error);
    ASSERT_FALSE(files.empty()) << service << " cannot be described: " << error;
    bool found = false;
    for (const std::string& bytes : files) {
      google::protobuf::FileDescriptorProto file;
      ASSERT_TRUE(file.ParseFromString(bytes));
      for (const auto& described : file.service()) {
        found |= absl::StrCat(file.package(), ".", described.name()) == service;
      }
    }
    EXPECT_TRUE(found) << service << " is not in the files reflection returned";
  }
  // grpc.health.v1.Health/Check, as grpcurl resolves it.
  std::string error;
  const std::vector<std::string> health = FilesContaining(address, "grpc.health.v1.Health", &error);
  ASSERT_FALSE(health.empty()) << error;
  google::protobuf::FileDescriptorProto file;
  ASSERT_TRUE(file.ParseFromString(health.front()));
  ASSERT_EQ(file.service_size(), 1);
  EXPECT_EQ(file.service(0).method(0).name(), "Check");
}

TEST(OpsTest, ReflectionListsTheServicesAndCanBeTurnedOff) {
  {
    Daemon daemon({"--listen=127.0.0.1:0"}, Environment());
    const std::string address = daemon.WaitUntilListening();
    grpc::Status status;
    std::vector<std::string> names = ReflectedServices(address, &status);
    EXPECT_TRUE(status.ok()) << status.error_message();
    EXPECT_THAT(names, ::testing::IsSupersetOf({"callsession.v1.CallSessionService",
                                                "callsession.v1.ProviderService",
                                                "grpc.health.v1.Health"}));
    EXPECT_EQ(daemon.StopWith(SIGTERM), 0);
  }
  {
    Daemon daemon({"--listen=127.0.0.1:0", "--reflection=false"}, Environment());
    const std::string address = daemon.WaitUntilListening();
    grpc::Status status;
    ReflectedServices(address, &status);
    EXPECT_EQ(status.error_code(), grpc::StatusCode::UNIMPLEMENTED);
  }
}

// --- Metrics --------------------------------------------------------------------

TEST(OpsTest, MetricsFollowAScriptedLifecycle) {
  Daemon daemon({"--listen=127.0.0.1:0", "--metrics_listen=127.0.0.1:0"}, Environment());
  const std::string address = daemon.WaitUntilListening();
  int metrics_port = 0;
  ASSERT_TRUE(absl::SimpleAtoi(daemon.Field("metrics_port"), &metrics_port)) << daemon.log();
  ASSERT_GT(metrics_port, 0);
  auto scrape = [&] { return HttpGet(metrics_port, "/metrics"); };
  const std::map<std::string, std::string> make_call = {
      {"grpc_service", "callsession.v1.CallSessionService"}, {"grpc_method", "MakeCall"}};
  auto with = [](std::map<std::string, std::string> labels, const char* key, const char* value) {
    labels[key] = value;
    return labels;
  };

  std::string text = scrape();
  EXPECT_EQ(MetricValue(text, "callsession_live_apps"), 0);
  EXPECT_EQ(MetricValue(text, "grpc_server_started_total", make_call), 0)
      << "series exist before the first call";

  auto channel = Insecure(address);
  CallSessionClient app(channel);
  ProviderClient provider(channel, kProviderToken);
  ASSERT_THAT(app.Initialize("metrics"), IsOk());
  absl::StatusOr<uint64_t> line = app.LineOpen(0, {v1::CALL_PRIVILEGE_OWNER});
  ASSERT_THAT(line, IsOk());
  absl::StatusOr<v1::MakeCallResponse> call = app.MakeCall(*line, "+15550100");
  ASSERT_THAT(call, IsOk());
  auto events = app.WatchEvents();
  ASSERT_THAT(events->Next(absl::Seconds(5)), IsOk());  // the stream is open
  EXPECT_FALSE(app.GetCallInfo(0).ok());

  text = scrape();
  EXPECT_EQ(MetricValue(text, "callsession_live_apps"), 1);
  EXPECT_EQ(MetricValue(text, "callsession_live_lines"), 1);
  EXPECT_EQ(MetricValue(text, "callsession_live_calls"), 1);
  EXPECT_EQ(MetricValue(text, "callsession_live_call_handles"), 1);
  EXPECT_EQ(MetricValue(text, "callsession_live_event_subscribers"), 1);
  EXPECT_EQ(MetricValue(text, "callsession_calls_created_total"), 1);
  EXPECT_EQ(MetricValue(text, "grpc_server_started_total", with(make_call, "grpc_type", "unary")),
            1);
  EXPECT_EQ(MetricValue(text, "grpc_server_handled_total", with(make_call, "grpc_code", "OK")), 1);
  EXPECT_EQ(MetricValue(text, "grpc_server_handling_seconds_count", make_call), 1);
  EXPECT_EQ(MetricValue(text, "grpc_server_handled_total",
                        {{"grpc_method", "GetCallInfo"}, {"grpc_code", "NotFound"}}),
            1);

  ASSERT_THAT(app.Drop(call->call_handle()), IsOk());
  ASSERT_THAT(app.DeallocateCall(call->call_handle()), IsOk());
  ASSERT_THAT(app.MakeCall(*line, "+15550101"), IsOk());
  ASSERT_THAT(provider.ForceLineClose(0), IsOk());
  text = scrape();
  EXPECT_EQ(MetricValue(text, "callsession_calls_created_total"), 2);
  EXPECT_EQ(MetricValue(text, "callsession_calls_freed_total"), 2);
  EXPECT_EQ(MetricValue(text, "callsession_call_handles_deallocated_total"), 1);
  EXPECT_EQ(MetricValue(text, "callsession_calls_dropped_by_line_close_total"), 1);
  EXPECT_EQ(MetricValue(text, "callsession_forced_line_closes_total"), 1);
  EXPECT_EQ(MetricValue(text, "callsession_live_lines"), 0);
  EXPECT_EQ(MetricValue(text, "callsession_live_calls"), 0);
  EXPECT_EQ(MetricValue(text, "grpc_server_handled_total",
                        {{"grpc_service", "callsession.v1.ProviderService"},
                         {"grpc_method", "ForceLineClose"},
                         {"grpc_code", "OK"}}),
            1);
  EXPECT_EQ(daemon.StopWith(SIGTERM), 0) << daemon.log();
}

// --- Logs -------------------------------------------------------------------------

TEST(OpsTest, LogsAreOneJsonObjectPerLineAndNeverHoldATokenAtAnyLevel) {
  Daemon daemon({"--listen=127.0.0.1:0", "--log_level=debug"}, Environment());
  const std::string address = daemon.WaitUntilListening();
  auto channel = Insecure(address);
  CallSessionClient app(channel);
  absl::StatusOr<v1::InitializeResponse> init = app.Initialize("logged\"app");
  ASSERT_THAT(init, IsOk());
  absl::StatusOr<uint64_t> line = app.LineOpen(1);
  ASSERT_THAT(line, IsOk());
  ASSERT_THAT(ProviderClient(channel, kProviderToken).ForceLineClose(1), IsOk());
  ASSERT_THAT(app.Shutdown(), IsOk());
  ASSERT_EQ(daemon.StopWith(SIGTERM), 0);

  const std::string& log = daemon.log();
  EXPECT_FALSE(absl::StrContains(log, init->app_token())) << "an app token leaked";
  EXPECT_FALSE(absl::StrContains(log, kProviderToken)) << "the provider token leaked";
  for (absl::string_view entry : absl::StrSplit(log, '\n', absl::SkipEmpty())) {
    EXPECT_TRUE(absl::StartsWith(entry, "{\"time\":\"") && absl::EndsWith(entry, "}") &&
                absl::StrContains(entry, "\"level\":\"") &&
                absl::StrContains(entry, "\"event\":\""))
        << entry;
  }
  for (const char* event : {"\"listening\"", "\"app_initialized\"", "\"line_opened\"",
                            "\"forced_line_close\"", "\"app_shut_down\"", "\"stopped\""}) {
    EXPECT_TRUE(absl::StrContains(log, event)) << event << " missing from\n" << log;
  }
  EXPECT_TRUE(absl::StrContains(log, "\"app_name\":\"logged\\\"app\"")) << "escaped JSON";
  EXPECT_TRUE(absl::StrContains(log, absl::StrCat("\"line_handle\":", *line)));
}

// Threads of process `pid` whose name starts with `prefix`.
int ThreadsNamed(pid_t pid, const std::string& prefix) {
  int count = 0;
  for (const auto& task :
       std::filesystem::directory_iterator(absl::StrCat("/proc/", pid, "/task"))) {
    std::ifstream comm(task.path() / "comm");
    std::string name;
    std::getline(comm, name);
    if (absl::StartsWith(name, prefix)) ++count;
  }
  return count;
}

TEST(OpsTest, ServingThreadsAreOnePerCpuOrAsManyAsAsked) {
  cpu_set_t cpus;
  ASSERT_EQ(sched_getaffinity(0, sizeof(cpus), &cpus), 0);
  for (int asked : {0, 3}) {
    Daemon daemon({"--listen=127.0.0.1:0", absl::StrCat("--serving_threads=", asked)},
                  Environment());
    const std::string address = daemon.WaitUntilListening();
    ASSERT_FALSE(address.empty()) << daemon.log();
    CallSessionClient app(Insecure(address));
    ASSERT_THAT(app.Initialize("threads"), IsOk());  // served by them
    EXPECT_EQ(ThreadsNamed(daemon.pid(), "serving-"), asked > 0 ? asked : CPU_COUNT(&cpus))
        << "--serving_threads=" << asked;
  }
}

TEST(OpsTest, LogLevelFiltersLines) {
  const std::string address = absl::StrCat("127.0.0.1:", FreePort());
  Daemon daemon({"--listen=" + address, "--log_level=warning"}, Environment());
  auto channel = Insecure(address);
  ASSERT_TRUE(channel->WaitForConnected(absl::ToChronoTime(absl::Now() + absl::Seconds(10))));
  ASSERT_EQ(Health(channel, ""), HealthCheckResponse::SERVING);
  ASSERT_THAT(CallSessionClient(channel).Initialize("quiet"), IsOk());  // audited
  EXPECT_EQ(daemon.StopWith(SIGTERM), 0);
  // Info lines are filtered, but for audit lines, which are always written.
  int audit_lines = 0;
  for (absl::string_view line : absl::StrSplit(daemon.log(), '\n')) {
    if (!absl::StrContains(line, "\"level\":\"info\"")) continue;
    EXPECT_TRUE(absl::StrContains(line, "\"audit\":true")) << line;
    audit_lines += absl::StrContains(line, "\"event\":\"app_initialized\"");
  }
  EXPECT_EQ(audit_lines, 1) << daemon.log();
}

TEST(OpsTest, AWildcardIpv6AddressServesIpv4AndIpv6Alike) {
  // What the image uses ([::]): dual-stack clusters reach it either way.
  Daemon daemon({"--listen=[::]:0", "--metrics_listen=[::]:0"}, Environment());
  const std::string address = daemon.WaitUntilListening();
  ASSERT_FALSE(address.empty()) << daemon.log();
  const std::string port = address.substr(address.rfind(':') + 1);
  const int metrics_port = std::stoi(daemon.Field("metrics_port"));
  for (const char* host : {"127.0.0.1", "[::1]"}) {
    CallSessionClient app(Insecure(absl::StrCat(host, ":", port)));
    EXPECT_THAT(app.Initialize("dual-stack"), IsOk()) << host;
  }
  for (const std::string& url : {absl::StrCat("http://127.0.0.1:", metrics_port, "/metrics"),
                                 absl::StrCat("http://[::1]:", metrics_port, "/metrics")}) {
    const CommandResult curl = RunCommand(absl::StrCat("curl -sf ", url));
    EXPECT_EQ(curl.exit_code, 0) << url << ": " << curl.output;
    EXPECT_TRUE(absl::StrContains(curl.output, "callsession_live_apps")) << url;
  }
}

// --- Configuration -------------------------------------------------------------------

TEST(OpsTest, EveryFlagCanComeFromTheEnvironmentAndTheCommandLineWins) {
  Daemon daemon({}, Environment({"CALLSESSION_LISTEN=127.0.0.1:0", "CALLSESSION_DEVICES=3",
                                 "CALLSESSION_SHARDS=8"}));
  const std::string address = daemon.WaitUntilListening();
  ASSERT_FALSE(address.empty()) << daemon.log();
  EXPECT_EQ(daemon.Field("devices"), "3");
  EXPECT_EQ(daemon.Field("shards"), "8");
  CallSessionClient app(Insecure(address));
  absl::StatusOr<v1::InitializeResponse> init = app.Initialize("env");
  ASSERT_THAT(init, IsOk());
  EXPECT_EQ(init->num_devices(), 3u);
  daemon.StopWith(SIGTERM);

  Daemon overridden({"--devices=5"},
                    Environment({"CALLSESSION_LISTEN=127.0.0.1:0", "CALLSESSION_DEVICES=3"}));
  ASSERT_FALSE(overridden.WaitUntilListening().empty()) << overridden.log();
  EXPECT_EQ(overridden.Field("devices"), "5");
}

TEST(OpsTest, TheStoreIsChosenByFlagOrEnvironment) {
  // The default: durable, in callsession-data/ under the working directory.
  Daemon durable({"--listen=127.0.0.1:0"}, Environment());
  ASSERT_FALSE(durable.WaitUntilListening().empty()) << durable.log();
  EXPECT_EQ(durable.Field("store"), "rocksdb");
  EXPECT_EQ(durable.Field("data_dir"), "callsession-data");
  EXPECT_EQ(durable.Field("sync"), "true");
  EXPECT_TRUE(std::filesystem::exists(durable.working_dir() + "/callsession-data/CURRENT"));
  EXPECT_EQ(durable.StopWith(SIGTERM), 0);

  Daemon from_env({}, Environment({"CALLSESSION_LISTEN=127.0.0.1:0",
                                   "CALLSESSION_DATA_DIR=elsewhere", "CALLSESSION_SYNC=false"}));
  ASSERT_FALSE(from_env.WaitUntilListening().empty()) << from_env.log();
  EXPECT_EQ(from_env.Field("data_dir"), "elsewhere");
  EXPECT_EQ(from_env.Field("sync"), "false");
  EXPECT_TRUE(std::filesystem::exists(from_env.working_dir() + "/elsewhere/CURRENT"));
  EXPECT_EQ(from_env.StopWith(SIGTERM), 0);

  Daemon memory({}, Environment({"CALLSESSION_LISTEN=127.0.0.1:0", "CALLSESSION_STORE=memory"}));
  ASSERT_FALSE(memory.WaitUntilListening().empty()) << memory.log();
  EXPECT_EQ(memory.Field("store"), "memory");
  EXPECT_FALSE(std::filesystem::exists(memory.working_dir() + "/callsession-data"));
}

TEST(OpsTest, InvalidValuesRefuseToStartWithAClearMessage) {
  struct Case {
    std::vector<std::string> flags;
    std::vector<std::string> env;
    const char* message;
  };
  const std::vector<Case> cases = {
      {{}, {"CALLSESSION_DEVICES=many"}, "CALLSESSION_DEVICES"},
      {{"--shards=12"}, {}, "shards must be a power of two"},
      {{"--log_level=chatty"}, {}, "log level must be"},
      {{"--listen=nowhere"}, {}, "HOST:PORT"},
      {{"--tls_cert=/nonexistent.pem", "--tls_key=/nonexistent.key"}, {}, "cannot read"},
      {{"--tls_client_ca=/x.pem"}, {}, "needs a TLS certificate"},
      {{"--keepalive_time=0s"}, {}, "keepalive_time must be positive"},
      {{"--max_receive_message_bytes=10"}, {}, "max_receive_message_bytes"},
      {{"--store=redis"}, {}, "--store must be rocksdb, etcd or memory"},
      {{}, {"CALLSESSION_SYNC=maybe"}, "CALLSESSION_SYNC"},
      {{"--serving_threads=-1"}, {}, "serving_threads must be >= 0"},
  };
  for (const Case& c : cases) {
    std::vector<std::string> flags = c.flags;
    flags.push_back("--metrics_listen=");
    if (!absl::StrContains(absl::StrJoin(c.flags, " "), "--listen")) {
      flags.push_back("--listen=127.0.0.1:0");
    }
    Daemon daemon(flags, Environment(c.env));
    EXPECT_EQ(daemon.Wait(), 1) << c.message;
    EXPECT_TRUE(absl::StrContains(daemon.log(), c.message)) << daemon.log();
  }
}

TEST(OpsTest, HelpDocumentsEveryFlagAndTheEnvironment) {
  CommandResult help = RunCommand(absl::StrCat(CALLSESSIOND_PATH, " --help"));
  for (const char* flag : {"--listen",
                           "--devices",
                           "--shards",
                           "--metrics_listen",
                           "--reflection",
                           "--log_level",
                           "--shutdown_grace",
                           "--tls_cert",
                           "--tls_key",
                           "--tls_client_ca",
                           "--max_receive_message_bytes",
                           "--max_concurrent_streams",
                           "--keepalive_time",
                           "--max_connection_age",
                           "--mutex_deadlock_detection",
                           "--store",
                           "--data_dir",
                           "--sync",
                           "CALLSESSION_<FLAG>",
                           "CALLSESSION_PROVIDER_TOKEN",
                           "CALLSESSION_ADMIN_TOKEN"}) {
    EXPECT_TRUE(absl::StrContains(help.output, flag)) << flag;
  }
}

// --- TLS ------------------------------------------------------------------------------

class TlsTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new std::string(absl::StrCat(::testing::TempDir(), "/callsession-tls-", getpid()));
    const std::string script = absl::StrCat(
        "set -e; mkdir -p ", *dir_, "; cd ", *dir_, "; ",
        "key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out \\$1; }; ",
        "key ca.key; openssl req -x509 -new -key ca.key -subj /CN=test-ca -days 1 -out ca.pem; ",
        "key server.key; openssl req -new -key server.key -subj /CN=localhost -out server.csr; ",
        "printf 'subjectAltName=DNS:localhost,IP:127.0.0.1' > san.ext; ",
        "openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 1 ",
        "-extfile san.ext -out server.pem; ",
        "key client.key; openssl req -new -key client.key -subj /CN=client -out client.csr; ",
        "openssl x509 -req -in client.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 1 ",
        "-out client.pem");
    CommandResult made = RunCommand(absl::StrCat("bash -c \"", script, "\""));
    ASSERT_EQ(made.exit_code, 0) << made.output;
  }

  static std::string File(const std::string& name) {
    std::ifstream in(absl::StrCat(*dir_, "/", name));
    std::stringstream contents;
    contents << in.rdbuf();
    return contents.str();
  }
  static std::string Path(const std::string& name) { return absl::StrCat(*dir_, "/", name); }

  static std::shared_ptr<grpc::Channel> TlsChannel(const std::string& address, bool client_cert) {
    grpc::SslCredentialsOptions options;
    options.pem_root_certs = File("ca.pem");
    if (client_cert) {
      options.pem_private_key = File("client.key");
      options.pem_cert_chain = File("client.pem");
    }
    grpc::ChannelArguments args;
    args.SetSslTargetNameOverride("localhost");
    return grpc::CreateCustomChannel(address, grpc::SslCredentials(options), args);
  }

  static absl::Status Ping(std::shared_ptr<grpc::Channel> channel) {
    ClientOptions options;
    options.deadline = absl::Seconds(3);
    return CallSessionClient(std::move(channel), options).Initialize("tls").status();
  }

  static std::string* dir_;
};
std::string* TlsTest::dir_ = nullptr;

TEST_F(TlsTest, TlsServesTlsClientsOnly) {
  Daemon daemon({"--listen=127.0.0.1:0", "--tls_cert=" + Path("server.pem"),
                 "--tls_key=" + Path("server.key")},
                Environment());
  const std::string address = daemon.WaitUntilListening();
  ASSERT_FALSE(address.empty()) << daemon.log();
  EXPECT_EQ(daemon.Field("tls"), "true");
  EXPECT_THAT(Ping(TlsChannel(address, false)), IsOk());
  EXPECT_FALSE(Ping(Insecure(address)).ok()) << "plaintext is refused";
}

TEST_F(TlsTest, MutualTlsNeedsAClientCertificateSignedByTheCa) {
  Daemon daemon({"--listen=127.0.0.1:0", "--tls_cert=" + Path("server.pem"),
                 "--tls_key=" + Path("server.key"), "--tls_client_ca=" + Path("ca.pem")},
                Environment());
  const std::string address = daemon.WaitUntilListening();
  ASSERT_FALSE(address.empty()) << daemon.log();
  EXPECT_EQ(daemon.Field("mutual_tls"), "true");
  EXPECT_THAT(Ping(TlsChannel(address, true)), IsOk());
  EXPECT_FALSE(Ping(TlsChannel(address, false)).ok()) << "no client certificate";

  // callctl speaks mutual TLS too.
  const std::string callctl =
      absl::StrCat(CALLCTL_PATH, " --server=", address,
                   " --tls_server_name=localhost --tls_ca=", Path("ca.pem"));
  CommandResult with_cert = RunCommand(absl::StrCat(callctl, " --tls_cert=", Path("client.pem"),
                                                    " --tls_key=", Path("client.key"), " init"));
  EXPECT_EQ(with_cert.exit_code, 0) << with_cert.output;
  EXPECT_TRUE(absl::StrContains(with_cert.output, "app_token")) << with_cert.output;
  CommandResult without_cert = RunCommand(absl::StrCat(callctl, " --deadline=3s init"));
  EXPECT_EQ(without_cert.exit_code, 1) << without_cert.output;
}

// --- Limits ------------------------------------------------------------------------------

TEST(OpsTest, ConcurrentStreamsPerConnectionAreLimited) {
  Daemon daemon({"--listen=127.0.0.1:0", "--max_concurrent_streams=1"}, Environment());
  const std::string address = daemon.WaitUntilListening();
  auto channel = Insecure(address);
  CallSessionClient app(channel);
  ASSERT_THAT(app.Initialize("streams"), IsOk());
  auto events = app.WatchEvents();  // holds the connection's only stream
  EXPECT_TRUE(absl::IsDeadlineExceeded(events->Next(absl::Milliseconds(300)).status()));
  ClientOptions quick;
  quick.deadline = absl::Milliseconds(500);
  CallSessionClient same_connection(channel, quick);
  same_connection.set_token(app.token());
  EXPECT_TRUE(absl::IsDeadlineExceeded(same_connection.LineOpen(0).status()))
      << "queued behind the open stream";
  CallSessionClient other_connection(
      grpc::CreateCustomChannel(address, grpc::InsecureChannelCredentials(), [] {
        grpc::ChannelArguments args;
        args.SetInt("grpc.use_local_subchannel_pool", 1);
        return args;
      }()));
  other_connection.set_token(app.token());
  EXPECT_THAT(other_connection.LineOpen(0), IsOk());
}

TEST(OpsTest, MessageSizeLimitIsAFlag) {
  Daemon daemon({"--listen=127.0.0.1:0", "--max_receive_message_bytes=2048"}, Environment());
  CallSessionClient app(Insecure(daemon.WaitUntilListening()));
  ASSERT_THAT(app.Initialize("size"), IsOk());
  absl::StatusOr<uint64_t> line = app.LineOpen(0);
  ASSERT_THAT(line, IsOk());
  EXPECT_EQ(app.MakeCall(*line, std::string(4096, '1')).status().code(),
            absl::StatusCode::kResourceExhausted);
}

// --- Graceful shutdown -----------------------------------------------------------------

// A client that opened an HTTP/2 connection and then stopped reading (a C++
// client with no call in flight reads only every 5 s; a stuck one never):
// it never answers the GOAWAY's ping, which held the shutdown for gRPC's
// 20 s ping timeout.
TEST(OpsTest, AConnectionWhoseClientStoppedReadingDoesNotHoldTheShutdown) {
  Daemon daemon({"--listen=127.0.0.1:0", "--shutdown_grace=60s"}, Environment());
  const std::string address = daemon.WaitUntilListening();
  ASSERT_FALSE(address.empty()) << daemon.log();
  int port = 0;
  ASSERT_TRUE(absl::SimpleAtoi(address.substr(address.rfind(':') + 1), &port)) << address;
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  ASSERT_GE(fd, 0);
  sockaddr_in server{};
  server.sin_family = AF_INET;
  server.sin_port = htons(port);
  server.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ASSERT_EQ(connect(fd, reinterpret_cast<sockaddr*>(&server), sizeof(server)), 0);
  // The client preface and an empty SETTINGS frame.
  const std::string preface =
      std::string("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n") + std::string("\0\0\0\x04\0\0\0\0\0", 9);
  ASSERT_EQ(write(fd, preface.data(), preface.size()), static_cast<ssize_t>(preface.size()));
  char frame_header[9];
  ASSERT_EQ(read(fd, frame_header, sizeof(frame_header)), 9) << "no SETTINGS from the server";
  EXPECT_EQ(frame_header[3], 0x04) << "the server's first frame is its SETTINGS";

  const absl::Time signalled = absl::Now();
  EXPECT_EQ(daemon.StopWith(SIGTERM), 0);
  EXPECT_LT(absl::Now() - signalled, absl::Seconds(10))
      << "the shutdown waited for a client that does not read";
  close(fd);
}

// An RPC the server has accepted (its handler ran) must finish. The client
// alone cannot tell those from RPCs refused because shutdown had begun (they
// come back UNAVAILABLE, or CANCELLED when gRPC drops a call it had read but
// not yet handed to the server), so the server's own count, logged when it
// stops, is compared with what the clients saw.
TEST(OpsTest, SigtermUnderLoadFailsNoAcceptedRpcAndEndsStreamsCleanly) {
  Daemon daemon({"--listen=127.0.0.1:0", "--shutdown_grace=5s", "--metrics_listen=127.0.0.1:0"},
                Environment());
  const std::string address = daemon.WaitUntilListening();
  ASSERT_FALSE(address.empty());
  auto channel = Insecure(address);
  std::atomic<uint64_t> ok{0};
  CallSessionClient watcher(channel);
  ASSERT_THAT(watcher.Initialize("watcher"), IsOk());
  ++ok;
  auto events = watcher.WatchEvents();

  constexpr int kWorkers = 4;
  std::atomic<bool> stop{false};
  std::atomic<int> refused{0};
  std::vector<std::string> unexpected[kWorkers];
  std::vector<std::thread> workers;
  for (int w = 0; w < kWorkers; ++w) {
    workers.emplace_back([&, w] {
      CallSessionClient app(channel);
      auto record = [&](const absl::Status& status) {
        if (status.ok()) {
          ++ok;
        } else if (absl::IsUnavailable(status) || absl::IsCancelled(status)) {
          ++refused;
        } else {
          unexpected[w].push_back(status.ToString());
        }
        return status.ok();
      };
      if (!record(app.Initialize("load").status())) return;
      absl::StatusOr<uint64_t> line = app.LineOpen(0);
      if (!record(line.status())) return;
      while (!stop.load()) {
        absl::StatusOr<v1::MakeCallResponse> call = app.MakeCall(*line, "+1555");
        if (!record(call.status())) continue;
        if (!record(app.GetCallInfo(call->call_handle()).status())) continue;
        if (!record(app.Drop(call->call_handle()))) continue;
        record(app.DeallocateCall(call->call_handle()));
      }
    });
  }
  while (ok.load() < 2000) absl::SleepFor(absl::Milliseconds(5));
  kill(daemon.pid(), SIGTERM);
  const int exit_code = daemon.Wait();
  stop = true;
  for (std::thread& worker : workers) worker.join();

  EXPECT_EQ(exit_code, 0);
  for (const auto& list : unexpected) EXPECT_THAT(list, ::testing::IsEmpty());
  // Server side: every accepted unary RPC succeeded; the one failure is the
  // event stream, ended with UNAVAILABLE by the shutdown.
  const std::string& log = daemon.log();
  const size_t stopped = log.find("\"event\":\"stopped\"");
  ASSERT_NE(stopped, std::string::npos) << log;
  auto field = [&](const std::string& name) {
    const std::string key = absl::StrCat("\"", name, "\":");
    const size_t at = log.find(key, stopped);
    uint64_t value = 0;
    if (at == std::string::npos ||
        !absl::SimpleAtoi(
            log.substr(at + key.size(), log.find_first_of(",}", at) - at - key.size()), &value)) {
      ADD_FAILURE() << "no " << name << " in the stopped line";
    }
    return value;
  };
  EXPECT_EQ(field("rpcs_ok"), ok.load()) << "every RPC the server finished OK reached its client";
  EXPECT_EQ(field("rpcs_failed"), 1u) << log.substr(stopped);
  EXPECT_EQ(field("rpcs_started"), ok.load() + 1) << "accepted = succeeded + the stream";
  EXPECT_GT(ok.load(), 2000u);
  absl::Status end;
  while (end.ok()) end = events->Next(absl::Seconds(5)).status();
  EXPECT_TRUE(absl::IsUnavailable(end)) << end;
  EXPECT_TRUE(absl::StrContains(end.message(), "shutting down")) << end;
}

}  // namespace
}  // namespace callsession
