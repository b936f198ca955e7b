#include "core/model.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <torch/version.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <set>
#include <tuple>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "core/checkpoint.h"
#include "core/decode_attention.h"
#include "core/rms_norm.h"
#include "core/rope.h"
#include "core/skinny_linear.h"
#include "core/status_macros.h"
#include "core/strided_ops.h"

// torch's fused attention (scaled_dot_product_attention) exists from torch 2; Debian's 1.13 (the
// CPU build) keeps the explicit fp32 path.
#if TORCH_VERSION_MAJOR >= 2
#define MOELORA_HAVE_FUSED_ATTENTION 1
#endif
// Its grouped-query form (enable_gqa) from torch 2.5.
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 5)
#define MOELORA_HAVE_GQA_ATTENTION 1
#endif

namespace moelora {

absl::StatusOr<LoadOptions> ParseLoadOptions(const std::string& device, const std::string& dtype) {
  LoadOptions options;
  if (device == "auto") {
    options.device = at::hasCUDA() ? c10::Device(c10::kCUDA, 0) : c10::Device(c10::kCPU);
  } else {
    try {
      options.device = c10::Device(device);
    } catch (const c10::Error& e) {
      return absl::InvalidArgumentError(absl::StrCat("device '", device, "' is not a device"));
    }
    if (options.device.is_cuda() && !at::hasCUDA()) {
      return absl::InvalidArgumentError(
          absl::StrCat("device '", device, "': this build or machine has no CUDA"));
    }
  }
  if (dtype == "auto") {
    options.dtype = options.device.is_cuda() ? at::kBFloat16 : at::kFloat;
  } else if (dtype == "fp32") {
    options.dtype = at::kFloat;
  } else if (dtype == "bf16") {
    options.dtype = at::kBFloat16;
  } else if (dtype == "fp16") {
    options.dtype = at::kHalf;
  } else {
    return absl::InvalidArgumentError(
        absl::StrCat("dtype '", dtype, "': expected auto, fp32, bf16 or fp16"));
  }
  return options;
}

absl::StatusOr<std::optional<RoomLayout>> ParseWideRoomLayout(absl::string_view value) {
  if (value == "auto") return std::nullopt;
  if (value == "rows") return RoomLayout::kRows;
  if (value == "columns") return RoomLayout::kColumns;
  return absl::InvalidArgumentError(
      absl::StrCat("wide room layout '", value, "': expected auto, rows or columns"));
}

namespace {

at::Tensor LongTensor(const std::vector<int64_t>& values, c10::Device device) {
  return at::tensor(values, at::TensorOptions().dtype(at::kLong)).to(device);
}

// Where norms and attention accumulate: fp32 for half types (as transformers does), the model's
// own type for fp32 and fp64 (gradient checks run in fp64).
at::ScalarType AccumulateType(at::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace

int64_t KvCache::bytes() const {
  int64_t total = 0;
  for (const auto& t : keys_) total += t.numel() * t.element_size();
  for (const auto& t : values_) total += t.numel() * t.element_size();
  return total;
}

absl::StatusOr<std::unique_ptr<Model>> Model::Load(const std::string& dir,
                                                   const LoadOptions& options) {
  if (!at::isFloatingType(options.dtype)) {
    return absl::InvalidArgumentError(
        absl::StrCat("model dtype must be floating point, got ", c10::toString(options.dtype)));
  }
  if (options.adapter_room.slots < 0 || options.adapter_room.rank < 0) {
    return absl::InvalidArgumentError(absl::StrCat("adapter room slots and rank must be >= 0, got ",
                                                   options.adapter_room.slots, " and ",
                                                   options.adapter_room.rank));
  }
  std::unique_ptr<Model> model(new Model());
  model->options_ = options;
  ASSIGN_OR_RETURN(model->config_, ModelConfig::FromFile(dir + "/config.json"));
  try {
    RETURN_IF_ERROR(model->LoadWeights(dir));
    model->inv_freq_ = model->RopeInverseFrequencies().to(options.device);
    if (model->config_.scale_embeddings) {
      // transformers rounds sqrt(hidden) to the activation dtype before multiplying. Made once:
      // a scalar made on the device per step would be one more kernel in every step.
      model->embed_scale_ =
          at::scalar_tensor(std::sqrt(static_cast<double>(model->config_.hidden_size)),
                            at::TensorOptions().dtype(options.dtype).device(options.device));
    }
  } catch (const c10::Error& e) {
    return absl::InternalError(
        absl::StrCat("loading model from ", dir, ": ", e.what_without_backtrace()));
  }
  return model;
}

absl::Status Model::LoadWeights(const std::string& dir) {
  ASSIGN_OR_RETURN(Checkpoint checkpoint, Checkpoint::OpenDirectory(dir));
  const ModelConfig& c = config_;
  auto load = [&](const std::string& name,
                  std::vector<int64_t> shape) -> absl::StatusOr<at::Tensor> {
    ASSIGN_OR_RETURN(at::Tensor tensor, checkpoint.Get(name, shape));
    if (!at::isFloatingType(tensor.scalar_type())) {
      return absl::InvalidArgumentError(
          absl::StrCat("tensor '", name, "' in ", checkpoint.Location(name), ": dtype ",
                       c10::toString(tensor.scalar_type()), ", expected a floating-point type"));
    }
    return tensor.to(options_.device, options_.dtype).contiguous();
  };
  // RMSNorm weights; Gemma's (1 + w) is folded in once, in fp32 where the norm runs.
  auto load_norm = [&](const std::string& name) -> absl::StatusOr<at::Tensor> {
    ASSIGN_OR_RETURN(at::Tensor w, load(name, {c.hidden_size}));
    if (c.norm_weight_plus_one) return w.to(AccumulateType(options_.dtype)) + 1.0;
    return w;
  };
  ASSIGN_OR_RETURN(embed_tokens_, load("model.embed_tokens.weight", {c.vocab_size, c.hidden_size}));
  ASSIGN_OR_RETURN(final_norm_, load_norm("model.norm.weight"));
  if (c.tie_word_embeddings) {
    lm_head_ = embed_tokens_;
  } else {
    ASSIGN_OR_RETURN(lm_head_, load("lm_head.weight", {c.vocab_size, c.hidden_size}));
  }

  layers_.resize(c.num_hidden_layers);
  for (int64_t i = 0; i < c.num_hidden_layers; ++i) {
    Layer& layer = layers_[i];
    const std::string prefix = absl::StrCat("model.layers.", i, ".");
    ASSIGN_OR_RETURN(layer.input_norm, load_norm(prefix + "input_layernorm.weight"));
    ASSIGN_OR_RETURN(layer.post_attention_norm,
                     load_norm(prefix + "post_attention_layernorm.weight"));
    std::vector<at::Tensor> weights(kNumProjectionKinds), biases(kNumProjectionKinds);
    for (int k = 0; k < kNumProjectionKinds; ++k) {
      const auto [out, in, has_bias] = ShapeOf(c, static_cast<ProjectionKind>(k));
      const std::string path = ProjectionId{i, static_cast<ProjectionKind>(k)}.ModulePath();
      ASSIGN_OR_RETURN(weights[k], load(path + ".weight", {out, in}));
      if (has_bias) {
        ASSIGN_OR_RETURN(biases[k], load(path + ".bias", {out}));
      }
    }
    const std::vector<ProjectionKind> qkv = {ProjectionKind::kQ, ProjectionKind::kK,
                                             ProjectionKind::kV};
    std::vector<ProjectionId> qkv_ids;
    std::vector<at::Tensor> qkv_weights, qkv_biases;
    for (ProjectionKind kind : qkv) {
      qkv_ids.push_back({i, kind});
      qkv_weights.push_back(std::move(weights[static_cast<int>(kind)]));
      qkv_biases.push_back(std::move(biases[static_cast<int>(kind)]));
    }
    layer.qkv = LinearGroup(std::move(qkv_ids), std::move(qkv_weights), std::move(qkv_biases),
                            options_.adapter_room);
    for (size_t member = 0; member < qkv.size(); ++member) {
      layer.projections[static_cast<int>(qkv[member])] = layer.qkv.members()[member];
    }
    for (ProjectionKind kind :
         {ProjectionKind::kO, ProjectionKind::kGate, ProjectionKind::kUp, ProjectionKind::kDown}) {
      const int k = static_cast<int>(kind);
      const RoomLayout layout =
          options_.adapter_room.LayoutFor(weights[k].size(0), weights[k].size(1));
      layer.projections[k] = Linear({i, kind}, std::move(weights[k]), std::move(biases[k]),
                                    options_.adapter_room, layout);
    }
  }
  return absl::OkStatus();
}

// HF's default RoPE frequencies (computed in fp32 as transformers does), with llama3 scaling.
at::Tensor Model::RopeInverseFrequencies() const {
  const int64_t dim = config_.head_dim;
  at::Tensor exponents = at::arange(0, dim, 2, at::kLong).to(at::kFloat) / static_cast<double>(dim);
  at::Tensor inv_freq = 1.0 / at::pow(config_.rope_theta, exponents);
  if (!config_.llama3_rope_scaling.has_value()) return inv_freq;
  const Llama3RopeScaling& s = *config_.llama3_rope_scaling;
  const double old_context = static_cast<double>(s.original_max_position_embeddings);
  const double low_freq_wavelen = old_context / s.low_freq_factor;
  const double high_freq_wavelen = old_context / s.high_freq_factor;
  at::Tensor wavelen = 2.0 * M_PI / inv_freq;
  at::Tensor scaled = at::where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq);
  at::Tensor smooth =
      (old_context / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
  at::Tensor smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled;
  at::Tensor medium = at::logical_not(wavelen < high_freq_wavelen)
                          .logical_and(at::logical_not(wavelen > low_freq_wavelen));
  return at::where(medium, smoothed, scaled);
}

absl::StatusOr<KvCache> Model::CreateKvCache(int64_t num_slots, int64_t max_seq_len) const {
  if (num_slots <= 0 || max_seq_len <= 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "KV cache needs slots > 0 and max_seq_len > 0, got ", num_slots, " and ", max_seq_len));
  }
  KvCache cache;
  cache.max_seq_len_ = max_seq_len;
  cache.lengths_.assign(num_slots, 0);
  const auto tensor_options = at::TensorOptions().dtype(options_.dtype).device(options_.device);
  try {
    for (int64_t i = 0; i < config_.num_hidden_layers; ++i) {
      const std::vector<int64_t> shape = {num_slots, max_seq_len, config_.num_key_value_heads,
                                          config_.head_dim};
      cache.keys_.push_back(at::zeros(shape, tensor_options));
      cache.values_.push_back(at::zeros(shape, tensor_options));
    }
  } catch (const c10::Error& e) {
    return absl::ResourceExhaustedError(absl::StrCat("allocating a KV cache of ", num_slots, " x ",
                                                     max_seq_len,
                                                     " tokens: ", e.what_without_backtrace()));
  }
  return cache;
}

absl::Status Model::ValidateBatch(const std::vector<SequenceInput>& batch,
                                  const KvCache& cache) const {
  if (batch.empty()) return absl::InvalidArgumentError("forward: empty batch");
  if (static_cast<int64_t>(cache.keys_.size()) != config_.num_hidden_layers) {
    return absl::InvalidArgumentError("forward: KV cache was not created by this model");
  }
  std::set<int64_t> slots;
  for (size_t b = 0; b < batch.size(); ++b) {
    const SequenceInput& seq = batch[b];
    if (seq.slot < 0 || seq.slot >= cache.num_slots()) {
      return absl::InvalidArgumentError(absl::StrCat("forward: sequence ", b, " uses slot ",
                                                     seq.slot, ", cache has ", cache.num_slots()));
    }
    if (!slots.insert(seq.slot).second) {
      return absl::InvalidArgumentError(
          absl::StrCat("forward: slot ", seq.slot, " appears twice in one batch"));
    }
    if (seq.tokens.empty()) {
      return absl::InvalidArgumentError(absl::StrCat("forward: sequence ", b, " has no tokens"));
    }
    for (int64_t token : seq.tokens) {
      if (token < 0 || token >= config_.vocab_size) {
        return absl::InvalidArgumentError(absl::StrCat("forward: sequence ", b, " has token id ",
                                                       token, " outside [0, ", config_.vocab_size,
                                                       ")"));
      }
    }
    const int64_t total = cache.length(seq.slot) + static_cast<int64_t>(seq.tokens.size());
    if (total > cache.max_seq_len()) {
      return absl::InvalidArgumentError(
          absl::StrCat("forward: sequence ", b, " would hold ", total,
                       " tokens, more than the KV cache's max_seq_len ", cache.max_seq_len()));
    }
  }
  return absl::OkStatus();
}

at::Tensor Model::EmbedTensor(const at::Tensor& ids) const {
  at::Tensor h = at::embedding(embed_tokens_, ids);
  if (embed_scale_.defined()) h = h * embed_scale_;
  return h;
}

absl::StatusOr<at::Tensor> Model::Embed(const std::vector<int64_t>& tokens) const {
  for (int64_t token : tokens) {
    if (token < 0 || token >= config_.vocab_size) {
      return absl::InvalidArgumentError(
          absl::StrCat("embed: token id ", token, " outside [0, ", config_.vocab_size, ")"));
    }
  }
  try {
    return EmbedTensor(LongTensor(tokens, options_.device));
  } catch (const c10::Error& e) {
    return absl::InternalError(absl::StrCat("embed: ", e.what_without_backtrace()));
  }
}

NormWeighting Model::norm_weighting() const {
  return config_.norm_weight_plus_one ? NormWeighting::kWeightInFp32
                                      : NormWeighting::kRoundThenWeight;
}

at::Tensor Model::RmsNorm(const at::Tensor& x, const at::Tensor& weight, at::Tensor out) const {
  return moelora::RmsNorm(x, weight, config_.rms_norm_eps, norm_weighting(), std::move(out));
}

AddAndNorm Model::AddRmsNorm(const at::Tensor& h, const at::Tensor& residual,
                             const at::Tensor& weight, at::Tensor out, at::Tensor out_copy) const {
  return moelora::AddRmsNorm(h, residual, weight, config_.rms_norm_eps, norm_weighting(),
                             std::move(out), std::move(out_copy));
}

const Linear& Model::projection(int64_t layer, ProjectionKind kind) const {
  return layers_.at(layer).projections[static_cast<int>(kind)];
}

const LinearGroup& Model::qkv(int64_t layer) const { return layers_.at(layer).qkv; }

bool Model::ClaimAdapterRoom() const {
  if (options_.adapter_room.empty()) return false;
  bool expected = false;
  return adapter_room_claimed_.compare_exchange_strong(expected, true);
}

void Model::ReleaseAdapterRoom() const { adapter_room_claimed_.store(false); }

int64_t Model::parameter_bytes() const {
  auto bytes = [](const at::Tensor& t) { return t.defined() ? t.numel() * t.element_size() : 0; };
  int64_t total = bytes(embed_tokens_) + bytes(final_norm_);
  if (!config_.tie_word_embeddings) total += bytes(lm_head_);
  for (const Layer& layer : layers_) {
    total += bytes(layer.input_norm) + bytes(layer.post_attention_norm);
    for (const Linear& linear : layer.projections) {
      total += bytes(linear.weight()) + bytes(linear.bias());
    }
  }
  return total;
}

absl::StatusOr<ForwardOutput> Model::Forward(const std::vector<SequenceInput>& batch,
                                             KvCache& cache, const ForwardOptions& options) const {
  RETURN_IF_ERROR(ValidateBatch(batch, cache));
  try {
    return ForwardValidated(batch, cache, options);
  } catch (const c10::Error& e) {
    return absl::InternalError(
        absl::StrCat("forward of ", batch.size(), " sequences: ", e.what_without_backtrace()));
  }
}

ForwardOutput Model::ForwardValidated(const std::vector<SequenceInput>& batch, KvCache& cache,
                                      const ForwardOptions& options) const {
  const c10::Device device = options_.device;
  const int64_t num_seqs = static_cast<int64_t>(batch.size());

  // Packed-token bookkeeping, built on the host once per forward.
  int64_t max_new = 0, max_total = 0;
  for (const SequenceInput& seq : batch) {
    const int64_t n = static_cast<int64_t>(seq.tokens.size());
    max_new = std::max(max_new, n);
    max_total = std::max(max_total, cache.length(seq.slot) + n);
  }
  ForwardOutput output;
  output.token_offsets.push_back(0);
  std::vector<int64_t> ids, positions, token_slots, padded_rows, slots, past, totals, last_rows;
  for (int64_t b = 0; b < num_seqs; ++b) {
    const SequenceInput& seq = batch[b];
    const int64_t start = cache.length(seq.slot);
    const int64_t n = static_cast<int64_t>(seq.tokens.size());
    for (int64_t t = 0; t < n; ++t) {
      ids.push_back(seq.tokens[t]);
      positions.push_back(start + t);
      token_slots.push_back(seq.slot);
      padded_rows.push_back(b * max_new + t);
    }
    slots.push_back(seq.slot);
    past.push_back(start);
    totals.push_back(start + n);
    output.token_offsets.push_back(output.token_offsets.back() + n);
    last_rows.push_back(output.token_offsets.back() - 1);
  }
  StepPlan plan;
  plan.num_seqs = num_seqs;
  plan.max_new = max_new;
  plan.max_total = max_total;
  plan.ids = LongTensor(ids, device);
  plan.positions = LongTensor(positions, device);
  plan.token_slots = LongTensor(token_slots, device);
  plan.slots = LongTensor(slots, device);
  if (max_new > 1 && static_cast<int64_t>(ids.size()) != num_seqs * max_new) {
    plan.padded_rows = LongTensor(padded_rows, device);
  }
  plan.causal_only = max_new > 1 && !plan.padded_rows.defined() && max_total == max_new &&
                     (config_.sliding_window <= 0 || config_.sliding_window >= max_new);
  const at::Tensor query_pos =
      LongTensor(past, device).view({num_seqs, 1}) +
      at::arange(max_new, at::TensorOptions().dtype(at::kLong).device(device)).view({1, max_new});
  plan.blocked = BlockedKeys(query_pos, LongTensor(totals, device), max_total);

  at::Tensor h = RunDecoder(plan, cache, options.delta);
  if (options.return_hidden) output.hidden = h;
  const at::Tensor selected =
      options.all_logits ? h : h.index_select(0, LongTensor(last_rows, device));
  output.logits = SkinnyLinear(selected, lm_head_, at::Tensor());
  // Only now, with every step done, do the slots own their new tokens.
  for (const SequenceInput& seq : batch) {
    cache.lengths_[seq.slot] += static_cast<int64_t>(seq.tokens.size());
  }
  return output;
}

at::Tensor Model::DecodeStep(const DecodeStepInputs& inputs, KvCache& cache,
                             const LinearDelta* delta) const {
  StepPlan plan;
  plan.num_seqs = inputs.ids.size(0);
  plan.max_new = 1;
  plan.max_total = inputs.context;
  plan.ids = inputs.ids;
  plan.positions = inputs.positions;
  plan.token_slots = inputs.slots;
  plan.slots = inputs.slots;
  return SkinnyLinear(RunDecoder(plan, cache, delta), lm_head_, at::Tensor());
}

void Model::CommitDecodeStep(const std::vector<SequenceInput>& batch, KvCache& cache) const {
  for (const SequenceInput& seq : batch) ++cache.lengths_[seq.slot];
}

// Attention mask [seqs, 1, 1, queries, max_total]: true where a query must not see a key — past
// its own position (causal), past the sequence's length, or outside Mistral's sliding window.
at::Tensor Model::BlockedKeys(const at::Tensor& query_pos, const at::Tensor& totals,
                              int64_t max_total) const {
  const int64_t num_seqs = query_pos.size(0), queries = query_pos.size(1);
  const at::Tensor key_pos =
      at::arange(max_total, at::TensorOptions().dtype(at::kLong).device(query_pos.device()))
          .view({1, 1, max_total});
  at::Tensor allowed =
      key_pos.le(query_pos.unsqueeze(2)).logical_and(key_pos.lt(totals.view({num_seqs, 1, 1})));
  if (config_.sliding_window > 0) {
    allowed = allowed.logical_and((query_pos.unsqueeze(2) - key_pos).lt(config_.sliding_window));
  }
  return allowed.logical_not().view({num_seqs, 1, 1, queries, max_total});
}

// The decoder layers and the final norm over a step's packed tokens: device work only (no host
// reads), so a decode step can be captured in a CUDA graph.
at::Tensor Model::RunDecoder(const StepPlan& plan, KvCache& cache, const LinearDelta* delta) const {
  const ModelConfig& c = config_;
  const int64_t num_seqs = plan.num_seqs, max_new = plan.max_new, max_total = plan.max_total;
  const int64_t num_tokens = plan.ids.size(0);

  const int64_t heads = c.num_attention_heads, kv_heads = c.num_key_value_heads, d = c.head_dim;
  const int64_t groups = heads / kv_heads;
  const at::ScalarType accumulate = AccumulateType(options_.dtype);
  const double scale = 1.0 / std::sqrt(static_cast<double>(d));
  auto proj = [&](const Layer& layer, ProjectionKind kind, const at::Tensor& x) {
    return layer.projections[static_cast<int>(kind)].Forward(x, delta);
  };
  // A decode step's mask, built on first use: keys past a sequence's own length (up to the
  // bucket's context) are masked like padding.
  at::Tensor blocked = plan.blocked;
  auto blocked_keys = [&]() -> const at::Tensor& {
    if (!blocked.defined()) {
      blocked = BlockedKeys(plan.positions.view({num_seqs, 1}), plan.positions + 1, max_total);
    }
    return blocked;
  };
  // Prefill in bf16/fp16 on CUDA: the attention core is torch's fused kernel (fp32 accumulation
  // inside, no fp32 copy of the cached keys and values; 10% faster prefill on gemma-2b), with the
  // same mask grouped like the queries. A decode step (one query per sequence) takes our decode
  // attention kernel instead where it applies (it measured faster than both torch paths there);
  // fp32 models keep the explicit path (the one their golden tests check).
#ifdef MOELORA_HAVE_FUSED_ATTENTION
  const bool fused_attention = options_.device.is_cuda() && max_new > 1 &&
                               (options_.dtype == at::kBFloat16 || options_.dtype == at::kHalf);
#endif
  // A fresh prefill of equal lengths needs no mask at all: torch's causal form with grouped
  // queries reads the queries as a view of the packed tokens (no grouped copy, no bias) and may
  // take its flash kernel.
#ifdef MOELORA_HAVE_GQA_ATTENTION
  const bool causal_attention = fused_attention && plan.causal_only;
#else
  const bool causal_attention = false;
#endif
#ifdef MOELORA_HAVE_FUSED_ATTENTION
  // Otherwise the mask as the additive bias (0 where a key is seen, -inf elsewhere) that
  // scaled_dot_product_attention makes of a boolean one, made once here rather than by every
  // layer's call (three kernels over [seqs, groups * max_new, max_total] a layer).
  at::Tensor attention_bias;
  if (fused_attention && !causal_attention) {
    const at::Tensor blocked_grouped = blocked_keys()
                                           .expand({num_seqs, 1, groups, max_new, max_total})
                                           .reshape({num_seqs, 1, groups * max_new, max_total});
    attention_bias =
        at::zeros(blocked_grouped.sizes(), blocked_grouped.options().dtype(options_.dtype))
            .masked_fill_(blocked_grouped, -std::numeric_limits<double>::infinity());
  }
#endif

  // h is the residual stream, x its norm for the next block; each residual add and the norm
  // after it run as one step.
  at::Tensor h = EmbedTensor(plan.ids);  // [tokens, hidden]
  at::Tensor x = RmsNorm(h, layers_.empty() ? final_norm_ : layers_.front().input_norm);
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    const Layer& layer = layers_[l];
    const std::vector<at::Tensor> qkv = layer.qkv.Forward(x, delta);
    const at::Tensor q =
        RotateAndCache(qkv[0].view({num_tokens, heads, d}), qkv[1].view({num_tokens, kv_heads, d}),
                       qkv[2].view({num_tokens, kv_heads, d}), inv_freq_, cache.keys_[l],
                       cache.values_[l], plan.token_slots, plan.positions);

    // A decode step on CUDA in bf16/fp16 reads each sequence's keys and values straight from the
    // cache (our kernel); otherwise ATen's path below.
    at::Tensor attended =
        max_new == 1 ? DecodeAttentionFromCache(q, cache.keys_[l], cache.values_[l], plan.slots,
                                                plan.positions, c.sliding_window, scale, max_total)
                     : at::Tensor();
    if (attended.defined()) {
      attended = attended.view({num_seqs, heads * d});
    } else {
      // [seqs, kv_heads, max_total, d]: only the keys attended are gathered, not the slots' whole
      // max_seq_len (the server's default is 4096: gathering it all cost more than the attention).
      const at::Tensor keys =
          cache.keys_[l].narrow(1, 0, max_total).index_select(0, plan.slots).permute({0, 2, 1, 3});
      const at::Tensor values = cache.values_[l]
                                    .narrow(1, 0, max_total)
                                    .index_select(0, plan.slots)
                                    .permute({0, 2, 1, 3});
      if (causal_attention) {
#ifdef MOELORA_HAVE_GQA_ATTENTION
        attended = at::scaled_dot_product_attention(
                       q.view({num_seqs, max_new, heads, d}).transpose(1, 2), keys, values,
                       /*attn_mask=*/{}, 0.0, /*is_causal=*/true, scale, /*enable_gqa=*/true)
                       .transpose(1, 2)
                       .reshape({num_tokens, heads * d});
#endif
      } else {
        // Queries padded to [seqs, heads, max_new, d] (sequences of max_new tokens each, a decode
        // step's one included, need no padding), grouped per KV head (head = kv * groups + g, as
        // transformers' repeat_kv orders them) so GQA needs no copy of the keys. The attention core
        // runs in fp32 as fused kernels do: bf16 scores would cost ~1% of every probability.
        const at::Tensor padded = !plan.padded_rows.defined()
                                      ? q
                                      : at::zeros({num_seqs * max_new, heads, d}, q.options())
                                            .index_copy_(0, plan.padded_rows, q);
        const at::Tensor grouped_q = padded.view({num_seqs, max_new, heads, d})
                                         .permute({0, 2, 1, 3})
                                         .reshape({num_seqs, kv_heads, groups * max_new, d});
        at::Tensor core;  // [seqs, kv_heads, groups * max_new, d] in the model's dtype
#ifdef MOELORA_HAVE_FUSED_ATTENTION
        if (fused_attention) {
          core = at::scaled_dot_product_attention(grouped_q, keys, values, attention_bias, 0.0,
                                                  /*is_causal=*/false, scale);
        }
#endif
        if (!core.defined()) {
          const at::Tensor scores =
              (at::matmul(grouped_q.to(accumulate), keys.to(accumulate).transpose(-1, -2)) * scale)
                  .view({num_seqs, kv_heads, groups, max_new, max_total})
                  .masked_fill(blocked_keys(), -std::numeric_limits<float>::infinity());
          const at::Tensor probs =
              at::softmax(scores, -1).view({num_seqs, kv_heads, groups * max_new, max_total});
          core = at::matmul(probs, values.to(accumulate)).to(options_.dtype);
        }
        attended = core.reshape({num_seqs, heads, max_new, d})  // fused: maybe strided
                       .permute({0, 2, 1, 3})
                       .reshape({num_seqs * max_new, heads * d});
        if (plan.padded_rows.defined()) attended = attended.index_select(0, plan.padded_rows);
      }
    }
    const at::Tensor attention_out = proj(layer, ProjectionKind::kO, attended);  // maybe strided

    // With their B in column room (a small pool's layout, LoadOptions::adapter_room), gate and
    // up each read x with their weighted shrink beside it: the norm writes x into both inputs in
    // its one pass, and both shrinks are written together (one kernel in a decode step), so each
    // GEMM then reads [x | s] as it lies.
    const Linear& gate = layer.projections[static_cast<int>(ProjectionKind::kGate)];
    const Linear& up = layer.projections[static_cast<int>(ProjectionKind::kUp)];
    const std::optional<int64_t> columns = gate.ColumnsInRoom(delta);
    const bool paired = !h.requires_grad() && !attention_out.requires_grad() &&
                        columns.has_value() && up.ColumnsInRoom(delta) == columns;
    at::Tensor gate_input, up_input;
    if (paired) {
      std::tie(gate_input, up_input) =
          Linear::NewPairedInputsWithRoom(gate, up, num_tokens, h.options());
    }
    AddAndNorm added =
        AddRmsNorm(h, attention_out, layer.post_attention_norm, gate_input, up_input);
    h = std::move(added.sum);
    x = std::move(added.normed);
    if (paired) {
      delta->ScaledShrinkPairInto(gate.id(), up.id(), x, Linear::ShrinkColumnsBeside(x, *columns),
                                  Linear::ShrinkColumnsBeside(up_input, *columns));
    }
    at::Tensor gate_output, up_output;
    const std::optional<int64_t> gate_rows = gate.RowsInRoom(delta), up_rows = up.RowsInRoom(delta);
    if (gate_rows.has_value() && up_rows.has_value() && !x.requires_grad()) {
      // A in row room (a big pool's layout): each GEMM computes its shrink too, and both
      // expands run together (one kernel in a decode step).
      auto [gate_shrink, gate_base] = gate.ShrinkAndOutput(x, *gate_rows);
      auto [up_shrink, up_base] = up.ShrinkAndOutput(x, *up_rows);
      std::vector<at::Tensor> outputs = delta->ApplyShrunkEach(
          {gate.id(), up.id()}, {std::move(gate_shrink), std::move(up_shrink)},
          {std::move(gate_base), std::move(up_base)});
      gate_output = std::move(outputs[0]);
      up_output = std::move(outputs[1]);
    } else if (!paired && delta != nullptr && !columns.has_value() && !up.ColumnsInRoom(delta) &&
               !gate_rows.has_value() && !up_rows.has_value()) {
      // Neither folds the delta into its GEMM: both deltas together, one pass over x for a delta
      // that can (the sparse path).
      std::vector<at::Tensor> outputs = delta->ApplyGroup(
          {gate.id(), up.id()}, x, {gate.Forward(x, nullptr), up.Forward(x, nullptr)});
      gate_output = std::move(outputs[0]);
      up_output = std::move(outputs[1]);
    } else {
      gate_output = gate.Forward(x, delta, paired);
      up_output = up.Forward(paired ? up_input : x, delta, paired);
    }
    const at::Tensor gated = GatedActivation(gate_output, up_output, c.activation);
    const bool last = l + 1 == c.num_hidden_layers;
    added = AddRmsNorm(h, proj(layer, ProjectionKind::kDown, gated),
                       last ? final_norm_ : layers_[l + 1].input_norm);
    h = std::move(added.sum);
    x = std::move(added.normed);
  }
  return x;
}

}  // namespace moelora
