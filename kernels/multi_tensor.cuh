// Multi-tensor launches (kernels/multi_tensor.py): one kernel over a device table of tensors.
//   table:  int64 rows (n, param, grad, slot..., master): each tensor's length and its arrays'
//           addresses (0 where a slot is absent), `width` int64 per row;
//   chunks: one uint64 per chunk, (tensor << 32) | chunk number: chunk c of tensor t covers
//           its elements [c * chunk, min((c + 1) * chunk, n)).
// Every index and address is computed in 64 bits: a tensor, and a table, may hold more than
// 2^31 elements. No header is included (the text is pasted into each kernel's translation
// unit, also inside namespaces by the CPU harness).
#ifndef FASTOPT_MT_THREADS
#define FASTOPT_MT_THREADS 256
#endif

// the row of the tensor of chunk `entry` and the chunk's element range [*lo, *hi)
__device__ __forceinline__ const long long *fastopt_mt_chunk(const long long *table,
                                                             const int width,
                                                             const unsigned long long entry,
                                                             const long long chunk,
                                                             long long *lo, long long *hi)
{
    const long long *row = table + (long long)(entry >> 32) * width;
    const long long start = (long long)(entry & 0xFFFFFFFFull) * chunk;
    const long long end = start + chunk;
    *lo = start;
    *hi = row[0] < end ? row[0] : end;
    return row;
}

// element `lo` of the array of element type E at `address`
template <typename E>
__device__ __forceinline__ E *fastopt_mt_ptr(const long long address, const long long lo)
{
    return reinterpret_cast<E *>(address + lo * (long long)sizeof(E));
}

// the sum of every thread's `v` over the block, in a fixed order (deterministic): a tree in
// shared memory; blockDim.x is a power of two of at most FASTOPT_MT_THREADS
template <typename A>
__device__ __forceinline__ A fastopt_mt_block_sum(const A v)
{
    __shared__ A red[FASTOPT_MT_THREADS];
    red[threadIdx.x] = v;
    __syncthreads();
    for (unsigned int s = blockDim.x / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) {
            red[threadIdx.x] += red[threadIdx.x + s];
        }
        __syncthreads();
    }
    return red[0];
}
