#include "core/decode_graphs.h"

#include <ATen/ATen.h>
#include <c10/core/GradMode.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <optional>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "core/status_macros.h"

namespace moelora {

// One captured step: its static inputs (refilled before every replay) and its output.
struct DecodeGraphs::Graph {
  at::Tensor host_inputs;    // [3, batch] long, CPU: ids, slots, positions
  at::Tensor device_inputs;  // [3, batch] long, on the model's device
  at::Tensor weights;        // [batch, experts] fp32 on the device; undefined for the base model
  int64_t experts_per_token = 0;         // MixtureDelta's: 0 (dense) or the sparse path's k
  DecodeStepInputs inputs;               // views of device_inputs
  at::Tensor logits;                     // [batch, vocab], written by every replay
  std::unique_ptr<CapturedGraph> graph;  // null: run eagerly (eager_fallback)
};

DecodeGraphs::DecodeGraphs(const Model& model, KvCache& cache, DecodeGraphOptions options)
    : model_(model), cache_(cache), options_(options), use_graphs_(CanCapture(model)) {}

DecodeGraphs::~DecodeGraphs() = default;

bool DecodeGraphs::CanCapture(const Model& model) {
  return CudaGraphsAvailable() && model.options().device.is_cuda();
}

bool DecodeGraphs::Accepts(const std::vector<SequenceInput>& batch, const KvCache& cache,
                           const ExpertPool* pool, const ExpertSnapshot* snapshot) const {
  if (!disabled_.ok() || (!use_graphs_ && !options_.eager_fallback)) return false;
  if (&cache != &cache_ || batch.empty() ||
      static_cast<int64_t>(batch.size()) > options_.max_batch) {
    return false;
  }
  if (snapshot != nullptr && snapshot->size() > 0 &&
      (pool == nullptr || (options_.current_snapshot_only && pool->snapshot().get() != snapshot))) {
    return false;
  }
  return std::all_of(batch.begin(), batch.end(),
                     [](const SequenceInput& seq) { return seq.tokens.size() == 1; });
}

int64_t DecodeGraphs::ContextBucket(int64_t context) const {
  int64_t bucket = std::max<int64_t>(1, options_.min_context_bucket);
  while (bucket < context) bucket *= 2;
  return std::min(bucket, cache_.max_seq_len());
}

void DecodeGraphs::Clear() {
  graphs_.clear();
  lru_.clear();
  // The allocator releases a graph pool with its last graph; later captures need a new one.
  memory_pool_ = {};
  snapshot_version_ = kNone;
}

DecodeGraphStats DecodeGraphs::stats() const {
  DecodeGraphStats stats = stats_;
  stats.graphs = static_cast<int64_t>(graphs_.size());
  return stats;
}

DecodeGraphs::Graph* DecodeGraphs::Find(const Key& key) {
  auto it = graphs_.find(key);
  if (it == graphs_.end()) return nullptr;
  lru_.remove(key);
  lru_.push_front(key);
  return it->second.get();
}

DecodeGraphs::Graph* DecodeGraphs::Add(const Key& key, int64_t experts) {
  const auto [batch, context, experts_per_token] = key;
  const c10::Device device = model_.options().device;
  auto graph = std::make_unique<Graph>();
  graph->host_inputs = at::zeros({3, batch}, at::kLong);
  graph->device_inputs = graph->host_inputs.to(device);
  graph->inputs = {graph->device_inputs[0], graph->device_inputs[1], graph->device_inputs[2],
                   context};
  graph->experts_per_token = experts_per_token;
  if (experts > 0) {
    graph->weights =
        at::zeros({batch, experts}, at::TensorOptions().dtype(at::kFloat).device(device));
  }
  Graph* added = graph.get();
  graphs_[key] = std::move(graph);
  lru_.push_front(key);
  while (static_cast<int64_t>(lru_.size()) > std::max<int64_t>(1, options_.max_graphs)) {
    graphs_.erase(lru_.back());
    lru_.pop_back();
  }
  return added;
}

absl::Status DecodeGraphs::Capture(const Key& key, Graph& graph, KvCache& cache,
                                   const ExpertPool* pool,
                                   const std::shared_ptr<const ExpertSnapshot>& snapshot) {
  auto body = [this, &graph, &cache, pool, &snapshot] {
    std::optional<MixtureDelta> delta;
    if (snapshot != nullptr) {
      delta.emplace(*pool, snapshot, graph.weights, graph.experts_per_token);
    }
    graph.logits = model_.DecodeStep(graph.inputs, cache, delta ? &*delta : nullptr);
  };
  // The capture's warm-up run is a real step over the inputs already in place: it writes this
  // step's keys and values, and the replay that follows writes the same ones again.
  absl::StatusOr<std::unique_ptr<CapturedGraph>> captured =
      CaptureGraph(model_.options().device, body, memory_pool_);
  if (!captured.ok()) {
    disabled_ = captured.status();
    graphs_.erase(key);
    lru_.remove(key);
    return captured.status();
  }
  graph.graph = std::move(*captured);
  ++stats_.captures;
  return absl::OkStatus();
}

absl::StatusOr<ForwardOutput> DecodeGraphs::Run(const std::vector<SequenceInput>& batch,
                                                KvCache& cache, const ExpertPool* pool,
                                                std::shared_ptr<const ExpertSnapshot> snapshot,
                                                const at::Tensor& weights,
                                                int64_t experts_per_token) {
  if (snapshot != nullptr && snapshot->size() == 0) snapshot.reset();
  if (!Accepts(batch, cache, pool, snapshot.get())) {
    return absl::FailedPreconditionError("decode graphs: this step is not a graph step");
  }
  RETURN_IF_ERROR(model_.ValidateBatch(batch, cache));
  const int64_t size = static_cast<int64_t>(batch.size());
  if (snapshot != nullptr && (!weights.defined() || weights.dim() != 2 || weights.size(0) != size ||
                              weights.size(1) != snapshot->size())) {
    return absl::InvalidArgumentError(absl::StrCat("routing weights must be [", size, " tokens, ",
                                                   snapshot->size(), " experts]"));
  }
  // Graphs read the slots of the snapshot they were captured over: a new one replaces them all.
  const int64_t version = snapshot != nullptr ? snapshot->version() : kBaseModel;
  if (version != snapshot_version_) {
    Clear();
    snapshot_version_ = version;
  }
  int64_t context = 0;
  for (const SequenceInput& seq : batch) context = std::max(context, cache.length(seq.slot) + 1);
  try {
    c10::NoGradGuard no_grad;
    const bool sparse = snapshot != nullptr &&
                        MixtureDelta::UsesSparsePath(snapshot->size(), experts_per_token, size);
    const Key key = {size, ContextBucket(context), sparse ? experts_per_token : 0};
    Graph* graph = Find(key);
    const bool fresh = graph == nullptr;
    if (fresh) graph = Add(key, snapshot != nullptr ? snapshot->size() : 0);
    auto host = graph->host_inputs.accessor<int64_t, 2>();
    for (int64_t b = 0; b < size; ++b) {
      host[0][b] = batch[b].tokens[0];
      host[1][b] = batch[b].slot;
      host[2][b] = cache.length(batch[b].slot);
    }
    graph->device_inputs.copy_(graph->host_inputs);
    if (snapshot != nullptr) graph->weights.copy_(weights);
    if (fresh && use_graphs_) RETURN_IF_ERROR(Capture(key, *graph, cache, pool, snapshot));
    if (graph->graph != nullptr) {
      graph->graph->Replay();
      ++stats_.replays;
    } else {
      std::optional<MixtureDelta> delta;
      if (snapshot != nullptr) {
        delta.emplace(*pool, snapshot, graph->weights, graph->experts_per_token);
      }
      graph->logits = model_.DecodeStep(graph->inputs, cache, delta ? &*delta : nullptr);
      ++stats_.eager_steps;
    }
    ForwardOutput output;
    // The graph's output buffer is overwritten by the next replay.
    output.logits = graph->logits.clone();
    output.token_offsets.resize(size + 1);
    for (int64_t b = 0; b <= size; ++b) output.token_offsets[b] = b;
    model_.CommitDecodeStep(batch, cache);
    return output;
  } catch (const c10::Error& e) {
    return absl::InternalError(
        absl::StrCat("decode step of ", size, " sequences: ", e.what_without_backtrace()));
  }
}

}  // namespace moelora
