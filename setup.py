"""Build the optional C helpers: pyvmbus._atomic (atomics) and pyvmbus._ring (ring fast path).

Both are optional: where no C compiler is available the install still succeeds.
pyvmbus.shm then falls back to the system's libatomic.so.1 through ctypes, and
pyvmbus.ring to its pure-Python engine (the reference; slower, same bytes and results).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "pyvmbus._atomic",
            sources=["src/pyvmbus/_atomic.c"],
            optional=True,
            extra_compile_args=["-O2", "-std=c11"],
        ),
        Extension(
            "pyvmbus._ring",
            sources=["src/pyvmbus/_ring.c"],
            optional=True,
            # gnu11, not c11: the compiler barrier is GNU inline asm.
            extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter",
                                "-Wno-missing-field-initializers", "-Wno-cast-function-type"],
        ),
    ]
)
