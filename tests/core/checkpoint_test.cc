#include "core/checkpoint.h"

#include <ATen/ATen.h>
#include <stdlib.h>

#include <filesystem>
#include <fstream>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "core/safetensors.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/testing/temp_dir.h"

namespace moelora {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;

// Debian's gtest matchers do not take absl::string_view.
std::string Message(const absl::Status& status) { return std::string(status.message()); }

class CheckpointTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string dir_template = testing::TempDir() + "/checkpoint_test.XXXXXX";
    ASSERT_NE(mkdtemp(dir_template.data()), nullptr);
    dir_ = dir_template;
    at::manual_seed(1234);
  }
  void TearDown() override { testing_support::RemoveTree(dir_); }

  std::string Path(const std::string& name) const { return dir_ + "/" + name; }

  void WriteText(const std::string& name, const std::string& text) {
    std::ofstream out(Path(name), std::ios::binary | std::ios::trunc);
    out << text;
    ASSERT_TRUE(out.good());
  }

  // Two shards: "a" and "b" in the first, "c" in the second, plus an index for them.
  void WriteShardedCheckpoint() {
    a_ = at::randn({4, 3});
    b_ = at::arange(6, at::kLong).reshape({2, 3});
    c_ = at::randn({64, 32}).to(at::kBFloat16);
    ASSERT_TRUE(
        WriteTensors(Path("model-00001-of-00002.safetensors"), {{"a", a_}, {"b", b_}}).ok());
    ASSERT_TRUE(WriteTensors(Path("model-00002-of-00002.safetensors"),
                             {{"model.layers.0.self_attn.q_proj.weight", c_}})
                    .ok());
    WriteText("model.safetensors.index.json", R"({
      "metadata": {"total_size": 4380},
      "weight_map": {
        "a": "model-00001-of-00002.safetensors",
        "b": "model-00001-of-00002.safetensors",
        "model.layers.0.self_attn.q_proj.weight": "model-00002-of-00002.safetensors"
      }})");
  }

  std::string dir_;
  at::Tensor a_, b_, c_;
};

TEST(ScalarTypeTest, MapsEveryTorchDTypeBothWays) {
  const std::vector<std::pair<DType, at::ScalarType>> pairs = {
      {DType::kF32, at::kFloat},  {DType::kF16, at::kHalf}, {DType::kBF16, at::kBFloat16},
      {DType::kF64, at::kDouble}, {DType::kI64, at::kLong}, {DType::kI32, at::kInt},
      {DType::kI16, at::kShort},  {DType::kI8, at::kChar},  {DType::kU8, at::kByte},
      {DType::kBool, at::kBool}};
  for (const auto& [dtype, type] : pairs) {
    SCOPED_TRACE(DTypeName(dtype));
    absl::StatusOr<at::ScalarType> to = ToScalarType(dtype);
    ASSERT_TRUE(to.ok()) << to.status();
    EXPECT_EQ(*to, type);
    absl::StatusOr<DType> from = FromScalarType(type);
    ASSERT_TRUE(from.ok()) << from.status();
    EXPECT_EQ(*from, dtype);
  }
}

TEST(ScalarTypeTest, UnsupportedTypesAreUnimplemented) {
  for (DType dtype : {DType::kU16, DType::kU32, DType::kU64, DType::kF8E4M3, DType::kF8E5M2}) {
    absl::StatusOr<at::ScalarType> type = ToScalarType(dtype);
    EXPECT_EQ(type.status().code(), absl::StatusCode::kUnimplemented);
    EXPECT_THAT(Message(type.status()), HasSubstr(std::string(DTypeName(dtype))));
  }
  absl::StatusOr<DType> complex = FromScalarType(at::kComplexFloat);
  EXPECT_EQ(complex.status().code(), absl::StatusCode::kUnimplemented);
  EXPECT_THAT(Message(complex.status()), HasSubstr("ComplexFloat"));
}

