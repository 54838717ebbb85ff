// Host memory for the lisa_kernels host state bank: large chunks, allocated once and sub-allocated in Python
// (lisa_kernels/host_state_bank.py keeps the free list, so the native and the pure-PyTorch paths share it).
//
// Why native at all: torch.empty(..., pin_memory=True) goes through PyTorch's caching host allocator, which rounds
// every request up to a power of two (a 40 GiB arena would take 64 GiB of page-locked RAM) and never gives pinned
// memory back to the OS. Here a chunk is exactly the size asked for (rounded to a page), and goes back to the OS
// when its last tensor dies. A refused pin (cudaHostAlloc error, tight `ulimit -l`) is an ordinary exception the
// caller turns into a pageable fallback; the CUDA error is cleared so it cannot surface in a later, unrelated call.
//
// Built with -DLISA_WITH_CUDA (and linked against cudart) when torch has CUDA; otherwise CPU-only, where
// `pinned=True` is refused and `pinned=False` gives page-aligned malloc memory.

#include <ATen/ops/from_blob.h>
#include <torch/headeronly/version.h>
#include <torch/library.h>

#include <unistd.h>

#include <cstdlib>
#include <string>

#ifdef LISA_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

namespace {

int64_t page_size() {
  static const int64_t page = [] {
    long p = sysconf(_SC_PAGESIZE);
    return p > 0 ? static_cast<int64_t>(p) : int64_t{4096};
  }();
  return page;
}

// One chunk of host memory as a 1-D uint8 CPU tensor of `nbytes` elements. Its deleter frees the chunk, so the
// memory lives exactly as long as the tensor and every view of it.
at::Tensor host_alloc(int64_t nbytes, bool pinned) {
  TORCH_CHECK(nbytes >= 0, "host_alloc: nbytes must be >= 0, got ", nbytes);
  const int64_t page = page_size();
  // aligned_alloc needs a size that is a multiple of the alignment, and both allocators want a non-zero size.
  const size_t rounded = static_cast<size_t>(((nbytes > 0 ? nbytes : 1) + page - 1) / page * page);
  void* ptr = nullptr;
  std::function<void(void*)> deleter;
  if (pinned) {
#ifdef LISA_WITH_CUDA
    // Portable: page-locked for every CUDA context, so a bank can serve several devices.
    cudaError_t err = cudaHostAlloc(&ptr, rounded, cudaHostAllocPortable);
    if (err != cudaSuccess) {
      (void)cudaGetLastError();  // clear it: a refused pin is handled, not a sticky error
      TORCH_CHECK(false, "cudaHostAlloc(", rounded, " bytes) failed: ", cudaGetErrorString(err));
    }
    // cudaFreeHost synchronizes the device; chunks are freed rarely (bank trimmed or destroyed), so that is fine.
    deleter = [](void* p) { (void)cudaFreeHost(p); };
#else
    TORCH_CHECK(false, "host_alloc: this build of the lisa_kernels extension has no CUDA and cannot pin memory");
#endif
  } else {
    ptr = std::aligned_alloc(static_cast<size_t>(page), rounded);
    TORCH_CHECK(ptr != nullptr, "host_alloc: aligned_alloc(", rounded, " bytes) failed");
    deleter = [](void* p) { std::free(p); };
  }
  return at::from_blob(ptr, {nbytes}, std::move(deleter), at::TensorOptions().dtype(at::kByte).device(at::kCPU));
}

// What this library was compiled against, so a stale build is recognised instead of misbehaving.
std::string build_info() {
  std::string info = std::string("torch ") + TORCH_VERSION;
#ifdef LISA_WITH_CUDA
  info += "; cuda";
#else
  info += "; cpu";
#endif
  return info;
}

}  // namespace

TORCH_LIBRARY(lisa_kernels, m) {
  m.def("host_alloc(int nbytes, bool pinned) -> Tensor", &host_alloc);
  m.def("build_info() -> str", &build_info);
  m.def("page_size() -> int", &page_size);
}
