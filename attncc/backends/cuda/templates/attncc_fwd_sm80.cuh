// attncc's FA2-style forward machinery for sm_80 (CuTe): one CTA per query tile, mma.sync
// (SM80 16x8x16) tensor-core tiles, cp.async global->shared copies, ldmatrix shared->register
// copies, online softmax in fp32 (exp2 domain). The generated kernel (attn_fwd.cu.j2) owns the
// decisions: which kv tiles to visit, which are masked, the score and mask functions; this
// header only does the arithmetic of one tile. Structure after FlashAttention-2
// (csrc/flash_attn/src/flash_fwd_kernel.h, BSD-3-Clause, Tri Dao).
#pragma once

#include <cute/tensor.hpp>
#include <cutlass/numeric_types.h>

namespace attncc {
using namespace cute;

template <typename Element_, int kHeadDim_, int kBlockM_, int kBlockN_, int kWarps_>
struct Sm80Traits {
  using Element = Element_;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = kBlockM_;
  static constexpr int kBlockN = kBlockN_;
  static constexpr int kWarps = kWarps_;
  static constexpr int kThreads = kWarps * 32;
  static_assert(kHeadDim % 64 == 0, "head dims 64 and 128 only");
  using MmaAtom = std::conditional_t<std::is_same_v<Element, cutlass::half_t>,
                                     MMA_Atom<SM80_16x8x16_F32F16F16F32_TN>,
                                     MMA_Atom<SM80_16x8x16_F32BF16BF16F32_TN>>;
  using TiledMma = TiledMMA<MmaAtom, Layout<Shape<Int<kWarps>, _1, _1>>,
                            Tile<Int<16 * kWarps>, _16, _16>>;
  // 64-element rows of 128 bytes, swizzled so ldmatrix reads no bank twice
  using SmemLayoutAtom = decltype(composition(
      Swizzle<3, 3, 3>{}, Layout<Shape<_8, _64>, Stride<_64, _1>>{}));
  using SmemLayoutQ = decltype(tile_to_shape(SmemLayoutAtom{},
                                             Shape<Int<kBlockM>, Int<kHeadDim>>{}));
  using SmemLayoutKV = decltype(tile_to_shape(SmemLayoutAtom{},
                                              Shape<Int<kBlockN>, Int<kHeadDim>>{}));
  using SmemLayoutVt = decltype(composition(
      SmemLayoutKV{}, make_layout(Shape<Int<kHeadDim>, Int<kBlockN>>{}, GenRowMajor{})));
  using SmemLayoutVtNoSwizzle = decltype(get_nonswizzle_portion(SmemLayoutVt{}));
  // 8 threads per 64-element row, 8 elements (16 bytes) per cp.async
  using GmemLayoutAtom = Layout<Shape<Int<kThreads / 8>, _8>, Stride<_8, _1>>;
  using GmemTiledCopy = decltype(make_tiled_copy(
      Copy_Atom<SM80_CP_ASYNC_CACHEGLOBAL<cute::uint128_t>, Element>{}, GmemLayoutAtom{},
      Layout<Shape<_1, _8>>{}));
  using SmemCopyAtom = Copy_Atom<SM75_U32x4_LDSM_N, Element>;
  using SmemCopyAtomTransposed = Copy_Atom<SM75_U16x8_LDSM_T, Element>;
  static constexpr int kSmemBytes =
      int(cosize(SmemLayoutQ{}) + 2 * cosize(SmemLayoutKV{})) * int(sizeof(Element));
};

// (MMA=4, MMA_M, MMA_N) accumulator layout -> (rows=(2, MMA_M), cols=(2, MMA_N))
template <typename Layout>
__forceinline__ __device__ auto rowcol(Layout acc_layout) {
  auto l = logical_divide(acc_layout, Shape<_2>{});
  return make_layout(make_layout(get<0, 1>(l), get<1>(l)), make_layout(get<0, 0>(l), get<2>(l)));
}

// accumulator layout -> the A-operand register layout of the next mma (m16n8k16)
template <typename Layout>
__forceinline__ __device__ auto acc_as_a(Layout acc_layout) {
  using X = Underscore;
  auto l = logical_divide(acc_layout, Shape<X, X, _2>{});
  return make_layout(make_layout(get<0>(l), get<2, 0>(l)), get<1>(l), get<2, 1>(l));
}

// copy the rows of a (CPY, CPY_M, CPY_K) partition whose tile row is below `rows`; the other
// rows of the shared tile are zeroed (a key past Lk must hold a finite 0, never stale data)
template <typename TiledCopy, typename S, typename D, typename C>
__forceinline__ __device__ void copy_rows(TiledCopy const& tiled_copy, S const& src, D&& dst,
                                          C const& coords, int rows) {
  CUTE_UNROLL
  for (int m = 0; m < size<1>(src); ++m) {
    if (get<0>(coords(0, m, 0)) < rows) {
      CUTE_UNROLL
      for (int k = 0; k < size<2>(src); ++k) cute::copy(tiled_copy, src(_, m, k), dst(_, m, k));
    } else {
      cute::clear(dst(_, m, _));
    }
  }
}

template <int N>
__forceinline__ __device__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__forceinline__ __device__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffff, x, 2));
  return fmaxf(x, __shfl_xor_sync(0xffffffff, x, 1));
}

