#ifndef MOELORA_CORE_LINEAR_H_
#define MOELORA_CORE_LINEAR_H_

// The one linear layer every decoder projection goes through. Adapters (the mixture of LoRA
// experts) hook in through LinearDelta, so there is no second model class for adapted models.

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/string_view.h"
#include "absl/types/span.h"
#include "core/model_config.h"

namespace moelora {

// The projections of a decoder layer, named as HF modules and PEFT's target_modules name them.
enum class ProjectionKind { kQ, kK, kV, kO, kGate, kUp, kDown };
inline constexpr int kNumProjectionKinds = 7;

// "q_proj", "k_proj", ..., "down_proj".
absl::string_view ProjectionName(ProjectionKind kind);
// "self_attn" for q/k/v/o, "mlp" for gate/up/down.
absl::string_view ProjectionParent(ProjectionKind kind);
std::optional<ProjectionKind> ProjectionFromName(absl::string_view name);

// A projection's weight shape [out_features, in_features], and whether it has a bias, for a
// model config.
struct ProjectionShape {
  int64_t out_features = 0;
  int64_t in_features = 0;
  bool has_bias = false;
};
ProjectionShape ShapeOf(const ModelConfig& config, ProjectionKind kind);

struct ProjectionId {
  int64_t layer = 0;
  ProjectionKind kind = ProjectionKind::kQ;

  // "model.layers.3.self_attn.q_proj", the HF module path.
  std::string ModulePath() const;
};

// Adds a per-token term to a projection's output inside one forward.
class LinearDelta {
 public:
  virtual ~LinearDelta() = default;
  // x: [tokens, in] the projection's input; base_output: [tokens, out] = x·Wᵀ + b.
  // Returns the final output (may update base_output in place and return it).
  virtual at::Tensor Apply(const ProjectionId& id, const at::Tensor& x,
                           at::Tensor base_output) const = 0;

  // A delta whose shrink matrix for `id` is the first N rows of the projection's row room (see
  // Linear) returns N; the projection then computes x·[W; A]ᵀ in one GEMM and hands the two parts
  // to ApplyShrunk. Anything else (the default) goes through Apply.
  virtual std::optional<int64_t> ShrinkRowsInRoom(const ProjectionId& /*id*/) const {
    return std::nullopt;
  }
  // shrink: [tokens, N] = x·Aᵀ; base_output: [tokens, out]. Both are column blocks of one
  // buffer (row stride out + N), so neither is contiguous.
  virtual at::Tensor ApplyShrunk(const ProjectionId& id, at::Tensor shrink,
                                 at::Tensor base_output) const;
  // ApplyShrunk for projections that read one x (gate and up in row room), each with its own
  // GEMM's shrink and output; the default applies each in turn, a delta may do all in one pass.
  virtual std::vector<at::Tensor> ApplyShrunkEach(absl::Span<const ProjectionId> ids,
                                                  std::vector<at::Tensor> shrinks,
                                                  std::vector<at::Tensor> base_outputs) const;

  // A delta whose expand matrix for `id` is the first N columns of the projection's column room
  // returns N; the projection then writes x and ScaledShrinkInto's [tokens, N] side by side and
  // computes [x | s]·[W | B]ᵀ in one GEMM: no second pass over a wide output.
  virtual std::optional<int64_t> ExpandColumnsInRoom(const ProjectionId& /*id*/) const {
    return std::nullopt;
  }
  // Writes the weighted shrink (the expand GEMM's input) into `out` [tokens, N], a column block.
  virtual void ScaledShrinkInto(const ProjectionId& id, const at::Tensor& x, at::Tensor out) const;
  // The same for two projections that read x (gate and up), each into its own `out`; the default
  // writes one after the other, a delta may write both in one pass.
  virtual void ScaledShrinkPairInto(const ProjectionId& first, const ProjectionId& second,
                                    const at::Tensor& x, at::Tensor first_out,
                                    at::Tensor second_out) const;

