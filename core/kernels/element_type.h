// The element types our CUDA kernels take, named without CUDA's or torch's headers.

#ifndef MOELORA_CORE_KERNELS_ELEMENT_TYPE_H_
#define MOELORA_CORE_KERNELS_ELEMENT_TYPE_H_

namespace moelora::kernels {

enum class ElementType { kFloat, kBFloat16, kHalf };

}  // namespace moelora::kernels

#endif  // MOELORA_CORE_KERNELS_ELEMENT_TYPE_H_
