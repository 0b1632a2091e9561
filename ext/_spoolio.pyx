# cython: language_level=3
"""The spool's I/O thread, compiled: it writes and syncs without ever holding the GIL.

Twin of fastmta/spool/_io_py.py (same API, same behaviour); see that module for the contract.
A Python thread that waits on a queue, writes, syncs and calls back into the event loop takes
the GIL three or four times per group commit; while the loop is busy every one of those is a
forced GIL switch (futex calls and context switches, ~12 % of a busy worker's CPU). This thread
takes the GIL once when it starts and once when it ends: requests are C structs passed by
pointer over one pipe, finished ones come back over another, which the loop watches.
"""

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from libc.errno cimport EAGAIN, EINTR, EIO, errno
from libc.stdlib cimport calloc, free
from posix.types cimport off_t
from posix.unistd cimport close, fdatasync, fsync, read, write

import os
import threading

ACCELERATED = True

cdef extern from "sys/uio.h" nogil:
    struct iovec:
        void *iov_base
        size_t iov_len
    ssize_t pwritev(int fd, const iovec *iov, int iovcnt, off_t offset)

cdef enum:
    IOV_CHUNK = 1024  # Linux UIO_MAXIOV
    C_NO_SYNC = 0
    C_DATASYNC = 1
    C_FULLSYNC = 2

# sync kinds (same values in _io_py)
NO_SYNC = C_NO_SYNC
DATASYNC = C_DATASYNC
FULLSYNC = C_FULLSYNC


cdef struct Request:
    int fd
    int sync
    off_t offset
    Py_ssize_t nbufs
    Py_buffer *views
    iovec *iov
    long long written
    int err


cdef void _free(Request *r) noexcept:
    cdef Py_ssize_t i
    for i in range(r.nbufs):
        PyBuffer_Release(&r.views[i])
    free(r.views)
    free(r.iov)
    free(r)


cdef void _execute(Request *r) noexcept nogil:
    cdef Py_ssize_t i = 0
    cdef ssize_t n
    cdef int cnt
    cdef off_t off = r.offset
    while i < r.nbufs:
        if r.iov[i].iov_len == 0:
            i += 1
            continue
        cnt = <int>(r.nbufs - i) if r.nbufs - i < IOV_CHUNK else IOV_CHUNK
        n = pwritev(r.fd, &r.iov[i], cnt, off)
        if n < 0:
            if errno == EINTR:
                continue
            r.err = errno
            return
        if n == 0:
            r.err = EIO
            return
        off += n
        r.written += n
        while n > 0 and i < r.nbufs:  # short write: skip what went out, resume mid-buffer
            if <size_t>n >= r.iov[i].iov_len:
                n -= r.iov[i].iov_len
                i += 1
            else:
                r.iov[i].iov_base = <char *>r.iov[i].iov_base + n
                r.iov[i].iov_len -= n
                n = 0
    if r.sync == C_DATASYNC:
        while fdatasync(r.fd) < 0:
            if errno != EINTR:
                r.err = errno
                return
    elif r.sync == C_FULLSYNC:
        while fsync(r.fd) < 0:
            if errno != EINTR:
                r.err = errno
                return


cdef void _serve(int req_r, int done_w) noexcept nogil:
    cdef size_t p
    cdef ssize_t n
    while True:
        n = read(req_r, &p, sizeof(p))
        if n < 0 and errno == EINTR:
            continue
        if n != sizeof(p):
            return  # EOF: stop() closed the request pipe
        _execute(<Request *>p)
        while write(done_w, &p, sizeof(p)) < 0 and errno == EINTR:
            pass


cdef class IoThread:
    """One thread executing write-and-sync requests in order; see fastmta/spool/_io_py.py."""

    cdef int _req_r, _req_w, _done_r, _done_w
    cdef object _thread
    cdef set _pending  # addresses of requests handed to the thread and not yet collected

    def __cinit__(self):
        self._req_r = self._req_w = self._done_r = self._done_w = -1

    def __init__(self):
        self._pending = set()
        self._req_r, self._req_w = os.pipe2(os.O_CLOEXEC)
        self._done_r, self._done_w = os.pipe2(os.O_CLOEXEC)
        os.set_blocking(self._done_r, False)
        self._thread = None

    @property
    def done_fd(self) -> int:
        """Readable when a request has finished: then call results()."""
        return self._done_r

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="fastmta-spool-io", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        cdef int req_r = self._req_r, done_w = self._done_w
        with nogil:
            _serve(req_r, done_w)

    def submit(self, int fd, list bufs, long long offset, int sync) -> None:
        """Write ``bufs`` (bytes-like, kept alive until collected) at ``offset`` of ``fd``,
        then fdatasync (DATASYNC) or fsync (FULLSYNC) it. Never blocks."""
        cdef Py_ssize_t n = len(bufs), i
        cdef Request *r = <Request *>calloc(1, sizeof(Request))
        if r == NULL:
            raise MemoryError()
        r.views = <Py_buffer *>calloc(n if n else 1, sizeof(Py_buffer))
        r.iov = <iovec *>calloc(n if n else 1, sizeof(iovec))
        if r.views == NULL or r.iov == NULL:
            _free(r)
            raise MemoryError()
        try:
            for i in range(n):
                PyObject_GetBuffer(bufs[i], &r.views[i], PyBUF_SIMPLE)
                r.nbufs = i + 1
                r.iov[i].iov_base = r.views[i].buf
                r.iov[i].iov_len = r.views[i].len
        except BaseException:
            _free(r)
            raise
        r.fd = fd
        r.sync = sync
        r.offset = offset
        cdef size_t p = <size_t>r
        while write(self._req_w, &p, sizeof(p)) < 0:
            if errno != EINTR:
                e = errno
                _free(r)
                raise OSError(e, os.strerror(e))
        self._pending.add(p)

    def results(self) -> list:
        """(bytes written, errno or 0) of each finished request, in submission order."""
        cdef size_t ptrs[64]
        cdef ssize_t n
        cdef Py_ssize_t i
        cdef Request *r
        out = []
        while True:
            n = read(self._done_r, ptrs, sizeof(ptrs))
            if n < 0:
                e = errno
                if e == EINTR:
                    continue
                if e == EAGAIN:
                    break
                raise OSError(e, os.strerror(e))
            for i in range(n // <ssize_t>sizeof(size_t)):
                self._pending.discard(ptrs[i])
                r = <Request *>ptrs[i]
                out.append((r.written, r.err))
                _free(r)
            if n < <ssize_t>sizeof(ptrs):
                break
        return out

    def stop(self) -> None:
        """Let the thread end once its queue is empty (join() waits for that)."""
        if self._req_w >= 0:
            close(self._req_w)
            self._req_w = -1

    def join(self, timeout=None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                return
        self._close_all()

    cdef void _close_all(self) noexcept:
        cdef int fd
        for fd in (self._req_w, self._req_r, self._done_w, self._done_r):
            if fd >= 0:
                close(fd)
        self._req_w = self._req_r = self._done_w = self._done_r = -1

    def __dealloc__(self):
        # Only reached when the thread is gone (it holds a reference through _run): whatever
        # was never collected can be freed.
        cdef size_t p
        if self._pending:
            for p in self._pending:
                _free(<Request *>p)
        self._close_all()
