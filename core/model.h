#ifndef MOELORA_CORE_MODEL_H_
#define MOELORA_CORE_MODEL_H_

// The decoder for llama / mistral / qwen2 / gemma checkpoints, with a slot-based KV cache.
//
// Token layout: a forward takes a batch of sequences, each with its new tokens (a whole prompt
// on prefill, one token per step on decode, or any mix). The new tokens of all sequences are
// packed into one [tokens, hidden] matrix for every projection, so a per-token adapter weight is
// a plain row index; only attention pads them to [batch, heads, max_new, head_dim].

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>

#include <atomic>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "core/linear.h"
#include "core/model_config.h"
#include "core/rms_norm.h"

namespace moelora {

class DecodeGraphs;

struct LoadOptions {
  c10::Device device = c10::Device(c10::kCPU);
  // Weights and activations; RMSNorm statistics, RoPE angles and softmax run in fp32 whatever it
  // is.
  at::ScalarType dtype = at::kFloat;
  // Room next to every projection's weight for an expert pool's stacked LoRA matrices (its
  // capacity slots of max_rank rows; see RoomLayout and LinearGroup): A after W where the output
  // is at most as wide as the input, so the base GEMM also computes the shrink (q, k and v share
  // one GEMM and one room); where it is wider (gate, up), B beside W, so the base GEMM also does
  // the expand, unless the pool is big enough for sparse routing (AdapterRoom::wide_layout).
  // None: a pool keeps A and B in its own buffers (same results, one more GEMM and one more pass
  // per projection).
  AdapterRoom adapter_room;
};

// "auto" | "cpu" | "cuda" | "cuda:N" and "auto" | "fp32" | "bf16" | "fp16" (what the tools' and the
// server's --device / --dtype flags take): auto is CUDA when this build and machine have it,
// else the CPU; and bf16 on CUDA, fp32 on the CPU. InvalidArgument names the bad value.
absl::StatusOr<LoadOptions> ParseLoadOptions(const std::string& device, const std::string& dtype);

// "auto" | "rows" | "columns" (the server's --wide_room_layout) as AdapterRoom::wide_layout:
// auto is unset (the pool's size decides). InvalidArgument names the bad value.
absl::StatusOr<std::optional<RoomLayout>> ParseWideRoomLayout(absl::string_view value);

// Keys and values of every layer for `num_slots` sequences of up to `max_seq_len` tokens.
// A sequence owns a slot from its first token to its end; the cache records how many tokens each
// slot holds. Layout per layer: [slots, max_seq_len, kv_heads, head_dim].
class KvCache {
 public:
  KvCache() = default;
  int64_t num_slots() const { return static_cast<int64_t>(lengths_.size()); }
  int64_t max_seq_len() const { return max_seq_len_; }
  int64_t length(int64_t slot) const { return lengths_.at(slot); }
  // Forget a slot's tokens (when its sequence ends); the memory stays allocated.
  void Reset(int64_t slot) { lengths_.at(slot) = 0; }
  int64_t bytes() const;

 private:
  friend class Model;
  int64_t max_seq_len_ = 0;
  std::vector<int64_t> lengths_;
  std::vector<at::Tensor> keys_;    // one per layer
  std::vector<at::Tensor> values_;  // one per layer
};

// One sequence's part of a forward: its cache slot and the tokens to append.
struct SequenceInput {
  int64_t slot = 0;
  std::vector<int64_t> tokens;
};

struct ForwardOptions {
  // Logits of every new token ([tokens, vocab], packed in input order) instead of only the last
  // token of each sequence ([sequences, vocab]).
  bool all_logits = false;
  // Also return the final (normed) hidden state of every new token.
  bool return_hidden = false;
  // Adapter hook applied in every projection; null for the base model.
  const LinearDelta* delta = nullptr;
  // Mixture forwards: decode steps this accepts run through CUDA graphs (core/decode_graphs.h).
  DecodeGraphs* decode_graphs = nullptr;
};

// Device tensors of one decode step (every sequence brings exactly one token), with shapes fixed by
// the batch size and a context bucket: what a CUDA graph captures and then replays with new values.
struct DecodeStepInputs {
  at::Tensor ids;        // [batch] long, on the model's device
  at::Tensor slots;      // [batch] long: distinct cache slots
  at::Tensor positions;  // [batch] long: each slot's length before this token
  int64_t context = 0;   // keys attended per sequence: > every position, <= the cache's max_seq_len
};

struct ForwardOutput {
  at::Tensor logits;  // model dtype, on the model's device
  at::Tensor hidden;  // [tokens, hidden] when requested
  // Row offsets of each sequence's tokens in the packed layout (size sequences + 1).
  std::vector<int64_t> token_offsets;
};

class Model {
 public:
  // Reads `dir`/config.json and the safetensors weights (single file or sharded), checks every
  // tensor's shape against the config and places the weights on the device in the dtype asked.
  static absl::StatusOr<std::unique_ptr<Model>> Load(const std::string& dir,
                                                     const LoadOptions& options = {});

  const ModelConfig& config() const { return config_; }
  const LoadOptions& options() const { return options_; }