TEST_F(CheckpointTest, EveryTorchDTypeRoundTripsExactly) {
  const at::Tensor base = at::randn({3, 5}) * 100;
  std::vector<std::pair<std::string, at::Tensor>> tensors = {
      {"f32", base},
      {"f16", base.to(at::kHalf)},
      {"bf16", base.to(at::kBFloat16)},
      {"f64", base.to(at::kDouble)},
      {"i64", base.to(at::kLong)},
      {"i32", base.to(at::kInt)},
      {"i16", base.to(at::kShort)},
      {"i8", base.clamp(-128, 127).to(at::kChar)},
      {"u8", base.abs().clamp(0, 255).to(at::kByte)},
      {"bool", base > 0},
      {"scalar", at::scalar_tensor(2.5, at::kBFloat16)},
      {"empty", at::empty({0, 3}, at::kHalf)},
      // Non-contiguous: written as its logical (row-major) values.
      {"transposed", base.t()},
  };
  ASSERT_TRUE(WriteTensors(Path("all.safetensors"), tensors, {{"format", "pt"}}).ok());

  absl::StatusOr<Checkpoint> checkpoint = Checkpoint::OpenFile(Path("all.safetensors"));
  ASSERT_TRUE(checkpoint.ok()) << checkpoint.status();
  EXPECT_EQ(checkpoint->source(), Path("all.safetensors"));
  for (const auto& [name, expected] : tensors) {
    SCOPED_TRACE(name);
    absl::StatusOr<at::Tensor> tensor = checkpoint->Get(name);
    ASSERT_TRUE(tensor.ok()) << tensor.status();
    EXPECT_EQ(tensor->scalar_type(), expected.scalar_type());
    EXPECT_EQ(tensor->sizes(), expected.sizes());
    EXPECT_TRUE(tensor->is_contiguous());
    EXPECT_TRUE(at::equal(*tensor, expected));
  }
  // BF16 and F16 values are bit-identical, not just close.
  const at::Tensor bf16 = *checkpoint->Get("bf16");
  EXPECT_TRUE(at::equal(bf16.view(at::kShort), tensors[2].second.view(at::kShort)));
  const at::Tensor f16 = *checkpoint->Get("f16");
  EXPECT_TRUE(at::equal(f16.view(at::kShort), tensors[1].second.view(at::kShort)));
  EXPECT_EQ(checkpoint->Get("scalar")->item<float>(), 2.5f);
}

TEST_F(CheckpointTest, TensorsOwnTheirMemory) {
  const at::Tensor original = at::randn({8});
  ASSERT_TRUE(WriteTensors(Path("x.safetensors"), {{"x", original}}).ok());
  at::Tensor copy;
  {
    absl::StatusOr<Checkpoint> checkpoint = Checkpoint::OpenFile(Path("x.safetensors"));
    ASSERT_TRUE(checkpoint.ok());
    copy = *checkpoint->Get("x");
    copy.add_(1);  // Writable: the mapping is read-only, so this proves it is a copy.
  }
  EXPECT_TRUE(at::equal(copy, original + 1));
}

TEST_F(CheckpointTest, ShardedDirectory) {
  WriteShardedCheckpoint();
  absl::StatusOr<Checkpoint> checkpoint = Checkpoint::OpenDirectory(dir_);
  ASSERT_TRUE(checkpoint.ok()) << checkpoint.status();
  EXPECT_EQ(checkpoint->source(), dir_);
  EXPECT_THAT(checkpoint->Names(), ElementsAre("a", "b", "model.layers.0.self_attn.q_proj.weight"));
  EXPECT_TRUE(checkpoint->Has("a"));
  EXPECT_FALSE(checkpoint->Has("z"));
  EXPECT_TRUE(at::equal(*checkpoint->Get("a"), a_));
  EXPECT_TRUE(at::equal(*checkpoint->Get("b", {2, 3}), b_));
  EXPECT_TRUE(at::equal(*checkpoint->Get("model.layers.0.self_attn.q_proj.weight", {64, 32}), c_));
  EXPECT_EQ(checkpoint->Location("a"), Path("model-00001-of-00002.safetensors"));
  EXPECT_EQ(checkpoint->Location("model.layers.0.self_attn.q_proj.weight"),
            Path("model-00002-of-00002.safetensors"));
  EXPECT_EQ(checkpoint->Location("z"), dir_);
}

TEST_F(CheckpointTest, CheckpointIsMovable) {
  WriteShardedCheckpoint();
  absl::StatusOr<Checkpoint> opened = Checkpoint::OpenDirectory(dir_);
  ASSERT_TRUE(opened.ok());
  Checkpoint moved = *std::move(opened);
  EXPECT_TRUE(at::equal(*moved.Get("b"), b_));
}

