"""A small compiled CPU operator for the max-plus / min-plus convolution on M2 (the engine of
:mod:`gequiv_timm.layers.morphology`), the convection's trilinear resampling
(:func:`~gequiv_timm.layers.pde.convection_m2`) and the PDE models' 2x2 max pool (:func:`max_pool2x2`), with the
plain PyTorch path as the fallback.

Why: in eager PyTorch every kernel offset costs two passes over a block (add the kernel value, then an in-place
``maximum``), and ``torch.compile``'s CPU code for the same loop uses a NaN-propagating vector maximum (three
instructions): both stay 3-5x a depthwise convolution of the same support. A fused loop needs one load, one add and
one ``max`` per candidate, with the running maximum (and, for training, the arg-max) in registers.

What: a few hundred lines of C++ (the string :data:`_SOURCE`), compiled on first use with the system's C++ compiler
(``$CXX`` or ``g++``; ``-O3 -march=native``, no torch headers, no ninja, nothing beyond a compiler that the torch
wheel does not already need for ``torch.compile``) into a cache directory (``$GEQUIV_TIMM_CACHE`` or
``~/.cache/gequiv_timm``; the file name carries a hash of the source, the flags and the CPU's flags), loaded with
``ctypes`` and called on the tensors' data pointers (the GIL is released; ``torch.get_num_threads()`` threads).
The source uses GCC's vector extensions (``__builtin_shuffle``, vector conditionals): g++ builds it; a compiler that
fails leaves the PyTorch path, with one warning.

* forward: each ``(sample, channel)`` slab is copied into a small padded buffer (orientations periodic, the plane
  with -inf / +inf, rows of stride ``W + kW//2``: one row's right padding is the next row's left padding; the
  layout of :mod:`~gequiv_timm.layers.morphology`, where every kernel offset is a constant shift; one buffer per
  thread, cache-resident; a NaN found while copying sends the call to the PyTorch path), then chunks of 128 outputs
  (the last one in as few vectors as it needs) keep their running maximum (minimum) and its offset in registers
  while all offsets stream past; the output is written cropped. Memory: the output (and the ``uint8`` index for
  training), nothing of the input's size. Ties: the lowest flat offset wins (strict comparison), as in the PyTorch
  path.
* backward: per slab the output gradient is scattered to the winning offsets in the same padded layout (a constant
  shift each, no bounds checks), then folded back (the periodic orientation copies onto their source); the
  kernel's gradient is summed per offset.
* convection: per ``(sample, channel, orientation)`` plane the shift is constant, so the orientation-interpolated
  plane is copied once into a buffer padded by replication (as far as the shift reaches; reading the replicated
  border is ``grid_sample``'s ``'border'`` clipping) and the bilinear 4-tap stencil runs as four contiguous,
  vectorised reads; the backward applies the stencil's adjoint in the same layout (the border folded back) and sums
  the gradients of the orientation fraction and of the per-plane offsets (in double), which autograd takes on to
  ``g0``. Same values as the ``grid_sample`` path up to float rounding.
* 2x2 max pool: ``F.max_pool2d``'s values and winners (first maximum in row-major order, NaN wins), vectors of
  outputs with deinterleaving shuffles; its backward writes the whole input gradient in one pass.

Same values as the PyTorch path (the candidates are the same float additions, the maximum is exact); gradients
equal up to the order of float additions. The backend is chosen by :func:`set_morphology_backend` (``'auto'`` by
default: native when it builds, else PyTorch with one warning; ``GEQUIV_TIMM_MORPH_BACKEND=torch`` in the
environment disables it; it also selects the PyTorch path of the convection and of the pool).
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

__all__ = [
    'max_pool2x2',
    'morphology_backend',
    'native_available',
    'native_morph_backward',
    'native_morph_forward',
    'set_morphology_backend',
]

_SOURCE = r'''
#include <cstdint>
#include <thread>
#include <vector>
#include <algorithm>
#include <limits>
#include <cmath>

namespace {
// short rows (a 12-pixel row of a small map) are copied by inline vector code: a libc memmove call per row costs
// more than the row (GCC would otherwise turn these loops back into calls)
#pragma GCC optimize("no-tree-loop-distribute-patterns")
template <typename T>
inline void copy_n(T* __restrict d, const T* __restrict s, int64_t n) {
    for (int64_t i = 0; i < n; ++i) d[i] = s[i];
}

constexpr int CH = 128;
#ifndef MB
#define MB 64
#endif  // outputs per chunk: the running max (and arg-max) of a chunk stay in registers

// GCC / clang vector extensions (explicit vectors: the compilers otherwise vectorise the loop over offsets)
typedef float vf __attribute__((vector_size(64)));
typedef double vd __attribute__((vector_size(64)));
typedef int32_t vi __attribute__((vector_size(64)));
typedef int64_t vl __attribute__((vector_size(64)));
template <typename T> struct VT;
template <> struct VT<float> { typedef vf V; typedef vi I; typedef int32_t S; static constexpr int N = 16; };
template <> struct VT<double> { typedef vd V; typedef vl I; typedef int64_t S; static constexpr int N = 8; };
// the morphology's vectors: 32 bytes (a 64-byte load at an arbitrary shift splits a cache line almost always)
typedef float mf __attribute__((vector_size(MB)));
typedef double md __attribute__((vector_size(MB)));
typedef int32_t mi __attribute__((vector_size(MB)));
typedef int64_t ml __attribute__((vector_size(MB)));
template <typename T> struct MT;
template <> struct MT<float> { typedef mf V; typedef mi I; typedef int32_t S; static constexpr int N = MB / 4; };
template <> struct MT<double> { typedef md V; typedef ml I; typedef int64_t S; static constexpr int N = MB / 8; };

template <typename V, typename T>
inline V loadu(const T* p) { V v; __builtin_memcpy(&v, p, sizeof(V)); return v; }

// run(i0, i1) over [0, n) split into at most nthreads contiguous ranges, one thread each (this thread when one)
template <typename F>
inline void parallel_ranges(int64_t n, int nthreads, F run) {
    const int64_t nt = std::max<int64_t>(1, std::min<int64_t>(nthreads, n));
    if (nt == 1) { run(0, n); return; }
    std::vector<std::thread> pool;
    for (int64_t i = 0; i < nt; ++i) pool.emplace_back(run, n * i / nt, n * (i + 1) / nt);
    for (auto& th : pool) th.join();
}

// write a chunk of the padded-row layout (row stride Wp) to the cropped output (row stride W)
template <typename T, bool IDX>
inline void store(const T* acc, const uint8_t* id, int n, int64_t t0, int64_t Wp, int64_t W, T* oq, uint8_t* iq,
                  const T* oend) {
    constexpr int P = 64 / sizeof(T);  // values per 64-byte piece
    int64_t y = t0 / Wp, x = t0 - y * Wp;
    int t = 0;
    while (t < n) {  // runs of valid columns are copied, the Wp - W wrap-around columns skipped
        if (x < W) {
            const int run = (int)std::min<int64_t>(W - x, n - t);
            T* d = oq + y * W + x;
            if (d + (run + P - 1) / P * P <= oend) {
                // whole pieces (one vector store each, no libc call): a piece's overrun lands on outputs of this
                // thread's range that come later (written after this), never past the range (checked)
                for (int k = 0; k < run; k += P) {
                    __builtin_memcpy(d + k, acc + t + k, 64);
                    if (IDX) __builtin_memcpy(iq + y * W + x + k, id + t + k, P);
                }
            } else {
                __builtin_memcpy(d, acc + t, run * sizeof(T));
                if (IDX) __builtin_memcpy(iq + y * W + x, id + t, run);
            }
            t += run;
            x += run;
        } else {
            const int skip = (int)std::min<int64_t>(Wp - x, n - t);
            t += skip;
            x += skip;
        }
        if (x == Wp) { x = 0; ++y; }
    }
}

// NVX vectors of outputs from t0 on (n of them kept): the running max (min) and its offset in registers while every
// offset streams past
template <typename T, bool EROSION, bool IDX, int NVX>
inline void chunk(const T* base, const int64_t* shift, const T* kq, int64_t nf, int64_t t0, int n, int64_t Wp,
                  int64_t W, T* oq, uint8_t* iq, const T* oend) {
    typedef typename MT<T>::V V;
    typedef typename MT<T>::I I;
    typedef typename MT<T>::S S;
    constexpr int N = MT<T>::N;
    V acc[NVX];
    I id[NVX];
    {
        const T* p = base + shift[0] + t0;
        const T k = kq[0];
        for (int v = 0; v < NVX; ++v) { acc[v] = loadu<V>(p + v * N) + k; if (IDX) id[v] = I{}; }
    }
    for (int64_t f = 1; f < nf; ++f) {
        const T* p = base + shift[f] + t0;
        const T k = kq[f];
        const S fs = (S)f;
        for (int v = 0; v < NVX; ++v) {
            const V cand = loadu<V>(p + v * N) + k;
            const I m = EROSION ? (cand < acc[v]) : (cand > acc[v]);
            acc[v] = m ? cand : acc[v];
            if (IDX) id[v] = m ? (I{} + fs) : id[v];
        }
    }
    T av[NVX * N + 64 / sizeof(T)];  // (+ a piece of slack: store reads whole pieces)
    uint8_t ids[NVX * N + 64 / sizeof(T)];
    __builtin_memcpy(av, acc, sizeof(av));
    if (IDX) {  // narrowed to bytes a vector at a time
        typedef uint8_t vb __attribute__((vector_size(N)));
        for (int v = 0; v < NVX; ++v) {
            const vb b = __builtin_convertvector(id[v], vb);
            __builtin_memcpy(ids + v * N, &b, N);
        }
    }
    store<T, IDX>(av, ids, n, t0, Wp, W, oq, iq, oend);
}

template <typename T, bool EROSION, bool IDX, int K>
inline void chunk_tail(const T* base, const int64_t* shift, const T* kq, int64_t nf, int64_t t0, int n, int64_t Wp,
                       int64_t W, T* oq, uint8_t* iq, const T* oend) {
    if constexpr (K >= 1) {
        if (n > (K - 1) * MT<T>::N) {
            chunk<T, EROSION, IDX, K>(base, shift, kq, nf, t0, n, Wp, W, oq, iq, oend);
            return;
        }
        chunk_tail<T, EROSION, IDX, K - 1>(base, shift, kq, nf, t0, n, Wp, W, oq, iq, oend);
    }
}

// One thread's share of (sample, channel) slabs: each slab is copied into a small padded buffer (orientations
// periodic, the plane with +-inf, CH values of slack so that every chunk's reads stay inside), then every
// orientation's output is computed from it, chunk by chunk, with every offset a constant shift.
template <typename T, bool EROSION, bool IDX>
int fwd_range(const T* x, const T* kv, T* out, uint8_t* idx, const int64_t* shift, int64_t bc0, int64_t bc1,
               int64_t C, int64_t O, int64_t H, int64_t W, int64_t KO, int64_t KH, int64_t KW) {
    constexpr int NV = CH / MT<T>::N;
    const int64_t ro = KO / 2, rh = KH / 2, rw = KW / 2, Wp = W + rw, Hp = H + 2 * rh, plane = Hp * Wp;
    const int64_t nf = KO * KH * KW, unit = (H - 1) * Wp + W, hw = H * W;  // (the last row's pad: no output)
    const int64_t length = (O + 2 * ro) * plane + 2 * rw + CH;
    const T fill = EROSION ? std::numeric_limits<T>::infinity() : -std::numeric_limits<T>::infinity();
    std::vector<T> storage(length);
    T* buf = storage.data();
    std::fill(buf, buf + length, fill);  // the borders stay +-inf; only the interior is rewritten per slab
    int has_nan = 0;
    const T* oend = out + bc1 * O * hw;  // this range's outputs end here
    for (int64_t bc = bc0; bc < bc1; ++bc) {
        const int64_t c = bc % C;
        const T* xs = x + bc * O * hw;
        for (int64_t a = 0; a < O + 2 * ro; ++a) {
            const int64_t src = ((a - ro) % O + O) % O;
            for (int64_t y = 0; y < H; ++y)
                copy_n<T>(buf + a * plane + (rh + y) * Wp + rw, xs + src * hw + y * W, W);
        }
        {  // NaN anywhere in the slab (in cache now): the caller then takes the PyTorch path
            int bad = 0;
            for (int64_t i = 0; i < O * hw; ++i) bad |= xs[i] != xs[i];
            has_nan |= bad;
        }
        for (int64_t o = 0; o < O; ++o) {
            const int64_t q = bc * O + o;
            const T* base = buf + o * plane;
            const T* kq = kv + (c * O + o) * nf;
            T* oq = out + q * hw;
            uint8_t* iq = IDX ? idx + q * hw : nullptr;
            int64_t t0 = 0;
            for (; t0 + CH <= unit; t0 += CH)
                chunk<T, EROSION, IDX, NV>(base, shift, kq, nf, t0, CH, Wp, W, oq, iq, oend);
            if (t0 < unit)  // the ragged end in as few vectors as it needs
                chunk_tail<T, EROSION, IDX, NV>(base, shift, kq, nf, t0, (int)(unit - t0), Wp, W, oq, iq, oend);
        }
        if (has_nan) return 1;  // the output is discarded
    }
    return 0;
}

template <typename T>
int fwd(const T* x, const T* kv, T* out, uint8_t* idx, int64_t nbc, int64_t C, int64_t O, int64_t H, int64_t W,
        int64_t KO, int64_t KH, int64_t KW, int erosion, int nthreads) {
    const int64_t Wp = W + KW / 2, plane = (H + 2 * (KH / 2)) * Wp, nf = KO * KH * KW;
    std::vector<int64_t> shift(nf);
    for (int64_t f = 0; f < nf; ++f) shift[f] = (f / (KH * KW)) * plane + ((f / KW) % KH) * Wp + f % KW;
    const int64_t* sh = shift.data();
    auto run = [&](int64_t b0, int64_t b1) -> int {
        if (erosion) {
            if (idx) return fwd_range<T, true, true>(x, kv, out, idx, sh, b0, b1, C, O, H, W, KO, KH, KW);
            return fwd_range<T, true, false>(x, kv, out, idx, sh, b0, b1, C, O, H, W, KO, KH, KW);
        }
        if (idx) return fwd_range<T, false, true>(x, kv, out, idx, sh, b0, b1, C, O, H, W, KO, KH, KW);
        return fwd_range<T, false, false>(x, kv, out, idx, sh, b0, b1, C, O, H, W, KO, KH, KW);
    };
    int64_t nt = std::max<int64_t>(1, std::min<int64_t>(nthreads, nbc));
    if (nt == 1) return run(0, nbc);
    std::vector<int> bad(nt, 0);
    std::vector<std::thread> pool;
    for (int64_t i = 0; i < nt; ++i)
        pool.emplace_back([&, i] { bad[i] = run(nbc * i / nt, nbc * (i + 1) / nt); });
    for (auto& th : pool) th.join();
    return *std::max_element(bad.begin(), bad.end());
}

// 2x2 max pool (stride 2, floor) of N planes H x W -> N x (H/2) x (W/2), with the winner (0..3, row-major in the
// window) as uint8; the same comparison as PyTorch's CPU kernel: a later value wins if greater or NaN, so ties go
// to the first value and NaN propagates. Explicit vectors of N outputs (deinterleaving shuffles): a row is done in
// whole vectors, the last one running past the row's end into the next row, which is computed (and written) after
// it; the last row of a thread's range is done in scalar code (its overrun would touch another thread's rows or
// run past the tensor).
template <typename T>
inline void pool_scalar(const T* a, const T* b, T* o, uint8_t* id, int64_t j0, int64_t Wo) {
    for (int64_t j = j0; j < Wo; ++j) {
        T m = a[2 * j];
        int k = 0;
        const T v1 = a[2 * j + 1], v2 = b[2 * j], v3 = b[2 * j + 1];
        if (v1 > m || v1 != v1) { m = v1; k = 1; }
        if (v2 > m || v2 != v2) { m = v2; k = 2; }
        if (v3 > m || v3 != v3) { m = v3; k = 3; }
        o[j] = m;
        id[j] = (uint8_t)k;
    }
}

template <typename T> struct Deinterleave;
template <> struct Deinterleave<float> {
    static inline void run(vf lo, vf hi, vf& ev, vf& od) {
        ev = __builtin_shuffle(lo, hi, vi{0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30});
        od = __builtin_shuffle(lo, hi, vi{1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31});
    }
};
template <> struct Deinterleave<double> {
    static inline void run(vd lo, vd hi, vd& ev, vd& od) {
        ev = __builtin_shuffle(lo, hi, vl{0, 2, 4, 6, 8, 10, 12, 14});
        od = __builtin_shuffle(lo, hi, vl{1, 3, 5, 7, 9, 11, 13, 15});
    }
};

template <typename T>
void pool_fwd(const T* x, T* out, uint8_t* idx, int64_t N, int64_t H, int64_t W, int nthreads) {
    typedef typename VT<T>::V V;
    typedef typename VT<T>::I I;
    constexpr int L = VT<T>::N;
    const int64_t Ho = H / 2, Wo = W / 2, rows = N * Ho, span = (Wo + L - 1) / L * L;
    auto run = [&](int64_t p0, int64_t p1) {  // row pairs p0..p1 (over all planes)
        for (int64_t p = p0; p < p1; ++p) {
            const int64_t plane = p / Ho, r = p - plane * Ho;
            const T* a = x + (plane * H + 2 * r) * W;
            const T* b = a + W;
            T* o = out + p * Wo;
            uint8_t* id = idx + p * Wo;
            int64_t j = 0;
            // whole vectors when their overrun stays inside the tensor (reads) and inside this range's later rows
            if ((a - x) + W + 2 * span <= N * H * W && p * Wo + span <= p1 * Wo)
                for (; j < Wo; j += L) {
                    V v0, v1, v2, v3;
                    Deinterleave<T>::run(loadu<V>(a + 2 * j), loadu<V>(a + 2 * j + L), v0, v1);
                    Deinterleave<T>::run(loadu<V>(b + 2 * j), loadu<V>(b + 2 * j + L), v2, v3);
                    I k = I{};
                    V m = v0;
                    I c = (v1 > m) | (v1 != v1);
                    m = c ? v1 : m; k = c ? (I{} + 1) : k;
                    c = (v2 > m) | (v2 != v2);
                    m = c ? v2 : m; k = c ? (I{} + 2) : k;
                    c = (v3 > m) | (v3 != v3);
                    m = c ? v3 : m; k = c ? (I{} + 3) : k;
                    __builtin_memcpy(o + j, &m, sizeof(V));
                    uint8_t kb[L];
                    for (int l = 0; l < L; ++l) kb[l] = (uint8_t)k[l];
                    __builtin_memcpy(id + j, kb, L);
                }
            else
                pool_scalar<T>(a, b, o, id, 0, Wo);
        }
    };
    parallel_ranges(rows, nthreads, run);
}

// its backward: every input value written (the winner gets the output's gradient, the rest 0); whole vectors with
// the same overrun rule (the writes past a row land in rows of this range that are written after it)
template <typename T> struct Interleave;
template <> struct Interleave<float> {
    static inline void run(vf ev, vf od, vf& lo, vf& hi) {
        lo = __builtin_shuffle(ev, od, vi{0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23});
        hi = __builtin_shuffle(ev, od, vi{8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31});
    }
};
template <> struct Interleave<double> {
    static inline void run(vd ev, vd od, vd& lo, vd& hi) {
        lo = __builtin_shuffle(ev, od, vl{0, 8, 1, 9, 2, 10, 3, 11});
        hi = __builtin_shuffle(ev, od, vl{4, 12, 5, 13, 6, 14, 7, 15});
    }
};

template <typename T>
void pool_bwd(const T* g, const uint8_t* idx, T* gx, int64_t N, int64_t H, int64_t W, int nthreads) {
    typedef typename VT<T>::V V;
    typedef typename VT<T>::I I;
    constexpr int L = VT<T>::N;
    const int64_t Ho = H / 2, Wo = W / 2, rows = N * Ho, span = (Wo + L - 1) / L * L;
    auto first_row = [&](int64_t p) { return p == rows ? N * H : (p / Ho) * H + 2 * (p % Ho); };
    auto run = [&](int64_t p0, int64_t p1) {
        const int64_t limit = first_row(p1) * W;  // this range's rows end here
        for (int64_t p = p0; p < p1; ++p) {
            const int64_t plane = p / Ho, r = p - plane * Ho;
            T* a = gx + (plane * H + 2 * r) * W;
            T* b = a + W;
            const T* gr = g + p * Wo;
            const uint8_t* id = idx + p * Wo;
            if ((b - gx) + 2 * span <= limit && p * Wo + span <= rows * Wo) {
                for (int rb = 0; rb < 2; ++rb) {  // row a first, then b (a's overrun lands in b, rewritten)
                    T* row = rb ? b : a;
                    for (int64_t j = 0; j < Wo; j += L) {
                        const V v = loadu<V>(gr + j);
                        I k;
                        for (int l = 0; l < L; ++l) k[l] = id[j + l];
                        const V z = V{};
                        V lo, hi;
                        Interleave<T>::run(k == 2 * rb ? v : z, k == 2 * rb + 1 ? v : z, lo, hi);
                        __builtin_memcpy(row + 2 * j, &lo, sizeof(V));
                        __builtin_memcpy(row + 2 * j + L, &hi, sizeof(V));
                    }
                }
            } else {
                for (int64_t j = 0; j < Wo; ++j) {
                    const T v = gr[j];
                    const uint8_t k = id[j];
                    a[2 * j] = k == 0 ? v : (T)0;
                    a[2 * j + 1] = k == 1 ? v : (T)0;
                    b[2 * j] = k == 2 ? v : (T)0;
                    b[2 * j + 1] = k == 3 ? v : (T)0;
                }
            }
            if (W & 1) { a[W - 1] = 0; b[W - 1] = 0; }
            if ((H & 1) && r == Ho - 1) std::fill(b + W, b + 2 * W, (T)0);  // the plane's last (odd) row
        }
    };
    parallel_ranges(rows, nthreads, run);
}

template <typename T>
void bwd(const T* g, const uint8_t* idx, T* gx, T* gk, int64_t B, int64_t C, int64_t O, int64_t H, int64_t W,
         int64_t KO, int64_t KH, int64_t KW, int nthreads) {
    // Per (channel, sample) slab: the gradient scattered into the forward's padded layout (every winning offset a
    // constant shift, no bounds checks: a winner in the padding, i.e. an all-infinite window, lands in a pad cell
    // and is dropped), then folded back (the periodic orientation copies added to their source).
    const int64_t ro = KO / 2, rh = KH / 2, rw = KW / 2, Wp = W + rw, plane = (H + 2 * rh) * Wp;
    const int64_t nf = KO * KH * KW, hw = H * W, length = (O + 2 * ro) * plane + 2 * rw + Wp;
    std::vector<int64_t> shift(nf);
    for (int64_t f = 0; f < nf; ++f) shift[f] = (f / (KH * KW)) * plane + ((f / KW) % KH) * Wp + f % KW;
    auto run = [&](int64_t c0, int64_t c1) {
        std::vector<T> storage(length), acc(O * nf);
        T* __restrict gbuf = storage.data();
        const int64_t* __restrict sh = shift.data();
        for (int64_t c = c0; c < c1; ++c) {
            std::fill(acc.begin(), acc.end(), (T)0);
            for (int64_t b = 0; b < B; ++b) {
                const int64_t bc = b * C + c;
                if (gx) std::fill(gbuf, gbuf + length, (T)0);
                for (int64_t o = 0; o < O; ++o) {
                    const T* __restrict gq = g + (bc * O + o) * hw;
                    const uint8_t* __restrict iq = idx + (bc * O + o) * hw;
                    T* __restrict ak = acc.data() + o * nf;
                    T* __restrict base = gbuf + o * plane;
                    for (int64_t y = 0; y < H; ++y)
                        for (int64_t x = 0; x < W; ++x) {
                            const int64_t f = iq[y * W + x];
                            const T gv = gq[y * W + x];
                            ak[f] += gv;
                            if (gx) base[sh[f] + y * Wp + x] += gv;
                        }
                }
                if (gx) {
                    T* gxs = gx + bc * O * hw;
                    for (int64_t o = 0; o < O; ++o)
                        for (int64_t y = 0; y < H; ++y) {
                            const T* __restrict src = gbuf + (ro + o) * plane + (rh + y) * Wp + rw;
                            T* __restrict d = gxs + o * hw + y * W;
                            for (int64_t x = 0; x < W; ++x) d[x] = src[x];
                        }
                    for (int64_t a = 0; a < 2 * ro; ++a) {  // the periodic copies: a < ro wraps to O - ro + a
                        const int64_t pa = a < ro ? a : O + a, o = a < ro ? O - ro + a : a - ro;
                        for (int64_t y = 0; y < H; ++y) {
                            const T* __restrict src = gbuf + pa * plane + (rh + y) * Wp + rw;
                            T* __restrict d = gxs + o * hw + y * W;
                            for (int64_t x = 0; x < W; ++x) d[x] += src[x];
                        }
                    }
                }
            }
            if (gk) std::copy(acc.begin(), acc.end(), gk + c * O * nf);
        }
    };
    parallel_ranges(C, nthreads, run);
}

// ---- convection on M2: per (sample, channel, orientation) plane a constant trilinear stencil ------------------
// out[b,c,o](r, x) = bilinear(V, clamp(r + dr[c,o]), clamp(x + dx[c,o])), V = wo_0 X[b,c,o_0] + wo_1 X[b,c,o_1],
// o_0 = (o - n_c) mod O, o_1 = (o - n_c - 1) mod O, wo_0 = 1 - fr_c, wo_1 = fr_c; the coordinates are clipped to
// the image before the interpolation (grid_sample's 'border', align_corners=True). The shift is the same for the
// whole plane, so V is copied once into a buffer padded by replication (as far as the shift reaches) and every
// output row is four contiguous, vectorisable reads of it: reading the replicated border is the clipping (the
// clipped coordinate and the replicated index give the same value and a zero derivative).
template <typename T>
struct Shift {  // integer part (clamped to [-n, n]: beyond, every tap reads the border), fraction, padding
    int64_t i, lo, hi;
    T f;
};

template <typename T>
inline Shift<T> make_shift(T d, int64_t n) {
    Shift<T> s;
    const T fl = std::floor(d);
    s.f = d - fl;
    s.i = fl < (T)(-n) ? -n : (fl > (T)n ? n : (int64_t)fl);
    s.lo = std::max<int64_t>(0, -s.i);     // replicated rows (columns) before the image
    s.hi = std::max<int64_t>(0, s.i + 1);  // and after it
    return s;
}

// buf[Hp x Wp] = V padded by replication (Hp = H + sy.lo + sy.hi, Wp likewise); mix: scratch of H x W
template <typename T>
inline void fill_padded(const T* __restrict a, const T* __restrict b, T w0, T w1, const Shift<T>& sy,
                        const Shift<T>& sx, int64_t H, int64_t W, T* __restrict mix, T* __restrict buf) {
    const int64_t Wp = W + sx.lo + sx.hi, Hp = H + sy.lo + sy.hi, hw = H * W;
    for (int64_t t = 0; t < hw; ++t) mix[t] = w0 * a[t] + w1 * b[t];
    for (int64_t r = 0; r < H; ++r) {
        T* row = buf + (sy.lo + r) * Wp;
        const T* m = mix + r * W;
        for (int64_t x = 0; x < sx.lo; ++x) row[x] = m[0];
        for (int64_t x = 0; x < W; ++x) row[sx.lo + x] = m[x];
        for (int64_t x = sx.lo + W; x < Wp; ++x) row[x] = m[W - 1];
    }
    for (int64_t r = 0; r < sy.lo; ++r) copy_n<T>(buf + r * Wp, buf + sy.lo * Wp, Wp);
    for (int64_t r = sy.lo + H; r < Hp; ++r)
        copy_n<T>(buf + r * Wp, buf + (sy.lo + H - 1) * Wp, Wp);
}

// the per-thread scratch of the convection: a padded plane holds at most (3H + 1) x (3W + 1) values (shifts are
// clamped to [-H, H] x [-W, W]); the flat stencil reads up to Wp + 1 values past a plane's padded rows
template <typename T>
struct ConvScratch {
    std::vector<T> s;
    T *buf, *gbuf, *mix, *gp, *ot, *accy, *accx;
    ConvScratch(int64_t H, int64_t W) {
        const int64_t cap = (3 * H + 1) * (3 * W + 1) + 3 * W + 2, n = H * (3 * W + 1);
        s.assign(2 * cap + H * W + 4 * n, (T)0);
        buf = s.data(); gbuf = buf + cap; mix = gbuf + cap; gp = mix + H * W; ot = gp + n; accy = ot + n;
        accx = accy + n;
    }
};

template <typename T>
void conv_fwd(const T* x, const T* fr, const int64_t* n, const T* dr, const T* dx, T* out, int64_t B, int64_t C,
              int64_t O, int64_t H, int64_t W, int nthreads) {
    const int64_t hw = H * W;
    auto run = [&](int64_t q0, int64_t q1) {
        ConvScratch<T> sc(H, W);
        T* __restrict buf = sc.buf;
        T* __restrict ot = sc.ot;
        for (int64_t q = q0; q < q1; ++q) {
            const int64_t bc = q / O, o = q % O, c = bc % C;
            const int64_t o0 = (((o - n[c]) % O) + O) % O, o1 = (o0 + O - 1) % O;
            const T w1 = fr[c], w0 = (T)1 - w1;
            const Shift<T> sy = make_shift<T>(dr[c * O + o], H), sx = make_shift<T>(dx[c * O + o], W);
            fill_padded<T>(x + (bc * O + o0) * hw, x + (bc * O + o1) * hw, w0, w1, sy, sx, H, W, sc.mix, buf);
            const int64_t Wp = W + sx.lo + sx.hi, len = H * Wp;
            const T fy = sy.f, fx = sx.f, gy = (T)1 - fy, gx = (T)1 - fx;
            // the output in the padded row stride (columns W..Wp-1 of each row are discarded)
            const T* __restrict A = buf + (sy.i + sy.lo) * Wp + sx.i + sx.lo;
            for (int64_t t = 0; t < len; ++t)
                ot[t] = gy * (gx * A[t] + fx * A[t + 1]) + fy * (gx * A[t + Wp] + fx * A[t + Wp + 1]);
            T* oq = out + q * hw;
            for (int64_t r = 0; r < H; ++r) copy_n<T>(oq + r * W, ot + r * Wp, W);
        }
    };
    const int64_t nq = B * C * O;
    parallel_ranges(nq, nthreads, run);
}

// gradients: gx (the adjoint of the stencil: scattered into a padded buffer, the replicated border folded back),
// gfr [C], gdr / gdx [C, O] (the derivative of the bilinear weights; zero where the coordinate was clipped, because
// the replicated border is flat there). Element-wise partial sums in T over the batch, then per plane in double.
template <typename T>
void conv_bwd(const T* g, const T* x, const T* fr, const int64_t* n, const T* dr, const T* dx, T* gx, T* gfr,
              T* gdr, T* gdx, int64_t B, int64_t C, int64_t O, int64_t H, int64_t W, int nthreads) {
    const int64_t hw = H * W;
    auto run = [&](int64_t c0, int64_t c1) {
        ConvScratch<T> sc(H, W);
        T* __restrict buf = sc.buf;
        T* __restrict gbuf = sc.gbuf;
        T* __restrict gp = sc.gp;
        T* __restrict accy = sc.accy;
        T* __restrict accx = sc.accx;
        std::vector<T> accf_storage(hw);
        T* __restrict accf = accf_storage.data();
        for (int64_t c = c0; c < c1; ++c) {
            const T w1 = fr[c], w0 = (T)1 - w1;
            std::fill(accf, accf + hw, (T)0);
            for (int64_t o = 0; o < O; ++o) {
                const int64_t o0 = (((o - n[c]) % O) + O) % O, o1 = (o0 + O - 1) % O;
                const Shift<T> sy = make_shift<T>(dr[c * O + o], H), sx = make_shift<T>(dx[c * O + o], W);
                const int64_t Wp = W + sx.lo + sx.hi, Hp = H + sy.lo + sy.hi, len = H * Wp;
                const T fy = sy.f, fx = sx.f, gy = (T)1 - fy, gxw = (T)1 - fx;
                const T c00 = gy * gxw, c01 = gy * fx, c10 = fy * gxw, c11 = fy * fx;
                const int64_t shift = (sy.i + sy.lo) * Wp + sx.i + sx.lo;
                std::fill(accy, accy + len, (T)0);
                std::fill(accx, accx + len, (T)0);
                std::fill(gp, gp + len, (T)0);  // the discarded columns stay 0: they contribute nothing
                for (int64_t bb = 0; bb < B; ++bb) {
                    const int64_t bc = bb * C + c;
                    const T* a = x + (bc * O + o0) * hw;
                    const T* b = x + (bc * O + o1) * hw;
                    const T* gq = g + (bc * O + o) * hw;
                    fill_padded<T>(a, b, w0, w1, sy, sx, H, W, sc.mix, buf);
                    for (int64_t r = 0; r < H; ++r) copy_n<T>(gp + r * Wp, gq + r * W, W);
                    const T* __restrict A = buf + shift;
                    for (int64_t t = 0; t < len; ++t) {
                        const T gv = gp[t];
                        accy[t] += gv * (gxw * (A[t + Wp] - A[t]) + fx * (A[t + Wp + 1] - A[t + 1]));
                        accx[t] += gv * (gy * (A[t + 1] - A[t]) + fy * (A[t + Wp + 1] - A[t + Wp]));
                    }
                    // the adjoint (needed for the orientation fraction's gradient even without gx)
                    std::fill(gbuf, gbuf + Hp * Wp + Wp + 2, (T)0);
                    T* __restrict G0 = gbuf + shift;
                    for (int64_t t = 0; t < len; ++t) G0[t] += c00 * gp[t];
                    T* __restrict G1 = G0 + 1;
                    for (int64_t t = 0; t < len; ++t) G1[t] += c01 * gp[t];
                    T* __restrict G2 = G0 + Wp;
                    for (int64_t t = 0; t < len; ++t) G2[t] += c10 * gp[t];
                    T* __restrict G3 = G0 + Wp + 1;
                    for (int64_t t = 0; t < len; ++t) G3[t] += c11 * gp[t];
                    // fold the replicated border back onto the image's edge
                    T* __restrict top = gbuf + sy.lo * Wp;
                    for (int64_t r = 0; r < sy.lo; ++r) {
                        const T* __restrict src = gbuf + r * Wp;
                        for (int64_t xx = 0; xx < Wp; ++xx) top[xx] += src[xx];
                    }
                    T* __restrict bottom = gbuf + (sy.lo + H - 1) * Wp;
                    for (int64_t r = sy.lo + H; r < Hp; ++r) {
                        const T* __restrict src = gbuf + r * Wp;
                        for (int64_t xx = 0; xx < Wp; ++xx) bottom[xx] += src[xx];
                    }
                    T* mix = sc.mix;  // reused: the folded adjoint, H x W
                    for (int64_t r = 0; r < H; ++r) {
                        const T* row = gbuf + (sy.lo + r) * Wp;
                        T* m = mix + r * W;
                        copy_n<T>(m, row + sx.lo, W);
                        for (int64_t xx = 0; xx < sx.lo; ++xx) m[0] += row[xx];
                        for (int64_t xx = sx.lo + W; xx < Wp; ++xx) m[W - 1] += row[xx];
                    }
                    for (int64_t t = 0; t < hw; ++t) accf[t] += mix[t] * (b[t] - a[t]);
                    if (gx) {  // distribute to o_0 and o_1 (the slab comes uninitialised: zeroed at its first use)
                        if (o == 0) std::fill(gx + bc * O * hw, gx + (bc + 1) * O * hw, (T)0);
                        T* __restrict ga = gx + (bc * O + o0) * hw;
                        T* __restrict gb = gx + (bc * O + o1) * hw;
                        for (int64_t t = 0; t < hw; ++t) ga[t] += w0 * mix[t];
                        for (int64_t t = 0; t < hw; ++t) gb[t] += w1 * mix[t];
                    }
                }
                double sdr = 0, sdx = 0;
                for (int64_t t = 0; t < len; ++t) { sdr += accy[t]; sdx += accx[t]; }
                gdr[c * O + o] = (T)sdr;
                gdx[c * O + o] = (T)sdx;
            }
            double sfr = 0;
            for (int64_t t = 0; t < hw; ++t) sfr += accf[t];
            gfr[c] = (T)sfr;
        }
    };
    parallel_ranges(C, nthreads, run);
}
}  // namespace

extern "C" {
void gequiv_conv_fwd_f32(const float* x, const float* fr, const int64_t* n, const float* dr, const float* dx,
                         float* out, int64_t B, int64_t C, int64_t O, int64_t H, int64_t W, int nthreads) {
    conv_fwd<float>(x, fr, n, dr, dx, out, B, C, O, H, W, nthreads);
}
void gequiv_conv_fwd_f64(const double* x, const double* fr, const int64_t* n, const double* dr, const double* dx,
                         double* out, int64_t B, int64_t C, int64_t O, int64_t H, int64_t W, int nthreads) {
    conv_fwd<double>(x, fr, n, dr, dx, out, B, C, O, H, W, nthreads);
}
void gequiv_conv_bwd_f32(const float* g, const float* x, const float* fr, const int64_t* n, const float* dr,
                         const float* dx, float* gx, float* gfr, float* gdr, float* gdx, int64_t B, int64_t C,
                         int64_t O, int64_t H, int64_t W, int nthreads) {
    conv_bwd<float>(g, x, fr, n, dr, dx, gx, gfr, gdr, gdx, B, C, O, H, W, nthreads);
}
void gequiv_conv_bwd_f64(const double* g, const double* x, const double* fr, const int64_t* n, const double* dr,
                         const double* dx, double* gx, double* gfr, double* gdr, double* gdx, int64_t B, int64_t C,
                         int64_t O, int64_t H, int64_t W, int nthreads) {
    conv_bwd<double>(g, x, fr, n, dr, dx, gx, gfr, gdr, gdx, B, C, O, H, W, nthreads);
}
int gequiv_morph_version() { return 4; }
void gequiv_pool_fwd_f32(const float* x, float* out, uint8_t* idx, int64_t N, int64_t H, int64_t W, int nthreads) {
    pool_fwd<float>(x, out, idx, N, H, W, nthreads);
}
void gequiv_pool_fwd_f64(const double* x, double* out, uint8_t* idx, int64_t N, int64_t H, int64_t W, int nthreads) {
    pool_fwd<double>(x, out, idx, N, H, W, nthreads);
}
void gequiv_pool_bwd_f32(const float* g, const uint8_t* idx, float* gx, int64_t N, int64_t H, int64_t W,
                         int nthreads) {
    pool_bwd<float>(g, idx, gx, N, H, W, nthreads);
}
void gequiv_pool_bwd_f64(const double* g, const uint8_t* idx, double* gx, int64_t N, int64_t H, int64_t W,
                         int nthreads) {
    pool_bwd<double>(g, idx, gx, N, H, W, nthreads);
}
int gequiv_morph_fwd_f32(const float* x, const float* kv, float* out, uint8_t* idx, int64_t nbc, int64_t C,
                          int64_t O, int64_t H, int64_t W, int64_t KO, int64_t KH, int64_t KW, int erosion,
                          int nthreads) {
    return fwd<float>(x, kv, out, idx, nbc, C, O, H, W, KO, KH, KW, erosion, nthreads);
}
int gequiv_morph_fwd_f64(const double* x, const double* kv, double* out, uint8_t* idx, int64_t nbc, int64_t C,
                          int64_t O, int64_t H, int64_t W, int64_t KO, int64_t KH, int64_t KW, int erosion,
                          int nthreads) {
    return fwd<double>(x, kv, out, idx, nbc, C, O, H, W, KO, KH, KW, erosion, nthreads);
}
void gequiv_morph_bwd_f32(const float* g, const uint8_t* idx, float* gx, float* gk, int64_t B, int64_t C,
                          int64_t O, int64_t H, int64_t W, int64_t KO, int64_t KH, int64_t KW, int nthreads) {
    bwd<float>(g, idx, gx, gk, B, C, O, H, W, KO, KH, KW, nthreads);
}
void gequiv_morph_bwd_f64(const double* g, const uint8_t* idx, double* gx, double* gk, int64_t B, int64_t C,
                          int64_t O, int64_t H, int64_t W, int64_t KO, int64_t KH, int64_t KW, int nthreads) {
    bwd<double>(g, idx, gx, gk, B, C, O, H, W, KO, KH, KW, nthreads);
}
}
'''

_FLAGS = ('-O3', '-march=native', '-std=c++17', '-shared', '-fPIC', '-pthread')
_MAX_OFFSETS = 255  # the arg-max index is a uint8

_lock = threading.Lock()
_lib = None            # the loaded library, once built
_error: str | None = None  # why it could not be built (then the PyTorch path is used)
_warned = False
_BACKENDS = ('auto', 'native', 'torch')
_backend = os.environ.get('GEQUIV_TIMM_MORPH_BACKEND', 'auto')
if _backend not in _BACKENDS:
    raise ValueError(f"GEQUIV_TIMM_MORPH_BACKEND must be one of {_BACKENDS}, got {_backend!r}")


def _cpu_flags() -> str:
    try:
        for line in Path('/proc/cpuinfo').read_text().splitlines():
            if line.startswith(('flags', 'Features')):
                return line
    except OSError:
        pass
    return platform.processor()


def _cache_dir() -> Path:
    root = os.environ.get('GEQUIV_TIMM_CACHE') or os.path.join(os.path.expanduser('~'), '.cache', 'gequiv_timm')
    return Path(root) / 'native'


def _build():
    """Compile (once per source / flags / CPU) and load the library; raises RuntimeError naming the problem."""
    cxx = os.environ.get('CXX') or shutil.which('g++') or shutil.which('c++') or shutil.which('clang++')
    if not cxx:
        raise RuntimeError("no C++ compiler found (set CXX or install g++)")
    key = hashlib.sha256('\n'.join((_SOURCE, ' '.join(_FLAGS), _cpu_flags(), platform.machine(), cxx)).encode())
    so = _cache_dir() / f'morph_{key.hexdigest()[:16]}.so'
    if not so.exists():
        so.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=so.parent) as tmp:
            src = Path(tmp) / 'morph.cpp'
            src.write_text(_SOURCE)
            out = Path(tmp) / so.name
            res = subprocess.run([cxx, *_FLAGS, str(src), '-o', str(out)], capture_output=True, text=True)
            if res.returncode != 0:
                raise RuntimeError(f"{cxx} failed: {res.stderr.strip()[-500:]}")
            os.replace(out, so)  # atomic: concurrent builders both end with a complete file
    lib = ctypes.CDLL(str(so))
    i64, ptr, cint = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    for dt in ('f32', 'f64'):
        f = getattr(lib, f'gequiv_morph_fwd_{dt}')
        f.argtypes = [ptr] * 4 + [i64] * 8 + [cint, cint]
        f.restype = cint
        f = getattr(lib, f'gequiv_pool_fwd_{dt}')
        f.argtypes = [ptr] * 3 + [i64] * 3 + [cint]
        f.restype = None
        f = getattr(lib, f'gequiv_pool_bwd_{dt}')
        f.argtypes = [ptr] * 3 + [i64] * 3 + [cint]
        f.restype = None
        f = getattr(lib, f'gequiv_morph_bwd_{dt}')
        f.argtypes = [ptr] * 4 + [i64] * 8 + [cint]
        f.restype = None
        f = getattr(lib, f'gequiv_conv_fwd_{dt}')
        f.argtypes = [ptr] * 6 + [i64] * 5 + [cint]
        f.restype = None
        f = getattr(lib, f'gequiv_conv_bwd_{dt}')
        f.argtypes = [ptr] * 10 + [i64] * 5 + [cint]
        f.restype = None
    if lib.gequiv_morph_version() != 4:
        raise RuntimeError("stale library")
    return lib


def _load():
    global _lib, _error
    if _lib is None and _error is None:
        with _lock:
            if _lib is None and _error is None:
                try:
                    _lib = _build()
                except Exception as e:  # noqa: BLE001 -- any failure means: use the PyTorch path
                    _error = f"{type(e).__name__}: {e}"
    return _lib


def native_available() -> tuple[bool, str | None]:
    """``(True, None)`` when the compiled operator builds and loads here, else ``(False, reason)``."""
    lib = _load()
    return lib is not None, _error


def set_morphology_backend(backend: str) -> None:
    """``'auto'`` (native when it builds, else PyTorch with one warning), ``'native'`` (raise if it cannot build)
    or ``'torch'`` (plain PyTorch always). Affects :func:`~gequiv_timm.layers.morphology.
    morphological_convolution_m2` on CPU; other devices always use PyTorch."""
    global _backend
    if backend not in _BACKENDS:
        raise ValueError(f"set_morphology_backend: backend must be one of {_BACKENDS}, got {backend!r}")
    if backend == 'native':
        ok, why = native_available()
        if not ok:
            raise RuntimeError(f"set_morphology_backend('native'): the compiled operator is unavailable ({why}); "
                               f"use 'torch' or 'auto'")
    _backend = backend


def morphology_backend() -> str:
    """The backend in force: ``'auto'``, ``'native'`` or ``'torch'``."""
    return _backend


def use_native(x: torch.Tensor, kernel: torch.Tensor) -> bool:
    """Whether this call goes to the compiled operator (CPU, float32/64, at most 255 offsets, no NaN in the
    kernel). NaN in ``x`` is found by the operator itself while it copies the input (no extra pass):
    :func:`native_morph_forward` then returns None and the caller takes the PyTorch path."""
    global _warned
    if _backend == 'torch' or x.device.type != 'cpu' or x.dtype not in (torch.float32, torch.float64):
        return False
    if kernel.shape[-3] * kernel.shape[-2] * kernel.shape[-1] > _MAX_OFFSETS:
        return False
    if _load() is None:
        if not _warned:
            _warned = True
            warnings.warn(f"gequiv_timm: the compiled morphological operator is unavailable ({_error}); using the "
                          f"plain PyTorch path (same values, slower). Set GEQUIV_TIMM_MORPH_BACKEND=torch to silence.",
                          RuntimeWarning, stacklevel=3)
        return False
    return not bool(torch.isnan(kernel).any())


def _ptr(t: torch.Tensor) -> int:
    return t.data_ptr()


def native_morph_forward(x: torch.Tensor, kernel: torch.Tensor, erosion: bool, need_index: bool):
    """``(out, idx)`` of the max-plus (min-plus) convolution (``idx`` the ``uint8`` winning flat offset, or None),
    or None when ``x`` holds a NaN (take the PyTorch path then: ``torch.amax`` propagates NaN, a C comparison
    skips it). Shapes and conventions as :func:`~gequiv_timm.layers.morphology.morphological_convolution_m2`; call
    only when :func:`use_native` says so. Memory: the output, the index, and one padded ``(sample, channel)`` slab
    per thread."""
    x = x.contiguous()
    b, c, orientations, h, w = x.shape
    ko, kh, kw = kernel.shape[-3:]
    kv = kernel.detach().to(x.dtype).reshape(c, orientations, ko * kh * kw)
    kv = kv.contiguous() if erosion else kv.neg()  # out = max_f (x_f - k_f) = max_f (x_f + kv_f)
    out = torch.empty_like(x)
    idx = torch.empty(x.shape, dtype=torch.uint8) if need_index else None
    fn = _lib.gequiv_morph_fwd_f32 if x.dtype == torch.float32 else _lib.gequiv_morph_fwd_f64
    bad = fn(_ptr(x), _ptr(kv), _ptr(out), _ptr(idx) if idx is not None else None, b * c, c, orientations, h, w,
             ko, kh, kw, int(bool(erosion)), torch.get_num_threads())
    return None if bad else (out, idx)


def native_morph_backward(grad_out: torch.Tensor, idx: torch.Tensor, k_shape, erosion: bool, need_x: bool,
                          need_k: bool):
    """``(grad_x, grad_kernel)``: ``grad_out`` routed to the winning offsets (None where not needed)."""
    g = grad_out.contiguous()
    b, c, orientations, h, w = g.shape
    ko, kh, kw = k_shape[-3:]
    gx = torch.empty_like(g) if need_x else None  # zeroed by the operator, slab by slab
    gk = torch.empty((c, orientations, ko, kh, kw), dtype=g.dtype) if need_k else None  # written by the operator
    fn = _lib.gequiv_morph_bwd_f32 if g.dtype == torch.float32 else _lib.gequiv_morph_bwd_f64
    fn(_ptr(g), _ptr(idx), _ptr(gx) if gx is not None else None, _ptr(gk) if gk is not None else None, b, c,
       orientations, h, w, ko, kh, kw, torch.get_num_threads())
    if gk is not None and not erosion:
        gk.neg_()
    return gx, gk


class _ConvectionM2Native(torch.autograd.Function):
    """The trilinear resampling of :func:`~gequiv_timm.layers.pde.convection_m2` on the compiled operator: ``x``,
    the orientation fraction ``fr [C]`` (integer part ``n [C]``, no gradient) and the per-plane spatial offsets
    ``dr, dx [C, O]`` (rows down, columns right; clipped to the image as ``grid_sample``'s 'border')."""

    @staticmethod
    def forward(ctx, x, fr, n, dr, dx):
        x = x.contiguous()
        fr, dr, dx = (t.detach().to(x.dtype).contiguous() for t in (fr, dr, dx))
        n = n.to(torch.int64).contiguous()
        b, c, o, h, w = x.shape
        out = torch.empty_like(x)
        fn = _lib.gequiv_conv_fwd_f32 if x.dtype == torch.float32 else _lib.gequiv_conv_fwd_f64
        fn(_ptr(x), _ptr(fr), _ptr(n), _ptr(dr), _ptr(dx), _ptr(out), b, c, o, h, w, torch.get_num_threads())
        ctx.save_for_backward(x, fr, n, dr, dx)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        x, fr, n, dr, dx = ctx.saved_tensors
        g = g.contiguous()
        b, c, o, h, w = x.shape
        gx = torch.empty_like(x) if ctx.needs_input_grad[0] else None  # zeroed by the operator
        gfr, gdr, gdx = torch.empty_like(fr), torch.empty_like(dr), torch.empty_like(dx)
        fn = _lib.gequiv_conv_bwd_f32 if x.dtype == torch.float32 else _lib.gequiv_conv_bwd_f64
        fn(_ptr(g), _ptr(x), _ptr(fr), _ptr(n), _ptr(dr), _ptr(dx), _ptr(gx) if gx is not None else None,
           _ptr(gfr), _ptr(gdr), _ptr(gdx), b, c, o, h, w, torch.get_num_threads())
        return gx, gfr, None, gdr, gdx


def use_native_convection(x: torch.Tensor) -> bool:
    """Whether :func:`~gequiv_timm.layers.pde.convection_m2` runs on the compiled operator (CPU, float32/64, the
    backend not 'torch', the operator built)."""
    if _backend == 'torch' or x.device.type != 'cpu' or x.dtype not in (torch.float32, torch.float64):
        return False
    return _load() is not None


def native_convection_m2(x, fr, n, dr, dx):
    """See :class:`_ConvectionM2Native`."""
    return _ConvectionM2Native.apply(x, fr, n, dr, dx)


class _MaxPool2x2Native(torch.autograd.Function):
    """``F.max_pool2d(x, 2)`` of ``[N, H, W]`` planes on the compiled operator: the same values, the same winner
    (the first maximum of the window in row-major order; NaN wins, as in PyTorch's CPU kernel) kept as a ``uint8``
    index; the backward writes the whole input gradient in one pass (no zero fill, no scatter)."""

    @staticmethod
    def forward(ctx, x):
        x = x.contiguous()
        n, h, w = x.shape
        out = torch.empty((n, h // 2, w // 2), dtype=x.dtype)
        idx = torch.empty((n, h // 2, w // 2), dtype=torch.uint8)
        fn = _lib.gequiv_pool_fwd_f32 if x.dtype == torch.float32 else _lib.gequiv_pool_fwd_f64
        fn(_ptr(x), _ptr(out), _ptr(idx), n, h, w, torch.get_num_threads())
        ctx.save_for_backward(idx)
        ctx.hw = (h, w)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        (idx,) = ctx.saved_tensors
        g = g.contiguous()
        h, w = ctx.hw
        gx = torch.empty((g.shape[0], h, w), dtype=g.dtype)
        fn = _lib.gequiv_pool_bwd_f32 if g.dtype == torch.float32 else _lib.gequiv_pool_bwd_f64
        fn(_ptr(g), _ptr(idx), _ptr(gx), g.shape[0], h, w, torch.get_num_threads())
        return gx


def max_pool2x2(x: torch.Tensor) -> torch.Tensor:
    """2x2 spatial max pool (stride 2, floor) of ``[..., H, W]``: ``F.max_pool2d(x, 2)``'s values and gradients, on
    the compiled operator on CPU (float32/64, the backend not 'torch', the operator built, ``H, W >= 2``); else
    ``F.max_pool2d`` itself. ~5x faster than PyTorch's CPU kernel at one thread on ``[64, 192, 24, 24]``."""
    if (_backend == 'torch' or x.device.type != 'cpu' or x.dtype not in (torch.float32, torch.float64)
            or x.dim() < 3 or min(x.shape[-2:]) < 2 or _load() is None):
        shape = x.shape
        return F.max_pool2d(x.reshape(-1, 1, *shape[-2:]), 2).view(*shape[:-2], shape[-2] // 2, shape[-1] // 2)
    shape = x.shape
    out = _MaxPool2x2Native.apply(x.reshape(-1, *shape[-2:]))
    return out.view(*shape[:-2], shape[-2] // 2, shape[-1] // 2)
