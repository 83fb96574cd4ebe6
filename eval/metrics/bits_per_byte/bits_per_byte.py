"""Bits per byte (spec §6.8), as a local `evaluate` metric.

    metric = evaluate.load("eval/metrics/bits_per_byte")
    metric.compute(predictions=[2.1, 0.3, 1.7], references=[3, 0, 4])   # per-token loss (nats), token bytes
    # {"bits_per_byte": (2.1 + 1.7) / (ln 2 * 7), "total_nats": 3.8, "total_bytes": 7}

A token counts only when its byte length is positive: special tokens (0 bytes) and ignored targets are out
of both sums. The result does not depend on the tokenizer, so models with different vocabularies compare.
"""

import math

_DESCRIPTION = "Cross entropy in bits per UTF-8 byte of the predicted text: sum(nats) / (ln 2 * sum(bytes))."
_KWARGS_DESCRIPTION = """
Args:
    predictions (list of float): per-token cross entropy in nats.
    references (list of int): the byte length of each target token (0 for special or ignored tokens).
Returns:
    bits_per_byte (float; inf when no token has bytes), total_nats (float), total_bytes (int).
"""
_CITATION = "nanochat (Karpathy, 2025), loss_eval.evaluate_bpb."


def bits_per_byte(total_nats: float, total_bytes: int) -> float:
    """total_nats / (ln 2 * total_bytes); inf when there are no bytes."""
    if total_bytes < 0:
        raise ValueError(f"total_bytes must be >= 0, got {total_bytes}")
    return math.inf if total_bytes == 0 else total_nats / (math.log(2) * total_bytes)


try:  # the functions above are what eval/ and training/ import; `evaluate` is only needed for evaluate.load()
    import datasets
    import evaluate
except ImportError:  # pragma: no cover
    evaluate = None

if evaluate is not None:

    class BitsPerByte(evaluate.Metric):
        """`evaluate` wrapper of `bits_per_byte` over per-token losses and byte lengths."""

        def _info(self):
            return evaluate.MetricInfo(
                description=_DESCRIPTION,
                citation=_CITATION,
                inputs_description=_KWARGS_DESCRIPTION,
                features=datasets.Features({"predictions": datasets.Value("float64"), "references": datasets.Value("int64")}),
            )

        def _compute(self, predictions, references):
            nats = math.fsum(loss for loss, nbytes in zip(predictions, references) if nbytes > 0)
            nbytes = int(sum(n for n in references if n > 0))
            return {"bits_per_byte": bits_per_byte(nats, nbytes), "total_nats": nats, "total_bytes": nbytes}
