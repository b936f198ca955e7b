#include "core/safetensors.h"

#include <stdlib.h>
#include <unistd.h>

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <map>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/testing/temp_dir.h"

namespace moelora {
namespace {

using ::testing::ElementsAre;
using ::testing::ElementsAreArray;
using ::testing::HasSubstr;
using ::testing::StartsWith;

// Debian's gtest matchers do not take absl::string_view.
std::string Message(const absl::Status& status) { return std::string(status.message()); }

std::string LittleEndian64(uint64_t value) {
  std::string bytes(8, '\0');
  for (int i = 0; i < 8; ++i) bytes[i] = static_cast<char>((value >> (8 * i)) & 0xff);
  return bytes;
}

std::string ReadAll(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream contents;
  contents << in.rdbuf();
  return contents.str();
}

void WriteAll(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  ASSERT_TRUE(out.good()) << path;
}

// Each test gets its own directory: ctest may run the tests of this binary in parallel.
class SafetensorsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string dir_template = testing::TempDir() + "/safetensors_test.XXXXXX";
    ASSERT_NE(mkdtemp(dir_template.data()), nullptr);
    dir_ = dir_template;
    path_ = dir_ + "/model.safetensors";
  }
  void TearDown() override { testing_support::RemoveTree(dir_); }

  // Writes `header` (unpadded, its own length) and `data_size` bytes of data, then opens it.
  absl::Status OpenRaw(const std::string& header, size_t data_size) {
    WriteAll(path_, LittleEndian64(header.size()) + header + std::string(data_size, '\x5a'));
    return SafetensorsFile::Open(path_).status();
  }

  std::string dir_;
  std::string path_;
};

struct DTypeCase {
  DType dtype;
  std::string_view name;
  size_t size;
};

constexpr DTypeCase kAllDTypes[] = {
    {DType::kBool, "BOOL", 1}, {DType::kU8, "U8", 1},          {DType::kI8, "I8", 1},
    {DType::kI16, "I16", 2},   {DType::kU16, "U16", 2},        {DType::kI32, "I32", 4},
    {DType::kU32, "U32", 4},   {DType::kI64, "I64", 8},        {DType::kU64, "U64", 8},
    {DType::kF16, "F16", 2},   {DType::kBF16, "BF16", 2},      {DType::kF32, "F32", 4},
    {DType::kF64, "F64", 8},   {DType::kF8E4M3, "F8_E4M3", 1}, {DType::kF8E5M2, "F8_E5M2", 1},
};

TEST(DTypeTest, NamesAndSizesRoundTrip) {
  for (const DTypeCase& c : kAllDTypes) {
    SCOPED_TRACE(c.name);
    absl::StatusOr<DType> parsed = ParseDType(c.name);
    ASSERT_TRUE(parsed.ok()) << parsed.status();
    EXPECT_EQ(*parsed, c.dtype);
    EXPECT_EQ(DTypeName(c.dtype), c.name);
    EXPECT_EQ(DTypeSize(c.dtype), c.size);
  }
}

TEST(DTypeTest, UnknownNameIsInvalidArgument) {
  for (std::string_view name : {"F33", "f32", "", "float32", "F8_E4M3FN"}) {
    absl::StatusOr<DType> parsed = ParseDType(name);
    EXPECT_EQ(parsed.status().code(), absl::StatusCode::kInvalidArgument) << name;
    EXPECT_THAT(Message(parsed.status()), HasSubstr("unknown dtype"));
  }
}

TEST(SafetensorsEntryTest, NumElements) {
  SafetensorsEntry entry;
  EXPECT_EQ(entry.NumElements(), 1);  // A scalar.
  entry.shape = {4, 8};
  EXPECT_EQ(entry.NumElements(), 32);
  entry.shape = {0, 3};
  EXPECT_EQ(entry.NumElements(), 0);
}

