"""asv benchmarks of arrayattn: one module ``bench_<family>.py`` per mechanism family.

The inputs and the timed callables come from the runner factories of ``arrayattn._bench`` (the
cases ``python -m arrayattn bench`` uses too), so the two report the same figures.
"""
