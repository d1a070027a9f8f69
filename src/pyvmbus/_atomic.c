/*
 * pyvmbus._atomic: sequentially consistent 32-bit atomics on a word of a Python buffer.
 *
 * Why C: the ring indices, the interrupt page and the monitor page are shared with the
 * host and with the kernel's own drivers.  Python has no atomic load/store/RMW on shared
 * memory and no fence; a numpy "|=" is a plain load + store and loses bits when two
 * writers race (measured: 311,300 of 600,000 increments kept).  The __atomic builtins
 * compile to the right instructions on x86-64 (mov / xchg / lock or / mfence) and on
 * arm64 (ldar / stlr / ldaddal-or-ldsetal / dmb ish), so nothing relies on x86 ordering.
 *
 * Every call checks that the word lies inside the buffer and is 4-byte aligned, so a
 * bad offset is a Python exception, never a stray access.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

static int
get_word(PyObject *obj, Py_ssize_t offset, int writable, Py_buffer *view, uint32_t **word)
{
    if (PyObject_GetBuffer(obj, view, writable ? PyBUF_WRITABLE : PyBUF_SIMPLE) < 0)
        return -1;
    if (offset < 0 || offset > view->len - 4) {
        PyErr_Format(PyExc_IndexError, "word at offset %zd is outside the buffer of %zd bytes",
                     offset, view->len);
        PyBuffer_Release(view);
        return -1;
    }
    char *p = (char *)view->buf + offset;
    if (((uintptr_t)p & 3u) != 0) {
        PyErr_Format(PyExc_ValueError, "word at offset %zd is not 4-byte aligned", offset);
        PyBuffer_Release(view);
        return -1;
    }
    *word = (uint32_t *)p;
    return 0;
}

static int
parse_u32(PyObject *obj, uint32_t *out)
{
    unsigned long v = PyLong_AsUnsignedLong(obj);
    if (v == (unsigned long)-1 && PyErr_Occurred())
        return -1;
    if (v > 0xFFFFFFFFul) {
        PyErr_SetString(PyExc_OverflowError, "value does not fit in 32 bits");
        return -1;
    }
    *out = (uint32_t)v;
    return 0;
}

/*
 * The common head of the three word operations: check the argument count, parse the
 * offset and (for writers, nvalues == 1) the u32 value, then pin the word.  Writers ask
 * for a writable buffer.  On success the caller holds *view and releases it right after
 * its atomic, so the buffer (an mmap, say) cannot go away while the atomic runs.
 */
static int
word_args(PyObject *const *args, Py_ssize_t nargs, int nvalues, const char *usage,
          Py_buffer *view, uint32_t **word, uint32_t *value)
{
    if (nargs != 2 + nvalues) {
        PyErr_SetString(PyExc_TypeError, usage);
        return -1;
    }
    Py_ssize_t off = PyLong_AsSsize_t(args[1]);
    if (off == -1 && PyErr_Occurred())
        return -1;
    if (nvalues && parse_u32(args[2], value) < 0)
        return -1;
    return get_word(args[0], off, nvalues, view, word);
}

static PyObject *
atomic_load32(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer view;
    uint32_t *w;
    if (word_args(args, nargs, 0, "load32(buf, offset)", &view, &w, NULL) < 0)
        return NULL;
    uint32_t v = __atomic_load_n(w, __ATOMIC_SEQ_CST);
    PyBuffer_Release(&view);
    return PyLong_FromUnsignedLong(v);
}

static PyObject *
atomic_store32(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer view;
    uint32_t *w, v;
    if (word_args(args, nargs, 1, "store32(buf, offset, value)", &view, &w, &v) < 0)
        return NULL;
    __atomic_store_n(w, v, __ATOMIC_SEQ_CST);
    PyBuffer_Release(&view);
    Py_RETURN_NONE;
}

static PyObject *
atomic_fetch_or32(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer view;
    uint32_t *w, v;
    if (word_args(args, nargs, 1, "fetch_or32(buf, offset, mask)", &view, &w, &v) < 0)
        return NULL;
    uint32_t old = __atomic_fetch_or(w, v, __ATOMIC_SEQ_CST);
    PyBuffer_Release(&view);
    return PyLong_FromUnsignedLong(old);
}

static PyObject *
atomic_fence(PyObject *self, PyObject *unused)
{
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"load32", (PyCFunction)(void (*)(void))atomic_load32, METH_FASTCALL,
     "load32(buf, offset) -> int: seq_cst load of the u32 at offset."},
    {"store32", (PyCFunction)(void (*)(void))atomic_store32, METH_FASTCALL,
     "store32(buf, offset, value): seq_cst store of a u32 at offset."},
    {"fetch_or32", (PyCFunction)(void (*)(void))atomic_fetch_or32, METH_FASTCALL,
     "fetch_or32(buf, offset, mask) -> int: atomic OR, returns the old value."},
    {"fence", atomic_fence, METH_NOARGS, "fence(): full (seq_cst) memory barrier."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "pyvmbus._atomic",
    "Sequentially consistent 32-bit atomics on buffers (see shm.py).", -1, methods,
};

PyMODINIT_FUNC
PyInit__atomic(void)
{
    return PyModule_Create(&module);
}
