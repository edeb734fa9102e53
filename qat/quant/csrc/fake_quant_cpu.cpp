// Fake-quantization kernels for dense float32 CPU tensors, one pass over memory each
// (loaded by qat/quant/cpu_kernels.py; qat/quant/affine.py says when they apply).
//
// A tensor is read in storage order as `rows` runs of equal length: one row per-tensor, one per
// output channel per-channel (the channel dim is the outermost storage dim). Row r has its own grid:
//     code = nearbyint(x * inv_scale)        (default rounding mode: half to even, as torch.round)
//     out  = clamp(code, lo, hi) * scale     lo = qmin - z (max(., 0) with relu), hi = qmax - z
// which is fake_quantize_with_mask's torch formula, element for element. The reductions sum fixed
// chunks into double partials combined in order: the results do not depend on the thread count.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <mutex>
#include <unordered_map>
#include <utility>
#include <vector>

#ifdef __linux__
#include <sys/mman.h>
#endif

namespace {

constexpr int64_t kGrain = 1 << 15;  // elements per parallel task
constexpr int64_t kChunk = 1 << 14;  // elements per partial sum (fixed, so sums are reproducible)
constexpr int kLanes = 16;           // independent accumulators: a vector register's worth
constexpr int kBlock = 64;           // terms per lane summed in float before the float64 total

struct Grid {
  float scale, inv_scale, lo, hi;
};

// torch.clamp's order: min(max(code, lo), hi), so hi wins when lo > hi (a zero point outside the code
// range); NaN stays NaN.
inline float clamp_code(float code, float lo, float hi) {
  const float raised = code < lo ? lo : code;
  return raised > hi ? hi : raised;
}

void check_dense_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat, name, " must be a float32 CPU tensor");
  TORCH_CHECK(t.is_non_overlapping_and_dense(), name, " must be dense (contiguous or channels_last)");
}

// Outputs of 1 MiB and more are often fresh memory from the OS: malloc maps blocks of 32 MiB and more directly
// and unmaps them when freed, and gives the top of its heap back past a threshold; the first touch of fresh
// pages costs more than a kernel's pass over them. Their blocks are kept instead, once freed, for the next
// output of the same size (up to kMaxCachedBytes in all: past it, cached blocks are freed to make room);
// release_cached_blocks() frees every cached block. A fresh block asks for huge pages where the OS grants
// them on request (512 times fewer faults). Values are unaffected.
constexpr size_t kCachedMinBytes = size_t{1} << 20;
constexpr size_t kMaxCachedBytes = size_t{1} << 30;

class LargeBlocks {
 public:
  void* take(size_t nbytes) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      const auto cached = free_.find(nbytes);
      if (cached != free_.end()) {
        void* block = cached->second;
        free_.erase(cached);
        cached_bytes_ -= nbytes;
        return block;
      }
    }
    const size_t alignment = nbytes >= kHugePage ? kHugePage : kCacheLine;
    void* block = std::aligned_alloc(alignment, (nbytes + alignment - 1) / alignment * alignment);
    TORCH_CHECK(block != nullptr, "out of memory allocating ", nbytes, " bytes");
#ifdef __linux__
    if (alignment == kHugePage) madvise(block, nbytes, MADV_HUGEPAGE);
#endif
    return block;
  }

  void give_back(void* block, size_t nbytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    while (cached_bytes_ + nbytes > kMaxCachedBytes && !free_.empty()) {  // make room
      cached_bytes_ -= free_.begin()->first;
      std::free(free_.begin()->second);
      free_.erase(free_.begin());
    }
    if (cached_bytes_ + nbytes > kMaxCachedBytes) {
      std::free(block);
      return;
    }
    free_.emplace(nbytes, block);
    cached_bytes_ += nbytes;
  }

  // Frees every cached block (outputs still alive are untouched); returns the bytes freed.
  size_t release() {
    std::lock_guard<std::mutex> lock(mutex_);
    for (const auto& entry : free_) std::free(entry.second);
    free_.clear();
    return std::exchange(cached_bytes_, 0);
  }

 private:
  static constexpr size_t kHugePage = size_t{2} << 20;
  static constexpr size_t kCacheLine = 64;
  std::mutex mutex_;
  std::unordered_multimap<size_t, void*> free_;
  size_t cached_bytes_ = 0;
};

LargeBlocks& large_blocks() {
  static auto* blocks = new LargeBlocks();  // never destroyed: tensors may outlive static destruction
  return *blocks;
}

// An empty tensor of `dtype` laid out as `like` (dense).
at::Tensor empty_output(const at::Tensor& like, at::ScalarType dtype) {
  const auto options = like.options().dtype(dtype);
  const size_t nbytes = like.numel() * c10::elementSize(dtype);
  if (nbytes < kCachedMinBytes) return at::empty_like(like, options);
  void* block = large_blocks().take(nbytes);
  return at::from_blob(block, like.sizes(), like.strides(), [nbytes](void* b) { large_blocks().give_back(b, nbytes); },
                       options);
}

