// The entry points of the CPU kernel files: one dtype-dispatched kernel table per op family.
// csrc/cpu/*.cpp are the only files compiled with SIMD flags (-mavx512*, -mavx2; docs/build.md),
// so nothing in them may run before the host side has checked that this CPU has those
// features: they define no registrations and no static initialisers, only these tables,
// which csrc/host/register_cpu.cpp registers behind that check.
#pragma once

#include "../host/bn_stats.h"
#include "../host/guidance.h"
#include "../host/split_token.h"

namespace ddg::cpu {

const GuidanceKernels& guidance_kernels();
const BnStatsKernels& bn_stats_kernels();
const SplitTokenKernels& split_token_kernels();

}  // namespace ddg::cpu
