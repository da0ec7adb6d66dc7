// Emulator stand-in for <cub/cub.cuh>: the CUB primitives cuda_emu reproduces.
#pragma once

#include "block/block_reduce.cuh"
#include "warp/warp_reduce.cuh"