  absl::StatusOr<KvCache> CreateKvCache(int64_t num_slots, int64_t max_seq_len) const;

  // Appends each sequence's tokens to its slot and returns logits. Slots must be distinct; token
  // ids in range; the slot's length plus new tokens within max_seq_len. On error the cache is left
  // as it was for every slot's length (InvalidArgument for bad input, Internal for a torch error).
  absl::StatusOr<ForwardOutput> Forward(const std::vector<SequenceInput>& batch, KvCache& cache,
                                        const ForwardOptions& options = {}) const;

  // What Forward checks before running: distinct slots in range, token ids in the vocabulary, room
  // in the cache (InvalidArgument otherwise).
  absl::Status ValidateBatch(const std::vector<SequenceInput>& batch, const KvCache& cache) const;

  // One decode step from device-side inputs with no host work and no synchronisation, so that it
  // can be captured in a CUDA graph: writes the new keys and values and returns the [batch, vocab]
  // logits, but leaves the cache's lengths alone (CommitDecodeStep advances them once the step
  // has run). Inputs must be valid (ValidateBatch); throws c10::Error.
  at::Tensor DecodeStep(const DecodeStepInputs& inputs, KvCache& cache,
                        const LinearDelta* delta) const;
  void CommitDecodeStep(const std::vector<SequenceInput>& batch, KvCache& cache) const;

  // Token embeddings (Gemma's scale included) of the given ids: [n, hidden]. Routers read these.
  absl::StatusOr<at::Tensor> Embed(const std::vector<int64_t>& tokens) const;

  // Every projection, for adapters to validate shapes against: projection(layer, kind).
  const Linear& projection(int64_t layer, ProjectionKind kind) const;
  // q, k and v of a layer, stacked in one buffer (their room slot-major across the three).
  const LinearGroup& qkv(int64_t layer) const;
  // Weights only: the projections' adapter room is the expert pool's.
  int64_t parameter_bytes() const;

  // The projections' adapter room (LoadOptions::adapter_room) belongs to at most one expert
  // pool at a time: true when the model has room and the caller now owns it.
  bool ClaimAdapterRoom() const;
  void ReleaseAdapterRoom() const;

 private:
  struct Layer {
    at::Tensor input_norm;
    at::Tensor post_attention_norm;
    LinearGroup qkv;                          // q, k and v: one input, one GEMM
    Linear projections[kNumProjectionKinds];  // q, k and v: views into qkv
  };

  // One step's tokens as device tensors: what the decoder layers need beyond the weights.
  struct StepPlan {
    int64_t num_seqs = 0;
    int64_t max_new = 0;     // most new tokens of one sequence
    int64_t max_total = 0;   // keys attended per sequence
    at::Tensor ids;          // [tokens] packed
    at::Tensor positions;    // [tokens]
    at::Tensor token_slots;  // [tokens]
    at::Tensor slots;        // [seqs]
    // [tokens] row of each token in [seqs * max_new], where sequences differ in new tokens
    // (undefined where the packed tokens already are that matrix: every sequence has max_new).
    at::Tensor padded_rows;
    // Every sequence starts empty and brings max_new tokens, within any sliding window: the mask
    // is plain causal (a fresh prefill of equal lengths).
    bool causal_only = false;
    // [seqs, 1, 1, max_new, max_total] masked keys. A decode step leaves it undefined: the
    // decoder builds it only if ATen's attention path runs (the decode kernel needs no mask).
    at::Tensor blocked;
  };

  Model() = default;
  absl::Status LoadWeights(const std::string& dir);
  // The forward proper; throws c10::Error, which Forward turns into a Status.
  ForwardOutput ForwardValidated(const std::vector<SequenceInput>& batch, KvCache& cache,
                                 const ForwardOptions& options) const;
  at::Tensor RunDecoder(const StepPlan& plan, KvCache& cache, const LinearDelta* delta) const;
  at::Tensor BlockedKeys(const at::Tensor& query_pos, const at::Tensor& totals,
                         int64_t max_total) const;
  at::Tensor EmbedTensor(const at::Tensor& ids) const;
  // Into `out` when given (a view of a wider buffer), else a new tensor.
  at::Tensor RmsNorm(const at::Tensor& x, const at::Tensor& weight, at::Tensor out = {}) const;
  // The residual add h + residual and the norm after it, in one pass where a kernel applies (the
  // norm also into out_copy when given).
  AddAndNorm AddRmsNorm(const at::Tensor& h, const at::Tensor& residual, const at::Tensor& weight,
                        at::Tensor out = {}, at::Tensor out_copy = {}) const;
  NormWeighting norm_weighting() const;
  at::Tensor RopeInverseFrequencies() const;

  ModelConfig config_;
  LoadOptions options_;
  at::Tensor embed_tokens_;
  at::Tensor final_norm_;
  at::Tensor lm_head_;
  at::Tensor inv_freq_;     // [head_dim / 2], fp32
  at::Tensor embed_scale_;  // sqrt(hidden) in the model's dtype where the config scales embeddings
  std::vector<Layer> layers_;
  mutable std::atomic<bool> adapter_room_claimed_{false};
};

}  // namespace moelora

#endif  // MOELORA_CORE_MODEL_H_
