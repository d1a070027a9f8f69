/*
 * pyvmbus._ring: the compiled fast path of pyvmbus.ring (optional, see docs/ring.md).
 *
 * Why C: at 64 B a packet costs ~750 ns in CPython, most of it bytecode and the
 * per-packet objects, not the copies (docs/performance.md).  This module does the
 * per-packet loops of ring.py: one in-band packet in or out, a batch in or out, and the
 * batch read into caller arrays (read_into) that makes no Python object per packet.
 *
 * Ring is the base class of ring.RingBuffer: write() and read() are called straight
 * into C (no Python frame on the hot path), the batch calls through RingBuffer's thin
 * Python wrappers.  An unattached Ring (the "python" engine, or after close) does
 * nothing itself.  Check is the base class of ring.HeaderCheck: its four per-request
 * calls (check_tx, check_rx, note_tx, note_rx) in C, the same way (see its section).
 *
 * ring.py stays the reference and the ONE source of the rules.  This code only ever
 * does the common case, with the same checks in the same order; on anything else it
 * hands the whole call back BEFORE it has touched the ring or the caller's objects:
 *
 *   - write / read call RingBuffer._write_py / _read_py with the same arguments, which
 *     raise the same RingCorrupt / RingFull / ValueError / TypeError with the same
 *     message (or handle the rare packet: extra headers, odd gather lists, range lists);
 *   - _write_batch / _read_batch / _read_into return NotImplemented, and the wrapper runs
 *     ring.py's code;
 *   - _read_batch / _read_into call RingBuffer._take (the Python general parser) for a
 *     packet they do not parse themselves, exactly where ring.py's read_batch calls it,
 *     and treat its RingCorrupt as ring.py does (end of batch, or raise if first).
 *
 * So this file raises no ring error of its own.  The differential fuzz
 * (tests/test_ring_engines.py) runs every operation on both engines and requires the
 * same ring bytes, results, signal decisions and exceptions.
 *
 * Memory ordering is ring.py's, with the kernel's reason beside every barrier.  Header
 * words are loaded and stored with __atomic builtins (seq_cst for the other side's
 * words, relaxed for our own index, which only we store).  Packet bytes are plain
 * memcpy; the descriptor is copied ONCE into locals and a compiler barrier keeps the
 * compiler from reading shared memory again in its place (a double fetch).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <stdint.h>
#include <string.h>

#if PY_BIG_ENDIAN
#error "VMBus rings are little-endian"
#endif

#define DESC 16u     /* struct vmpacket_descriptor */
#define TRAILER 8u   /* u64 old write_index << 32 */
#define MIN_PACKET (DESC + TRAILER)
#define MAX_PACKET (0xFFFFu * 8u)
#define W_WRITE 0
#define W_READ 1
#define W_MASK 2
#define W_PENDING 3
#define W_FEATURES 16
#define FEAT_PENDING_SEND_SZ 1u
#define RECORD_SIZE 32 /* ring.READ_RECORD: u16 type, u16 flags, u32 extra_len, u64 tid, u64 offset, u64 length */
#define MAX_GATHER 16

#define COMPILER_BARRIER() __asm__ __volatile__("" ::: "memory")

/* Slot offsets of Packet's seven fields and of RingBuffer.read_signal (bind()). */
static PyTypeObject *packet_type;
static Py_ssize_t pkt_off[7];
static PyTypeObject *ringbuffer_type;
static Py_ssize_t signal_off = -1;
static PyObject *ring_corrupt;
static PyObject *empty_bytes;

typedef struct {
    PyObject_HEAD
    Py_buffer view; /* pins the ring's memory while this object lives (or until close) */
    int pinned;
    int busy; /* calls in progress: _detach refuses meanwhile (their pointers stay valid) */
    uint32_t *hdr;
    uint8_t *data;
    uint32_t dsize;
} RingObject;

/* -- small helpers -------------------------------------------------------------------- */

static inline uint32_t load_acq(const uint32_t *w) { return __atomic_load_n(w, __ATOMIC_SEQ_CST); }
static inline uint32_t load_own(const uint32_t *w) { return __atomic_load_n(w, __ATOMIC_RELAXED); }

static inline int
bad_indices(uint32_t w, uint32_t r, uint32_t dsize)
{
    /* Indices from shared memory: in range and 8-aligned, or we could read or write
     * outside the data area (ring.py: _checked_indices / _bad_indices). */
    return w >= dsize || r >= dsize || ((w | r) & 7u);
}

/* Copy n bytes into the data area at pos, wrapping at the end (ring.py _put). */
static inline uint32_t
put(RingObject *rb, uint32_t pos, const void *src, size_t n)
{
    uint32_t dsize = rb->dsize;
    size_t first = dsize - pos;
    if (n < first) {
        memcpy(rb->data + pos, src, n);
        return pos + (uint32_t)n;
    }
    memcpy(rb->data + pos, src, first);
    memcpy(rb->data, (const uint8_t *)src + first, n - first);
    return (uint32_t)(n - first);
}

/* Copy n bytes out of the data area from pos, wrapping at the end (ring.py _get). */
static inline void
get(RingObject *rb, uint32_t pos, void *dst, size_t n)
{
    uint32_t dsize = rb->dsize;
    if (pos + n <= dsize) {
        memcpy(dst, rb->data + pos, n);
        return;
    }
    size_t first = dsize - pos;
    memcpy(dst, rb->data + pos, first);
    memcpy((uint8_t *)dst + first, rb->data, n - first);
}

typedef struct {
    uint16_t type, off8, len8, flags;
    uint64_t tid;
} desc_t;

/* The descriptor at pos, copied once into locals (ring.py: one unpack of shared memory). */
static inline void
get_desc(RingObject *rb, uint32_t pos, desc_t *d)
{
    uint8_t raw[DESC];
    get(rb, pos, raw, DESC);
    /* The host may rewrite the ring at any time: the fields below come from this one
     * copy, never from a second load the compiler might put in place of the local. */
    COMPILER_BARRIER();
    memcpy(&d->type, raw, 2);
    memcpy(&d->off8, raw + 2, 2);
    memcpy(&d->len8, raw + 4, 2);
    memcpy(&d->flags, raw + 6, 2);
    memcpy(&d->tid, raw + 8, 8);
}

/* The common packet ring.py's fast paths take inline: framed right, published, in band
 * (offset8 == 2, no extra header), not a range-list type.  The first four checks are
 * _take's (`not 2 <= off8 <= len8 or size + TRAILER > avail`), the last two choose
 * ring.py's inline path over _take.  A wrap is fine here: _take builds the same Packet. */
static inline int
common_packet(const desc_t *d, uint32_t avail)
{
    return d->off8 == 2 && d->len8 >= 2 && (uint32_t)d->len8 * 8u + TRAILER <= avail &&
           d->type != 7 && d->type != 9;
}

