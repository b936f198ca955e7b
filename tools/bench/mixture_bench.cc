// Prefill and decode of the base model, the fused single pass over K experts, and the K-pass
// baseline (DyLoRA-MoE: one full pass per expert, logits mixed), with Google Benchmark.
//
// CPU (small default shape):   build/tools/moelora-bench
// GPU (as scripts/gpu-bench.sh runs it):
//   moelora-bench --device=cuda --dtype=bf16 --preset=gemma-2b --batch=8 --seq_len=512
// Random weights with the shapes of --preset (or of the shape flags with --preset=custom); the
// model (bf16 on disk for presets) and the rank-r experts over all seven projections are written
// once to --work_dir and loaded through the real loaders. Time per iteration includes a host sync
// on the logits. On CUDA each case also reports its peak device memory (peak_GiB, PeakMemory).

#include <ATen/ATen.h>
#include <benchmark/benchmark.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <filesystem>
#include <iostream>
#include <memory>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "core/decode_graphs.h"
#include "core/device_memory.h"
#include "core/mixture.h"
#include "core/random_model.h"

ABSL_FLAG(std::string, preset, "custom",
          "model shape: gemma-2b, llama-3.2-1b, llama-3-8b, or custom (the shape flags below)");
ABSL_FLAG(std::string, ks, "2,4,8", "expert counts K for prefill (fused and K-pass)");
ABSL_FLAG(std::string, decode_ks, "8", "expert counts K for decode");
ABSL_FLAG(std::string, decode_batches, "1,8,32,64", "decode batch sizes");
ABSL_FLAG(int64_t, decode_top_k, 0,
          "decode: also time each K above this with top-k routing (this many experts a token, "
          "chosen afresh each step; the sparse path where MixtureDelta::UsesSparsePath takes "
          "it); 0: uniform weights over all K only");
ABSL_FLAG(bool, projections, true, "also time single projections (base, fused, widened)");
ABSL_FLAG(std::string, device, "cpu", "cpu or cuda");
ABSL_FLAG(bool, adapter_room, true,
          "load the model with room for the pool's stacks beside each weight (the server's "
          "layout: the base GEMMs share the LoRA work); false keeps them in the pool's buffers");
ABSL_FLAG(std::string, dtype, "fp32", "fp32, bf16 or fp16");
ABSL_FLAG(int64_t, hidden, 256, "hidden size");
ABSL_FLAG(int64_t, intermediate, 1024, "MLP intermediate size");
ABSL_FLAG(int64_t, heads, 4, "attention heads");
ABSL_FLAG(int64_t, kv_heads, 1, "KV heads");
ABSL_FLAG(int64_t, head_dim, 64, "head dim");
ABSL_FLAG(int64_t, layers, 0, "decoder layers; 0: the preset's (custom: 2)");
ABSL_FLAG(int64_t, vocab, 1024, "vocabulary");
ABSL_FLAG(int64_t, rank, 16, "LoRA rank of every expert");
ABSL_FLAG(int64_t, batch, 2, "sequences per prefill");
ABSL_FLAG(int64_t, seq_len, 64, "tokens per sequence");
ABSL_FLAG(int64_t, decode_context, 128, "decode: tokens already in each sequence's cache");
ABSL_FLAG(int64_t, decode_steps, 100, "decode: timed steps per run (one token per sequence)");
ABSL_FLAG(int64_t, decode_cache_len, 0,
          "decode: KV cache tokens per sequence; 0: just enough (decode_context + decode_steps + "
          "1). The server allocates max_seq_len (default 4096) per slot");
ABSL_FLAG(std::string, work_dir, "/tmp/moelora-bench", "where the random model and experts go");

