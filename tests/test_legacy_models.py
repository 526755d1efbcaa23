"""Models registered by distill 0.1 (``distill.tasks.*`` module paths) still load and predict after the layout moved.

Each test registers a model the way 0.1 did, from a process that has not imported
today's distill: the pyfunc object pickled from ``distill.tasks.mlflow_model`` (or
``distill.tasks.generator_model``), with 0.1's ``distill/tasks/`` code in its
``code_paths``. Then this test process, which has imported distill (as ``distill
predict`` and a service of your own do), loads it by alias and predicts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

import distill  # noqa: F401  (the point: today's distill is imported before the old model is loaded)
from tests.conftest import REPO, use_mlflow

pytestmark = pytest.mark.system  # make test-fast leaves it out (README "Tests")

# today's module -> the module path 0.1 gave the same code
OLD_NAMES = {
    "tasks.classify.inference": "distill.tasks.inference",
    "tasks.generate.inference": "distill.tasks.lora_student",
    "tasks.templates.generation": "distill.tasks.gen_prompt",
    "tasks.templates.base": "distill.tasks.prompting",
}


def old_code(folder: Path, files: dict[str, str]) -> Path:
    """0.1's shipped layout: ``distill/tasks/<old name>.py`` holding today's code under the old import paths."""
    code = folder / "distill"
    (code / "tasks").mkdir(parents=True)
    (code / "__init__.py").write_text("")
    (code / "tasks" / "__init__.py").write_text("")
    for old, new in files.items():
        text = (REPO / new).read_text()
        for now, then in OLD_NAMES.items():
            text = text.replace(now, then)
        (code / "tasks" / old).write_text(text)
    return code


def register_as_0_1(tmp_path: Path, uri: str, script: str) -> None:
    """Run ``script`` where ``distill`` is 0.1's shipped package, not today's."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}  # no experiment of another test's
    env.update({"MLFLOW_TRACKING_URI": uri, "PYTHONPATH": str(tmp_path / "old")})
    r = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"registered from {tmp_path / 'old' / 'distill'}" in r.stdout  # 0.1's package, not today's


def test_a_classifier_registered_by_0_1_loads_where_distill_is_imported(tmp_path: Path) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from tasks.classify.train import resolve_student_path, save_label_map

    model_dir = tmp_path / "student"
    base = resolve_student_path("auto")
    AutoModelForSequenceClassification.from_pretrained(base, num_labels=2).save_pretrained(model_dir)
    AutoTokenizer.from_pretrained(base).save_pretrained(model_dir)
    save_label_map(model_dir, ["positive", "negative"])
    code = old_code(
        tmp_path / "old", {"mlflow_model.py": "tasks/classify/pyfunc.py", "inference.py": "tasks/classify/inference.py"}
    )
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    register_as_0_1(
        tmp_path,
        uri,
        f"""
import distill, mlflow
from distill.tasks.mlflow_model import StudentPyfunc
mlflow.set_registry_uri({uri!r})
with mlflow.start_run():
    info = mlflow.pyfunc.log_model(name="student", python_model=StudentPyfunc(precision="fp32", max_length=16),
                                   artifacts={{"model_dir": {str(model_dir)!r}}}, code_paths=[{str(code)!r}],
                                   pip_requirements=["torch", "transformers"])
v = mlflow.register_model(info.model_uri, "legacy-classifier")
mlflow.MlflowClient().set_registered_model_alias("legacy-classifier", "champion", v.version)
print("registered from", distill.__path__[0])
""",
    )
    import mlflow

    use_mlflow(uri)
    model = mlflow.pyfunc.load_model("models:/legacy-classifier@champion")
    out = model.predict(pd.DataFrame({"text": ["loved it", "a bore"]}))
    assert list(out.columns) == ["label", "score"] and set(out["label"]) <= {"positive", "negative"}
    assert type(model.unwrap_python_model()).__module__ == "tasks.classify.pyfunc"  # answered by today's code


def test_a_generator_registered_by_0_1_loads_where_distill_is_imported(tmp_path: Path) -> None:
    pytest.importorskip("peft")
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tasks.generate.inference import base_model_dir

    base = base_model_dir()
    adapter = tmp_path / "adapter"
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(str(base)),
        LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"),
    )
    model.save_pretrained(str(adapter))
    AutoTokenizer.from_pretrained(str(base)).save_pretrained(str(adapter))
    code = old_code(
        tmp_path / "old",
        {
            "generator_model.py": "tasks/generate/pyfunc.py",
            "lora_student.py": "tasks/generate/inference.py",
            "gen_prompt.py": "tasks/templates/generation.py",
            "prompting.py": "tasks/templates/base.py",
        },
    )
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    register_as_0_1(
        tmp_path,
        uri,
        f"""
import distill, mlflow
from distill.tasks.generator_model import GeneratorPyfunc
mlflow.set_registry_uri({uri!r})
py = GeneratorPyfunc("Summarise in one sentence:", max_input_words=50, max_new_tokens=6, batch_size=2,
                     base_model={str(base)!r}, max_source_tokens=64)
with mlflow.start_run():
    info = mlflow.pyfunc.log_model(name="student", python_model=py, artifacts={{"adapter_dir": {str(adapter)!r}}},
                                   code_paths=[{str(code)!r}], pip_requirements=["torch", "transformers", "peft"])
v = mlflow.register_model(info.model_uri, "legacy-generator")
mlflow.MlflowClient().set_registered_model_alias("legacy-generator", "champion", v.version)
print("registered from", distill.__path__[0])
""",
    )
    import mlflow

    use_mlflow(uri)
    gen = mlflow.pyfunc.load_model("models:/legacy-generator@champion")
    out = gen.predict(pd.DataFrame({"text": ["The council approved a new bridge over the river on Monday."]}))
    assert list(out.columns) == ["text", "finish_reason"] and isinstance(out["text"].iloc[0], str)
    assert type(gen.unwrap_python_model()).__module__ == "tasks.generate.pyfunc"
    assert json.dumps(out.to_dict())  # plain values, as serving returns them
