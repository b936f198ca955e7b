#include "core/expert_pool.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <set>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "core/device_memory.h"
#include "core/sparse_lora.h"
#include "core/status_macros.h"
#include "core/weighted_expand.h"
#include "core/weighted_shrink.h"

namespace moelora {

// Free slots; shared with every ResidentExpert so a slot can be released after the pool is gone.
class SlotAllocator {
 public:
  explicit SlotAllocator(int64_t capacity) {
    for (int64_t slot = 0; slot < capacity; ++slot) free_.insert(slot);
  }
  // The lowest free slot (keeps the active slots a prefix, read without a gather), or -1.
  int64_t Take() {
    absl::MutexLock lock(&mu_);
    if (free_.empty()) return -1;
    const int64_t slot = *free_.begin();
    free_.erase(free_.begin());
    return slot;
  }
  void Release(int64_t slot) {
    absl::MutexLock lock(&mu_);
    free_.insert(slot);
  }
  int64_t free_count() const {
    absl::MutexLock lock(&mu_);
    return static_cast<int64_t>(free_.size());
  }

 private:
  mutable absl::Mutex mu_;
  std::set<int64_t> free_ ABSL_GUARDED_BY(mu_);
};

ResidentExpert::~ResidentExpert() {
  if (allocator_ != nullptr) allocator_->Release(info_.slot);
}

int64_t ExpertSnapshot::PositionOf(const std::string& name) const {
  auto it = positions_.find(name);
  return it == positions_.end() ? -1 : it->second;
}

std::vector<std::string> ExpertSnapshot::Names() const {
  std::vector<std::string> names;
  for (const auto& expert : experts_) names.push_back(expert->info().name);
  return names;
}

ExpertPool::ExpertPool(const Model& model, const ExpertPoolOptions& options)
    : model_(model),
      options_(options),
      allocator_(std::make_shared<SlotAllocator>(options.capacity)) {}

ExpertPool::~ExpertPool() {
  if (owns_model_room_) model_.ReleaseAdapterRoom();
}

absl::StatusOr<std::unique_ptr<ExpertPool>> ExpertPool::Create(const Model& model,
                                                               const ExpertPoolOptions& options) {
  if (options.capacity <= 0 || options.max_rank <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("expert pool needs capacity > 0 and max_rank > 0, got ", options.capacity,
                     " and ", options.max_rank));
  }
  std::unique_ptr<ExpertPool> pool(new ExpertPool(model, options));
  const ModelConfig& config = model.config();
  const int64_t capacity = options.capacity, max_rank = options.max_rank;
  const auto tensor_options =
      at::TensorOptions().dtype(model.options().dtype).device(model.options().device);
  // The model's room fits exactly this pool's stacks, or the pool allocates its own.
  const AdapterRoom& room = model.options().adapter_room;
  pool->owns_model_room_ =
      room.slots == capacity && room.rank == max_rank && model.ClaimAdapterRoom();
  try {
    pool->stacks_.resize(config.num_hidden_layers * kNumProjectionKinds);
    pool->group_stacks_.resize(pool->stacks_.size());
    for (int64_t layer = 0; layer < config.num_hidden_layers; ++layer) {
      // In the room, q, k and v take their Bᵀ from one block-diagonal buffer (zeros off the
      // diagonal blocks stay zero: attach writes only each member's own block).
      const LinearGroup& qkv = model.qkv(layer);
      at::Tensor qkv_bt;
      if (pool->owns_model_room_) {
        const int64_t members = static_cast<int64_t>(qkv.members().size());
        GroupStack& group = pool->group_stacks_[ProjectionIndex(qkv.ids().front())];
        group.members = members;
        for (const Linear& member : qkv.members()) {
          group.member_columns.push_back(member.out_features());
        }
        group.bt = at::zeros({capacity * members * max_rank, qkv.out_features()}, tensor_options);
        pool->group_members_ = members;
        pool->reserved_bytes_ += group.bt.numel() * group.bt.element_size();
        qkv_bt = group.bt.view({capacity, members, max_rank, qkv.out_features()});
      }
      for (int k = 0; k < kNumProjectionKinds; ++k) {
        const auto kind = static_cast<ProjectionKind>(k);
        const Linear& linear = model.projection(layer, kind);
        Stack& stack = pool->stacks_[ProjectionIndex({layer, kind})];
        const bool rows_room = linear.room_layout() == RoomLayout::kRows;
        stack.a_in_room = pool->owns_model_room_ && rows_room;
        stack.bt_in_room = pool->owns_model_room_ && !rows_room;
        // A previous pool may have left experts in the room.
        stack.a = stack.a_in_room
                      ? linear.room().zero_()
                      : at::zeros({capacity, max_rank, linear.in_features()}, tensor_options);
        const int64_t member = qkv.MemberIndex(kind);
        if (qkv_bt.defined() && member >= 0) {
          stack.bt =
              qkv_bt.select(1, member).narrow(2, qkv.output_offset(member), linear.out_features());
        } else {
          stack.bt = stack.bt_in_room
                         ? linear.room().zero_()
                         : at::zeros({capacity, max_rank, linear.out_features()}, tensor_options);
          pool->reserved_bytes_ += stack.bt.numel() * stack.bt.element_size();
        }
        pool->reserved_bytes_ += stack.a.numel() * stack.a.element_size();
      }
    }
  } catch (const c10::Error& e) {
    return absl::ResourceExhaustedError(
        absl::StrCat("allocating the expert pool (", options.capacity, " slots of rank ",
                     options.max_rank, "): ", e.what_without_backtrace()));
  }
  auto empty = std::make_shared<ExpertSnapshot>();
  empty->targeted_.assign(pool->stacks_.size(), false);
  {
    absl::MutexLock lock(&pool->snapshot_mu_);
    pool->snapshot_ = std::move(empty);
  }
  return pool;
}

