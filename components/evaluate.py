from kfp.dsl import Artifact, ClassificationMetrics, Dataset, Input, Metrics, Model, Output


def evaluate(config: str, split: Input[Dataset], checkpoint: Input[Model], report: Output[Artifact],
             metrics: Output[Metrics], confusion: Output[ClassificationMetrics], experiment: str = "colam",
             run_key: str = "") -> None:
    """Accuracy, NLL and calibration on the test and validation sets, and the test confusion matrix."""
    from pathlib import Path

    from colam.evaluation import confusion_matrix, evaluate_run
    from colam.steps import run_config
    from pipelines.tracking import log_evaluation, tracking_client

    run = run_config(config, split.path)
    result = evaluate_run(run, checkpoint.path, report.path, split_dir=split.path)
    for name, value in result.items():
        if name.startswith(("test_", "val_")) and isinstance(value, float):
            metrics.log_metric(name, value)
    classes = list(result["test_per_class_acc"])
    confusion.log_confusion_matrix(classes, confusion_matrix(report.path, classes))
    if (client := tracking_client()) is not None:
        log_evaluation(client, experiment, run, run_key, Path(report.path), result)
