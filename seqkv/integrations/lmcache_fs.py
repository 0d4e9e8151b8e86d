"""LMCache 0.5.6's filesystem L2 adapter, made to read back the variable-size blobs of the seqkv serde.

LMCache's ``fs`` adapter stores each object's bytes as one file, and a serde's output is stored at its actual
size; but a load reads the file into a buffer sized by ``estimate_serialized_size`` and fails unless the file
fills it exactly, so a compressed blob never loads.  This adapter is that adapter with one change: before a
load, a buffer whose file is a seqkv chunk blob (its magic bytes) shorter than the buffer is narrowed to the
file's size (``MemoryObj.set_used_size``, the same narrowing LMCache applies after a serialize), so the read is
complete; files of anything else load exactly as before.

It is loaded through LMCache's plugin adapter mechanism, with the ``fs`` adapter's own fields:

    {"type": "plugin", "module_path": "seqkv.integrations.lmcache_fs", "class_name": "SeqKVFSL2Adapter",
     "adapter_params": {"base_path": "/path/to/l2"},
     "serde": {"type": "seqkv", "model": "...", "preset": "balanced"}}
"""
from __future__ import annotations

import os

from lmcache.v1.distributed.l2_adapters.fs_l2_adapter import FSL2Adapter, FSL2AdapterConfig

from .chunk_blob import MAGIC, is_framed

MODULE_PATH = __name__
CLASS_NAME = "SeqKVFSL2Adapter"

# LMCache's plugin factory finds the config class by the name class_name + "Config"
SeqKVFSL2AdapterConfig = FSL2AdapterConfig


class SeqKVFSL2Adapter(FSL2Adapter):
    """LMCache's ``fs`` L2 adapter that also loads seqkv chunk blobs shorter than the load buffer."""

    def __init__(self, config: FSL2AdapterConfig, l1_memory_desc=None):
        # the plugin factory passes the L1 memory description; the fs adapter does not use it
        super().__init__(config)

    def submit_load_task(self, keys, objects):
        for key, obj in zip(keys, objects):
            size = _blob_file_size(self._key_to_path(key))
            if size is not None and size < obj.get_size():
                obj.set_used_size(size)
        return super().submit_load_task(keys, objects)


def _blob_file_size(path) -> int | None:
    """The size of ``path`` if it holds a seqkv chunk blob, else None (missing files included)."""
    try:
        with open(path, "rb") as f:
            head = f.read(len(MAGIC))
            return os.fstat(f.fileno()).st_size if is_framed(head) else None
    except OSError:
        return None


def adapter_spec(base_path: str, serde: dict) -> dict:
    """The ``--l2-adapter`` JSON object of this adapter at ``base_path`` with the serde options ``serde``."""
    return {"type": "plugin", "module_path": MODULE_PATH, "class_name": CLASS_NAME,
            "adapter_params": {"base_path": base_path}, "serde": dict(serde)}
