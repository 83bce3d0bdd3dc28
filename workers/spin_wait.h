/* What the C extensions' spinning threads share (workers/png_unfilter.c, workers/keep_awake.c). */
#ifndef WORKERS_SPIN_WAIT_H
#define WORKERS_SPIN_WAIT_H

#include <stdint.h>
#include <time.h>

/* One pause of a spin loop: lets a sibling hyperthread run and saves power (10-140 cycles). */
static inline void pause_briefly(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

/* CLOCK_MONOTONIC in ns: the clock Python's time.monotonic_ns() reads. */
static inline int64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

#endif