__forceinline__ __device__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffff, x, 2);
  return x + __shfl_xor_sync(0xffffffff, x, 1);
}

// One query tile of one (batch, head): Q in shared memory, the output accumulator and the
// softmax statistics in registers. `tile<masked>(n, ...)` folds kv tile n in.
template <typename Traits>
struct Sm80Forward {
  using Element = typename Traits::Element;
  static constexpr int kBlockM = Traits::kBlockM;
  static constexpr int kBlockN = Traits::kBlockN;
  static constexpr int kHeadDim = Traits::kHeadDim;
  using AccO = decltype(partition_fragment_C(typename Traits::TiledMma{},
                                             Shape<Int<kBlockM>, Int<kHeadDim>>{}));
  static constexpr int kRows = 2 * size<1>(AccO{});  // rows of the tile this thread holds

  typename Traits::TiledMma tiled_mma;
  int tid;
  Element* smem;
  const Element* k_head;  // K/V of this (batch, kv head)
  const Element* v_head;
  int64_t stride_kn, stride_vn;
  int Lk;
  AccO acc_o;
  float row_max[kRows];
  float row_sum[kRows];

  __device__ Sm80Forward(Element* smem_, const Element* q_head, int64_t stride_qm,
                         const Element* k_head_, int64_t stride_kn_, const Element* v_head_,
                         int64_t stride_vn_, int q_first, int Lq, int Lk_,
                         const CUtensorMap*, const CUtensorMap*, int, int)  // TMA: sm_90 only
      : tid(threadIdx.x), smem(smem_), k_head(k_head_), v_head(v_head_), stride_kn(stride_kn_),
        stride_vn(stride_vn_), Lk(Lk_) {
    Tensor sQ = make_tensor(make_smem_ptr(smem), typename Traits::SmemLayoutQ{});
    Tensor gQ = make_tensor(make_gmem_ptr(q_head + q_first * stride_qm),
                            Shape<Int<kBlockM>, Int<kHeadDim>>{}, make_stride(stride_qm, _1{}));
    typename Traits::GmemTiledCopy gmem_copy;
    auto thr = gmem_copy.get_thread_slice(tid);
    Tensor cQ = make_identity_tensor(Shape<Int<kBlockM>, Int<kHeadDim>>{});
    copy_rows(gmem_copy, thr.partition_S(gQ), thr.partition_D(sQ), thr.partition_S(cQ),
              Lq - q_first);
    cute::cp_async_fence();
    clear(acc_o);
    CUTE_UNROLL
    for (int i = 0; i < kRows; ++i) {
      row_max[i] = -INFINITY;
      row_sum[i] = 0.f;
    }
  }

  // start the copy of kv tile n of `head` (K or V) into `dst`
  template <typename Dst>
  __forceinline__ __device__ void load_kv(const Element* head, int64_t stride_n, int n,
                                          Dst&& dst) {
    Tensor g = make_tensor(make_gmem_ptr(head + int64_t(n) * kBlockN * stride_n),
                           Shape<Int<kBlockN>, Int<kHeadDim>>{}, make_stride(stride_n, _1{}));
    typename Traits::GmemTiledCopy gmem_copy;
    auto thr = gmem_copy.get_thread_slice(tid);
    Tensor c = make_identity_tensor(Shape<Int<kBlockN>, Int<kHeadDim>>{});
    copy_rows(gmem_copy, thr.partition_S(g), thr.partition_D(dst), thr.partition_S(c),
              Lk - n * kBlockN);
    cute::cp_async_fence();
  }

