// moelora-train-router: trains a router over LoRA experts (the experts too, with
// --train_experts), or a new LoRA expert alone (--new_expert), through the fused single pass the
// daemon serves. See docs/training.md.
//
//   moelora-train-router --model_dir=M --experts=math=E1,code=E2 --data=ids.txt
//       --out_dir=routers/my-router --steps=500
//   moelora-train-router --model_dir=M --new_expert=math --data=math.txt --out_dir=experts/math

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cstdint>
#include <fstream>
#include <iostream>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/status/statusor.h"
#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "core/model.h"
#include "core/status_macros.h"
#include "core/tokenizer.h"
#include "core/trainer.h"
#include "core/training_data.h"

ABSL_FLAG(std::string, model_dir, "", "base model: a Hugging Face checkpoint directory (required)");
ABSL_FLAG(std::string, experts, "",
          "router mode: experts to route over, name=adapter_dir[,name=adapter_dir...]");
ABSL_FLAG(std::string, router_dir, "",
          "router mode: start from this router (its expert list must match --experts)");
ABSL_FLAG(std::string, router_name, "router", "router mode: the name written into the router");
ABSL_FLAG(std::string, granularity, "token", "router mode: token or sequence");
ABSL_FLAG(int64_t, top_k, 0, "router mode: top_k written into the router config (0 = dense)");
ABSL_FLAG(bool, train_experts, false, "router mode: also train the experts' LoRA A and B");
ABSL_FLAG(double, temperature, 1.0, "router softmax temperature (training and saved config)");
ABSL_FLAG(double, load_balance_coef, 0.0,
          "weight of the Switch load-balancing loss K * sum_e f_e * P_e (0 = off)");
ABSL_FLAG(std::string, new_expert, "",
          "expert mode: train a new LoRA with this name alone, written as a PEFT adapter");
ABSL_FLAG(int64_t, r, 8, "expert mode: LoRA rank");
ABSL_FLAG(double, lora_alpha, 16, "expert mode: LoRA alpha (scaling = alpha / r)");
ABSL_FLAG(bool, use_rslora, false, "expert mode: scaling = alpha / sqrt(r)");
ABSL_FLAG(std::string, target_modules, "q_proj,v_proj",
          "expert mode: projections to adapt (comma separated) or all-linear");
ABSL_FLAG(std::string, data, "", "training data (required): see --data_format");
ABSL_FLAG(std::string, data_format, "auto",
          "ids (one sequence of token ids per line), safetensors ([N, L] integer tensor "
          "'input_ids', trailing negative ids = padding), text (one text per line, through "
          "--tokenizer), or auto (.safetensors -> safetensors, else ids)");
ABSL_FLAG(std::string, tokenizer, "",
          "text data: a SentencePiece model or a directory with tokenizer.model "
          "(default: --model_dir)");
ABSL_FLAG(int64_t, max_seq_len, 512, "longer sequences are split into chunks of this many tokens");
ABSL_FLAG(double, heldout_fraction, 0.1, "share of the sequences held out for the held-out loss");
ABSL_FLAG(int64_t, steps, 300, "optimisation steps");
ABSL_FLAG(int64_t, batch_size, 8, "sequences per step");
ABSL_FLAG(double, lr, 1e-2, "AdamW learning rate of the router gate");
ABSL_FLAG(double, expert_lr, 1e-3, "AdamW learning rate of expert A / B");
ABSL_FLAG(double, weight_decay, 0.0, "AdamW decoupled weight decay");
ABSL_FLAG(double, clip_norm, 1.0, "clip the global gradient norm to this (0 = off)");
ABSL_FLAG(uint64_t, seed, 0, "seed for initialisation, the held-out split and batch order");
ABSL_FLAG(std::string, out_dir, "", "where the result goes (required)");
ABSL_FLAG(int64_t, checkpoint_every, 0, "write out_dir/checkpoints/step-N every N steps (0 = off)");
ABSL_FLAG(int64_t, log_every, 50, "print a progress line every N steps (0 = off)");
ABSL_FLAG(std::string, device, "cpu", "cpu, cuda or cuda:N");
ABSL_FLAG(std::string, dtype, "fp32", "model dtype: fp32, bf16 or fp16");
ABSL_FLAG(int, threads, 0, "CPU threads for torch (0 = torch's default)");

