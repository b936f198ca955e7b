// Deterministic fuzzing of the safetensors validator: valid files are generated, mutated in ways
// that target the header's structure and numbers, and fed to the parsers. Nothing may crash,
// every error must name its source, and whatever is accepted must be internally consistent.
// tests/core/safetensors_fuzzer.cc is the coverage-guided (libFuzzer) counterpart.

#include <stdlib.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "core/safetensors.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/testing/temp_dir.h"

namespace moelora {
namespace {

using ::testing::StartsWith;

constexpr int kIterations = 2000;
constexpr char kLabel[] = "fuzz.safetensors";

constexpr DType kDTypes[] = {DType::kBool, DType::kU8,     DType::kI8,    DType::kI16,
                             DType::kU16,  DType::kI32,    DType::kU32,   DType::kI64,
                             DType::kU64,  DType::kF16,    DType::kBF16,  DType::kF32,
                             DType::kF64,  DType::kF8E4M3, DType::kF8E5M2};

// Fragments that hit the validator's edges: structure, types, field names and extreme numbers.
const std::vector<std::string>& Fragments() {
  static const auto* fragments =
      new std::vector<std::string>{"{",
                                   "}",
                                   "[",
                                   "]",
                                   ",",
                                   ":",
                                   "\"",
                                   "-",
                                   "-1",
                                   "0",
                                   "1e400",
                                   "1.5",
                                   "-0",
                                   "18446744073709551615",
                                   "18446744073709551616",
                                   "9223372036854775807",
                                   "9223372036854775808",
                                   "4294967296",
                                   "99999999999999999999999999999",
                                   "null",
                                   "true",
                                   "\"F32\"",
                                   "\"BF16\"",
                                   "\"F33\"",
                                   "\"__metadata__\"",
                                   "\"dtype\"",
                                   "\"shape\"",
                                   "\"data_offsets\"",
                                   "[0,0]",
                                   "[]",
                                   "{}",
                                   "\\u0000",
                                   "\\ud800",
                                   "\xff",
                                   "\xc3\xa9",
                                   " ",
                                   "\"a\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]},",
                                   "\"__metadata__\":{\"k\":\"v\"},",
                                   "\"__metadata__\":{\"k\":3},"};
  return *fragments;
}

struct Sample {
  std::string header;
  std::string data;
  std::vector<std::string> names;  // In offset order.
};

Sample RandomValidSample(std::mt19937& rng) {
  Sample sample;
  const int count = static_cast<int>(rng() % 5);
  std::vector<std::string> entries;
  uint64_t offset = 0;
  for (int i = 0; i < count; ++i) {
    const DType dtype = kDTypes[rng() % std::size(kDTypes)];
    std::vector<int64_t> shape(rng() % 4);
    uint64_t numel = 1;
    for (int64_t& dim : shape) {
      dim = rng() % 4;
      numel *= dim;
    }
    const uint64_t size = numel * DTypeSize(dtype);
    std::string name = "t" + std::to_string(i);
    if (rng() % 4 == 0) name += "\xc3\xa9.weight";
    nlohmann::json entry = {{"dtype", std::string(DTypeName(dtype))},
                            {"shape", shape},
                            {"data_offsets", {offset, offset + size}}};
    entries.push_back(nlohmann::json(name).dump() + ":" + entry.dump());
    sample.names.push_back(name);
    offset += size;
  }
  if (rng() % 3 == 0) entries.push_back(R"("__metadata__":{"format":"pt"})");
  // Key order is independent of offset order.
  std::shuffle(entries.begin(), entries.end(), rng);
  sample.header = "{";
  for (size_t i = 0; i < entries.size(); ++i) {
    if (i > 0) sample.header += ",";
    sample.header += entries[i];
  }
  sample.header += "}" + std::string(rng() % 8, ' ');
  sample.data.resize(offset);
  for (char& c : sample.data) c = static_cast<char>(rng());
  return sample;
}

// Spans of digits (with a leading '-') in `text`.
std::vector<std::pair<size_t, size_t>> NumberSpans(const std::string& text) {
  std::vector<std::pair<size_t, size_t>> spans;
  for (size_t i = 0; i < text.size();) {
    if (isdigit(static_cast<unsigned char>(text[i]))) {
      size_t begin = i > 0 && text[i - 1] == '-' ? i - 1 : i;
      while (i < text.size() && isdigit(static_cast<unsigned char>(text[i]))) ++i;
      spans.emplace_back(begin, i - begin);
    } else {
      ++i;
    }
  }
  return spans;
}

void MutateText(std::string& text, std::mt19937& rng) {
  const auto position = [&](size_t extra) { return rng() % (text.size() + extra); };
  switch (rng() % 8) {
    case 0:  // Byte flip.
      if (!text.empty()) text[position(0)] ^= static_cast<char>(1 << (rng() % 8));
      break;
    case 1:  // Random byte.
      if (!text.empty()) text[position(0)] = static_cast<char>(rng());
      break;
    case 2:  // Truncation.
      text.resize(position(1));
      break;
    case 3:  // Random insertion.
      text.insert(position(1), std::string(1 + rng() % 4, static_cast<char>(rng())));
      break;
    case 4:  // JSON fragment.
      text.insert(position(1), Fragments()[rng() % Fragments().size()]);
      break;
    case 5: {  // Replace a number with another of the header's numbers or an extreme one.
      const auto spans = NumberSpans(text);
      if (spans.empty()) break;
      const auto [begin, length] = spans[rng() % spans.size()];
      std::string replacement;
      if (rng() % 2 == 0) {
        const auto [other_begin, other_length] = spans[rng() % spans.size()];
        replacement = text.substr(other_begin, other_length);
      } else {
        static const char* const kNumbers[] = {"0",
                                               "1",
                                               "-1",
                                               "7",
                                               "1e400",
                                               "2.5",
                                               "4294967296",
                                               "4611686018427387904",
                                               "9223372036854775807",
                                               "9223372036854775808",
                                               "18446744073709551615",
                                               "18446744073709551616"};
        replacement = kNumbers[rng() % std::size(kNumbers)];
      }
      text.replace(begin, length, replacement);
      break;
    }
    case 6: {  // Swap two numbers.
      const auto spans = NumberSpans(text);
      if (spans.size() < 2) break;
      auto a = spans[rng() % spans.size()];
      auto b = spans[rng() % spans.size()];
      if (a.first == b.first) break;
      if (a.first > b.first) std::swap(a, b);
      const std::string first = text.substr(a.first, a.second);
      const std::string second = text.substr(b.first, b.second);
      text.replace(b.first, b.second, first);  // Later span first keeps `a` in place.
      text.replace(a.first, a.second, second);
      break;
    }
    case 7: {  // Delete or duplicate a range.
      if (text.empty()) break;
      const size_t begin = position(0);
      const size_t length = 1 + rng() % std::min<size_t>(16, text.size() - begin);
      if (rng() % 2 == 0) {
        text.erase(begin, length);
      } else {
        text.insert(position(1), text.substr(begin, length));
      }
      break;
    }
  }
}

std::string LittleEndian64(uint64_t value) {
  std::string bytes(8, '\0');
  for (int i = 0; i < 8; ++i) bytes[i] = static_cast<char>((value >> (8 * i)) & 0xff);
  return bytes;
}

// The invariants of an accepted header.
::testing::AssertionResult Consistent(const SafetensorsHeader& header, uint64_t data_size) {
  uint64_t covered = 0;
  for (const SafetensorsEntry& entry : header.entries) {
    if (entry.begin != covered) {
      return ::testing::AssertionFailure() << entry.name << " begins at " << entry.begin
                                           << ", previous entry ends at " << covered;
    }
    if (entry.end < entry.begin || entry.end > data_size) {
      return ::testing::AssertionFailure() << entry.name << " out of bounds";
    }
    const int64_t numel = entry.NumElements();
    if (numel < 0) return ::testing::AssertionFailure() << entry.name << " has a bad shape";
    for (int64_t dim : entry.shape) {
      if (dim < 0) return ::testing::AssertionFailure() << entry.name << " negative dim";
    }
    const size_t dtype_size = DTypeSize(entry.dtype);
    if (dtype_size == 0 || !ParseDType(DTypeName(entry.dtype)).ok()) {
      return ::testing::AssertionFailure() << entry.name << " has a bad dtype";
    }
    // Compared by division so the check itself cannot overflow.
    if ((entry.end - entry.begin) % dtype_size != 0 ||
        (entry.end - entry.begin) / dtype_size != static_cast<uint64_t>(numel)) {
      return ::testing::AssertionFailure()
             << entry.name << " holds " << entry.end - entry.begin << " bytes for " << numel
             << " elements of " << dtype_size;
    }
    covered = entry.end;
  }
  if (covered != data_size) {
    return ::testing::AssertionFailure() << "entries cover " << covered << " of " << data_size;
  }
  return ::testing::AssertionSuccess();
}

void ExpectNamedError(const absl::Status& status, const std::string& label) {
  EXPECT_THAT(std::string(status.message()), StartsWith(label + ": "));
  // Bounded even when the input holds huge names or tokens.
  EXPECT_LT(status.message().size(), 2000u);
}

TEST(SafetensorsFuzzTest, MutatedInputsNeverCrashAndAcceptedOnesAreConsistent) {
  const auto start = std::chrono::steady_clock::now();
  std::mt19937 rng(20240611);
  std::string dir = testing::TempDir() + "/safetensors_fuzz.XXXXXX";
  ASSERT_NE(mkdtemp(dir.data()), nullptr);
  const std::string path = dir + "/" + kLabel;

  int accepted = 0;
  int rejected = 0;
  for (int iteration = 0; iteration < kIterations; ++iteration) {
    SCOPED_TRACE(iteration);
    Sample sample = RandomValidSample(rng);
    const bool pristine = iteration % 10 == 0;

    // The header alone, against a possibly wrong data size.
    std::string header = sample.header;
    uint64_t data_size = sample.data.size();
    if (!pristine) {
      const int mutations = 1 + static_cast<int>(rng() % 3);
      for (int m = 0; m < mutations; ++m) MutateText(header, rng);
      if (rng() % 8 == 0) data_size += static_cast<uint64_t>(rng() % 9) - 4;
    }
    absl::StatusOr<SafetensorsHeader> parsed = ParseSafetensorsHeader(header, data_size, kLabel);
    if (parsed.ok()) {
      ++accepted;
      EXPECT_TRUE(Consistent(*parsed, data_size)) << header;
    } else {
      ++rejected;
      ExpectNamedError(parsed.status(), kLabel);
    }
    if (pristine) {
      ASSERT_TRUE(parsed.ok()) << parsed.status() << "\n" << header;
      std::vector<std::string> names;
      for (const SafetensorsEntry& entry : parsed->entries) names.push_back(entry.name);
      // Zero-size entries may tie on offsets; only the set of names must match.
      std::sort(names.begin(), names.end());
      std::sort(sample.names.begin(), sample.names.end());
      EXPECT_EQ(names, sample.names);
    }

    // The whole file: the length prefix, truncation and trailing bytes.
    std::string file = LittleEndian64(header.size()) + header + sample.data;
    if (!pristine) {
      switch (rng() % 6) {
        case 0:
          file.resize(rng() % (file.size() + 1));
          break;
        case 1:
          file.replace(0, 8, LittleEndian64(header.size() + (rng() % 17) - 8));
          break;
        case 2: {
          uint64_t length = (uint64_t{rng()} << 32) | rng();
          file.replace(0, 8, LittleEndian64(length >> (rng() % 64)));
          break;
        }
        case 3:
          file += std::string(1 + rng() % 8, '\0');
          break;
        case 4:
          if (!sample.data.empty()) file.resize(file.size() - 1 - rng() % sample.data.size());
          break;
        default:
          break;
      }
    }
    const absl::Span<const uint8_t> bytes(reinterpret_cast<const uint8_t*>(file.data()),
                                          file.size());
    uint64_t data_offset = 0;
    absl::StatusOr<SafetensorsHeader> buffer = ParseSafetensorsBuffer(bytes, kLabel, &data_offset);
    if (buffer.ok()) {
      ASSERT_GE(file.size(), data_offset);
      EXPECT_TRUE(Consistent(*buffer, file.size() - data_offset));
    } else {
      ExpectNamedError(buffer.status(), kLabel);
    }
    if (pristine) {
      EXPECT_TRUE(buffer.ok()) << buffer.status();
    }

    // Through the file system and mmap now and then: it must agree with the in-memory parse.
    if (iteration % 8 == 0) {
      {
        std::ofstream out(path, std::ios::binary | std::ios::trunc);
        out.write(file.data(), static_cast<std::streamsize>(file.size()));
      }
      absl::StatusOr<std::unique_ptr<SafetensorsFile>> opened = SafetensorsFile::Open(path);
      ASSERT_EQ(opened.ok(), buffer.ok()) << opened.status();
      if (opened.ok()) {
        uint64_t checksum = 0;
        for (const SafetensorsEntry& entry : (*opened)->entries()) {
          ASSERT_EQ((*opened)->Find(entry.name), &entry);
          // Reading every byte lets sanitizers catch a view outside the mapping.
          for (uint8_t byte : (*opened)->Bytes(entry)) checksum += byte;
          ASSERT_EQ((*opened)->Bytes(entry).size(), entry.end - entry.begin);
        }
        uint64_t expected = 0;
        for (size_t i = data_offset; i < file.size(); ++i)
          expected += static_cast<uint8_t>(file[i]);
        EXPECT_EQ(checksum, expected);
      } else {
        ExpectNamedError(opened.status(), path);
      }
    }
  }
  testing_support::RemoveTree(dir);

  RecordProperty("accepted", accepted);
  RecordProperty("rejected", rejected);
  // Both outcomes must be common, or the mutations are not exercising the validator.
  EXPECT_GT(accepted, kIterations / 10);
  EXPECT_GT(rejected, kIterations / 2);
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  EXPECT_LT(seconds, 5.0);
}

}  // namespace
}  // namespace moelora
