#ifndef MOELORA_SERVER_TEXT_CODEC_H_
#define MOELORA_SERVER_TEXT_CODEC_H_

// Text <-> token ids for requests that carry text. Optional: without one the server takes token
// ids only and refuses text with INVALID_ARGUMENT. core/tokenizer.h (Tokenizer + StreamDecoder)
// fits behind it in a few lines.

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace moelora::server {

// The text of one request's generated tokens, piece by piece: each Add returns the text not
// returned before (it may hold back an incomplete character), Flush what is held back.
class TextStream {
 public:
  virtual ~TextStream() = default;
  virtual absl::StatusOr<std::string> Add(const std::vector<int64_t>& tokens) = 0;
  virtual absl::StatusOr<std::string> Flush() = 0;
};

// Thread-safe: Encode runs on gRPC threads. A TextStream is used by one request at a time, on
// the engine's compute thread, so its Add must be quick.
class TextCodec {
 public:
  virtual ~TextCodec() = default;
  virtual absl::StatusOr<std::vector<int64_t>> Encode(const std::string& text) const = 0;
  virtual std::unique_ptr<TextStream> NewStream() const = 0;
};

}  // namespace moelora::server

#endif  // MOELORA_SERVER_TEXT_CODEC_H_