/* A genuine Packet, built the way packet.make_packet builds it (slots set directly). */
static PyObject *
make_packet(uint16_t type, uint16_t flags, uint64_t tid, PyObject *payload /* stolen */)
{
    PyObject *pkt = packet_type->tp_alloc(packet_type, 0);
    PyObject *t = PyLong_FromLong(type), *f = PyLong_FromLong(flags);
    PyObject *id = PyLong_FromUnsignedLongLong(tid);
    if (!pkt || !t || !f || !id) {
        Py_XDECREF(pkt), Py_XDECREF(t), Py_XDECREF(f), Py_XDECREF(id), Py_DECREF(payload);
        return NULL;
    }
    char *base = (char *)pkt;
    *(PyObject **)(base + pkt_off[0]) = t;
    *(PyObject **)(base + pkt_off[1]) = f;
    *(PyObject **)(base + pkt_off[2]) = id;
    *(PyObject **)(base + pkt_off[3]) = payload;
    *(PyObject **)(base + pkt_off[4]) = Py_NewRef(empty_bytes);
    *(PyObject **)(base + pkt_off[5]) = Py_NewRef(Py_None);
    *(PyObject **)(base + pkt_off[6]) = Py_NewRef(Py_None);
    return pkt;
}

static void
set_read_signal(PyObject *owner, int signal)
{
    PyObject **slot = (PyObject **)((char *)owner + signal_off);
    PyObject *old = *slot;
    *slot = Py_NewRef(signal ? Py_True : Py_False);
    Py_XDECREF(old);
}

/* The end of hv_pkt_iter_close for a non-zero pending_send_sz (ring.py _pending_signal). */
static int
pending_signal(RingObject *rb, uint32_t new_r, uint32_t bytes_read, uint32_t pending)
{
    /* virt_rmb() "read of write_index after the read of pending_send_sz": both loads are
     * seq_cst, so they happen in program order. */
    uint32_t w = load_acq(&rb->hdr[W_WRITE]);
    /* hv_get_bytes_to_write with the read index we just stored, u32 arithmetic as in the
     * kernel (a garbage write index gives a harmless wrong answer: already consumed). */
    uint32_t curr = w >= new_r ? (uint32_t)(rb->dsize - (w - new_r)) : (uint32_t)(new_r - w);
    /* Only the transition "not enough" -> "enough" free space. */
    if ((uint32_t)(curr - bytes_read) > pending)
        return 0;
    return curr > pending;
}

/* Store the new read index, then the signal decision (ring.py _commit). */
static int
commit(RingObject *rb, uint32_t new_r, uint32_t bytes_read)
{
    /* hv_pkt_iter_close: virt_rmb() "all reads are done before we update the read index
     * since the writer may start writing to the read area once it is updated": prior
     * loads (our memcpy out) -> this store.  A seq_cst store is at least a release store
     * (x86-64 xchg, arm64 stlr), which orders every earlier load and store of this thread
     * before it, and no compiler moves the memcpy past it.  No separate fence. */
    __atomic_store_n(&rb->hdr[W_READ], new_r, __ATOMIC_SEQ_CST);
    /* "Older versions of Hyper-V ... do not implement pending_send_sz": the feature bit
     * of THIS ring's header. */
    if (!(load_own(&rb->hdr[W_FEATURES]) & FEAT_PENDING_SEND_SZ))
        return 0;
    /* virt_mb(): store read_index -> load pending_send_sz.  Reordered, a writer that sets
     * pending_send_sz after our load and blocks before our store is never woken. */
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    uint32_t pending = load_acq(&rb->hdr[W_PENDING]);
    if (!pending)
        return 0; /* the common case: the writer is not blocked */
    return pending_signal(rb, new_r, bytes_read, pending);
}

/* Store the new write index, then the signal decision (ring.py _publish). */
static int
publish(RingObject *rb, uint32_t old_w, uint32_t new_w)
{
    /* hv_ringbuffer_write: virt_mb() "before updating the write index": the packet and
     * trailer visible before the index that hands them over.  Prior stores (our memcpy
     * in) -> this store: a seq_cst store is at least release on every target, so no
     * separate fence (as in ring.py). */
    __atomic_store_n(&rb->hdr[W_WRITE], new_w, __ATOMIC_SEQ_CST);
    /* hv_signal_on_write: virt_mb().  Store -> load: the reader stores its mask / read
     * index and then loads our write index; without a full fence between our store and
     * our loads both sides could miss each other and the reader would sleep. */
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    if (load_acq(&rb->hdr[W_MASK]))
        return 0; /* the reader is draining and will see the packet */
    /* virt_rmb() "check interrupt_mask before read_index": seq_cst loads keep program
     * order.  Signal only on empty -> non-empty (Hyper-V throttles other signals). */
    return load_acq(&rb->hdr[W_READ]) == old_w;
}

/* A descriptor field as struct would pack it; 0 = not representable (let Python raise). */
static int
field(PyObject *o, unsigned long long max, uint64_t *out)
{
    if (!PyLong_Check(o))
        return 0; /* __index__ objects and the rest: ring.py's struct decides */
    unsigned long long v = PyLong_AsUnsignedLongLong(o);
    if (v == (unsigned long long)-1 && PyErr_Occurred()) {
        PyErr_Clear();
        return 0;
    }
    if (v > max)
        return 0;
    *out = v;
    return 1;
}

/* -- Ring ----------------------------------------------------------------------------- */

/* _attach(buf, header_size): pin the ring's memory and take the fast path from now on. */
static PyObject *
Ring_attach(RingObject *self, PyObject *args)
{
    PyObject *buf;
    Py_ssize_t header_size;
    if (!PyArg_ParseTuple(args, "On", &buf, &header_size))
        return NULL;
    if (!ringbuffer_type || !PyObject_TypeCheck(self, ringbuffer_type)) {
        PyErr_SetString(PyExc_TypeError, "only a pyvmbus.ring.RingBuffer attaches a ring");
        return NULL;
    }
    if (self->pinned) {
        PyErr_SetString(PyExc_ValueError, "ring is already attached");
        return NULL;
    }
    if (PyObject_GetBuffer(buf, &self->view, PyBUF_WRITABLE) < 0)
        return NULL;
    Py_ssize_t dsize = self->view.len - header_size;
    if (header_size < 72 || header_size % 8 || dsize <= 0 || dsize % 8 || dsize > 0xFFFFFFFFLL ||
        ((uintptr_t)self->view.buf & 3u)) {
        PyBuffer_Release(&self->view);
        PyErr_SetString(PyExc_ValueError, "bad ring geometry (RingBuffer checks it first)");
        return NULL;
    }
    self->pinned = 1;
    self->hdr = (uint32_t *)self->view.buf;
    self->data = (uint8_t *)self->view.buf + header_size;
    self->dsize = (uint32_t)dsize;
    Py_RETURN_NONE;
}

/* _detach(): release the pin (RingBuffer.close); the Python engine takes over. */
static PyObject *
Ring_detach(RingObject *self, PyObject *unused)
{
    if (self->busy) {
        /* Another thread is inside a read or write of this ring (it let go of the GIL in
         * Python code it called): its pointers into the ring must stay valid. */
        PyErr_SetString(PyExc_BufferError, "the ring is in use by a read or write in another thread");
        return NULL;
    }
    if (self->pinned) {
        self->pinned = 0;
        PyBuffer_Release(&self->view);
    }
    Py_RETURN_NONE;
}