namespace moelora {
namespace {

std::vector<int64_t> IntList(const std::string& text) {
  std::vector<int64_t> values;
  for (absl::string_view part : absl::StrSplit(text, ',', absl::SkipEmpty())) {
    int64_t value = 0;
    if (!absl::SimpleAtoi(part, &value) || value <= 0) {
      std::cerr << "not a positive integer list: " << text << "\n";
      std::exit(2);
    }
    values.push_back(value);
  }
  return values;
}

int64_t MaxExperts() {
  int64_t most = 8;  // the projection cases use 8
  for (int64_t k : IntList(absl::GetFlag(FLAGS_ks))) most = std::max(most, k);
  for (int64_t k : IntList(absl::GetFlag(FLAGS_decode_ks))) most = std::max(most, k);
  return most;
}

// Real checkpoints' shapes (weights random). Layers can be cut with --layers.
ModelConfig PresetConfig(const std::string& preset) {
  if (preset == "gemma-2b") {
    ModelConfig c = TinyModelConfig(ModelType::kGemma);
    c.hidden_size = 2048, c.intermediate_size = 16384, c.num_attention_heads = 8;
    c.num_key_value_heads = 1, c.head_dim = 256, c.num_hidden_layers = 18, c.vocab_size = 256000;
    c.max_position_embeddings = 8192;
    return c;
  }
  if (preset == "llama-3.2-1b" || preset == "llama-3-8b") {
    const bool small = preset == "llama-3.2-1b";
    ModelConfig c = TinyModelConfig(ModelType::kLlama);
    c.hidden_size = small ? 2048 : 4096, c.intermediate_size = small ? 8192 : 14336;
    c.num_attention_heads = 32, c.num_key_value_heads = 8, c.head_dim = small ? 64 : 128;
    c.num_hidden_layers = small ? 16 : 32, c.vocab_size = 128256;
    c.max_position_embeddings = 8192, c.rope_theta = 500000.0, c.tie_word_embeddings = small;
    return c;
  }
  if (preset != "custom") {
    std::cerr << "unknown --preset " << preset << "\n";
    std::exit(2);
  }
  ModelConfig c = TinyModelConfig(ModelType::kGemma);
  c.hidden_size = absl::GetFlag(FLAGS_hidden);
  c.intermediate_size = absl::GetFlag(FLAGS_intermediate);
  c.num_attention_heads = absl::GetFlag(FLAGS_heads);
  c.num_key_value_heads = absl::GetFlag(FLAGS_kv_heads);
  c.head_dim = absl::GetFlag(FLAGS_head_dim);
  c.num_hidden_layers = 2;
  c.vocab_size = absl::GetFlag(FLAGS_vocab);
  return c;
}

struct Setup {
  std::unique_ptr<Model> model;
  std::unique_ptr<ExpertPool> pool;
  std::unique_ptr<Mixture> mixture;
  std::vector<SequenceInput> batch;
  int64_t tokens = 0;
  std::vector<std::string> expert_dirs;
  int64_t resident_bytes = 0;  // allocated once set up: weights, adapter room, pool (CUDA only)
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
  const std::string preset = absl::GetFlag(FLAGS_preset);
  ModelConfig config = PresetConfig(preset);
  if (absl::GetFlag(FLAGS_layers) > 0) config.num_hidden_layers = absl::GetFlag(FLAGS_layers);
  const int64_t rank = absl::GetFlag(FLAGS_rank);
  const std::string dir =
      absl::StrCat(absl::GetFlag(FLAGS_work_dir), "/", preset, "_h", config.hidden_size, "_i",
                   config.intermediate_size, "_l", config.num_hidden_layers, "_r", rank);
  if (!std::filesystem::exists(dir + "/base/config.json")) {
    Check(WriteRandomModel(
        dir + "/base", config,
        {.seed = 1, .weight_std = 0.02, .dtype = preset == "custom" ? at::kFloat : at::kBFloat16}));
  }
  absl::StatusOr<LoadOptions> parsed =
      ParseLoadOptions(absl::GetFlag(FLAGS_device), absl::GetFlag(FLAGS_dtype));
  Check(parsed.status());
  LoadOptions options = *parsed;
  const int64_t max_experts = MaxExperts();
  const int64_t capacity = max_experts + 1;  // one slot free for the attach case
  if (absl::GetFlag(FLAGS_adapter_room)) options.adapter_room = {capacity, rank};
  Setup& setup = Global();
  auto model = Model::Load(dir + "/base", options);
  Check(model.status());
  setup.model = std::move(*model);
  auto pool = ExpertPool::Create(*setup.model, {.capacity = capacity, .max_rank = rank});
  Check(pool.status());
  setup.pool = std::move(*pool);
  setup.mixture = std::make_unique<Mixture>(*setup.model, *setup.pool);
  for (int i = 0; i < max_experts; ++i) {
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
    setup.expert_dirs.push_back(expert_dir);
  }
  const int64_t batch = absl::GetFlag(FLAGS_batch), seq_len = absl::GetFlag(FLAGS_seq_len);
  for (int64_t b = 0; b < batch; ++b) {
    std::vector<int64_t> tokens(seq_len);
    for (int64_t t = 0; t < seq_len; ++t) tokens[t] = (b * 7919 + t * 104729) % config.vocab_size;
    setup.batch.push_back({b, std::move(tokens)});
  }
  setup.tokens = batch * seq_len;
  if (setup.model->options().device.is_cuda()) {
    absl::StatusOr<DeviceMemory> memory = GetDeviceMemory(setup.model->options().device);
    Check(memory.status());
    setup.resident_bytes = memory->allocated_bytes;
  }
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

// One case's peak device memory, as the counter peak_GiB (CUDA only): the set-up's resident
// bytes plus the most the case itself added above what was allocated when it started. Cases run
// interleaved, and what an earlier one still holds (a decode graph's pool until it is released)
// would otherwise count towards the next one's peak: raw peaks of one case spread by 0.5 GiB.
// leftover_GiB reports that excess at the case's start.
class PeakMemory {
 public:
  explicit PeakMemory(benchmark::State& state)
      : state_(state), device_(Global().model->options().device) {
    if (!device_.is_cuda()) return;
    Check(ResetPeakDeviceMemory(device_));
    absl::StatusOr<DeviceMemory> memory = GetDeviceMemory(device_);
    Check(memory.status());
    start_bytes_ = memory->allocated_bytes;
  }
  ~PeakMemory() {
    if (!device_.is_cuda()) return;
    absl::StatusOr<DeviceMemory> memory = GetDeviceMemory(device_);
    Check(memory.status());
    const int64_t resident = Global().resident_bytes;
    state_.counters["peak_GiB"] =
        static_cast<double>(resident + memory->peak_allocated_bytes - start_bytes_) / (1 << 30);
    state_.counters["leftover_GiB"] = static_cast<double>(start_bytes_ - resident) / (1 << 30);
  }

