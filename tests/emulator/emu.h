// CPU emulator of CUDA thread blocks, so that the kernels of kernels/ can be run and
// checked against an f64 reference on any machine (scripts/emulate_kernels.sh).
// Why: GPU time comes in sessions; between them kernels still change, and they are checked
// here, on CPUs. The kernel sources are compiled unmodified as host C++.
//
// Emulated:
// - Every CUDA thread is a fiber; blocks run one after another. __syncthreads and warp
//   collectives are barriers, and a barrier some threads never reach aborts as a deadlock.
//   mma.sync m16n8k16 (f16/bf16, f32 accumulate), ldmatrix .x4 (and .trans) and
//   __shfl_xor_sync compute each lane's result from all lanes' inputs per the PTX ISA.
// - Schedules (env EMU_SCHEDULE, read at the first launch): fibers switch only at barriers
//   and collectives, so which warp runs when is all a schedule decides.
//     inorder (default)  rounds over the threads in order: warps advance in near lockstep
//     reverse            the same from the last thread down, and the blocks in reverse
//     random:SEED        a random warp (lanes in random order) advances one step at a time,
//                        so warps drift apart; blocks in random order. Seeded per block.
//     runahead           the lowest warp that can run does, until it blocks on
//                        __syncthreads (or exits): it runs ahead of all the others
//     runahead-last      the same from the highest warp down
//   A cp.async destination reads as NaN from the issue until the wait that retires its
//   group, when the data lands (the latest legal moment); shared memory starts every block as
//   NaN. Data read too early or never written shows up as NaN; with runahead a warp that
//   refills a buffer before the others are done with it poisons their reads.
// - Race check (the race build: -DEMU_RACECHECK with -fsanitize=thread, whose
//   instrumentation calls the __tsan_* hooks of emu_race.h, no TSan runtime): like
//   compute-sanitizer racecheck, every shared-memory byte remembers its last writer and
//   this epoch's readers; an access from another warp in the same barrier epoch (no
//   __syncthreads between) that conflicts (read-after-write, write-after-read,
//   write-after-write) is a hazard, and so is one from another lane of the same warp with no
//   __syncwarp / warp collective between. A cp.async counts as a write by its thread from
//   the issue (checked against earlier accesses then; any access before its wait retires it
//   is a hazard) and lands as that thread's write at the wait. Accesses past the requested
//   dynamic shared memory are reported too. Hazards fail the launch.
// - Memory: emu::DeviceArray (the suites' global tensors) is one allocation per tensor that
//   ends exactly at its last element: in the ASan build (-fsanitize=address,undefined) an
//   exact heap block, so ASan reports an access one element past it; elsewhere its end
//   (rounded up to 16 bytes, a canary in the rounding) touches a PROT_NONE page, so an access
//   past it faults. The ASan build also annotates the fiber switches for ASan, poisons the
//   shared memory past the launch's requested size, and UBSan reports misaligned accesses
//   (a uint4 off 16-byte alignment faults on a GPU). The bounds and alignment of ldmatrix and
//   cp.async, and the 99 KB limit, are checked in every build; plain shared-memory accesses
//   in the race and ASan builds.
// - --use_fast_math (build.rs passes it to nvcc): threads run with flush-to-zero and
//   denormals-are-zero for f32 (MXCSR FTZ|DAZ, like .ftz); exp2f, log2f, expf, logf map to
//   models of ex2.approx.ftz / lg2.approx.ftz (__expf = ex2(x * log2e), __logf = lg2(x) ln2):
//   flushed inputs and outputs and a deterministic pseudo-random error within the documented
//   bound (ex2, lg2 off [0.5, 2]: 2 ulp; lg2 on [0.5, 2]: 2^-22 absolute). See fast_exp2f.
// - Hopper (sm_90a) kernels, on an emulated Hopper device (EMU_ARCH=sm90 or emu::g_sm90;
//   up to 227 KB of shared memory for them, 99 KB for the others): mbarriers (phases,
//   arrival counts, transaction bytes; waiters sleep until the barrier changes), TMA tiled
//   loads (zero fill outside the tensor, swizzled destinations, NaN until the phase
//   completes), wgmma from shared-memory descriptors (swizzle modes per the ISA, computed at
//   the wait that retires it, accumulators NaN until then), setmaxnreg, named barriers. See
//   mock/sm90.cuh (and mock/tma_host.cuh for the tensor maps).
// Suites run the cases named on their command line, else all, or with EMU_CASES=K:N every
// K-th case from N.
// Not emulated: x / y stays IEEE division (nvcc's -prec-div=false gives <= 2 ulp: a C++
// operator cannot be hooked; the error is ~2^-22, far below the f16 / bf16 tolerances);
// FMA contraction (nvcc --fmad=true fuses a*b+c, GCC here does not); the summation order
// inside mma.sync (k order here); timing, occupancy, bank conflicts, registers and spills;
// memory-model effects below the barrier level (a write is visible to every thread at once);
// races on global memory between blocks (they run one after another).
//
// The emulator, in the order these pieces include each other:
//   emu_fiber.h      build flags, shared-memory buffer, fibers, scheduler state, switching
//   emu_race.h       the race check and the race build's -fsanitize=thread hooks
//   emu_scheduler.h  barriers, the block scheduler, emu::launch
//   emu_memory.h     emu::DeviceArray (exact-bound global allocations)
//   emu_cuda.h       fast-math models, __syncthreads / __syncwarp / __shfl_xor_sync, and
//                    CUDA's keywords and built-in index variables as host C++
#pragma once
#include "emu_fiber.h"
#include "emu_race.h"
#include "emu_scheduler.h"
#include "emu_memory.h"
#include "emu_cuda.h"
