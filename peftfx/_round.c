/* The epilogue of an exactly rounded merge (peftfx/rounding.py), fused into one pass over a block.
 *
 * torch runs it as a dozen passes (the weight added, a float32 image, its bit tests, the search for doubtful
 * entries, the conversion out), each reading and writing the whole block. Here each entry is read once:
 * v = product + weight; its rounding written to `out`; and for the entries whose rounding is in doubt (the test
 * of `_Grid.doubtful`, its parameters from `_Grid.test`) the flat index, v and the weight listed for
 * `_Job.settle`. `out` may be the weight: each loop is compiled for both cases (apart, or one array), and keeps
 * a doubtful entry's weight in `out` until it is listed. A bfloat16 weight's block may instead come as a float32
 * product (`round_from32`), tested against its own error bound. The GIL is released: the out-of-core merge writes
 * on another thread meanwhile.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <math.h>
#include <string.h>

/* Compiled three times on x86-64 Linux, for AVX-512 and AVX2 machines and for any, the dynamic loader picking one
 * (an ifunc: ELF only): the build stays portable, and the common machine runs the epilogue 1.4x as fast as baseline
 * SSE2 code (`round_from32`'s, hot in cache: 0.39 ns an entry with AVX-512, 0.59 with AVX2, 1.18 without). */
#if defined(__x86_64__) && defined(__linux__) && (defined(__GNUC__) || defined(__clang__))
#define VECTOR_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define VECTOR_CLONES
#endif

#define CHUNK 4096 /* entries a vectorised loop flags at a time (their flags stay in cache) */

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

static inline uint32_t bf16_rounded(uint32_t b) { return (b + 0x7FFFu + ((b >> 16) & 1u)) >> 16; }

/* A float32's bits as bfloat16's, rounded to nearest even, NaN as torch writes one at a time (0x7FC0). */
static inline uint16_t bf16_of(uint32_t b) {
  return (b & 0x7FFFFFFFu) > 0x7F800000u ? (uint16_t)0x7FC0 : (uint16_t)bf16_rounded(b);
}

/* A bfloat16 weight's entry: the float32 image of v = result + weight rounded to nearest even (as torch rounds it:
 * NaN to 0x7FC0), or where in doubt the weight kept, for the listing after the vectorised loop. */
static inline uint16_t entry_bf16(double r, uint16_t w, test32 t, uint8_t *flag) {
  uint32_t b = float_bits((float)(r + bf16_value(w)));
  *flag = (uint8_t)doubtful32(b, t);
  uint16_t rounded = bf16_of(b);
  return *flag ? w : rounded;
}

/* A float32 weight's: the test on the float64 bits, the rounding C's conversion (to nearest even). */
static inline float entry_f32(double r, float w, test t, uint8_t *flag) {
  double v = r + (double)w;
  uint32_t keep = (uint32_t)doubtful64(double_bits(v), t), rounded = float_bits((float)v);
  *flag = (uint8_t)keep;
  return bits_to_float(rounded ^ ((rounded ^ float_bits(w)) & (0u - keep))); /* a select, as integers: vectorised */
}

/* One loop per case, each vectorised: `out` apart from the weight, or the weight itself (`in_place`). */
static inline uint32_t chunk_bf16(const double *restrict r, const uint16_t *restrict w, uint16_t *restrict out,
                                  uint16_t *restrict in_place, uint8_t *restrict flags, Py_ssize_t n, test32 t) {
  uint32_t any = 0;
  if (in_place)
    for (Py_ssize_t i = 0; i < n; i++) {
      in_place[i] = entry_bf16(r[i], in_place[i], t, flags + i);
      any |= flags[i];
    }
  else
    for (Py_ssize_t i = 0; i < n; i++) {
      out[i] = entry_bf16(r[i], w[i], t, flags + i);
      any |= flags[i];
    }
  return any;
}