 private:
  benchmark::State& state_;
  const c10::Device device_;
  int64_t start_bytes_ = 0;
};

// Bytes of the first k experts' A and B on the device (their rank rows).
int64_t AdapterBytes(int64_t k) {
  int64_t bytes = 0;
  const std::vector<ExpertInfo> experts = Global().pool->List();
  for (int64_t i = 0; i < k && i < static_cast<int64_t>(experts.size()); ++i) {
    bytes += experts[i].device_bytes;
  }
  return bytes;
}

// The pool's device bytes and slots, resident in every case (the room is allocated up front):
// report.py takes the unused slots out to compare with base + the active experts' bytes.
void PoolCounters(benchmark::State& state) {
  state.counters["pool_bytes"] = static_cast<double>(Global().pool->reserved_bytes());
  state.counters["pool_slots"] = static_cast<double>(Global().pool->options().capacity);
}

// Prefill of the batch from empty sequences: the base model (k = 0) or the fused pass over the
// first k experts at uniform weights, until the logits are on the host.
class Prefill {
 public:
  explicit Prefill(int k) : k_(k) {
    Setup& s = Global();
    if (k > 0) {
      snapshot_ = FirstExperts(k);
      weights_ = at::full({s.tokens, k}, 1.0 / k);
    }
    auto cache =
        s.model->CreateKvCache(static_cast<int64_t>(s.batch.size()), absl::GetFlag(FLAGS_seq_len));
    Check(cache.status());
    cache_.emplace(std::move(*cache));
  }

  void Run() {
    Setup& s = Global();
    for (const auto& seq : s.batch) cache_->Reset(seq.slot);
    absl::StatusOr<ForwardOutput> out =
        k_ == 0 ? s.model->Forward(s.batch, *cache_)
                : s.mixture->ForwardWithWeights(s.batch, *cache_, snapshot_, weights_);
    Check(out.status());
    benchmark::DoNotOptimize(out->logits.sum().item<float>());  // waits for the device
  }

  // Run()'s wall time, ms.
  double Timed() {
    const auto start = std::chrono::steady_clock::now();
    Run();
    return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start)
        .count();
  }