static void
Ring_dealloc(RingObject *self)
{
    if (self->pinned)
        PyBuffer_Release(&self->view);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* The payload of write(): one buffer, or a list/tuple of up to MAX_GATHER buffers. */
typedef struct {
    Py_buffer parts[MAX_GATHER];
    int nparts;
    size_t n;
} gather_t;

static void
gather_release(gather_t *g)
{
    for (int i = 0; i < g->nparts; i++)
        PyBuffer_Release(&g->parts[i]);
    g->nparts = 0;
}

/* 1 if we hold every part; 0 (no error set) to let ring.py decide (TypeError etc.). */
static int
gather(PyObject *payload, gather_t *g)
{
    g->nparts = 0;
    g->n = 0;
    if (PyList_CheckExact(payload) || PyTuple_CheckExact(payload)) {
        Py_ssize_t k = PySequence_Fast_GET_SIZE(payload);
        if (k > MAX_GATHER)
            return 0;
        PyObject **items = PySequence_Fast_ITEMS(payload);
        for (Py_ssize_t i = 0; i < k; i++) {
            /* A nested list/tuple is not a buffer: ring.py raises TypeError for it. */
            if (PyObject_GetBuffer(items[i], &g->parts[g->nparts], PyBUF_SIMPLE) < 0) {
                PyErr_Clear();
                gather_release(g);
                return 0;
            }
            g->n += (size_t)g->parts[g->nparts++].len;
        }
        return 1;
    }
    if (PyObject_GetBuffer(payload, &g->parts[0], PyBUF_SIMPLE) < 0) {
        PyErr_Clear();
        return 0;
    }
    g->nparts = 1;
    g->n = (size_t)g->parts[0].len;
    return 1;
}

/* Descriptor, payload parts, zero padding and trailer of an in-band packet at pos. */
static inline uint32_t
put_packet(RingObject *rb, uint32_t pos, uint16_t type, uint16_t flags, uint64_t tid,
           const Py_buffer *parts, int nparts, const char *one, size_t n)
{
    uint32_t size = (uint32_t)((DESC + n + 7u) & ~(size_t)7u);
    uint32_t start = pos;
    uint8_t raw[DESC];
    uint16_t off8 = 2, len8 = (uint16_t)(size >> 3);
    memcpy(raw, &type, 2);
    memcpy(raw + 2, &off8, 2);
    memcpy(raw + 4, &len8, 2);
    memcpy(raw + 6, &flags, 2);
    memcpy(raw + 8, &tid, 8);
    if (pos + size + TRAILER <= rb->dsize) { /* no wrap: in place */
        uint8_t *p = rb->data + pos;
        memcpy(p, raw, DESC);
        p += DESC;
        if (one) {
            memcpy(p, one, n);
            p += n;
        } else {
            for (int i = 0; i < nparts; i++) {
                memcpy(p, parts[i].buf, (size_t)parts[i].len);
                p += parts[i].len;
            }
        }
        size_t pad = size - DESC - n;
        memset(p, 0, pad);
        /* Trailer: hv_get_ring_bufferindices, the packet's start index << 32. */
        uint64_t trailer = (uint64_t)start << 32;
        memcpy(p + pad, &trailer, TRAILER);
        pos += size + TRAILER;
        return pos == rb->dsize ? 0 : pos;
    }
    /* The packet crosses the end of the data area: split each copy (ring.py _put). */
    static const uint8_t zeros[8];
    pos = put(rb, pos, raw, DESC);
    if (one) {
        pos = put(rb, pos, one, n);
    } else {
        for (int i = 0; i < nparts; i++)
            pos = put(rb, pos, parts[i].buf, (size_t)parts[i].len);
    }
    pos = put(rb, pos, zeros, size - DESC - n);
    uint64_t trailer = (uint64_t)start << 32;
    return put(rb, pos, &trailer, TRAILER);
}

static PyObject *str_write_py, *str_read_py;

/* The same call, handed to ring.py: RingBuffer._write_py(*args, **kwargs). */
static PyObject *
write_py(RingObject *self, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    Py_ssize_t nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
    PyObject *small[1 + 8];
    PyObject **stack = small;
    if (nargs + nkw > 8) { /* a wrong call: ring.py words the TypeError */
        stack = PyMem_Malloc(sizeof(PyObject *) * (size_t)(1 + nargs + nkw));
        if (!stack)
            return PyErr_NoMemory();
    }
    stack[0] = (PyObject *)self;
    for (Py_ssize_t i = 0; i < nargs + nkw; i++)
        stack[1 + i] = args[i];
    PyObject *res = PyObject_VectorcallMethod(str_write_py, stack, (size_t)(1 + nargs), kwnames);
    if (stack != small)
        PyMem_Free(stack);
    return res;
}

/* write(payload, type=6, flags=0, transaction_id=0, *, extra_header=b"") */
static PyObject *
Ring_write_impl(RingObject *self, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    /* Only the plain positional call (the hot path) is done here; keywords, defaults
     * and every error go to ring.py, which parses them as Python does. */
    if (!self->pinned || kwnames || nargs < 1 || nargs > 4)
        return write_py(self, args, nargsf, kwnames);
    uint64_t type = 6, flags = 0, tid = 0;
    if ((nargs > 1 && !field(args[1], 0xFFFF, &type)) || (nargs > 2 && !field(args[2], 0xFFFF, &flags)) ||
        (nargs > 3 && !field(args[3], UINT64_MAX, &tid)))
        return write_py(self, args, nargsf, kwnames); /* ring.py raises its ValueError */
    gather_t g;
    if (!gather(args[0], &g))
        return write_py(self, args, nargsf, kwnames);
    size_t size = (DESC + g.n + 7u) & ~(size_t)7u; /* len8 * 8 */
    uint32_t dsize = self->dsize;
    /* Our own index: only this writer stores it. */
    uint32_t w = load_own(&self->hdr[W_WRITE]);
    /* hv_get_bytes_to_write: READ_ONCE(read_index); seq_cst includes acquire: the
     * reader's copies out of the space it frees happen before our copies into it. */
    uint32_t r = load_acq(&self->hdr[W_READ]);
    size_t need = size + TRAILER;
    uint32_t avail = w >= r ? dsize - w + r : r - w;
    /* ring.py's order: size limit, bad indices, then "only room for the packet: full". */
    if (size > MAX_PACKET || bad_indices(w, r, dsize) || avail <= need) {
        gather_release(&g);
        return write_py(self, args, nargsf, kwnames);
    }
    uint32_t end = put_packet(self, w, (uint16_t)type, (uint16_t)flags, tid, g.parts, g.nparts,
                              NULL, g.n);
    gather_release(&g);
    return PyBool_FromLong(publish(self, w, end));
}

static PyObject *
Ring_write_batch_impl(RingObject *self, PyObject *specs)
{
    if (!self->pinned)
        Py_RETURN_NOTIMPLEMENTED;
    if (!PyTuple_CheckExact(specs)) {
        PyErr_SetString(PyExc_TypeError, "write_batch(specs): a tuple of (payload, type, flags, id)");
        return NULL;
    }
    Py_ssize_t count = PyTuple_GET_SIZE(specs);
    if (count == 0)
        Py_RETURN_FALSE; /* ring.py: nothing to write, no signal */
    /* Pass 1: every spec is a 4-tuple of a buffer and representable fields, sized all
     * or nothing (ring.py write_batch); anything else goes back to ring.py untouched. */
    Py_buffer *views = PyMem_Malloc(sizeof(Py_buffer) * (size_t)count);
    if (!views)
        return PyErr_NoMemory();
    Py_ssize_t held = 0;
    size_t total = 0;
    int ok = 1;
    for (Py_ssize_t i = 0; i < count && ok; i++) {
        PyObject *spec = PyTuple_GET_ITEM(specs, i);
        uint64_t v;
        if (!PyTuple_CheckExact(spec) || PyTuple_GET_SIZE(spec) != 4 ||
            !field(PyTuple_GET_ITEM(spec, 1), 0xFFFF, &v) ||
            !field(PyTuple_GET_ITEM(spec, 2), 0xFFFF, &v) ||
            !field(PyTuple_GET_ITEM(spec, 3), UINT64_MAX, &v)) {
            ok = 0;
            break;
        }
        PyObject *payload = PyTuple_GET_ITEM(spec, 0);
        if (PyList_Check(payload) || PyTuple_Check(payload) ||
            PyObject_GetBuffer(payload, &views[i], PyBUF_SIMPLE) < 0) {
            PyErr_Clear();
            ok = 0;
            break;
        }
        held = i + 1;
        size_t size = (DESC + (size_t)views[i].len + 7u) & ~(size_t)7u;
        if (size > MAX_PACKET)
            ok = 0;
        total += size + TRAILER;
    }
    PyObject *res = NULL;
    if (ok) {
        uint32_t dsize = self->dsize;
        uint32_t w = load_own(&self->hdr[W_WRITE]);  /* our own index (see write) */
        uint32_t r = load_acq(&self->hdr[W_READ]);   /* acquire (see write) */
        uint32_t avail = w >= r ? dsize - w + r : r - w;
        /* Packet k fits after packets 0..k-1 iff avail > their total: the last is the test. */
        if (bad_indices(w, r, dsize) || avail <= total) {
            ok = 0;
        } else {
            uint32_t pos = w;
            for (Py_ssize_t i = 0; i < count; i++) {
                PyObject *spec = PyTuple_GET_ITEM(specs, i);
                uint16_t type = (uint16_t)PyLong_AsUnsignedLong(PyTuple_GET_ITEM(spec, 1));
                uint16_t flags = (uint16_t)PyLong_AsUnsignedLong(PyTuple_GET_ITEM(spec, 2));
                uint64_t tid = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(spec, 3));
                pos = put_packet(self, pos, type, flags, tid, NULL, 0, views[i].buf,
                                 (size_t)views[i].len);
            }
            res = PyBool_FromLong(publish(self, w, pos));
        }
    }
    for (Py_ssize_t i = 0; i < held; i++)
        PyBuffer_Release(&views[i]);
    PyMem_Free(views);
    if (!ok)
        Py_RETURN_NOTIMPLEMENTED;
    return res;
}

