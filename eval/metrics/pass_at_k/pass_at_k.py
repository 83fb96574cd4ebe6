"""pass@k for code and math problems, as a local `evaluate` metric.

    metric = evaluate.load("eval/metrics/pass_at_k")
    metric.compute(predictions=[[True, False, False], [False, False, False]], k=[1, 2])
    # {"pass@1": 0.1667, "pass@2": 0.3333}

`predictions` holds, per problem, whether each of its n samples passed. Two estimators:
- "unbiased" (Chen et al., 2021, HumanEval): 1 - C(n-c, k) / C(n, k) averaged over problems, computed as a
  stable product; needs k <= n.
- "first_k" (nanochat's RL eval, spec §8): 1 if any of the first k samples passed. With k = n both are
  "any sample passed", which is how ChatCORE scores a problem (spec §9.2).
"""

import numpy as np

_DESCRIPTION = "Probability that at least one of k samples solves a problem."
_KWARGS_DESCRIPTION = """
Args:
    predictions (list of list of bool): per problem, the pass/fail result of each sample.
    k (int or list of int): the k values to report (default [1]).
    estimator (str): "unbiased" (default) or "first_k".
Returns:
    pass@k (float) for every requested k.
"""
_CITATION = "Chen et al., Evaluating Large Language Models Trained on Code, 2021."


def pass_at_k(num_samples: int, num_correct: int, k: int) -> float:
    """Unbiased pass@k of one problem: 1 - C(n-c, k) / C(n, k)."""
    if not 1 <= k <= num_samples:
        raise ValueError(f"pass@{k} needs 1 <= k <= n samples (n = {num_samples})")
    if not 0 <= num_correct <= num_samples:
        raise ValueError(f"num_correct must be in [0, {num_samples}], got {num_correct}")
    if num_samples - num_correct < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(num_samples - num_correct + 1, num_samples + 1)))


def mean_pass_at_k(results: list[list[bool]], k: int, estimator: str = "unbiased") -> float:
    """pass@k averaged over problems (`results[i]` = sample outcomes of problem i)."""
    if not results:
        raise ValueError("pass@k needs at least one problem")
    if estimator == "unbiased":
        return float(np.mean([pass_at_k(len(r), int(sum(r)), k) for r in results]))
    if estimator == "first_k":
        for r in results:
            if len(r) < k:
                raise ValueError(f"first_k pass@{k} needs at least {k} samples per problem, got {len(r)}")
        return float(np.mean([any(r[:k]) for r in results]))
    raise ValueError(f"estimator must be 'unbiased' or 'first_k', got {estimator!r}")


try:  # the functions above are what eval/ and training/ import; `evaluate` is only needed for evaluate.load()
    import datasets
    import evaluate
except ImportError:  # pragma: no cover
    evaluate = None

if evaluate is not None:

    class PassAtK(evaluate.Metric):
        """`evaluate` wrapper of `mean_pass_at_k`."""

        def _info(self):
            return evaluate.MetricInfo(
                description=_DESCRIPTION,
                citation=_CITATION,
                inputs_description=_KWARGS_DESCRIPTION,
                features=datasets.Features({"predictions": datasets.Sequence(datasets.Value("bool"))}),
            )

        def _compute(self, predictions, k=(1,), estimator: str = "unbiased"):
            ks = [k] if isinstance(k, int) else list(k)
            return {f"pass@{kk}": mean_pass_at_k([list(p) for p in predictions], kk, estimator) for kk in ks}
