"""Training at any (dp, pp, tp): the shared trainer behind ``scripts/train_gpt.py`` and
``scripts/train_cnn.py``.

=============  ===========================================================================
module         holds
=============  ===========================================================================
``config``     the config dataclasses (layout, optimizer, run) and flags built from them
``data``       real data without a download, addressed by step: the standard library's
               sources as bytes, scikit-learn's digits
``engine``     this rank's share of a model (TP plan, pipeline stages, DDP) and one step
``tasks``      GPT and CNN tasks: presets, layout checks, data, evaluation, sampling
``trainer``    the loop: LR schedule, clipping, evaluation, checkpoints, resume, errors
``report``     progress bar, ``metrics.jsonl``, ``loss.png``, the final summary
``fault``      failing cleanly (every rank status 1, one error line), phases for the
               watchdog's report, fault injection for tests
=============  ===========================================================================

Checkpoints are :mod:`triton_parallel_layers.parallel_layers.checkpoint`'s (resharding, atomic).
"""
