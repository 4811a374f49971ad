"""A small compiled CPU operator for the max-plus / min-plus convolution on M2 (the engine of
:mod:`gequiv_timm.layers.morphology`) and for the convection's trilinear resampling
(:func:`~gequiv_timm.layers.pde.convection_m2`), with the plain PyTorch path as the fallback.

Why: in eager PyTorch every kernel offset costs two passes over a block (add the kernel value, then an in-place
``maximum``), and ``torch.compile``'s CPU code for the same loop uses a NaN-propagating vector maximum (three
instructions): both stay 3-5x a depthwise convolution of the same support. A fused loop needs one load, one add and
one ``max`` per candidate, with the running maximum (and, for training, the arg-max) in registers.

What: ~150 lines of C++ (the string :data:`_SOURCE`), compiled on first use with the system's C++ compiler
(``$CXX`` or ``g++``; ``-O3 -march=native``, no torch headers, no ninja, nothing beyond a compiler that the torch
wheel does not already need for ``torch.compile``) into a cache directory (``$GEQUIV_TIMM_CACHE`` or
``~/.cache/gequiv_timm``; the file name carries a hash of the source, the flags and the CPU's flags), loaded with
``ctypes`` and called on the tensors' data pointers (the GIL is released; ``torch.get_num_threads()`` threads).

* forward: each ``(sample, channel)`` slab is copied into a small padded buffer (orientations periodic, the plane
  with -inf / +inf: the layout of :mod:`~gequiv_timm.layers.morphology`, where every kernel offset is a constant
  shift; one buffer per thread, cache-resident), then chunks of 64 outputs keep their running maximum (minimum) and
  its offset in registers while all offsets stream past; the output is written cropped. Memory: the output (and
  the ``uint8`` index for training), nothing of the input's size. Ties: the lowest flat offset wins (strict
  comparison), as in the PyTorch path.
* backward: one pass over the output per channel, the gradient routed to the winning offset (input and kernel).
* convection: per ``(sample, channel, orientation)`` plane a constant trilinear 8-tap stencil (two orientations,
  four pixels, coordinates clipped to the image as ``grid_sample``'s ``'border'``); the backward scatters to the
  input and sums the gradients of the orientation fraction and of the per-plane offsets (in double), which autograd
  takes on to ``g0``. Same values as the ``grid_sample`` path up to float rounding.

Same values as the PyTorch path (the candidates are the same float additions, the maximum is exact); gradients
equal up to the order of float additions. Inputs with NaN take the PyTorch path (a C comparison would skip a NaN
that ``torch.amax`` propagates). The backend is chosen by :func:`set_morphology_backend` (``'auto'`` by default:
native when it builds, else PyTorch with one warning; ``GEQUIV_TIMM_MORPH_BACKEND=torch`` in the environment
disables it).
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

__all__ = [
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

namespace {
constexpr int CH = 64;  // outputs per chunk: the running max (and arg-max) of a chunk stay in registers

// GCC / clang vector extensions (explicit vectors: the compilers otherwise vectorise the loop over offsets)
typedef float vf __attribute__((vector_size(64)));
typedef double vd __attribute__((vector_size(64)));
typedef int32_t vi __attribute__((vector_size(64)));
typedef int64_t vl __attribute__((vector_size(64)));
template <typename T> struct VT;
template <> struct VT<float> { typedef vf V; typedef vi I; typedef int32_t S; static constexpr int N = 16; };
template <> struct VT<double> { typedef vd V; typedef vl I; typedef int64_t S; static constexpr int N = 8; };

template <typename V, typename T>
inline V loadu(const T* p) { V v; __builtin_memcpy(&v, p, sizeof(V)); return v; }

// write a chunk of the padded-row layout (row stride Wp) to the cropped output (row stride W)
template <typename T, typename S, bool IDX>
inline void store(const T* acc, const S* id, int n, int64_t t0, int64_t Wp, int64_t W, T* oq, uint8_t* iq) {
    int64_t y = t0 / Wp, x = t0 - y * Wp;
    int t = 0;
    while (t < n) {  // runs of valid columns are copied, the Wp - W wrap-around columns skipped
        if (x < W) {
            const int run = (int)std::min<int64_t>(W - x, n - t);
            __builtin_memcpy(oq + y * W + x, acc + t, run * sizeof(T));
            if (IDX) for (int r = 0; r < run; ++r) iq[y * W + x + r] = (uint8_t)id[t + r];
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

// One thread's share of (sample, channel) slabs: each slab is copied into a small padded buffer (orientations
// periodic, the plane with +-inf, CH values of slack so that every chunk's reads stay inside), then every
// orientation's output is computed from it, chunk by chunk, with every offset a constant shift.
template <typename T, bool EROSION, bool IDX>
void fwd_range(const T* x, const T* kv, T* out, uint8_t* idx, const int64_t* shift, int64_t bc0, int64_t bc1,
               int64_t C, int64_t O, int64_t H, int64_t W, int64_t KO, int64_t KH, int64_t KW) {
    typedef typename VT<T>::V V;
    typedef typename VT<T>::I I;
    typedef typename VT<T>::S S;
    constexpr int N = VT<T>::N, NV = CH / N;
    const int64_t ro = KO / 2, rh = KH / 2, rw = KW / 2, Wp = W + 2 * rw, Hp = H + 2 * rh, plane = Hp * Wp;
    const int64_t nf = KO * KH * KW, unit = H * Wp, hw = H * W;
    const int64_t length = (O + 2 * ro) * plane + 2 * rw + CH;
    const T fill = EROSION ? std::numeric_limits<T>::infinity() : -std::numeric_limits<T>::infinity();
    std::vector<T> storage(length);
    T* buf = storage.data();
    std::fill(buf, buf + length, fill);  // the borders stay +-inf; only the interior is rewritten per slab
    for (int64_t bc = bc0; bc < bc1; ++bc) {
        const int64_t c = bc % C;
        const T* xs = x + bc * O * hw;
        for (int64_t a = 0; a < O + 2 * ro; ++a) {
            const int64_t src = ((a - ro) % O + O) % O;
            for (int64_t y = 0; y < H; ++y)
                __builtin_memcpy(buf + a * plane + (rh + y) * Wp + rw, xs + src * hw + y * W, W * sizeof(T));
        }
        for (int64_t o = 0; o < O; ++o) {
            const int64_t q = bc * O + o;
            const T* base = buf + o * plane;
            const T* kq = kv + (c * O + o) * nf;
            T* oq = out + q * hw;
            uint8_t* iq = IDX ? idx + q * hw : nullptr;
            for (int64_t t0 = 0; t0 < unit; t0 += CH) {
                V acc[NV];
                I id[NV];
                {
                    const T* p = base + shift[0] + t0;
                    const T k = kq[0];
                    for (int v = 0; v < NV; ++v) { acc[v] = loadu<V>(p + v * N) + k; if (IDX) id[v] = I{}; }
                }
                for (int64_t f = 1; f < nf; ++f) {
                    const T* p = base + shift[f] + t0;
                    const T k = kq[f];
                    const S fs = (S)f;
                    for (int v = 0; v < NV; ++v) {
                        const V cand = loadu<V>(p + v * N) + k;
                        const I m = EROSION ? (cand < acc[v]) : (cand > acc[v]);
                        acc[v] = m ? cand : acc[v];
                        if (IDX) id[v] = m ? (I{} + fs) : id[v];
                    }
                }
                T av[CH];
                S ids[CH];
                __builtin_memcpy(av, acc, sizeof(av));
                if (IDX) __builtin_memcpy(ids, id, sizeof(ids));
                const int n = (int)std::min<int64_t>(CH, unit - t0);
                store<T, S, IDX>(av, ids, n, t0, Wp, W, oq, iq);
            }
        }
    }
}

template <typename T>
void fwd(const T* x, const T* kv, T* out, uint8_t* idx, int64_t nbc, int64_t C, int64_t O, int64_t H, int64_t W,
         int64_t KO, int64_t KH, int64_t KW, int erosion, int nthreads) {
    const int64_t Wp = W + 2 * (KW / 2), plane = (H + 2 * (KH / 2)) * Wp, nf = KO * KH * KW;
    std::vector<int64_t> shift(nf);
    for (int64_t f = 0; f < nf; ++f) shift[f] = (f / (KH * KW)) * plane + ((f / KW) % KH) * Wp + f % KW;
    const int64_t* sh = shift.data();
    auto run = [&](int64_t b0, int64_t b1) {
        if (erosion) {
            if (idx) fwd_range<T, true, true>(x, kv, out, idx, sh, b0, b1, C, O, H, W, KO, KH, KW);
            else fwd_range<T, true, false>(x, kv, out, idx, sh, b0, b1, C, O, H, W, KO, KH, KW);
        } else {
            if (idx) fwd_range<T, false, true>(x, kv, out, idx, sh, b0, b1, C, O, H, W, KO, KH, KW);
            else fwd_range<T, false, false>(x, kv, out, idx, sh, b0, b1, C, O, H, W, KO, KH, KW);
        }
    };
    int64_t nt = std::max<int64_t>(1, std::min<int64_t>(nthreads, nbc));
    if (nt == 1) { run(0, nbc); return; }
    std::vector<std::thread> pool;
    for (int64_t i = 0; i < nt; ++i) pool.emplace_back(run, nbc * i / nt, nbc * (i + 1) / nt);
    for (auto& th : pool) th.join();
}

template <typename T>
void bwd(const T* g, const uint8_t* idx, T* gx, T* gk, int64_t B, int64_t C, int64_t O, int64_t H, int64_t W,
         int64_t KO, int64_t KH, int64_t KW, int nthreads) {
    const int64_t nf = KO * KH * KW, ro = KO / 2, rh = KH / 2, rw = KW / 2, hw = H * W;
    std::vector<int64_t> da(nf), di(nf), dj(nf);  // the offset of each flat kernel index, from the centre
    for (int64_t f = 0; f < nf; ++f) { da[f] = f / (KH * KW) - ro; di[f] = (f / KW) % KH - rh; dj[f] = f % KW - rw; }
    auto run = [&](int64_t c0, int64_t c1) {
        std::vector<int64_t> off(nf);
        for (int64_t c = c0; c < c1; ++c)
            for (int64_t b = 0; b < B; ++b) {
                T* gxs = gx ? gx + (b * C + c) * O * hw : nullptr;
                for (int64_t o = 0; o < O; ++o) {
                    for (int64_t f = 0; f < nf; ++f) {
                        int64_t oi = o + da[f];
                        oi = oi < 0 ? oi + O : (oi >= O ? oi - O : oi);
                        off[f] = oi * hw + di[f] * W + dj[f];
                    }
                    const int64_t q = (b * C + c) * O + o;
                    const T* gq = g + q * hw;
                    const uint8_t* iq = idx + q * hw;
                    T* gkq = gk ? gk + (c * O + o) * nf : nullptr;
                    for (int64_t y = 0; y < H; ++y)
                        for (int64_t x = 0; x < W; ++x) {
                            const int64_t t = y * W + x;
                            const int64_t f = iq[t];
                            const T gv = gq[t];
                            if (gkq) gkq[f] += gv;
                            if (gxs) {
                                const int64_t yi = y + di[f], xi = x + dj[f];
                                // (only a winner in the -inf / +inf padding, i.e. an all-infinite window, is outside)
                                if (yi >= 0 && yi < H && xi >= 0 && xi < W) gxs[off[f] + t] += gv;
                            }
                        }
                }
            }
    };
    int64_t nt = std::max<int64_t>(1, std::min<int64_t>(nthreads, C));
    if (nt == 1) { run(0, C); return; }
    std::vector<std::thread> pool;
    for (int64_t i = 0; i < nt; ++i) pool.emplace_back(run, C * i / nt, C * (i + 1) / nt);
    for (auto& th : pool) th.join();
}

// ---- convection on M2: per (sample, channel, orientation) plane a constant trilinear stencil ------------------
// out[b,c,o](r, x) = sum_k wo_k * bilinear(X[b,c,o_k], clamp(r + dr[c,o]), clamp(x + dx[c,o])) with
// o_0 = (o - n_c) mod O, o_1 = (o - n_c - 1) mod O, wo_0 = 1 - fr_c, wo_1 = fr_c; the coordinates are clipped to the
// image before the interpolation (grid_sample's 'border', align_corners=True).
template <typename T>
struct Taps { int64_t y0, y1, x0, x1; T fy, fx; bool cy, cx; };

template <typename T>
inline Taps<T> taps(int64_t r, int64_t x, T dr, T dx, int64_t H, int64_t W) {
    Taps<T> t;
    T sy = (T)r + dr, sx = (T)x + dx;
    t.cy = sy < 0 || sy > (T)(H - 1);
    t.cx = sx < 0 || sx > (T)(W - 1);
    sy = std::min(std::max(sy, (T)0), (T)(H - 1));
    sx = std::min(std::max(sx, (T)0), (T)(W - 1));
    t.y0 = (int64_t)sy; t.x0 = (int64_t)sx;
    t.fy = sy - (T)t.y0; t.fx = sx - (T)t.x0;
    t.y1 = std::min<int64_t>(t.y0 + 1, H - 1); t.x1 = std::min<int64_t>(t.x0 + 1, W - 1);
    return t;
}

template <typename T>
void conv_fwd(const T* x, const T* fr, const int64_t* n, const T* dr, const T* dx, T* out, int64_t B, int64_t C,
              int64_t O, int64_t H, int64_t W, int nthreads) {
    const int64_t hw = H * W;
    auto run = [&](int64_t q0, int64_t q1) {
        for (int64_t q = q0; q < q1; ++q) {
            const int64_t bc = q / O, o = q % O, c = bc % C;
            const int64_t o0 = (((o - n[c]) % O) + O) % O, o1 = (o0 + O - 1) % O;
            const T w1 = fr[c], w0 = (T)1 - w1;
            const T* a = x + (bc * O + o0) * hw;
            const T* b = x + (bc * O + o1) * hw;
            const T ddr = dr[c * O + o], ddx = dx[c * O + o];
            T* oq = out + q * hw;
            for (int64_t r = 0; r < H; ++r)
                for (int64_t xx = 0; xx < W; ++xx) {
                    const Taps<T> t = taps<T>(r, xx, ddr, ddx, H, W);
                    const int64_t i00 = t.y0 * W + t.x0, i01 = t.y0 * W + t.x1, i10 = t.y1 * W + t.x0,
                                  i11 = t.y1 * W + t.x1;
                    const T va = (1 - t.fy) * ((1 - t.fx) * a[i00] + t.fx * a[i01])
                                 + t.fy * ((1 - t.fx) * a[i10] + t.fx * a[i11]);
                    const T vb = (1 - t.fy) * ((1 - t.fx) * b[i00] + t.fx * b[i01])
                                 + t.fy * ((1 - t.fx) * b[i10] + t.fx * b[i11]);
                    oq[r * W + xx] = w0 * va + w1 * vb;
                }
        }
    };
    const int64_t nq = B * C * O;
    int64_t nt = std::max<int64_t>(1, std::min<int64_t>(nthreads, nq));
    if (nt == 1) { run(0, nq); return; }
    std::vector<std::thread> pool;
    for (int64_t i = 0; i < nt; ++i) pool.emplace_back(run, nq * i / nt, nq * (i + 1) / nt);
    for (auto& th : pool) th.join();
}

// gradients: gx (scatter of the stencil), gfr [C], gdr / gdx [C, O] (zero where the coordinate was clipped)
template <typename T>
void conv_bwd(const T* g, const T* x, const T* fr, const int64_t* n, const T* dr, const T* dx, T* gx, T* gfr,
              T* gdr, T* gdx, int64_t B, int64_t C, int64_t O, int64_t H, int64_t W, int nthreads) {
    const int64_t hw = H * W;
    auto run = [&](int64_t c0, int64_t c1) {
        for (int64_t c = c0; c < c1; ++c) {
            const T w1 = fr[c], w0 = (T)1 - w1;
            double sfr = 0;
            for (int64_t o = 0; o < O; ++o) {
                const int64_t o0 = (((o - n[c]) % O) + O) % O, o1 = (o0 + O - 1) % O;
                const T ddr = dr[c * O + o], ddx = dx[c * O + o];
                double sdr = 0, sdx = 0;
                for (int64_t bb = 0; bb < B; ++bb) {
                    const int64_t bc = bb * C + c;
                    const T* a = x + (bc * O + o0) * hw;
                    const T* b = x + (bc * O + o1) * hw;
                    T* ga = gx ? gx + (bc * O + o0) * hw : nullptr;
                    T* gb = gx ? gx + (bc * O + o1) * hw : nullptr;
                    const T* gq = g + (bc * O + o) * hw;
                    for (int64_t r = 0; r < H; ++r)
                        for (int64_t xx = 0; xx < W; ++xx) {
                            const T gv = gq[r * W + xx];
                            const Taps<T> t = taps<T>(r, xx, ddr, ddx, H, W);
                            const int64_t i00 = t.y0 * W + t.x0, i01 = t.y0 * W + t.x1, i10 = t.y1 * W + t.x0,
                                          i11 = t.y1 * W + t.x1;
                            const T w00 = (1 - t.fy) * (1 - t.fx), w01 = (1 - t.fy) * t.fx, w10 = t.fy * (1 - t.fx),
                                    w11 = t.fy * t.fx;
                            if (ga) {
                                const T g0 = gv * w0, g1 = gv * w1;
                                ga[i00] += g0 * w00; ga[i01] += g0 * w01; ga[i10] += g0 * w10; ga[i11] += g0 * w11;
                                gb[i00] += g1 * w00; gb[i01] += g1 * w01; gb[i10] += g1 * w10; gb[i11] += g1 * w11;
                            }
                            const T va = w00 * a[i00] + w01 * a[i01] + w10 * a[i10] + w11 * a[i11];
                            const T vb = w00 * b[i00] + w01 * b[i01] + w10 * b[i10] + w11 * b[i11];
                            sfr += (double)(gv * (vb - va));
                            if (!t.cx) {
                                const T da = (1 - t.fy) * (a[i01] - a[i00]) + t.fy * (a[i11] - a[i10]);
                                const T db = (1 - t.fy) * (b[i01] - b[i00]) + t.fy * (b[i11] - b[i10]);
                                sdx += (double)(gv * (w0 * da + w1 * db));
                            }
                            if (!t.cy) {
                                const T da = (1 - t.fx) * (a[i10] - a[i00]) + t.fx * (a[i11] - a[i01]);
                                const T db = (1 - t.fx) * (b[i10] - b[i00]) + t.fx * (b[i11] - b[i01]);
                                sdr += (double)(gv * (w0 * da + w1 * db));
                            }
                        }
                }
                gdr[c * O + o] = (T)sdr;
                gdx[c * O + o] = (T)sdx;
            }
            gfr[c] = (T)sfr;
        }
    };
    int64_t nt = std::max<int64_t>(1, std::min<int64_t>(nthreads, C));
    if (nt == 1) { run(0, C); return; }
    std::vector<std::thread> pool;
    for (int64_t i = 0; i < nt; ++i) pool.emplace_back(run, C * i / nt, C * (i + 1) / nt);
    for (auto& th : pool) th.join();
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
int gequiv_morph_version() { return 3; }
void gequiv_morph_fwd_f32(const float* x, const float* kv, float* out, uint8_t* idx, int64_t nbc, int64_t C,
                          int64_t O, int64_t H, int64_t W, int64_t KO, int64_t KH, int64_t KW, int erosion,
                          int nthreads) {
    fwd<float>(x, kv, out, idx, nbc, C, O, H, W, KO, KH, KW, erosion, nthreads);
}
void gequiv_morph_fwd_f64(const double* x, const double* kv, double* out, uint8_t* idx, int64_t nbc, int64_t C,
                          int64_t O, int64_t H, int64_t W, int64_t KO, int64_t KH, int64_t KW, int erosion,
                          int nthreads) {
    fwd<double>(x, kv, out, idx, nbc, C, O, H, W, KO, KH, KW, erosion, nthreads);
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
    if lib.gequiv_morph_version() != 3:
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
    """Whether this call goes to the compiled operator (CPU, float32/64, at most 255 offsets, no NaN in ``x``)."""
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
    return not bool(torch.isnan(x).any()) and not bool(torch.isnan(kernel).any())


def _ptr(t: torch.Tensor) -> int:
    return t.data_ptr()


def native_morph_forward(x: torch.Tensor, kernel: torch.Tensor, erosion: bool, need_index: bool):
    """``(out, idx)`` of the max-plus (min-plus) convolution (``idx`` the ``uint8`` winning flat offset, or None).
    Shapes and conventions as :func:`~gequiv_timm.layers.morphology.morphological_convolution_m2`; call only when
    :func:`use_native` says so. Memory: the output, the index, and one padded ``(sample, channel)`` slab per
    thread."""
    x = x.contiguous()
    b, c, orientations, h, w = x.shape
    ko, kh, kw = kernel.shape[-3:]
    kv = kernel.detach().to(x.dtype).reshape(c, orientations, ko * kh * kw)
    kv = kv.contiguous() if erosion else kv.neg()  # out = max_f (x_f - k_f) = max_f (x_f + kv_f)
    out = torch.empty_like(x)
    idx = torch.empty(x.shape, dtype=torch.uint8) if need_index else None
    fn = _lib.gequiv_morph_fwd_f32 if x.dtype == torch.float32 else _lib.gequiv_morph_fwd_f64
    fn(_ptr(x), _ptr(kv), _ptr(out), _ptr(idx) if idx is not None else None, b * c, c, orientations, h, w, ko, kh,
       kw, int(bool(erosion)), torch.get_num_threads())
    return out, idx


def native_morph_backward(grad_out: torch.Tensor, idx: torch.Tensor, k_shape, erosion: bool, need_x: bool,
                          need_k: bool):
    """``(grad_x, grad_kernel)``: ``grad_out`` routed to the winning offsets (None where not needed)."""
    g = grad_out.contiguous()
    b, c, orientations, h, w = g.shape
    ko, kh, kw = k_shape[-3:]
    gx = torch.zeros_like(g) if need_x else None
    gk = torch.zeros((c, orientations, ko, kh, kw), dtype=g.dtype) if need_k else None
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
        gx = torch.zeros_like(x) if ctx.needs_input_grad[0] else None
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