TEST_F(SafetensorsTest, RoundTripsEveryDTypeAndShape) {
  const std::vector<std::vector<int64_t>> shapes = {{}, {0, 3}, {5}, {2, 3}, {2, 1, 3}};
  std::mt19937 rng(7);
  std::vector<std::vector<uint8_t>> payloads;
  std::vector<SafetensorsTensorView> views;
  // Reserve so the spans taken below stay valid as payloads grow.
  payloads.reserve(std::size(kAllDTypes) * shapes.size());
  for (const DTypeCase& c : kAllDTypes) {
    for (size_t s = 0; s < shapes.size(); ++s) {
      int64_t numel = 1;
      for (int64_t dim : shapes[s]) numel *= dim;
      std::vector<uint8_t> bytes(static_cast<size_t>(numel) * c.size);
      for (uint8_t& byte : bytes) byte = c.dtype == DType::kBool ? rng() % 2 : rng() % 256;
      payloads.push_back(std::move(bytes));
      views.push_back({.name = std::string(c.name) + ".shape" + std::to_string(s),
                       .dtype = c.dtype,
                       .shape = shapes[s],
                       .bytes = payloads.back()});
    }
  }
  ASSERT_TRUE(WriteSafetensors(path_, views).ok());

  absl::StatusOr<std::unique_ptr<SafetensorsFile>> file = SafetensorsFile::Open(path_);
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_EQ((*file)->path(), path_);
  EXPECT_TRUE((*file)->metadata().empty());
  ASSERT_EQ((*file)->entries().size(), views.size());
  for (size_t i = 0; i < views.size(); ++i) {
    SCOPED_TRACE(views[i].name);
    // Laid out in the given order, so entries sorted by offset come back in that order.
    const SafetensorsEntry& entry = (*file)->entries()[i];
    EXPECT_EQ(entry.name, views[i].name);
    EXPECT_EQ(entry.dtype, views[i].dtype);
    EXPECT_EQ(entry.shape, views[i].shape);
    EXPECT_EQ(entry.end - entry.begin, views[i].bytes.size());
    EXPECT_EQ((*file)->Find(views[i].name), &entry);
    absl::Span<const uint8_t> bytes = (*file)->Bytes(entry);
    EXPECT_THAT(std::vector<uint8_t>(bytes.begin(), bytes.end()), ElementsAreArray(payloads[i]));
  }
  EXPECT_EQ((*file)->Find("missing"), nullptr);
}

TEST_F(SafetensorsTest, HeaderIsPaddedToEightBytesAndKeepsOrder) {
  const std::vector<uint8_t> a(3, 1), b(2 * 4, 2);
  ASSERT_TRUE(WriteSafetensors(path_,
                               {{.name = "z", .dtype = DType::kU8, .shape = {3}, .bytes = a},
                                {.name = "a", .dtype = DType::kF32, .shape = {2}, .bytes = b}},
                               {{"format", "pt"}})
                  .ok());
  const std::string raw = ReadAll(path_);
  ASSERT_GE(raw.size(), 8u);
  uint64_t header_size = 0;
  for (int i = 7; i >= 0; --i) header_size = (header_size << 8) | static_cast<uint8_t>(raw[i]);
  EXPECT_EQ(header_size % 8, 0u);
  ASSERT_EQ(raw.size(), 8 + header_size + a.size() + b.size());
  const std::string header = raw.substr(8, header_size);
  const size_t close = header.rfind('}');
  ASSERT_NE(close, std::string::npos);
  EXPECT_LT(header.size() - close - 1, 8u);
  EXPECT_EQ(header.find_first_not_of(' ', close + 1), std::string::npos) << header;

  const nlohmann::ordered_json json = nlohmann::ordered_json::parse(header);
  std::vector<std::string> keys;
  for (const auto& [key, value] : json.items()) keys.push_back(key);
  EXPECT_THAT(keys, ElementsAre("__metadata__", "z", "a"));
  EXPECT_EQ(json["z"]["data_offsets"], nlohmann::ordered_json::array({0, 3}));
  EXPECT_EQ(json["a"]["data_offsets"], nlohmann::ordered_json::array({3, 11}));
  EXPECT_EQ(json["a"]["dtype"], "F32");
  EXPECT_EQ(raw.substr(8 + header_size), std::string(3, '\1') + std::string(8, '\2'));
}

