#ifndef MOELORA_CORE_EXPERT_POOL_H_
#define MOELORA_CORE_EXPERT_POOL_H_

// Fixed-capacity device storage for LoRA experts, and the immutable snapshots forwards run on.
//
// Every projection (layer, kind) owns two stacks allocated once at start-up:
//   A_all [capacity, max_rank, in]  and  Bt_all [capacity, max_rank, out]   (Bt = Bᵀ)
// When the model was loaded with adapter room for capacity slots of max_rank rows (the server
// does), A_all (row room) or Bt_all (column room, a transposed view of B_all) lives in the
// projection's room next to its weight, and the base GEMM computes the shrink or the expand too.
// q, k and v share one room (slot-major across the three, see LinearGroup) and their Bt_all are
// blocks of one block-diagonal [capacity × 3 × max_rank, q + k + v] buffer: one GEMM computes
// the three outputs and shrinks, one more the three expands.
// Slot s of a stack holds the expert's rank rows, then zeros. An expert that does not target a
// projection leaves its rows there zero. The expert's scaling s (alpha/r, alpha/sqrt(r),
// patterns) is folded into its A rows at attach.
//
// Attach = load + validate + copy into a free slot + publish a new snapshot. Detach = publish a
// snapshot without the expert. A slot returns to the free list only when the last snapshot that
// holds its expert is destroyed, and a forward only ever reads the rows of the slots in the
// snapshot it pinned — so writing a free slot never races with a running forward, and neither
// operation blocks a forward for longer than a pointer copy.

#include <ATen/core/Tensor.h>

#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "core/adapter.h"
#include "core/linear.h"
#include "core/model.h"

namespace moelora {

struct ExpertPoolOptions {
  int64_t capacity = 8;   // slots
  int64_t max_rank = 64;  // rank rows per slot; larger adapters are refused
};

struct ExpertInfo {
  std::string name;
  std::string source;
  int64_t slot = -1;
  int64_t max_rank = 0;
  int64_t num_modules = 0;
  // Bytes of this expert's A and B on the device (its rank rows only); the slot reserves
  // reserved_bytes whatever the rank.
  int64_t device_bytes = 0;
  int64_t reserved_bytes = 0;
};

class SlotAllocator;

// An expert resident in a slot; shared by every snapshot that includes it. Destroying the last
// reference frees the slot.
class ResidentExpert {
 public:
  ~ResidentExpert();
  const ExpertInfo& info() const { return info_; }
  // Scaling of each adapted projection (layer * kNumProjectionKinds + kind -> scaling).
  const std::map<int64_t, double>& scaling() const { return scaling_; }
  const std::map<int64_t, int64_t>& ranks() const { return ranks_; }

 private:
  friend class ExpertPool;
  ExpertInfo info_;
  std::map<int64_t, double> scaling_;
  std::map<int64_t, int64_t> ranks_;
  std::shared_ptr<SlotAllocator> allocator_;
};

// What one forward sees: the attached experts in a fixed order ("positions"), and per projection
// the per-rank-row scaling of the active rows.
class ExpertSnapshot {
 public:
  int64_t version() const { return version_; }
  // Experts in position order (ascending slot).
  const std::vector<std::shared_ptr<const ResidentExpert>>& experts() const { return experts_; }
  int64_t size() const { return static_cast<int64_t>(experts_.size()); }
  // Position of an expert by name, -1 when absent.
  int64_t PositionOf(const std::string& name) const;
  std::vector<std::string> Names() const;

 private:
  friend class ExpertPool;
  friend class MixtureDelta;
  int64_t version_ = 0;
  std::vector<std::shared_ptr<const ResidentExpert>> experts_;
  std::map<std::string, int64_t> positions_;
  // Active slots, ascending; when they are exactly 0..n-1 the stacks are read with a narrow
  // (no copy), otherwise their rows are gathered.
  std::vector<int64_t> slots_;
  bool slots_are_prefix_ = true;
  at::Tensor slot_index_;  // long [n] on the device: the active slots
  // Per projection (layer * kNumProjectionKinds + kind): does any active expert adapt it?
  std::vector<bool> targeted_;
};

class ExpertPool {
 public:
  // Allocates the stacks for every projection of `model` on its device and dtype.
  static absl::StatusOr<std::unique_ptr<ExpertPool>> Create(const Model& model,
                                                            const ExpertPoolOptions& options);
  ~ExpertPool();