/* _write_from(data, records): RingBuffer.write_from's packets (the same layout as
 * read_into's), or NotImplemented for ring.py to raise what is wrong. */
static PyObject *
Ring_write_from_impl(RingObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "_write_from(data, records)");
        return NULL;
    }
    if (!self->pinned)
        Py_RETURN_NOTIMPLEMENTED;
    Py_buffer data, recs;
    if (PyObject_GetBuffer(args[0], &data, PyBUF_SIMPLE) < 0)
        return NULL;
    if (PyObject_GetBuffer(args[1], &recs, PyBUF_SIMPLE) < 0) {
        PyBuffer_Release(&data);
        return NULL;
    }
    PyObject *res = Py_NewRef(Py_NotImplemented);
    Py_ssize_t count = recs.len / RECORD_SIZE;
    const uint8_t *rec = recs.buf;
    size_t total = 0;
    /* Pass 1, ring.py's checks in its order: inside data, extra_len % 8, the size limit. */
    for (Py_ssize_t i = 0; i < count; i++) {
        const uint8_t *r = rec + (size_t)i * RECORD_SIZE;
        uint32_t extra_len;
        uint64_t offset, length;
        memcpy(&extra_len, r + 4, 4);
        memcpy(&offset, r + 16, 8);
        memcpy(&length, r + 24, 8);
        if (offset > (uint64_t)data.len || extra_len > (uint64_t)data.len - offset ||
            length > (uint64_t)data.len - offset - extra_len || (extra_len & 7u))
            goto done;
        uint64_t size = (DESC + (uint64_t)extra_len + length + 7u) & ~(uint64_t)7u;
        if (size > MAX_PACKET)
            goto done;
        total += (size_t)size + TRAILER;
    }
    if (!count) {
        Py_SETREF(res, Py_NewRef(Py_False)); /* ring.py: nothing to write, no signal */
        goto done;
    }
    uint32_t dsize = self->dsize;
    uint32_t w = load_own(&self->hdr[W_WRITE]); /* our own index (see write) */
    uint32_t r = load_acq(&self->hdr[W_READ]);  /* acquire (see write) */
    uint32_t avail = w >= r ? dsize - w + r : r - w;
    /* Packet k fits after packets 0..k-1 iff avail > their total: the last is the test. */
    if (bad_indices(w, r, dsize) || avail <= total)
        goto done;
    uint32_t pos = w;
    static const uint8_t zeros[8];
    for (Py_ssize_t i = 0; i < count; i++) {
        const uint8_t *rr = rec + (size_t)i * RECORD_SIZE;
        uint16_t type, flags, off8, len8;
        uint32_t extra_len;
        uint64_t tid, offset, length;
        memcpy(&type, rr, 2);
        memcpy(&flags, rr + 2, 2);
        memcpy(&extra_len, rr + 4, 4);
        memcpy(&tid, rr + 8, 8);
        memcpy(&offset, rr + 16, 8);
        memcpy(&length, rr + 24, 8);
        uint32_t hlen = DESC + extra_len;
        uint32_t size = (uint32_t)((hlen + length + 7u) & ~(uint64_t)7u);
        uint8_t raw[DESC];
        off8 = (uint16_t)(hlen >> 3);
        len8 = (uint16_t)(size >> 3);
        memcpy(raw, &type, 2);
        memcpy(raw + 2, &off8, 2);
        memcpy(raw + 4, &len8, 2);
        memcpy(raw + 6, &flags, 2);
        memcpy(raw + 8, &tid, 8);
        uint32_t start = pos;
        pos = put(self, pos, raw, DESC);
        pos = put(self, pos, (const uint8_t *)data.buf + offset, extra_len + length);
        pos = put(self, pos, zeros, size - hlen - length);
        /* Trailer: hv_get_ring_bufferindices, the packet's start index << 32. */
        uint64_t trailer = (uint64_t)start << 32;
        pos = put(self, pos, &trailer, TRAILER);
    }
    Py_SETREF(res, PyBool_FromLong(publish(self, w, pos)));
done:
    PyBuffer_Release(&recs);
    PyBuffer_Release(&data);
    return res;
}

