// Host memory for the lisa_kernels host state bank: large chunks, allocated once and sub-allocated in Python
// (lisa_kernels/host_state_bank.py keeps the free list, so the native and the pure-PyTorch paths share it).
//
// Why native at all: torch.empty(..., pin_memory=True) goes through PyTorch's caching host allocator, which rounds
// every request up to a power of two (a 40 GiB arena would take 64 GiB of page-locked RAM) and never gives pinned
// memory back to the OS. Here a chunk is exactly the size asked for (rounded to a page) and goes back to the OS
// when its last tensor dies. A refused pin (cudaHostAlloc error, tight `ulimit -l`) is an ordinary exception the
// caller turns into a pageable fallback; the CUDA error is cleared so it cannot surface in a later, unrelated call.
//
// The CUDA runtime is found at run time (dlopen) rather than linked: the library then builds with nothing but a
// host C++ compiler, the same on GPU and CPU-only machines, with no CUDA toolkit and no nvcc/torch CUDA version
// check. It prefers the libcudart torch already loaded (RTLD_NOLOAD), so pinned memory comes from the same runtime
// that torch's copies use.

#include <ATen/ops/from_blob.h>
#include <torch/version.h>  // TORCH_VERSION in every torch release (since 2.10 it forwards to torch/headeronly)
#include <torch/library.h>

#include <dlfcn.h>
#include <unistd.h>

#include <cstdlib>
#include <string>

namespace {

// The OS's page (4 KiB on x86-64, 16 or 64 KiB on some Arm and POWER machines); lisa_kernels._native.PAGE_SIZE
// reads the same value for the Python side.
int64_t page_size() {
  static const int64_t page = [] {
    long p = sysconf(_SC_PAGESIZE);
    return p > 0 ? static_cast<int64_t>(p) : int64_t{4096};
  }();
  return page;
}

// The four CUDA runtime entry points we need. cudaError_t is an int-sized enum, cudaSuccess == 0.
struct CudaRuntime {
  int (*host_alloc)(void**, size_t, unsigned int) = nullptr;
  int (*free_host)(void*) = nullptr;
  const char* (*error_string)(int) = nullptr;
  int (*get_last_error)() = nullptr;
  std::string missing;  // why the runtime is unusable; empty when it is usable
};

const CudaRuntime& cuda_runtime() {
  static const CudaRuntime rt = [] {
    CudaRuntime rt;
    const char* names[] = {"libcudart.so.13", "libcudart.so.12", "libcudart.so.11.0", "libcudart.so"};
    void* lib = nullptr;
    for (const char* name : names) {  // the runtime already in this process (torch's), whichever version it is
      if ((lib = dlopen(name, RTLD_NOW | RTLD_NOLOAD)) != nullptr) break;
    }
    for (const char* name : names) {  // else any we can find
      if (lib == nullptr) lib = dlopen(name, RTLD_NOW | RTLD_LOCAL);
    }
    if (lib == nullptr) {
      rt.missing = "no CUDA runtime library (libcudart) found";
      return rt;
    }
    rt.host_alloc = reinterpret_cast<decltype(rt.host_alloc)>(dlsym(lib, "cudaHostAlloc"));
    rt.free_host = reinterpret_cast<decltype(rt.free_host)>(dlsym(lib, "cudaFreeHost"));
    rt.error_string = reinterpret_cast<decltype(rt.error_string)>(dlsym(lib, "cudaGetErrorString"));
    rt.get_last_error = reinterpret_cast<decltype(rt.get_last_error)>(dlsym(lib, "cudaGetLastError"));
    if (!rt.host_alloc || !rt.free_host || !rt.error_string || !rt.get_last_error) {
      rt.missing = "libcudart lacks cudaHostAlloc/cudaFreeHost/cudaGetErrorString/cudaGetLastError";
    }
    return rt;
  }();
  return rt;
}

constexpr unsigned int kCudaHostAllocPortable = 1;  // page-locked for every CUDA context: one bank, many GPUs

// One chunk of host memory as a 1-D uint8 CPU tensor of `nbytes` elements, page-locked when `pinned`. Its deleter
// frees the chunk, so the memory lives exactly as long as the tensor and every view of it.
at::Tensor host_alloc(int64_t nbytes, bool pinned) {
  TORCH_CHECK(nbytes >= 0, "host_alloc: nbytes must be >= 0, got ", nbytes);
  const int64_t page = page_size();
  // aligned_alloc needs a size that is a multiple of the alignment, and both allocators want a non-zero size.
  const size_t rounded = static_cast<size_t>(((nbytes > 0 ? nbytes : 1) + page - 1) / page * page);
  void* ptr = nullptr;
  std::function<void(void*)> deleter;
  if (pinned) {
    const CudaRuntime& rt = cuda_runtime();
    TORCH_CHECK(rt.missing.empty(), "host_alloc: cannot pin memory: ", rt.missing);
    const int err = rt.host_alloc(&ptr, rounded, kCudaHostAllocPortable);
    if (err != 0) {
      (void)rt.get_last_error();  // clear it: a refused pin is handled, not a sticky error
      TORCH_CHECK(false, "cudaHostAlloc(", rounded, " bytes) failed: ", rt.error_string(err));
    }
    // cudaFreeHost synchronizes the device; chunks are freed rarely (bank trimmed or destroyed), so that is fine.
    deleter = [free_host = rt.free_host](void* p) { (void)free_host(p); };
  } else {
    ptr = std::aligned_alloc(static_cast<size_t>(page), rounded);
    TORCH_CHECK(ptr != nullptr, "host_alloc: aligned_alloc(", rounded, " bytes) failed");
    deleter = [](void* p) { std::free(p); };
  }
  return at::from_blob(ptr, {nbytes}, std::move(deleter), at::TensorOptions().dtype(at::kByte).device(at::kCPU));
}

// The torch this library was compiled against, so a stale build is recognised instead of misbehaving.
std::string build_info() {
  return std::string("torch ") + TORCH_VERSION;
}

}  // namespace

TORCH_LIBRARY(lisa_kernels, m) {
  m.def("host_alloc(int nbytes, bool pinned) -> Tensor", &host_alloc);
  m.def("build_info() -> str", &build_info);
}