TEST_F(SafetensorsTest, MetadataRoundTrips) {
  const std::map<std::string, std::string> metadata = {
      {"format", "pt"}, {"note", "with \"quotes\" and \xc3\xa9"}, {"empty", ""}};
  const std::vector<uint8_t> bytes(4, 0);
  ASSERT_TRUE(WriteSafetensors(path_,
                               {{.name = "w", .dtype = DType::kF32, .shape = {1}, .bytes = bytes}},
                               metadata)
                  .ok());
  absl::StatusOr<std::unique_ptr<SafetensorsFile>> file = SafetensorsFile::Open(path_);
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_EQ((*file)->metadata(), metadata);
}

TEST_F(SafetensorsTest, EmptyFileRoundTrips) {
  ASSERT_TRUE(WriteSafetensors(path_, {}).ok());
  absl::StatusOr<std::unique_ptr<SafetensorsFile>> file = SafetensorsFile::Open(path_);
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_TRUE((*file)->entries().empty());
  EXPECT_EQ(ReadAll(path_).size() % 8, 0u);
}

TEST_F(SafetensorsTest, WriterReplacesExistingFileAndLeavesNoTemporaries) {
  const std::vector<uint8_t> one(1, 1), two(2, 2);
  ASSERT_TRUE(
      WriteSafetensors(path_, {{.name = "a", .dtype = DType::kU8, .shape = {1}, .bytes = one}})
          .ok());
  ASSERT_TRUE(
      WriteSafetensors(path_, {{.name = "b", .dtype = DType::kU8, .shape = {2}, .bytes = two}})
          .ok());
  absl::StatusOr<std::unique_ptr<SafetensorsFile>> file = SafetensorsFile::Open(path_);
  ASSERT_TRUE(file.ok()) << file.status();
  ASSERT_EQ((*file)->entries().size(), 1u);
  EXPECT_EQ((*file)->entries()[0].name, "b");
  std::vector<std::string> names;
  for (const auto& item : std::filesystem::directory_iterator(dir_)) {
    names.push_back(item.path().filename().string());
  }
  EXPECT_THAT(names, ElementsAre("model.safetensors"));
}

TEST_F(SafetensorsTest, WriterRejectsBadInputWithoutTouchingTheFile) {
  const std::vector<uint8_t> four(4, 0);
  const SafetensorsTensorView good{.name = "a", .dtype = DType::kF32, .shape = {1}, .bytes = four};

  absl::Status duplicate = WriteSafetensors(path_, {good, good});
  EXPECT_EQ(duplicate.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(Message(duplicate), HasSubstr("tensor 'a': duplicate tensor name"));
  EXPECT_THAT(Message(duplicate), StartsWith(path_));

  absl::Status mismatch = WriteSafetensors(
      path_, {{.name = "w", .dtype = DType::kF32, .shape = {2, 3}, .bytes = four}});
  EXPECT_EQ(mismatch.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(Message(mismatch), HasSubstr("tensor 'w': 4 bytes, expected 24 (shape [2, 3], F32)"));

  absl::Status reserved = WriteSafetensors(
      path_, {{.name = "__metadata__", .dtype = DType::kF32, .shape = {1}, .bytes = four}});
  EXPECT_EQ(reserved.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(Message(reserved), HasSubstr("reserved"));

  absl::Status negative =
      WriteSafetensors(path_, {{.name = "n", .dtype = DType::kF32, .shape = {-1}, .bytes = four}});
  EXPECT_EQ(negative.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(Message(negative), HasSubstr("tensor 'n': invalid shape [-1]"));

  absl::Status bad_utf8 = WriteSafetensors(path_, {good}, {{"key", std::string("\xff\xfe", 2)}});
  EXPECT_EQ(bad_utf8.code(), absl::StatusCode::kInvalidArgument);

  EXPECT_FALSE(std::filesystem::exists(path_));
  EXPECT_TRUE(std::filesystem::is_empty(dir_));
}

TEST_F(SafetensorsTest, WriterReportsUnwritableDirectory) {
  const absl::Status status = WriteSafetensors(dir_ + "/no/such/dir/x.safetensors", {});
  EXPECT_FALSE(status.ok());
  EXPECT_THAT(Message(status), HasSubstr("no/such/dir/x.safetensors"));
}

TEST_F(SafetensorsTest, ZeroSizeTensorsMayShareOffsets) {
  const std::string header = R"({"e1":{"dtype":"F32","shape":[0],"data_offsets":[0,0]},)"
                             R"("a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},)"
                             R"("e2":{"dtype":"F16","shape":[0,3],"data_offsets":[4,4]},)"
                             R"("e3":{"dtype":"BF16","shape":[2,0],"data_offsets":[4,4]}})";
  ASSERT_TRUE(OpenRaw(header, 4).ok());
  absl::StatusOr<std::unique_ptr<SafetensorsFile>> file = SafetensorsFile::Open(path_);
  ASSERT_TRUE(file.ok());
  std::vector<std::string> names;
  for (const SafetensorsEntry& entry : (*file)->entries()) names.push_back(entry.name);
  EXPECT_THAT(names, ElementsAre("e1", "a", "e2", "e3"));
  EXPECT_TRUE((*file)->Bytes(*(*file)->Find("e2")).empty());
}

TEST_F(SafetensorsTest, AcceptsTrailingSpacesAndUnknownEntryFields) {
  ASSERT_TRUE(
      OpenRaw(R"({"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2],"extra":1}}    )", 2).ok());
}