int64_t ExpertPool::reserved_bytes() const { return reserved_bytes_; }

std::shared_ptr<const ExpertSnapshot> ExpertPool::snapshot() const {
  absl::MutexLock lock(&snapshot_mu_);
  return snapshot_;
}

void ExpertPool::Publish(std::shared_ptr<const ExpertSnapshot> snapshot) {
  std::shared_ptr<const ExpertSnapshot> previous;
  {
    absl::MutexLock lock(&snapshot_mu_);
    previous = std::move(snapshot_);
    snapshot_ = std::move(snapshot);
  }
  // `previous` is released here, outside the lock: it may free slots.
}

std::vector<ExpertInfo> ExpertPool::List() const {
  std::vector<ExpertInfo> infos;
  for (const auto& expert : snapshot()->experts()) infos.push_back(expert->info());
  return infos;
}

int64_t ExpertPool::free_slots() const { return allocator_->free_count(); }

absl::StatusOr<ExpertInfo> ExpertPool::Attach(const std::string& name, const std::string& dir) {
  ASSIGN_OR_RETURN(Adapter adapter, Adapter::Load(name, dir, model_.config()));
  return Attach(adapter);
}

absl::StatusOr<ExpertInfo> ExpertPool::Attach(const Adapter& adapter) {
  absl::MutexLock admin(&admin_mu_);
  const std::string& name = adapter.name();
  std::shared_ptr<const ExpertSnapshot> current = snapshot();
  if (current->PositionOf(name) >= 0) {
    return absl::AlreadyExistsError(absl::StrCat("expert '", name, "' is already attached"));
  }
  const int64_t max_rank = options_.max_rank;
  if (adapter.max_rank() > max_rank) {
    return absl::InvalidArgumentError(absl::StrCat("expert '", name, "': rank ", adapter.max_rank(),
                                                   " exceeds the pool's max_rank ", max_rank));
  }
  for (const AdapterModule& module : adapter.modules()) {
    const Linear& linear = model_.projection(module.id.layer, module.id.kind);
    if (module.a.size(1) != linear.in_features() || module.b.size(0) != linear.out_features()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "expert '", name, "': ", module.id.ModulePath(), " does not fit the base model"));
    }
  }
  const int64_t slot = allocator_->Take();
  if (slot < 0) {
    return absl::ResourceExhaustedError(absl::StrCat("no free expert slot for '", name, "': all ",
                                                     options_.capacity, " are in use"));
  }
  // From here on the resident owns the slot: any early return frees it.
  auto resident = std::make_shared<ResidentExpert>();
  resident->allocator_ = allocator_;
  ExpertInfo& info = resident->info_;
  info.name = name;
  info.source = adapter.source();
  info.slot = slot;
  info.max_rank = adapter.max_rank();
  info.num_modules = static_cast<int64_t>(adapter.modules().size());
  const int64_t element_size = stacks_.front().a.element_size();
  info.device_bytes = adapter.bytes(element_size);
  info.reserved_bytes = reserved_bytes_ / options_.capacity;
  int64_t staged_elements = 0;  // the slot's rows of every stack
  for (const Stack& stack : stacks_)
    staged_elements += max_rank * (stack.a.size(2) + stack.bt.size(2));
  try {
    // The slot's rows of every stack, A (scaled) then Bᵀ, zeros past each module's rank, are
    // laid out in one host buffer (pinned for a CUDA pool) and copied on a side stream: the
    // copies neither wait for nor delay the step running on the model's stream. The slot is
    // free: no snapshot holds it, so no forward reads these rows.
    const c10::Device device = model_.options().device;
    const at::Tensor staging = at::empty(
        {staged_elements},
        at::TensorOptions().dtype(model_.options().dtype).pinned_memory(device.is_cuda()));
    std::vector<at::Tensor> a_rows, bt_rows;  // per stack, views into `staging`
    int64_t offset = 0;
    for (const Stack& stack : stacks_) {
      const int64_t in = stack.a.size(2), out = stack.bt.size(2);
      a_rows.push_back(staging.narrow(0, offset, max_rank * in).view({max_rank, in}));
      offset += max_rank * in;
      bt_rows.push_back(staging.narrow(0, offset, max_rank * out).view({max_rank, out}));
      offset += max_rank * out;
    }
    std::vector<const AdapterModule*> module_of(stacks_.size(), nullptr);
    for (const AdapterModule& module : adapter.modules()) {
      const int64_t index = ProjectionIndex(module.id);
      module_of[index] = &module;
      resident->scaling_[index] = module.scaling;
      resident->ranks_[index] = module.rank;
    }
    // Modules are small (a few hundred KB): fill them in parallel rather than each op in turn.
    at::parallel_for(0, static_cast<int64_t>(stacks_.size()), 1, [&](int64_t begin, int64_t end) {
      for (int64_t index = begin; index < end; ++index) {
        const AdapterModule* module = module_of[index];
        const int64_t rank = module == nullptr ? 0 : module->rank;
        a_rows[index].narrow(0, rank, max_rank - rank).zero_();
        bt_rows[index].narrow(0, rank, max_rank - rank).zero_();
        if (module == nullptr) continue;
        // The scaling is folded into A once here, so a forward multiplies only by the weights.
        a_rows[index].narrow(0, 0, rank).copy_(module->a * module->scaling);
        bt_rows[index].narrow(0, 0, rank).copy_(module->b.t());
      }
    });
    CopyOnSideStream(device, [&] {
      for (size_t index = 0; index < stacks_.size(); ++index) {
        Stack& stack = stacks_[index];
        stack.a.select(0, slot).copy_(a_rows[index], /*non_blocking=*/true);
        stack.bt.select(0, slot).copy_(bt_rows[index], /*non_blocking=*/true);
      }
    });
  } catch (const c10::Error& e) {
    return absl::InternalError(
        absl::StrCat("copying expert '", name, "' to its slot: ", e.what_without_backtrace()));
  }
  std::vector<std::shared_ptr<const ResidentExpert>> experts = current->experts();
  experts.push_back(resident);
  ASSIGN_OR_RETURN(auto next, BuildSnapshot(std::move(experts)));
  Publish(std::move(next));
  return info;
}

