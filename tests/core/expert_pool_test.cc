#include "core/expert_pool.h"

#include <ATen/ATen.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <atomic>
#include <map>
#include <set>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/adapter.h"
#include "core/mixture.h"
#include "core/random_model.h"
#include "tests/testing/temp_dir.h"

namespace moelora {
namespace {

// The definition, one expert at a time: y + Σᵢ wᵢ · sᵢ · (x·Aᵢᵀ)·Bᵢᵀ.
class NaiveDelta : public LinearDelta {
 public:
  NaiveDelta(std::vector<const Adapter*> adapters, at::Tensor weights)
      : adapters_(std::move(adapters)), weights_(std::move(weights)) {}
  at::Tensor Apply(const ProjectionId& id, const at::Tensor& x, at::Tensor y) const override {
    for (size_t i = 0; i < adapters_.size(); ++i) {
      for (const AdapterModule& module : adapters_[i]->modules()) {
        if (module.id.layer != id.layer || module.id.kind != id.kind) continue;
        const at::Tensor lora = at::matmul(at::matmul(x, module.a.t()), module.b.t());
        y = y + weights_.select(1, i).unsqueeze(1) * module.scaling * lora;
      }
    }
    return y;
  }

 private:
  std::vector<const Adapter*> adapters_;
  at::Tensor weights_;
};

// Where the pool's stacks live: in each projection's room next to its weight (the server's
// layout; the shrink or the expand runs inside the base GEMM), with gate and up's B in column
// room (a small pool's default) or their A in row room (a big pool's); else the pool's own
// buffers.
enum class Layout { kPoolBuffers, kRoomWideColumns, kRoomWideRows };

class ExpertPoolFixture : public testing::Test {
 protected:
  void Build(Layout layout) {
    ASSERT_TRUE(
        WriteRandomModel(temp_.Join("base"), TinyModelConfig(ModelType::kLlama), {.seed = 5}).ok());
    AdapterRoom room;
    if (layout != Layout::kPoolBuffers) {
      room = {.slots = 8,
              .rank = 8,
              .wide_layout =
                  layout == Layout::kRoomWideRows ? RoomLayout::kRows : RoomLayout::kColumns};
    }
    auto model = Model::Load(temp_.Join("base"), {.adapter_room = room});
    ASSERT_TRUE(model.ok()) << model.status();
    model_ = std::move(*model);
    auto pool = ExpertPool::Create(*model_, {.capacity = 8, .max_rank = 8});
    ASSERT_TRUE(pool.ok()) << pool.status();
    pool_ = std::move(*pool);
  }

  // Writes, loads and attaches an expert; keeps the loaded adapter for the naive reference.
  void AttachExpert(const std::string& name, const RandomAdapterOptions& spec) {
    const std::string dir = temp_.Join(name);
    ASSERT_TRUE(WriteRandomAdapter(dir, model_->config(), spec).ok());
    auto adapter = Adapter::Load(name, dir, model_->config());
    ASSERT_TRUE(adapter.ok()) << adapter.status();
    adapters_[name] = std::make_unique<Adapter>(std::move(*adapter));
    auto info = pool_->Attach(*adapters_[name]);
    ASSERT_TRUE(info.ok()) << info.status();
  }

  // Logits [tokens, vocab] of the batch with `delta`.
  at::Tensor Logits(const std::vector<SequenceInput>& batch, const LinearDelta* delta) {
    auto cache = model_->CreateKvCache(4, 32);
    auto out = model_->Forward(batch, *cache, {.all_logits = true, .delta = delta});
    EXPECT_TRUE(out.ok()) << out.status();
    return out->logits;
  }

  at::Tensor Fused(const std::vector<SequenceInput>& batch,
                   std::shared_ptr<const ExpertSnapshot> snapshot, const at::Tensor& weights,
                   const ExpertPool* pool = nullptr) {
    MixtureDelta delta(pool != nullptr ? *pool : *pool_, std::move(snapshot), weights);
    return Logits(batch, &delta);
  }

  at::Tensor Naive(const std::vector<SequenceInput>& batch, const ExpertSnapshot& snapshot,
                   const at::Tensor& weights) {
    std::vector<const Adapter*> adapters;
    for (const std::string& name : snapshot.Names()) adapters.push_back(adapters_.at(name).get());
    NaiveDelta delta(adapters, weights);
    return Logits(batch, &delta);
  }

