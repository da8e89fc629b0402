// CPU harness for kernels that cooperate within a block (shared memory, __syncthreads): the
// multi-tensor kernels of kernels/multi_tensor.py, compiled by g++ as plain C++.
//
// As in harness.cpp, the CUDA qualifiers become ordinary inline functions and the math
// resolves to the C++ overloads for float and double. Unlike it, every CUDA thread of a block
// can be a thread of its own (fastopt_grid_threads): threadIdx is thread-local, __shared__
// variables are statics (one block runs at a time, so they are that block's), __syncthreads is
// a barrier over the block's threads. fastopt_grid_serial runs the threads of each block one
// after another instead, for kernels that never synchronise. FASTOPT_KERNELS names the
// generated file holding the kernels (each in its own namespace) and their extern "C" drivers.
#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstring>
#include <thread>
#include <vector>

#define __device__
#define __forceinline__ inline
#define __global__
#define __shared__ static

struct Dim3 { unsigned x; };
static Dim3 blockIdx, blockDim, gridDim;
static thread_local Dim3 threadIdx;
struct alignas(16) uint4 { unsigned int x, y, z, w; };
inline unsigned int __float_as_uint(float x) { unsigned int u; std::memcpy(&u, &x, 4); return u; }
inline float __uint_as_float(unsigned int u) { float x; std::memcpy(&x, &u, 4); return x; }
#define FASTOPT_UNROLL

std::barrier<> *fastopt_block_barrier;  // the running block's (set by fastopt_grid_threads)
inline void __syncthreads() { fastopt_block_barrier->arrive_and_wait(); }

using std::abs;
using std::fma;
using std::isnan;
using std::max;
using std::sqrt;

// every (block, thread) of a grid, the threads of a block one after another
template <typename F>
void fastopt_grid_serial(unsigned grid, unsigned block, F kernel)
{
    gridDim.x = grid;
    blockDim.x = block;
    for (unsigned b = 0; b < grid; ++b) {
        blockIdx.x = b;
        for (unsigned t = 0; t < block; ++t) {
            threadIdx.x = t;
            kernel();
        }
    }
}

// every (block, thread) of a grid, each thread of a block a thread of its own, blocks in turn
template <typename F>
void fastopt_grid_threads(unsigned grid, unsigned block, F kernel)
{
    gridDim.x = grid;
    blockDim.x = block;
    for (unsigned b = 0; b < grid; ++b) {
        blockIdx.x = b;
        std::barrier<> bar((std::ptrdiff_t)block);
        fastopt_block_barrier = &bar;
        std::vector<std::thread> threads;
        for (unsigned t = 0; t < block; ++t) {
            threads.emplace_back([t, &kernel] {
                threadIdx.x = t;
                kernel();
            });
        }
        for (auto &th : threads) {
            th.join();
        }
        fastopt_block_barrier = nullptr;
    }
}

#include FASTOPT_KERNELS
