// attncc's forward machinery for sm_90a with wgmma (CuTe GMMA atoms): the kernel of
// attncc_fwd_sm80.cuh with both products on warpgroup MMAs, Q K^T with both operands in shared
// memory (SS), P V with P from registers (RS) and V read transposed from shared memory. K and V
// tiles come by TMA (Sm90TmaTraits: one bulk tensor copy per 64 head dims, completion on an
// mbarrier with expected transaction bytes, rows past Lk zero-filled by the copy engine) from
// the host-encoded tensor maps (attncc/backends/cuda/tensor_map.py), or by cp.async
// (Sm90Traits: layouts a tensor map cannot describe). Q is cp.async in both. One stage: every
// warp computes and waits (no producer/consumer warp specialisation, no K/V double buffer).
// Two warpgroups of 64 query rows each. Accumulator and A-operand layouts after
// FlashAttention-3 (hopper/utils.h, BSD-3-Clause, Tri Dao).
#pragma once

#include <cute/arch/copy_sm90_desc.hpp>
#include <cute/arch/copy_sm90_tma.hpp>
#include <cute/atom/mma_traits_sm90_gmma.hpp>
#include <cutlass/arch/barrier.h>

#include "attncc_fwd_sm80.cuh"

namespace attncc {
using namespace cute;

template <typename Element_, int kHeadDim_, int kBlockM_, int kBlockN_, int kWarps_,
          bool kTma_ = false>
struct Sm90Traits {
  using Element = Element_;
  static constexpr bool kTma = kTma_;  // K and V by TMA (else cp.async)
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = kBlockM_;
  static constexpr int kBlockN = kBlockN_;
  static constexpr int kWarps = kWarps_;
  static constexpr int kThreads = kWarps * 32;
  static_assert(kBlockM == 16 * kWarps, "one warpgroup (4 warps) per 64 query rows");
  using AtomLayout = Layout<Shape<Int<kBlockM / 64>, _1, _1>>;
  using TiledMmaS = decltype(make_tiled_mma(
      GMMA::ss_op_selector<Element, Element, float,
                           Shape<Int<kBlockM>, Int<kBlockN>, Int<kHeadDim>>>(),
      AtomLayout{}));
  using TiledMmaO = decltype(make_tiled_mma(
      GMMA::rs_op_selector<Element, Element, float,
                           Shape<Int<kBlockM>, Int<kHeadDim>, Int<kBlockN>>, GMMA::Major::K,
                           GMMA::Major::MN>(),
      AtomLayout{}));
  using SmemLayoutQ = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<Element>{},
                                             Shape<Int<kBlockM>, Int<kHeadDim>>{}));
  using SmemLayoutKV = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<Element>{},
                                              Shape<Int<kBlockN>, Int<kHeadDim>>{}));
  // V (keys x dims, dims contiguous) seen as the (dims x keys) B operand: MN-major
  using SmemLayoutVt = decltype(composition(
      SmemLayoutKV{},
      make_ordered_layout(Shape<Int<kHeadDim>, Int<kBlockN>>{}, Step<_2, _1>{})));
  using GmemLayoutAtom = Layout<Shape<Int<kThreads / 8>, _8>, Stride<_8, _1>>;
  using GmemTiledCopy = decltype(make_tiled_copy(
      Copy_Atom<SM80_CP_ASYNC_CACHEGLOBAL<cute::uint128_t>, Element>{}, GmemLayoutAtom{},
      Layout<Shape<_1, _8>>{}));
  // 128-byte swizzled tiles need 1024-byte aligned bases (wgmma's descriptors and TMA read
  // the swizzle from address bits); static shared memory may push the dynamic base off that,
  // so the kernel rounds it up within 1024 spare bytes. binary.smem_bytes mirrors this.
  static constexpr int kSmemBytes =
      int(cosize(SmemLayoutQ{}) + 2 * cosize(SmemLayoutKV{})) * int(sizeof(Element)) + 1024;
  static constexpr int kKvTileBytes = kBlockN * kHeadDim * int(sizeof(Element));
  static_assert(kHeadDim % 64 == 0, "one TMA box spans 64 head dims (128 bytes, the swizzle)");
};

template <typename Element, int kHeadDim, int kBlockM, int kBlockN, int kWarps>
using Sm90TmaTraits = Sm90Traits<Element, kHeadDim, kBlockM, kBlockN, kWarps, true>;

// wgmma accumulator ((2, 2, V), MMA_M, MMA_N) -> (rows=(2, MMA_M), cols=(2, V, MMA_N))
template <typename Layout>
__forceinline__ __device__ auto rowcol_sm90(Layout l) {
  return make_layout(make_layout(get<0, 1>(l), get<1>(l)),
                     make_layout(get<0, 0>(l), get<0, 2>(l), get<2>(l)));
}

