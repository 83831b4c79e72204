"""Checkpoints on disk: finding them, trusting them, reading them, consolidating them.

This package sits below the model, the trainer and the exporter and imports none of them (only
``powerclip.distributed``, for the checksum verification the ranks share), so every command that
reads a checkpoint goes through the same code:

* ``layout``: tag names, the ``latest`` pointer, the model-states file;
* ``discovery``: what a run folder / checkpoint root / tag folder path means;
* ``integrity``: sealing with checksums, verifying, choosing the tag to resume, pruning;
* ``codec``: DeepSpeed's pickled helper objects as primitives, so files load weights-only;
* ``safe_load``: weights-only reads of single files and of ZeRO shards;
* ``consolidate``: the full fp32 weights of a checkpoint of any ZeRO stage.

The submodules are imported by name (``from powerclip.checkpoints.discovery import ...``): the
ones that read DeepSpeed files import DeepSpeed, which light callers should not pay for.
"""
