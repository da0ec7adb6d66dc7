// Registers the CPU kernels. This file is host code (no SIMD flags): the registration and
// c10's schema inference run when ddg_ops._C is imported, on whatever CPU imports it. Every
// CPU op first checks that the CPU has the features the kernel files were compiled for, so a
// build made on a newer CPU raises an error here instead of dying on an illegal instruction.
#include <torch/library.h>

#include "../cpu/kernels.h"
#include "cpu_features.h"
#include "register_bn_stats.h"
#include "register_guidance.h"
#include "register_split_token.h"

namespace ddg {
namespace {

const GuidanceKernels& checked_guidance() {
  check_cpu_runs_kernels("ddg guidance op on CPU");
  return cpu::guidance_kernels();
}

const BnStatsKernels& checked_bn_stats() {
  check_cpu_runs_kernels("ddg bn_stats op on CPU");
  return cpu::bn_stats_kernels();
}

const SplitTokenKernels& checked_split_token() {
  check_cpu_runs_kernels("ddg split-token op on CPU");
  return cpu::split_token_kernels();
}

}  // namespace
}  // namespace ddg

TORCH_LIBRARY_IMPL(ddg, CPU, m) {
  ddg::register_guidance_kernels<&ddg::checked_guidance>(m);
  ddg::register_bn_stats_kernels<&ddg::checked_bn_stats>(m);
  ddg::register_split_token_kernels<&ddg::checked_split_token>(m);
}
