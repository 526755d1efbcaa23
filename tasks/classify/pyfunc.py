"""The student as an MLflow pyfunc model: ``mlflow.pyfunc.load_model("models:/NAME@champion")``.

Why a pyfunc wrapper: users load the champion by alias and get a label and a score per
text, through the same length-sorted (and on CPU, int8) inference path distill measures.
This module and tasks/classify/inference.py are shipped with the model (``code_paths``), so loading
it needs torch and transformers, not distill.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

try:
    import mlflow.pyfunc

    _Base = mlflow.pyfunc.PythonModel
except ImportError:  # pragma: no cover
    _Base = object


class StudentPyfunc(_Base):  # type: ignore[misc,valid-type]
    def __init__(self, precision: str = "auto", max_length: int = 128, batch_size: int = 64) -> None:
        self.precision = precision
        self.max_length = max_length
        self.batch_size = batch_size

    def load_context(self, context):  # type: ignore[no-untyped-def]
        from tasks.classify.inference import StudentPredictor

        self.predictor = StudentPredictor(context.artifacts["model_dir"], precision=self.precision,
                                          max_length=self.max_length)

    def predict(self, context, model_input, params=None):  # type: ignore[no-untyped-def]  # untyped: see MLflow schema rules
        if isinstance(model_input, pd.DataFrame):
            col = "text" if "text" in model_input.columns else model_input.columns[0]
            texts = [str(x) for x in model_input[col].tolist()]
        else:
            texts = [str(x) for x in list(model_input)]
        labels, scores = self.predictor.predict(texts, self.batch_size)
        return pd.DataFrame({"label": labels, "score": scores})