TEST_F(CheckpointTest, GetWithWrongShapeNamesTensorAndBothShapes) {
  WriteShardedCheckpoint();
  absl::StatusOr<Checkpoint> checkpoint = Checkpoint::OpenDirectory(dir_);
  ASSERT_TRUE(checkpoint.ok());
  absl::StatusOr<at::Tensor> tensor =
      checkpoint->Get("model.layers.0.self_attn.q_proj.weight", {64, 64});
  EXPECT_EQ(tensor.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(Message(tensor.status()), "tensor 'model.layers.0.self_attn.q_proj.weight' in " +
                                          Path("model-00002-of-00002.safetensors") +
                                          ": shape [64, 32], expected [64, 64]");
  EXPECT_THAT(Message(checkpoint->Get("a", {4}).status()), HasSubstr("shape [4, 3], expected [4]"));
}

TEST_F(CheckpointTest, GetUnknownTensorIsNotFound) {
  WriteShardedCheckpoint();
  absl::StatusOr<Checkpoint> checkpoint = Checkpoint::OpenDirectory(dir_);
  ASSERT_TRUE(checkpoint.ok());
  for (const absl::Status& status : {checkpoint->Get("lm_head.weight").status(),
                                     checkpoint->Get("lm_head.weight", {1}).status()}) {
    EXPECT_EQ(status.code(), absl::StatusCode::kNotFound);
    EXPECT_EQ(Message(status), "tensor 'lm_head.weight' not found in " + dir_);
  }
}

TEST_F(CheckpointTest, SingleFileDirectory) {
  const at::Tensor w = at::randn({2, 2}).to(at::kHalf);
  ASSERT_TRUE(WriteTensors(Path("model.safetensors"), {{"w", w}}).ok());
  absl::StatusOr<Checkpoint> checkpoint = Checkpoint::OpenDirectory(dir_);
  ASSERT_TRUE(checkpoint.ok()) << checkpoint.status();
  EXPECT_TRUE(at::equal(*checkpoint->Get("w", {2, 2}), w));
  EXPECT_EQ(checkpoint->Location("w"), Path("model.safetensors"));
}

TEST_F(CheckpointTest, IndexTakesPrecedenceOverSingleFile) {
  WriteShardedCheckpoint();
  ASSERT_TRUE(WriteTensors(Path("model.safetensors"), {{"other", at::ones({1})}}).ok());
  absl::StatusOr<Checkpoint> checkpoint = Checkpoint::OpenDirectory(dir_);
  ASSERT_TRUE(checkpoint.ok());
  EXPECT_FALSE(checkpoint->Has("other"));
  EXPECT_TRUE(checkpoint->Has("a"));
}

TEST_F(CheckpointTest, IndexNamesTensorMissingFromShard) {
  WriteShardedCheckpoint();
  WriteText("model.safetensors.index.json",
            R"({"weight_map": {"a": "model-00001-of-00002.safetensors",
                               "c": "model-00001-of-00002.safetensors"}})");
  const absl::Status status = Checkpoint::OpenDirectory(dir_).status();
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(Message(status), Path("model.safetensors.index.json") + ": tensor 'c' is mapped to " +
                                 Path("model-00001-of-00002.safetensors") +
                                 ", which does not contain it");
}

TEST_F(CheckpointTest, IndexShardEscapingTheDirectory) {
  WriteShardedCheckpoint();
  for (const std::string shard :
       {"../model-00001-of-00002.safetensors", "/etc/passwd", "sub/model.safetensors", "..", ""}) {
    SCOPED_TRACE(shard);
    WriteText("model.safetensors.index.json", R"({"weight_map": {"a": ")" + shard + R"("}})");
    const absl::Status status = Checkpoint::OpenDirectory(dir_).status();
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
    EXPECT_EQ(Message(status), Path("model.safetensors.index.json") + ": tensor 'a': shard '" +
                                   shard +
                                   "' must be a plain file name inside the checkpoint directory");
  }
}

TEST_F(CheckpointTest, IndexNamesMissingShard) {
  WriteShardedCheckpoint();
  WriteText("model.safetensors.index.json",
            R"({"weight_map": {"a": "model-00001-of-00002.safetensors",
                               "d": "model-00003-of-00003.safetensors"}})");
  const absl::Status status = Checkpoint::OpenDirectory(dir_).status();
  EXPECT_EQ(status.code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(Message(status), HasSubstr(Path("model.safetensors.index.json") +
                                         ": shard 'model-00003-of-00003.safetensors' (for "
                                         "tensor 'd'): " +
                                         Path("model-00003-of-00003.safetensors")));
}

TEST_F(CheckpointTest, CorruptShardIsReportedWithItsPath) {
  WriteShardedCheckpoint();
  WriteText("model-00002-of-00002.safetensors", "garbage!garbage!");
  const absl::Status status = Checkpoint::OpenDirectory(dir_).status();
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(Message(status), HasSubstr(Path("model-00002-of-00002.safetensors") + ": header"));
}

