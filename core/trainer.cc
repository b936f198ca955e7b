#include "core/trainer.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <c10/core/GradMode.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <numeric>
#include <set>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "core/adapter.h"
#include "core/checkpoint.h"
#include "core/file_io.h"
#include "core/status_macros.h"
#include "nlohmann/json.hpp"

namespace moelora {

// A LoRA expert whose A and B are trainable tensors (fp32 masters on the model's device).
class TrainableExpert {
 public:
  struct Module {
    ProjectionId id;
    int64_t rank = 0;
    double scaling = 1.0;
    at::Tensor a;  // [rank, in]
    at::Tensor b;  // [out, rank]
  };

  std::string name;
  std::string config_json;  // adapter_config.json as written
  std::vector<Module> modules;

  // adapter_config.json + adapter_model.safetensors with PEFT's keys.
  absl::Status Save(const std::string& dir) const {
    std::error_code error;
    std::filesystem::create_directories(dir, error);
    if (error) {
      return absl::InternalError(absl::StrCat(dir, ": cannot create directory: ", error.message()));
    }
    const std::string config_path = dir + "/adapter_config.json";
    {
      std::ofstream out(config_path, std::ios::binary | std::ios::trunc);
      out << config_json;
      out.flush();
      if (!out.good()) return absl::InternalError(absl::StrCat(config_path, ": write failed"));
    }
    std::vector<std::pair<std::string, at::Tensor>> tensors;
    for (const Module& module : modules) {
      const std::string prefix = "base_model.model." + module.id.ModulePath();
      tensors.emplace_back(prefix + ".lora_A.weight", module.a.detach().to(at::kCPU).contiguous());
      tensors.emplace_back(prefix + ".lora_B.weight", module.b.detach().to(at::kCPU).contiguous());
    }
    return WriteTensors(dir + "/adapter_model.safetensors", tensors, {{"format", "pt"}});
  }
};

// Which trainable modules adapt each projection, and the weight column of each of their rows.
struct TrainableLayout {
  // Per projection index: the modules adapting it, and the weight column (expert index) of
  // each of their rank rows, long [sum of ranks] on the model's device.
  std::vector<std::vector<const TrainableExpert::Module*>> modules;
  std::vector<at::Tensor> columns;
};

struct TrainingBatch {
  std::vector<SequenceInput> inputs;
  std::vector<int64_t> tokens;   // all tokens, packed
  std::vector<int64_t> offsets;  // per sequence + 1
  int64_t max_len = 0;
  at::Tensor rows;     // long: packed rows that predict a next token
  at::Tensor targets;  // long: the tokens they predict
};

namespace {

using Json = nlohmann::json;

// y = base + sum over the projection's trainable modules of w_e * s * (x Aᵀ) Bᵀ, out of place.
class TrainableDelta : public LinearDelta {
 public:
  TrainableDelta(const TrainableLayout& layout, at::Tensor weights, at::ScalarType dtype)
      : layout_(layout), weights_(std::move(weights)), dtype_(dtype) {}

  at::Tensor Apply(const ProjectionId& id, const at::Tensor& x,
                   at::Tensor base_output) const override {
    const int64_t index = ProjectionIndex(id);
    const auto& modules = layout_.modules[index];
    if (modules.empty()) return base_output;
    std::vector<at::Tensor> as, bts;
    for (const TrainableExpert::Module* module : modules) {
      as.push_back(module->a * module->scaling);
      bts.push_back(module->b.t());
    }
    const at::Tensor a = (as.size() == 1 ? as[0] : at::cat(as, 0)).to(dtype_);
    const at::Tensor bt = (bts.size() == 1 ? bts[0] : at::cat(bts, 0)).to(dtype_);
    at::Tensor shrink = at::linear(x, a);  // [tokens, rows]
    if (weights_.defined()) {
      shrink = shrink * weights_.index_select(1, layout_.columns[index]).to(dtype_);
    }
    return at::addmm(base_output, shrink, bt);
  }

