// Prefill throughput of the base model, the fused single pass over K experts, and the K-pass
// baseline (DyLoRA-MoE: one full pass per expert, logits mixed), with Google Benchmark.
//
// CPU (small default shape):   build/tools/bench/moelora-bench
// GPU (Gemma-2B-like layers, as scripts/gpu-bench.sh runs it):
//   moelora-bench --device=cuda --dtype=bf16 --hidden=2048
//     --intermediate=16384 --heads=8 --kv_heads=1 --head_dim=256 --layers=4 --vocab=32000
//     --rank=16 --batch=4 --seq_len=512
// Random weights; the model and 8 rank-r experts over all seven projections are written once to
// --work_dir. Time per iteration includes a host sync on the logits.

#include <ATen/ATen.h>
#include <benchmark/benchmark.h>

#include <cstdint>
#include <filesystem>
#include <iostream>
#include <memory>
#include <string>
#include <tuple>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/str_cat.h"
#include "core/mixture.h"
#include "core/random_model.h"

ABSL_FLAG(std::string, device, "cpu", "cpu or cuda");
ABSL_FLAG(std::string, dtype, "fp32", "fp32, bf16 or fp16");
ABSL_FLAG(int64_t, hidden, 256, "hidden size");
ABSL_FLAG(int64_t, intermediate, 1024, "MLP intermediate size");
ABSL_FLAG(int64_t, heads, 4, "attention heads");
ABSL_FLAG(int64_t, kv_heads, 1, "KV heads");
ABSL_FLAG(int64_t, head_dim, 64, "head dim");
ABSL_FLAG(int64_t, layers, 2, "decoder layers");
ABSL_FLAG(int64_t, vocab, 1024, "vocabulary");
ABSL_FLAG(int64_t, rank, 16, "LoRA rank of every expert");
ABSL_FLAG(int64_t, batch, 2, "sequences per prefill");
ABSL_FLAG(int64_t, seq_len, 64, "tokens per sequence");
ABSL_FLAG(int64_t, decode_context, 128, "decode: tokens already in each sequence's cache");
ABSL_FLAG(int64_t, decode_steps, 100, "decode: timed steps per run (one token per sequence)");
ABSL_FLAG(std::string, work_dir, "/tmp/moelora-bench", "where the random model and experts go");

