#include "core/tokenizer.h"

#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/testing/temp_dir.h"

namespace moelora {
namespace {

using ::moelora::testing_support::ScopedTempDir;
using ::testing::HasSubstr;

constexpr char kCorpus[] =
    "the quick brown fox jumps over the lazy dog\n"
    "a mixture of experts routes every token over its adapters\n"
    "hello world, hello tokens, hello streaming decoder\n"
    "café naïve résumé — über straße\n"
    "low rank adapters are two small matrices\n"
    "the router picks weights for math and code experts\n";

// One tiny model for the whole binary: training takes a fraction of a second.
class TokenizerTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new ScopedTempDir("tokenizer");
    const std::string corpus = dir_->Join("corpus.txt");
    {
      std::ofstream out(corpus);
      for (int i = 0; i < 20; ++i) out << kCorpus;
    }
    const std::string prefix = dir_->Join("tiny");
    const auto status = Tokenizer::Train(absl::StrCat(
        "--input=", corpus, " --model_prefix=", prefix,
        " --vocab_size=340 --model_type=bpe --character_coverage=1.0 --byte_fallback=true"
        " --num_threads=1 --minloglevel=2"));
    ASSERT_TRUE(status.ok()) << status;
    model_path_ = new std::string(prefix + ".model");
  }
  static void TearDownTestSuite() {
    delete model_path_;
    delete dir_;
  }

  std::unique_ptr<Tokenizer> LoadTiny() {
    auto tokenizer = Tokenizer::Load(*model_path_);
    EXPECT_TRUE(tokenizer.ok()) << tokenizer.status();
    return tokenizer.ok() ? std::move(*tokenizer) : nullptr;
  }

  static ScopedTempDir* dir_;
  static std::string* model_path_;
};

ScopedTempDir* TokenizerTest::dir_ = nullptr;
std::string* TokenizerTest::model_path_ = nullptr;

TEST_F(TokenizerTest, LoadsAndReportsSpecialIds) {
  auto tokenizer = LoadTiny();
  ASSERT_NE(tokenizer, nullptr);
  // 3 control pieces + 256 byte-fallback pieces + the corpus characters + merges.
  EXPECT_EQ(tokenizer->vocab_size(), 340);
  EXPECT_EQ(tokenizer->bos_id(), 1);
  EXPECT_EQ(tokenizer->eos_id(), 2);
  EXPECT_EQ(tokenizer->path(), *model_path_);
}

TEST_F(TokenizerTest, LoadsFromACheckpointDirectory) {
  ScopedTempDir checkpoint("checkpoint");
  {
    std::ifstream in(*model_path_, std::ios::binary);
    std::ofstream out(checkpoint.Join("tokenizer.model"), std::ios::binary);
    out << in.rdbuf();
  }
  auto tokenizer = Tokenizer::Load(checkpoint.path());
  ASSERT_TRUE(tokenizer.ok()) << tokenizer.status();
  EXPECT_EQ((*tokenizer)->path(), checkpoint.Join("tokenizer.model"));
}

