"""Tasks: zero-shot, retrieval, fusion, sequential recommendation, VQA, text-to-image."""

from mmsafe.tasks.base import (
    Outputs,
    Task,
    TaskError,
    TemperatureScaledTask,
    create_task,
    list_tasks,
    register_task,
)
from mmsafe.tasks.fusion import FusionTask
from mmsafe.tasks.retrieval import RetrievalTask, caption_positives
from mmsafe.tasks.seqrec import SeqRecTask, is_rec_data
from mmsafe.tasks.t2i import TextToImageTask, row_seed
from mmsafe.tasks.vqa import VQATask
from mmsafe.tasks.zero_shot import DEFAULT_TEMPLATES, ZeroShotTask, build_prompts

__all__ = [
    "DEFAULT_TEMPLATES",
    "FusionTask",
    "Outputs",
    "RetrievalTask",
    "SeqRecTask",
    "Task",
    "TaskError",
    "TemperatureScaledTask",
    "TextToImageTask",
    "VQATask",
    "ZeroShotTask",
    "build_prompts",
    "caption_positives",
    "create_task",
    "is_rec_data",
    "list_tasks",
    "register_task",
    "row_seed",
]