namespace moelora {
namespace {

constexpr int kMaxExperts = 8;

struct Setup {
  std::unique_ptr<Model> model;
  std::unique_ptr<ExpertPool> pool;
  std::unique_ptr<Mixture> mixture;
  std::vector<SequenceInput> batch;
  int64_t tokens = 0;
};

Setup& Global() {
  static Setup setup;
  return setup;
}

void Check(const absl::Status& status) {
  if (!status.ok()) {
    std::cerr << status << "\n";
    std::exit(1);
  }
}

void Prepare() {
  ModelConfig config = TinyModelConfig(ModelType::kGemma);
  config.hidden_size = absl::GetFlag(FLAGS_hidden);
  config.intermediate_size = absl::GetFlag(FLAGS_intermediate);
  config.num_attention_heads = absl::GetFlag(FLAGS_heads);
  config.num_key_value_heads = absl::GetFlag(FLAGS_kv_heads);
  config.head_dim = absl::GetFlag(FLAGS_head_dim);
  config.num_hidden_layers = absl::GetFlag(FLAGS_layers);
  config.vocab_size = absl::GetFlag(FLAGS_vocab);
  const int64_t rank = absl::GetFlag(FLAGS_rank);
  const std::string dir =
      absl::StrCat(absl::GetFlag(FLAGS_work_dir), "/h", config.hidden_size, "_i",
                   config.intermediate_size, "_l", config.num_hidden_layers, "_r", rank);
  if (!std::filesystem::exists(dir + "/base/config.json")) {
    Check(WriteRandomModel(dir + "/base", config, {.seed = 1, .weight_std = 0.02}));
  }
  absl::StatusOr<LoadOptions> parsed =
      ParseLoadOptions(absl::GetFlag(FLAGS_device), absl::GetFlag(FLAGS_dtype));
  Check(parsed.status());
  const LoadOptions options = *parsed;
  Setup& setup = Global();
  auto model = Model::Load(dir + "/base", options);
  Check(model.status());
  setup.model = std::move(*model);
  auto pool = ExpertPool::Create(*setup.model, {.capacity = kMaxExperts, .max_rank = rank});
  Check(pool.status());
  setup.pool = std::move(*pool);
  setup.mixture = std::make_unique<Mixture>(*setup.model, *setup.pool);
  for (int i = 0; i < kMaxExperts; ++i) {
    const std::string expert_dir = absl::StrCat(dir, "/expert", i);
    if (!std::filesystem::exists(expert_dir + "/adapter_config.json")) {
      RandomAdapterOptions spec;
      spec.r = rank;
      spec.lora_alpha = 2.0 * rank;
      spec.target_modules = {"q_proj",    "k_proj",  "v_proj",   "o_proj",
                             "gate_proj", "up_proj", "down_proj"};
      spec.seed = 10 + i;
      spec.std = 0.02;
      Check(WriteRandomAdapter(expert_dir, config, spec));
    }
    Check(setup.mixture->AttachExpert(absl::StrCat("expert", i), expert_dir).status());
  }
  const int64_t batch = absl::GetFlag(FLAGS_batch), seq_len = absl::GetFlag(FLAGS_seq_len);
  for (int64_t b = 0; b < batch; ++b) {
    std::vector<int64_t> tokens(seq_len);
    for (int64_t t = 0; t < seq_len; ++t) tokens[t] = (b * 7919 + t * 104729) % config.vocab_size;
    setup.batch.push_back({b, std::move(tokens)});
  }
  setup.tokens = batch * seq_len;
}

std::shared_ptr<const ExpertSnapshot> FirstExperts(int k) {
  std::vector<int64_t> positions(k);
  for (int i = 0; i < k; ++i) positions[i] = i;
  auto subset = Global().pool->Subset(*Global().pool->snapshot(), positions);
  Check(subset.status());
  return *subset;
}

void Finish(benchmark::State& state, const at::Tensor& logits) {
  benchmark::DoNotOptimize(logits.sum().item<float>());  // waits for the device
}

void BM_Base(benchmark::State& state) {
  Setup& s = Global();
  auto cache =
      s.model->CreateKvCache(static_cast<int64_t>(s.batch.size()), absl::GetFlag(FLAGS_seq_len));
  Check(cache.status());
  for (auto _ : state) {
    for (const auto& seq : s.batch) cache->Reset(seq.slot);
    auto out = s.model->Forward(s.batch, *cache);
    Check(out.status());
    Finish(state, out->logits);
  }
  state.SetItemsProcessed(state.iterations() * s.tokens);
}

void BM_Fused(benchmark::State& state, int k) {
  Setup& s = Global();
  const auto snapshot = FirstExperts(k);
  const at::Tensor weights = at::full({s.tokens, k}, 1.0 / k);
  auto cache =
      s.model->CreateKvCache(static_cast<int64_t>(s.batch.size()), absl::GetFlag(FLAGS_seq_len));
  Check(cache.status());
  for (auto _ : state) {
    for (const auto& seq : s.batch) cache->Reset(seq.slot);
    auto out = s.mixture->ForwardWithWeights(s.batch, *cache, snapshot, weights);
    Check(out.status());
    Finish(state, out->logits);
  }
  state.SetItemsProcessed(state.iterations() * s.tokens);
}

void BM_KPass(benchmark::State& state, int k) {
  Setup& s = Global();
  const auto snapshot = FirstExperts(k);
  const at::Tensor weights = at::full({static_cast<int64_t>(s.batch.size()), k}, 1.0 / k);
  for (auto _ : state) {
    auto logits = s.mixture->KPassLogits(s.batch, snapshot, weights);
    Check(logits.status());
    Finish(state, *logits);
  }
  state.SetItemsProcessed(state.iterations() * s.tokens);
}

// One decode step (one new token for each of `batch` sequences, each with decode_context tokens
// already cached) of the base model (k = 0) or the fused pass over k experts with dense
// weights: the step the serving engine runs once per generated token.
void BM_Decode(benchmark::State& state, int64_t batch, int k) {
  Setup& s = Global();
  const int64_t context = absl::GetFlag(FLAGS_decode_context);
  const int64_t vocab = s.model->config().vocab_size;
  auto cache = s.model->CreateKvCache(batch, context + absl::GetFlag(FLAGS_decode_steps) + 1);
  Check(cache.status());
  std::vector<SequenceInput> prompts, step;
  for (int64_t b = 0; b < batch; ++b) {
    std::vector<int64_t> tokens(context);
    for (int64_t t = 0; t < context; ++t) tokens[t] = (b * 7919 + t * 104729) % vocab;
    prompts.push_back({b, std::move(tokens)});
    step.push_back({b, {(b * 31) % vocab}});
  }
  Check(s.model->Forward(prompts, *cache).status());
  const auto snapshot = k > 0 ? FirstExperts(k) : nullptr;
  const at::Tensor weights = at::full({batch, std::max(k, 1)}, 1.0 / std::max(k, 1));
  for (auto _ : state) {
    auto out = k > 0 ? s.mixture->ForwardWithWeights(step, *cache, snapshot, weights)
                     : s.model->Forward(step, *cache);
    Check(out.status());
    Finish(state, out->logits);
  }
  state.SetItemsProcessed(state.iterations() * batch);  // items/s = generated tokens/s
}

// One projection alone, base vs base + fused delta (n·R = 8·16 rank rows): where the fused pass
// spends its time, shape by shape.
enum class ProjectionMode { kBase, kFused, kWidened };

// kWidened: the candidate for issue 7 — the expand folded into the base GEMM by widening its
// reduction: y = [x | (x·Aᵀ)⊙w] · [W | B]ᵀ, so the output is written once.
void BM_Projection(benchmark::State& state, int64_t in, int64_t out, ProjectionMode mode) {
  Setup& s = Global();
  const auto options =
      at::TensorOptions().dtype(s.model->options().dtype).device(s.model->options().device);
  const int64_t tokens = s.tokens, rows = kMaxExperts * absl::GetFlag(FLAGS_rank);
  const at::Tensor x = at::randn({tokens, in}, options), w = at::randn({out, in}, options);
  const at::Tensor a = at::randn({rows, in}, options) * 0.01, bt = at::randn({rows, out}, options);
  const at::Tensor widened = at::cat({w, bt.t()}, 1);  // [out, in + rows]
  const at::Tensor row_weights = at::rand({tokens, rows}, options);
  for (auto _ : state) {
    at::Tensor y;
    if (mode == ProjectionMode::kWidened) {
      y = at::linear(at::cat({x, at::linear(x, a).mul_(row_weights)}, 1), widened);
    } else {
      y = at::linear(x, w);
      if (mode == ProjectionMode::kFused) {
        at::Tensor shrink = at::linear(x, a);
        shrink.mul_(row_weights);
        y.addmm_(shrink, bt);
      }
    }
    benchmark::DoNotOptimize(y.sum().item<float>());
  }
}

}  // namespace
}  // namespace moelora

