// Text in, text out: the server with a SentencePiece tokenizer (trained here, tiny) in front of a
// random model whose vocabulary is the tokenizer's.

#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>

#include <chrono>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/random_model.h"
#include "core/tokenizer.h"
#include "moelora/v1/inference.grpc.pb.h"
#include "server/sentencepiece_codec.h"
#include "server/server.h"
#include "tests/testing/temp_dir.h"

namespace moelora::server {
namespace {

constexpr int kVocab = 300;

TEST(TextTest, PromptTextInStreamedTextOutMatchesTheTokens) {
  testing_support::ScopedTempDir temp("text_test");
  {
    std::ofstream corpus(temp.Join("corpus.txt"));
    for (int i = 0; i < 30; ++i) {
      corpus << "the router mixes math and code experts in one pass\n"
             << "héllo wörld, streaming text through the daemon\n";
    }
  }
  ModelConfig config = TinyModelConfig(ModelType::kLlama);
  config.vocab_size = kVocab;
  ASSERT_TRUE(WriteRandomModel(temp.Join("model"), config, {.seed = 4}).ok());

  const auto trained = Tokenizer::Train(
      absl::StrCat("--input=", temp.Join("corpus.txt"),
                   " --model_prefix=", temp.Join("model/tokenizer"), " --vocab_size=", kVocab,
                   " --model_type=bpe --character_coverage=1.0 --byte_fallback=true --num_threads=1"
                   " --minloglevel=2"));
  ASSERT_TRUE(trained.ok()) << trained;
  ServerOptions options;
  options.model_dir = temp.Join("model");
  options.listen = "127.0.0.1:0";
  options.admin_listen = "127.0.0.1:0";
  options.log_requests = false;
  auto codec = LoadSentencePieceCodec(temp.Join("model"), /*add_bos=*/true);
  ASSERT_TRUE(codec.ok()) << codec.status();
  options.codec = *codec;
  auto server = Server::Start(options);
  ASSERT_TRUE(server.ok()) << server.status();
  auto stub = v1::Inference::NewStub(grpc::CreateChannel(
      absl::StrCat("127.0.0.1:", (*server)->data_port()), grpc::InsecureChannelCredentials()));

  v1::GenerateRequest request;
  request.set_prompt_text("the router mixes");
  request.mutable_sampling()->set_max_new_tokens(12);
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
  auto reader = stub->Generate(&context, request);
  std::vector<int64_t> tokens;
  std::string text;
  v1::GenerateResponse response;
  int64_t prompt_tokens = 0;
  while (reader->Read(&response)) {
    tokens.insert(tokens.end(), response.token_ids().begin(), response.token_ids().end());
    text += response.text();
    if (response.has_usage()) prompt_tokens = response.usage().prompt_tokens();
  }
  ASSERT_TRUE(reader->Finish().ok());
  ASSERT_EQ(tokens.size(), 12u);

  auto tokenizer = Tokenizer::Load(temp.Join("model/tokenizer.model"));
  ASSERT_TRUE(tokenizer.ok());
  auto encoded = (*tokenizer)->Encode("the router mixes", /*add_bos=*/true);
  ASSERT_TRUE(encoded.ok());
  EXPECT_EQ(prompt_tokens, static_cast<int64_t>(encoded->size()));
  auto decoded = (*tokenizer)->Decode(tokens);
  ASSERT_TRUE(decoded.ok());
  EXPECT_EQ(text, *decoded);

  // Score takes text too.
  v1::ScoreRequest score;
  score.set_text("math and code experts");
  v1::ScoreResponse scored;
  grpc::ClientContext score_context;
  ASSERT_TRUE(stub->Score(&score_context, score, &scored).ok());
  auto score_ids = (*tokenizer)->Encode("math and code experts", /*add_bos=*/true);
  EXPECT_EQ(scored.tokens_size(), static_cast<int>(score_ids->size()) - 1);
  (*server)->Shutdown(absl::Seconds(5));
}

}  // namespace
}  // namespace moelora::server
