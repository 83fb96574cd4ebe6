"""Centered accuracy and the CORE / ChatCORE aggregate, as a local `evaluate` metric.

    metric = evaluate.load("eval/metrics/centered_accuracy")
    metric.compute(predictions=[0, 1, 1], references=[0, 1, 0], random_baseline=25.0)
    # {"accuracy": 0.667, "centered_accuracy": 0.556}

centered = (accuracy - rb) / (1 - rb), with the random baseline rb given in percent as in the CORE bundle's
eval_meta_data.csv (25 for four choices, 50 for two, 0 for open-ended tasks). 0 means chance, 1 perfect, and a
model below chance scores negative (nanochat's boolq with rb = 62). CORE (spec §9.1) and ChatCORE (§9.2)
are plain means of centered accuracies.
"""

import math

_DESCRIPTION = "Accuracy rescaled so that the random baseline maps to 0 and a perfect score to 1 (DCLM CORE)."
_KWARGS_DESCRIPTION = """
Args:
    predictions (list of int): predicted labels.
    references (list of int): gold labels.
    random_baseline (float): the accuracy of random guessing, in percent (0 <= rb < 100).
Returns:
    accuracy (float): fraction of predictions equal to references.
    centered_accuracy (float): (accuracy - rb/100) / (1 - rb/100).
"""
_CITATION = "DataComp-LM (Li et al., 2024), CORE metric; nanochat (Karpathy, 2025)."


def centered_accuracy(accuracy: float, random_baseline: float) -> float:
    """(accuracy - rb) / (1 - rb) with rb = random_baseline / 100 (the bundle stores percentages)."""
    if not 0 <= random_baseline < 100:
        raise ValueError(f"random_baseline is a percentage in [0, 100), got {random_baseline}")
    rb = 0.01 * random_baseline
    return (accuracy - rb) / (1.0 - rb)


def core_score(centered: list[float]) -> float:
    """Mean of centered accuracies (CORE over its tasks, ChatCORE over its six); NaN when empty."""
    values = list(centered)
    return sum(values) / len(values) if values else math.nan


try:  # the functions above are what eval/ and training/ import; `evaluate` is only needed for evaluate.load()
    import datasets
    import evaluate
except ImportError:  # pragma: no cover
    evaluate = None

if evaluate is not None:

    class CenteredAccuracy(evaluate.Metric):
        """`evaluate` wrapper of `centered_accuracy`."""

        def _info(self):
            return evaluate.MetricInfo(
                description=_DESCRIPTION,
                citation=_CITATION,
                inputs_description=_KWARGS_DESCRIPTION,
                features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
            )

        def _compute(self, predictions, references, random_baseline: float = 0.0):
            if len(predictions) == 0:
                raise ValueError("centered_accuracy needs at least one prediction")
            accuracy = sum(int(p == r) for p, r in zip(predictions, references)) / len(predictions)
            return {"accuracy": accuracy, "centered_accuracy": centered_accuracy(accuracy, random_baseline)}