static inline uint32_t chunk_f32(const double *restrict r, const float *restrict w, float *restrict out,
                                 float *restrict in_place, uint8_t *restrict flags, Py_ssize_t n, test t) {
  uint32_t any = 0;
  if (in_place)
    for (Py_ssize_t i = 0; i < n; i++) {
      in_place[i] = entry_f32(r[i], in_place[i], t, flags + i);
      any |= flags[i];
    }
  else
    for (Py_ssize_t i = 0; i < n; i++) {
      out[i] = entry_f32(r[i], w[i], t, flags + i);
      any |= flags[i];
    }
  return any;
}

/* Where flagged (the weight in `out`): v listed with the weight, its rounding written. */
VECTOR_CLONES static Py_ssize_t block(const double *r, const void *w, void *out, Py_ssize_t n, int wide, test t,
                                      int64_t *idx, double *value, void *wv) {
  const test32 t32 = {(uint32_t)t.mask, (uint32_t)t.offset, (uint32_t)t.span, (uint32_t)t.small};
  uint8_t flags[CHUNK];
  Py_ssize_t m = 0;
  for (Py_ssize_t start = 0; start < n; start += CHUNK) {
    Py_ssize_t count = n - start < CHUNK ? n - start : CHUNK;
    uint32_t any;
    if (wide) {
      float *o = (float *)out + start;
      any = chunk_f32(r + start, (const float *)w + start, o, out == w ? o : NULL, flags, count, t);
    } else {
      uint16_t *o = (uint16_t *)out + start;
      any = chunk_bf16(r + start, (const uint16_t *)w + start, o, out == w ? o : NULL, flags, count, t32);
    }
    for (Py_ssize_t word = 0; any && word < count; word += 8) {
      uint64_t set;
      memcpy(&set, flags + word, sizeof set); /* CHUNK is a multiple of 8 */
      if (word + 8 > count) /* past `count`: an earlier chunk's flags */
        set &= (1ull << (8 * (count - word))) - 1;
      for (; set; set &= set - 1) {
        Py_ssize_t i = start + word + __builtin_ctzll(set) / 8;
        if (wide) {
          float weight = ((float *)out)[i];
          value[m] = r[i] + (double)weight;
          ((float *)out)[i] = (float)value[m];
          ((float *)wv)[m] = weight;
        } else {
          uint16_t weight = ((uint16_t *)out)[i];
          value[m] = r[i] + bf16_value(weight);
          uint32_t b = float_bits((float)value[m]);
          ((uint16_t *)out)[i] = bf16_of(b);
          ((uint16_t *)wv)[m] = weight;
        }
        idx[m++] = i;
      }
    }
  }
  return m;
}

/* A bfloat16 weight's block from a float32 product: p = fl32(L @ R), within gamma(k) sum|L||R| of the exact product
 * (float32's u, any order of summation), itself at most gamma(k) |L_i.| |R_.j| (Cauchy-Schwarz). v = w + s p and its
 * interval v +- e run in float32 too: e is the product's bound (a row's `coef` times a column's `right_norm`, each
 * rounded up), scaled, plus the float32 roundings that follow (of s, s p, v, e and the interval's ends: 2^-21 |v|)
 * and a `floor` for underflow (flushed or not; at least 6 2^-126, so an interval about a value below float32's
 * normal range holds zero, and its ends differ in sign). Where both ends round alike, so does the exact value
 * (rounding is monotonic): written. The others (a few in a thousand, and any end past bfloat16's largest value or
 * NaN) are recomputed in float64 from the float32 factors and tested as the float64 product's entries are, listed
 * for `settle` where still in doubt. */
typedef struct {
  const float *product, *coef, *right_norm;
  const uint16_t *weight;
  uint16_t *out;
  Py_ssize_t rows, cols, k;
  double s;
  float floor;
  const float *left, *right; /* the factors' rows and (transposed) columns, exact in float64 */
  test32 t;
} from32;