  // fold kv tile n in. score(qk_scaled, row, col) -> the logit in the exp2 domain;
  // allowed(row, col) -> whether the pair is kept (read only when kMasked)
  template <bool kMasked, typename Score, typename Allowed>
  __forceinline__ __device__ void tile(int n, Score const& score, Allowed const& allowed) {
    Tensor sQ = make_tensor(make_smem_ptr(smem), typename Traits::SmemLayoutQ{});
    Tensor sK = make_tensor(sQ.data() + size(sQ), typename Traits::SmemLayoutKV{});
    Tensor sV = make_tensor(sK.data() + size(sK), typename Traits::SmemLayoutKV{});
    Tensor sVt = make_tensor(sV.data(), typename Traits::SmemLayoutVt{});
    Tensor sVtNoSwizzle = make_tensor(sV.data().get(), typename Traits::SmemLayoutVtNoSwizzle{});

    __syncthreads();  // the previous tile's readers of sK/sV are done
    load_kv(k_head, stride_kn, n, sK);
    load_kv(v_head, stride_vn, n, sV);

    auto thr_mma = tiled_mma.get_thread_slice(tid);
    Tensor tSrQ = thr_mma.partition_fragment_A(sQ);
    Tensor tSrK = thr_mma.partition_fragment_B(sK);
    Tensor tOrVt = thr_mma.partition_fragment_B(sVtNoSwizzle);
    auto copy_q = make_tiled_copy_A(typename Traits::SmemCopyAtom{}, tiled_mma);
    auto thr_q = copy_q.get_thread_slice(tid);
    Tensor tSsQ = thr_q.partition_S(sQ);
    Tensor tSrQ_view = thr_q.retile_D(tSrQ);
    auto copy_k = make_tiled_copy_B(typename Traits::SmemCopyAtom{}, tiled_mma);
    auto thr_k = copy_k.get_thread_slice(tid);
    Tensor tSsK = thr_k.partition_S(sK);
    Tensor tSrK_view = thr_k.retile_D(tSrK);
    auto copy_v = make_tiled_copy_B(typename Traits::SmemCopyAtomTransposed{}, tiled_mma);
    auto thr_v = copy_v.get_thread_slice(tid);
    Tensor tOsVt = thr_v.partition_S(sVt);
    Tensor tOrVt_view = thr_v.retile_D(tOrVt);

    Tensor acc_s = partition_fragment_C(tiled_mma, Shape<Int<kBlockM>, Int<kBlockN>>{});
    clear(acc_s);
    cp_async_wait<1>();  // Q and K are in shared memory; V may still be on its way
    __syncthreads();
    cute::copy(copy_q, tSsQ(_, _, _0{}), tSrQ_view(_, _, _0{}));
    cute::copy(copy_k, tSsK(_, _, _0{}), tSrK_view(_, _, _0{}));
    CUTE_UNROLL
    for (int i = 0; i < size<2>(tSrQ); ++i) {
      if (i < size<2>(tSrQ) - 1) {
        cute::copy(copy_q, tSsQ(_, _, i + 1), tSrQ_view(_, _, i + 1));
        cute::copy(copy_k, tSsK(_, _, i + 1), tSrK_view(_, _, i + 1));
      }
      cute::gemm(tiled_mma, tSrQ(_, _, i), tSrK(_, _, i), acc_s);
    }

    // the score function (and the mask on a partial tile), element by element
    Tensor cS = make_identity_tensor(Shape<Int<kBlockM>, Int<kBlockN>>{});
    Tensor tScS = thr_mma.partition_C(cS);
    CUTE_UNROLL
    for (int i = 0; i < size(acc_s); ++i) {
      const int row = get<0>(tScS(i));
      const int col = n * kBlockN + get<1>(tScS(i));
      float s = score(acc_s(i), row, col);
      if constexpr (kMasked) {
        if (!(col < Lk && allowed(row, col))) s = -INFINITY;
      }
      acc_s(i) = s;
    }

    // online softmax, one row at a time; a row's 4 threads (a quad) share its statistics
    Tensor s = make_tensor(acc_s.data(), rowcol(acc_s.layout()));
    Tensor o = make_tensor(acc_o.data(), rowcol(acc_o.layout()));
    CUTE_UNROLL
    for (int r = 0; r < size<0>(s); ++r) {
      float m_new = row_max[r];
      CUTE_UNROLL
      for (int c = 0; c < size<1>(s); ++c) m_new = fmaxf(m_new, s(r, c));
      m_new = quad_max(m_new);
      const float m_safe = m_new == -INFINITY ? 0.f : m_new;  // nothing allowed yet
      const float alpha = exp2f(row_max[r] - m_safe);
      row_max[r] = m_new;
      float sum = 0.f;
      CUTE_UNROLL
      for (int c = 0; c < size<1>(s); ++c) {
        s(r, c) = exp2f(s(r, c) - m_safe);
        sum += s(r, c);
      }
      row_sum[r] = row_sum[r] * alpha + sum;  // this thread's part; the quad's sum at the end
      CUTE_UNROLL
      for (int c = 0; c < size<1>(o); ++c) o(r, c) *= alpha;
    }

    // o += p v, p as the A operand straight from registers
    Tensor rP = make_tensor<Element>(acc_s.layout());
    CUTE_UNROLL
    for (int i = 0; i < size(acc_s); ++i) rP(i) = Element(acc_s(i));
    Tensor tOrP = make_tensor(rP.data(), acc_as_a(rP.layout()));
    cp_async_wait<0>();
    __syncthreads();
    // a masked key has p = 0, yet 0 * nan (or inf) is nan: a non-finite value of V must reach
    // only the rows allowed to see its key (docs/semantics.md, "Non-finite inputs"). The probe
    // reads this thread's share of the V tile; only when some value is non-finite (rare) are
    // those values zeroed for the product and the rows that may see such a key poisoned.
    bool poison[kRows] = {};
    if constexpr (kMasked) {
      bool bad = false;
      for (int i = tid; i < kBlockN * kHeadDim; i += Traits::kThreads) {
        bad |= !isfinite(float(sV(i / kHeadDim, i % kHeadDim)));
      }
      if (__syncthreads_or(bad)) {
        __shared__ int bad_key[kBlockN];
        for (int j = tid; j < kBlockN; j += Traits::kThreads) bad_key[j] = 0;
        __syncthreads();
        for (int i = tid; i < kBlockN * kHeadDim; i += Traits::kThreads) {
          auto& x = sV(i / kHeadDim, i % kHeadDim);
          if (!isfinite(float(x))) {
            x = Element(0.f);
            bad_key[i / kHeadDim] = 1;
          }
        }
        __syncthreads();
        Tensor sc = make_tensor(tScS.data(), rowcol(tScS.layout()));
        CUTE_UNROLL
        for (int r = 0; r < kRows; ++r) {
          int sees = 0;
          CUTE_UNROLL
          for (int c = 0; c < size<1>(sc); ++c) {
            const int row = get<0>(sc(r, c)), key = get<1>(sc(r, c));
            const int col = n * kBlockN + key;
            sees |= bad_key[key] && col < Lk && allowed(row, col);
          }
          sees |= __shfl_xor_sync(0xffffffff, sees, 2);
          poison[r] = sees | __shfl_xor_sync(0xffffffff, sees, 1);
        }
      }
    }
    cute::copy(copy_v, tOsVt(_, _, _0{}), tOrVt_view(_, _, _0{}));
    CUTE_UNROLL
    for (int i = 0; i < size<2>(tOrP); ++i) {
      if (i < size<2>(tOrP) - 1) cute::copy(copy_v, tOsVt(_, _, i + 1), tOrVt_view(_, _, i + 1));
      cute::gemm(tiled_mma, tOrP(_, _, i), tOrVt(_, _, i), acc_o);
    }
    if constexpr (kMasked) {
      CUTE_UNROLL
      for (int r = 0; r < kRows; ++r) {
        CUTE_UNROLL
        for (int c = 0; c < size<1>(o); ++c) {
          if (poison[r]) o(r, c) = NAN;
        }
      }
    }
  }

