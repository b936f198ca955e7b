#include "core/tokenizer.h"

#include <sys/stat.h>

#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"

// SentencePiece 0.1.97's header declares `namespace absl { using std::string_view; }`, which
// makes `absl::string_view` ambiguous next to Abseil's own class. Renaming that namespace for the
// include keeps both usable: SentencePiece's signatures still take std::string_view.
#define absl moelora_sentencepiece_absl
#include <sentencepiece_processor.h>
#undef absl

namespace moelora {
namespace {

bool IsDirectory(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}

bool IsRegularFile(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}

}  // namespace

absl::StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::Load(const std::string& model_path) {
  std::string file = model_path;
  if (IsDirectory(model_path)) {
    file = absl::StrCat(model_path, "/tokenizer.model");
    if (!IsRegularFile(file)) {
      return absl::NotFoundError(
          absl::StrCat("tokenizer: directory ", model_path,
                       " has no tokenizer.model (only SentencePiece tokenizers are supported)"));
    }
  } else if (!IsRegularFile(file)) {
    return absl::NotFoundError(absl::StrCat("tokenizer: no such file: ", model_path));
  }
  auto processor = std::make_unique<sentencepiece::SentencePieceProcessor>();
  const sentencepiece::util::Status status = processor->Load(file);
  if (!status.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat("tokenizer: ", file, " is not a SentencePiece model: ", status.ToString()));
  }
  if (processor->GetPieceSize() <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("tokenizer: ", file, " has an empty vocabulary"));
  }
  return std::unique_ptr<Tokenizer>(new Tokenizer(std::move(processor), std::move(file)));
}

Tokenizer::Tokenizer(std::unique_ptr<sentencepiece::SentencePieceProcessor> processor,
                     std::string path)
    : processor_(std::move(processor)), path_(std::move(path)) {}

Tokenizer::~Tokenizer() = default;

absl::StatusOr<std::vector<int64_t>> Tokenizer::Encode(absl::string_view text, bool add_bos) const {
  std::vector<int> pieces;
  const sentencepiece::util::Status status =
      processor_->Encode(std::string_view(text.data(), text.size()), &pieces);
  if (!status.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("tokenizer: encode: ", status.ToString()));
  }
  std::vector<int64_t> ids;
  ids.reserve(pieces.size() + 1);
  if (add_bos && bos_id() >= 0) ids.push_back(bos_id());
  ids.insert(ids.end(), pieces.begin(), pieces.end());
  return ids;
}

absl::StatusOr<std::string> Tokenizer::Decode(const std::vector<int64_t>& ids) const {
  const int64_t vocab = vocab_size();
  std::vector<int> pieces;
  pieces.reserve(ids.size());
  for (size_t i = 0; i < ids.size(); ++i) {
    if (ids[i] < 0 || ids[i] >= vocab) {
      return absl::InvalidArgumentError(
          absl::StrCat("tokenizer: token id ", ids[i], " at position ", i,
                       " is outside the vocabulary [0, ", vocab, ")"));
    }
    pieces.push_back(static_cast<int>(ids[i]));
  }
  std::string text;
  const sentencepiece::util::Status status = processor_->Decode(pieces, &text);
  if (!status.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("tokenizer: decode: ", status.ToString()));
  }
  return text;
}

int64_t Tokenizer::vocab_size() const { return processor_->GetPieceSize(); }
int64_t Tokenizer::bos_id() const { return processor_->bos_id(); }
int64_t Tokenizer::eos_id() const { return processor_->eos_id(); }

size_t UnstableUtf8TailLength(absl::string_view text) {
  size_t end = text.size();
  // An incomplete multi-byte sequence: a lead byte within the last 3 bytes whose continuation
  // bytes have not all arrived.
  for (size_t back = 1; back <= 4 && back <= end; ++back) {
    const unsigned char c = static_cast<unsigned char>(text[end - back]);
    if ((c & 0xC0) == 0x80) continue;  // continuation byte: keep looking for the lead
    size_t need = 1;
    if ((c & 0xE0) == 0xC0) {
      need = 2;
    } else if ((c & 0xF0) == 0xE0) {
      need = 3;
    } else if ((c & 0xF8) == 0xF0) {
      need = 4;
    }
    if (back < need) end -= back;
    break;
  }
  constexpr absl::string_view kReplacement = "\xEF\xBF\xBD";
  while (end >= kReplacement.size() &&
         text.substr(end - kReplacement.size(), kReplacement.size()) == kReplacement) {
    end -= kReplacement.size();
  }
  return text.size() - end;
}

absl::StatusOr<std::string> StreamDecoder::Add(int64_t id) { return Add(std::vector<int64_t>{id}); }

absl::StatusOr<std::string> StreamDecoder::Add(const std::vector<int64_t>& ids) {
  // Checked before they join the sequence, so a bad id leaves the decoder as it was.
  for (const int64_t id : ids) {
    if (id < 0 || id >= tokenizer_.vocab_size()) {
      return absl::InvalidArgumentError(absl::StrCat("tokenizer: token id ", id,
                                                     " is outside the vocabulary [0, ",
                                                     tokenizer_.vocab_size(), ")"));
    }
  }
  ids_.insert(ids_.end(), ids.begin(), ids.end());
  return Emit(/*flush=*/false);
}

absl::StatusOr<std::string> StreamDecoder::Flush() { return Emit(/*flush=*/true); }

absl::StatusOr<std::string> StreamDecoder::Emit(bool flush) {
  absl::StatusOr<std::string> text = tokenizer_.Decode(ids_);
  if (!text.ok()) return text.status();
  const size_t stable = flush ? text->size() : text->size() - UnstableUtf8TailLength(*text);
  if (stable <= emitted_.size()) return std::string();
  // Offsets are by length: text already returned cannot be taken back, so if a decoding ever
  // rewrote earlier text the stream continues after the same number of bytes.
  std::string piece = text->substr(emitted_.size(), stable - emitted_.size());
  emitted_ += piece;
  return piece;
}

}  // namespace moelora