/* One entry's rounding, or (flagged) the weight's bits kept for the recomputation. */
static inline uint16_t entry_from32(float p, uint16_t w, float right_norm, float s, float coef, float floor,
                                    uint8_t *flag) {
  const uint32_t huge = 0x7F7F8000u; /* past it bfloat16 rounds to infinity; NaN is above: 0x7FC0, recomputed */
  float v = s * p + bits_to_float((uint32_t)w << 16);
  float e = coef * right_norm + (fabsf(v) * 0x1p-21f + floor);
  uint32_t lo = float_bits(v - e), hi = float_bits(v + e), rounded = bf16_rounded(hi);
  uint32_t low = lo & 0x7FFFFFFFu, high = hi & 0x7FFFFFFFu;
  *flag = (bf16_rounded(lo) != rounded) | (low >= huge) | (high >= huge);
  return *flag ? w : (uint16_t)rounded;
}

/* A row's entries, `out` apart from the weight or (`in_place`) the weight itself: two loops, each vectorised. */
static inline uint32_t row_from32(const float *restrict p, const uint16_t *restrict weight, uint16_t *restrict out,
                                  uint16_t *restrict in_place, uint8_t *restrict flags,
                                  const float *restrict right_norm, Py_ssize_t cols, float s, float coef,
                                  float floor) {
  uint32_t any = 0;
  if (in_place)
    for (Py_ssize_t j = 0; j < cols; j++) {
      in_place[j] = entry_from32(p[j], in_place[j], right_norm[j], s, coef, floor, flags + j);
      any |= flags[j];
    }
  else
    for (Py_ssize_t j = 0; j < cols; j++) {
      out[j] = entry_from32(p[j], weight[j], right_norm[j], s, coef, floor, flags + j);
      any |= flags[j];
    }
  return any;
}

/* The float64 product's test of one flagged entry (the weight's bits in `out`), recomputed from the float32 factors
 * (half the bytes of float64's to keep in cache; each product of two is exact in float64). */
static inline int recompute(const float *left, const float *column, Py_ssize_t k, double s, uint16_t *out,
                            test32 t, double *v) {
  double sum[4] = {0, 0, 0, 0}; /* any order: the error bound holds for all */
  Py_ssize_t q = 0;
  for (; q + 4 <= k; q += 4)
    for (int lane = 0; lane < 4; lane++)
      sum[lane] += (double)left[q + lane] * (double)column[q + lane];
  for (; q < k; q++)
    sum[0] += (double)left[q] * (double)column[q];
  *v = s * ((sum[0] + sum[1]) + (sum[2] + sum[3])) + bf16_value(*out);
  uint32_t bits = float_bits((float)*v);
  *out = bf16_of(bits);
  return (int)doubtful32(bits, t);
}

VECTOR_CLONES static Py_ssize_t block_from32(const from32 *b, uint8_t *flags, int64_t *idx, double *value,
                                             uint16_t *wv) {
  Py_ssize_t m = 0, cols = b->cols, k = b->k;
  const float s = (float)b->s;
  uint16_t *in_place = b->out == b->weight ? b->out : NULL;
  for (Py_ssize_t row = 0; row < b->rows; row++) {
    Py_ssize_t at = row * cols;
    if (!row_from32(b->product + at, b->weight + at, b->out + at, in_place ? in_place + at : NULL, flags,
                    b->right_norm, cols, s, b->coef[row], b->floor))
      continue;
    for (Py_ssize_t word = 0; word < cols; word += 8) {
      uint64_t set;
      memcpy(&set, flags + word, sizeof set); /* the buffer's bytes past `cols` are zero */
      for (; set; set &= set - 1) {
        Py_ssize_t j = word + __builtin_ctzll(set) / 8;
        uint16_t weight = b->out[at + j];
        double v;
        if (recompute(b->left + row * k, b->right + j * k, k, b->s, b->out + at + j, b->t, &v)) {
          idx[m] = at + j;
          value[m] = v;
          wv[m++] = weight;
        }
      }
    }
  }
  return m;
}

