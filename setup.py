"""Build the optional atomics helper (pyvmbus._atomic).

The extension is optional: where no C compiler is available the install still succeeds and
pyvmbus.shm falls back to the system's libatomic.so.1 through ctypes (slower, same semantics).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "pyvmbus._atomic",
            sources=["src/pyvmbus/_atomic.c"],
            optional=True,
            extra_compile_args=["-O2", "-std=c11"],
        )
    ]
)
