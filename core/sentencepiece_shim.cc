#include "core/sentencepiece_shim.h"

#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

// SentencePiece 0.1.97's header declares `namespace absl { using std::string_view; }`; renamed
// for the include so it cannot clash with Abseil (not linked here, but kept uniform).
#define absl moelora_sentencepiece_absl
#include <sentencepiece_processor.h>
#include <sentencepiece_trainer.h>
#undef absl

namespace {

char* Copy(const std::string& text) {
  char* out = static_cast<char*>(std::malloc(text.size() + 1));
  std::memcpy(out, text.data(), text.size());
  out[text.size()] = '\0';
  return out;
}

const sentencepiece::SentencePieceProcessor& Processor(const void* processor) {
  return *static_cast<const sentencepiece::SentencePieceProcessor*>(processor);
}

}  // namespace

extern "C" {

void* moelora_spm_load(const char* path, char** error) {
  auto* processor = new sentencepiece::SentencePieceProcessor();
  const auto status = processor->Load(path);
  if (!status.ok()) {
    *error = Copy(status.ToString());
    delete processor;
    return nullptr;
  }
  return processor;
}

void moelora_spm_destroy(void* processor) {
  delete static_cast<sentencepiece::SentencePieceProcessor*>(processor);
}

int moelora_spm_encode(const void* processor, const char* text, int64_t length, int64_t** ids,
                       int64_t* count, char** error) {
  std::vector<int> pieces;
  const auto status =
      Processor(processor).Encode(std::string(text, static_cast<size_t>(length)), &pieces);
  if (!status.ok()) {
    *error = Copy(status.ToString());
    return 1;
  }
  *count = static_cast<int64_t>(pieces.size());
  *ids = static_cast<int64_t*>(std::malloc(sizeof(int64_t) * (pieces.size() + 1)));
  for (size_t i = 0; i < pieces.size(); ++i) (*ids)[i] = pieces[i];
  return 0;
}

int moelora_spm_decode(const void* processor, const int64_t* ids, int64_t count, char** text,
                       char** error) {
  std::vector<int> pieces(ids, ids + count);
  std::string decoded;
  const auto status = Processor(processor).Decode(pieces, &decoded);
  if (!status.ok()) {
    *error = Copy(status.ToString());
    return 1;
  }
  *text = Copy(decoded);
  return 0;
}

int64_t moelora_spm_vocab_size(const void* processor) {
  return Processor(processor).GetPieceSize();
}
int64_t moelora_spm_bos_id(const void* processor) { return Processor(processor).bos_id(); }
int64_t moelora_spm_eos_id(const void* processor) { return Processor(processor).eos_id(); }

int moelora_spm_train(const char* args, char** error) {
  const auto status = sentencepiece::SentencePieceTrainer::Train(args);
  if (!status.ok()) {
    *error = Copy(status.ToString());
    return 1;
  }
  return 0;
}

void moelora_spm_free(void* memory) { std::free(memory); }

}  // extern "C"
