"""The segmenter stage: train on labelled folders, predict, evaluate (the paper's Table 1 loop).

    from diffumask.segment import TrainConfig, train, evaluate_run
    run = train(TrainConfig(data=["data/shapes-synthetic"], out="runs/synthetic", preset="tiny"))
    print(evaluate_run(run.root, "data/shapes-real", split="test").table())
"""

from .evaluate import Evaluation, Scorer, evaluate_run
from .predict import predict_folder
from .presets import PRESETS, Preset, get_preset
from .run import RunError, RunFolder
from .train import TrainConfig, train

__all__ = ["PRESETS", "Evaluation", "Preset", "RunError", "RunFolder", "Scorer", "TrainConfig", "evaluate_run",
           "get_preset", "predict_folder", "train"]