TEST_F(SafetensorsTest, MissingFileIsNotFound) {
  const absl::Status status = SafetensorsFile::Open(dir_ + "/absent.safetensors").status();
  EXPECT_EQ(status.code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(Message(status), HasSubstr(dir_ + "/absent.safetensors"));
}

TEST_F(SafetensorsTest, DirectoryIsRejected) {
  const absl::Status status = SafetensorsFile::Open(dir_).status();
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(Message(status), HasSubstr("not a regular file"));
}

TEST_F(SafetensorsTest, FileShorterThanLengthPrefix) {
  WriteAll(path_, std::string("\x10\0\0\0\0", 5));
  const absl::Status status = SafetensorsFile::Open(path_).status();
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(Message(status), path_ + ": file is 5 bytes, too short for the 8-byte header length");
}

TEST_F(SafetensorsTest, HeaderLengthOverLimit) {
  WriteAll(path_, LittleEndian64(kMaxSafetensorsHeaderBytes + 1) + "{}");
  const absl::Status status = SafetensorsFile::Open(path_).status();
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(Message(status), StartsWith(path_ + ": header length 100000001 exceeds the limit"));

  WriteAll(path_, LittleEndian64(~uint64_t{0}) + "{}");
  EXPECT_THAT(Message(SafetensorsFile::Open(path_).status()), HasSubstr("exceeds the limit"));
}

TEST_F(SafetensorsTest, HeaderLengthPastEndOfFile) {
  WriteAll(path_, LittleEndian64(64) + "{}");
  const absl::Status status = SafetensorsFile::Open(path_).status();
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(Message(status), path_ +
                                 ": header length 64 exceeds the 2 bytes after the length prefix "
                                 "(truncated file?)");
}

// A valid two-tensor file: "a" is U8 [4] at [0, 4), "b" is F32 [2, 2] at [4, 20).
std::vector<SafetensorsTensorView> TwoTensors(const std::vector<uint8_t>& bytes) {
  return {{.name = "a", .dtype = DType::kU8, .shape = {4}, .bytes = {bytes.data(), 4}},
          {.name = "b", .dtype = DType::kF32, .shape = {2, 2}, .bytes = {bytes.data() + 4, 16}}};
}

TEST_F(SafetensorsTest, TruncatedInDataBuffer) {
  const std::vector<uint8_t> bytes(20, 3);
  ASSERT_TRUE(WriteSafetensors(path_, TwoTensors(bytes)).ok());
  std::string raw = ReadAll(path_);
  WriteAll(path_, raw.substr(0, raw.size() - 4));
  const absl::Status status = SafetensorsFile::Open(path_).status();
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(Message(status),
            path_ + ": tensor 'b': data_offsets [4, 20] run past the data buffer of 16 bytes");
}

TEST_F(SafetensorsTest, TruncatedInsideHeader) {
  const std::vector<uint8_t> bytes(20, 3);
  ASSERT_TRUE(WriteSafetensors(path_, TwoTensors(bytes)).ok());
  std::string raw = ReadAll(path_);
  WriteAll(path_, raw.substr(0, 30));
  const absl::Status status = SafetensorsFile::Open(path_).status();
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(Message(status), StartsWith(path_ + ": header length "));
  EXPECT_THAT(Message(status), HasSubstr("exceeds the 22 bytes after the length prefix"));
}

TEST_F(SafetensorsTest, InvalidJson) {
  const absl::Status status = OpenRaw(R"({"a":{"dtype":"U8",)", 0);
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(Message(status), StartsWith(path_ + ": header is not valid JSON: "));
  EXPECT_THAT(Message(status), HasSubstr("parse error"));
}

TEST_F(SafetensorsTest, EmptyHeaderIsInvalidJson) {
  EXPECT_THAT(Message(OpenRaw("", 0)), StartsWith(path_ + ": header is not valid JSON"));
}

TEST_F(SafetensorsTest, HeaderNotAnObject) {
  const absl::Status status = OpenRaw("[1, 2]", 0);
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(Message(status), path_ + ": header must be a JSON object, got array");
}

TEST_F(SafetensorsTest, DuplicateKey) {
  const absl::Status status = OpenRaw(R"({"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},)"
                                      R"("a":{"dtype":"U8","shape":[2],"data_offsets":[2,4]}})",
                                      4);
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(Message(status), path_ + ": header has duplicate key 'a'");
}

