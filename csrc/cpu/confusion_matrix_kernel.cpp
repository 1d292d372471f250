// CPU kernel of csl::confusion_matrix: per-thread histograms (integer sums, so the order does not matter).
#include <ATen/Parallel.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <vector>

#include "../csl_common.h"

namespace csl {
namespace {

at::Tensor confusion_matrix_cpu(const at::Tensor& pred, const at::Tensor& target, int64_t num_classes,
                                int64_t ignore_index) {
  check_confusion_matrix_args(pred, target, num_classes, /*cuda=*/false);
  const int64_t cells = num_classes * num_classes;
  at::Tensor confusion = at::zeros({num_classes, num_classes}, pred.options().dtype(at::kLong));
  const int64_t n = pred.numel();
  if (n == 0) {
    return confusion;
  }
  // Labels are converted to contiguous int64 once (a no-op for contiguous int64 input).
  const at::Tensor p = pred.to(at::kLong).contiguous(), t = target.to(at::kLong).contiguous();
  const int64_t* p_ptr = p.const_data_ptr<int64_t>();
  const int64_t* t_ptr = t.const_data_ptr<int64_t>();
  int64_t* out = confusion.data_ptr<int64_t>();
  auto accumulate = [&](int64_t begin, int64_t end, int64_t* hist) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t ti = t_ptr[i], pi = p_ptr[i];
      if (ti != ignore_index && ti >= 0 && ti < num_classes && pi >= 0 && pi < num_classes) {
        ++hist[ti * num_classes + pi];
      }
    }
  };
  const int64_t threads = at::get_num_threads();
  const bool parallel = threads > 1 && n >= 4 * cells && n >= 65536 && cells * threads <= (int64_t(32) << 20);
  if (!parallel) {
    accumulate(0, n, out);
    return confusion;
  }
  std::vector<int64_t> local(threads * cells, 0);
  at::parallel_for(0, n, 65536, [&](int64_t begin, int64_t end) {
    accumulate(begin, end, local.data() + at::get_thread_num() * cells);
  });
  at::parallel_for(0, cells, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      int64_t total = 0;
      for (int64_t r = 0; r < threads; ++r) {
        total += local[r * cells + j];
      }
      out[j] = total;
    }
  });
  return confusion;
}

}  // namespace

TORCH_LIBRARY_IMPL(csl, CPU, m) { m.impl("confusion_matrix", &confusion_matrix_cpu); }

}  // namespace csl
