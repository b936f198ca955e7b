#ifndef MOELORA_CORE_TRAINER_H_
#define MOELORA_CORE_TRAINER_H_

// Training routers and LoRA experts through the same fused single pass the daemon serves
// (docs/training.md).
//
// Router mode: the base model and (by default) the experts are frozen; the gate of a router
// (Linear(hidden -> K) over token embeddings) is trained by next-token cross-entropy through
// Mixture::ForwardWithWeights with dense weights softmax(gate(embeddings) / T), so every expert
// gets gradient (DyLoRA-MoE's choice). With train_experts the experts' A and B are trained too
// (their own learning rate), through a LinearDelta over trainable tensors instead of the pool.
// Optional Switch-style load balancing: coef * K * sum_e f_e * P_e (f_e: share of tokens whose
// top-1 is e, P_e: mean weight of e).
//
// Expert mode: a new LoRA initialised as PEFT does (A Kaiming-uniform with a = sqrt(5), B zero)
// is trained alone (weight 1) and written as a PEFT adapter (adapter_config.json +
// adapter_model.safetensors).
//
// Both use AdamW (decoupled weight decay), global-norm gradient clipping, a periodic log line
// and checkpoints. Every step builds a fresh KvCache for its batch (the cache's tensors become
// part of the autograd graph).

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "core/expert_pool.h"
#include "core/mixture.h"
#include "core/model.h"
#include "core/router.h"
#include "core/training_data.h"

namespace moelora {

// An expert to attach by name from a PEFT adapter directory.
struct ExpertSource {
  std::string name;
  std::string dir;
};

// A new LoRA expert (expert mode).
struct NewExpertOptions {
  std::string name;
  int64_t r = 8;
  double lora_alpha = 16;
  bool use_rslora = false;
  // Projection names (q_proj, ..., down_proj), or {"all-linear"}.
  std::vector<std::string> target_modules = {"q_proj", "v_proj"};
  // Written into adapter_config.json (PEFT's field; informational).
  std::string base_model_name_or_path;
};

// The numbers of one step (Step) or one log line (Train: lm_loss averaged over the steps since
// the previous line, heldout_loss and seconds filled in).
struct TrainingLog {
  int64_t step = 0;           // steps done
  double loss = 0;            // total loss of the last step (next-token + load balancing)
  double lm_loss = 0;         // mean next-token cross-entropy (see above)
  double balance_loss = 0;    // K * sum_e f_e * P_e of the last step (1 = perfectly balanced)
  double heldout_loss = -1;   // next-token cross-entropy on the held-out split; -1 when none
  double entropy = 0;         // mean routing entropy per token (nats) of the last step
  std::vector<double> share;  // mean routing weight per expert of the last step
  double grad_norm = 0;       // global gradient norm before clipping
  double seconds = 0;         // since training started
};

struct TrainerOptions {
  int64_t steps = 300;
  int64_t batch_size = 8;
  double lr = 1e-2;           // router gate
  double expert_lr = 1e-3;    // expert A / B (router mode with train_experts, and expert mode)
  double weight_decay = 0.0;  // AdamW's decoupled decay, for every trained tensor
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double clip_norm = 1.0;  // <= 0: no clipping
  bool train_experts = false;
  double temperature = 1.0;  // softmax temperature while training; saved in the router config
  double load_balance_coef = 0.0;
  uint64_t seed = 0;
  // Router written at the end and in checkpoints.
  std::string router_name = "router";
  RoutingGranularity granularity = RoutingGranularity::kToken;
  int64_t top_k = 0;  // written into the saved router config (training itself is dense)
  // Start from this router directory instead of a fresh gate; its experts must be the attached
  // ones (any order: the router's order is used).
  std::string init_router_dir;
  // Output: final result in out_dir (empty: nothing written), checkpoints every
  // checkpoint_every steps in out_dir/checkpoints/step-NNNNNN.
  std::string out_dir;
  int64_t checkpoint_every = 0;
  int64_t log_every = 50;  // 0: no log lines
  // Receives every log line's numbers; default: print to stderr.
  std::function<void(const TrainingLog&, const std::string& line)> on_log;
};

struct TrainingSummary {
  int64_t steps = 0;
  double initial_heldout_loss = -1;  // before the first step; -1 without held-out data
  double final_heldout_loss = -1;
  double first_loss = 0;  // next-token loss of the first step
  double last_loss = 0;   // mean next-token loss of the last log window
  double seconds = 0;
  std::vector<TrainingLog> logs;
};

class TrainableExpert;
struct TrainableLayout;
struct TrainingBatch;

class Trainer {
 public:
  // Router mode over the given experts (loaded and validated against the model).
  static absl::StatusOr<std::unique_ptr<Trainer>> ForRouter(
      const Model& model, const std::vector<ExpertSource>& experts, const TrainerOptions& options);
  // Expert mode: a new PEFT-initialised LoRA, trained alone at weight 1.
  static absl::StatusOr<std::unique_ptr<Trainer>> ForNewExpert(const Model& model,
                                                               const NewExpertOptions& expert,
                                                               const TrainerOptions& options);
  ~Trainer();