TEST_F(SafetensorsTest, EntryNotAnObject) {
  const absl::Status status = OpenRaw(R"({"w":[1]})", 0);
  EXPECT_EQ(Message(status), path_ + ": tensor 'w': entry must be an object, got array");
}

TEST_F(SafetensorsTest, UnknownDType) {
  const absl::Status status =
      OpenRaw(R"({"w":{"dtype":"F33","shape":[2],"data_offsets":[0,8]}})", 8);
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(Message(status), path_ + ": tensor 'w': unknown dtype 'F33'");
}

TEST_F(SafetensorsTest, MissingOrMistypedFields) {
  EXPECT_EQ(Message(OpenRaw(R"({"w":{"shape":[2],"data_offsets":[0,8]}})", 8)),
            path_ + ": tensor 'w': 'dtype' must be a string");
  EXPECT_EQ(Message(OpenRaw(R"({"w":{"dtype":"F32","data_offsets":[0,8]}})", 8)),
            path_ + ": tensor 'w': 'shape' must be an array of non-negative integers");
  EXPECT_THAT(Message(OpenRaw(R"({"w":{"dtype":"F32","shape":[2]}})", 8)),
              StartsWith(path_ + ": tensor 'w': 'data_offsets' must be [begin, end]"));
  EXPECT_THAT(Message(OpenRaw(R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[0,4,8]}})", 8)),
              HasSubstr("tensor 'w': 'data_offsets' must be [begin, end] of non-negative "
                        "integers, got [0,4,8]"));
  EXPECT_THAT(Message(OpenRaw(R"({"w":{"dtype":"F32","shape":[2.0],"data_offsets":[0,8]}})", 8)),
              HasSubstr("tensor 'w': shape [2.0] must hold non-negative integers"));
}

TEST_F(SafetensorsTest, NegativeShape) {
  const absl::Status status =
      OpenRaw(R"({"w":{"dtype":"F32","shape":[2,-1],"data_offsets":[0,8]}})", 8);
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(Message(status), path_ +
                                 ": tensor 'w': shape [2,-1] must hold non-negative integers "
                                 "below 2^63, got -1");
}

