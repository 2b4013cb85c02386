// kernels/csrc/codec.cu, two_shot.cu, one_shot_q.cu and gemv.cu built for the host (see
// cuda_runtime.h here) as one translation unit (kernels/codec_cuda.py builds them apart for
// the GPU); their entry points exported with C linkage for ctypes.
#include "codec.cu"
#include "two_shot.cu"
#include "one_shot_q.cu"
#include "gemv.cu"

// The emulator's own check (tests/test_codec_cuda_source.py): out[i] is lane t ^ 1's
// value after a shuffle, out[N + i] thread (t + 1)'s out after __syncthreads, out[2N + i]
// lane (t + 1) % 32's shared-memory word after __syncwarp (N = grid * block). With
// `stray`, thread 0 returns before the shuffle: its warp can never meet, which the launch
// must report as an error instead of hanging.
namespace {
__global__ void emulator_probe(float* out, int stray) {
  const int t = threadIdx.x, base = blockIdx.x * blockDim.x, n = gridDim.x * blockDim.x;
  if (stray && t == 0) return;
  out[base + t] = __shfl_xor_sync(0xffffffffu, (float)(blockIdx.x * 1000 + t), 1);
  __syncthreads();
  out[n + base + t] = out[base + (t + 1) % blockDim.x];
  __shared__ float words[1024];
  words[t] = out[base + t];
  __syncwarp();
  out[2 * n + base + t] = words[(t & ~31) + ((t + 1) & 31)];
}

// codec_weighted.cuh's Unscale on `chunks` chunks of 8 values, chunk c of channels 8c mod h
// (tests/test_codec_cuda_source.py checks it on values near bf16's ties)
__global__ void unscale_probe(const float* y, const float* scale, const float* inv, int64_t h,
                              int64_t chunks, float* out) {
  const int64_t c = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= chunks) return;
  float v[8];
  for (int i = 0; i < 8; ++i) v[i] = y[8 * c + i];
  Unscale{scale, inv, h, (8 * c) % h}(v);
  for (int i = 0; i < 8; ++i) out[8 * c + i] = v[i];
}
}  // namespace

extern "C" {
int host_unscale_probe(int64_t y, int64_t scale, int64_t inv, int64_t h, int64_t chunks,
                       int64_t out) {
  const int block = 128;
  return launch(unscale_probe, (chunks + block - 1) / block, block, nullptr,
                reinterpret_cast<const float*>(y), reinterpret_cast<const float*>(scale),
                reinterpret_cast<const float*>(inv), h, chunks, reinterpret_cast<float*>(out));
}
int host_emulator_probe(int64_t out, int64_t grid, int64_t block, int64_t stray) {
  return launch(emulator_probe, grid, (int)block, nullptr, reinterpret_cast<float*>(out),
                (int)stray);
}
int host_codec_quantize(int64_t x, int64_t buf, int64_t scale, int64_t h, int64_t rows,
                        int64_t n, int64_t nb, int64_t dtype, int64_t kind, int64_t bits,
                        int64_t g, bool rot, double c2, double rscale, int64_t stream) {
  return ml_codec_quantize(x, buf, scale, h, rows, n, nb, dtype, kind, bits, g, rot, c2,
                           rscale, stream);
}
int host_codec_dequantize(int64_t buf, int64_t out, int64_t outs, int64_t per, int64_t so,
                          int64_t sr, int64_t n, int64_t nb, int64_t dtype, int64_t kind,
                          int64_t bits, int64_t g, bool rot, double lim, double rscale,
                          int64_t stream) {
  return ml_codec_dequantize(buf, out, outs, per, so, sr, n, nb, dtype, kind, bits, g, rot,
                             lim, rscale, stream);
}
int host_codec_error(int64_t x, int64_t buf, int64_t out, int64_t rows, int64_t n,
                     int64_t nb, int64_t dtype, int64_t kind, int64_t bits, int64_t g,
                     bool rot, double rscale, int64_t stream) {
  return ml_codec_error(x, buf, out, rows, n, nb, dtype, kind, bits, g, rot, rscale, stream);
}
int64_t host_one_shot_prepare(int64_t ws, int64_t cnt, int64_t status, int64_t d0,
                              int64_t d1, int64_t d2, int64_t d3, int64_t d4, int64_t d5,
                              int64_t d6, int64_t d7, int64_t n, int64_t block_elems,
                              int64_t flag_off, int64_t data_off, int64_t slot_bytes,
                              int64_t rank, int64_t world, int64_t maxb, int64_t dtype,
                              int64_t spin, int64_t grid) {
  return ml_one_shot_prepare(ws, cnt, status, {d0, d1, d2, d3, d4, d5, d6, d7}, n, block_elems,
                             flag_off, data_off, slot_bytes, rank, world, maxb, dtype, spin,
                             grid);
}
int64_t host_two_shot_prepare(int64_t ws, int64_t cnt, int64_t status, int64_t d0,
                              int64_t d1, int64_t d2, int64_t d3, int64_t d4, int64_t d5,
                              int64_t d6, int64_t d7, int64_t scale, int64_t inv, int64_t n,
                              int64_t chunk,
                              int64_t tiles, int64_t tile, int64_t tile_bytes,
                              int64_t flag_off, int64_t recv_off, int64_t gather_off,
                              int64_t slot, int64_t rank, int64_t world, int64_t maxb,
                              int64_t kind, int64_t bits, int64_t g, bool rot, int64_t h,
                              double c2, double rscale, double out_lim, double lim_rot,
                              int64_t spin, int64_t grid) {
  return ml_two_shot_prepare(ws, cnt, status, {d0, d1, d2, d3, d4, d5, d6, d7}, scale, inv, n,
                             chunk, tiles, tile, tile_bytes, flag_off, recv_off, gather_off,
                             slot, rank, world, maxb, kind, bits, g, rot, h, c2, rscale,
                             out_lim, lim_rot, spin, grid);
}
int64_t host_one_shot_q_prepare(int64_t ws, int64_t cnt, int64_t status, int64_t d0,
                                int64_t d1, int64_t d2, int64_t d3, int64_t d4, int64_t d5,
                                int64_t d6, int64_t d7, int64_t scale, int64_t inv,
                                int64_t n, int64_t tiles, int64_t tile, int64_t tile_bytes,
                                int64_t flag_off, int64_t recv_off, int64_t slot,
                                int64_t rank, int64_t world, int64_t maxb, int64_t kind,
                                int64_t bits, int64_t g, bool rot, int64_t h, double c2,
                                double rscale, bool with_error, int64_t spin, int64_t grid) {
  return ml_one_shot_q_prepare(ws, cnt, status, {d0, d1, d2, d3, d4, d5, d6, d7}, scale, inv,
                               n,
                               tiles, tile, tile_bytes, flag_off, recv_off, slot, rank, world,
                               maxb, kind, bits, g, rot, h, c2, rscale, with_error, spin,
                               grid);
}
int host_launch(int64_t handle, int64_t x, int64_t out, int64_t err, int64_t stream) {
  return ml_launch(handle, x, out, err, stream);
}
int host_release(int64_t handle) { return ml_release(handle); }
int host_gemv(int64_t x, int64_t w, int64_t y, int64_t n, int64_t k, int64_t stream) {
  return ml_gemv(x, w, y, n, k, stream);
}
}