  // Runs options.steps steps over `data.train` (sequences validated against the vocabulary),
  // logging, evaluating data.heldout and checkpointing as configured, then writes the result to
  // options.out_dir when set.
  absl::StatusOr<TrainingSummary> Train(const TokenDataset& data);

  // One optimisation step on a batch of sequences; returns the numbers of that step.
  absl::StatusOr<TrainingLog> Step(const std::vector<TokenSequence>& batch);

  // Mean next-token cross-entropy over every predicted token of `sequences`, no gradient.
  // `fixed_weights` [K] (router mode): these weights for every token instead of the router's.
  absl::StatusOr<double> EvalLoss(const std::vector<TokenSequence>& sequences,
                                  const at::Tensor& fixed_weights = at::Tensor()) const;

  // The router's weights for one sequence's tokens [tokens, K] fp32 CPU, no gradient.
  absl::StatusOr<at::Tensor> Route(const TokenSequence& tokens) const;

  // Router mode: the router being trained (shares the gate tensors, so it follows the steps).
  std::shared_ptr<const Router> router() const { return router_; }
  // Expert names in the router's order (expert mode: the new expert).
  const std::vector<std::string>& expert_names() const { return names_; }
  // Every trained tensor (gate weight and bias first in router mode, then A, B per module).
  std::vector<at::Tensor> parameters() const;
  // A and B of one expert's modules (train_experts or expert mode), in module order.
  std::vector<at::Tensor> expert_parameters(const std::string& name) const;
  int64_t steps_done() const { return step_; }
  bool expert_mode() const { return expert_mode_; }

  // Router mode: router_config.json + router.safetensors in `dir`, and with train_experts each
  // expert as a PEFT adapter in dir/experts/<name>. Expert mode: the adapter in `dir`.
  absl::Status Save(const std::string& dir) const;

 private:
  struct Param {
    at::Tensor value;  // leaf, requires grad
    at::Tensor m, v;   // AdamW moments
    double lr = 0;
  };

  Trainer(const Model& model, const TrainerOptions& options);
  absl::Status InitRouter();
  absl::Status BuildLayout();
  void AddParam(const at::Tensor& value, double lr);
  // Logits [tokens, vocab] and routing weights [tokens, K] (undefined in expert mode); with
  // `fixed_weights` [K] those weights for every token.
  absl::StatusOr<std::pair<at::Tensor, at::Tensor>> Forward(const TrainingBatch& batch,
                                                            const at::Tensor& fixed_weights) const;
  at::Tensor RoutingWeights(const at::Tensor& embeddings, const std::vector<int64_t>& offsets,
                            const at::Tensor& fixed_weights) const;
  absl::StatusOr<std::pair<double, int64_t>> SumLoss(const std::vector<TokenSequence>& sequences,
                                                     const at::Tensor& fixed_weights) const;
  std::string FormatLog(const TrainingLog& log) const;

  const Model& model_;
  TrainerOptions options_;
  bool expert_mode_ = false;
  std::vector<std::string> names_;
  // Frozen experts: the pool and the fused delta the daemon runs.
  std::unique_ptr<ExpertPool> pool_;
  std::unique_ptr<Mixture> mixture_;
  std::shared_ptr<const ExpertSnapshot> snapshot_;
  // Trainable experts (train_experts or expert mode), in names_ order.
  std::vector<std::unique_ptr<TrainableExpert>> trainable_;
  std::unique_ptr<TrainableLayout> layout_;
  at::Tensor gate_weight_, gate_bias_;
  std::shared_ptr<const Router> router_;
  std::vector<Param> params_;
  int64_t step_ = 0;
  std::mt19937_64 rng_;
  std::vector<size_t> order_;  // epoch order of the training sequences
  size_t cursor_ = 0;
};

}  // namespace moelora

#endif  // MOELORA_CORE_TRAINER_H_
