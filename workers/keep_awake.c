/* Spinners that keep CPUs from idling: each thread that calls serve() spins (pausing) until a
 * deadline, then sleeps until it is given a new one. workers/keep_awake.py starts them, one per
 * CPU, each pinned to its CPU at idle priority (SCHED_IDLE) before it calls serve().
 *
 * Why: on the virtual machines GPUs come in, a vCPU with nothing to run halts at once, and while a
 * ~90 ms forward runs every thread but the compute thread sleeps. The threads a request crosses
 * afterwards (frontend, broker, the worker's own) then wake on halted vCPUs and cold caches, which
 * made the time around the forward ~1 ms longer (bench/RESULTS.md, nineteenth and twenty-seventh
 * sessions). A SCHED_IDLE thread runs only where nothing else wants the CPU, and a thread that
 * wakes there preempts it at once, so the spinners take no time from real work; they cost power.
 *
 * One set of spinners per process: the state below is the module's. Linux only (a futex); setup.py
 * builds it there alone. Built against Python's stable ABI, as the PNG unfilterer is.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>   /* first, as Python asks */
#include <limits.h>
#include <stdint.h>
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>
#include "spin_wait.h"

static int64_t deadline_ns;   /* spin while CLOCK_MONOTONIC is before this */
static int32_t generation;    /* bumped at every change of either: the futex word sleepers wait on */
static int32_t quitting;      /* serve() returns */

/* A change is stored, then the generation bumped, then the sleepers woken: a spinner that read
 * the old generation either sees the change or finds the futex word moved and does not sleep. */
static void changed(void) {
    __atomic_fetch_add(&generation, 1, __ATOMIC_SEQ_CST);
    syscall(SYS_futex, &generation, FUTEX_WAKE_PRIVATE, INT_MAX, NULL, NULL, 0);
}

static PyObject *py_serve(PyObject *self, PyObject *noargs) {
    (void)self;
    (void)noargs;
    Py_BEGIN_ALLOW_THREADS
    for (;;) {
        int32_t gen = __atomic_load_n(&generation, __ATOMIC_SEQ_CST);
        if (__atomic_load_n(&quitting, __ATOMIC_SEQ_CST))
            break;
        /* the clock every 64 pauses (a few microseconds): a new deadline or a stop shows at once */
        while (now_ns() < __atomic_load_n(&deadline_ns, __ATOMIC_SEQ_CST)
               && __atomic_load_n(&generation, __ATOMIC_SEQ_CST) == gen)
            for (int i = 0; i < 64; i++)
                pause_briefly();
        if (__atomic_load_n(&generation, __ATOMIC_SEQ_CST) == gen)   /* past the deadline: sleep */
            syscall(SYS_futex, &generation, FUTEX_WAIT_PRIVATE, gen, NULL, NULL, 0);
    }
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *py_hold_until(PyObject *self, PyObject *args) {
    (void)self;
    long long deadline;
    if (!PyArg_ParseTuple(args, "L", &deadline))
        return NULL;
    __atomic_store_n(&deadline_ns, (int64_t)deadline, __ATOMIC_SEQ_CST);
    changed();
    Py_RETURN_NONE;
}

static PyObject *py_stop(PyObject *self, PyObject *noargs) {
    (void)self;
    (void)noargs;
    __atomic_store_n(&quitting, 1, __ATOMIC_SEQ_CST);
    changed();
    Py_RETURN_NONE;
}

static PyObject *py_reset(PyObject *self, PyObject *noargs) {
    (void)self;
    (void)noargs;
    __atomic_store_n(&deadline_ns, 0, __ATOMIC_SEQ_CST);
    __atomic_store_n(&quitting, 0, __ATOMIC_SEQ_CST);
    changed();
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"serve", py_serve, METH_NOARGS,
     "Spin until the deadline, sleep until a new one; return after stop(). Releases the GIL."},
    {"hold_until", py_hold_until, METH_VARARGS,
     "Spinners spin until this CLOCK_MONOTONIC time in ns (time.monotonic_ns()), then sleep."},
    {"stop", py_stop, METH_NOARGS, "Every serve() returns."},
    {"reset", py_reset, METH_NOARGS, "Before new spinners start: no deadline, not stopping."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_keep_awake", NULL, 0, methods,
                                    NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__keep_awake(void) { return PyModule_Create(&module); }