// wgmma accumulator -> the register A operand of the next (16-bit) wgmma
template <typename Layout>
__forceinline__ __device__ auto acc_as_a_sm90(Layout acc) {
  auto l = logical_divide(get<0, 2>(acc), Tile<_2>{});
  return make_layout(make_layout(get<0, 0>(acc), get<0, 1>(acc), get<0, 0>(l)), get<1>(acc),
                     coalesce(make_layout(get<0, 1>(l), get<2>(acc))));
}

// shared-memory writes of this thread (cp.async, zero fills) -> visible to wgmma's async proxy
__forceinline__ __device__ void smem_to_async_proxy() { cutlass::arch::fence_view_async_shared(); }

template <typename Traits>
struct Sm90Forward {
  using Element = typename Traits::Element;
  static constexpr int kBlockM = Traits::kBlockM;
  static constexpr int kBlockN = Traits::kBlockN;
  static constexpr int kHeadDim = Traits::kHeadDim;
  using AccO = decltype(partition_fragment_C(typename Traits::TiledMmaO{},
                                             Shape<Int<kBlockM>, Int<kHeadDim>>{}));
  static constexpr int kRows = 2 * size<1>(AccO{});

  typename Traits::TiledMmaS mma_s;
  typename Traits::TiledMmaO mma_o;
  int tid;
  Element* smem;
  const Element* k_head;
  const Element* v_head;
  int64_t stride_kn, stride_vn;
  int Lk;
  const CUtensorMap* tma_k;
  const CUtensorMap* tma_v;
  int kv_b, kv_h;  // batch and kv head: the tensor maps' outer coordinates
  uint64_t* kv_bar;  // [2]: K, V arrived (TMA transaction bytes)
  uint32_t kv_phase = 0;
  AccO acc_o;
  float row_max[kRows];
  float row_sum[kRows];

