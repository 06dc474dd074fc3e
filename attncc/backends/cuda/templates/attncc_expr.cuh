// Helpers that attncc's CudaPrinter prints calls to (attncc/backends/cuda/printer.py). Every
// helper is __host__ __device__, so the printed functions also compile into the host test
// binary that checks them against the IR's evaluator (tests/test_cuda_printer.py).
#pragma once

#include <math.h>
#include <type_traits>

// Integer floor division and modulo with floor semantics (Python's and the IR's), whatever the
// signs: C's `/` and `%` truncate toward zero, so -7 / 2 == -3 and -7 % 2 == -1 where the IR
// means -4 and 1. Floating operands take the floor of the quotient (torch.remainder's rule).
template <class A, class B>
__host__ __device__ __forceinline__ auto attncc_floordiv(A a, B b) -> decltype(a / b) {
  using T = decltype(a / b);
  if constexpr (std::is_integral<T>::value) {
    const T q = static_cast<T>(a) / static_cast<T>(b);
    const bool inexact = q * static_cast<T>(b) != static_cast<T>(a);
    return (inexact && ((a < 0) != (b < 0))) ? q - 1 : q;
  } else {
    return floorf(static_cast<float>(a) / static_cast<float>(b));
  }
}

template <class A, class B>
__host__ __device__ __forceinline__ auto attncc_mod(A a, B b) -> decltype(a / b) {
  return a - attncc_floordiv(a, b) * b;
}

// Min/Max of mixed operands (an int index against a float score) in their common type; a NaN
// operand gives NaN, as torch.minimum / torch.maximum (the reference) do.
template <class A, class B>
__host__ __device__ __forceinline__ auto attncc_min(A a, B b) -> decltype(a + b) {
  using T = decltype(a + b);
  const T x = static_cast<T>(a), y = static_cast<T>(b);
  return (x != x || x < y) ? x : y;
}

template <class A, class B>
__host__ __device__ __forceinline__ auto attncc_max(A a, B b) -> decltype(a + b) {
  using T = decltype(a + b);
  const T x = static_cast<T>(a), y = static_cast<T>(b);
  return (x != x || x > y) ? x : y;
}

template <class T>
__host__ __device__ __forceinline__ auto attncc_abs(T x) -> decltype(+x) {
  return x < 0 ? -x : +x;
}

// sign keeps its operand's type (an int for an index expression), as torch.sign does
template <class T>
__host__ __device__ __forceinline__ auto attncc_sign(T x) -> decltype(+x) {
  using R = decltype(+x);
  return x > 0 ? R(1) : (x < 0 ? R(-1) : R(0));
}

// the derivative of Max/Min; `at_zero` is sympy's H(0) (1/2 unless given)
template <class T>
__host__ __device__ __forceinline__ float attncc_heaviside(T x, float at_zero) {
  return x > 0 ? 1.0f : (x < 0 ? 0.0f : at_zero);
}

__host__ __device__ __forceinline__ float attncc_sigmoid(float x) {
  return 1.0f / (1.0f + expf(-x));
}

// What a captured-tensor read computes with: integers stay integers (indices, document ids),
// every floating type (fp16, bf16, fp32, fp64) becomes fp32, the precision of the score math.
template <class T>
using attncc_value_t = typename std::conditional<std::is_integral<T>::value, T, float>::type;

template <class T>
__host__ __device__ __forceinline__ attncc_value_t<T> attncc_load_at(const T* ptr, bool inside,
                                                                     long long offset) {
  return inside ? static_cast<attncc_value_t<T>>(ptr[offset]) : attncc_value_t<T>(0);
}

template <class T, class... Rest>
__host__ __device__ __forceinline__ attncc_value_t<T> attncc_load_at(
    const T* ptr, bool inside, long long offset, long long index, long long stride,
    long long size, Rest... rest) {
  return attncc_load_at(ptr, inside && index >= 0 && index < size, offset + index * stride,
                        rest...);
}

// `attncc_load(ptr, i0, stride0, size0, i1, stride1, size1, ...)`: element (i0, i1, ...) of a
// strided tensor, 0 when any index is outside [0, size): the IR's `Load` semantics, so a
// guarded read such as `(kv >= P) && anc[q][kv - P]` never touches memory outside the tensor.
template <class T, class... Dims>
__host__ __device__ __forceinline__ attncc_value_t<T> attncc_load(const T* ptr, Dims... dims) {
  static_assert(sizeof...(Dims) % 3 == 0, "attncc_load: (index, stride, size) per dimension");
  return attncc_load_at(ptr, true, 0LL, static_cast<long long>(dims)...);
}

// The query-tile summary of one mask piece (attncc.ir.tiles.KvRange): keys some row of the
// tile may attend (some_lo..some_hi), keys every row attends (all_lo..all_hi), whether the
// piece applies (its guard) and whether it is exact (else no tile of it is full).
struct attncc_kv_range {
  int some_lo, some_hi, all_lo, all_hi;
  bool enabled, exact;
};