 private:
  const int k_;
  std::shared_ptr<const ExpertSnapshot> snapshot_;
  at::Tensor weights_;
  std::optional<KvCache> cache_;
};

void BM_Base(benchmark::State& state) {
  Setup& s = Global();
  PeakMemory peak(state);
  state.counters["weight_bytes"] = static_cast<double>(s.model->parameter_bytes());
  PoolCounters(state);
  Prefill prefill(0);
  prefill.Run();  // first launches and allocations, outside the timing
  for (auto _ : state) prefill.Run();
  state.SetItemsProcessed(state.iterations() * s.tokens);
}

void BM_Fused(benchmark::State& state, int k) {
  Setup& s = Global();
  PeakMemory peak(state);
  state.counters["adapter_bytes"] = static_cast<double>(AdapterBytes(k));
  PoolCounters(state);
  Prefill prefill(k);
  prefill.Run();
  for (auto _ : state) prefill.Run();
  state.SetItemsProcessed(state.iterations() * s.tokens);
}

double Median(std::vector<double> values) {
  if (values.empty()) return 0;
  std::nth_element(values.begin(), values.begin() + values.size() / 2, values.end());
  return values[values.size() / 2];
}

// The loop of the paired cases: each iteration one base and one fused run (which goes first
// swaps every iteration), each returning its own wall time in ms. Sets the counters base_ms and
// fused_ms (medians) and fused_over_base (the median of the pairs' ratios).
template <typename TimedBase, typename TimedFused>
void TimePairs(benchmark::State& state, TimedBase timed_base, TimedFused timed_fused) {
  std::vector<double> base_ms, fused_ms, ratios;
  bool fused_first = false;
  for (auto _ : state) {
    const double first = fused_first ? timed_fused() : timed_base();
    const double second = fused_first ? timed_base() : timed_fused();
    base_ms.push_back(fused_first ? second : first);
    fused_ms.push_back(fused_first ? first : second);
    ratios.push_back(fused_ms.back() / base_ms.back());
    fused_first = !fused_first;
  }
  state.counters["base_ms"] = Median(base_ms);
  state.counters["fused_ms"] = Median(fused_ms);
  state.counters["fused_over_base"] = Median(ratios);
}

// Base and fused prefill in alternation (TimePairs). prefill/base alone measured 27.4 to 30.6 ms
// across runs of one build (prefill is compute-bound, and the card's clocks differ from run to
// run), so the ratio of the two separate cases moved by several points; the two halves of a pair
// see the same clocks.
void BM_PrefillPair(benchmark::State& state, int k) {
  Setup& s = Global();
  Prefill base(0), fused(k);
  base.Run();
  fused.Run();
  TimePairs(
      state, [&] { return base.Timed(); }, [&] { return fused.Timed(); });
  state.SetItemsProcessed(state.iterations() * 2 * s.tokens);
}

void BM_KPass(benchmark::State& state, int k) {
  Setup& s = Global();
  PeakMemory peak(state);
  const auto snapshot = FirstExperts(k);
  const at::Tensor weights = at::full({static_cast<int64_t>(s.batch.size()), k}, 1.0 / k);
  for (auto _ : state) {
    auto logits = s.mixture->KPassLogits(s.batch, snapshot, weights);
    Check(logits.status());
    Finish(state, *logits);
  }
  state.SetItemsProcessed(state.iterations() * s.tokens);
}

// Routing weights of one decode step: uniform over all k experts (top_k 0), or 1/top_k on
// top_k distinct experts a token, spread over the pool and moved on every step.
at::Tensor StepWeights(int64_t batch, int64_t k, int64_t top_k, int64_t step) {
  if (top_k <= 0) return at::full({batch, std::max<int64_t>(k, 1)}, 1.0 / std::max<int64_t>(k, 1));
  at::Tensor weights = at::zeros({batch, k});
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t j = 0; j < top_k; ++j) {
      weights[b][(b * 7 + step * 3 + j * (k / top_k)) % k] = 1.0 / static_cast<double>(top_k);
    }
  }
  return weights;
}