static inline double double_value(uint64_t u) {
  double d;
  memcpy(&d, &u, sizeof d);
  return d;
}

/* v rounded to the dtype whose values keep all but the lowest `dropped` bits of a float64's significand (45:
 * bfloat16, 29: float32), given |v - exact| <= tol; 0 where that does not decide it. Normal results only (the two
 * dtypes share float32's exponents): the rest go to `_Job.settle`. The interval may not reach the neighbouring
 * midpoints either (a quarter ulp away at least, below a power of two). */
static inline int round_within(double v, double tol, int dropped, double *rounded) {
  const uint64_t sign = 1ull << 63, tiny = 0x3810000000000000ull /* 2^-126 */, huge = 0x47F0000000000000ull;
  uint64_t b = double_bits(v), magnitude = b & ~sign;
  if (!(magnitude >= tiny && magnitude < huge)) /* 2^128: past it float32 has no values; NaN is above */
    return 0;
  uint64_t down = b & ~((1ull << dropped) - 1);
  double low = double_value(down), middle = double_value(down | (1ull << (dropped - 1)));
  double high = double_value(down + (1ull << dropped)), size = fabs(v), mid = fabs(middle);
  if (!(tol < (fabs(high) - fabs(low)) * 0.25))
    return 0;
  if (size - tol > mid)
    *rounded = high;
  else if (size + tol < mid)
    *rounded = low;
  else if (tol == 0 && size == mid) /* an exact tie: to the even neighbour */
    *rounded = (down >> dropped) & 1 ? high : low;
  else
    return 0;
  return 1;
}

/* The exponent of the largest power of two dividing x (a finite nonzero float64). */
static inline int64_t lowest_bit(double x) {
  uint64_t b = double_bits(x), field = (b >> 52) & 0x7FF, significand = (b & ((1ull << 52) - 1)) | (1ull << 52);
  return (int64_t)__builtin_ctzll(significand) + (int64_t)(field ? field : 1) - 1075;
}

/* The lowest bit of k terms (zeros impose nothing), read where an entry needs it: a few a weight. */
static inline int64_t lowest_of(const double *x, Py_ssize_t k) {
  int64_t low = 1 << 20;
  for (Py_ssize_t q = 0; q < k; q++)
    if (x[q] != 0 && lowest_bit(x[q]) < low)
      low = lowest_bit(x[q]);
  return low;
}

typedef struct {
  const double *left_max, *right_sum; /* per row of the weight: 2|s| max|L_i.|; per column: sum|R_.j| */
  const double *left, *columns;       /* the factors' rows and columns, k float64 each, for the proof below */
  Py_ssize_t k;
  int64_t log2_s;
  double bound;
  int exact; /* s is a power of two: an entry may be proven computed exactly */
} bounds;

/* The doubtful entries `_Job.settle` would settle with its error bound, or prove exact, settled here; the others
 * (and their results and weights) moved to the front of the lists: their count is returned. */
