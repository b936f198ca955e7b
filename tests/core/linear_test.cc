#include "core/linear.h"

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <optional>
#include <vector>

namespace moelora {
namespace {

constexpr int64_t kIn = 6;

std::vector<ProjectionId> QkvIds() {
  return {{2, ProjectionKind::kQ}, {2, ProjectionKind::kK}, {2, ProjectionKind::kV}};
}

struct Qkv {
  std::vector<at::Tensor> weights, biases;
};

Qkv RandomQkv(bool with_bias) {
  Qkv qkv;
  for (int64_t out : {8, 4, 4}) {
    qkv.weights.push_back(at::randn({out, kIn}));
    qkv.biases.push_back(with_bias ? at::randn({out}) : at::Tensor());
  }
  return qkv;
}

// A delta that takes `rows` rows of a group's room and hands back what it got.
class RecordingDelta : public LinearDelta {
 public:
  explicit RecordingDelta(int64_t rows) : rows_(rows) {}
  at::Tensor Apply(const ProjectionId& /*id*/, const at::Tensor& /*x*/,
                   at::Tensor base_output) const override {
    return base_output.add_(1);
  }
  std::optional<int64_t> GroupShrinkRowsInRoom(
      absl::Span<const ProjectionId> /*members*/) const override {
    return rows_;
  }
  at::Tensor ApplyGroupShrunk(absl::Span<const ProjectionId> /*members*/, at::Tensor shrink,
                              at::Tensor base_output) const override {
    shrink_ = shrink.clone();
    return base_output;
  }
  const at::Tensor& shrink() const { return shrink_; }