  // Projections that read one x (a LinearGroup's q/k/v; gate and up) when the delta is not in
  // their rooms: adds each member's delta to its output. The default applies each member in
  // turn; a delta may do them all in one pass over x.
  virtual std::vector<at::Tensor> ApplyGroup(absl::Span<const ProjectionId> members,
                                             const at::Tensor& x,
                                             std::vector<at::Tensor> base_outputs) const;

  // ShrinkRowsInRoom and ApplyShrunk for a LinearGroup with these members: N rows of the group's
  // room (slot-major over the members) and shrink [tokens, N]; base_output [tokens, Σ out].
  virtual std::optional<int64_t> GroupShrinkRowsInRoom(
      absl::Span<const ProjectionId> /*members*/) const {
    return std::nullopt;
  }
  virtual at::Tensor ApplyGroupShrunk(absl::Span<const ProjectionId> members, at::Tensor shrink,
                                      at::Tensor base_output) const;
};

// Where an expert pool may keep its stacked LoRA matrices right next to a projection's weight,
// so that the base GEMM does part of the delta's work:
//   kRows:    [W; A] ([out + n, in]): x·[W; A]ᵀ gives the output and the shrink in one GEMM;
//   kColumns: [W | B] ([out, in + n]): [x | s]·[W | B]ᵀ gives the output with the expand added,
//             without reading and writing the output twice (for wide outputs: gate and up).
// The room starts as zeros; the weight is a view of the first out rows / in columns.
enum class RoomLayout { kRows, kColumns };

// From this many slots a pool can route sparsely (a token on at most a sixteenth of the experts,
// MixtureDelta::UsesSparsePath), and wide projections take row room by default: a sparse decode
// step reads each token's experts' Bᵀ, which in a column room is a 32-byte chunk in every one of
// the output's rows (gate/up's expand took 25 µs a launch at batch 8 on gemma-2b, vs ~9 µs for
// a row-major Bᵀ; docs/BENCHMARKS.md).
inline constexpr int64_t kSparsePoolSlots = 16;

// Room next to a projection's weight for an expert pool's stacked LoRA matrices: `slots` slots
// (the pool's capacity) of `rank` rows (its max_rank). None when either is 0.
struct AdapterRoom {
  int64_t slots = 0;
  int64_t rank = 0;
  // The layout of projections whose output is wider than their input (gate, up). Unset:
  // kColumns below kSparsePoolSlots slots (the dense path's prefill reads and writes their wide
  // output once), kRows from there on (sparse decode steps read Bᵀ row-major). Narrower
  // projections always take kRows.
  std::optional<RoomLayout> wide_layout;
  int64_t rows() const { return slots * rank; }
  bool empty() const { return rows() == 0; }
  RoomLayout LayoutFor(int64_t out_features, int64_t in_features) const;
};

class Linear {
 public:
  Linear() = default;
  // weight: [out, in]; bias: [out] or undefined. Copies the weight into a new buffer when there
  // is room (and, for row room, the bias, followed by zeros).
  Linear(ProjectionId id, at::Tensor weight, at::Tensor bias, AdapterRoom room = {},
         RoomLayout layout = RoomLayout::kRows);
  // A member of a LinearGroup: views into the group's buffers. Its room (a strided view) is
  // filled by the pool; its Forward never folds the room into the GEMM (the group's does).
  static Linear GroupMember(ProjectionId id, at::Tensor weight, at::Tensor bias, at::Tensor room);