static Py_ssize_t settle(void *out, int wide, Py_ssize_t cols, Py_ssize_t n, int64_t *idx, double *value, void *wv,
                         const bounds *k) {
  Py_ssize_t m = 0;
  for (Py_ssize_t e = 0; e < n; e++) {
    Py_ssize_t i = idx[e] / cols, j = idx[e] % cols;
    double v = value[e], w = wide ? (double)((float *)wv)[e] : bf16_value(((uint16_t *)wv)[e]);
    double size = k->left_max[i] * k->right_sum[j], rounded;
    int dropped = wide ? 29 : 45, done = round_within(v, k->bound * (fabs(v) + size), dropped, &rounded);
    if (!done && k->exact) { /* every term a multiple of 2^low, their sum within float64's 53 bits above it */
      int64_t low = k->log2_s + lowest_of(k->left + i * k->k, k->k) + lowest_of(k->columns + j * k->k, k->k);
      if (w != 0 && lowest_bit(w) < low)
        low = lowest_bit(w);
      int top; /* 2^top > |w| + size */
      frexp(fabs(w) + size, &top);
      done = top - low <= 52 && low >= -1074 && round_within(v, 0.0, dropped, &rounded);
    }
    if (done) {
      if (wide)
        ((float *)out)[idx[e]] = (float)rounded;
      else
        ((uint16_t *)out)[idx[e]] = (uint16_t)(float_bits((float)rounded) >> 16);
    } else {
      idx[m] = idx[e];
      value[m] = v;
      if (wide)
        ((float *)wv)[m++] = (float)w;
      else
        ((uint16_t *)wv)[m++] = ((uint16_t *)wv)[e];
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
  m = block((const double *)r, (const void *)w, (void *)out, n, wide, t, (int64_t *)idx, (double *)value, (void *)wv);
  Py_END_ALLOW_THREADS;
  return PyLong_FromSsize_t(m);
}

static PyObject *settle_block(PyObject *Py_UNUSED(self), PyObject *args) {
  unsigned long long out, idx, value, wv, left_max, right_sum, left, columns;
  Py_ssize_t cols, n;
  int wide;
  bounds k;
  if (!PyArg_ParseTuple(args, "KpnnKKKKKKKnLdp", &out, &wide, &cols, &n, &idx, &value, &wv, &left_max, &right_sum,
                        &left, &columns, &k.k, &k.log2_s, &k.bound, &k.exact))
    return NULL;
  k.left_max = (const double *)left_max;
  k.right_sum = (const double *)right_sum;
  k.left = (const double *)left;
  k.columns = (const double *)columns;
  Py_ssize_t m;
  Py_BEGIN_ALLOW_THREADS;
  m = settle((void *)out, wide, cols, n, (int64_t *)idx, (double *)value, (void *)wv, &k);
  Py_END_ALLOW_THREADS;
  return PyLong_FromSsize_t(m);
}

static PyObject *round_from32(PyObject *Py_UNUSED(self), PyObject *args) {
  unsigned long long product, weight, out, coef, right_norm, left, right, idx, value, wv;
  from32 b;
  if (!PyArg_ParseTuple(args, "KKKnnndfKKKKIIIIKKK", &product, &weight, &out, &b.rows, &b.cols, &b.k, &b.s, &b.floor,
                        &coef, &right_norm, &left, &right, &b.t.mask, &b.t.offset, &b.t.span, &b.t.small, &idx,
                        &value, &wv))
    return NULL;
  b.product = (const float *)product;
  b.weight = (const uint16_t *)weight;
  b.out = (uint16_t *)out;
  b.coef = (const float *)coef;
  b.right_norm = (const float *)right_norm;
  b.left = (const float *)left;
  b.right = (const float *)right;
  uint8_t *flags = PyMem_RawCalloc((size_t)b.cols + 8, 1);
  if (!flags)
    return PyErr_NoMemory();
  Py_ssize_t m;
  Py_BEGIN_ALLOW_THREADS;
  m = block_from32(&b, flags, (int64_t *)idx, (double *)value, (uint16_t *)wv);
  Py_END_ALLOW_THREADS;
  PyMem_RawFree(flags);
  return PyLong_FromSsize_t(m);
}

static PyMethodDef methods[] = {
    {"round_block", round_block, METH_VARARGS,
     "round_block(result, weight, out, n, wide, mask, offset, span, small, index, values, weights)"
     " -> entries in doubt"},
    {"round_from32", round_from32, METH_VARARGS,
     "round_from32(product, weight, out, rows, cols, k, s, floor, coef, right_norm, left, right, mask, offset, span,"
     " small, index, values, weights) -> entries in doubt"},
    {"settle_block", settle_block, METH_VARARGS,
     "settle_block(out, wide, cols, n, index, values, weights, left_max, right_sum, left, columns, k, log2_s, bound,"
     " exact) -> entries left in doubt"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_round", NULL, 0, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__round(void) { return PyModule_Create(&module); }
