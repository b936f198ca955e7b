#include "server/sentencepiece_codec.h"

#include <utility>
#include <vector>

#include "core/status_macros.h"
#include "core/tokenizer.h"

namespace moelora::server {
namespace {

class SentencePieceStream : public TextStream {
 public:
  // Keeps the tokenizer alive for as long as the stream decodes with it.
  explicit SentencePieceStream(std::shared_ptr<const Tokenizer> tokenizer)
      : tokenizer_(std::move(tokenizer)), decoder_(*tokenizer_) {}
  absl::StatusOr<std::string> Add(const std::vector<int64_t>& tokens) override {
    return decoder_.Add(tokens);
  }
  absl::StatusOr<std::string> Flush() override { return decoder_.Flush(); }

 private:
  std::shared_ptr<const Tokenizer> tokenizer_;
  StreamDecoder decoder_;
};

class SentencePieceCodec : public TextCodec {
 public:
  SentencePieceCodec(std::shared_ptr<const Tokenizer> tokenizer, bool add_bos)
      : tokenizer_(std::move(tokenizer)), add_bos_(add_bos) {}
  absl::StatusOr<std::vector<int64_t>> Encode(const std::string& text) const override {
    return tokenizer_->Encode(text, add_bos_);
  }
  std::unique_ptr<TextStream> NewStream() const override {
    return std::make_unique<SentencePieceStream>(tokenizer_);
  }

 private:
  std::shared_ptr<const Tokenizer> tokenizer_;
  bool add_bos_;
};

}  // namespace

absl::StatusOr<std::shared_ptr<const TextCodec>> LoadSentencePieceCodec(const std::string& path,
                                                                        bool add_bos) {
  ASSIGN_OR_RETURN(std::unique_ptr<Tokenizer> tokenizer, Tokenizer::Load(path));
  return std::make_shared<SentencePieceCodec>(
      std::shared_ptr<const Tokenizer>(std::move(tokenizer)), add_bos);
}

}  // namespace moelora::server