  // Loads the PEFT adapter in `dir` and attaches it under `name`.
  absl::StatusOr<ExpertInfo> Attach(const std::string& name, const std::string& dir);
  // Attaches an adapter already loaded (validated against this pool's model).
  absl::StatusOr<ExpertInfo> Attach(const Adapter& adapter);
  // NotFound when no expert has that name.
  absl::Status Detach(const std::string& name);

  // A snapshot of some of `snapshot`'s experts (by position), e.g. one expert for the K-pass
  // baseline. It pins those experts like any snapshot.
  absl::StatusOr<std::shared_ptr<const ExpertSnapshot>> Subset(
      const ExpertSnapshot& snapshot, const std::vector<int64_t>& positions);
  // A snapshot of every expert in any of `snapshots` (each resident once), for a forward whose
  // sequences pinned different snapshots. Two residents may share a name (detached and
  // re-attached in between): PositionOf then finds one of them; map positions by identity.
  absl::StatusOr<std::shared_ptr<const ExpertSnapshot>> Union(
      const std::vector<std::shared_ptr<const ExpertSnapshot>>& snapshots);

  // The current snapshot; forwards hold on to it for their whole duration.
  std::shared_ptr<const ExpertSnapshot> snapshot() const;
  std::vector<ExpertInfo> List() const;
  int64_t free_slots() const;
  const ExpertPoolOptions& options() const { return options_; }
  int64_t reserved_bytes() const;
  const Model& model() const { return model_; }

 private:
  friend class MixtureDelta;
  struct Stack {
    at::Tensor a;             // [capacity, max_rank, in]
    at::Tensor bt;            // [capacity, max_rank, out]
    bool a_in_room = false;   // a is the projection's row room
    bool bt_in_room = false;  // bt is the transposed view of its column room
  };
  // A LinearGroup's members' Bᵀ stacks, block-diagonal, for its one expand GEMM:
  // [capacity * members * max_rank, Σ out]; rows ordered like the group's room.
  struct GroupStack {
    int64_t members = 0;
    std::vector<int64_t> member_columns;  // each member's out_features, in order
    at::Tensor bt;
  };

  ExpertPool(const Model& model, const ExpertPoolOptions& options);
  absl::StatusOr<std::shared_ptr<const ExpertSnapshot>> BuildSnapshot(
      std::vector<std::shared_ptr<const ResidentExpert>> experts);
  void Publish(std::shared_ptr<const ExpertSnapshot> snapshot);

  const Model& model_;
  const ExpertPoolOptions options_;
  std::vector<Stack> stacks_;  // per projection
  // Per projection index of a group's first member; empty (members 0) elsewhere.
  std::vector<GroupStack> group_stacks_;
  int64_t group_members_ = 0;  // members of the groups with a GroupStack (q/k/v: 3), else 0
  int64_t reserved_bytes_ = 0;
  bool owns_model_room_ = false;
  std::shared_ptr<SlotAllocator> allocator_;