TEST_F(SafetensorsTest, NegativeOffset) {
  const absl::Status status =
      OpenRaw(R"({"w":{"dtype":"U8","shape":[2],"data_offsets":[-2,0]}})", 2);
  EXPECT_THAT(Message(status), StartsWith(path_ + ": tensor 'w': 'data_offsets' must be"));
}

TEST_F(SafetensorsTest, OffsetsEndBeforeBegin) {
  const absl::Status status =
      OpenRaw(R"({"w":{"dtype":"U8","shape":[0],"data_offsets":[8,4]}})", 8);
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(Message(status), path_ + ": tensor 'w': data_offsets [8, 4]: end is before begin");
}

TEST_F(SafetensorsTest, OffsetsBeyondBuffer) {
  const absl::Status status =
      OpenRaw(R"({"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}})", 12);
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(Message(status),
            path_ + ": tensor 'w': data_offsets [0, 16] run past the data buffer of 12 bytes");
}

TEST_F(SafetensorsTest, ByteSizeDisagreesWithShape) {
  const absl::Status status =
      OpenRaw(R"({"layers.0.q.weight":{"dtype":"F32","shape":[4,8],"data_offsets":[0,100]}})", 100);
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(Message(status), path_ +
                                 ": tensor 'layers.0.q.weight': data_offsets [0, 100] hold 100 "
                                 "bytes, expected 128 (shape [4, 8], F32)");
}

TEST_F(SafetensorsTest, NumelOverflow) {
  // 2^32 * 2^32 * 16 wraps to 0 in 64 bits; a naive product would accept an empty range.
  const absl::Status status = OpenRaw(
      R"({"huge":{"dtype":"F32","shape":[4294967296,4294967296,16],"data_offsets":[0,0]}})", 0);
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(Message(status), path_ +
                                 ": tensor 'huge': shape [4294967296, 4294967296, 16], F32 has "
                                 "too many elements (overflows 64 bits)");

  // numel fits but numel * 8 bytes does not.
  EXPECT_THAT(
      Message(OpenRaw(
          R"({"big":{"dtype":"F64","shape":[4611686018427387904],"data_offsets":[0,0]}})", 0)),
      HasSubstr("tensor 'big': shape [4611686018427387904], F64 has too many elements"));
  // A dimension beyond int64 (and beyond uint64, which JSON parses as a float).
  EXPECT_THAT(Message(OpenRaw(
                  R"({"d":{"dtype":"U8","shape":[9223372036854775808],"data_offsets":[0,0]}})", 0)),
              HasSubstr("tensor 'd': shape [9223372036854775808] must hold non-negative integers"));
  // Rejected either by the JSON parser or as a non-integer dimension.
  EXPECT_THAT(Message(OpenRaw(R"({"d":{"dtype":"U8","shape":[1e400],"data_offsets":[0,0]}})", 0)),
              StartsWith(path_ + ": "));
  // A zero dimension does not excuse the others from fitting.
  EXPECT_THAT(
      Message(OpenRaw(
          R"({"z":{"dtype":"U8","shape":[0,4294967296,4294967296],"data_offsets":[0,0]}})", 0)),
      HasSubstr("tensor 'z': shape [0, 4294967296, 4294967296], U8 has too many elements"));
}

TEST_F(SafetensorsTest, OverlappingEntries) {
  const absl::Status status = OpenRaw(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                                      R"("b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})",
                                      12);
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(Message(status),
            path_ + ": tensor 'b': data_offsets [4, 12] overlap tensor 'a', which ends at 8");
}

TEST_F(SafetensorsTest, AliasedEntries) {
  const absl::Status status = OpenRaw(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                                      R"("b":{"dtype":"I32","shape":[2],"data_offsets":[0,8]}})",
                                      8);
  EXPECT_THAT(Message(status),
              HasSubstr("tensor 'b': data_offsets [0, 8] overlap tensor 'a', which ends at 8"));
}

