#include "core/mixture.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <set>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "core/decode_graphs.h"
#include "core/status_macros.h"

namespace moelora {
namespace {

absl::Status CheckWeight(const std::string& name, double weight) {
  if (!std::isfinite(weight) || weight < 0) {
    return absl::InvalidArgumentError(absl::StrCat("explicit weight for expert '", name,
                                                   "' must be finite and >= 0, got ", weight));
  }
  return absl::OkStatus();
}

// Sets column `position` of rows [row, row + count) to `value`.
void FillColumn(at::Tensor& weights, int64_t row, int64_t count, int64_t position, double value) {
  weights.narrow(0, row, count).select(1, position).fill_(value);
}

}  // namespace

std::shared_ptr<const RouterSet> Mixture::routers() const {
  absl::MutexLock lock(&routers_mu_);
  return routers_;
}

void Mixture::PublishRouters(std::shared_ptr<const RouterSet> routers) {
  absl::MutexLock lock(&routers_mu_);
  routers_ = std::move(routers);
}

RouterInfo Mixture::Describe(const RouterSet& set, const Router& router,
                             const ExpertSnapshot& experts) const {
  RouterInfo info;
  info.name = router.config().name;
  info.config = router.config();
  info.is_default = set.default_router == info.name;
  for (const std::string& expert : router.config().experts) {
    if (experts.PositionOf(expert) < 0) info.missing_experts.push_back(expert);
  }
  return info;
}

absl::StatusOr<ExpertInfo> Mixture::AttachExpert(const std::string& name, const std::string& dir) {
  absl::MutexLock admin(&admin_mu_);
  return pool_.Attach(name, dir);
}

absl::Status Mixture::DetachExpert(const std::string& name, bool force) {
  absl::MutexLock admin(&admin_mu_);
  if (!force) {
    for (const auto& [router_name, router] : routers()->routers) {
      for (const std::string& expert : router->config().experts) {
        if (expert == name) {
          return absl::FailedPreconditionError(
              absl::StrCat("expert '", name, "' is used by router '", router_name,
                           "': detach the router first, or force (the router then drops it)"));
        }
      }
    }
  }
  return pool_.Detach(name);
}

absl::StatusOr<RouterInfo> Mixture::AttachRouter(const std::string& dir, bool force) {
  ASSIGN_OR_RETURN(auto router, Router::Load(dir, model_.config().hidden_size));
  return AttachRouter(std::move(router), force);
}

absl::StatusOr<RouterInfo> Mixture::AttachRouter(std::shared_ptr<const Router> router, bool force) {
  absl::MutexLock admin(&admin_mu_);
  if (router->gate_weight().size(1) != model_.config().hidden_size) {
    return absl::InvalidArgumentError(absl::StrCat(
        "router '", router->config().name, "': gate takes ", router->gate_weight().size(1),
        " features, the model's hidden size is ", model_.config().hidden_size));
  }
  const std::shared_ptr<const RouterSet> current = routers();
  const std::string& name = router->config().name;
  if (current->routers.count(name) > 0) {
    return absl::AlreadyExistsError(absl::StrCat("router '", name, "' is already attached"));
  }
  auto experts = pool_.snapshot();
  auto next = std::make_shared<RouterSet>(*current);
  RouterInfo info = Describe(*next, *router, *experts);
  if (!info.missing_experts.empty() && !force) {
    return absl::FailedPreconditionError(
        absl::StrCat("router '", name, "' needs experts that are not attached: ",
                     absl::StrJoin(info.missing_experts, ", "), " (attach them first, or force)"));
  }
  next->routers[name] = std::move(router);
  // The first router becomes the default, so attaching one is enough to route.
  if (next->default_router.empty()) next->default_router = name;
  info.is_default = next->default_router == name;
  PublishRouters(std::move(next));
  return info;
}

absl::Status Mixture::DetachRouter(const std::string& name) {
  absl::MutexLock admin(&admin_mu_);
  const std::shared_ptr<const RouterSet> current = routers();
  if (current->routers.count(name) == 0) {
    return absl::NotFoundError(absl::StrCat("no router named '", name, "' is attached"));
  }
  auto next = std::make_shared<RouterSet>(*current);
  next->routers.erase(name);
  if (next->default_router == name) next->default_router.clear();
  PublishRouters(std::move(next));
  return absl::OkStatus();
}

absl::Status Mixture::SetDefaultRouter(const std::string& name) {
  absl::MutexLock admin(&admin_mu_);
  const std::shared_ptr<const RouterSet> current = routers();
  if (!name.empty() && current->routers.count(name) == 0) {
    return absl::NotFoundError(absl::StrCat("no router named '", name, "' is attached"));
  }
  auto next = std::make_shared<RouterSet>(*current);
  next->default_router = name;
  PublishRouters(std::move(next));
  return absl::OkStatus();
}

std::vector<RouterInfo> Mixture::ListRouters() const {
  const auto set = routers();
  const auto experts = pool_.snapshot();
  std::vector<RouterInfo> infos;
  for (const auto& [name, router] : set->routers)
    infos.push_back(Describe(*set, *router, *experts));
  return infos;
}

MixturePin Mixture::Pin() const { return {pool_.snapshot(), routers()}; }

absl::Status Mixture::ValidateControls(const RoutingControls& controls) const {
  return ValidateControls(controls, Pin());
}

absl::Status Mixture::ValidateControls(const RoutingControls& controls,
                                       const MixturePin& pin) const {
  return ValidateControls(controls, *pin.experts, *pin.routers);
}

const std::string& Mixture::RouterFor(const RoutingControls& controls, const RouterSet& set) {
  static const std::string* const kNone = new std::string();
  if (!controls.pinned_expert.empty() || !controls.explicit_weights.empty()) return *kNone;
  return controls.router.empty() ? set.default_router : controls.router;
}

absl::Status Mixture::ValidateControls(const RoutingControls& controls,
                                       const ExpertSnapshot& snapshot, const RouterSet& set) const {
  for (const std::string& name : controls.masked_experts) {
    if (snapshot.PositionOf(name) < 0) {
      return absl::NotFoundError(
          absl::StrCat("expert mask names '", name, "', which is not attached"));
    }
  }
  if (!controls.pinned_expert.empty()) {
    if (snapshot.PositionOf(controls.pinned_expert) < 0) {
      return absl::NotFoundError(
          absl::StrCat("pinned expert '", controls.pinned_expert, "' is not attached"));
    }
    for (const std::string& name : controls.masked_experts) {
      if (name == controls.pinned_expert) {
        return absl::InvalidArgumentError(
            absl::StrCat("pinned expert '", name, "' is also masked"));
      }
    }
  }
  for (const auto& [name, weight] : controls.explicit_weights) {
    RETURN_IF_ERROR(CheckWeight(name, weight));
    if (snapshot.PositionOf(name) < 0) {
      return absl::NotFoundError(
          absl::StrCat("explicit weight for '", name, "', which is not attached"));
    }
  }
  if (!controls.explicit_weights.empty() && controls.pinned_expert.empty()) {
    const std::set<std::string> masked(controls.masked_experts.begin(),
                                       controls.masked_experts.end());
    double total = 0;
    for (const auto& [name, weight] : controls.explicit_weights) {
      if (masked.count(name) == 0) total += weight;
    }
    if (total <= 0) {
      return absl::InvalidArgumentError(
          "explicit weights give every unmasked expert weight 0 (use no weights for the base "
          "model)");
    }
  }
  const std::string& router_name = controls.router.empty() ? set.default_router : controls.router;
  if (!controls.router.empty() && set.routers.count(controls.router) == 0) {
    return absl::NotFoundError(absl::StrCat("no router named '", controls.router, "' is attached"));
  }
  if (controls.top_k.has_value() || controls.temperature.has_value()) {
    if (router_name.empty()) {
      return absl::InvalidArgumentError(
          "top_k / temperature given but no router routes this request");
    }
    const Router& router = *set.routers.at(router_name);
    RoutingNormalization normalization;
    normalization.top_k = controls.top_k.value_or(router.config().top_k);
    normalization.temperature = controls.temperature.value_or(router.config().temperature);
    RETURN_IF_ERROR(ValidateNormalization(normalization, router.num_experts()));
  }
  return absl::OkStatus();
}

absl::StatusOr<at::Tensor> Mixture::RouterWeights(const Router& router,
                                                  const RoutingControls& controls,
                                                  const ExpertSnapshot& snapshot,
                                                  const at::Tensor& features) const {
  const RouterConfig& config = router.config();
  const int64_t num_experts = router.num_experts();
  const std::set<std::string> masked(controls.masked_experts.begin(),
                                     controls.masked_experts.end());
  std::vector<int64_t> positions(num_experts);
  at::Tensor allowed = at::zeros({num_experts}, at::kBool);
  bool any_attached = false, any_allowed = false;
  for (int64_t j = 0; j < num_experts; ++j) {
    positions[j] = snapshot.PositionOf(config.experts[j]);
    any_attached |= positions[j] >= 0;
    const bool ok = positions[j] >= 0 && masked.count(config.experts[j]) == 0;
    allowed[j] = ok;
    any_allowed |= ok;
  }
  if (!any_attached) {
    return absl::FailedPreconditionError(
        absl::StrCat("router '", config.name, "': none of its experts is attached"));
  }
  if (!any_allowed) {
    return absl::InvalidArgumentError(
        absl::StrCat("the expert mask leaves router '", config.name, "' no expert"));
  }
  RoutingNormalization normalization;
  normalization.top_k = controls.top_k.value_or(config.top_k);
  normalization.temperature = controls.temperature.value_or(config.temperature);
  normalization.allowed = allowed;
  RETURN_IF_ERROR(ValidateNormalization(normalization, num_experts));
  normalization.allowed = allowed.to(features.device());
  const at::Tensor routed =
      NormalizeRouting(router.Logits(features), normalization).to(at::kCPU).contiguous();
  at::Tensor out = at::zeros({features.size(0), snapshot.size()}, at::kFloat);
  for (int64_t j = 0; j < num_experts; ++j) {
    if (positions[j] >= 0) out.select(1, positions[j]).copy_(routed.select(1, j));
  }
  return out;
}

absl::Status Mixture::RouteSequence(const MixtureSequence& sequence, RoutingState& state,
                                    const ExpertSnapshot& snapshot, const RouterSet& set,
                                    at::Tensor& weights, int64_t row) const {
  const RoutingControls& controls = sequence.controls;
  const std::vector<int64_t>& tokens = sequence.input.tokens;
  const int64_t count = static_cast<int64_t>(tokens.size());
  // Against the snapshot this forward pinned, not whatever is attached by now.
  RETURN_IF_ERROR(ValidateControls(controls, snapshot, set));
  const std::set<std::string> masked(controls.masked_experts.begin(),
                                     controls.masked_experts.end());
  if (!controls.pinned_expert.empty()) {
    FillColumn(weights, row, count, snapshot.PositionOf(controls.pinned_expert), 1.0);
    return absl::OkStatus();
  }
  if (!controls.explicit_weights.empty()) {
    for (const auto& [name, weight] : controls.explicit_weights) {
      if (masked.count(name) == 0)
        FillColumn(weights, row, count, snapshot.PositionOf(name), weight);
    }
    return absl::OkStatus();
  }
  const std::string& router_name = RouterFor(controls, set);
  if (router_name.empty()) return absl::OkStatus();  // nothing routes: the base model
  const Router& router = *set.routers.at(router_name);

  if (!state.resolved || state.per_token) {
    const RouterConfig& config = router.config();
    at::Tensor features;
    if (config.input == RouterInput::kEmbeddings) {
      ASSIGN_OR_RETURN(features, model_.Embed(tokens));
    } else {
      // One extra base pass over the prompt; its final hidden states route the whole request.
      ASSIGN_OR_RETURN(KvCache scratch, model_.CreateKvCache(1, count));
      ASSIGN_OR_RETURN(ForwardOutput base,
                       model_.Forward({{0, tokens}}, scratch, {.return_hidden = true}));
      features = base.hidden;
    }
    if (config.granularity == RoutingGranularity::kToken) {
      ASSIGN_OR_RETURN(at::Tensor routed, RouterWeights(router, controls, snapshot, features));
      weights.narrow(0, row, count).copy_(routed);
      state.resolved = true;
      state.per_token = true;
      return absl::OkStatus();
    }
    const at::Tensor pooled = features.to(at::kFloat).mean(0, /*keepdim=*/true);
    ASSIGN_OR_RETURN(at::Tensor routed, RouterWeights(router, controls, snapshot, pooled));
    state.weights.clear();
    for (int64_t i = 0; i < snapshot.size(); ++i) {
      const double weight = routed[0][i].item<double>();
      if (weight > 0) state.weights[snapshot.experts()[i]->info().name] = weight;
    }
    state.resolved = true;
    state.renormalize = true;
  }
  // Sequence-level weights held from the first forward; experts detached since are dropped.
  double total = 0;
  for (const auto& [name, weight] : state.weights) {
    if (snapshot.PositionOf(name) >= 0) total += weight;
  }
  if (total <= 0) {
    return absl::FailedPreconditionError(
        "every expert this request was routed to has been detached");
  }
  for (const auto& [name, weight] : state.weights) {
    const int64_t position = snapshot.PositionOf(name);
    if (position >= 0) {
      FillColumn(weights, row, count, position, state.renormalize ? weight / total : weight);
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<MixtureOutput> Mixture::Forward(std::vector<MixtureSequence>& batch, KvCache& cache,
                                               ForwardOptions options) const {
  const MixturePin now = Pin();
  // Each sequence routes over its own pin; the forward runs over the union of the pinned
  // experts (usually one snapshot, so the union is that snapshot).
  std::vector<const MixturePin*> pins;
  std::vector<std::shared_ptr<const ExpertSnapshot>> distinct;
  for (const MixtureSequence& sequence : batch) {
    const MixturePin* pin = sequence.pin != nullptr ? sequence.pin : &now;
    pins.push_back(pin);
    bool seen = false;
    for (const auto& snapshot : distinct) seen |= snapshot == pin->experts;
    if (!seen) distinct.push_back(pin->experts);
  }
  std::shared_ptr<const ExpertSnapshot> snapshot;
  if (distinct.size() <= 1) {
    snapshot = distinct.empty() ? now.experts : distinct.front();
  } else {
    ASSIGN_OR_RETURN(snapshot, pool_.Union(distinct));
  }
  std::map<const ResidentExpert*, int64_t> union_position;  // only needed for a union
  if (distinct.size() > 1) {
    for (int64_t i = 0; i < snapshot->size(); ++i) {
      union_position[snapshot->experts()[i].get()] = i;
    }
  }

  int64_t total_tokens = 0;
  for (const MixtureSequence& sequence : batch) {
    total_tokens += static_cast<int64_t>(sequence.input.tokens.size());
  }
  MixtureOutput output;
  output.routing.experts = snapshot->Names();
  std::vector<SequenceInput> inputs;
  try {
    at::Tensor weights = at::zeros({total_tokens, snapshot->size()}, at::kFloat);
    int64_t row = 0;
    for (size_t b = 0; b < batch.size(); ++b) {
      MixtureSequence& sequence = batch[b];
      const MixturePin& pin = *pins[b];
      const int64_t count = static_cast<int64_t>(sequence.input.tokens.size());
      RoutingState one_shot;
      RoutingState& state = sequence.state != nullptr ? *sequence.state : one_shot;
      // The common case routes straight into the forward's rows; a pin that is not the
      // forward's snapshot routes over its own columns, scattered into the union by identity.
      const bool own_columns = pin.experts != snapshot;
      at::Tensor own = own_columns ? at::zeros({count, pin.experts->size()}, at::kFloat)
                                   : weights.narrow(0, row, count);
      const absl::Time routing_started = absl::Now();
      absl::Status routed = RouteSequence(sequence, state, *pin.experts, *pin.routers, own, 0);
      output.routing.routing_seconds.push_back(
          absl::ToDoubleSeconds(absl::Now() - routing_started));
      if (!routed.ok()) {
        return absl::Status(routed.code(), absl::StrCat("sequence in slot ", sequence.input.slot,
                                                        ": ", routed.message()));
      }
      if (own_columns && pin.experts->size() > 0) {
        std::vector<int64_t> columns;
        for (const auto& expert : pin.experts->experts()) {
          columns.push_back(union_position.at(expert.get()));
        }
        weights.narrow(0, row, count).index_copy_(1, at::tensor(columns), own);
      }
      output.routing.sequence_weights.push_back(own);
      output.routing.routers.push_back(RouterFor(sequence.controls, *pin.routers));
      row += count;
      inputs.push_back(sequence.input);
    }
    output.routing.weights = weights;
    ASSIGN_OR_RETURN(output.forward, ForwardWithWeights(inputs, cache, snapshot, weights, options));
  } catch (const c10::Error& e) {
    return absl::InternalError(absl::StrCat("routing: ", e.what_without_backtrace()));
  }
  return output;
}

absl::StatusOr<ForwardOutput> Mixture::ForwardWithWeights(
    const std::vector<SequenceInput>& batch, KvCache& cache,
    std::shared_ptr<const ExpertSnapshot> snapshot, const at::Tensor& weights,
    ForwardOptions options) const {
  int64_t total_tokens = 0;
  for (const SequenceInput& sequence : batch) {
    total_tokens += static_cast<int64_t>(sequence.tokens.size());
  }
  if (!weights.defined() || weights.dim() != 2 || weights.size(0) != total_tokens ||
      weights.size(1) != snapshot->size()) {
    return absl::InvalidArgumentError(absl::StrCat("routing weights must be [", total_tokens,
                                                   " tokens, ", snapshot->size(), " experts]"));
  }
  // Weights on the CPU (the router's) say how many experts each token uses; the sparse path
  // needs that bound, and reading it from device weights would wait for the device.
  int64_t experts_per_token = 0;
  if (weights.device().is_cpu() && weights.numel() > 0 && !weights.requires_grad()) {
    experts_per_token = weights.ne(0).sum(1).max().item<int64_t>();
  }
  DecodeGraphs* graphs = options.decode_graphs;
  if (graphs != nullptr && !options.all_logits && !options.return_hidden &&
      !weights.requires_grad() && graphs->Accepts(batch, cache, &pool_, snapshot.get())) {
    absl::StatusOr<ForwardOutput> output =
        graphs->Run(batch, cache, &pool_, snapshot, weights, experts_per_token);
    // A failed capture turns graphs off and leaves the step to the eager path below.
    if (output.ok() || graphs->disabled().ok()) return output;
  }
  std::optional<MixtureDelta> delta;
  try {
    delta.emplace(pool_, snapshot, weights.to(model_.options().device), experts_per_token);
  } catch (const c10::Error& e) {
    return absl::InternalError(absl::StrCat("routing weights: ", e.what_without_backtrace()));
  }
  options.delta = &*delta;
  return model_.Forward(batch, cache, options);
}

absl::StatusOr<at::Tensor> Mixture::KPassLogits(const std::vector<SequenceInput>& batch,
                                                std::shared_ptr<const ExpertSnapshot> snapshot,
                                                const at::Tensor& weights) const {
  const int64_t num_seqs = static_cast<int64_t>(batch.size());
  if (!weights.defined() || weights.dim() != 2 || weights.size(0) != num_seqs ||
      weights.size(1) != snapshot->size()) {
    return absl::InvalidArgumentError(absl::StrCat("K-pass weights must be [", num_seqs,
                                                   " sequences, ", snapshot->size(), " experts]"));
  }
  int64_t longest = 0, total_tokens = 0;
  for (const SequenceInput& sequence : batch) {
    longest = std::max<int64_t>(longest, sequence.tokens.size());
    total_tokens += static_cast<int64_t>(sequence.tokens.size());
  }
  std::vector<SequenceInput> fresh = batch;
  for (int64_t b = 0; b < num_seqs; ++b) fresh[b].slot = b;
  at::Tensor mixed;
  try {
    const at::Tensor host_weights = weights.to(at::kCPU, at::kFloat);
    for (int64_t i = 0; i < snapshot->size(); ++i) {
      const at::Tensor column = host_weights.select(1, i);
      if (!column.ne(0).any().item<bool>()) continue;
      ASSIGN_OR_RETURN(auto single, pool_.Subset(*snapshot, {i}));
      ASSIGN_OR_RETURN(KvCache cache, model_.CreateKvCache(num_seqs, longest));
      ASSIGN_OR_RETURN(
          ForwardOutput out,
          ForwardWithWeights(fresh, cache, single, at::ones({total_tokens, 1}), ForwardOptions{}));
      const at::Tensor contribution =
          out.logits.to(at::kFloat) * column.to(out.logits.device()).unsqueeze(1);
      mixed = mixed.defined() ? mixed + contribution : contribution;
    }
    if (!mixed.defined()) {
      return absl::InvalidArgumentError("K-pass: every routing weight is 0");
    }
  } catch (const c10::Error& e) {
    return absl::InternalError(absl::StrCat("K-pass: ", e.what_without_backtrace()));
  }
  return mixed;
}

}  // namespace moelora