  __device__ Sm90Forward(Element* smem_, const Element* q_head, int64_t stride_qm,
                         const Element* k_head_, int64_t stride_kn_, const Element* v_head_,
                         int64_t stride_vn_, int q_first, int Lq, int Lk_,
                         const CUtensorMap* tma_k_, const CUtensorMap* tma_v_, int kv_b_,
                         int kv_h_)
      : tid(threadIdx.x),
        smem(reinterpret_cast<Element*>((reinterpret_cast<uintptr_t>(smem_) + 1023) &
                                        ~uintptr_t(1023))),
        k_head(k_head_), v_head(v_head_), stride_kn(stride_kn_), stride_vn(stride_vn_), Lk(Lk_),
        tma_k(tma_k_), tma_v(tma_v_), kv_b(kv_b_), kv_h(kv_h_) {
    __shared__ uint64_t bars[2];
    kv_bar = bars;
    if constexpr (Traits::kTma) {
      if (tid == 0) {
        cute::initialize_barrier(kv_bar[0], 1);
        cute::initialize_barrier(kv_bar[1], 1);
      }
      cutlass::arch::fence_barrier_init();  // visible to the copy engine; the first tile
    }                                       // synchronises the CTA before any use
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

  // one thread: the K or V tile n into dst (kBlockN x kHeadDim, 64-dim swizzled column blocks)
  __forceinline__ __device__ void load_kv_tma(const CUtensorMap* map, uint64_t& bar, int n,
                                              Element* dst) {
    cute::set_barrier_transaction_bytes(bar, Traits::kKvTileBytes);
    CUTE_UNROLL
    for (int c = 0; c < kHeadDim / 64; ++c) {
      SM90_TMA_LOAD_4D::copy(map, &bar, uint64_t(TMA::CacheHintSm90::EVICT_NORMAL),
                             dst + c * kBlockN * 64, c * 64, n * kBlockN, kv_h, kv_b);
    }
  }

  template <bool kMasked, typename Score, typename Allowed>
  __forceinline__ __device__ void tile(int n, Score const& score, Allowed const& allowed) {
    Tensor sQ = make_tensor(make_smem_ptr(smem), typename Traits::SmemLayoutQ{});
    Tensor sK = make_tensor(sQ.data() + size(sQ), typename Traits::SmemLayoutKV{});
    Tensor sV = make_tensor(sK.data() + size(sK), typename Traits::SmemLayoutKV{});
    Tensor sVt = make_tensor(sV.data(), typename Traits::SmemLayoutVt{});

    __syncthreads();  // the previous tile's readers of sK/sV are done
    if constexpr (Traits::kTma) {
      if (tid == 0) {
        Element* k_tile = smem + cosize(typename Traits::SmemLayoutQ{});
        load_kv_tma(tma_k, kv_bar[0], n, k_tile);
        load_kv_tma(tma_v, kv_bar[1], n, k_tile + cosize(typename Traits::SmemLayoutKV{}));
      }
    } else {
      load_kv(k_head, stride_kn, n, sK);
      load_kv(v_head, stride_vn, n, sV);
    }

    auto thr_s = mma_s.get_thread_slice(tid);
    Tensor tSrQ = thr_s.partition_fragment_A(sQ);  // shared-memory descriptors
    Tensor tSrK = thr_s.partition_fragment_B(sK);
    Tensor acc_s = partition_fragment_C(mma_s, Shape<Int<kBlockM>, Int<kBlockN>>{});
    if constexpr (Traits::kTma) {
      cp_async_wait<0>();  // Q (cp.async); a no-op after the first tile
      smem_to_async_proxy();
      __syncthreads();
      cute::wait_barrier(kv_bar[0], kv_phase);  // K has arrived; V may still be on its way
    } else {
      cp_async_wait<1>();  // Q and K are in shared memory; V may still be on its way
      smem_to_async_proxy();
      __syncthreads();
    }
    warpgroup_fence_operand(acc_s);
    warpgroup_arrive();
    mma_s.accumulate_ = GMMA::ScaleOut::Zero;
    CUTE_UNROLL
    for (int k = 0; k < size<2>(tSrQ); ++k) {
      cute::gemm(mma_s, tSrQ(_, _, k), tSrK(_, _, k), acc_s);
      mma_s.accumulate_ = GMMA::ScaleOut::One;
    }
    warpgroup_commit_batch();
    warpgroup_wait<0>();
    warpgroup_fence_operand(acc_s);

    Tensor cS = make_identity_tensor(Shape<Int<kBlockM>, Int<kBlockN>>{});
    Tensor tScS = thr_s.partition_C(cS);
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

    Tensor s = make_tensor(acc_s.data(), rowcol_sm90(acc_s.layout()));
    Tensor o = make_tensor(acc_o.data(), rowcol_sm90(acc_o.layout()));
    CUTE_UNROLL
    for (int r = 0; r < size<0>(s); ++r) {
      float m_new = row_max[r];
      CUTE_UNROLL
      for (int c = 0; c < size<1>(s); ++c) m_new = fmaxf(m_new, s(r, c));
      m_new = quad_max(m_new);
      const float m_safe = m_new == -INFINITY ? 0.f : m_new;
      const float alpha = exp2f(row_max[r] - m_safe);
      row_max[r] = m_new;
      float sum = 0.f;
      CUTE_UNROLL
      for (int c = 0; c < size<1>(s); ++c) {
        s(r, c) = exp2f(s(r, c) - m_safe);
        sum += s(r, c);
      }
      row_sum[r] = row_sum[r] * alpha + sum;
      CUTE_UNROLL
      for (int c = 0; c < size<1>(o); ++c) o(r, c) *= alpha;
    }

    Tensor rP = make_tensor<Element>(acc_s.layout());
    CUTE_UNROLL
    for (int i = 0; i < size(acc_s); ++i) rP(i) = Element(acc_s(i));
    Tensor tOrP = make_tensor(rP.data(), acc_as_a_sm90(rP.layout()));
    if constexpr (Traits::kTma) {
      cute::wait_barrier(kv_bar[1], kv_phase);
      kv_phase ^= 1;
    } else {
      cp_async_wait<0>();
      smem_to_async_proxy();
      __syncthreads();
    }
    bool poison[kRows] = {};
    if constexpr (kMasked) {  // non-finite values of V: as in attncc_fwd_sm80.cuh
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
        smem_to_async_proxy();
        __syncthreads();
        Tensor sc = make_tensor(tScS.data(), rowcol_sm90(tScS.layout()));
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
    auto thr_o = mma_o.get_thread_slice(tid);
    Tensor tOrV = thr_o.partition_fragment_B(sVt);
    warpgroup_fence_operand(tOrP);  // P is an operand in registers: fenced like the acc
    warpgroup_fence_operand(acc_o);
    warpgroup_arrive();
    CUTE_UNROLL
    for (int k = 0; k < size<2>(tOrP); ++k) cute::gemm(mma_o, tOrP(_, _, k), tOrV(_, _, k), acc_o);
    warpgroup_commit_batch();
    warpgroup_wait<0>();
    warpgroup_fence_operand(acc_o);
    warpgroup_fence_operand(tOrP);
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

  __forceinline__ __device__ void add_sink(float sink) {
    Tensor o = make_tensor(acc_o.data(), rowcol_sm90(acc_o.layout()));
    CUTE_UNROLL
    for (int r = 0; r < kRows; ++r) {
      const float m_fin = fmaxf(row_max[r], sink);
      const float corr = exp2f(row_max[r] - m_fin);
      row_sum[r] = row_sum[r] * corr + 0.25f * exp2f(sink - m_fin);
      row_max[r] = m_fin;
      CUTE_UNROLL
      for (int c = 0; c < size<1>(o); ++c) o(r, c) *= corr;
    }
  }

  __forceinline__ __device__ void finish(Element* o_head, int64_t stride_om, float* lse_head,
                                         int q_first, int Lq) {
    auto thr_o = mma_o.get_thread_slice(tid);
    Tensor cO = make_identity_tensor(Shape<Int<kBlockM>, Int<kHeadDim>>{});
    Tensor tOcO = thr_o.partition_C(cO);
    Tensor o = make_tensor(acc_o.data(), rowcol_sm90(acc_o.layout()));
    Tensor oc = make_tensor(tOcO.data(), rowcol_sm90(tOcO.layout()));
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
