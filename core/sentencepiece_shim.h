#ifndef MOELORA_CORE_SENTENCEPIECE_SHIM_H_
#define MOELORA_CORE_SENTENCEPIECE_SHIM_H_

// C ABI of libmoelora_sentencepiece.so, the only place that links SentencePiece.
//
// Why a separately loaded library: Debian's libsentencepiece bundles its own protobuf-lite 3.14
// and exports those symbols, and a process that also has libprotobuf 3.21 (gRPC, our protos)
// crashes at start-up in either link order. Tokenizer loads this shim with dlmopen() into a
// link-map namespace of its own, so SentencePiece and its protobuf copy stay private to it.
//
// Memory the shim returns (ids, text, error messages) comes from the shim's own C library:
// free it with moelora_spm_free, never with the caller's free().
// Functions returning int give 0 on success, else an error message in *error.

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// Exported from the shim, which hides everything else (it is built with hidden visibility).
#define MOELORA_SPM_API __attribute__((visibility("default")))

MOELORA_SPM_API void* moelora_spm_load(const char* path, char** error);
MOELORA_SPM_API void moelora_spm_destroy(void* processor);
MOELORA_SPM_API int moelora_spm_encode(const void* processor, const char* text, int64_t length,
                                       int64_t** ids, int64_t* count, char** error);
MOELORA_SPM_API int moelora_spm_decode(const void* processor, const int64_t* ids, int64_t count,
                                       char** text, char** error);
MOELORA_SPM_API int64_t moelora_spm_vocab_size(const void* processor);
MOELORA_SPM_API int64_t moelora_spm_bos_id(const void* processor);
MOELORA_SPM_API int64_t moelora_spm_eos_id(const void* processor);
// SentencePieceTrainer::Train with its flag string (tests and tools that make tiny models).
MOELORA_SPM_API int moelora_spm_train(const char* args, char** error);
MOELORA_SPM_API void moelora_spm_free(void* memory);

#ifdef __cplusplus
}
#endif

#endif  // MOELORA_CORE_SENTENCEPIECE_SHIM_H_
