"""Hard-negative captions for the DeGLA stage (docs/losses.md §4): five kinds, two backends, one validator.

* ``rules``    deterministic rewrites over a POS-tagged parse; replacements come from the corpus's
               own noun/adjective vocabulary.
* ``llm``      any OpenAI-compatible chat-completions endpoint (vLLM, ...), with rewrite rules and
               in-context examples per kind, batching, retries with back-off and an on-disk cache.
* ``validate`` every candidate is checked the same way whatever produced it; rejects are counted.
* ``shards``   reads a webdataset shard set and writes new shards with ``json["negatives"]`` filled,
               shard by shard (resumable; ``powerclip.launch.shard_array`` runs it as a Slurm job array).
``tools/make_negatives.py`` is the command line.
"""

from powerclip.negatives.validate import KINDS, Bounds, check_negative, select_negatives

__all__ = ["KINDS", "Bounds", "check_negative", "select_negatives"]
