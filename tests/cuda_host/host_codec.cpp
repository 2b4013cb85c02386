// kernels/csrc/codec.cu built for the host (see cuda_runtime.h here), its entry points
// exported with C linkage for ctypes.
#include "codec.cu"

extern "C" {
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
}
