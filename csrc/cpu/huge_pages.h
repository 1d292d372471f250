// Transparent huge pages for large fresh outputs of the CPU kernels.
#pragma once

#include <cstddef>
#include <cstdint>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace csl {
namespace cpu {

// Asks the kernel to back the 2 MiB-aligned interior of a large output that is about to be written for the first
// time with huge pages (transparent huge pages in "madvise" mode, as PyTorch's THP_MEM_ALLOC_ENABLE does). A large
// tensor is often fresh memory on every call (glibc mmaps blocks above 32 MiB and trims freed heap pages), and
// faulting it in 4 KiB at a time costs more than computing a gradient into it (B4 C21 321x321 float32 on the 2-core
// benchmark machine: 23 ms per backward pass with 4 KiB pages, 13 ms with huge pages). Advice only: ignored where
// unsupported; the contents and the layout of the tensor are unchanged.
inline void advise_huge_pages(void* data, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  if (bytes < 2 * kHuge) {
    return;
  }
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(data) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(data) + bytes) & ~(kHuge - 1);
  if (end > begin) {
    (void)madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
  }
#else
  (void)data;
  (void)bytes;
#endif
}

}  // namespace cpu
}  // namespace csl
