// Which copy of the float CPU tile kernels this process runs (cpu/tile_kernels.cpp picks the widest the CPU supports,
// or the one CSL_CPU_ISA caps it at): "avx512", "avx2" or "baseline". Tests read it to know which copy they compared.
#include <torch/library.h>

#include <string>

#include "cpu/tile_kernels.h"

namespace {
std::string cpu_isa() { return csl::cpu::float_tile_kernels().isa; }
}  // namespace

TORCH_LIBRARY_FRAGMENT(csl, m) { m.def("cpu_isa() -> str", &cpu_isa); }
