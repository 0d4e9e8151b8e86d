"""Build of the seqkv_ext Cython extensions (metadata lives in pyproject.toml)."""
import sys

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup

MODULES = ["ans_tables", "ans", "ans_encode", "context_sections", "crc32c", "bitpack", "trie", "predict", "quantize", "varint", "rope", "channels", "repeat"]
COMPILE_ARGS = ["/O2"] if sys.platform == "win32" else ["-O3", "-ffp-contract=off"]

extensions = [
    Extension(
        f"seqkv_ext.{name}",
        [f"seqkv_ext/{name}.pyx"],
        include_dirs=[np.get_include()],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
        extra_compile_args=COMPILE_ARGS,
    )
    for name in MODULES
]

setup(
    ext_modules=cythonize(
        extensions,
        build_dir="build/cython",  # keep the generated .c files out of the source tree
        compiler_directives={"language_level": "3", "embedsignature": True},
    ),
)
