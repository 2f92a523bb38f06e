"""The pipeline runtime: one executor for every plan, and the DualPipe/DualPipeV API.

- :mod:`~dualpipe_ext.runtime.pipeline`: ``DualPipe``, ``DualPipeV``, ``PipelineSchedule`` (checks, batches, agreement);
- :mod:`~dualpipe_ext.runtime.compiled`: a rank's plan as the executor walks it;
- :mod:`~dualpipe_ext.runtime.executor`: the walk and the compute of one step;
- :mod:`~dualpipe_ext.runtime.transport`: the step's sends, receives and waits;
- :mod:`~dualpipe_ext.runtime.agreement`: one error on every rank, or none;
- :mod:`~dualpipe_ext.runtime.timeline`: recording what a step did and when.
"""
from dualpipe_ext.runtime.agreement import PipelineError
from dualpipe_ext.runtime.config import RuntimeConfig
from dualpipe_ext.runtime.pipeline import DualPipe, DualPipeV, PipelineSchedule
from dualpipe_ext.runtime.timeline import Recorder

__all__ = ["DualPipe", "DualPipeV", "PipelineError", "PipelineSchedule", "Recorder", "RuntimeConfig"]
