#ifndef MOELORA_CORE_MIXTURE_H_
#define MOELORA_CORE_MIXTURE_H_

// The mixture of LoRA experts over one base model: the expert pool, the routers, per-request
// routing controls, and the single-pass forward that applies every expert with per-token weights.
//
// Routing, per sequence, in precedence order:
//   1. pinned_expert: weight 1 on that expert;
//   2. explicit_weights: the given weights (not renormalised), masked experts zeroed;
//   3. a router (controls.router, else the default router): softmax / top-k over the router's
//      experts from token embeddings (per token, or mean-pooled prompt for "sequence") or from the
//      base model's final hidden state (one extra base pass over the prompt, sequence level);
//   4. nothing configured: no expert (the base model).
// Sequence-level weights are computed at a request's first forward and kept (by expert name) in
// its RoutingState for the rest of the generation. Experts a router names that are not attached
// (a forced attach or detach) are dropped and the remaining weights renormalised.

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "core/expert_pool.h"
#include "core/model.h"
#include "core/router.h"

namespace moelora {

// Per-request routing controls (the server maps its request fields onto these).
struct RoutingControls {
  std::string router;                              // empty: the default router
  std::map<std::string, double> explicit_weights;  // by expert name
  std::string pinned_expert;                       // one expert at weight 1
  std::vector<std::string> masked_experts;         // experts this request must not use
  std::optional<int64_t> top_k;                    // router override (0 = dense)
  std::optional<double> temperature;               // router override
};

// Kept by the caller across the forwards of one sequence.
struct RoutingState {
  bool resolved = false;                  // sequence-level weights computed
  bool per_token = false;                 // recompute from each forward's tokens instead
  bool renormalize = false;               // renormalise over the experts still attached
  std::map<std::string, double> weights;  // sequence-level weights by expert name
};

// The attached routers and the default, published as one immutable set.
struct RouterSet {
  std::map<std::string, std::shared_ptr<const Router>> routers;
  std::string default_router;
};

// What was attached at one moment: a request admitted then keeps routing over exactly these
// experts and routers, whatever is attached or detached later.
struct MixturePin {
  std::shared_ptr<const ExpertSnapshot> experts;
  std::shared_ptr<const RouterSet> routers;
};

struct MixtureSequence {
  SequenceInput input;
  RoutingControls controls;
  RoutingState* state = nullptr;    // null: a one-shot forward (state kept for this call only)
  const MixturePin* pin = nullptr;  // null: what is attached when the forward starts
};

// The weights every token of a forward used.
struct RoutingTrace {
  // Columns of `weights`: the union of the sequences' pinned experts (a name may appear twice
  // when an expert was detached and re-attached between two requests' pins).
  std::vector<std::string> experts;
  at::Tensor weights;  // [tokens, experts] fp32, CPU, packed like the forward's tokens
  // Per sequence: [its tokens, its pin's experts] fp32 CPU, columns in ExpertSnapshot::Names()
  // order of the sequence's pin.
  std::vector<at::Tensor> sequence_weights;
  // Per sequence: the router that routed it (empty: pinned / explicit weights / base model),
  // and the wall time its routing took (router features, gate, normalisation).
  std::vector<std::string> routers;
  std::vector<double> routing_seconds;
};

struct MixtureOutput {
  ForwardOutput forward;
  RoutingTrace routing;
};

struct RouterInfo {
  std::string name;
  RouterConfig config;
  bool is_default = false;
  std::vector<std::string> missing_experts;  // named by the router, not attached now
};

class Mixture {
 public:
  Mixture(const Model& model, ExpertPool& pool) : model_(model), pool_(pool) {}

  // --- admin (any thread; serialised among themselves, never blocking forwards) ---
  absl::StatusOr<ExpertInfo> AttachExpert(const std::string& name, const std::string& dir);
  // FailedPrecondition when a router needs the expert, unless `force` (the router then drops it).
  absl::Status DetachExpert(const std::string& name, bool force);
  // FailedPrecondition when experts the router names are not attached, unless `force`.
  absl::StatusOr<RouterInfo> AttachRouter(const std::string& dir, bool force);
  absl::StatusOr<RouterInfo> AttachRouter(std::shared_ptr<const Router> router, bool force);
  absl::Status DetachRouter(const std::string& name);
  // Empty name: no default router.
  absl::Status SetDefaultRouter(const std::string& name);
  std::vector<RouterInfo> ListRouters() const;

  // What is attached now, to keep for a request's lifetime.
  MixturePin Pin() const;

  // Checks controls against what is attached now, or against a pin (names, values, top_k).
  absl::Status ValidateControls(const RoutingControls& controls) const;
  absl::Status ValidateControls(const RoutingControls& controls, const MixturePin& pin) const;

  // Routes every sequence, then runs ONE forward with all experts applied (see class comment).
  absl::StatusOr<MixtureOutput> Forward(std::vector<MixtureSequence>& batch, KvCache& cache,
                                        ForwardOptions options = {}) const;

  // Lower level, for training and tests: one forward with explicit routing weights
  // [tokens, snapshot->size()] (may require grad) over the given snapshot. Weights on the CPU
  // with few non-zeros a token (top-k routing over many experts) take the sparse path
  // (MixtureDelta::UsesSparsePath): each token reads only its own experts' rows.
  absl::StatusOr<ForwardOutput> ForwardWithWeights(const std::vector<SequenceInput>& batch,
                                                   KvCache& cache,
                                                   std::shared_ptr<const ExpertSnapshot> snapshot,
                                                   const at::Tensor& weights,
                                                   ForwardOptions options = {}) const;

  // The DyLoRA-MoE baseline, kept for benchmarks: one full pass per expert with weight, each
  // with only that expert, and the logits mixed by the sequence-level weights. Prefill only
  // (fresh caches); `weights` is [sequences, snapshot->size()].
  absl::StatusOr<at::Tensor> KPassLogits(const std::vector<SequenceInput>& batch,
                                         std::shared_ptr<const ExpertSnapshot> snapshot,
                                         const at::Tensor& weights) const;

  const Model& model() const { return model_; }
  ExpertPool& pool() const { return pool_; }

 private:
  std::shared_ptr<const RouterSet> routers() const;
  absl::Status ValidateControls(const RoutingControls& controls, const ExpertSnapshot& snapshot,
                                const RouterSet& set) const;
  void PublishRouters(std::shared_ptr<const RouterSet> routers);
  RouterInfo Describe(const RouterSet& set, const Router& router,
                      const ExpertSnapshot& experts) const;

  // Fills rows [row, row + tokens) of `weights` ([tokens, n] fp32 CPU) for one sequence.
  absl::Status RouteSequence(const MixtureSequence& sequence, RoutingState& state,
                             const ExpertSnapshot& snapshot, const RouterSet& routers,
                             at::Tensor& weights, int64_t row) const;
  // The router that routes `controls` under `set`, empty when none does.
  static const std::string& RouterFor(const RoutingControls& controls, const RouterSet& set);
  absl::StatusOr<at::Tensor> RouterWeights(const Router& router, const RoutingControls& controls,
                                           const ExpertSnapshot& snapshot,
                                           const at::Tensor& features) const;

  const Model& model_;
  ExpertPool& pool_;
  absl::Mutex admin_mu_;
  mutable absl::Mutex routers_mu_;
  std::shared_ptr<const RouterSet> routers_ ABSL_GUARDED_BY(routers_mu_) =
      std::make_shared<RouterSet>();
};

}  // namespace moelora

#endif  // MOELORA_CORE_MIXTURE_H_
