"""Integrations of seqkv with serving stacks.  Each submodule imports its stack only when it is imported
itself (``import seqkv`` and ``import seqkv.integrations`` import none of them):

* :mod:`seqkv.integrations.lmcache` -- the ``"seqkv"`` serde of LMCache's distributed L2 storage
  (``register()``; docs/lmcache.md), with the chunk layouts (:mod:`.chunk_layout`), the length-prefixed
  chunk blob (:mod:`.chunk_blob`), a short-read filesystem L2 adapter (:mod:`.lmcache_fs`) and the
  ``seqkv lmcache-server`` command (:mod:`.lmcache_server`).
"""