 private:
  int64_t rows_;
  mutable at::Tensor shrink_;
};

// One GEMM over the stacked weights gives each member what its own linear gives, with or without
// room and bias; the members are views of the group's buffer.
TEST(LinearGroupTest, OutputsEqualSeparateLinears) {
  at::manual_seed(1);
  const at::Tensor x = at::randn({5, kIn});
  for (const bool with_bias : {false, true}) {
    for (const AdapterRoom room : {AdapterRoom{}, AdapterRoom{3, 2}}) {
      const Qkv qkv = RandomQkv(with_bias);
      const LinearGroup group(QkvIds(), qkv.weights, qkv.biases, room);
      EXPECT_EQ(group.out_features(), 16);
      const std::vector<at::Tensor> outputs = group.Forward(x, nullptr);
      ASSERT_EQ(outputs.size(), 3u);
      for (int i = 0; i < 3; ++i) {
        EXPECT_TRUE(at::allclose(outputs[i], at::linear(x, qkv.weights[i], qkv.biases[i])));
        EXPECT_TRUE(at::equal(group.members()[i].weight(), qkv.weights[i]));
        EXPECT_EQ(group.members()[i].id().kind, QkvIds()[i].kind);
      }
      EXPECT_EQ(group.output_offset(1), 8);
      EXPECT_EQ(group.MemberIndex(ProjectionKind::kV), 2);
      EXPECT_EQ(group.MemberIndex(ProjectionKind::kO), -1);
      EXPECT_EQ(group.members()[2].weight().data_ptr<float>(),
                group.members()[0].weight().data_ptr<float>() + 12 * kIn);
    }
  }
}

// Without a room (or a delta that keeps nothing there) each member's output goes through Apply.
TEST(LinearGroupTest, DeltaWithoutRoomAppliesPerMember) {
  const Qkv qkv = RandomQkv(/*with_bias=*/false);
  const LinearGroup group(QkvIds(), qkv.weights, qkv.biases);
  const at::Tensor x = at::randn({3, kIn});
  const RecordingDelta delta(4);
  const std::vector<at::Tensor> outputs = group.Forward(x, &delta);
  for (int i = 0; i < 3; ++i) {
    EXPECT_TRUE(at::allclose(outputs[i], at::linear(x, qkv.weights[i]) + 1));
  }
  EXPECT_FALSE(delta.shrink().defined());
}

// The room is slot-major across the members: the first n slots' A rows of every member are one
// prefix, so one GEMM gives every member's shrink, ordered [slot][member][rank].
TEST(LinearGroupTest, RoomIsSlotMajorAcrossMembers) {
  const Qkv qkv = RandomQkv(/*with_bias=*/true);
  const AdapterRoom room{3, 2};
  const LinearGroup group(QkvIds(), qkv.weights, qkv.biases, room);
  std::vector<at::Tensor> a(3);
  for (int i = 0; i < 3; ++i) {
    const at::Tensor member_room = group.members()[i].room();
    ASSERT_EQ(member_room.sizes(), (std::vector<int64_t>{3, 2, kIn}));
    EXPECT_TRUE(at::equal(member_room, at::zeros_like(member_room)));
    a[i] = at::randn({3, 2, kIn});
    member_room.copy_(a[i]);
  }
  const at::Tensor x = at::randn({5, kIn});
  const RecordingDelta delta(/*rows=*/2 * 3 * 2);  // the first two slots
  const std::vector<at::Tensor> outputs = group.Forward(x, &delta);
  std::vector<at::Tensor> expected_rows;
  for (int64_t slot = 0; slot < 2; ++slot) {
    for (int i = 0; i < 3; ++i) expected_rows.push_back(a[i][slot]);
  }
  // Room rows have no bias: the shrink is x·Aᵀ exactly.
  EXPECT_TRUE(at::allclose(delta.shrink(), at::linear(x, at::cat(expected_rows, 0)), 1e-5, 1e-6));
  for (int i = 0; i < 3; ++i) {
    EXPECT_TRUE(at::allclose(outputs[i], at::linear(x, qkv.weights[i], qkv.biases[i]), 1e-5, 1e-6));
  }
}

// A delta that keeps `columns` columns of a projection's column room and writes a shrink of its
// own making (x's first columns times the projection's kind + 1) beside the input.
class ColumnDelta : public LinearDelta {
 public:
  explicit ColumnDelta(int64_t columns) : columns_(columns) {}
  at::Tensor Apply(const ProjectionId& /*id*/, const at::Tensor& /*x*/,
                   at::Tensor base_output) const override {
    return base_output;
  }
  std::optional<int64_t> ExpandColumnsInRoom(const ProjectionId& /*id*/) const override {
    return columns_;
  }
  void ScaledShrinkInto(const ProjectionId& id, const at::Tensor& x,
                        at::Tensor out) const override {
    out.copy_(x.narrow(1, 0, columns_) * (static_cast<int>(id.kind) + 1));
  }

