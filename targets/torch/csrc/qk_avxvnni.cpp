// AVX-VNNI path of the int8-activation kernels (qk_common.h): qk_avx2_gemm.h's GEMM with vpdpbusd in 256-bit
// registers (VEX encoding: Intel cores with AVX-VNNI and no AVX-512, and other CPUs that have it), for every code
// width. Its other ops are the AVX2 path's (ops_avxvnni in qk_avx2.cpp). Compiled for these instructions by the
// pragma below; only called after a run-time CPU check.
#include <immintrin.h>

#include "qk_common.h"

#pragma GCC target("avx2,fma,f16c,avxvnni")

#define LLMC_QK_AVX2_GEMM gemm_avxvnni
#define LLMC_QK_AVX_VNNI 1
#include "qk_avx2_gemm.h"