/* A new bytes object with n bytes of the data area from pos (the one copy out). */
static PyObject *
copy_out(RingObject *rb, uint32_t pos, uint32_t n)
{
    PyObject *b = PyBytes_FromStringAndSize(NULL, n);
    if (b)
        get(rb, pos, PyBytes_AS_STRING(b), n);
    return b;
}

static inline uint32_t
advance(uint32_t pos, uint32_t n, uint32_t dsize)
{
    uint64_t p = (uint64_t)pos + n;
    return (uint32_t)(p >= dsize ? p - dsize : p);
}

static PyObject *
Ring_read_impl(RingObject *self, PyObject *unused)
{
    PyObject *owner = (PyObject *)self;
    if (!self->pinned)
        return PyObject_CallMethodNoArgs(owner, str_read_py);
    uint32_t dsize = self->dsize;
    /* hv_pkt_iter_avail: virt_load_acquire(write_index), read ONCE; the writer's packet
     * bytes are visible once its index is.  Loads of them come after this. */
    uint32_t w = load_acq(&self->hdr[W_WRITE]);
    uint32_t r = load_own(&self->hdr[W_READ]); /* our own, but shared: checked below */
    if (bad_indices(w, r, dsize))
        return PyObject_CallMethodNoArgs(owner, str_read_py); /* it raises RingCorrupt */
    if (w == r) {
        set_read_signal(owner, 0);
        Py_RETURN_NONE;
    }
    uint32_t avail = w > r ? w - r : dsize - r + w;
    if (avail < MIN_PACKET)
        return PyObject_CallMethodNoArgs(owner, str_read_py);
    desc_t d;
    get_desc(self, r, &d);
    if (!common_packet(&d, avail)) /* an extra header, a range list, or an error: ring.py */
        return PyObject_CallMethodNoArgs(owner, str_read_py);
    uint32_t size = (uint32_t)d.len8 << 3;
    PyObject *payload = copy_out(self, advance(r, DESC, dsize), size - DESC);
    if (!payload)
        return NULL;
    PyObject *pkt = make_packet(d.type, d.flags, d.tid, payload);
    if (!pkt)
        return NULL;
    set_read_signal(owner, commit(self, advance(r, size + TRAILER, dsize), size + TRAILER));
    return pkt;
}

/* ring.py's _take(pos, avail, w) for a packet the C walk does not parse: (pkt, used) or
 * NULL with the exception set. */
static PyObject *
call_take(PyObject *owner, uint32_t pos, uint32_t avail, uint32_t w, uint32_t *used)
{
    PyObject *res = PyObject_CallMethod(owner, "_take", "kkk", (unsigned long)pos, (unsigned long)avail,
                                        (unsigned long)w);
    if (!res)
        return NULL;
    unsigned long u;
    if (!PyTuple_Check(res) || PyTuple_GET_SIZE(res) != 2 ||
        ((u = PyLong_AsUnsignedLong(PyTuple_GET_ITEM(res, 1))) == (unsigned long)-1 && PyErr_Occurred())) {
        Py_DECREF(res);
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_TypeError, "_take must return (packet, used)");
        return NULL;
    }
    *used = (uint32_t)u;
    PyObject *pkt = Py_NewRef(PyTuple_GET_ITEM(res, 0));
    Py_DECREF(res);
    /* The call ran Python code, which may have let another thread close the ring (and
     * unmap its memory): stop before the walk touches it again. */
    if (!((RingObject *)owner)->pinned) {
        Py_DECREF(pkt);
        PyErr_SetString(PyExc_ValueError, "the ring was closed during the read");
        return NULL;
    }
    return pkt;
}

/* The take path's error rule (ring.py read_batch): a malformed packet after good ones
 * ends the batch (it raises on the next call), a malformed first packet raises. */
static int
batch_ends(Py_ssize_t done)
{
    if (done && PyErr_ExceptionMatches(ring_corrupt)) {
        PyErr_Clear();
        return 1;
    }
    return 0;
}

static PyObject *
Ring_read_batch_impl(RingObject *self, PyObject *arg)
{
    if (!self->pinned)
        Py_RETURN_NOTIMPLEMENTED;
    Py_ssize_t max_count = PyLong_AsSsize_t(arg);
    if (max_count == -1 && PyErr_Occurred())
        return NULL;
    PyObject *owner = (PyObject *)self;
    uint32_t dsize = self->dsize;
    uint32_t w = load_acq(&self->hdr[W_WRITE]); /* acquire, read once for the whole batch */
    uint32_t r = load_own(&self->hdr[W_READ]);
    if (bad_indices(w, r, dsize))
        Py_RETURN_NOTIMPLEMENTED; /* shared memory: check before use; ring.py raises */
    uint32_t avail = w >= r ? w - r : dsize - r + w;
    uint32_t total = avail;
    PyObject *packets = PyList_New(0);
    if (!packets)
        return NULL;
    uint32_t pos = r;
    for (Py_ssize_t i = 0; i < max_count; i++) {
        PyObject *pkt;
        uint32_t used;
        desc_t d;
        if (avail < MIN_PACKET) {
            if (!avail)
                break;
        } else {
            get_desc(self, pos, &d);
            if (common_packet(&d, avail)) {
                uint32_t size = (uint32_t)d.len8 << 3;
                PyObject *payload = copy_out(self, advance(pos, DESC, dsize), size - DESC);
                if (!payload || !(pkt = make_packet(d.type, d.flags, d.tid, payload)))
                    goto error;
                used = size + TRAILER;
                goto append;
            }
        }
        pkt = call_take(owner, pos, avail, w, &used);
        if (!pkt) {
            if (batch_ends(PyList_GET_SIZE(packets)))
                break;
            goto error;
        }
    append:
        if (PyList_Append(packets, pkt) < 0) {
            Py_DECREF(pkt);
            goto error;
        }
        Py_DECREF(pkt);
        pos = advance(pos, used, dsize);
        avail -= used;
    }
    int signal = 0;
    if (PyList_GET_SIZE(packets))
        signal = commit(self, pos, total - avail);
    set_read_signal(owner, signal);
    return Py_BuildValue("(NO)", packets, signal ? Py_True : Py_False);
error:
    Py_DECREF(packets);
    return NULL;
}

/* Packet fields for read_into's take path. */
static int
packet_bytes(PyObject *pkt, Py_buffer *extra, Py_buffer *payload, uint64_t rec[3])
{
    PyObject *vals[5];
    static const char *names[5] = {"type", "flags", "transaction_id", "extra_header", "payload"};
    for (int i = 0; i < 5; i++)
        vals[i] = NULL;
    int ok = 1;
    for (int i = 0; i < 5 && ok; i++)
        ok = (vals[i] = PyObject_GetAttrString(pkt, names[i])) != NULL;
    for (int i = 0; i < 3 && ok; i++) {
        rec[i] = PyLong_AsUnsignedLongLong(vals[i]);
        ok = !PyErr_Occurred();
    }
    if (ok && PyObject_GetBuffer(vals[3], extra, PyBUF_SIMPLE) < 0)
        ok = 0;
    if (ok && PyObject_GetBuffer(vals[4], payload, PyBUF_SIMPLE) < 0) {
        PyBuffer_Release(extra);
        ok = 0;
    }
    for (int i = 0; i < 5; i++)
        Py_XDECREF(vals[i]);
    return ok;
}