// Decode steps (one new token for each of `batch` sequences, each with decode_context tokens
// already cached) of the base model (k = 0) or the fused pass over k experts (uniform weights, or
// top-k routing): the step the serving engine runs once per generated token. With `graphs`,
// through DecodeGraphs as the engine runs it (captured at the first step, replayed after).
class Decode {
 public:
  Decode(int64_t batch, int k, int64_t top_k, bool graphs)
      : batch_(batch), k_(k), top_k_(top_k), vocab_(Global().model->config().vocab_size) {
    Setup& s = Global();
    const int64_t context = absl::GetFlag(FLAGS_decode_context);
    const int64_t needed = context + absl::GetFlag(FLAGS_decode_steps) + 1;
    auto cache =
        s.model->CreateKvCache(batch, std::max(needed, absl::GetFlag(FLAGS_decode_cache_len)));
    Check(cache.status());
    cache_.emplace(std::move(*cache));
    std::vector<SequenceInput> prompts;
    for (int64_t b = 0; b < batch; ++b) {
      std::vector<int64_t> tokens(context);
      for (int64_t t = 0; t < context; ++t) tokens[t] = (b * 7919 + t * 104729) % vocab_;
      prompts.push_back({b, std::move(tokens)});
      step_.push_back({b, {(b * 31) % vocab_}});
    }
    // Prefill in chunks of up to 8 sequences (a 64 x 512 prompt batch is not what is timed).
    for (size_t first = 0; first < prompts.size(); first += 8) {
      const std::vector<SequenceInput> chunk(prompts.begin() + first,
                                             prompts.begin() + std::min(prompts.size(), first + 8));
      Check(s.model->Forward(chunk, *cache_).status());
    }
    if (k > 0) snapshot_ = FirstExperts(k);
    weights_ = StepWeights(batch, k, top_k, 0);
    if (graphs) {
      graphs_ = std::make_unique<DecodeGraphs>(
          *s.model, *cache_,
          DecodeGraphOptions{.max_batch = batch, .current_snapshot_only = false});
    }
  }

  // The next step's tokens and (top-k routing) experts: the engine's router writes the latter
  // as part of routing, so they are made outside the timing. Uniform weights stay as they are.
  void PrepareStep() {
    for (int64_t b = 0; b < batch_; ++b) step_[b].tokens[0] = (b * 31 + steps_ * 7) % vocab_;
    if (top_k_ > 0 && steps_ > 0) weights_ = StepWeights(batch_, k_, top_k_, steps_);
  }

  // One step, until its logits are on the host.
  void Step() {
    Setup& s = Global();
    ++steps_;
    absl::StatusOr<ForwardOutput> out =
        k_ > 0               ? s.mixture->ForwardWithWeights(step_, *cache_, snapshot_, weights_,
                                                             {.decode_graphs = graphs_.get()})
        : graphs_ != nullptr ? graphs_->Run(step_, *cache_, nullptr, nullptr, {})
                             : s.model->Forward(step_, *cache_);
    Check(out.status());
    benchmark::DoNotOptimize(out->logits.sum().item<float>());  // waits for the device
  }

  // PrepareStep, then Step's wall time, ms.
  double TimedStep() {
    PrepareStep();
    const auto start = std::chrono::steady_clock::now();
    Step();
    return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start)
        .count();
  }

  // With graphs: checks that they stayed on and replayed, and returns the replays.
  int64_t CheckedReplays() const {
    if (graphs_ == nullptr) return 0;
    Check(graphs_->disabled());
    if (graphs_->stats().replays == 0) {
      std::cerr << "decode through graphs replayed no graph\n";
      std::exit(1);
    }
    return graphs_->stats().replays;
  }

 private:
  const int64_t batch_;
  const int k_;
  const int64_t top_k_;
  const int64_t vocab_;
  std::optional<KvCache> cache_;
  std::vector<SequenceInput> step_;
  std::shared_ptr<const ExpertSnapshot> snapshot_;
  at::Tensor weights_;
  std::unique_ptr<DecodeGraphs> graphs_;
  int64_t steps_ = 0;
};

void BM_Decode(benchmark::State& state, int64_t batch, int k, int64_t top_k, bool graphs) {
  Decode decode(batch, k, top_k, graphs);
  PeakMemory peak(state);
  for (auto _ : state) {
    if (top_k > 0) {  // new experts: made outside the timing (PauseTiming has a cost of its own)
      state.PauseTiming();
      decode.PrepareStep();
      state.ResumeTiming();
    } else {
      decode.PrepareStep();
    }
    decode.Step();
  }
  if (graphs) state.counters["graph_replays"] = static_cast<double>(decode.CheckedReplays());
  state.SetItemsProcessed(state.iterations() * batch);  // items/s = generated tokens/s
}

// Base and fused decode steps in alternation (TimePairs), each on its own cache and graphs.
void BM_DecodePair(benchmark::State& state, int64_t batch, int k, bool graphs) {
  Decode base(batch, 0, 0, graphs), fused(batch, k, 0, graphs);
  TimePairs(
      state, [&] { return base.TimedStep(); }, [&] { return fused.TimedStep(); });
  base.CheckedReplays();
  fused.CheckedReplays();
  state.SetItemsProcessed(state.iterations() * 2 * batch);
}

