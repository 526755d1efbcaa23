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
    from mlflow.pyfunc.model import PythonModel as _Base
except ImportError:  # pragma: no cover
    _Base = object  # type: ignore[assignment,misc]


class StudentPyfunc(_Base):  # type: ignore[misc,valid-type]
    def __init__(self, precision: str = "auto", max_length: int = 128, batch_size: int = 64) -> None:
        self.precision = precision
        self.max_length = max_length
        self.batch_size = batch_size

    def load_context(self, context):  # type: ignore[no-untyped-def]
        from tasks.classify.inference import StudentPredictor

        self.predictor = StudentPredictor(
            context.artifacts["model_dir"], precision=self.precision, max_length=self.max_length
        )

    # ``pd.DataFrame`` is one of the hints MLflow reads as "no schema from the hint": the logged signature stays the
    # only schema, and MLflow's class-definition warning about unannotated predict() stays quiet
    def predict(self, context: Any, model_input: pd.DataFrame, params: Any = None) -> pd.DataFrame:  # pyright: ignore[reportIncompatibleMethodOverride]  (MLflow 3.17 declares -> None)
        if isinstance(model_input, pd.DataFrame):
            col = "text" if "text" in model_input.columns else model_input.columns[0]
            texts = [str(x) for x in model_input[col].tolist()]
        else:
            texts = [str(x) for x in list(model_input)]
        labels, scores = self.predictor.predict(texts, self.batch_size)
        return pd.DataFrame({"label": labels, "score": scores})


def log_student_model(model_dir: str, precision: str, max_length: int, example_texts: list[str]) -> Any:
    """Log the student as a pyfunc model (signature, input example, explicit pip requirements)."""
    import mlflow
    import pandas as pd
    import torch
    import transformers
    from mlflow.models import infer_signature

    from tasks.registry.model_code import CLASSIFIER_CODE, model_code

    example = pd.DataFrame({"text": example_texts[:3] or ["an example"]})
    out_example = pd.DataFrame({"label": ["x"] * len(example), "score": [0.5] * len(example)})
    reqs = [
        f"torch=={torch.__version__.split('+')[0]}",
        f"transformers=={transformers.__version__}",
        f"pandas=={pd.__version__}",
        f"mlflow=={mlflow.__version__}",
    ]
    with model_code(CLASSIFIER_CODE) as code:  # the model loads without distill installed
        return mlflow.pyfunc.log_model(
            name="student",
            python_model=StudentPyfunc(precision=precision, max_length=max_length),
            artifacts={"model_dir": model_dir},
            signature=infer_signature(example, out_example),
            input_example=example,
            pip_requirements=reqs,
            code_paths=[code],
        )
