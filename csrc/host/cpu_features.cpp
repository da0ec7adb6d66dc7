#include "cpu_features.h"

#include <c10/util/Exception.h>

#include <string>

// X(name) for every feature; the names are both /proc/cpuinfo flags and the names GCC/Clang's
// __builtin_cpu_supports takes. Keep in step with setup.py's CPU_CAPABILITIES (a test compares them).
#if defined(DDG_CPU_KERNELS_AVX512)
#define DDG_CPU_KERNEL_FEATURES(X) X(avx512f) X(avx512bw) X(avx512vl) X(avx512dq) X(fma) X(f16c)
#elif defined(DDG_CPU_KERNELS_AVX2)
#define DDG_CPU_KERNEL_FEATURES(X) X(avx2) X(fma) X(f16c)
#elif defined(DDG_CPU_KERNELS_DEFAULT)
#define DDG_CPU_KERNEL_FEATURES(X)
#else
#error "setup.py defines DDG_CPU_KERNELS_<CAPABILITY> for every C++ file"
#endif

namespace ddg {
namespace {

std::string missing_features() {
  std::string missing;
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
#define DDG_MISSING(name) \
  if (!__builtin_cpu_supports(#name)) missing += std::string(missing.empty() ? "" : ",") + #name;
  DDG_CPU_KERNEL_FEATURES(DDG_MISSING)
#undef DDG_MISSING
#endif
  return missing;
}

const std::string& missing_once() {
  static const std::string missing = missing_features();
  return missing;
}

}  // namespace

const char* cpu_kernel_features() {
  static const std::string names = [] {
    std::string all;
#define DDG_NAME(name) all += std::string(all.empty() ? "" : ",") + #name;
    DDG_CPU_KERNEL_FEATURES(DDG_NAME)
#undef DDG_NAME
    return all;
  }();
  return names.c_str();
}

bool cpu_runs_kernels() { return missing_once().empty(); }

void check_cpu_runs_kernels(const char* op) {
  TORCH_CHECK(cpu_runs_kernels(), op, ": the CPU kernels of this ddg_ops build need the CPU features ",
              cpu_kernel_features(), " and this CPU lacks ", missing_once(),
              "; the ddg_ops Python API uses the reference ops here (rebuild with DDG_CPU_CAPABILITY=avx2 "
              "or default for kernels that run on this CPU)");
}

}  // namespace ddg
