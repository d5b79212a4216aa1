"""Training engine: the fine-tuning loop and its tasks, evaluation with voting, optimiser
groups, the official schedule, checkpoints and resume, run directories and logs, `torchrun`
helpers. The scripts in `tools/` are thin command lines over it."""
from .checkpoint import load_checkpoint, restore_model, save_checkpoint
from .distributed import DistInfo, cleanup, init_distributed
from .evaluate import accuracy, predict
from .fewshot import parse_folds, run_folds
from .optim import build_optimizer, param_groups
from .rundir import default_output_dir, prepare_run_dir
from .schedule import OfficialCosineLR, build_scheduler, official_lr
from .segmentation import PartSegmentationTask  # registers the part-segmentation task
from .tasks import TASKS, ClassificationTask, Task, build_task, register_task
from .trainer import RunState, TrainingInterrupted, fit

__all__ = [
    "ClassificationTask",
    "DistInfo",
    "OfficialCosineLR",
    "PartSegmentationTask",
    "RunState",
    "TASKS",
    "Task",
    "TrainingInterrupted",
    "accuracy",
    "build_optimizer",
    "build_scheduler",
    "build_task",
    "cleanup",
    "default_output_dir",
    "fit",
    "init_distributed",
    "load_checkpoint",
    "official_lr",
    "param_groups",
    "parse_folds",
    "predict",
    "prepare_run_dir",
    "register_task",
    "restore_model",
    "run_folds",
    "save_checkpoint",
]