 private:
  const TrainableLayout& layout_;
  at::Tensor weights_;  // [tokens, K] or undefined (weight 1)
  at::ScalarType dtype_;
};

absl::Status ValidateOptions(const TrainerOptions& o) {
  auto bad = [](const std::string& what) { return absl::InvalidArgumentError(what); };
  if (o.steps < 0) return bad(absl::StrCat("steps must be >= 0, got ", o.steps));
  if (o.batch_size <= 0) return bad(absl::StrCat("batch_size must be > 0, got ", o.batch_size));
  if (!(o.lr > 0) || !std::isfinite(o.lr)) return bad(absl::StrCat("lr must be > 0, got ", o.lr));
  if (!(o.expert_lr > 0) || !std::isfinite(o.expert_lr)) {
    return bad(absl::StrCat("expert_lr must be > 0, got ", o.expert_lr));
  }
  if (!(o.weight_decay >= 0)) {
    return bad(absl::StrCat("weight_decay must be >= 0, got ", o.weight_decay));
  }
  if (!(o.beta1 >= 0 && o.beta1 < 1) || !(o.beta2 >= 0 && o.beta2 < 1) || !(o.eps > 0)) {
    return bad("AdamW needs 0 <= beta1, beta2 < 1 and eps > 0");
  }
  if (!(o.temperature > 0) || !std::isfinite(o.temperature)) {
    return bad(absl::StrCat("temperature must be finite and > 0, got ", o.temperature));
  }
  if (!(o.load_balance_coef >= 0) || !std::isfinite(o.load_balance_coef)) {
    return bad(absl::StrCat("load_balance_coef must be >= 0, got ", o.load_balance_coef));
  }
  if (std::isnan(o.clip_norm)) return bad("clip_norm is NaN");
  if (o.checkpoint_every < 0 || o.log_every < 0) {
    return bad("checkpoint_every and log_every must be >= 0");
  }
  if (o.checkpoint_every > 0 && o.out_dir.empty()) {
    return bad("checkpoint_every needs out_dir");
  }
  return absl::OkStatus();
}

std::string NameList(const std::vector<std::string>& names) {
  return absl::StrCat("[", absl::StrJoin(names, ", "), "]");
}

double ToDouble(const at::Tensor& t) { return t.item<double>(); }

}  // namespace

Trainer::Trainer(const Model& model, const TrainerOptions& options)
    : model_(model), options_(options), rng_(options.seed ^ 0x9e3779b97f4a7c15ULL) {}

Trainer::~Trainer() = default;

void Trainer::AddParam(const at::Tensor& value, double lr) {
  Param param;
  param.value = value;
  param.m = at::zeros_like(value);
  param.v = at::zeros_like(value);
  param.lr = lr;
  params_.push_back(std::move(param));
}

absl::StatusOr<std::unique_ptr<Trainer>> Trainer::ForRouter(
    const Model& model, const std::vector<ExpertSource>& experts, const TrainerOptions& options) {
  RETURN_IF_ERROR(ValidateOptions(options));
  if (experts.empty()) return absl::InvalidArgumentError("router training needs experts");
  std::set<std::string> seen;
  for (const ExpertSource& expert : experts) {
    if (expert.name.empty()) return absl::InvalidArgumentError("an expert has an empty name");
    if (!seen.insert(expert.name).second) {
      return absl::InvalidArgumentError(absl::StrCat("expert '", expert.name, "' given twice"));
    }
  }
  std::unique_ptr<Trainer> trainer(new Trainer(model, options));
  std::vector<ExpertSource> ordered = experts;
  std::shared_ptr<const Router> init;
  if (!options.init_router_dir.empty()) {
    ASSIGN_OR_RETURN(init, Router::Load(options.init_router_dir, model.config().hidden_size));
    const RouterConfig& rc = init->config();
    if (rc.input != RouterInput::kEmbeddings) {
      return absl::InvalidArgumentError(
          absl::StrCat("router '", rc.name, "' in ", options.init_router_dir,
                       " routes from base_hidden; the trainer trains routers over token "
                       "embeddings only"));
    }
    std::vector<std::string> missing, unexpected;
    for (const std::string& name : rc.experts) {
      if (seen.count(name) == 0) missing.push_back(name);
    }
    const std::set<std::string> named(rc.experts.begin(), rc.experts.end());
    for (const ExpertSource& expert : experts) {
      if (named.count(expert.name) == 0) unexpected.push_back(expert.name);
    }
    if (!missing.empty() || !unexpected.empty()) {
      std::vector<std::string> given;
      for (const ExpertSource& expert : experts) given.push_back(expert.name);
      return absl::InvalidArgumentError(absl::StrCat(
          "router '", rc.name, "' in ", options.init_router_dir, " names experts ",
          NameList(rc.experts), " but the attached experts are ", NameList(given),
          missing.empty() ? "" : absl::StrCat("; not attached: ", NameList(missing)),
          unexpected.empty() ? "" : absl::StrCat("; not in the router: ", NameList(unexpected))));
    }
    // The router's row order.
    ordered.clear();
    for (const std::string& name : rc.experts) {
      for (const ExpertSource& expert : experts) {
        if (expert.name == name) ordered.push_back(expert);
      }
    }
  }

  std::vector<Adapter> adapters;
  int64_t max_rank = 1;
  for (const ExpertSource& expert : ordered) {
    ASSIGN_OR_RETURN(Adapter adapter, Adapter::Load(expert.name, expert.dir, model.config()));
    max_rank = std::max(max_rank, adapter.max_rank());
    trainer->names_.push_back(expert.name);
    adapters.push_back(std::move(adapter));
  }
  const c10::Device device = model.options().device;
  try {
    if (options.train_experts) {
      for (const Adapter& adapter : adapters) {
        auto expert = std::make_unique<TrainableExpert>();
        expert->name = adapter.name();
        ASSIGN_OR_RETURN(
            expert->config_json,
            ReadFileToString(adapter.source() + "/adapter_config.json", "adapter config"));
        for (const AdapterModule& m : adapter.modules()) {
          TrainableExpert::Module module;
          module.id = m.id;
          module.rank = m.rank;
          module.scaling = m.scaling;
          module.a = m.a.to(device, at::kFloat).clone().set_requires_grad(true);
          module.b = m.b.to(device, at::kFloat).clone().set_requires_grad(true);
          expert->modules.push_back(std::move(module));
        }
        trainer->trainable_.push_back(std::move(expert));
      }
      RETURN_IF_ERROR(trainer->BuildLayout());
    } else {
      ASSIGN_OR_RETURN(trainer->pool_,
                       ExpertPool::Create(model, {.capacity = static_cast<int64_t>(adapters.size()),
                                                  .max_rank = max_rank}));
      for (const Adapter& adapter : adapters) {
        RETURN_IF_ERROR(trainer->pool_->Attach(adapter).status());
      }
      trainer->mixture_ = std::make_unique<Mixture>(model, *trainer->pool_);
      trainer->snapshot_ = trainer->pool_->snapshot();
      if (trainer->snapshot_->Names() != trainer->names_) {
        return absl::InternalError("expert pool order differs from the router's");
      }
    }

    // The gate: a fresh Linear(hidden -> K) as torch.nn.Linear initialises its weight
    // (U(-1/sqrt(hidden), 1/sqrt(hidden))) with a zero bias, or the given router's gate.
    const int64_t k = static_cast<int64_t>(trainer->names_.size());
    const int64_t hidden = model.config().hidden_size;
    at::Tensor weight, bias;
    if (init != nullptr) {
      weight = init->gate_weight().detach().clone();
      bias = init->gate_bias().detach().clone();
    } else {
      at::Generator generator = at::make_generator<at::CPUGeneratorImpl>(options.seed);
      const double bound = 1.0 / std::sqrt(static_cast<double>(hidden));
      weight = at::empty({k, hidden}, at::kFloat).uniform_(-bound, bound, generator);
      bias = at::zeros({k}, at::kFloat);
    }
    trainer->gate_weight_ = weight.to(device).contiguous().set_requires_grad(true);
    trainer->gate_bias_ = bias.to(device).contiguous().set_requires_grad(true);
  } catch (const c10::Error& e) {
    return absl::InternalError(absl::StrCat("trainer set-up: ", e.what_without_backtrace()));
  }
  RETURN_IF_ERROR(trainer->InitRouter());
  trainer->AddParam(trainer->gate_weight_, options.lr);
  trainer->AddParam(trainer->gate_bias_, options.lr);
  for (const auto& expert : trainer->trainable_) {
    for (const auto& module : expert->modules) {
      trainer->AddParam(module.a, options.expert_lr);
      trainer->AddParam(module.b, options.expert_lr);
    }
  }
  return trainer;
}

absl::Status Trainer::InitRouter() {
  RouterConfig config;
  config.name = options_.router_name;
  config.experts = names_;
  config.input = RouterInput::kEmbeddings;
  config.granularity = options_.granularity;
  config.top_k = options_.top_k;
  config.temperature = options_.temperature;
  ASSIGN_OR_RETURN(router_, Router::Create(config, gate_weight_, gate_bias_));
  return absl::OkStatus();
}

absl::Status Trainer::BuildLayout() {
  layout_ = std::make_unique<TrainableLayout>();
  const int64_t projections = model_.config().num_hidden_layers * kNumProjectionKinds;
  layout_->modules.resize(projections);
  layout_->columns.resize(projections);
  std::vector<std::vector<int64_t>> columns(projections);
  for (size_t e = 0; e < trainable_.size(); ++e) {
    for (const auto& module : trainable_[e]->modules) {
      const int64_t index = ProjectionIndex(module.id);
      layout_->modules[index].push_back(&module);
      columns[index].insert(columns[index].end(), module.rank, static_cast<int64_t>(e));
    }
  }
  for (int64_t i = 0; i < projections; ++i) {
    layout_->columns[i] =
        at::tensor(columns[i], at::TensorOptions().dtype(at::kLong)).to(model_.options().device);
  }
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<Trainer>> Trainer::ForNewExpert(const Model& model,
                                                               const NewExpertOptions& spec,
                                                               const TrainerOptions& options) {
  RETURN_IF_ERROR(ValidateOptions(options));
  if (spec.name.empty()) return absl::InvalidArgumentError("the new expert needs a name");
  if (spec.r <= 0) return absl::InvalidArgumentError(absl::StrCat("r must be > 0, got ", spec.r));
  if (!(spec.lora_alpha > 0) || !std::isfinite(spec.lora_alpha)) {
    return absl::InvalidArgumentError(
        absl::StrCat("lora_alpha must be > 0, got ", spec.lora_alpha));
  }
  if (spec.target_modules.empty()) {
    return absl::InvalidArgumentError("the new expert needs target modules");
  }
  const bool all_linear = spec.target_modules.size() == 1 && spec.target_modules[0] == "all-linear";
  if (!all_linear) {
    for (const std::string& target : spec.target_modules) {
      if (!ProjectionFromName(target).has_value()) {
        return absl::InvalidArgumentError(absl::StrCat(
            "target module '", target,
            "' is not one of q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj "
            "(or all-linear)"));
      }
    }
  }
  // PEFT's LoraConfig as save_pretrained writes it (the fields a plain LoRA uses).
  Json config = {
      {"alpha_pattern", Json::object()},
      {"auto_mapping", nullptr},
      {"base_model_name_or_path",
       spec.base_model_name_or_path.empty() ? Json(nullptr) : Json(spec.base_model_name_or_path)},
      {"bias", "none"},
      {"fan_in_fan_out", false},
      {"inference_mode", true},
      {"init_lora_weights", true},
      {"layers_pattern", nullptr},
      {"layers_to_transform", nullptr},
      {"lora_alpha", spec.lora_alpha},
      {"lora_dropout", 0.0},
      {"modules_to_save", nullptr},
      {"peft_type", "LORA"},
      {"r", spec.r},
      {"rank_pattern", Json::object()},
      {"revision", nullptr},
      {"target_modules", all_linear ? Json("all-linear") : Json(spec.target_modules)},
      {"task_type", "CAUSAL_LM"},
      {"use_dora", false},
      {"use_rslora", spec.use_rslora},
  };
  const std::string config_json = config.dump(2) + "\n";
  ASSIGN_OR_RETURN(
      AdapterConfig parsed,
      AdapterConfig::FromJson(config_json, absl::StrCat("new expert '", spec.name, "'")));

  std::unique_ptr<Trainer> trainer(new Trainer(model, options));
  trainer->expert_mode_ = true;
  trainer->names_ = {spec.name};
  auto expert = std::make_unique<TrainableExpert>();
  expert->name = spec.name;
  expert->config_json = config_json;
  const c10::Device device = model.options().device;
  try {
    at::Generator generator = at::make_generator<at::CPUGeneratorImpl>(options.seed);
    for (int64_t layer = 0; layer < model.config().num_hidden_layers; ++layer) {
      for (int k = 0; k < kNumProjectionKinds; ++k) {
        const ProjectionId id{layer, static_cast<ProjectionKind>(k)};
        const std::string path = id.ModulePath();
        if (!parsed.Targets(path, layer)) continue;
        const ProjectionShape shape = ShapeOf(model.config(), id.kind);
        TrainableExpert::Module module;
        module.id = id;
        module.rank = parsed.RankFor(path);
        module.scaling = parsed.ScalingFor(path);
        // nn.init.kaiming_uniform_(A, a=sqrt(5)): bound = gain * sqrt(3 / fan_in) with
        // gain = sqrt(2 / (1 + a^2)) = sqrt(1/3), i.e. 1 / sqrt(in_features). B = 0.
        const double bound = 1.0 / std::sqrt(static_cast<double>(shape.in_features));
        module.a = at::empty({module.rank, shape.in_features}, at::kFloat)
                       .uniform_(-bound, bound, generator)
                       .to(device)
                       .set_requires_grad(true);
        module.b = at::zeros({shape.out_features, module.rank},
                             at::TensorOptions().dtype(at::kFloat).device(device))
                       .set_requires_grad(true);
        expert->modules.push_back(std::move(module));
      }
    }
  } catch (const c10::Error& e) {
    return absl::InternalError(absl::StrCat("new expert: ", e.what_without_backtrace()));
  }
  if (expert->modules.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat("new expert '", spec.name, "' targets no module of the model"));
  }
  trainer->trainable_.push_back(std::move(expert));
  RETURN_IF_ERROR(trainer->BuildLayout());
  for (const auto& module : trainer->trainable_[0]->modules) {
    trainer->AddParam(module.a, options.expert_lr);
    trainer->AddParam(module.b, options.expert_lr);
  }
  return trainer;
}

std::vector<at::Tensor> Trainer::parameters() const {
  std::vector<at::Tensor> out;
  for (const Param& param : params_) out.push_back(param.value);
  return out;
}

std::vector<at::Tensor> Trainer::expert_parameters(const std::string& name) const {
  std::vector<at::Tensor> out;
  for (const auto& expert : trainable_) {
    if (expert->name != name) continue;
    for (const auto& module : expert->modules) {
      out.push_back(module.a);
      out.push_back(module.b);
    }
  }
  return out;
}

at::Tensor Trainer::RoutingWeights(const at::Tensor& embeddings,
                                   const std::vector<int64_t>& offsets,
                                   const at::Tensor& fixed_weights) const {
  const int64_t tokens = embeddings.size(0);
  const int64_t k = static_cast<int64_t>(names_.size());
  if (fixed_weights.defined()) {
    return fixed_weights.to(embeddings.device(), at::kFloat).view({1, k}).expand({tokens, k});
  }
  const RoutingNormalization normalization{.top_k = 0, .temperature = options_.temperature};
  if (options_.granularity == RoutingGranularity::kToken) {
    return NormalizeRouting(router_->Logits(embeddings), normalization);
  }
  // Sequence level: one routing per sequence from its mean-pooled embeddings.
  const int64_t num_seqs = static_cast<int64_t>(offsets.size()) - 1;
  std::vector<at::Tensor> pooled;
  std::vector<int64_t> owner;
  for (int64_t b = 0; b < num_seqs; ++b) {
    const int64_t n = offsets[b + 1] - offsets[b];
    pooled.push_back(embeddings.narrow(0, offsets[b], n).to(at::kFloat).mean(0));
    owner.insert(owner.end(), n, b);
  }
  const at::Tensor weights = NormalizeRouting(router_->Logits(at::stack(pooled)), normalization);
  return weights.index_select(
      0, at::tensor(owner, at::TensorOptions().dtype(at::kLong)).to(weights.device()));
}

namespace {

// Packs sequences for one forward and lists the (row, next token) pairs the loss reads.
TrainingBatch MakeBatch(const std::vector<TokenSequence>& sequences, c10::Device device) {
  TrainingBatch batch;
  batch.offsets.push_back(0);
  std::vector<int64_t> rows, targets;
  for (size_t b = 0; b < sequences.size(); ++b) {
    const TokenSequence& sequence = sequences[b];
    const int64_t n = static_cast<int64_t>(sequence.size());
    batch.inputs.push_back({static_cast<int64_t>(b), sequence});
    const int64_t start = batch.offsets.back();
    batch.tokens.insert(batch.tokens.end(), sequence.begin(), sequence.end());
    for (int64_t t = 0; t + 1 < n; ++t) {
      rows.push_back(start + t);
      targets.push_back(sequence[t + 1]);
    }
    batch.offsets.push_back(start + n);
    batch.max_len = std::max(batch.max_len, n);
  }
  const auto options = at::TensorOptions().dtype(at::kLong);
  batch.rows = at::tensor(rows, options).to(device);
  batch.targets = at::tensor(targets, options).to(device);
  return batch;
}

}  // namespace

absl::StatusOr<std::pair<at::Tensor, at::Tensor>> Trainer::Forward(
    const TrainingBatch& batch, const at::Tensor& fixed_weights) const {
  ASSIGN_OR_RETURN(KvCache cache,
                   model_.CreateKvCache(static_cast<int64_t>(batch.inputs.size()), batch.max_len));
  at::Tensor weights;
  ForwardOptions forward_options;
  forward_options.all_logits = true;
  if (!expert_mode_) {
    ASSIGN_OR_RETURN(at::Tensor embeddings, model_.Embed(batch.tokens));
    try {
      weights = RoutingWeights(embeddings, batch.offsets, fixed_weights);
    } catch (const c10::Error& e) {
      return absl::InternalError(absl::StrCat("routing: ", e.what_without_backtrace()));
    }
  }
  ForwardOutput output;
  if (layout_ != nullptr) {
    TrainableDelta delta(*layout_, weights, model_.options().dtype);
    forward_options.delta = &delta;
    ASSIGN_OR_RETURN(output, model_.Forward(batch.inputs, cache, forward_options));
  } else {
    ASSIGN_OR_RETURN(output, mixture_->ForwardWithWeights(batch.inputs, cache, snapshot_, weights,
                                                          forward_options));
  }
  return std::make_pair(output.logits, weights);
}

absl::StatusOr<TrainingLog> Trainer::Step(const std::vector<TokenSequence>& sequences) {
  RETURN_IF_ERROR(ValidateSequences(sequences, model_.config().vocab_size, "training batch"));
  const TrainingBatch batch = MakeBatch(sequences, model_.options().device);
  for (Param& param : params_) param.value.mutable_grad() = at::Tensor();
  ASSIGN_OR_RETURN(auto forward, Forward(batch, at::Tensor()));
  auto& [logits, weights] = forward;
  TrainingLog log;
  try {
    const at::Tensor log_probs =
        at::log_softmax(logits.index_select(0, batch.rows).to(at::kFloat), -1);
    const at::Tensor lm_loss = at::nll_loss(log_probs, batch.targets);
    at::Tensor loss = lm_loss;
    const int64_t k = static_cast<int64_t>(names_.size());
    if (weights.defined()) {
      // Switch: K * sum_e f_e * P_e, f from the (non-differentiable) top-1 choices.
      const at::Tensor mean_weight = weights.mean(0);
      const at::Tensor top1_share =
          at::one_hot(weights.detach().argmax(1), k).to(at::kFloat).mean(0);
      const at::Tensor balance = (top1_share * mean_weight).sum() * static_cast<double>(k);
      if (options_.load_balance_coef > 0) loss = loss + options_.load_balance_coef * balance;
      log.balance_loss = ToDouble(balance);
      const at::Tensor w = weights.detach();
      log.entropy = ToDouble(-(w * w.clamp_min(1e-12).log()).sum(1).mean());
      const at::Tensor share = mean_weight.detach().to(at::kCPU, at::kDouble);
      log.share.assign(share.data_ptr<double>(), share.data_ptr<double>() + k);
    }
    loss.backward();
    log.loss = ToDouble(loss);
    log.lm_loss = ToDouble(lm_loss);

    c10::NoGradGuard no_grad;
    double squared = 0;
    for (const Param& param : params_) {
      const at::Tensor& grad = param.value.grad();
      if (grad.defined()) squared += ToDouble(grad.to(at::kDouble).pow(2).sum());
    }
    log.grad_norm = std::sqrt(squared);
    if (!std::isfinite(log.grad_norm)) {
      return absl::InternalError(absl::StrCat("step ", step_ + 1, ": the gradient norm is ",
                                              log.grad_norm, " (loss ", log.loss, ")"));
    }
    const double clip = options_.clip_norm > 0 && log.grad_norm > options_.clip_norm
                            ? options_.clip_norm / (log.grad_norm + 1e-6)
                            : 1.0;
    ++step_;
    const double bias1 = 1.0 - std::pow(options_.beta1, static_cast<double>(step_));
    const double bias2 = 1.0 - std::pow(options_.beta2, static_cast<double>(step_));
    for (Param& param : params_) {
      at::Tensor grad = param.value.grad();
      if (!grad.defined()) continue;
      if (clip != 1.0) grad.mul_(clip);
      // AdamW (Loshchilov & Hutter; torch.optim.AdamW's update).
      if (options_.weight_decay > 0) param.value.mul_(1.0 - param.lr * options_.weight_decay);
      param.m.mul_(options_.beta1).add_(grad, 1.0 - options_.beta1);
      param.v.mul_(options_.beta2).addcmul_(grad, grad, 1.0 - options_.beta2);
      const at::Tensor denom = (param.v / bias2).sqrt_().add_(options_.eps);
      param.value.addcdiv_(param.m, denom, -param.lr / bias1);
    }
  } catch (const c10::Error& e) {
    return absl::InternalError(absl::StrCat("step ", step_ + 1, ": ", e.what_without_backtrace()));
  }
  log.step = step_;
  return log;
}

absl::StatusOr<std::pair<double, int64_t>> Trainer::SumLoss(
    const std::vector<TokenSequence>& sequences, const at::Tensor& fixed_weights) const {
  c10::NoGradGuard no_grad;
  double total = 0;
  int64_t count = 0;
  const size_t chunk = static_cast<size_t>(std::max<int64_t>(options_.batch_size, 16));
  for (size_t begin = 0; begin < sequences.size(); begin += chunk) {
    const std::vector<TokenSequence> part(
        sequences.begin() + begin, sequences.begin() + std::min(sequences.size(), begin + chunk));
    const TrainingBatch batch = MakeBatch(part, model_.options().device);
    ASSIGN_OR_RETURN(auto forward, Forward(batch, fixed_weights));
    try {
      const at::Tensor log_probs =
          at::log_softmax(forward.first.index_select(0, batch.rows).to(at::kFloat), -1);
      total += ToDouble(at::nll_loss(log_probs, batch.targets, {}, at::Reduction::Sum));
      count += batch.rows.numel();
    } catch (const c10::Error& e) {
      return absl::InternalError(absl::StrCat("eval: ", e.what_without_backtrace()));
    }
  }
  return std::make_pair(total, count);
}

absl::StatusOr<double> Trainer::EvalLoss(const std::vector<TokenSequence>& sequences,
                                         const at::Tensor& fixed_weights) const {
  RETURN_IF_ERROR(ValidateSequences(sequences, model_.config().vocab_size, "eval data"));
  if (fixed_weights.defined()) {
    if (expert_mode_) {
      return absl::InvalidArgumentError("fixed routing weights need router mode");
    }
    if (fixed_weights.dim() != 1 || fixed_weights.size(0) != static_cast<int64_t>(names_.size())) {
      return absl::InvalidArgumentError(
          absl::StrCat("fixed routing weights must be [", names_.size(), "]"));
    }
  }
  ASSIGN_OR_RETURN(auto sum, SumLoss(sequences, fixed_weights));
  return sum.first / static_cast<double>(std::max<int64_t>(sum.second, 1));
}

absl::StatusOr<at::Tensor> Trainer::Route(const TokenSequence& tokens) const {
  if (expert_mode_) return absl::FailedPreconditionError("expert mode has no router");
  if (tokens.empty()) return absl::InvalidArgumentError("route: no tokens");
  c10::NoGradGuard no_grad;
  ASSIGN_OR_RETURN(at::Tensor embeddings, model_.Embed(tokens));
  try {
    return RoutingWeights(embeddings, {0, static_cast<int64_t>(tokens.size())}, at::Tensor())
        .to(at::kCPU)
        .contiguous();
  } catch (const c10::Error& e) {
    return absl::InternalError(absl::StrCat("route: ", e.what_without_backtrace()));
  }
}

absl::Status Trainer::Save(const std::string& dir) const {
  if (expert_mode_) return trainable_[0]->Save(dir);
  RETURN_IF_ERROR(router_->Save(dir));
  for (const auto& expert : trainable_) {
    RETURN_IF_ERROR(expert->Save(absl::StrCat(dir, "/experts/", expert->name)));
  }
  return absl::OkStatus();
}

std::string Trainer::FormatLog(const TrainingLog& log) const {
  std::string line = absl::StrFormat("step %*d/%d  loss %.4f",
                                     static_cast<int>(absl::StrCat(options_.steps).size()),
                                     log.step, options_.steps, log.lm_loss);
  if (log.heldout_loss >= 0) absl::StrAppendFormat(&line, "  heldout %.4f", log.heldout_loss);
  if (!expert_mode_) {
    absl::StrAppendFormat(&line, "  entropy %.3f  share", log.entropy);
    for (size_t e = 0; e < names_.size() && e < log.share.size(); ++e) {
      absl::StrAppendFormat(&line, " %s=%.2f", names_[e], log.share[e]);
    }
    if (options_.load_balance_coef > 0) {
      absl::StrAppendFormat(&line, "  balance %.3f", log.balance_loss);
    }
  }
  absl::StrAppendFormat(&line, "  |g| %.3f  %.1fs", log.grad_norm, log.seconds);
  return line;
}

absl::StatusOr<TrainingSummary> Trainer::Train(const TokenDataset& data) {
  const int64_t vocab = model_.config().vocab_size;
  RETURN_IF_ERROR(ValidateSequences(data.train, vocab, "training data"));
  if (!data.heldout.empty())
    RETURN_IF_ERROR(ValidateSequences(data.heldout, vocab, "held-out data"));
  const auto start = std::chrono::steady_clock::now();
  auto seconds = [&] {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  };
  auto emit = [&](const TrainingLog& log) {
    const std::string line = FormatLog(log);
    if (options_.on_log) {
      options_.on_log(log, line);
    } else {
      std::cerr << line << std::endl;
    }
  };

  TrainingSummary summary;
  if (!data.heldout.empty()) {
    ASSIGN_OR_RETURN(summary.initial_heldout_loss, EvalLoss(data.heldout));
  }
  if (order_.size() != data.train.size()) {
    order_.resize(data.train.size());
    std::iota(order_.begin(), order_.end(), 0);
    cursor_ = order_.size();
  }
  const size_t batch_size = std::min(static_cast<size_t>(options_.batch_size), data.train.size());
  double window_loss = 0;
  int64_t window_steps = 0;
  for (int64_t s = 0; s < options_.steps; ++s) {
    std::vector<TokenSequence> batch;
    for (size_t i = 0; i < batch_size; ++i) {
      if (cursor_ >= order_.size()) {
        std::shuffle(order_.begin(), order_.end(), rng_);
        cursor_ = 0;
      }
      batch.push_back(data.train[order_[cursor_++]]);
    }
    ASSIGN_OR_RETURN(TrainingLog log, Step(batch));
    if (s == 0) summary.first_loss = log.lm_loss;
    window_loss += log.lm_loss;
    ++window_steps;
    const bool last = s + 1 == options_.steps;
    if ((options_.log_every > 0 && step_ % options_.log_every == 0) || last) {
      log.lm_loss = window_loss / static_cast<double>(window_steps);
      summary.last_loss = log.lm_loss;
      window_loss = 0;
      window_steps = 0;
      if (!data.heldout.empty()) {
        ASSIGN_OR_RETURN(log.heldout_loss, EvalLoss(data.heldout));
        if (last) summary.final_heldout_loss = log.heldout_loss;
      }
      log.seconds = seconds();
      summary.logs.push_back(log);
      if (options_.log_every > 0) emit(log);
    }
    if (options_.checkpoint_every > 0 && step_ % options_.checkpoint_every == 0 && !last) {
      RETURN_IF_ERROR(Save(absl::StrFormat("%s/checkpoints/step-%06d", options_.out_dir, step_)));
    }
  }
  if (options_.steps == 0 && !data.heldout.empty()) {
    summary.final_heldout_loss = summary.initial_heldout_loss;
  }
  if (!options_.out_dir.empty()) RETURN_IF_ERROR(Save(options_.out_dir));
  summary.steps = options_.steps;
  summary.seconds = seconds();
  return summary;
}

}  // namespace moelora