  static double MaxDiff(const at::Tensor& a, const at::Tensor& b) {
    return (a - b).abs().max().item<double>();
  }

  const std::vector<SequenceInput> batch_ = {
      {0, {3, 14, 15, 92, 65}}, {1, {35, 89}}, {2, {79, 32, 38}}};
  const int64_t tokens_ = 10;
  testing_support::ScopedTempDir temp_{"expert_pool_test"};
  std::unique_ptr<Model> model_;
  std::unique_ptr<ExpertPool> pool_;
  std::map<std::string, std::unique_ptr<Adapter>> adapters_;
};

class ExpertPoolTest : public ExpertPoolFixture, public testing::WithParamInterface<Layout> {
 protected:
  void SetUp() override { Build(GetParam()); }
};

std::string LayoutName(Layout layout) {
  switch (layout) {
    case Layout::kPoolBuffers:
      return "PoolBuffers";
    case Layout::kRoomWideColumns:
      return "RoomWideColumns";
    case Layout::kRoomWideRows:
      return "RoomWideRows";
  }
  return "Unknown";
}

constexpr Layout kLayouts[] = {Layout::kPoolBuffers, Layout::kRoomWideColumns,
                               Layout::kRoomWideRows};

// Mixed ranks and target sets, rslora on some: experts of every shape share one pool.
RandomAdapterOptions SpecFor(int i) {
  static const std::vector<std::vector<std::string>> targets = {
      {"q_proj", "v_proj"},
      {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"},
      {"gate_proj", "up_proj", "down_proj"},
      {"o_proj", "down_proj"}};
  RandomAdapterOptions spec;
  spec.r = std::vector<int64_t>{2, 4, 8, 3}[i % 4];
  spec.lora_alpha = 2.0 * spec.r + i;
  spec.use_rslora = i % 3 == 1;
  spec.target_modules = targets[i % 4];
  if (i % 5 == 4) spec.layers_to_transform = {1};
  spec.seed = 100 + i;
  return spec;
}

TEST_P(ExpertPoolTest, NoExpertsOrZeroWeightsIsTheBaseModelExactly) {
  const at::Tensor base = Logits(batch_, nullptr);
  EXPECT_TRUE(at::equal(Fused(batch_, pool_->snapshot(), at::zeros({tokens_, 0})), base));
  AttachExpert("a", SpecFor(0));
  AttachExpert("b", SpecFor(1));
  EXPECT_TRUE(at::equal(Fused(batch_, pool_->snapshot(), at::zeros({tokens_, 2})), base));
  EXPECT_FALSE(at::equal(Fused(batch_, pool_->snapshot(), at::ones({tokens_, 2})), base));
}

class FusedEqualsNaiveTest : public ExpertPoolFixture,
                             public testing::WithParamInterface<std::tuple<int, Layout>> {
 protected:
  void SetUp() override { Build(std::get<1>(GetParam())); }
};

TEST_P(FusedEqualsNaiveTest, TokenAndSequenceWeights) {
  const int num_experts = std::get<0>(GetParam());
  for (int i = 0; i < num_experts; ++i) AttachExpert(absl::StrCat("e", i), SpecFor(i));
  const auto snapshot = pool_->snapshot();
  ASSERT_EQ(snapshot->size(), num_experts);
  at::manual_seed(num_experts);
  // Token granularity: every token its own weights.
  const at::Tensor per_token = at::rand({tokens_, num_experts});
  EXPECT_LE(MaxDiff(Fused(batch_, snapshot, per_token), Naive(batch_, *snapshot, per_token)), 1e-4);
  // Sequence granularity: one row per sequence, repeated over its tokens.
  const at::Tensor per_sequence = at::softmax(at::randn({3, num_experts}), 1);
  const at::Tensor expanded =
      per_sequence.repeat_interleave(at::tensor(std::vector<int64_t>{5, 2, 3}, at::kLong), 0);
  EXPECT_LE(MaxDiff(Fused(batch_, snapshot, expanded), Naive(batch_, *snapshot, expanded)), 1e-4);
}

INSTANTIATE_TEST_SUITE_P(K, FusedEqualsNaiveTest,
                         testing::Combine(testing::Values(1, 2, 4, 8), testing::ValuesIn(kLayouts)),
                         [](const auto& info) {
                           return absl::StrCat("K", std::get<0>(info.param), "_",
                                               LayoutName(std::get<1>(info.param)));
                         });

// Only some members of a group adapted (k of q/k/v; gate but not up, which then do not share
// an input with room): the others' rows stay zero and their outputs are the base's.
TEST_P(ExpertPoolTest, SomeMembersOfAGroupAdapted) {
  RandomAdapterOptions spec = SpecFor(1);
  spec.target_modules = {"k_proj", "gate_proj"};
  AttachExpert("k_and_gate", spec);
  AttachExpert("v_only", {.r = 3, .target_modules = {"v_proj"}, .seed = 7});
  const auto snapshot = pool_->snapshot();
  const at::Tensor weights = at::rand({tokens_, 2});
  EXPECT_LE(MaxDiff(Fused(batch_, snapshot, weights), Naive(batch_, *snapshot, weights)), 1e-4);
}

TEST_P(ExpertPoolTest, AttachPlacesInSlotsAndAccountsBytes) {
  AttachExpert("a", SpecFor(1));  // rank 4, all seven projections
  const std::vector<ExpertInfo> infos = pool_->List();
  ASSERT_EQ(infos.size(), 1u);
  EXPECT_EQ(infos[0].slot, 0);
  EXPECT_EQ(infos[0].max_rank, 4);
  EXPECT_EQ(infos[0].num_modules, 14);
  EXPECT_EQ(infos[0].device_bytes, adapters_["a"]->bytes(4));
  // Per layer: rank 4 x (in + out) over q, k, v, o, gate, up, down of the tiny llama, fp32.
  EXPECT_EQ(infos[0].device_bytes, 2 * 4 * 4 * (128 + 96 + 96 + 128 + 192 + 192 + 192));
  EXPECT_EQ(infos[0].reserved_bytes, pool_->reserved_bytes() / 8);
  EXPECT_EQ(pool_->free_slots(), 7);
  // With the model's room the shrink of the one slot's 8 rows runs inside the base GEMM (gate's
  // too, in row room), or gate's expand does (in column room).
  const MixtureDelta delta(*pool_, pool_->snapshot(), at::ones({tokens_, 1}));
  const bool room = GetParam() != Layout::kPoolBuffers;
  const bool wide_rows = GetParam() == Layout::kRoomWideRows;
  EXPECT_EQ(delta.ShrinkRowsInRoom({1, ProjectionKind::kDown}),
            room ? std::optional<int64_t>(8) : std::nullopt);
  EXPECT_EQ(delta.ShrinkRowsInRoom({1, ProjectionKind::kGate}),
            wide_rows ? std::optional<int64_t>(8) : std::nullopt);
  EXPECT_EQ(delta.ExpandColumnsInRoom({1, ProjectionKind::kGate}),
            room && !wide_rows ? std::optional<int64_t>(8) : std::nullopt);

  auto again = pool_->Attach(*adapters_["a"]);
  EXPECT_EQ(again.status().code(), absl::StatusCode::kAlreadyExists);
  EXPECT_EQ(pool_->Detach("nope").code(), absl::StatusCode::kNotFound);
}

TEST_P(ExpertPoolTest, RankAboveCapacityAndFullPoolAreRefused) {
  RandomAdapterOptions big = SpecFor(0);
  big.r = 16;
  ASSERT_TRUE(WriteRandomAdapter(temp_.Join("big"), model_->config(), big).ok());
  auto attached = pool_->Attach("big", temp_.Join("big"));
  ASSERT_FALSE(attached.ok());
  EXPECT_THAT(std::string(attached.status().message()), testing::HasSubstr("max_rank 8"));
  for (int i = 0; i < 8; ++i) AttachExpert(absl::StrCat("e", i), SpecFor(i));
  RandomAdapterOptions spec = SpecFor(0);
  ASSERT_TRUE(WriteRandomAdapter(temp_.Join("ninth"), model_->config(), spec).ok());
  EXPECT_EQ(pool_->Attach("ninth", temp_.Join("ninth")).status().code(),
            absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(pool_->free_slots(), 0);
}

TEST_P(ExpertPoolTest, SlotIsFreedOnlyWhenNoSnapshotHoldsIt) {
  AttachExpert("a", SpecFor(0));
  AttachExpert("b", SpecFor(1));
  std::shared_ptr<const ExpertSnapshot> pinned = pool_->snapshot();
  ASSERT_TRUE(pool_->Detach("a").ok());
  EXPECT_EQ(pool_->snapshot()->Names(), std::vector<std::string>{"b"});
  EXPECT_EQ(pool_->free_slots(), 6);  // slot 0 still held by `pinned`
  EXPECT_EQ(pinned->Names(), (std::vector<std::string>{"a", "b"}));
  pinned.reset();
  EXPECT_EQ(pool_->free_slots(), 7);
}

// After a detach in the middle the active slots are not a prefix: rows are gathered, results
// unchanged, and the next attach fills the hole.
TEST_P(ExpertPoolTest, HolesAreReadByGatherAndRefilled) {
  for (int i = 0; i < 3; ++i) AttachExpert(absl::StrCat("e", i), SpecFor(i));
  ASSERT_TRUE(pool_->Detach("e1").ok());
  const auto snapshot = pool_->snapshot();
  ASSERT_EQ(snapshot->Names(), (std::vector<std::string>{"e0", "e2"}));
  const at::Tensor weights = at::rand({tokens_, 2});
  EXPECT_LE(MaxDiff(Fused(batch_, snapshot, weights), Naive(batch_, *snapshot, weights)), 1e-4);
  AttachExpert("e3", SpecFor(3));
  EXPECT_EQ(pool_->List()[1].name, "e3");
  EXPECT_EQ(pool_->List()[1].slot, 1);
}

// Attach / detach from another thread while forwards run: each forward equals the naive result
// for the snapshot it pinned.
TEST_P(ExpertPoolTest, AttachDetachWhileForwardsRun) {
  AttachExpert("stable", SpecFor(1));
  for (int i = 0; i < 3; ++i) {
    const std::string name = absl::StrCat("churn", i);
    ASSERT_TRUE(WriteRandomAdapter(temp_.Join(name), model_->config(), SpecFor(i + 2)).ok());
    auto adapter = Adapter::Load(name, temp_.Join(name), model_->config());
    ASSERT_TRUE(adapter.ok());
    adapters_[name] = std::make_unique<Adapter>(std::move(*adapter));
  }
  std::atomic<bool> done{false};
  std::atomic<int> admin_ops{0};
  std::thread admin([&] {
    for (int round = 0; !done.load() && round < 200; ++round) {
      const std::string name = absl::StrCat("churn", round % 3);
      if (pool_->Attach(*adapters_[name]).ok()) ++admin_ops;
      if (round % 2 == 1 && pool_->Detach(absl::StrCat("churn", (round + 1) % 3)).ok()) ++admin_ops;
    }
  });
  std::set<int64_t> versions;
  for (int i = 0; i < 25; ++i) {
    const auto snapshot = pool_->snapshot();
    versions.insert(snapshot->version());
    const at::Tensor weights = at::full({tokens_, snapshot->size()}, 0.5);
    const at::Tensor fused = Fused(batch_, snapshot, weights);
    EXPECT_LE(MaxDiff(fused, Naive(batch_, *snapshot, weights)), 1e-4) << "iteration " << i;
  }
  done = true;
  admin.join();
  EXPECT_GT(admin_ops.load(), 0);
  EXPECT_GE(pool_->free_slots() + pool_->snapshot()->size(), 8);
}

// The model's room holds one pool's experts: a second pool on the same model keeps its own
// buffers, and neither disturbs the other.
TEST_P(ExpertPoolTest, ASecondPoolKeepsItsOwnBuffers) {
  AttachExpert("first", SpecFor(1));
  AttachExpert("other", SpecFor(2));
  auto second = ExpertPool::Create(*model_, {.capacity = 8, .max_rank = 8});
  ASSERT_TRUE(second.ok()) << second.status();
  // Slot 0 of the second pool: had it written the model's room, "first" would be overwritten.
  ASSERT_TRUE((*second)->Attach(*adapters_["other"]).ok());
  const auto theirs = (*second)->snapshot();
  const at::Tensor one = at::rand({tokens_, 1});
  EXPECT_LE(MaxDiff(Fused(batch_, theirs, one, second->get()), Naive(batch_, *theirs, one)), 1e-4);
  const auto mine = pool_->snapshot();
  const at::Tensor two = at::rand({tokens_, 2});
  EXPECT_LE(MaxDiff(Fused(batch_, mine, two), Naive(batch_, *mine, two)), 1e-4);
}

INSTANTIATE_TEST_SUITE_P(Layouts, ExpertPoolTest, testing::ValuesIn(kLayouts),
                         [](const auto& info) { return LayoutName(info.param); });

}  // namespace
}  // namespace moelora