absl::Status ExpertPool::Detach(const std::string& name) {
  absl::MutexLock admin(&admin_mu_);
  std::shared_ptr<const ExpertSnapshot> current = snapshot();
  if (current->PositionOf(name) < 0) {
    return absl::NotFoundError(absl::StrCat("no expert named '", name, "' is attached"));
  }
  std::vector<std::shared_ptr<const ResidentExpert>> experts;
  for (const auto& expert : current->experts()) {
    if (expert->info().name != name) experts.push_back(expert);
  }
  ASSIGN_OR_RETURN(auto next, BuildSnapshot(std::move(experts)));
  current.reset();
  Publish(std::move(next));
  return absl::OkStatus();
}

absl::StatusOr<std::shared_ptr<const ExpertSnapshot>> ExpertPool::Subset(
    const ExpertSnapshot& snapshot, const std::vector<int64_t>& positions) {
  std::vector<std::shared_ptr<const ResidentExpert>> experts;
  for (int64_t position : positions) {
    if (position < 0 || position >= snapshot.size()) {
      return absl::InvalidArgumentError(absl::StrCat("no expert at position ", position));
    }
    experts.push_back(snapshot.experts()[position]);
  }
  return BuildSnapshot(std::move(experts));
}

absl::StatusOr<std::shared_ptr<const ExpertSnapshot>> ExpertPool::Union(
    const std::vector<std::shared_ptr<const ExpertSnapshot>>& snapshots) {
  std::vector<std::shared_ptr<const ResidentExpert>> experts;
  std::set<const ResidentExpert*> seen;
  for (const auto& snapshot : snapshots) {
    for (const auto& expert : snapshot->experts()) {
      if (seen.insert(expert.get()).second) experts.push_back(expert);
    }
  }
  return BuildSnapshot(std::move(experts));
}