  // N2: a sink logit (exp2 domain) joins every row's denominator, with no value row
  __forceinline__ __device__ void add_sink(float sink) {
    Tensor o = make_tensor(acc_o.data(), rowcol(acc_o.layout()));
    CUTE_UNROLL
    for (int r = 0; r < kRows; ++r) {
      const float m_fin = fmaxf(row_max[r], sink);
      const float corr = exp2f(row_max[r] - m_fin);
      // each of the quad's 4 threads holds a quarter of the sum: a quarter of the sink term
      row_sum[r] = row_sum[r] * corr + 0.25f * exp2f(sink - m_fin);
      row_max[r] = m_fin;
      CUTE_UNROLL
      for (int c = 0; c < size<1>(o); ++c) o(r, c) *= corr;
    }
  }

  // o / l into O (rows below Lq), lse = (m + log2 l) ln 2 (or -inf: no allowed key) into LSE
  __forceinline__ __device__ void finish(Element* o_head, int64_t stride_om, float* lse_head,
                                         int q_first, int Lq) {
    auto thr_mma = tiled_mma.get_thread_slice(tid);
    Tensor cO = make_identity_tensor(Shape<Int<kBlockM>, Int<kHeadDim>>{});
    Tensor tOcO = thr_mma.partition_C(cO);
    Tensor o = make_tensor(acc_o.data(), rowcol(acc_o.layout()));
    Tensor oc = make_tensor(tOcO.data(), rowcol(tOcO.layout()));
    CUTE_UNROLL
    for (int r = 0; r < size<0>(o); ++r) {
      const float l = quad_sum(row_sum[r]);
      const float inv = l == 0.f ? 0.f : 1.f / l;
      const int row = get<0>(oc(r, 0));
      const bool inside = q_first + row < Lq;
      CUTE_UNROLL
      for (int c = 0; c < size<1>(o); ++c) {
        if (inside) o_head[int64_t(q_first + row) * stride_om + get<1>(oc(r, c))] =
            Element(o(r, c) * inv);
      }
      if (lse_head != nullptr && inside && (tid % 4) == 0) {
        lse_head[q_first + row] =
            l == 0.f ? -INFINITY : (row_max[r] + log2f(l)) * 0.6931471805599453f;
      }
    }
  }
};

}  // namespace attncc