namespace {

absl::StatusOr<std::vector<moelora::ExpertSource>> ParseExperts(const std::string& flag) {
  std::vector<moelora::ExpertSource> experts;
  for (absl::string_view item : absl::StrSplit(flag, ',', absl::SkipWhitespace())) {
    std::vector<std::string> parts = absl::StrSplit(item, absl::MaxSplits('=', 1));
    if (parts.size() != 2 || parts[0].empty() || parts[1].empty()) {
      return absl::InvalidArgumentError(
          absl::StrCat("--experts: '", item, "' is not name=adapter_dir"));
    }
    experts.push_back({std::string(absl::StripAsciiWhitespace(parts[0])),
                       std::string(absl::StripAsciiWhitespace(parts[1]))});
  }
  return experts;
}

absl::StatusOr<std::vector<moelora::TokenSequence>> ReadData(const std::string& model_dir) {
  const std::string path = absl::GetFlag(FLAGS_data);
  std::string format = absl::GetFlag(FLAGS_data_format);
  if (format == "auto") format = absl::EndsWith(path, ".safetensors") ? "safetensors" : "ids";
  if (format == "ids") return moelora::ReadTokenIdFile(path);
  if (format == "safetensors") return moelora::ReadTokenTensorFile(path);
  if (format != "text") {
    return absl::InvalidArgumentError(
        absl::StrCat("--data_format: '", format, "', expected ids, safetensors, text or auto"));
  }
  std::string tokenizer_path = absl::GetFlag(FLAGS_tokenizer);
  if (tokenizer_path.empty()) tokenizer_path = model_dir;
  ASSIGN_OR_RETURN(auto tokenizer, moelora::Tokenizer::Load(tokenizer_path));
  std::ifstream in(path);
  if (!in.is_open()) return absl::NotFoundError(absl::StrCat(path, ": data file not found"));
  std::vector<moelora::TokenSequence> sequences;
  std::string line;
  while (std::getline(in, line)) {
    if (absl::StripAsciiWhitespace(line).empty()) continue;
    ASSIGN_OR_RETURN(std::vector<int64_t> ids, tokenizer->Encode(line, /*add_bos=*/true));
    sequences.push_back(std::move(ids));
  }
  return sequences;
}

absl::Status Run() {
  const std::string model_dir = absl::GetFlag(FLAGS_model_dir);
  const std::string out_dir = absl::GetFlag(FLAGS_out_dir);
  const std::string new_expert = absl::GetFlag(FLAGS_new_expert);
  const std::string experts_flag = absl::GetFlag(FLAGS_experts);
  if (model_dir.empty()) return absl::InvalidArgumentError("--model_dir is required");
  if (absl::GetFlag(FLAGS_data).empty()) return absl::InvalidArgumentError("--data is required");
  if (out_dir.empty()) return absl::InvalidArgumentError("--out_dir is required");
  if (new_expert.empty() == experts_flag.empty()) {
    return absl::InvalidArgumentError(
        "give either --experts (train a router over them) or --new_expert (train a new expert "
        "alone), not both");
  }
  if (absl::GetFlag(FLAGS_threads) > 0) at::set_num_threads(absl::GetFlag(FLAGS_threads));

  ASSIGN_OR_RETURN(
      moelora::LoadOptions load_options,
      moelora::ParseLoadOptions(absl::GetFlag(FLAGS_device), absl::GetFlag(FLAGS_dtype)));
  ASSIGN_OR_RETURN(auto model, moelora::Model::Load(model_dir, load_options));
  const int64_t vocab = model->config().vocab_size;

  ASSIGN_OR_RETURN(std::vector<moelora::TokenSequence> sequences, ReadData(model_dir));
  sequences = moelora::ChunkSequences(sequences, absl::GetFlag(FLAGS_max_seq_len));
  RETURN_IF_ERROR(moelora::ValidateSequences(sequences, vocab, absl::GetFlag(FLAGS_data)));
  ASSIGN_OR_RETURN(
      moelora::TokenDataset data,
      moelora::SplitHeldout(std::move(sequences), absl::GetFlag(FLAGS_heldout_fraction),
                            absl::GetFlag(FLAGS_seed)));

  moelora::TrainerOptions options;
  options.steps = absl::GetFlag(FLAGS_steps);
  options.batch_size = absl::GetFlag(FLAGS_batch_size);
  options.lr = absl::GetFlag(FLAGS_lr);
  options.expert_lr = absl::GetFlag(FLAGS_expert_lr);
  options.weight_decay = absl::GetFlag(FLAGS_weight_decay);
  options.clip_norm = absl::GetFlag(FLAGS_clip_norm);
  options.train_experts = absl::GetFlag(FLAGS_train_experts);
  options.temperature = absl::GetFlag(FLAGS_temperature);
  options.load_balance_coef = absl::GetFlag(FLAGS_load_balance_coef);
  options.seed = absl::GetFlag(FLAGS_seed);
  options.router_name = absl::GetFlag(FLAGS_router_name);
  options.top_k = absl::GetFlag(FLAGS_top_k);
  options.init_router_dir = absl::GetFlag(FLAGS_router_dir);
  options.out_dir = out_dir;
  options.checkpoint_every = absl::GetFlag(FLAGS_checkpoint_every);
  options.log_every = absl::GetFlag(FLAGS_log_every);
  const std::string granularity = absl::GetFlag(FLAGS_granularity);
  if (granularity == "token") {
    options.granularity = moelora::RoutingGranularity::kToken;
  } else if (granularity == "sequence") {
    options.granularity = moelora::RoutingGranularity::kSequence;
  } else {
    return absl::InvalidArgumentError(
        absl::StrCat("--granularity: '", granularity, "', expected token or sequence"));
  }

  std::unique_ptr<moelora::Trainer> trainer;
  if (!new_expert.empty()) {
    moelora::NewExpertOptions spec;
    spec.name = new_expert;
    spec.r = absl::GetFlag(FLAGS_r);
    spec.lora_alpha = absl::GetFlag(FLAGS_lora_alpha);
    spec.use_rslora = absl::GetFlag(FLAGS_use_rslora);
    spec.target_modules =
        absl::StrSplit(absl::GetFlag(FLAGS_target_modules), ',', absl::SkipWhitespace());
    spec.base_model_name_or_path = model_dir;
    ASSIGN_OR_RETURN(trainer, moelora::Trainer::ForNewExpert(*model, spec, options));
    std::cerr << "expert mode: new LoRA '" << new_expert << "' (r " << spec.r << ", alpha "
              << spec.lora_alpha << ", " << absl::GetFlag(FLAGS_target_modules) << ")\n";
  } else {
    ASSIGN_OR_RETURN(std::vector<moelora::ExpertSource> experts, ParseExperts(experts_flag));
    ASSIGN_OR_RETURN(trainer, moelora::Trainer::ForRouter(*model, experts, options));
    std::cerr << "router mode: '" << options.router_name << "' over "
              << trainer->expert_names().size() << " experts"
              << (options.train_experts ? " (experts trained too)" : " (experts frozen)") << "\n";
  }
  std::cerr << data.train.size() << " training sequences, " << data.heldout.size() << " held out; "
            << options.steps << " steps of " << options.batch_size << " sequences\n";
  ASSIGN_OR_RETURN(moelora::TrainingSummary summary, trainer->Train(data));
  std::cerr << absl::StrFormat("done in %.1f s: loss %.4f -> %.4f", summary.seconds,
                               summary.first_loss, summary.last_loss);
  if (summary.initial_heldout_loss >= 0) {
    std::cerr << absl::StrFormat(", held-out %.4f -> %.4f", summary.initial_heldout_loss,
                                 summary.final_heldout_loss);
  }
  std::cerr << "\n";
  std::cout << out_dir << "\n";
  return absl::OkStatus();
}

}  // namespace

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "Trains a router over LoRA experts (--experts), or a new LoRA expert (--new_expert), "
      "through moelora's fused single pass. See docs/training.md.");
  absl::ParseCommandLine(argc, argv);
  const absl::Status status = Run();
  if (!status.ok()) {
    std::cerr << "error: " << status << "\n";
    return 1;
  }
  return 0;
}