 private:
  int64_t columns_;
};

// Gate and up on the paired inputs (x written twice by its producer, both shrinks written before
// either GEMM) give what each gives on its own, which copies x into a buffer of its own.
TEST(LinearTest, PairedInputsGiveWhatEachProjectionGivesAlone) {
  at::manual_seed(5);
  constexpr int64_t kOut = 10, kTokens = 3, kColumns = 4;
  const AdapterRoom room{.slots = 2, .rank = 3};
  Linear gate({1, ProjectionKind::kGate}, at::randn({kOut, kIn}), at::Tensor(), room,
              RoomLayout::kColumns);
  Linear up({1, ProjectionKind::kUp}, at::randn({kOut, kIn}), at::Tensor(), room,
            RoomLayout::kColumns);
  // B in the room's first kColumns columns (attach's job).
  for (const Linear* linear : {&gate, &up}) {
    linear->room().copy_(at::randn(linear->room().sizes()));
  }
  const ColumnDelta delta(kColumns);
  const at::Tensor x = at::randn({kTokens, kIn});
  const at::Tensor gate_alone = gate.Forward(x, &delta);
  const at::Tensor up_alone = up.Forward(x, &delta);

  auto [gate_input, up_input] = Linear::NewPairedInputsWithRoom(gate, up, kTokens, x.options());
  ASSERT_EQ(gate_input.sizes(), x.sizes());
  gate_input.copy_(x);
  up_input.copy_(x);
  delta.ScaledShrinkPairInto(gate.id(), up.id(), gate_input,
                             Linear::ShrinkColumnsBeside(gate_input, kColumns),
                             Linear::ShrinkColumnsBeside(up_input, kColumns));
  EXPECT_TRUE(at::allclose(gate.Forward(gate_input, &delta, /*shrunk_beside=*/true), gate_alone));
  EXPECT_TRUE(at::allclose(up.Forward(up_input, &delta, /*shrunk_beside=*/true), up_alone));
  EXPECT_TRUE(at::equal(up_input, x));  // gate's shrink did not run into up's copy of x
}

// A delta that keeps `rows` rows of a projection's row room and adds (kind + 1) times the shrink's
// row sums to the output, so the test can tell whose shrink reached whose output.
class RowDelta : public LinearDelta {
 public:
  explicit RowDelta(int64_t rows) : rows_(rows) {}
  at::Tensor Apply(const ProjectionId& /*id*/, const at::Tensor& /*x*/,
                   at::Tensor base_output) const override {
    return base_output;
  }
  std::optional<int64_t> ShrinkRowsInRoom(const ProjectionId& /*id*/) const override {
    return rows_;
  }
  at::Tensor ApplyShrunk(const ProjectionId& id, at::Tensor shrink,
                         at::Tensor base_output) const override {
    return base_output.add_(shrink.sum(1, /*keepdim=*/true) * (static_cast<int>(id.kind) + 1));
  }

 private:
  int64_t rows_;
};

// In row room one GEMM gives the output and the shrink (x·Aᵀ over the room's first rows, no
// bias); ShrinkAndOutput hands both over unapplied, and ApplyShrunkEach's default applies each
// projection's own, as Forward does.
TEST(LinearTest, RowRoomShrinkAndOutputMatchForward) {
  at::manual_seed(6);
  constexpr int64_t kOut = 10, kTokens = 3, kRows = 4;
  const AdapterRoom room{.slots = 2, .rank = 3};
  const Linear gate({1, ProjectionKind::kGate}, at::randn({kOut, kIn}), at::randn({kOut}), room,
                    RoomLayout::kRows);
  const Linear up({1, ProjectionKind::kUp}, at::randn({kOut, kIn}), at::Tensor(), room,
                  RoomLayout::kRows);
  for (const Linear* linear : {&gate, &up}) {
    linear->room().copy_(at::randn(linear->room().sizes()));
  }
  const RowDelta delta(kRows);
  EXPECT_EQ(gate.RowsInRoom(&delta), kRows);
  EXPECT_EQ(gate.ColumnsInRoom(&delta), std::nullopt);
  EXPECT_EQ(gate.RowsInRoom(nullptr), std::nullopt);
  const at::Tensor x = at::randn({kTokens, kIn});

  auto [shrink, output] = gate.ShrinkAndOutput(x, kRows);
  const at::Tensor a = gate.room().reshape({-1, kIn}).narrow(0, 0, kRows);
  EXPECT_TRUE(at::allclose(shrink, at::linear(x, a), 1e-5, 1e-6));
  EXPECT_TRUE(at::allclose(output, at::linear(x, gate.weight(), gate.bias()), 1e-5, 1e-6));

  const at::Tensor gate_alone = gate.Forward(x, &delta);
  const at::Tensor up_alone = up.Forward(x, &delta);
  auto [up_shrink, up_output] = up.ShrinkAndOutput(x, kRows);
  const std::vector<at::Tensor> both = delta.ApplyShrunkEach(
      std::vector<ProjectionId>{gate.id(), up.id()}, {shrink, up_shrink}, {output, up_output});
  EXPECT_TRUE(at::allclose(both[0], gate_alone));
  EXPECT_TRUE(at::allclose(both[1], up_alone));
}

}  // namespace
}  // namespace moelora
