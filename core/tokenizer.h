#ifndef MOELORA_CORE_TOKENIZER_H_
#define MOELORA_CORE_TOKENIZER_H_

// Text <-> token ids through a SentencePiece model (the `tokenizer.model` that Llama, Mistral and
// Gemma checkpoints ship). No torch here: library target `moelora_tokenizer`.
//
// SentencePiece itself is reached through libmoelora_sentencepiece.so, loaded on first use into a
// namespace of its own
// (core/sentencepiece_shim.h says why). It is looked for at $MOELORA_SENTENCEPIECE_SHIM, then
// by name on the library path, then where the build put it.

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace moelora {

class Tokenizer {
 public:
  // `model_path`: a SentencePiece model file, or a directory holding `tokenizer.model` (a Hugging
  // Face checkpoint directory). NotFound when there is no such file, InvalidArgument when it is
  // not a SentencePiece model.
  static absl::StatusOr<std::unique_ptr<Tokenizer>> Load(const std::string& model_path);
  ~Tokenizer();
  Tokenizer(const Tokenizer&) = delete;
  Tokenizer& operator=(const Tokenizer&) = delete;

  // Trains a SentencePiece model (SentencePieceTrainer flags, e.g. "--input=... --model_prefix=...
  // --vocab_size=..."); for tests and tools.
  static absl::Status Train(const std::string& flags);

  // Thread-safe (SentencePieceProcessor's encode and decode are const).
  absl::StatusOr<std::vector<int64_t>> Encode(absl::string_view text, bool add_bos) const;
  // InvalidArgument for an id outside [0, vocab_size()).
  absl::StatusOr<std::string> Decode(const std::vector<int64_t>& ids) const;

  int64_t vocab_size() const;
  // -1 when the model has none.
  int64_t bos_id() const;
  int64_t eos_id() const;
  // The file it was loaded from.
  const std::string& path() const { return path_; }

  // The loaded shim's entry points (opaque; defined in tokenizer.cc).
  struct Shim;

 private:
  Tokenizer(const Shim* shim, void* processor, std::string path);

  const Shim* shim_;
  void* processor_;  // owned; freed through the shim
  std::string path_;
};

// Turns a stream of generated ids into a stream of text. Each Add decodes every id so far and
// returns the part of the text not returned before, minus a tail that may still change: an
// incomplete UTF-8 sequence or trailing U+FFFD replacement characters (a byte-fallback character
// whose remaining bytes have not been generated yet). Flush returns that tail at the end.
// The concatenation of all returned pieces equals Decode(all ids) whenever each decoded prefix is
// a prefix of the next decoding (true for SentencePiece apart from the held-back tail).
// Costs one decode of the whole sequence per call: fine for the lengths a request generates.
class StreamDecoder {
 public:
  // `tokenizer` must outlive the decoder.
  explicit StreamDecoder(const Tokenizer& tokenizer) : tokenizer_(tokenizer) {}

  absl::StatusOr<std::string> Add(int64_t id);
  absl::StatusOr<std::string> Add(const std::vector<int64_t>& ids);
  // Whatever is still held back; the decoder may keep going afterwards.
  absl::StatusOr<std::string> Flush();

  const std::vector<int64_t>& ids() const { return ids_; }
  // The text returned so far.
  const std::string& text() const { return emitted_; }

 private:
  absl::StatusOr<std::string> Emit(bool flush);

  const Tokenizer& tokenizer_;
  std::vector<int64_t> ids_;
  std::string emitted_;
};

// Bytes at the end of `text` that do not form a complete UTF-8 character yet, plus any trailing
// U+FFFD characters (each "EF BF BD"): the tail a streaming decoder should hold back.
size_t UnstableUtf8TailLength(absl::string_view text);

}  // namespace moelora

#endif  // MOELORA_CORE_TOKENIZER_H_
