// Whether the running CPU has the instruction-set features the CPU kernels were compiled for
// (setup.py's CPU_CAPABILITIES picks them and defines DDG_CPU_KERNELS_<CAPABILITY>). Host code
// is compiled without SIMD flags, so this check itself runs on any x86-64 CPU.
#pragma once

namespace ddg {

// Comma-separated /proc/cpuinfo names of the features the CPU kernels need ("" for none).
const char* cpu_kernel_features();

// True when this CPU has all of them (answered once, from CPUID).
bool cpu_runs_kernels();

// Raises a c10::Error naming `op` and the missing features unless cpu_runs_kernels().
void check_cpu_runs_kernels(const char* op);

}  // namespace ddg
