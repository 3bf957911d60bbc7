#include "kernel_registry.h"

#include <cstddef>
#include <vector>

namespace flash_mla {

namespace {
// Function-local static: initialised on first use, so registration from other
// translation units' static initialisers is safe regardless of their order.
std::vector<KernelRecord>& records() {
  static std::vector<KernelRecord> all;
  return all;
}
std::vector<OpCapability>& ops() {
  static std::vector<OpCapability> all;
  return all;
}
}  // namespace

int register_kernel(const KernelRecord& record) {
  records().push_back(record);
  return static_cast<int>(records().size()) - 1;
}

int kernel_count() { return static_cast<int>(records().size()); }

const KernelRecord& kernel_at(int index) { return records()[static_cast<std::size_t>(index)]; }

int register_op(const OpCapability& capability) {
  ops().push_back(capability);
  return static_cast<int>(ops().size()) - 1;
}

int op_count() { return static_cast<int>(ops().size()); }

const OpCapability& op_at(int index) { return ops()[static_cast<std::size_t>(index)]; }

}  // namespace flash_mla
