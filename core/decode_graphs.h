#ifndef MOELORA_CORE_DECODE_GRAPHS_H_
#define MOELORA_CORE_DECODE_GRAPHS_H_

// Decode steps through CUDA graphs. A decode step (one new token for every sequence) launches a
// few hundred small kernels, and in eager libtorch the host's launch work, not the GPU, sets its
// time. DecodeGraphs captures the step once per (batch size, context bucket, expert snapshot)
// and replays it: the host then copies a few ids into static input buffers and launches one
// graph.
//
// Shapes inside a graph are fixed, so every sequence attends over its context bucket (the next
// power of two, from min_context_bucket up to the cache's max_seq_len) with the keys past its own
// length masked, exactly like padding. Graphs are captured lazily, kept in a small LRU, and only
// for the base model or for the pool's current snapshot (a step over a union of older pins runs
// eagerly); a new snapshot drops the graphs of the old one. Graphs do not pin experts: a detached
// expert's slot is free as soon as no request holds it.

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <list>
#include <map>
#include <memory>
#include <string>
#include <tuple>
#include <vector>

#include "absl/status/statusor.h"
#include "core/cuda_graph.h"
#include "core/expert_pool.h"
#include "core/model.h"

namespace moelora {

struct DecodeGraphOptions {
  int64_t max_batch = 64;            // larger decode steps run eagerly
  int64_t min_context_bucket = 128;  // smallest context a graph attends over
  int64_t max_graphs = 48;           // captured graphs kept (least recently used dropped)
  // Take only steps over the pool's current snapshot (the engine: a union of older pins is a new
  // snapshot every step and would be captured every step). Off for callers that keep one
  // snapshot of their own, such as a benchmark over a subset of the experts.
  bool current_snapshot_only = true;
  // Where graphs are unavailable (CPU builds, CPU devices) run the same fixed-shape step eagerly
  // instead of refusing it: lets CPU tests check the graph path's math.
  bool eager_fallback = false;
};

struct DecodeGraphStats {
  int64_t captures = 0;
  int64_t replays = 0;
  int64_t eager_steps = 0;  // fixed-shape steps run without a graph (eager_fallback)
  int64_t graphs = 0;       // kept now
};

// Bound to one model and one KV cache (graphs hold its addresses). Not thread-safe: the thread
// that runs forwards owns it.
class DecodeGraphs {
 public:
  DecodeGraphs(const Model& model, KvCache& cache, DecodeGraphOptions options = {});
  ~DecodeGraphs();
  DecodeGraphs(const DecodeGraphs&) = delete;
  DecodeGraphs& operator=(const DecodeGraphs&) = delete;

  // Whether this build can capture graphs for `model` (a CUDA build and a CUDA device); without,
  // only eager_fallback runs steps.
  static bool CanCapture(const Model& model);

  // Whether Run takes this step: every sequence brings one token, the batch fits max_batch, the
  // step runs on `cache` over no experts or `pool`'s current snapshot (any snapshot without
  // current_snapshot_only), and graphs (or the eager fallback) are available and have not failed.
  bool Accepts(const std::vector<SequenceInput>& batch, const KvCache& cache,
               const ExpertPool* pool, const ExpertSnapshot* snapshot) const;

  // One decode step of the base model (`snapshot` null or empty) or of the mixture over
  // `snapshot` (which must be `pool`'s current one) with routing `weights` [batch,
  // snapshot->size()] fp32 on any device. Returns last-token logits like Model::Forward and
  // advances the cache's lengths. When a capture fails, returns its error and turns graphs off
  // (disabled()); the cache's lengths are unchanged and the caller can run the step eagerly.
  // experts_per_token: as MixtureDelta takes it; a step that takes the sparse path replays a
  // graph of its own.
  absl::StatusOr<ForwardOutput> Run(const std::vector<SequenceInput>& batch, KvCache& cache,
                                    const ExpertPool* pool,
                                    std::shared_ptr<const ExpertSnapshot> snapshot,
                                    const at::Tensor& weights, int64_t experts_per_token = 0);

  // Drops every graph.
  void Clear();
  DecodeGraphStats stats() const;
  // Set when a capture failed: graphs stay off and steps go back to the caller's eager path.
  const absl::Status& disabled() const { return disabled_; }

 private:
  struct Graph;
  // (batch size, context bucket, experts a token on the sparse path: 0 for the dense one)
  using Key = std::tuple<int64_t, int64_t, int64_t>;

  int64_t ContextBucket(int64_t context) const;
  Graph* Find(const Key& key);  // and marks it most recently used
  // A new entry with its static inputs (evicting the least recently used beyond max_graphs).
  Graph* Add(const Key& key, int64_t experts);
  // Captures `graph` over the inputs it holds now; on failure drops it and disables graphs.
  absl::Status Capture(const Key& key, Graph& graph, KvCache& cache, const ExpertPool* pool,
                       const std::shared_ptr<const ExpertSnapshot>& snapshot);

  const Model& model_;
  KvCache& cache_;
  const DecodeGraphOptions options_;
  const bool use_graphs_;
  // Version of the snapshot every kept graph was captured over (kBaseModel: no experts, kNone:
  // no graphs). Graphs hold no reference to it: a graph is replayed only for a step whose caller
  // holds that very snapshot, which keeps its experts in their slots; versions are never reused.
  static constexpr int64_t kNone = -2, kBaseModel = -1;
  int64_t snapshot_version_ = kNone;
  std::map<Key, std::unique_ptr<Graph>> graphs_;
  std::list<Key> lru_;  // most recent first
  GraphMemoryPool memory_pool_;
  DecodeGraphStats stats_;
  absl::Status disabled_;
};

}  // namespace moelora

#endif  // MOELORA_CORE_DECODE_GRAPHS_H_