static void
put_record(uint8_t *rec, uint16_t type, uint16_t flags, uint32_t extra_len, uint64_t tid,
           uint64_t offset, uint64_t length)
{
    memcpy(rec, &type, 2);
    memcpy(rec + 2, &flags, 2);
    memcpy(rec + 4, &extra_len, 4);
    memcpy(rec + 8, &tid, 8);
    memcpy(rec + 16, &offset, 8);
    memcpy(rec + 24, &length, 8);
}

static PyObject *
Ring_read_into_impl(RingObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "_read_into(out, records)");
        return NULL;
    }
    if (!self->pinned)
        Py_RETURN_NOTIMPLEMENTED;
    PyObject *owner = (PyObject *)self;
    Py_buffer out, recs;
    if (PyObject_GetBuffer(args[0], &out, PyBUF_WRITABLE) < 0)
        return NULL;
    if (PyObject_GetBuffer(args[1], &recs, PyBUF_WRITABLE) < 0) {
        PyBuffer_Release(&out);
        return NULL;
    }
    Py_ssize_t cap = recs.len / RECORD_SIZE;
    uint8_t *o = out.buf, *rec = recs.buf;
    size_t room = (size_t)out.len, filled = 0;
    PyObject *res = NULL;
    uint32_t dsize = self->dsize;
    uint32_t w = load_acq(&self->hdr[W_WRITE]); /* acquire, read once for the whole batch */
    uint32_t r = load_own(&self->hdr[W_READ]);
    if (bad_indices(w, r, dsize)) {
        res = Py_NewRef(Py_NotImplemented); /* ring.py raises RingCorrupt */
        goto done;
    }
    uint32_t avail = w >= r ? w - r : dsize - r + w, total = avail, pos = r;
    Py_ssize_t count = 0;
    while (count < cap) {
        desc_t d;
        uint32_t used;
        if (avail < MIN_PACKET) {
            if (!avail)
                break;
        } else {
            get_desc(self, pos, &d);
            if (common_packet(&d, avail)) {
                uint32_t n = ((uint32_t)d.len8 << 3) - DESC;
                if (n > room - filled) {
                    if (!count) {
                        res = Py_NewRef(Py_NotImplemented); /* ring.py raises ValueError */
                        goto done;
                    }
                    break; /* the next call delivers it */
                }
                get(self, advance(pos, DESC, dsize), o + filled, n);
                put_record(rec + (size_t)count * RECORD_SIZE, d.type, d.flags, 0, d.tid, filled, n);
                filled += n;
                used = n + DESC + TRAILER;
                goto next;
            }
        }
        PyObject *pkt = call_take(owner, pos, avail, w, &used);
        if (!pkt) {
            if (batch_ends(count))
                break;
            goto done;
        }
        Py_buffer extra, payload;
        uint64_t f[3];
        int got = packet_bytes(pkt, &extra, &payload, f);
        Py_DECREF(pkt);
        if (!got)
            goto done;
        size_t n = (size_t)extra.len + (size_t)payload.len;
        if (n > room - filled) {
            PyBuffer_Release(&extra);
            PyBuffer_Release(&payload);
            if (!count) {
                res = Py_NewRef(Py_NotImplemented);
                goto done;
            }
            break;
        }
        memcpy(o + filled, extra.buf, (size_t)extra.len);
        memcpy(o + filled + extra.len, payload.buf, (size_t)payload.len);
        put_record(rec + (size_t)count * RECORD_SIZE, (uint16_t)f[0], (uint16_t)f[1],
                   (uint32_t)extra.len, f[2], filled, (uint64_t)payload.len);
        filled += n;
        PyBuffer_Release(&extra);
        PyBuffer_Release(&payload);
    next:
        count++;
        pos = advance(pos, used, dsize);
        avail -= used;
    }
    int signal = count ? commit(self, pos, total - avail) : 0;
    set_read_signal(owner, signal);
    res = Py_BuildValue("(nO)", count, signal ? Py_True : Py_False);
done:
    PyBuffer_Release(&recs);
    PyBuffer_Release(&out);
    return res;
}

/* The entry points: each call is counted in busy (see Ring_detach). */
static PyObject *
Ring_write(RingObject *self, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    self->busy++;
    PyObject *res = Ring_write_impl(self, args, nargsf, kwnames);
    self->busy--;
    return res;
}

static PyObject *
Ring_write_batch(RingObject *self, PyObject *specs)
{
    self->busy++;
    PyObject *res = Ring_write_batch_impl(self, specs);
    self->busy--;
    return res;
}

static PyObject *
Ring_read(RingObject *self, PyObject *unused)
{
    self->busy++;
    PyObject *res = Ring_read_impl(self, unused);
    self->busy--;
    return res;
}

static PyObject *
Ring_read_batch(RingObject *self, PyObject *arg)
{
    self->busy++;
    PyObject *res = Ring_read_batch_impl(self, arg);
    self->busy--;
    return res;
}

static PyObject *
Ring_read_into(RingObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    self->busy++;
    PyObject *res = Ring_read_into_impl(self, args, nargs);
    self->busy--;
    return res;
}

static PyObject *
Ring_write_from(RingObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    self->busy++;
    PyObject *res = Ring_write_from_impl(self, args, nargs);
    self->busy--;
    return res;
}