absl::StatusOr<std::shared_ptr<const ExpertSnapshot>> ExpertPool::BuildSnapshot(
    std::vector<std::shared_ptr<const ResidentExpert>> experts) {
  std::sort(experts.begin(), experts.end(),
            [](const auto& a, const auto& b) { return a->info().slot < b->info().slot; });
  auto snapshot = std::make_shared<ExpertSnapshot>();
  snapshot->version_ = next_version_.fetch_add(1);
  const int64_t n = static_cast<int64_t>(experts.size());
  const c10::Device device = model_.options().device;
  for (int64_t i = 0; i < n; ++i) {
    snapshot->positions_[experts[i]->info().name] = i;
    snapshot->slots_.push_back(experts[i]->info().slot);
    if (experts[i]->info().slot != i) snapshot->slots_are_prefix_ = false;
  }
  snapshot->targeted_.assign(stacks_.size(), false);
  for (const auto& expert : experts) {
    for (const auto& [index, scaling] : expert->scaling()) snapshot->targeted_[index] = true;
  }
  try {
    snapshot->slot_index_ =
        at::tensor(snapshot->slots_, at::TensorOptions().dtype(at::kLong)).to(device);
  } catch (const c10::Error& e) {
    return absl::InternalError(
        absl::StrCat("building expert snapshot: ", e.what_without_backtrace()));
  }
  snapshot->experts_ = std::move(experts);
  return std::shared_ptr<const ExpertSnapshot>(std::move(snapshot));
}

namespace {
// The sparse path's bounds: those of its kernels (core/kernels/sparse_lora.h), past which a step
// is a prefill and the dense path's GEMMs are faster anyway.
constexpr int64_t kMaxSparseExpertsPerToken = 8;
constexpr int64_t kMaxSparseTokens = 64;
}  // namespace

bool MixtureDelta::UsesSparsePath(int64_t experts, int64_t experts_per_token, int64_t tokens) {
  // The dense path reads every expert's rows once in a few kernels; the sparse path launches
  // more kernels and reads each token's experts' rows per token. Measured on gemma-2b (H100),
  // sparse wins where each token picks at most a sixteenth of the experts and the step's pairs
  // are at most half of them (top-2 of 64: up to 16 tokens; docs/BENCHMARKS.md).
  return experts_per_token >= 1 && experts_per_token <= kMaxSparseExpertsPerToken &&
         experts_per_token * 16 <= experts && tokens * experts_per_token * 2 <= experts &&
         tokens <= kMaxSparseTokens;
}

