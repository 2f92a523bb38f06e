"""Runnable demos.

- ``python -m dualpipe_ext.demo``: the main job, a DeepSeek-V3-style MoE language model
  trained with DualPipe x expert parallelism on real text (see ``__main__``).
- ``python -m dualpipe_ext.demo.pipeline``: DualPipe and DualPipeV on a residual MLP,
  checked against an unpipelined run, with recorded timelines.

``reference`` holds the unpipelined runs both check against.
"""