TEST_F(CheckpointTest, InvalidIndexJson) {
  WriteText("model.safetensors.index.json", R"({"weight_map": {"a": )");
  const absl::Status status = Checkpoint::OpenDirectory(dir_).status();
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(Message(status),
              HasSubstr(Path("model.safetensors.index.json") + ": not valid JSON"));
}

TEST_F(CheckpointTest, IndexWithBadWeightMap) {
  WriteText("model.safetensors.index.json", R"([1])");
  EXPECT_THAT(Message(Checkpoint::OpenDirectory(dir_).status()),
              HasSubstr("must be a JSON object, got array"));
  WriteText("model.safetensors.index.json", R"({"metadata": {}})");
  EXPECT_THAT(Message(Checkpoint::OpenDirectory(dir_).status()),
              HasSubstr("'weight_map' must be an object"));
  WriteText("model.safetensors.index.json", R"({"weight_map": {}})");
  EXPECT_THAT(Message(Checkpoint::OpenDirectory(dir_).status()),
              HasSubstr("'weight_map' is empty"));
  WriteText("model.safetensors.index.json", R"({"weight_map": {"a": 3}})");
  EXPECT_THAT(Message(Checkpoint::OpenDirectory(dir_).status()),
              HasSubstr("tensor 'a': shard must be a string, got number"));
}

TEST_F(CheckpointTest, DirectoryWithNeitherFile) {
  const absl::Status status = Checkpoint::OpenDirectory(dir_).status();
  EXPECT_EQ(status.code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(Message(status), "checkpoint directory " + dir_ +
                                 " has neither model.safetensors.index.json nor "
                                 "model.safetensors");
  EXPECT_EQ(Checkpoint::OpenDirectory(dir_ + "/missing").status().code(),
            absl::StatusCode::kNotFound);
}

TEST_F(CheckpointTest, OpenFileMissing) {
  const absl::Status status = Checkpoint::OpenFile(Path("adapter.safetensors")).status();
  EXPECT_EQ(status.code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(Message(status), HasSubstr(Path("adapter.safetensors")));
}

TEST_F(CheckpointTest, ReadTensorRejectsUnsupportedDTypeAndBadBools) {
  const std::vector<uint8_t> bytes = {0, 1, 2, 0};
  ASSERT_TRUE(
      WriteSafetensors(
          Path("odd.safetensors"),
          {{.name = "u16", .dtype = DType::kU16, .shape = {1}, .bytes = {bytes.data(), 2}},
           {.name = "flags", .dtype = DType::kBool, .shape = {2}, .bytes = {bytes.data() + 2, 2}}})
          .ok());
  absl::StatusOr<Checkpoint> checkpoint = Checkpoint::OpenFile(Path("odd.safetensors"));
  ASSERT_TRUE(checkpoint.ok()) << checkpoint.status();

  const absl::Status u16 = checkpoint->Get("u16").status();
  EXPECT_EQ(u16.code(), absl::StatusCode::kUnimplemented);
  EXPECT_THAT(Message(u16), HasSubstr(Path("odd.safetensors") + ": tensor 'u16': "));
  EXPECT_THAT(Message(u16), HasSubstr("U16"));

  const absl::Status flags = checkpoint->Get("flags").status();
  EXPECT_EQ(flags.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(Message(flags), HasSubstr("tensor 'flags': BOOL data holds byte 2"));
}

TEST_F(CheckpointTest, WriteTensorsRejectsUnsupportedAndUndefinedTensors) {
  const absl::Status complex =
      WriteTensors(Path("c.safetensors"), {{"z", at::zeros({2}, at::kComplexFloat)}});
  EXPECT_EQ(complex.code(), absl::StatusCode::kUnimplemented);
  EXPECT_THAT(Message(complex), HasSubstr("tensor 'z'"));

  const absl::Status undefined = WriteTensors(Path("u.safetensors"), {{"u", at::Tensor()}});
  EXPECT_EQ(undefined.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(Message(undefined), HasSubstr("tensor 'u': undefined tensor"));

  const absl::Status duplicate =
      WriteTensors(Path("d.safetensors"), {{"x", at::ones({1})}, {"x", at::ones({1})}});
  EXPECT_EQ(duplicate.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_FALSE(std::filesystem::exists(Path("d.safetensors")));
}

}  // namespace
}  // namespace moelora