MixtureDelta::MixtureDelta(const ExpertPool& pool, std::shared_ptr<const ExpertSnapshot> snapshot,
                           at::Tensor weights, int64_t experts_per_token)
    : pool_(pool), snapshot_(std::move(snapshot)) {
  const int64_t n = snapshot_->size();
  if (n > 0) {
    const int64_t tokens = weights.size(0);
    if (!weights.requires_grad() && UsesSparsePath(n, experts_per_token, tokens)) {
      // A token with fewer non-zero weights picks some zero-weight experts too: they add nothing.
      auto [values, positions] = at::topk(weights, experts_per_token);
      route_weights_ = values.to(at::kFloat).contiguous();
      route_slots_ =
          snapshot_->slot_index_.index_select(0, positions.reshape({-1})).view({tokens, -1});
      return;
    }
    const int64_t max_rank = pool_.options_.max_rank;
    // Each expert's weight repeated over its rank rows, in the model's dtype: [tokens, n * R].
    auto over_rows = [&](int64_t rows_per_expert) {
      return weights.unsqueeze(2)
          .expand({tokens, n, rows_per_expert})
          .reshape({tokens, n * rows_per_expert})
          .to(pool_.model_.options().dtype);
    };
    row_weights_ = over_rows(max_rank);
    if (pool_.group_members_ > 0) group_row_weights_ = over_rows(pool_.group_members_ * max_rank);
  }
}

namespace {
// Rows [0, n) of a [slots, rank, width] stack as one [n * rank, width] matrix (a view when the
// stack is contiguous; a copy for a group member's strided room).
at::Tensor FirstSlots(const at::Tensor& stack, int64_t n) {
  return stack.narrow(0, 0, n).reshape({n * stack.size(1), stack.size(2)});
}
}  // namespace

std::optional<int64_t> MixtureDelta::ActiveRowsInRoom(const ProjectionId& id,
                                                      bool ExpertPool::Stack::*in_room) const {
  const int64_t index = ProjectionIndex(id);
  if (sparse() || !snapshot_->targeted_[index] || !snapshot_->slots_are_prefix_ ||
      !(pool_.stacks_[index].*in_room) || row_weights_.requires_grad()) {
    return std::nullopt;
  }
  return snapshot_->size() * pool_.options_.max_rank;
}

std::optional<int64_t> MixtureDelta::ShrinkRowsInRoom(const ProjectionId& id) const {
  return ActiveRowsInRoom(id, &ExpertPool::Stack::a_in_room);
}

std::optional<int64_t> MixtureDelta::ExpandColumnsInRoom(const ProjectionId& id) const {
  return ActiveRowsInRoom(id, &ExpertPool::Stack::bt_in_room);
}

void MixtureDelta::ScaledShrinkInto(const ProjectionId& id, const at::Tensor& x,
                                    at::Tensor out) const {
  WeightedShrinkInto(x, row_weights_, {{ActiveA(id), std::move(out)}});
}

void MixtureDelta::ScaledShrinkPairInto(const ProjectionId& first, const ProjectionId& second,
                                        const at::Tensor& x, at::Tensor first_out,
                                        at::Tensor second_out) const {
  WeightedShrinkInto(
      x, row_weights_,
      {{ActiveA(first), std::move(first_out)}, {ActiveA(second), std::move(second_out)}});
}

at::Tensor MixtureDelta::ActiveA(const ProjectionId& id) const {
  return FirstSlots(pool_.stacks_[ProjectionIndex(id)].a, snapshot_->size());
}

at::Tensor MixtureDelta::ActiveBt(const ProjectionId& id) const {
  return FirstSlots(pool_.stacks_[ProjectionIndex(id)].bt, snapshot_->size());
}

at::Tensor MixtureDelta::ApplyShrunk(const ProjectionId& id, at::Tensor shrink,
                                     at::Tensor base_output) const {
  WeightedExpandAdd(base_output, shrink, row_weights_, ActiveBt(id));
  return base_output;
}

