"""The executor's buffer pool: reuse by identity, smallest fit, bounded free list."""
from ckptflow.tasks.run.buffers import BufferPool


def test_pool_reuses_smallest_fitting_buffer_and_bounds_free_list():
    pool = BufferPool(keep=2)
    a, b, c = pool.take(3 << 20), pool.take(1 << 20), pool.take(5)
    assert len(a) == 3 << 20 and len(b) == 1 << 20 and len(c) == 5
    for v in (a, b, c):
        pool.give(v)
    pool.give(a)  # giving twice keeps one copy
    assert len(pool._free) == 2
    small = pool.take(100)
    assert small.base is b.base  # 1 MiB is the smallest buffer that fits
    big = pool.take(2 << 20)
    assert big.base is a.base
    fresh = pool.take(100)
    assert fresh.base is not a.base and fresh.base is not b.base
