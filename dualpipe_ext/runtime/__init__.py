"""The pipeline runtime: one executor for every plan, and the DualPipe/DualPipeV API."""
from dualpipe_ext.runtime.agreement import PipelineError
from dualpipe_ext.runtime.config import RuntimeConfig
from dualpipe_ext.runtime.pipeline import DualPipe, DualPipeV, PipelineSchedule
from dualpipe_ext.runtime.timeline import Recorder

__all__ = ["DualPipe", "DualPipeV", "PipelineError", "PipelineSchedule", "Recorder", "RuntimeConfig"]
