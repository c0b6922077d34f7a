// Force-included first in every translation unit of an x86-64 glibc build (setup.py), so that the binary loads on
// glibc 2.28 (manylinux_2_28, the baseline of torch's own wheels) when it is compiled on a newer glibc: auditwheel
// (.ci/wheel-matrix.sh) then finds no symbol version above 2.28. Nothing here changes a computed value.
#pragma once

#if !defined(__CUDA_ARCH__)
// glibc 2.29 gave exp and log new symbol versions (new implementations, no SVID error handling); bind the versions
// every x86-64 glibc has. Only the float64 paths call them.
__asm__(".symver exp,exp@GLIBC_2.2.5");
__asm__(".symver log,log@GLIBC_2.2.5");
// glibc 2.34 moved dlsym from libdl into libc under a new version; torch's headers call it inline under USE_CUDA
// (the CUDA build). Every x86-64 glibc still exports the old version.
__asm__(".symver dlsym,dlsym@GLIBC_2.2.5");
#endif

// libstdc++ (GCC >= 11, on glibc >= 2.32) reads glibc's __libc_single_threaded to skip the atomic reference counts
// of shared_ptr (torch::stable::Tensor) in a process without threads. A torch process has threads, so the flag is
// always 0 there anyway: read pof_fast's own constant 0 (csrc/bindings.cpp) instead of importing glibc 2.32's.
#define __libc_single_threaded pof_fast_libc_single_threaded
