// The extension's entry points, as kernels/codec_cuda.py binds them (its generated
// bindings include this file) and as codec.cu, two_shot.cu, one_shot_q.cu and gemv.cu
// define them: pointers and streams as integers; a quantize / dequantize / error / gemv /
// launch / release returns a cudaError_t code (0 on success), a prepare the launch's
// handle (>= 0, peers.cuh) or minus a cudaError_t code.
#pragma once
#include <stdint.h>

#include <vector>

int ml_codec_quantize(int64_t x, int64_t buf, int64_t scale, int64_t h, int64_t rows,
                      int64_t n, int64_t nb, int64_t dtype, int64_t kind, int64_t bits,
                      int64_t g, bool rot, double c2, double rscale, int64_t stream);
int ml_codec_dequantize(int64_t buf, int64_t out, int64_t outs, int64_t per, int64_t so,
                        int64_t sr, int64_t n, int64_t nb, int64_t dtype, int64_t kind,
                        int64_t bits, int64_t g, bool rot, double lim, double rscale,
                        int64_t stream);
int ml_codec_error(int64_t x, int64_t buf, int64_t out, int64_t rows, int64_t n, int64_t nb,
                   int64_t dtype, int64_t kind, int64_t bits, int64_t g, bool rot,
                   double rscale, int64_t stream);
int64_t ml_one_shot_prepare(int64_t ws, int64_t cnt, int64_t status,
                            std::vector<int64_t> deltas, int64_t n, int64_t block_elems,
                            int64_t flag_off, int64_t data_off, int64_t slot_bytes,
                            int64_t rank, int64_t world, int64_t maxb, int64_t dtype,
                            int64_t spin, int64_t grid);
int64_t ml_two_shot_prepare(int64_t ws, int64_t cnt, int64_t status,
                            std::vector<int64_t> deltas, int64_t scale, int64_t inv,
                            int64_t n, int64_t chunk, int64_t tiles, int64_t tile,
                            int64_t tile_bytes,
                            int64_t flag_off, int64_t recv_off, int64_t gather_off,
                            int64_t slot, int64_t rank, int64_t world, int64_t maxb,
                            int64_t kind, int64_t bits, int64_t g, bool rot, int64_t h,
                            double c2, double rscale, double out_lim, double lim_rot,
                            int64_t spin, int64_t grid);
int64_t ml_one_shot_q_prepare(int64_t ws, int64_t cnt, int64_t status,
                              std::vector<int64_t> deltas, int64_t scale, int64_t inv,
                              int64_t n, int64_t tiles, int64_t tile, int64_t tile_bytes,
                              int64_t flag_off, int64_t recv_off, int64_t slot, int64_t rank,
                              int64_t world, int64_t maxb, int64_t kind, int64_t bits,
                              int64_t g, bool rot, int64_t h, double c2, double rscale,
                              bool with_error, int64_t spin, int64_t grid);
// y [n] = x [k] W^T, W [n, k], bf16 (gemv.cu)
int ml_gemv(int64_t x, int64_t w, int64_t y, int64_t n, int64_t k, int64_t stream);
int ml_launch(int64_t handle, int64_t x, int64_t out, int64_t err, int64_t stream);
int ml_release(int64_t handle);