TEST_F(SafetensorsTest, GapBetweenEntries) {
  const absl::Status status = OpenRaw(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                                      R"("b":{"dtype":"F32","shape":[2],"data_offsets":[12,20]}})",
                                      20);
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(Message(status), path_ +
                                 ": tensor 'b': data_offsets [12, 20] leave a gap of 4 bytes "
                                 "after tensor 'a', which ends at 8");
}

TEST_F(SafetensorsTest, GapAtStartOfBuffer) {
  const absl::Status status =
      OpenRaw(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}})", 16);
  EXPECT_EQ(Message(status), path_ +
                                 ": tensor 'a': data_offsets [8, 16] leave a gap of 8 bytes "
                                 "after the start of the data buffer");
}

TEST_F(SafetensorsTest, DataBufferLongerThanLastEntry) {
  const absl::Status status =
      OpenRaw(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})", 12);
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(Message(status), path_ +
                                 ": data buffer holds 12 bytes but the last tensor 'a' ends at "
                                 "8 (4 trailing bytes)");
  EXPECT_EQ(Message(OpenRaw("{}", 3)),
            path_ + ": header lists no tensors but the data buffer holds 3 bytes");
}

TEST_F(SafetensorsTest, MetadataMustMapStringsToStrings) {
  const std::string tensor = R"("a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]})";
  EXPECT_EQ(Message(OpenRaw(R"({"__metadata__":["x"],)" + tensor + "}", 1)),
            path_ + ": '__metadata__' must be an object of strings, got array");
  EXPECT_EQ(Message(OpenRaw(R"({"__metadata__":{"k":1},)" + tensor + "}", 1)),
            path_ + ": '__metadata__' value for key 'k' must be a string, got number");
  ASSERT_TRUE(OpenRaw(R"({"__metadata__":{"k":"v"},)" + tensor + "}", 1).ok());
}

TEST_F(SafetensorsTest, MessagesEscapeHostileNames) {
  const std::string long_name(5000, 'n');
  const absl::Status status =
      OpenRaw(R"({")" + long_name + R"(":{"dtype":"F33","shape":[],"data_offsets":[0,0]}})", 0);
  EXPECT_THAT(Message(status), HasSubstr("(5000 bytes)"));
  EXPECT_LT(status.message().size(), 400u);

  EXPECT_THAT(Message(OpenRaw(R"({"a\nb":{"dtype":"F33","shape":[],"data_offsets":[0,0]}})", 0)),
              HasSubstr("tensor 'a\\nb'"));

  // A long invalid token in the JSON error is bounded too.
  const absl::Status bad_json = OpenRaw("{\"" + std::string(100000, 'x') + "\x01\"}", 0);
  EXPECT_THAT(Message(bad_json), StartsWith(path_ + ": header is not valid JSON: "));
  EXPECT_LT(bad_json.message().size(), 400u);
}

TEST(ParseSafetensorsHeaderTest, LabelPrefixesErrors) {
  const absl::StatusOr<SafetensorsHeader> header = ParseSafetensorsHeader("{", 0, "my label");
  EXPECT_THAT(Message(header.status()), StartsWith("my label: "));
}

TEST(ParseSafetensorsBufferTest, ReportsDataOffset) {
  const std::string header = R"({"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}})";
  const std::string file = LittleEndian64(header.size()) + header + "xy";
  uint64_t data_offset = 0;
  const absl::StatusOr<SafetensorsHeader> parsed = ParseSafetensorsBuffer(
      absl::MakeConstSpan(reinterpret_cast<const uint8_t*>(file.data()), file.size()), "buf",
      &data_offset);
  ASSERT_TRUE(parsed.ok()) << parsed.status();
  EXPECT_EQ(data_offset, 8 + header.size());
  ASSERT_EQ(parsed->entries.size(), 1u);
  EXPECT_EQ(parsed->entries[0].shape, std::vector<int64_t>{2});
}

}  // namespace
}  // namespace moelora
