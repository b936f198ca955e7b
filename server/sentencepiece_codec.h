#ifndef MOELORA_SERVER_SENTENCEPIECE_CODEC_H_
#define MOELORA_SERVER_SENTENCEPIECE_CODEC_H_

// TextCodec over core's SentencePiece Tokenizer: requests may then carry text, and Generate
// streams text beside the token ids.

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "server/text_codec.h"

namespace moelora::server {

// `path` is a tokenizer.model file or a checkpoint directory holding one. `add_bos`: prepend
// the tokenizer's BOS id to encoded prompts (what Llama-family models were trained with).
absl::StatusOr<std::shared_ptr<const TextCodec>> LoadSentencePieceCodec(const std::string& path,
                                                                        bool add_bos);

}  // namespace moelora::server

#endif  // MOELORA_SERVER_SENTENCEPIECE_CODEC_H_