  absl::Mutex admin_mu_;  // serialises Attach / Detach
  mutable absl::Mutex snapshot_mu_;
  std::shared_ptr<const ExpertSnapshot> snapshot_ ABSL_GUARDED_BY(snapshot_mu_);
  std::atomic<int64_t> next_version_{1};
};

// The fused single pass: in every targeted projection
//   y += ((x · (s·A)_activeᵀ) ⊙ expand(w)) · Bt_active      (= Σᵢ wᵢ·sᵢ·BᵢAᵢx)
// one shrink GEMM and one expand GEMM whatever the number of experts. `weights` is
// [tokens, snapshot->size()] (packed tokens, snapshot position order), fp32, on the model's
// device; it may require grad.
class MixtureDelta : public LinearDelta {
 public:
  // experts_per_token > 0 promises that no token has more non-zero weights than that. When that
  // is few against the snapshot's experts (UsesSparsePath), an inference step reads only each
  // token's own experts' rows (core/sparse_lora.h) rather than every attached expert's.
  MixtureDelta(const ExpertPool& pool, std::shared_ptr<const ExpertSnapshot> snapshot,
               at::Tensor weights, int64_t experts_per_token = 0);
  // Whether a step of `tokens` tokens over `experts` experts, at most experts_per_token non-zero
  // weights a token, takes the sparse path: a decode step's few tokens, each on at most a
  // sixteenth of the experts, and the step's (token, expert) pairs at most half of them (past
  // either, the dense path's few kernels are faster).
  static bool UsesSparsePath(int64_t experts, int64_t experts_per_token, int64_t tokens);
  bool sparse() const { return route_slots_.defined(); }
  at::Tensor Apply(const ProjectionId& id, const at::Tensor& x,
                   at::Tensor base_output) const override;
  // The active rows when A_all (B_all) is in the projection's room and they are a prefix
  // (inference only).
  std::optional<int64_t> ShrinkRowsInRoom(const ProjectionId& id) const override;
  at::Tensor ApplyShrunk(const ProjectionId& id, at::Tensor shrink,
                         at::Tensor base_output) const override;
  // Every projection's expand in one kernel in a decode step (gate and up in row room).
  std::vector<at::Tensor> ApplyShrunkEach(absl::Span<const ProjectionId> ids,
                                          std::vector<at::Tensor> shrinks,
                                          std::vector<at::Tensor> base_outputs) const override;
  std::optional<int64_t> ExpandColumnsInRoom(const ProjectionId& id) const override;
  void ScaledShrinkInto(const ProjectionId& id, const at::Tensor& x, at::Tensor out) const override;
  // Both in one kernel in a decode step (core/weighted_shrink.h).
  void ScaledShrinkPairInto(const ProjectionId& first, const ProjectionId& second,
                            const at::Tensor& x, at::Tensor first_out,
                            at::Tensor second_out) const override;
  // The sparse path: every targeted member in one SparseLoraAdd.
  std::vector<at::Tensor> ApplyGroup(absl::Span<const ProjectionId> members, const at::Tensor& x,
                                     std::vector<at::Tensor> base_outputs) const override;
  std::optional<int64_t> GroupShrinkRowsInRoom(
      absl::Span<const ProjectionId> members) const override;
  at::Tensor ApplyGroupShrunk(absl::Span<const ProjectionId> members, at::Tensor shrink,
                              at::Tensor base_output) const override;

 private:
  // The active rows when the stack member `in_room` says this projection's A (or Bᵀ) is in its
  // room, the active slots are a prefix, and nothing needs gradients; else nullopt.
  std::optional<int64_t> ActiveRowsInRoom(const ProjectionId& id,
                                          bool ExpertPool::Stack::*in_room) const;
  // The active slots' A rows of a projection, [n * max_rank, in] (scaling folded in).
  at::Tensor ActiveA(const ProjectionId& id) const;
  // The active slots' Bᵀ rows of a projection, [n * max_rank, out].
  at::Tensor ActiveBt(const ProjectionId& id) const;

  const ExpertPool& pool_;
  std::shared_ptr<const ExpertSnapshot> snapshot_;
  at::Tensor row_weights_;  // [tokens, n * max_rank], model dtype: weights over rank rows
  // [tokens, n * 3 * max_rank]: the same for the q/k/v group's slot-major rows, when it has room.
  at::Tensor group_row_weights_;
  // The sparse path: each token's top experts_per_token experts, [tokens, k], by slot (long) and
  // weight (fp32); the dense fields above are then unset.
  at::Tensor route_slots_;
  at::Tensor route_weights_;
};

inline int64_t ProjectionIndex(const ProjectionId& id) {
  return id.layer * kNumProjectionKinds + static_cast<int64_t>(id.kind);
}

}  // namespace moelora

#endif  // MOELORA_CORE_EXPERT_POOL_H_
