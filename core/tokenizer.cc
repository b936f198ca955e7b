#include "core/tokenizer.h"

#include <dlfcn.h>

#include <cstdlib>
#include <type_traits>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "core/file_io.h"
#include "core/sentencepiece_shim.h"
#include "core/status_macros.h"

namespace moelora {

// The shim's entry points, resolved once.
struct Tokenizer::Shim {
  decltype(&moelora_spm_load) load;
  decltype(&moelora_spm_destroy) destroy;
  decltype(&moelora_spm_encode) encode;
  decltype(&moelora_spm_decode) decode;
  decltype(&moelora_spm_vocab_size) vocab_size;
  decltype(&moelora_spm_bos_id) bos_id;
  decltype(&moelora_spm_eos_id) eos_id;
  decltype(&moelora_spm_train) train;
  decltype(&moelora_spm_free) free;
};

namespace {

// Takes ownership of a message the shim malloc'ed.
std::string TakeMessage(const Tokenizer::Shim& shim, char* message) {
  std::string text = message != nullptr ? message : "unknown error";
  shim.free(message);
  return text;
}

absl::StatusOr<const Tokenizer::Shim*> LoadShim() {
  static const absl::StatusOr<const Tokenizer::Shim*>* const shim =
      new absl::StatusOr<const Tokenizer::Shim*>([]() -> absl::StatusOr<const Tokenizer::Shim*> {
        std::vector<std::string> candidates;
        if (const char* env = std::getenv("MOELORA_SENTENCEPIECE_SHIM"); env != nullptr) {
          candidates.push_back(env);
        }
        candidates.push_back("libmoelora_sentencepiece.so");
#ifdef MOELORA_SENTENCEPIECE_SHIM_PATH
        candidates.push_back(MOELORA_SENTENCEPIECE_SHIM_PATH);
#endif
        std::string errors;
        for (const std::string& candidate : candidates) {
          // A link-map namespace of its own: SentencePiece's bundled protobuf (and its own
          // libstdc++ instance) never meet the process's libprotobuf. RTLD_DEEPBIND is not
          // enough: the shim's iostreams would bind to libstdc++'s uninitialised originals of
          // objects the executable copy-relocated.
          void* library = dlmopen(LM_ID_NEWLM, candidate.c_str(), RTLD_NOW | RTLD_LOCAL);
          if (library == nullptr) {
            absl::StrAppend(&errors, "; ", dlerror());
            continue;
          }
          auto* loaded = new Tokenizer::Shim;
          bool complete = true;
          const auto resolve = [&](auto& function, const char* name) {
            function =
                reinterpret_cast<std::remove_reference_t<decltype(function)>>(dlsym(library, name));
            complete &= function != nullptr;
          };
          resolve(loaded->load, "moelora_spm_load");
          resolve(loaded->destroy, "moelora_spm_destroy");
          resolve(loaded->encode, "moelora_spm_encode");
          resolve(loaded->decode, "moelora_spm_decode");
          resolve(loaded->vocab_size, "moelora_spm_vocab_size");
          resolve(loaded->bos_id, "moelora_spm_bos_id");
          resolve(loaded->eos_id, "moelora_spm_eos_id");
          resolve(loaded->train, "moelora_spm_train");
          resolve(loaded->free, "moelora_spm_free");
          if (complete) return loaded;
          delete loaded;
          absl::StrAppend(&errors, "; ", candidate, " lacks the moelora_spm_* functions");
        }
        return absl::FailedPreconditionError(
            absl::StrCat("tokenizer: cannot load libmoelora_sentencepiece.so (set "
                         "MOELORA_SENTENCEPIECE_SHIM to its path)",
                         errors));
      }());
  return *shim;
}

}  // namespace

absl::Status Tokenizer::Train(const std::string& flags) {
  ASSIGN_OR_RETURN(const Shim* shim, LoadShim());
  char* error = nullptr;
  if (shim->train(flags.c_str(), &error) != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("tokenizer: training failed: ", TakeMessage(*shim, error)));
  }
  return absl::OkStatus();
}

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
  ASSIGN_OR_RETURN(const Shim* shim, LoadShim());
  char* error = nullptr;
  void* processor = shim->load(file.c_str(), &error);
  if (processor == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat(
        "tokenizer: ", file, " is not a SentencePiece model: ", TakeMessage(*shim, error)));
  }
  std::unique_ptr<Tokenizer> tokenizer(new Tokenizer(shim, processor, std::move(file)));
  if (tokenizer->vocab_size() <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("tokenizer: ", tokenizer->path(), " has an empty vocabulary"));
  }
  return tokenizer;
}

Tokenizer::Tokenizer(const Shim* shim, void* processor, std::string path)
    : shim_(shim), processor_(processor), path_(std::move(path)) {}

Tokenizer::~Tokenizer() { shim_->destroy(processor_); }

absl::StatusOr<std::vector<int64_t>> Tokenizer::Encode(absl::string_view text, bool add_bos) const {
  int64_t* pieces = nullptr;
  int64_t count = 0;
  char* error = nullptr;
  if (shim_->encode(processor_, text.data(), static_cast<int64_t>(text.size()), &pieces, &count,
                    &error) != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("tokenizer: encode: ", TakeMessage(*shim_, error)));
  }
  std::vector<int64_t> ids;
  ids.reserve(count + 1);
  if (add_bos && bos_id() >= 0) ids.push_back(bos_id());
  ids.insert(ids.end(), pieces, pieces + count);
  shim_->free(pieces);
  return ids;
}

absl::StatusOr<std::string> Tokenizer::Decode(const std::vector<int64_t>& ids) const {
  const int64_t vocab = vocab_size();
  for (size_t i = 0; i < ids.size(); ++i) {
    if (ids[i] < 0 || ids[i] >= vocab) {
      return absl::InvalidArgumentError(
          absl::StrCat("tokenizer: token id ", ids[i], " at position ", i,
                       " is outside the vocabulary [0, ", vocab, ")"));
    }
  }
  char* text = nullptr;
  char* error = nullptr;
  if (shim_->decode(processor_, ids.data(), static_cast<int64_t>(ids.size()), &text, &error) != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("tokenizer: decode: ", TakeMessage(*shim_, error)));
  }
  std::string decoded = text;
  shim_->free(text);
  return decoded;
}

int64_t Tokenizer::vocab_size() const { return shim_->vocab_size(processor_); }
int64_t Tokenizer::bos_id() const { return shim_->bos_id(processor_); }
int64_t Tokenizer::eos_id() const { return shim_->eos_id(processor_); }

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