int main(int argc, char** argv) {
  // Google Benchmark takes its --benchmark_* flags out of argv first; absl parses the rest.
  benchmark::Initialize(&argc, argv);
  absl::ParseCommandLine(argc, argv);
  moelora::Prepare();
  benchmark::RegisterBenchmark("prefill/base", moelora::BM_Base)->Unit(benchmark::kMillisecond);
  for (int k : {2, 4, 8}) {
    benchmark::RegisterBenchmark(absl::StrCat("prefill/fused/K=", k).c_str(), moelora::BM_Fused, k)
        ->Unit(benchmark::kMillisecond);
    benchmark::RegisterBenchmark(absl::StrCat("prefill/kpass/K=", k).c_str(), moelora::BM_KPass, k)
        ->Unit(benchmark::kMillisecond);
  }
  for (int64_t batch : {1, 8, 32, 64}) {
    for (int k : {0, 8}) {
      benchmark::RegisterBenchmark(
          absl::StrCat("decode/", k == 0 ? "base" : "fused/K=8", "/batch=", batch).c_str(),
          moelora::BM_Decode, batch, k)
          ->Iterations(absl::GetFlag(FLAGS_decode_steps))
          ->Unit(benchmark::kMillisecond);
    }
  }
  const int64_t hidden = absl::GetFlag(FLAGS_hidden),
                intermediate = absl::GetFlag(FLAGS_intermediate);
  const int64_t q = absl::GetFlag(FLAGS_heads) * absl::GetFlag(FLAGS_head_dim);
  const int64_t kv = absl::GetFlag(FLAGS_kv_heads) * absl::GetFlag(FLAGS_head_dim);
  for (const auto& [label, in, out] :
       std::vector<std::tuple<std::string, int64_t, int64_t>>{{"q", hidden, q},
                                                              {"kv", hidden, kv},
                                                              {"o", q, hidden},
                                                              {"gate_up", hidden, intermediate},
                                                              {"down", intermediate, hidden}}) {
    for (const auto& [mode, suffix] : std::vector<std::pair<moelora::ProjectionMode, const char*>>{
             {moelora::ProjectionMode::kBase, "/base"},
             {moelora::ProjectionMode::kFused, "/fused_K=8"},
             {moelora::ProjectionMode::kWidened, "/widened_K=8"}}) {
      benchmark::RegisterBenchmark(absl::StrCat("projection/", label, suffix).c_str(),
                                   moelora::BM_Projection, in, out, mode)
          ->Unit(benchmark::kMicrosecond);
    }
  }
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
