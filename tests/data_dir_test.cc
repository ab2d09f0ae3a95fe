// Bad data directories through the real callsessiond: each is refused at
// start with exit status 1 and a start_failed log line that names the
// directory and says what is wrong; none is ever started over empty.
#include <sys/stat.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "callsession/storage/v1/records.pb.h"
#include "rocksdb/db.h"
#include "server/core/journal_records.h"
#include "tests/daemon.h"
#include "tests/test_support.h"

namespace callsession {
namespace {

namespace fs = std::filesystem;

class DataDirTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = MakeTempDir("callsession-datadir");
    ASSERT_FALSE(dir_.empty());
    data_dir_ = dir_ + "/data";
  }
  void TearDown() override {
    std::error_code ignored;
    fs::permissions(dir_, fs::perms::owner_all, fs::perm_options::add, ignored);
    fs::remove_all(dir_, ignored);
  }

  std::vector<std::string> Flags(const std::string& data_dir) {
    return {"--listen=127.0.0.1:0", "--data_dir=" + data_dir};
  }

  // Runs callsessiond on `data_dir` and expects it to refuse to start,
  // naming the directory and saying `why`.
  void ExpectRefused(const std::string& data_dir, const std::string& why) {
    Daemon daemon(Flags(data_dir), {}, dir_);
    EXPECT_EQ(daemon.Wait(), 1) << daemon.log();
    EXPECT_TRUE(absl::StrContains(daemon.log(), "\"event\":\"start_failed\"")) << daemon.log();
    EXPECT_TRUE(absl::StrContains(daemon.log(), data_dir)) << daemon.log();
    EXPECT_TRUE(absl::StrContains(daemon.log(), why)) << daemon.log();
    EXPECT_FALSE(absl::StrContains(daemon.log(), "\"event\":\"listening\"")) << daemon.log();
  }

  // A store with one app in it, written by the real binary.
  void MakeStore() {
    Daemon daemon(Flags(data_dir_), {}, dir_);
    ASSERT_FALSE(daemon.WaitUntilListening().empty()) << daemon.log();
    ASSERT_EQ(daemon.StopWith(SIGTERM), 0) << daemon.log();
  }

  // Writes one raw record into the (stopped) store.
  void PutRaw(const std::string& key, const std::string& value) {
    rocksdb::DB* raw = nullptr;
    rocksdb::Options options;
    options.create_if_missing = true;
    ASSERT_TRUE(rocksdb::DB::Open(options, data_dir_, &raw).ok());
    std::unique_ptr<rocksdb::DB> db(raw);
    ASSERT_TRUE(db->Put(rocksdb::WriteOptions(), key, value).ok());
    ASSERT_TRUE(db->Close().ok());
  }

  std::string dir_;
  std::string data_dir_;
};

TEST_F(DataDirTest, AMissingDirectoryIsCreatedAndAnEmptyOneUsed) {
  Daemon created(Flags(data_dir_ + "/deeper"), {}, dir_);
  EXPECT_FALSE(created.WaitUntilListening().empty()) << created.log();
  EXPECT_TRUE(absl::StrContains(created.log(), "\"new_store\":true")) << created.log();
  EXPECT_EQ(created.StopWith(SIGTERM), 0);
  fs::create_directories(dir_ + "/empty");
  Daemon empty(Flags(dir_ + "/empty"), {}, dir_);
  EXPECT_FALSE(empty.WaitUntilListening().empty()) << empty.log();
}

TEST_F(DataDirTest, ADirectoryInUseByAnotherProcessIsRefused) {
  Daemon first(Flags(data_dir_), {}, dir_);
  ASSERT_FALSE(first.WaitUntilListening().empty()) << first.log();
  ExpectRefused(data_dir_, "in use by another process");
  // The first one is unaffected.
  EXPECT_EQ(first.StopWith(SIGTERM), 0) << first.log();
}

TEST_F(DataDirTest, AFileIsNotADataDirectory) {
  std::ofstream(data_dir_) << "not a directory";
  ExpectRefused(data_dir_, "is not a directory");
}

TEST_F(DataDirTest, ADirectoryWithOtherFilesIsNeverStartedOver) {
  fs::create_directories(data_dir_);
  std::ofstream(data_dir_ + "/notes.txt") << "somebody else's";
  ExpectRefused(data_dir_, "holds no callsession store");
  EXPECT_TRUE(fs::exists(data_dir_ + "/notes.txt"));
}

TEST_F(DataDirTest, CorruptRocksDbFilesAreRefused) {
  MakeStore();
  // CURRENT names the manifest; point it at garbage.
  std::ofstream(data_dir_ + "/CURRENT", std::ios::trunc) << "MANIFEST-999999\n";
  ExpectRefused(data_dir_, "cannot open the data directory");
}

TEST_F(DataDirTest, ARecordThatDoesNotParseIsRefusedByItsKey) {
  MakeStore();
  PutRaw(CallKey(77), "\xff\xff\xff garbage");
  ExpectRefused(data_dir_, absl::StrCat("record ", KeyForHumans(CallKey(77))));
}

TEST_F(DataDirTest, ARecordThatContradictsAnotherIsRefused) {
  MakeStore();
  storage::v1::LineRecord line;
  line.set_line_handle(5);
  line.set_app_handle(123456);  // no such app
  PutRaw(LineKey(5), line.SerializeAsString());
  ExpectRefused(data_dir_, "its app 123456 does not exist");
}

TEST_F(DataDirTest, AStoreWrittenByANewerFormatIsRefused) {
  MakeStore();
  storage::v1::FormatRecord format;
  format.set_version(kStoreFormatVersion + 1);
  format.set_created_by("callsessiond from the future");
  PutRaw(FormatKey(), format.SerializeAsString());
  ExpectRefused(data_dir_, absl::StrCat("format version ", kStoreFormatVersion + 1));
}

TEST_F(DataDirTest, AStoreWithoutAFormatRecordIsNotCallsessions) {
  // A RocksDB database of something else.
  PutRaw("some-other-program's-key", "value");
  ExpectRefused(data_dir_, "no format record");
}

TEST_F(DataDirTest, AnUnreadableDirectoryIsRefused) {
  if (geteuid() != 0) GTEST_SKIP() << "needs root to run the server as another user";
  MakeStore();
  ASSERT_EQ(chmod(data_dir_.c_str(), 0700), 0);
  // The server runs as nobody, who may not read the root-owned 0700 store.
  const CommandResult result =
      RunCommand(absl::StrCat("setpriv --reuid=65534 --regid=65534 --clear-groups ",
                              CALLSESSIOND_PATH, " --listen=127.0.0.1:0 --data_dir=", data_dir_));
  EXPECT_EQ(result.exit_code, 1) << result.output;
  EXPECT_TRUE(absl::StrContains(result.output, "start_failed")) << result.output;
  EXPECT_TRUE(absl::StrContains(result.output, data_dir_)) << result.output;
}

}  // namespace
}  // namespace callsession