// Device-to-device copy of 1 GiB: the bandwidth behind the decode step's weight-read floor
// (weight bytes / this).
void BM_Copy(benchmark::State& state) {
  const auto options =
      at::TensorOptions().dtype(at::kByte).device(Global().model->options().device);
  const at::Tensor source = at::empty({int64_t{1} << 30}, options);
  at::Tensor target = at::empty_like(source);
  for (auto _ : state) {
    target.copy_(source);
    benchmark::DoNotOptimize(target[0].item<uint8_t>());  // waits for the copy
  }
  state.SetBytesProcessed(state.iterations() * 2 * source.numel());  // read + write
  state.counters["weight_bytes"] = static_cast<double>(Global().model->parameter_bytes());
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
  const int64_t tokens = s.tokens, rows = 8 * absl::GetFlag(FLAGS_rank);
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

// Attaching a rank-r expert over all seven projections while the device is idle: load from disk,
// validate, copy into the free slot, publish (ExpertPool::Attach waits for its copies). The
// detach between iterations is not timed.
void BM_Attach(benchmark::State& state) {
  Setup& s = Global();
  for (auto _ : state) {
    Check(s.pool->Attach("attach-probe", s.expert_dirs.front()).status());
    state.PauseTiming();
    Check(s.pool->Detach("attach-probe"));
    state.ResumeTiming();
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
  benchmark::RegisterBenchmark("copy/1GiB", moelora::BM_Copy)->Unit(benchmark::kMillisecond);
  benchmark::RegisterBenchmark(absl::StrCat("attach/r=", absl::GetFlag(FLAGS_rank)).c_str(),
                               moelora::BM_Attach)
      ->Iterations(10)
      ->Unit(benchmark::kMillisecond);
  for (int64_t k : moelora::IntList(absl::GetFlag(FLAGS_ks))) {
    benchmark::RegisterBenchmark(absl::StrCat("prefill/fused/K=", k).c_str(), moelora::BM_Fused,
                                 static_cast<int>(k))
        ->Unit(benchmark::kMillisecond);
    benchmark::RegisterBenchmark(absl::StrCat("prefill/kpass/K=", k).c_str(), moelora::BM_KPass,
                                 static_cast<int>(k))
        ->Unit(benchmark::kMillisecond);
    benchmark::RegisterBenchmark(absl::StrCat("prefill/pair/K=", k).c_str(),
                                 moelora::BM_PrefillPair, static_cast<int>(k))
        ->Unit(benchmark::kMillisecond);
  }
  std::vector<int64_t> decode_ks = {0};
  for (int64_t k : moelora::IntList(absl::GetFlag(FLAGS_decode_ks))) decode_ks.push_back(k);
  for (int64_t batch : moelora::IntList(absl::GetFlag(FLAGS_decode_batches))) {
    for (int64_t k : decode_ks) {
      // Uniform weights, then top-k routing where K has more experts than it picks.
      const int64_t top_k = absl::GetFlag(FLAGS_decode_top_k);
      std::vector<int64_t> routings = {0};
      if (top_k > 0 && k > top_k) routings.push_back(top_k);
      for (int64_t routed : routings) {
        for (bool graphs : {false, true}) {
          if (graphs && !moelora::DecodeGraphs::CanCapture(*moelora::Global().model)) {
            continue;  // no CUDA graphs on this build or device
          }
          benchmark::RegisterBenchmark(
              absl::StrCat("decode/", k == 0 ? "base" : absl::StrCat("fused/K=", k),
                           routed > 0 ? absl::StrCat("/top", routed) : "", "/batch=", batch,
                           graphs ? "/graph" : "/eager")
                  .c_str(),
              moelora::BM_Decode, batch, static_cast<int>(k), routed, graphs)
              ->Iterations(absl::GetFlag(FLAGS_decode_steps))
              ->Unit(benchmark::kMillisecond);
          if (k > 0 && routed == 0) {
            benchmark::RegisterBenchmark(
                absl::StrCat("decode/pair/K=", k, "/batch=", batch, graphs ? "/graph" : "/eager")
                    .c_str(),
                moelora::BM_DecodePair, batch, static_cast<int>(k), graphs)
                ->Iterations(absl::GetFlag(FLAGS_decode_steps))
                ->Unit(benchmark::kMillisecond);
          }
        }
      }
    }
  }
  if (!absl::GetFlag(FLAGS_projections)) {
    benchmark::RunSpecifiedBenchmarks();
    benchmark::Shutdown();
    return 0;
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
