/* The epilogue of an exactly rounded merge (peftfx/rounding.py), fused into one pass over a block.
 *
 * torch runs it as a dozen passes (the weight added, a float32 image, its bit tests, the search for doubtful
 * entries, the conversion out), each reading and writing the whole block. Here each entry is read once:
 * v = product + weight; its rounding written to `out`; and for the entries whose rounding is in doubt (the test
 * of `_Grid.doubtful`, its parameters from `_Grid.test`) the flat index, v and the weight listed for
 * `_Job.settle`. A group's weights are read before its `out` is written, so `out` may be the weight. The GIL is
 * released: the out-of-core merge writes on another thread meanwhile.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

/* Compiled twice on x86-64, for AVX2 machines and for any, the loader picking one (GCC and clang): the wheel
 * stays portable, and the common machine runs the epilogue at twice the speed of baseline SSE2 code. */
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define VECTOR_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define VECTOR_CLONES
#endif

#define GROUP 64 /* entries tested together: doubtful ones are a few in a block, searched for only where present */

typedef struct {
  uint64_t mask, offset, span, small; /* doubtful: ((low bits - offset) & mask) < span, or magnitude < small */
} test;

typedef struct {
  uint32_t mask, offset, span, small;
} test32;

static inline uint64_t doubtful64(uint64_t bits, test t) {
  return (((bits - t.offset) & t.mask) < t.span) | ((bits & ~(1ull << 63)) < t.small);
}

static inline uint32_t doubtful32(uint32_t bits, test32 t) {
  return (((bits - t.offset) & t.mask) < t.span) | ((bits & ~(1u << 31)) < t.small);
}

static inline float bits_to_float(uint32_t u) {
  float f;
  memcpy(&f, &u, sizeof f);
  return f;
}

static inline uint32_t float_bits(float f) {
  uint32_t u;
  memcpy(&u, &f, sizeof u);
  return u;
}

static inline uint64_t double_bits(double d) {
  uint64_t u;
  memcpy(&u, &d, sizeof u);
  return u;
}

static inline double bf16_value(uint16_t h) { return (double)bits_to_float((uint32_t)h << 16); }

/* One group of a bfloat16 weight: each entry's rounding written (the float32 image rounded to nearest even, as
 * torch rounds it: NaN to 0x7FC0); nonzero where any entry is in doubt. `count` is GROUP but at a block's end, so
 * the loop is compiled for a constant trip count. */
static inline uint32_t group_bf16(const double *restrict r, const uint16_t *weight, uint16_t *restrict out,
                                  int count, test32 t) {
  uint32_t flag = 0;
  for (int i = 0; i < count; i++) {
    uint32_t b = float_bits((float)(r[i] + bf16_value(weight[i])));
    flag |= doubtful32(b, t);
    uint16_t rounded = (uint16_t)((b + 0x7FFFu + ((b >> 16) & 1u)) >> 16);
    out[i] = (b & 0x7FFFFFFFu) > 0x7F800000u ? (uint16_t)0x7FC0 : rounded;
  }
  return flag;
}

VECTOR_CLONES static Py_ssize_t block_bf16(const double *r, const uint16_t *w, uint16_t *out, Py_ssize_t n, test t,
                             int64_t *idx, double *value, uint16_t *wv) {
  const test32 t32 = {(uint32_t)t.mask, (uint32_t)t.offset, (uint32_t)t.span, (uint32_t)t.small};
  Py_ssize_t m = 0;
  for (Py_ssize_t start = 0; start < n; start += GROUP) {
    int count = n - start < GROUP ? (int)(n - start) : GROUP;
    uint16_t weight[GROUP]; /* read before `out`, which may be the weight, is written */
    memcpy(weight, w + start, (size_t)count * sizeof *w);
    uint32_t flag = count == GROUP ? group_bf16(r + start, weight, out + start, GROUP, t32)
                                   : group_bf16(r + start, weight, out + start, count, t32);
    for (int i = 0; flag && i < count; i++) {
      double v = r[start + i] + bf16_value(weight[i]);
      if (doubtful32(float_bits((float)v), t32)) {
        idx[m] = start + i;
        value[m] = v;
        wv[m++] = weight[i];
      }
    }
  }
  return m;
}

/* One group of a float32 weight: the test on the float64 bits, the rounding C's conversion (to nearest even). */
static inline uint64_t group_f32(const double *restrict r, const float *weight, float *restrict out, int count,
                                 test t) {
  uint64_t flag = 0;
  for (int i = 0; i < count; i++) {
    double v = r[i] + (double)weight[i];
    flag |= doubtful64(double_bits(v), t);
    out[i] = (float)v;
  }
  return flag;
}

VECTOR_CLONES static Py_ssize_t block_f32(const double *r, const float *w, float *out, Py_ssize_t n, test t, int64_t *idx,
                            double *value, float *wv) {
  Py_ssize_t m = 0;
  for (Py_ssize_t start = 0; start < n; start += GROUP) {
    int count = n - start < GROUP ? (int)(n - start) : GROUP;
    float weight[GROUP];
    memcpy(weight, w + start, (size_t)count * sizeof *w);
    uint64_t flag = count == GROUP ? group_f32(r + start, weight, out + start, GROUP, t)
                                   : group_f32(r + start, weight, out + start, count, t);
    for (int i = 0; flag && i < count; i++) {
      double v = r[start + i] + (double)weight[i];
      if (doubtful64(double_bits(v), t)) {
        idx[m] = start + i;
        value[m] = v;
        wv[m++] = weight[i];
      }
    }
  }
  return m;
}

static PyObject *round_block(PyObject *Py_UNUSED(self), PyObject *args) {
  unsigned long long r, w, out, idx, value, wv;
  Py_ssize_t n;
  int wide;
  test t;
  if (!PyArg_ParseTuple(args, "KKKnpKKKKKKK", &r, &w, &out, &n, &wide, &t.mask, &t.offset, &t.span, &t.small, &idx,
                        &value, &wv))
    return NULL;
  Py_ssize_t m;
  Py_BEGIN_ALLOW_THREADS;
  if (wide)
    m = block_f32((const double *)r, (const float *)w, (float *)out, n, t, (int64_t *)idx, (double *)value,
                  (float *)wv);
  else
    m = block_bf16((const double *)r, (const uint16_t *)w, (uint16_t *)out, n, t, (int64_t *)idx, (double *)value,
                   (uint16_t *)wv);
  Py_END_ALLOW_THREADS;
  return PyLong_FromSsize_t(m);
}

static PyMethodDef methods[] = {
    {"round_block", round_block, METH_VARARGS,
     "round_block(result, weight, out, n, wide, mask, offset, span, small, index, weights) -> entries in doubt"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_round", NULL, 0, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__round(void) { return PyModule_Create(&module); }
