"""Evaluating exported artefacts and runs: ``powerclip eval`` and the loader of export folders,
run folders and checkpoints. Above ``powerclip.export`` (a run is exported on the fly) and
``powerclip.eval`` (the benchmarks themselves), below the launcher and the command line."""
