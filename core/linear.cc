#include "core/linear.h"

#include <ATen/ATen.h>

#include "absl/strings/str_cat.h"
#include "core/skinny_linear.h"

namespace moelora {

absl::string_view ProjectionName(ProjectionKind kind) {
  switch (kind) {
    case ProjectionKind::kQ:
      return "q_proj";
    case ProjectionKind::kK:
      return "k_proj";
    case ProjectionKind::kV:
      return "v_proj";
    case ProjectionKind::kO:
      return "o_proj";
    case ProjectionKind::kGate:
      return "gate_proj";
    case ProjectionKind::kUp:
      return "up_proj";
    case ProjectionKind::kDown:
      return "down_proj";
  }
  return "unknown";
}

absl::string_view ProjectionParent(ProjectionKind kind) {
  switch (kind) {
    case ProjectionKind::kGate:
    case ProjectionKind::kUp:
    case ProjectionKind::kDown:
      return "mlp";
    default:
      return "self_attn";
  }
}

std::optional<ProjectionKind> ProjectionFromName(absl::string_view name) {
  for (int i = 0; i < kNumProjectionKinds; ++i) {
    const auto kind = static_cast<ProjectionKind>(i);
    if (ProjectionName(kind) == name) return kind;
  }
  return std::nullopt;
}

ProjectionShape ShapeOf(const ModelConfig& c, ProjectionKind kind) {
  // attention_bias covers q, k, v and o; qwen2's qkv_bias only q, k and v.
  const bool qkv_bias = c.attention_bias || c.qkv_bias;
  switch (kind) {
    case ProjectionKind::kQ:
      return {c.q_size(), c.hidden_size, qkv_bias};
    case ProjectionKind::kK:
    case ProjectionKind::kV:
      return {c.kv_size(), c.hidden_size, qkv_bias};
    case ProjectionKind::kO:
      return {c.hidden_size, c.q_size(), c.attention_bias};
    case ProjectionKind::kGate:
    case ProjectionKind::kUp:
      return {c.intermediate_size, c.hidden_size, c.mlp_bias};
    case ProjectionKind::kDown:
      return {c.hidden_size, c.intermediate_size, c.mlp_bias};
  }
  return {};
}

std::string ProjectionId::ModulePath() const {
  return absl::StrCat("model.layers.", layer, ".", ProjectionParent(kind), ".",
                      ProjectionName(kind));
}

at::Tensor LinearDelta::ApplyShrunk(const ProjectionId& /*id*/, at::Tensor /*shrink*/,
                                    at::Tensor base_output) const {
  TORCH_CHECK(false, "ApplyShrunk called on a delta that keeps no rows in a projection's room");
  return base_output;
}

std::vector<at::Tensor> LinearDelta::ApplyShrunkEach(absl::Span<const ProjectionId> ids,
                                                     std::vector<at::Tensor> shrinks,
                                                     std::vector<at::Tensor> base_outputs) const {
  for (size_t i = 0; i < ids.size(); ++i) {
    base_outputs[i] = ApplyShrunk(ids[i], std::move(shrinks[i]), std::move(base_outputs[i]));
  }
  return base_outputs;
}

void LinearDelta::ScaledShrinkInto(const ProjectionId& /*id*/, const at::Tensor& /*x*/,
                                   at::Tensor /*out*/) const {
  TORCH_CHECK(false, "ScaledShrinkInto called on a delta that keeps no columns in a room");
}

void LinearDelta::ScaledShrinkPairInto(const ProjectionId& first, const ProjectionId& second,
                                       const at::Tensor& x, at::Tensor first_out,
                                       at::Tensor second_out) const {
  ScaledShrinkInto(first, x, std::move(first_out));
  ScaledShrinkInto(second, x, std::move(second_out));
}

std::vector<at::Tensor> LinearDelta::ApplyGroup(absl::Span<const ProjectionId> members,
                                                const at::Tensor& x,
                                                std::vector<at::Tensor> base_outputs) const {
  for (size_t i = 0; i < members.size(); ++i) {
    base_outputs[i] = Apply(members[i], x, std::move(base_outputs[i]));
  }
  return base_outputs;
}

at::Tensor LinearDelta::ApplyGroupShrunk(absl::Span<const ProjectionId> /*members*/,
                                         at::Tensor /*shrink*/, at::Tensor base_output) const {
  TORCH_CHECK(false, "ApplyGroupShrunk called on a delta that keeps no rows in a group's room");
  return base_output;
}

namespace {
int64_t AlignedColumns(int64_t columns) { return (columns + 63) / 64 * 64; }

// x·[W; the room's first rows]ᵀ (+ the bias, zeros past it; undefined: none): the outputs and the
// shrink in one GEMM. `outputs` rows of weight_and_room are weights; `rows` of room follow.
at::Tensor GemmWithRoomRows(const at::Tensor& x, const at::Tensor& weight_and_room,
                            const at::Tensor& bias_and_room, int64_t outputs, int64_t rows) {
  return SkinnyLinear(
      x, weight_and_room.narrow(0, 0, outputs + rows),
      bias_and_room.defined() ? bias_and_room.narrow(0, 0, outputs + rows) : at::Tensor());
}
}  // namespace

RoomLayout AdapterRoom::LayoutFor(int64_t out_features, int64_t in_features) const {
  if (out_features <= in_features) return RoomLayout::kRows;
  if (wide_layout.has_value()) return *wide_layout;
  return slots < kSparsePoolSlots ? RoomLayout::kColumns : RoomLayout::kRows;
}

Linear::Linear(ProjectionId id, at::Tensor weight, at::Tensor bias, AdapterRoom room,
               RoomLayout layout)
    : id_(id), weight_(std::move(weight)), bias_(std::move(bias)), layout_(layout) {
  if (room.empty()) return;
  const int64_t out = weight_.size(0), in = weight_.size(1), rows = room.rows();
  if (layout == RoomLayout::kColumns) {
    // Rows padded to a multiple of 64 elements: the widest GEMMs (gate, up) then read W, base
    // model included, with an aligned leading dimension.
    weight_and_room_ = at::zeros({out, AlignedColumns(in + rows)}, weight_.options());
    weight_and_room_.narrow(1, 0, in).copy_(weight_);
    weight_ = weight_and_room_.narrow(1, 0, in);
    // Column in + s * rank + j holds row j of slot s of Bᵀ.
    room_ =
        weight_and_room_.narrow(1, in, rows).view({out, room.slots, room.rank}).permute({1, 2, 0});
    return;
  }
  weight_and_room_ = at::zeros({out + rows, in}, weight_.options());
  weight_and_room_.narrow(0, 0, out).copy_(weight_);
  weight_ = weight_and_room_.narrow(0, 0, out);
  room_ = weight_and_room_.narrow(0, out, rows).view({room.slots, room.rank, in});
  if (bias_.defined()) {
    bias_and_room_ = at::zeros({out + rows}, bias_.options());
    bias_and_room_.narrow(0, 0, out).copy_(bias_);
    bias_ = bias_and_room_.narrow(0, 0, out);
  }
}

Linear Linear::GroupMember(ProjectionId id, at::Tensor weight, at::Tensor bias, at::Tensor room) {
  Linear member(id, std::move(weight), std::move(bias));
  member.room_ = std::move(room);
  return member;
}

int64_t Linear::in_features() const { return weight_.size(1); }
int64_t Linear::out_features() const { return weight_.size(0); }

std::optional<int64_t> Linear::ColumnsInRoom(const LinearDelta* delta) const {
  if (delta == nullptr || layout_ != RoomLayout::kColumns || !weight_and_room_.defined()) {
    return std::nullopt;
  }
  return delta->ExpandColumnsInRoom(id_);
}

std::optional<int64_t> Linear::RowsInRoom(const LinearDelta* delta) const {
  if (delta == nullptr || layout_ != RoomLayout::kRows || !weight_and_room_.defined()) {
    return std::nullopt;
  }
  return delta->ShrinkRowsInRoom(id_);
}

std::pair<at::Tensor, at::Tensor> Linear::ShrinkAndOutput(const at::Tensor& x, int64_t rows) const {
  TORCH_CHECK(layout_ == RoomLayout::kRows && weight_and_room_.defined() &&
                  rows <= weight_and_room_.size(0) - out_features(),
              "ShrinkAndOutput needs ", rows, " rows of row room");
  const int64_t out = out_features();
  const at::Tensor both = GemmWithRoomRows(x, weight_and_room_, bias_and_room_, out, rows);
  return {both.narrow(-1, out, rows), both.narrow(-1, 0, out)};
}

std::pair<at::Tensor, at::Tensor> Linear::NewPairedInputsWithRoom(
    const Linear& first, const Linear& second, int64_t tokens, const at::TensorOptions& options) {
  for (const Linear* linear : {&first, &second}) {
    TORCH_CHECK(linear->layout_ == RoomLayout::kColumns && linear->weight_and_room_.defined(),
                "NewPairedInputsWithRoom needs projections with column room");
  }
  TORCH_CHECK(first.in_features() == second.in_features(),
              "paired inputs need projections of one input width");
  // Each part as wide as its weight's padded rows, so both copies of x start aligned.
  const int64_t first_width = first.weight_and_room_.size(1);
  const at::Tensor buffer =
      at::empty({tokens, first_width + second.weight_and_room_.size(1)}, options);
  return {buffer.narrow(1, 0, first.in_features()),
          buffer.narrow(1, first_width, second.in_features())};
}

at::Tensor Linear::ShrinkColumnsBeside(const at::Tensor& x, int64_t columns) {
  return x.as_strided({x.size(0), columns}, {x.stride(0), 1}, x.storage_offset() + x.size(1));
}

at::Tensor Linear::Forward(const at::Tensor& x, const LinearDelta* delta,
                           bool shrunk_beside) const {
  if (delta != nullptr && weight_and_room_.defined() && !x.requires_grad()) {
    if (layout_ == RoomLayout::kRows) {
      if (const std::optional<int64_t> rows = RowsInRoom(delta); rows.has_value()) {
        auto [shrink, output] = ShrinkAndOutput(x, *rows);
        return delta->ApplyShrunk(id_, std::move(shrink), std::move(output));
      }
    } else if (const std::optional<int64_t> columns = ColumnsInRoom(delta); columns.has_value()) {
      const int64_t in = in_features();
      at::Tensor widened;
      if (shrunk_beside) {
        TORCH_CHECK(x.stride(1) == 1 && x.stride(0) >= in + *columns,
                    "an input with room has no room for ", *columns, " shrink columns");
        widened = x.as_strided({x.size(0), in + *columns}, {x.stride(0), 1});
      } else {
        widened = at::empty({x.size(0), weight_and_room_.size(1)}, x.options())
                      .narrow(1, 0, in + *columns);
        widened.narrow(1, 0, in).copy_(x);
        delta->ScaledShrinkInto(id_, x, widened.narrow(1, in, *columns));
      }
      return SkinnyLinear(widened, weight_and_room_.narrow(1, 0, in + *columns), bias_);
    }
  }
  at::Tensor y = SkinnyLinear(x, weight_, bias_);
  if (delta != nullptr) y = delta->Apply(id_, x, std::move(y));
  return y;
}

LinearGroup::LinearGroup(std::vector<ProjectionId> ids, std::vector<at::Tensor> weights,
                         std::vector<at::Tensor> biases, AdapterRoom room)
    : ids_(std::move(ids)), has_room_(!room.empty()) {
  const int64_t members = static_cast<int64_t>(ids_.size());
  const int64_t in = weights.front().size(1);
  int64_t out_all = 0;
  for (const at::Tensor& weight : weights) {
    offsets_.push_back(out_all);
    out_all += weight.size(0);
  }
  const int64_t room_rows = room.rows() * members;
  weight_and_room_ = at::zeros({out_all + room_rows, in}, weights.front().options());
  weight_ = weight_and_room_.narrow(0, 0, out_all);
  const bool has_bias = biases.front().defined();
  if (has_bias) {
    bias_and_room_ = at::zeros({out_all + room_rows}, biases.front().options());
    bias_ = bias_and_room_.narrow(0, 0, out_all);
  }
  // Room row (s * members + i) * rank + j holds row j of slot s of member i's A.
  const at::Tensor room_by_slot = has_room_ ? weight_and_room_.narrow(0, out_all, room_rows)
                                                  .view({room.slots, members, room.rank, in})
                                            : at::Tensor();
  for (int64_t i = 0; i < members; ++i) {
    const int64_t out = weights[i].size(0);
    at::Tensor weight = weight_.narrow(0, offsets_[i], out);
    weight.copy_(weights[i]);
    at::Tensor bias;
    if (has_bias) {
      bias = bias_.narrow(0, offsets_[i], out);
      bias.copy_(biases[i]);
    }
    members_.push_back(Linear::GroupMember(ids_[i], std::move(weight), std::move(bias),
                                           has_room_ ? room_by_slot.select(1, i) : at::Tensor()));
  }
}

int64_t LinearGroup::MemberIndex(ProjectionKind kind) const {
  for (size_t i = 0; i < ids_.size(); ++i) {
    if (ids_[i].kind == kind) return static_cast<int64_t>(i);
  }
  return -1;
}

std::vector<at::Tensor> LinearGroup::Split(const at::Tensor& outputs) const {
  std::vector<at::Tensor> split;
  for (size_t i = 0; i < members_.size(); ++i) {
    split.push_back(outputs.narrow(-1, offsets_[i], members_[i].out_features()));
  }
  return split;
}

std::vector<at::Tensor> LinearGroup::Forward(const at::Tensor& x, const LinearDelta* delta) const {
  if (delta != nullptr && has_room_ && !x.requires_grad()) {
    if (const std::optional<int64_t> rows = delta->GroupShrinkRowsInRoom(ids_); rows.has_value()) {
      const int64_t out_all = out_features();
      const at::Tensor both = GemmWithRoomRows(x, weight_and_room_, bias_and_room_, out_all, *rows);
      return Split(delta->ApplyGroupShrunk(ids_, both.narrow(-1, out_all, *rows),
                                           both.narrow(-1, 0, out_all)));
    }
  }
  std::vector<at::Tensor> outputs = Split(SkinnyLinear(x, weight_, bias_));
  if (delta != nullptr) outputs = delta->ApplyGroup(ids_, x, std::move(outputs));
  return outputs;
}

}  // namespace moelora