TEST_F(TokenizerTest, LoadErrors) {
  ScopedTempDir dir("bad");
  auto missing = Tokenizer::Load(dir.Join("nope.model"));
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(missing.status().message(), HasSubstr("nope.model"));

  auto no_model_in_dir = Tokenizer::Load(dir.path());
  EXPECT_EQ(no_model_in_dir.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(no_model_in_dir.status().message(), HasSubstr("tokenizer.model"));

  const std::string garbage = dir.Join("garbage.model");
  std::ofstream(garbage) << "this is not a protobuf";
  auto bad = Tokenizer::Load(garbage);
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(bad.status().message(), HasSubstr("not a SentencePiece model"));
}

TEST_F(TokenizerTest, EncodeDecodeRoundTrip) {
  auto tokenizer = LoadTiny();
  ASSERT_NE(tokenizer, nullptr);
  for (const std::string text :
       {"hello world", "the router picks weights", "café über straße", "unseen: zebra ✓ 42"}) {
    auto ids = tokenizer->Encode(text, /*add_bos=*/false);
    ASSERT_TRUE(ids.ok()) << ids.status();
    ASSERT_FALSE(ids->empty());
    for (const int64_t id : *ids) {
      EXPECT_GE(id, 0);
      EXPECT_LT(id, tokenizer->vocab_size());
    }
    auto decoded = tokenizer->Decode(*ids);
    ASSERT_TRUE(decoded.ok()) << decoded.status();
    EXPECT_EQ(*decoded, text);
  }
}

TEST_F(TokenizerTest, AddBosPrependsIt) {
  auto tokenizer = LoadTiny();
  ASSERT_NE(tokenizer, nullptr);
  auto plain = tokenizer->Encode("hello", /*add_bos=*/false);
  auto with_bos = tokenizer->Encode("hello", /*add_bos=*/true);
  ASSERT_TRUE(plain.ok() && with_bos.ok());
  ASSERT_EQ(with_bos->size(), plain->size() + 1);
  EXPECT_EQ(with_bos->front(), tokenizer->bos_id());
  EXPECT_EQ(std::vector<int64_t>(with_bos->begin() + 1, with_bos->end()), *plain);
  // Control tokens decode to nothing.
  EXPECT_EQ(*tokenizer->Decode(*with_bos), "hello");
}

TEST_F(TokenizerTest, DecodeRejectsIdsOutsideTheVocabulary) {
  auto tokenizer = LoadTiny();
  ASSERT_NE(tokenizer, nullptr);
  for (const int64_t bad : {int64_t{-1}, tokenizer->vocab_size(), int64_t{1} << 40}) {
    auto decoded = tokenizer->Decode({5, bad});
    EXPECT_EQ(decoded.status().code(), absl::StatusCode::kInvalidArgument) << bad;
    EXPECT_THAT(decoded.status().message(), HasSubstr("position 1"));
  }
}

TEST(Utf8TailTest, HoldsBackIncompleteSequencesAndReplacementCharacters) {
  EXPECT_EQ(UnstableUtf8TailLength(""), 0);
  EXPECT_EQ(UnstableUtf8TailLength("abc"), 0);
  EXPECT_EQ(UnstableUtf8TailLength("caf\xC3\xA9"), 0);        // é complete
  EXPECT_EQ(UnstableUtf8TailLength("caf\xC3"), 1);            // é's first byte only
  EXPECT_EQ(UnstableUtf8TailLength("a\xE2\x9C"), 2);          // 2 of ✓'s 3 bytes
  EXPECT_EQ(UnstableUtf8TailLength("a\xF0\x9F\x98"), 3);      // 3 of 😀's 4 bytes
  EXPECT_EQ(UnstableUtf8TailLength("a\xF0\x9F\x98\x80"), 0);  // 😀 complete
  EXPECT_EQ(UnstableUtf8TailLength("a\xEF\xBF\xBD"), 3);      // U+FFFD
  EXPECT_EQ(UnstableUtf8TailLength("a\xEF\xBF\xBD\xEF\xBF\xBD\xE2"), 7);
  EXPECT_EQ(UnstableUtf8TailLength("\xEF\xBF\xBD"
                                   "b"),
            0);  // not at the end: kept
}

TEST_F(TokenizerTest, StreamDecoderConcatenatesToTheFullDecode) {
  auto tokenizer = LoadTiny();
  ASSERT_NE(tokenizer, nullptr);
  // Multi-byte characters the tiny model only knows as byte-fallback pieces come out whole.
  for (const std::string text : {"hello streaming decoder", "café über ✓ 😀 zebra"}) {
    auto ids = tokenizer->Encode(text, /*add_bos=*/true);
    ASSERT_TRUE(ids.ok());
    StreamDecoder decoder(*tokenizer);
    std::string streamed;
    for (const int64_t id : *ids) {
      auto piece = decoder.Add(id);
      ASSERT_TRUE(piece.ok()) << piece.status();
      // Never a partial UTF-8 character or a replacement character.
      EXPECT_EQ(UnstableUtf8TailLength(*piece), 0) << *piece;
      EXPECT_EQ(piece->find("\xEF\xBF\xBD"), std::string::npos) << *piece;
      streamed += *piece;
    }
    auto rest = decoder.Flush();
    ASSERT_TRUE(rest.ok());
    streamed += *rest;
    EXPECT_EQ(streamed, text);
    EXPECT_EQ(decoder.text(), text);
    EXPECT_EQ(decoder.ids(), *ids);
  }
}

TEST_F(TokenizerTest, StreamDecoderHoldsBackAByteFallbackCharacterUntilComplete) {
  auto tokenizer = LoadTiny();
  ASSERT_NE(tokenizer, nullptr);
  auto ids = tokenizer->Encode("😀", /*add_bos=*/false);
  ASSERT_TRUE(ids.ok());
  // Not in the training text: a "▁" piece then four byte pieces (<0xF0> <0x9F> <0x98> <0x80>).
  ASSERT_GE(ids->size(), 4u);
  StreamDecoder decoder(*tokenizer);
  std::string streamed;
  for (size_t i = 0; i + 1 < ids->size(); ++i) streamed += *decoder.Add((*ids)[i]);
  EXPECT_EQ(streamed, "");
  streamed += *decoder.Add(ids->back());
  EXPECT_EQ(streamed, "😀");
  EXPECT_EQ(*decoder.Flush(), "");
}

TEST_F(TokenizerTest, StreamDecoderFlushReturnsAnIncompleteTail) {
  auto tokenizer = LoadTiny();
  ASSERT_NE(tokenizer, nullptr);
  auto ids = tokenizer->Encode("a😀", /*add_bos=*/false);
  ASSERT_TRUE(ids.ok());
  ids->pop_back();  // generation stopped mid-character
  StreamDecoder decoder(*tokenizer);
  auto first = decoder.Add(*ids);
  ASSERT_TRUE(first.ok());
  EXPECT_EQ(*first, "a");
  auto rest = decoder.Flush();
  ASSERT_TRUE(rest.ok());
  EXPECT_EQ(*first + *rest, *tokenizer->Decode(*ids));
  EXPECT_THAT(*rest, HasSubstr("\xEF\xBF\xBD"));
}

TEST_F(TokenizerTest, StreamDecoderRejectsABadIdAndKeepsGoing) {
  auto tokenizer = LoadTiny();
  ASSERT_NE(tokenizer, nullptr);
  auto ids = tokenizer->Encode("hello world", /*add_bos=*/false);
  ASSERT_TRUE(ids.ok());
  StreamDecoder decoder(*tokenizer);
  ASSERT_TRUE(decoder.Add(ids->front()).ok());
  EXPECT_EQ(decoder.Add(-3).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(decoder.ids().size(), 1u);
  std::string streamed = decoder.text();
  streamed += *decoder.Add(std::vector<int64_t>(ids->begin() + 1, ids->end()));
  streamed += *decoder.Flush();
  EXPECT_EQ(streamed, "hello world");
}

}  // namespace
}  // namespace moelora