std::vector<at::Tensor> MixtureDelta::ApplyShrunkEach(absl::Span<const ProjectionId> ids,
                                                      std::vector<at::Tensor> shrinks,
                                                      std::vector<at::Tensor> base_outputs) const {
  std::vector<WeightedExpandTarget> targets;
  for (size_t i = 0; i < ids.size(); ++i) {
    targets.push_back({base_outputs[i], std::move(shrinks[i]), ActiveBt(ids[i])});
  }
  WeightedExpandAddEach(targets, row_weights_);
  return base_outputs;
}

std::vector<at::Tensor> MixtureDelta::ApplyGroup(absl::Span<const ProjectionId> members,
                                                 const at::Tensor& x,
                                                 std::vector<at::Tensor> base_outputs) const {
  if (!sparse()) return LinearDelta::ApplyGroup(members, x, std::move(base_outputs));
  std::vector<SparseLoraTarget> targets;
  for (size_t i = 0; i < members.size(); ++i) {
    const int64_t index = ProjectionIndex(members[i]);
    if (!snapshot_->targeted_[index]) continue;  // no attached expert adapts it
    const ExpertPool::Stack& stack = pool_.stacks_[index];
    targets.push_back({stack.a, stack.bt, base_outputs[i]});
  }
  SparseLoraAdd(x, route_slots_, route_weights_, targets);
  return base_outputs;
}

std::optional<int64_t> MixtureDelta::GroupShrinkRowsInRoom(
    absl::Span<const ProjectionId> members) const {
  const ExpertPool::GroupStack& group = pool_.group_stacks_[ProjectionIndex(members.front())];
  if (sparse() || group.members == 0 || !snapshot_->slots_are_prefix_ ||
      row_weights_.requires_grad()) {
    return std::nullopt;
  }
  bool targeted = false;
  for (const ProjectionId& id : members) targeted |= snapshot_->targeted_[ProjectionIndex(id)];
  if (!targeted) return std::nullopt;
  return snapshot_->size() * group.members * pool_.options_.max_rank;
}

at::Tensor MixtureDelta::ApplyGroupShrunk(absl::Span<const ProjectionId> members, at::Tensor shrink,
                                          at::Tensor base_output) const {
  const ExpertPool::GroupStack& group = pool_.group_stacks_[ProjectionIndex(members.front())];
  const BlockDiagonalRows blocks{group.member_columns, pool_.options_.max_rank};
  WeightedExpandAdd(base_output, shrink, group_row_weights_, group.bt.narrow(0, 0, shrink.size(-1)),
                    &blocks);
  return base_output;
}

at::Tensor MixtureDelta::Apply(const ProjectionId& id, const at::Tensor& x,
                               at::Tensor base_output) const {
  const int64_t index = ProjectionIndex(id);
  if (!snapshot_->targeted_[index]) return base_output;  // no attached expert adapts it
  const ExpertPool::Stack& stack = pool_.stacks_[index];
  if (sparse()) {
    SparseLoraAdd(x, route_slots_, route_weights_, {{stack.a, stack.bt, base_output}});
    return base_output;
  }
  const int64_t n = snapshot_->size();
  at::Tensor a, bt;
  if (snapshot_->slots_are_prefix_) {
    a = FirstSlots(stack.a, n);
    bt = FirstSlots(stack.bt, n);
  } else {
    // Read only the pinned slots' rows: a free slot may be being written by an attach.
    a = FirstSlots(stack.a.index_select(0, snapshot_->slot_index_), n);
    bt = FirstSlots(stack.bt.index_select(0, snapshot_->slot_index_), n);
  }
  at::Tensor shrink = at::linear(x, a);  // [tokens, rows], scaling already in A
  if (row_weights_.requires_grad() || x.requires_grad()) {
    return at::addmm(base_output, shrink * row_weights_, bt);  // autograd-friendly
  }
  // Inference: the expand accumulates into the base output, with no extra pass over
  // [tokens, out].
  WeightedExpandAdd(base_output, shrink, row_weights_, bt);
  return base_output;
}

}  // namespace moelora