// One grid per row from per-row scale, 1/scale (computed by torch, so bit-equal to x * (1.0 / s)) and zero point.
std::vector<Grid> row_grids(const at::Tensor& scale, const at::Tensor& inv_scale, const at::Tensor& zero_point,
                            int64_t qmin, int64_t qmax, bool relu) {
  auto s = scale.contiguous(), inv = inv_scale.contiguous();
  auto z = zero_point.to(at::kInt).contiguous();
  TORCH_CHECK(s.numel() == inv.numel() && s.numel() == z.numel(), "scale, inv_scale, zero_point: one per row");
  std::vector<Grid> grids(s.numel());
  for (int64_t r = 0; r < s.numel(); ++r) {
    const int64_t zr = z.data_ptr<int32_t>()[r];
    const float lo = static_cast<float>(qmin - zr);
    grids[r] = {s.data_ptr<float>()[r], inv.data_ptr<float>()[r], relu ? std::max(lo, 0.0f) : lo,
                static_cast<float>(qmax - zr)};
  }
  return grids;
}

// Calls body(row, begin, end) on row-aligned pieces of [0, numel), in parallel.
template <typename Body>
void for_each_row_piece(int64_t numel, int64_t rows, const Body& body) {
  const int64_t row_length = numel / rows;
  at::parallel_for(0, numel, kGrain, [&](int64_t begin, int64_t end) {
    while (begin < end) {
      const int64_t row = begin / row_length;
      const int64_t stop = std::min(end, (row + 1) * row_length);
      body(row, begin, stop);
      begin = stop;
    }
  });
}

// Branch-free bodies (bitwise & on bools, 0/1 factors) so that the compiler vectorises every loop.
template <bool kRelu, bool kMask>
void fake_quantize_piece(const float* x, float* out, uint8_t* inside, int64_t n, Grid g) {
  for (int64_t i = 0; i < n; ++i) {
    const float code = std::nearbyint(x[i] * g.inv_scale);
    const float clamped = clamp_code(code, g.lo, g.hi);
    out[i] = clamped * g.scale;
    if (kMask) inside[i] = (code == clamped) & (!kRelu | (x[i] > 0.0f));  // NaN: outside
  }
}

// (out, inside) for x laid out as `scale.numel()` rows; inside is undefined unless with_mask.
std::vector<at::Tensor> fake_quantize(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& inv_scale,
                                      const at::Tensor& zero_point, int64_t qmin, int64_t qmax, bool relu,
                                      bool with_mask) {
  check_dense_float(x, "x");
  const auto grids = row_grids(scale, inv_scale, zero_point, qmin, qmax, relu);
  auto out = empty_output(x, at::kFloat);
  auto inside = with_mask ? empty_output(x, at::kBool) : at::Tensor();
  const float* xp = x.data_ptr<float>();
  float* op = out.data_ptr<float>();
  auto* mp = with_mask ? reinterpret_cast<uint8_t*>(inside.data_ptr<bool>()) : nullptr;
  for_each_row_piece(x.numel(), grids.size(), [&](int64_t row, int64_t begin, int64_t end) {
    const auto piece = [&](auto kernel) { kernel(xp + begin, op + begin, with_mask ? mp + begin : nullptr, end - begin, grids[row]); };
    if (relu && with_mask) piece(fake_quantize_piece<true, true>);
    else if (relu) piece(fake_quantize_piece<true, false>);
    else if (with_mask) piece(fake_quantize_piece<false, true>);
    else piece(fake_quantize_piece<false, false>);
  });
  return {out, inside};
}

// grad * inside, element for element (as torch's grad * inside.view(uint8)); both in the same layout.
at::Tensor masked_gradient(const at::Tensor& grad, const at::Tensor& inside) {
  check_dense_float(grad, "grad");
  TORCH_CHECK(inside.scalar_type() == at::kBool && inside.sizes() == grad.sizes() && inside.strides() == grad.strides(),
              "inside must be a bool tensor laid out as grad");
  auto out = empty_output(grad, at::kFloat);
  const float* gp = grad.data_ptr<float>();
  const auto* mp = reinterpret_cast<const uint8_t*>(inside.data_ptr<bool>());
  float* op = out.data_ptr<float>();
  at::parallel_for(0, grad.numel(), kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) op[i] = gp[i] * static_cast<float>(mp[i]);
  });
  return out;
}

struct LsqSums {
  double scale = 0.0, zero = 0.0;
};