static PyMethodDef Ring_methods[] = {
    {"_attach", (PyCFunction)Ring_attach, METH_VARARGS,
     "_attach(buf, header_size): pin the ring and take the compiled fast path."},
    {"_detach", (PyCFunction)Ring_detach, METH_NOARGS, "Release the pin. Idempotent."},
    {"write", (PyCFunction)(void (*)(void))Ring_write, METH_FASTCALL | METH_KEYWORDS,
     "write(payload, type=6, flags=0, transaction_id=0, *, extra_header=b'') -> bool\n\n"
     "Write one packet; True when the reader must be signalled. The compiled fast path of\n"
     "RingBuffer._write_py (ring.py), which documents it and handles every other case."},
    {"read", (PyCFunction)Ring_read, METH_NOARGS,
     "read() -> Packet | None\n\n"
     "Copy out the next packet and consume it; then read_signal says whether to signal the\n"
     "writer. The compiled fast path of RingBuffer._read_py (ring.py), which documents it."},
    {"_write_batch", (PyCFunction)Ring_write_batch, METH_O,
     "_write_batch(specs: tuple) -> bool | NotImplemented"},
    {"_read_batch", (PyCFunction)Ring_read_batch, METH_O,
     "_read_batch(max_count) -> (list, bool) | NotImplemented"},
    {"_write_from", (PyCFunction)(void (*)(void))Ring_write_from, METH_FASTCALL,
     "_write_from(data, records) -> bool | NotImplemented"},
    {"_read_into", (PyCFunction)(void (*)(void))Ring_read_into, METH_FASTCALL,
     "_read_into(out, records) -> (count, bool) | NotImplemented"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject RingType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "pyvmbus._ring.Ring",
    .tp_basicsize = sizeof(RingObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .tp_doc = "The compiled fast path: the base class of pyvmbus.ring.RingBuffer.",
    .tp_new = PyType_GenericNew,
    .tp_dealloc = (destructor)Ring_dealloc,
    .tp_methods = Ring_methods,
};

/* -- Check: the compiled fast path of ring.HeaderCheck ------------------------------------
 *
 * Check is the base class of ring.HeaderCheck, as Ring is of RingBuffer: check_tx(),
 * check_rx(), note_tx() and note_rx() are called straight into C.  ring.py's HeaderCheck
 * stays the reference and the one place that words a violation: this code loads the four
 * header words of a ring, makes ring.py's checks in ring.py's order, and when all pass it
 * does what ring.py does (the same state update, the same result).  When one fails it
 * hands the words it loaded to HeaderCheck._check_tx_py / _check_rx_py, which run the
 * rules on exactly those values and raise the RingCorrupt (and make the state update ring.py
 * makes before it raises).  A check that is not attached (the "python" engine) or whose
 * ring is not pinned (closed, or a "python" engine ring) calls the reference for the
 * whole call.  The state (tx_write, tx_pending, rx_read, tx_read) lives here, as attributes
 * the reference reads and writes too.
 *
 * Loads: the words the other side stores are seq_cst loads, our own relaxed (only we
 * store them), as in the ring engine above.  Each word is loaded once, in address order
 * (ring.py: one 16-byte copy); no ordering against other memory is needed: the check
 * decides nothing the ring calls after it do not load and check again themselves. */

typedef struct {
    PyObject_HEAD
    PyObject *tx, *rx;                                   /* the two RingBuffers (_bind) */
    unsigned int tx_write, tx_pending, rx_read, tx_read; /* ring.py's HeaderCheck state */
    char fast;                                           /* the "c" engine */
} CheckObject;

static PyObject *str_check_tx_py, *str_check_rx_py, *str_note_tx_py, *str_note_rx_py;

/* The ring to load from, or NULL: the reference takes the whole call. */
static inline RingObject *
check_ring(CheckObject *self, PyObject *ring)
{
    if (!self->fast)
        return NULL;
    RingObject *rb = (RingObject *)ring; /* _bind checked the type */
    return rb->pinned ? rb : NULL;
}

/* Python's a % m (m > 0): never negative, as ring.py's modulo of two u32 differences. */
static inline int64_t
pymod(int64_t a, int64_t m)
{
    int64_t x = a % m;
    return x < 0 ? x + m : x;
}

/* The reference on the words we loaded: it raises (the error path only). */
static PyObject *
check_fault(CheckObject *self, PyObject *name, uint32_t w, uint32_t r, uint32_t mask, uint32_t pending)
{
    PyObject *words = Py_BuildValue("(kkkk)", (unsigned long)w, (unsigned long)r, (unsigned long)mask,
                                    (unsigned long)pending);
    if (!words)
        return NULL;
    PyObject *res = PyObject_CallMethodOneArg((PyObject *)self, name, words);
    Py_DECREF(words);
    return res;
}

/* check_tx(): ring.py HeaderCheck._check_tx_py, its rules in its order. */
static PyObject *
Check_check_tx(CheckObject *self, PyObject *unused)
{
    RingObject *tx = check_ring(self, self->tx);
    if (!tx)
        return PyObject_CallMethodNoArgs((PyObject *)self, str_check_tx_py);
    const uint32_t *h = tx->hdr;
    uint32_t w = load_own(&h[W_WRITE]);       /* ours */
    uint32_t r = load_acq(&h[W_READ]);        /* the host's */
    uint32_t mask = load_acq(&h[W_MASK]);     /* the host's */
    uint32_t pending = load_own(&h[W_PENDING]); /* ours */
    int64_t dsize = tx->dsize, last = self->tx_read;
    if (w != self->tx_write                                          /* we stored it */
        || r >= dsize || (r & 7u)                                    /* in the data area, aligned */
        || pymod((int64_t)r - last, dsize) > pymod((int64_t)w - last, dsize) /* not past our w */
        || mask > 1                                                  /* 0 or 1 */
        || pending != self->tx_pending)                              /* we stored it */
        return check_fault(self, str_check_tx_py, w, r, mask, pending);
    self->tx_read = r;
    /* Bytes free, ring.py's int arithmetic (a garbage w we stored ourselves gives what
     * ring.py gives, even a negative number). */
    return PyLong_FromLongLong(w >= r ? dsize - ((int64_t)w - r) : (int64_t)r - w);
}

/* check_rx(): ring.py HeaderCheck._check_rx_py, its rules in its order. */
static PyObject *
Check_check_rx(CheckObject *self, PyObject *unused)
{
    RingObject *rx = check_ring(self, self->rx);
    if (!rx)
        return PyObject_CallMethodNoArgs((PyObject *)self, str_check_rx_py);
    const uint32_t *h = rx->hdr;
    uint32_t w = load_acq(&h[W_WRITE]);       /* the host's */
    uint32_t r = load_own(&h[W_READ]);        /* ours */
    uint32_t mask = load_acq(&h[W_MASK]);     /* ours, and the kernel's */
    uint32_t pending = load_acq(&h[W_PENDING]); /* the host's */
    int64_t dsize = rx->dsize;
    if (w >= dsize || (w & 7u)  /* in the data area, aligned */
        || r != self->rx_read   /* we stored it */
        || mask > 1             /* 0 or 1 */
        || pending >= dsize)    /* room the ring can have */
        return check_fault(self, str_check_rx_py, w, r, mask, pending);
    return PyLong_FromLongLong(w >= r ? (int64_t)w - r : dsize - r + w); /* bytes to read */
}

/* check_rings(): check_tx() then check_rx(), one call (ring.py _check_rings_py). */
static PyObject *
Check_check_rings(CheckObject *self, PyObject *unused)
{
    PyObject *free = Check_check_tx(self, NULL);
    if (!free)
        return NULL;
    Py_DECREF(free);
    return Check_check_rx(self, NULL);
}

/* note_tx(): remember our TX words as they are now (ring.py _note_tx_py). */
static PyObject *
Check_note_tx(CheckObject *self, PyObject *unused)
{
    RingObject *tx = check_ring(self, self->tx);
    if (!tx)
        return PyObject_CallMethodNoArgs((PyObject *)self, str_note_tx_py);
    self->tx_write = load_own(&tx->hdr[W_WRITE]);
    self->tx_pending = load_own(&tx->hdr[W_PENDING]);
    Py_RETURN_NONE;
}

/* note_rx(): remember our RX read index as it is now (ring.py _note_rx_py). */
static PyObject *
Check_note_rx(CheckObject *self, PyObject *unused)
{
    RingObject *rx = check_ring(self, self->rx);
    if (!rx)
        return PyObject_CallMethodNoArgs((PyObject *)self, str_note_rx_py);
    self->rx_read = load_own(&rx->hdr[W_READ]);
    Py_RETURN_NONE;
}

/* _bind(tx, rx, fast): the two rings (once); fast: check in C (the "c" engine). */
static PyObject *
Check_bind(CheckObject *self, PyObject *args)
{
    PyObject *tx, *rx;
    int fast;
    if (!PyArg_ParseTuple(args, "O!O!p", &RingType, &tx, &RingType, &rx, &fast))
        return NULL;
    if (self->tx) {
        PyErr_SetString(PyExc_ValueError, "the header check is already bound to its rings");
        return NULL;
    }
    self->tx = Py_NewRef(tx);
    self->rx = Py_NewRef(rx);
    self->fast = (char)fast;
    Py_RETURN_NONE;
}

static int
Check_traverse(CheckObject *self, visitproc visit, void *arg)
{
    Py_VISIT(self->tx);
    Py_VISIT(self->rx);
    return 0;
}

static int
Check_clear(CheckObject *self)
{
    self->fast = 0; /* no ring left to load from: the reference raises what it raises */
    Py_CLEAR(self->tx);
    Py_CLEAR(self->rx);
    return 0;
}

static void
Check_dealloc(CheckObject *self)
{
    PyObject_GC_UnTrack(self);
    Check_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMethodDef Check_methods[] = {
    {"_bind", (PyCFunction)Check_bind, METH_VARARGS,
     "_bind(tx, rx, fast): the rings to check; fast: the compiled checks (the \"c\" engine)."},
    {"check_tx", (PyCFunction)Check_check_tx, METH_NOARGS,
     "check_tx() -> int\n\nCheck the TX header; the bytes free. The compiled fast path of\n"
     "HeaderCheck._check_tx_py (ring.py), which documents it and raises every RingCorrupt."},
    {"check_rx", (PyCFunction)Check_check_rx, METH_NOARGS,
     "check_rx() -> int\n\nCheck the RX header; the bytes ready to read. The compiled fast path\n"
     "of HeaderCheck._check_rx_py (ring.py), which documents it and raises every RingCorrupt."},
    {"check_rings", (PyCFunction)Check_check_rings, METH_NOARGS,
     "check_rings() -> int\n\ncheck_tx() then check_rx() in one call; the bytes ready to read."},
    {"note_tx", (PyCFunction)Check_note_tx, METH_NOARGS,
     "note_tx() -> None\n\nRemember our TX words as they are now (after our own store of them)."},
    {"note_rx", (PyCFunction)Check_note_rx, METH_NOARGS,
     "note_rx() -> None\n\nRemember our RX read index as it is now (after a read stored it)."},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef Check_members[] = {
    {"tx", T_OBJECT, offsetof(CheckObject, tx), READONLY, "The TX RingBuffer (we write it)."},
    {"rx", T_OBJECT, offsetof(CheckObject, rx), READONLY, "The RX RingBuffer (we read it)."},
    {"tx_write", T_UINT, offsetof(CheckObject, tx_write), 0, "Our TX write index as we last stored it."},
    {"tx_pending", T_UINT, offsetof(CheckObject, tx_pending), 0,
     "Our TX pending_send_sz as we last stored it."},
    {"rx_read", T_UINT, offsetof(CheckObject, rx_read), 0, "Our RX read index as we last stored it."},
    {"tx_read", T_UINT, offsetof(CheckObject, tx_read), 0,
     "The host's TX read index at the last check that passed it."},
    {"_fast", T_BOOL, offsetof(CheckObject, fast), READONLY, "The compiled checks run (the \"c\" engine)."},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject CheckType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "pyvmbus._ring.Check",
    .tp_basicsize = sizeof(CheckObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "The compiled header checks: the base class of pyvmbus.ring.HeaderCheck.",
    .tp_new = PyType_GenericNew,
    .tp_dealloc = (destructor)Check_dealloc,
    .tp_traverse = (traverseproc)Check_traverse,
    .tp_clear = (inquiry)Check_clear,
    .tp_methods = Check_methods,
    .tp_members = Check_members,
};

/* -- bind ----------------------------------------------------------------------------- */

static Py_ssize_t
slot_offset(PyTypeObject *type, const char *name)
{
    PyObject *descr = PyDict_GetItemString(type->tp_dict, name); /* borrowed */
    if (!descr || !PyObject_TypeCheck(descr, &PyMemberDescr_Type)) {
        PyErr_Format(PyExc_TypeError, "%s.%s is not a __slots__ member", type->tp_name, name);
        return -1;
    }
    PyMemberDef *m = ((PyMemberDescrObject *)descr)->d_member;
    if (m->type != T_OBJECT_EX || (m->flags & READONLY)) {
        PyErr_Format(PyExc_TypeError, "%s.%s is not a writable object slot", type->tp_name, name);
        return -1;
    }
    return m->offset;
}

static PyObject *
ring_bind(PyObject *mod, PyObject *args)
{
    PyObject *pkt, *rb, *corrupt;
    if (!PyArg_ParseTuple(args, "O!O!O", &PyType_Type, &pkt, &PyType_Type, &rb, &corrupt))
        return NULL;
    static const char *fields[7] = {"type", "flags", "transaction_id", "payload",
                                    "extra_header", "transfer_pages", "gpa_ranges"};
    Py_ssize_t offs[7];
    for (int i = 0; i < 7; i++)
        if ((offs[i] = slot_offset((PyTypeObject *)pkt, fields[i])) < 0)
            return NULL;
    Py_ssize_t sig = slot_offset((PyTypeObject *)rb, "read_signal");
    if (sig < 0)
        return NULL;
    Py_XSETREF(packet_type, (PyTypeObject *)Py_NewRef(pkt));
    Py_XSETREF(ringbuffer_type, (PyTypeObject *)Py_NewRef(rb));
    Py_XSETREF(ring_corrupt, Py_NewRef(corrupt));
    memcpy(pkt_off, offs, sizeof offs);
    signal_off = sig;
    Py_RETURN_NONE;
}

static PyMethodDef module_methods[] = {
    {"bind", ring_bind, METH_VARARGS,
     "bind(Packet, RingBuffer, RingCorrupt): where the slots are (ring.py calls it once)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "pyvmbus._ring",
    "The compiled fast path of pyvmbus.ring (ring.py is the reference; see docs/ring.md).", -1,
    module_methods,
};

PyMODINIT_FUNC
PyInit__ring(void)
{
    if (PyType_Ready(&RingType) < 0 || PyType_Ready(&CheckType) < 0)
        return NULL;
    empty_bytes = PyBytes_FromStringAndSize(NULL, 0);
    str_write_py = PyUnicode_InternFromString("_write_py");
    str_read_py = PyUnicode_InternFromString("_read_py");
    str_check_tx_py = PyUnicode_InternFromString("_check_tx_py");
    str_check_rx_py = PyUnicode_InternFromString("_check_rx_py");
    str_note_tx_py = PyUnicode_InternFromString("_note_tx_py");
    str_note_rx_py = PyUnicode_InternFromString("_note_rx_py");
    if (!empty_bytes || !str_write_py || !str_read_py || !str_check_tx_py || !str_check_rx_py ||
        !str_note_tx_py || !str_note_rx_py)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (!m)
        return NULL;
    if (PyModule_AddObjectRef(m, "Ring", (PyObject *)&RingType) < 0 ||
        PyModule_AddObjectRef(m, "Check", (PyObject *)&CheckType) < 0 ||
        PyModule_AddIntConstant(m, "RECORD_SIZE", RECORD_SIZE) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