  // x: [tokens, in] -> [tokens, out]. `delta` may be null (plain base model). `shrunk_beside`:
  // x came from NewPairedInputsWithRoom and its ColumnsInRoom(delta) shrink columns are already
  // written (ScaledShrinkPairInto), so the column-room path is the GEMM alone, with no copy of x.
  at::Tensor Forward(const at::Tensor& x, const LinearDelta* delta,
                     bool shrunk_beside = false) const;
  // The shrink columns Forward writes beside its input when it folds `delta`'s expand into this
  // projection's column room (it does so only for an input that needs no gradient), else nullopt.
  std::optional<int64_t> ColumnsInRoom(const LinearDelta* delta) const;
  // The shrink rows Forward computes in this projection's GEMM from its row room for `delta`
  // (only for an input that needs no gradient), else nullopt.
  std::optional<int64_t> RowsInRoom(const LinearDelta* delta) const;
  // Row room only: the GEMM Forward runs there, x·[W; A_rows]ᵀ, as {shrink [tokens, rows],
  // output [tokens, out]} (column blocks of one buffer), the delta not yet applied.
  std::pair<at::Tensor, at::Tensor> ShrinkAndOutput(const at::Tensor& x, int64_t rows) const;
  // Column room only, for two projections with one input (gate, up): [tokens, in] views of one
  // buffer whose rows are [x | first's room | x | second's room]. The producer of x writes both
  // copies (the norm does, in its one pass), and then both shrinks can be written in one pass
  // before either GEMM.
  static std::pair<at::Tensor, at::Tensor> NewPairedInputsWithRoom(
      const Linear& first, const Linear& second, int64_t tokens, const at::TensorOptions& options);
  // The `columns` shrink columns beside an input from NewPairedInputsWithRoom.
  static at::Tensor ShrinkColumnsBeside(const at::Tensor& x, int64_t columns);

  const ProjectionId& id() const { return id_; }
  const at::Tensor& weight() const { return weight_; }
  const at::Tensor& bias() const { return bias_; }
  int64_t in_features() const;
  int64_t out_features() const;
  // The pool's stack as it lies in the room: kRows: A, [slots, rank, in]; kColumns: Bᵀ,
  // [slots, rank, out] (a strided view); undefined without room. It shares the weight's buffer:
  // whoever owns the room (one expert pool) writes it through this handle.
  const at::Tensor& room() const { return room_; }
  RoomLayout room_layout() const { return layout_; }

 private:
  ProjectionId id_;
  at::Tensor weight_;  // [out, in]; with room, a view of weight_and_room_
  at::Tensor bias_;
  RoomLayout layout_ = RoomLayout::kRows;
  at::Tensor weight_and_room_;  // [out + n, in] or [out, in + n]; undefined for group members
  at::Tensor bias_and_room_;    // kRows: [out + n], zeros after the bias
  at::Tensor room_;
};

// Projections that read the same input (q, k and v) with their weights stacked in one buffer, so
// the base model runs one GEMM for all of them. With room the buffer is [W_0; W_1; ...; room],
// the room's rows ordered [slot][member][rank]: the active slots' A rows of every member are one
// prefix, and x·[W_all; A_active]ᵀ gives every output and every shrink in one GEMM.
class LinearGroup {
 public:
  LinearGroup() = default;
  // Weights [out_i, in] with one `in`; biases all defined or all undefined.
  LinearGroup(std::vector<ProjectionId> ids, std::vector<at::Tensor> weights,
              std::vector<at::Tensor> biases, AdapterRoom room = {});

  // x: [tokens, in] -> one output per member, column blocks of one buffer.
  std::vector<at::Tensor> Forward(const at::Tensor& x, const LinearDelta* delta) const;

  const std::vector<Linear>& members() const { return members_; }
  const std::vector<ProjectionId>& ids() const { return ids_; }
  int64_t out_features() const { return weight_.size(0); }  // all members together
  // Where member i's output starts in the group's output.
  int64_t output_offset(int64_t i) const { return offsets_[i]; }
  // The member of this kind, -1 when the group has none.
  int64_t MemberIndex(ProjectionKind kind) const;

 private:
  std::vector<at::Tensor> Split(const at::Tensor& outputs) const;

  std::vector<ProjectionId> ids_;
  std::vector<Linear> members_;
  std::vector<int64_t> offsets_;
  at::Tensor weight_and_room_;  // [out_all + room rows × members, in]
  at::Tensor bias_and_room_;
  at::Tensor weight_;  // [out_all, in], a view
  at::Tensor bias_;
  bool has_room_ = false;
};

}  // namespace moelora

#endif  // MOELORA_CORE_LINEAR_H_