// LSQ's backward for one element of fake_quantize(relu(x) if kRelu else x): grad_x, and the terms of
// d/ds (x_hat - [inside] x: Esser et al.'s round(v) - v, or the bound, times s) and d/dz (-[outside]).
// Where relu(x) = 0 the code is z, on the grid: x_hat = 0 and no term.
template <bool kRelu>
inline void lsq_element(float grad, float x, float& grad_x, const Grid& g, float& d_scale, float& d_zero) {
  const float code = std::nearbyint(x * g.inv_scale);
  const float clamped = clamp_code(code, g.lo, g.hi);
  const bool on_grid = code == clamped;
  const bool relu_zero = kRelu & (x <= 0.0f);
  const float inside = static_cast<float>(on_grid & !relu_zero);
  const float outside = static_cast<float>(!on_grid & !relu_zero);
  grad_x = grad * inside;
  d_scale += grad * (clamped * g.scale - x * inside);
  d_zero -= grad * outside;
}

// Each lane sums a block's terms in float (kBlock of them: a few ulp), then adds the block's sum to a float64
// total: half the arithmetic of float64 throughout, and a fixed order.
template <bool kRelu>
LsqSums lsq_backward_chunk(const float* grad, const float* x, float* grad_x, int64_t n, const Grid& g) {
  double d_scale[kLanes] = {}, d_zero[kLanes] = {};
  for (int64_t start = 0; start < n; start += kLanes * kBlock) {
    const int64_t stop = std::min(n, start + kLanes * kBlock);
    float block_scale[kLanes] = {}, block_zero[kLanes] = {};
    int64_t i = start;
    for (; i + kLanes <= stop; i += kLanes) {
      for (int j = 0; j < kLanes; ++j) {
        lsq_element<kRelu>(grad[i + j], x[i + j], grad_x[i + j], g, block_scale[j], block_zero[j]);
      }
    }
    for (int j = 0; i < stop; ++i, ++j) lsq_element<kRelu>(grad[i], x[i], grad_x[i], g, block_scale[j], block_zero[j]);
    for (int j = 0; j < kLanes; ++j) {
      d_scale[j] += block_scale[j];
      d_zero[j] += block_zero[j];
    }
  }
  LsqSums sums;
  for (int j = 0; j < kLanes; ++j) {
    sums.scale += d_scale[j];
    sums.zero += d_zero[j];
  }
  return sums;
}

// (grad_x, d_scale, d_zero): per row, float64 sums of grad * (x_hat - [inside] x) and -grad [outside]
// (scale them by LSQ's grad scale / s and grad scale * s). Chunks never straddle rows.
std::vector<at::Tensor> lsq_backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& scale,
                                     const at::Tensor& inv_scale, const at::Tensor& zero_point, int64_t qmin,
                                     int64_t qmax, bool relu) {
  check_dense_float(x, "x");
  check_dense_float(grad, "grad");
  TORCH_CHECK(grad.sizes() == x.sizes() && grad.strides() == x.strides(), "grad must be laid out as x");
  const auto grids = row_grids(scale, inv_scale, zero_point, qmin, qmax, relu);
  const int64_t rows = grids.size(), row_length = x.numel() / rows;
  const int64_t chunks_per_row = std::max<int64_t>(1, (row_length + kChunk - 1) / kChunk);
  std::vector<LsqSums> partials(rows * chunks_per_row);
  auto grad_x = empty_output(x, at::kFloat);
  const float *gp = grad.data_ptr<float>(), *xp = x.data_ptr<float>();
  float* gxp = grad_x.data_ptr<float>();
  at::parallel_for(0, partials.size(), std::max<int64_t>(1, kGrain / kChunk), [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const int64_t row = c / chunks_per_row;
      const int64_t first = row * row_length + (c % chunks_per_row) * kChunk;
      const int64_t n = std::min(kChunk, (row + 1) * row_length - first);
      const auto chunk = relu ? lsq_backward_chunk<true> : lsq_backward_chunk<false>;
      partials[c] = chunk(gp + first, xp + first, gxp + first, n, grids[row]);
    }
  });
  auto d_scale = at::zeros({rows}, x.options().dtype(at::kDouble));
  auto d_zero = at::zeros({rows}, x.options().dtype(at::kDouble));
  for (int64_t c = 0; c < static_cast<int64_t>(partials.size()); ++c) {
    d_scale.data_ptr<double>()[c / chunks_per_row] += partials[c].scale;
    d_zero.data_ptr<double>()[c / chunks_per_row] += partials[c].zero;
  }
  return {grad_x, d_scale, d_zero};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("fake_quantize", &fake_quantize, "(x_hat, inside mask or undefined) of dense float32 x, per-row grids");
  m.def("masked_gradient", &masked_gradient, "grad * inside");
  m.def("lsq_backward", &lsq_backward, "(grad_x, per-row float64 d_scale and d_zero sums)");
  m.def("release_cached_blocks", [] { return static_cast<int64_t>(large_blocks().release()); },
        "free the cached output blocks; the bytes freed");
}
